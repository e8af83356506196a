"""The schema of a profile (configs/*.yaml): every section and key is checked before any computation.

Unknown keys are named with the closest valid key (a misspelt `limt` would otherwise silently run every zero-shot
example), values are type- and range-checked, method options are checked against the method's signature, and
`model:` must be something `load_model` can load and that has a tokenizer.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any


class ProfileError(ValueError):
    """A profile that does not follow the schema."""


# --- leaf checks: each returns an error message or None --------------------------------------------------------------


def _int(lo: int | None = None, hi: int | None = None, none_ok: bool = False):
    def check(v):
        if v is None and none_ok:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer{' or null' if none_ok else ''}, got {v!r}"
        if lo is not None and v < lo:
            return f"must be >= {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None

    return check


def _float(lo: float | None = None, hi: float | None = None, hi_open: bool = False, lo_open: bool = False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
        return None

    return check


def _str(choices: tuple[str, ...] | None = None):
    def check(v):
        if not isinstance(v, str):
            return f"must be a string, got {v!r}"
        if choices is not None and v not in choices:
            close = difflib.get_close_matches(v, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"must be one of {', '.join(choices)}, got {v!r}{hint}"
        return None

    return check


def _bool(v):
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _list(item, min_len: int = 0):
    def check(v, where):
        if not isinstance(v, list):
            raise ProfileError(f"{where}: must be a list, got {v!r}")
        if len(v) < min_len:
            raise ProfileError(f"{where}: must have at least {min_len} item(s)")
        for i, x in enumerate(v):
            _apply(item, x, f"{where}[{i}]")

    return check


def _pair(v, where):
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise ProfileError(f"{where}: must be a pair [batch, seqlen] of integers, got {v!r}")
    if min(v) < 1:
        raise ProfileError(f"{where}: batch and seqlen must be >= 1, got {v!r}")


def _apply(check, value, where: str) -> None:
    if isinstance(check, dict):
        _section(check, value, where)
    elif getattr(check, "__code__", None) is not None and check.__code__.co_argcount == 2:
        check(value, where)
    else:
        msg = check(value)
        if msg:
            raise ProfileError(f"{where}: {msg}")


REQUIRED = object()


def _section(schema: dict, value: Any, where: str) -> None:
    """schema: {key: check or (check, REQUIRED)}; '*' in schema: a check for any key."""
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: must be a mapping, got {value!r}")
    keys = [k for k in schema if k != "*"]
    for k, v in value.items():
        if k not in schema and "*" not in schema:
            close = difflib.get_close_matches(str(k), keys, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ProfileError(f"{where}: unknown key {k!r}{hint} (valid keys: {', '.join(keys)})")
        spec = schema.get(k, schema.get("*"))
        check = spec[0] if isinstance(spec, tuple) else spec
        _apply(check, v, f"{where}.{k}")
    for k, spec in schema.items():
        if isinstance(spec, tuple) and spec[1] is REQUIRED and k not in value:
            raise ProfileError(f"{where}: missing required key {k!r}")


# --- the schema -------------------------------------------------------------------------------------------------------

SPARSITY = _float(0.0, 1.0, hi_open=True)
CALIBRATION = {"n_samples": (_int(1), REQUIRED), "seqlen": (_int(2), REQUIRED), "seed": _int()}
PERPLEXITY = {"seqlen": (_int(2), REQUIRED), "windows": (_int(1), REQUIRED), "batch_size": _int(1)}
# issue 18: a percentile bootstrap 95% interval over windows beside `ppl` (no extra forward passes); absent: none
EVAL_PERPLEXITY = {**PERPLEXITY, "bootstrap_iters": _int(1), "bootstrap_seed": _int(0)}
ZEROSHOT = {
    "stderr": _bool,  # issue 18: lm-eval's standard errors (closed form for acc / acc_norm); absent: none
    "limit": _int(1, none_ok=True),
    "batch_size": _int(1),
    "tasks": _list(_str(), min_len=1),
    "sparsities": _list(_float(0.0, 1.0, hi_open=True)),
}
PRUNE_OPTIONS = {
    "allocation": _str(("uniform", "global")),
    "attention_units": _str(("auto", "kv_group", "query_head")),
    "targets": _str(("both", "attention", "mlp")),
    "skip_layers": _list(_int(0)),
    "round_to": _int(1),
    "compensate_bias": _bool,
}


def _method_entry(extra: dict):
    def check(v, where):
        schema = {
            "label": (_str(), REQUIRED),
            "method": (_str(), REQUIRED),
            "options": lambda o, w: None if isinstance(o, dict) else _raise(f"{w}: must be a mapping, got {o!r}"),
            **extra,
        }
        _section(schema, v, where)
        _check_method(v, where)

    return check


def _raise(msg: str):
    raise ProfileError(msg)


def _check_method(entry: dict, where: str) -> None:
    from minillm.scores import check_options, get_method

    try:
        mod = get_method(entry["method"])
        check_options(mod, entry["method"], entry.get("options", {}))
    except ValueError as e:
        raise ProfileError(f"{where}: {e}") from None


ACCURACY_ENTRY = _method_entry(
    {
        "prune_options": PRUNE_OPTIONS,
        "sparsities": _list(SPARSITY, min_len=1),
        "calibration": {"n_samples": _int(1), "seqlen": _int(2), "seed": _int()},
        "seed": _int(),
        "seeds": _list(_int(0), min_len=1),
        "seed_sparsities": _list(SPARSITY, min_len=1),
        "zeroshot": _bool,  # false: perplexity only for this entry (the section's zero-shot covers the others)
        "seed_zeroshot": _bool,  # false: its seed replicates (k > 0) get perplexity only
    }
)
ACCURACY = {
    "calibration": (CALIBRATION, REQUIRED),
    "perplexity": (EVAL_PERPLEXITY, REQUIRED),
    "zeroshot": ZEROSHOT,
    "sparsities": (_list(SPARSITY, min_len=1), REQUIRED),
    # issue 18: replicate k of a (method, sparsity) adds k to the calibration seed and to the method seed; 0 is the
    # record without replicates; an entry's own `seeds` / `seed_sparsities` override these
    "seeds": _list(_int(0), min_len=1),
    "seed_sparsities": _list(SPARSITY, min_len=1),
    "seed_zeroshot": _bool,  # false: seed replicates get perplexity only (an entry's own `seed_zeroshot` wins)
    "prune_options": PRUNE_OPTIONS,
    "methods": (_list(ACCURACY_ENTRY, min_len=1), REQUIRED),
}
TRAIN = {
    "windows": _int(1),
    "seqlen": _int(2),
    "steps": _int(1),
    "batch_size": _int(1),
    "rank": _int(1),
    "alpha": _float(0.0, lo_open=True),
    "lr": _float(0.0, lo_open=True),
    "seed": _int(),
}


def _recovery_item(v, where):
    if isinstance(v, str):
        return
    _section(
        {
            "label": (_str(), REQUIRED),
            "sparsities": _list(SPARSITY, min_len=1),
            "kl_weights": _list(_float(0.0), min_len=1),
            "train": TRAIN,
            "tag": _str(),
        },
        v,
        where,
    )


RECOVERY = {
    "methods": (_list(_recovery_item, min_len=1), REQUIRED),
    "sparsities": (_list(SPARSITY, min_len=1), REQUIRED),
    "kl_weights": (_list(_float(0.0), min_len=1), REQUIRED),
    "train": ({**{k: (c, REQUIRED) for k, c in TRAIN.items() if k != "seed"}, "seed": _int()}, REQUIRED),
    "perplexity": (EVAL_PERPLEXITY, REQUIRED),
    "zeroshot": ZEROSHOT,
}
DTYPE = _str(("float32", "float16", "bfloat16"))
MEMORY = {
    "models": (_list(_str(), min_len=1), REQUIRED),
    "dtype": (DTYPE, REQUIRED),
    "shapes": (_list(_pair, min_len=1), REQUIRED),
    "methods": (_list(_method_entry({"sparsity": SPARSITY}), min_len=1), REQUIRED),
}
LATENCY = {
    "include_24": _bool,
    "round_to": _list(_int(1), min_len=1),
    "models": (_list(_str(), min_len=1), REQUIRED),
    "dtype": (DTYPE, REQUIRED),
    "sparsities": (_list(SPARSITY, min_len=1), REQUIRED),
    "prefill": (_list(_pair, min_len=1), REQUIRED),
    "decode": (
        {
            "batch": (_list(_int(1), min_len=1), REQUIRED),
            "prompt": (_int(1), REQUIRED),
            "new_tokens": (_int(1), REQUIRED),
        },
        REQUIRED,
    ),
    "repeats": _int(1),  # interleaved rounds per shape (decode: max(3, repeats // 4))
    "bench_repeats": _int(1),  # whole-bench repeats (default measure.BENCH_REPEATS)
    "compile": _str(("none", "all")),
}
FMS_DIAGNOSTICS = {  # issue 17, minillm/artifact/diagnostics.py
    "calibration": (CALIBRATION, REQUIRED),
    "perplexity": (PERPLEXITY, REQUIRED),
    "sparsities": (_list(SPARSITY, min_len=1), REQUIRED),
    "allocations": _list(_str(("uniform", "global")), min_len=1),
    "compensate_bias": _list(_bool, min_len=1),
    "prune_options": {"attention_units": _str(("auto", "kv_group", "query_head"))},
    "eps": _float(0.0, lo_open=True),
    "overlap_p": _float(0.0, 1.0, lo_open=True),
    "seeds": _list(_int(0), min_len=1),
    "queries": (_list(_int(1), min_len=1), REQUIRED),
    "criteria_queries": _list(_int(1)),
    "full_n_seeds": _int(1),
    "weight_queries": _list(_int(1)),
    "estimators": lambda v, w: None if isinstance(v, dict) else _raise(f"{w}: must be a mapping, got {v!r}"),
    "oracle": {"channels": _int(0), "seed": _int()},
    "bonsai": {"masks": _int(2), "prune_frac": _float(0.0, 0.5, lo_open=True, hi_open=True), "prior": _str()},
    "batch_tokens": _int(1),
}
PROFILE = {
    "description": _str(),
    "model": (_str(), REQUIRED),
    "device": _str(),
    "requires_hub": _bool,
    "dtype": DTYPE,
    "profile": _str(),  # set by load_profile: the file's name
    "accuracy": ACCURACY,
    "ablations": ACCURACY,
    "recovery": RECOVERY,
    "memory": MEMORY,
    "latency": LATENCY,
    "fms_diagnostics": FMS_DIAGNOSTICS,
}


def check_model_name(name: str, where: str = "model") -> None:
    """`model:` must be an installed pretrained model (SmolLM2, Gemma 3), an existing local model directory, or a Hub id 'org/name'; the shape and
    tiny registry names have no tokenizer, so they cannot drive the text experiments."""
    from minillm.models import DEFAULT_MODEL, PRETRAINED, SHAPES, registry_names

    if name in SHAPES:
        raise ProfileError(
            f"{where}: {name!r} is a random-weight registry model without a tokenizer; the accuracy, ablation and "
            f"recovery experiments need text (use {DEFAULT_MODEL!r}, a local model directory or a Hub id; shape "
            "models belong under memory.models / latency.models)"
        )
    if name in PRETRAINED:  # the pretrained models installed by the set-up
        return
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ProfileError(f"{where}: directory {name!r} holds no config.json (not a model directory)")
        return
    if name.count("/") == 1 and not name.startswith((".", "/")) and all(name.split("/")):
        return  # a Hub id
    close = difflib.get_close_matches(name, registry_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ProfileError(
        f"{where}: unknown model {name!r}{hint}: not the embedded {DEFAULT_MODEL!r}, not an existing directory, not a "
        "Hub id of the form 'org/name'"
    )


def _check_memory_models(models: list[str], where: str, main_model: str) -> None:
    from minillm.models import DEFAULT_MODEL, SHAPES

    for i, m in enumerate(models):
        if m not in SHAPES and m not in (DEFAULT_MODEL, main_model):
            check_model_name(m, f"{where}[{i}]")


def _check_seeds(exp: dict, where: str) -> None:
    """Seeds are distinct, and the sparsities they are restricted to are sparsities that run (an entry's own list
    within its sparsities; the section's list within the union of its entries' sparsities)."""
    runs_all = set()
    for i, entry in enumerate(exp["methods"]):
        runs = entry.get("sparsities", exp["sparsities"])
        runs_all.update(runs)
        seeds = entry.get("seeds", exp.get("seeds"))
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ProfileError(f"{where}.methods[{i}]: seeds of {entry['label']!r} repeat a value: {seeds}")
        if seeds is not None and 0 not in seeds:
            raise ProfileError(
                f"{where}.methods[{i}]: seeds of {entry['label']!r} must include 0 (the record at every sparsity; "
                f"the others are replicates), got {seeds}"
            )
        missing = [s for s in entry.get("seed_sparsities", []) if not any(abs(s - r) < 1e-9 for r in runs)]
        if missing:
            raise ProfileError(f"{where}.methods[{i}].seed_sparsities: {missing} not among its sparsities {runs}")
    missing = [s for s in exp.get("seed_sparsities", []) if not any(abs(s - r) < 1e-9 for r in runs_all)]
    if missing:
        raise ProfileError(f"{where}.seed_sparsities: {missing} not among the methods' sparsities {sorted(runs_all)}")


def model_max_positions(name: str) -> int | None:
    """The longest sequence `name`'s position embeddings cover, when it can be known without loading weights or
    the network: registry shapes, models a registry shape reproduces (models.SHAPE_OF), local directories (their
    config.json). None otherwise, and for ALiBi models (BLOOM), which have no limit."""
    import json

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


def _check_seqlens(cfg: dict, name: str) -> None:
    """Every sequence length of the text experiments fits the model's position embeddings (LLaMA-1: 2048)."""
    longest = model_max_positions(cfg["model"])
    if longest is None:
        return
    found = []
    for exp in ("accuracy", "ablations", "recovery", "fms_diagnostics"):
        sec = cfg.get(exp)
        if not sec:
            continue
        for key in ("calibration", "perplexity", "train"):
            if isinstance(sec.get(key), dict) and "seqlen" in sec[key]:
                found.append((f"{name}.{exp}.{key}.seqlen", sec[key]["seqlen"]))
        for i, entry in enumerate(sec.get("methods", [])):
            if not isinstance(entry, dict):
                continue
            for key in ("calibration", "train"):
                if isinstance(entry.get(key), dict) and "seqlen" in entry[key]:
                    found.append((f"{name}.{exp}.methods[{i}].{key}.seqlen", entry[key]["seqlen"]))
    for where, seqlen in found:
        if seqlen > longest:
            raise ProfileError(
                f"{where}: {seqlen} tokens is beyond the {longest} positions of {cfg['model']!r} (its position "
                f"embeddings end there); use at most {longest}"
            )


def validate_profile(cfg: Any, name: str = "profile") -> dict:
    """Check a profile against the schema; raise ProfileError naming the key and the problem. Returns `cfg`."""
    _section(PROFILE, cfg, name)
    check_model_name(cfg["model"], f"{name}.model")
    _check_seqlens(cfg, name)
    for exp in ("accuracy", "ablations"):
        if exp in cfg:
            labels = [e["label"] for e in cfg[exp]["methods"]]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ProfileError(f"{name}.{exp}.methods: duplicate labels {dup}")
            _check_seeds(cfg[exp], f"{name}.{exp}")
    if "recovery" in cfg:
        known = {e["label"] for e in cfg.get("accuracy", {}).get("methods", [])}
        for i, item in enumerate(cfg["recovery"]["methods"]):
            label = item if isinstance(item, str) else item["label"]
            if label not in known:
                close = difflib.get_close_matches(label, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ProfileError(
                    f"{name}.recovery.methods[{i}]: {label!r} is not a label of accuracy.methods{hint}"
                )
            if isinstance(item, dict) and "train" in item and not item.get("tag"):
                raise ProfileError(
                    f"{name}.recovery.methods[{i}]: entry {label!r} overrides train settings and needs a 'tag'"
                )
    for exp in ("memory", "latency"):
        if exp in cfg:
            _check_memory_models(cfg[exp]["models"], f"{name}.{exp}.models", cfg["model"])
    return cfg
