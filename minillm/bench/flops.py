"""Counted FLOPs, bytes and roofline time of the operators a step would run on a GPU, on fake tensors (torch
FakeTensorMode: no weights, no data; the machinery of `minillm.bench.simulate`).

A TorchDispatchMode (`CostCounter`) sees every operator and counts FLOPs of matrix multiplies and attention (by
torch.utils.flop_counter's formulas, plus the CPU flash-attention kernel that runs in the simulation in place of
CUDA's; element-wise work is counted as memory traffic only) and the bytes of every tensor an operator reads or
writes (views move nothing and are skipped). Each operator becomes time by a roofline: max(FLOPs / (peak x compute
efficiency), bytes / (HBM bandwidth x memory efficiency)) + a fixed launch cost (eager mode: one kernel per
operator). Used by the latency bench (FLOP ceilings of a speed-up) and the harness's run-time estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# --- the machine ---------------------------------------------------------------------------------------------------

H100 = {
    "name": "NVIDIA H100 SXM 80GB (estimate)",
    # dense (no 2:4) peak FLOP/s per dtype: bf16/fp16 tensor cores 989 TFLOP/s; fp32 without TF32 (torch's default
    # for matmuls) 67 TFLOP/s
    "peak_flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "hbm_bytes_per_s": 3.35e12,
    "compute_efficiency": 0.6,  # achieved fraction of peak in large GEMMs
    "memory_efficiency": 0.8,  # achieved fraction of HBM bandwidth in streaming kernels
    "launch_s": 5e-6,  # eager-mode cost per kernel (CPU launch), paid by every operator
}


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    ops: int = 0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.ops + other.ops,
                    self.seconds + other.seconds)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k, round(self.ops * k), self.seconds * k)

    __rmul__ = __mul__

    def __sub__(self, other: Cost) -> Cost:
        return self + other * -1


def extrapolate(c_a: Cost, a: int, c_b: Cost, b: int, n: int) -> Cost:
    """The cost at setting n of a step linear in its setting, from its costs at settings a < b."""
    per = (c_b - c_a) * (1.0 / (b - a))
    return c_a + per * (n - a)


_SKIP = {
    "aten::size", "aten::stride", "aten::numel", "aten::dim", "aten::is_contiguous", "aten::sym_size",
    "aten::sym_stride", "aten::sym_numel", "aten::storage_offset", "aten::detach", "aten::alias", "aten::lift_fresh",
    "prim::device", "prim::layout", "aten::_local_scalar_dense", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::set_",
}


class CostCounter(TorchDispatchMode):
    """Counted FLOPs, bytes and roofline time of every operator on fake tensors (see the module docstring)."""

    def __init__(self, hw: dict = H100):
        super().__init__()
        self.hw = hw
        self.cost = Cost()

    def _flops(self, func, args, kwargs, out) -> float:
        from torch.utils.flop_counter import flop_registry

        packet = func._overloadpacket
        if packet in flop_registry:
            return float(flop_registry[packet](*args, **kwargs, out_val=out))
        name = packet._qualified_op_name if hasattr(packet, "_qualified_op_name") else str(packet)
        if "scaled_dot_product" in name and "attention" in name:
            q, k = args[0], args[1]
            if "backward" in name:  # (grad_out, query, key, value, ...)
                q, k = args[1], args[2]
            b, h, t, d = q.shape
            fwd = 4.0 * b * h * t * k.shape[-2] * d
            return fwd * (2.5 if "backward" in name else 1.0)
        return 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.name().split(".")[0] in _SKIP:
            return out
        if getattr(func, "is_view", False):
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, FakeTensor)]
        if not tensors:
            return out  # host-side work on real tensors (stand-in values, Bonsai's regression)
        seen, nbytes = set(), 0
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                nbytes += t.numel() * t.element_size()
        flops = self._flops(func, args, kwargs, out)
        dtypes = [t.dtype for t in tensors if t.dtype.is_floating_point]
        dtype = str(dtypes[0]).replace("torch.", "") if dtypes else "float32"
        peak = self.hw["peak_flops"].get(dtype, self.hw["peak_flops"]["float32"])
        seconds = max(
            flops / (peak * self.hw["compute_efficiency"]),
            nbytes / (self.hw["hbm_bytes_per_s"] * self.hw["memory_efficiency"]),
        ) + self.hw["launch_s"]
        self.cost = self.cost + Cost(flops, nbytes, 1, seconds)
        return out


# --- counting one step on a fake model -----------------------------------------------------------------------------


def shape_name(model: str) -> str:
    """The registry shape that stands for a profile's model in the count."""
    from minillm.models import SHAPE_OF, SHAPES

    if model in SHAPES:
        return model
    if model in SHAPE_OF:
        return SHAPE_OF[model]
    raise ValueError(
        f"no registry shape for model {model!r}; add it to minillm.models.SHAPE_OF (known: {', '.join(SHAPE_OF)})"
    )


def count(model: str, dtype: str, fn, hw: dict = H100, setup=None, teacher: bool = False) -> Cost:
    """Cost of `fn(fake_model, state)` on a fresh fake model of `model`'s shape; `setup(fake_model, teacher)` (not
    counted) returns `state`, e.g. a KV cache; teacher: a second fake model of the same shape (the parent)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minillm.bench.simulate import StandIns, fake_model, meta_model

    meta = meta_model(shape_name(model), getattr(torch, dtype))
    meta_teacher = meta_model(shape_name(model), getattr(torch, dtype)) if teacher else None
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = fake_model(meta)
        parent = fake_model(meta_teacher) if teacher else None
        standins = StandIns()
        with standins:
            state = setup(fake, parent) if setup else None
        counter = CostCounter(hw)
        with standins, counter:
            fn(fake, state)
    return counter.cost


def model_cost(model: torch.nn.Module, fn, setup=None, hw: dict = H100) -> Cost:
    """Cost of `fn(call, state)` on a real (e.g. pruned) model, run on fake copies of its parameters and buffers:
    shapes only, nothing is computed and the model is left as it was. `call(**inputs)` is the model's forward without
    gradients; `setup(call)` (not counted) returns `state`, e.g. a KV cache."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minillm.bench.simulate import StandIns

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state_dict = {name: mode.from_tensor(t) for name, t in model.state_dict(keep_vars=True).items()}

    def call(**inputs):
        return torch.func.functional_call(model, state_dict, (), inputs)

    counter = CostCounter(hw)
    with mode, StandIns(), torch.no_grad():
        state = setup(call) if setup else None
        with counter:
            fn(call, state)
    return counter.cost


def latency_flops(
    model: torch.nn.Module, prefill: list[tuple[int, int]], decode_batches: list[int], prompt: int, new_tokens: int
) -> dict:
    """Counted FLOPs of the work `measure.latency` times: one forward pass per prefill (batch, length), and per
    decode batch the prompt's forward pass plus `new_tokens` - 1 single-token steps (greedy generation), each step
    counted at the middle context prompt + new_tokens // 2 with a dynamic cache (a static cache's attention over its
    empty slots is not counted). Matmuls and attention only (see `CostCounter`): the embedding lookup is no
    multiply-add, the LM head is one. {"prefill": [FLOPs per shape], "decode": [FLOPs per batch]}."""
    out = {"prefill": [], "decode": []}
    for b, t in prefill:
        out["prefill"].append(
            model_cost(model, lambda call, _, b=b, t=t: call(input_ids=dummy_ids(b, t), use_cache=False)).flops
        )
    for b in decode_batches:
        first = model_cost(model, lambda call, _, b=b: call(input_ids=dummy_ids(b, prompt), use_cache=True)).flops
        step = model_cost(
            model,
            lambda call, cache, b=b: call(input_ids=dummy_ids(b, 1), past_key_values=cache, use_cache=True),
            lambda call, b=b: call(input_ids=dummy_ids(b, prompt + new_tokens // 2), use_cache=True).past_key_values,
        ).flops
        out["decode"].append(first + (new_tokens - 1) * step)
    return out


def dummy_ids(batch: int, seqlen: int) -> torch.Tensor:
    return torch.zeros(batch, seqlen, dtype=torch.long)
