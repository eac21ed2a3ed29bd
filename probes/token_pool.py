"""Request-level detectors whose pooling over the in-scope token rows is learned end to end
(issue 14; McKenzie et al. 2025, "Detecting high-stakes interactions with activation
probes"): the softmax probe and the attention probe, and the same trainer with plain mean
pooling as the control. Compared with the linear fitters of :mod:`probes.pooled` by the
variant study (``probes.study`` group "8 token pooling").

Math (one request, in-scope rows ``x_t``, ``t = 1..T``, standardised with the training
POOLED features' ``μ, σ`` and projected off the style directions ``V``:
``x̃_t = (x_t − μ)/σ − (((x_t − μ)/σ) Vᵀ) V``, float32 ``[T, d_model]``):

- token logit ``z_t = w·x̃_t + b``;
- pooling weights ``a = softmax(q)`` over the request's rows, request logit
  ``L = Σ_t a_t z_t``, with
  ``mean``: ``q_t = 0`` (``L = w·mean_t(x̃_t) + b``, the linear probe on the pooled mean:
  the control), ``softmax``: ``q_t = β z_t`` (``β = 1/τ``; ``β = 0`` is the mean,
  ``β → ∞`` the max; ``β`` fixed or learned), ``attention``: ``q_t = v·x̃_t`` (a second
  vector).

Training (torch, CPU, float32, full batch, L-BFGS with strong-Wolfe line search; nothing
random, so a fit is a deterministic function of its rows on a given machine and thread
count): the objective is sklearn's ``LogisticRegression(C, class_weight="balanced")``
with the linear fitters' per-source weights (:func:`probes.pooled.source_weights`),
divided by ``C·Σs`` so its scale does not depend on ``n``:
``J = Σ_i s_i ℓ(L_i, y_i) / Σ s + (‖w‖² + ‖v‖²) / (2 C Σ s)`` (``b`` and ``β`` not
penalised; ``s_i`` the source weight times sklearn's ``balanced`` class weight, which
counts a class by its weight sum: the identity on source weights). Stage 1 fits ``mean`` from zero
(convex: the LR-on-means optimum, up to the solver's tolerance); stage 2 starts the
``softmax`` / ``attention`` probe AT that optimum (``β = 0`` or ``v = 0`` is the mean
exactly) and runs :data:`STAGE2_ITERS` L-BFGS iterations: a fixed budget, chosen before
any validation run; nothing is chosen on held-out rows. Every in-scope row of every
training example is used (no subsampling: the training sources hold ~140k rows of
``d_model = 576``, a full-batch pass is ~0.1 GFLOP).

Threads: none of its own; torch's intra-op pool (``torch.get_num_threads()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from probes.pooled import (
    Fitter,
    Parts,
    Scorer,
    SourceData,
    kind_weights,
    source_weights,
    style_directions,
)
from probes.train import LinearProbe, standardise

if TYPE_CHECKING:
    import torch

__all__ = ["POOLINGS", "STAGE1_ITERS", "STAGE2_ITERS", "Pooling", "TokenPoolProbe",
           "fit_token_pool", "pool_logits", "pool_logits_torch", "token_pool"]

Pooling = Literal["mean", "softmax", "attention"]
POOLINGS: tuple[Pooling, ...] = ("mean", "softmax", "attention")
STAGE1_ITERS = 500
"""L-BFGS iterations of the convex mean-pooling fit (sklearn's lbfgs ``max_iter`` of the
linear fitters)."""
STAGE2_ITERS = 100
"""L-BFGS iterations of the learned pooling, started at the stage-1 optimum."""


def pool_logits(z: np.ndarray, q: np.ndarray, example: np.ndarray, n_examples: int
                ) -> np.ndarray:
    """Per-example ``L_e = Σ_{t∈e} softmax(q)_t z_t`` (the numpy reference of the trainer's
    pooling; float64 ``[n_examples]``, NaN for an example without rows).

    ``z``, ``q``: float ``[n_rows]``; ``example``: int ``[n_rows]`` in ``[0, n_examples)``
    (any order). Stable: ``exp(q_t − max_{s∈e} q_s)``, so ``A ≥ 1`` for every example with
    rows; what the online form (running max ``m``, ``A = Σ e^{q−m}``, ``B = Σ e^{q−m} z``,
    ``L = B/A``) computes in one pass."""
    z = np.asarray(z, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    ex = np.asarray(example, dtype=np.int64)
    if not (z.shape == q.shape == ex.shape) or z.ndim != 1:
        raise ValueError(f"pool_logits: expected z, q, example of one shape [n_rows]; found "
                         f"{z.shape}, {q.shape}, {ex.shape}")
    if ex.size and (ex.min() < 0 or ex.max() >= n_examples):
        raise ValueError(f"pool_logits: example ids must lie in [0, {n_examples}); found "
                         f"[{ex.min()}, {ex.max()}]")
    m = np.full(n_examples, -np.inf)
    np.maximum.at(m, ex, q)
    e = np.exp(q - m[ex])
    a = np.bincount(ex, e, minlength=n_examples)
    b = np.bincount(ex, e * z, minlength=n_examples)
    with np.errstate(invalid="ignore", divide="ignore"):
        return b / a


def pool_logits_torch(z: torch.Tensor, q: torch.Tensor, example: torch.Tensor,
                      n_examples: int) -> torch.Tensor:
    """:func:`pool_logits` in torch, differentiable in ``z`` and ``q`` (float
    ``[n_rows]`` each, one dtype; ``example`` int64 ``[n_rows]``, every example with ≥ 1
    row): ``[n_examples]`` in that dtype. The per-example max is a constant shift of ``q`` (it
    cancels in the softmax), so it is taken on ``q.detach()``."""
    import torch

    m = torch.full((n_examples,), -torch.inf, dtype=q.dtype).scatter_reduce(
        0, example, q.detach(), "amax")
    e = torch.exp(q - m[example])
    a = torch.zeros(n_examples, dtype=z.dtype).index_add_(0, example, e)
    b = torch.zeros(n_examples, dtype=z.dtype).index_add_(0, example, e * z)
    return b / a


@dataclass(frozen=True)
class TokenPoolProbe:
    """A fitted token-pooling probe on one layer's raw rows (the standardisation and the
    style projection folded in: ``z_t = ((x_t − μ)/σ)·w + b`` with ``w ⟂ V``)."""

    layer: int
    mean: np.ndarray
    """``μ``: float32 ``[d_model]``, mean of the training examples' pooled features."""
    std: np.ndarray
    """``σ``: float32 ``[d_model]``, their standard deviation (floored)."""
    w: np.ndarray
    """Token-logit weight on standardised rows: float64 ``[d_model]``."""
    b: float
    pooling: Pooling
    beta: float
    """``softmax``: ``β = 1/τ`` (0 for ``mean`` and ``attention``)."""
    v: np.ndarray | None
    """``attention``: the query weight on standardised rows, float64 ``[d_model]``."""

    def score_rows(self, rows: np.ndarray, example: np.ndarray, n_examples: int
                   ) -> np.ndarray:
        """Request logits (float64 ``[n_examples]``) of raw rows (float ``[n_rows, d]``)
        owned by ``example``; an example without rows scores as an all-zero pooled
        feature, ``((0 − μ)/σ)·w + b`` (what :func:`probes.pooled.pooled_features` and the
        linear fitters give it)."""
        xs = (np.asarray(rows, dtype=np.float32) - self.mean) / self.std
        z = xs.astype(np.float64) @ self.w + self.b
        if self.pooling == "mean":
            q = np.zeros_like(z)
        elif self.pooling == "softmax":
            q = self.beta * z
        else:
            assert self.v is not None
            q = xs.astype(np.float64) @ self.v
        out = pool_logits(z, q, example, n_examples)
        empty = np.bincount(example, minlength=n_examples) == 0
        out[empty] = float((-self.mean / self.std).astype(np.float64) @ self.w) + self.b
        return out

    def scores(self, d: SourceData) -> np.ndarray:
        """Every example of ``d`` (its in-scope rows of :attr:`layer`)."""
        return self.score_rows(d.rows(self.layer), d.acts.example[d.mask], d.acts.n_examples)

    def linear_probe(self, C: float | None = None) -> LinearProbe:
        """The token logit ``z_t = ((x_t − μ)/σ)·w + b`` as the one-column
        :class:`probes.train.LinearProbe` a bundle serves (weight float32 ``[d_model]``,
        ``method`` = the pooling): the style projection is already folded into ``w``
        (``w ⟂ V``), so no other tensor is needed. The pooling itself is the served
        aggregation's (``mean``: ``mean_logit``; ``softmax``: ``softmax_logit`` with
        ``temperature = 1/β``). ``attention`` needs a second column: refused."""
        if self.pooling == "attention":
            raise ValueError("linear_probe: expected pooling mean or softmax (one column); "
                             "found attention (its query v is a second column)")
        return LinearProbe(self.layer, self.w.astype(np.float32), float(self.b),
                           self.mean, self.std, self.pooling, C)


def _token_rows(parts: Parts, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The in-scope rows of the given examples: raw rows float32 ``[n_rows, d]``, owning
    example int64 ``[n_rows]`` numbered over ``parts`` in order (``0..Σ len(idx) − 1``),
    and rows per example int64 ``[Σ len(idx)]``."""
    xs, owners, counts = [], [], []
    off = 0
    for d, idx in parts:
        ex = d.acts.example[d.mask]
        pos = np.full(d.acts.n_examples, -1, dtype=np.int64)
        pos[idx] = np.arange(idx.size)
        keep = pos[ex] >= 0
        xs.append(d.rows(layer)[keep])
        owners.append(pos[ex[keep]] + off)
        counts.append(np.bincount(pos[ex[keep]], minlength=idx.size))
        off += idx.size
    return np.concatenate(xs), np.concatenate(owners), np.concatenate(counts).astype(np.int64)


def fit_token_pool(parts: Parts, layer: int, C: float, pooling: Pooling,
                   beta: float | None = None, kind_weight: dict[str, float] | None = None,
                   style: str = "", stage2_iters: int = STAGE2_ITERS) -> TokenPoolProbe:
    """Fit a :class:`TokenPoolProbe` on the in-scope rows of the given examples (module
    doc: objective, stages). ``beta`` (``softmax`` only): fixed ``β = 1/τ``; None: learned
    (started at 0, the mean). ``style``: :func:`probes.pooled.style_directions` of
    ``parts`` projected off every row (as :func:`probes.pooled.fit_pooled`)."""
    import torch

    if pooling not in POOLINGS:
        raise ValueError(f"fit_token_pool pooling: expected one of {POOLINGS}; found "
                         f"{pooling!r}")
    if beta is not None and pooling != "softmax":
        raise ValueError(f"fit_token_pool beta: only the softmax pooling has one; found "
                         f"beta={beta} with pooling={pooling!r}")
    kw = kind_weights(1.0) if kind_weight is None else kind_weight
    y = np.concatenate([d.labels[i] for d, i in parts]).astype(np.float64)
    feats = np.concatenate([d.features(layer)[i] for d, i in parts])
    _, mu, sd = standardise(feats)
    vt = (style_directions(parts, layer, mu.astype(np.float64), sd.astype(np.float64), style)
          if style else np.zeros((0, mu.size)))
    x, owner, counts = _token_rows(parts, layer)
    xs = (x - mu) / sd
    if vt.shape[0]:
        xs = (xs - (xs @ vt.T.astype(np.float32)) @ vt.astype(np.float32)).astype(np.float32)
    # sklearn's class_weight="balanced" on the source weights (since sklearn 1.6 it counts
    # each class by its weight sum: Σs / (2 Σ_{class} s); source_weights already balances
    # the classes, so this is the identity unless a class is empty)
    s = source_weights(parts, kw)
    tot1, tot0 = float(s[y == 1].sum()), float(s[y == 0].sum())
    s = s * np.where(y == 1, (tot0 + tot1) / (2 * max(tot1, 1e-12)),
                     (tot0 + tot1) / (2 * max(tot0, 1e-12)))
    has = counts > 0
    remap = np.cumsum(has) - 1
    lam = 1.0 / (C * float(s[has].sum()))
    s_t = torch.from_numpy((s[has] / s[has].sum()).astype(np.float32))
    y_t = torch.from_numpy(y[has].astype(np.float32))
    x_t = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))
    own_t = torch.from_numpy(remap[owner])
    n_ex = int(has.sum())
    d_model = x_t.shape[1]

    n_rows_t = torch.from_numpy(counts[has].astype(np.float32))

    def request_logits(z: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """Pooled ``[n_ex]`` of the token logits ``z = x_t @ w + b`` (``[n_rows]``)."""
        if q is None:  # the mean, without the softmax's exp
            return torch.zeros(n_ex).index_add_(0, own_t, z) / n_rows_t
        return pool_logits_torch(z, q, own_t, n_ex)

    def run(params: list[torch.Tensor], loss_of: Callable[[], torch.Tensor], iters: int
            ) -> None:
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                                tolerance_change=1e-9)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of()
            loss.backward()
            return loss
        opt.step(closure)

    def objective(L: torch.Tensor, *penalised: torch.Tensor) -> torch.Tensor:
        nll = torch.nn.functional.binary_cross_entropy_with_logits(L, y_t, weight=s_t,
                                                                   reduction="sum")
        return nll + sum((p @ p for p in penalised), torch.zeros(())) * (lam / 2)

    w = torch.zeros(d_model, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    run([w, b], lambda: objective(request_logits(x_t @ w + b, None), w), STAGE1_ITERS)
    beta_t = torch.tensor(0.0 if beta is None else float(beta), requires_grad=beta is None)
    v = torch.zeros(d_model, requires_grad=True)
    if pooling == "softmax":
        def soft() -> torch.Tensor:
            z = x_t @ w + b  # once: the token logits are also the softmax's scores
            return objective(request_logits(z, beta_t * z), w)
        run([w, b, beta_t] if beta is None else [w, b], soft, stage2_iters)
    elif pooling == "attention":
        run([w, b, v], lambda: objective(request_logits(x_t @ w + b, x_t @ v), w, v),
            stage2_iters)
    wn = w.detach().numpy().astype(np.float64)
    vn = v.detach().numpy().astype(np.float64)
    if vt.shape[0]:  # exact: the fit only ever saw projected rows
        wn -= vt.T @ (vt @ wn)
        vn -= vt.T @ (vt @ vn)
    return TokenPoolProbe(layer, mu, sd, wn, float(b.detach()), pooling,
                          float(beta_t.detach()) if pooling == "softmax" else 0.0,
                          vn if pooling == "attention" else None)


def token_pool(layer: int, C: float, pooling: Pooling, beta: float | None = None,
               kind_weight: dict[str, float] | None = None, style: str = "") -> Fitter:
    """:func:`fit_token_pool` as a :data:`probes.pooled.Fitter`; score = the request
    logit ``L`` (float64)."""
    def fit(parts: Parts) -> Scorer:
        return fit_token_pool(parts, layer, C, pooling, beta, kind_weight, style).scores
    return fit
