"""TopK SAE (SAELens ``"topk"``, EleutherAI sparsify, OpenAI TopK)::

    r = h · ‖W_dec[i]‖   if rescale_acts_by_decoder_norm else h
    z = relu(r) on the k largest r of the row, 0 elsewhere

Membership depends on all ``d_sae`` pre-activations of the row, so a latent subset
cannot compute it: :meth:`TopK.select` refuses. Options: run the full SAE (not a
bundle kind today), or, for a BatchTopK-trained SAE, use its inference rule, which is a
JumpReLU with the global threshold learned in training (architecture ``"jumprelu"``,
exact; see ``probes/sae_train.py``). There is no silent approximation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .registry import Architecture, SAEError, register_architecture

if TYPE_CHECKING:  # torch only when encoding / folding (see registry.py)
    import torch

    from .model import SAE


class TopK(Architecture):
    name = "topk"
    params = ("b_enc",)

    def encode_pre(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        assert sae.k is not None
        if sae.rescale_acts_by_decoder_norm:
            h = h * sae.params["W_dec"].norm(dim=-1)
        vals, idx = h.topk(k=min(sae.k, h.shape[-1]), dim=-1, sorted=False)
        return h.new_zeros(h.shape).scatter_(-1, idx, vals.relu())

    def select(self, sae: SAE, ids: Sequence[int]) -> tuple[str, dict[str, torch.Tensor]]:
        raise SAEError(sae.source, "architecture",
                       "an architecture whose latents can be computed from a subset "
                       "(standard, jumprelu, gated; a BatchTopK SAE converted to jumprelu "
                       "with its global threshold)",
                       f"'topk' (k={sae.k}): each latent depends on all {sae.d_sae} "
                       "pre-activations, so a subset would give a different answer")


register_architecture(TopK())
