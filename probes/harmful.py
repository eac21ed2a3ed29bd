"""The ``harmful_intent`` recipe: diverse sources, user-token pooling, leave-one-source-out.

What is served and what is trained (they agree by construction):

- **Tokens in scope** = the user's message content as ``monitor.roles`` labels it
  (:func:`token_roles`, :func:`scope_mask`: the segmenter the capture plugin runs).
- **Per-token score** ``s_t = sigmoid(z_t)``, ``z_t = ((x_t − μ)/σ)·w + b`` at one layer
  (the bundle's ``linear_probe``).
- **Request statistic** ``S = max_{t ≥ m, t judged} a_t`` with the policy aggregation
  ``a_t`` (``mean``: ``a_t = (1/t) Σ_{i≤t} s_i``; ``mean_logit``: ``σ`` of the mean of
  the clipped logits; ``ema``) and the policy's ``judge_at`` (``every_token``: every
  prefix is judged; ``span_end``: only where the user's text ends), computed by
  ``monitor.judge.aggregate`` via :func:`probes.train.aggregate_requests`: exactly the
  tracker's rule "a severity is reached at the first judged token ``t ≥ min_tokens``
  where ``a_t ≥ threshold``". With ``mean_logit`` at ``span_end`` over one user message,
  ``S = σ(mean_t z_t) = σ(z(x̄))``: the served statistic IS the trained one.
- **Length debiasing** (``length_debias``, on by default): long benign requests drift up
  in ``z(x̄)``; the recipe fits ``a`` = least-squares slope of ``z(x̄)`` on ``log n`` over
  the BENIGN FIT rows (``n`` = the request's in-scope tokens; :func:`length_slope`,
  ``probes.train.fit_length_slope``) and serves ``mean_logit`` with ``length_slope: a``:
  ``S = σ(z(x̄) − a·log n)``. Every fold of the selection, every learning-curve point and
  the shipped probe fit their own ``a`` on their own fit rows; thresholds and every
  reported number are computed on the debiased served statistic.
- **Training** fits ``w, b`` by L2 logistic regression on the request-level mean of the
  user-token activations, ``x̄ = (1/T) Σ_t x_t``. Because ``z`` is affine,
  ``z(x̄) = (1/T) Σ_t z_t``: the trained logit is the mean of the served per-token logits;
  the served statistic averages ``sigmoid(z_t)`` instead and is what every number
  (selection, thresholds, report) is computed on.
- **The first user tokens left out** (``skip_tokens = k``, :data:`DEFAULT_SKIP_TOKENS`
  with mean pooling and the length term): the probe is fit on the mean of the rows
  ``k+1..n`` of a request with ``n > k`` in-scope tokens (all ``n`` otherwise;
  ``SourceData.skipping``), its length slope on ``log`` of the tokens pooled, and it is
  served ``mean_logit`` with ``skip_tokens: k``, which pools the same rows at the user's
  span end (``monitor.judge.aggregate.MeanLogitAggregator``); chosen on validation folds
  (docs/PROBES.md, "the first user tokens left out of the mean").
- **Softmax pooling** (``pooling="softmax"``, not the default: :data:`DEFAULT_POOLING`):
  the same ``w, b`` (same layer, C, weights, style projection) are fit end to end on the
  request logit ``L = Σ_t softmax(z/τ)_t z_t`` (``probes.token_pool``, fixed ``β = 1/τ``),
  exported as the same one-column ``linear_probe`` and served ``softmax_logit`` with
  ``temperature: τ`` at ``span_end``, which computes ``L`` from the served scores
  (``ℓ_t = logit(s_t) = z_t`` while ``|z_t| ≤ 13.8``); its length slope is fit on ``L``
  over the benign fit rows. Thresholds and numbers are, again, on the served statistic.

Rows: float16 activations ``[n_rows, d_model]`` per layer, in position order within
each example (``probes.collect``). Pooled features: float32 ``[n_examples, d_model]``.
Sample weights: every source gets the same total weight within its class (so 400
red-team rewrites do not outvote 100 physical-safety contrasts), times a per-kind
multiplier for benign-but-scary and persona sources (chosen on validation).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from probes.collect import Activations, ChatEncoding, Collector
from probes.datasets import ChatExample
from probes.evaluate import auroc, tpr_at_fpr
from probes.lists import SHORT_CHARS, Lists, NoFillerRows, long_requests, validation_lists
from probes.pooled import (
    Fitter,
    Fold,
    SourceData,
    concat,
    ensemble,
    fit_pooled,
    fitter_folds,
    kind_weights,
    length_debiased,
    linear,
    mlp,
    pooled_features,
    served_scores,
    skip_first,
    source_weights,
)
from probes.sources import Source
from probes.token_pool import fit_token_pool, pool_logits, token_pool
from probes.train import LinearProbe, _sigmoid, aggregate_requests, log_tokens
from probes.window import SERVED_SHARE, SERVED_WINDOW, served_union, union_rates

if TYPE_CHECKING:
    from probes.export import DetectorResult

log = logging.getLogger("probes.harmful")

__all__ = [  # SourceData … source_weights live in probes.pooled (re-exported here)
    "DEFAULT_POOLING",
    "DEFAULT_SKIP_TOKENS",
    "DEFAULT_TEMPERATURE",
    "RECIPE_POOLINGS",
    "RecipePooling",
    "SourceData",
    "fit_pooled",
    "fit_probe",
    "harmful_intent_recipe",
    "kind_weights",
    "length_slope",
    "pooled_features",
    "request_logits",
    "scope_mask",
    "served_scores",
    "source_weights",
    "token_roles",
]


def token_roles(acts: Activations, examples: Sequence[ChatExample],
                encoder: ChatEncoding) -> np.ndarray:
    """Role of every stored row (int8 ``[n_rows]``, ``monitor.roles.TokenRole`` values):
    the prompt's token ids (``encoder.encode``, the served tokenisation) segmented by the
    shared ``monitor.roles.RoleSegmenter`` (the one the capture plugin runs in vLLM);
    rows at or after the prompt are GENERATED."""
    from monitor.roles import RoleSegmenter, TokenRole

    seg = RoleSegmenter.from_tokenizer(encoder.tokenizer)
    out = np.full(acts.n_rows, int(TokenRole.GENERATED), dtype=np.int8)
    prompt = ~acts.generated.astype(bool)
    rows = np.flatnonzero(prompt)
    ex = acts.example[rows]
    if rows.size:
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(ex)) + 1, [rows.size]])
        for a, b in itertools.pairwise(bounds):
            ids, plen, _ = encoder.encode(examples[int(ex[a])])
            out[rows[a:b]] = seg.segment(ids[:plen])[acts.position[rows[a:b]]]
    return out


def scope_mask(roles: np.ndarray, scope: str) -> np.ndarray:
    """Rows in a policy ``scope`` (bool ``[n_rows]``), e.g. ``user`` (user message content)
    or ``prompt`` (every prompt token): the sidecar tracker's own mapping
    (``monitor.roles.scope_mask``), so training and serving scopes cannot differ."""
    from monitor.roles import scope_mask as role_table

    return role_table(scope)[np.asarray(roles, dtype=np.int8)]


def request_logits(probe: LinearProbe, d: SourceData, temperature: float | None = None
                   ) -> np.ndarray:
    """The request logit of every example of ``d`` (``[n_examples]``) that the served
    aggregation reads at the user's span end, before any length term.
    ``temperature`` None (mean pooling): ``z(x̄)``, the probe on the pooled feature (the
    mean of the per-token logits ``mean_logit`` averages; float32, as ``probe.logits``).
    ``τ``: the softmax-pooled ``L = Σ_t softmax(z/τ)_t z_t`` over the in-scope rows
    (float64; ``probes.token_pool.pool_logits``, what ``softmax_logit`` computes on the
    served scores); an example without in-scope rows scores as the zero pooled feature,
    as under mean pooling and ``TokenPoolProbe.score_rows``."""
    if temperature is None:
        return probe.logits(d.features(probe.layer))
    z = probe.logits(d.rows(probe.layer)).astype(np.float64)
    ex = d.acts.example[d.mask]
    out = pool_logits(z, z / temperature, ex, d.acts.n_examples)
    empty = np.bincount(ex, minlength=d.acts.n_examples) == 0
    out[empty] = float(probe.logits(np.zeros((1, probe.mean.size), np.float32))[0])
    return out


def length_slope(probe: LinearProbe, parts: Sequence[tuple[SourceData, np.ndarray]],
                 temperature: float | None = None) -> float:
    """``a`` of the served length term for ``probe``: the least-squares slope
    (``probes.train.fit_length_slope``) of its request logit (:func:`request_logits`:
    ``temperature`` None, the pooled logit ``z(x̄)`` that ``mean_logit`` serves; ``τ``,
    the softmax-pooled logit that ``softmax_logit`` serves) on ``log n_in_scope`` over the
    BENIGN rows among ``parts`` (pass the fit rows: never calibration or test rows).
    Rounded to 4 decimals, so the policy text serves exactly the slope every threshold
    and number was computed with."""
    from probes.train import fit_length_slope

    z, n = [], []
    for d, idx in parts:
        b = idx[d.labels[idx] == 0]
        z.append(request_logits(probe, d, temperature)[b] if temperature is not None
                 else probe.logits(d.features(probe.layer)[b]))
        n.append(d.in_scope_tokens()[b])
    return round(fit_length_slope(np.concatenate(z), np.concatenate(n)), 4)


def takes_param(agg: dict[str, Any], name: str) -> bool:
    """Whether the aggregation kind of ``agg`` has the parameter ``name``
    (``monitor.judge.aggregate.AGGREGATIONS``, the one definition of each kind)."""
    from monitor.judge.aggregate import AGGREGATIONS

    return AGGREGATIONS[agg["kind"]].param(name) is not None


def has_length_term(agg: dict[str, Any]) -> bool:
    """Whether the aggregation kind of ``agg`` takes a ``length_slope`` (``mean_logit``,
    ``softmax_logit``)."""
    return takes_param(agg, "length_slope")


def with_slope(agg: dict[str, Any], slope: float) -> dict[str, Any]:
    """``agg`` with ``length_slope: slope`` when its kind has a length term
    (:func:`has_length_term`) and ``slope != 0`` (other kinds: returned unchanged)."""
    if not has_length_term(agg) or slope == 0.0:
        return agg
    return {**agg, "length_slope": slope}


RecipePooling = Literal["mean", "softmax"]
RECIPE_POOLINGS: tuple[RecipePooling, ...] = ("mean", "softmax")
DEFAULT_POOLING: RecipePooling = "mean"
"""How the shipped ``harmful_intent`` probe pools the user's token rows (the ONE place the
default is set; ``harmful_intent_recipe``, ``probes.recipes.build_default`` and the CLI's
``--pooling`` default to it): ``mean`` (L2 logistic regression on the mean feature,
served ``mean_logit``) or ``softmax`` (``probes.token_pool`` softmax probe at
:data:`DEFAULT_TEMPERATURE`, served ``softmax_logit``)."""
DEFAULT_TEMPERATURE = 1.0
"""``τ`` of the softmax pooling when :data:`DEFAULT_POOLING` is ``softmax`` (and the
CLI's ``--temperature`` default)."""
DEFAULT_SKIP_TOKENS = 4
"""In-scope tokens at the start of a request left out of the shipped probe's mean (fit and
served; ``mean_logit`` ``skip_tokens``) when it is mean-pooled and length-debiased: run 5
of the variant study, chosen on validation folds by a rule written before the run
(docs/PROBES.md; docs/experiments/first_tokens_validation.md). The ONE place the default
is set (``harmful_intent_recipe``, ``probes.recipes.build_default``, the CLI's
``--skip-tokens``)."""


def takes_skip(agg: dict[str, Any]) -> bool:
    """Whether the aggregation kind of ``agg`` takes ``skip_tokens`` (``mean_logit``)."""
    return takes_param(agg, "skip_tokens")


def skipping_served(served: Sequence[Served], k: int) -> tuple[Served, ...]:
    """The read-outs of ``served`` that can pool without the first ``k`` tokens
    (:func:`takes_skip`), each with ``skip_tokens: k``; ``k = 0``: ``served`` unchanged.
    ValueError when none can (a probe fit without its first tokens must be served so)."""
    if k == 0:
        return tuple(served)
    out = tuple(({**agg, "skip_tokens": k}, m, scale, j) for agg, m, scale, j in served
                if takes_skip(agg))
    if not out:
        raise ValueError(f"skip_tokens: a probe fit without the first {k} tokens is served "
                         f"by an aggregation that takes skip_tokens (mean_logit); found "
                         f"{[a['kind'] for a, *_ in served]}")
    return out


def recipe_pooling(pooling: str | None) -> RecipePooling:
    """``pooling`` checked (None: :data:`DEFAULT_POOLING`)."""
    if pooling is None:
        return DEFAULT_POOLING
    for known in RECIPE_POOLINGS:
        if pooling == known:
            return known
    raise ValueError(f"pooling: expected one of {RECIPE_POOLINGS}; found {pooling!r}")


def softmax_readout(temperature: float) -> dict[str, Any]:
    """The served aggregation of a softmax probe at ``τ`` (its length slope is added per
    fit, :func:`with_slope`); ValueError naming ``temperature`` outside the served range
    (``monitor.judge.aggregate.MIN_TEMPERATURE`` .. ``MAX_TEMPERATURE``)."""
    from probes.train import as_aggregation

    agg = {"kind": "softmax_logit", "temperature": float(temperature)}
    as_aggregation(agg)  # validated as the policy will be
    return agg


def fit_probe(parts: Sequence[tuple[SourceData, np.ndarray]], layer: int, C: float,
              kind_weight: dict[str, float], prefixes: int = 0, style: str = "",
              pooling: RecipePooling = "mean", temperature: float = 1.0) -> LinearProbe:
    """The recipe's probe on ``parts``: ``mean``, :func:`probes.pooled.fit_pooled`
    (logistic regression on the pooled mean feature); ``softmax``,
    :func:`probes.token_pool.fit_token_pool` at fixed ``β = 1/τ`` (same ``C``,
    ``kind_weight`` and ``style``), exported as the one-column probe of its token logits
    (``TokenPoolProbe.linear_probe``, ``method`` ``softmax``). The softmax probe is fit
    on whole requests only: ``prefixes`` must be 0."""
    if recipe_pooling(pooling) == "mean":
        return fit_pooled(parts, layer, C, kind_weight, prefixes, style=style)
    if prefixes:
        raise ValueError(f"prefixes: the softmax probe is fit on whole requests; expected 0, "
                         f"found {prefixes}")
    return fit_token_pool(list(parts), layer, C, "softmax", 1.0 / temperature, kind_weight,
                          style).linear_probe(C)


def pooled_metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """AUROC and TPR@1%FPR of request scores."""
    return {"auroc": auroc(y, s), "tpr@fpr0.01": tpr_at_fpr(y, s, 0.01)}


# ----------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Config:
    """One point of the validation search."""

    layer: int
    C: float
    scary_weight: float
    aggregation: tuple[tuple[str, Any], ...]
    min_tokens: int
    scale: float = 1.0
    prefixes: int = 0
    judge_at: str = "every_token"
    #: ``mean_logit`` with a length term whose slope is fit per probe on its benign fit
    #: rows (:func:`length_slope`); ``agg`` holds no slope (it depends on the fit).
    length_debias: bool = False
    #: project the training sources' style directions out before the fit
    #: (``probes.pooled.fit_pooled`` ``style``: ``benign`` | ``both``; "" off)
    style: str = ""
    #: how the probe pools the token rows in training (:func:`fit_probe`): ``mean`` or
    #: ``softmax`` (then ``aggregation`` is ``softmax_logit`` at ``temperature``,
    #: ``scale`` 1 and ``prefixes`` 0)
    pooling: RecipePooling = "mean"
    #: ``τ`` of the softmax pooling (``softmax`` only; served as ``temperature``)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if recipe_pooling(self.pooling) == "mean" and self.agg["kind"] == "softmax_logit":
            raise ValueError("aggregation: softmax_logit reads a softmax probe's request "
                             "logit; expected pooling softmax with it, found pooling mean")
        if self.pooling == "softmax":
            want = softmax_readout(self.temperature)
            got = {k: v for k, v in self.agg.items() if k != "length_slope"}
            if got != want or self.scale != 1.0 or self.prefixes:
                raise ValueError(f"aggregation: a softmax probe is served as {want} at scale "
                                 f"1 without prefix negatives; found {self.agg}, scale "
                                 f"{self.scale:g}, prefixes {self.prefixes}")

    @property
    def agg(self) -> dict[str, Any]:
        return dict(self.aggregation)

    @property
    def skip_tokens(self) -> int:
        """In-scope tokens left out at the start of the pool (the served ``skip_tokens``;
        the probe is fit on :meth:`SourceData.skipping` views of the same ``k``)."""
        return int(self.agg.get("skip_tokens", 0))

    def label(self) -> str:
        from probes.train import aggregation_name

        return (f"L{self.layer} C={self.C:g} scary×{self.scary_weight:g} "
                f"{'softmax probe ' if self.pooling == 'softmax' else ''}"
                f"{aggregation_name(self.agg)}{' − a·log t' if self.length_debias else ''} "
                f"m={self.min_tokens} scale={self.scale:g} "
                f"prefix-negatives={self.prefixes} judge_at={self.judge_at}"
                + (f" style-projection={self.style}" if self.style else ""))

    def fit(self, parts: Sequence[tuple[SourceData, np.ndarray]]
            ) -> tuple[LinearProbe, dict[str, Any]]:
        """The probe of this config fit on ``parts`` (:func:`fit_probe`, on each source's
        :meth:`SourceData.skipping` view when ``skip_tokens``) and the aggregation it is
        served with (``length_debias``: its own slope, :func:`length_slope` on the same
        rows)."""
        parts = [(d.skipping(self.skip_tokens), i) for d, i in parts]
        p = scaled(fit_probe(parts, self.layer, self.C, kind_weights(self.scary_weight),
                             self.prefixes, self.style, self.pooling, self.temperature),
                   self.scale)
        if not (self.length_debias and has_length_term(self.agg)):
            return p, self.agg
        return p, with_slope(self.agg, length_slope(p, parts, self.tau))

    @property
    def tau(self) -> float | None:
        """``τ`` of the request logit (:func:`request_tau`)."""
        return request_tau(self.pooling, self.temperature)


def request_tau(pooling: RecipePooling, temperature: float) -> float | None:
    """``τ`` of the request logit (:func:`request_logits`) a probe of ``pooling`` is read
    out with: ``temperature`` for ``softmax``, None (the pooled mean) for ``mean``."""
    return temperature if pooling == "softmax" else None


def scaled(probe: LinearProbe, scale: float) -> LinearProbe:
    """The probe with weight and bias multiplied by ``scale`` (same ranking of logits)."""
    return LinearProbe(probe.layer, (probe.weight * scale).astype(np.float32),
                       float(probe.bias * scale), probe.mean, probe.std, probe.method, probe.C)


Served = tuple[dict[str, Any], int, float, str]
"""One served read-out: ``(aggregation, min_tokens, scale, judge_at)``."""


def _read_outs(p: LinearProbe, d: SourceData, layer: int,
               served: Sequence[Served], slope: float = 0.0,
               tau: float | None = None, skip_tokens: int = 0) -> list[np.ndarray]:
    """``[pooled logit, served statistic for each of served]`` for all of ``d``'s examples
    (the pooled logit unsquashed: float32 sigmoids of large logits would tie at 1.0;
    ``tau``: the softmax-pooled one, :func:`request_logits`).
    ``slope``: the length term ``a`` (:func:`length_slope`): subtracted from the pooled
    logit as ``a·log n`` and served by every read-out with a length term
    (:func:`with_slope`). ``skip_tokens``: the pooled logit (and its ``n``) over
    :meth:`SourceData.skipping` rows; the served read-outs carry their own
    ``skip_tokens`` (:func:`skipping_served`) and read every in-scope row."""
    v = d.skipping(skip_tokens)
    zp = request_logits(p, v, tau)
    if slope:
        zp = zp - slope * log_tokens(v.in_scope_tokens())
    out = [zp.astype(np.float64)]
    z = p.logits(d.rows(layer))
    toks: dict[float, np.ndarray] = {}
    for agg, m, scale, judge_at in served:
        if scale not in toks:
            toks[scale] = np.zeros(d.acts.n_rows, dtype=np.float32)
            toks[scale][d.mask] = _sigmoid(scale * z)
        out.append(aggregate_requests(toks[scale], d.acts.example, d.acts.n_examples,
                                      with_slope(agg, slope), m, d.mask, judge_at))
    return out


def loso_folds(train: Sequence[SourceData], fit_idx: dict[str, np.ndarray],
               cal_idx: dict[str, np.ndarray], layer: int, C: float, scary_weight: float,
               served: Sequence[Served],
               prefixes: int = 0, length_debias: bool = False, style: str = "",
               pooling: RecipePooling = "mean", temperature: float = 1.0,
               skip_tokens: int = 0) -> list[Fold]:
    """For each training source, a probe fit on the other sources' ``fit_idx`` rows
    (:func:`fit_probe` with ``pooling``) scores ALL of that source's rows and the other
    sources' ``cal_idx`` rows. ``length_debias``: the fold's probe gets its own length
    slope (:func:`length_slope` on the fold's fit rows), applied to the pooled logit and
    the read-outs with a length term. ``skip_tokens``: the probe and its slope are fit on
    :meth:`SourceData.skipping` views (``served`` must pool the same way:
    :func:`skipping_served`)."""
    kw = kind_weights(scary_weight)
    tau = request_tau(pooling, temperature)
    folds = []
    for held in train:
        parts = [(d.skipping(skip_tokens), fit_idx[d.name]) for d in train
                 if d.name != held.name]
        p = fit_probe(parts, layer, C, kw, prefixes, style, pooling, temperature)
        a = length_slope(p, parts, tau) if length_debias else 0.0
        cal_src = [d for d in train if d.name != held.name and cal_idx[d.name].size]
        cal = [_read_outs(p, d, layer, served, a, tau, skip_tokens) for d in cal_src]
        idx = [cal_idx[d.name] for d in cal_src]
        cal_scores = [np.concatenate([c[k][i] for c, i in zip(cal, idx, strict=True)])
                      for k in range(len(served) + 1)]
        groups = np.concatenate([np.full(i.size, d.name) for d, i in zip(cal_src, idx,
                                                                         strict=True)])
        folds.append(Fold(held, _read_outs(p, held, layer, served, a, tau, skip_tokens),
                          cal_scores, groups))
    return folds


def fold_metrics(folds: Sequence[Fold], k: int, weighting: str = "row") -> dict[str, float]:
    """Deployment-style validation of read-out ``k``: each fold's thresholds come from its
    own calibration rows (1% FPR, ``weighting``: ``probes.calibrate``); a held-out HARMFUL
    source gives AUROC against those rows and its detection rate at the threshold, a
    held-out BENIGN source its false-alert rate.
    ``criterion = (mean AUROC + mean TPR) / 2 − mean FPR``."""
    from probes.calibrate import threshold_at_fpr

    au, tp, fp = [], [], []
    for f in folds:
        s, c = f.held_scores[k], f.cal_scores[k]
        # read-out k may be a logit (the pooled reference, explore()): no [0, 1] clip
        t = threshold_at_fpr(c, 0.01, f.cal_groups, weighting, clip=False)
        if f.held.source.kind == "harmful":
            au.append(auroc(np.r_[np.ones(s.size), np.zeros(c.size)], np.r_[s, c]))
            tp.append(float((s >= t).mean()))
        else:
            fp.append(float((s >= t).mean()))
    m = {"auroc": float(np.mean(au)), "tpr@cal1%": float(np.mean(tp)),
         "fpr@cal1%": float(np.mean(fp)), "worst_fpr@cal1%": float(np.max(fp))}
    m["criterion"] = (m["auroc"] + m["tpr@cal1%"]) / 2 - m["fpr@cal1%"]
    return m


# ----------------------------------------------------------------------- reporting helpers
def source_rows(scores: dict[str, tuple[SourceData, np.ndarray]], thr: dict[str, float],
                ref_pos: np.ndarray, ref_neg: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per-source metrics at the shipped thresholds ``thr``.

    Harmful source: AUROC (bootstrap 95% CI) and TPR@1%FPR against ``ref_neg`` (the
    pooled benign test sources), detection rate at warn / critical (Wilson 95% CI).
    Benign source: alert rate at warn / critical (Wilson CI), AUROC against ``ref_pos``
    (the pooled harmful test sources)."""
    from probes.evaluate import auroc_ci, wilson_ci

    out: dict[str, dict[str, Any]] = {}
    for name, (sd, s) in scores.items():
        harmful = sd.source.kind == "harmful"
        other = ref_neg if harmful else ref_pos
        y = np.concatenate([np.full(s.size, harmful), np.full(other.size, not harmful)])
        both = np.concatenate([s, other])
        row: dict[str, Any] = {"kind": sd.source.kind, "role": sd.source.role, "n": int(s.size),
                               "auroc": auroc(y, both), "auroc_ci": auroc_ci(y, both)}
        if harmful:
            row["tpr@fpr0.01"] = tpr_at_fpr(y, both, 0.01)
        for sev, t in thr.items():
            k = int((s >= t).sum())
            row[f"rate@{sev}"] = k / max(s.size, 1)
            row[f"rate@{sev}_ci"] = wilson_ci(k, int(s.size))
        out[name] = row
    return out


CATEGORY_MIN_ROWS = 20
"""Smallest category given a row of its own by :func:`category_scores`."""


def category_slices(sd: SourceData, min_rows: int = CATEGORY_MIN_ROWS
                    ) -> list[tuple[str, np.ndarray]]:
    """``sd``'s examples by ``category`` (missing: ``uncategorised``): one ``(category,
    indices)`` per category of at least ``min_rows`` examples, in sorted order, then the
    smaller categories together as ``"k smaller categories"`` if any; ``[]`` when fewer
    than two categories reach ``min_rows`` (the source's own row is the whole story: small
    slices only add noise)."""
    cats = np.array([e.category or "uncategorised" for e in sd.examples], dtype=object)
    names, counts = np.unique(cats, return_counts=True)
    big = [str(c) for c, k in zip(names, counts, strict=True) if k >= min_rows]
    if len(big) < 2:
        return []
    out = [(c, np.flatnonzero(cats == c)) for c in big]
    rest = np.flatnonzero(~np.isin(cats, big))
    if rest.size:
        out.append((f"{len(names) - len(big)} smaller categories", rest))
    return out


def category_scores(scores: dict[str, tuple[SourceData, np.ndarray]],
                    min_rows: int = CATEGORY_MIN_ROWS
                    ) -> dict[str, tuple[SourceData, np.ndarray]]:
    """Every source of ``scores`` split by :func:`category_slices`, keyed
    ``"source / category"``; scores are sliced, never recomputed."""
    return {f"{name} / {c}": (sd.take(idx), s[idx])
            for name, (sd, s) in scores.items()
            for c, idx in category_slices(sd, min_rows)}


def worst_examples(scores: dict[str, tuple[SourceData, np.ndarray]], k: int = 8
                   ) -> dict[str, list[dict[str, Any]]]:
    """Highest-scoring benign and lowest-scoring harmful requests (with text)."""
    rows = []
    for name, (sd, s) in scores.items():
        for i, v in enumerate(s):
            ex = sd.examples[i]
            sys = next((m["content"] for m in ex.chat if m["role"] == "system"), "")
            rows.append((float(v), name, sd.source.kind == "harmful", ex.user_text, sys))
    fp = sorted([r for r in rows if not r[2]], key=lambda r: -r[0])[:k]
    fn = sorted([r for r in rows if r[2]], key=lambda r: r[0])[:k]

    def fmt(r: tuple[float, str, bool, str, str]) -> dict[str, Any]:
        return {"score": round(r[0], 4), "source": r[1], "text": r[3][:300],
                "system": r[4][:200]}

    return {"false_positives": [fmt(r) for r in fp], "false_negatives": [fmt(r) for r in fn]}


# ----------------------------------------------------------------------- the recipe
LAYERS = (9, 12, 15, 18)
"""Layers collected (of 30)."""
SEARCH_LAYERS = (12, 15, 18)
"""Layers searched (the middle of the network; layer 9 is only in the read-out study)."""
CS = (1e-3, 1e-2)
PREFIXES = (0, 8)
"""Benign prefix negatives searched (0 = full-request means only)."""
SCARY_WEIGHTS = (1.0, 3.0)
PINNED: dict[str, tuple[float, ...]] = {"layers": (15,), "Cs": (3e-3,),
                                        "scary_weights": (1.0,)}
"""The length-debiased recipe's probe (``length_debias=True``, the default): layer 15,
C = 0.003, per-source balance with benign-but-scary / persona sources ×1, chosen by the
variant study on leave-one-source-out folds over the TRAINING sources only (every
length-term layer × C × balance; docs/experiments/loso_variants_validation.md), the
recipe's test sources neither fit nor scored there. Only the served read-out is still
searched. ``length_debias=False`` searches the session-5 grid (:data:`SEARCH_LAYERS` ×
:data:`CS` × :data:`SCARY_WEIGHTS`)."""
SERVED: tuple[Served, ...] = (
    *((agg, m, scale, "every_token")
      for agg, m in (({"kind": "mean"}, 2), ({"kind": "mean"}, 4),
                     ({"kind": "ema", "half_life_tokens": 8.0}, 4))
      for scale in (1.0, 0.05)),
    ({"kind": "mean_logit"}, 4, 1.0, "every_token"),
    ({"kind": "mean_logit"}, 1, 1.0, "span_end"),
    ({"kind": "mean"}, 1, 1.0, "span_end"),
)
"""Served read-outs searched: ``(aggregation, min_tokens, scale, judge_at)``.
Aggregations: running mean, EMA (a rolling mean whose maximum over the request is taken)
and ``mean_logit`` (σ of the mean logit). ``scale`` multiplies the probe's weight and bias:
at a small scale ``sigmoid(scale·z) ≈ ½ + scale·z/4`` is nearly linear, so the served mean
of per-token scores ranks requests like the trained mean logit (thresholds are calibrated
on the served statistic either way); ``mean_logit`` needs no such scaling. ``judge_at:
span_end`` judges the aggregate only where the user's text ends (with ``mean_logit`` over
one user message: exactly the trained pooled logit), ``every_token`` every prefix."""


def search_space(judge_at: str, pooling: RecipePooling = "mean", temperature: float = 1.0
                 ) -> tuple[tuple[Served, ...], tuple[int, ...]]:
    """Served read-outs and prefix-negative counts searched for a ``judge_at`` choice:
    ``any`` (all of :data:`SERVED`, :data:`PREFIXES`), ``every_token`` or ``span_end``
    (only read-outs judged that way; ``span_end`` fits on full-request means only, since
    no prefix of a span is judged). ``pooling`` ``softmax``: the one read-out a softmax
    probe is trained for, ``softmax_logit`` at ``temperature``, ``min_tokens`` 1, judged
    at ``span_end`` (``any`` means that too; ``every_token`` is refused: the probe is
    trained on whole user messages, not on their prefixes), no prefix negatives."""
    if recipe_pooling(pooling) == "softmax":
        if judge_at not in ("span_end", "any"):
            raise ValueError(f"judge_at: the softmax probe is judged where the user's text "
                             f"ends; expected span_end or any, found {judge_at!r}")
        return ((softmax_readout(temperature), 1, 1.0, "span_end"),), (0,)
    if judge_at == "any":
        return SERVED, PREFIXES
    if judge_at not in ("every_token", "span_end"):
        raise ValueError(f"judge_at: expected any, every_token or span_end; found {judge_at!r}")
    served = tuple(s for s in SERVED if s[3] == judge_at)
    return served, ((0,) if judge_at == "span_end" else PREFIXES)


CALIB_FRAC = 0.3
"""Share of every benign training source held back from fitting, for the thresholds."""


def load_sources(collector: Collector, cache_dir: Path | None, sources: Sequence[Source],
                 scope: str, layers: Sequence[int] = LAYERS, progress: bool = True,
                 limit: int | None = None) -> dict[str, SourceData]:
    """Collect (cached per source) and segment every source that is available."""
    from probes.sources import load_source

    out: dict[str, SourceData] = {}
    for src in sources:
        ex = load_source(src)
        if limit is not None:
            ex = ex[:limit]
        out[src.name] = collect_source(src, ex, collector, cache_dir, layers, scope, progress)
    return out


def collect_source(src: Source, examples: list[ChatExample], collector: Collector,
                   cache_dir: Path | None, layers: Sequence[int], scope: str, progress: bool
                   ) -> SourceData:
    """``examples`` as source ``src``: their prompt rows at ``layers`` collected (cached per
    shard) and segmented to ``scope`` (:func:`token_roles`, :func:`scope_mask`). The one
    path every harmful_intent source takes, loaded or derived (long lists, window lists)."""
    from probes.collect import TokenSelection

    acts = collector.collect(examples, layers, TokenSelection("prompt"), cache_dir=cache_dir,
                             progress=progress, desc=f"harmful_intent/{src.name}")
    return SourceData(src, examples, acts,
                      scope_mask(token_roles(acts, examples, collector), scope))


def long_sources(data: dict[str, SourceData], collector: Collector, cache_dir: Path | None,
                 scope: str, layers: Sequence[int], progress: bool, seed: int = 0,
                 n: int = 60) -> dict[str, SourceData]:
    """Test-only long requests built from TEST sources: lists of ordinary-chat and
    benign-but-scary requests (``long_benign``) and the same with one Do-Not-Answer
    question inside (``long_with_harmful``)."""
    fill = [e for k in ("oasst", "coconot_contrast") if k in data for e in data[k].examples
            if len(e.user_text) < SHORT_CHARS]
    tasks = data["do_not_answer"].examples if "do_not_answer" in data else []
    if not fill or not tasks:
        return {}
    out = {}
    for name, kind, with_task in (("long_benign", "benign", False),
                                  ("long_with_harmful", "harmful", True)):
        exs = long_requests(tasks, fill, n, seed + (7 if with_task else 3), name, with_task)
        out[name] = collect_source(Source(name, kind, "test", "derived", name), exs,
                                   collector, cache_dir, layers, scope, progress)
    return out


def lists_source(meta: Lists, collector: Collector, cache_dir: Path | None, layers: Sequence[int],
                 scope: str = "user", progress: bool = True) -> SourceData:
    """The validation lists of ``meta`` (``probes.lists.validation_lists``) collected
    (prompt rows of ``layers``, cached per shard) and segmented to ``scope``, as one
    benign TRAINING-derived source ``window_lists``."""
    return collect_source(Source("window_lists", "benign", "train", "derived", "window_lists"),
                          meta.examples, collector, cache_dir, layers, scope, progress)


def recipe_fit(parts: list[tuple[SourceData, np.ndarray]], skip_tokens: int = 0
               ) -> tuple[Callable[[SourceData], np.ndarray], float]:
    """The recipe's probe on ``parts`` (:data:`PINNED`: layer 15, C = 0.003, kinds ×1,
    benign style directions projected out, no prefix negatives: ``Config.fit`` at
    ``span_end``), fit without the first ``skip_tokens`` in-scope tokens of each request
    (``SourceData.skipping``; the shipped recipe: :data:`DEFAULT_SKIP_TOKENS`; 0, every
    token: the session-13 recipe the window study's runs 1–5 used) as a function of a
    source's in-scope rows (float ``[n_in_scope_rows]`` logits; ``probes.window.Logits``)
    and its own length slope (:func:`length_slope`, on the same rows)."""
    layer, C = int(PINNED["layers"][0]), float(PINNED["Cs"][0])
    parts = [(d.skipping(skip_tokens), i) for d, i in parts]
    p = fit_pooled(parts, layer, C, kind_weights(float(PINNED["scary_weights"][0])), 0,
                   style="benign")
    return (lambda d: p.logits(d.rows(layer))), length_slope(p, parts)


def split_calibration(train: Sequence[SourceData], seed: int = 0
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per training source: rows to fit on, rows held back for calibration (benign only)."""
    fit_idx, cal_idx = {}, {}
    for i, d in enumerate(train):
        n = len(d.examples)
        if d.source.kind == "harmful":
            fit_idx[d.name], cal_idx[d.name] = np.arange(n), np.arange(0)
            continue
        perm = np.random.default_rng(seed + 101 * i).permutation(n)
        k = round(CALIB_FRAC * n)
        cal_idx[d.name], fit_idx[d.name] = np.sort(perm[:k]), np.sort(perm[k:])
    return fit_idx, cal_idx


def select(train: Sequence[SourceData], fit_idx: dict[str, np.ndarray],
           cal_idx: dict[str, np.ndarray], layers: Sequence[int] = SEARCH_LAYERS,
           Cs: Sequence[float] = CS, scary_weights: Sequence[float] = SCARY_WEIGHTS,
           served: Sequence[Served] = SERVED,
           prefixes: Sequence[int] = PREFIXES, progress: bool = True,
           length_debias: bool = False, style: str = "", weighting: str = "row",
           pooling: RecipePooling = "mean", temperature: float = 1.0,
           skip_tokens: int = 0) -> tuple[Config, list[dict[str, Any]]]:
    """Leave-one-source-out search (:func:`loso_folds`, :func:`fold_metrics`). Returns the
    best *servable* config and the whole table (``pooled logit`` rows: the request-level
    sigmoid of the mean logit over all in-scope rows, the reference; ``mean_logit`` at
    ``span_end`` serves it for single-message requests). ``length_debias``: the pooled
    logit and every ``mean_logit`` read-out carry each fold's own length term.
    ``weighting``: each fold's thresholds (``probes.calibrate``). ``pooling`` /
    ``temperature``: the probe's pooling (:func:`fit_probe`; ``softmax``: ``served`` from
    :func:`search_space` with it, the reference row the softmax-pooled logit).
    ``skip_tokens``: every fold's probe is fit without the first ``k`` in-scope tokens of
    each request (:func:`loso_folds`); ``served`` must carry the same ``skip_tokens``
    (:func:`skipping_served`)."""
    from tqdm.auto import tqdm

    from probes.train import aggregation_name

    table: list[dict[str, Any]] = []
    best: tuple[float, Config] | None = None
    jobs = [(lay, c, sw, pf) for lay in layers for c in Cs for sw in scary_weights
            for pf in prefixes]
    for lay, c, sw, pf in tqdm(jobs, desc="harmful_intent/select", disable=not progress,
                           leave=False):
        folds = loso_folds(train, fit_idx, cal_idx, lay, c, sw, served, pf, length_debias,
                           style, pooling, temperature, skip_tokens)
        for k in range(len(served) + 1):
            met = fold_metrics(folds, k, weighting)
            if k == 0:
                agg_name, m = "pooled logit", 0
                if pooling == "softmax":
                    agg_name = f"softmax-pooled logit (tau={temperature:g})"
                agg_name += ((" − a·log n" if length_debias else "")
                             + (f", first {skip_tokens} tokens left out" if skip_tokens
                                else "") + " (reference)")
            else:
                agg, m, scale, judge_at = served[k - 1]
                deb = length_debias and has_length_term(agg)
                agg_name = (aggregation_name(agg) + (" − a·log t" if deb else "")
                            + (f" scale={scale:g}" if scale != 1 else "")
                            + (f" @{judge_at}" if judge_at != "every_token" else ""))
                cfg = Config(lay, c, sw, tuple(sorted(agg.items())), m, scale, pf, judge_at,
                             deb, style, pooling, temperature)
                if best is None or met["criterion"] > best[0]:
                    best = (met["criterion"], cfg)
            table.append({"layer": lay, "C": c, "scary_weight": sw, "prefix_negatives": pf,
                          "read-out": agg_name,
                          "min_tokens": m, **{kk: round(v, 4) for kk, v in met.items()}})
    assert best is not None
    table.sort(key=lambda r: -r["criterion"])
    return best[1], table


def explore(train: Sequence[SourceData], fit_idx: dict[str, np.ndarray],
            cal_idx: dict[str, np.ndarray], cfg: Config,
            layers: Sequence[int] = LAYERS, weighting: str = "row") -> list[dict[str, Any]]:
    """What richer read-outs buy, leave-one-source-out (:func:`probes.pooled.fitter_folds`,
    :func:`fold_metrics`) on the request-level pooled statistic (none but the first is
    servable as one ``linear_probe`` detector today): the chosen single layer (a softmax
    probe, ``cfg.pooling``: it, then the linear probe on that layer), all layers
    concatenated, an ensemble (mean logit of one probe per layer) and a small MLP head on
    the chosen layer — the fitters of ``probes.pooled`` that the variant study
    (``safety-probes study-variants``) compares, with the chosen config's C, weights and
    prefix negatives, and (``cfg.length_debias``) each minus its own length term
    (:func:`probes.pooled.length_debiased`, fit on each fold's benign fit rows), each
    without the first ``cfg.skip_tokens`` tokens (:func:`probes.pooled.skip_first`);
    ``weighting``: each fold's thresholds (``probes.calibrate``)."""
    kw = kind_weights(cfg.scary_weight)
    soft = cfg.pooling == "softmax"
    fitters: tuple[tuple[str, Fitter], ...] = (
        *(((f"softmax probe tau={cfg.temperature:g}, layer {cfg.layer} (chosen)",
            token_pool(cfg.layer, cfg.C, "softmax", 1.0 / cfg.temperature, kw, cfg.style)),)
          if soft else ()),
        (f"linear, layer {cfg.layer}{'' if soft else ' (chosen)'}",
         linear(cfg.layer, cfg.C, kw, cfg.prefixes)),
        (f"linear, layers {'+'.join(map(str, layers))} concatenated",
         concat(layers, cfg.C / len(layers), kw)),
        (f"ensemble: mean logit of per-layer probes {tuple(layers)}",
         ensemble(layers, cfg.C, kw, cfg.prefixes)),
        (f"MLP head (64 hidden, alpha=1), layer {cfg.layer}", mlp([cfg.layer])))
    rows = []
    for name, f in fitters:
        if cfg.length_debias:
            name, f = f"{name} − a·log n", length_debiased(f)
        if cfg.skip_tokens:
            name, f = f"{name}, first {cfg.skip_tokens} tokens left out", skip_first(
                f, cfg.skip_tokens)
        m = fold_metrics(fitter_folds(train, fit_idx, cal_idx, f), 0, weighting)
        rows.append({"read-out (pooled statistic)": name,
                     **{k: round(v, 4) for k, v in m.items()}})
    return rows


def fold_rows(folds: Sequence[Fold], k: int = 1, weighting: str = "row"
              ) -> dict[str, dict[str, Any]]:
    """Per held-out training source (validation): AUROC against the fold's calibration
    rows (harmful sources) and the alert rate at the fold's own 1% / 0.1% thresholds
    (``weighting``: ``probes.calibrate``)."""
    return {f.held.name: _fold_row(f, f.held_scores[k], k, weighting) for f in folds}


def fold_category_rows(folds: Sequence[Fold], k: int = 1, weighting: str = "row",
                       min_rows: int = CATEGORY_MIN_ROWS) -> dict[str, dict[str, Any]]:
    """:func:`fold_rows` per category of each held-out training source
    (:func:`category_slices`), keyed ``"source / category"``: each category scored by the
    fold that holds its source out, against that fold's calibration rows and thresholds."""
    return {f"{f.held.name} / {c}": _fold_row(f, f.held_scores[k][idx], k, weighting)
            for f in folds for c, idx in category_slices(f.held, min_rows)}


def _fold_row(f: Fold, s: np.ndarray, k: int, weighting: str) -> dict[str, Any]:
    """The validation row of held-out scores ``s`` (read-out ``k`` of fold ``f``'s held
    source, or a slice of them) against ``f``'s calibration rows (:func:`fold_rows`)."""
    from probes.calibrate import threshold_at_fpr
    from probes.evaluate import auroc_ci, wilson_ci

    c = f.cal_scores[k]
    row: dict[str, Any] = {"kind": f.held.source.kind, "role": "validation",
                           "n": int(s.size)}
    if f.held.source.kind == "harmful":
        y = np.r_[np.ones(s.size), np.zeros(c.size)]
        row["auroc"] = auroc(y, np.r_[s, c])
        row["auroc_ci"] = auroc_ci(y, np.r_[s, c])
    for sev, fpr in (("warn", 0.01), ("critical", 0.001)):
        n_hit = int((s >= threshold_at_fpr(c, fpr, f.cal_groups, weighting,
                                           clip=False)).sum())
        row[f"rate@{sev}"] = n_hit / max(s.size, 1)
        row[f"rate@{sev}_ci"] = wilson_ci(n_hit, int(s.size))
    return row


def calibration_rates(s_cal: np.ndarray, groups: np.ndarray, thr: dict[str, float]
                      ) -> dict[str, Any]:
    """The calibration rows' alert rates at the shipped thresholds: pooled by row
    (``fpr@warn``), as the mean of the per-source rates (``source_fpr@warn``, what the
    ``source`` weighting holds at ``≤ α``), the largest per-source rate
    (``worst_fpr@warn``) and, per source, its rows and rate (``per_source``)."""
    names = list(dict.fromkeys(groups.tolist()))
    per = {g: {"n": int((groups == g).sum()),
               **{f"fpr@{k}": float((s_cal[groups == g] >= t).mean()) for k, t in thr.items()}}
           for g in names}
    out: dict[str, Any] = {"n": int(s_cal.size)}
    for k, t in thr.items():
        out[f"fpr@{k}"] = float((s_cal >= t).mean())
        out[f"source_fpr@{k}"] = float(np.mean([p[f"fpr@{k}"] for p in per.values()]))
        out[f"worst_fpr@{k}"] = float(max(p[f"fpr@{k}"] for p in per.values()))
    out["per_source"] = per
    return out


def shuffled_parts(parts: Sequence[tuple[SourceData, np.ndarray]], rng: np.random.Generator
                   ) -> list[tuple[SourceData, np.ndarray]]:
    """The label-permutation control's training rows: the labels of every fit row (all
    sources, in parts order) permuted by one ``rng.permutation`` and written back to the
    same rows (:meth:`SourceData.relabelled`; rows not fit on keep theirs). Sources keep
    their kinds, so the recipe's per-source weights and style directions are computed as
    for the real fit; only which rows are called harmful changes."""
    y = rng.permutation(np.concatenate([d.labels[i] for d, i in parts]))
    out, off = [], 0
    for d, i in parts:
        lab = d.labels.copy()
        lab[i] = y[off:off + i.size]
        off += i.size
        out.append((d.relabelled(lab), i))
    return out


def learning_curve(train: Sequence[SourceData], test: Sequence[SourceData],
                   fit_idx: dict[str, np.ndarray], cfg: Config,
                   fractions: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0),
                   seed: int = 0) -> list[dict[str, Any]]:
    """Pooled test AUROC / TPR@1%FPR (served statistic) vs the fraction of every training
    source's rows fit on, plus a control: the same recipe (``cfg.fit``: weights, style
    projection, length term, skipped tokens) on all fit rows with their labels permuted
    across sources (:func:`shuffled_parts`), served with the control's own aggregation."""
    y = np.concatenate([d.labels for d in test])
    rows = []
    rng = np.random.default_rng(seed)
    runs: list[float | str] = [*fractions, "shuffled"]
    for fr in runs:
        parts = []
        for d in train:
            idx = fit_idx[d.name]
            if fr != "shuffled":
                k = max(1, round(float(fr) * idx.size))
                idx = np.sort(rng.permutation(idx)[:k])
            parts.append((d, idx))
        if fr == "shuffled":
            parts = shuffled_parts(parts, rng)
        p, agg = cfg.fit(parts)
        s = np.concatenate([d.served(p, agg, cfg.min_tokens, cfg.judge_at) for d in test])
        m = pooled_metrics(y, s)
        rows.append({"train_fraction": fr if fr == "shuffled" else float(fr),
                     "n_train": int(sum(i.size for _, i in parts)),
                     "test.auroc": round(m["auroc"], 4),
                     "test.tpr@fpr0.01": round(m["tpr@fpr0.01"], 4)})
    return rows


@dataclass
class _Window:
    """The window detector's scores and union calibration, from :func:`_window_detector`;
    :meth:`result` builds its DetectorResult once the main detector's test scores exist."""

    probe: LinearProbe
    agg: dict[str, Any]
    levels: dict[str, Any]
    """severity -> ``probes.window.UnionLevel``."""
    calibration: dict[str, Any]
    lists_a: np.ndarray
    lists_b: np.ndarray
    lists_kind: np.ndarray
    """str ``[n_lists]``: each calibration list's filler kind."""
    rows_b: np.ndarray
    rows_a: np.ndarray
    reported_a: np.ndarray
    reported_b: np.ndarray
    test_b: dict[str, np.ndarray]
    scope: str
    datasets: list[str]

    def result(self, main: DetectorResult,
               test_scores: dict[str, tuple[SourceData, np.ndarray]],
               y_test: np.ndarray) -> DetectorResult:
        """The ``harmful_intent_window`` DetectorResult: per test source the window alone
        (``test_sources``, ``test_pooled``) and the union with ``main`` (what a user sees:
        ``union_test_sources``, ``union_test_pooled``), the calibration populations'
        rates and the reported validation lists'."""
        from probes.evaluate import auroc_ci, evaluate_scores
        from probes.export import DetectorResult, threshold_ladder

        thr = threshold_ladder(self.calibration)
        tb = {d.name: (d, self.test_b[d.name]) for d, _ in test_scores.values()}
        ref_pos = np.concatenate([s for d, s in tb.values() if d.source.kind == "harmful"])
        ref_neg = np.concatenate([s for d, s in tb.values() if d.source.kind != "harmful"])
        s_b = np.concatenate([s for _, s in tb.values()])
        pooled = evaluate_scores(y_test, s_b, None, thr)
        pooled["auroc_ci"] = auroc_ci(y_test, s_b)
        s_a = np.concatenate([s for _, s in test_scores.values()])
        union = {name: {"kind": d.source.kind, "role": d.source.role,
                        **union_rates(a, self.test_b[name], self.levels)}
                 for name, (d, a) in test_scores.items()}
        y = y_test.astype(bool)
        metrics: dict[str, Any] = {
            "test_sources": source_rows(tb, thr, ref_pos, ref_neg),
            "test_pooled": pooled,
            "union_test_sources": union,
            "union_test_pooled": {"harmful": union_rates(s_a[y], s_b[y], self.levels),
                                  "benign": union_rates(s_a[~y], s_b[~y], self.levels)},
            "union_calibration": {
                "rows": union_rates(self.rows_a, self.rows_b, self.levels),
                "lists": union_rates(self.lists_a, self.lists_b, self.levels),
                **{f"lists ({k} fillers)": union_rates(self.lists_a[self.lists_kind == k],
                                                           self.lists_b[self.lists_kind == k],
                                                           self.levels)
                   for k in np.unique(self.lists_kind)}},
            "union_validation_lists": union_rates(self.reported_a, self.reported_b,
                                                  self.levels),
            "worst_test": worst_examples(tb),
        }
        scores = {"test (pooled)": (y_test, s_b)}
        for name, (d, s) in tb.items():
            scores[name] = (np.full(s.size, int(d.source.kind == "harmful")), s)
        scores["calibration"] = (np.zeros(self.rows_b.size), self.rows_b)
        return DetectorResult(
            name="harmful_intent_window",
            description=f"the user asks for help causing serious harm, read over the last "
                        f"{self.agg['window_tokens']} {self.scope} tokens (a harmful "
                        "request hidden among benign ones); judged with harmful_intent, "
                        "alert if either fires",
            probe=self.probe, scope=self.scope, aggregation=self.agg, min_tokens=1,
            judge_at="every_token", calibration=self.calibration, metrics=metrics,
            selection=[], datasets=self.datasets,
            token_labels=main.token_labels, scores=scores, component_of=main.name)


def _window_detector(collector: Collector, cache_dir: Path | None, probe: LinearProbe,
                     train: Sequence[SourceData], cal_idx: dict[str, np.ndarray],
                     test: Sequence[SourceData],
                     served_a: Any, cal: dict[str, Any], scope: str, seed: int,
                     limit: int | None, progress: bool, window: int | None) -> _Window:
    """Split calibration of the served union (``probes.window.served_union``): builds the
    calibration lists (``probes.lists.validation_lists``: fillers from the calibration
    rows of the benign training sources only, no harmful list), scores the calibration
    rows and lists with ``harmful_intent`` (``served_a``: a source's served statistic)
    and the window read-out, and moves ``cal``'s ladder to ``harmful_intent``'s share of
    each budget (``thresholds_from``: ``fpr_0.008`` / ``fpr_0.0008``, thresholds on the
    calibration rows alone; ``fpr_0.01`` / ``fpr_0.001`` stay as the detector's own 1% /
    0.1% thresholds for reference)."""
    from probes.calibrate import fpr_key

    n_win = SERVED_WINDOW if window is None else int(window)
    agg_b = {"kind": "window_mean_logit", "window_tokens": n_win}
    n_cal, n_rep = (1000, 200) if limit is None else (max(8, 4 * limit), max(4, limit))
    meta = validation_lists(train, cal_idx, n_per_harmful=0, n_benign=n_rep,
                            n_calibration=n_cal, seed=seed)
    lists = lists_source(meta, collector, cache_dir, [probe.layer], scope, progress)
    la, lb = served_a(lists), lists.served(probe, agg_b, 1, "every_token")
    c_idx, r_idx = meta.where("calibration"), meta.where("benign")
    parts = [d for d in train if cal_idx[d.name].size]
    rows_a = np.concatenate([served_a(d)[cal_idx[d.name]] for d in parts])
    rows_b = np.concatenate([d.served(probe, agg_b, 1, "every_token")[cal_idx[d.name]]
                             for d in parts])
    kinds = np.array(meta.filler_kind)[c_idx]
    levels = served_union(rows_a, rows_b, la[c_idx], lb[c_idx], groups=kinds)
    share = SERVED_SHARE
    for lv in levels.values():  # threshold_at_fpr by row on the calibration rows alone
        cal[fpr_key(lv.fpr_a)] = lv.t_a
    warn, crit = levels["warn"], levels["critical"]
    n_tok = lists.in_scope_tokens()
    union_rule = (
        f"alert if harmful_intent >= its threshold OR harmful_intent_window >= its "
        f"threshold; split calibration (probes.window.split_thresholds): harmful_intent at "
        f"{share:g} x the budget on the {warn.n_rows} calibration rows alone, the window "
        f"the smallest threshold keeping the union <= the budget on those rows AND on the "
        f"calibration lists of each filler kind ("
        + ", ".join(f"{n} {k}" for k, (_, n) in warn.by_group.items())
        + "), each (budget: warn 1%, critical 0.1%)")
    cal["thresholds_from"] = {"warn": fpr_key(warn.fpr_a), "critical": fpr_key(crit.fpr_a)}
    cal["threshold_rule"] = (f"warn = {100 * warn.fpr_a:g}% / critical = "
                             f"{100 * crit.fpr_a:g}% FPR on the calibration rows; the union "
                             "with harmful_intent_window holds 1% / 0.1%")
    cal["union"] = {"with": "harmful_intent_window", "rule": union_rule}
    lists_desc = (f"{warn.n_lists} calibration lists (numbered lists of 4-7 short requests "
                  f"drawn from half of the benign training sources' held-back calibration "
                  f"rows, never fit on, each list's fillers of one kind: "
                  + ", ".join(f"{n} {k}" for k, (_, n) in warn.by_group.items())
                  + f"; user tokens median {int(np.median(n_tok))}, range "
                  f"{int(n_tok.min())}-{int(n_tok.max())})")
    cal_b: dict[str, Any] = {
        "union_fpr_0.01": warn.t_b, "union_fpr_0.001": crit.t_b,
        "thresholds_from": {"warn": "union_fpr_0.01", "critical": "union_fpr_0.001"},
        "threshold_rule": ("the smallest thresholds keeping the union with harmful_intent "
                           "<= 1% (warn) / 0.1% (critical) on the calibration rows and on "
                           "the calibration lists of each filler kind, each"),
        "benign_set": f"{cal['benign_set']}; and {lists_desc}",
        "n_benign": warn.n_rows + warn.n_lists,
        "n_rows": warn.n_rows, "n_lists": warn.n_lists,
        "union": {"with": "harmful_intent", "rule": union_rule,
                  **{sev: {"harmful_intent": lv.t_a, "harmful_intent_window": lv.t_b,
                           "budget": lv.fpr, "harmful_intent_budget": lv.fpr_a,
                           "rows_alerted_harmful_intent": lv.rows_a,
                           "rows_alerted_union": lv.rows_union,
                           "lists_alerted_harmful_intent": lv.lists_a,
                           "lists_alerted_union": lv.lists_union,
                           "lists_alerted_union_by_kind": {
                               k: {"alerted": a, "n": n} for k, (a, n) in lv.by_group.items()}}
                     for sev, lv in levels.items()}},
        "aggregation": agg_b, "min_tokens": 1, "scope": scope, "judge_at": "every_token",
    }
    test_b = {d.name: d.served(probe, agg_b, 1, "every_token") for d in test}
    datasets = [f"the harmful_intent probe (same weights); thresholds on the "
                f"{warn.n_rows} calibration rows and {lists_desc}"]
    return _Window(probe, agg_b, levels, cal_b, la[c_idx], lb[c_idx], kinds, rows_b, rows_a,
                   la[r_idx], lb[r_idx], test_b, scope, datasets)


def harmful_intent_recipe(collector: Collector, cache_dir: Path | None, *, scope: str = "user",
                          sources: Sequence[Source] | None = None,
                          layers: Sequence[int] = LAYERS, Cs: Sequence[float] | None = None,
                          scary_weights: Sequence[float] | None = None,
                          search_layers: Sequence[int] | None = None,
                          served: Sequence[Served] = SERVED,
                          prefixes: Sequence[int] = PREFIXES,
                          limit: int | None = None, explore_readouts: bool = True,
                          seed: int = 0, progress: bool = True,
                          length_debias: bool = True, style: str = "benign",
                          calibration: str = "row", window: int | None = None,
                          pooling: RecipePooling | None = None,
                          temperature: float | None = None,
                          skip_tokens: int | None = None
                          ) -> list[DetectorResult]:
    """Collect → leave-one-source-out selection → fit on all training sources (minus the
    calibration hold-back) → thresholds on the hold-back → evaluate the test sources.

    ``length_debias`` (default on): ``mean_logit`` read-outs carry a length term whose
    slope each probe fits on its own benign fit rows (module doc), and the probe is
    :data:`PINNED`; off reproduces the session-5 recipe (no length term, its grid).
    ``style`` (with the length term only; default ``benign``): the probe is fit with the
    training sources' style directions projected out (``probes.pooled.fit_pooled``; the
    variant study's group 7, chosen on validation folds); "" is the session-6 recipe.
    ``calibration``: the weighting of the held-back benign rows behind every threshold
    (``probes.calibrate`` ``row`` | ``source`` | ``worst``): the shipped thresholds, the
    selection folds' and the validation table's.
    ``search_layers`` / ``Cs`` / ``scary_weights``: the probe grid searched (None: as the
    flag says); search layers not among ``layers`` are dropped (none left: all of
    ``layers``, e.g. for another model's scaled layers).

    ``window`` (None: ``probes.window.SERVED_WINDOW``, 8; 0: off): a second detector
    ``harmful_intent_window`` on the SAME probe, read out as ``window_mean_logit`` over
    the last ``window`` user tokens, every prefix judged (``min_tokens`` 1), against a
    harmful request diluted by benign padding (docs/experiments/window_validation.md, run
    5). Thresholds by split calibration (:func:`_window_detector`): ``harmful_intent``'s
    at ``0.8·α`` on the calibration rows alone, the window's the smallest keeping the
    union ≤ ``α`` on the rows and on calibration lists built from calibration rows only
    (``probes.lists.validation_lists``), each filler kind's lists separately; ``α`` = 1%
    (warn), 0.1% (critical).
    Needs ``calibration`` ``row`` (the rule is stated by row).

    ``pooling`` (None: :data:`DEFAULT_POOLING`) / ``temperature`` (None:
    :data:`DEFAULT_TEMPERATURE`): ``softmax`` fits the softmax probe
    (``probes.token_pool``, ``β = 1/τ``, same layer, C, weights and style projection;
    :func:`fit_probe`) in the selection folds, the shipped fit and the learning curve,
    exports its token logit as the same one-column ``linear_probe`` and serves
    ``softmax_logit`` (``temperature: τ``, its own ``length_slope``) at ``span_end``;
    ``served`` must then be ``search_space(judge_at, "softmax", τ)``'s (checked).
    Thresholds and every reported number are computed on that served statistic.

    ``skip_tokens`` (None: :data:`DEFAULT_SKIP_TOKENS` with mean pooling and the length
    term, else 0): the probe (selection folds, shipped fit, learning curve, read-out
    study) is fit without the first ``k`` in-scope tokens of each request longer than
    ``k`` (``SourceData.skipping``) and served ``mean_logit`` with ``skip_tokens: k``
    (only the read-outs of ``served`` that take it are searched:
    :func:`skipping_served`). Refused with softmax pooling. Returns
    ``[harmful_intent]`` or ``[harmful_intent, harmful_intent_window]``; a ``limit`` smoke build
    too small to build calibration lists from, window left at None, goes without the window
    (logged); any other build refuses (``probes.lists.NoFillerRows``)."""
    from probes.calibrate import calibrate
    from probes.export import DetectorResult, threshold_ladder
    from probes.sources import HARMFUL_SOURCES

    pooling = recipe_pooling(pooling)
    temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    if pooling == "softmax" and any(a != softmax_readout(temperature) for a, *_ in served):
        raise ValueError(f"served: a softmax probe (temperature {temperature:g}) is served "
                         f"as {softmax_readout(temperature)} only; found "
                         f"{[a for a, *_ in served]} (pass search_space(judge_at, "
                         f"'softmax', {temperature:g})[0])")
    if skip_tokens is None:
        skip_tokens = DEFAULT_SKIP_TOKENS if pooling == "mean" and length_debias else 0
    if skip_tokens and pooling != "mean":
        raise ValueError(f"skip_tokens: the first tokens are left out of a MEAN-pooled "
                         f"probe; expected 0 with pooling {pooling!r}, found {skip_tokens}")
    served = skipping_served(served, skip_tokens)
    sources = HARMFUL_SOURCES if sources is None else sources
    data = load_sources(collector, cache_dir, sources, scope, layers, progress, limit)
    train = [d for d in data.values() if d.source.role == "train"]
    test = [d for d in data.values() if d.source.role == "test"]
    test += list(long_sources(data, collector, cache_dir, scope, layers, progress, seed,
                              60 if limit is None else max(4, limit // 4)).values())
    fit_idx, cal_idx = split_calibration(train, seed)
    grid = PINNED if length_debias else {"layers": SEARCH_LAYERS, "Cs": CS,
                                         "scary_weights": SCARY_WEIGHTS}
    search_layers = [int(x) for x in grid["layers"]] if search_layers is None else search_layers
    Cs = grid["Cs"] if Cs is None else Cs
    scary_weights = grid["scary_weights"] if scary_weights is None else scary_weights
    search = [x for x in search_layers if x in layers] or list(layers)
    cfg, table = select(train, fit_idx, cal_idx, search, Cs, scary_weights, served, prefixes,
                        progress, length_debias, style if length_debias else "", calibration,
                        pooling, temperature, skip_tokens)
    log.info("harmful_intent: chose %s", cfg.label())

    fit_parts = [(d, fit_idx[d.name]) for d in train]
    probe, agg = cfg.fit(fit_parts)
    slope = float(agg.get("length_slope", 0.0))

    def served_of(d: SourceData) -> np.ndarray:
        return d.served(probe, agg, cfg.min_tokens, cfg.judge_at)

    cal_parts = [(d, served_of(d)[cal_idx[d.name]]) for d in train if cal_idx[d.name].size]
    s_cal = np.concatenate([s for _, s in cal_parts])
    g_cal = np.concatenate([np.full(s.size, d.name) for d, s in cal_parts])
    cal_desc = ("held-back 30% of every benign training source ("
                + ", ".join(f"{d.name} {s.size}" for d, s in cal_parts) + "), never fit on")
    cal = calibrate(s_cal, benign_set=cal_desc, groups=g_cal, weighting=calibration)
    win = None
    if window is None or window > 0:
        if calibration != "row":
            raise ValueError(f"calibration: the window detector's split calibration is "
                             f"stated by row; expected row with window on, found "
                             f"{calibration!r} (pass window=0)")
        try:
            win = _window_detector(collector, cache_dir, probe, train, cal_idx, test,
                                   served_of, cal, scope, seed, limit, progress, window)
        except NoFillerRows as e:
            # Only a data-budget smoke build (``limit``: its numbers mean nothing) with the
            # window left at its default may go without it; a real build, or one that
            # asked for a window, refuses.
            if limit is None or window is not None:
                raise
            log.warning("harmful_intent_window NOT built (--limit %d leaves no lists to "
                        "calibrate it on): %s", limit, e)
    thr = threshold_ladder(cal)

    test_scores = {d.name: (d, served_of(d)) for d in test}
    ref_pos = np.concatenate([s for d, s in test_scores.values() if d.source.kind == "harmful"])
    ref_neg = np.concatenate([s for d, s in test_scores.values() if d.source.kind != "harmful"])
    # out-of-source scores of the training sources under the chosen config (validation)
    folds = loso_folds(train, fit_idx, cal_idx, cfg.layer, cfg.C, cfg.scary_weight,
                       [(cfg.agg, cfg.min_tokens, cfg.scale, cfg.judge_at)], cfg.prefixes,
                       cfg.length_debias, cfg.style, cfg.pooling, cfg.temperature,
                       cfg.skip_tokens)
    y_test = np.concatenate([np.full(s.size, d.source.kind == "harmful")
                             for d, s in test_scores.values()]).astype(np.int8)
    s_test = np.concatenate([s for _, s in test_scores.values()])
    from probes.evaluate import auroc_ci, evaluate_scores

    pooled = evaluate_scores(y_test, s_test, None, thr)
    pooled["auroc_ci"] = auroc_ci(y_test, s_test)
    # the same probe read out as the request-level pooled logit (the mean logit, servable
    # as mean_logit at span_end; a softmax probe's softmax-pooled logit, softmax_logit;
    # minus the same length term), to show what the chosen served statistic costs on the
    # test sources
    views = [d.skipping(cfg.skip_tokens) for d, _ in test_scores.values()]
    z_test = np.concatenate([request_logits(probe, v, cfg.tau)
                             - slope * log_tokens(v.in_scope_tokens()) for v in views])
    ref_kind = "softmax_logit" if cfg.pooling == "softmax" else "mean_logit"
    pooled[f"{ref_kind}.auroc"] = auroc(y_test, z_test)
    pooled[f"{ref_kind}.tpr@fpr0.01"] = tpr_at_fpr(y_test, z_test, 0.01)
    metrics: dict[str, Any] = {
        "test_sources": source_rows(test_scores, thr, ref_pos, ref_neg),
        "test_categories": source_rows(category_scores(test_scores), thr, ref_pos, ref_neg),
        "category_min_rows": CATEGORY_MIN_ROWS,
        "validation_sources": fold_rows(folds, 1, calibration),
        "validation_categories": fold_category_rows(folds, 1, calibration),
        "test_pooled": pooled,
        "calibration_set": calibration_rates(s_cal, g_cal, thr),
        "worst_test": worst_examples(test_scores),
        "learning_curve": learning_curve(train, test, fit_idx, cfg, seed=seed),
    }
    if explore_readouts:
        metrics["readouts"] = explore(train, fit_idx, cal_idx, cfg, layers, calibration)
    cal.update({"aggregation": agg, "min_tokens": cfg.min_tokens, "scope": scope,
                "judge_at": cfg.judge_at})
    if cfg.pooling == "softmax":
        cal["pooling"] = (
            f"softmax probe (probes.token_pool, tau = {cfg.temperature:g}): trained on the "
            f"softmax-pooled request logit of its per-token logits, served as "
            f"softmax_logit with the same temperature")
    if cfg.skip_tokens:
        cal["skip_tokens"] = cfg.skip_tokens
        cal["skip_tokens_fit"] = (
            f"the probe and its length slope are fit on the mean of the {scope}-token rows "
            f"after the first {cfg.skip_tokens} of every request longer than that (all rows "
            f"otherwise); served as {agg['kind']} skip_tokens, thresholds calibrated with it")
    if cfg.style:
        cal["style_projection"] = (
            f"the {cfg.style} training sources' style directions (the span of their "
            "standardised mean features minus their class mean) projected out of the "
            "weight before serving: every such source has the same mean logit")
    if cfg.length_debias:
        n_fit = sum(int((d.labels[i] == 0).sum()) for d, i in fit_parts)
        cal["length_slope"] = slope
        cal["length_slope_fit"] = (
            f"least-squares slope of the pooled {scope}-token logit on log(in-scope tokens) "
            f"over the {n_fit} benign FIT requests (never the calibration or test rows); "
            f"served as {agg['kind']} length_slope, thresholds calibrated with it")
    scores = {"test (pooled)": (y_test, s_test)}
    for d, s in test_scores.values():
        scores[d.name] = (np.full(s.size, int(d.source.kind == "harmful")), s)
    scores["calibration"] = (np.zeros(s_cal.size), s_cal)
    main = DetectorResult(
        name="harmful_intent",
        description=f"the user asks for help causing serious harm ({scope} tokens)",
        probe=probe, scope=scope, aggregation=agg, min_tokens=cfg.min_tokens,
        judge_at=cfg.judge_at, calibration=cal, metrics=metrics, selection=table[:16],
        datasets=[f"{d.name} ({d.source.kind}, {len(d.examples)}: "
                  f"{fit_idx[d.name].size} fit, {cal_idx[d.name].size} calibration)"
                  for d in train] +
                 [f"TEST {d.name} ({d.source.kind}, {len(d.examples)})" for d in test],
        token_labels=(f"request label on the mean of the {scope}-token activations "
                      if cfg.pooling == "mean" else
                      f"request label on the softmax-pooled (tau = {cfg.temperature:g}) "
                      f"logit of the {scope}-token logits ")
                     + "(each source the same total weight within its class)",
        scores=scores,
    )
    if win is None:
        return [main]
    return [main, win.result(main, test_scores, y_test)]
