"""Collect per-token residual-stream activations for labelled chat examples.

Train/serve consistency: the monitor sees every token of the chat-templated request, so
activations are collected on exactly that token sequence:

- prompt: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
  tokenize=False)`` tokenised with ``add_special_tokens=False`` (what vLLM's chat
  endpoint does; for SmolLM2 the template inserts its default system prompt when the
  request has none);
- generated tokens: the completion's tokens appended (teacher forcing); the row at
  position ``prompt_len + j`` is generated token ``j``, like a vLLM decode step.

Layer ``i`` is the residual stream after decoder layer ``i``
(``output_hidden_states[i + 1]``; ``hidden + residual`` in vLLM). The transformers
backend reads it with forward hooks on ``model.model.layers[i]`` (identical values to
``output_hidden_states[i + 1]``, see tests) and stops the forward pass after the deepest
requested layer.

Every stored row carries metadata: ``example`` (index into the example list),
``position``, ``generated``, ``segment`` (0 template/system before the user's text,
1 user text, 2 template after the user's text, 3 generated) and ``from_end`` (0 = last
token of the selected span). Rows are cached per shard of examples in
``<cache>/activations/<key>/shard_NNNNN.safetensors``; ``key`` hashes backend, model,
dataset, layers and selection, so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from probes.datasets import ChatExample, dataset_fingerprint

__all__ = [
    "SEG_GENERATED",
    "SEG_POST",
    "SEG_PRE",
    "SEG_USER",
    "Activations",
    "Collector",
    "TokenSelection",
    "TransformersCollector",
    "VLLMCollector",
    "make_collector",
]

log = logging.getLogger("probes.collect")

SEG_PRE, SEG_USER, SEG_POST, SEG_GENERATED = 0, 1, 2, 3
COLLECT_VERSION = 1
_META_KEYS = ("example", "position", "generated", "segment", "from_end")


@dataclass(frozen=True)
class TokenSelection:
    """Which rows of each example are kept.

    ``scope``: ``prompt`` (positions < prompt_len), ``response`` (generated tokens),
    ``all``, or ``last`` (the last token of the sequence). ``exclude_tail``: drop the
    last ``n`` tokens of the selected span (e.g. the end of a fact whose last tokens
    already "know" the statement is complete).
    """

    scope: str = "prompt"
    exclude_tail: int = 0

    def __post_init__(self) -> None:
        if self.scope not in ("prompt", "response", "all", "last"):
            raise ValueError(f"scope must be prompt|response|all|last, got {self.scope!r}")
        if self.exclude_tail < 0:
            raise ValueError("exclude_tail must be >= 0")

    def span(self, prompt_len: int, total_len: int) -> tuple[int, int]:
        """Half-open row range ``[start, end)`` selected in a sequence."""
        if self.scope == "prompt":
            start, end = 0, prompt_len
        elif self.scope == "response":
            start, end = prompt_len, total_len
        elif self.scope == "all":
            start, end = 0, total_len
        else:
            start, end = total_len - 1 - self.exclude_tail, total_len - self.exclude_tail
            return max(start, 0), max(end, 0)
        return start, max(start, end - self.exclude_tail)


@dataclass
class Activations:
    """Rows of several examples. ``x[layer]``: float16 ``[n_rows, d_model]``; metadata
    arrays ``[n_rows]``; ``labels``/``prompt_len``: per example."""

    layers: tuple[int, ...]
    x: dict[int, np.ndarray]
    example: np.ndarray
    position: np.ndarray
    generated: np.ndarray
    segment: np.ndarray
    from_end: np.ndarray
    labels: np.ndarray
    n_examples: int

    @property
    def n_rows(self) -> int:
        return int(self.example.shape[0])

    def subset_rows(self, mask: np.ndarray) -> Activations:
        """Rows where ``mask`` is true (examples keep their indices)."""
        return Activations(self.layers, {k: v[mask] for k, v in self.x.items()},
                           self.example[mask], self.position[mask], self.generated[mask],
                           self.segment[mask], self.from_end[mask], self.labels,
                           self.n_examples)


class Collector(Protocol):
    """Something that turns chat examples into per-token activations."""

    backend: str
    model_name: str

    def collect(self, examples: Sequence[ChatExample], layers: Sequence[int],
                selection: TokenSelection, *, cache_dir: Path | None = None,
                progress: bool = True, desc: str = "collect") -> Activations: ...


def _stack(parts: list[dict[str, np.ndarray]], layers: Sequence[int], d: int,
           labels: np.ndarray) -> Activations:
    def cat(k: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        if not parts:
            return np.zeros((0, *shape), dtype=dtype)
        return np.concatenate([p[k] for p in parts]).astype(dtype, copy=False)

    return Activations(
        tuple(layers),
        {lay: cat(f"l{lay}", np.float16, (d,)) for lay in layers},
        cat("example", np.int32), cat("position", np.int32),
        cat("generated", np.bool_), cat("segment", np.int8), cat("from_end", np.int32),
        labels, len(labels),
    )


class _ShardedCollector:
    """Caching and sharding shared by the backends; subclasses implement ``_run``."""

    backend = "base"
    model_name = ""
    d_model = 0

    def __init__(self, shard_size: int = 256) -> None:
        self.shard_size = int(shard_size)

    def model_identity(self) -> str:
        """A string that changes when the model's weights or config change."""
        raise NotImplementedError

    def _run(self, examples: Sequence[ChatExample], layers: Sequence[int],
             selection: TokenSelection, offset: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def cache_key(self, examples: Sequence[ChatExample], layers: Sequence[int],
                  selection: TokenSelection) -> str:
        """sha256 of backend + model + dataset + layers + selection + shard size."""
        doc = {"v": COLLECT_VERSION, "backend": self.backend, "model": self.model_identity(),
               "data": dataset_fingerprint(examples), "layers": sorted(layers),
               "selection": asdict(selection), "shard": self.shard_size}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]

    def collect(self, examples: Sequence[ChatExample], layers: Sequence[int],
                selection: TokenSelection, *, cache_dir: Path | None = None,
                progress: bool = True, desc: str = "collect") -> Activations:
        """Activations of ``examples`` at ``layers`` for the rows ``selection`` keeps.

        With ``cache_dir``, each shard of ``shard_size`` examples is written to
        ``cache_dir/activations/<key>/shard_NNNNN.safetensors`` when done and read back
        on the next call (finished shards are skipped: resumable).
        """
        from safetensors.numpy import load_file, save_file
        from tqdm.auto import tqdm

        layers = sorted(set(int(x) for x in layers))
        labels = np.array([ex.label for ex in examples], dtype=np.int8)
        folder = None
        if cache_dir is not None:
            folder = Path(cache_dir) / "activations" / self.cache_key(examples, layers,
                                                                      selection)
            folder.mkdir(parents=True, exist_ok=True)
        starts = range(0, len(examples), self.shard_size)
        parts: list[dict[str, np.ndarray]] = []
        bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress,
                   leave=False)
        for k, s in enumerate(starts):
            chunk = examples[s:s + self.shard_size]
            path = folder / f"shard_{k:05d}.safetensors" if folder else None
            if path is not None and path.is_file():
                part = load_file(str(path))
            else:
                part = self._run(chunk, layers, selection, offset=s)
                if path is not None:
                    tmp = path.with_suffix(".tmp")
                    save_file(part, str(tmp))
                    os.replace(tmp, path)
            parts.append(part)
            bar.update(len(chunk))
        bar.close()
        return _stack(parts, layers, self.d_model, labels)


class TransformersCollector(_ShardedCollector):
    """Backend on Hugging Face transformers (CPU or CUDA), float32 by default.

    ``model_path``: a local HF folder (offline). ``max_batch_tokens`` bounds padded
    tokens per forward pass.
    """

    backend = "transformers"

    def __init__(self, model_path: str | Path, model_name: str | None = None, *,
                 dtype: str = "float32", device: str = "cpu", max_batch_tokens: int = 4096,
                 shard_size: int = 256) -> None:
        super().__init__(shard_size)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = Path(model_path)
        self.model_name = model_name or str(model_path)
        self.dtype = dtype
        self.device = device
        self.max_batch_tokens = int(max_batch_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=getattr(torch, dtype)).to(device).eval()
        self.d_model = int(self.model.config.hidden_size)
        self.n_layers = int(self.model.config.num_hidden_layers)

    def model_identity(self) -> str:
        h = hashlib.sha256(self.model_name.encode())
        cfg = self.model_path / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        for f in sorted(self.model_path.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
        h.update(self.dtype.encode())
        return h.hexdigest()

    # ----------------------------------------------------------------- tokenisation
    def render_prompt(self, ex: ChatExample) -> str:
        """The prompt text vLLM's chat endpoint builds for this request."""
        return self.tokenizer.apply_chat_template(ex.chat, add_generation_prompt=True,
                                                  tokenize=False)

    def encode(self, ex: ChatExample) -> tuple[list[int], int, np.ndarray]:
        """Token ids (prompt + completion), prompt length and per-token segment."""
        text = self.render_prompt(ex)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        seg = np.full(len(ids), SEG_PRE, dtype=np.int8)
        user = ex.user_text
        lo = text.rfind(user) if user else -1
        if lo >= 0:
            hi = lo + len(user)
            for t, (a, b) in enumerate(enc["offset_mapping"]):
                if a >= hi:
                    seg[t] = SEG_POST
                elif b > lo and a < hi:
                    seg[t] = SEG_USER
        prompt_len = len(ids)
        if ex.completion:
            comp = self.tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
            ids += list(comp)
            seg = np.concatenate([seg, np.full(len(comp), SEG_GENERATED, dtype=np.int8)])
        return ids, prompt_len, seg

    # ----------------------------------------------------------------- forward
    def hidden_states(self, batch_ids: list[list[int]], layers: Sequence[int]
                      ) -> dict[int, np.ndarray]:
        """Residual stream after each decoder layer in ``layers`` for a right-padded
        batch: ``{layer: float32 [batch, max_len, d_model]}``."""
        import torch

        n = max(len(x) for x in batch_ids)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch_ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), n), dtype=torch.long)
        for i, x in enumerate(batch_ids):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        out: dict[int, np.ndarray] = {}
        last = max(layers)

        class _Stop(Exception):
            pass

        def hook(layer: int):
            def fn(_mod: Any, _inp: Any, output: Any) -> None:
                h = output[0] if isinstance(output, tuple) else output
                out[layer] = h.detach().float().cpu().numpy()
                if layer == last:
                    raise _Stop
            return fn

        handles = [self.model.model.layers[i].register_forward_hook(hook(i)) for i in layers]
        try:
            with torch.inference_mode():
                self.model.model(input_ids=ids.to(self.device),
                                 attention_mask=mask.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    def _run(self, examples: Sequence[ChatExample], layers: Sequence[int],
             selection: TokenSelection, offset: int) -> dict[str, np.ndarray]:
        bad = [x for x in layers if not 0 <= x < self.n_layers]
        if bad:
            raise ValueError(f"layers {bad} outside [0, {self.n_layers})")
        enc = [self.encode(ex) for ex in examples]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
        rows: dict[str, list[np.ndarray]] = {k: [] for k in (*_META_KEYS,
                                                             *(f"l{x}" for x in layers))}
        results: dict[int, dict[str, np.ndarray]] = {}
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and len(enc[order[j]][0]) * (j + 1 - i) <= self.max_batch_tokens:
                j += 1
            batch = order[i:j]
            hs = self.hidden_states([enc[b][0] for b in batch], layers)
            for r, b in enumerate(batch):
                ids, plen, seg = enc[b]
                s, e = selection.span(plen, len(ids))
                pos = np.arange(s, e, dtype=np.int32)
                res = {f"l{x}": hs[x][r, s:e].astype(np.float16) for x in layers}
                res["example"] = np.full(e - s, offset + b, dtype=np.int32)
                res["position"] = pos
                res["generated"] = (pos >= plen).astype(np.uint8)
                res["segment"] = seg[s:e].astype(np.int8)
                res["from_end"] = (e - 1 - pos).astype(np.int32)
                results[b] = res
            i = j
        for b in range(len(examples)):  # restore example order
            for k in rows:
                rows[k].append(results[b][k])
        return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32))
                for k, v in rows.items()}


class VLLMCollector(_ShardedCollector):
    """Backend on the production capture path (``monitor/capture/``, vLLM plugin).

    Not wired yet: the capture plugin is being written in parallel. The lead wires this
    to the plugin so training reads the very bytes the sidecar scores.
    """

    backend = "vllm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "the vllm collector backend is not wired yet: it needs the vLLM capture plugin "
            "(monitor/capture/, issue 'vLLM capture plugin') to hand captured rows to "
            "probes.collect. Use --backend transformers (identical chat template, "
            "tokenisation and layer convention) until then."
        )


def make_collector(backend: str, model_path: str | Path, model_name: str | None = None,
                   **kwargs: Any) -> _ShardedCollector:
    """``transformers`` or ``vllm`` (stub)."""
    if backend == "transformers":
        return TransformersCollector(model_path, model_name, **kwargs)
    if backend == "vllm":
        return VLLMCollector(model_path, model_name, **kwargs)
    raise ValueError(f"unknown backend {backend!r} (transformers | vllm)")
