"""SAEs: published formats, one module per architecture, latent selection for bundles.

    registry.py   Architecture / SAELatentsKind bases, SAEError, the architecture registry
    model.py      SAE (loaded, any format): preprocess, encode, decode, component(ids)
    standard.py   relu            (SAELens standard, transcoders)
    jumprelu.py   jumprelu        (SAELens, Gemma Scope, Llama Scope, BatchTopK)
    gated.py      gated           (SAELens gated)
    topk.py       topk            (SAELens topk, sparsify, OpenAI): full encode only
    formats.py    readers: SAELens, Gemma Scope, Llama Scope, sparsify; OpenAI converter

Importing this package registers the SAE component kinds (``monitor/score/kinds.py``).
"""

from . import gated, jumprelu, standard, topk  # noqa: F401  (registration)
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
from .registry import SAEError, architectures, get_architecture

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
