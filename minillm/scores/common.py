"""Shared pieces of scoring: the scoring context and pooling of per-weight scores into unit scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import Adapter, Member
from ..allocate import LayerScores, resolve_attention_unit


@dataclass
class ScoringContext:
    model: nn.Module
    adapter: Adapter
    calib: torch.Tensor | None
    attention_units: str = "auto"
    seed: int = 0
    progress: bool = True
    state: dict = field(default_factory=dict)  # a method may leave data here for its after_prune step

    def unit(self, layer: nn.Module) -> str:
        return resolve_attention_unit(self.attention_units, self.adapter.attention_shape(layer))


def pool_attention(adapter: Adapter, layer: nn.Module, unit: str, query: torch.Tensor,
                   kv: torch.Tensor) -> torch.Tensor:
    """Attention unit scores from per-query-head and per-KV-head sums."""
    shape = adapter.attention_shape(layer)
    if unit == "kv_group":
        return kv + query.view(shape.n_kv_heads, shape.group_size).sum(1)
    return query + kv if shape.n_kv_heads == shape.n_query_heads else query


def pool_layer(adapter: Adapter, layer: nn.Module, unit: str,
               weight_score: Callable[[Member], torch.Tensor]) -> LayerScores:
    """Sum a per-weight score (a tensor shaped like each member's weight) over every unit's weights."""
    shape = adapter.attention_shape(layer)
    q = torch.zeros(shape.n_query_heads, dtype=torch.float64)
    kv = torch.zeros(shape.n_kv_heads, dtype=torch.float64)
    if shape.n_query_heads:
        for m in adapter.attention_members(layer):
            s = m.block_scores(weight_score(m).double(), shape.n_query_heads if m.unit == "query" else shape.n_kv_heads)
            if m.unit == "query":
                q += s.cpu()
            else:
                kv += s.cpu()
    n_ch = adapter.n_channels(layer)
    ch = torch.zeros(n_ch, dtype=torch.float64)
    if n_ch:
        for m in adapter.mlp_members(layer):
            ch += m.block_scores(weight_score(m).double(), n_ch).cpu()
    return LayerScores(pool_attention(adapter, layer, unit, q, kv), ch)
