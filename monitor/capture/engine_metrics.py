"""Hold and block outcomes of vLLM's EngineCore on vLLM's own `/metrics`.

Prompt-time blocking and strict streaming (`monitor.capture.enforce.FirstTokenHolds`) and
the engine half of a block (`PendingBlocks`) run in the EngineCore process, but vLLM's
`/metrics` is served by the API-server process (prometheus_client's default registry,
where the gate's counters also live, `monitor.capture.gate`). The path between them:

1. The first process that registers the plugin (the API server: vLLM loads general
   plugins while it builds the engine config, before it starts the EngineCore) creates a
   private directory and names it in `SAFETY_MONITOR_ENGINE_STATS_DIR`
   (`ensure_stats_dir`); the EngineCore and workers inherit the variable. An operator may
   set it instead (then it is neither created nor removed).
2. Each EngineCore writes its counters to `engine-<pid>.json` there after a step that
   changed one (`enforce.EngineStatsFile`; at most 4 writes/s while requests are held).
3. `EngineCollector`, registered in the API server's default registry, reads and sums
   every `engine-*.json` at scrape time.

Metrics (vLLM's `/metrics`; one count per request):

- `safety_monitor_hold_requests_total`: requests whose output was held;
- `safety_monitor_hold_outcomes_total{outcome}`: `released_judged` (first output released
  because the sidecar judged far enough), `released_fail_open` (an output released
  UNJUDGED when the hold expired under fail open), `ended_fail_closed` (the hold expired
  under fail closed: the request ended with finish_reason content_filter), `ended_blocked`
  (a block verdict arrived while it was held);
- `safety_monitor_hold_holding`: requests under a hold now (first token not released
  yet; under strict streaming every request until it finishes);
- `safety_monitor_hold_seconds`: first-token hold time of requests released because
  judged (the time-to-first-token the hold adds);
- `safety_monitor_engine_blocks_applied_total`: blocks the EngineCore applied to a running
  request; `safety_monitor_engine_blocks_late_total`: block orders that arrived after
  their request had finished.

Limits: the variable is inherited by every child process, so a process that loaded the
plugin and then starts several vLLM servers (a test harness) should give each its own
directory. With `--api-server-count > 1` vLLM serves a multiprocess registry only, so these
are not on its `/metrics` (the EngineCore log lines still carry running counts). A file
that cannot be read at scrape time (mid-rename, removed) is skipped for that scrape.

Thread rules: `EngineCollector.collect` runs on the scraping thread and only reads files.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from monitor.capture.enforce import ENGINE_STATS_ENV, HOLD_BUCKETS_S

#: (file key, outcome label) of `safety_monitor_hold_outcomes_total`.
OUTCOMES = (("released_judged", "released_judged"), ("released_open", "released_fail_open"),
            ("ended_closed", "ended_fail_closed"), ("ended_blocked", "ended_blocked"))
_SCALARS = ("held", "holding", "released_judged", "released_open", "ended_closed",
            "ended_blocked", "blocks_applied", "blocks_late")
_COLLECTOR_NAME = "safety_monitor_hold_requests"
_registered: EngineCollector | None = None


def ensure_stats_dir() -> str:
    """`SAFETY_MONITOR_ENGINE_STATS_DIR`, created (and removed at exit) when unset."""
    d = os.environ.get(ENGINE_STATS_ENV, "")
    if d:
        return d
    d = tempfile.mkdtemp(prefix="safety-monitor-engine-")
    os.environ[ENGINE_STATS_ENV] = d
    atexit.register(shutil.rmtree, d, True)
    return d


def read_totals(directory: str) -> tuple[dict[str, int], list[int], float]:
    """Sum of the EngineCore files in `directory`: scalar counters (`_SCALARS`), hold-time
    bucket counts (not cumulative; `HOLD_BUCKETS_S` then +Inf) and their sum (s).
    Unreadable or malformed files and fields are skipped."""
    tot = dict.fromkeys(_SCALARS, 0)
    buckets = [0] * (len(HOLD_BUCKETS_S) + 1)
    total_s = 0.0
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "engine-*.json"))):
        try:
            with open(path) as f:
                rec: Any = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict):
            continue
        for k in _SCALARS:
            v = rec.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                tot[k] += v
        b = rec.get("hold_buckets")
        if isinstance(b, list) and len(b) == len(buckets) and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in b):
            buckets = [x + y for x, y in zip(buckets, b, strict=True)]
            s = rec.get("hold_sum_s")
            if isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0:
                total_s += float(s)
    return tot, buckets, total_s


class EngineCollector:
    """prometheus_client collector of the EngineCore counters in `directory`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families are built at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        tot, buckets, total_s = read_totals(self.directory)
        yield CounterMetricFamily(_COLLECTOR_NAME, "Requests whose output vLLM's EngineCore "
                                  "held for the safety monitor (prompt-time blocking / strict "
                                  "streaming).", value=tot["held"])
        out = CounterMetricFamily("safety_monitor_hold_outcomes", "Held requests by outcome: "
                                  "released_judged, released_fail_open (released unjudged "
                                  "when the hold expired), ended_fail_closed (ended with "
                                  "content_filter when the hold expired), ended_blocked.",
                                  labels=["outcome"])
        for key, label in OUTCOMES:
            out.add_metric([label], tot[key])
        yield out
        yield GaugeMetricFamily("safety_monitor_hold_holding", "Requests under a hold now "
                                "(first token not released yet, or strict streaming until "
                                "they finish).", value=tot["holding"])
        cum, acc = [], 0
        for le, n in zip([*map(str, HOLD_BUCKETS_S), "+Inf"], buckets, strict=True):
            acc += n
            cum.append((le, acc))
        yield HistogramMetricFamily("safety_monitor_hold_seconds", "First-token hold time of "
                                    "requests released because the sidecar judged their "
                                    "prompt.", buckets=cum, sum_value=total_s)
        yield CounterMetricFamily("safety_monitor_engine_blocks_applied", "Block verdicts "
                                  "vLLM's EngineCore applied to a running request.",
                                  value=tot["blocks_applied"])
        yield CounterMetricFamily("safety_monitor_engine_blocks_late", "Block verdicts that "
                                  "reached the EngineCore after their request finished.",
                                  value=tot["blocks_late"])


def register_collector() -> EngineCollector:
    """Register `EngineCollector` in prometheus_client's default registry, once per
    process (it is served where vLLM serves `/metrics`: the API server)."""
    global _registered
    from prometheus_client import REGISTRY

    if _registered is None:
        _registered = EngineCollector(ensure_stats_dir())
        REGISTRY.register(_registered)
    return _registered
