"""Alert events: what the sidecar delivers to Alertmanager and webhooks.

An `AlertEvent` is made once per severity escalation of a detector in mode `alert` or
`block` (observe-mode escalations are shadow "would_alert" lines in the audit log and are
never delivered). It is immutable and JSON-serialisable (`to_json` / `from_json`), so the
spool can store it and a restarted sidecar delivers the very same event.

`key` is the idempotency key: sha256 over (bundle sha256, policy version, request id,
detector, severity), 32 hex chars. The same escalation always gets the same key, across
retries and restarts, so a receiver dedupes at-least-once delivery by it.

Identity rule: `request_id` and `correlation_id` are annotations (values), never label
keys or anything that indexes state; labels are bounded (detector, severity, mode, model,
pod, namespace, bundle, policy version).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from monitor.judge.latents import LatentHit

__all__ = ["DELIVERED_MODES", "AlertContext", "AlertEvent", "EscalationLike", "alert_event",
           "idempotency_key", "iso_utc", "latents_text"]

#: Policy modes whose escalations are delivered (observe = shadow mode, audit only).
DELIVERED_MODES = frozenset({"alert", "block"})


def iso_utc(t: float) -> str:
    """Unix seconds -> RFC 3339 UTC with milliseconds (what Alertmanager parses)."""
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


class EscalationLike(Protocol):
    """The fields of `monitor.judge.tracker.VerdictUpdate` an alert is made from
    (read-only: a frozen dataclass or properties satisfy it)."""

    @property
    def request_id(self) -> str: ...
    @property
    def detector(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def severity(self) -> str: ...
    @property
    def threshold(self) -> float: ...
    @property
    def crossed_at_position(self) -> int: ...
    @property
    def mode(self) -> str: ...
    @property
    def policy_version(self) -> str: ...
    @property
    def latents(self) -> Sequence[LatentHit]: ...


#: Longest `AlertEvent.latents` text, in characters (an annotation, not a label).
MAX_LATENTS_TEXT = 1024


def latents_text(hits: Sequence[LatentHit]) -> str:
    """``"sae_l18#1938 (3.67) top tokens: \")\"; ..."``: the fired latents of an
    escalation as one line, at most `MAX_LATENTS_TEXT` characters."""
    text = "; ".join(f"{h.name}#{h.index} ({h.value:.3g})" + (f" {h.label}" if h.label else "")
                     for h in hits)
    return text if len(text) <= MAX_LATENTS_TEXT else text[:MAX_LATENTS_TEXT - 3] + "..."


@dataclass(frozen=True)
class AlertContext:
    """Where alerts come from; fixed for the life of the process.

    Attributes:
        model_name: the served model (label `model_name`, as vLLM's metrics).
        bundle_name: the detector bundle (label `bundle`).
        bundle_sha256: its content hash (label `bundle_version` = first 12 hex chars).
        pod: pod name (downward API env `POD_NAME`; "" outside Kubernetes).
        namespace: pod namespace (downward API env `POD_NAMESPACE`).
        runbook_url: base URL of the runbook; `#<detector>-verdict` is appended.
    """

    model_name: str
    bundle_name: str
    bundle_sha256: str
    pod: str = ""
    namespace: str = ""
    runbook_url: str = ""

    @classmethod
    def from_env(cls, *, model_name: str, bundle_name: str, bundle_sha256: str,
                 runbook_url: str) -> AlertContext:
        """Context with pod / namespace from the downward-API env vars (empty if unset)."""
        return cls(model_name=model_name, bundle_name=bundle_name,
                   bundle_sha256=bundle_sha256, pod=os.environ.get("POD_NAME", ""),
                   namespace=os.environ.get("POD_NAMESPACE", ""), runbook_url=runbook_url)


@dataclass(frozen=True)
class AlertEvent:
    """One delivered escalation (all fields plain JSON types).

    Attributes:
        key: idempotency key (32 hex chars, stable across retries and restarts).
        created_at: unix seconds when the escalation was judged (Alertmanager startsAt).
        request_id: vLLM's engine request id (annotation only).
        correlation_id: the caller's label, "" if none (annotation only).
        detector, severity, mode: the verdict (`severity` is "warn" or "critical").
        score: aggregated score when the threshold was crossed, in [0, 1].
        threshold: the threshold that was crossed.
        position: token position where it was crossed.
        policy_version: active policy version.
        model_name, bundle_name, bundle_sha256, pod, namespace, runbook_url: `AlertContext`.
        latents: the SAE latents that fired, with labels (`latents_text`; "" if none).
    """

    key: str
    created_at: float
    request_id: str
    correlation_id: str
    detector: str
    severity: str
    mode: str
    score: float
    threshold: float
    position: int
    policy_version: str
    model_name: str
    bundle_name: str
    bundle_sha256: str
    pod: str
    namespace: str
    runbook_url: str
    latents: str = ""

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON (one spool record)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"),
                          allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AlertEvent:
        """Inverse of `to_json`; raises ValueError naming the field on a bad record."""
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError(f"alert event: expected a JSON object, found {type(obj).__name__}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING}  # absent in older spools
        missing = sorted(set(fields) - set(obj) - optional)
        if missing:
            raise ValueError(f"alert event: missing fields {missing}")
        types: dict[str, type | tuple[type, ...]] = {"str": str, "float": (int, float),
                                                     "int": int}
        for name, typ in fields.items():
            if name not in obj:
                continue
            if not isinstance(obj[name], types[str(typ)]) or isinstance(obj[name], bool):
                raise ValueError(f"alert event field {name}: expected {typ}, found "
                                 f"{type(obj[name]).__name__}")
        return cls(**{k: obj[k] for k in fields if k in obj})

    @property
    def bundle_version(self) -> str:
        """Short bundle version for labels: the first 12 hex chars of its sha256."""
        return self.bundle_sha256[:12]

    @property
    def runbook(self) -> str:
        """Runbook URL of this detector's verdict alert ("" when no base URL is set)."""
        if not self.runbook_url:
            return ""
        return f"{self.runbook_url}#safetymonitorverdict"


def idempotency_key(bundle_sha256: str, policy_version: str, request_id: str, detector: str,
                    severity: str) -> str:
    """The idempotency key of one escalation: 32 hex chars of a sha256 (see module doc)."""
    src = "\x1f".join((bundle_sha256, policy_version, request_id, detector, severity))
    return hashlib.sha256(src.encode()).hexdigest()[:32]


def alert_event(update: EscalationLike, ctx: AlertContext, *, now: float,
                correlation_id: str = "") -> AlertEvent:
    """The event for one escalation (caller checks `update.mode in DELIVERED_MODES`)."""
    return AlertEvent(
        key=idempotency_key(ctx.bundle_sha256, update.policy_version, update.request_id,
                            update.detector, update.severity), created_at=float(now),
        request_id=update.request_id, correlation_id=correlation_id,
        detector=update.detector, severity=update.severity, mode=update.mode,
        score=float(update.score), threshold=float(update.threshold),
        position=int(update.crossed_at_position), policy_version=update.policy_version,
        model_name=ctx.model_name, bundle_name=ctx.bundle_name,
        bundle_sha256=ctx.bundle_sha256, pod=ctx.pod, namespace=ctx.namespace,
        runbook_url=ctx.runbook_url, latents=latents_text(update.latents),
    )
