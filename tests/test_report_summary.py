"""`safety-monitor report`: counts and rates from an audit log, window, bad lines."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pytest

from monitor.cli import main
from monitor.report.summary import format_summary, parse_since, summarise

NOW = dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.timezone.utc)


def _rec(event: str, det: str, sev: str, rid: str, hours_ago: float) -> str:
    ts = (NOW - dt.timedelta(hours=hours_ago)).isoformat().replace("+00:00", "Z")
    return json.dumps({"ts": ts, "event": event, "request_id": rid, "detector": det,
                       "severity": sev})


def test_parse_since() -> None:
    assert parse_since("24h") == dt.timedelta(hours=24)
    assert parse_since("90s") == dt.timedelta(seconds=90)
    assert parse_since("7d") == dt.timedelta(days=7)
    with pytest.raises(ValueError, match=r"--since.*found '24'"):
        parse_since("24")


def test_summary_counts_rates_window_and_skips() -> None:
    lines = [
        *(_rec("final", "h", "none", f"r{i}", 1) for i in range(4)),
        _rec("would_alert", "h", "warn", "r0", 1),
        _rec("would_alert", "h", "critical", "r0", 1),
        _rec("block", "h", "critical", "r1", 2),
        _rec("alert", "d", "warn", "r2", 3),
        _rec("would_alert", "h", "critical", "old", 30),  # outside 24h
        "not json", "[1]", json.dumps({"event": "alert"}),
    ]
    s = summarise(lines, parse_since("24h"), now=NOW)
    assert s.skipped == 3 and s.records == 8
    assert s.counts[("h", "critical")] == {"would_alert": 1, "would_block": 1, "block": 1}
    assert s.counts[("h", "warn")] == {"would_alert": 1}
    assert s.counts[("d", "warn")] == {"alert": 1}
    assert len(s.requests["h"]) == 4
    out = io.StringIO()
    format_summary(s, out)
    row = next(x for x in out.getvalue().splitlines() if x.startswith("h ") and "critical" in x)
    assert "1 (25.00%)" in row  # would_block of 4 requests
    out = io.StringIO()
    format_summary(s, out, as_json=True)
    doc = json.loads(out.getvalue())
    d = next(r for r in doc["rows"] if r["detector"] == "d" and r["severity"] == "warn")
    assert d == {"detector": "d", "severity": "warn", "requests": 0, "would_alert": 0,
                 "would_block": 0, "alert": 1, "block": 0}


def test_summary_block_ends_tokens_after_crossing() -> None:
    """`block_end` lines: blocked requests that ended per detector and the tokens they
    generated after the crossing (nearest-rank percentiles); null counts as unknown; they
    add nothing to the escalation counts."""
    def end(det: str, n: object, hours_ago: float = 1) -> str:
        rec = json.loads(_rec("block_end", det, "critical", "r", hours_ago))
        return json.dumps({**rec, "tokens_after_crossing": n})

    lines = [end("h", n) for n in (1, 1, 2, 1, 9)] + [end("h", None), end("h", True),
                                                       end("g", None), end("h", 50, 30)]
    s = summarise(lines, parse_since("24h"), now=NOW)
    assert s.block_ends == {"h": [1, 1, 2, 1, 9, None, None], "g": [None]}
    assert s.counts == {}
    out = io.StringIO()
    format_summary(s, out, as_json=True)
    doc = json.loads(out.getvalue())
    assert doc["block_ends"] == [
        {"detector": "g", "ended": 1, "unknown": 1},
        {"detector": "h", "ended": 7, "unknown": 2,
         "tokens_after_crossing": {"p50": 1, "p99": 9, "max": 9, "mean": 2.8}}]
    out = io.StringIO()
    format_summary(s, out)
    text = out.getvalue()
    assert "blocked requests ended" in text
    assert next(x for x in text.splitlines() if x.startswith("h ") and "unknown" in x).split() \
        == ["h", "7", "1", "/", "9", "/", "9", "/", "2.80;", "2", "unknown"]


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    p = tmp_path / "audit.jsonl"
    p.write_text(json.dumps({"ts": now.isoformat(), "event": "block", "request_id": "x",
                             "detector": "h", "severity": "critical"}) + "\n")
    assert main(["report", "--audit-log", str(p), "--since", "1h", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["block"] for r in doc["rows"] if r["severity"] == "critical"] == [1]
    assert main(["report", "--audit-log", str(tmp_path / "missing"), "--since", "1h"]) == 2
    assert main(["report", "--audit-log", str(p), "--since", "soon"]) == 2
