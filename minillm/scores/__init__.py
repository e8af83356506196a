"""Scoring methods. Each module computes unit scores and nothing else; `minillm.prune` does the rest.

A method is one module here plus one line in `METHODS`. The module declares what it needs as ``SPEC =
MethodSpec(...)`` and defines either ``score(ctx, **options) -> list[LayerScores]`` (higher = more important) or,
when it scores and removes units itself (``scores_and_removes``: Bonsai's rounds, the N:M baselines),
``run(ctx, sparsity, original_params, alloc, **options) -> history``. Its options are the keyword parameters of
that function (`check_options` validates against the signature); a module may also define
``check_values(options: dict)``, the ranges of its options, which `check_options` runs before any model is loaded.
`minillm.prune` reads only the SPEC, never the method's name.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
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
    "obs": "obs",
}


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs from `minillm.prune`.

    needs_calibration: calibration token ids are required (and validated) before scoring.
    needs_backward: a real backward pass (no layer streaming: it would need every layer on the device at once).
    perturbs_weights: reads or perturbs weights inside its forward passes, so accelerate-offloaded weights must be
        loaded for good first; a bool, or a function of the method's options when only some variants do.
    scores_and_removes: removes units itself (module defines `run`, not `score`): precomputed scores and bias
        compensation do not apply.
    zeroes_in_place: zeroes weights inside dense matrices (the N:M patterns) instead of removing whole units, so no
        input column of an output projection goes and there is nothing for `reconstruct` to refit.
    default_allocation, default_compensate_bias, default_reconstruct: defaults of `prune`'s `allocation`,
        `compensate_bias` and `reconstruct` (None: no refit); default_calibration: the CLI's calibration size.
    """

    needs_calibration: bool
    needs_backward: bool = False
    perturbs_weights: bool | Callable[[dict], bool] = False
    scores_and_removes: bool = False
    zeroes_in_place: bool = False
    default_allocation: str = "uniform"
    default_compensate_bias: bool = False
    default_reconstruct: str | None = None
    #: (windows, tokens per window) of the CLI's calibration unless given: LLM-Pruner's 10 x 64 for the methods
    #: that the artifact's grid calibrates so; more for a method whose refit needs many more tokens than columns
    default_calibration: tuple[int, int] = (10, 64)


@dataclass(frozen=True)
class Method:
    """A registered method: its name, declared needs and module."""

    name: str
    spec: MethodSpec
    module: ModuleType

    @property
    def entry(self) -> Callable:
        """The function that does the work: `run` for methods that remove units themselves, `score` otherwise."""
        return self.module.run if self.spec.scores_and_removes else self.module.score

    def score(self, ctx, **options) -> list:
        if self.spec.scores_and_removes:
            raise ValueError(f"method {self.name!r} scores and removes in one go; it has no separate scoring step")
        return self.module.score(ctx, **options)

    def run(self, ctx, sparsity: float, original_params: int, alloc, **options) -> list[dict]:
        return self.module.run(ctx, sparsity, original_params, alloc, **options)

    def needs_resident_weights(self, options: dict) -> bool:
        """Whether accelerate-offloaded weights must be loaded for good before this method runs: it reads weight
        gradients, perturbs weights inside forward passes, or removes units between its own rounds."""
        perturbs = self.spec.perturbs_weights
        perturbs = perturbs(options) if callable(perturbs) else perturbs
        return self.spec.needs_backward or self.spec.scores_and_removes or bool(perturbs)


def available_methods() -> list[str]:
    out = []
    for name, mod in METHODS.items():
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
            out.append(name)
    return out


def get_method(name: str) -> Method:
    if name not in METHODS or importlib.util.find_spec(f"{__name__}.{METHODS[name]}") is None:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    module = importlib.import_module(f"{__name__}.{METHODS[name]}")
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"method module {module.__name__} must declare SPEC = MethodSpec(...)")
    entry = "run" if spec.scores_and_removes else "score"
    if not callable(getattr(module, entry, None)):
        raise TypeError(f"method module {module.__name__} must define {entry}() (SPEC.scores_and_removes is "
                        f"{spec.scores_and_removes})")
    return Method(name, spec, module)


_INTERNAL = {"ctx", "sparsity", "original_params", "alloc"}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def option_signature(method: Method) -> dict[str, inspect.Parameter]:
    """The options a method takes (keyword parameters of its `score` or `run`, without the internal ones)."""
    return {n: p for n, p in inspect.signature(method.entry).parameters.items() if n not in _INTERNAL}


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


def check_options(method: Method, name: str, options: dict) -> None:
    """Reject options the method does not take (naming the closest one it does), values of the wrong type
    (`queries="4"`, `queries=2.5`) and non-finite numbers (`eps=Infinity` from JSON would make every score NaN): the
    method's signature is the schema. Then the method's own ranges (its module's `check_values`), if it has any."""
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
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}={value!r} must be a finite number")
    if problems:
        raise ValueError(f"invalid option value(s) for method {name!r}: " + "; ".join(problems))
    check_values = getattr(method.module, "check_values", None)
    if callable(check_values):
        try:
            check_values(options)
        except ValueError as e:
            raise ValueError(f"invalid option value for method {name!r}: {e}") from None
