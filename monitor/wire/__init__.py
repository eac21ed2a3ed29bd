"""Wire codec: decode + validate `monitor.v1.ActivationFrame`, and encode frames for clients."""

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
