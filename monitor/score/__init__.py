"""Detector bundles, packed per-layer weights and the fused scorer.

    bundle.py       load_bundle / write_bundle: manifest.json + safetensors, validated
    pack.py         fold every component of a layer into one W, b, θ and a read-out R, c
    scorer.py       Scorer.score(layer, x): one GEMM, vectorised epilogue, sigmoid read-out
    placeholder.py  a clearly labelled random bundle for tests and demos
"""

from .bundle import (
    Bundle,
    BundleError,
    Component,
    DetectorInput,
    DetectorSpec,
    Preprocessing,
    load_bundle,
    write_bundle,
)
from .pack import ColumnRef, PackedLayer, pack_bundle, pack_layer
from .placeholder import build_placeholder_bundle
from .scorer import Scorer

__all__ = [
    "Bundle",
    "BundleError",
    "ColumnRef",
    "Component",
    "DetectorInput",
    "DetectorSpec",
    "PackedLayer",
    "Preprocessing",
    "Scorer",
    "build_placeholder_bundle",
    "load_bundle",
    "pack_bundle",
    "pack_layer",
    "write_bundle",
]
