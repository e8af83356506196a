"""Pruning state: what minillm remembers about a model between pruning steps, in one object kept outside the model.

A model stays a stock transformers model; its `PruningState` (where it came from, its prunable parameters before
any pruning, which original units survive, the last plan) lives in a registry keyed weakly by the model, so it goes
when the model goes. `pruning_state(model)` returns it. Removal through `PruningState.remove` keeps the original
indices up to date, which is what lets a model be pruned again (Bonsai's rounds, a second `prune` call) and every
plan be written in original indices. A copy of a model (`copy.deepcopy`) starts without state: copy before pruning,
or rebuild the copy from its plan (`restore_keep`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .adapters import Adapter
from .plan import OriginalKeep, PlanError, PruningPlan
from .surgery import CurrentKeep, check_range, prunable_params, prune_layer

_STATES: weakref.WeakKeyDictionary[nn.Module, PruningState] = weakref.WeakKeyDictionary()


@dataclass
class PruningState:
    """source / revision: what the model was loaded from (recorded in plans). original_params: prunable parameters
    before any pruning. kept: surviving original units per layer. plan: the plan of the last pruning step.
    These three are None until the model is first seen by pruning (`track`). notices: licence and terms files of a
    loaded pruned directory, which `save_pruned` carries into the next output (the terms of the original weights
    apply to every model pruned from them)."""

    source: str | None = None
    revision: str | None = None
    original_params: int | None = None
    kept: list[OriginalKeep] | None = None
    plan: PruningPlan | None = None
    notices: list[str] = field(default_factory=list)

    def track(self, adapter: Adapter) -> PruningState:
        """Start the bookkeeping of a model seen by pruning for the first time (it is taken to be unpruned)."""
        if self.kept is None:
            att = adapter.original_attention
            self.kept = [
                OriginalKeep(
                    list(range(att.n_query_heads)), list(range(att.n_kv_heads)), list(range(adapter.original_channels))
                )
                for _ in adapter.layers()
            ]
        if self.original_params is None:
            self.original_params = prunable_params(adapter)
        return self

    def sparsity(self, adapter: Adapter) -> float:
        """Fraction of the original prunable parameters removed so far."""
        self.track(adapter)
        return 1.0 - prunable_params(adapter) / self.original_params if self.original_params else 0.0

    def remove(self, adapter: Adapter, layer_idx: int, keep: CurrentKeep) -> None:
        """Physically remove the units of one layer that `keep` (current indices; None fields keep that kind) does
        not list, and record which original units survive."""
        self.track(adapter)
        prune_layer(adapter, layer_idx, keep.kept_q, keep.kept_kv, keep.kept_channels)
        record = self.kept[layer_idx]
        if keep.kept_q is not None:
            kept_kv = keep.kept_q if keep.kept_kv is None else keep.kept_kv
            record.kept_query_heads = [record.kept_query_heads[i] for i in sorted(keep.kept_q)]
            record.kept_kv_heads = [record.kept_kv_heads[i] for i in sorted(kept_kv)]
        if keep.kept_channels is not None:
            record.kept_channels = [record.kept_channels[i] for i in sorted(keep.kept_channels)]

    def remove_all(self, adapter: Adapter, keeps: Sequence[CurrentKeep]) -> None:
        for i, keep in enumerate(keeps):
            self.remove(adapter, i, keep)


def pruning_state(model: nn.Module) -> PruningState:
    """The model's pruning state (created empty for a model minillm has not seen)."""
    state = _STATES.get(model)
    if state is None:
        state = _STATES[model] = PruningState()
    return state


def set_source(model: nn.Module, source: str, revision: str | None = None) -> None:
    """Record where a model was loaded from (a registry name, Hub id or directory), for its plans."""
    state = pruning_state(model)
    state.source, state.revision = source, revision


def restore_keep(model: nn.Module, adapter: Adapter, keeps: Sequence[OriginalKeep]) -> PruningState:
    """Prune an *unpruned* model to the original-index keep sets of a plan (load_pruned, reused records)."""
    layers = adapter.layers()
    if len(keeps) != len(layers):
        raise PlanError(f"plan has {len(keeps)} layers, the model has {len(layers)}")
    att, n_ch = adapter.original_attention, adapter.original_channels
    state = pruning_state(model).track(adapter)
    for i, k in enumerate(keeps):
        for idx, n, what in (
            (k.kept_query_heads, att.n_query_heads, "query head"),
            (k.kept_kv_heads, att.n_kv_heads, "KV head"),
            (k.kept_channels, n_ch, "channel"),
        ):
            try:
                check_range(idx, n, what, i)
            except ValueError as e:
                raise PlanError(str(e)) from None
        # on an unpruned layer, original indices are current indices
        state.remove(adapter, i, CurrentKeep(k.kept_query_heads, k.kept_kv_heads, k.kept_channels))
    return state
