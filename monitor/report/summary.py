"""`safety-monitor report`: would-alert / would-block rates from the audit log (shadow first).

Reads the sidecar's JSONL audit log(s) (`--audit-log`; records of `audit.audit_record`)
and summarises, per detector and severity, over the records whose `ts` is within
`--since` of now:

- ``would_alert``: escalations in `observe` mode (nobody paged);
- ``would_block``: observe-mode escalations to ``critical`` — what `mode: block` would
  have stopped;
- ``alert`` / ``block``: escalations that alerted / stopped a generation;
- ``requests``: distinct requests with a ``final`` record for the detector (written with
  `--audit-finals`); rates are per such request, ``-`` when the log has no finals;
- per detector, blocked requests that ended (``block_end`` records): how many, and the
  tokens generated after the crossing token (p50 / p99 / max / mean over the records
  that state it; ``unknown``: records with ``tokens_after_crossing: null``, i.e. no judged
  detector read generated tokens).

Lines that are not JSON objects with the fields used are counted as ``skipped`` and never
stop the report (an audit log may be rotated or truncated mid-line).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["Summary", "audit_records", "format_summary", "parse_since", "summarise"]


def audit_records(lines: Iterable[str]) -> Iterator[dict[str, Any] | None]:
    """Each non-blank line of an audit log as a JSON object, or None for a line that is
    not one (the callers count those as skipped)."""
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            yield None
            continue
        yield rec if isinstance(rec, dict) else None

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SEVERITIES = ("warn", "critical")


def parse_since(text: str) -> _dt.timedelta:
    """``"24h"`` → 24 hours (units s, m, h, d). Raises ValueError naming the value."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise ValueError(f"--since: expected a number and a unit s|m|h|d (e.g. 24h), "
                         f"found {text!r}")
    return _dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def _ts(raw: object) -> _dt.datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=_dt.timezone.utc)


@dataclass
class Summary:
    """Counts per (detector, severity) and event; `requests` per detector."""

    since: _dt.datetime
    counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    requests: dict[str, set[str]] = field(default_factory=dict)
    records: int = 0
    skipped: int = 0
    #: per detector: `tokens_after_crossing` of each ``block_end`` record (None: unknown)
    block_ends: dict[str, list[int | None]] = field(default_factory=dict)


def summarise(lines: Iterable[str], since: _dt.timedelta,
              now: _dt.datetime | None = None) -> Summary:
    """Summary of audit `lines` with `ts` in ``[now - since, now]``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    s = Summary(since=now - since)
    for rec in audit_records(lines):
        if rec is None:
            s.skipped += 1
            continue
        t = _ts(rec.get("ts"))
        det, event, sev = rec.get("detector"), rec.get("event"), rec.get("severity")
        if t is None or not isinstance(det, str) or not isinstance(event, str):
            s.skipped += 1
            continue
        if t < s.since or t > now:
            continue
        s.records += 1
        if event == "final":
            s.requests.setdefault(det, set()).add(str(rec.get("request_id")))
            continue
        if event == "block_end":
            n = rec.get("tokens_after_crossing")
            ok = isinstance(n, int) and not isinstance(n, bool) and n >= 0
            s.block_ends.setdefault(det, []).append(n if ok else None)
            continue
        if sev not in _SEVERITIES:
            continue
        c = s.counts.setdefault((det, str(sev)), {})
        c[event] = c.get(event, 0) + 1
        if event == "would_alert" and sev == "critical":
            c["would_block"] = c.get("would_block", 0) + 1
    return s


def _block_rows(s: Summary) -> list[dict[str, Any]]:
    """One row per detector with ``block_end`` records: ended, tokens after crossing."""
    rows = []
    for det in sorted(s.block_ends):
        vals = s.block_ends[det]
        known = sorted(v for v in vals if v is not None)
        row: dict[str, Any] = {"detector": det, "ended": len(vals),
                               "unknown": len(vals) - len(known)}
        if known:
            def pct(q: int, k: list[int] = known) -> int:  # nearest rank: ceil(q% of n)
                return k[max(0, -(-len(k) * q // 100) - 1)]

            row["tokens_after_crossing"] = {"p50": pct(50), "p99": pct(99),
                                            "max": known[-1],
                                            "mean": round(sum(known) / len(known), 2)}
        rows.append(row)
    return rows


def format_summary(s: Summary, out: TextIO, as_json: bool = False) -> None:
    """Print `s` as a table (or one JSON object)."""
    cols = ("would_alert", "would_block", "alert", "block")
    dets = sorted({d for d, _ in s.counts} | set(s.requests))
    rows = []
    for det in dets:
        n_req = len(s.requests.get(det, ()))
        for sev in _SEVERITIES:
            c = s.counts.get((det, sev), {})
            rows.append({"detector": det, "severity": sev, "requests": n_req,
                         **{k: c.get(k, 0) for k in cols}})
    if as_json:
        json.dump({"since": s.since.isoformat(), "records": s.records, "skipped": s.skipped,
                   "rows": rows, "block_ends": _block_rows(s)}, out)
        out.write("\n")
        return
    out.write(f"audit records since {s.since.isoformat(timespec='seconds')}: {s.records} "
              f"({s.skipped} unreadable lines skipped)\n")
    out.write(f"{'detector':<24} {'severity':<9} {'requests':>8} " +
              " ".join(f"{k:>16}" for k in cols) + "\n")
    for r in rows:
        n = int(str(r["requests"]))

        def cell(k: str, n: int = n, r: dict[str, object] = r) -> str:
            v = int(str(r[k]))
            return f"{v} ({100.0 * v / n:.2f}%)" if n else f"{v} (-)"

        out.write(f"{r['detector']:<24} {r['severity']:<9} {n:>8} " +
                  " ".join(f"{cell(k):>16}" for k in cols) + "\n")
    if not rows:
        out.write("(no verdict events in this window)\n")
    blocks = _block_rows(s)
    if blocks:
        out.write(f"\n{'blocked requests ended':<24} {'ended':>6}  tokens after crossing "
                  "(p50 / p99 / max / mean; unknown)\n")
    for b in blocks:
        t = b.get("tokens_after_crossing")
        stat = (f"{t['p50']} / {t['p99']} / {t['max']} / {t['mean']:.2f}" if t else "-")
        out.write(f"{b['detector']:<24} {b['ended']:>6}  {stat}; {b['unknown']} unknown\n")
