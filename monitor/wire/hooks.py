"""Hook points: where in a decoder layer an activation is read (TransformerLens names).

A hook point is named `blocks.{layer}.hook_{kind}`, `layer` counting decoder layers from 0,
with these kinds (every row is `[d_model]`, one per token):

- `resid_pre`: the residual stream entering decoder layer `layer`; for layer 0 the
  embeddings as the model scales them (×√d_model for Gemma). HF: `hidden_states[layer]`.
- `resid_mid`: the stream after the attention block's residual add.
- `mlp_out`: what the MLP block adds to the stream (for Gemma 2/3 *after*
  `post_feedforward_layernorm`, as in TransformerLens).
- `resid_post`: the stream after decoder layer `layer` (`resid_mid + mlp_out`, and the
  `resid_pre` of layer `layer + 1`). HF: `hidden_states[layer + 1]`, except the last layer.

`hidden_states[n_layers]` in Hugging Face is the *final-normed* stream; the monitor never
applies the final norm: `blocks.{n-1}.hook_resid_post` is the raw stream (TransformerLens'
convention too). Per-architecture facts behind this table are in `monitor.capture.archs`.

Wire: `CapturePlan.hook_names` lists the hook points the sidecar needs (empty: the legacy
plan, `resid_post` of every `layers` entry); `ActivationFrame.hook_name` names the hook
point of a frame's rows (empty: `resid_post` of `layer`, as old clients send).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["HOOK_KINDS", "HookPoint", "hook_key", "parse_hook_name", "resid_post"]

#: Hook kinds the capture plugin can produce, in forward order within one layer.
HOOK_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "mlp_out", "resid_post")

_NAME = re.compile(r"^blocks\.(\d{1,6})\.hook_([a-z_]+)$")


@dataclass(frozen=True, order=True)
class HookPoint:
    """One hook point. Orders as the forward pass computes them (layer, then kind)."""

    layer: int
    kind_index: int

    @property
    def kind(self) -> str:
        return HOOK_KINDS[self.kind_index]

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.kind}"

    @classmethod
    def of(cls, layer: int, kind: str) -> HookPoint:
        if kind not in HOOK_KINDS:
            raise ValueError(f"hook kind: expected one of {list(HOOK_KINDS)}, found {kind!r}")
        if layer < 0:
            raise ValueError(f"hook layer: expected >= 0, found {layer}")
        return cls(int(layer), HOOK_KINDS.index(kind))

    def __str__(self) -> str:
        return self.name


def resid_post(layer: int) -> HookPoint:
    """`blocks.{layer}.hook_resid_post` (what a plan's bare `layers` entry means)."""
    return HookPoint.of(layer, "resid_post")


def parse_hook_name(name: str, *, field: str = "hook_name") -> HookPoint:
    """Parse `blocks.{layer}.hook_{kind}`; ValueError naming `field`, expected and found."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{field}: expected 'blocks.<layer>.hook_<kind>' with kind in "
                         f"{list(HOOK_KINDS)}, found {name!r}")
    kind = m.group(2)
    if kind not in HOOK_KINDS:
        raise ValueError(f"{field}: expected a hook kind in {list(HOOK_KINDS)}, found "
                         f"{kind!r} in {name!r}")
    return HookPoint(int(m.group(1)), HOOK_KINDS.index(kind))


def hook_key(point: int | str, *, field: str = "hook") -> str:
    """The canonical name of a hook point given as a bare layer or a name.

    An int ``L`` is ``blocks.L.hook_resid_post`` (what a bare ``layers`` entry means on the
    wire and in bundles without ``hook_name``); a str must parse (ValueError naming
    ``field`` otherwise) and is returned as given (names have one spelling).
    """
    if isinstance(point, str):
        return parse_hook_name(point, field=field).name
    return resid_post(int(point)).name
