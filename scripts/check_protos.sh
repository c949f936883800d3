#!/usr/bin/env bash
# Lint the contracts (buf STANDARD + COMMENTS), check for breaking changes against main where
# there is one, and fail if the committed stubs drift from the .proto files.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

"$BIN/buf" lint
echo "buf lint: clean"

if git rev-parse --verify -q origin/main >/dev/null 2>&1 \
        && git cat-file -e origin/main:buf.yaml 2>/dev/null; then
    "$BIN/buf" breaking --against '.git#branch=origin/main'
    echo "buf breaking: no breaking change against origin/main"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bash scripts/gen_protos.sh "$tmp"
if ! diff -r "$tmp/modelyard/v1" modelyard/v1 -x __pycache__ >/dev/null \
        || ! diff -r "$tmp/modelyard/oip" modelyard/oip -x __pycache__ >/dev/null; then
    diff -r "$tmp/modelyard" modelyard -x __pycache__ -x '*.py[!i]*' | head -40 || true
    echo "Generated stubs are stale: run ./dev.sh protos and commit the result." >&2
    exit 1
fi
echo "generated stubs: up to date"
