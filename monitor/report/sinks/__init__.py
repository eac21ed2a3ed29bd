"""Alert delivery: Alertmanager and webhook sinks behind a bounded queue and a disk spool.

- `events.py`: `AlertEvent` (one escalation, JSON, idempotency key) and `AlertContext`.
- `spool.py`: `DiskSpool` (fsynced, survives restarts) / `MemorySpool`, bounded in bytes.
- `http.py`: one POST with a timeout; `DeliveryError(retryable)`.
- `alertmanager.py`: `POST /api/v2/alerts`, re-sent while active, resolved on time.
- `webhook.py`: signed JSON POST (HMAC-SHA256), `verify_signature` for receivers.
- `delivery.py`: `SinkWorker` (thread, queue, spool, backoff), `AlertDispatcher` (fan-out),
  `SinkMetrics` (`safety_monitor_alert_*`).
- `config.py`: `AlertSinksConfig` + `make_dispatcher`.
"""

from monitor.report.sinks.config import AlertSinksConfig, make_dispatcher
from monitor.report.sinks.delivery import AlertDispatcher, SinkMetrics, SinkWorker
from monitor.report.sinks.events import AlertContext, AlertEvent

__all__ = ["AlertContext", "AlertDispatcher", "AlertEvent", "AlertSinksConfig", "SinkMetrics",
           "SinkWorker", "make_dispatcher"]
