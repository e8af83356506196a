"""Semi-structured (2:4) sparse storage of an N:M-pruned model: a change of weight format for faster kernels, made
after pruning (the `wanda_24` / `magnitude_24` methods only zero weights) and measured by `minillm.bench.measure`."""

from __future__ import annotations

import torch
from torch import nn

from . import device
from .adapters import get_adapter


def to_semi_structured(model: nn.Module, sparse_backend: str = "auto") -> dict:
    """Convert every 2:4-sparse prunable linear to torch's semi-structured sparse format, in place, on an explicitly
    chosen kernel library (`device.semi_structured_backend`: CUTLASS on sm80-sm89, cuSPARSELt on Hopper and
    later). Needs a CUDA GPU with sparse tensor cores and fp16/bf16 weights. Never raises for an unsupported setup:
    when nothing can be converted, or a conversion fails, every weight stays dense and the reason is returned
    ({"converted", "backend", "reason"})."""
    cuda = device.backend()
    weight = next(model.parameters())
    out = {"converted": 0, "backend": None, "reason": None}
    if not cuda.is_cuda(weight.device):
        return {**out, "reason": "semi-structured sparse kernels need a CUDA GPU; weights stay dense"}
    capability = tuple(cuda.capability(weight.device))
    chosen = device.semi_structured_backend(capability, cuda.cusparselt_available(), sparse_backend)
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
