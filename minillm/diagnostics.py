"""Diagnostics of the FMS criterion and its gradient estimators (issue 17; experiment `fms_diagnostics`).

Small pure functions: rank statistics, the exact (backprop) gate gradient, FMS unit scores from a given gate
gradient, and the single-unit removal oracle. Anything here that calls `backward` is a *diagnostic*: it is labelled
as using backprop wherever its numbers are reported.
"""

from __future__ import annotations

import torch

from .adapters import get_adapter
from .allocate import LayerScores
from .scores.common import ScoringContext, lm_loss
from .surgery import VirtualMasks


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), float64."""
    x = x.detach().double().flatten().cpu()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts.double())[inverse]
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long vectors (tie-aware)."""
    ra, rb = _rank(torch.as_tensor(a)), _rank(torch.as_tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def cosine(a, b) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def bottom_overlap(a, b, p: float) -> float:
    """|bottom-p of a  and  bottom-p of b| / k with k = round(p * len): how much of the set to remove agrees."""
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    k = max(1, round(p * len(a)))
    sa = set(torch.argsort(a, stable=True)[:k].tolist())
    sb = set(torch.argsort(b, stable=True)[:k].tolist())
    return len(sa & sb) / k


def flat(scores: list[LayerScores], kind: str = "both") -> torch.Tensor:
    """All unit scores of a model as one vector (attention units then channels, layer by layer)."""
    parts = []
    for s in scores:
        if kind in ("both", "attention") and s.attention is not None:
            parts.append(s.attention.double().flatten().cpu())
        if kind in ("both", "channels") and s.channels is not None:
            parts.append(s.channels.double().flatten().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def exact_gate_gradient(model, calib: torch.Tensor, batch_size: int = 16) -> dict[tuple[int, str], torch.Tensor]:
    """dL/dgate for every head output and MLP channel gate at gates = 1, by backprop through `VirtualMasks`
    (a diagnostic: uses a backward pass). Keys (layer, 'heads' | 'channels'), fp64 on CPU."""
    adapter = get_adapter(model)
    gates_h, gates_c = {}, {}
    for i, layer in enumerate(adapter.layers()):
        n_q = adapter.attention_shape(layer).n_query_heads
        if n_q:
            gates_h[i] = torch.ones(n_q, requires_grad=True)
        if adapter.n_channels(layer):
            gates_c[i] = torch.ones(adapter.n_channels(layer), requires_grad=True)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        batches = [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
        tokens = sum(b[:, 1:].numel() for b in batches)
        with VirtualMasks(adapter, gates_h, gates_c):
            for b in batches:
                (lm_loss(model, b.to(next(model.parameters()).device)) * (b[:, 1:].numel() / tokens)).backward()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    out = {(i, "heads"): g.grad.double() for i, g in gates_h.items()}
    out.update({(i, "channels"): g.grad.double() for i, g in gates_c.items()})
    return out


def gate_fms_scores(ctx: ScoringContext, grads: dict, stats: dict, combination: str = "product", sign: str = "abs_mean"):
    """FMS unit scores (gate space) from a given gate gradient, e.g. the exact one, ones, or noise."""
    from .scores.fms import _gate_scores

    return [_gate_scores(ctx, grads, stats, i, layer, sign, combination) for i, layer in enumerate(ctx.adapter.layers())]
