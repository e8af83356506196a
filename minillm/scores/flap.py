"""`flap`: FLAP (An et al., AAAI'24) with the WIFV metric, adaptive global structure (AL-AM) and bias compensation,
following CASIA-IVA-Lab/FLAP@3bb57db `lib/prune.py` (`prune_flap`, `metrics['WIFV']`) and `lib/layerwrapper.py`
(`BiasGPT`).

* Fluctuation metric of input column j of o_proj / down_proj: Var_tokens(X_j) * ||W_:,j||^2.
* Attention (FLAP's order): the metric is squared per column, standardised (z-score, unbiased std) over *all* o_proj
  input columns of the layer, and only then averaged over each head's columns. A KV group (GQA) scores the mean of
  its query heads' scores, i.e. the mean of the standardised values over all of the group's columns, so a group and
  a single head live on the same scale as FLAP's per-head scores.
* MLP: the metric is standardised over the layer's channels.
* Adaptive structure: all standardised unit scores of all layers are ranked together and removed by parameter cost
  (`allocation='global'`): a unit weighs as much as its parameters, as FLAP's 512/3 head-to-channel ratio does for
  LLaMA-7B.
* Bias compensation (on by default for FLAP; `compensate_bias` of `minillm.prune`, see compensate.py).

Deliberate deviations, each measured on SmolLM2-135M with the cpu-full calibration (10 x 64 tokens):
* Statistics. FLAP's `BiasGPT` updates the variance online per calibration sequence, and its update discards the
  first sequence's deviations and weights later sequences by (k-1)/k (the old and new running means alias). We use
  the exact unbiased variance over all calibration tokens. The difference fades with the number of sequences
  (FLAP's script uses 1,024); with the cpu-full calibration (10 sequences of 64 tokens) on SmolLM2, FLAP's rule on
  the online statistics removes the same KV groups at 10/20% (2 and 4) and differs by 2 and 1 groups at 30/50%,
  while the removed channel sets differ by 900-1,256 channels (of 5,804-25,260 removed). Measured with the
  transcription in `tests/peers/test_flap_peer.py`, which bounds the effect at 128 sequences.
* Selection. FLAP keeps the units scoring strictly above the score at which the weighted cumulative count comes
  closest to the target (head weight 512/3 truncated to 170 by an integer tensor); we remove the lowest-scoring
  units while their exact parameter cost fits the budget. The two rules differ by at most the boundary unit.
* FLAP casts the mean input used for compensation to fp16; we keep it in fp32.
"""

from __future__ import annotations

import torch

from ..allocate import LayerScores
from ..offload import loaded
from . import MethodSpec
from .common import ScoringContext, member_key

# The CLI calibrates FLAP on 16 x 512 = 8k tokens unless told (FLAP's own scripts use 1,024 x 128). In the
# calibration-budget records on SmolLM2-135M (results/cpu-full/calibration_budget, one seed, bootstrap intervals over
# 64 x 512 perplexity tokens) 8k tokens beat LLM-Pruner's 10 x 64 at 50% with the intervals apart (192.5 [182.6,
# 202.4] against 277.2 [258.5, 300.1]; 35.4 against 37.9 at 20%, overlapping) and 32k tokens gave no more; the
# artifact's grid still calibrates every baseline on 10 x 64, set in the profiles.
SPEC = MethodSpec(
    needs_calibration=True, default_allocation="global", default_compensate_bias=True, default_calibration=(16, 512)
)


def zscore(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / unbiased std; zeros for fewer than two values."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std() + 1e-12)


def score(ctx: ScoringContext, standardise: bool = True) -> list[LayerScores]:
    stats = ctx.input_stats("out")  # cached: the bias compensation (minillm.compensate) reads the same
    out = []
    for i, layer in enumerate(ctx.adapter.layers()):
        with loaded(layer):
            out.append(_layer_scores(ctx, stats, i, layer, standardise))
    return out


def fluctuation(linear: torch.nn.Linear, variance: torch.Tensor) -> torch.Tensor:
    """WIFV per input column: Var(X_j) * ||W_:,j||^2, fp64 on CPU. Shape [in_features]."""
    w = linear.weight.detach().float()
    return (variance.to(w.device) * w.pow(2).sum(0)).double().cpu()


def _layer_scores(ctx: ScoringContext, stats, i: int, layer, standardise: bool) -> LayerScores:
    adapter = ctx.adapter
    shape = adapter.attention_shape(layer)
    heads = channels = None
    if shape.n_query_heads:
        out = adapter.attention_members(layer)[-1]
        col = fluctuation(out.linear, stats[member_key(i, out)].variance).pow(2)
        if standardise:
            col = zscore(col)  # over every o_proj input column of the layer, before the per-head mean
        per_head = col.reshape(shape.n_query_heads, -1).mean(1)
        heads = per_head.reshape(shape.n_kv_heads, -1).mean(1) if ctx.unit(layer) == "kv_group" else per_head
    if adapter.n_channels(layer):
        down = adapter.mlp_members(layer)[-1]
        channels = fluctuation(down.linear, stats[member_key(i, down)].variance)
        if standardise:
            channels = zscore(channels)
    return LayerScores(heads, channels)
