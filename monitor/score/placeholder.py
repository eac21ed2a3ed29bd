"""A clearly labelled PLACEHOLDER bundle: random directions, no safety meaning.

It exists so that every code path (probe standardisation, a jumprelu SAE component with
layer_norm and ``b_dec``, several layers, multi-latent read-out) runs end to end before a
trained bundle exists. Never deploy it as a safety control.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from monitor.constants import hook_name

from .bundle import Bundle, write_bundle

__all__ = ["PLACEHOLDER_WARNING", "build_placeholder_bundle"]

PLACEHOLDER_WARNING = (
    "PLACEHOLDER: random directions, not trained; the scores carry no safety meaning. "
    "For tests and demos only."
)


def build_placeholder_bundle(out_dir: str | os.PathLike[str], *, model_name: str,
                             d_model: int, n_layers: int,
                             layers: Sequence[int] | None = None, seed: int = 0) -> Bundle:
    """Write and load a placeholder bundle with three detectors on up to two layers.

    * ``harmful_intent``: linear probe (with mean/std standardisation), scope ``prompt``,
      on ``layers[0]``;
    * ``deception``: linear probe, scope ``generated``, on ``layers[-1]``;
    * ``sae_demo``: reads an 8-latent random jumprelu ``sae_latents`` component
      (layer_norm preprocessing, ``b_dec`` subtracted) on ``layers[0]``.

    ``layers`` defaults to ``(n_layers // 3, n_layers // 2)`` (SmolLM2-135M: 10 and 15).
    Deterministic in ``seed``.
    """
    if layers is None:
        layers = (n_layers // 3, n_layers // 2)
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must not be empty")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def unit(*shape: int) -> torch.Tensor:
        v = randn(*shape)
        return v / v.norm(dim=0, keepdim=True)

    first, last = layers[0], layers[-1]
    k = 8
    tensors = {
        "harmful_intent.weight": unit(d_model),
        "harmful_intent.bias": torch.tensor(-3.0),
        "harmful_intent.mean": 0.1 * randn(d_model),
        "harmful_intent.std": 0.5 + torch.rand(d_model, generator=g),
        "deception.weight": unit(d_model),
        "deception.bias": torch.tensor(-3.0),
        "deception.mean": 0.1 * randn(d_model),
        "deception.std": 0.5 + torch.rand(d_model, generator=g),
        "sae_demo.W_enc": unit(d_model, k),
        "sae_demo.b_enc": -0.1 * torch.rand(k, generator=g),
        "sae_demo.threshold": 0.5 + 0.5 * torch.rand(k, generator=g),
        "sae_demo.b_dec": 0.05 * randn(d_model),
    }

    def probe(name: str, layer: int) -> dict[str, object]:
        return {
            "name": name, "kind": "linear_probe", "layer": layer,
            "hook_name": hook_name(layer),
            "tensors": {r: f"{name}.{r}" for r in ("weight", "bias", "mean", "std")},
        }

    def detector(name: str, scope: str, inputs: list[dict[str, object]]) -> dict[str, object]:
        return {
            "name": name,
            "description": f"{PLACEHOLDER_WARNING} ({name})",
            "inputs": inputs,
            "bias": 0.0 if name != "sae_demo" else -3.0,
            "token_scope": scope,
            "default_thresholds": {"warn": 0.5, "critical": 0.9},
            "calibration": {},
            "provenance": {"method": "placeholder-random", "seed": seed,
                           "warning": PLACEHOLDER_WARNING},
        }

    manifest = {
        "name": f"placeholder-{model_name.rsplit('/', 1)[-1].lower()}",
        "description": PLACEHOLDER_WARNING,
        "model": {"name": model_name, "d_model": d_model, "n_layers": n_layers},
        "components": [
            probe("harmful_intent", first),
            probe("deception", last),
            {
                "name": "sae_demo", "kind": "sae_latents", "layer": first,
                "hook_name": hook_name(first),
                "activation": "jumprelu",
                "latent_ids": [int(i) for i in torch.randperm(16384, generator=g)[:k]],
                "preprocessing": {"apply_b_dec_to_input": True, "scale": 1.0,
                                  "normalize": "layer_norm"},
                "tensors": {r: f"sae_demo.{r}" for r in ("W_enc", "b_enc", "threshold",
                                                         "b_dec")},
            },
        ],
        "detectors": [
            detector("harmful_intent", "prompt",
                     [{"component": "harmful_intent", "weight": 1.0}]),
            detector("deception", "generated", [{"component": "deception", "weight": 1.0}]),
            detector("sae_demo", "both",
                     [{"component": "sae_demo",
                       "latent_weights": [round(0.5 + 0.1 * j, 3) for j in range(k)]}]),
        ],
    }
    return write_bundle(out_dir, manifest, tensors)
