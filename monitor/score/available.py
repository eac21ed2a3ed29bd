"""Which scorer libraries are installed, asked without importing them (stdlib only).

Used by ``backend.py`` (``--backend auto``) and by tools that need a bundle but no
benchmark (``safety-monitor plan`` / ``check``), so that the slim image, which has
onnxruntime and no torch, never tries to import torch.
"""

from __future__ import annotations

import importlib.util

__all__ = ["installed", "installed_backend"]


def installed(module: str) -> bool:
    """Importable as far as the import system says (a finder refusing it: not installed)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def installed_backend() -> str:
    """"torch" where torch is installed, else "onnxruntime"."""
    return "torch" if installed("torch") else "onnxruntime"
