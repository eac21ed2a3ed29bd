"""monitor.tools.launch: the one launch line of vLLM's OpenAI server and the sidecar.

The launches themselves run in tests/test_enforce.py, tests/test_vllm_capture.py,
tests/test_gate.py and the demo; here the command lines and environments built from each
config field, a start with `/metrics` off (ready on gRPC health) and a failed start (real
sidecar process on a missing bundle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor.tools.launch import (
    VLLM_SERVER_MODULE,
    SidecarServer,
    VllmServer,
    log_tail,
    placement_prefix,
    start_sidecar,
    stop,
    wait_grpc_serving,
    wait_http,
)
from monitor.tools.net import free_port


def test_vllm_argv_and_env_follow_the_config(tmp_path: Path) -> None:
    base = VllmServer(model=tmp_path / "m", port=1234, log=tmp_path / "v.log",
                      env={"KEEP": "1", "SAFETY_MONITOR_ADDR": "old:1"})
    argv = base.argv()
    assert argv[:3] == [sys.executable, "-m", VLLM_SERVER_MODULE]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "m")
    assert argv[argv.index("--port") + 1] == "1234"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--enforce-eager" in argv and "--middleware" not in argv
    env = base.environ()
    assert env["KEEP"] == "1" and env["SAFETY_MONITOR_ADDR"] == "old:1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert base.base_url == "http://127.0.0.1:1234"

    cfg = VllmServer(model=tmp_path / "m", port=1234, log=tmp_path / "v.log", compiled=True,
                     nice=5, middleware=("a.B", "c.D"), extra_args=("--max-num-seqs", "8"),
                     sidecar_addr="127.0.0.1:9", kv_cache_space_gib=None, monitor_model=None,
                     env={"SAFETY_MONITOR_MODEL": "x"}, extra_env={"SAFETY_MONITOR_ADDR": "e:2"})
    argv = cfg.argv()
    assert argv[:3] == ["nice", "-n", "5"] and "--enforce-eager" not in argv
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--middleware"] == ["a.B", "c.D"]
    assert argv[-2:] == ["--max-num-seqs", "8"]
    env = cfg.environ()
    assert env["SAFETY_MONITOR_ADDR"] == "e:2"  # extra_env applies last
    assert env["SAFETY_MONITOR_MODEL"] == "x" and "VLLM_CPU_KVCACHE_SPACE" not in env


def test_sidecar_argv(tmp_path: Path) -> None:
    cfg = SidecarServer(bundle=tmp_path / "b", port=1, metrics_port=2, log=tmp_path / "s.log")
    assert cfg.argv()[1:] == ["-m", "monitor.cli", "serve", "--bundle", str(tmp_path / "b"),
                              "--port", "1", "--metrics-port", "2"]
    full = SidecarServer(bundle=tmp_path / "b", port=1, metrics_port=2, log=tmp_path / "s.log",
                         policy=tmp_path / "p.yaml", audit_log=tmp_path / "a.jsonl",
                         audit_finals=True, extra_args=("--x",)).argv()
    assert SidecarServer(bundle=tmp_path / "b", port=1, metrics_port=2, log=tmp_path / "s.log",
                         python="/other/python").argv()[0] == "/other/python"
    assert full[-6:] == ["--policy", str(tmp_path / "p.yaml"), "--audit-log",
                         str(tmp_path / "a.jsonl"), "--audit-finals", "--x"]
    quiet = SidecarServer(bundle=tmp_path / "b", port=1, metrics_port=-1, log=tmp_path / "s.log",
                          log_level="warning").argv()
    assert quiet[1:6] == ["-m", "monitor.cli", "--log-level", "warning", "serve"]  # global flag


def test_sidecar_without_metrics_is_ready_when_grpc_serves(tmp_path: Path,
                                                            bundle_dir: Path) -> None:
    """`--metrics-port -1` (the ingest / projection benches): readiness is gRPC health, so
    the start returns with the data port already answering; ``cwd`` is the child's."""
    cfg = SidecarServer(bundle=bundle_dir, port=free_port(), metrics_port=-1,
                        log=tmp_path / "s.log", log_level="warning", cwd=tmp_path,
                        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    proc = start_sidecar(cfg)
    try:
        assert Path(f"/proc/{proc.pid}/cwd").resolve() == tmp_path.resolve()
        with grpc.insecure_channel(cfg.target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop(proc, "the sidecar")
    assert proc.returncode == 0, log_tail(cfg.log)


def test_placement_prefix_order(tmp_path: Path) -> None:
    assert placement_prefix(0, None) == []
    assert placement_prefix(10, "1,3") == ["taskset", "-c", "1,3", "nice", "-n", "10"]
    cfg = SidecarServer(bundle=tmp_path / "b", port=1, metrics_port=2, log=tmp_path / "s.log",
                        nice=7, cpus="0")
    assert cfg.argv()[:6] == ["taskset", "-c", "0", "nice", "-n", "7"]
    assert cfg.argv()[7:9] == ["-m", "monitor.cli"]


def test_placed_sidecar_runs_on_its_cpus_at_its_niceness(tmp_path: Path,
                                                          bundle_dir: Path) -> None:
    """`cpus` / `nice` reach the real server process: the pid Popen returns is the Python
    server itself (taskset and nice exec it), with that CPU mask and niceness."""
    cpu = min(os.sched_getaffinity(0))
    cfg = SidecarServer(bundle=bundle_dir, port=free_port(), metrics_port=-1,
                        log=tmp_path / "s.log", log_level="warning", nice=5, cpus=str(cpu),
                        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    proc = start_sidecar(cfg)
    try:
        assert "monitor.cli" in Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert os.sched_getaffinity(proc.pid) == {cpu}
        own_nice = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(19, own_nice + 5)
    finally:
        stop(proc, "the sidecar")
    assert proc.returncode == 0, log_tail(cfg.log)


def test_failed_start_names_the_process_and_quotes_its_log(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_text("EARLIER RUN\n")
    cfg = SidecarServer(bundle=tmp_path / "no-such-bundle", port=free_port(),
                        metrics_port=free_port(), log=log, append_log=True,
                        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    with pytest.raises(RuntimeError) as e:
        start_sidecar(cfg)
    msg = str(e.value)
    assert "the sidecar exited with code" in msg and str(log) in msg
    assert "EARLIER RUN" in msg and "no-such-bundle" in msg  # appended, then quoted


def test_readiness_waits_name_a_timeout_and_an_early_exit(tmp_path: Path) -> None:
    """Both waits stop at their deadline while the process lives, and at once when it exits."""
    alive = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(RuntimeError, match=r"^vLLM did not answer http://127\.0\.0\.1:\d+/"
                                               r"health within 1 s$"):
            wait_http(f"http://127.0.0.1:{free_port()}/health", 1, alive, "vLLM")
        with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as ch, pytest.raises(
                RuntimeError, match=r"^the sidecar did not report gRPC health SERVING within 1 s$"):
            wait_grpc_serving(ch, 1, alive, "the sidecar")
    finally:
        alive.kill()
        alive.wait()
    gone = subprocess.Popen(["sh", "-c", "exit 3"])
    gone.wait()
    with pytest.raises(RuntimeError, match=r"^vLLM exited with code 3 during start-up$"):
        wait_http(f"http://127.0.0.1:{free_port()}/health", 600, gone, "vLLM")
