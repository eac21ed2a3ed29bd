"""CaptureConfig: every capture environment variable is one field, parsed and documented
in one place (docs/CAPTURE.md holds `env_table()`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.capture.config import CaptureConfig, env_table

REPO = Path(__file__).resolve().parents[1]


def test_disabled_without_addr() -> None:
    assert CaptureConfig.from_env({}) is None
    assert CaptureConfig.from_env({"SAFETY_MONITOR_ADDR": "  "}) is None


def test_defaults_values_and_clamps() -> None:
    cfg = CaptureConfig.from_env({"SAFETY_MONITOR_ADDR": "h:1"})
    assert cfg is not None and cfg.addr == "h:1" and cfg.ring_slots == 4
    assert cfg.client_id.startswith("vllm-worker-") and not cfg.wrap_all
    cfg = CaptureConfig.from_env({
        "SAFETY_MONITOR_ADDR": "h:1", "SAFETY_MONITOR_RING_SLOTS": "0",
        "SAFETY_MONITOR_BACKOFF_S": "0.5", "SAFETY_MONITOR_WRAP": "ALL",
        "SAFETY_MONITOR_STATS_FILE": "/tmp/x.json", "SAFETY_MONITOR_CLIENT_ID": "w0",
        "SAFETY_MONITOR_LOG_LEVEL": "debug"})
    assert cfg is not None
    assert (cfg.ring_slots, cfg.backoff_s, cfg.wrap_all, cfg.stats_file, cfg.client_id,
            cfg.log_level) == (1, 0.5, True, "/tmp/x.json", "w0", "debug")


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="SAFETY_MONITOR_QUEUE: expected an integer, found"):
        CaptureConfig.from_env({"SAFETY_MONITOR_ADDR": "h:1", "SAFETY_MONITOR_QUEUE": "many"})


def test_docs_table_is_the_config() -> None:
    assert env_table() in (REPO / "docs" / "CAPTURE.md").read_text()
