"""probes/traffic.py: thresholds from a deployment's own audit finals, against plain counts,
and end to end over a real sidecar's audit log."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import POLICY_V1, MonitorServer, wait_until

from monitor.judge.policy import parse_policy
from probes import traffic
from probes.calibrate import policy_threshold, threshold_at_fpr
from probes.cli import main as probes_main

POLICY = """\
version: "p1"
defaults:
  min_tokens: 1
detectors:
  a:
    mode: observe
    thresholds:
      warn: 0.5      # old comment
      critical: 0.9
  b:
    mode: alert
    thresholds: {warn: 0.6, critical: 0.95}
  c:
    thresholds: {warn: 0.7, critical: 0.8}
"""


def _line(rid: str, det: str, s: float | None, *, ts: str = "2026-01-01T00:00:00.000Z",
          version: str = "p1", incomplete: bool = False, **extra: object) -> str:
    rec = {"ts": ts, "event": "final", "request_id": rid, "detector": det,
           "judged_peak": s, "peak_score": 1.0, "policy_version": version,
           "incomplete": incomplete, **extra}
    return json.dumps(rec)


def _finals(cols: Mapping[str, Sequence[float] | np.ndarray]) -> list[str]:
    """One request per index, in time order, with a final per detector of ``cols`` that
    has that index (columns may differ in length)."""
    n = max(len(v) for v in cols.values())
    return [_line(f"r{i}", d, float(v[i]), ts=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}.000Z")
            for i in range(n) for d, v in cols.items() if i < len(v)]


def _plain_threshold(s: np.ndarray, alpha: float) -> float:
    """The smallest float ``t`` with at most floor(alpha n) scores ``>= t``: the lowest
    score itself, or just above one of them."""
    k = int(np.floor(alpha * s.size + 1e-9))
    cands = sorted({float(s.min())} | {float(np.nextafter(v, np.inf)) for v in s})
    for t in cands:
        if (s >= t).sum() <= k:
            return t
    raise AssertionError("unreachable")


def test_read_finals_counts_every_line_it_leaves_out() -> None:
    lines = [
        _line("r1", "a", 0.3),
        _line("r1", "a", 0.9),                      # duplicate: the first is kept
        _line("r2", "a", 0.4, version="old"),
        _line("r3", "a", 0.5, incomplete=True),
        _line("r4", "a", None),                     # nothing judged
        json.dumps({"event": "final", "request_id": "r5", "detector": "a",
                    "policy_version": "p1", "peak_score": 0.2}),  # an older sidecar
        _line("r6", "a", 1.5),
        _line("r7", "a", True),                     # a bool is not a score
        "not json", "[1, 2]", "",
        json.dumps({"event": "alert", "request_id": "r8", "detector": "a"}),  # ignored
        _line("r9", "b", 0.25, ts="2025-12-31T23:59:59.000Z"),
        _line("r9", "a", 0.75),
    ]
    f = traffic.read_finals(lines, "p1")
    assert f.scores == {"r1": {"a": 0.3}, "r9": {"b": 0.25, "a": 0.75}}
    assert f.skipped == {"duplicate": 1, "other_policy_version": 1, "incomplete": 1,
                         "not_judged": 1, "no_judged_peak": 1, "bad_score": 2,
                         "not_json": 2}
    assert f.first_ts["r9"] == "2025-12-31T23:59:59.000Z"
    ids, s = f.ordered("a")
    assert ids == ["r9", "r1"] and s.tolist() == [0.75, 0.3]   # r9's first final is older
    assert traffic.read_finals(lines, None).scores["r2"] == {"a": 0.4}


def test_single_detectors_match_a_plain_count_and_the_later_share_is_held_out() -> None:
    rng = np.random.default_rng(0)
    n = 400
    a, b, c = rng.beta(2, 5, n), rng.beta(2, 3, n), rng.beta(1, 1, n)
    f = traffic.read_finals(_finals({"a": a, "b": b, "c": c}), "p1")
    pol = parse_policy(POLICY)
    rates = {"warn": 0.05, "critical": 0.01}
    res = {r.detector: r for r in traffic.calibrate_traffic(f, pol, [], rates, holdout=0.25,
                                                          detectors=["a", "b"])}
    assert set(res) == {"a", "b"}
    for name, s in (("a", a), ("b", b)):
        r = res[name]
        assert r.n == n and r.partner == "" and not r.refused
        for sev, alpha in rates.items():
            assert r.thresholds[sev] == _plain_threshold(s, alpha)
            assert r.thresholds[sev] == threshold_at_fpr(s, alpha)
            assert r.support[sev] == int(np.floor(alpha * n + 1e-9))
            early, late = s[:300], s[300:]
            t_early = _plain_threshold(early, alpha)
            assert r.holdout[sev] == (int((late >= t_early).sum()), 100)
            cur = pol.detectors[name].threshold(sev)
            assert cur is not None
            assert r.current[sev] == (int((late >= cur).sum()), 100)
    text = traffic.new_policy_text(POLICY, list(res.values()), "p2")
    new = parse_policy(text)
    assert new.version == "p2"
    written = new.detectors["a"].threshold("warn")
    assert written is not None
    assert written == float(policy_threshold(res["a"].thresholds["warn"]))
    assert written >= res["a"].thresholds["warn"]
    assert new.detectors["c"].thresholds == pol.detectors["c"].thresholds  # not asked for
    assert [new.detectors[d].mode for d in "abc"] == [pol.detectors[d].mode for d in "abc"]
    assert "old comment" not in text and "calibrate-traffic" in text
    md = traffic.traffic_markdown(list(res.values()), f, pol, 0.25)
    assert "Assumption: every request" in md and md.count("\n| a |") == 2


def test_a_pair_is_calibrated_as_a_union_within_its_budget() -> None:
    rng = np.random.default_rng(1)
    n = 1000
    a = rng.beta(2, 5, n)
    b = np.clip(a + rng.normal(0, 0.15, n), 0, 1)   # correlated, as mean and window are
    f = traffic.read_finals(_finals({"a": a, "b": b}), "p1")
    pol = parse_policy(POLICY)
    pair = traffic.Pair("a", "b", {"warn": 0.8, "critical": 0.8})
    rates = {"warn": 0.01, "critical": 0.001}
    res = {r.detector: r for r in traffic.calibrate_traffic(f, pol, [pair], rates)}
    assert res["a"].partner == "b" and res["b"].partner == "a"
    for sev, alpha in rates.items():
        ta, tb = res["a"].thresholds[sev], res["b"].thresholds[sev]
        assert ta == threshold_at_fpr(a, alpha * 0.8)
        union = (a >= ta) | (b >= tb)
        assert union.sum() <= np.floor(alpha * n + 1e-9)
        # the smallest such T_b: one score lower lets the union exceed the budget
        below = b[b < tb]
        if below.size and alpha * n >= 1:
            assert ((a >= ta) | (b >= below.max())).sum() > np.floor(alpha * n + 1e-9)
        # the held-out check counts a request once if either fires
        assert res["a"].holdout[sev] == res["b"].holdout[sev]
    # asking for one member of a pair recalibrates both, together
    one = traffic.calibrate_traffic(f, pol, [pair], rates, detectors=["b"])
    assert [(r.detector, r.thresholds) for r in one] == \
        [(d, res[d].thresholds) for d in ("a", "b")]


def test_union_pairs_of_the_default_bundle() -> None:
    from monitor.score.bundle import load_bundle

    repo = Path(__file__).resolve().parents[1]
    pairs = traffic.union_pairs(load_bundle(repo / "bundles" / "default", load_tensors=False))
    assert [(p.first, p.second) for p in pairs] == [("harmful_intent", "harmful_intent_window")]
    assert pairs[0].share == {"warn": pytest.approx(0.8), "critical": pytest.approx(0.8)}


def test_saturated_or_too_few_requests_are_refused_and_kept() -> None:
    pol = parse_policy(POLICY)
    f = traffic.read_finals(_finals({"a": [1.0] * 50, "b": [0.2, 0.3, 0.4]}), "p1")
    res = {r.detector: r for r in traffic.calibrate_traffic(
        f, pol, [], {"warn": 0.01, "critical": 0.001})}
    assert "saturate" in res["a"].refused
    assert "same score" in res["b"].refused      # 3 requests: both rates allow none above
    assert res["b"].support == {"warn": 0, "critical": 0}
    assert traffic.new_policy_text(POLICY, list(res.values()), "p2").replace(
        '"p2"', '"p1"') == POLICY
    # a pair is refused together: the partner's numbers must change with it
    g = traffic.read_finals(_finals({"a": [1.0] * 50, "b": np.linspace(0, 0.5, 50)}), "p1")
    both = traffic.calibrate_traffic(g, pol, [traffic.Pair("a", "b", {"warn": 0.8})],
                                     {"warn": 0.1})
    assert all(r.refused for r in both)
    # a severity the policy does not give a detector is not calibrated, nor written
    warn_only = POLICY.replace("thresholds: {warn: 0.7, critical: 0.8}", "thresholds: {warn: 0.7}")
    h = traffic.read_finals(_finals({"c": np.linspace(0.01, 0.99, 200)}), "p1")
    (rc,) = traffic.calibrate_traffic(h, parse_policy(warn_only), [],
                                      {"warn": 0.01, "critical": 0.001})
    assert set(rc.rates) == set(rc.thresholds) == {"warn"} and not rc.refused
    assert parse_policy(traffic.new_policy_text(warn_only, [rc], "p2")).detectors[
        "c"].thresholds == (("warn", float(policy_threshold(rc.thresholds["warn"]))),)
    with pytest.raises(ValueError, match="holdout"):
        traffic.calibrate_traffic(g, pol, [], {"warn": 0.1}, holdout=1.0)
    with pytest.raises(ValueError, match="rates"):
        traffic.calibrate_traffic(g, pol, [], {"warn": 0.0})


# ------------------------------------------------------------------ end to end, real sidecar
def test_calibrate_traffic_from_a_real_sidecars_audit_finals(
        start_server: Callable[..., MonitorServer], geometry: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Requests with known harmful_intent scores streamed over gRPC to a sidecar run with
    --audit-finals; the command's thresholds equal a plain count over the audit lines'
    judged_peak, and the policy it writes is the old one with only those numbers and its
    version changed."""
    from test_server_integration import Span, frame_msg, rid, stream

    from monitor.v1 import monitor_pb2

    srv = start_server(policy_text=POLICY_V1, extra=["--audit-finals"], name="traffic")
    mean, u = geometry["harmful_intent"]
    rng = np.random.default_rng(2)
    n = 150
    want = rng.uniform(-3.0, 4.0, n)          # score sigmoid(a - 3): spread over (0, 0.73)
    msgs: list[monitor_pb2.ClientMessage] = []
    ids = []
    for i in range(n):
        r = rid(f"t{i}")
        ids.append(r)
        x = mean.repeat(2, 1) + (u * (float(want[i]) / float(u @ u))).unsqueeze(0)
        x[0] -= u * (3.0 / float(u @ u))       # the first row lower: the max is the second
        msgs.append(frame_msg(i + 1, 2, x.to(torch.float32), [Span(r, 2, 0, 2)]))
        msgs.append(monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
            request_id=r, reason="stop", n_prompt_tokens=2, n_generated_tokens=0)))
    stream(srv, msgs)
    def finals() -> list[dict]:
        return [a for a in srv.audit_lines() if a["event"] == "final"
                and a["detector"] == "harmful_intent" and a["request_id"] in ids]

    wait_until(lambda: len(finals()) == n, what="a harmful_intent final per request")
    got = np.array([a["judged_peak"] for a in finals()], dtype=np.float64)
    assert np.allclose(np.sort(got), np.sort(1 / (1 + np.exp(-(want - 3)))), atol=1e-3)
    out = tmp_path / "policy.traffic.yaml"
    assert srv.policy_path is not None
    rc = probes_main(["calibrate-traffic", "--audit-log", str(srv.audit_path), "--policy",
                      str(srv.policy_path), "--warn-fpr", "0.02", "--critical-fpr", "0.005",
                      "--out", str(out), "--version", "test-v1+traffic"])
    report = capsys.readouterr().out
    assert rc == 0, report
    new = parse_policy(out.read_text())
    assert new.version == "test-v1+traffic"
    warn, crit = (new.detectors["harmful_intent"].threshold(s) for s in ("warn", "critical"))
    assert warn == float(policy_threshold(_plain_threshold(got, 0.02)))
    assert crit == float(policy_threshold(_plain_threshold(got, 0.005)))
    assert warn is not None and crit is not None
    assert int((got >= warn).sum()) <= 3          # floor(0.02 * 150)
    assert int((got >= crit).sum()) == 0
    # deception scored no token of these requests: nothing judged, nothing written
    old = parse_policy(POLICY_V1)
    assert new.detectors["deception"].thresholds == old.detectors["deception"].thresholds
    assert "not_judged" in report
    assert {d: p.mode for d, p in new.detectors.items()} == \
        {d: p.mode for d, p in old.detectors.items()}
    # thresholds only under defaults cannot be edited in place: refused, nothing written
    inherited = tmp_path / "inherited.yaml"
    inherited.write_text(POLICY_V1.replace("defaults:\n", "defaults:\n  thresholds: {warn: "
                                           "0.5, critical: 0.9}\n").replace(
        "    thresholds: {warn: 0.5, critical: 0.9}\n", ""))
    assert parse_policy(inherited.read_text()).detectors["harmful_intent"].threshold(
        "warn") == 0.5
    refused = tmp_path / "refused.yaml"
    assert probes_main(["calibrate-traffic", "--audit-log", str(srv.audit_path), "--policy",
                        str(inherited), "--out", str(refused)]) == 2
    assert not refused.exists()
    # an audit log without finals of this policy version: nothing to calibrate
    other = tmp_path / "other.yaml"
    other.write_text(POLICY_V1.replace('"test-v1"', '"test-v9"'))
    assert probes_main(["calibrate-traffic", "--audit-log", str(srv.audit_path), "--policy",
                        str(other)]) == 1
