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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probes.evaluate import auroc
from probes.harmful import SourceData, kind_weights, loso_folds, split_calibration

__all__ = ["ORDINARY", "StudyRow", "ecdf_scores", "loso_all", "readout_mask", "study_table"]

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


@dataclass(frozen=True)
class StudyRow:
    """One (read-out, layer, C) point: pooled and per-source results."""

    readout: str
    layer: int
    C: float
    auroc_ordinary: float
    auroc_all_benign: float
    tpr_warn: float
    fpr_warn_ordinary: float
    fpr_warn_scary: float
    fpr_warn_persona: float
    per_source: dict[str, tuple[str, int, float]]
    """source -> (kind, n, rate at the fold's warn threshold)."""


def loso_all(data: Sequence[SourceData], layer: int, C: float, scary_weight: float = 1.0
             ) -> dict[str, np.ndarray]:
    """Every source scored by the fold that never saw it, as ``u`` (:func:`ecdf_scores`)."""
    fit_idx, cal_idx = split_calibration(data)
    folds = loso_folds(data, fit_idx, cal_idx, layer, C, scary_weight, served=(), prefixes=0)
    return {f.held.name: ecdf_scores(f.cal_scores[0], f.held_scores[0]) for f in folds}


def _rate(u: dict[str, np.ndarray], names: Sequence[str]) -> float:
    xs = [u[n] for n in names]
    return float(np.mean(np.concatenate(xs) >= 0.99)) if xs else float("nan")


def study_table(data: Sequence[SourceData], readout: str, layer: int, C: float) -> StudyRow:
    """:func:`loso_all` summarised: pooled AUROC (harmful vs ordinary chat, vs every
    benign source), detection and false-alert rates at each fold's warn threshold."""
    u = loso_all(data, layer, C, kind_weights(1.0)["scary"])
    kind = {d.name: d.source.kind for d in data}
    harm = [n for n in u if kind[n] == "harmful"]
    ordn = [n for n in u if n in ORDINARY]
    neg = [n for n in u if kind[n] != "harmful"]
    h = np.concatenate([u[n] for n in harm])

    def au(names: Sequence[str]) -> float:
        b = np.concatenate([u[n] for n in names])
        return auroc(np.r_[np.ones(h.size), np.zeros(b.size)], np.r_[h, b])

    return StudyRow(
        readout, layer, C, au(ordn), au(neg), _rate(u, harm), _rate(u, ordn),
        _rate(u, [n for n in u if kind[n] == "scary"]),
        _rate(u, [n for n in u if kind[n] == "persona"]),
        {n: (kind[n], int(u[n].size), float(np.mean(u[n] >= 0.99))) for n in u})


def markdown(rows: Sequence[StudyRow]) -> str:
    """The summary table and, for the first row, the per-source table."""
    out = ["| read-out | layer | C | AUROC vs ordinary chat | AUROC vs all benign | "
           "detection at warn | false alerts: ordinary | scary | persona |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.readout} | {r.layer} | {r.C:g} | {r.auroc_ordinary:.3f} | "
                   f"{r.auroc_all_benign:.3f} | {r.tpr_warn:.3f} | {r.fpr_warn_ordinary:.3f} | "
                   f"{r.fpr_warn_scary:.3f} | {r.fpr_warn_persona:.3f} |")
    if rows:
        r = rows[0]
        out += ["", f"Per source ({r.readout}, layer {r.layer}, C={r.C:g}); each source "
                "scored by the probe fit without it:", "",
                "| source | kind | n | rate at warn |", "|---|---|---:|---:|"]
        for n, (k, cnt, rate) in sorted(r.per_source.items(), key=lambda t: (t[1][0], t[0])):
            out.append(f"| {n} | {k} | {cnt} | {rate:.3f} |")
    return "\n".join(out) + "\n"
