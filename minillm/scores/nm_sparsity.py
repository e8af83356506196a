"""Semi-structured N:M sparsity (2:4 by default): the baseline Bonsai compares its speed against.

Within every output row of every prunable linear, each run of M consecutive input weights keeps its N highest
scores; the others are set to zero. Scores: Wanda's |W_ij| * ||X_j||_2 (`wanda_24`) or |W_ij| (`magnitude_24`).
Shapes do not change; `to_semi_structured` converts the weights to PyTorch's sparse kernels on GPUs that have them.
Activation statistics come from one pass through the unpruned model (the Wanda repository prunes layer by layer,
feeding each pruned layer's outputs forward).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import ScoringContext, all_members, collect_input_stats


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
    stats = collect_input_stats(ctx, {k: mem.linear for k, (_, mem) in members.items()}) if use_activations else {}
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


def to_semi_structured(model: nn.Module, sparse_backend: str = "auto") -> dict:
    """Convert every 2:4-sparse prunable linear to torch's semi-structured sparse format, in place, on an explicitly
    chosen kernel library (`minillm.device.semi_structured_backend`: CUTLASS on sm80-sm89, cuSPARSELt on Hopper and
    later). Needs a CUDA GPU with sparse tensor cores and fp16/bf16 weights. Never raises for an unsupported setup:
    when nothing can be converted, or a conversion fails, every weight stays dense and the reason is returned
    ({"converted", "backend", "reason"})."""
    from ..adapters import get_adapter
    from ..device import backend, semi_structured_backend

    cuda = backend()
    weight = next(model.parameters())
    out = {"converted": 0, "backend": None, "reason": None}
    if not cuda.is_cuda(weight.device):
        return {**out, "reason": "semi-structured sparse kernels need a CUDA GPU; weights stay dense"}
    capability = tuple(cuda.capability(weight.device))
    chosen = semi_structured_backend(capability, cuda.cusparselt_available(), sparse_backend)
    if chosen is None:
        why = "no sparse tensor cores (compute capability < 8.0)" if capability[0] < 8 else (
            f"no usable 2:4 kernel library for sm{capability[0]}{capability[1]} (requested {sparse_backend!r}; "
            "CUTLASS kernels cover sm80-sm89 only, cuSPARSELt is not available)"
        )
        return {**out, "reason": f"{why}; weights stay dense"}
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return {**out, "backend": chosen, "reason": f"sparse kernels need fp16/bf16 weights, got {weight.dtype}"}
    adapter = get_adapter(model)
    linears = [lin for layer in adapter.layers() for lin in adapter.linears(layer) if lin.weight.numel()]
    try:  # convert everything first, then swap in: a failure leaves the model dense and usable
        sparse = [cuda.to_semi_structured(lin.weight.detach(), chosen) for lin in linears]
    except Exception as e:  # noqa: BLE001 - any failure of torch's conversion is recorded, not fatal
        return {**out, "backend": chosen, "reason": f"conversion failed on {chosen}: {type(e).__name__}: {e}"[:500]}
    for lin, w in zip(linears, sparse):
        lin.weight = nn.Parameter(w, requires_grad=False)
    return {**out, "converted": len(linears), "backend": chosen}


def stored_parameters(model: nn.Module) -> int:
    """Parameters actually stored: non-zero entries (a 2:4 model keeps half of its pruned linears' weights),
    beside `measure.count_parameters`, the logical size."""
    total = 0
    for p in model.parameters():
        try:
            total += int(torch.count_nonzero(p.detach()))
        except (RuntimeError, NotImplementedError, TypeError):  # semi-structured tensors: n of every m are stored
            total += p.numel() // 2
    return total
