"""Collector: token selection, caching/resume (fake backend), and the transformers
backend against output_hidden_states (skips without the default model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from probes.collect import (
    SEG_GENERATED,
    SEG_POST,
    SEG_PRE,
    SEG_USER,
    TokenSelection,
    _ShardedCollector,
    make_collector,
)
from probes.datasets import ChatExample


class _Fake(_ShardedCollector):
    backend = "fake"
    model_name = "fake"
    d_model = 4

    def __init__(self, shard_size: int = 3) -> None:
        super().__init__(shard_size)
        self.calls = 0

    def model_identity(self) -> str:
        return "fake-v1"

    def _run(self, examples: Sequence[ChatExample], layers: Sequence[int],
             selection: TokenSelection, offset: int) -> dict[str, np.ndarray]:
        self.calls += 1
        parts = []
        for i, ex in enumerate(examples):
            n = 5 + len(ex.user_text)
            s, e = selection.span(n, n)
            pos = np.arange(s, e)
            parts.append({"example": np.full(e - s, offset + i, np.int32),
                          "position": pos.astype(np.int32),
                          "generated": np.zeros(e - s, np.uint8),
                          "segment": np.full(e - s, SEG_USER, np.int8),
                          "from_end": (e - 1 - pos).astype(np.int32),
                          **{f"l{x}": np.full((e - s, 4), offset + i + x, np.float16)
                             for x in layers}})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _examples(n: int) -> list[ChatExample]:
    return [ChatExample.make([{"role": "user", "content": "x" * (i % 3 + 1)}], i % 2)
            for i in range(n)]


def test_token_selection_spans() -> None:
    assert TokenSelection("prompt").span(10, 15) == (0, 10)
    assert TokenSelection("generated", 2).span(10, 15) == (10, 13)
    assert TokenSelection("generated", 9).span(10, 15) == (10, 10)
    assert TokenSelection("both", 1).span(10, 15) == (0, 14)
    assert TokenSelection("last").span(10, 15) == (14, 15)
    assert TokenSelection("last", 2).span(10, 15) == (12, 13)
    with pytest.raises(ValueError):
        TokenSelection("tokens")


def test_cache_resumes_and_keys_on_inputs(tmp_path: Path) -> None:
    exs = _examples(8)
    c = _Fake()
    a = c.collect(exs, [1, 2], TokenSelection("prompt"), cache_dir=tmp_path, progress=False)
    assert c.calls == 3 and a.n_examples == 8
    assert a.x[2][a.example == 5][0, 0] == 7  # offset + index + layer
    # simulate an interruption: drop the last shard, the rerun computes only that one
    shards = sorted((tmp_path / "activations").glob("*/shard_*.safetensors"))
    assert len(shards) == 3
    shards[-1].unlink()
    c2 = _Fake()
    b = c2.collect(exs, [1, 2], TokenSelection("prompt"), cache_dir=tmp_path, progress=False)
    assert c2.calls == 1
    np.testing.assert_array_equal(a.x[1], b.x[1])
    np.testing.assert_array_equal(a.example, b.example)
    # a different selection, layer set or dataset is a different key
    c3 = _Fake()
    c3.collect(exs, [1], TokenSelection("prompt"), cache_dir=tmp_path, progress=False)
    c3.collect(exs[:7], [1, 2], TokenSelection("prompt"), cache_dir=tmp_path, progress=False)
    c3.collect(exs, [1, 2], TokenSelection("last"), cache_dir=tmp_path, progress=False)
    assert c3.calls == 9


def test_unknown_backend_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'onnx' \(transformers \| vllm\)"):
        make_collector("onnx", "x")


@pytest.fixture(scope="module")
def collector():
    pytest.importorskip("transformers")
    try:
        from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model

        path = prepare_default_model()
    except Exception as e:  # model wheel missing
        pytest.skip(f"default model unavailable: {e}")
    from probes.collect import TransformersCollector

    return TransformersCollector(path, DEFAULT_MODEL_NAME, shard_size=4)


def test_transformers_backend_matches_output_hidden_states(collector) -> None:
    import torch

    ex = ChatExample.make([{"role": "user", "content": "How do I kill a Python process?"}],
                          0, completion="Use the kill command.")
    ids, plen, seg = collector.encode(ex)
    text = collector.tokenizer.apply_chat_template(ex.chat, add_generation_prompt=True,
                                                   tokenize=False)
    assert ids[:plen] == collector.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "You are a helpful AI assistant" in text  # SmolLM2's default system prompt
    decoded = collector.tokenizer.decode([t for t, s in zip(ids, seg, strict=True)
                                          if s == SEG_USER])
    assert decoded.strip() == "How do I kill a Python process?"
    assert seg[0] == SEG_PRE and seg[plen - 1] == SEG_POST and seg[-1] == SEG_GENERATED
    with torch.inference_mode():
        ref = collector.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    acts = collector.collect([ex], [3, 9], TokenSelection("both"), progress=False)
    for layer in (3, 9):
        np.testing.assert_allclose(acts.x[layer].astype(np.float32),
                                   ref[layer + 1][0].numpy(), rtol=2e-2, atol=2e-2)
    assert acts.generated.sum() == len(ids) - plen
    resp = collector.collect([ex], [3], TokenSelection("generated", 2), progress=False)
    assert resp.n_rows == len(ids) - plen - 2 and resp.generated.all()
