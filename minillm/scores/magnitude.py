"""`magnitude`: sum over every weight of a unit's group of |W|^p (LLM-Pruner's L1 / L2 importance). No data."""

from __future__ import annotations

from ..allocate import LayerScores
from . import MethodSpec
from .common import ScoringContext, per_weight, pool_layer

SPEC = MethodSpec(needs_calibration=False)


def score(ctx: ScoringContext, norm: str = "l2") -> list[LayerScores]:
    """norm: 'l1' (sum |W|) or 'l2' (sum W^2) over the group's weights: q/k/v rows + o columns for a head,
    gate/up rows + down column for a channel (and the OPT/BLOOM equivalents)."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"magnitude norm must be 'l1' or 'l2', got {norm!r}")
    p = 1 if norm == "l1" else 2
    line = per_weight(lambda m: m.linear.weight.detach().float().abs().pow(p))
    return [pool_layer(ctx.adapter, layer, ctx.unit(layer), line) for layer in ctx.adapter.layers()]
