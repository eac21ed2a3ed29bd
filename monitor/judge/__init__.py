"""Judging: per-request aggregation of token scores against a hot-reloadable policy.

- ``policy``    parse / validate the YAML policy, bundle defaults, offline check
- ``aggregate`` streaming max / mean / EMA / window-max over chunks of token scores
- ``tracker``   per (request, detector) state, severity crossings, final verdicts
- ``reload``    policy file hot reload (poll, SIGHUP, explicit call)

Importing this package needs numpy, scipy and pyyaml only (never torch).
"""

from monitor.judge.aggregate import make_aggregator
from monitor.judge.policy import (
    Aggregation,
    DetectorPolicy,
    Policy,
    PolicyDefaults,
    PolicyError,
    check_policy,
    default_policy,
    load_policy,
    parse_policy,
    run_check,
)
from monitor.judge.reload import PolicyHolder
from monitor.judge.tracker import RequestTracker, VerdictUpdate

__all__ = [
    "Aggregation",
    "DetectorPolicy",
    "Policy",
    "PolicyDefaults",
    "PolicyError",
    "PolicyHolder",
    "RequestTracker",
    "VerdictUpdate",
    "check_policy",
    "default_policy",
    "load_policy",
    "make_aggregator",
    "parse_policy",
    "run_check",
]
