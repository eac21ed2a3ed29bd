"""`safety-monitor explain <request id>`: what the audit log says about one request.

For each detector with audit lines of the request (matched by engine request id, or by
the caller's correlation id): its events in order (alert / would_alert / block / final,
with severity, score, threshold, token position), the per-token scores of the last line
that has a token trace (``tokens``: the detector's last in-scope ``[position, score]``
pairs, ``--audit-token-trace``), and the SAE latents that fired with their labels (the
last line that names any). A request the server judged with ``--audit-finals`` off and
that never escalated has no audit lines: the command says so.

Reads the files line by line (rotated files: pass several); lines that are not audit
records are counted and skipped. Only the matched request's records are kept in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from monitor.report.summary import audit_records

__all__ = ["Explanation", "explain", "format_explanation"]

_BAR = 24  # characters of the longest score bar


@dataclass
class Explanation:
    """The audit records of one request, grouped by detector (file order kept)."""

    request: str
    detectors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: int = 0

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request": self.request, "skipped_lines": self.skipped,
                               "detectors": {}}
        for det, recs in self.detectors.items():
            out["detectors"][det] = {
                "events": [{k: r.get(k) for k in ("ts", "event", "severity", "score",
                                                  "threshold", "position", "mode",
                                                  "n_tokens_scored")} for r in recs],
                "tokens": _last(recs, "tokens"), "latents": _last(recs, "latents")}
        return out


def _last(recs: list[dict[str, Any]], key: str) -> list[Any]:
    for r in reversed(recs):
        v = r.get(key)
        if isinstance(v, list) and v:
            return v
    return []


def explain(lines: Iterable[str], request: str) -> Explanation:
    """Collect the records of ``request`` (engine request id or correlation id)."""
    ex = Explanation(request=request)
    for rec in audit_records(lines):
        if rec is None or not isinstance(rec.get("detector"), str):
            ex.skipped += 1
            continue
        if request not in (rec.get("request_id"), rec.get("correlation_id")):
            continue
        ex.detectors.setdefault(rec["detector"], []).append(rec)
    return ex


def _num(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def format_explanation(ex: Explanation, out: TextIO, as_json: bool = False) -> None:
    """Print ``ex`` as text (or one JSON object)."""
    if as_json:
        out.write(json.dumps(ex.as_json(), indent=1) + "\n")
        return
    if not ex.detectors:
        out.write(f"no audit lines for request {ex.request!r} (an unalerted request has "
                  "lines only with --audit-finals)\n")
        return
    first = next(iter(ex.detectors.values()))[0]
    out.write(f"request {first.get('request_id')!s}"
              + (f" (correlation id {first.get('correlation_id')})"
                 if first.get("correlation_id") else "")
              + f", model {first.get('model_name')}, bundle {first.get('bundle_name')}\n")
    for det, recs in ex.detectors.items():
        out.write(f"\n{det} (mode {recs[-1].get('mode')}, policy "
                  f"{recs[-1].get('policy_version')})\n")
        for r in recs:
            out.write(f"  {r.get('ts', '')}  {r.get('event', '?'):<11} "
                      f"{r.get('severity', '?'):<8} score {_num(r.get('score'))} "
                      f"(threshold {_num(r.get('threshold'))}) at token "
                      f"{r.get('position', '?')}; {r.get('n_tokens_scored', '?')} tokens "
                      "scored\n")
        tokens = _last(recs, "tokens")
        if tokens:
            out.write(f"  token scores (last {len(tokens)} in scope):\n")
            for pair in tokens:
                if not (isinstance(pair, list) and len(pair) == 2):
                    continue
                p, s = pair
                bar = "#" * round(_BAR * min(max(float(s), 0.0), 1.0)) \
                    if isinstance(s, (int, float)) else ""
                out.write(f"    {p!s:>6}  {_num(s)}  {bar}\n")
        else:
            out.write("  token scores: not in the audit (--audit-token-trace 0)\n")
        latents = _last(recs, "latents")
        if latents:
            out.write("  SAE latents that fired (strongest contribution first):\n")
            for h in latents:
                if isinstance(h, dict):
                    out.write(f"    {h.get('name')}#{h.get('index')}  peak "
                              f"{_num(h.get('value'), '.3g')}  {h.get('label', '')}\n")
    if ex.skipped:
        out.write(f"\n({ex.skipped} lines were not audit records and were skipped)\n")
