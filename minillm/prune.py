"""`minillm.prune`: score units with a method, allocate a parameter budget, remove units physically, return the plan."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .adapters import get_adapter
from .allocate import AllocationConfig, allocate
from .compensate import compensate_selections
from .offload import has_offloaded, materialize
from .plan import PruningPlan
from .results import provenance
from .scores import check_options, get_method
from .scores.common import ScoringContext
from .streaming import stream_layers
from .surgery import kept_units, prunable_params, prune_layer

log = logging.getLogger(__name__)


def check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (a fraction of prunable parameters), got {sparsity!r}")
    return s


def original_prunable_params(model: nn.Module) -> int:
    """Prunable parameters of the model before any pruning (remembered on the first call)."""
    if getattr(model, "minillm_original_params", None) is None:
        model.minillm_original_params = prunable_params(get_adapter(model))
    return model.minillm_original_params


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None for ALiBi models such as BLOOM)."""
    if getattr(config, "model_type", None) == "bloom":
        return None
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def check_calibration(
    calib: torch.Tensor | None, method: str, needed: bool, vocab_size: int, max_len: int | None = None
) -> None:
    if not needed:
        return
    if calib is None:
        raise ValueError(f"method {method!r} needs calibration data: a LongTensor of token ids [n_samples, seqlen]")
    if not isinstance(calib, torch.Tensor) or calib.dtype != torch.long or calib.dim() != 2 or calib.numel() == 0:
        raise ValueError(
            f"calibration data must be a non-empty LongTensor of shape [n_samples, seqlen], got "
            f"{getattr(calib, 'dtype', type(calib))} {tuple(getattr(calib, 'shape', ()))}"
        )
    if int(calib.max()) >= vocab_size or int(calib.min()) < 0:
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size})")
    seqlen = int(calib.shape[1])
    if seqlen < 2:
        raise ValueError(f"calibration windows need seqlen >= 2 (a next-token loss needs two tokens), got {seqlen}")
    if max_len is not None and seqlen > max_len:
        raise ValueError(f"calibration seqlen {seqlen} exceeds the model's {max_len} positions")


def apply_selections(model: nn.Module, selections) -> None:
    adapter = get_adapter(model)
    for i, sel in enumerate(selections):
        prune_layer(model, adapter, i, sel.kept_q, sel.kept_kv, sel.kept_channels)


def make_plan(
    model: nn.Module,
    method: str,
    sparsity: float,
    options: dict,
    seed: int | None,
    calibration: dict | None,
    history: list | None = None,
) -> PruningPlan:
    adapter = get_adapter(model)
    original = original_prunable_params(model)
    kept = prunable_params(adapter)
    return PruningPlan(
        base_model=getattr(model, "minillm_source", None) or getattr(model.config, "_name_or_path", "") or "unknown",
        base_revision=getattr(model, "minillm_revision", None),
        architecture=adapter.describe(),
        layers=copy.deepcopy(kept_units(model, adapter)),
        method=method,
        sparsity=sparsity,
        achieved_sparsity=1.0 - kept / original if original else 0.0,
        prunable_params_original=original,
        prunable_params_kept=kept,
        options=options,
        seed=seed,
        calibration=calibration,
        history=list(history or []),
        provenance=provenance(next(model.parameters()).device),
    )


def prune(
    model: nn.Module,
    method: str,
    sparsity: float,
    calib: torch.Tensor | None = None,
    *,
    allocation: str | None = None,
    attention_units: str = "auto",
    targets: str = "both",
    skip_layers: Sequence[int] = (),
    round_to: int = 1,
    seed: int = 0,
    calibration: dict | None = None,
    progress: bool = True,
    scores: list | None = None,
    stream_device: str | None = None,
    compensate_bias: bool | None = None,
    **method_options,
) -> PruningPlan:
    """Score the units of `model` with `method`, then physically remove them, in place, until the model keeps
    (1 - sparsity) of its original prunable parameters (decoder-layer linear weights and biases; embeddings, norms
    and the LM head excluded).

    calib: LongTensor [n_samples, seqlen] of token ids (None for methods that need no data).
    calibration: a description of `calib` recorded in the plan (source, windows, seed).
    compensate_bias: fold the removed units' mean output into the output projections' biases (FLAP's bias
    compensation; default: on for flap, off for other methods).
    stream_device: score with the decoder layers streamed one at a time to this device (weights stay where they
    are, normally CPU), for models larger than the accelerator; forward-only methods only.
    scores: unit scores from `minillm.score` on an identical unpruned model, to prune the same scores at several
    sparsities without scoring again (methods that score and remove in one go, Bonsai and FLAP, refuse this).
    Returns the PruningPlan (kept heads/channels per layer in original indices, options, seed, timing).
    """
    sparsity = check_sparsity(sparsity)
    adapter = get_adapter(model)
    mod = get_method(method)
    check_options(mod, method, method_options)
    check_calibration(calib, method, mod.NEEDS_CALIBRATION, int(model.config.vocab_size), max_positions(model.config))
    alloc = AllocationConfig(
        allocation or getattr(mod, "DEFAULT_ALLOCATION", "uniform"),
        attention_units,
        targets,
        tuple(skip_layers),
        round_to,
    )
    alloc.validate(len(adapter.layers()))
    original = original_prunable_params(model)
    kept_units(model, adapter)
    current = 1.0 - prunable_params(adapter) / original if original else 0.0
    if prunable_params(adapter) < (1.0 - sparsity) * original:  # every method, Bonsai's rounds included
        raise ValueError(f"the model already has sparsity {current:.4f} >= the requested {sparsity}")
    previous = getattr(model, "minillm_plan", None)
    if compensate_bias is None:
        compensate_bias = getattr(mod, "DEFAULT_COMPENSATE_BIAS", False)
    if compensate_bias and (hasattr(mod, "run") or not mod.NEEDS_CALIBRATION):
        raise ValueError(f"bias compensation needs calibration activations and one removal step; not with {method!r}")
    options = {
        "compensate_bias": bool(compensate_bias),
        "allocation": alloc.allocation,
        "attention_units": attention_units,
        "targets": targets,
        "skip_layers": list(skip_layers),
        "round_to": round_to,
        **method_options,
    }
    if stream_device is not None and method == "taylor":
        raise ValueError("layer streaming supports forward-only methods; 'taylor' needs a backward pass")
    if stream_device is not None:
        options["stream_device"] = str(stream_device)
    ctx = ScoringContext(model, adapter, calib, attention_units, seed, progress)
    t0 = time.perf_counter()
    if has_offloaded(model) and (
        hasattr(mod, "run")
        or method == "taylor"
        or method == "fms"
        and method_options.get("space") != "gates"
        and method_options.get("estimator", "spsa") == "spsa"
    ):
        # these read or perturb weights inside their forward passes or remove units between rounds
        log.info("loading accelerate-offloaded weights into CPU memory before %s", method)
        materialize(model)
    streaming = stream_layers(model, stream_device) if stream_device is not None else contextlib.nullcontext()
    with streaming:
        history = _score_and_remove(
            model, adapter, mod, method, ctx, sparsity, original, alloc, scores, method_options, t0, compensate_bias
        )
    history[-1]["total_time_s"] = time.perf_counter() - t0
    plan = make_plan(model, method, sparsity, options, seed, calibration, history)
    if isinstance(previous, PruningPlan):  # a model pruned before (in memory or by load_pruned): keep every step
        plan.previous_steps = [*previous.previous_steps, previous.step_summary()]
    model.minillm_plan = plan
    log.info("pruned with %s: achieved sparsity %.4f (requested %.4f)", method, plan.achieved_sparsity, sparsity)
    _warn_surprises(plan, sparsity, round_to)
    return plan


def _warn_surprises(plan: PruningPlan, sparsity: float, round_to: int) -> None:
    """Warn about results a user would not expect from the request: every unit gone, or (with rounding of kept
    widths) an achieved sparsity far from the requested one."""
    pattern = (plan.history[0] if plan.history else {}).get("pattern", "structured")
    if pattern != "structured":  # N:M patterns zero weights inside dense matrices; nothing is removed
        return
    if plan.prunable_params_original and plan.prunable_params_kept == 0:
        warnings.warn(
            f"sparsity {sparsity} removed every attention head and MLP channel of every layer: the model is "
            "reduced to embeddings, norms and the LM head",
            UserWarning,
            stacklevel=3,
        )
    elif round_to > 1 and abs(plan.achieved_sparsity - sparsity) > max(0.03, 0.15 * sparsity):
        warnings.warn(
            f"round_to={round_to}: achieved sparsity {plan.achieved_sparsity:.4f} is far from the requested "
            f"{sparsity} (kept widths rounded to multiples of {round_to})",
            UserWarning,
            stacklevel=3,
        )


def _score_and_remove(
    model, adapter, mod, method, ctx, sparsity, original, alloc, scores, method_options, t0, compensate_bias
) -> list[dict]:
    if hasattr(mod, "run"):  # methods that interleave scoring and removal (Bonsai's rounds)
        if scores is not None:
            raise ValueError(f"method {method!r} scores and removes in rounds; precomputed scores do not apply")
        history = mod.run(ctx, sparsity, original, alloc, **method_options)
    else:
        to_remove = prunable_params(adapter) - (1.0 - sparsity) * original
        was_training = model.training
        model.eval()
        if scores is None:
            scores = mod.score(ctx, **method_options)
        t_score = time.perf_counter() - t0
        selections = allocate(adapter, scores, to_remove, alloc)
        materialize(model)  # offloaded (meta) weights cannot be sliced: load them before removal
        if compensate_bias:
            compensate_selections(ctx, selections)
        apply_selections(model, selections)
        model.train(was_training)
        history = [{"scoring_time_s": t_score}]
    return history


def score(
    model: nn.Module,
    method: str,
    calib: torch.Tensor | None = None,
    *,
    attention_units: str = "auto",
    seed: int = 0,
    progress: bool = True,
    **method_options,
) -> list:
    """Unit scores of an (unpruned or pruned) model without removing anything: list of LayerScores per layer."""
    adapter = get_adapter(model)
    mod = get_method(method)
    if not hasattr(mod, "score"):
        raise ValueError(f"method {method!r} has no separate scoring step")
    check_options(mod, method, method_options)
    check_calibration(calib, method, mod.NEEDS_CALIBRATION, int(model.config.vocab_size), max_positions(model.config))
    was_training = model.training
    model.eval()
    try:
        return mod.score(ScoringContext(model, adapter, calib, attention_units, seed, progress), **method_options)
    finally:
        model.train(was_training)
