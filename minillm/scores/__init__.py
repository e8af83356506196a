"""Scoring methods. Each module computes unit scores and nothing else; `minillm.prune` does the rest.

A method module defines ``NEEDS_CALIBRATION: bool`` and ``score(ctx, **options) -> list[LayerScores]`` (higher =
more important), or, when scoring and removal interleave (Bonsai's rounds), ``run(ctx, sparsity, original_params,
alloc, **options) -> history``. It may define ``DEFAULT_ALLOCATION`` and ``DEFAULT_COMPENSATE_BIAS``.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

METHODS = {
    "random": "random_scores",
    "magnitude": "magnitude",
    "taylor": "taylor",
    "wanda_sp": "wanda_sp",
    "flap": "flap",
    "fms": "fms",
    "bonsai": "bonsai",
    "wanda_24": "wanda_24",
    "magnitude_24": "magnitude_24",
}


def available_methods() -> list[str]:
    out = []
    for name, mod in METHODS.items():
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
            out.append(name)
    return out


def get_method(name: str) -> ModuleType:
    if name not in METHODS or importlib.util.find_spec(f"{__name__}.{METHODS[name]}") is None:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    return importlib.import_module(f"{__name__}.{METHODS[name]}")


def check_options(method: ModuleType, name: str, options: dict) -> None:
    """Reject options the method does not take, naming the ones it does."""
    fn = getattr(method, "run", None) or method.score
    internal = {"ctx", "sparsity", "original_params", "alloc"}
    accepted = [p for p in inspect.signature(fn).parameters if p not in internal]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; accepted: {accepted or 'none'}")
