"""The obvious, unfused scoring math: one component and one row at a time, float64 numpy.

No packing, no folding: each step is written as in docs/BUNDLE.md, so that the fused
scorer (monitor/score/scorer.py) can be checked against it.
"""

from __future__ import annotations

import numpy as np
import torch

from monitor.score.bundle import Bundle, Component


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def preprocess(comp: Component, row: np.ndarray) -> np.ndarray:
    """``pre(x)`` for one row ``[d_model]``, then probe standardisation."""
    pre = comp.preprocessing
    t = comp.tensors
    u = pre.scale * row
    if pre.normalize == "layer_norm":
        u = (u - u.mean()) / np.sqrt(u.var() + pre.layer_norm_eps)
    if pre.apply_b_dec_to_input:
        u = u - _np(t["b_dec"])
    if comp.kind == "linear_probe":
        if "mean" in t:
            u = u - _np(t["mean"])
        if "std" in t:
            u = u / _np(t["std"])
    return u


def preactivation(comp: Component, row: np.ndarray) -> np.ndarray:
    """``p [k]`` for one row, before the activation."""
    t = comp.tensors
    u = preprocess(comp, row)
    if comp.kind == "linear_probe":
        return u @ _np(t["weight"]) + _np(t["bias"])
    return u @ _np(t["W_enc"]) + _np(t["b_enc"])


def activate(comp: Component, p: np.ndarray) -> np.ndarray:
    """identity; relu ``max(p, 0)``; jumprelu ``relu(p)·[p > θ]`` (SAELens)."""
    if comp.activation == "identity":
        return p
    if comp.activation == "relu":
        return np.maximum(p, 0.0)
    theta = _np(comp.tensors["threshold"])
    return np.maximum(p, 0.0) * (p > theta)


def component_values(bundle: Bundle, layer: int, x: torch.Tensor) -> dict[str, np.ndarray]:
    """``{component: z [n_rows, k]}`` for the components on ``layer``."""
    rows = _np(x)
    out: dict[str, np.ndarray] = {}
    for comp in bundle.components_on(layer):
        out[comp.name] = np.array([activate(comp, preactivation(comp, r)) for r in rows]
                                  ).reshape(len(rows), comp.k)
    return out


def preactivations(bundle: Bundle, layer: int, x: torch.Tensor) -> dict[str, np.ndarray]:
    """``{component: p [n_rows, k]}`` before the activation."""
    rows = _np(x)
    return {c.name: np.array([preactivation(c, r) for r in rows]).reshape(len(rows), c.k)
            for c in bundle.components_on(layer)}


def scores(bundle: Bundle, layer: int, x: torch.Tensor) -> np.ndarray:
    """``[n_rows, n_detectors_on_layer]`` float64, detectors in manifest order."""
    z = component_values(bundle, layer, x)
    dets = bundle.detectors_on(layer)
    out = np.zeros((x.shape[0], len(dets)))
    for i in range(x.shape[0]):
        for j, det in enumerate(dets):
            logit = det.bias
            for inp in det.inputs:
                logit += float(np.dot(np.asarray(inp.weights), z[inp.component][i]))
            out[i, j] = 1.0 / (1.0 + np.exp(-logit))
    return out
