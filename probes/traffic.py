"""Thresholds from a deployment's own traffic (``safety-probes calibrate-traffic``).

A bundle's thresholds hold their false-alert rates on its calibration set; real traffic is
another distribution (bundles/default/REPORT.md: the pair's warn rate is 1.6% on ordinary
chat but 13.3% on long benign lists). The procedure this module serves: run the monitor in
``observe`` mode with ``--audit-finals``; every finished request then writes one ``final``
audit line per detector (``monitor.report.audit``) whose ``judged_peak`` is the request
statistic ``S`` the policy judges (the highest aggregate at a judged token,
``monitor.judge.tracker.VerdictUpdate.judged_peak``; ``peak_score`` counts unjudged
tokens too and can exceed it). A request with no judged token (fewer than
``min_tokens``, or none in scope) could not alert at any threshold: it is left out and
counted, so the rates are per judged request (never below the rate per served request).
Treating that traffic as benign, each detector's thresholds are set at the target rates
with the rule the bundle build uses (:func:`probes.calibrate.threshold_at_fpr`: the
smallest ``t`` with ``#{S ≥ t} ≤ ⌊α·n⌋``, ties never split), and a pair the bundle
serves as a union (its calibration ``union``: alert if either fires) with the build's
split (:func:`probes.window.union_thresholds`: the first at its share of the budget, the
second the smallest keeping the union within it). The policy is written back with only
those numbers and its version changed (:func:`monitor.judge.policy.rewrite_thresholds`);
modes are never changed: switching a detector to ``alert`` stays a person's decision.

Assumption, printed with every result: **the traffic is benign**. Harmful requests in it
can only raise a threshold (fewer alerts), never lower it.

Stability check: the requests, ordered by the time of their first final line, are split;
thresholds fit on the earlier ``1 − holdout`` share are applied to the later share. Its
false-alert rate (Wilson 95% interval), next to the current policy's on the same requests,
is what new thresholds do on traffic they were not fit on. The thresholds written are then
fit on all of it.

Thread rules: none (a command-line computation over arrays).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.judge.policy import Policy, rewrite_thresholds
from monitor.report.summary import audit_records
from monitor.score.bundle import Bundle
from probes.calibrate import RATE_TOL, policy_threshold, threshold_at_fpr
from probes.evaluate import wilson_ci
from probes.window import union_thresholds

__all__ = ["Finals", "Pair", "TrafficResult", "calibrate_traffic", "new_policy_text",
           "read_finals", "traffic_markdown", "union_pairs"]

SEVERITIES = ("warn", "critical")


@dataclass
class Finals:
    """The complete ``final`` audit lines of one policy version.

    ``scores[request_id][detector]`` = that final's ``judged_peak`` (float in [0, 1]);
    ``first_ts[request_id]`` = the earliest ``ts`` of its finals (ISO-8601 text as the
    sidecar writes it, so text order is time order); ``skipped`` counts the lines left
    out, by reason: ``not_json`` (not a JSON object), ``other_policy_version``,
    ``incomplete`` (some in-scope token was never judged, so ``judged_peak`` is a lower
    bound), ``not_judged`` (``judged_peak`` null: no token judged, no threshold could
    alert), ``no_judged_peak`` (a line without the field: a sidecar older than it),
    ``bad_score`` (not a number in [0, 1], or no request id / detector), ``duplicate`` (a
    second final for the same request and detector: the first is kept)."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    first_ts: dict[str, str] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)

    def ordered(self, detector: str) -> tuple[list[str], np.ndarray]:
        """The requests with a final for ``detector``, in time order, and their scores
        (float64 ``[n]``)."""
        ids = sorted((r for r, d in self.scores.items() if detector in d),
                     key=lambda r: (self.first_ts[r], r))
        return ids, np.array([self.scores[r][detector] for r in ids], dtype=np.float64)


def read_finals(lines: Iterable[str], policy_version: str | None) -> Finals:
    """The ``final`` lines of audit-log ``lines`` (other events are ignored, not counted);
    ``policy_version`` None: every version (their statistics may differ: only for logs
    of one policy)."""
    out = Finals()
    for rec in audit_records(lines):
        if rec is None:
            out.skipped["not_json"] += 1
            continue
        if rec.get("event") != "final":
            continue
        if policy_version is not None and rec.get("policy_version") != policy_version:
            out.skipped["other_policy_version"] += 1
            continue
        if rec.get("incomplete") is True:
            out.skipped["incomplete"] += 1
            continue
        if "judged_peak" not in rec:
            out.skipped["no_judged_peak"] += 1
            continue
        s, rid, det = rec["judged_peak"], rec.get("request_id"), rec.get("detector")
        if s is None:
            out.skipped["not_judged"] += 1
            continue
        if (not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s <= 1.0
                or not isinstance(rid, str) or not isinstance(det, str)):
            out.skipped["bad_score"] += 1
            continue
        per = out.scores.setdefault(rid, {})
        if det in per:
            out.skipped["duplicate"] += 1
            continue
        per[det] = float(s)
        ts = rec.get("ts")
        ts = ts if isinstance(ts, str) else ""
        out.first_ts[rid] = min(out.first_ts.get(rid, ts), ts)
    return out


@dataclass(frozen=True)
class Pair:
    """Two detectors served as a union (alert if either fires): ``first`` takes
    ``share[severity]`` of the budget, ``second`` the rest (the bundle's split)."""

    first: str
    second: str
    share: Mapping[str, float]


def union_pairs(bundle: Bundle) -> list[Pair]:
    """The pairs a bundle's calibration records, each once: a detector's
    ``calibration.union`` names its partner (``with``); per severity, the levels (on one
    of the two) hold ``budget`` and ``<first>_budget``, the share of the detector
    thresholded first (``probes.window.split_thresholds``)."""
    out: dict[tuple[str, str], Pair] = {}
    for d in bundle.detectors:
        u = d.calibration.get("union")
        if not isinstance(u, dict) or not isinstance(u.get("with"), str):
            continue
        for first, second in ((d.name, u["with"]), (u["with"], d.name)):
            share = {sev: float(u[sev][f"{first}_budget"]) / float(u[sev]["budget"])
                     for sev in SEVERITIES
                     if isinstance(u.get(sev), dict) and f"{first}_budget" in u[sev]}
            if share:
                out.setdefault((first, second), Pair(first, second, share))
    return list(out.values())


@dataclass
class TrafficResult:
    """One detector's result (``partner``: the other member of its pair, "" alone).

    ``rates``: the target rate per severity the policy gives it (a severity it lacks is
    never added); ``n``: requests fit on (a pair: those with both detectors' finals);
    ``thresholds``: fit on all ``n`` (unclipped floats; written rounded up by
    :func:`probes.calibrate.policy_threshold`); ``support[sev]`` = ``⌊α·n⌋``, the
    requests the rate lets above (0: the threshold is just above the traffic's highest
    score, a bound, not a measured rate); ``holdout[sev]`` / ``current[sev]``: alerted
    and total on the later ``holdout`` share at thresholds fit on the earlier share / at
    the policy's thresholds (a pair: either detector fires); ``refused``: why nothing is
    written for it ("" when written)."""

    detector: str
    partner: str
    n: int
    rates: dict[str, float]
    thresholds: dict[str, float]
    support: dict[str, int]
    holdout: dict[str, tuple[int, int]]
    current: dict[str, tuple[int, int]]
    refused: str = ""


def _fit(cols: Sequence[np.ndarray], rates: Mapping[str, float],
         share: Mapping[str, float]) -> list[dict[str, float]]:
    """Per detector of ``cols`` (one, or a pair's two on the same requests), its
    threshold per severity."""
    if len(cols) == 1:
        return [{sev: threshold_at_fpr(cols[0], r, clip=False) for sev, r in rates.items()}]
    a, b = cols
    out: list[dict[str, float]] = [{}, {}]
    for sev, r in rates.items():
        out[0][sev], out[1][sev] = union_thresholds(a, b, r, r * share.get(sev, 1.0))
    return out


def _alerted(cols: Sequence[np.ndarray], thr: Sequence[Mapping[str, float]],
             sev: str) -> tuple[int, int]:
    """(requests where any detector of ``cols`` reaches its ``sev`` threshold, n)."""
    n = int(cols[0].size)
    hit = np.zeros(n, bool)
    for c, t in zip(cols, thr, strict=True):
        hit |= c >= t[sev]
    return int(hit.sum()), n


def _refusal(thr: Mapping[str, float]) -> str:
    bad = [f"{s} {v:.6g}" for s, v in thr.items() if not 0.0 < v < 1.0]
    if bad:
        return ("the traffic's scores saturate: no threshold strictly inside (0, 1) holds "
                "the rate (" + ", ".join(bad) + ")")
    if "warn" in thr and "critical" in thr and not thr["warn"] < thr["critical"]:
        return ("warn and critical fall on the same score (too few requests to tell the "
                "two rates apart)")
    return ""


def calibrate_traffic(finals: Finals, policy: Policy, pairs: Sequence[Pair],
                      rates: Mapping[str, float], holdout: float = 0.3,
                      detectors: Sequence[str] | None = None) -> list[TrafficResult]:
    """Thresholds per detector of ``policy`` with finals in ``finals`` (``detectors``:
    only these, and the partner of any of them served as a pair), pairs calibrated
    together; module doc. ``rates``: target false-alert
    rate per severity (e.g. ``{"warn": 0.01, "critical": 0.001}``); ``holdout`` in
    (0, 1): the later share of the requests held out for the stability check."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout: expected a share in (0, 1); found {holdout}")
    for sev, r in rates.items():
        if sev not in SEVERITIES or not 0.0 < r < 1.0:
            raise ValueError(f"rates: expected warn / critical rates in (0, 1); found "
                             f"{sev}={r}")
    wanted = [d for d in policy.detectors if detectors is None or d in detectors]
    for p in pairs:  # a pair changes together, never one alone: asking for one asks for both
        if (p.first in wanted) != (p.second in wanted):
            wanted += [d for d in (p.first, p.second)
                       if d not in wanted and d in policy.detectors]
    grouped: list[tuple[str, ...]] = []
    for p in pairs:
        if p.first in wanted and p.second in wanted:
            grouped.append((p.first, p.second))
    in_pair = {d for g in grouped for d in g}
    grouped += [(d,) for d in wanted if d not in in_pair]
    share: dict[tuple[str, ...], Mapping[str, float]] = {(p.first, p.second): p.share
                                                         for p in pairs}
    out: list[TrafficResult] = []
    for group in grouped:
        ids, _ = finals.ordered(group[0])
        ids = [r for r in ids if all(d in finals.scores[r] for d in group)]
        cols = [np.array([finals.scores[r][d] for r in ids], dtype=np.float64)
                for d in group]
        n = len(ids)
        if n == 0:  # a member without finals (or no request with both of a pair's)
            continue
        # only the severities the policy gives every member: the rewrite edits values,
        # it never adds a severity a detector does not have
        cur = [{s: v for s, v in policy.detectors[d].thresholds} for d in group]
        own = {s: r for s, r in rates.items() if all(s in c for c in cur)}
        if not own:
            continue
        m = min(max(math.ceil((1.0 - holdout) * n), 1), n)
        sh = share.get(group, {})
        thr_all = _fit(cols, own, sh)
        later = [c[m:] for c in cols]
        fit_early = _fit([c[:m] for c in cols], own, sh)
        why = next((w for w in (_refusal(t) for t in thr_all) if w), "")
        held = {sev: _alerted(later, fit_early, sev) for sev in own}
        now = {sev: _alerted(later, cur, sev) for sev in own}
        for i, d in enumerate(group):
            out.append(TrafficResult(
                detector=d, partner=group[1 - i] if len(group) == 2 else "", n=n,
                rates=own, thresholds=thr_all[i],
                support={sev: math.floor((r + RATE_TOL) * n) for sev, r in own.items()},
                holdout=held, current=now, refused=why))
    return out


def new_policy_text(text: str, results: Sequence[TrafficResult], version: str,
                    source: str = "<string>") -> str:
    """``text`` (the policy the finals were judged under) with the thresholds of every
    result not refused, rounded up to policy digits, and ``version``."""
    new = {r.detector: {sev: policy_threshold(t) for sev, t in r.thresholds.items()}
           for r in results if not r.refused}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return rewrite_thresholds(text, new, version, source,
                              comment=f"calibrate-traffic {stamp}: own traffic, assumed benign")


def _rate(k: int, n: int) -> str:
    if n == 0:
        return "n/a (no later requests)"
    lo, hi = wilson_ci(k, n)
    return f"{k}/{n} = {k / n:.4f} [{lo:.4f}, {hi:.4f}]"


def traffic_markdown(results: Sequence[TrafficResult], finals: Finals, policy: Policy,
                     holdout: float) -> str:
    """The command's report: assumption, what was read and left out, per detector the
    thresholds and their support, and the stability check."""
    lines = [f"# Thresholds from own traffic (policy {policy.version})", "",
             "Assumption: every request in these audit finals is benign; harmful ones "
             "can only raise a threshold.", "",
             f"Requests read: {len(finals.scores)}; lines left out: "
             + (", ".join(f"{k} {v}" for k, v in sorted(finals.skipped.items())) or "none")
             + ".", "",
             "| detector | served with | n | severity | target rate | threshold | requests "
             "above allowed | later "
             f"{holdout:.0%}: new thresholds (fit on the earlier share) | later share: "
             "current policy |", "|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in results:
        for sev, rate in r.rates.items():
            t = r.thresholds[sev]
            lines.append(
                f"| {r.detector} | {r.partner or '-'} | {r.n} | {sev} | {rate:g} | "
                f"{policy_threshold(t) if 0 < t < 1 else f'{t:.6g}'} | {r.support[sev]}"
                f"{' (bound: above the highest score)' if r.support[sev] == 0 else ''} | "
                f"{_rate(*r.holdout[sev])} | {_rate(*r.current[sev])} |")
    refused = [r for r in results if r.refused]
    lines += ["", "A pair's later-share rates count a request once if either detector "
              "fires (what its alerts count)."]
    if refused:
        lines += ["", "Not written (kept as in the policy):"]
        lines += [f"- {r.detector}: {r.refused}" for r in refused]
    return "\n".join(lines) + "\n"
