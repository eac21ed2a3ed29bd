"""Component kinds: the one registry the bundle validator and the packer both read.

A bundle component is ``(kind, activation)`` plus named tensors. Each registered
:class:`ComponentKind` states, in one place:

* which tensor roles it has (required / optional) and their shapes, for ``bundle.py``;
* how it folds into the packed per-layer GEMM, for ``pack.py``: the affine map
  ``u ↦ u · A + a`` of the preprocessed row ``u`` (``[d_model, k]``, ``[k]``, float64),
  and the per-column epilogue applied to ``p = u · A + a``::

      z = [p > θ] · max(s · p + t, floor)

  identity (probe logits): ``θ = −inf, s = 1, t = 0, floor = −inf`` (``z = p``);
  relu: ``θ = 0, floor = 0``; jumprelu: ``θ = max(θ_file, 0), floor = 0``
  (``relu(p)·[p > θ_file]``, SAELens / Gemma Scope); gated (SAELens): the GEMM column
  is the gate ``p = π + b_gate`` (``π = u'·W_enc``), ``θ = 0``, ``s = exp(r_mag)``,
  ``t = b_mag − exp(r_mag)·b_gate``, ``floor = 0``, i.e.
  ``[π + b_gate > 0] · relu(exp(r_mag)·π + b_mag)``.

Adding an SAE architecture = one module in ``monitor/score/sae/`` that registers its
component kind here (and its full-width encoder in ``sae/registry.py``). This module
imports neither the bundle nor the packer (no cycles); the SAE kinds register when
``monitor.score.sae`` is imported, which ``bundle.py`` does.

Thread rules: the registry is filled at import time and only read afterwards. Importing
this module (and the SAE kinds) does not import torch: the onnxruntime backend validates
bundles without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar


class FieldError(ValueError):
    """A refusal that names its field. ``str(e)`` is
    ``"<source>: <field>: expected <...>, found <...>"``; base of `BundleError` and `SAEError`."""

    def __init__(self, source: str, field: str, expected: str, found: str) -> None:
        self.source = source
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(f"{source}: {field}: expected {expected}, found {found}")


if TYPE_CHECKING:  # torch is imported only where tensors are folded (the ONNX path has none)
    import torch

__all__ = [
    "Component",
    "ComponentKind",
    "Epilogue",
    "Preprocessing",
    "activations_of",
    "get_kind",
    "kind_names",
    "register_kind",
]

#: ``normalize`` options of :class:`Preprocessing`.
NORMALIZE = ("none", "layer_norm", "layer_norm_std")


@dataclass(frozen=True)
class Preprocessing:
    """Input preprocessing of one component, applied to a row ``x [d_model]`` in this order.

    1. ``x̃ = scale · x``                                   (a positive constant)
    2. ``normalize``:
       ``"layer_norm"``: ``x̃ = (x̃ − mean(x̃)) / sqrt(var(x̃) + layer_norm_eps)``
       (population variance over the row, no affine);
       ``"layer_norm_std"``: ``x̃ = (x̃ − mean(x̃)) / (std(x̃) + layer_norm_eps)`` with the
       unbiased std (``d − 1``), what SAELens ``normalize_activations: layer_norm`` and
       OpenAI's ``sparse_autoencoder`` ``LN`` compute
    3. ``apply_b_dec_to_input``: ``x̃ = x̃ − b_dec``           (sae_latents only)
    """

    scale: float = 1.0
    normalize: str = "none"
    apply_b_dec_to_input: bool = False
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True, eq=False)
class Component:
    """One set of ``k`` columns on one layer (a probe's logits or selected SAE latents).

    ``tensors`` are float32 with the shapes its kind declares (main tensor
    ``[d_model, k]``; empty when loaded with ``load_tensors=False``). ``k`` is the
    number of columns (0: derived from ``tensors``). ``activation`` selects the kind's
    epilogue (see the module docstring). ``latent_ids`` (sae_latents only) are the latent
    indices in the source SAE, one per column, for feature labels in alerts;
    ``latent_labels`` (optional, only with ``latent_ids``) a short human label per column
    (at most ``bundle.MAX_LATENT_LABEL_CHARS``), carried with fired latents into verdicts,
    the audit log and alerts.
    """

    name: str
    kind: str
    layer: int
    hook_name: str
    tensors: Mapping[str, torch.Tensor]
    activation: str = "identity"
    latent_ids: tuple[int, ...] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    k: int = 0
    latent_labels: tuple[str, ...] | None = None  # one short label per latent (alerts)

    def __post_init__(self) -> None:
        if self.k == 0:
            main = get_kind(self.kind, self.activation).main
            object.__setattr__(self, "k", int(self.tensors[main].shape[1]))


@dataclass(frozen=True)
class Epilogue:
    """Per-column epilogue ``z = [p > theta] · max(scale · p + shift, floor)``, float32 [k].

    ``scale``/``shift`` are None for ``s = 1, t = 0`` (every kind but gated).
    """

    theta: torch.Tensor
    floor: torch.Tensor
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


class ComponentKind:
    """Base of a component kind. Subclasses set the class attributes and ``fold``.

    ``roles``: ``{role: shape}`` for every tensor role but ``main``, where shape is
    ``"k"``, ``"d_model"`` or ``"k_or_scalar"`` (a ``[]`` tensor allowed when k = 1);
    full-width kinds also ``"d_model_m"`` (``[d_model, m]``, m the full width, k ≤ m),
    ``"m"`` and ``"scalar"`` (``[]``).
    ``required``: the roles that must be present (``main`` always is).
    ``vector_main``: a main tensor of shape ``[d_model]`` is accepted as ``k = 1``.
    ``positive``: roles whose values must all be > 0.
    """

    kind: str = ""
    activation: str = ""
    main: str = ""
    roles: ClassVar[Mapping[str, str]] = {}
    required: frozenset[str] = frozenset()
    vector_main: bool = False
    positive: frozenset[str] = frozenset()
    has_b_dec: bool = False  # "b_dec" is a role: apply_b_dec_to_input is allowed
    #: the kind also needs a full-width block at score time (TopK: ``fold_full``)
    full_width: bool = False

    def fold_full(self, tensors: Mapping[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Full-width kinds only: ``(A_full [d_model, m], a_full [m], k)`` float64."""
        raise NotImplementedError

    def fold(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [d_model, k], a [k])`` float64 with ``p = u · A + a`` for the
        preprocessed row ``u`` (before any ``b_dec`` shift, which the packer folds)."""
        raise NotImplementedError

    def epilogue(self, tensors: Mapping[str, torch.Tensor]) -> Epilogue:
        raise NotImplementedError


_REGISTRY: dict[tuple[str, str], ComponentKind] = {}


def register_kind(kind: ComponentKind) -> ComponentKind:
    """Add ``kind`` to the registry (import time only); returns it."""
    key = (kind.kind, kind.activation)
    if key in _REGISTRY and type(_REGISTRY[key]) is not type(kind):
        raise ValueError(f"component kind {key} registered twice")
    _REGISTRY[key] = kind
    return kind


def get_kind(kind: str, activation: str) -> ComponentKind:
    try:
        return _REGISTRY[(kind, activation)]
    except KeyError:
        raise KeyError(f"no component kind {kind!r} with activation {activation!r} "
                       f"(registered: {sorted(_REGISTRY)})") from None


def kind_names() -> tuple[str, ...]:
    """Registered kinds, in registration order, without repeats."""
    return tuple(dict.fromkeys(k for k, _ in _REGISTRY))


def activations_of(kind: str) -> tuple[str, ...]:
    """The activations registered for ``kind``, sorted."""
    return tuple(sorted(a for k, a in _REGISTRY if k == kind))


def _full(k: int, value: float) -> torch.Tensor:
    import torch

    return torch.full((k,), value, dtype=torch.float32)


class LinearProbeKind(ComponentKind):
    """``z = ((u − mean) / std) · weight + bias`` (identity epilogue)."""

    kind = "linear_probe"
    activation = "identity"
    main = "weight"
    roles: ClassVar[Mapping[str, str]] = {"bias": "k_or_scalar", "mean": "d_model",
                                          "std": "d_model"}
    required = frozenset({"weight", "bias"})
    vector_main = True
    positive = frozenset({"std"})

    def fold(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # ((u − m) / s) · W + b = u · (W / s[:, None]) + (b − (m / s) · W)
        A = tensors["weight"].double()
        a = tensors["bias"].double()
        if "std" in tensors:
            A = A / tensors["std"].double()[:, None]
        if "mean" in tensors:
            a = a - tensors["mean"].double() @ A
        return A, a

    def epilogue(self, tensors: Mapping[str, torch.Tensor]) -> Epilogue:
        k = int(tensors["weight"].shape[1])
        return Epilogue(theta=_full(k, float("-inf")), floor=_full(k, float("-inf")))


register_kind(LinearProbeKind())
