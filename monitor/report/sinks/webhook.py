"""Webhook sink: one signed JSON POST per alert event.

Body (UTF-8 JSON)::

    {"version": "1", "idempotency_key": "<32 hex>", "status": "firing",
     "event": {<every AlertEvent field>}, "runbook_url": "..."}

Headers:
- `X-Safety-Monitor-Idempotency-Key`: the event's key (receivers dedupe on it: delivery
  is at-least-once).
- `X-Safety-Monitor-Timestamp`: unix seconds of this attempt.
- `X-Safety-Monitor-Signature`: `sha256=<hex>` = HMAC-SHA256(secret, timestamp + "." +
  body), present when a secret is configured. `verify_signature` is the receiver side
  (constant-time compare; reject old timestamps to stop replays).

Relay to Slack / PagerDuty through Alertmanager (route on the labels of the
Alertmanager sink) or a small relay that reads this body.

Thread rules: `deliver` / `tick` are called only by the sink's worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from monitor.report.sinks.events import AlertEvent
from monitor.report.sinks.http import post_json, redact_url

__all__ = ["KEY_HEADER", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WebhookConfig",
           "WebhookSink", "sign", "verify_signature", "webhook_body"]

KEY_HEADER = "X-Safety-Monitor-Idempotency-Key"
TIMESTAMP_HEADER = "X-Safety-Monitor-Timestamp"
SIGNATURE_HEADER = "X-Safety-Monitor-Signature"


@dataclass(frozen=True)
class WebhookConfig:
    """Settings of one webhook target.

    Attributes:
        url: the endpoint (http or https).
        secret: HMAC key (bytes; from a Secret file or env var; never logged or repr'd).
        timeout_s: HTTP timeout of one POST.
    """

    url: str
    secret: bytes = field(default=b"", repr=False)
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url: expected http(s)://..., found scheme "
                             f"{self.url.split(':', 1)[0]!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"webhook timeout_s: expected > 0, found {self.timeout_s}")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: bytes, timestamp: str, body: bytes, signature: str, *,
                     max_age_s: float = 300.0, now: float | None = None) -> bool:
    """Receiver check: signature matches and the timestamp is within `max_age_s`."""
    try:
        age = abs((time.time() if now is None else now) - float(timestamp))
    except ValueError:
        return False
    return age <= max_age_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def webhook_body(ev: AlertEvent) -> bytes:
    """The JSON body of one event."""
    return json.dumps({"version": "1", "idempotency_key": ev.key, "status": "firing",
                       "event": asdict(ev), "runbook_url": ev.runbook},
                      separators=(",", ":"), allow_nan=False).encode()


class WebhookSink:
    """Posts each event to one URL, signed when a secret is set."""

    max_batch = 1  # one POST per event: a failure never re-sends delivered ones

    def __init__(self, config: WebhookConfig, *, name: str = "webhook") -> None:
        self.config = config
        self.name = name
        self.timeout_s = config.timeout_s
        self.target = redact_url(config.url)

    def deliver(self, events: Sequence[AlertEvent]) -> None:
        """POST each event in order; raises `DeliveryError` at the first failure."""
        for ev in events:
            body = webhook_body(ev)
            ts = str(int(time.time()))
            headers = {KEY_HEADER: ev.key, TIMESTAMP_HEADER: ts}
            if self.config.secret:
                headers[SIGNATURE_HEADER] = sign(self.config.secret, ts, body)
            post_json(self.config.url, body, timeout_s=self.config.timeout_s,
                      headers=headers)

    def tick(self, now: float) -> None:
        """Nothing periodic: each event is sent once it is delivered."""
