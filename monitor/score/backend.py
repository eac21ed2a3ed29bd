"""Choose and build the sidecar's scorer: ``--backend torch | onnxruntime | auto``.

* ``torch``: :class:`~monitor.score.scorer.Scorer` (fp32 or bf16 GEMM).
* ``onnxruntime``: :class:`~monitor.score.onnx_scorer.OnnxScorer` on the bundle's ONNX
  graphs; the bundle is loaded without tensor values and torch is never imported.
* ``auto``: onnxruntime when torch is not installed, torch when onnxruntime is not
  installed, the bundle has no graphs or ``compute_dtype`` is bf16 (a torch-only GEMM);
  otherwise both are built and timed on this CPU (every layer, 16 and 512 random rows,
  best of 5 after a warm-up), and the faster one is kept, provided both agree on those
  rows to 1e-4. The reason, with the numbers, is returned and logged.

Importing this module does not import torch (nor onnxruntime).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .available import installed
from .bundle import Bundle, load_bundle

__all__ = ["BACKENDS", "FrameScorer", "LoadedScorer", "load_scorer"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "auto")
COMPUTE_DTYPES = ("fp32", "bf16")
_BENCH_ROWS = (16, 512)
_BENCH_REPS = 5
_AGREE_ATOL = 1e-4


class FrameScorer(Protocol):
    """What the server needs of a scorer (Scorer and OnnxScorer both provide it).

    ``score`` is called from the scoring thread and the unary-RPC executor thread at
    the same time: implementations are immutable after construction.
    """

    layers: tuple[int, ...]  # layers of ``hooks``, ascending
    hooks: tuple[str, ...]  # hook points with a detector, forward order (monitor.wire.hooks)
    d_model: int

    def detectors_on(self, point: int | str) -> tuple[str, ...]:
        """Detector names of hook point ``point`` (a name, or a bare layer ``L`` =
        ``blocks.L.hook_resid_post``) in the column order of ``score``."""
        ...

    def score(self, point: int | str, x: np.ndarray) -> np.ndarray:
        """float32 ``[n_rows, n_detectors]`` in [0, 1] for ``x [n_rows, d_model]``."""
        ...

    def score_and_columns(self, point: int | str, x: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """``score`` and the packed column values ``[n_rows, n_cols]`` (float32) of the
        same rows (``monitor.score.pack`` column order)."""
        ...


@dataclass(frozen=True, eq=False)
class LoadedScorer:
    """The loaded bundle, its scorer, the backend that was picked and why."""

    bundle: Bundle
    scorer: FrameScorer
    backend: str  # "torch" or "onnxruntime"
    reason: str


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _torch_scorer(bundle: Bundle, compute_dtype: str, threads: int) -> FrameScorer:
    import torch

    from .scorer import Scorer

    if threads > 0:
        torch.set_num_threads(threads)  # process-wide: the sidecar's only torch user
    dtype = torch.float32 if compute_dtype == "fp32" else torch.bfloat16
    return Scorer(bundle, dtype)


def _onnx_scorer(bundle: Bundle, threads: int) -> FrameScorer:
    from .onnx_scorer import OnnxScorer

    return OnnxScorer(bundle, threads)


def _best_time(scorer: FrameScorer, xs: dict[int, list[np.ndarray]]) -> float:
    """Seconds: Σ over layers and row counts of the best of ``_BENCH_REPS`` calls."""
    total = 0.0
    for layer, arrays in xs.items():
        for x in arrays:
            scorer.score(layer, x)  # warm-up (allocator, oneDNN / ORT kernel choice)
            best = float("inf")
            for _ in range(_BENCH_REPS):
                t0 = time.perf_counter()
                scorer.score(layer, x)
                best = min(best, time.perf_counter() - t0)
            total += best
    return total


def _auto(path: str | os.PathLike[str], compute_dtype: str, threads: int,
          onnx_threads: int) -> LoadedScorer:
    has_torch, has_ort = installed("torch"), installed("onnxruntime")
    if not has_torch and compute_dtype != "fp32":
        raise ValueError(f"compute_dtype: expected fp32 without torch (onnxruntime graphs "
                         f"are float32), found {compute_dtype!r}")
    if compute_dtype != "fp32":
        bundle = load_bundle(path)
        return LoadedScorer(bundle, _torch_scorer(bundle, compute_dtype, threads), "torch",
                            f"auto: compute dtype {compute_dtype} is torch-only")
    if not has_torch:
        bundle = load_bundle(path, load_tensors=False)
        return LoadedScorer(bundle, _onnx_scorer(bundle, onnx_threads), "onnxruntime",
                            "auto: torch is not installed")
    bundle = load_bundle(path)
    if not has_ort or bundle.onnx is None:
        why = "onnxruntime is not installed" if not has_ort else \
            "the bundle has no ONNX graphs (safety-monitor export-onnx)"
        return LoadedScorer(bundle, _torch_scorer(bundle, compute_dtype, threads), "torch",
                            f"auto: {why}")
    ts = _torch_scorer(bundle, compute_dtype, threads)
    os_ = _onnx_scorer(bundle, onnx_threads)
    rng = np.random.default_rng(0)
    xs = {layer: [rng.standard_normal((n, bundle.d_model), dtype=np.float32)
                  for n in _BENCH_ROWS] for layer in bundle.layers}
    diff = max(float(np.max(np.abs(ts.score(layer, x) - os_.score(layer, x))))
               for layer, arrays in xs.items() for x in arrays)
    t_torch, t_ort = _best_time(ts, xs), _best_time(os_, xs)
    numbers = (f"onnxruntime {t_ort * 1e3:.3f} ms vs torch {t_torch * 1e3:.3f} ms (layers "
               f"{list(bundle.layers)} x rows {list(_BENCH_ROWS)}, best of {_BENCH_REPS}, "
               f"{_cpu_name()}, {os.cpu_count()} CPUs)")
    if diff > _AGREE_ATOL:
        return LoadedScorer(bundle, ts, "torch", f"auto: backends disagree by {diff:.2e} "
                            f"(> {_AGREE_ATOL}): keeping torch; {numbers}")
    if t_ort < t_torch:
        return LoadedScorer(bundle, os_, "onnxruntime", f"auto: faster here: {numbers}")
    return LoadedScorer(bundle, ts, "torch", f"auto: faster here: {numbers}")


def load_scorer(path: str | os.PathLike[str], backend: str = "torch", *,
                compute_dtype: str = "fp32", threads: int = 0,
                onnx_threads: int = 0) -> LoadedScorer:
    """Load the bundle at ``path`` and build the scorer of ``backend`` (see module doc).

    ``threads``: torch intra-op threads (0: torch's default); ``onnx_threads``:
    onnxruntime intra-op threads per session (0: its default).

    Raises:
        ValueError: an unknown backend / compute dtype, or bf16 with onnxruntime.
        BundleError: the bundle (or, for onnxruntime, its graphs) was refused.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, found {backend!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected one of {list(COMPUTE_DTYPES)}, "
                         f"found {compute_dtype!r}")
    if backend == "auto":
        return _auto(path, compute_dtype, threads, onnx_threads)
    if backend == "onnxruntime":
        if compute_dtype != "fp32":
            raise ValueError(f"compute_dtype: expected fp32 with the onnxruntime backend "
                             f"(its graphs are float32), found {compute_dtype!r}")
        bundle = load_bundle(path, load_tensors=False)
        return LoadedScorer(bundle, _onnx_scorer(bundle, onnx_threads), "onnxruntime",
                            "selected")
    bundle = load_bundle(path)
    return LoadedScorer(bundle, _torch_scorer(bundle, compute_dtype, threads), "torch",
                        "selected")
