"""A harmful-intent detector over a few SAE latents, with feature labels.

Recipe (all on ``blocks.18.hook_resid_post``, the dense probe's layer):

1. Token labels: every prompt token (position 0 excluded) carries its request's label,
   on the SAE corpus requests (``sae_data.sae_corpus``) minus its held-out tail (the
   dense probe is trained on the mean of the same prompt-token rows with the same
   labels).
2. Drop the latents that fire on position 0: that row (SmolLM2's ``<|im_start|>``) is
   the same in every request, ~100× the norm of the others and outside the SAE's
   training data, and ~half the latents fire on it; the monitor scores it too, so a
   selected latent firing there would give every request the same head start (with
   mean aggregation: the same request score). Then rank latents by effect size
   ``(mean z | harmful − mean z | benign) / std z`` over the
   labelled rows; keep the ``n_latents`` largest (latents that *indicate* harm).
3. Sparse read-out: L2 logistic regression (``train.fit_logreg``, balanced) on those
   latents' activations; standardisation folded into ``latent_weights`` and ``bias`` so
   the bundle computes ``sigmoid(Σ_j w_j z_j + c)`` per token.
4. Request score: the dense probe's aggregation, read from its bundle's calibration
   (today: prompt scope, running mean, ``min_tokens`` 2). Calibration: thresholds at
   1 % / 0.1 % FPR on the benign requests of the corpus's held-out tail (small: its
   size is recorded).
5. Evaluation beside the dense probe on the *same* test rows (the dense probe's own
   short-request test set, ``sae_data.harmful_test``): AUROC and TPR at 1 % FPR.
6. Labels: per selected latent, the top-activating tokens with ±6 tokens of context
   from the corpus, and its fire rate on harmful vs benign tokens. No automatic text
   label is invented: the contexts are the label.

:func:`sae_detector_parts` returns the manifest component + detector + tensors, so a
bundle build can add the detector (``observe`` mode recommended when it is weaker than
the dense probe, which is what we measured; see docs/SAE.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monitor.score.sae import SAE
from probes.calibrate import calibrate
from probes.collect import Activations, TransformersCollector
from probes.datasets import ChatExample
from probes.evaluate import evaluate_scores
from probes.train import aggregate_requests, fit_logreg

__all__ = ["LatentDetector", "add_sae_detector", "fit_latent_detector", "latent_labels",
           "sae_detector_parts", "short_label"]

AGG: dict[str, Any] = {"kind": "mean"}  # overridden from the dense detector's calibration
MIN_TOKENS = 2


@dataclass
class LatentDetector:
    """``score = sigmoid(z[:, latent_ids] · weights + bias)`` per token."""

    latent_ids: list[int]
    weights: np.ndarray  # float64 [n]
    bias: float
    effect: np.ndarray  # effect sizes of the selected latents
    calibration: dict[str, Any]
    aggregation: dict[str, Any]
    min_tokens: int

    def token_scores(self, z_sel: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(z_sel @ self.weights + self.bias, -60, 60)))


def _encode(sae: SAE, x: np.ndarray, ids: Sequence[int] | None = None,
            batch: int = 8192) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            z = sae.encode(torch.from_numpy(x[s:s + batch].astype(np.float32)))
            out.append((z if ids is None else z[:, list(ids)]).numpy())
    return np.concatenate(out) if out else np.zeros((0, sae.d_sae if ids is None else len(ids)))


def request_scores(token_scores: np.ndarray, acts: Activations, agg: dict[str, Any],
                   min_tokens: int) -> np.ndarray:
    """Per-request statistic with the dense probe's aggregation (prompt rows)."""
    return aggregate_requests(token_scores, acts.example, acts.n_examples, agg, min_tokens,
                              in_scope=~acts.generated.astype(bool))


def fit_latent_detector(sae: SAE, acts: Activations, layer: int, n_heldout: int,
                        n_latents: int = 16, C: float = 0.1, agg: dict[str, Any] | None = None,
                        min_tokens: int = MIN_TOKENS) -> LatentDetector:
    """Steps 1–4 of the module docstring on the corpus activations ``acts``."""
    agg = dict(agg or AGG)
    fit_ex = acts.example < acts.n_examples - n_heldout
    rows = fit_ex & (acts.position > 0) & ~acts.generated.astype(bool)
    z = _encode(sae, acts.x[layer][rows])
    yy = acts.labels[acts.example[rows]].astype(bool)
    sd = z.std(0) + 1e-6
    effect = (z[yy].mean(0) - z[~yy].mean(0)) / sd
    z0 = _encode(sae, acts.x[layer][acts.position == 0])
    effect[(z0 > 0).any(0)] = -np.inf  # fires on position 0 (see the module docstring)
    ids = [int(i) for i in np.argsort(-effect)[:n_latents]]
    probe = fit_logreg(z[:, ids], yy.astype(np.int8), layer, C=C)
    w = probe.weight.astype(np.float64) / probe.std.astype(np.float64)
    b = float(probe.bias - np.sum(w * probe.mean.astype(np.float64)))
    det = LatentDetector(ids, w, b, effect[ids], {}, agg, min_tokens)
    # calibrate on the held-out benign requests of the corpus
    held = ~fit_ex
    sub = acts.subset_rows(held)
    s_req = request_scores(det.token_scores(_encode(sae, sub.x[layer], ids)), sub, agg,
                           min_tokens)
    ex_held = np.unique(acts.example[held])
    benign = [e for e in ex_held if acts.labels[e] == 0]
    det.calibration = calibrate(s_req[benign], benign_set="sae corpus held-out benign "
                                f"requests ({len(benign)}; coarse at 0.1% FPR)")
    return det


def evaluate_beside_dense(det: LatentDetector, sae: SAE, test: Activations, layer: int,
                          dense_token_scores: np.ndarray) -> dict[str, Any]:
    """AUROC / TPR@FPR of the latent detector and the dense probe on the same rows."""
    y = test.labels.astype(bool)
    s_sae = request_scores(det.token_scores(_encode(sae, test.x[layer], det.latent_ids)),
                           test, det.aggregation, det.min_tokens)
    s_dense = request_scores(dense_token_scores, test, det.aggregation, det.min_tokens)
    return {"sae_latents": evaluate_scores(y, s_sae), "dense_probe": evaluate_scores(y, s_dense)}


def latent_labels(sae: SAE, acts: Activations, examples: Sequence[ChatExample],
                  collector: TransformersCollector, layer: int, ids: Sequence[int],
                  top: int = 5, context: int = 6) -> dict[int, dict[str, Any]]:
    """Top-activating tokens (with context) and fire rates per latent in ``ids``."""
    body = acts.position > 0
    z = _encode(sae, acts.x[layer][body], ids)
    ex, pos = acts.example[body], acts.position[body]
    harm = acts.labels[ex].astype(bool)
    cache: dict[int, list[int]] = {}
    tok = collector.tokenizer
    out: dict[int, dict[str, Any]] = {}
    for j, lat in enumerate(ids):
        col = z[:, j]
        order = np.argsort(-col)
        picks: list[dict[str, Any]] = []
        seen: set[int] = set()
        for r in order:
            if len(picks) >= top or col[r] <= 0:
                break
            e = int(ex[r])
            if e in seen:  # one context per request
                continue
            seen.add(e)
            if e not in cache:
                cache[e] = collector.encode(examples[e])[0]
            t_ids, p = cache[e], int(pos[r])
            picks.append({"activation": round(float(col[r]), 3),
                          "token": tok.decode([t_ids[p]]),
                          "context": tok.decode(t_ids[max(0, p - context):p]) + "⟦" +
                          tok.decode([t_ids[p]]) + "⟧" +
                          tok.decode(t_ids[p + 1:p + 1 + context // 2]),
                          "request_label": int(acts.labels[e])})
        out[int(lat)] = {"fire_rate_harmful_requests": float((col[harm] > 0).mean()),
                         "fire_rate_benign_requests": float((col[~harm] > 0).mean()),
                         "top": picks}
    return out


def sae_detector_parts(sae: SAE, det: LatentDetector, *, name: str = "harmful_intent_sae",
                       component: str = "sae_l18", metrics: dict[str, Any] | None = None,
                       labels: dict[int, dict[str, Any]] | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest component, manifest detector, tensors) for ``write_bundle``."""
    comp = sae.component(component, det.latent_ids)
    comp_doc = {
        "name": component, "kind": "sae_latents", "layer": comp.layer,
        "hook_name": comp.hook_name, "activation": comp.activation,
        "latent_ids": list(det.latent_ids),
        "preprocessing": {"apply_b_dec_to_input": comp.preprocessing.apply_b_dec_to_input},
        "tensors": {role: f"{component}.{role}" for role in comp.tensors},
    }
    cal = det.calibration
    warn = min(max(float(cal.get("fpr_0.01", 0.5)), 1e-6), 1 - 2e-6)
    crit = min(max(float(cal.get("fpr_0.001", warn)), warn + 1e-6), 1 - 1e-6)
    det_doc = {
        "name": name,
        "description": "harmful intent from SAE latents (sparse read-out); observe mode: "
                       "weaker than the dense probe on the same test set",
        "inputs": [{"component": component, "latent_weights": [float(v) for v in det.weights]}],
        "bias": det.bias, "token_scope": "prompt",
        "default_thresholds": {"warn": warn, "critical": crit},
        "calibration": cal,
        "provenance": {"method": "sae_latents_logreg", "sae": sae.source,
                       "aggregation": det.aggregation, "min_tokens": det.min_tokens,
                       "metrics": metrics or {},
                       "latent_labels": {str(k): [p["context"] for p in v["top"][:3]]
                                         for k, v in (labels or {}).items()}},
    }
    return comp_doc, det_doc, sae.component_tensors(comp)


def report_markdown(sae_metrics: dict[str, Any] | None, det: LatentDetector,
                    evaluation: dict[str, Any], labels: dict[int, dict[str, Any]]) -> str:
    """The evaluation report (REPORT.md of the detector bundle)."""
    lines = ["# SAE latent detector: harmful_intent_sae", ""]
    if sae_metrics:
        h, sp = sae_metrics["heldout"], sae_metrics["spliced"]
        lines += [
            "## The SAE (blocks.18.hook_resid_post, "
            f"d_sae {sae_metrics['d_sae']}, BatchTopK k={sae_metrics['train']['config']['k']}"
            " → JumpReLU)", "",
            "| held-out tokens | L0 | FVU | dead fraction | CE clean | CE spliced | "
            "CE mean-ablation | loss recovered |", "|---|---|---|---|---|---|---|---|",
            f"| {h['tokens']} | {h['l0']:.1f} | {h['fvu']:.3f} | "
            f"{sae_metrics['dead_fraction']:.3f} | {sp['ce_clean']:.3f} | "
            f"{sp['ce_sae']:.3f} | {sp['ce_mean_ablation']:.3f} | "
            f"{sp['loss_recovered']:.3f} |", ""]
    lines += ["## Detector vs dense probe (same test requests, same aggregation)", "",
              "| detector | n_pos | n_neg | AUROC | TPR@1%FPR | TPR@0.1%FPR |",
              "|---|---|---|---|---|---|"]
    for name, m in evaluation.items():
        lines.append(f"| {name} | {m['n_pos']} | {m['n_neg']} | {m['auroc']:.4f} | "
                     f"{m['tpr@fpr0.01']:.3f} | {m['tpr@fpr0.001']:.3f} |")
    lines += ["", f"Selected latents: {det.latent_ids}; calibration: "
              f"{ {k: v for k, v in det.calibration.items()} }", "",
              "## Latent labels (top-activating contexts; ⟦token⟧ is the firing token)", ""]
    for j, (lat, info) in enumerate(labels.items()):
        lines.append(f"### latent {lat} (weight {det.weights[j]:+.3f}, effect "
                     f"{det.effect[j]:.2f}; fires on "
                     f"{100 * info['fire_rate_harmful_requests']:.1f}% of harmful-request "
                     f"tokens, {100 * info['fire_rate_benign_requests']:.1f}% of benign)")
        lines.append("")
        for p in info["top"]:
            ctx = p["context"].replace("\n", "⏎").replace("|", "\\|")
            lines.append(f"- {p['activation']:.2f} `{ctx}` (request label "
                         f"{p['request_label']})")
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- default bundle

#: Marks the section ``add_sae_detector`` owns in the target bundle's REPORT.md.
_REPORT_BEGIN = "<!-- sae-detector: begin (python -m probes add-sae-detector) -->"
_REPORT_END = "<!-- sae-detector: end -->"


def short_label(info: Mapping[str, Any], n: int = 3) -> str:
    """``top tokens: ")", " file", "yl"`` from a ``labels.json`` entry: the latent's
    highest-activating tokens in the corpus (no interpretation is invented)."""
    from monitor.score.bundle import MAX_LATENT_LABEL_CHARS

    toks: list[str] = []
    for p in info.get("top", []):
        t = json.dumps(str(p["token"]), ensure_ascii=False)
        if t not in toks:
            toks.append(t)
        if len(toks) == n:
            break
    text = ("top tokens: " + ", ".join(toks)) if toks else "fired on no corpus token"
    return text[:MAX_LATENT_LABEL_CHARS]


def add_sae_detector(bundle: Path, source: Path) -> Any:
    """Merge the detector bundle ``source`` (``python -m probes sae-detector``) into
    ``bundle``, in observe mode. Idempotent: components and detectors of ``source``'s
    names are replaced. Steps: components get ``latent_labels`` from ``labels.json``;
    detectors get ``aggregation``/``min_tokens``/``scope`` in their calibration (the
    request statistic their thresholds were measured with); one weights file is
    rewritten with both bundles' tensors; the ONNX graphs are re-exported if the bundle
    had them; ``policy.suggested.yaml`` gains each detector with ``mode: observe``;
    REPORT.md gains (or refreshes) a section with both detectors' numbers side by side.
    Returns the reloaded (validated) bundle.
    """
    from safetensors.torch import load_file

    from monitor.score.bundle import MANIFEST, BundleError, load_bundle, write_bundle
    from monitor.score.onnx_export import export_onnx

    src, dst = load_bundle(source), load_bundle(bundle)
    for field_, a, b in (("model.name", src.model_name, dst.model_name),
                         ("model.d_model", src.d_model, dst.d_model),
                         ("model.n_layers", src.n_layers, dst.n_layers)):
        if a != b:
            raise BundleError(f"{source}/{MANIFEST}", field_, f"{b!r} (as in {bundle})",
                              repr(a))
    src_doc = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    dst_doc = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    labels_path = source / "labels.json"
    labels = json.loads(labels_path.read_text(encoding="utf-8")) if labels_path.is_file() \
        else {}
    comps = []
    for c in src_doc["components"]:
        c = dict(c)
        if "latent_ids" in c and labels:
            c["latent_labels"] = [short_label(labels.get(str(i), {})) for i in c["latent_ids"]]
        comps.append(c)
    dets = []
    for d in src_doc["detectors"]:
        d = dict(d)
        prov = d.get("provenance", {})
        d["calibration"] = {**d.get("calibration", {}),
                            "aggregation": prov.get("aggregation", AGG),
                            "min_tokens": int(prov.get("min_tokens", MIN_TOKENS)),
                            "scope": d["token_scope"]}
        dets.append(d)
    new_c, new_d = {c["name"] for c in comps}, {d["name"] for d in dets}
    doc = {k: v for k, v in dst_doc.items() if k not in ("files", "onnx")}
    doc["components"] = [c for c in dst_doc["components"] if c["name"] not in new_c] + comps
    doc["detectors"] = [d for d in dst_doc["detectors"] if d["name"] not in new_d] + dets
    tensors: dict[str, torch.Tensor] = {}
    for root, d_ in ((bundle, dst_doc), (source, src_doc)):
        for fname in d_["files"]:
            if fname.endswith(".safetensors"):
                tensors.update(load_file(str(root / fname)))
    wanted = {t for c in doc["components"] for t in c["tensors"].values()}
    tensors = {k: v for k, v in tensors.items() if k in wanted}
    for fname in dst_doc["files"]:  # weights go to one file; graphs are re-exported
        if fname != "weights.safetensors":
            (bundle / fname).unlink(missing_ok=True)
    out = write_bundle(bundle, doc, tensors)
    if "onnx" in dst_doc:
        out = export_onnx(bundle)
    _add_to_policy(bundle / "policy.suggested.yaml", dets)
    _add_to_report(bundle / "REPORT.md", dets, comps, source)
    return out


def _add_to_policy(path: Path, dets: Sequence[Mapping[str, Any]]) -> None:
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for d in dets:  # drop an earlier block of the same detector (idempotent)
        head = f"  {d['name']}:"
        if head in lines:
            i = lines.index(head)
            j = i + 1
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            if i > 0 and lines[i - 1].startswith(f"  # {d['name']}:"):
                i -= 1
            del lines[i:j]
    for d in dets:
        cal, thr = d["calibration"], d["default_thresholds"]
        lines += [f"  # {d['name']}: SAE latents, observe only (weaker than the dense probe: "
                  "REPORT.md); warn = 1% FPR on the SAE corpus' held-out benign requests",
                  f"  {d['name']}:", "    mode: observe", f"    scope: {d['token_scope']}",
                  f"    aggregation: {json.dumps(cal['aggregation'])}",
                  f"    min_tokens: {cal['min_tokens']}", "    thresholds:"]
        lines += [f"      {k}: {float(v)!r}" for k, v in thr.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _add_to_report(path: Path, dets: Sequence[Mapping[str, Any]],
                   comps: Sequence[Mapping[str, Any]], source: Path) -> None:
    layer_of = {c["name"]: c["layer"] for c in comps}
    layers = {d["name"]: layer_of[d["inputs"][0]["component"]] for d in dets}
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if _REPORT_BEGIN in text:
        text = text[:text.index(_REPORT_BEGIN)].rstrip() + "\n" + \
            text[text.index(_REPORT_END) + len(_REPORT_END):].lstrip("\n")
    sec = [_REPORT_BEGIN, "", "## SAE latent detector (observe mode)", "",
           f"Added by `python -m probes add-sae-detector` from `{source.name}` (its REPORT.md "
           "has the SAE's quality, the recipe and every latent's top contexts). Same test "
           "requests, same aggregation, for both rows:", "",
           "| detector | AUROC | TPR@1%FPR |", "|---|---|---|"]
    for d in dets:
        m = d.get("provenance", {}).get("metrics", {})
        for who, label in (("sae_latents", f"{d['name']} (SAE latents)"),
                           ("dense_probe", f"dense probe on layer {layers[d['name']]}, "
                                           "same test set")):
            if who in m:
                sec.append(f"| {label} | {m[who]['auroc']:.3f} | {m[who]['tpr@fpr0.01']:.3f} |")
    sec += ["", "The SAE detector is weaker than the dense probe, so it ships in observe mode: "
            "it is scored and audited, and its verdicts carry the latents that fired with "
            "their labels, but it never alerts or blocks by default.", "", _REPORT_END, ""]
    path.write_text(text.rstrip() + "\n\n" + "\n".join(sec), encoding="utf-8")
