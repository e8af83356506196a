"""`wanda_sp`: structured Wanda as in FLAP's repository. Only the output projections are scored:
s_ij = |W_ij| * ||X_j||_2 for o_proj / down_proj (and equivalents); a channel's score is the mean over output rows,
a head's the sum over its columns of that mean. Per-layer uniform allocation, no bias compensation.

Statistics come from one pass over the calibration data through the unpruned model (FLAP's own repository runs
Wanda-SP sequentially, feeding each pruned layer's outputs to the next; we use the one-pass variant for all
activation-based methods so they see identical inputs)."""

from __future__ import annotations

from ..allocate import LayerScores
from . import MethodSpec
from .common import ScoringContext, member_key, pool_layer

SPEC = MethodSpec(needs_calibration=True)


def score(ctx: ScoringContext) -> list[LayerScores]:
    stats = ctx.input_stats("out")
    out = []
    for i, layer in enumerate(ctx.adapter.layers()):

        def line(m, i=i):
            w = m.linear.weight.detach().float().abs()
            return (w * stats[member_key(i, m)].norm.to(w.device)[None, :]).mean(0)

        out.append(pool_layer(ctx.adapter, layer, ctx.unit(layer), line, members="out"))
    return out
