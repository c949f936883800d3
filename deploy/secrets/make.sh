#!/usr/bin/env bash
# Make the secrets compose.yaml mounts, with fresh random values, keeping any that exist:
#
#   deploy/secrets/make.sh [DIR]      # DIR: $MODELYARD_SECRETS_DIR, else deploy/secrets
#
# cluster_secret (the services' shared HMAC secret), admin_key (the registry's first `admin`
# API key) and redis_password (URL-safe hex: it goes into Redis URLs). Compose mounts a file
# secret as it is on the host, owner and mode included, and the containers run as uid 10001:
# so the files are world-readable and the directory holding them is owner-only (0700).
# Everything here but this script is in .gitignore. The same files serve Kubernetes
# (`kubectl create secret generic ... --from-file`, docs/deploy.md). See docs/deploy.md, "Access control".
set -euo pipefail
dir=${1:-${MODELYARD_SECRETS_DIR:-$(dirname "$0")}}
PYTHON=${PYTHON:-python3}
mkdir -p "$dir"
chmod 0700 "$dir"

make_secret() {  # NAME PYTHON-EXPRESSION (with secrets and string imported)
    local path="$dir/$1"
    if [[ -s $path ]]; then
        echo "$path: kept"
        return
    fi
    # No trailing newline: `kubectl create secret --from-file` keeps the file's bytes as they are.
    "$PYTHON" -c "import secrets, string, sys; sys.stdout.write($2)" >"$path.partial"
    chmod 0644 "$path.partial"
    mv "$path.partial" "$path"
    echo "$path: made"
}

make_secret cluster_secret 'secrets.token_urlsafe(48)'
make_secret admin_key '"myk_" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12)) + "_" + secrets.token_urlsafe(32)'
make_secret redis_password 'secrets.token_hex(32)'
