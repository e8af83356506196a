"""`minillm.prune`: score units with a method, allocate a parameter budget, remove units physically, return the plan.

`prune` is one call for three public steps that can also be taken one at a time (to prune the same scores at
several sparsities, or to inspect or edit the keep sets in between):

    scores = score(model, method, calib)              # unit scores per layer; nothing is removed
    keeps = allocate_units(model, scores, sparsity)   # current indices to keep per layer, within the budget
    remove_units(model, keeps)                        # physical removal; then make_plan(model, ...) records it

Before removal, the output projections can be refit to the kept units by least squares on the calibration tokens
(`reconstruct='dense' | 'sequential'`, see minillm.reconstruct) or, the special case, receive FLAP's bias
compensation (`compensate_bias`). The refit contains the compensation, so the two are not combined: with
`reconstruct`, a method's default compensation (FLAP's) is dropped and an explicit `compensate_bias=True` is refused.

The model's adapter is built once per call and its pruning state (original units, original size, last plan) is
`minillm.state.pruning_state(model)`. What a method needs (calibration, a backward pass, resident weights, its own
removal rounds) comes from its declared `MethodSpec`, never from its name.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .allocate import AllocationConfig, LayerScores, allocate
from .compensate import compensate_selections
from .offload import execution_device, has_offloaded, materialize
from .plan import OriginalKeep, PruningPlan
from .provenance import provenance
from .reconstruct import ReconstructConfig, reconstruct
from .scores import Method, MethodSpec, check_options, get_method
from .scores.common import ScoringContext
from .state import PruningState, pruning_state
from .streaming import stream_layers
from .surgery import CurrentKeep, prunable_params

log = logging.getLogger(__name__)


def check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (a fraction of prunable parameters), got {sparsity!r}")
    return s


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


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with NaN or Inf parameters (a corrupt checkpoint, an fp16 overflow): every method would score
    and save it without a word. One pass over the parameters; offloaded (meta) tensors and the fake tensors of the
    memory simulator (minillm.bench.simulate) hold no values to check.

    A parameter's sum is finite when every value is (a NaN or an infinity anywhere makes it NaN or infinite), so the
    sum, a reduction without a temporary, clears almost every parameter (SmolLM2-135M: 0.05 s instead of 0.8 s for
    an element-wise isfinite on one thread); only a non-finite sum, which finite values can also give by overflow,
    is checked element by element."""
    from torch._subclasses.fake_tensor import is_fake

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta" or is_fake(p) or not p.numel():
                continue
            if not bool(torch.isfinite(p.sum())) and not bool(torch.isfinite(p).all()):
                raise ValueError(
                    f"parameter {name} has non-finite values (NaN or Inf): the model's weights are corrupt or "
                    f"overflowed in {p.dtype}; prune a model whose weights are finite"
                )


def _check_calibration_for(model: nn.Module, calib: torch.Tensor | None, what: str, needed: bool) -> None:
    check_calibration(calib, what, needed, int(model.config.vocab_size), max_positions(model.config))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Scoring runs in eval mode (no dropout); the model's own mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _params_to_remove(state: PruningState, adapter: Adapter, sparsity: float) -> float:
    """Parameters still to remove for the model to keep (1 - sparsity) of its original prunable parameters; refuses
    a target the model has already passed (every method, Bonsai's rounds included)."""
    state.track(adapter)
    kept = prunable_params(adapter)
    if kept < (1.0 - sparsity) * state.original_params:
        raise ValueError(
            f"the model already has sparsity {state.sparsity(adapter):.4f} >= the requested {sparsity}"
        )
    return kept - (1.0 - sparsity) * state.original_params


# --- the three steps ----------------------------------------------------------------------------------------------


def score(
    model: nn.Module,
    method: str,
    calib: torch.Tensor | None = None,
    *,
    attention_units: str = "auto",
    seed: int = 0,
    progress: bool = True,
    resume=None,
    **method_options,
) -> list[LayerScores]:
    """Step 1: unit scores of an (unpruned or pruned) model without removing anything, one LayerScores per layer
    (higher = more important). `resume` (ScoringContext.resume) keeps the progress of long scoring steps."""
    m = get_method(method)
    if m.spec.scores_and_removes:
        raise ValueError(f"method {method!r} has no separate scoring step")
    check_options(m, method, method_options)
    _check_calibration_for(model, calib, method, m.spec.needs_calibration)
    ctx = ScoringContext(model, get_adapter(model), calib, attention_units, seed, progress, resume=resume)
    ctx.keep_moments = m.spec.default_reconstruct == "dense"  # for the refit of a later prune(scores=...)
    with _eval_mode(model):
        scores = Scores(m.score(ctx, **method_options))
    scores.input_stats, scores.moments, scores.calib = dict(ctx._stats), dict(ctx._moments), calib
    return scores


class Scores(list):
    """What `score` returns: the LayerScores of every layer (a list), plus the calibration statistics that the
    scoring collected on the way (`input_stats`, by member set; `moments`, the output projections' input moments
    that `obs` keeps for its dense refit; and the `calib` they came from). `prune(..., scores=...)` on the same
    calibration tokens reuses them for FLAP's bias compensation and for the dense refit instead of running the
    calibration forward again (the model is the same unpruned one, as `scores` requires)."""

    input_stats: dict = {}  # noqa: RUF012 (read-only defaults; `score` sets the instance's own)
    moments: dict = {}  # noqa: RUF012
    calib: torch.Tensor | None = None


def allocate_units(
    model: nn.Module,
    scores: Sequence[LayerScores],
    sparsity: float,
    *,
    allocation: str = "uniform",
    attention_units: str = "auto",
    targets: str = "both",
    skip_layers: Sequence[int] = (),
    round_to: int = 1,
) -> list[CurrentKeep]:
    """Step 2: the units to keep per layer (current indices) so that the model keeps (1 - sparsity) of its
    original prunable parameters. Nothing is removed."""
    sparsity = check_sparsity(sparsity)
    adapter = get_adapter(model)
    alloc = AllocationConfig(allocation, attention_units, targets, tuple(skip_layers), round_to)
    alloc.validate(len(adapter.layers()))
    return allocate(adapter, scores, _params_to_remove(pruning_state(model), adapter, sparsity), alloc)


def remove_units(
    model: nn.Module,
    keeps: Sequence[CurrentKeep],
    calib: torch.Tensor | None = None,
    *,
    compensate_bias: bool = False,
    reconstruct: str | None = None,
    reconstruct_ridge: float | None = None,
    reconstruct_form: str | None = None,
    progress: bool = True,
) -> None:
    """Step 3: physically remove every unit `keeps` (one CurrentKeep per layer) does not list, in place, and record
    the surviving original units in the model's pruning state. `compensate_bias` first folds the removed units'
    mean output on `calib` into the output projections' biases (FLAP's bias compensation); `reconstruct` ('dense' |
    'sequential', with `reconstruct_ridge` and `reconstruct_form`, see `prune`) first refits the output projections
    on `calib` instead."""
    rebuild = ReconstructConfig.for_method(None, reconstruct, reconstruct_ridge, reconstruct_form)
    if rebuild is not None and compensate_bias:
        raise ValueError(_SUPERSEDES)
    adapter = get_adapter(model)
    if len(keeps) != len(adapter.layers()):
        raise ValueError(f"got keep sets for {len(keeps)} layers, the model has {len(adapter.layers())}")
    ctx = None
    if compensate_bias or rebuild is not None:
        _check_calibration_for(model, calib, "reconstruct" if rebuild else "bias compensation", True)
        ctx = ScoringContext(model, adapter, calib, progress=progress)
    with _eval_mode(model):
        _remove(model, adapter, pruning_state(model), keeps, ctx, compensate_bias, rebuild)


def _remove(
    model: nn.Module,
    adapter: Adapter,
    state: PruningState,
    keeps: Sequence[CurrentKeep],
    ctx: ScoringContext | None,
    compensate_bias: bool,
    rebuild: ReconstructConfig | None,
) -> dict:
    """Refit (or compensate) with `ctx`'s calibration data, then remove; returns the timing of the refit."""
    materialize(model)  # offloaded (meta) weights cannot be sliced: load them before removal
    timing = {}
    if rebuild is not None:
        t0 = time.perf_counter()
        reconstruct(ctx, keeps, rebuild)
        timing["reconstruct_time_s"] = time.perf_counter() - t0
    elif compensate_bias:
        compensate_selections(ctx, keeps)
    state.remove_all(adapter, keeps)
    return timing


def make_plan(
    model: nn.Module,
    method: str,
    sparsity: float,
    options: dict,
    seed: int | None,
    calibration: dict | None,
    history: list | None = None,
    adapter: Adapter | None = None,
) -> PruningPlan:
    """The plan of the model as it is now: kept original units, sizes, and the given description of the step."""
    adapter = adapter or get_adapter(model)
    state = pruning_state(model).track(adapter)
    kept = prunable_params(adapter)
    return PruningPlan(
        base_model=state.source or getattr(model.config, "_name_or_path", "") or "unknown",
        base_revision=state.revision,
        architecture=adapter.describe(),
        layers=copy.deepcopy(state.kept),
        method=method,
        sparsity=sparsity,
        achieved_sparsity=1.0 - kept / state.original_params if state.original_params else 0.0,
        prunable_params_original=state.original_params,
        prunable_params_kept=kept,
        options=options,
        seed=seed,
        calibration=calibration,
        history=list(history or []),
        provenance=provenance(execution_device(model)),
    )


# --- the one call ---------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    """One validated `prune` call: the method, the model's adapter (built once) and pruning state, the scoring
    context (shared by scoring and bias compensation, so input statistics are collected once), the budget."""

    method: Method
    method_options: dict
    sparsity: float
    adapter: Adapter
    state: PruningState
    ctx: ScoringContext
    alloc: AllocationConfig
    compensate_bias: bool
    reconstruct: ReconstructConfig | None
    recorded_options: dict


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
    reconstruct: str | None = None,
    reconstruct_ridge: float | None = None,
    reconstruct_form: str | None = None,
    **method_options,
) -> PruningPlan:
    """Score the units of `model` with `method`, then physically remove them, in place, until the model keeps
    (1 - sparsity) of its original prunable parameters (decoder-layer linear weights and biases; embeddings, norms
    and the LM head excluded).

    calib: LongTensor [n_samples, seqlen] of token ids (None for methods that need no data).
    calibration: a description of `calib` recorded in the plan (source, windows, seed).
    allocation: 'uniform' or 'global' (default: the method's declared default).
    compensate_bias: fold the removed units' mean output into the output projections' biases (FLAP's bias
    compensation; default: the method's declared default, on for flap only; off with `reconstruct`).
    reconstruct: refit the output projections to the kept units by least squares on `calib` before removal
    (minillm.reconstruct): 'dense' (statistics of the unpruned model) or 'sequential' (layer by layer, from the
    model already pruned and refit up to that layer); None (default): the method's declared default (a refit for
    obs, none for the others); 'none' or False: no refit. It supersedes
    `compensate_bias` (the centred refit contains it; an explicit compensate_bias=True is refused) and applies to
    methods that score and remove and, after their last round, to Bonsai (which then prunes a copy of the model
    and refits the original to the copy's final units: a second copy of the weights during the rounds); not to the
    N:M baselines, which remove no input columns.
    reconstruct_ridge: relative ridge of the refit (default minillm.reconstruct.DEFAULT_RIDGE).
    reconstruct_form: 'centered' (default; fits a bias, created where the model has none) or 'uncentered' (no
    bias: the pruned model keeps the stock shape).
    stream_device: score with the decoder layers streamed one at a time to this device (weights stay where they
    are, normally CPU), for models larger than the accelerator; forward-only methods only.
    scores: unit scores from `minillm.score` on an identical unpruned model, to prune the same scores at several
    sparsities without scoring again (methods that score and remove in one go, Bonsai and the N:M baselines, refuse
    this).
    Returns the PruningPlan (kept heads/channels per layer in original indices, options, seed, timing).
    """
    alloc = AllocationConfig(allocation, attention_units, targets, tuple(skip_layers), round_to)
    req = _request(
        model,
        method,
        sparsity,
        calib,
        method_options,
        alloc,
        seed=seed,
        progress=progress,
        precomputed=scores is not None,
        stream_device=stream_device,
        compensate_bias=compensate_bias,
        rebuild=ReconstructConfig.for_method(
            get_method(method).spec.default_reconstruct, reconstruct, reconstruct_ridge, reconstruct_form
        ),
    )
    if isinstance(scores, Scores) and _same_tokens(scores.calib, calib):
        req.ctx._stats.update(scores.input_stats)  # the statistics of the scoring pass, not computed again
        req.ctx._moments.update(scores.moments)
    previous = req.state.plan
    t0 = time.perf_counter()
    if has_offloaded(model) and req.method.needs_resident_weights(method_options):
        log.info("loading accelerate-offloaded weights into CPU memory before %s", method)
        materialize(model)
    streaming = (
        stream_layers(model, stream_device, req.adapter) if stream_device is not None else contextlib.nullcontext()
    )
    with streaming, _eval_mode(model):
        if req.method.spec.scores_and_removes and req.reconstruct is not None:
            history = _rounds_then_refit(req)
        elif req.method.spec.scores_and_removes:
            history = req.method.run(
                req.ctx, req.sparsity, req.state.original_params, req.alloc, **req.method_options
            )
        else:
            history = _score_allocate_remove(req, scores, t0)
    history[-1]["total_time_s"] = time.perf_counter() - t0
    plan = make_plan(model, method, req.sparsity, req.recorded_options, seed, calibration, history, req.adapter)
    if isinstance(previous, PruningPlan):  # a model pruned before (in memory or by load_pruned): keep every step
        plan.previous_steps = [*previous.previous_steps, previous.step_summary()]
    req.state.plan = plan
    log.info("pruned with %s: achieved sparsity %.4f (requested %.4f)", method, plan.achieved_sparsity, req.sparsity)
    _warn_surprises(plan, req.sparsity, round_to)
    return plan


def _same_tokens(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and (a is b or (a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))))


def _request(
    model: nn.Module,
    method: str,
    sparsity: float,
    calib: torch.Tensor | None,
    method_options: dict,
    alloc: AllocationConfig,
    *,
    seed: int,
    progress: bool,
    precomputed: bool,
    stream_device: str | None,
    compensate_bias: bool | None,
    rebuild: ReconstructConfig | None,
) -> _Request:
    """Validate a `prune` call before anything is computed; every refusal names what to change. `alloc` comes with
    allocation None for the method's declared default."""
    sparsity = check_sparsity(sparsity)
    adapter = get_adapter(model)
    m = get_method(method)
    check_options(m, method, method_options)
    what = method if m.spec.needs_calibration or rebuild is None else "reconstruct"
    _check_calibration_for(model, calib, what, m.spec.needs_calibration or rebuild is not None)
    check_finite_weights(model)
    alloc.allocation = alloc.allocation or m.spec.default_allocation
    alloc.validate(len(adapter.layers()))
    state = pruning_state(model).track(adapter)
    _params_to_remove(state, adapter, sparsity)
    compensate_bias = resolve_compensation(method, m.spec, compensate_bias, rebuild)
    if compensate_bias and (m.spec.scores_and_removes or not m.spec.needs_calibration):
        raise ValueError(f"bias compensation needs calibration activations and one removal step; not with {method!r}")
    if stream_device is not None and m.spec.scores_and_removes and rebuild is not None:
        raise ValueError(
            f"{method!r} with reconstruct prunes a copy of the model in its rounds and refits the original; layer "
            "streaming does not apply to it: drop stream_device or reconstruct"
        )
    if precomputed and m.spec.scores_and_removes:
        raise ValueError(f"method {method!r} scores and removes in rounds; precomputed scores do not apply")
    if stream_device is not None and m.spec.needs_backward:
        raise ValueError(f"layer streaming supports forward-only methods; {method!r} needs a backward pass")
    recorded = {
        "compensate_bias": bool(compensate_bias),
        "reconstruct": rebuild.to_json() if rebuild is not None else None,
        "allocation": alloc.allocation,
        "attention_units": alloc.attention_units,
        "targets": alloc.targets,
        "skip_layers": list(alloc.skip_layers),
        "round_to": alloc.round_to,
        **method_options,
    }
    if stream_device is not None:
        recorded["stream_device"] = str(stream_device)
    ctx = ScoringContext(model, adapter, calib, alloc.attention_units, seed, progress, pruning=state)
    ctx.keep_moments = rebuild is not None and rebuild.mode == "dense"
    return _Request(m, method_options, sparsity, adapter, state, ctx, alloc, bool(compensate_bias), rebuild, recorded)


_SUPERSEDES = (
    "reconstruct supersedes compensate_bias: the centred refit already contains FLAP's bias compensation (its "
    "special case for uncorrelated inputs) and the uncentred one fits without a bias; leave compensate_bias unset "
    "or False"
)


def resolve_compensation(
    method: str, spec: MethodSpec, compensate_bias: bool | None, rebuild: ReconstructConfig | None
) -> bool:
    """Whether to apply bias compensation: the method's default unless given, never with `reconstruct` (the
    method's default is dropped, an explicit True refused). Also refuses `reconstruct` for methods that remove
    units themselves."""
    if rebuild is not None and spec.zeroes_in_place:
        raise ValueError(
            f"reconstruct refits the output projections to the input columns that remain; method {method!r} zeroes "
            "weights in place (an N:M pattern) and removes no column, so there is nothing to refit: drop reconstruct"
        )
    if rebuild is not None and compensate_bias:
        raise ValueError(_SUPERSEDES)
    if rebuild is not None:
        return False
    return spec.default_compensate_bias if compensate_bias is None else bool(compensate_bias)


def changes_weights(method: str, prune_options: dict) -> bool:
    """Whether pruning with these `prune` keywords writes weights beyond slicing them (bias compensation or a
    least-squares refit, by request or by the method's default), so that the kept indices alone cannot rebuild the
    pruned model."""
    spec = get_method(method).spec
    rebuild = ReconstructConfig.for_method(
        spec.default_reconstruct,
        prune_options.get("reconstruct"),
        prune_options.get("reconstruct_ridge"),
        prune_options.get("reconstruct_form"),
    )
    return rebuild is not None or resolve_compensation(method, spec, prune_options.get("compensate_bias"), rebuild)


def _rounds_then_refit(req: _Request) -> list[dict]:
    """A method with its own removal rounds (Bonsai) and a refit: the rounds prune a copy of the model, then the
    original, still unpruned by this call, is refit to the copy's final units on the same calibration tokens and
    pruned to them. The refit needs the statistics and the weights of the model before the rounds (dense mode) or the
    dense layer outputs (sequential mode), which the rounds' physical removals destroy; the copy costs a second set
    of weights until the rounds end."""
    model, state = req.ctx.model, req.state
    work = copy.deepcopy(model)  # a copy starts without pruning state: give it the original's bookkeeping
    work_state = pruning_state(work)
    work_state.kept, work_state.original_params = copy.deepcopy(state.kept), state.original_params
    work_ctx = replace(req.ctx, model=work, adapter=get_adapter(work), pruning=work_state, _stats={}, _moments={})
    history = req.method.run(work_ctx, req.sparsity, state.original_params, req.alloc, **req.method_options)
    final = work_state.kept
    del work, work_ctx, work_state
    keeps = [_current_keep(now, then) for now, then in zip(state.kept, final)]
    timing = _remove(model, req.adapter, state, keeps, req.ctx, False, req.reconstruct)
    history[-1].update(timing)
    return history


def _current_keep(now: OriginalKeep, target: OriginalKeep) -> CurrentKeep:
    """The current indices, in a layer whose surviving original units are `now`, of the original units `target`
    keeps (a subset of `now`)."""

    def positions(current: list[int], kept: list[int]) -> list[int]:
        where = {u: i for i, u in enumerate(current)}
        return sorted(where[u] for u in kept)

    return CurrentKeep(
        positions(now.kept_query_heads, target.kept_query_heads),
        positions(now.kept_kv_heads, target.kept_kv_heads),
        positions(now.kept_channels, target.kept_channels),
    )


def _score_allocate_remove(req: _Request, scores: list | None, t0: float) -> list[dict]:
    to_remove = _params_to_remove(req.state, req.adapter, req.sparsity)
    if scores is None:
        scores = req.method.score(req.ctx, **req.method_options)
    t_score = time.perf_counter() - t0
    keeps = allocate(req.adapter, scores, to_remove, req.alloc)
    timing = _remove(req.ctx.model, req.adapter, req.state, keeps, req.ctx, req.compensate_bias, req.reconstruct)
    return [{"scoring_time_s": t_score, **timing}]


def _warn_surprises(plan: PruningPlan, sparsity: float, round_to: int) -> None:
    """Warn about results a user would not expect from the request, with both numbers: every unit gone, nothing
    removed for a non-zero request (the budget is below one unit), or an achieved sparsity far from the requested one
    (more than max(0.03, 0.15 * request) off: rounding of kept widths, coarse units, or targets / skip_layers that
    leave too little to prune)."""
    pattern = (plan.history[0] if plan.history else {}).get("pattern", "structured")
    if pattern != "structured":  # N:M patterns zero weights inside dense matrices; nothing is removed
        return
    before = plan.previous_steps[-1].get("achieved_sparsity", 0.0) if plan.previous_steps else 0.0
    achieved = plan.achieved_sparsity
    if plan.prunable_params_original and plan.prunable_params_kept == 0:
        message = (
            f"sparsity {sparsity} removed every attention head and MLP channel of every layer: the model is "
            "reduced to embeddings, norms and the LM head"
        )
    elif sparsity > before and achieved <= before:
        message = (
            f"sparsity {sparsity} removed nothing (achieved sparsity {achieved:.4f}): the budget is smaller than "
            "one attention unit or MLP channel; ask for a larger sparsity"
        )
    elif abs(achieved - sparsity) > max(0.03, 0.15 * sparsity):
        why = (
            f"kept widths rounded to multiples of {round_to}"
            if round_to > 1
            else "units too coarse for this budget, or targets / skip_layers leave too little to prune"
        )
        prefix = f"round_to={round_to}: " if round_to > 1 else ""
        message = f"{prefix}achieved sparsity {achieved:.4f} is far from the requested {sparsity} ({why})"
    else:
        return
    warnings.warn(message, UserWarning, stacklevel=3)
