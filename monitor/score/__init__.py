"""Detector bundles, packed per-layer weights and the fused scorers.

    bundle.py       load_bundle / write_bundle: manifest.json + safetensors, validated
    pack.py         fold every component of a layer into one W, b, θ and a read-out R, c
    scorer.py       Scorer.score(layer, x): one GEMM, vectorised epilogue, sigmoid read-out
    triton_fused.py the same score as one Triton kernel on CUDA (Scorer(kernel="triton"))
    onnx_export.py  export_onnx: each packed layer as an ONNX graph beside the bundle
    onnx_scorer.py  OnnxScorer: the same scores with onnxruntime, without torch
    backend.py      load_scorer: --backend torch | onnxruntime | auto (start-up benchmark)
    available.py    which of torch / onnxruntime is installed (without importing them)
    placeholder.py  a clearly labelled random bundle for tests and demos

Importing this package (and bundle, onnx_scorer, backend) does not import torch; the
names that need it (pack, Scorer, export, placeholder) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .onnx_export import export_onnx
    from .onnx_scorer import OnnxScorer
    from .pack import ColumnRef, PackedLayer, pack_bundle, pack_layer
    from .placeholder import build_placeholder_bundle
    from .scorer import Scorer

#: name -> submodule, for the names imported on first use (torch / onnx behind them).
_LAZY = {
    "ColumnRef": "pack", "PackedLayer": "pack", "pack_bundle": "pack", "pack_layer": "pack",
    "Scorer": "scorer", "build_placeholder_bundle": "placeholder",
    "export_onnx": "onnx_export", "OnnxScorer": "onnx_scorer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bundle",
    "BundleError",
    "ColumnRef",
    "Component",
    "DetectorInput",
    "DetectorSpec",
    "OnnxScorer",
    "PackedLayer",
    "Preprocessing",
    "Scorer",
    "build_placeholder_bundle",
    "export_onnx",
    "load_bundle",
    "pack_bundle",
    "pack_layer",
    "write_bundle",
]
