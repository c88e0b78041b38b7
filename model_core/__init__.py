"""model_core: a 2D multimodal LLM adapted to 3D CT volumes (report generation and VQA).

Runs without 3D Slicer. Heavy modules (torch, transformers) load on first use of a name below,
so ``import model_core`` stays cheap for tools that only need the data or metrics parts.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CTMLLM": "model_core.model",
    "VisualFeatures": "model_core.model",
    "GenerationResult": "model_core.generation",
    "CTMLLMConfig": "model_core.config",
    "VolumeAdapterConfig": "model_core.config",
    "MoEConfig": "model_core.config",
    "load_model": "model_core.hub",
    "build_tiny_ctmllm": "model_core.tiny",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model_core' has no attribute {name!r}")


__all__ = sorted(_LAZY)
