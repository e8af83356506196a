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


_INTERNAL = {"ctx", "sparsity", "original_params", "alloc"}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def option_signature(method: ModuleType) -> dict[str, inspect.Parameter]:
    """The options a method takes (keyword parameters of its `score` or `run`, without the internal ones)."""
    fn = getattr(method, "run", None) or method.score
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n not in _INTERNAL}


def _allowed_types(param: inspect.Parameter) -> tuple[type, ...] | None:
    """Python types an option accepts, from its annotation ('int', 'float', 'str | None', ...) or, without one, its
    default's type; None when the annotation is not a plain scalar type (then the value is not checked here)."""
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        default = param.default
        if default is inspect.Parameter.empty or default is None:
            return None
        ann = type(default).__name__
    if not isinstance(ann, str):
        ann = getattr(ann, "__name__", str(ann))
    names = [a.strip() for a in ann.replace("Optional[", "").rstrip("]").split("|")]
    if not all(n in _TYPES for n in names):
        return None
    return tuple(_TYPES[n] for n in names)


def _type_ok(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True  # an integer where a float is expected (eps=1)
    return isinstance(value, types)


def check_options(method: ModuleType, name: str, options: dict) -> None:
    """Reject options the method does not take (naming the closest one it does) and values of the wrong type
    (`queries="4"`, `queries=2.5`): the method's signature is the schema."""
    import difflib

    params = option_signature(method)
    accepted = list(params)
    unknown = [k for k in options if k not in params]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown option(s) {', '.join(hints)} for method {name!r}; accepted: {accepted or 'none'}"
        )
    problems = []
    for key, value in options.items():
        types = _allowed_types(params[key])
        if types is not None and not _type_ok(value, types):
            want = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key}={value!r} must be {want}, got {type(value).__name__}")
    if problems:
        raise ValueError(f"invalid option value(s) for method {name!r}: " + "; ".join(problems))
