"""Generalisation study of ``harmful_intent``: leave-one-source-out over EVERY source.

The recipe (:mod:`probes.harmful`) keeps whole sources out as a frozen test set and
selects on leave-one-source-out (LOSO) folds of the training sources. This study asks a
different question — *how well does the recipe do on a style of request it has never
seen?* — by holding out each source in turn, train and test roles alike:

- fold ``S``: a probe is fit (:func:`probes.harmful.fit_pooled`, the recipe's own fit) on
  the fit rows of every other source; thresholds come from the held-back benign rows of
  the other sources (``split_calibration``, 30% per benign source); ``S`` is scored whole.
  This is :func:`probes.harmful.loso_folds` run over all sources.
- scores of different folds live on different scales, so they are pooled through each
  fold's own calibration rows: ``u = F_cal(s)``, the share of the fold's calibration
  logits strictly below ``s`` (the empirical CDF; ``u ≥ 0.99`` ⇔ above the fold's warn
  threshold at 1% FPR, up to ties). Pooled AUROC is computed on ``u``.

Read-outs compared (request level, one feature vector per request, float32 ``[n, d]``):
``user``: mean over the user's message tokens (what is served); ``post``: mean over the
template tokens after the last user token (end-of-turn + the generation prompt, where
refusal directions are usually read); ``prompt``: mean over every prompt token.

Nothing here is served or shipped: it produces the evidence table in docs/PROBES.md
(``safety-probes study-loso``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from probes.evaluate import auroc
from probes.harmful import (
    SourceData,
    fit_pooled,
    kind_weights,
    source_weights,
    split_calibration,
)
from probes.train import fit_length_slope, fit_logreg

__all__ = ["ORDINARY", "StudyRow", "Summary", "Variant", "VariantRow", "ecdf_scores",
           "loso_all", "loso_scores", "readout_mask", "run_variants", "study_table",
           "summarise", "variants", "variants_markdown"]

ORDINARY = frozenset({"alpaca", "self_instruct", "mtbench", "oasst",
                      "coconot_noncompliance", "project_benign"})
"""Ordinary-chat sources (benign, not scary): the false-alert rate users feel most."""


def ecdf_scores(cal: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``u_i = |{c ∈ cal : c < s_i}| / |cal|`` (float64 ``[n]``): a fold's scores on the
    scale shared by all folds (the empirical CDF of its calibration rows)."""
    c = np.sort(np.asarray(cal, dtype=np.float64))
    if c.size == 0:
        raise ValueError("ecdf_scores: cal must not be empty (a fold without calibration rows)")
    return np.searchsorted(c, np.asarray(s, dtype=np.float64), side="left") / c.size


def readout_mask(roles: np.ndarray, example: np.ndarray, readout: str) -> np.ndarray:
    """Rows of a read-out (bool ``[n_rows]``); rows grouped by example (collect order).

    ``user`` and ``prompt``: the served scopes of those names (``monitor.roles.scope_mask``,
    the tracker's own table); ``post``: prompt rows after the example's last USER row
    (none for an example without user rows)."""
    from monitor.roles import TokenRole, scope_mask

    roles = np.asarray(roles, dtype=np.int8)
    if readout in ("user", "prompt"):
        return scope_mask(readout)[roles]
    if readout != "post":
        raise ValueError(f"readout: expected user, post or prompt; found {readout!r}")
    user = roles == int(TokenRole.USER)
    idx = np.arange(roles.size)
    n_ex = int(example.max()) + 1 if example.size else 0
    last_user = np.full(n_ex, -1, dtype=np.int64)
    np.maximum.at(last_user, example[user], idx[user])
    lu = last_user[example]
    return scope_mask("prompt")[roles] & (lu >= 0) & (idx > lu)


# ----------------------------------------------------------------------- LOSO machinery
Parts = Sequence[tuple[SourceData, np.ndarray]]
"""Training rows: ``(source, row indices into that source)`` per source."""
Scorer = Callable[[SourceData], np.ndarray]
"""Scores every example of a source: float64 ``[n_examples]`` (higher = more harmful)."""
Fitter = Callable[[Parts], Scorer]
"""Fits a detector on the given rows and returns its scorer."""


def loso_scores(data: Sequence[SourceData], fit: Fitter, seed: int = 0
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every source scored by a detector fit without it (leave one source out over every
    source): fold ``S`` fits on the fit rows (``split_calibration``) of every other source
    and scores all of ``S`` and the other sources' held-back benign rows. Returns
    ``(u, raw)`` per source: ``u`` on the scale shared by all folds (:func:`ecdf_scores`
    of the fold's calibration rows), ``raw`` the detector's own scores."""
    fit_idx, cal_idx = split_calibration(data, seed)
    u, raw = {}, {}
    for held in data:
        others = [d for d in data if d.name != held.name]
        score = fit([(d, fit_idx[d.name]) for d in others])
        cal = [score(d)[cal_idx[d.name]] for d in others if cal_idx[d.name].size]
        if not cal:
            raise ValueError(f"loso_scores: fold {held.name!r} has no calibration rows "
                             "(expected at least one other benign source)")
        raw[held.name] = np.asarray(score(held), dtype=np.float64)
        u[held.name] = ecdf_scores(np.concatenate(cal), raw[held.name])
    return u, raw


def loso_all(data: Sequence[SourceData], layer: int, C: float, scary_weight: float = 1.0
             ) -> dict[str, np.ndarray]:
    """Every source scored by the recipe's linear probe (:func:`linear`) fit without it,
    as ``u`` (:func:`ecdf_scores`)."""
    return loso_scores(data, linear(layer, C, kind_weights(scary_weight)))[0]


WARN_U = 0.99
"""``u ≥ WARN_U`` ⇔ at or above the fold's warn threshold (1% FPR on its calibration rows)."""


@dataclass(frozen=True)
class Summary:
    """Pooled LOSO results of one detector (every source scored unseen).

    AUROC: harmful sources pooled against ordinary chat (:data:`ORDINARY`) or every benign
    source, with a 95% stratified bootstrap interval over requests; rates: the share of a
    group's requests at or above its fold's warn threshold, with 95% Wilson intervals;
    ``n``: requests per group."""

    auroc_ordinary: float
    auroc_ordinary_ci: tuple[float, float]
    auroc_all_benign: float
    tpr_warn: float
    fpr_warn_ordinary: float
    fpr_warn_scary: float
    fpr_warn_persona: float
    rate_ci: dict[str, tuple[float, float]]
    """group (harmful, ordinary, scary, persona) -> Wilson 95% interval of its rate."""
    n: dict[str, int]
    """group -> number of requests."""
    per_source: dict[str, tuple[str, int, float]]
    """source -> (kind, n, rate at the fold's warn threshold)."""


def summarise(u: dict[str, np.ndarray], kind: dict[str, str], n_boot: int = 200) -> Summary:
    """:class:`Summary` of per-source ``u`` scores (:func:`loso_scores`); ``kind``: source
    -> harmful | benign | scary | persona."""
    from probes.evaluate import auroc_ci, wilson_ci

    groups = {"harmful": [n for n in u if kind[n] == "harmful"],
              "ordinary": [n for n in u if n in ORDINARY],
              "scary": [n for n in u if kind[n] == "scary"],
              "persona": [n for n in u if kind[n] == "persona"]}
    neg = [n for n in u if kind[n] != "harmful"]
    if not groups["harmful"] or not groups["ordinary"]:
        raise ValueError("summarise: expected harmful and ordinary-chat sources; found "
                         f"{sorted(u)}")
    h = np.concatenate([u[n] for n in groups["harmful"]])

    def both(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        b = np.concatenate([u[n] for n in names])
        return np.r_[np.ones(h.size), np.zeros(b.size)], np.r_[h, b]

    hits = {g: (int(sum(int(np.sum(u[n] >= WARN_U)) for n in ns)),
                int(sum(u[n].size for n in ns))) for g, ns in groups.items()}
    rate = {g: k / m if m else float("nan") for g, (k, m) in hits.items()}
    return Summary(
        auroc(*both(groups["ordinary"])), auroc_ci(*both(groups["ordinary"]), n_boot=n_boot),
        auroc(*both(neg)), rate["harmful"], rate["ordinary"], rate["scary"], rate["persona"],
        {g: wilson_ci(k, m) for g, (k, m) in hits.items()}, {g: m for g, (_, m) in hits.items()},
        {n: (kind[n], int(u[n].size), float(np.mean(u[n] >= WARN_U))) for n in u})


@dataclass(frozen=True)
class StudyRow:
    """One (read-out, layer, C) point of the linear probe."""

    readout: str
    layer: int
    C: float
    summary: Summary


def study_table(data: Sequence[SourceData], readout: str, layer: int, C: float) -> StudyRow:
    """The recipe's linear probe (scary weight 1), leave one source out, summarised."""
    u = loso_all(data, layer, C, 1.0)
    return StudyRow(readout, layer, C, summarise(u, {d.name: d.source.kind for d in data}))


def markdown(rows: Sequence[StudyRow]) -> str:
    """The summary table and, for the first row, the per-source table."""
    out = ["| read-out | layer | C | AUROC vs ordinary chat | AUROC vs all benign | "
           "detection at warn | false alerts: ordinary | scary | persona |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r.summary
        out.append(f"| {r.readout} | {r.layer} | {r.C:g} | {m.auroc_ordinary:.3f} | "
                   f"{m.auroc_all_benign:.3f} | {m.tpr_warn:.3f} | {m.fpr_warn_ordinary:.3f} | "
                   f"{m.fpr_warn_scary:.3f} | {m.fpr_warn_persona:.3f} |")
    if rows:
        r = rows[0]
        out += ["", f"Per source ({r.readout}, layer {r.layer}, C={r.C:g}); each source "
                "scored by the probe fit without it:", "",
                "| source | kind | n | rate at warn |", "|---|---|---:|---:|"]
        for n, (k, cnt, rate) in sorted(r.summary.per_source.items(),
                                        key=lambda t: (t[1][0], t[0])):
            out.append(f"| {n} | {k} | {cnt} | {rate:.3f} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------- detectors (fitters)
def _xy(parts: Parts, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of ``layers`` concatenated (float32 ``[n, d·len(layers)]``) and
    labels (int8 ``[n]``) of the given rows."""
    x = np.concatenate([np.concatenate([d.features(lay)[i] for lay in layers], 1)
                        for d, i in parts])
    return x, np.concatenate([d.labels[i] for d, i in parts])


def _feats(d: SourceData, layers: Sequence[int]) -> np.ndarray:
    return np.concatenate([d.features(lay) for lay in layers], 1)


def _standardiser(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu, sd = x.mean(0), x.std(0) + 1e-4
    return lambda z: (z - mu) / sd


def linear(layer: int, C: float, kind_weight: dict[str, float] | None = None) -> Fitter:
    """The recipe's probe (:func:`probes.harmful.fit_pooled`: standardised L2 logistic
    regression, every source the same total weight within its class, times
    ``kind_weight``); score = the pooled logit ``((x̄ − μ)/σ)·w + b`` (what ``mean_logit``
    at ``span_end`` serves)."""
    kw = kind_weights(1.0) if kind_weight is None else kind_weight

    def fit(parts: Parts) -> Scorer:
        p = fit_pooled(parts, layer, C, kw)
        return lambda d: (((d.features(layer) - p.mean) / p.std) @ p.weight
                          + p.bias).astype(np.float64)
    return fit


def concat(layers: Sequence[int], C: float) -> Fitter:
    """One logistic regression on the user means of several layers concatenated
    (standardised, source-balanced weights). Served it would be a sum of per-layer mean
    logits: ``z = Σ_l ((x̄_l − μ_l)/σ_l)·w_l + b``."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.linear_model import LogisticRegression

        x, y = _xy(parts, layers)
        st = _standardiser(x)
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=500)
        clf.fit(st(x), y, sample_weight=source_weights(parts, kind_weights(1.0)))
        return lambda d: clf.decision_function(st(_feats(d, layers))).astype(np.float64)
    return fit


def ensemble(layers: Sequence[int], C: float) -> Fitter:
    """Mean of the pooled logits of one :func:`linear` probe per layer."""
    def fit(parts: Parts) -> Scorer:
        fs = [linear(lay, C)(parts) for lay in layers]
        return lambda d: np.mean([f(d) for f in fs], axis=0)
    return fit


def lda_shrunk(layer: int) -> Fitter:
    """Whitened linear: Fisher's discriminant with a Ledoit-Wolf shrunk within-class
    covariance on standardised features, ``w = Σ⁻¹(μ₁ − μ₀)`` (class means weighted by the
    source-balanced weights), score ``(x − (μ₁ + μ₀)/2)·w``. One linear probe."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.covariance import ledoit_wolf

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        xs = st(x).astype(np.float64)
        w = source_weights(parts, kind_weights(1.0))
        m1 = np.average(xs[y == 1], axis=0, weights=w[y == 1])
        m0 = np.average(xs[y == 0], axis=0, weights=w[y == 0])
        resid = xs - np.where((y == 1)[:, None], m1, m0)
        cov, _ = ledoit_wolf(resid, assume_centered=True)
        wv = np.linalg.solve(cov, m1 - m0)
        mid = (m1 + m0) / 2
        return lambda d: (st(d.features(layer)).astype(np.float64) - mid) @ wv
    return fit


def pca_logreg(layer: int, k: int, C: float) -> Fitter:
    """PCA (``k`` components of the standardised training features) then logistic
    regression (source-balanced weights). Linear overall: one linear probe."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        pca = PCA(k, random_state=0).fit(st(x))
        z = pca.transform(st(x))
        zs = _standardiser(z)
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=500)
        clf.fit(zs(z), y, sample_weight=source_weights(parts, kind_weights(1.0)))
        return lambda d: clf.decision_function(
            zs(pca.transform(st(d.features(layer))))).astype(np.float64)
    return fit


def class_balanced(layer: int, C: float, kind_weight: dict[str, float] | None = None
                   ) -> Fitter:
    """The linear probe WITHOUT per-source balancing: every request of a class the same
    weight (times its source's ``kind_weight`` multiplier), what per-source weights buy."""
    kw = kind_weights(1.0) if kind_weight is None else kind_weight

    def fit(parts: Parts) -> Scorer:
        x, y = _xy(parts, [layer])
        p = fit_logreg(x, y, layer, C, source_weights(parts, kw, per_source=False),
                       max_iter=500)
        return lambda d: (((d.features(layer) - p.mean) / p.std) @ p.weight
                          + p.bias).astype(np.float64)
    return fit


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def mlp(layers: Sequence[int], hidden: int = 64, alpha: float = 1.0) -> Fitter:
    """A small MLP head (sklearn, ReLU, early stopping on 10% of the rows) on standardised
    pooled features; sklearn's MLP takes no sample weights, so harmful rows are
    oversampled to balance the classes. Score: log-odds."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.neural_network import MLPClassifier

        x, y = _xy(parts, layers)
        st = _standardiser(x)
        rng = np.random.default_rng(0)
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        small, big = (pos, neg) if pos.size < neg.size else (neg, pos)
        idx = np.r_[big, small, rng.choice(small, big.size - small.size)]
        clf = MLPClassifier((hidden,), alpha=alpha, max_iter=200, early_stopping=True,
                            random_state=0)
        clf.fit(st(x)[idx], y[idx])
        return lambda d: _logit(clf.predict_proba(st(_feats(d, layers)))[:, 1])
    return fit


def gbt_pca(layer: int, k: int = 32) -> Fitter:
    """Gradient-boosted trees (sklearn ``HistGradientBoostingClassifier``, early stopping)
    on ``k`` PCA components of the standardised features, source-balanced weights."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.decomposition import PCA
        from sklearn.ensemble import HistGradientBoostingClassifier

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        pca = PCA(k, random_state=0).fit(st(x))
        clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05,
                                             early_stopping=True, random_state=0)
        clf.fit(pca.transform(st(x)), y, sample_weight=source_weights(parts, kind_weights(1.0)))
        return lambda d: clf.decision_function(
            pca.transform(st(d.features(layer)))).astype(np.float64)
    return fit


def knn(layer: int, k: int = 25, n_pca: int = 64) -> Fitter:
    """k nearest neighbours (cosine, on ``n_pca`` PCA components of the standardised
    features): score = the source-balanced weight share of harmful neighbours, plus a
    1e-3 tie-break by the mean cosine similarity to harmful minus benign neighbours."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.decomposition import PCA

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        pca = PCA(n_pca, random_state=0).fit(st(x))

        def emb(f: np.ndarray) -> np.ndarray:
            z = pca.transform(st(f))
            return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-9)

        ref, w = emb(x), source_weights(parts, kind_weights(1.0))

        def score(d: SourceData) -> np.ndarray:
            sim = emb(d.features(layer)) @ ref.T
            nb = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            wn, yn = w[nb], y[nb] == 1
            sn = np.take_along_axis(sim, nb, 1)
            share = (wn * yn).sum(1) / wn.sum(1)
            tie = (np.where(yn, sn, 0).sum(1) - np.where(yn, 0, sn).sum(1)) / k
            return share + 1e-3 * tie
        return score
    return fit


def cascade(first: Fitter, second: Fitter, band: tuple[float, float] = (0.9, 0.999)
            ) -> Fitter:
    """Two stages: ``first`` decides confident requests; a request whose first-stage score
    lies in the band between the ``band`` quantiles of the first stage's scores on the
    benign TRAINING rows goes to ``second``. Score (ordered by stage): below the band
    ``F₁(s₁)`` ∈ [0, 1), in the band ``1 + F₂(s₂)/2`` ∈ [1, 1.5] (so a stage-2 score above
    every benign one stays inside the band's range), above it ``2 + F₁(s₁)``, with ``F``
    each stage's empirical CDF on the benign training rows. In the band ⇔ ``1 ≤ score < 2``
    (:func:`stage2_share`)."""
    def fit(parts: Parts) -> Scorer:
        f1, f2 = first(parts), second(parts)
        neg = [(d, i[d.labels[i] == 0]) for d, i in parts]
        n1 = np.sort(np.concatenate([f1(d)[i] for d, i in neg]))
        n2 = np.sort(np.concatenate([f2(d)[i] for d, i in neg]))
        lo, hi = np.quantile(n1, band[0]), np.quantile(n1, band[1])

        def score(d: SourceData) -> np.ndarray:
            s1 = f1(d)
            u1 = ecdf_scores(n1, s1)
            mid = (s1 >= lo) & (s1 <= hi)
            out = np.where(s1 > hi, 2.0 + u1, u1)
            if mid.any():
                out[mid] = 1.0 + 0.5 * ecdf_scores(n2, f2(d)[mid])
            return out
        return score
    return fit


def stage2_share(raw: dict[str, np.ndarray]) -> float:
    """Share of all requests a :func:`cascade` sent to its second stage."""
    r = np.concatenate(list(raw.values()))
    return float(np.mean((r >= 1.0) & (r < 2.0)))


def user_tokens(d: SourceData) -> np.ndarray:
    """In-scope (user) tokens per example: int64 ``[n_examples]``."""
    return np.bincount(d.acts.example[d.mask], minlength=d.acts.n_examples).astype(np.int64)


def length_debiased(base: Fitter) -> Fitter:
    """``base``'s score minus its least-squares slope on ``log(n_user_tokens)`` over the
    benign training rows: ``s' = s − a·log(max(n, 1))``."""
    def fit(parts: Parts) -> Scorer:
        f = base(parts)
        s = np.concatenate([f(d)[i[d.labels[i] == 0]] for d, i in parts])
        n = np.concatenate([user_tokens(d)[i[d.labels[i] == 0]] for d, i in parts])
        a = fit_length_slope(s, n)
        return lambda d: f(d) - a * np.log(np.maximum(user_tokens(d), 1))
    return fit


# ----------------------------------------------------------------------- the variant study
@dataclass(frozen=True)
class Variant:
    """One detector of the study: its group (issue item), name, servability and fitter."""

    group: str
    name: str
    servable: str
    fit: Fitter


@dataclass(frozen=True)
class VariantRow:
    variant: Variant
    summary: Summary
    stage2_share: float | None
    seconds: float


BASE = 15, 1e-3
"""The shipped recipe's layer and C (user scope, pooled mean logit at span_end)."""


def variants(layers: Sequence[int] = (9, 12, 15, 18)) -> list[Variant]:
    """The variants compared (issue 14, "probes that hold up"); layers: those collected."""
    lay, C = BASE
    mid = [x for x in (12, 15, 18) if x in layers]
    one = "yes: one linear probe"
    # a detector's inputs are a logit sum (monitor/score/bundle.py DetectorSpec), but every
    # input of one detector must read the same layer: several layers are not servable
    multi = "no: needs a multi-layer logit sum"
    # the served mean_logit aggregation's length_slope (monitor.judge.aggregate)
    lterm = "yes: one linear probe + mean_logit length_slope"
    head = "no: non-linear head"
    hard = {"scary": 3.0, "persona": 3.0, "coconot_noncompliance": 3.0}
    return [
        Variant("baseline", f"linear L{lay} C={C:g} (shipped recipe)", one, linear(lay, C)),
        Variant("1 layers", f"concat L{'+'.join(map(str, mid))} C={C / len(mid):g}", multi,
                concat(mid, C / len(mid))),
        Variant("1 layers", f"concat L{'+'.join(map(str, mid))} C={C:g}", multi,
                concat(mid, C)),
        Variant("1 layers", f"concat L{'+'.join(map(str, layers))} C={C / len(layers):g}",
                multi, concat(layers, C / len(layers))),
        Variant("1 layers", f"ensemble: mean logit of L{'/'.join(map(str, mid))} probes",
                multi, ensemble(mid, C)),
        Variant("1 layers", f"ensemble: mean logit of L{'/'.join(map(str, layers))} probes",
                multi, ensemble(layers, C)),
        Variant("2 linear", f"LDA, Ledoit-Wolf shrinkage, L{lay}", one, lda_shrunk(lay)),
        Variant("2 linear", f"PCA-64 -> LR C=0.01, L{lay}", one, pca_logreg(lay, 64, 1e-2)),
        Variant("2 linear", f"no per-source balance (class-balanced only), L{lay}", one,
                class_balanced(lay, C)),
        Variant("3 non-linear", f"MLP 64 hidden alpha=1, L{lay}", head, mlp([lay])),
        Variant("3 non-linear", f"MLP 64 hidden alpha=1, L{'+'.join(map(str, mid))}", head,
                mlp(mid)),
        Variant("3 non-linear", f"gradient-boosted trees on PCA-32, L{lay}", head, gbt_pca(lay)),
        Variant("3 non-linear", f"kNN k=25 cosine on PCA-64, L{lay}", head, knn(lay)),
        Variant("4 cascade", f"linear L{lay} -> concat L{'+'.join(map(str, mid))} in band "
                "q0.9-q0.999", "no: two stages", cascade(linear(lay, C),
                                                        concat(mid, C / len(mid)))),
        Variant("4 cascade", f"linear L{lay} -> MLP L{lay} in band q0.9-q0.999",
                "no: two stages", cascade(linear(lay, C), mlp([lay]))),
        Variant("5 negatives", f"scary+persona x3, L{lay}", one,
                linear(lay, C, kind_weights(3.0))),
        Variant("5 negatives", f"scary+persona+coconot_noncompliance x3, L{lay}", one,
                linear(lay, C, hard)),
        Variant("5 negatives", f"no per-source balance, scary+persona+coconot_noncompliance"
                f" x3, L{lay}", one, class_balanced(lay, C, hard)),
        Variant("5 negatives", f"length-debiased linear L{lay} (- a log n_user)", lterm,
                length_debiased(linear(lay, C))),
        *(Variant("6 length term", f"length-debiased linear L{la} C={c:g}", lterm,
                  length_debiased(linear(la, c)))
          for la, c in ((lay, 3e-3), (lay, 1e-2), (18, 3e-3)) if la in layers),
        *(Variant("6 length term", f"length-debiased, no per-source balance, L{lay} C={c:g}",
                  lterm, length_debiased(class_balanced(lay, c))) for c in (1e-3, 3e-3)),
    ]


def run_variants(data: Sequence[SourceData], vs: Sequence[Variant],
                 progress: Callable[[VariantRow], None] | None = None) -> list[VariantRow]:
    """Each variant through :func:`loso_scores` and :func:`summarise`."""
    import time

    kind = {d.name: d.source.kind for d in data}
    rows = []
    for v in vs:
        t0 = time.perf_counter()
        u, raw = loso_scores(data, v.fit)
        share = stage2_share(raw) if v.group.endswith("cascade") else None
        rows.append(VariantRow(v, summarise(u, kind), share, time.perf_counter() - t0))
        if progress is not None:
            progress(rows[-1])
    return rows


def _ci(r: tuple[float, float]) -> str:
    return f"[{r[0]:.3f}, {r[1]:.3f}]"


def variant_line(r: VariantRow) -> str:
    m = r.summary
    share = "" if r.stage2_share is None else f"{r.stage2_share:.3f}"
    return (f"| {r.variant.group} | {r.variant.name} | {r.variant.servable} | "
            f"{m.auroc_ordinary:.3f} {_ci(m.auroc_ordinary_ci)} | {m.auroc_all_benign:.3f} | "
            f"{m.tpr_warn:.3f} {_ci(m.rate_ci['harmful'])} | "
            f"{m.fpr_warn_ordinary:.3f} {_ci(m.rate_ci['ordinary'])} | "
            f"{m.fpr_warn_scary:.3f} {_ci(m.rate_ci['scary'])} | {m.fpr_warn_persona:.3f} | "
            f"{share} | {r.seconds:.0f} |")


def variants_markdown(rows: Sequence[VariantRow]) -> str:
    """The variant table, then per-source rates at warn of the baseline and the variant
    with the best pooled AUROC vs ordinary chat."""
    out = ["| group | variant | servable today | AUROC vs ordinary chat [95% CI] | "
           "AUROC vs all benign | detection at warn [CI] | false alerts: ordinary [CI] | "
           "scary [CI] | persona | stage-2 share | s |",
           "|---|---|---|---|---:|---|---|---|---:|---:|---:|"]
    out += [variant_line(r) for r in rows]
    if not rows:
        return "\n".join(out) + "\n"
    n = rows[0].summary.n
    out += ["", "Requests per group (every variant): "
            + ", ".join(f"{g} {k}" for g, k in n.items()) + "."]
    base = rows[0]
    best = max(rows, key=lambda r: r.summary.auroc_ordinary)
    out += ["", f"Per source, rate at warn: baseline ({base.variant.name}) and best pooled "
            f"AUROC vs ordinary chat ({best.variant.name}); each source scored unseen:", "",
            "| source | kind | n | baseline | best |", "|---|---|---:|---:|---:|"]
    for s, (k, cnt, rate) in sorted(base.summary.per_source.items(),
                                    key=lambda t: (t[1][0], t[0])):
        out.append(f"| {s} | {k} | {cnt} | {rate:.3f} | "
                   f"{best.summary.per_source[s][2]:.3f} |")
    return "\n".join(out) + "\n"
