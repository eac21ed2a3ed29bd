"""Unit tests of monitor/report/audit.py: line format, never raising, fsync on close."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest

from monitor.constants import RequestKey
from monitor.judge import VerdictUpdate
from monitor.report.audit import AuditLog, audit_record


def _update(**kw: Any) -> VerdictUpdate:
    base: dict[str, Any] = dict(
                key=RequestKey("client", "r1"), detector="harmful_intent", score=0.93,
                peak_score=0.95, severity="critical", threshold=0.9, crossed_at_position=12,
                final=False, mode="alert", policy_version="v1", n_tokens_scored=13,
                n_tokens_unscored=0, escalated=True)
    base.update(kw)
    return VerdictUpdate(**base)


FIELDS = {"ts", "event", "request_id", "detector", "severity", "score", "threshold",
          "position", "mode", "policy_version", "bundle_name", "bundle_sha256", "model_name"}


def test_alert_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    log = AuditLog(path)
    rec = audit_record(_update(), event="alert", bundle_name="b", bundle_sha256="s" * 64,
                       model_name="org/m")
    assert log.write(rec)
    assert log.write(audit_record(_update(mode="observe"), event="would_alert",
                                  bundle_name="b", bundle_sha256="s" * 64, model_name="org/m"))
    # line-buffered: visible before close
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    log.close()
    a = json.loads(lines[0])
    assert FIELDS <= set(a)
    assert a["event"] == "alert" and a["position"] == 12 and a["threshold"] == 0.9
    ts = dt.datetime.fromisoformat(a["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset() == dt.timedelta(0)
    assert json.loads(lines[1])["event"] == "would_alert"


def test_write_never_raises(tmp_path: Path) -> None:
    failures = []
    log = AuditLog(tmp_path / "a.jsonl", on_failure=lambda: failures.append(1))
    bad = audit_record(_update(score=float("nan")), event="alert", bundle_name="b",
                       bundle_sha256="s", model_name="m")
    assert log.write(bad) is False  # NaN is not valid JSON: refused, counted
    assert log.write({"x": object()}) is False
    assert failures == [1, 1] and log.failures == 2
    log.close()
    log.close()  # idempotent
    assert log.write({"ok": 1}) is False  # after close: no raise


def test_disabled_and_fsync_on_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert AuditLog(None).write({"a": 1}) is False
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = AuditLog(tmp_path / "a.jsonl", include_finals=True)
    log.write({"a": 1})
    log.close()
    assert synced and log.include_finals


def test_unwritable_path_fails_at_open(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(OSError):
        AuditLog(d)  # a directory


def _lines(p: Path) -> list[str]:
    return [json.loads(x)["request_id"] for x in p.read_text().splitlines()] if p.exists() \
        else []


def test_rotation_is_detected_and_reopen_follows_the_path(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    failures: list[int] = []
    log = AuditLog(path, rotation_check_s=0, on_failure=lambda: failures.append(1))
    rec = audit_record(_update(), event="alert", bundle_name="b", bundle_sha256="s" * 64,
                       model_name="m")
    assert log.write({**rec, "request_id": "a"})
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate without copytruncate
    assert log.write({**rec, "request_id": "b"})  # noticed: goes to a fresh file at path
    assert _lines(tmp_path / "audit.jsonl.1") == ["a"] and _lines(path) == ["b"]
    path.rename(tmp_path / "audit.jsonl.2")
    assert log.reopen() and log.reopens == 2  # what SIGHUP does
    assert log.write({**rec, "request_id": "c"})
    assert _lines(path) == ["c"] and _lines(tmp_path / "audit.jsonl.2") == ["b"]
    # the directory disappears: every record is a counted failure, then it recovers
    path.unlink()
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-gone"))
    try:
        assert not log.write({**rec, "request_id": "d"})
        assert not log.write({**rec, "request_id": "e"})
        assert log.failures == 2 and len(failures) == 2
    finally:
        os.rename(tmp_path.with_name(tmp_path.name + "-gone"), tmp_path)
    assert log.write({**rec, "request_id": "f"})
    assert _lines(path)[-1] == "f" and log.failures == 2
    log.close()
    assert not log.write({**rec, "request_id": "g"}) and log.failures == 2


def test_final_histogram_observes_the_judged_statistic(tmp_path: Path) -> None:
    # the request_score histogram holds what the thresholds were compared with: a final
    # whose last aggregate fell back (score 0.2) after a judged 0.95 counts above 0.9; a
    # request with nothing judged is not observed
    from monitor.report.metrics import Metrics
    from monitor.report.verdicts import Reporter

    m = Metrics("org/model", [0.5, 0.9])
    rep = Reporter(m, AuditLog(None), bundle_name="b", bundle_sha256="0" * 64,
                   model_name="org/model")
    rep.final(_update(final=True, escalated=False, score=0.2, peak_score=0.97,
                      judged_peak=0.95))
    rep.final(_update(final=True, escalated=False, score=0.3, peak_score=0.3,
                      judged_peak=None))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in m.registry.collect() for s in fam.samples}
    det = ("detector", "harmful_intent")
    assert samples[("safety_monitor_request_score_count", (det,))] == 1
    assert samples[("safety_monitor_request_score_bucket", (det, ("le", "0.9")))] == 0
    assert samples[("safety_monitor_request_score_bucket", (det, ("le", "1.0")))] == 1


def test_module_doc_lists_every_event_the_reporter_writes(tmp_path: Path) -> None:
    # the events a Reporter writes (one escalation per action, a block's end, a final)
    # are the ones the audit module's docstring promises, no more and no fewer
    import re

    import monitor.report.audit as audit_mod
    from monitor.report.metrics import Metrics
    from monitor.report.verdicts import Reporter

    path = tmp_path / "audit.jsonl"
    rep = Reporter(Metrics("m"), AuditLog(path, include_finals=True), bundle_name="b",
                   bundle_sha256="0" * 64, model_name="m")
    for mode in ("observe", "alert", "block"):
        rep.escalation(_update(mode=mode))
    rep.block_end(_update(mode="block", final=True, escalated=False), "", 3, "stop")
    rep.final(_update(final=True, escalated=False, judged_peak=0.95))
    written = {json.loads(line)["event"] for line in path.read_text().splitlines()}
    doc = re.search(r"event \(([^)]*)\)", audit_mod.__doc__ or "")
    assert doc is not None
    assert set(re.findall(r'"(\w+)"', doc.group(1))) == written
