#!/usr/bin/env bash
# Generate the Python stubs (+ .pyi typing stubs) from protos/ into the modelyard package.
#   scripts/gen_protos.sh [OUT_ROOT]    (default: the repository root)
# modelyard.v1 lands in OUT_ROOT/modelyard/v1, the Open Inference Protocol in OUT_ROOT/modelyard/oip.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.}
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")

rm -rf "$OUT/modelyard/v1" "$OUT/modelyard/oip"
mkdir -p "$OUT/modelyard/v1" "$OUT/modelyard/oip"

"$PY" -m grpc_tools.protoc -Iprotos \
    --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" --mypy_grpc_out="$OUT" \
    protos/modelyard/v1/*.proto

if compgen -G "protos/inference/*.proto" >/dev/null; then
    "$PY" -m grpc_tools.protoc -Iprotos/inference \
        --python_out="$OUT/modelyard/oip" --pyi_out="$OUT/modelyard/oip" \
        --grpc_python_out="$OUT/modelyard/oip" \
        --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" --mypy_grpc_out="$OUT/modelyard/oip" \
        protos/inference/*.proto
    # The OIP files are compiled without a package directory (their wire package is `inference`);
    # make their imports of each other relative so they live inside modelyard.oip.
    sed -i -E 's/^import (grpc_service|model_config)_pb2 as /from . import \1_pb2 as /' \
        "$OUT"/modelyard/oip/*.py "$OUT"/modelyard/oip/*.pyi
fi

printf '"""Generated from protos/modelyard/v1 by scripts/gen_protos.sh. Do not edit."""\n' \
    > "$OUT/modelyard/v1/__init__.py"
printf '"""Open Inference Protocol v2 stubs, generated from protos/inference. Do not edit."""\n' \
    > "$OUT/modelyard/oip/__init__.py"
