"""Alert delivery settings (flags of `safety-monitor serve`) and the dispatcher they build.

Secrets never sit in these settings: the webhook HMAC key is read from a file (a mounted
Kubernetes Secret) or an environment variable when the dispatcher is built, and is never
logged or repr'd.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from monitor.report.sinks.alertmanager import AlertmanagerConfig, AlertmanagerSink
from monitor.report.sinks.delivery import (
    AlertDispatcher,
    DeliveryConfig,
    Sink,
    SinkMetrics,
    SinkWorker,
)
from monitor.report.sinks.events import AlertContext
from monitor.report.sinks.spool import DiskSpool, MemorySpool, Spool
from monitor.report.sinks.webhook import WebhookConfig, WebhookSink

__all__ = ["WEBHOOK_SECRET_ENV", "AlertSinksConfig", "make_dispatcher"]

#: Environment variable holding the webhook HMAC key (alternative to a secret file).
WEBHOOK_SECRET_ENV = "SAFETY_MONITOR_WEBHOOK_SECRET"


@dataclass(frozen=True)
class AlertSinksConfig:
    """Where alerts go and how hard delivery tries.

    Attributes:
        alertmanager_urls: Alertmanager base URLs (each gets every alert, as Prometheus
            does with an HA pair); empty: no Alertmanager sink.
        webhook_url: generic JSON webhook; None: no webhook sink.
        webhook_secret_file: file holding the HMAC key (a mounted Secret); when None the
            key comes from env `SAFETY_MONITOR_WEBHOOK_SECRET` (unset: unsigned).
        spool_dir: directory of the durable spools (one subdirectory per sink); None:
            in-memory spools (undelivered alerts are lost at exit, and counted).
        spool_max_bytes: bound of EACH sink's spool, bytes.
        timeout_s: HTTP timeout of one delivery request.
        resend_s: Alertmanager re-send interval of active alerts.
        resolve_after_s: an Alertmanager alert resolves this long after its last escalation.
        runbook_url: base URL of the runbook (docs/RUNBOOK.md) put on every alert.
        queue_events: in-memory queue per sink, events.
    """

    alertmanager_urls: tuple[str, ...] = ()
    webhook_url: str | None = None
    webhook_secret_file: str | None = None
    spool_dir: str | None = None
    spool_max_bytes: int = 64 << 20
    timeout_s: float = 5.0
    resend_s: float = 60.0
    resolve_after_s: float = 300.0
    runbook_url: str = ""
    queue_events: int = 10_000

    @property
    def enabled(self) -> bool:
        """True when any sink is configured."""
        return bool(self.alertmanager_urls) or self.webhook_url is not None


def _secret(cfg: AlertSinksConfig) -> bytes:
    if cfg.webhook_secret_file is not None:
        with open(cfg.webhook_secret_file, "rb") as fh:
            return fh.read().strip()
    return os.environ.get(WEBHOOK_SECRET_ENV, "").encode()


def _spool(cfg: AlertSinksConfig, sink: str, url: str) -> Spool:
    if cfg.spool_dir is None:
        return MemorySpool(cfg.spool_max_bytes)
    # the URL's hash keeps two targets of the same kind apart, and a changed URL from
    # delivering another target's leftovers
    sub = f"{sink}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    return DiskSpool(os.path.join(cfg.spool_dir, sub), cfg.spool_max_bytes)


def make_dispatcher(cfg: AlertSinksConfig, ctx: AlertContext,
                    registry: CollectorRegistry) -> AlertDispatcher:
    """Build sinks, spools, metrics and workers (not started).

    Raises:
        ValueError: a bad URL or setting (message names the setting).
        OSError: the secret file or a spool directory cannot be read / created.
    """
    sinks: list[Sink] = []
    urls: list[str] = []
    for i, url in enumerate(cfg.alertmanager_urls):
        am = AlertmanagerConfig(url=url, timeout_s=cfg.timeout_s, resend_s=cfg.resend_s,
                                resolve_after_s=cfg.resolve_after_s)
        name = "alertmanager" if len(cfg.alertmanager_urls) == 1 else f"alertmanager-{i}"
        sinks.append(AlertmanagerSink(am, name=name))
        urls.append(url)
    if cfg.webhook_url is not None:
        wh = WebhookConfig(url=cfg.webhook_url, secret=_secret(cfg), timeout_s=cfg.timeout_s)
        sinks.append(WebhookSink(wh))
        urls.append(cfg.webhook_url)
    metrics = SinkMetrics(registry, [s.name for s in sinks])
    delivery = DeliveryConfig(queue_events=cfg.queue_events)
    workers = [SinkWorker(s, _spool(cfg, s.name, u), metrics, delivery)
               for s, u in zip(sinks, urls, strict=True)]
    return AlertDispatcher(ctx, workers)
