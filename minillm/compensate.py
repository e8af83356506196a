"""Bias compensation (FLAP): fold the removed units' mean contribution into the output projection's bias.

For the output projection y = W x (o_proj / down_proj and their OPT/BLOOM equivalents), removing input columns J
changes the mean output on the calibration data by W[:, J] mean(x_J). Adding exactly that to the bias keeps the
layer's mean output unchanged; the bias is created when the model has none (it is saved and reloaded like any
other weight). FLAP uses it by default; `minillm.prune(..., compensate_bias=True)` applies it to any method.
"""

from __future__ import annotations

import torch
from torch import nn

from .offload import loaded
from .scores.common import ScoringContext, member_key
from .surgery import CurrentKeep


@torch.no_grad()
def compensate(linear: nn.Linear, removed_columns: torch.Tensor, mean_input: torch.Tensor) -> None:
    """bias += W[:, removed] @ mean(X[:, removed]); creates the bias if the linear has none."""
    if removed_columns.numel() == 0:
        return
    w = linear.weight
    delta = w[:, removed_columns.to(w.device)].float() @ mean_input[removed_columns.to(mean_input.device)].to(w.device)
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    linear.bias.add_(delta.to(linear.bias.dtype))


def _removed_head_columns(n_heads: int, head_dim: int, kept: list[int]) -> torch.Tensor:
    kept_set = set(kept)
    cols = [c for h in range(n_heads) if h not in kept_set for c in range(h * head_dim, (h + 1) * head_dim)]
    return torch.tensor(cols, dtype=torch.long)


def compensate_selections(ctx: ScoringContext, selections: list[CurrentKeep]) -> None:
    """Apply bias compensation for the units about to be removed (call before physical removal). Uses the
    context's output-projection input statistics (cached when the method already read them, as FLAP does)."""
    stats = ctx.input_stats("out")
    for i, (layer, sel) in enumerate(zip(ctx.adapter.layers(), selections)):
        with loaded(layer):
            shape = ctx.adapter.attention_shape(layer)
            if shape.n_query_heads:
                out = ctx.adapter.attention_members(layer)[-1]
                removed = _removed_head_columns(shape.n_query_heads, shape.head_dim, sel.kept_q)
                compensate(out.linear, removed, stats[member_key(i, out)].mean)
            n_ch = ctx.adapter.n_channels(layer)
            if n_ch:
                down = ctx.adapter.mlp_members(layer)[-1]
                kept = set(sel.kept_channels)
                removed = torch.tensor([c for c in range(n_ch) if c not in kept], dtype=torch.long)
                compensate(down.linear, removed, stats[member_key(i, down)].mean)
