"""Configuration of the vLLM capture plugin, read from the environment.

The plugin is enabled by one variable: `SAFETY_MONITOR_ADDR` (``host:port`` of the
sidecar's gRPC server). Absent or empty, the plugin does nothing at all. Every other
variable has a default:

=====================================  ==========  =============================================
variable                               default     meaning
=====================================  ==========  =============================================
SAFETY_MONITOR_ADDR                    (unset)     sidecar address; unset → plugin disabled
SAFETY_MONITOR_MODEL                   (served)    model identity sent in frames / checked
                                                   against the plan (default: vLLM's
                                                   served model name)
SAFETY_MONITOR_PLAN_TIMEOUT_S          10          how long start-up waits for the capture plan
SAFETY_MONITOR_RING_SLOTS              4           host ring slots (one slot = one engine step)
SAFETY_MONITOR_RING_MB                 512         cap on the ring's total size (MiB)
SAFETY_MONITOR_QUEUE                   256         bounded send queue (messages)
SAFETY_MONITOR_BACKOFF_S               0.2         first reconnect delay (s), doubles per failure
SAFETY_MONITOR_BACKOFF_MAX_S           5           reconnect delay cap (s)
SAFETY_MONITOR_STATS_S                 2           ClientStats period while connected (s)
SAFETY_MONITOR_CLIENT_ID               (auto)      ClientHello.client_id
SAFETY_MONITOR_CHAT_TEMPLATE           (model's)   chat template file for token roles; set it
                                                   to the file given to ``vllm serve
                                                   --chat-template`` when that flag is used
=====================================  ==========  =============================================
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

ENV_ADDR = "SAFETY_MONITOR_ADDR"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name}: expected a number, found {raw!r}") from e


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"{name}: expected an integer, found {raw!r}") from e


@dataclass(frozen=True)
class CaptureConfig:
    """Plugin settings (see the module docstring for the environment variables)."""

    addr: str
    model: str | None = None
    plan_timeout_s: float = 10.0
    ring_slots: int = 4
    ring_mb: int = 512
    queue_size: int = 256
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    stats_period_s: float = 2.0
    client_id: str = ""
    #: Chat template file the token roles are derived from (None: the tokenizer's own).
    chat_template: str | None = None

    @classmethod
    def from_env(cls) -> CaptureConfig | None:
        """Return the configuration, or None when `SAFETY_MONITOR_ADDR` is unset (disabled)."""
        addr = os.environ.get(ENV_ADDR, "").strip()
        if not addr:
            return None
        return cls(
            addr=addr,
            model=os.environ.get("SAFETY_MONITOR_MODEL", "").strip() or None,
            plan_timeout_s=_float("SAFETY_MONITOR_PLAN_TIMEOUT_S", 10.0),
            ring_slots=max(1, _int("SAFETY_MONITOR_RING_SLOTS", 4)),
            ring_mb=max(1, _int("SAFETY_MONITOR_RING_MB", 512)),
            queue_size=max(1, _int("SAFETY_MONITOR_QUEUE", 256)),
            backoff_s=max(0.01, _float("SAFETY_MONITOR_BACKOFF_S", 0.2)),
            backoff_max_s=max(0.01, _float("SAFETY_MONITOR_BACKOFF_MAX_S", 5.0)),
            stats_period_s=max(0.05, _float("SAFETY_MONITOR_STATS_S", 2.0)),
            client_id=os.environ.get("SAFETY_MONITOR_CLIENT_ID", "").strip()
            or f"vllm-worker-{os.getpid()}@{socket.gethostname()}",
            chat_template=os.environ.get("SAFETY_MONITOR_CHAT_TEMPLATE", "").strip() or None,
        )


def enabled() -> bool:
    """True when the plugin is configured (`SAFETY_MONITOR_ADDR` set and non-empty)."""
    return bool(os.environ.get(ENV_ADDR, "").strip())
