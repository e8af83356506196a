"""Model-family adapters. Adding a family means one new module here and one line in `_ADAPTERS`."""

from __future__ import annotations

from torch import nn

from .base import Adapter, AttentionShape, Member, UnsupportedArchitectureError
from .bloom import BloomAdapter
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .opt import OPTAdapter

_ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, OPTAdapter, BloomAdapter, Gemma3Adapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in _ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded causal LM; raises UnsupportedArchitectureError naming the model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in _ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: "
        f"{', '.join(supported_model_types())}"
    )


__all__ = [
    "Adapter",
    "AttentionShape",
    "Member",
    "UnsupportedArchitectureError",
    "get_adapter",
    "supported_model_types",
]
