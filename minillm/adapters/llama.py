"""LLaMA family (LLaMA 1/2/3, SmolLM2, Mistral, Qwen2): q/k/v/o attention with GQA, SwiGLU gate/up/down MLP."""

from __future__ import annotations

from torch import nn

from .base import Adapter, AttentionShape, Member


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def _attention_members(self, layer: nn.Module) -> list[Member]:
        a = layer.self_attn
        return [
            Member("q_proj", a.q_proj, 0, "query"),
            Member("k_proj", a.k_proj, 0, "kv"),
            Member("v_proj", a.v_proj, 0, "kv"),
            Member("o_proj", a.o_proj, 1, "query"),
        ]

    def mlp_members(self, layer: nn.Module) -> list[Member]:
        m = layer.mlp
        return [
            Member("gate_proj", m.gate_proj, 0, "channel"),
            Member("up_proj", m.up_proj, 0, "channel"),
            Member("down_proj", m.down_proj, 1, "channel"),
        ]

    def set_attention_shape(self, layer: nn.Module, shape: AttentionShape) -> None:
        # Only the ratio matters to the stock forward: it reshapes with -1 heads and repeats KV heads by this.
        layer.self_attn.num_key_value_groups = max(shape.group_size, 1)

    @property
    def original_attention(self) -> AttentionShape:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return AttentionShape(c.num_attention_heads, n_kv, head_dim)

    @property
    def original_channels(self) -> int:
        return int(self.config.intermediate_size)
