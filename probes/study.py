"""Generalisation study of ``harmful_intent``: leave-one-source-out over EVERY source.

The recipe (:mod:`probes.harmful`) keeps whole sources out as a frozen test set and
selects on leave-one-source-out (LOSO) folds of the training sources. This study asks a
different question — *how well does the recipe do on a style of request it has never
seen?* — by holding out each source in turn, train and test roles alike:

- fold ``S``: a probe is fit (:func:`probes.pooled.fit_pooled`, the recipe's own fit) on
  the fit rows of every other source; thresholds come from the held-back benign rows of
  the other sources (``split_calibration``, 30% per benign source); ``S`` is scored whole.
  This is :func:`probes.harmful.loso_folds` run over all sources.
- scores of different folds live on different scales, so they are pooled through each
  fold's own calibration rows: ``u = F_cal(s)``, the share of the fold's calibration
  logits strictly below ``s`` (the empirical CDF; ``u ≥ 0.99`` ⇔ at or above the fold's
  warn threshold at 1% FPR). Pooled AUROC is computed on ``u``. With a calibration
  weighting (``probes.calibrate``: ``source``, ``worst``) ``F_cal`` is the weighted CDF
  (the mean, or the minimum, of the per-source CDFs) and the warn threshold the
  weighted one: the ``weightings`` axis of :func:`run_variants`.

Read-outs compared (request level, one feature vector per request, float32 ``[n, d]``):
``user``: mean over the user's message tokens (what is served); ``post``: mean over the
template tokens after the last user token (end-of-turn + the generation prompt, where
refusal directions are usually read); ``prompt``: mean over every prompt token.

Nothing here is served or shipped: it produces the evidence table in docs/PROBES.md
(``safety-probes study-loso``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from probes.calibrate import RATE_TOL
from probes.evaluate import auroc
from probes.harmful import split_calibration
from probes.pooled import (
    Fitter,
    Fold,
    SourceData,
    average,
    cascade,
    class_balanced,
    concat,
    conjunction,
    contrast,
    ecdf_scores,
    ensemble,
    fitter_folds,
    gbt_pca,
    group_dro,
    kind_weights,
    knn,
    lda_shrunk,
    length_debiased,
    linear,
    mlp,
    pca_logreg,
    skip_first,
    source_bagging,
    stage2_share,
)
from probes.sources import Source, kept_rows
from probes.token_pool import Pooling, token_pool

__all__ = ["ORDINARY", "SESSION6_LIMITS", "Arm", "DataSize", "StudyRow", "Summary", "Variant",
           "VariantRow", "arm_rows", "data_size", "loaded_sources", "loso_all", "loso_scores",
           "paired_auroc_diff", "readout_mask", "run_variants", "study_table", "summarise",
           "variants", "variants_markdown"]

ORDINARY = frozenset({"alpaca", "self_instruct", "mtbench", "oasst",
                      "coconot_noncompliance", "project_benign", "project_benign_long"})
"""Ordinary-chat sources (benign, not scary): the false-alert rate users feel most."""


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
def loso_scores(data: Sequence[SourceData], fit: Fitter, seed: int = 0,
                scored: Mapping[str, np.ndarray] | None = None, weighting: str = "row"
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every source scored by a detector fit without it (leave one source out over every
    source, :func:`probes.pooled.fitter_folds`): fold ``S`` fits on the fit rows
    (``split_calibration``) of every other source and scores all of ``S`` and the other
    sources' held-back benign rows. Returns ``(u, raw)`` per source: ``u`` on the scale
    shared by all folds (:func:`probes.pooled.ecdf_scores` of the fold's calibration
    rows, weighted by ``weighting``: ``probes.calibrate``), ``raw`` the detector's own
    scores. ``scored``: per source, the example indices whose scores are returned
    (default all; data-size arms score the same rows)."""
    fit_idx, cal_idx = split_calibration(data, seed)
    return fold_scores(fitter_folds(data, fit_idx, cal_idx, fit), weighting, scored)


def fold_scores(folds: Sequence[Fold], weighting: str = "row",
                scored: Mapping[str, np.ndarray] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(u, raw)`` of :func:`loso_scores` from its folds (one fit, any weighting)."""
    raw = {f.held.name: f.held_scores[0] for f in folds}
    u = {f.held.name: ecdf_scores(f.cal_scores[0], raw[f.held.name], f.cal_groups, weighting)
         for f in folds}
    if scored is not None:
        u = {n: v[scored[n]] for n, v in u.items()}
        raw = {n: v[scored[n]] for n, v in raw.items()}
    return u, raw


def loso_all(data: Sequence[SourceData], layer: int, C: float, scary_weight: float = 1.0
             ) -> dict[str, np.ndarray]:
    """Every source scored by the recipe's linear probe (:func:`linear`) fit without it,
    as ``u`` (:func:`probes.pooled.ecdf_scores`)."""
    return loso_scores(data, linear(layer, C, kind_weights(scary_weight)))[0]


WARN_U = 0.99
"""``u ≥ WARN_U − RATE_TOL`` ⇔ at or above the fold's warn threshold (1% FPR on its
calibration rows: ``probes.calibrate.threshold_at_fpr`` with its tolerance)."""


def at_warn(u: np.ndarray) -> np.ndarray:
    """bool ``[n]``: ``u`` at or above its fold's warn threshold (:data:`WARN_U`)."""
    return np.asarray(u) >= WARN_U - RATE_TOL


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

    hits = {g: (int(sum(int(np.sum(at_warn(u[n]))) for n in ns)),
                int(sum(u[n].size for n in ns))) for g, ns in groups.items()}
    rate = {g: k / m if m else float("nan") for g, (k, m) in hits.items()}
    return Summary(
        auroc(*both(groups["ordinary"])), auroc_ci(*both(groups["ordinary"]), n_boot=n_boot),
        auroc(*both(neg)), rate["harmful"], rate["ordinary"], rate["scary"], rate["persona"],
        {g: wilson_ci(k, m) for g, (k, m) in hits.items()}, {g: m for g, (_, m) in hits.items()},
        {n: (kind[n], int(u[n].size), float(np.mean(at_warn(u[n])))) for n in u})


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


# ----------------------------------------------------------------------- data-size axis
SESSION6_LIMITS: dict[str, int | None] = {
    "harmbench": 300, "stl_redteam": 250, "cyberseceval_malicious": 120, "alpaca": 300,
    "self_instruct": 150, "coconot_noncompliance": 200, "cyberseceval_frr": 150,
    "medquad": 200}
"""Row caps of the training sources in the session-6 bundle (probes/sources.py then)."""


@dataclass(frozen=True)
class DataSize:
    """One arm of the data-size axis: the ``limit`` (:func:`probes.sources.subsample`)
    each named source is loaded with; sources not named keep their own."""

    name: str
    limits: Mapping[str, int | None] = field(default_factory=dict)

    def source(self, src: Source) -> Source:
        return replace(src, limit=self.limits[src.name]) if src.name in self.limits else src


def data_size(spec: str, sources: Sequence[Source]) -> DataSize:
    """``shipped`` (the caps in probes/sources.py), ``session6`` (:data:`SESSION6_LIMITS`),
    an integer ``N`` (every training source keeps all its rows up to ``N``) or
    ``without:A+B`` (the shipped caps with sources ``A`` and ``B`` kept at 0 rows: neither
    fit on, calibrated with nor scored in that arm)."""
    if spec == "shipped":
        return DataSize("shipped caps")
    if spec == "session6":
        return DataSize("session-6 caps", SESSION6_LIMITS)
    if spec.startswith("without:"):
        names = [x for x in spec[len("without:"):].split("+") if x]
        known = {s.name for s in sources}
        bad = [x for x in names if x not in known]
        if not names or bad:
            raise ValueError(f"data size {spec!r}: expected without:NAME[+NAME...] naming "
                             f"loaded sources; found unknown {bad or 'nothing'}")
        return DataSize("without " + ", ".join(names), dict.fromkeys(names, 0))
    try:
        n = int(spec)
    except ValueError:
        raise ValueError(f"data size: expected shipped, session6, without:NAME[+NAME...] or "
                         f"a row count; found {spec!r}") from None
    if n < 1:
        raise ValueError(f"data size: expected a row count >= 1; found {n}")
    return DataSize(f"rows up to {n}", {s.name: n for s in sources if s.role == "train"})


def loaded_sources(sources: Sequence[Source], sizes: Sequence[DataSize]) -> list[Source]:
    """Each source with the smallest limit that covers every arm (None if any arm keeps
    all rows): what to load once so every arm is a subset (:func:`arm_rows`). A source
    every arm keeps at 0 rows is not loaded."""
    out = []
    for src in sources:
        lims = [sz.source(src).limit for sz in sizes] or [src.limit]
        lim = None if None in lims else max(x for x in lims if x is not None)
        if lim != 0:
            out.append(replace(src, limit=lim))
    return out


def arm_rows(loaded: Source, size: DataSize, seed: int = 0) -> np.ndarray:
    """Indices into the rows ``loaded`` keeps of the rows ``size`` keeps of that source
    (int64, increasing); ValueError if ``size``'s rows are not all loaded (the seeded
    subsamples of two limits need not nest: :func:`probes.sources.subsample`)."""
    have = np.asarray(kept_rows(loaded, seed), dtype=np.int64)
    want = np.asarray(kept_rows(size.source(loaded), seed), dtype=np.int64)
    pos = np.searchsorted(have, want)
    ok = (pos < have.size) & (have[np.minimum(pos, have.size - 1)] == want)
    if not ok.all():
        raise ValueError(f"data size {size.name!r}, source {loaded.name}: expected its "
                         f"{want.size} rows among the {have.size} loaded; found "
                         f"{int((~ok).sum())} missing (the two subsamples do not nest)")
    return pos.astype(np.int64)


@dataclass(frozen=True)
class Arm:
    """A data-size arm over loaded data: its :class:`DataSize` and, per source, the
    example indices into the loaded source that the arm keeps (:func:`arm_rows`)."""

    size: DataSize
    rows: Mapping[str, np.ndarray]


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
    """One variant on one data-size arm (``arm`` "" without the axis) under one
    calibration weighting (``probes.calibrate``); ``n_fit`` / ``n_cal``: fit and
    held-back calibration rows over ALL sources of the arm (what a bundle built from it
    fits on and sets its thresholds with; each fold uses those of the other sources)."""

    variant: Variant
    summary: Summary
    stage2_share: float | None
    seconds: float
    arm: str = ""
    n_fit: int = 0
    n_cal: int = 0
    u: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    """Per source, the ``u`` scores summarised (for :func:`paired_auroc_diff`)."""
    weighting: str = "row"

    def label(self) -> str:
        """Variant name, then the arm and the weighting where they are not the default."""
        return "; ".join([self.variant.name, *([self.arm] if self.arm else []),
                          *([f"{self.weighting}-weighted calibration"]
                            if self.weighting != "row" else [])])


BASE = 15, 1e-3
"""The session-5 recipe's layer and C (user scope, pooled mean logit at span_end; the
shipped recipe since session 6 is variant 19, the length term at C 0.003)."""


def recipe_fitter(layer: int, skip_tokens: int,
                  kind_weight: dict[str, float] | None = None) -> Fitter:
    """The shipped recipe as a :data:`Fitter` (``probes.harmful.PINNED``'s C 0.003,
    per-source balance, benign style directions out, length-debiased; variant 24 with
    ``skip_tokens`` 0, variant 39 (the bundle since session 14) with
    ``probes.harmful.DEFAULT_SKIP_TOKENS``). ``kind_weight``: per-kind / per-source-name
    multipliers (:func:`probes.pooled.source_weights`; None: every source ×1)."""
    base = length_debiased(linear(layer, 3e-3, kind_weight, style="benign"))
    return skip_first(base, skip_tokens) if skip_tokens else base


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
    # the softmax probe's request logit is an online softmax over one column's logits:
    # the softmax_logit aggregation (monitor.judge.aggregate), built with --pooling softmax
    soft = "yes: one column + softmax_logit (build-default --pooling softmax)"
    # the shipped recipe (variant 24) and the softmax probe at tau=1 (28), shared by the
    # session-12 variants (a fitter is a pure function of its parts: reusing one is safe)
    shipped = recipe_fitter(lay, 0)
    pair = average([shipped, length_debiased(token_pool(lay, 3e-3, "softmax", 1.0,
                                                        style="benign"))])
    scary_probe = contrast(shipped, frozenset({"scary", "persona"}))
    pools: list[tuple[Pooling, float | None, str, str]] = [
        ("mean", None, "mean pooling, torch trainer (control)", lterm),
        ("softmax", None, "softmax probe, learned tau", soft),
        ("softmax", 1.0, "softmax probe, tau=1", soft),
        ("attention", None, "attention probe", "no: two columns per detector")]
    return [
        Variant("baseline", f"linear L{lay} C={C:g} (session-5 recipe)", one, linear(lay, C)),
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
        *(Variant("7 style", f"length-debiased linear L{lay} C=0.003, {what} style "
                  "directions projected out", lterm,
                  length_debiased(linear(lay, 3e-3, style=kinds)))
          for kinds, what in (("benign", "benign sources'"), ("both", "benign and harmful "
                                                                "sources'"))),
        # pooling learned end to end over the token rows (probes/token_pool.py), each on
        # the shipped recipe (variant 24: L15, C 0.003, benign style directions out,
        # length-debiased), so the pooling is the only difference; the first is the
        # torch trainer's mean-pooling control
        *(Variant("8 token pooling", f"length-debiased, style out, L{lay} C=0.003: {what}",
                  serve, length_debiased(token_pool(lay, 3e-3, pool, beta, style="benign")))
          for pool, beta, what, serve in pools),
        # follow-up (written after run 1, which saw tau=1 miss only the scary criterion):
        # the same with the benign-but-scary and persona sources weighted x3
        Variant("8 token pooling", f"length-debiased, style out, L{lay} C=0.003: softmax "
                "probe, tau=1, scary+persona x3", soft,
                length_debiased(token_pool(lay, 3e-3, "softmax", 1.0, kind_weights(3.0),
                                           style="benign"))),
        # run 3 (session 12; rule in docs/PROBES.md written before it): the softmax probe
        # at temperatures between tau=1 and the mean (tau=inf), and the mean of the
        # shipped probe's and the tau=1 probe's request logits
        *(Variant("8 token pooling", f"length-debiased, style out, L{lay} C=0.003: softmax "
                  f"probe, tau={tau:g}", soft,
                  length_debiased(token_pool(lay, 3e-3, "softmax", 1.0 / tau, style="benign")))
          for tau in (2.0, 4.0)),
        Variant("8 token pooling", f"mean of the request logits: length-debiased, style out, "
                f"L{lay} C=0.003 mean probe and softmax probe tau=1",
                "no: two columns, a mean_logit and a softmax-pooled request logit averaged",
                pair),
        # run 4 (session 12; rule in docs/PROBES.md written before it): alert only when a
        # harmful-vs-benign-but-scary contrast probe agrees, on the shipped probe and on
        # the averaged pair of run 3
        *(Variant("9 scary contrast", f"{what} AND a contrast probe (length-debiased, style "
                  f"out, L{lay} C=0.003, harmful vs scary + persona rows only)",
                  "no: two detectors and an all-of policy", conjunction([member, scary_probe]))
          for what, member in (("shipped probe (variant 24)", shipped),
                               ("mean of mean and softmax tau=1 logits (variant 33)", pair))),
        # run 5 (session 14; rule in docs/PROBES.md written before it): the shipped recipe
        # with the first k user tokens of a request longer than k left out of the mean
        # (served as mean_logit skip_tokens: k)
        *(Variant("10 first tokens", f"length-debiased, style out, L{lay} C=0.003, the "
                  f"first {k} user token{'s' if k > 1 else ''} left out of the mean",
                  "yes: one linear probe + mean_logit length_slope and skip_tokens",
                  skip_first(shipped, k)) for k in (1, 2, 3, 4, 6)),
        # run 6 (session 17; rule in docs/PROBES.md written before it): the shipped recipe
        # (variant 39) refit with group DRO's source reweighting, and bagged over sources
        *(Variant("11 source mix", f"group DRO (5 rounds, eta={eta:g}) on the shipped "
                  f"recipe: length-debiased, style out, L{lay} C=0.003, first 4 tokens out",
                  "yes: one linear probe + mean_logit length_slope and skip_tokens",
                  group_dro(lambda q: recipe_fitter(lay, 4, q), 5, eta))
          for eta in (1.0, 3.0)),
        Variant("11 source mix", f"source bagging: mean of 10 shipped-recipe fits (L{lay}, "
                "first 4 tokens out), each on 70% of the harmful and 70% of the benign "
                "sources", "yes: the mean of linear probes is one linear probe",
                source_bagging(recipe_fitter(lay, 4), 10, 0.7)),
        # run 7 (session 17, a second look; rule in docs/PROBES.md written before it):
        # group DRO (eta 1) around the softmax probe at tau=1
        Variant("11 source mix", f"group DRO (5 rounds, eta=1) on the softmax probe, tau=1:"
                f" length-debiased, style out, L{lay} C=0.003", soft,
                group_dro(lambda q: length_debiased(token_pool(lay, 3e-3, "softmax", 1.0, q,
                                                               style="benign")), 5, 1.0)),
    ]


def run_variants(data: Sequence[SourceData], vs: Sequence[Variant],
                 progress: Callable[[VariantRow], None] | None = None,
                 arms: Sequence[Arm] = (), weightings: Sequence[str] = ("row",)
                 ) -> list[VariantRow]:
    """Each variant through :func:`loso_scores` and :func:`summarise`, once per data-size
    arm (none: once on all of ``data``) and calibration weighting (``probes.calibrate``;
    one fit per variant and arm, every weighting read from its folds). Every arm's folds
    are scored on the same requests, those every arm keeps (the smallest arm's rows when
    they nest), so arms differ only in the rows fit on and calibrated with; weightings
    differ only in each fold's thresholds (the ``u`` scale). A source an arm keeps at 0
    rows (``without:`` arms, :func:`data_size`) is left out of that arm entirely (no
    fold, not fit on, not calibrated with); being in no arm's common rows, it is scored
    in none."""
    import time

    kind = {d.name: d.source.kind for d in data}
    runs: list[tuple[str, list[SourceData], dict[str, np.ndarray] | None]] = []
    if not arms:
        runs.append(("", list(data), None))
    else:
        common = {d.name: np.arange(d.acts.n_examples) for d in data}
        for a in arms:
            common = {n: np.intersect1d(v, a.rows[n]) for n, v in common.items()}
        for a in arms:
            runs.append((a.size.name, [d.take(a.rows[d.name]) for d in data
                                       if a.rows[d.name].size],
                         {n: np.searchsorted(a.rows[n], c) for n, c in common.items()}))
    # the fit / held-back split per arm (the one loso_scores makes; the same for every
    # variant): made once, not once per variant
    splits = [split_calibration(sds) for _, sds, _ in runs]
    rows = []
    for v in vs:
        for (arm, sds, scored), (fit_idx, cal_idx) in zip(runs, splits, strict=True):
            n_fit = sum(i.size for i in fit_idx.values())
            n_cal = sum(i.size for i in cal_idx.values())
            t0 = time.perf_counter()
            folds = fitter_folds(sds, fit_idx, cal_idx, v.fit)
            for w in weightings:
                u, raw = fold_scores(folds, w, scored)
                if scored is not None:  # sources with no common requests: scored in no arm
                    u = {n: x for n, x in u.items() if scored[n].size}
                    raw = {n: x for n, x in raw.items() if scored[n].size}
                share = stage2_share(raw) if v.group.endswith("cascade") else None
                rows.append(VariantRow(v, summarise(u, kind), share,
                                       time.perf_counter() - t0, arm, n_fit, n_cal, u, w))
                if progress is not None:
                    progress(rows[-1])
    return rows


def paired_auroc_diff(ua: Mapping[str, np.ndarray], ub: Mapping[str, np.ndarray],
                      kind: Mapping[str, str], n_boot: int = 1000, seed: int = 0
                      ) -> tuple[float, tuple[float, float]]:
    """AUROC vs ordinary chat (harmful sources pooled against :data:`ORDINARY`) of ``ub``
    minus that of ``ua``, two detectors' ``u`` scores of the SAME requests, with a 95%
    percentile-bootstrap interval that resamples requests once for both (stratified by
    class): far narrower than comparing two unpaired intervals."""
    h = [n for n in ua if kind[n] == "harmful"]
    o = [n for n in ua if n in ORDINARY]
    ha, hb = (np.concatenate([u[n] for n in h]) for u in (ua, ub))
    oa, ob = (np.concatenate([u[n] for n in o]) for u in (ua, ub))
    if ha.size != hb.size or oa.size != ob.size:
        raise ValueError(f"paired_auroc_diff: expected the same requests; found harmful "
                         f"{ha.size} vs {hb.size}, ordinary {oa.size} vs {ob.size}")
    lab = np.r_[np.ones(ha.size), np.zeros(oa.size)]

    def diff(i: np.ndarray, j: np.ndarray) -> float:
        return auroc(lab, np.r_[hb[i], ob[j]]) - auroc(lab, np.r_[ha[i], oa[j]])

    rng = np.random.default_rng(seed)
    d = [diff(rng.integers(0, ha.size, ha.size), rng.integers(0, oa.size, oa.size))
         for _ in range(n_boot)]
    lo, hi = np.percentile(d, [2.5, 97.5])
    return diff(np.arange(ha.size), np.arange(oa.size)), (float(lo), float(hi))


def _ci(r: tuple[float, float]) -> str:
    return f"[{r[0]:.3f}, {r[1]:.3f}]"


def variant_line(r: VariantRow) -> str:
    m = r.summary
    share = "" if r.stage2_share is None else f"{r.stage2_share:.3f}"
    return (f"| {r.variant.group} | {r.label()} | {r.variant.servable} | "
            f"{m.auroc_ordinary:.3f} {_ci(m.auroc_ordinary_ci)} | {m.auroc_all_benign:.3f} | "
            f"{m.tpr_warn:.3f} {_ci(m.rate_ci['harmful'])} | "
            f"{m.fpr_warn_ordinary:.3f} {_ci(m.rate_ci['ordinary'])} | "
            f"{m.fpr_warn_scary:.3f} {_ci(m.rate_ci['scary'])} | {m.fpr_warn_persona:.3f} | "
            f"{share} | {r.seconds:.0f} |")


FEW_ROWS = 8
"""A variant run of at most this many rows (one arm, one weighting) shows every row's
per-source rates, not only the baseline's and the best's."""


def variants_markdown(rows: Sequence[VariantRow], reference: Variant | None = None) -> str:
    """The variant table, then per-source rates at warn of the baseline and the variant
    with the best pooled AUROC vs ordinary chat (and, with several calibration
    weightings, of ``reference`` under each; a run of at most :data:`FEW_ROWS` rows: of
    every row), then every variant's AUROC difference to
    ``reference`` (default the first row's variant) on the same arm and weighting, each
    arm minus the first arm and each weighting minus the first weighting, paired
    (:func:`paired_auroc_diff`)."""
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
    arms = {r.arm: r for r in rows if r.arm}
    if arms:
        out += ["", "Data-size arms (rows over all training sources; each fold fits on and "
                "calibrates with those of the other sources; every arm is scored on the "
                "same requests): " + "; ".join(
                    f"{a}: {r.n_fit} fit rows, thresholds on {r.n_cal} held-back benign rows"
                    for a, r in arms.items()) + "."]
    base = rows[0]
    best = max(rows, key=lambda r: r.summary.auroc_ordinary)
    kind = {n: k for n, (k, _, _) in base.summary.per_source.items()}
    ref = rows[0].variant if reference is None else reference
    first_arm, first_w = rows[0].arm, rows[0].weighting
    live = [r for r in rows if r.u]
    pairs = [(a, b) for a in live for b in live if b is not a and a.variant is ref
             and b.variant is not ref and a.arm == b.arm and a.weighting == b.weighting]
    # every arm scores the same requests, so arms pair too: each arm minus the first one
    pairs += [(a, b) for a in live for b in live if a.variant is b.variant
              and a.weighting == b.weighting and a.arm == first_arm and b.arm != first_arm]
    # and so do weightings (the same fits, other thresholds): each minus the first one
    pairs += [(a, b) for a in live for b in live if a.variant is b.variant
              and a.arm == b.arm and a.weighting == first_w and b.weighting != first_w]
    if pairs:
        out += ["", f"AUROC vs ordinary chat on the same requests: each variant minus {ref.name}"
                " on the same arm and weighting, each arm minus "
                f"{first_arm or 'the first'} and each calibration weighting minus "
                f"{first_w} for the same variant (95% paired bootstrap over requests, 1000):",
                "", "| variant | minus | difference [95% paired CI] |", "|---|---|---|"]
        for a, b in pairs:
            dd, (lo, hi) = paired_auroc_diff(a.u, b.u, kind)
            out.append(f"| {b.label()} | {a.label()} | {dd:+.3f} [{lo:+.3f}, {hi:+.3f}] |")

    cols = [("baseline", base), ("best", best)]
    if len({r.weighting for r in rows}) > 1:
        cols += [(f"{r.weighting}-weighted", r) for r in rows
                 if r.variant is ref and r.arm == first_arm]
    few = len(rows) <= FEW_ROWS and not arms and len(cols) == 2
    if few:  # a short run (a handful of --only variants): every row gets its column
        cols = [(f"row {i + 1}", r) for i, r in enumerate(rows)]
    out += ["", (f"Per source, rate at warn of every row (row i = the i-th row of the "
                 f"table above; best pooled AUROC vs ordinary chat: {best.label()})"
                 if few else
                 f"Per source, rate at warn: baseline ({base.label()}), best pooled AUROC "
                 f"vs ordinary chat ({best.label()})"
                 + (f" and {ref.name} under each calibration weighting" if len(cols) > 2
                    else ""))
            + "; each source scored unseen:", "",
            "| source | kind | n | " + " | ".join(c for c, _ in cols) + " |",
            "|---|---|---:|" + "---:|" * len(cols)]
    for s, (k, cnt, _) in sorted(base.summary.per_source.items(),
                                 key=lambda t: (t[1][0], t[0])):
        out.append(f"| {s} | {k} | {cnt} | "
                   + " | ".join(f"{r.summary.per_source[s][2]:.3f}" for _, r in cols) + " |")
    return "\n".join(out) + "\n"
