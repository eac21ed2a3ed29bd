"""Wire codec: decode + validate `monitor.v1.ActivationFrame`, and encode frames for clients."""

from monitor.wire.codec import (
    DTYPE_ITEMSIZE,
    REASONS,
    WIRE_VERSION,
    DecodedFrame,
    FrameError,
    RowMeta,
    Span,
    decode_frame,
    encode_frame,
    parse_spans,
)

__all__ = [
    "DTYPE_ITEMSIZE",
    "REASONS",
    "WIRE_VERSION",
    "DecodedFrame",
    "FrameError",
    "RowMeta",
    "Span",
    "decode_frame",
    "encode_frame",
    "parse_spans",
]
