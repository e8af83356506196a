"""Models dispatched by accelerate (`device_map=...`, weights spread over GPUs, CPU or disk).

Weights on several real devices need nothing special: every computation here happens on the device of the weight
it reads. Offloaded weights (accelerate keeps them on the meta device and loads them just for each forward pass)
must be loaded whenever a score reads them outside a forward pass (`loaded`) and made permanent before units are
physically removed (`materialize`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def _offloaded_modules(module: nn.Module) -> list[nn.Module]:
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:  # accelerate is optional for plain models
        return []
    return [m for m in module.modules() if has_offloaded_params(m)]


def has_offloaded(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


@contextmanager
def loaded(module: nn.Module):
    """Inside the block, offloaded weights of `module` are real tensors (a no-op for ordinary modules)."""
    targets = _offloaded_modules(module)
    if not targets:
        yield
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in targets:
            stack.enter_context(align_module_device(m, execution_device=torch.device("cpu")))
        yield


def materialize(model: nn.Module) -> int:
    """Load every offloaded weight into CPU memory for good and remove accelerate's offload hooks; returns the number
    of modules that were offloaded. Needed before physical removal (a meta tensor cannot be sliced)."""
    targets = _offloaded_modules(model)
    if not targets:
        return 0
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for m in targets:
        hook = m._hf_hook
        prefix = getattr(hook.weights_map, "prefix", "")
        for name, _ in list(m.named_parameters()) + list(m.named_buffers()):
            key = f"{prefix}{name}" if prefix else name
            value = hook.weights_map.dataset[key] if hasattr(hook.weights_map, "dataset") else hook.weights_map[name]
            set_module_tensor_to_device(m, name, "cpu", value=value)
        remove_hook_from_module(m, recurse=True)
    return len(targets)
