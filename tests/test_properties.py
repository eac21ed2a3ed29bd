"""Hypothesis property tests of the three loaders that read untrusted input.

- codec: any `ActivationFrame` either decodes into arrays consistent with its spans and
  bytes, or raises `FrameError` with a reason from the one enum; never anything else,
  and rows reported for accounting are always backed by payload bytes.
- policy: any YAML-ish text parses or raises `PolicyError`; a generated valid policy
  parses back to exactly the thresholds it was written with.
- bundle: any mutation of a valid manifest loads or raises `BundleError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.judge.policy import PolicyError, parse_policy
from monitor.v1 import monitor_pb2
from monitor.wire import DTYPE_ITEMSIZE, REASONS, FrameError, decode_frame

D = 4
#: decode_frame's keyword arguments (Any: the values differ in type)
KW: dict[str, Any] = dict(model="m", d_model=D, layers=frozenset({1}), max_frame_bytes=4096)
FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

spans = st.lists(st.builds(
    monitor_pb2.RowSpan, request_id=st.sampled_from(["", "a", "b", "x" * 300]),
    n_rows=st.integers(0, 2**32 - 1) | st.integers(0, 6),
    start_position=st.integers(0, 2**32 - 1), prompt_len=st.integers(0, 2**32 - 1),
    correlation_id=st.sampled_from(["", "c", "é" * 200])), max_size=6)


@st.composite
def frames(draw: st.DrawFn) -> monitor_pb2.ActivationFrame:
    dtype = draw(st.sampled_from([0, 1, 2, 3, 7]))
    n = draw(st.integers(0, 6) | st.integers(-(2**63), 2**63 - 1))
    d = draw(st.sampled_from([D, 0, 1, 5]) | st.integers(-(2**63), 2**63 - 1))
    shape = draw(st.sampled_from([[n, d], [n], [n, d, 1], []]))
    item = DTYPE_ITEMSIZE.get(dtype, 4)
    honest = max(0, n) * max(0, d) * item if 0 <= n <= 6 and 0 <= d <= 8 else 0
    nbytes = draw(st.sampled_from([honest, honest + 1, max(0, honest - 2), 0, 4]))
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return monitor_pb2.ActivationFrame(
        seq=draw(st.integers(0, 2**64 - 1)), model=draw(st.sampled_from(["m", "other"])),
        layer=draw(st.sampled_from([1, 2])), dtype=cast(monitor_pb2.DType, dtype), shape=shape,
        data=data, spans=draw(spans))


@FAST
@given(frames(), st.booleans())
def test_codec_decodes_consistently_or_refuses(frame: monitor_pb2.ActivationFrame,
                                               require: bool) -> None:
    try:
        f = decode_frame(frame, **KW, require_spans=require)
    except FrameError as e:
        assert e.reason in REASONS and e.message
        if e.rows is not None:  # rows accounted as unscored exist in the payload
            n, d = frame.shape
            assert e.rows.positions.size == n
            assert n * d * DTYPE_ITEMSIZE[frame.dtype] == len(frame.data)
        return
    n = f.n_rows
    assert f.x.shape == (n, D) and n * D * DTYPE_ITEMSIZE[frame.dtype] == len(frame.data)
    assert f.span_bounds[0][0] == 0 and f.span_bounds[-1][1] == n
    for i, (a, b) in enumerate(f.span_bounds):
        assert (f.row_request[a:b] == i).all()
        if frame.spans:
            s = frame.spans[i]
            assert b - a == s.n_rows and f.request_ids[i] == s.request_id
            np.testing.assert_array_equal(f.positions[a:b], s.start_position + np.arange(b - a))
            np.testing.assert_array_equal(f.generated[a:b], f.positions[a:b] >= s.prompt_len)


YAML_CHARS = "abdefgiklnorstuvwx0123456789.:-_ \n{}[],'\"&*!#|>"
yaml_text = st.text(alphabet=st.sampled_from(list(YAML_CHARS)), max_size=300)


@FAST
@given(yaml_text)
def test_policy_parser_refuses_with_policy_error_only(text: str) -> None:
    try:
        parse_policy("version: \"v\"\n" + text, "fuzz.yaml")
    except PolicyError as e:
        assert str(e).startswith("fuzz.yaml")


@st.composite
def thresholds(draw: st.DrawFn) -> tuple[float, float]:
    warn = draw(st.floats(0.01, 0.9))
    crit = draw(st.floats(warn + 0.001, 0.99))
    return round(warn, 6), round(crit, 6)


@FAST
@given(st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True), thresholds(),
                       min_size=1, max_size=4),
       st.sampled_from(["max", "mean", "ema", "window_max"]))
def test_generated_policy_round_trips(dets: dict[str, tuple[float, float]], kind: str) -> None:
    params = {"ema": ", half_life_tokens: 3", "window_max": ", window_tokens: 5"}.get(kind, "")
    # Names are quoted: YAML 1.1 reads bare `no`, `on`, `y` ... as booleans, which the
    # parser refuses (test_policy_refuses_yaml_boolean_detector_name).
    body = "".join(f"  \"{name}\":\n    aggregation: {{kind: {kind}{params}}}\n"
                   f"    thresholds: {{warn: {w}, critical: {c}}}\n"
                   for name, (w, c) in dets.items())
    pol = parse_policy(f'version: "gen-1"\ndetectors:\n{body}', "gen.yaml")
    assert set(pol.detectors) == set(dets)
    for name, (w, c) in dets.items():
        assert dict(pol.detectors[name].thresholds) == {"warn": w, "critical": c}


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "true", "null"])
def test_policy_refuses_yaml_boolean_detector_name(word: str) -> None:
    """A bare YAML 1.1 boolean/null as a detector name is refused naming the field, never
    silently turned into a detector called `False`."""
    doc = f'version: "v"\ndetectors:\n  {word}:\n    thresholds: {{warn: 0.5, critical: 0.9}}\n'
    with pytest.raises(PolicyError, match="detectors: keys must be non-empty strings"):
        parse_policy(doc, "g.yaml")


@pytest.fixture(scope="module")
def manifest_doc(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


def _mutations() -> st.SearchStrategy:
    leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | \
        st.floats(allow_nan=False) | st.text(max_size=8)
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) |
                        st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**6), _mutations()), min_size=1, max_size=3))
def test_bundle_loader_refuses_with_bundle_error_only(
        manifest_doc: dict, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory,
        edits: list[tuple[int, object]]) -> None:
    from monitor.score import BundleError, load_bundle

    doc = json.loads(json.dumps(manifest_doc))
    paths: list[tuple[object, object]] = []

    def walk(node: object) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for k, v in items:
            paths.append((node, k))
            walk(v)

    walk(doc)
    for pick, value in edits:
        parent, key = paths[pick % len(paths)]
        parent[key] = value  # type: ignore[index]
    out = tmp_path_factory.mktemp("mut")
    for p in bundle_dir.iterdir():
        if p.name != "manifest.json":
            (out / p.name).symlink_to(p)
    (out / "manifest.json").write_text(json.dumps(doc))
    try:
        load_bundle(out, load_tensors=False)
    except BundleError as e:
        assert "manifest.json" in str(e)
    finally:
        shutil.rmtree(out)
