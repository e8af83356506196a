"""Layer-streamed execution: score a model whose weights do not fit on the accelerator.

Decoder layers stay where they are (normally CPU memory); everything else (embeddings, final norm, LM head, rotary
tables) moves to the execution device. Each decoder layer is moved to the device just before its forward pass and
back right after, so the device holds one layer plus activations at a time. Forward-only methods (fms, bonsai,
wanda_sp, flap, magnitude, random, the N:M baselines) run unchanged inside; backprop methods cannot (the backward
pass would need every layer on the device again).

accelerate's offload hooks (`cpu_offload`, `AlignDevicesHook`) move weights per module too, but between calls they
leave parameters on the meta device behind a weights map, so every score that reads weights outside a forward pass
and every physical removal would first have to load them (`minillm.offload`); two plain forward hooks keep real
tensors in place and leave the model exactly as it was when the block ends.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .adapters import Adapter, get_adapter


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise RuntimeError("decoder layers not found in the model")


def _move_outside(model: nn.Module, prefix: str, device: torch.device) -> None:
    for name, p in model.named_parameters():
        if not name.startswith(prefix):
            p.data = p.data.to(device)
    for module_name, module in model.named_modules():
        if module_name.startswith(prefix) or module_name + "." == prefix:
            continue
        for key, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[key] = buf.to(device)


@contextmanager
def stream_layers(model: nn.Module, device: str | torch.device, adapter: Adapter | None = None):
    """Inside the block, forward passes run on `device` with one decoder layer resident at a time.
    Yields a dict counting the layer transfers (for tests and logs)."""
    device = torch.device(device)
    layers = (adapter or get_adapter(model)).layers()
    home = next(layers[0].parameters()).device
    prefix = _layers_prefix(model, layers)
    counts = {"to_device": 0}
    handles = []

    def pre(module, args, kwargs):
        module.to(device)
        counts["to_device"] += 1

    def post(module, args, kwargs, output):
        module.to(home)

    _move_outside(model, prefix, device)
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        layers.to(home)
        _move_outside(model, prefix, home)
