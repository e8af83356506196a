"""`flap`: FLAP (An et al., AAAI'24) with the WIFV metric, adaptive global structure (AL-AM) and bias compensation.

* Fluctuation score of input channel j of o_proj / down_proj: Var_tokens(X_j) * ||W_:,j||^2; for attention the
  score is squared and averaged over each head's dimensions.
* Adaptive structure: scores are standardised within each layer and kind (heads, channels), then ranked globally
  and removed by parameter cost (a head weighs as much as its parameters, as in FLAP's 512/3 ratio for LLaMA-7B).
* Bias compensation (on by default for FLAP; `compensate_bias` of `minillm.prune`, see compensate.py).
"""

from __future__ import annotations

import torch

from ..allocate import LayerScores
from ..offload import loaded
from .common import ScoringContext, all_members, collect_input_stats, member_key, pool_attention

NEEDS_CALIBRATION = True
DEFAULT_ALLOCATION = "global"
DEFAULT_COMPENSATE_BIAS = True


def _standardise(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std() + 1e-12)


def score(ctx: ScoringContext, standardise: bool = True) -> list[LayerScores]:
    members = all_members(ctx.adapter, "out")
    stats = collect_input_stats(ctx, {k: m.linear for k, (_, m) in members.items()})
    ctx.state["out_stats"] = stats  # reused by the bias compensation (minillm.compensate)
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
