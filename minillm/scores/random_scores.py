"""`random`: uniform random unit scores from a dedicated generator (the baseline every method must beat)."""

from __future__ import annotations

import torch

from ..allocate import LayerScores, n_attention_units
from . import MethodSpec
from .common import ScoringContext

SPEC = MethodSpec(needs_calibration=False)


def score(ctx: ScoringContext) -> list[LayerScores]:
    gen = torch.Generator().manual_seed(ctx.seed)
    out = []
    for layer in ctx.adapter.layers():
        shape = ctx.adapter.attention_shape(layer)
        n_att = n_attention_units(ctx.unit(layer), shape)
        out.append(
            LayerScores(
                torch.rand(n_att, generator=gen, dtype=torch.float64),
                torch.rand(ctx.adapter.n_channels(layer), generator=gen, dtype=torch.float64),
            )
        )
    return out
