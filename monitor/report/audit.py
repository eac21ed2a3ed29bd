"""JSONL audit log of alert events (and optionally final verdicts).

One JSON object per line, UTC ISO-8601 timestamps, never raw activations. Lines are
written line-buffered (flushed per line) and the file is fsynced on close. A write
never raises into the scoring loop: failures are logged (rate-limited) and counted.

With `stdout=True` every line also goes to standard output (the Kubernetes log
convention: collectors such as Fluent Bit / Vector / the OTel collector read container
stdout). The server logs to stderr, so stdout carries only these JSON lines. A line
counts as written when every configured destination took it; a failure on either is
counted once. With an OTLP endpoint in the environment (`monitor/report/otlp.py`) every
record is also exported as an OpenTelemetry log record.

Events (`monitor.report.verdicts.Reporter`): "alert" (a newly reached severity, mode
alert, or mode block at warn), "would_alert" (mode observe), "block" (mode block at
critical), "block_end" (a blocked request finished: the final verdict plus
tokens_after_crossing, null when not observable, and finish_reason), "final" (a final
verdict, with --audit-finals or when incomplete).

Line fields: ts, event ("alert" | "would_alert" | "block" | "block_end" | "final"),
request_id (the engine's id), correlation_id (the caller's label, "" if none), detector,
severity, score, peak_score, threshold, position, mode, policy_version, bundle_name,
bundle_sha256, model_name, n_tokens_scored, n_tokens_unscored; final and block_end lines
also n_tokens_missing,
incomplete and incomplete_reason (written even without --audit-finals when incomplete is
true; reasons: `monitor.constants.Incomplete`) and judged_peak (the highest aggregate at a
judged token, the statistic the thresholds are compared with; null when none was judged;
`safety-probes calibrate-traffic` sets thresholds from it).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from monitor.report.otlp import OtlpAudit

from monitor.constants import Incomplete
from monitor.judge.tracker import VerdictUpdate

__all__ = ["AuditLog", "audit_record"]

log = logging.getLogger(__name__)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def audit_record(
    update: VerdictUpdate, *, event: str, bundle_name: str, bundle_sha256: str,
    model_name: str, correlation_id: str = "",
) -> dict[str, Any]:
    """Build one audit record from a `VerdictUpdate` (no activations). `request_id` is
    the engine's id (the key), `correlation_id` the caller's label ("" when none).
    `latents` (only when some SAE latent of the detector fired, at most
    `monitor.judge.latents.MAX_LATENTS`): `[{name, index, value, label}]`; `tokens`
    (only when the server keeps a token trace, `--audit-token-trace`): the detector's
    last in-scope `[position, token score]` pairs, oldest first. Final lines also carry
    `n_tokens_missing` (in-scope positions that never reached the server, part of
    `n_tokens_unscored`), `incomplete` (some in-scope positions may not have been judged)
    `incomplete_reason` (why: a `monitor.constants.Incomplete` value, "" when
    complete) and `judged_peak` (`VerdictUpdate.judged_peak`; null when none was judged)."""
    rec: dict[str, Any] = {
        "ts": _utc_now(),
        "event": event,
        "request_id": update.request_id,
        "correlation_id": correlation_id,
        "detector": update.detector,
        "severity": update.severity,
        "score": float(update.score),
        "peak_score": float(update.peak_score),
        "threshold": float(update.threshold),
        "position": int(update.crossed_at_position),
        "mode": update.mode,
        "policy_version": update.policy_version,
        "bundle_name": bundle_name,
        "bundle_sha256": bundle_sha256,
        "model_name": model_name,
        "n_tokens_scored": int(update.n_tokens_scored),
        "n_tokens_unscored": int(update.n_tokens_unscored),
    }
    if update.final:  # coverage of the finished request (monitor.judge.tracker)
        rec["n_tokens_missing"] = int(update.n_tokens_missing)
        rec["incomplete"] = update.incomplete
        rec["incomplete_reason"] = update.incomplete_reason or (
            Incomplete.MISSING.value if update.n_tokens_missing else "")
        rec["judged_peak"] = (None if update.judged_peak is None
                              else float(update.judged_peak))
    if update.latents:
        rec["latents"] = [{"name": h.name, "index": h.index, "value": round(h.value, 4),
                           "label": h.label} for h in update.latents]
    if update.tokens:
        rec["tokens"] = [[int(p), round(float(s), 4)] for p, s in update.tokens]
    return rec


class AuditLog:
    """Append-only JSONL audit log.

    Args:
        path: file to append to (parent directories are created); None disables logging.
        on_failure: called once per failed write (e.g. a metrics counter's `inc`).
        include_finals: also write one "final" line per detector when a request finishes.
        stdout: also write every line to standard output (container log collectors).
        otlp: also export every record as an OpenTelemetry log record
            (`monitor.report.otlp.OtlpAudit`, when an OTLP endpoint is configured).
        rotation_check_s: how often a write checks whether `path` still names the open
            file (logrotate renamed or removed it); if not, the file is reopened at
            `path` before writing. 0: on every write.

    Rotation: `reopen()` (the server calls it on SIGHUP, logrotate's `postrotate`) and
    the check above both reopen `path`. While the file cannot be opened every record is
    a counted failure (`failures`, `on_failure`), retried on the next write; nothing is
    lost silently.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        on_failure: Callable[[], None] | None = None,
        include_finals: bool = False,
        stdout: bool = False,
        otlp: OtlpAudit | None = None,
        rotation_check_s: float = 1.0,
    ) -> None:
        self._otlp = otlp
        self.path = None if path is None else os.fspath(path)
        self._stdout: TextIO | None = sys.stdout if stdout else None
        self.include_finals = include_finals
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._fh: TextIO | None = None
        self._last_error_log = 0.0
        self.lines_written = 0
        self.failures = 0
        self.reopens = 0
        self.rotation_check_s = float(rotation_check_s)
        self._next_check = 0.0
        self._closed = False
        if self.path is not None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            # line-buffered text file in append mode; raises at startup if unwritable
            self._fh = self._open()

    def _open(self) -> TextIO:
        assert self.path is not None
        return open(self.path, "a", buffering=1, encoding="utf-8")

    @property
    def enabled(self) -> bool:
        """True when records go to a file, stdout or OTLP (until `close`)."""
        return not self._closed and (self.path is not None or self._stdout is not None
                                     or self._otlp is not None)

    def reopen(self) -> bool:
        """Close and reopen the file at `path` (after rotation); never raises. True when
        the file is open afterwards (a failure is logged; later writes retry)."""
        with self._lock:
            return self._reopen_locked("reopen requested")

    def _reopen_locked(self, why: str) -> bool:
        if self.path is None or self._closed:
            return False
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:
                log.error("audit log %s: close before reopen failed: %s", self.path, exc)
        try:
            self._fh = self._open()
        except OSError as exc:
            log.error("audit log %s: reopen failed (%s): %s", self.path, why, exc)
            return False
        self.reopens += 1
        log.info("audit log %s: reopened (%s)", self.path, why)
        return True

    def _check_rotation_locked(self) -> None:
        """Reopen when `path` no longer names the open file (or it is not open)."""
        now = time.monotonic()
        if self._fh is not None and now < self._next_check:
            return
        self._next_check = now + self.rotation_check_s
        if self._fh is None:
            self._reopen_locked("retry after a failed open")
            return
        assert self.path is not None
        try:
            st = os.stat(self.path)
            cur = os.fstat(self._fh.fileno())
            moved = (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino)
        except FileNotFoundError:
            moved = True
        if moved:
            self._reopen_locked("the file was rotated away")

    def write(self, record: dict[str, Any]) -> bool:
        """Append one record as a JSON line; never raises. Returns True on success."""
        if not self.enabled:
            return False
        try:
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)
            with self._lock:
                if not self.enabled:
                    return False
                if self.path is not None:
                    self._check_rotation_locked()
                    if self._fh is None:
                        raise OSError(f"cannot open {self.path}")
                    self._fh.write(line + "\n")
                if self._stdout is not None:
                    self._stdout.write(line + "\n")
                    self._stdout.flush()
                if self._otlp is not None:
                    self._otlp.emit(record)
            self.lines_written += 1
            return True
        except Exception as exc:  # disk full, closed file, bad value: count, never raise
            self.failures += 1
            if self._on_failure is not None:
                try:
                    self._on_failure()
                except Exception:  # pragma: no cover
                    pass
            now = time.monotonic()
            if now - self._last_error_log > 10.0:
                self._last_error_log = now
                log.error("audit log %s: write failed (%d failures so far): %s",
                          self.path, self.failures, exc)
            return False

    def flush(self) -> None:
        """Flush and fsync; never raises."""
        with self._lock:
            if self._fh is None:
                return
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as exc:
                log.error("audit log %s: flush failed: %s", self.path, exc)

    def close(self) -> None:
        """Flush, fsync and close; idempotent, never raises."""
        self.flush()
        with self._lock:
            self._closed = True
            fh, self._fh = self._fh, None
            otlp, self._otlp = self._otlp, None
            self._stdout = None
        if otlp is not None:
            try:
                otlp.close()
            except Exception as exc:  # pragma: no cover - the SDK logs its own errors
                log.error("audit OTLP export: close failed: %s", exc)
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:  # pragma: no cover
                log.error("audit log %s: close failed: %s", self.path, exc)
