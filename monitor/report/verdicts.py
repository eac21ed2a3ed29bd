"""Where verdicts go: the stream (proto `Verdict`), the audit log and the counters.

`verdict_message` converts a tracker `VerdictUpdate` into a `ServerMessage`; `Reporter`
does the side effects of one update, so the pipeline only decides *when*:

- an escalation (a newly reached severity) counts `alerts_total{detector,severity,mode}`,
  writes an audit line (`alert`, `would_alert` in observe mode, or `block` when it orders
  a block: mode block at critical, also counted in `blocks_total{detector}`; the verdict
  sent on the stream makes the capture plugin stop the request, `monitor.capture.enforce`)
  and is handed to alert delivery (`monitor.report.sinks`, modes alert|block; never
  blocks);
- a final verdict observes `request_score{detector}` and, with `--audit-finals`, writes
  a `final` audit line;
- the final verdict of a *blocked* request (always, finals flag or not) writes a
  `block_end` line with `tokens_after_crossing` (tokens vLLM generated after the
  crossing token, `tokens_after_crossing`) and observes
  `block_tokens_after_crossing{detector}`.

Thread rules: `Reporter` is called by the scoring worker only; `Metrics` and `AuditLog`
are themselves thread-safe.
"""

from __future__ import annotations

import logging

from monitor.judge.tracker import VerdictUpdate
from monitor.report.audit import AuditLog, audit_record
from monitor.report.metrics import Metrics
from monitor.report.sinks import AlertDispatcher
from monitor.v1 import monitor_pb2

__all__ = ["Reporter", "verdict_message"]

log = logging.getLogger(__name__)

_SEVERITY_ENUM: dict[str, monitor_pb2.Severity] = {
    "none": monitor_pb2.SEVERITY_NONE,
    "warn": monitor_pb2.SEVERITY_WARN,
    "critical": monitor_pb2.SEVERITY_CRITICAL,
}


def tokens_after_crossing(crossed_at: int, first_generated: int, highest: int, *,
                          ended_in_engine: bool) -> int:
    """Tokens vLLM generated after a crossing, as the sidecar saw them.

    ``crossed_at``: position of the crossing token; ``first_generated``: lowest position
    of a generated row captured (-1: none); ``highest``: highest position captured (any
    row, -1: none). Generated rows captured after the crossing are those at positions in
    ``(max(crossed_at, prompt_end), highest]`` with ``prompt_end = first_generated - 1``
    (``highest`` when no generated row came: the crossing is in the prompt and nothing
    generated was fed back). A request that ended inside vLLM (``ended_in_engine``:
    stop, length, abort, a block included) sampled one more token, streamed to the
    client but never fed back through the model, so never captured: +1. Example: prompt
    at positions 0..9, crossing at 4 (in the prompt), blocked at its first token ->
    ``first_generated=-1, highest=9`` -> 0 + 1 = 1, the same count vLLM's engine core
    logs (`monitor.capture.enforce.PendingBlocks`).
    """
    prompt_end = first_generated - 1 if first_generated >= 0 else highest
    captured = max(0, highest - max(crossed_at, prompt_end))
    return captured + (1 if ended_in_engine else 0)


def verdict_message(u: VerdictUpdate, correlation_id: str = "") -> monitor_pb2.ServerMessage:
    """Convert a `VerdictUpdate` into a `ServerMessage(verdict=...)`; `correlation_id` is
    the caller's label of the request."""
    return monitor_pb2.ServerMessage(verdict=monitor_pb2.Verdict(
        correlation_id=correlation_id,
        request_id=u.request_id, detector=u.detector, score=float(u.score),
        severity=_SEVERITY_ENUM[u.severity], threshold=float(u.threshold),
        crossed_at_position=int(u.crossed_at_position), final=bool(u.final), mode=u.mode,
        policy_version=u.policy_version, n_tokens_scored=int(u.n_tokens_scored),
        n_tokens_unscored=int(u.n_tokens_unscored), peak_score=float(u.peak_score),
        latents=[monitor_pb2.LatentHit(name=h.name, index=h.index, value=h.value,
                                       label=h.label) for h in u.latents],
    ))


class Reporter:
    """Side effects of verdict updates: alert counter, audit lines, score histogram.

    Args:
        metrics: the server's `Metrics`.
        audit: the `AuditLog` (disabled when it has no path).
        bundle_name, bundle_sha256, model_name: carried into every audit line.
        alerts: alert delivery (Alertmanager / webhook); None: no delivery.
    """

    def __init__(self, metrics: Metrics, audit: AuditLog, *, bundle_name: str,
                 bundle_sha256: str, model_name: str,
                 alerts: AlertDispatcher | None = None) -> None:
        self.metrics = metrics
        self.audit = audit
        self.alerts = alerts
        self.bundle_name = bundle_name
        self.bundle_sha256 = bundle_sha256
        self.model_name = model_name

    def _audit(self, u: VerdictUpdate, event: str, correlation_id: str) -> None:
        self.audit.write(audit_record(u, event=event, bundle_name=self.bundle_name,
                                      bundle_sha256=self.bundle_sha256,
                                      model_name=self.model_name,
                                      correlation_id=correlation_id))

    def escalation(self, u: VerdictUpdate, correlation_id: str = "") -> None:
        """A newly reached severity: count it and audit it (no-op for other updates)."""
        if not u.escalated or u.severity == "none":
            return
        action = u.action
        event = {"record": "would_alert", "block": "block"}.get(action, "alert")
        if action == "block":
            self.metrics.blocks.labels(detector=u.detector).inc()
        self.metrics.alerts.labels(detector=u.detector, severity=u.severity,
                                   mode=u.mode).inc()
        self._audit(u, event, correlation_id)
        if self.alerts is not None:
            self.alerts.escalation(u, correlation_id)
        log.info("%s: request=%s detector=%s severity=%s score=%.3f position=%d", event,
                 u.request_id, u.detector, u.severity, u.score, u.crossed_at_position)

    def block_end(self, u: VerdictUpdate, correlation_id: str, tokens_after: int | None,
                  finish_reason: str) -> None:
        """A blocked request finished: a `block_end` audit line (the final verdict plus
        `tokens_after_crossing` and `finish_reason`) and the tokens-after histogram.
        `tokens_after` None: not observable (the plan captures no generated rows);
        written as null, not observed."""
        if tokens_after is not None:
            self.metrics.block_tokens_after.labels(detector=u.detector).observe(tokens_after)
        rec = audit_record(u, event="block_end", bundle_name=self.bundle_name,
                           bundle_sha256=self.bundle_sha256, model_name=self.model_name,
                           correlation_id=correlation_id)
        rec.update(tokens_after_crossing=tokens_after, finish_reason=finish_reason)
        self.audit.write(rec)
        log.info("block_end: request=%s detector=%s position=%d tokens_after_crossing=%s "
                 "finish=%s", u.request_id, u.detector, u.crossed_at_position, tokens_after,
                 finish_reason)

    def final(self, u: VerdictUpdate, correlation_id: str = "") -> None:
        """A final verdict: request-score histogram and a `final` line when finals are
        audited, or always when the request is incomplete (`u.incomplete`: some of its
        in-scope positions never reached the server, or the server closed it without the
        client's counts), so every gap is on record.

        The histogram observes `u.judged_peak`, the statistic the thresholds are compared
        with, so the share of a detector's requests above a threshold's bucket edge
        (``metrics.threshold_edge``: the largest float below it) is the share that
        reached that severity; a request with no judged token (it could
        not alert) is not observed. (The last aggregate, `u.score`, is below it for an
        every-token detector whose aggregate fell back after a hot token.)"""
        if u.judged_peak is not None:
            self.metrics.observe_request_score(u.detector, u.judged_peak)
        if self.audit.include_finals or u.incomplete:
            self._audit(u, "final", correlation_id)
