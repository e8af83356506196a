"""Simulated peak device memory of a step (`python -m minillm bench memory --simulate`), without a GPU.

A step runs under torch's FakeTensorMode: every tensor has a shape, dtype and device but no data, so a 7B model in
fp16 costs no memory and a forward pass takes about a second. A TorchDispatchMode (`StorageTracker`) sees the
output of every operator and keeps the byte size of every live tensor storage on the simulated device, dropping it
when the storage is freed (weakref finalizer), so its peak is what `torch.cuda.max_memory_allocated` reports
(sizes rounded up to 512 bytes, as CUDA's caching allocator does).

Choices and their limits:

* Device: fake CPU tensors in the model's dtype. torch's CPU build can make fake CUDA tensors, but Python indexing
  of them (`x[..., None]`, used by the rotary embedding) needs a CUDA device guard and fails. The operators are the
  same except scaled-dot-product attention, where CPU picks `_scaled_dot_product_flash_attention_for_cpu`: like
  CUDA's flash / memory-efficient kernels it returns the output and a [B, H, T] log-sum-exp and never materialises
  the [B, H, T, T] attention matrix. `attention_kernels` and `materialised_attention` in each result show which
  kernel ran and whether any 4-D softmax (the math path's attention matrix) was computed.
* Not seen: memory a kernel allocates internally and frees before it returns (cuBLAS workspace, flash-attention
  backward's accumulators), the CUDA context, and the caching allocator's fragmentation (reserved, not allocated).
  Against the H100 figures this leaves the predictions 0.03-0.07 GiB low (docs/measurement.md; `validate_h100`).
* Values: fake tensors have none, so data-dependent steps get stand-ins (`StandIns`): a Python scalar read from a
  tensor (`float(loss)`, `.tolist()`) is a seeded random number, and operators whose output shape depends on values
  (`nonzero`) run on real stand-in inputs; sorting, sampling (multinomial, randperm: Bonsai's masks and windows)
  and casting to float64 (where per-unit scores are pooled; the refit's float64 buffers are filled by copy, not
  cast, and stay counted) turn
  a fake tensor into a real one with stand-in random values, so the allocation runs on real numbers; an operator
  whose tensor inputs are all real runs for real (host-side bookkeeping such as Bonsai's regression). Memory of the
  scoring does not depend on them; which units a method removes does, so the surgery removes stand-in units (the
  kept widths follow the real budget and allocation rules). Each result counts its stand-in values.
* Layer streaming (a model larger than the GPU): the decoder layers live on the fake "meta" device (host memory,
  not counted) and `minillm.streaming.stream_layers` moves one layer at a time to the simulated device.

Units: bytes in the trackers, GiB (2**30 bytes) in results and tables.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map, tree_map_only

from minillm.state import set_source

GIB = 1024**3
SIM_DEVICE = "cpu"  # the fake device standing in for the GPU (see the module docstring)
SHAPES = ((10, 128), (4, 2048))  # (batch, sequence length) of the simulated table
MODELS = ("llama-7b-shape", "llama3-8b-shape", "opt-6.7b-shape", "bloom-7b1-shape")
STREAMED_MODEL = "llama2-70b-shape"
GPU_LINES_GIB = {"A6000 (48 GB)": 48 * 1e9 / GIB, "A100/H100 (80 GB)": 80 * 1e9 / GIB}

# The H100 reference figures (docs/measurement.md): peak GiB measured on an H100 outside this repository's CI
# (random weights, fp16, transformers 5.17, its default attention)
REFERENCE_H100 = {
    ("llama-7b-shape", 10, 128, "dense"): 13.60,
    ("llama-7b-shape", 10, 128, "backprop"): 25.17,
    ("llama-7b-shape", 4, 2048, "dense"): 19.12,
    ("llama-7b-shape", 4, 2048, "backprop"): 61.33,
    ("llama3-8b-shape", 10, 128, "dense"): 16.72,
    ("llama3-8b-shape", 10, 128, "backprop"): 29.99,
    ("llama3-8b-shape", 4, 2048, "dense"): 25.87,
    ("llama3-8b-shape", 4, 2048, "backprop"): 76.05,
}

# the steps of the simulated table: label, method, sparsity, options (queries do not change the peak, only time)
STEPS: list[dict] = [
    {"label": "dense", "method": "dense"},
    {"label": "backprop", "method": "backprop"},
    {"label": "taylor", "method": "taylor"},
    {"label": "wanda_sp", "method": "wanda_sp"},
    {"label": "flap", "method": "flap"},
    {"label": "fms-weights", "method": "fms", "options": {"queries": 1, "space": "weights"}},
    {"label": "fms-gates", "method": "fms", "options": {"queries": 1, "space": "gates"}},
    {"label": "fms-gates-split", "method": "fms", "options": {"queries": 1, "space": "gates-split"}},
    {
        "label": "bonsai-1round",
        "method": "bonsai",
        "sparsity": 0.05,
        "options": {"masks_per_round": 2, "prune_frac": 0.05},
    },
]
# steps simulated when asked for by name (`bench memory --simulate --methods obs`), not in the default table: the
# least-squares refit's moments make their peak depend on the calibration size, which the table's shapes do not set
ON_REQUEST_STEPS: list[dict] = [
    {"label": "obs", "method": "obs"},
    {"label": "flap-reconstruct", "method": "flap", "options": {"reconstruct": "dense"}},
]
STREAMED_STEPS: list[dict] = [
    {"label": "fms-gates-streamed", "method": "fms", "options": {"queries": 1, "space": "gates"}, "stream": True},
    {"label": "wanda_sp-streamed", "method": "wanda_sp", "stream": True},
]


# --- trackers ---------------------------------------------------------------------------------------------------


class StorageTracker(TorchDispatchMode):
    """Live bytes of tensor storages on one device type, and their peak.

    Every operator output (and every tensor given to `add`) is looked up by its storage; a storage seen for the first
    time adds its size (rounded up to `round_bytes`) and a weakref finalizer subtracts it when the storage is freed.
    Also records the attention kernels that ran and how many 4-D softmaxes (materialised attention matrices)."""

    def __init__(self, device_type: str = SIM_DEVICE, round_bytes: int = 512):
        super().__init__()
        self.device_type = device_type
        self.round_bytes = round_bytes
        self.live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.attention_kernels: set[str] = set()
        self.materialised_attention = 0

    def add(self, t: torch.Tensor) -> None:
        """Count the storage of `t` if it is on the tracked device and not yet counted."""
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        size = -(-st.nbytes() // self.round_bytes) * self.round_bytes
        self.live[key] = size
        self.current_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current_bytes -= self.live.pop(key, 0)

    def add_module(self, module: torch.nn.Module) -> None:
        for t in [*module.parameters(), *module.buffers()]:
            self.add(t)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
            self.attention_kernels.add(name)
        if "softmax" in name and "backward" not in name and "log_softmax" not in name:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                self.materialised_attention += 1
        tree_map_only(torch.Tensor, self.add, out)
        return out


class StandIns(TorchDispatchMode):
    """Values for the data-dependent steps of code running on fake tensors (see the module docstring): a scalar read
    from a fake tensor becomes a seeded random number (int 0 for integer tensors, False for booleans), operators with
    a value-dependent output shape run on real stand-in inputs, and sorting runs on random stand-in keys.
    `count` is the number of invented values."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def _real(self, t):
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(t, FakeTensor):
            return t
        if t.constant is not None:
            return t.constant
        self.count += t.numel()
        if t.dtype == torch.bool:
            return torch.ones(t.shape, dtype=torch.bool)
        if t.dtype.is_floating_point:
            return torch.rand(t.shape, generator=self.gen, dtype=torch.float32).to(t.dtype)
        return torch.zeros(t.shape, dtype=t.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
            FakeTensor,
        )

        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors):
            with _disable_current_modes():  # host-side work on real values (e.g. Bonsai's regression) stays real
                return func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.sort, torch.ops.aten.multinomial, torch.ops.aten.randperm):
            return self._run_real(func, args, kwargs)
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float64:
            # unit scores are pooled in float64 (minillm.scores.common.pool_layer), Bonsai regresses in float64 on
            # the host: from here on they are real. The float64 buffers of the least-squares refit and of obs
            # (minillm.layerwise) are allocated and filled by copy_ / add_, not cast, so they stay fake and counted
            return self._run_real(func, args, kwargs)
        try:
            return func(*args, **kwargs)
        except DataDependentOutputException:
            t = args[0]
            self.count += 1
            if t.dtype == torch.bool:
                return False
            if t.dtype.is_floating_point:
                return self.rng.random()
            return 0
        except DynamicOutputShapeException:
            return self._run_real(func, args, kwargs)

    def _run_real(self, func, args, kwargs):
        with _disable_current_modes():
            args, kwargs = tree_map(self._real, (args, kwargs))
            return func(*args, **kwargs)


# --- model and steps ------------------------------------------------------------------------------------------------


def meta_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """The registry shape `name` built on the meta device in `dtype` (no storage, no initialisation); call it outside
    FakeTensorMode (fake parameters cannot be moved between devices by `Module.to`, see `fake_model`)."""
    from transformers import AutoModelForCausalLM

    from minillm.models import SHAPES as REGISTRY

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(REGISTRY[name](), dtype=dtype)
    model.eval()
    set_source(model, name)
    return model


def fake_model(model: torch.nn.Module, layers_on_host: bool = False) -> torch.nn.Module:
    """Give a `meta_model` fake storage on the simulated device; call it inside a FakeTensorMode.

    layers_on_host: the decoder layers stay meta tensors (host memory, not counted) and each layer's `.to` is
    replaced by one that swaps in new Parameter objects: `Module.to` on fake parameters goes through
    `torch.utils.swap_tensors`, which refuses tensors with weak references (fake parameters have one)."""
    from minillm.adapters import get_adapter

    if not layers_on_host:
        return model.to_empty(device=SIM_DEVICE)
    layers = get_adapter(model).layers()
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for name, module in model.named_children():
        if name != prefix.split(".")[0]:
            module.to_empty(device=SIM_DEVICE)
    inner = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    for name, module in inner.named_children():
        if module is not layers:
            module.to_empty(device=SIM_DEVICE)
    for module in [layers, *layers]:
        module.to = functools.partial(_replace_to, module)
    return model


@torch.no_grad()
def _replace_to(module: torch.nn.Module, device, *args, **kwargs) -> torch.nn.Module:
    """`module.to(device)` for fake tensors: new Parameter objects instead of swapped ones."""
    device = torch.device(device)
    for sub in module.modules():
        for key, p in sub._parameters.items():
            if p is not None and p.device != device:
                sub._parameters[key] = torch.nn.Parameter(p.to(device), requires_grad=p.requires_grad)
        for key, b in sub._buffers.items():
            if b is not None and b.device != device:
                sub._buffers[key] = b.to(device)
    return module


def run_step(model: torch.nn.Module, step: dict, ids: torch.Tensor, labels: bool = True) -> None:
    """One step on `model` with token ids `ids` [batch, seqlen]: 'dense' (forward, no grad, with labels unless
    labels=False), 'backprop' (forward with labels, then backward to a gradient for every parameter; the model
    output is dropped before the backward pass, so its KV cache is freed), or a method's scoring-and-pruning step
    through `minillm.prune` (layer-streamed to the simulated device when step['stream'])."""
    from minillm.prune import prune

    method = step["method"]
    if step.get("stream"):
        with _outside_parts_stay():
            return run_step(model, {k: v for k, v in step.items() if k != "stream"} | {"_stream": True}, ids)
    if method == "dense":
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids if labels else None)
        del out
    elif method == "backprop":
        model(input_ids=ids, labels=ids).loss.backward()
    else:
        prune(
            model,
            method,
            step.get("sparsity", 0.2),
            ids,
            progress=False,
            stream_device=SIM_DEVICE if step.get("_stream") else None,
            **step.get("options", {}),
        )


@contextlib.contextmanager
def _outside_parts_stay():
    """While layer streaming is simulated, `minillm.streaming` moves the embeddings, norm and LM head to the device
    as usual, but does not move them back to the (meta) host at the end: `p.data = ...` cannot change the device
    of a fake tensor. This happens after the step, so it does not change the peak."""
    from minillm import streaming

    original = streaming._move_outside

    def move(model, prefix, device):
        if torch.device(device).type == SIM_DEVICE:
            original(model, prefix, device)

    streaming._move_outside = move
    try:
        yield
    finally:
        streaming._move_outside = original


def simulate_step(
    model_name: str,
    step: dict,
    batch: int,
    seqlen: int,
    dtype: str = "float16",
    labels: bool = True,
    keep_replaced_weights: bool = False,
) -> dict:
    """Simulated peak memory of one step on a fresh fake model (the model's weights included).

    keep_replaced_weights: weights replaced by the pruning surgery stay counted (CPU runs whose weights are pages of
    a memory-mapped checkpoint; see `validate_cpu`). Returns a dict with peak_gib, weights_gib, increase_gib
    (peak minus memory at the start of the step) and how the simulation ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    stream = bool(step.get("stream"))
    model = meta_model(model_name, torch_dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fake_model(model, layers_on_host=stream)
        ids = torch.zeros(batch, seqlen, dtype=torch.long, device=SIM_DEVICE)
        held = [p for p in model.parameters()] if keep_replaced_weights else []
        standins = StandIns()
        tracker = StorageTracker()
        tracker.add_module(model)
        tracker.add(ids)
        weights = tracker.current_bytes
        with standins, tracker:
            run_step(model, step, ids, labels)
        del held
    return {
        "model": model_name,
        "label": step.get("label", step["method"]),
        "method": step["method"],
        "options": step.get("options", {}),
        "batch": batch,
        "seqlen": seqlen,
        "dtype": dtype,
        "simulated": True,
        "peak_gib": round(tracker.peak_bytes / GIB, 4),
        "peak_bytes": tracker.peak_bytes,
        "weights_bytes": weights,
        "weights_gib": round(weights / GIB, 4),
        "increase_gib": round((tracker.peak_bytes - weights) / GIB, 4),
        "streamed": stream,
        "attention_kernels": sorted(tracker.attention_kernels),
        "materialised_attention": tracker.materialised_attention,
        "stand_in_values": standins.count,
        "sim_time_s": round(time.perf_counter() - t0, 2),
    }


def simulate_table(
    models=MODELS, shapes=SHAPES, steps=STEPS, dtype: str = "float16", streamed: bool = True
) -> list[dict]:
    """Every step for every model and shape, plus the streamed steps on the 70B shape; a step that fails under
    fake tensors is a row with `error` (the reason) instead of `peak_gib`."""
    jobs = [(m, s, b, t) for m in models for b, t in shapes for s in steps]
    if streamed:
        jobs += [(STREAMED_MODEL, s, b, t) for b, t in shapes for s in STREAMED_STEPS]
    rows = []
    for m, s, b, t in jobs:
        try:
            rows.append(simulate_step(m, s, b, t, dtype))
        except Exception as e:  # noqa: BLE001 - a step that cannot be simulated is reported, not fatal
            rows.append(
                {"model": m, "label": s.get("label", s["method"]), "method": s["method"], "batch": b,
                 "seqlen": t, "dtype": dtype, "simulated": True, "error": f"{type(e).__name__}: {e}"[:300]}
            )
    return rows


@contextlib.contextmanager
def adapters_stay():
    """peft moves each new LoRA layer to its base layer's device with `Module.to`, which cannot swap fake parameters
    (see simulate.fake_model); while counting, `Module.to(device)` puts new Parameter objects in place instead
    (`simulate._replace_to`), and a dtype-only `.to` leaves the module as it is (peft keeps adapters in fp32)."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)):
            return _replace_to(self, target)
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


def simulate_recovery_step(
    model_name: str,
    dtype: str = "bfloat16",
    batch: int = 8,
    seqlen: int = 512,
    rank: int = 8,
    kl: bool = True,
    sparsity: float = 0.0,
    gradient_checkpointing: bool = False,
    extra_students: int = 0,
) -> dict:
    """Simulated peak memory of LoRA recovery as `experiments._recover_one` runs it: on the device the student (the
    model pruned at `sparsity` by random scores, which give the same kept widths as any method with per-layer uniform
    allocation; 0 = the dense model, an upper bound) and, for kl, the unpruned teacher, both in `dtype`; then two
    optimiser steps of `minillm.recover.recover` (bf16 autocast, AdamW state of the LoRA parameters, the teacher's
    logits, the KL term). extra_students: more copies of the student's weights kept on the device (an earlier version
    of the recovery code kept the pruned base and the previous merged model beside them: 2). Returns peak_gib,
    weights_gib (everything on the device before the step) and how it ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minillm.prune import prune
    from minillm.recover import recover

    t0 = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    student = meta_model(model_name, torch_dtype)
    teacher = meta_model(model_name, torch_dtype) if kl else None
    with FakeTensorMode(allow_non_fake_inputs=True):
        student = fake_model(student)
        teacher = fake_model(teacher) if kl else None
        standins = StandIns()
        if sparsity > 0:
            with standins:
                prune(student, "random", sparsity, None, progress=False)
        ids = torch.zeros(2 * batch, seqlen, dtype=torch.long, device=SIM_DEVICE)
        tracker = StorageTracker()
        tracker.add_module(student)
        extra = [[torch.empty_like(p) for p in student.parameters()] for _ in range(extra_students)]
        for copy in extra:
            for t in copy:
                tracker.add(t)
        if teacher is not None:
            tracker.add_module(teacher)
        weights = tracker.current_bytes
        with standins, tracker, adapters_stay():
            try:
                recover(student, ids, rank=rank, steps=2, batch_size=batch, teacher=teacher,
                        kl_weight=1.0 if kl else 0.0, gradient_checkpointing=gradient_checkpointing, bf16=True,
                        progress=False)
            except FloatingPointError:
                pass  # the divergence check after the last step reads stand-in booleans; the steps ran
    return {
        "model": model_name,
        "step": "lora recovery" + (" + KL teacher" if kl else ""),
        "dtype": dtype,
        "batch": batch,
        "seqlen": seqlen,
        "rank": rank,
        "sparsity": sparsity,
        "gradient_checkpointing": gradient_checkpointing,
        "extra_students": extra_students,
        "simulated": True,
        "peak_gib": round(tracker.peak_bytes / GIB, 2),
        "peak_bytes": tracker.peak_bytes,
        "weights_gib": round(weights / GIB, 2),
        "weights_bytes": weights,
        "stand_in_values": standins.count,
        "sim_time_s": round(time.perf_counter() - t0, 1),
    }


# --- validation and the markdown table ------------------------------------------------------------------------------

CPU_MODEL_SHAPE = {"smollm2-135m": "smollm2-135m-shape"}  # the measured model and the shape that simulates it
CPU_LABELS = ("dense", "taylor", "fms-weights", "fms-gates")


def validate_h100(reference: dict = REFERENCE_H100) -> list[dict]:
    """Each H100 reference figure (docs/measurement.md) beside its simulated prediction (fp16, the same code for every
    shape: no per-shape constants). Rows: model, batch, seqlen, step, reference_gib, simulated_gib, error_pct."""
    rows = []
    for (model, batch, seqlen, method), ref in reference.items():
        sim = simulate_step(model, {"method": method}, batch, seqlen, "float16")
        rows.append(
            {
                "model": model,
                "batch": batch,
                "seqlen": seqlen,
                "step": method,
                "reference_gib": ref,
                "simulated_gib": sim["peak_gib"],
                "error_pct": round(100 * (sim["peak_gib"] / ref - 1), 2),
            }
        )
    return rows


def validate_cpu(records_dir: Path, labels=CPU_LABELS) -> list[dict]:
    """The measured CPU peak-RSS increase of committed memory records (SmolLM2-135M, fp32, each step in a fresh
    process) in `records_dir` (the harness keeps them in results/cpu-full/memory) beside the simulated increase of the
    same step.

    Simulated as measured: the dense step is the forward pass without labels (`measure.memory_step`), and the
    weights replaced by the pruning surgery stay counted, because on CPU they are pages of the memory-mapped
    safetensors cache that stay resident after the new, smaller weights are allocated."""
    rows = []
    for path in sorted(Path(records_dir).glob("*.json")):
        rec = json.loads(path.read_text())
        cfg, metrics = rec["config"], rec["metrics"]
        shape = CPU_MODEL_SHAPE.get(cfg["model"])
        if shape is None:
            continue
        measured = {"dense": metrics["dense_forward"], **{m["label"]: m for m in metrics["methods"]}}
        steps = {"dense": {"method": "dense"}, **{m["label"]: m for m in cfg["methods"]}}
        for label in labels:
            if label not in measured or "increase_gib" not in measured[label]:
                continue
            sim = simulate_step(
                shape, steps[label], cfg["batch"], cfg["seqlen"], cfg["dtype"], labels=False, keep_replaced_weights=True
            )
            got = measured[label]["increase_gib"]
            rows.append(
                {
                    "model": cfg["model"],
                    "batch": cfg["batch"],
                    "seqlen": cfg["seqlen"],
                    "step": label,
                    "measured_increase_gib": got,
                    "simulated_increase_gib": sim["increase_gib"],
                    "error_pct": round(100 * (sim["increase_gib"] / got - 1), 1),
                    "record": path.name,
                }
            )
    return rows


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(key, "")) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def validation_markdown(h100: list[dict], cpu: list[dict], table: list[dict] | None = None) -> str:
    """The validation tables (and optionally the simulated table of every step) as markdown."""
    parts = [
        "# Simulated peak memory (minillm.bench.simulate), validated",
        "",
        "Regenerate: `python -m minillm bench memory --simulate --validate` (simulates everything, about 10"
        " CPU-minutes, and writes this file and `memory_sim.json`); `minillm.bench.simulate.render_validation()` re-renders"
        " it from the JSON. All simulated values are"
        " labelled simulated: FakeTensorMode with a live-storage tracker, no GPU (see `minillm/bench/simulate.py`).",
        "",
        "## Against the H100 reference figures (docs/measurement.md; fp16, random weights, default sdpa attention)",
        "",
        "`dense` = forward with labels, no grad; `backprop` = forward with labels + backward, gradients for every"
        " parameter. Peak allocated GiB. Tolerance: 2%.",
        "",
        _table(
            h100,
            [("model", "model"), ("batch", "batch"), ("seqlen", "seqlen"), ("step", "step"),
             ("reference_gib", "H100 measured (GiB)"), ("simulated_gib", "simulated (GiB)"), ("error_pct", "error %")],
        ),
        "",
        "## Against measured CPU peak-RSS increases (SmolLM2-135M, fp32, results/cpu-full/memory)",
        "",
        "Increase over the memory at the start of the step (weights included there). Tolerance: 15%.",
        "",
        _table(
            cpu,
            [("model", "model"), ("batch", "batch"), ("seqlen", "seqlen"), ("step", "step"),
             ("measured_increase_gib", "CPU measured (GiB)"), ("simulated_increase_gib", "simulated (GiB)"),
             ("error_pct", "error %")],
        ),
    ]
    parts += [
        "",
        "Notes. The H100 predictions are 0.03-0.07 GiB low at every shape: allocations a kernel makes and frees inside"
        " one call (cuBLAS workspaces, flash-attention backward accumulators) are invisible to the tracker. The"
        " backprop step drops the model output before `backward()`, as `model(...).loss.backward()` does; keeping it"
        " would also keep the KV cache that the forward pass fills (+0.6 GiB at 10 x 128, LLaMA-7B). On CPU the"
        " pruning steps' increase is the surgery: the new, smaller weights are allocated while the replaced ones stay"
        " resident (they are pages of the memory-mapped safetensors cache), which the simulation models by keeping"
        " them counted; the dense CPU step is the forward without labels, as `measure.memory_step` runs it.",
    ]
    if table:
        parts += [
            "",
            "BLOOM has only transformers' eager attention (`baddbmm` + fp32 softmax per layer, the same on a GPU): its"
            " [B, H, T, T] attention matrices are materialised (column `materialised_attention` of the JSON), hence"
            " 158 GiB for backprop at 4 x 2048. Every other model runs SDPA with no attention matrix. Method steps:"
            " queries=1 for fms (the peak of one query is the peak of n), Bonsai one round of 2 masks at 5%. The"
            " 70B shape is scored layer-streamed (weights in host memory, one decoder layer on the GPU).",
            "",
            "## Simulated peak of every step (fp16; 48 GB and 80 GB cards hold 44.7 and 74.5 GiB)",
            "",
            _table(
                [dict(r, peak_gib=r.get("peak_gib", r.get("error", ""))) for r in table],
                [("model", "model"), ("batch", "batch"), ("seqlen", "seqlen"), ("label", "step"),
                 ("peak_gib", "simulated peak (GiB)"), ("streamed", "layer-streamed")],
            ),
        ]
    return "\n".join(parts) + "\n"


def write_validation(path: Path | str, cpu_records: Path | str, table: bool = True) -> dict:
    """Run both validations (the CPU one against the memory records in `cpu_records`; and the full simulated table
    unless table=False; about 10 CPU-minutes in all), write a JSON file with the rows and the markdown rendered from
    it (`render_validation`) at `path`. Returns the rows."""
    path = Path(path)
    out = {"h100": validate_h100(), "cpu": validate_cpu(cpu_records), "table": simulate_table() if table else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    render_validation(path)
    return out


def render_validation(path: Path | str) -> Path:
    """Re-render the markdown from the JSON beside it (no simulation)."""
    path = Path(path)
    rows = json.loads(path.with_suffix(".json").read_text())
    path.write_text(validation_markdown(rows["h100"], rows["cpu"], rows["table"]))
    return path


# --- for notebook 02 ------------------------------------------------------------------------------------------------


def load_validation(path: Path | str) -> dict:
    """The committed output of `write_validation` (keys h100, cpu, table)."""
    return json.loads(Path(path).read_text())


def plot_simulated(table: list[dict], h100: list[dict], measured=None):
    """Simulated peak of every step per model (bars per shape), the 48 GB and 80 GB cards as lines, the H100
    reference figures as black markers and, when given, measured GPU records (a report.memory_frame) as red
    crosses. Everything drawn as bars is labelled simulated."""
    import matplotlib.pyplot as plt

    rows = [r for r in table if "peak_gib" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        labels = list(dict.fromkeys(r["label"] for r in mine))
        shapes = list(dict.fromkeys((r["batch"], r["seqlen"]) for r in mine))
        width = 0.8 / len(shapes)
        for j, (b, t) in enumerate(shapes):
            xs, ys = [], []
            for i, label in enumerate(labels):
                hit = [r for r in mine if r["label"] == label and (r["batch"], r["seqlen"]) == (b, t)]
                if hit:
                    xs.append(i + (j - (len(shapes) - 1) / 2) * width)
                    ys.append(hit[0]["peak_gib"])
            ax.bar(xs, ys, width, label=f"{b}x{t} simulated", color=f"C{j}")
            for ref in h100:
                if ref["model"] == model and (ref["batch"], ref["seqlen"]) == (b, t) and ref["step"] in labels:
                    x = labels.index(ref["step"]) + (j - (len(shapes) - 1) / 2) * width
                    ax.plot([x], [ref["reference_gib"]], "k_", markersize=12, mew=2)
            if measured is not None and len(measured):
                shape = f"{b}x{t}"
                got = measured[(measured["model"] == model) & (measured["shape"] == shape)]
                for _, row in got.iterrows():
                    label = "dense" if row["method"] == "dense forward" else row["method"]
                    if label in labels and row.get("peak_gib") == row.get("peak_gib"):
                        x = labels.index(label) + (j - (len(shapes) - 1) / 2) * width
                        ax.plot([x], [row["peak_gib"]], "rx")
        for name, gib in GPU_LINES_GIB.items():
            ax.axhline(gib, color="0.4", ls="--", lw=0.8)
            ax.annotate(name, (len(labels) - 0.5, gib), ha="right", va="bottom", fontsize=7, color="0.3")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{model} (simulated)", fontsize=9)
    axes[0][0].set_ylabel("peak allocated GiB (simulated)")
    fig.suptitle("simulated peak memory per step; black ticks: H100 measured; red x: gpu records", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
