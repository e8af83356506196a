"""Layer by layer over calibration batches: one capture pass records what enters every decoder layer, then each
layer is replayed on its own with hooks on chosen linears, and their inputs are summed into float64 moments.

Shared by the least-squares refit (`minillm.reconstruct`) and the structured-OBS scores (`minillm.scores.obs`), so
that both hold the moments of one layer at a time: the memory beside the forward is one layer's Gram matrices, not
the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def as_float64(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A float64 copy of `t` on `device` (default: its own), allocated and then filled: the memory simulator
    (minillm.bench.simulate) takes a cast to float64 for the pooling of unit scores and makes it real, whereas this
    buffer is device memory that it must count."""
    out = torch.empty(t.shape, dtype=torch.float64, device=t.device if device is None else device)
    out.copy_(t.detach())
    return out


def shifted_cholesky(a: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a + lam I, its Cholesky factor, or None where it is not positive definite) for symmetric PSD a [k, k]. The
    shift is added to `a`'s diagonal in place, with no k x k identity beside it (k can be d_ff: 1.6 GiB in float64
    at 8B): pass a copy where the original is still needed, and drop the shifted matrix once the factor exists."""
    a.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(a)
    return a, (chol if int(info) == 0 else None)


def _gram(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A zero float64 moment matrix [rows, cols] (one place that allocates them, so tests can count the live ones)."""
    return torch.zeros(rows, cols, dtype=torch.float64, device=device)


@dataclass
class Moments:
    """Token sums of one projection's input, float64: x [d] is the input the refit projection sees, t [d] the
    input whose unpruned output is the target (None fields: t = x). n: tokens summed."""

    sum_x: torch.Tensor  # [d]
    xx: torch.Tensor  # [d, d], sum of x x^T
    sum_t: torch.Tensor | None = None  # [d]
    tx: torch.Tensor | None = None  # [d, d], sum of t x^T
    n: int = 0

    @classmethod
    def zeros(cls, d: int, device: torch.device, cross: bool = False) -> Moments:
        # MPS has no float64: the moments then live in CPU memory
        device = torch.device("cpu") if device.type == "mps" else device
        vec = torch.zeros(d, dtype=torch.float64, device=device)
        if not cross:
            return cls(vec, _gram(d, d, device))
        return cls(vec, _gram(d, d, device), vec.clone(), _gram(d, d, device))

    def add(self, x: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """Add the tokens of one batch: x (and t, same shape, in cross mode) [..., d], any float dtype."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        dev = self.xx.device
        # add_ promotes the float32 product into the float64 sum element by element: no float64 copy of it exists
        self.xx.add_((x.T @ x).to(dev))
        self.sum_x += x.sum(0).to(dev, torch.float64)
        if self.tx is not None:
            t = t.detach().reshape(-1, t.shape[-1]).float()
            self.tx.add_((t.T @ x).to(dev))
            self.sum_t += t.sum(0).to(dev, torch.float64)
        self.n += x.shape[0]

    def to(self, device: torch.device | str) -> Moments:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Moments(move(self.sum_x), move(self.xx), move(self.sum_t), move(self.tx), self.n)

    def second_moments(self, centered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S_xx [d, d], S_tx [d, d], mu_x [d], mu_t [d]) per token: covariances when `centered`, else raw
        second moments."""
        n = max(self.n, 1)
        mu_x = self.sum_x / n
        mu_t = mu_x if self.sum_t is None else self.sum_t / n
        # in place on the fresh quotients, and S_tx is S_xx itself without a cross moment: at d_ff = 14336 every
        # d x d float64 copy is 1.6 GiB
        sxx = self.xx / n
        if centered:
            sxx.sub_(torch.outer(mu_x, mu_x))
        if self.tx is None:
            return sxx, sxx, mu_x, mu_t
        stx = self.tx / n
        if centered:
            stx.sub_(torch.outer(mu_t, mu_x))
        return sxx, stx, mu_x, mu_t


@dataclass
class Call:
    """The arguments one decoder layer was called with on one batch, other than the hidden states."""

    args: tuple
    kwargs: dict


@torch.no_grad()
def capture_layer_calls(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """One pass of the model per batch in which the decoder layers compute nothing: each layer's forward is replaced,
    for the pass, by a stand-in that records the arguments it is called with and hands its input on unchanged (in
    the structure the real layer returns, learnt from one real call of layer 0). The arguments a layer receives
    besides the hidden states (position embeddings, attention masks: Gemma 3's differ between its sliding-window
    and global layers) are computed before the layer loop and do not depend on the hidden states, so they are the
    real ones; the hidden states entering later layers are computed by the replay (`run_layer`). This costs the
    embedding and one layer, not a forward of the whole model.

    Returns the hidden states entering layer 0, one [B, T, hidden] per batch, and per layer the arguments it was
    called with on each batch (references, not copies)."""
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in layers]
    shape: dict[str, int | None] = {}  # the real output's structure: tuple length, None for a tensor

    def stand_in_for(i: int, real):
        def stand_in(*args, **kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(h)
            calls[i].append(Call(tuple(args[1:]), kwargs))
            if "length" not in shape:
                out = real(h, *args[1:], **kwargs)
                shape["length"] = len(out) if isinstance(out, tuple) else None
                del out
            return h if shape["length"] is None else (h,) + (None,) * (shape["length"] - 1)

        return stand_in

    saved = [layer.__dict__.get("forward") for layer in layers]  # an instance forward (accelerate's hooks) or None
    for i, layer in enumerate(layers):
        layer.forward = stand_in_for(i, layer.forward)
    try:
        for batch in batches:
            model.base_model(input_ids=batch, use_cache=False)
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return hidden, calls


def run_layer(
    layer: nn.Module, hidden: torch.Tensor, call: Call, watch: Sequence[nn.Linear] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The layer's output hidden states [B, T, hidden] on one batch and the inputs [B, T, d_in] of `watch`."""
    seen: dict[int, torch.Tensor] = {}

    def recorder(k: int):
        def hook(module, args):
            seen[k] = args[0]

        return hook

    handles = [lin.register_forward_pre_hook(recorder(k)) for k, lin in enumerate(watch)]
    try:
        out = layer(hidden, *call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return (out[0] if isinstance(out, tuple) else out), [seen[k] for k in range(len(watch))]


