"""One HTTP POST with a timeout, and the delivery error every sink raises.

Result classes (what the sink worker does with them):
- 2xx: delivered.
- 408, 425, 429, 5xx, connection errors, timeouts: `DeliveryError(retryable=True)` — the
  events stay spooled and are retried with backoff.
- any other status (400 bad payload, 401/403 wrong secret, 404 wrong URL):
  `DeliveryError(retryable=False)` — retrying the same bytes cannot succeed; the worker
  drops the events and counts them (reason `rejected`), so one bad record never blocks
  the queue behind it.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

__all__ = ["DeliveryError", "post_json", "redact_url"]

_RETRYABLE = frozenset({408, 425, 429})


class DeliveryError(Exception):
    """A delivery failed; `retryable` says whether the same request may succeed later."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def redact_url(url: str) -> str:
    """`scheme://host:port/…` for logs and errors: webhook URLs often carry a token in
    the path or query (Slack, PagerDuty relays) and user:password may sit in the netloc."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{u.port}" if u.port else ""
    tail = "/…" if (u.path not in ("", "/") or u.query) else ""
    return f"{u.scheme}://{host}{port}{tail}"


def post_json(url: str, body: bytes, *, timeout_s: float,
              headers: Mapping[str, str] | None = None) -> int:
    """POST `body` (JSON) to `url`; return the 2xx status or raise `DeliveryError`.

    The message of the error names the redacted URL and the status, never the headers or
    the URL's path and query (they may carry secrets or signatures).
    """
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read(65536)
            return int(resp.status)
    except urllib.error.HTTPError as e:
        status = int(e.code)
        retry = status in _RETRYABLE or status >= 500
        raise DeliveryError(f"POST {redact_url(url)}: HTTP {status}", retryable=retry) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DeliveryError(f"POST {redact_url(url)}: {reason}", retryable=True) from None
