"""Virtual removal (masks on head outputs and channel activations) and exact physical removal of units.

Surgery knows no method and no plan: indices passed to `prune_layer` are *current* indices (into the layer as it is
now, `CurrentKeep`). Which *original* units survive is bookkeeping of `minillm.state`, which calls in here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, AttentionShape


class GQAConstraintError(ValueError):
    """Kept query heads that the stock grouped-query attention cannot represent."""


class UnitIndexError(ValueError):
    """Kept-unit indices that are repeated or out of range for the layer."""


@dataclass
class CurrentKeep:
    """Units to keep in one layer, as ascending *current* indices (into the layer as it is now). The plan's
    `OriginalKeep` holds the same kinds of units as indices into the unpruned layer."""

    kept_q: list[int]
    kept_kv: list[int]
    kept_channels: list[int]


def prunable_params(adapter: Adapter) -> int:
    return sum(adapter.layer_params(layer) for layer in adapter.layers())


# --- physical removal -----------------------------------------------------------------------------------------


def _block_index(n_units: int, size: int, kept: Sequence[int], device: torch.device) -> torch.Tensor:
    block = size // n_units
    kept_t = torch.as_tensor(list(kept), dtype=torch.long, device=device)
    return (kept_t[:, None] * block + torch.arange(block, device=device)[None, :]).reshape(-1)


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only `index` along the weight's `dim` (0 = outputs, 1 = inputs), in place, preserving dtype/device."""
    weight = linear.weight
    index = index.to(weight.device)
    linear.weight = nn.Parameter(weight.data.index_select(dim, index).contiguous(), requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.data.index_select(0, index).contiguous(), requires_grad=linear.bias.requires_grad
            )
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


class EmptyAttention(nn.Module):
    """Stands in for an attention block whose heads were all removed: it adds nothing but the output projection's
    bias (if any), which is exactly what the masked block computes. It keeps the output projection under its
    original name so checkpoints line up, and appends zero-head entries to a KV cache so sequence lengths stay
    consistent during generation."""

    minillm_empty = True

    def __init__(
        self, out_name: str, out_proj: nn.Linear, layer_idx: int, head_dim: int, cache_kwarg: str, adds_residual: bool
    ):
        super().__init__()
        self.out_name = out_name
        self.add_module(out_name, out_proj)
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.cache_kwarg = cache_kwarg
        self.adds_residual = adds_residual

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get(self.cache_kwarg)
        if cache is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        out = getattr(self, self.out_name)(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))
        if self.adds_residual:
            out = out + (args[0] if args else kwargs["residual"])
        return out, None


def _set_attention_module(adapter: Adapter, layer: nn.Module, module: nn.Module) -> None:
    for name, child in layer.named_children():
        if child is adapter.attention(layer):
            setattr(layer, name, module)
            return
    raise RuntimeError("attention module not found among the layer's children")


def check_gqa(shape: AttentionShape, kept_q: Sequence[int], kept_kv: Sequence[int]) -> None:
    """Stock GQA needs every kept KV head to serve the same number of kept query heads, all of its own group."""
    if not kept_q and not kept_kv:
        return
    g = shape.group_size
    per_group = {kv: 0 for kv in kept_kv}
    for h in kept_q:
        if h // g not in per_group:
            raise GQAConstraintError(f"query head {h} is kept but its KV head {h // g} is removed")
        per_group[h // g] += 1
    counts = set(per_group.values())
    if len(counts) != 1 or 0 in counts:
        raise GQAConstraintError(
            f"grouped-query attention needs the same number of kept query heads in every kept KV group; got "
            f"{dict(per_group)} (use KV-group units, or balanced query-head pruning)"
        )


def prune_layer(
    adapter: Adapter,
    layer_idx: int,
    kept_q: Sequence[int] | None = None,
    kept_kv: Sequence[int] | None = None,
    kept_channels: Sequence[int] | None = None,
) -> None:
    """Physically remove units of one layer. Arguments are ascending *current* indices of the units to keep; None
    keeps that kind untouched. For MHA families `kept_kv` defaults to `kept_q`. (To keep a plan's record of the
    surviving original units, remove through `minillm.state.PruningState.remove` instead.)"""
    layer = adapter.layers()[layer_idx]
    shape = adapter.attention_shape(layer)
    if kept_q is not None:
        if kept_kv is None:
            if shape.n_kv_heads != shape.n_query_heads:
                raise GQAConstraintError("kept_kv must be given for grouped-query attention")
            kept_kv = kept_q
        kept_q, kept_kv = sorted(kept_q), sorted(kept_kv)
        check_range(kept_q, shape.n_query_heads, "query head", layer_idx)
        check_range(kept_kv, shape.n_kv_heads, "KV head", layer_idx)
        check_gqa(shape, kept_q, kept_kv)
        _prune_attention(adapter, layer, layer_idx, shape, kept_q, kept_kv)
        if kept_q:
            adapter.keep_heads(layer, kept_q)
    if kept_channels is not None:
        kept_channels = sorted(kept_channels)
        n = adapter.n_channels(layer)
        check_range(kept_channels, n, "channel", layer_idx)
        # nothing to slice when every channel stays (also an MLP already emptied by an earlier round: 0 of 0)
        for m in adapter.mlp_members(layer) if len(kept_channels) < n else ():
            slice_linear(
                m.linear, _block_index(n, m.linear.weight.shape[m.dim], kept_channels, m.linear.weight.device), m.dim
            )


def check_range(kept: Sequence[int], n: int, what: str, layer_idx: int) -> None:
    if len(set(kept)) != len(kept) or any(not 0 <= i < n for i in kept):
        raise UnitIndexError(
            f"layer {layer_idx}: kept {what} indices must be distinct and in [0, {n}), got {list(kept)}"
        )


def _prune_attention(
    adapter: Adapter, layer: nn.Module, layer_idx: int, shape: AttentionShape, kept_q: list[int], kept_kv: list[int]
) -> None:
    if len(kept_q) == shape.n_query_heads and len(kept_kv) == shape.n_kv_heads:
        return
    members = adapter.attention_members(layer)
    for m in members:
        n_units = shape.n_query_heads if m.unit == "query" else shape.n_kv_heads
        kept = kept_q if m.unit == "query" else kept_kv
        size = m.linear.weight.shape[m.dim]
        slice_linear(m.linear, _block_index(n_units, size, kept, m.linear.weight.device), m.dim)
    if not kept_q:
        out = members[-1]
        _set_attention_module(
            adapter,
            layer,
            EmptyAttention(
                out.name, out.linear, layer_idx, shape.head_dim, adapter.cache_kwarg, adapter.attention_adds_residual
            ),
        )
        return
    adapter.set_attention_shape(layer, AttentionShape(len(kept_q), len(kept_kv), shape.head_dim))


# --- virtual removal ------------------------------------------------------------------------------------------


class VirtualMasks:
    """Multiplies head outputs (the input of o_proj / out_proj / dense, per query head) and MLP channel activations
    (the input of down_proj / fc2 / dense_4h_to_h) by masks, through forward pre-hooks; no weight is copied.

    Use as a context manager. `heads[i]` ([n_query_heads] of layer i) and `channels[i]` ([n_channels]) may be set
    or changed in place while active; a missing entry means "keep all"."""

    def __init__(
        self,
        adapter: Adapter,
        heads: dict[int, torch.Tensor] | None = None,
        channels: dict[int, torch.Tensor] | None = None,
    ):
        self.adapter = adapter
        self.heads = dict(heads or {})
        self.channels = dict(channels or {})
        self._handles: list = []

    def _hook(self, table: dict, i: int, block: int):
        def hook(module, args):
            mask = table.get(i)
            if mask is None:
                return None
            x = args[0]
            m = mask.to(device=x.device, dtype=x.dtype)
            if block > 1:
                m = m.repeat_interleave(block)
            return (x * m,) + tuple(args[1:])

        return hook

    def __enter__(self) -> VirtualMasks:
        for i, layer in enumerate(self.adapter.layers()):
            shape = self.adapter.attention_shape(layer)
            if shape.n_query_heads:
                out = self.adapter.attn_out_proj(layer)
                self._handles.append(out.register_forward_pre_hook(self._hook(self.heads, i, shape.head_dim)))
            down = self.adapter.mlp_out_proj(layer)
            self._handles.append(down.register_forward_pre_hook(self._hook(self.channels, i, 1)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
