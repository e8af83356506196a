"""BLOOM: fused query_key_value laid out per head as [q, k, v] blocks, dense output, ALiBi position biases.

The model builds one ALiBi tensor for the original number of heads and hands it to every block. A pruned layer
keeps fewer heads, so a forward pre-hook on its attention selects the rows of its surviving heads: each surviving
head keeps the slope it was trained with.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, AttentionShape, Member


def _select_alibi_heads(module: nn.Module, args: tuple, kwargs: dict):
    kept = module.minillm_alibi_heads
    alibi = kwargs.get("alibi")
    if alibi is None:
        return None
    n_orig = module.minillm_original_heads
    batch = alibi.shape[0] // n_orig
    alibi = alibi.view(batch, n_orig, *alibi.shape[1:])
    kwargs["alibi"] = alibi.index_select(1, kept.to(alibi.device)).reshape(batch * kept.numel(), *alibi.shape[2:])
    return args, kwargs


class BloomAdapter(Adapter):
    family = "bloom"
    model_types = ("bloom",)
    cache_kwarg = "layer_past"
    attention_adds_residual = True

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attention

    def _attention_members(self, layer: nn.Module) -> list[Member]:
        a = layer.self_attention
        return [
            Member("query_key_value", a.query_key_value, 0, "query"),
            Member("dense", a.dense, 1, "query"),
        ]

    def mlp_members(self, layer: nn.Module) -> list[Member]:
        m = layer.mlp
        return [
            Member("dense_h_to_4h", m.dense_h_to_4h, 0, "channel"),
            Member("dense_4h_to_h", m.dense_4h_to_h, 1, "channel"),
        ]

    def set_attention_shape(self, layer: nn.Module, shape: AttentionShape) -> None:
        a = layer.self_attention
        a.num_heads = shape.n_query_heads

    def keep_heads(self, layer: nn.Module, kept: list[int]) -> None:
        """Make the layer's attention read the ALiBi slopes of its surviving original heads: the attention module
        remembers which original heads it holds, and `kept` (current indices) selects among them."""
        a = self.attention(layer)
        current = torch.tensor(kept, dtype=torch.long)
        if "minillm_alibi_heads" in a._buffers:
            a.minillm_alibi_heads = a.minillm_alibi_heads[current.to(a.minillm_alibi_heads.device)]
            return
        a.register_buffer("minillm_alibi_heads", current, persistent=False)
        a.minillm_original_heads = self.original_attention.n_query_heads
        a.register_forward_pre_hook(_select_alibi_heads, with_kwargs=True)

    @property
    def original_attention(self) -> AttentionShape:
        c = self.config
        return AttentionShape(c.n_head, c.n_head, c.hidden_size // c.n_head)

    @property
    def original_channels(self) -> int:
        return 4 * int(self.config.hidden_size)
