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

from .llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    """Gemma 3's members and head bookkeeping are LLaMA's (q/k/v/o, gate/up/down, `num_key_value_groups`): the
    stock forward reshapes with -1 heads, q_norm/k_norm act on the head_dim axis and the sliding window is a
    per-layer constant, so nothing else changes when heads go. Only the description adds the window layout."""

    family = "gemma3"
    model_types = ("gemma3_text",)

    def describe(self) -> dict:
        out = super().describe()
        layer_types = list(getattr(self.config, "layer_types", None) or [])
        out["sliding_window"] = getattr(self.config, "sliding_window", None)
        out["sliding_layers"] = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
        return out
