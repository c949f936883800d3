"""Generated from protos/modelyard/v1 by scripts/gen_protos.sh. Do not edit."""
