"""SAEs: published formats, one module per architecture, latent selection for bundles.

    registry.py   Architecture / SAELatentsKind bases, SAEError, the architecture registry
    model.py      SAE (loaded, any format): preprocess, encode, decode, component(ids)
    standard.py   relu            (SAELens standard, transcoders)
    jumprelu.py   jumprelu        (SAELens, Gemma Scope, Llama Scope, BatchTopK)
    gated.py      gated           (SAELens gated)
    topk.py       topk            (SAELens topk, sparsify, OpenAI): full encode only
    formats.py    readers: SAELens, Gemma Scope, Llama Scope, sparsify; OpenAI converter

Importing this package registers the SAE component kinds (``monitor/score/kinds.py``)
without importing torch (the onnxruntime sidecar validates bundles without it); the
loaders (``formats``, ``model``) are imported on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import gated, jumprelu, standard, topk  # noqa: F401  (registration)
from .registry import SAEError, architectures, get_architecture

if TYPE_CHECKING:
    from .formats import (
        convert_openai,
        load_gemma_scope,
        load_llama_scope,
        load_sae,
        load_saelens,
        load_sparsify,
        save_saelens,
    )
    from .model import SAE, hook_layer, resid_post_layer

_LAZY = {"convert_openai": "formats", "load_gemma_scope": "formats",
         "load_llama_scope": "formats", "load_sae": "formats", "load_saelens": "formats",
         "load_sparsify": "formats", "save_saelens": "formats", "SAE": "model",
         "hook_layer": "model", "resid_post_layer": "model"}

__all__ = [
    "SAE",
    "SAEError",
    "architectures",
    "convert_openai",
    "get_architecture",
    "hook_layer",
    "load_gemma_scope",
    "load_llama_scope",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "resid_post_layer",
    "save_saelens",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
