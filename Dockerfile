# syntax=docker/dockerfile:1
#
# Images of vllm-safety-monitor.
#
#   make bundle                                   # bundles/default must exist first
#   docker build -t safety-monitor:0.1.0 .        # the sidecar (default target "runtime")
#   docker build --target vllm-plugin -t vllm-openai-safety-monitor:0.1.0 .
#                                                 # vLLM's image + the capture plugin
#   docker build --target sidecar-slim -t safety-monitor:0.1.0-slim .
#                                                 # the sidecar without torch (onnxruntime)
#
# The sidecar image is slim (python:3.11-slim, torch CPU, no probes extra), runs as
# uid/gid 10001 and works with a read-only root filesystem: the only path it writes is the
# audit log under /var/lib/safety-monitor (a volume; an emptyDir in Kubernetes).
# sidecar-slim is the same image with onnxruntime instead of torch (the bundle's ONNX
# graphs, `--backend onnxruntime`): installed environment 297 MB vs 941 MB (docs/DEPLOY.md).
# Probes: Kubernetes' native gRPC probes against grpc.health.v1 (no HEALTHCHECK here).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

# --- build: a venv with torch CPU and the package (without the probes extra) ----------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY monitor/ monitor/
COPY probes/ probes/
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install /wheels/vllm_safety_monitor-*.whl \
 && python -c "import monitor.cli, monitor.server.app"

# --- vllm-plugin: vLLM's image with the capture plugin (entry point vllm.general_plugins)
# Enabled at run time by SAFETY_MONITOR_ADDR=host:port; torch stays vLLM's own.
FROM ${VLLM_IMAGE} AS vllm-plugin
COPY --from=build /wheels/ /tmp/wheels/
RUN python3 -m pip install --no-cache-dir /tmp/wheels/vllm_safety_monitor-*.whl \
 && rm -rf /tmp/wheels

# --- build-slim: a venv with onnxruntime and the package, no torch --------------------
FROM ${PYTHON_IMAGE} AS build-slim
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY monitor/ monitor/
COPY probes/ probes/
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install "$(ls /wheels/vllm_safety_monitor-*.whl)[onnx]" \
 && python -c "import sys, monitor.cli, monitor.server.app, monitor.score.onnx_scorer; \
assert 'torch' not in sys.modules" \
 && ! python -c "import torch" 2>/dev/null

# --- runtime-base: user, volume, bundle and policies shared by both sidecar images -----
FROM ${PYTHON_IMAGE} AS runtime-base
RUN groupadd --system --gid 10001 monitor \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin monitor \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/safety-monitor
COPY bundles/default/ /opt/safety-monitor/bundles/default/
COPY policies/ /opt/safety-monitor/policies/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /var/lib/safety-monitor
VOLUME ["/var/lib/safety-monitor"]
# 50051: gRPC (monitor.v1 + grpc.health.v1 + reflection); 9464: Prometheus /metrics
EXPOSE 50051 9464
# Later flags win (argparse), so `docker run IMAGE --policy /x.yaml` overrides a default.
# --backend auto: the image holds one backend (torch, or onnxruntime in sidecar-slim), and
# auto takes the one installed (the log line "scorer backend ..." says which and why).
ENTRYPOINT ["safety-monitor", "serve", "--backend", "auto", \
            "--bundle", "/opt/safety-monitor/bundles/default", \
            "--policy", "/opt/safety-monitor/bundles/default/policy.suggested.yaml", \
            "--host", "0.0.0.0", "--port", "50051", \
            "--metrics-host", "0.0.0.0", "--metrics-port", "9464", \
            "--audit-log", "/var/lib/safety-monitor/audit.jsonl"]
CMD []

# --- sidecar-slim: the sidecar without torch (onnxruntime backend) --------------------
FROM runtime-base AS sidecar-slim
COPY --from=build-slim /opt/venv /opt/venv

# --- runtime: the sidecar with torch (default target: the last stage) -----------------
FROM runtime-base AS runtime
COPY --from=build /opt/venv /opt/venv
