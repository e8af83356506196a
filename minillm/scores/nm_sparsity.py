"""Semi-structured N:M sparsity (2:4 by default): the baseline Bonsai compares its speed against.

Within every output row of every prunable linear, each run of M consecutive input weights keeps its N highest
scores; the others are set to zero. Scores: Wanda's |W_ij| * ||X_j||_2 (`wanda_24`) or |W_ij| (`magnitude_24`).
Shapes do not change; `minillm.semi_structured` converts the weights to PyTorch's sparse kernels on GPUs that have
them.
Activation statistics come from one pass through the unpruned model (the Wanda repository prunes layer by layer,
feeding each pruned layer's outputs forward).
"""

from __future__ import annotations

import torch

from .common import ScoringContext, all_members


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean keep-mask of a [rows, cols] score matrix: the n largest of every m consecutive columns per row
    (ties broken towards the lower index)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def apply_nm(ctx: ScoringContext, use_activations: bool, n: int, m: int) -> dict:
    members = all_members(ctx.adapter)
    stats = ctx.input_stats("all") if use_activations else {}
    zeros = total = 0
    with torch.no_grad():
        for key, (_, member) in members.items():
            w = member.linear.weight
            if not w.numel():
                continue
            score = w.detach().float().abs()
            if use_activations:
                score = score * stats[key].norm.to(w.device)[None, :]
            keep = nm_mask(score, n, m)
            w.masked_fill_(~keep, 0)
            zeros += int((~keep).sum())
            total += keep.numel()
    return {
        "pattern": f"{n}:{m}",
        "weight_sparsity": zeros / max(total, 1),
        "scored": "wanda" if use_activations else "magnitude",
    }


def check(sparsity: float, n: int, m: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
    if abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(
            f"{n}:{m} sparsity removes exactly {1 - n / m:.0%} of each linear's weights; pass sparsity={1 - n / m}"
        )
