"""OPT: separate q/k/v/out_proj with biases (multi-head attention), fc1/fc2 MLP on the decoder layer itself."""

from __future__ import annotations

from torch import nn

from .base import Adapter, AttentionShape, Member


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)

    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def _attention_members(self, layer: nn.Module) -> list[Member]:
        a = layer.self_attn
        # MHA: every head owns its own K and V, so all four matrices are "query" members.
        return [
            Member("q_proj", a.q_proj, 0, "query"),
            Member("k_proj", a.k_proj, 0, "query"),
            Member("v_proj", a.v_proj, 0, "query"),
            Member("out_proj", a.out_proj, 1, "query"),
        ]

    def mlp_members(self, layer: nn.Module) -> list[Member]:
        return [Member("fc1", layer.fc1, 0, "channel"), Member("fc2", layer.fc2, 1, "channel")]

    def set_attention_shape(self, layer: nn.Module, shape: AttentionShape) -> None:
        layer.self_attn.num_heads = shape.n_query_heads

    @property
    def original_attention(self) -> AttentionShape:
        c = self.config
        return AttentionShape(c.num_attention_heads, c.num_attention_heads, c.hidden_size // c.num_attention_heads)

    @property
    def original_channels(self) -> int:
        return int(self.config.ffn_dim)
