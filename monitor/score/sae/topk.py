"""TopK SAE (SAELens ``"topk"``, EleutherAI sparsify, OpenAI TopK)::

    r = h · ‖W_dec[i]‖   if rescale_acts_by_decoder_norm else h
    z = relu(r) on the k largest r of the row, 0 elsewhere

Membership depends on all ``d_sae`` pre-activations of the row, so a latent subset
alone cannot compute it. The bundle component ``sae_latents`` / ``topk`` therefore
carries the **full-width** encoder beside the selected columns, and the scorer runs it::

    r = u' · (W_enc_full · s_full) + b_enc_full · s_full      [n, d_sae]   one extra GEMM
    K = the k indices of the row's largest r                                torch.topk
    z_j = relu(p_j) · [id_j ∈ K]          for the selected latents j (p_j = r_{id_j})

(``s = ‖W_dec[i]‖`` when ``rescale_acts_by_decoder_norm``, else 1: SAELens ranks *and*
returns ``h·‖W_dec[i]‖``.) What is exact: every row keeps exactly ``k`` latents, the
ones with the ``k`` largest ``r`` as computed (float32 rank values; with bf16 compute the
GEMM output is rounded to bf16 first, so latents within bf16 rounding of each other may
rank differently than in float32); membership is read from ``r`` alone (never from the
packed GEMM's ``p``), so the two GEMMs cannot disagree on it. Ties at
the k-th value (rare in float32, frequent in bf16) are broken by ``torch.topk``, as in
SAELens' and sparsify's own encode: which of the tied latents it keeps is the kernel's
choice (not, e.g., the lowest index) and may differ between CPU and CUDA, but never more
than ``k`` are kept (a threshold ``r ≥ τ`` would admit every tied latent). Only
``normalize: none`` is supported (OpenAI's layer-normalised TopK SAEs are refused by
field); the onnxruntime backend has no TopK graph (export refuses). For a
BatchTopK-trained SAE the cheaper exact path is its inference rule, a JumpReLU with the
global threshold learned in training (``"jumprelu"``; ``probes/sae_train.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from ..kinds import Epilogue, register_kind
from .registry import (
    Architecture,
    SAEError,
    SAELatentsKind,
    register_architecture,
    relu_epilogue,
)

if TYPE_CHECKING:  # torch only when encoding / folding (see registry.py)
    import torch

    from .model import SAE


class TopKKind(SAELatentsKind):
    """``sae_latents`` / ``topk``: selected columns plus the full-width encoder.

    Roles: ``W_enc [d_model, k]``, ``b_enc [k]`` (selected), optional ``b_dec``,
    ``rank_scale [k]`` (> 0); ``W_enc_full [d_model, m]``, ``b_enc_full [m]``, optional
    ``rank_scale_full [m]`` (> 0), ``topk_k []`` (an integer in [1, m]). The bundle checks
    that the selected tensors equal the full ones at ``latent_ids``.
    """

    activation = "topk"
    roles: ClassVar[Mapping[str, str]] = {
        **SAELatentsKind.roles, "rank_scale": "k", "W_enc_full": "d_model_m",
        "b_enc_full": "m", "rank_scale_full": "m", "topk_k": "scalar"}
    required = frozenset({"W_enc", "b_enc", "W_enc_full", "b_enc_full", "topk_k"})
    positive = frozenset({"rank_scale", "rank_scale_full", "topk_k"})
    full_width = True

    def fold(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        A, a = tensors["W_enc"].double(), tensors["b_enc"].double()
        if "rank_scale" in tensors:
            s = tensors["rank_scale"].double()
            A, a = A * s, a * s
        return A, a

    def fold_full(self, tensors: Mapping[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(A_full [d_model, m], a_full [m], k)`` float64: ``r = u'·A_full + a_full``."""
        A, a = tensors["W_enc_full"].double(), tensors["b_enc_full"].double()
        if "rank_scale_full" in tensors:
            s = tensors["rank_scale_full"].double()
            A, a = A * s, a * s
        return A, a, int(tensors["topk_k"])

    def epilogue(self, tensors: Mapping[str, torch.Tensor]) -> Epilogue:
        return relu_epilogue(int(tensors["W_enc"].shape[1]))  # × the scorer's row mask


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
        """The selected columns and the full-width encoder (module docstring)."""
        import torch

        from .standard import select_tensors

        if sae.preprocessing.normalize != "none":
            raise SAEError(sae.source, "normalize", "'none' for a TopK SAE in a bundle (the "
                           "full-width TopK block has no layer-norm path)",
                           repr(sae.preprocessing.normalize))
        assert sae.k is not None
        out = select_tensors(sae, ids, ("W_enc", "b_enc"))
        out["W_enc_full"] = sae.params["W_enc"].contiguous()
        out["b_enc_full"] = sae.params["b_enc"].contiguous()
        out["topk_k"] = torch.tensor(float(min(sae.k, sae.d_sae)))
        if sae.rescale_acts_by_decoder_norm:
            norms = sae.params["W_dec"].norm(dim=-1)
            if bool((norms <= 0).any()):
                raise SAEError(sae.source, "W_dec", "rows with a positive norm (TopK rescales "
                               "by them)", "a zero row")
            out["rank_scale_full"] = norms.contiguous()
            out["rank_scale"] = norms[torch.tensor(list(ids))].contiguous()
        return "topk", out


register_kind(TopKKind())
register_architecture(TopK())
