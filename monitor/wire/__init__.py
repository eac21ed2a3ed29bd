"""Wire codec: decode + validate `monitor.v1.ActivationFrame`, and encode frames for clients.

    codec.py   decode_frame / encode_frame, FrameError, spans (needs grpc and protobuf)
    hooks.py   hook-point names (``blocks.L.hook_<kind>``): plain Python

The codec's names are imported on first use, so ``monitor.wire.hooks`` (which the bundle
loader and the scorer need) imports without grpc or protobuf: the GPU benchmark hosts run
the scorer with torch alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.wire.codec import (
        DTYPE_ITEMSIZE,
        MAX_CORRELATION_ID_BYTES,
        MAX_SEQ_GAP,
        MAX_SPANS_PER_FRAME,
        REASONS,
        WIRE_VERSION,
        DecodedFrame,
        FrameError,
        RowMeta,
        Span,
        SpanRefusal,
        check_seq,
        decode_frame,
        encode_frame,
        parse_spans,
    )

__all__ = [
    "DTYPE_ITEMSIZE",
    "MAX_CORRELATION_ID_BYTES",
    "MAX_SEQ_GAP",
    "MAX_SPANS_PER_FRAME",
    "REASONS",
    "WIRE_VERSION",
    "DecodedFrame",
    "FrameError",
    "RowMeta",
    "Span",
    "SpanRefusal",
    "check_seq",
    "decode_frame",
    "encode_frame",
    "parse_spans",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("monitor.wire.codec"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
