"""Gemma 3 text models (`Gemma3ForCausalLM`, model type ``gemma3_text``; Gemma 3 270M and 1B are text-only).

Layout, as in transformers' ``modeling_gemma3``: q/k/v/o attention with grouped-query heads of an explicit
``head_dim`` (256 for Gemma 3 270M, not hidden_size / heads), a per-head RMSNorm on queries and keys (QK-norm), a
GELU-tanh gated MLP (gate/up/down), and extra RMSNorms after attention and after the MLP (applied to the block's
output before the residual add). Layers are either sliding-window (local) or full (global) attention, following
``config.layer_types``.

Units:

* attention: Gemma 3 270M has a single KV head (multi-query attention), so its attention units are *query heads*
  (``attention_units="auto"`` resolves to ``query_head`` for MQA). The single KV head (its k_proj and v_proj rows)
  stays as long as one query head of the layer is kept; it is removed, with the o_proj columns, only when every
  query head goes, and the block is then replaced by the module that adds nothing (an empty attention block
  outputs zeros, and Gemma's post-attention RMSNorm of zeros is zeros, exactly what the masked block gives). Larger
  Gemma 3 models with several KV heads use KV groups by default, as LLaMA GQA does.
* MLP: one intermediate channel (a row of gate_proj and up_proj, a column of down_proj).

Untouched by head removal: ``q_norm`` and ``k_norm`` (their weight has ``head_dim`` entries shared by every head,
so it does not depend on how many heads remain), the sliding window of local layers and the layer-type pattern,
the per-type rotary embeddings, ``query_pre_attn_scalar`` (the attention scale is a constant, not derived from
the number of heads) and the four per-layer norms. The only per-layer attribute that depends on the head count is
``num_key_value_groups`` (query heads per KV head), set here; the stock forward reshapes with -1 heads.

The saved config stays the original architecture's; ``load_pruned`` rebuilds stock ``Gemma3ForCausalLM`` from it
and removes the heads and channels recorded per layer in ``pruning.json`` (so heterogeneous per-layer head and
channel counts need no config field).
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, AttentionShape, Member


class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_types = ("gemma3_text",)

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
        # The stock forward views q/k/v with -1 heads and repeats each KV head this many times; q_norm/k_norm act
        # on the last (head_dim) axis and the sliding window is a per-layer constant, so nothing else changes.
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

    def describe(self) -> dict:
        out = super().describe()
        layer_types = list(getattr(self.config, "layer_types", None) or [])
        out["sliding_window"] = getattr(self.config, "sliding_window", None)
        out["sliding_layers"] = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
        return out
