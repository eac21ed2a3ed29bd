"""Coverage-guided fuzzing of the two parsers that read untrusted input.

Targets (each a function of raw bytes that must only ever raise the documented error):

- ``codec``: bytes -> ``ClientMessage`` (protobuf; ``DecodeError`` is the lenient
  handler's ``undecodable``) -> ``decode_frame`` / ``check_seq`` (``FrameError`` only).
- ``policy``: bytes -> UTF-8 text -> ``parse_policy`` (``PolicyError`` only).

Engine: atheris (libFuzzer, coverage-guided) when installed, else a hypothesis run with
the same budget (random, not coverage-guided; said in the output). Crashing inputs are
written to ``tests/fuzz_corpus/<target>/`` and replayed by ``tests/test_fuzz_corpus.py``
as regression tests.

    python -m monitor.tools.fuzz --seconds 60                # both targets, 60 s each
    python -m monitor.tools.fuzz --target codec --seconds 600
    make fuzz FUZZ_SECONDS=600
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["TARGETS", "main", "run_codec", "run_policy", "seeds"]

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz_corpus"

# the geometry the codec target validates against (small: every claimed size is cheap)
MODEL = "fuzz/model"
D_MODEL = 8
LAYERS = frozenset({0, 3})
MAX_FRAME_BYTES = 1 << 16


def run_codec(data: bytes) -> None:
    """One codec input; raises only on a bug (anything but DecodeError / FrameError)."""
    from google.protobuf.message import DecodeError

    from monitor.v1 import monitor_pb2
    from monitor.wire.codec import DTYPE_ITEMSIZE, FrameError, check_seq, decode_frame

    try:
        msg = monitor_pb2.ClientMessage.FromString(data)
    except DecodeError:
        return  # answered in-stream as `undecodable`
    if msg.WhichOneof("body") != "frame":
        return
    frame = msg.frame
    try:
        check_seq(0, int(frame.seq))
    except FrameError:
        pass
    for require in (True, False):
        try:
            f = decode_frame(frame, model=MODEL, d_model=D_MODEL, layers=LAYERS,
                             max_frame_bytes=MAX_FRAME_BYTES, require_spans=require)
        except FrameError as e:
            if e.rows is not None:  # rows accounted as unscored must be backed by bytes
                n_rows, d = (int(v) for v in frame.shape)
                assert e.rows.positions.size == n_rows, "rows != shape[0]"
                assert n_rows * d * DTYPE_ITEMSIZE[frame.dtype] == len(frame.data), \
                    "rows not backed by bytes"
            continue
        n = f.n_rows
        assert f.x.shape == (n, D_MODEL), f.x.shape
        assert f.row_request.shape == f.positions.shape == f.generated.shape == (n,)
        assert f.span_bounds[-1][1] == n
        assert n * D_MODEL <= len(frame.data)


def run_policy(data: bytes) -> None:
    """One policy input; raises only on a bug (anything but PolicyError)."""
    from monitor.judge.policy import PolicyError, parse_policy

    text = data.decode("utf-8", errors="replace")
    try:
        parse_policy(text, "<fuzz>")
    except PolicyError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {"codec": run_codec, "policy": run_policy}


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from (so the fuzzer begins past the trivial refusals)."""
    if target == "policy":
        p = REPO / "policies" / "default.yaml"
        out = [p.read_bytes()] if p.exists() else []
        return [*out, b'version: "v1"\ndetectors:\n  d:\n    thresholds: {warn: 0.5, '
                      b'critical: 0.9}\n    aggregation: {kind: ema, half_life_tokens: 4}\n']
    import numpy as np

    from monitor.v1 import monitor_pb2
    from monitor.wire.codec import Span, encode_frame

    x = np.arange(3 * D_MODEL, dtype=np.float32).reshape(3, D_MODEL)
    frames = [encode_frame(x, seq=1, model=MODEL, layer=0,
                           spans=[Span("a", 2, 0, 1, correlation_id="c"), Span("b", 1, 5, 2)]),
              encode_frame(x.astype(np.float16), seq=7, model=MODEL, layer=3, spans=[])]
    return [monitor_pb2.ClientMessage(frame=f).SerializeToString() for f in frames]


def _save_crash(target: str, data: bytes) -> Path:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"crash-{hashlib.sha256(data).hexdigest()[:16]}"
    p.write_bytes(data)
    return p


def _atheris_child(target: str) -> None:  # pragma: no cover - runs under libFuzzer
    import atheris

    with atheris.instrument_imports(include=["monitor.wire", "monitor.judge", "yaml"]):
        import monitor.judge.policy
        import monitor.wire.codec  # noqa: F401
    fn = TARGETS[target]
    atheris.Setup(sys.argv, fn)
    atheris.Fuzz()


def _run_atheris(target: str, seconds: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i, s in enumerate(seeds(target)):
            (corpus / f"seed-{i}").write_bytes(s)
        for p in sorted((CORPUS / target).glob("*")) if (CORPUS / target).exists() else []:
            (corpus / p.name).write_bytes(p.read_bytes())
        artifacts = Path(tmp) / "artifacts"
        artifacts.mkdir()
        cmd = [sys.executable, "-m", "monitor.tools.fuzz", "--child", target,
               f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-timeout=10",
               f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
        rc = subprocess.call(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        crashes = sorted(artifacts.glob("*"))
        for c in crashes:
            print(f"fuzz[{target}]: crashing input saved to {_save_crash(target, c.read_bytes())}")
        return 1 if crashes or rc != 0 else 0


def _run_hypothesis(target: str, seconds: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fn = TARGETS[target]
    base = seeds(target)
    deadline = time.monotonic() + seconds
    n = [0]

    @st.composite
    def inputs(draw: st.DrawFn) -> bytes:
        if base and draw(st.booleans()):  # type: ignore[arg-type]  # mutate a valid seed
            b = bytearray(draw(st.sampled_from(base)))
            for _ in range(draw(st.integers(1, 8))):
                if not b:
                    break
                i = draw(st.integers(0, len(b) - 1))
                op = draw(st.integers(0, 2))
                if op == 0:
                    b[i] = draw(st.integers(0, 255))
                elif op == 1:
                    del b[i:i + draw(st.integers(1, 16))]
                else:
                    b[i:i] = draw(st.binary(max_size=16))
            return bytes(b)
        return draw(st.binary(max_size=512))

    failures: list[bytes] = []

    @settings(max_examples=10**9, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(inputs())
    def prop(data: bytes) -> None:
        if time.monotonic() > deadline:
            return
        n[0] += 1
        try:
            fn(data)
        except Exception:
            failures.append(data)
            raise

    # hypothesis has no wall-clock budget: stop by exhausting examples after the deadline
    try:
        prop()
    except Exception as e:
        print(f"fuzz[{target}]: failure: {type(e).__name__}: {e}")
    for data in failures[-1:]:
        print(f"fuzz[{target}]: crashing input saved to {_save_crash(target, data)}")
    print(f"fuzz[{target}]: hypothesis (not coverage-guided), {n[0]} inputs in {seconds} s")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # pragma: no cover - the libFuzzer process
        target = argv[1]
        sys.argv = [sys.argv[0], *argv[2:]]
        _atheris_child(target)
        return 0
    ap = argparse.ArgumentParser(prog="python -m monitor.tools.fuzz", description=__doc__)
    ap.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    ap.add_argument("--seconds", type=int, default=60, help="budget per target")
    ap.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    args = ap.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
            print("fuzz: atheris not installed; using hypothesis (random, not "
                  "coverage-guided)")
    rc = 0
    for target in TARGETS if args.target == "all" else (args.target,):
        run = _run_atheris if engine == "atheris" else _run_hypothesis
        rc |= run(target, args.seconds)
    return rc


if __name__ == "__main__":
    sys.exit(main())
