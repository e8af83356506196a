"""fp32 arithmetic on a low-precision (bf16 / fp16) model, without touching its weights.

Forward-only estimators measure loss *differences*: a gate moved by eps = 1e-3, or one unit removed among
thousands. In bf16 (8 significant bits, a relative step of 2^-8 = 0.0039 near 1) the gate 1 + 1e-3 z rounds to
exactly 1 for almost every gate, and even a product kept exact would be rounded away when it is added to the bf16
residual stream; fp16 (11 bits) loses less, but still much of it. Inside `fp32_forward(model)` every module that
owns low-precision floating parameters computes with a temporary fp32 copy of them (swapped in by a forward
pre-hook, swapped back by the forward hook, the original storage never written), so the embeddings come out in fp32
and every later activation, gate product, residual sum and logit is fp32: the estimate follows the fp32 model
evaluated at the bf16-rounded weights.

Cost: activations are fp32 (twice their bf16 size), and one module's parameters exist in fp32 at a time (the
largest matrix: for LLaMA-7B an MLP matrix, 0.18 GB; for Llama-3-8B the untied LM head, 2.1 GB). fp32 models are
left alone (no hook is registered). Works with layer streaming (`minillm.streaming`: the hooks run on whatever
device the module is on when it is called) and with multi-device models.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

PRECISIONS = ("fp32", "native")


def _low_precision_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [
        (name, p)
        for name, p in module.named_parameters(recurse=False)
        if p.is_floating_point() and p.dtype != torch.float32 and p.device.type != "meta"
    ]


def needs_upcast(model: nn.Module) -> bool:
    return any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())


@contextmanager
def fp32_forward(model: nn.Module, enabled: bool = True):
    """Inside the block, forward passes of `model` compute in fp32 (see the module docstring); the model's
    parameters are bit-identical afterwards, and no-op for an fp32 model or with `enabled=False`."""
    if not enabled or not needs_upcast(model):
        yield
        return
    handles, stash = [], {}

    def pre(module, args):
        params = _low_precision_params(module)
        if not params or id(module) in stash:
            return
        stash[id(module)] = [(p, p.data) for _, p in params]
        for _, p in params:
            p.data = p.data.float()  # a new tensor: the original storage is kept in `stash` and never written

    def post(module, args, output):
        for p, data in stash.pop(id(module), []):
            p.data = data

    # hooks registered later (e.g. SPSA's weight perturbation) run after `pre`; their forward hooks must be
    # prepended so that `post` restores the original storage last
    for module in model.modules():
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for entries in stash.values():  # a forward pass that raised leaves its swap behind: undo it
            for p, data in entries:
                p.data = data
        stash.clear()
