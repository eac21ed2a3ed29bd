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
from typing import Any, Protocol, cast

import numpy as np

from monitor.constants import CORRELATION_KEY, SCOPES
from probes.datasets import ChatExample, dataset_fingerprint

__all__ = [
    "SEG_GENERATED",
    "SEG_POST",
    "SEG_PRE",
    "SEG_USER",
    "SELECTION_SCOPES",
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


#: Token selections of the collector: the serving scopes plus ``last``.
SELECTION_SCOPES: tuple[str, ...] = (*SCOPES, "last")


@dataclass(frozen=True)
class TokenSelection:
    """Which rows of each example are kept.

    ``scope``: a serving scope (``monitor.constants.SCOPES``: ``prompt``, positions <
    prompt_len; ``generated``; ``both``) or ``last`` (the last token of the sequence).
    ``exclude_tail``: drop the last ``n`` tokens of the selected span (e.g. the end of a
    fact whose last tokens already "know" the statement is complete).
    """

    scope: str = "prompt"
    exclude_tail: int = 0

    def __post_init__(self) -> None:
        if self.scope not in SELECTION_SCOPES:
            raise ValueError(f"scope: expected one of {'|'.join(SELECTION_SCOPES)}, found "
                             f"{self.scope!r}")
        if self.exclude_tail < 0:
            raise ValueError("exclude_tail must be >= 0")

    def span(self, prompt_len: int, total_len: int) -> tuple[int, int]:
        """Half-open row range ``[start, end)`` selected in a sequence."""
        if self.scope == "prompt":
            start, end = 0, prompt_len
        elif self.scope == "generated":
            start, end = prompt_len, total_len
        elif self.scope == "both":
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


class ChatEncoding(Protocol):
    """The served chat template and tokenisation (``_ChatEncoder`` implements it): what
    ``probes.harmful.token_roles`` reads to segment stored rows into token roles."""

    tokenizer: Any

    def encode(self, ex: ChatExample) -> tuple[list[int], int, np.ndarray]: ...


class Collector(ChatEncoding, Protocol):
    """Something that turns chat examples into per-token activations (every backend:
    ``TransformersCollector``, ``VLLMCollector``). ``d_model`` / ``n_layers``: the
    model's residual width and decoder layer count; ``model_identity()``: the cache key
    of the weights."""

    backend: str
    model_name: str
    d_model: int
    n_layers: int

    def model_identity(self) -> str: ...

    def render_prompt(self, ex: ChatExample) -> str: ...

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


def _model_identity(model_name: str, model_path: Path, dtype: str) -> str:
    h = hashlib.sha256(model_name.encode())
    cfg = model_path / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
    h.update(dtype.encode())
    return h.hexdigest()


def _example_rows(index: int, n_ids: int, prompt_len: int, seg: np.ndarray,
                  selection: TokenSelection, layer_rows: dict[int, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """Stored rows of one example; ``layer_rows[layer]``: float ``[>= n_ids, d_model]``
    indexed by position."""
    s, e = selection.span(prompt_len, n_ids)
    pos = np.arange(s, e, dtype=np.int32)
    res: dict[str, np.ndarray] = {f"l{x}": np.asarray(v[s:e]).astype(np.float16)
                                  for x, v in layer_rows.items()}
    res["example"] = np.full(e - s, index, dtype=np.int32)
    res["position"] = pos
    res["generated"] = (pos >= prompt_len).astype(np.uint8)
    res["segment"] = seg[s:e].astype(np.int8)
    res["from_end"] = (e - 1 - pos).astype(np.int32)
    return res


def _concat_rows(results: dict[int, dict[str, np.ndarray]], n: int,
                 layers: Sequence[int]) -> dict[str, np.ndarray]:
    rows: dict[str, list[np.ndarray]] = {k: [] for k in (*_META_KEYS,
                                                         *(f"l{x}" for x in layers))}
    for b in range(n):  # example order
        for k in rows:
            rows[k].append(results[b][k])
    return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32))
            for k, v in rows.items()}


class _ChatEncoder:
    """Chat template + tokenisation shared by the backends (needs ``self.tokenizer``)."""

    tokenizer: Any

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


class TransformersCollector(_ChatEncoder, _ShardedCollector):
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
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, dtype))
        # (transformers' stubs type `PreTrainedModel.to` as an unbound wrapper: call nn.Module's)
        self.model = torch.nn.Module.to(model, device).eval()
        self.d_model = int(self.model.config.hidden_size)
        self.n_layers = int(self.model.config.num_hidden_layers)

    def model_identity(self) -> str:
        return _model_identity(self.model_name, self.model_path, self.dtype)

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
                results[b] = _example_rows(offset + b, len(ids), plen, seg, selection,
                                           {x: hs[x][r] for x in layers})
            i = j
        return _concat_rows(results, len(examples), layers)


_WORKER_CMD = "from probes.collect import _vllm_worker_main; _vllm_worker_main()"


def _vllm_worker_main() -> None:
    """Child process of :class:`VLLMCollector`: one offline vLLM ``LLM`` with the capture
    plugin (enabled by ``SAFETY_MONITOR_ADDR`` in the environment).

    argv: ``model_path engine_kwargs_json reply_fd``. Commands are JSON lines on stdin
    (``{"op": "generate", "requests": [[correlation_id, token_ids], ...]}`` or
    ``{"op": "exit"}``); one JSON line per command is written to ``reply_fd``
    (``{"ready": true}`` once the engine is up, ``{"ok": ..., "n_prompt": [...]}`` /
    ``{"error": "..."}`` per generate). Each request runs its ids as the prompt with
    ``max_tokens=1``, so every position is one prefill row of the capture path.
    """
    import sys
    import traceback

    model, kw, fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    reply = os.fdopen(fd, "w", buffering=1)

    def send(doc: dict[str, Any]) -> None:
        reply.write(json.dumps(doc) + "\n")
        reply.flush()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, **kw)
    send({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") != "generate":
            break
        try:
            reqs = cmd["requests"]
            sps = [SamplingParams(max_tokens=1, temperature=0,
                                  extra_args={CORRELATION_KEY: cid}) for cid, _ in reqs]
            # (vLLM marks TokensPrompt's optional keys with typing.NotRequired, which mypy's
            # python_version 3.10 does not know: it would call them all required)
            prompts = cast("list[TokensPrompt]", [{"prompt_token_ids": ids} for _, ids in reqs])
            outs = llm.generate(prompts, sps, use_tqdm=False)
            send({"ok": True, "n_prompt": [len(o.prompt_token_ids or []) for o in outs],
                  "same": [list(o.prompt_token_ids or []) == ids for o, (_, ids) in
                           zip(outs, reqs, strict=True)]})
        except Exception as e:  # report and keep serving
            send({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"})
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        os._exit(0)


class VLLMCollector(_ChatEncoder, _ShardedCollector):
    """Backend on the production capture path: vLLM + the capture plugin
    (``monitor/capture/``), so training reads the rows the sidecar scores in serving.

    A child process runs vLLM's offline ``LLM`` (``enforce_eager``, no prefix caching so
    every position runs a forward pass) with ``SAFETY_MONITOR_ADDR`` pointing at a
    recording gRPC server in this process (:class:`probes.capture_server.CaptureSink`)
    whose capture plan names the requested layers. Each example is fed as token ids —
    the same ids as the transformers backend (chat template + teacher-forced completion,
    :meth:`encode`) — with ``max_tokens=1`` and ``extra_args={"correlation_id": ...}``;
    its rows are mapped back by correlation id and position. ``generated``/``segment``
    come from :meth:`encode`, exactly as in the transformers backend. Rows the plugin
    dropped (it never blocks inference) are detected and those examples re-run.

    The engine starts on first use and serves every shard; it is reused while the layer
    set is unchanged (a new layer set restarts it). ``close()`` (also on garbage
    collection / exit) stops it. ``engine_kwargs`` override the ``LLM`` arguments.
    """

    backend = "vllm"

    def __init__(self, model_path: str | Path, model_name: str | None = None, *,
                 dtype: str = "float32", max_model_len: int = 4096,
                 max_num_batched_tokens: int = 1024, max_num_seqs: int = 16,
                 kv_cache_memory_bytes: int = 512 * 2**20,
                 engine_kwargs: dict[str, Any] | None = None, shard_size: int = 256,
                 start_timeout_s: float = 900.0, max_attempts: int = 3) -> None:
        super().__init__(shard_size)
        from transformers import AutoTokenizer

        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_path}: not a local HF model folder")
        self.model_name = model_name or str(model_path)
        self.dtype = dtype
        cfg = json.loads((self.model_path / "config.json").read_text())
        self.d_model = int(cfg["hidden_size"])
        self.n_layers = int(cfg["num_hidden_layers"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.engine_kwargs: dict[str, Any] = dict(
            max_model_len=int(max_model_len), max_num_batched_tokens=int(max_num_batched_tokens),
            max_num_seqs=int(max_num_seqs), kv_cache_memory_bytes=int(kv_cache_memory_bytes),
            dtype=dtype, enforce_eager=True, enable_prefix_caching=False, seed=0)
        self.engine_kwargs.update(engine_kwargs or {})
        if self.engine_kwargs.get("enable_prefix_caching"):
            raise ValueError("prefix caching must stay off: cached tokens have no rows")
        self.start_timeout_s = float(start_timeout_s)
        self.max_attempts = int(max_attempts)
        self._proc: Any = None
        self._sink: Any = None
        self._reply: Any = None
        self._layers: tuple[int, ...] = ()
        self._log_path: Path | None = None
        self._n_batches = 0
        self._finalizer: Any = None

    def model_identity(self) -> str:
        return _model_identity(self.model_name, self.model_path, self.dtype)

    # ----------------------------------------------------------------- engine
    def _start(self, layers: tuple[int, ...]) -> None:
        import subprocess
        import sys
        import tempfile
        import weakref

        from monitor.v1 import monitor_pb2
        from probes.capture_server import CaptureSink

        self.close()
        sink = CaptureSink(port=0, model=self.model_name, d_model=self.d_model,
                           layers=layers, kinds=(monitor_pb2.TOKEN_KIND_PROMPT,
                                                 monitor_pb2.TOKEN_KIND_GENERATED),
                           dtype=monitor_pb2.DTYPE_FLOAT32,
                           plan_id=f"probes-collect-{os.getpid()}").start()
        env = dict(os.environ)
        env.update({
            "SAFETY_MONITOR_ADDR": sink.addr, "SAFETY_MONITOR_MODEL": self.model_name,
            "SAFETY_MONITOR_PLAN_TIMEOUT_S": "60", "SAFETY_MONITOR_RING_SLOTS": "16",
            "SAFETY_MONITOR_QUEUE": "1024", "SAFETY_MONITOR_BACKOFF_S": "0.1",
            "SAFETY_MONITOR_BACKOFF_MAX_S": "1", "VLLM_USE_V2_MODEL_RUNNER": "0",
        })
        env.pop("SAFETY_MONITOR_WRAP", None)
        fd, log_path = tempfile.mkstemp(prefix="probes-vllm-", suffix=".log")
        self._log_path = Path(log_path)
        r, w = os.pipe()
        log.info("starting vLLM collector engine (layers %s, log %s)", list(layers),
                 self._log_path)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CMD, str(self.model_path),
                 json.dumps(self.engine_kwargs), str(w)],
                env=env, stdin=subprocess.PIPE, stdout=fd, stderr=subprocess.STDOUT,
                pass_fds=(w,), start_new_session=True, text=True)
        finally:
            os.close(w)
            os.close(fd)
        self._proc, self._sink, self._layers = proc, sink, layers
        self._reply = os.fdopen(r, "r")
        self._finalizer = weakref.finalize(self, _stop_engine, proc, sink, self._reply)
        self._read_reply(self.start_timeout_s, "engine start-up")
        if not sink.wait_for(lambda: bool(sink.log.hellos), 60):
            raise RuntimeError("the capture plugin did not connect to the recording server "
                               f"(is the plugin installed?); vLLM log: {self._log_tail()}")

    def _log_tail(self, n: int = 3000) -> str:
        if self._log_path is None:
            return "(no log)"
        try:
            return self._log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _read_reply(self, timeout: float, what: str) -> dict[str, Any]:
        import select
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self._reply], [], [], 1.0)
            if ready:
                line = self._reply.readline()
                if line:
                    doc = json.loads(line)
                    if "error" in doc:
                        raise RuntimeError(f"vLLM worker failed during {what}: {doc['error']}")
                    return doc
            if self._proc.poll() is not None:
                raise RuntimeError(f"vLLM worker exited ({self._proc.returncode}) during "
                                   f"{what}; log:\n{self._log_tail()}")
        raise TimeoutError(f"vLLM worker: no reply within {timeout:.0f}s during {what}")

    def close(self) -> None:
        """Stop the vLLM child process and the recording server (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._proc = self._sink = self._reply = None
        self._layers = ()

    def __enter__(self) -> VLLMCollector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- collect
    def _generate(self, reqs: list[tuple[str, list[int]]]) -> None:
        self._proc.stdin.write(json.dumps({"op": "generate", "requests": reqs}) + "\n")
        self._proc.stdin.flush()
        n_tokens = sum(len(ids) for _, ids in reqs)
        doc = self._read_reply(600.0 + n_tokens / 10.0, "generate")
        if not all(doc["same"]):
            bad = [cid for (cid, _), ok in zip(reqs, doc["same"], strict=True) if not ok]
            raise RuntimeError(f"vLLM changed the prompt token ids of {bad[:5]}")

    def _run(self, examples: Sequence[ChatExample], layers: Sequence[int],
             selection: TokenSelection, offset: int) -> dict[str, np.ndarray]:
        layers = tuple(sorted(set(int(x) for x in layers)))
        bad = [x for x in layers if not 0 <= x < self.n_layers]
        if bad:
            raise ValueError(f"layers {bad} outside [0, {self.n_layers})")
        enc = [self.encode(ex) for ex in examples]
        limit = int(self.engine_kwargs["max_model_len"]) - 1
        long = [offset + b for b, (ids, _, _) in enumerate(enc) if len(ids) > limit]
        if long:
            raise ValueError(f"examples {long[:5]} exceed max_model_len - 1 = {limit} tokens")
        if self._proc is None or self._layers != layers or self._proc.poll() is not None:
            self._start(layers)
        sink = self._sink
        results: dict[int, dict[str, np.ndarray]] = {}
        pending = [b for b in range(len(enc)) if enc[b][0]]
        for b in range(len(enc)):
            if not enc[b][0]:
                results[b] = _example_rows(offset + b, 0, 0, enc[b][2], selection,
                                           {x: np.zeros((0, self.d_model)) for x in layers})
        attempt = 0
        while pending:
            attempt += 1
            if attempt > self.max_attempts:
                st = sink.log.stats[-1] if sink.log.stats else None
                raise RuntimeError(
                    f"capture rows still missing for examples "
                    f"{[offset + b for b in pending][:10]} after {self.max_attempts} attempts "
                    f"(plugin drops: {st})")
            self._n_batches += 1
            tag = f"probes-{os.getpid()}-{self._n_batches}"
            cids = {b: f"{tag}-{offset + b}" for b in pending}
            sink.reset()
            self._generate([(cids[b], enc[b][0]) for b in pending])
            want = set(cids.values())
            if not sink.wait_for(lambda w=want: w <= set(sink.finished()), 60):
                log.warning("RequestFinished missing for %d requests",
                            len(want - set(sink.finished())))
            by_layer = {x: sink.rows_by_request(x) for x in layers}
            retry = []
            for b in pending:
                ids, plen, seg = enc[b]
                s, e = selection.span(plen, len(ids))
                got = {x: by_layer[x].get(cids[b], {}) for x in layers}
                if any(not all(p in got[x] for p in range(s, e)) for x in layers):
                    retry.append(b)
                    continue
                rows = {}
                for x in layers:
                    m = np.zeros((len(ids), self.d_model), dtype=np.float32)
                    for p in range(s, e):
                        m[p] = got[x][p]
                    rows[x] = m
                results[b] = _example_rows(offset + b, len(ids), plen, seg, selection, rows)
            if retry:
                log.warning("capture rows missing for %d examples (plugin drops); retrying",
                            len(retry))
            pending = retry
            sink.reset()
        return _concat_rows(results, len(examples), layers)


def _stop_engine(proc: Any, sink: Any, reply: Any) -> None:
    import signal
    import subprocess

    try:
        if proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                proc.stdin.flush()
            except OSError:
                pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    except ProcessLookupError:
        pass
    finally:
        for f in (proc.stdin, reply):
            try:
                f.close()
            except Exception:
                pass
        sink.stop()


def make_collector(backend: str, model_path: str | Path, model_name: str | None = None,
                   **kwargs: Any) -> _ShardedCollector:
    """``transformers`` or ``vllm`` (the production capture path, see
    :class:`VLLMCollector`)."""
    if backend == "transformers":
        return TransformersCollector(model_path, model_name, **kwargs)
    if backend == "vllm":
        return VLLMCollector(model_path, model_name, **kwargs)
    raise ValueError(f"unknown backend {backend!r} (transformers | vllm)")
