"""Train the default model's SAE (BatchTopK → exact JumpReLU) on this CPU, and evaluate it.

One command (cached activations, deterministic in the seed)::

    nice -n 10 python -m probes train-sae --out bundles/sae/smollm2-135m-l18

Data: the residual stream after block 18 (``blocks.18.hook_resid_post``, the default
bundle's harmful_intent layer) on every token of the chat-templated requests of
``probes/sae_data.sae_corpus`` (first ``n_examples``), position 0 excluded (SmolLM2's
``<|im_start|>`` row is identical in every request and ~100× the norm of the others).
The last ``n_heldout`` examples are never trained on: reconstruction metrics and the
spliced loss use them.

Training (Bussmann et al. 2024, BatchTopK)::

    s  = sqrt(d) / mean‖x‖                      (train set; folded into the weights at save)
    h  = (s·x − b_dec) · W_enc + b_enc           [B, m]
    z  = relu(h) where relu(h) is among the B·k largest of the batch, else 0
    x̂  = z · W_dec + b_dec;   loss = ‖x̂ − s·x‖² / d + aux_coef · AuxK(dead latents)
    W_dec rows renormalised to unit norm after every step

Inference is a JumpReLU with one global threshold θ = running mean over training of
the smallest kept activation per batch (Bussmann et al.): ``z = relu(h)·[h > θ]``. That
*is* the SAE (not an approximation of a TopK SAE), stored as SAELens ``jumprelu`` with
``threshold = θ`` for every latent, so a latent subset in a bundle is exact.

Metrics on the held-out tokens: L0 (mean active latents per token), FVU
(``Σ‖x − x̂‖² / Σ‖x − mean‖²``), dead fraction (latents that never fire on the held-out
tokens *and* the train tokens), and next-token cross-entropy of the model on held-out
requests with the SAE's reconstruction spliced in at block 18 (all positions but 0),
beside the clean loss and the mean-ablation loss (``recovered = (abl − spliced) /
(abl − clean)``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monitor.score.kinds import Preprocessing
from monitor.score.sae import SAE, load_saelens, save_saelens
from probes.collect import Activations, TransformersCollector
from probes.datasets import ChatExample

__all__ = ["TrainConfig", "reconstruction_metrics", "spliced_loss", "train_batchtopk"]

log = logging.getLogger("probes.sae_train")


@dataclass(frozen=True)
class TrainConfig:
    """BatchTopK training hyper-parameters (defaults: the shipped SAE)."""

    d_sae: int = 2048
    k: int = 32  # mean active latents per token in a batch
    epochs: int = 10
    batch: int = 1024
    lr: float = 1e-3
    aux_k: int = 256  # AuxK: top aux_k dead latents reconstruct the residual
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 20_000  # a latent silent this long is "dead" for AuxK
    seed: int = 0


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-8)


def train_batchtopk(x: np.ndarray, cfg: TrainConfig, *, hook_name: str, model_name: str,
                    progress: bool = False) -> tuple[SAE, dict[str, Any]]:
    """Train on rows ``x [n, d]`` (any float dtype). Returns the SAE (jumprelu, in the
    input's units: the scale is folded) and training info."""
    g = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(np.ascontiguousarray(x)).float()
    n, d = data.shape
    scale = math.sqrt(d) / float(data.norm(dim=1).mean())
    data = data * scale
    W_dec = _unit_rows(torch.randn(cfg.d_sae, d, generator=g))
    params = {
        "W_dec": W_dec.clone().requires_grad_(),
        "W_enc": W_dec.t().clone().contiguous().requires_grad_(),
        "b_enc": torch.zeros(cfg.d_sae, requires_grad=True),
        "b_dec": data.mean(0).clone().requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    theta_sum, theta_n = 0.0, 0
    steps = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        total = 0.0
        for s in range(0, n - cfg.batch + 1, cfg.batch):
            xb = data[order[s:s + cfg.batch]]
            h = (xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
            acts = h.relu()
            flat = acts.flatten()
            vals, idx = flat.topk(cfg.k * xb.shape[0])
            z = torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)
            recon = z @ params["W_dec"] + params["b_dec"]
            err = xb - recon
            loss = err.pow(2).sum(1).mean() / d
            fired = (z > 0).any(0)
            since_fired = torch.where(fired, 0, since_fired + xb.shape[0])
            dead = since_fired > cfg.dead_after_tokens
            if bool(dead.any()):
                ha = acts.masked_fill(~dead, 0.0)
                kk = min(cfg.aux_k, int(dead.sum()))
                av, ai = ha.topk(kk, dim=1)
                za = torch.zeros_like(ha).scatter(1, ai, av)
                aux = (za @ params["W_dec"] - err.detach()).pow(2).sum(1).mean() / d
                loss = loss + cfg.aux_coef * aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                params["W_dec"].copy_(_unit_rows(params["W_dec"]))
                kept = vals[vals > 0]
                if kept.numel():
                    theta_sum += float(kept.min())
                    theta_n += 1
            total += float(loss.detach())
            steps += 1
        if progress:
            log.info("epoch %d loss %.4f (%.0f s)", epoch, total / max(1, n // cfg.batch),
                     time.perf_counter() - t0)
    theta = theta_sum / max(theta_n, 1)
    with torch.no_grad():
        # fold the input scale: h = (s·x − b)·W + c = (x − b/s)·(s·W) + c;
        # x̂ = (z·W_dec + b)/s  →  W_dec/s, b_dec/s
        folded = {
            "W_enc": (params["W_enc"] * scale).contiguous(),
            "b_enc": params["b_enc"].clone(),
            "W_dec": (params["W_dec"] / scale).contiguous(),
            "b_dec": params["b_dec"] / scale,
            "threshold": torch.full((cfg.d_sae,), theta),
        }
    sae = SAE(architecture="jumprelu", d_in=d, d_sae=cfg.d_sae, d_out=d, hook_name=hook_name,
              model_name=model_name, params={k: v.detach() for k, v in folded.items()},
              preprocessing=Preprocessing(apply_b_dec_to_input=True))
    info = {"steps": steps, "train_tokens": n, "input_scale": scale, "theta": theta,
            "train_seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg)}
    return sae, info


def reconstruction_metrics(sae: SAE, x: np.ndarray, batch: int = 4096) -> dict[str, Any]:
    """L0, FVU, MSE and the set of latents that fired on rows ``x``."""
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    l0 = sq = 0.0
    rows = 0
    xs = torch.from_numpy(np.ascontiguousarray(x)).float()
    mean = xs.mean(0)
    tot = float((xs - mean).pow(2).sum())
    with torch.no_grad():
        for s in range(0, xs.shape[0], batch):
            xb = xs[s:s + batch]
            z = sae.encode(xb)
            fired |= (z > 0).any(0)
            l0 += float((z > 0).sum())
            sq += float((sae.decode(z) - xb).pow(2).sum())
            rows += xb.shape[0]
    return {"tokens": rows, "l0": l0 / max(rows, 1), "fvu": sq / max(tot, 1e-12),
            "fired": fired}


def spliced_loss(collector: TransformersCollector, examples: Sequence[ChatExample],
                 layer: int, sae: SAE, mean_act: torch.Tensor) -> dict[str, float]:
    """Next-token CE (nats/token) on ``examples``: clean, SAE spliced at ``layer`` (all
    positions but 0), and the residual replaced by ``mean_act`` (same positions)."""
    model = collector.model
    mode: dict[str, str] = {"m": "clean"}

    def hook(_mod: Any, _inp: Any, output: Any) -> Any:
        if mode["m"] == "clean":
            return output
        h = output[0] if isinstance(output, tuple) else output
        new = h.clone()
        flat = h[:, 1:].reshape(-1, h.shape[-1])
        rep = sae.decode(sae.encode(flat)) if mode["m"] == "sae" else \
            mean_act.expand_as(flat)
        new[:, 1:] = rep.reshape(h[:, 1:].shape).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    sums = {"clean": 0.0, "sae": 0.0, "mean_ablation": 0.0}
    n_tok = 0
    try:
        with torch.inference_mode():
            for ex in examples:
                ids = torch.tensor([collector.encode(ex)[0]])
                for m in sums:
                    mode["m"] = m
                    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                    sums[m] += float(torch.nn.functional.cross_entropy(
                        logits.float(), ids[0, 1:], reduction="sum"))
                n_tok += ids.shape[1] - 1
    finally:
        handle.remove()
    out = {f"ce_{m}": v / n_tok for m, v in sums.items()}
    out["tokens"] = n_tok
    gap = out["ce_mean_ablation"] - out["ce_clean"]
    out["loss_recovered"] = (out["ce_mean_ablation"] - out["ce_sae"]) / gap if gap > 0 else \
        float("nan")
    return out


def split_rows(acts: Activations, n_heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """Row masks (train, held-out) of ``acts``: held-out = the last ``n_heldout``
    examples; position 0 dropped from both."""
    held = acts.example >= acts.n_examples - n_heldout
    body = acts.position > 0
    return body & ~held, body & held


def train_default_sae(out: Path, collector: TransformersCollector, corpus: list[ChatExample],
                      acts: Activations, layer: int, cfg: TrainConfig, n_heldout: int = 128,
                      n_loss_examples: int = 48, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate, write the SAELens folder ``out`` (fp16) + ``metrics.json``."""
    tr, ho = split_rows(acts, n_heldout)
    x = acts.x[layer]
    hook = f"blocks.{layer}.hook_resid_post"
    sae, info = train_batchtopk(x[tr], cfg, hook_name=hook, model_name=collector.model_name,
                                progress=progress)
    save_saelens(sae, out, dtype=torch.float16,
                 extra_metadata={"trained_by": "probes/sae_train.py (BatchTopK -> JumpReLU)",
                                 "k_batchtopk": cfg.k})
    sae = load_saelens(out)  # evaluate what users load (fp16 weights)
    held = reconstruction_metrics(sae, x[ho])
    train = reconstruction_metrics(sae, x[tr])
    fired = held.pop("fired") | train.pop("fired")
    mean_act = torch.from_numpy(x[tr].astype(np.float32).mean(0))
    heldout_ex = corpus[len(corpus) - n_heldout:][:n_loss_examples]
    loss = spliced_loss(collector, heldout_ex, layer, sae, mean_act)
    metrics = {"hook_name": hook, "d_in": sae.d_in, "d_sae": sae.d_sae, "train": info,
               "heldout": held, "train_fit": train,
               "dead_fraction": float(1.0 - fired.float().mean()),
               "dead_definition": "fired on none of the train and held-out tokens",
               "spliced": loss}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
