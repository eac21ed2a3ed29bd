#!/usr/bin/env bash
# Regenerate the Python stubs for proto/monitor/v1/monitor.proto into monitor/v1/.
# Usage: scripts/gen_proto.sh [OUTDIR]   (default: repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
python -m grpc_tools.protoc -I "$root/proto" --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" "$root/proto/monitor/v1/monitor.proto"
