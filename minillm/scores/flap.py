"""`flap`: FLAP (An et al., AAAI'24) with the WIFV metric, adaptive global structure (AL-AM) and bias compensation.

* Fluctuation score of input channel j of o_proj / down_proj: Var_tokens(X_j) * ||W_:,j||^2; for attention the
  score is squared and averaged over each head's dimensions.
* Adaptive structure: scores are standardised within each layer and kind (heads, channels), then ranked globally
  and removed by parameter cost (a head weighs as much as its parameters, as in FLAP's 512/3 ratio for LLaMA-7B).
* Bias compensation: the removed channels' mean input, times their weight columns, is folded into the output
  projection's bias, created when the model has none, so the layer's mean output on the calibration data is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from ..allocate import LayerScores, LayerSelection
from ..offload import loaded
from .common import ScoringContext, all_members, collect_input_stats, member_key, pool_attention

NEEDS_CALIBRATION = True
DEFAULT_ALLOCATION = "global"


def _standardise(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std() + 1e-12)


def score(ctx: ScoringContext, compensate_bias: bool = True, standardise: bool = True) -> list[LayerScores]:
    members = all_members(ctx.adapter, "out")
    stats = collect_input_stats(ctx, {k: m.linear for k, (_, m) in members.items()})
    ctx.state["flap_stats"] = stats
    ctx.state["flap_compensate"] = compensate_bias
    out = []
    for i, layer in enumerate(ctx.adapter.layers()):
        with loaded(layer):
            out.append(_layer_scores(ctx, stats, i, layer, standardise))
    return out


def _layer_scores(ctx: ScoringContext, stats, i: int, layer, standardise: bool) -> LayerScores:
    shape = ctx.adapter.attention_shape(layer)
    heads = channels = None
    if shape.n_query_heads:
        o = ctx.adapter.attn_out_proj(layer)
        w = o.weight.detach().float()
        col = stats[member_key(i, ctx.adapter.attention_members(layer)[-1])].variance.to(w.device) * w.pow(2).sum(0)
        per_head = col.pow(2).reshape(shape.n_query_heads, -1).mean(1).double().cpu()
        heads = pool_attention(
            ctx.adapter, layer, ctx.unit(layer), per_head, torch.zeros(shape.n_kv_heads, dtype=torch.float64)
        )
    if ctx.adapter.n_channels(layer):
        d = ctx.adapter.mlp_out_proj(layer)
        w = d.weight.detach().float()
        channels = (
            (stats[member_key(i, ctx.adapter.mlp_members(layer)[-1])].variance.to(w.device) * w.pow(2).sum(0))
            .double()
            .cpu()
        )
    if standardise:
        heads = _standardise(heads) if heads is not None else None
        channels = _standardise(channels) if channels is not None else None
    return LayerScores(heads, channels)


@torch.no_grad()
def compensate(linear: nn.Linear, removed_columns: torch.Tensor, mean_input: torch.Tensor) -> None:
    """bias += W[:, removed] @ mean(X[:, removed]); creates the bias if the linear has none."""
    if removed_columns.numel() == 0:
        return
    w = linear.weight
    delta = w[:, removed_columns].float() @ mean_input[removed_columns].to(w.device)
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    linear.bias.add_(delta.to(linear.bias.dtype))


def before_prune(ctx: ScoringContext, selections: list[LayerSelection]) -> None:
    if not ctx.state.get("flap_compensate"):
        return
    stats = ctx.state["flap_stats"]
    for i, (layer, sel) in enumerate(zip(ctx.adapter.layers(), selections)):
        shape = ctx.adapter.attention_shape(layer)
        if shape.n_query_heads:
            out = ctx.adapter.attention_members(layer)[-1]
            kept = set(sel.kept_q)
            removed = [
                c
                for h in range(shape.n_query_heads)
                if h not in kept
                for c in range(h * shape.head_dim, (h + 1) * shape.head_dim)
            ]
            compensate(out.linear, torch.tensor(removed, dtype=torch.long), stats[member_key(i, out)].mean)
        n_ch = ctx.adapter.n_channels(layer)
        if n_ch:
            down = ctx.adapter.mlp_members(layer)[-1]
            kept = set(sel.kept_channels)
            removed = torch.tensor([c for c in range(n_ch) if c not in kept], dtype=torch.long)
            compensate(down.linear, removed, stats[member_key(i, down)].mean)
