"""Pickle-free save and reload of pruned models: `pruning.json` + `model.safetensors` (+ config and tokenizer).

The config stays the *original* architecture's; `pruning.json` says which heads and channels every layer keeps.
`load_pruned` builds the stock transformers class from the config, removes the same units, and loads the weights,
so no modeling code is copied and nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from .adapters import get_adapter
from .files import atomic_directory
from .plan import PlanError, PruningPlan
from .state import pruning_state, restore_keep

PLAN_FILE = "pruning.json"
WEIGHTS_FILE = "model.safetensors"
#: licence and terms files of a source model, copied into every model pruned from it (Gemma's GEMMA_TERMS.html,
#: LICENSE, NOTICE, Llama's USE_POLICY.md, ...)
NOTICE_NAME = re.compile(r"(LICEN[CS]E|NOTICE|COPYING|GEMMA_TERMS|USE_POLICY)([._-][\w.-]*)?", re.IGNORECASE)


def save_pruned(
    model: nn.Module, plan: PruningPlan, directory: str | Path, tokenizer=None, overwrite: bool = False
) -> Path:
    """Write `directory` atomically (a crash leaves either the old directory or the complete new one), replacing only
    the files minillm wrote there before (see `minillm.files`). A non-empty directory that is not a previous minillm
    output is refused unless `overwrite`; so are the current directory and its parents, and the model cache."""
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "minillm": "pruned"})
        _sort_metadata(tmp / WEIGHTS_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for notice in notice_files(model, plan):
            shutil.copyfile(notice, tmp / notice.name)
        dataclasses.replace(plan, weights_sha256=weights_digest(tmp / WEIGHTS_FILE)).save(tmp / PLAN_FILE)
    return directory


def weights_digest(path: Path) -> str:
    """SHA-256 of a weights file, recorded in pruning.json (`weights_sha256`): widths alone cannot tell the weights
    of two models pruned to the same widths apart, and the bytes are deterministic (`_sort_metadata`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _source_directory(source: str | None, revision: str | None) -> Path | None:
    """Where the files of the model a pruned model came from are on this machine: the converted cache of a registry
    name (without converting), a local directory, or a Hub id's snapshot in the local Hugging Face cache."""
    from .files import cache_dir

    if not source:
        return None
    cached = cache_dir() / source  # a registry name's converted copy (models.py; not imported here: no cycle)
    if "/" not in source and cached.is_dir():
        return cached
    if Path(source).is_dir():
        return Path(source)
    if source.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, revision=revision, local_files_only=True))
        except Exception:  # not in the local cache (or no huggingface_hub): nothing to copy from
            return None
    return None


def _notices_in(directory: Path | None) -> list[Path]:
    if directory is None or not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and NOTICE_NAME.fullmatch(p.name))


def notice_files(model: nn.Module, plan: PruningPlan | None = None) -> list[Path]:
    """The licence and terms files that apply to `model`: those of the directory a pruned model was loaded from,
    then those of its source model (the plan's `base_model` where the model has no recorded source). The terms of
    the original weights (the Gemma Terms of Use) apply to every model pruned from them, so they travel with each
    output; one file per name."""
    state = pruning_state(model)
    base, revision = (plan.base_model, plan.base_revision) if plan is not None else (None, None)
    source = _source_directory(state.source or base, state.revision or revision)
    found: dict[str, Path] = {}
    for path in [*map(Path, state.notices), *_notices_in(source)]:
        if path.is_file():
            found.setdefault(path.name, path)
    return list(found.values())


def _sort_metadata(path: Path) -> None:
    """Rewrite the safetensors header with its metadata in sorted order, in place and at the same length:
    safetensors writes it in hash order, which changes from run to run, so identical models gave different bytes and
    a checksum could not show that a run was reproduced."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # same keys and values, so the same length: the tensor offsets stay valid
            f.seek(8)
            f.write(text.ljust(size))


def _add_compensation_biases(model: nn.Module, state: dict) -> None:
    """Create output-projection biases that pruning added (FLAP's bias compensation) but the config lacks."""
    modules = dict(model.named_modules())
    for key in state:
        if key.endswith(".bias") and key not in model.state_dict():
            lin = modules.get(key[: -len(".bias")])
            if isinstance(lin, nn.Linear) and lin.bias is None:
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                )


def _check_dtypes(state: dict, expected: dict, weights: Path) -> None:
    """Refuse a tensor that is not floating point where the model holds a floating-point one: loading would cast an
    integer (or boolean) tensor into the weight silently, and the model would compute garbage."""
    wrong = [
        f"{k} is {str(v.dtype).removeprefix('torch.')}, {str(expected[k].dtype).removeprefix('torch.')} expected"
        for k, v in state.items()
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    ]
    if wrong:
        raise PlanError(
            f"{weights}: {len(wrong)} tensor(s) hold integers where the model has floating-point weights "
            f"({'; '.join(wrong[:3])}); the file was not written by minillm.save_pruned"
        )


def _check_weights_digest(plan: PruningPlan, weights: Path, plan_file: Path) -> None:
    """Refuse weights that do not belong to the plan (`weights_sha256`, written by `save_pruned`): the weights of
    another model pruned to the same widths fit every shape and would load unnoticed. Plans written before the
    digest existed load without this check."""
    if plan.weights_sha256 is None:
        return
    found = weights_digest(weights)
    if found != plan.weights_sha256:
        raise PlanError(
            f"{weights} does not belong to {plan_file}: its SHA-256 is {found}, the plan records "
            f"{plan.weights_sha256} (weights copied from another pruned model, or changed after saving; save the "
            "model again with minillm.save_pruned)"
        )


def load_pruned(
    directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[nn.Module, object]:
    """Rebuild a model written by `save_pruned`: returns (stock HF model, tokenizer or None). The model is built
    directly on `device` (default cpu) in `dtype` without random initialisation (the saved weights replace it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (expected one written by minillm.save_pruned)")
    plan = PruningPlan.load(directory / PLAN_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"{config_file}: cannot read the model configuration ({e})") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise PlanError(f"{weights}: cannot read the weights, the file is truncated or corrupt ({e})") from None
    if not state:
        raise PlanError(f"{weights}: the file holds no tensors")
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device(device or "cpu"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_weights (skipped) ties them: a tied pair is one tensor before loading either name
    adapter = get_adapter(model)
    described = adapter.describe()
    differing = {
        k: (v, described[k]) for k, v in plan.architecture.items() if k in described and described[k] != v
    }
    if differing:
        detail = ", ".join(f"{k}: {a!r} in {PLAN_FILE} vs {b!r} in config.json" for k, (a, b) in differing.items())
        raise PlanError(f"{directory}: {PLAN_FILE} and {config_file.name} describe different models ({detail})")
    try:
        pruning = restore_keep(model, adapter, plan.layers)
    except PlanError as e:
        raise PlanError(f"{directory / PLAN_FILE} does not fit {config_file}: {e}") from None
    _add_compensation_biases(model, state)
    expected = model.state_dict()
    _check_dtypes(state, expected, weights)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    wrong = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} expected"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise PlanError(
            f"{weights}: tensor shapes do not match the pruned architecture of {directory / PLAN_FILE} "
            f"({len(wrong)} tensors, e.g. {'; '.join(wrong[:3])}); were the weights copied from another model?"
        )
    _check_weights_digest(plan, weights, directory / PLAN_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_spec = getattr(model, "_tied_weights_keys", None) or {}
    # safetensors keeps one name of a tied pair; either side may be the missing one
    tied = set(tied_spec) | (set(tied_spec.values()) if isinstance(tied_spec, dict) else set())
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise PlanError(
            f"{weights}: weights do not match the pruned architecture (missing {real_missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    pruning.source, pruning.revision = plan.base_model, plan.base_revision
    pruning.original_params = plan.prunable_params_original or pruning.original_params
    pruning.plan = plan
    pruning.notices = [str(p) for p in _notices_in(directory)]
    if device is not None:
        model.to(device)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError):
        tok = None
    return model, tok
