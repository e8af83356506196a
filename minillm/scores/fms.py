"""`fms`: MINI-LLM's Feature Map Sensitivity score with a forward-only (SPSA) gradient.

Per weight (variant P, our reconstruction of Eq. 9 of MINI-LLM (Cheng, Zhang, Shi, arXiv 2407.11681), whose exact
form we could not find in the available sources):
    S_ij = |W_ij| * |g_ij| * ||X_j||_2
with g the SPSA estimate of dL/dW and ||X_j|| the norm of the weight's input column over the calibration tokens,
summed over every weight of a unit's group (head / KV group: q, k, v rows + o columns; channel: gate, up rows +
down column; OPT and BLOOM equivalents). Options:

* queries (n), eps, seed: the SPSA estimator (see spsa.py).
* space: 'weights' perturbs all decoder-layer linear weights at once (as the paper's Algorithm 1);
  'gates' perturbs one scalar gate per head output and MLP channel, a far lower-dimensional estimate whose
  gradient is directly the first-order loss change of scaling that feature map; 'gates-split' estimates the head
  gates and the channel gates with separate sets of n queries each (2n queries in all).
* sign: 'abs_mean' takes |g| of the averaged estimate per weight; 'group' keeps signs and takes the absolute value
  of the whole unit's sum (with one query, abs_mean reduces the gradient to |pi| * |z|, i.e. Wanda times noise).
* precision: 'fp32' (default) runs the SPSA forward passes of a bf16 / fp16 model in fp32 arithmetic
  (`minillm.precision.fp32_forward`: temporary fp32 copies of one module's parameters at a time, weights untouched),
  so that a gate 1 + eps z and the loss difference it causes survive; 'native' computes in the model's dtype (the
  behaviour before the option existed). Measured on tiny-llama, gate space, pure |dL/dgate|, 64 queries, same
  seeds, Spearman with the fp32 model's estimate: bf16 -0.04 native vs 0.997 fp32, fp16 0.57 vs 0.997 (a larger eps
  also helps native bf16: 0.82 at eps = 1e-2, 0.96 at 3e-2). No effect on fp32 models.
* estimator: 'spsa' (the paper's, default) or a forward-only alternative from fms_estimators.py: 'ablation' (the
  exact loss change of removing each attention unit and each shortlisted channel, measured with forward passes;
  options shortlist, batch_tokens) or 'allocation' (the g = 1 prior ranks units inside each layer's attention and
  MLP blocks, SPSA with n >> d estimates the 2L block-gate derivatives that scale them; use with
  allocation='global'). space, sign and combination apply to 'spsa' only; queries and eps to 'spsa' and
  'allocation'. Costs and citations are in fms_estimators.py.
* combination: 'product' (above), 'additive' |W| ||X|| + alpha |W g|, or 'taylor' |W g| (LLM-Pruner's Element1 with
  a zeroth-order gradient). In gate space, 'taylor' scores a unit by |dL/dgate| alone and 'product' (the default)
  multiplies that by the unit's activation-weighted magnitude sum |W| ||X||.
"""

from __future__ import annotations

import torch

from ..allocate import LayerScores
from ..precision import PRECISIONS, fp32_forward
from . import MethodSpec, fms_estimators
from .common import (
    ScoringContext,
    all_members,
    calibration_loss,
    member_key,
    pool_attention,
    pool_layer,
)
from .fms_estimators import ESTIMATORS
from .spsa import GateSpace, WeightSpace, estimate


def _perturbs_weights(options: dict) -> bool:
    """Only the weight-space SPSA estimate perturbs weights; gate spaces and the other estimators use hooks."""
    return options.get("estimator", "spsa") == "spsa" and not options.get("space", "weights").startswith("gates")


SPEC = MethodSpec(needs_calibration=True, perturbs_weights=_perturbs_weights)
SPACES = ("weights", "gates", "gates-split")
SIGNS = ("abs_mean", "group")
COMBINATIONS = ("product", "additive", "taylor")


def score(
    ctx: ScoringContext,
    queries: int = 32,
    eps: float = 1e-3,
    space: str = "weights",
    sign: str = "abs_mean",
    combination: str = "product",
    alpha: float = 1.0,
    precision: str = "fp32",
    estimator: str = "spsa",
    shortlist: float = 0.5,
    batch_tokens: int = 4096,
) -> list[LayerScores]:
    check_values(
        dict(queries=queries, eps=eps, space=space, sign=sign, combination=combination, precision=precision,
             estimator=estimator, shortlist=shortlist, batch_tokens=batch_tokens)
    )
    stats = ctx.input_stats("all")
    loss = lambda: calibration_loss(ctx)  # noqa: E731
    if estimator != "spsa":
        return fms_estimators.score(ctx, estimator, stats, queries, eps, precision, shortlist, batch_tokens, loss)
    if space.startswith("gates"):
        return _gate_space_scores(ctx, stats, loss, queries, eps, space, sign, combination, precision)
    return _weight_space_scores(ctx, stats, loss, queries, eps, sign, combination, alpha, precision)


def check_values(options: dict) -> None:
    """The ranges of the options given (`check_options` runs this before any model is loaded, `score` again)."""
    for name, allowed in (
        ("estimator", ESTIMATORS),
        ("space", SPACES),
        ("precision", PRECISIONS),
        ("sign", SIGNS),
        ("combination", COMBINATIONS),
    ):
        if name in options and options[name] not in allowed:
            raise ValueError(f"fms {name} must be one of {allowed}, got {options[name]!r}")
    if options.get("queries", 1) < 1:
        raise ValueError(f"fms queries must be >= 1, got {options['queries']}")
    if not options.get("eps", 1.0) > 0:
        raise ValueError(f"eps must be > 0, got {options['eps']}")
    if not 0.0 <= options.get("shortlist", 0.0) <= 1.0:
        raise ValueError(f"fms shortlist must be in [0, 1], got {options['shortlist']}")
    if options.get("batch_tokens", 1) < 1:
        raise ValueError(f"fms batch_tokens must be >= 1, got {options['batch_tokens']}")


def _gate_space_scores(ctx, stats, loss, queries, eps, space, sign, combination, precision) -> list[LayerScores]:
    # 'gates-split' estimates head gates and channel gates with separate query sets (n each): the ~10^2 head
    # gates then get an estimate not drowned by the ~10^4 channel gates' noise
    kinds = [("heads", "channels")] if space == "gates" else [("heads",), ("channels",)]
    grads = {}
    for j, kind in enumerate(kinds):
        gates = GateSpace(ctx.adapter, kind)
        with fp32_forward(ctx.model, precision == "fp32"):
            est = estimate(gates, loss, queries, eps, ctx.seed + j, ctx.progress)
        for b, (i, k, _) in enumerate(gates.blocks):
            grads[(i, k)] = est.gradient(gates, b).double().cpu()
    layers = ctx.adapter.layers()
    return [_gate_scores(ctx, grads, stats, i, layer, sign, combination) for i, layer in enumerate(layers)]


def _weight_space_scores(ctx, stats, loss, queries, eps, sign, combination, alpha, precision) -> list[LayerScores]:
    linears = [m.linear for _, m in all_members(ctx.adapter).values()]
    weights = WeightSpace(linears, noise_device=ctx.device)
    block_of = {id(lin): b for b, lin in enumerate(weights.linears)}
    with fp32_forward(ctx.model, precision == "fp32"):
        est = estimate(weights, loss, queries, eps, ctx.seed, ctx.progress)
    return weight_fms_scores(ctx, stats, lambda lin: est.gradient(weights, block_of[id(lin)]), sign, combination, alpha)


def weight_fms_scores(ctx, stats, grad_of, sign="abs_mean", combination="product", alpha=1.0) -> list[LayerScores]:
    """Weight-space FMS unit scores from any gradient source `grad_of(linear) -> dL/dW` (the SPSA estimate here;
    the exact backprop gradient in the diagnostics)."""
    out = []
    for i, layer in enumerate(ctx.adapter.layers()):
        grads: dict[int, torch.Tensor] = {}

        def parts(m, i=i):
            w = m.linear.weight.detach().float()
            key = id(m.linear)
            if key not in grads:
                grads[key] = grad_of(m.linear).to(w.device, torch.float32)
            xn = stats[member_key(i, m)].norm.to(w.device)[None, :]
            return w, grads[key], xn

        def line(m):
            w, g, xn = parts(m)
            if combination == "product":
                s = w * g * xn if sign == "group" else (w * g * xn).abs()
            elif combination == "taylor":
                s = w * g if sign == "group" else (w * g).abs()
            else:
                s = (w * g if sign == "group" else (w * g).abs()) * alpha
            return s.sum(dim=1 - m.dim)

        scores = pool_layer(ctx.adapter, layer, ctx.unit(layer), line, abs_of_sum=sign == "group")
        if combination == "additive":
            base = pool_layer(
                ctx.adapter, layer, ctx.unit(layer), lambda m: (parts(m)[0].abs() * parts(m)[2]).sum(dim=1 - m.dim)
            )
            scores = LayerScores(scores.attention + base.attention, scores.channels + base.channels)
        out.append(scores)
    return out


def _gate_scores(ctx, grads: dict, stats, i, layer, sign, combination) -> LayerScores:
    adapter = ctx.adapter
    shape = adapter.attention_shape(layer)
    unit = ctx.unit(layer)
    empty = torch.zeros(0, dtype=torch.float64)
    g_heads, g_ch = grads.get((i, "heads"), empty), grads.get((i, "channels"), empty)
    kv0 = torch.zeros(shape.n_kv_heads, dtype=torch.float64)
    if sign == "group":  # a KV group's removal zeroes all its heads: first-order change is the signed sum
        heads = pool_attention(adapter, layer, unit, g_heads, kv0).abs()
    else:
        heads = pool_attention(adapter, layer, unit, g_heads.abs(), kv0)
    channels = g_ch.abs()
    if combination != "taylor":
        magnitude = pool_layer(
            adapter,
            layer,
            unit,
            lambda m: (
                m.linear.weight.detach().float().abs()
                * stats[member_key(i, m)].norm.to(m.linear.weight.device)[None, :]
            ).sum(dim=1 - m.dim),
        )
        heads = heads * magnitude.attention if combination == "product" else heads + magnitude.attention
        channels = channels * magnitude.channels if combination == "product" else channels + magnitude.channels
    return LayerScores(heads, channels)
