"""Shared pieces of scoring: the scoring context (with the one cache of input statistics), the calibration loss, and
pooling of per-weight (or per-row / per-column) scores into unit scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter, Member
from ..allocate import LayerScores, resolve_attention_unit
from ..offload import execution_device, loaded
from ..state import PruningState
from ..surgery import CurrentKeep


@dataclass
class ScoringContext:
    """One scoring step on one model: the model and its adapter, the calibration tokens, the options every method
    shares, and the input statistics, computed once on first request (`input_stats`). `pruning` is set when the
    method may remove units itself (`remove`), so that the original indices stay recorded; `resume` (optional)
    keeps the progress of long steps (the `ablation` estimator stores each finished layer there)."""

    model: nn.Module
    adapter: Adapter
    calib: torch.Tensor | None
    attention_units: str = "auto"
    seed: int = 0
    progress: bool = True
    batch_size: int = 16
    pruning: PruningState | None = None
    # where a long scoring step keeps its progress so that an interrupted run continues (an object with
    # get(name) -> value or None and put(name, value), JSON-serialisable values); None keeps nothing
    resume: object | None = None
    _stats: dict[str, dict[str, InputStats]] = field(default_factory=dict, repr=False)
    # float64 moments of the output projections' inputs on the unpruned model, by (layer index, 'attention' |
    # 'channels'), kept by a method that computed them anyway (`obs`) for the dense refit that follows
    # (`minillm.reconstruct`), which then needs no pass of its own
    _moments: dict = field(default_factory=dict, repr=False)
    keep_moments: bool = False  # set by `prune` when a dense refit follows the scores

    def input_stats(self, members: str = "all") -> dict[str, InputStats]:
        """fp32 input statistics over the calibration tokens, by `member_key`, of every prunable linear
        (`members='all'`) or of the output projections only (`'out'`: o_proj / down_proj and equivalents). One
        pass over the calibration data on the first request, cached for the life of this context: the model must
        not change in between (`remove` drops them). 'out' is served from 'all' when that
        exists (a linear's statistics do not depend on which others are observed)."""
        if members not in ("all", "out"):
            raise ValueError(f"members must be 'all' or 'out', got {members!r}")
        if members not in self._stats:
            wanted = all_members(self.adapter, members)
            if "all" in self._stats:
                self._stats[members] = {k: self._stats["all"][k] for k in wanted if k in self._stats["all"]}
            else:
                self._stats[members] = collect_input_stats(self, {k: m.linear for k, (_, m) in wanted.items()})
        return self._stats[members]

    def remove(self, layer_idx: int, keep: CurrentKeep) -> None:
        """Physically remove units of one layer (current indices), keeping the plan's record of original units."""
        if self.pruning is None:
            raise RuntimeError("this scoring context cannot remove units (it was not made by minillm.prune)")
        self.pruning.remove(self.adapter, layer_idx, keep)
        self._stats.clear()  # they describe the model before the removal
        self._moments.clear()

    def unit(self, layer: nn.Module) -> str:
        return resolve_attention_unit(self.attention_units, self.adapter.attention_shape(layer))

    @property
    def device(self) -> torch.device:
        """Where calibration inputs go: the input embeddings' device (their execution device when offloaded)."""
        return execution_device(self.model)

    def batches(self) -> list[torch.Tensor]:
        calib = self.calib.to(self.device)
        return [calib[i : i + self.batch_size] for i in range(0, calib.shape[0], self.batch_size)]


# --- loss ------------------------------------------------------------------------------------------------------


def lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int = 512) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32. The LM head is applied to chunks of about `chunk_tokens` tokens
    (all rows, a slice of positions), so the full [batch, seq, vocab] logits never exist at once: they would
    dominate peak memory (4 x 2048 tokens x 128k vocabulary in fp32 is 4 GiB)."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    chunk = max(1, chunk_tokens // hidden.shape[0])
    for start in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, start : start + chunk]).float()
        total = total + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, start : start + chunk].reshape(-1), reduction="sum"
        )
    return total / targets.numel()


@torch.no_grad()
def calibration_loss(ctx: ScoringContext) -> float:
    """Token-weighted mean loss over all calibration batches (no gradient)."""
    total, tokens = 0.0, 0
    for batch in ctx.batches():
        n = batch[:, 1:].numel()
        total += float(lm_loss(ctx.model, batch)) * n
        tokens += n
    return total / tokens


# --- input statistics ------------------------------------------------------------------------------------------


@dataclass
class InputStats:
    """Per input column of one linear, over all calibration tokens: sum of squares, sum, token count."""

    sumsq: torch.Tensor
    sum: torch.Tensor
    n: int = 0

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 over tokens (Wanda's activation norm)."""
        return self.sumsq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance over tokens (FLAP's fluctuation)."""
        n = max(self.n, 2)
        return (self.sumsq - self.sum**2 / n) / (n - 1)


@torch.no_grad()
def collect_input_stats(ctx: ScoringContext, linears: dict[str, nn.Linear]) -> dict[str, InputStats]:
    """Run the calibration batches once and accumulate fp32 input statistics of the given linears."""
    stats: dict[str, InputStats] = {}
    handles = []

    def hook_for(key):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st = stats.get(key)
            if st is None:
                st = stats[key] = InputStats(x.new_zeros(x.shape[-1]), x.new_zeros(x.shape[-1]))
            st.sumsq += (x * x).sum(0)
            st.sum += x.sum(0)
            st.n += x.shape[0]

        return hook

    for key, lin in linears.items():
        handles.append(lin.register_forward_pre_hook(hook_for(key)))
    try:
        for batch in tqdm(ctx.batches(), desc="activation statistics", disable=not ctx.progress, leave=False):
            ctx.model.base_model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def member_key(layer_idx: int, member: Member) -> str:
    return f"{layer_idx}.{member.name}"


def all_members(adapter: Adapter, which: str = "all") -> dict[str, tuple[int, Member]]:
    """Members of every layer by key; which = 'all' or 'out' (only o_proj/down_proj and equivalents)."""
    out = {}
    for i, layer in enumerate(adapter.layers()):
        att = adapter.attention_members(layer) if adapter.attention_shape(layer).n_query_heads else []
        mlp = adapter.mlp_members(layer) if adapter.n_channels(layer) else []
        groups = [att, mlp]
        for members in groups:
            for m in members[-1:] if which == "out" else members:
                out[member_key(i, m)] = (i, m)
    return out


# --- pooling ---------------------------------------------------------------------------------------------------


def pool_attention(
    adapter: Adapter, layer: nn.Module, unit: str, query: torch.Tensor, kv: torch.Tensor
) -> torch.Tensor:
    """Attention unit scores from per-query-head and per-KV-head sums."""
    shape = adapter.attention_shape(layer)
    if unit == "kv_group":
        return kv + query.view(shape.n_kv_heads, shape.group_size).sum(1)
    return query + kv if shape.n_kv_heads == shape.n_query_heads else query


def per_weight(fn: Callable[[Member], torch.Tensor]) -> Callable[[Member], torch.Tensor]:
    """Turn a per-weight score (shaped like the weight) into per-line scores (one per row for row members, one per
    column for column members) by summing over the other dimension."""
    return lambda m: fn(m).sum(dim=1 - m.dim)


def pool_layer(
    adapter: Adapter,
    layer: nn.Module,
    unit: str,
    line_score: Callable[[Member], torch.Tensor],
    members: str = "all",
    abs_of_sum: bool = False,
) -> LayerScores:
    """Unit scores of one layer from per-line scores: each member's lines are summed over every unit's block and
    the members of a unit are added up. `members='out'` scores from the output projections alone (FLAP, Wanda-SP).
    `abs_of_sum` takes the absolute value only of the finished unit sum (signed per-line scores)."""
    with loaded(layer):  # accelerate-offloaded weights are read outside a forward pass here
        return _pool_layer(adapter, layer, unit, line_score, members, abs_of_sum)


def _pool_layer(adapter, layer, unit, line_score, members, abs_of_sum) -> LayerScores:
    shape = adapter.attention_shape(layer)
    q = torch.zeros(shape.n_query_heads, dtype=torch.float64)
    kv = torch.zeros(shape.n_kv_heads, dtype=torch.float64)
    if shape.n_query_heads:
        att = adapter.attention_members(layer)
        for m in att[-1:] if members == "out" else att:
            n_units = shape.n_query_heads if m.unit == "query" else shape.n_kv_heads
            s = line_score(m).double().reshape(n_units, -1).sum(1).cpu()
            if m.unit == "query":
                q += s
            else:
                kv += s
    n_ch = adapter.n_channels(layer)
    ch = torch.zeros(n_ch, dtype=torch.float64)
    if n_ch:
        mlp = adapter.mlp_members(layer)
        for m in mlp[-1:] if members == "out" else mlp:
            ch += line_score(m).double().reshape(n_ch, -1).sum(1).cpu()
    att_scores = pool_attention(adapter, layer, unit, q, kv)
    if abs_of_sum:
        return LayerScores(att_scores.abs(), ch.abs())
    return LayerScores(att_scores, ch)
