"""A loaded SAE (any format, any registered architecture) and its latent selection.

Shapes (float32, CPU): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]``, every other parameter ``[d_sae]``. For an SAE ``d_out == d_in``; a
transcoder reads ``hook_name`` and writes elsewhere (``d_out`` may differ; its encoder
never subtracts ``b_dec``).

Encode (the common part; the architecture does the rest, see ``registry.py``)::

    u  = pre(x)                     scale, then normalize (kinds.Preprocessing)
    u' = u − b_dec                  if apply_b_dec_to_input
    h  = u' · W_enc + gate_bias     [n, d_sae]
    z  = architecture.encode_pre(h)

Hook points use TransformerLens names. A component keeps the SAE's own hook point
(``blocks.L.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_mlp_out`` / ``hook_resid_post``,
``monitor.wire.hooks``): the sidecar's capture plan asks the plugin for exactly those
tensors and scores each frame with the components of its hook point. Attention outputs
(``blocks.L.attn.hook_z`` and the like) load and encode, but :meth:`SAE.component`
refuses them: the plugin does not capture them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from monitor.wire.hooks import HOOK_KINDS, HookPoint, parse_hook_name

from ..kinds import Component, Preprocessing
from .registry import SAEError, get_architecture

__all__ = ["SAE", "hook_layer", "resid_post_layer"]

_HOOK_RE = re.compile(r"blocks\.(\d+)\.(hook_[a-z_]+)")


def hook_layer(hook_name: str) -> tuple[int, str]:
    """``"blocks.7.hook_resid_pre"`` → ``(7, "hook_resid_pre")``; ValueError otherwise."""
    m = _HOOK_RE.fullmatch(hook_name)
    if m is None:
        raise ValueError(f"not a TransformerLens block hook name: {hook_name!r}")
    return int(m.group(1)), m.group(2)


def resid_post_layer(hook_name: str) -> int | None:
    """The layer ``L`` whose ``hook_resid_post`` is the tensor at ``hook_name``, or None."""
    try:
        layer, point = hook_layer(hook_name)
    except ValueError:
        return None
    if point == "hook_resid_post":
        return layer
    if point == "hook_resid_pre" and layer >= 1:
        return layer - 1
    return None


@dataclass(frozen=True, eq=False)
class SAE:
    """A loaded SAE. ``params`` float32 with the shapes in the module docstring.

    ``k``: TopK's k (None otherwise); ``rescale_acts_by_decoder_norm``: TopK ranks
    ``h · ‖W_dec[i]‖`` (SAELens). ``source`` names the files it came from (for errors).
    """

    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    hook_name: str
    model_name: str
    params: Mapping[str, torch.Tensor]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    transcoder: bool = False
    source: str = ""

    # ------------------------------------------------------------------ math
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``u'`` (float32) for rows ``x [n, d_in]``."""
        pre = self.preprocessing
        u = x.float() * pre.scale
        if pre.normalize == "layer_norm":
            mu = u.mean(dim=-1, keepdim=True)
            u = (u - mu) / torch.sqrt(u.var(dim=-1, correction=0, keepdim=True)
                                      + pre.layer_norm_eps)
        elif pre.normalize == "layer_norm_std":
            u = u - u.mean(dim=-1, keepdim=True)
            u = u / (u.std(dim=-1, keepdim=True) + pre.layer_norm_eps)
        if pre.apply_b_dec_to_input:
            u = u - self.params["b_dec"]
        return u

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """``h = u' · W_enc + gate_bias``: ``[n, d_sae]`` float32."""
        arch = get_architecture(self.architecture)
        return self.preprocess(x) @ self.params["W_enc"] + self.params[arch.gate_bias]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Full-width latent activations ``[n, d_sae]`` float32 (the reference path)."""
        return get_architecture(self.architecture).encode_pre(self, self.hidden_pre(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the input's units ``[n, d_out]`` (undoes ``scale``; the
        layer_norm variants' per-row statistics are not undone)."""
        out = z @ self.params["W_dec"] + self.params["b_dec"]
        return out / self.preprocessing.scale

    # ------------------------------------------------------------------ selection
    def hook_point(self) -> HookPoint:
        """The hook point this SAE reads, as the capture plan names it, or SAEError."""
        try:
            return parse_hook_name(self.hook_name)
        except ValueError:
            raise SAEError(self.source, "hook_name",
                           f"blocks.L.hook_<kind> with kind in {list(HOOK_KINDS)} (the hook "
                           "points the capture plugin produces)",
                           repr(self.hook_name)) from None

    def layer(self) -> int:
        """The decoder layer of :meth:`hook_point`."""
        return self.hook_point().layer

    def component(self, name: str, latent_ids: Sequence[int], *,
                  d_model: int | None = None) -> Component:
        """A bundle component computing exactly ``encode(x)[:, latent_ids]``.

        Raises SAEError for out-of-range or repeated ids, a d_model mismatch, an
        unsupported hook point, or an architecture whose subset is not exact (TopK).
        """
        ids = [int(i) for i in latent_ids]
        if not ids:
            raise SAEError(self.source, "latent_ids", "at least one latent index", "[]")
        bad = [i for i in ids if not 0 <= i < self.d_sae]
        if bad:
            raise SAEError(self.source, "latent_ids", f"indices in [0, {self.d_sae})",
                           f"{bad[:5]}")
        if len(set(ids)) != len(ids):
            raise SAEError(self.source, "latent_ids", "distinct latent indices",
                           f"{len(ids) - len(set(ids))} repeats")
        if d_model is not None and d_model != self.d_in:
            raise SAEError(self.source, "d_in", f"the model's d_model {d_model}",
                           str(self.d_in))
        hp = self.hook_point()
        activation, tensors = get_architecture(self.architecture).select(self, ids)
        return Component(name=name, kind="sae_latents", layer=hp.layer,
                         hook_name=hp.name, tensors=tensors,
                         activation=activation, latent_ids=tuple(ids),
                         preprocessing=self.preprocessing)

    def component_tensors(self, comp: Component) -> dict[str, torch.Tensor]:
        """``{"<comp.name>.<role>": tensor}`` ready for ``write_bundle``."""
        return {f"{comp.name}.{role}": t.contiguous() for role, t in comp.tensors.items()}


def gather(params: Mapping[str, torch.Tensor], ids: Sequence[int],
           names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{name: params[name][ids]}`` for per-latent vectors (W_enc: its columns)."""
    idx = torch.tensor(list(ids), dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for n in names:
        t = params[n]
        out[n] = t[:, idx].contiguous() if n == "W_enc" else t[idx].contiguous()
    return out
