"""The interface every model family implements.

An adapter knows where a family keeps its decoder layers and projections, and how attention heads are laid out in
the weight matrices. Everything else (scoring, allocation, masks, physical removal) is written once against this
interface. Units:

* attention: query heads and KV heads. A *query* member is a matrix whose rows (or columns) come in one block per
  query head (LLaMA q_proj rows, o_proj columns; BLOOM's fused query_key_value rows, which hold [q, k, v] of a head
  together); a *kv* member has one block per KV head (LLaMA k_proj / v_proj rows).
* MLP: intermediate channels. *channel* members have one row (gate/up/fc1) or column (down/fc2) per channel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """Raised when no adapter exists for a model's architecture."""


@dataclass(frozen=True)
class Member:
    """One matrix of a unit group: `linear`'s dimension `dim` (0 = output rows, 1 = input columns) is split into
    equal consecutive blocks, one per unit of kind `unit` ("query", "kv" or "channel")."""

    name: str
    linear: nn.Linear
    dim: int
    unit: str

    def unit_cost(self, n_units: int) -> int:
        """Parameters one unit owns in this matrix (weights, plus bias entries when rows are removed)."""
        weight = self.linear.weight
        cost = weight.numel() // n_units if n_units else 0
        if self.dim == 0 and self.linear.bias is not None and n_units:
            cost += self.linear.bias.numel() // n_units
        return cost


@dataclass(frozen=True)
class AttentionShape:
    n_query_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.n_query_heads // self.n_kv_heads if self.n_kv_heads else 0


class Adapter(ABC):
    """Family-specific knowledge about one loaded model."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    #: name of the keyword argument through which the decoder layer passes the KV cache to the attention module
    cache_kwarg: str = "past_key_values"
    #: True when the attention module adds the residual itself (BLOOM)
    attention_adds_residual: bool = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- where things are ---------------------------------------------------------------------------------------
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a decoder layer."""

    @abstractmethod
    def _attention_members(self, layer: nn.Module) -> list[Member]:
        """All matrices of the attention block with their head layout; the output projection last."""

    def attention_members(self, layer: nn.Module) -> list[Member]:
        attn = self.attention(layer)
        if getattr(attn, "minillm_empty", False):  # every head removed: only the (0-input) output projection is left
            return [Member(attn.out_name, getattr(attn, attn.out_name), 1, "query")]
        return self._attention_members(layer)

    @abstractmethod
    def mlp_members(self, layer: nn.Module) -> list[Member]:
        """All matrices of the MLP block; the output projection (down / fc2) last."""

    @abstractmethod
    def set_attention_shape(self, layer: nn.Module, shape: AttentionShape) -> None:
        """Update the module attributes that depend on the number of heads."""

    def keep_heads(self, layer: nn.Module, kept: list[int]) -> None:
        """Called after a layer's query heads were cut to `kept` (current indices, non-empty), for families whose
        attention holds per-head state outside the weights (BLOOM's ALiBi slopes). Nothing to do by default."""

    @property
    @abstractmethod
    def original_attention(self) -> AttentionShape:
        """Head layout of the unpruned architecture (from the config)."""

    @property
    @abstractmethod
    def original_channels(self) -> int:
        """MLP intermediate width of the unpruned architecture."""

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def attention_shape(self, layer: nn.Module) -> AttentionShape:
        """Current head layout of a (possibly pruned) layer, read from the weight shapes."""
        head_dim = self.original_attention.head_dim
        n_q = self.attn_out_proj(layer).in_features // head_dim
        kv = [m for m in self.attention_members(layer) if m.unit == "kv"]
        n_kv = kv[0].linear.out_features // head_dim if kv else n_q
        return AttentionShape(n_q, n_kv, head_dim)

    # --- derived helpers ----------------------------------------------------------------------------------------
    def attn_out_proj(self, layer: nn.Module) -> nn.Linear:
        return self.attention_members(layer)[-1].linear

    def mlp_out_proj(self, layer: nn.Module) -> nn.Linear:
        return self.mlp_members(layer)[-1].linear

    def n_channels(self, layer: nn.Module) -> int:
        return self.mlp_out_proj(layer).in_features

    def linears(self, layer: nn.Module) -> list[nn.Linear]:
        return [m.linear for m in self.attention_members(layer) + self.mlp_members(layer)]

    def layer_params(self, layer: nn.Module) -> int:
        """Prunable parameters of one layer: weights and biases of its attention and MLP linears."""
        return sum(p.numel() for lin in self.linears(layer) for p in lin.parameters(recurse=False))

    def head_costs(self, layer: nn.Module) -> tuple[int, int]:
        """(parameters owned by one query head, parameters owned by one KV head) in the current layer."""
        shape = self.attention_shape(layer)
        q = sum(m.unit_cost(shape.n_query_heads) for m in self.attention_members(layer) if m.unit == "query")
        kv = sum(m.unit_cost(shape.n_kv_heads) for m in self.attention_members(layer) if m.unit == "kv")
        return q, kv

    def channel_cost(self, layer: nn.Module) -> int:
        n = self.n_channels(layer)
        return sum(m.unit_cost(n) for m in self.mlp_members(layer))

    def describe(self) -> dict:
        att = self.original_attention
        return {
            "family": self.family,
            "model_type": self.config.model_type,
            "num_layers": len(self.layers()),
            "hidden_size": self.hidden_size,
            "num_query_heads": att.n_query_heads,
            "num_kv_heads": att.n_kv_heads,
            "head_dim": att.head_dim,
            "intermediate_size": self.original_channels,
        }
