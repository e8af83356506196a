"""Least-squares reconstruction of the output projections after structured removal (`prune(..., reconstruct=...)`).

**The fit.** For one output projection y = W x + b (LLaMA / Gemma 3 `o_proj`, `down_proj`; OPT `out_proj`, `fc2`;
BLOOM `dense`, `dense_4h_to_h`), W [m, d], x [d] its input, S the input columns that survive removal (the kept
heads' columns of the attention projection, the kept channels of the MLP projection) and R the removed ones, the
refit chooses W'_S [m, |S|] and b' [m] to minimise, over the N calibration tokens,

    sum_tokens || (W t + b) - (W'_S x_S + b') ||^2  +  N lambda || W'_S - W_S ||^2

where x is the input the pruned layer sees and t the input whose unpruned output is the target (t = x except for
the attention projection in sequential mode, below). With means mu_x, mu_t, the centred covariance
Sigma_xx = E[(x - mu_x)(x - mu_x)^T] and the cross-covariance Sigma_tx = E[(t - mu_t)(x - mu_x)^T], the solution is

    W'_S = (W Sigma_tx[:, S] + lambda W_S) (Sigma_xx[S, S] + lambda I)^-1        b' = b + W mu_t - W'_S mu_x[S]

with lambda = ridge * mean(diag(Sigma_xx)) (a relative ridge, so one value fits every layer's scale). In dense mode
this is W'_S = W_S + W_R Sigma_RS (Sigma_SS + lambda I)^-1: the ridge pulls the kept columns towards their original
weights, so lambda -> infinity gives back FLAP's bias compensation (below) and lambda = 0 the plain least-squares
refit. These are the weights of the greedy structured-OBS removal (`minillm.scores.obs`) for the same kept set, and
Týr-the-Pruner's refit (held to it in `tests/peers/test_obs_peer.py`). The issue that asked for this refit wrote the
ridge towards zero, W Sigma[:, S] (Sigma_SS + lambda I)^-1; that form shrinks even a layer that loses nothing
(W Sigma (Sigma + lambda I)^-1 != W) and, with few tokens, overfits unless lambda is large (measured below).

**FLAP's bias compensation is the uncorrelated special case.** In dense mode (t = x) with Sigma_RS = 0 (any ridge),
W'_S = W_S and b' = b + W_R mu_R: exactly `minillm.compensate`. In dense mode the refit
therefore never reconstructs the calibration outputs worse than compensation (with ridge -> 0), nor than plain
removal.

**Two statistics modes.**

* ``dense``: every projection's statistics come from the unpruned model (x = t = the dense model's input of that
  projection). Objective: || W X_dense + b - W'_S X_dense,S - b' ||.
* ``sequential`` (as SlimGPT prunes): layer i's statistics come from the model whose layers < i are already pruned
  and refit (the *pruned stream*), while a second, *dense stream* runs the unpruned layers alongside.
  - attention output projection: the target is the dense layer's output, || W T_dense + b - W'_S X_S - b' || with
    T_dense the dense stream's input and X the pruned stream's input of the projection, which needs the
    cross-moment sum_tokens t x^T of the two streams;
  - MLP output projection: the target is the unpruned projection applied to the pruned stream's own input,
    || W X + b - W'_S X_S - b' ||, X taken after this layer's attention was pruned and refit.
  On the first layer the attention refit equals dense mode's; with the attention left unpruned, the whole first
  layer's does. Neither mode wins everywhere: on SmolLM2-135M (16 x 512 tokens) sequential beat dense after FLAP's
  selection (50%: 65.3 vs 69.6) and lost after Wanda-SP's (50%: 107.1 vs 94.5), although there it fits the
  calibration tokens better (their perplexity 81.5 vs 102.5): it generalises worse, not fits worse.

**Two forms.** ``centered`` (above) needs a bias and creates one where the model has none (LLaMA / Gemma 3 without
`attention_bias` / `mlp_bias`), saved and reloaded like compensation's. ``uncentered`` replaces the covariances by
the raw second moments G_xx = E[x x^T], G_tx = E[t x^T] and fits no bias, W'_S = (W G_tx[:, S] + lambda W_S)
(G_xx[S, S] + lambda I)^-1 (SlimGPT's and Týr's form): no bias is created and the pruned model keeps the stock shape; an existing
bias stays as it is.

**Ridge.** Default 1e-2 (relative). Measured, with the earlier form of the ridge (towards zero, lambda from the kept
columns), on SmolLM2-135M (fp32, 2 CPU cores, calibration seed 0, dense mode,
centred; perplexity on the held-out novel, `perplexity_windows(tok, 512, 16)`; "before": FLAP with its bias
compensation, Wanda-SP with plain removal):

    calibration   selection       before    ridge 0   1e-3      1e-2    1e-1
    16 x 512      FLAP 20%        31.5                29.0      28.9    30.3
    16 x 512      FLAP 50%        164.5               69.8      69.6    78.8
    16 x 512      Wanda-SP 50%    21,576              91.3      94.5    106.1
    16 x 128      FLAP 50%        174.8                         87.6    94.7
    10 x 64       FLAP 50%        236.8     3.0e7     4.8e5     672     189

With 8k tokens (5x the 1536-wide MLP input) 1e-3 and 1e-2 are within 4% of each other and 1e-1 shrinks the fit too
far (also at 2k tokens, where 1e-2 still halves compensation's perplexity). With fewer tokens than kept columns (640
here) the fit is underdetermined and only the ridge holds it: 1e-3 and 1e-2 are then worse than compensation, 1e-1
is not; a warning says so and asks for more tokens.
With the current form (towards the original weights): FLAP 50%, 16 x 512, ridge 1e-2: 69.6 (the same); 10 x 64:
1,934 at 1e-2 and 176 at 1e-1 (compensation 236.8): with too few tokens only a large ridge helps, in either form.

**Implementation and memory.** One capture pass runs the model's embedding on every calibration batch, with the
decoder layers replaced by stand-ins that compute nothing (`minillm.layerwise.capture_layer_calls`), and records the
hidden states entering layer 0 [n_samples, seqlen, hidden] and the other arguments every decoder layer is called
with (masks and rotary embeddings, per layer: Gemma 3's sliding and global layers receive different ones; the same
tensors are shared by layers of one kind, so the references cost little). Then, one layer at a time, the layer runs
on the cached hidden states with forward pre-hooks on its output projections; their inputs are summed in float32
matmuls per batch into float64 moments, the projections are refit for the layer's keep set and the next layer's
input is computed (from the dense layer in dense mode; from the refit layer in sequential mode). The refit is
written into the full-width weight with the removed columns set to zero, which computes what the physically pruned
layer computes (to float round-off); physical removal (`minillm.prune`) then slices the columns away. Memory beside
the forward: the calibration hidden states of all tokens (one copy in dense mode, two in sequential mode, model
dtype) and the moments of one layer at a time (d_ff^2 + d^2 float64 in dense mode; the attention's 2 d^2 and then
the MLP's d_ff^2 in sequential mode). Sequential mode costs about four layer forwards per layer and batch, dense
mode one. After `obs`'s scores, which computed the dense mode's moments already and kept them (within
`minillm.scores.obs.KEEP_MOMENTS_MAX_BYTES`), dense mode runs no pass at all: the solves alone. Offloaded weights (accelerate) are loaded for good first (`minillm.offload.materialize`): the refit writes
them. Layer streaming (`stream_layers`) works unchanged: each replayed layer call moves the layer as a model forward
does.

References: SlimGPT (Ling et al., NeurIPS 2024: layer-wise structured pruning, each layer's statistics from the
pruned prefix, uncentred refit of the kept columns), Týr-the-Pruner (NeurIPS 2025: the same uncentred G_SS^-1
refit), FLAP (An et al., AAAI 2024: bias compensation, the uncorrelated special case).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .layerwise import Call, Moments, as_float64, capture_layer_calls, run_layer, shifted_cholesky
from .offload import materialize
from .scores.common import ScoringContext
from .surgery import CurrentKeep

MODES = ("dense", "sequential")
FORMS = ("centered", "uncentered")
#: relative ridge: lambda = DEFAULT_RIDGE * mean(diag(Sigma))
DEFAULT_RIDGE = 1e-2
#: (windows, tokens per window): the fewest calibration tokens the CLI gives a pruning that refits, unless told. The
#: refit solves for as many kept columns as the widest output projection has inputs (SmolLM2's down_proj: 1,536), so
#: it needs many more tokens than that: at 10 x 64 = 640 tokens FLAP + refit at 50% gave perplexity 1,934, at 16 x 512
#: 69.6 (docs/methods.md)
REFIT_CALIBRATION = (32, 512)


@dataclass(frozen=True)
class ReconstructConfig:
    """How to refit the output projections: statistics `mode` ('dense' | 'sequential'), relative `ridge` (>= 0)
    and `form` ('centered': refit with a bias | 'uncentered': no bias)."""

    mode: str
    ridge: float = DEFAULT_RIDGE
    form: str = "centered"

    @classmethod
    def parse(cls, mode: str | None, ridge: float | None = None, form: str | None = None) -> ReconstructConfig | None:
        """The validated configuration, or None when `mode` is None (then ridge and form must be None too)."""
        if mode is None:
            if ridge is not None or form is not None:
                raise ValueError("reconstruct_ridge / reconstruct_form need reconstruct='dense' or 'sequential'")
            return None
        if mode not in MODES:
            raise ValueError(f"reconstruct must be one of {', '.join(MODES)} (or None), got {mode!r}")
        form = "centered" if form is None else form
        if form not in FORMS:
            raise ValueError(f"reconstruct_form must be one of {', '.join(FORMS)}, got {form!r}")
        ridge = DEFAULT_RIDGE if ridge is None else ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"reconstruct_ridge must be a finite number >= 0, got {ridge!r}")
        return cls(mode, float(ridge), form)

    @classmethod
    def for_method(
        cls, default: str | None, mode: str | bool | None, ridge: float | None = None, form: str | None = None
    ) -> ReconstructConfig | None:
        """As `parse`, with `mode` None meaning the method's `default` (its MethodSpec.default_reconstruct) and
        'none' or False meaning no refit even where the method refits by default."""
        if mode is None:
            mode = default
        elif mode is False or mode == "none":
            mode = None
        return cls.parse(mode, ridge, form)

    def to_json(self) -> dict:
        return {"mode": self.mode, "ridge": self.ridge, "form": self.form}


# --- statistics and the solve ---------------------------------------------------------------------------------------


def _ridge_solve(a: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """rhs (a + lam I)^-1 for symmetric PSD a [k, k] (shifted in place: pass a copy), rhs [m, k]. A singular system
    (lam 0 and dead columns) falls back to the pseudo-inverse: a minimum-norm least-squares solution."""
    if a.shape[0] == 0:
        return rhs
    a, chol = shifted_cholesky(a, lam)  # in place: `a` is the caller's gathered copy
    if chol is not None:
        del a
        return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(a, hermitian=True)


def refit_columns(
    weight: torch.Tensor, moments: Moments, keep: torch.Tensor, ridge: float, centered: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The least-squares refit of one projection (module docstring): weight W [m, d], keep S [k] (long, input
    columns). W'_S = (W S_tx[:, S] + lambda W_S) (S_xx[S, S] + lambda I)^-1 with lambda = ridge * mean(diag(S_xx)):
    the ridge pulls the kept columns towards their original weights. Returns W'_S [m, k] and the bias change
    b' - b [m] (None for the uncentred form), float64 on the moments' device."""
    sxx, stx, mu_x, mu_t = moments.second_moments(centered)
    keep = keep.to(sxx.device)
    w = as_float64(weight, sxx.device)
    lam = ridge * float(sxx.diagonal().mean()) if sxx.shape[0] else 0.0
    w_s = _ridge_solve(sxx[keep[:, None], keep], w @ stx[:, keep] + lam * w[:, keep], lam)  # one k x k gather
    delta = w @ mu_t - w_s @ mu_x[keep] if centered else None
    return w_s, delta


@torch.no_grad()
def write_refit(linear: nn.Linear, keep: torch.Tensor, w_s: torch.Tensor, bias_delta: torch.Tensor | None) -> None:
    """Write W'_S [m, k] into the kept columns of the full-width weight and zeros into the removed ones (the layer
    then computes what the physically pruned layer will); add `bias_delta` [m] to the bias, creating it if needed."""
    weight = torch.zeros_like(linear.weight)
    weight[:, keep.to(weight.device)] = w_s.to(weight.device, weight.dtype)
    linear.weight.copy_(weight)
    if bias_delta is None:
        return
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))
    linear.bias.copy_((linear.bias.double() + bias_delta.to(weight.device)).to(linear.bias.dtype))


# --- layer by layer ----------------------------------------------------------------------------------------------


@dataclass
class _Projection:
    """An output projection to refit and its kept input columns [k] (ascending current indices)."""

    linear: nn.Linear
    keep: torch.Tensor


def _projections(adapter: Adapter, layer: nn.Module, keep: CurrentKeep) -> list[_Projection | None]:
    """[attention output projection, MLP output projection] of one layer, None where no input column goes."""
    shape = adapter.attention_shape(layer)
    att = mlp = None
    if shape.n_query_heads and keep.kept_q is not None and len(keep.kept_q) < shape.n_query_heads:
        heads = torch.tensor(sorted(keep.kept_q), dtype=torch.long)
        cols = (heads[:, None] * shape.head_dim + torch.arange(shape.head_dim)[None, :]).reshape(-1)
        att = _Projection(adapter.attn_out_proj(layer), cols)
    n = adapter.n_channels(layer)
    if n and keep.kept_channels is not None and len(keep.kept_channels) < n:
        mlp = _Projection(adapter.mlp_out_proj(layer), torch.tensor(sorted(keep.kept_channels), dtype=torch.long))
    return [att, mlp]


def _refit(p: _Projection, moments: Moments, config: ReconstructConfig) -> None:
    w_s, delta = refit_columns(p.linear.weight, moments, p.keep, config.ridge, config.form == "centered")
    write_refit(p.linear, p.keep, w_s, delta)


def _dense_layer(
    layer: nn.Module,
    targets: list[_Projection | None],
    hidden: list[torch.Tensor],
    calls: list[Call],
    config: ReconstructConfig,
) -> None:
    """Dense mode, one layer: statistics of the dense stream, refit, and `hidden` advanced through the dense layer."""
    projs = [p for p in targets if p is not None]
    moments = [Moments.zeros(p.linear.in_features, hidden[0].device) for p in projs]
    for b, call in enumerate(calls):
        hidden[b], inputs = run_layer(layer, hidden[b], call, [p.linear for p in projs])
        for m, x in zip(moments, inputs):
            m.add(x)
    for p, m in zip(projs, moments):
        _refit(p, m, config)


def _sequential_attention(
    layer: nn.Module,
    att: _Projection | None,
    dense: list[torch.Tensor],
    pruned: list[torch.Tensor],
    calls: list[Call],
    config: ReconstructConfig,
) -> None:
    """Sequential mode, attention: fit the pruned stream's projection input to the dense layer's output (cross
    moments of the two streams); `dense` is advanced through the dense layer on the way."""
    if att is None:
        for b, call in enumerate(calls):
            dense[b] = run_layer(layer, dense[b], call)[0]
        return
    moments = Moments.zeros(att.linear.in_features, dense[0].device, cross=True)
    for b, call in enumerate(calls):
        dense[b], (t,) = run_layer(layer, dense[b], call, [att.linear])
        _, (x,) = run_layer(layer, pruned[b], call, [att.linear])
        moments.add(x, t)
    _refit(att, moments, config)


def _sequential_mlp(
    layer: nn.Module, mlp: _Projection | None, pruned: list[torch.Tensor], calls: list[Call], config: ReconstructConfig
) -> None:
    """Sequential mode, MLP: fit the unpruned projection on the pruned stream's own input (after this layer's
    refit attention); then `pruned` is advanced through the refit layer."""
    if mlp is not None:
        moments = Moments.zeros(mlp.linear.in_features, pruned[0].device)
        for b, call in enumerate(calls):
            moments.add(run_layer(layer, pruned[b], call, [mlp.linear])[1][0])
        _refit(mlp, moments, config)
    for b, call in enumerate(calls):
        pruned[b] = run_layer(layer, pruned[b], call)[0]


def _warn_underdetermined(tokens: int, widest: int) -> None:
    """Fewer calibration tokens than kept input columns leave the least-squares system underdetermined: only the
    ridge holds the fit, and it follows the calibration tokens (measured in the module docstring)."""
    if tokens <= widest:
        warnings.warn(
            f"reconstruct: {tokens} calibration tokens for up to {widest} kept input columns of one projection: the "
            "refit is underdetermined and overfits the calibration tokens (on SmolLM2-135M, 640 tokens made it worse "
            "than bias compensation); use several times more tokens (e.g. 16 windows of 512) or a larger ridge",
            UserWarning,
            stacklevel=3,
        )


@torch.no_grad()
def reconstruct(ctx: ScoringContext, keeps: Sequence[CurrentKeep], config: ReconstructConfig) -> None:
    """Refit, in place, the output projections of every layer for the units `keeps` (one CurrentKeep per layer,
    current indices) will keep, on the calibration tokens of `ctx`; the removed columns are set to zero and the
    biases of the centred form created where missing. Call before physical removal, in eval mode."""
    materialize(ctx.model)  # the refit writes weights: offloaded ones must be loaded for good
    layers = ctx.adapter.layers()
    targets = [_projections(ctx.adapter, layer, keep) for layer, keep in zip(layers, keeps)]
    todo = [i for i, t in enumerate(targets) if any(p is not None for p in t)]
    if not todo:
        return
    _warn_underdetermined(int(ctx.calib.numel()), max(p.keep.numel() for t in targets for p in t if p is not None))
    kept = [((i, kind), p) for i in todo for kind, p in zip(("attention", "channels"), targets[i]) if p is not None]
    if config.mode == "dense" and all(key in ctx._moments for key, _ in kept):
        # the scores computed these very moments (`obs`): the refit needs no pass of its own
        for key, p in tqdm(kept, desc="reconstruction (dense, kept moments)", disable=not ctx.progress, leave=False):
            _refit(p, ctx._moments[key], config)
        return
    hidden, calls = capture_layer_calls(ctx.model, layers, ctx.batches())
    pruned = list(hidden)  # sequential mode's pruned stream; `hidden` is the dense stream
    steps = tqdm(range(todo[-1] + 1), desc=f"reconstruction ({config.mode})", disable=not ctx.progress, leave=False)
    for i in steps:
        att, mlp = targets[i]
        if config.mode == "dense":
            _dense_layer(layers[i], targets[i], hidden, calls[i], config)
        else:
            _sequential_attention(layers[i], att, hidden, pruned, calls[i], config)
            _sequential_mlp(layers[i], mlp, pruned, calls[i], config)
        calls[i].clear()  # this layer's masks and embeddings are no longer needed
