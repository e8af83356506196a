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


def execution_device(model: nn.Module) -> torch.device:
    """The device a model's input ids go to: that of its input embeddings, or, when accelerate offloaded them (on the
    meta device between calls), the device their hook runs them on. `next(model.parameters()).device` is `meta`
    there, and inputs moved to it hold no data ("Cannot copy out of meta tensor")."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is not None:
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type != "meta":
            return weight.device
        hook = getattr(embeddings, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


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


def _offloaded_names(module: nn.Module, hook) -> list[str]:
    """The tensors of `module` that `hook` keeps in its weights map and on the meta device between calls: parameters,
    and persistent buffers only where the hook offloads buffers. Non-persistent buffers (the rotary `inv_freq`) are
    never in a checkpoint, so accelerate leaves them real on the execution device (accelerate's own rule,
    `AlignDevicesHook.pre_forward`)."""
    from accelerate.utils import named_module_tensors

    return [
        name
        for name, _ in named_module_tensors(
            module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
        )
    ]


def materialize(model: nn.Module) -> int:
    """Load every offloaded weight into CPU memory for good and remove accelerate's offload hooks; returns the number
    of modules that were offloaded. Needed before physical removal (a meta tensor cannot be sliced).

    Only what the hook offloaded is read from its weights map (which holds checkpoint tensors only); the module's
    other tensors (non-persistent buffers such as the rotary `inv_freq`, kept real by accelerate) move to CPU as
    they are. Weights tied in the model (an LM head tied to the embeddings) stay tied: each is loaded once."""
    targets = _offloaded_modules(model)
    if not targets:
        return 0
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    cpu = torch.device("cpu")
    owners = _tied_owners(model)
    hooks = [(m, m._hf_hook) for m in targets]
    with torch.no_grad():
        for m, hook in hooks:
            offloaded = set(_offloaded_names(m, hook))
            tensors = list(m.named_parameters(recurse=hook.place_submodules))
            tensors += list(m.named_buffers(recurse=hook.place_submodules))
            for name, tensor in tensors:
                if name in offloaded and tensor.device.type == "meta":
                    set_module_tensor_to_device(m, name, cpu, value=hook.weights_map[name])
                elif tensor.device.type == "meta":
                    raise RuntimeError(
                        f"{type(m).__name__}.{name} is on the meta device but not in accelerate's offload map; "
                        "it cannot be loaded"
                    )
                elif tensor.device != cpu:
                    set_module_tensor_to_device(m, name, cpu)
    for m, _ in hooks:
        remove_hook_from_module(m, recurse=False)
    _retie(model, owners)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"parameters still on the meta device after loading the offloaded weights: {leftover[:5]}")
    return len(targets)


def _tied_owners(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(module, name, owner module, owner name) for every parameter slot that shares its Parameter object with an
    earlier slot (tied weights: `lm_head.weight is embed_tokens.weight`), found before loading replaces them."""
    first: dict[int, tuple[nn.Module, str]] = {}
    tied = []
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) in first:
                tied.append((module, name, *first[id(p)]))
            else:
                first[id(p)] = (module, name)
    return tied


def _retie(model: nn.Module, tied) -> None:
    """Give every tied slot its owner's Parameter again: set_module_tensor_to_device replaces a meta Parameter by a
    new one, which would untie an offloaded LM head from its embeddings (two copies, and a tied checkpoint saved with
    one of them)."""
    for module, name, owner, owner_name in tied:
        module._parameters[name] = owner._parameters[owner_name]
