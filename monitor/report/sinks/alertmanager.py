"""Alertmanager sink: `POST /api/v2/alerts`, as Prometheus does it.

Each event becomes one Alertmanager alert:

- labels (bounded; Alertmanager identifies an alert by them): `alertname`
  ("SafetyMonitorVerdict"), `detector`, `severity` (warn | critical), `mode`
  (alert | block), `model_name`, `pod`, `namespace` (downward API), `bundle`,
  `bundle_version` (sha256[:12]), `policy_version`, `source` ("safety-monitor").
  Empty values are left out (Alertmanager treats an empty label as absent anyway).
- annotations: `summary`, `description`, `request_id`, `correlation_id`, `score`,
  `threshold`, `position`, `idempotency_key`, `runbook_url`, `latents` (the SAE latents
  that fired, with their labels, when the detector reads an SAE; bounded text).
- `startsAt` = when the escalation was judged, `endsAt` = startsAt + `resolve_after_s`.

Several requests escalating the same detector on the same pod are ONE alert (same labels):
its annotations describe the latest request and its `endsAt` moves forward. While an
alert is active the sink re-sends it every `resend_s` (Alertmanager forgets alerts it
has not heard about, e.g. after its own restart), and once `endsAt` has passed it sends
it a last time with that `endsAt` (resolved) and forgets it. Because `endsAt` is always
set, Alertmanager resolves the alert on time even if this process dies.

Thread rules: `deliver` and `tick` are called only by the sink's worker thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from monitor.report.sinks.events import AlertEvent, iso_utc
from monitor.report.sinks.http import post_json, redact_url

__all__ = ["ALERTNAME", "AlertmanagerConfig", "AlertmanagerSink", "am_alert"]

ALERTNAME = "SafetyMonitorVerdict"


@dataclass(frozen=True)
class AlertmanagerConfig:
    """Settings of one Alertmanager target.

    Attributes:
        url: base URL, e.g. http://alertmanager:9093 (`/api/v2/alerts` is appended).
        timeout_s: HTTP timeout of one POST.
        resend_s: re-send active alerts this often (Prometheus: 1 min; keep it below
            Alertmanager's `resolve_timeout`).
        resolve_after_s: an alert resolves this long after its latest escalation.
    """

    url: str
    timeout_s: float = 5.0
    resend_s: float = 60.0
    resolve_after_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"alertmanager url: expected http(s)://host:port, found scheme "
                             f"{self.url.split(':', 1)[0]!r}")
        for name in ("timeout_s", "resend_s", "resolve_after_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"alertmanager {name}: expected > 0, found "
                                 f"{getattr(self, name)}")


def am_alert(ev: AlertEvent, ends_at: float) -> dict[str, object]:
    """The Alertmanager v2 `postableAlert` of one event."""
    labels = {
        "alertname": ALERTNAME, "detector": ev.detector, "severity": ev.severity,
        "mode": ev.mode, "model_name": ev.model_name, "pod": ev.pod,
        "namespace": ev.namespace, "bundle": ev.bundle_name,
        "bundle_version": ev.bundle_version, "policy_version": ev.policy_version,
        "source": "safety-monitor",
    }
    where = f"{ev.namespace}/{ev.pod}" if ev.pod else ev.model_name
    annotations = {
        "summary": f"{ev.detector}: {ev.severity} verdict on {where}",
        "description": (f"Request {ev.request_id} reached {ev.severity} for detector "
                        f"{ev.detector} (score {ev.score:.3f} >= threshold "
                        f"{ev.threshold:.3f} at token {ev.position}); mode {ev.mode}, "
                        f"policy {ev.policy_version}."),
        "request_id": ev.request_id, "correlation_id": ev.correlation_id,
        "score": f"{ev.score:.4f}", "threshold": f"{ev.threshold:.4f}",
        "position": str(ev.position), "idempotency_key": ev.key,
        "runbook_url": ev.runbook, "latents": ev.latents,
    }
    return {
        "labels": {k: v for k, v in labels.items() if v},
        "annotations": {k: v for k, v in annotations.items() if v},
        "startsAt": iso_utc(ev.created_at),
        "endsAt": iso_utc(ends_at),
    }


@dataclass
class _Active:
    alert: dict[str, object]
    ends_at: float


class AlertmanagerSink:
    """Posts alerts to one Alertmanager; re-sends active ones; resolves them on time."""

    max_batch = 64

    def __init__(self, config: AlertmanagerConfig, *, name: str = "alertmanager") -> None:
        self.config = config
        self.name = name
        self.timeout_s = config.timeout_s
        self.endpoint = config.url.rstrip("/") + "/api/v2/alerts"
        self.target = redact_url(self.endpoint)
        self._active: dict[tuple[tuple[str, str], ...], _Active] = {}
        self._last_send = 0.0

    @property
    def active(self) -> int:
        """Alerts currently firing (sent, endsAt in the future)."""
        return len(self._active)

    def _post(self, alerts: list[dict[str, object]]) -> None:
        body = json.dumps(alerts, separators=(",", ":")).encode()
        post_json(self.endpoint, body, timeout_s=self.config.timeout_s)

    def deliver(self, events: Sequence[AlertEvent]) -> None:
        """Post the events' alerts (one request); raises `DeliveryError`."""
        alerts = []
        for ev in events:
            ends = ev.created_at + self.config.resolve_after_s
            a = am_alert(ev, ends)
            alerts.append(a)
            labels = a["labels"]
            assert isinstance(labels, dict)
            fp = tuple(sorted(labels.items()))
            cur = self._active.get(fp)
            if cur is None or ends >= cur.ends_at:
                self._active[fp] = _Active(a, ends)
        self._post(alerts)
        self._last_send = time.time()

    def tick(self, now: float) -> None:
        """Re-send active alerts every `resend_s`; send resolved ones once. May raise
        `DeliveryError` (the worker retries on its next tick)."""
        expired = [fp for fp, a in self._active.items() if a.ends_at <= now]
        if not expired and now - self._last_send < self.config.resend_s:
            return
        if not self._active:
            return
        self._post([a.alert for a in self._active.values()])
        self._last_send = now
        for fp in expired:
            del self._active[fp]

