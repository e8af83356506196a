"""The schema of a profile (configs/*.yaml): every section and key is checked before any computation.

One pydantic model per section, each with `extra="forbid"` and strict types: an unknown key is named with the
closest valid key (a misspelt `limt` would otherwise silently run every zero-shot example), "4" is not the integer
4, 2.5 is not an integer, true is not a number. Ranges are Field constraints, choices are Literals. The checks
across keys follow: method options against the method's signature, seeds and the sparsities they run at, labels,
sequence lengths against the model's positions, and `model:` must be something `load_model` can load and that has
a tokenizer. Every problem of a profile is reported at once, one line each, starting with the dotted path of its
key (`profile.accuracy.zeroshot.limt: ...`).

The models only check: `validate_profile` returns the plain dict it was given, which the experiments read.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class ProfileError(ValueError):
    """A profile that does not follow the schema."""


class _Problems(ValueError):
    """Raised by a model's check across keys: (location within the model, message) for each problem found."""

    def __init__(self, problems: list[tuple[tuple, str]]):
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


# --- value types ------------------------------------------------------------------------------------------------------

# An optional key may be absent but not null: pydantic does not validate a default, so `key: int = ABSENT` accepts a
# missing key and refuses `key: null` (the experiments read `section.get(key, default)`, which a null would defeat).
ABSENT: Any = None
# the sections that are grids of method entries x sparsities x seeds, run by `experiments.run_accuracy`: the accuracy
# grid, the ablations, and the calibration budget (the same methods calibrated on more tokens; perplexity only)
GRID_SECTIONS = ("accuracy", "ablations", "calibration_budget")

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Seqlen = Annotated[int, Field(ge=2)]
PosFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Sparsity = Annotated[float, Field(ge=0.0, lt=1.0)]
Sparsities = Annotated[list[Sparsity], Field(min_length=1)]
Names = Annotated[list[str], Field(min_length=1)]
Allocation = Literal["uniform", "global"]
AttentionUnits = Literal["auto", "kv_group", "query_head"]
Dtype = Literal["float32", "float16", "bfloat16"]


def _distinct_with_zero(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"must be distinct: {seeds} repeats a value")
    if 0 not in seeds:
        raise ValueError(f"must include 0 (the record at every sparsity; the others are replicates), got {seeds}")
    return seeds


# Replicate k of a (method, sparsity) adds k to the calibration seed and to the method seed; 0 is the record without
# replicates.
ReplicateSeeds = Annotated[list[NonNegInt], Field(min_length=1), AfterValidator(_distinct_with_zero)]


def _one_pair_message(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "pair", "must be a pair [batch, seqlen] of integers >= 1, got {value}", {"value": repr(value)}
        ) from None


Pair = Annotated[list[PosInt], Field(min_length=2, max_length=2), WrapValidator(_one_pair_message)]


# --- the sections -----------------------------------------------------------------------------------------------------


class _Section(BaseModel):
    # YAML's .inf and .nan are floats: refused everywhere (a bound such as `gt=0` alone lets .inf through)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Calibration(_Section):
    n_samples: PosInt
    seqlen: Seqlen
    seed: int = ABSENT


class CalibrationOverride(_Section):
    """A method entry's own calibration settings, over its section's."""

    n_samples: PosInt = ABSENT
    seqlen: Seqlen = ABSENT
    seed: int = ABSENT


class Perplexity(_Section):
    seqlen: Seqlen
    windows: PosInt
    batch_size: PosInt = ABSENT


class EvalPerplexity(Perplexity):
    # a percentile bootstrap 95% interval over windows beside `ppl` (no extra forward passes); absent: none
    bootstrap_iters: PosInt = ABSENT
    bootstrap_seed: NonNegInt = ABSENT


class Zeroshot(_Section):
    stderr: bool = ABSENT  # lm-eval's standard errors (closed form for acc / acc_norm); absent: none
    limit: Optional[PosInt] = ABSENT  # null: every example
    batch_size: PosInt = ABSENT
    tasks: Names = ABSENT
    sparsities: list[Sparsity] = ABSENT


class PruneOptions(_Section):
    allocation: Allocation = ABSENT
    attention_units: AttentionUnits = ABSENT
    targets: Literal["both", "attention", "mlp"] = ABSENT
    skip_layers: list[NonNegInt] = ABSENT
    round_to: PosInt = ABSENT
    compensate_bias: bool = ABSENT
    reconstruct: Literal["dense", "sequential", "none"] = ABSENT
    reconstruct_ridge: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = ABSENT
    reconstruct_form: Literal["centered", "uncentered"] = ABSENT


class MethodEntry(_Section):
    label: str
    method: str
    options: dict[str, Any] = ABSENT

    @model_validator(mode="after")
    def _options_fit_the_method(self):
        from minillm.scores import check_options, get_method

        check_options(get_method(self.method), self.method, self.options or {})  # ValueError: reported at the entry
        return self


class AccuracyEntry(MethodEntry):
    """One method of accuracy or ablations; its own settings override the section's (`resolved_entry`)."""

    prune_options: PruneOptions = ABSENT
    sparsities: Sparsities = ABSENT
    calibration: CalibrationOverride = ABSENT
    seed: int = ABSENT
    seeds: ReplicateSeeds = ABSENT
    seed_sparsities: Sparsities = ABSENT  # within the entry's sparsities
    zeroshot: bool = ABSENT  # false: perplexity only for this entry (the section's zero-shot covers the others)
    seed_zeroshot: bool = ABSENT  # false: its seed replicates (k > 0) get perplexity only


class Accuracy(_Section):
    """The `accuracy`, `ablations` and `calibration_budget` sections."""

    calibration: Calibration
    perplexity: EvalPerplexity
    zeroshot: Zeroshot = ABSENT
    sparsities: Sparsities
    seeds: ReplicateSeeds = ABSENT
    seed_sparsities: Sparsities = ABSENT  # within the union of the entries' sparsities
    seed_zeroshot: bool = ABSENT  # false: seed replicates get perplexity only (an entry's own `seed_zeroshot` wins)
    prune_options: PruneOptions = ABSENT
    methods: Annotated[list[AccuracyEntry], Field(min_length=1)]

    @model_validator(mode="after")
    def _labels_and_seed_sparsities(self):
        """Labels are distinct; seed sparsities are sparsities that run (an entry's own list within its
        sparsities, the section's within the union of its entries' sparsities)."""
        problems = []
        labels = [e.label for e in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            problems.append((("methods",), f"duplicate labels {dup}"))
        section = self.model_dump(exclude_unset=True)
        runs_all = set()
        for i, entry in enumerate(section["methods"]):
            runs = resolved_entry(section, entry)["sparsities"]
            runs_all.update(runs)
            missing = [s for s in entry.get("seed_sparsities", []) if not _among(s, runs)]
            if missing:
                problems.append((("methods", i, "seed_sparsities"), f"{missing} not among its sparsities {runs}"))
        missing = [s for s in section.get("seed_sparsities", []) if not _among(s, runs_all)]
        if missing:
            problems.append(
                (("seed_sparsities",), f"{missing} not among the methods' sparsities {sorted(runs_all)}")
            )
        if problems:
            raise _Problems(problems)
        return self


class Train(_Section):
    windows: PosInt
    seqlen: Seqlen
    steps: PosInt
    batch_size: PosInt
    rank: PosInt
    alpha: PosFloat
    lr: PosFloat
    seed: int = ABSENT


class TrainOverride(_Section):
    """A recovery entry's own train settings, over the section's."""

    windows: PosInt = ABSENT
    seqlen: Seqlen = ABSENT
    steps: PosInt = ABSENT
    batch_size: PosInt = ABSENT
    rank: PosInt = ABSENT
    alpha: PosFloat = ABSENT
    lr: PosFloat = ABSENT
    seed: int = ABSENT


class RecoveryItem(_Section):
    """An accuracy label, or a mapping with the label and its own recovery settings."""

    label: str
    sparsities: Sparsities = ABSENT
    kl_weights: Annotated[list[NonNegFloat], Field(min_length=1)] = ABSENT
    train: TrainOverride = ABSENT
    tag: str = ABSENT

    @model_validator(mode="before")
    @classmethod
    def _a_label_alone(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"label": data}
        if not isinstance(data, dict):
            raise PydanticCustomError(
                "recovery_item", "must be a label or a mapping, got {value}", {"value": repr(data)}
            )
        return data

    @model_validator(mode="after")
    def _train_override_is_tagged(self):
        if self.train is not None and not self.tag:
            raise ValueError(f"entry {self.label!r} overrides train settings and needs a 'tag'")
        return self


class Recovery(_Section):
    methods: Annotated[list[RecoveryItem], Field(min_length=1)]
    sparsities: Sparsities
    kl_weights: Annotated[list[NonNegFloat], Field(min_length=1)]
    train: Train
    perplexity: EvalPerplexity
    zeroshot: Zeroshot = ABSENT


class MemoryEntry(MethodEntry):
    sparsity: Sparsity = ABSENT


class Memory(_Section):
    models: Names
    dtype: Dtype
    shapes: Annotated[list[Pair], Field(min_length=1)]
    methods: Annotated[list[MemoryEntry], Field(min_length=1)]


class Decode(_Section):
    batch: Annotated[list[PosInt], Field(min_length=1)]
    prompt: PosInt
    new_tokens: PosInt


class Latency(_Section):
    include_24: bool = ABSENT
    round_to: Annotated[list[PosInt], Field(min_length=1)] = ABSENT
    models: Names
    dtype: Dtype
    sparsities: Sparsities
    prefill: Annotated[list[Pair], Field(min_length=1)]
    decode: Decode
    repeats: PosInt = ABSENT  # interleaved rounds per shape (decode: max(3, repeats // 4))
    bench_repeats: PosInt = ABSENT  # whole-bench repeats (default measure.BENCH_REPEATS)
    compile: Literal["none", "all"] = ABSENT


class FmsPruneOptions(_Section):
    attention_units: AttentionUnits = ABSENT


class Oracle(_Section):
    channels: NonNegInt = ABSENT
    seed: int = ABSENT


class Bonsai(_Section):
    masks: Annotated[int, Field(ge=2)] = ABSENT
    prune_frac: Annotated[float, Field(gt=0.0, lt=0.5)] = ABSENT
    prior: str = ABSENT


class FmsDiagnostics(_Section):
    """The FMS diagnostics section (minillm/artifact/diagnostics.py)."""

    calibration: Calibration
    perplexity: Perplexity
    sparsities: Sparsities
    allocations: Annotated[list[Allocation], Field(min_length=1)] = ABSENT
    compensate_bias: Annotated[list[bool], Field(min_length=1)] = ABSENT
    prune_options: FmsPruneOptions = ABSENT
    eps: PosFloat = ABSENT
    overlap_p: Annotated[float, Field(gt=0.0, le=1.0)] = ABSENT
    seeds: Annotated[list[NonNegInt], Field(min_length=1)] = ABSENT
    queries: Annotated[list[PosInt], Field(min_length=1)]
    criteria_queries: list[PosInt] = ABSENT
    full_n_seeds: PosInt = ABSENT
    weight_queries: list[PosInt] = ABSENT
    estimators: dict[str, Any] = ABSENT
    oracle: Oracle = ABSENT
    bonsai: Bonsai = ABSENT
    batch_tokens: PosInt = ABSENT


class Profile(_Section):
    description: str = ABSENT
    model: str
    device: str = ABSENT
    requires_hub: bool = ABSENT
    dtype: Dtype = ABSENT
    profile: str = ABSENT  # set by load_profile: the file's name
    accuracy: Accuracy = ABSENT
    ablations: Accuracy = ABSENT
    calibration_budget: Accuracy = ABSENT  # the accuracy methods at several calibration sizes (notebook 04)
    recovery: Recovery = ABSENT
    memory: Memory = ABSENT
    latency: Latency = ABSENT
    fms_diagnostics: FmsDiagnostics = ABSENT


# --- an accuracy or ablation entry with its section's settings --------------------------------------------------------


def _among(value: float, values) -> bool:
    return any(abs(value - v) < 1e-9 for v in values)


def resolved_entry(section: dict, entry: dict) -> dict:
    """A copy of an accuracy or ablation method `entry` with its `section`'s settings applied, the entry's own
    winning (the "entry over section" rule); `section` and `entry` are left as they are:

    - `prune_options`: the section's merged with the entry's, key by key (exactly what a record's configuration
      stores; no built-in defaults are added);
    - `calibration`: the section's merged with the entry's, key by key, with `seed` 0 when neither sets it;
    - `sparsities`: the entry's, else the section's;
    - `seeds`: the entry's, else the section's, else [0] (no replicates);
    - `seed_sparsities`: the sparsities, among the resolved `sparsities` and in their order, at which replicates
      k > 0 run: those of the entry's list, else of the section's, else all of them (empty: no replicates run);
    - `seed_zeroshot`: the entry's, else the section's, else true.

    Every other key (label, method, options, seed, zeroshot, ...) is the entry's own, as it is."""
    out = copy.deepcopy(entry)
    out["prune_options"] = copy.deepcopy({**section.get("prune_options", {}), **entry.get("prune_options", {})})
    out["calibration"] = {"seed": 0, **section.get("calibration", {}), **entry.get("calibration", {})}
    out["sparsities"] = list(entry.get("sparsities", section["sparsities"]))
    out["seeds"] = list(entry.get("seeds", section.get("seeds", [0])))
    chosen = entry.get("seed_sparsities", section.get("seed_sparsities"))
    out["seed_sparsities"] = [s for s in out["sparsities"] if chosen is None or _among(s, chosen)]
    out["seed_zeroshot"] = entry.get("seed_zeroshot", section.get("seed_zeroshot", True))
    return out


# --- error messages ---------------------------------------------------------------------------------------------------


def _where(name: str, loc: tuple) -> str:
    return name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _unwrap(tp: Any) -> Any:
    """`tp` without Annotated metadata and without the None of Optional."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) is Union and type(None) in get_args(tp):
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp


def _type_at(loc: tuple) -> Any:
    """The declared type at `loc` (a pydantic error location) in the profile schema; None where it is free-form."""
    tp: Any = Profile
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int) and get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return None
    return tp


def _hint(value: Any, choices: list[str], cutoff: float = 0.6) -> list[str]:
    return difflib.get_close_matches(str(value), choices, n=1, cutoff=cutoff)


def _messages(err: dict) -> list[tuple[tuple, str]]:
    """(location, message) of one pydantic error, in the profile's words."""
    kind, loc, value, ctx = err["type"], tuple(err["loc"]), err.get("input"), err.get("ctx", {})
    if kind == "extra_forbidden":
        parent = _unwrap(_type_at(loc[:-1]))
        keys = list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        close = _hint(loc[-1], keys, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [(loc, f"unknown key {loc[-1]!r}{hint} (valid keys: {', '.join(keys)})")]
    if kind == "missing":
        return [(loc, "required key missing")]
    if kind == "literal_error":
        choices = [str(c) for c in get_args(_unwrap(_type_at(loc)))]
        close = _hint(value, choices)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [(loc, f"must be one of {', '.join(choices)}, got {value!r}{hint}")]
    if kind == "value_error" and isinstance(ctx.get("error"), _Problems):
        return [(loc + sub, msg) for sub, msg in ctx["error"].problems]
    if kind == "value_error":
        return [(loc, str(ctx["error"]))]
    if kind == "int_type":
        nullable = get_origin(_type_at(loc)) is Union
        return [(loc, f"must be an integer{' or null' if nullable else ''}, got {value!r}")]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        return [(loc, f"must be {bounds[kind]} {next(iter(ctx.values()))}, got {value!r}")]
    if kind == "too_short":
        return [(loc, f"must have at least {ctx['min_length']} item(s), got {value!r}")]
    plain = {
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a mapping",
        "model_type": "must be a mapping",
    }
    if kind in plain:
        return [(loc, f"{plain[kind]}, got {value!r}")]
    return [(loc, err["msg"])]  # a custom error (a pair), or a kind the schema does not produce today


# --- checks across sections -------------------------------------------------------------------------------------------


def _model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a profile's `model:` (None when it can): see check_model_name."""
    from minillm.models import DEFAULT_MODEL, PRETRAINED, SHAPES, registry_names

    if name in SHAPES:
        return (
            f"{name!r} is a random-weight registry model without a tokenizer; the accuracy, ablation and "
            f"recovery experiments need text (use {DEFAULT_MODEL!r}, a local model directory or a Hub id; shape "
            "models belong under memory.models / latency.models)"
        )
    if name in PRETRAINED:  # the pretrained models installed by the set-up
        return None
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            return f"directory {name!r} holds no config.json (not a model directory)"
        return None
    if name.count("/") == 1 and not name.startswith((".", "/")) and all(name.split("/")):
        return None  # a Hub id
    close = difflib.get_close_matches(name, registry_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown model {name!r}{hint}: not the embedded {DEFAULT_MODEL!r}, not an existing directory, not a "
        "Hub id of the form 'org/name'"
    )


def check_model_name(name: str, where: str = "model") -> None:
    """`model:` must be an installed pretrained model (SmolLM2, Gemma 3), an existing local model directory, or a Hub
    id 'org/name'; the shape and tiny registry names have no tokenizer, so they cannot drive the text experiments."""
    problem = _model_name_problem(name)
    if problem:
        raise ProfileError(f"{where}: {problem}")


def model_max_positions(name: str) -> int | None:
    """The longest sequence `name`'s position embeddings cover, when it can be known without loading weights or
    the network: registry shapes, models a registry shape reproduces (models.SHAPE_OF), local directories (their
    config.json). None otherwise, and for ALiBi models (BLOOM), which have no limit."""
    from minillm.models import SHAPE_OF, SHAPES
    from minillm.prune import max_positions

    if name in SHAPES:
        return max_positions(SHAPES[name]())
    if name in SHAPE_OF:
        return max_positions(SHAPES[SHAPE_OF[name]]())
    config = Path(name) / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        if data.get("model_type") == "bloom":
            return None
        n = data.get("max_position_embeddings") or data.get("n_positions")
        return int(n) if n else None
    return None


def _across_sections(cfg: dict, mistyped: list[tuple]) -> list[tuple[tuple, str]]:
    """The checks that need more than one section. Each reads only values the schema found well-typed (no type,
    range or missing-key problem at, above or below their location), so that one mistake is not reported twice."""

    def valid(*loc) -> bool:
        return not any(f[: len(loc)] == loc or loc[: len(f)] == f for f in mistyped)

    problems = []
    if valid("model"):
        problem = _model_name_problem(cfg["model"])
        if problem:
            problems.append((("model",), problem))
        # every sequence length of the text experiments fits the model's position embeddings (LLaMA-1: 2048)
        longest = model_max_positions(cfg["model"])
        for loc in _seqlen_locations(cfg) if longest is not None else []:
            seqlen = _get(cfg, loc)
            if valid(*loc) and seqlen is not None and seqlen > longest:
                problems.append((loc, f"{seqlen} tokens is beyond the {longest} positions of {cfg['model']!r} (its "
                                      f"position embeddings end there); use at most {longest}"))
    # recovery entries name accuracy labels: compared only when every accuracy label is a string
    entries = _get(cfg, ("accuracy", "methods")) if "accuracy" in cfg else []
    labelled = isinstance(entries, list) and all(valid("accuracy", "methods", i, "label") for i in range(len(entries)))
    if "recovery" in cfg and valid("recovery", "methods") and labelled:
        known = sorted({e["label"] for e in entries})
        for i, item in enumerate(cfg["recovery"]["methods"]):
            label = item if isinstance(item, str) else item["label"]
            if label not in known:
                close = difflib.get_close_matches(label, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append((("recovery", "methods", i), f"{label!r} is not a label of accuracy.methods{hint}"))
    from minillm.models import DEFAULT_MODEL, SHAPES

    for exp in ("memory", "latency"):
        if exp in cfg and valid(exp, "models"):
            for i, m in enumerate(cfg[exp]["models"]):
                problem = None if m in SHAPES or m in (DEFAULT_MODEL, cfg.get("model")) else _model_name_problem(m)
                if problem:
                    problems.append(((exp, "models", i), problem))
    return problems


def _seqlen_locations(cfg: dict) -> list[tuple]:
    """Where the text experiments of `cfg` may set a sequence length (sections' and method entries' settings)."""
    found = []
    for exp in (*GRID_SECTIONS, "recovery", "fms_diagnostics"):
        sec = cfg.get(exp)
        if not isinstance(sec, dict):
            continue
        found += [(exp, key, "seqlen") for key in ("calibration", "perplexity", "train") if key in sec]
        methods = sec.get("methods")
        for i, entry in enumerate(methods if isinstance(methods, list) else []):
            if isinstance(entry, dict):
                found += [(exp, "methods", i, key, "seqlen") for key in ("calibration", "train") if key in entry]
    return found


def _get(cfg: dict, loc: tuple) -> Any:
    """The value at `loc` in `cfg`, None where the path does not lead to one."""
    for part in loc:
        try:
            cfg = cfg[part]
        except (KeyError, IndexError, TypeError):
            return None
    return cfg


def validate_profile(cfg: Any, name: str = "profile") -> dict:
    """Check a profile against the schema; raise one ProfileError listing every problem, one line each, starting
    with the dotted path of its key. Returns `cfg`, unchanged."""
    errors: list = []
    try:
        Profile.model_validate(cfg)
    except ValidationError as e:
        errors = e.errors()
    problems = [p for err in errors for p in _messages(err)]
    if isinstance(cfg, dict):
        # a value_error comes from a check across keys, which runs only on well-typed values: it does not stop others
        mistyped = [tuple(err["loc"]) for err in errors if err["type"] != "value_error"]
        problems += _across_sections(cfg, mistyped)
    if problems:
        raise ProfileError("\n".join(f"{_where(name, loc)}: {msg}" for loc, msg in problems))
    return cfg
