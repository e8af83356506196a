"""Forward-only gradient estimation (SPSA, as in MeZO) with seed replay.

For query k a seed s_k is drawn; the noise z_k ~ N(0, I) is generated block by block (one block per weight
tensor, or per layer's gates) from (s_k, block index) with a dedicated torch.Generator, never the global RNG. The
loss is evaluated at x + eps z_k and x - eps z_k, and only the pair (s_k, pi_k) with
pi_k = (L+ - L-) / (2 eps) is kept. The gradient estimate of block b, g_b = (1/n) sum_k pi_k z_k[b], is rebuilt on
demand by regenerating z_k[b], one block at a time: no tensor of the model's size is ever stored.

Perturbation never writes to the model's weight storage: during the forward pass of each perturbed linear a
temporary perturbed copy of that one weight is swapped in and the original storage is swapped back afterwards, so
weights are bit-identical after scoring in any dtype and the extra memory is one weight matrix at a time.
(`torch.func.functional_call` would give the same losses, but it substitutes parameters for the whole forward
call, so every perturbed weight would exist at once: a second copy of all linear weights, which forward-only
scoring exists to avoid.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..offload import execution_device
from ..surgery import VirtualMasks

_BLOCK_STRIDE = 1_000_003
_SEED_MOD = 2**62


def noise(seed: int, block: int, shape: torch.Size | tuple, device: torch.device) -> torch.Tensor:
    """z ~ N(0, I) in fp32 for one block, reproducible from (seed, block) on a given device type."""
    gen = torch.Generator(device=device).manual_seed((seed + block * _BLOCK_STRIDE) % _SEED_MOD)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


class PerturbationSpace(ABC):
    """A set of blocks (tensors) that SPSA perturbs together."""

    @abstractmethod
    def shapes(self) -> list[tuple[torch.Size, torch.device]]:
        """Shape and device of every block."""

    @abstractmethod
    @contextmanager
    def perturbed(self, seed: int, scale: float) -> Iterator[None]:
        """Inside the block the model computes with x + scale * z(seed)."""

    @property
    def dim(self) -> int:
        return sum(int(torch.Size(s).numel()) for s, _ in self.shapes())

    def noise(self, seed: int, block: int) -> torch.Tensor:
        shape, device = self.shapes()[block]
        return noise(seed, block, shape, device)


class WeightSpace(PerturbationSpace):
    """All weights of the given linear layers (the paper's perturbation of the whole weight vector)."""

    def __init__(self, linears: list[nn.Linear], noise_device: torch.device | str | None = None):
        self.linears = [lin for lin in linears if lin.weight.numel()]
        # noise is always drawn on one device, so it regenerates identically wherever the weights live (layer
        # streaming and multi-device models move them between perturbation and scoring)
        self.noise_device = torch.device(noise_device) if noise_device is not None else None

    def _device(self, lin: nn.Linear) -> torch.device:
        return self.noise_device or lin.weight.device

    def shapes(self):
        return [(lin.weight.shape, self._device(lin)) for lin in self.linears]

    @contextmanager
    def perturbed(self, seed: int, scale: float):
        handles = []
        for b, lin in enumerate(self.linears):

            def pre(module, args, b=b):
                original = module.weight.data
                module._minillm_original = original
                z = noise(seed, b, original.shape, self._device(module)).to(original.device)
                module.weight.data = z.mul_(scale).add_(original).to(original.dtype)  # never in place on `original`

            def post(module, args, output):
                module.weight.data = module._minillm_original
                del module._minillm_original

            # prepended: an enclosing precision.fp32_forward restores its own swap after this one
            handles += [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post, prepend=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class GateSpace(PerturbationSpace):
    """One scalar gate per attention head output and per MLP channel, all equal to 1 in the model (so the gradient
    of the loss with respect to a gate is the first-order effect of scaling that unit's feature map)."""

    def __init__(self, adapter: Adapter, kinds: tuple[str, ...] = ("heads", "channels")):
        self.adapter = adapter
        self.blocks: list[tuple[int, str, int]] = []  # (layer, "heads" | "channels", size)
        for i, layer in enumerate(adapter.layers()):
            n_q = adapter.attention_shape(layer).n_query_heads
            if n_q and "heads" in kinds:
                self.blocks.append((i, "heads", n_q))
            if adapter.n_channels(layer) and "channels" in kinds:
                self.blocks.append((i, "channels", adapter.n_channels(layer)))
        self.device = execution_device(adapter.model)

    def shapes(self):
        return [(torch.Size([n]), self.device) for _, _, n in self.blocks]

    def block_index(self, layer: int, kind: str) -> int | None:
        for b, (i, k, _) in enumerate(self.blocks):
            if i == layer and k == kind:
                return b
        return None

    @contextmanager
    def perturbed(self, seed: int, scale: float):
        heads, channels = {}, {}
        for b, (i, kind, n) in enumerate(self.blocks):
            gates = 1.0 + scale * noise(seed, b, (n,), self.device)
            (heads if kind == "heads" else channels)[i] = gates
        with VirtualMasks(self.adapter, heads, channels):
            yield


@dataclass
class SPSAEstimate:
    """The whole state of an estimate: the seeds and projected gradients of its queries."""

    seeds: list[int]
    projected: list[float]
    eps: float

    @property
    def n(self) -> int:
        return len(self.seeds)

    def gradient(self, space: PerturbationSpace, block: int) -> torch.Tensor:
        """(1/n) sum_k pi_k z_k[block], regenerated from the seeds (fp32)."""
        g = None
        for seed, pi in zip(self.seeds, self.projected):
            z = space.noise(seed, block)
            g = z.mul_(pi) if g is None else g.add_(z, alpha=pi)
        return g / self.n


def estimate(
    space: PerturbationSpace,
    loss_fn: Callable[[], float],
    n: int,
    eps: float,
    seed: int,
    progress: bool = True,
    done: list[float] | None = None,
    checkpoint: Callable[[list[float]], None] | None = None,
    every: int = 32,
) -> SPSAEstimate:
    """Run n two-sided SPSA queries. `loss_fn` evaluates the calibration loss (fp32) with no gradient.

    Resuming (the diagnostics' 1,024-query estimates outlast a session): `done` holds the projected gradients of
    the first len(done) queries of this same (seed, eps) run, which are not repeated; `checkpoint(projected)` is
    called with the list so far every `every` queries, so that a caller can store it."""
    if n < 1:
        raise ValueError(f"the number of SPSA queries must be >= 1, got {n}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, _SEED_MOD, (n,), generator=gen, dtype=torch.long).tolist()
    projected = [float(v) for v in (done or [])][:n]
    bar = tqdm(seeds, desc=f"SPSA queries (d={space.dim:,})", disable=not progress, leave=False, initial=len(projected))
    with torch.no_grad():
        for k, s in enumerate(seeds[len(projected) :], start=len(projected) + 1):
            with space.perturbed(s, eps):
                plus = float(loss_fn())
            with space.perturbed(s, -eps):
                minus = float(loss_fn())
            projected.append((plus - minus) / (2 * eps))
            bar.update(1)
            if checkpoint is not None and k % every == 0 and k < n:
                checkpoint(list(projected))
    bar.close()
    return SPSAEstimate(seeds, projected, eps)
