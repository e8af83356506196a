"""Turning unit scores into keep sets under a parameter budget.

Scores: per layer, one score per attention unit and one per MLP channel; higher means more important. The budget is
in parameters: the model must end with (1 - sparsity) of its original prunable parameters.

* ``uniform``: every pruned layer loses the same fraction of its parameters. The number of attention units removed
  is that fraction of the layer's units, rounded; MLP channels fill the rest of the layer's budget, so each layer
  lands within one channel's cost of its target.
* ``global``: all units of all pruned layers are ranked together by score and the lowest are removed until the
  budget is spent (scores must be comparable across layers, e.g. estimated loss changes).

Attention units: ``kv_group`` (a KV head with its query heads; the only exact unit for GQA without constraints),
``query_head`` (MHA and MQA; for GQA only in ``uniform`` mode, removing the same number of query heads from every
group), or ``auto`` (query heads for MQA, KV groups otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapters import Adapter, AttentionShape
from .surgery import CurrentKeep, GQAConstraintError

ATTENTION_UNITS = ("auto", "kv_group", "query_head")
ALLOCATIONS = ("uniform", "global")
TARGETS = ("both", "attention", "mlp")


@dataclass
class LayerScores:
    """Scores of one layer's units. `attention` has one entry per attention unit (KV group or query head, see
    `attention_unit`), `channels` one per MLP channel; None means the method does not score that kind."""

    attention: torch.Tensor | None
    channels: torch.Tensor | None


@dataclass
class AllocationConfig:
    allocation: str = "uniform"
    attention_units: str = "auto"
    targets: str = "both"
    skip_layers: Sequence[int] = field(default_factory=tuple)
    round_to: int = 1

    def validate(self, n_layers: int) -> None:
        for name, value, allowed in (
            ("allocation", self.allocation, ALLOCATIONS),
            ("attention_units", self.attention_units, ATTENTION_UNITS),
            ("targets", self.targets, TARGETS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        bad = [i for i in self.skip_layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"skip_layers {bad} out of range for a model with {n_layers} layers")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")


def resolve_attention_unit(requested: str, shape: AttentionShape) -> str:
    """The attention unit used for a layer with this head layout."""
    if requested == "auto":
        return "query_head" if shape.n_kv_heads == 1 and shape.n_query_heads > 1 else "kv_group"
    return requested


def n_attention_units(unit: str, shape: AttentionShape) -> int:
    return shape.n_query_heads if unit == "query_head" else shape.n_kv_heads


def is_balanced_gqa(unit: str, shape: AttentionShape) -> bool:
    return unit == "query_head" and 1 < shape.n_kv_heads < shape.n_query_heads


def attention_unit_cost(adapter: Adapter, layer, unit: str) -> int:
    shape = adapter.attention_shape(layer)
    q_cost, kv_cost = adapter.head_costs(layer)
    if unit == "kv_group":
        return kv_cost + shape.group_size * q_cost
    # a query head owns its own K/V only in MHA
    return q_cost + (kv_cost if shape.n_kv_heads == shape.n_query_heads else 0)


def attention_keep(unit: str, shape: AttentionShape, removed: Sequence[int]) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) in current indices after removing the given attention units."""
    removed_set = set(removed)
    g = shape.group_size
    if unit == "kv_group":
        kept_kv = [k for k in range(shape.n_kv_heads) if k not in removed_set]
        return [h for h in range(shape.n_query_heads) if h // g in set(kept_kv)], kept_kv
    kept_q = [h for h in range(shape.n_query_heads) if h not in removed_set]
    if shape.n_kv_heads == shape.n_query_heads:
        return kept_q, list(kept_q)
    kept_kv = sorted({h // g for h in kept_q})
    return kept_q, kept_kv


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    if k <= 0:
        return []
    order = torch.argsort(scores.detach().float().cpu(), stable=True)
    return sorted(order[:k].tolist())


def _balanced_lowest(scores: torch.Tensor, shape: AttentionShape, per_group: int) -> list[int]:
    """Remove the `per_group` lowest-scoring query heads of every KV group."""
    g = shape.group_size
    removed = []
    for k in range(shape.n_kv_heads):
        removed += [k * g + i for i in _lowest(scores[k * g : (k + 1) * g], per_group)]
    return sorted(removed)


def _round_channels(n_current: int, n_remove: int, multiple: int) -> int:
    if multiple <= 1 or n_current < multiple:
        return n_remove
    kept = n_current - n_remove
    kept = int(round(kept / multiple)) * multiple
    return n_current - min(max(kept, 0), n_current)


def allocate(
    adapter: Adapter, scores: Sequence[LayerScores], params_to_remove: float, cfg: AllocationConfig
) -> list[CurrentKeep]:
    """Choose the units to keep in every layer so that about `params_to_remove` parameters go."""
    layers = list(adapter.layers())
    cfg.validate(len(layers))
    if len(scores) != len(layers):
        raise ValueError(f"got scores for {len(scores)} layers, the model has {len(layers)}")
    active = [i for i in range(len(layers)) if i not in set(cfg.skip_layers)]
    removals = (_uniform if cfg.allocation == "uniform" else _global)(
        adapter, layers, scores, params_to_remove, cfg, active
    )
    selections = []
    for i, layer in enumerate(layers):
        shape = adapter.attention_shape(layer)
        unit = resolve_attention_unit(cfg.attention_units, shape)
        att_removed, ch_removed = removals.get(i, ([], []))
        if cfg.round_to > 1 and i in removals:
            n_ch = adapter.n_channels(layer)
            want = _round_channels(n_ch, len(ch_removed), cfg.round_to)
            ch_removed = _lowest(scores[i].channels, want) if scores[i].channels is not None else ch_removed
        kept_q, kept_kv = attention_keep(unit, shape, att_removed)
        removed_ch = set(ch_removed)
        selections.append(
            CurrentKeep(kept_q, kept_kv, [c for c in range(adapter.n_channels(layer)) if c not in removed_ch])
        )
    return selections


def _uniform(adapter, layers, scores, params_to_remove, cfg, active) -> dict[int, tuple[list[int], list[int]]]:
    active_params = sum(adapter.layer_params(layers[i]) for i in active)
    if params_to_remove <= 0:
        return {}
    if active_params <= 0 or params_to_remove >= active_params:
        raise ValueError(
            f"cannot remove {params_to_remove:.0f} parameters from {active_params} prunable parameters "
            f"in the {len(active)} layers not skipped; lower the sparsity or skip fewer layers"
        )
    ratio = params_to_remove / active_params
    out = {}
    for i in active:
        layer, s = layers[i], scores[i]
        shape = adapter.attention_shape(layer)
        unit = resolve_attention_unit(cfg.attention_units, shape)
        target = ratio * adapter.layer_params(layer)
        att_removed: list[int] = []
        n_units = n_attention_units(unit, shape)
        if cfg.targets != "mlp" and n_units and s.attention is not None:
            cost = attention_unit_cost(adapter, layer, unit)
            if is_balanced_gqa(unit, shape):
                per_group = (
                    round(ratio * shape.group_size)
                    if cfg.targets == "both"
                    else round(target / (cost * shape.n_kv_heads))
                )
                att_removed = _balanced_lowest(s.attention, shape, min(per_group, shape.group_size))
            else:
                k = round(ratio * n_units) if cfg.targets == "both" else round(target / cost)
                att_removed = _lowest(s.attention, min(k, n_units))
            target -= len(att_removed) * cost
        ch_removed: list[int] = []
        n_ch = adapter.n_channels(layer)
        if cfg.targets != "attention" and n_ch and s.channels is not None:
            k = min(max(round(target / adapter.channel_cost(layer)), 0), n_ch)
            ch_removed = _lowest(s.channels, k)
        out[i] = (att_removed, ch_removed)
    return out


def _global(adapter, layers, scores, params_to_remove, cfg, active) -> dict[int, tuple[list[int], list[int]]]:
    candidates = []  # (score, layer, kind, index, cost)
    for i in active:
        layer, s = layers[i], scores[i]
        shape = adapter.attention_shape(layer)
        unit = resolve_attention_unit(cfg.attention_units, shape)
        if cfg.targets != "mlp" and s.attention is not None and n_attention_units(unit, shape):
            if is_balanced_gqa(unit, shape):
                raise GQAConstraintError(
                    "global allocation cannot keep query heads balanced across KV groups; "
                    "use attention_units='kv_group' or allocation='uniform'"
                )
            cost = attention_unit_cost(adapter, layer, unit)
            candidates += [(float(v), i, "attention", j, cost) for j, v in enumerate(s.attention.float().tolist())]
        if cfg.targets != "attention" and s.channels is not None and adapter.n_channels(layer):
            cost = adapter.channel_cost(layer)
            candidates += [(float(v), i, "mlp", j, cost) for j, v in enumerate(s.channels.float().tolist())]
    candidates.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
    out: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in active}
    spent = 0
    for _, i, kind, j, cost in candidates:
        if spent + cost > params_to_remove:
            break
        spent += cost
        out[i][0 if kind == "attention" else 1].append(j)
    return {i: (sorted(a), sorted(c)) for i, (a, c) in out.items()}
