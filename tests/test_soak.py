"""Bounded soak (issue 8): steady traffic with broken streams, abandoned requests and
churn for 40 s; after warm-up, live requests and RSS stay flat (the orphan sweep, idle
TTL and stream-close release keep up under load). The long run is
`python -m monitor.tools.soak --seconds N` against any sidecar."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from conftest import MonitorServer

from monitor.tools.soak import SoakConfig, run_soak

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

WARMUP_S = 15.0


def test_soak_live_requests_and_rss_flat(start_server: Callable[..., MonitorServer]) -> None:
    srv = start_server(name="soak", extra=["--policy-watch-s", "0", "--idle-ttl-s", "3",
                                           "--orphan-grace-s", "1", "--max-requests", "5000"])
    samples = run_soak(SoakConfig(target=srv.target, metrics=f"127.0.0.1:{srv.metrics_port}",
                                  pid=srv.proc.pid, seconds=40, clients=3, rate=15),
                       out=None)
    assert srv.alive()
    after = [s for s in samples if s.t_s >= WARMUP_S]
    assert len(after) >= 10, samples
    first, last = after[: len(after) // 2], after[len(after) // 2:]
    live_first = max(s.live_requests for s in first)
    live_last = max(s.live_requests for s in last)
    # bounded by what the clients hold open plus the grace/TTL windows, not growing
    assert live_last <= 1.5 * live_first + 10, (live_first, live_last)
    assert live_last < 200, live_last
    rss = [s.rss_mib for s in after if not math.isnan(s.rss_mib)]
    assert rss and max(rss) - rss[0] < 64, rss
    assert samples[-1].rejected == 0  # the soak's traffic is valid
    finished = srv.metric("safety_monitor_requests_finished_total")
    assert finished > 50  # churn happened: requests were opened and finished throughout
    for reason in ("stream_closed", "orphaned", "stop"):
        assert srv.metric("safety_monitor_requests_finished_total", reason=reason) > 0, reason
