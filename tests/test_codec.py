"""Unit tests of monitor/wire/codec.py: round trips, zero copy, every refusal reason."""

from __future__ import annotations

import ctypes
from typing import Any, cast

import grpc
import numpy as np
import pytest
import torch

from monitor.v1 import monitor_pb2
from monitor.wire import REASONS, FrameError, Span, decode_frame, encode_frame

D = 16
#: decode_frame's keyword arguments (checked there; Any: the values differ in type)
KW: dict[str, Any] = dict(model="m", d_model=D, layers=frozenset({1, 4}), max_frame_bytes=1 << 20)


def _frame(x, spans=None, **kw):
    spans = spans if spans is not None else [Span("a", x.shape[0], 0, x.shape[0])]
    return encode_frame(x, seq=kw.pop("seq", 1), model=kw.pop("model", "m"),
                        layer=kw.pop("layer", 1), spans=spans, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_round_trip(dtype: torch.dtype) -> None:
    x = torch.randn(5, D).to(dtype)
    f = _frame(x, spans=[Span("a", 2, 7, 8), Span("b", 3, 0, 1)], step=42)
    assert f.dtype == {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[dtype]
    assert len(f.data) == 5 * D * x.element_size()
    d = decode_frame(f, **KW)
    # numpy: float32 / float16 as sent, bfloat16 upcast to float32 (exact)
    want = np.float16 if dtype == torch.float16 else np.float32
    assert d.x.dtype == want and d.x.shape == (5, D) and not d.x.flags.writeable
    assert d.wire_dtype == f.dtype
    up = torch.float16 if dtype == torch.float16 else torch.float32
    assert torch.equal(torch.from_numpy(d.x.copy()), x.to(up))
    assert d.request_ids == ("a", "b") and d.step == 42 and d.seq == 1
    np.testing.assert_array_equal(d.row_request, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(d.positions, [7, 8, 0, 1, 2])
    np.testing.assert_array_equal(d.generated, [False, True, False, True, True])
    assert d.span_bounds == ((0, 2), (2, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_round_trip_little_endian(dtype: type) -> None:
    x: np.ndarray = np.random.default_rng(0).standard_normal((3, D)).astype(dtype)
    f = _frame(x)
    assert f.data == x.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    big = x.astype(np.dtype(dtype).newbyteorder(">"))  # non-native input is normalised
    assert _frame(big).data == f.data
    d = decode_frame(f, **KW)
    np.testing.assert_array_equal(d.x, x)


def test_bf16_decodes_to_exact_float32_values() -> None:
    """Every bf16 bit pattern (NaN payloads aside) decodes to the value torch gives it."""
    from monitor.wire.codec import bf16_bits_to_f32

    bits = np.arange(1 << 16, dtype=np.uint16)
    got = bf16_bits_to_f32(bits)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))


def test_bf16_wire_bytes_are_the_upper_half_of_fp32() -> None:
    x = torch.tensor([[1.0, -2.5] + [0.0] * (D - 2)])
    f = _frame(x.bfloat16())
    hi = (np.frombuffer(_frame(x).data, dtype="<u4") >> 16).astype("<u2")
    assert f.data == hi.tobytes()


def test_decode_is_zero_copy() -> None:
    from types import SimpleNamespace

    f = _frame(torch.randn(4, D))
    data = bytes(f.data)
    view = SimpleNamespace(data=data, model=f.model, layer=f.layer, dtype=f.dtype,
                           shape=list(f.shape), spans=list(f.spans), seq=f.seq, step=f.step,
                           hook_name=f.hook_name, projection=f.projection,
                           HasField=lambda name: False)
    # duck-typed frame: we know the exact bytes object
    d = decode_frame(cast(monitor_pb2.ActivationFrame, view), **KW)
    addr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert d.x.ctypes.data == addr  # the array views the payload bytes, no copy


def _err(frame, **kw) -> FrameError:
    with pytest.raises(FrameError) as e:
        decode_frame(frame, **{**KW, **kw})
    assert e.value.reason in REASONS
    return e.value


def test_refusals_name_field_expected_found() -> None:
    x = torch.randn(4, D)
    f = _frame(x, model="other")
    e = _err(f)
    assert (e.code, e.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "model_mismatch")
    assert "'m'" in e.message and "'other'" in e.message

    e = _err(_frame(x, layer=2))
    assert e.reason == "unknown_layer" and "[1, 4]" in e.message and "2" in e.message

    f = _frame(x)
    f.dtype = 0
    assert _err(f).reason == "dtype_unspecified"
    f.dtype = 12
    assert _err(f).reason == "dtype_unspecified"

    f = _frame(x)
    f.shape[:] = [4, D, 1]
    assert _err(f).reason == "bad_shape"
    f.shape[:] = [0, D]
    assert _err(f).reason == "bad_shape"

    f = _frame(torch.randn(4, D + 1))  # bytes match its own shape: the rows are real
    e = _err(f)
    assert e.reason == "d_model_mismatch" and f"d_model={D}" in e.message
    assert e.rows is not None  # spans were fine: rows can be accounted as unscored

    f = _frame(x)
    f.shape[:] = [4, D + 1]  # a shape the bytes do not back
    e = _err(f)
    assert e.reason == "byte_length_mismatch" and e.rows is None

    f = _frame(x)
    f.data = f.data + b"\0\0"
    e = _err(f)
    assert e.reason == "byte_length_mismatch" and str(4 * D * 4) in e.message


def test_span_refusals() -> None:
    x = torch.randn(4, D)
    assert _err(_frame(x, spans=[])).reason == "bad_spans"
    assert _err(_frame(x, spans=[Span("a", 3)])).reason == "bad_spans"
    # a span bad on its own is refused alone (its rows kept for accounting), not the frame
    d = decode_frame(_frame(x, spans=[Span("a", 2, 0, 4), Span("", 2, 2, 4)]), **KW)
    assert [(r.span, r.reason) for r in d.refused] == [(1, "bad_spans")]
    assert "spans[1].request_id: expected a non-empty id, found ''" in d.refused[0].message
    assert d.span_bounds == ((0, 2), (2, 4)) and d.positions.tolist() == [0, 1, 2, 3]
    d = decode_frame(_frame(x, spans=[Span("a", 4), Span("b", 0)]), **KW)
    assert [(r.span, r.reason, r.n_spans) for r in d.refused] == [(1, "bad_spans", 1)]
    assert "spans[1].n_rows: expected > 0, found 0" in d.refused[0].message
    assert not decode_frame(_frame(x), **KW).refused
    # spans optional for the unary Score RPC: one anonymous request
    d = decode_frame(_frame(x, spans=[]), **KW, require_spans=False)
    assert d.request_ids == ("",) and d.positions.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_rows(dtype: torch.dtype) -> None:
    x = torch.randn(6, D)
    x[2, 3] = float("nan")
    x[4, 0] = float("-inf")
    f = _frame(x.to(dtype), spans=[Span("a", 2, 0, 9), Span("b", 4, 10, 12)])
    e = _err(f)
    assert e.reason == "non_finite"
    assert "2 of 6 rows (first row 2, request 'b', position 10)" in e.message
    assert e.rows is not None and e.rows.request_ids == ("a", "b")
    decode_frame(f, **KW, check_finite=False)  # the check can be disabled


def test_oversized_is_resource_exhausted() -> None:
    f = _frame(torch.randn(8, D))
    e = _err(f, max_frame_bytes=8 * D * 4 - 1)
    assert (e.code, e.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "oversized")
    decode_frame(f, **{**KW, "max_frame_bytes": 8 * D * 4})  # the limit itself is fine


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_frame(torch.randn(D), seq=1, model="m", layer=1, spans=[])
    with pytest.raises(ValueError):
        encode_frame(torch.randn(2, D).double(), seq=1, model="m", layer=1, spans=[])
    with pytest.raises(TypeError):
        encode_frame([[1.0]], seq=1, model="m", layer=1, spans=[])  # type: ignore[arg-type]


def test_encode_accepts_non_contiguous_and_tuples() -> None:
    x = torch.randn(D, 3).t()  # [3, D], non-contiguous
    f = encode_frame(x, seq=9, model="m", layer=4, spans=[("r", 3, 5, 6)])
    d = decode_frame(f, **KW)
    assert torch.equal(torch.from_numpy(d.x.copy()), x) and d.positions.tolist() == [5, 6, 7]
    assert d.generated.tolist() == [False, True, True]


def _peak_alloc(fn) -> int:
    """Peak bytes allocated (Python + numpy, both traced by tracemalloc) while `fn` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("require_spans", [True, False])
def test_claimed_rows_are_checked_against_bytes_before_allocating(require_spans: bool) -> None:
    # issue 8 item 2: a ~90-byte frame claiming 2^26 rows with one span and 4 data bytes
    # built 2^26-row span arrays (~1.3 GB) before the byte-length check
    f = _frame(torch.randn(1, D), spans=[Span("a", 1 << 26)] if require_spans else [])
    f.shape[:] = [1 << 26, 1]
    f.data = b"\0" * 4
    assert f.ByteSize() < 100
    errs: list[FrameError] = []

    def run() -> None:
        with pytest.raises(FrameError) as ei:
            decode_frame(f, **KW, require_spans=require_spans)
        errs.append(ei.value)

    assert _peak_alloc(run) < 1 << 20
    assert errs[0].reason == "byte_length_mismatch"
    assert errs[0].rows is None  # claimed rows are not counted as unscored
    # a zero width cannot make any row count "backed" by zero bytes
    f.shape[:] = [1 << 40, 0]
    f.data = b""
    assert _err(f).reason == "bad_shape"


def test_span_sum_checked_while_expanding() -> None:
    x = torch.randn(4, D)
    f = _frame(x, spans=[Span("a", 3), Span("b", (1 << 32) - 1)])
    e = _err(f)
    assert e.reason == "bad_spans" and "spans[1]" in e.message


def test_span_count_and_id_length_limits() -> None:
    x = torch.randn(8, D)
    spans = [Span(f"r{i}", 1) for i in range(8)]
    assert not decode_frame(_frame(x, spans=spans), **KW, max_spans=8).refused
    # spans past the cap: one refusal, their rows one anonymous pseudo-span (no request)
    d = decode_frame(_frame(x, spans=spans), **KW, max_spans=5)
    [r] = d.refused
    assert (r.span, r.reason, r.n_spans) == (5, "too_many_spans", 3)
    assert "at most 5" in r.message and "found 8" in r.message and "3 rows" in r.message
    assert d.request_ids == ("r0", "r1", "r2", "r3", "r4", "")
    assert d.span_bounds[-1] == (5, 8) and d.row_request.tolist() == [0, 1, 2, 3, 4, 5, 5, 5]
    # the sum is still checked over every span, also those past the cap
    assert _err(_frame(x, spans=[*spans, Span("x", 1)]), max_spans=5).reason == "bad_spans"

    # request-id length is the registry's per-span decision, not a frame refusal
    assert not decode_frame(_frame(x, spans=[Span("é" * 1000, 8)]), **KW).refused
    d = decode_frame(_frame(x, spans=[Span("r", 4, correlation_id="c" * 300),
                                      Span("s", 4, correlation_id="ok")]), **KW)
    [r] = d.refused
    assert (r.span, r.reason) == (0, "correlation_id_too_long")
    assert "256" in r.message and "300" in r.message
    assert d.correlation_ids == ("", "ok")  # the over-long label is not kept


def test_correlation_id_is_a_label_per_span() -> None:
    x = torch.randn(3, D)
    f = _frame(x, spans=[Span("eng-1", 1, 0, 1, correlation_id="ticket-42"),
                         Span("eng-2", 2, 0, 1)])
    d = decode_frame(f, **KW)
    assert d.request_ids == ("eng-1", "eng-2")
    assert d.correlation_ids == ("ticket-42", "")


def test_check_seq() -> None:
    from monitor.wire import MAX_SEQ_GAP, check_seq

    assert check_seq(0, 1) == 0
    assert check_seq(5, 9) == 3
    assert check_seq(5, 6 + MAX_SEQ_GAP) == MAX_SEQ_GAP
    e = _seq_err(5, 5)
    assert e.reason == "out_of_order" and "> 5" in e.message
    # issue 8 item 5: one huge seq number poisoned frames_missing_total by ~1.8e19
    e = _seq_err(5, 2**64 - 1)
    assert e.reason == "seq_gap_too_large" and str(MAX_SEQ_GAP) in e.message


def _seq_err(last: int, seq: int) -> FrameError:
    from monitor.wire import check_seq

    with pytest.raises(FrameError) as ei:
        check_seq(last, seq)
    return ei.value


def test_reasons_are_unique() -> None:
    assert len(set(REASONS)) == len(REASONS)


def test_hook_names() -> None:
    """A frame's hook point: empty = resid_post of its layer; a server without hook points
    refuses other kinds (never scores resid_pre rows as resid_post); a mismatched layer or
    unparsable name is refused naming the field."""
    x = torch.randn(3, D)
    d = decode_frame(_frame(x), **KW)
    assert d.hook_name == "blocks.1.hook_resid_post"
    d = decode_frame(encode_frame(x, seq=1, model="m", layer=4, spans=[Span("r", 3)],
                                  hook_name="blocks.4.hook_resid_post"), **KW)
    assert d.hook_name == "blocks.4.hook_resid_post"
    pre = encode_frame(x, seq=1, model="m", layer=4, spans=[Span("r", 3)],
                       hook_name="blocks.4.hook_resid_pre")
    with pytest.raises(FrameError, match="resid_post only") as e:
        decode_frame(pre, **KW)
    assert e.value.reason == "unknown_hook"
    hooks = frozenset({"blocks.4.hook_resid_pre", "blocks.1.hook_mlp_out"})
    assert decode_frame(pre, **KW, hook_names=hooks).hook_name == "blocks.4.hook_resid_pre"
    with pytest.raises(FrameError, match=r"blocks\.1\.hook_resid_post"):
        decode_frame(_frame(x), **KW, hook_names=hooks)  # resid_post of 1 is not scored
    for name, msg in (("blocks.1.hook_resid_pre", "layer 4"), ("blocks.4.hook_attn_z", "kind"),
                      ("resid_pre", "blocks.<layer>")):
        f = encode_frame(x, seq=1, model="m", layer=4, spans=[Span("r", 3)], hook_name=name)
        with pytest.raises(FrameError, match=msg) as e:
            decode_frame(f, **KW, hook_names=hooks)
        assert e.value.reason == "unknown_hook" and "hook_name" in e.value.message


def test_proto_token_role_enum_equals_monitor_roles() -> None:
    from monitor.roles import TokenRole
    from monitor.v1 import monitor_pb2

    wire = {n.removeprefix("TOKEN_ROLE_"): v for n, v in monitor_pb2.TokenRole.items()}
    assert wire == {r.name: int(r) for r in TokenRole}


def test_roles_round_trip_and_derived_for_old_spans() -> None:
    from monitor.roles import TokenRole as R

    x = torch.randn(9, D)
    spans = [Span("a", 2, 0, 6, R.TEMPLATE), Span("a", 3, 2, 6, R.USER),
             Span("b", 2, 3, 4),  # old-style span: no role -> derived per row
             Span("a", 1, 5, 6, R.TEMPLATE), Span("a", 1, 6, 6, R.GENERATED)]
    d = decode_frame(_frame(x, spans=spans), **KW)
    assert d.roles.dtype == np.int8
    np.testing.assert_array_equal(
        d.roles, [R.TEMPLATE, R.TEMPLATE, R.USER, R.USER, R.USER, R.OTHER, R.GENERATED,
                  R.TEMPLATE, R.GENERATED])
    np.testing.assert_array_equal(d.generated, d.roles == R.GENERATED)
    # tuples with a fifth element carry the role too
    d2 = decode_frame(_frame(x[:2], spans=[("c", 2, 0, 2, int(R.SYSTEM))]), **KW)
    np.testing.assert_array_equal(d2.roles, [R.SYSTEM, R.SYSTEM])


@pytest.mark.parametrize(("span", "needle"), [
    (Span("a", 2, 0, 4, 99), "spans[0].role: expected a TokenRole in 1..7, found 99"),
    (Span("a", 2, 3, 4, 4), "expected a GENERATED span to start at or after prompt_len=4, "
                            "found start_position=3"),
    (Span("a", 2, 3, 4, 2), "expected a USER span to end at or before prompt_len=4, found "
                            "it ends at 5"),
])
def test_role_refusals_name_field_expected_found(span: Span, needle: str) -> None:
    d = decode_frame(_frame(torch.randn(2, D), spans=[span]), **KW)
    [r] = d.refused
    assert r.reason == "bad_spans" and needle in r.message
