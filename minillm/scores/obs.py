"""`obs`: structured Optimal Brain Surgeon scores that are consistent with the least-squares refit, minillm's own
forward-only method. It scores a unit by the error that the refit of `minillm.reconstruct` leaves behind when the
unit is removed, not by a proxy for it, and it prunes with that refit (`reconstruct='dense'` by default).

**The cost of removing a block.** For an output projection y = W x + b (o_proj / down_proj and equivalents) with
input second-moment matrix H = Sigma + lambda I on the calibration tokens (Sigma the centred covariance, or the raw
Gram E[x x^T] with `form='uncentered'`; lambda = ridge * mean(diag(Sigma))), removing the input columns B of one
unit (an MLP channel: one column; a query head: its head_dim columns; a KV group: the columns of all its query
heads) and refitting the others by least squares raises the mean squared output error by exactly

    dE_B = tr(W_B ([H^-1]_BB)^-1 W_B^T)

and the optimal change of the surviving columns is W <- W - W_B ([H^-1]_BB)^-1 [H^-1]_B,: (Hassibi & Stork's OBS
for a block; SlimGPT's per-head "grouped" error and per-column error; Týr-the-Pruner's `local_prune_core`). The
inverse then loses the block by its Schur complement, H^-1 <- H^-1 - [H^-1]_:,B ([H^-1]_BB)^-1 [H^-1]_B,:.

**Greedy order per projection.** All units of a projection are removed greedily, in at most `batches` batches (the
cheapest ones first, the costs recomputed after every batch with the weights and the inverse updated), down to the
last unit. The *order* is the method's ranking within a layer; a unit's score is the cumulative error once it is
gone (monotone along the order, so removing the k lowest scores of a layer is the greedy removal of k units), and the
refit of the kept units (`minillm.reconstruct`, dense mode, same form and ridge) writes exactly the greedy OBS
weights W_S + W_R H_RS (H_SS)^-1, both being the ridge-to-original least-squares solution for that set.

**Across layers** (`budget`). The greedy order decides which units of a layer go; how many go in each layer is set
by a ranking of all layers' units together (`allocation='global'`, the default), for which each unit's score is:

* ``flap`` (default): FLAP's standardised fluctuation Var(X_j) ||W_:,j||^2 (`minillm.scores.flap`, computed here
  from the same moments), whose sorted values are laid along the greedy order (rank-matched): every layer keeps the
  widths that FLAP's adaptive structure gives it, and within the layer the OBS order picks the units;
* ``cost``: the same with the one-shot OBS costs, standardised per projection, in place of FLAP's metric;
* ``depth``: SlimGPT's "incremental pruning ratio": layer i of L loses a fraction proportional to
  a + (1 - a) ln(1 + i) / ln(L) of its units (a = 0.25; SlimGPT's README uses 0.0625 at the first layer and 0.25 at
  the last for 20% overall), attention and MLP alike; one global threshold scales the schedule to the sparsity (each
  unit's signal is ln((p + 1/2) / U) - ln(r_i) for its position p of U in the greedy order), so the schedule's shape,
  not its level, is fixed;
* ``cumulative``: the cumulative refit error itself, divided by the projection's output energy tr(W Sigma W^T)
  (`normalize='output'`), by the mean squared norm of the residual stream entering the layer ('stream'), or not at
  all ('none'); one threshold then equalises that relative error over all projections.

Measured on SmolLM2-135M (one seed, 16 x 512 calibration tokens, perplexity on 16 x 512 held-out tokens, dense
24.2; FLAP's selection with the same refit: 28.9 at 20%, 69.6 at 50%): cumulative/output 35.8 and 126.7,
cumulative/stream 29.2 and 87.5, cumulative/none 765 at 50%, per-layer uniform 31.3 and 91.3, ``flap`` 65.3 at 50%.
The OBS order is worth little on its own (uniform widths: 91.3, Wanda-SP's selection with the refit 94.5) and the
error thresholds misjudge how much each layer can lose; FLAP's widths with the OBS order beat FLAP's own selection
under the same refit (65.3 against 69.6, one seed). Hence the default.

**Cost.** One capture pass of the calibration batches (the embedding and one layer: the other layers compute
nothing, `minillm.layerwise.capture_layer_calls`), then one replay of every decoder layer on them with the
output projections' inputs summed into float64 moments, one layer at a time; per projection one Cholesky inverse of
H and at most `batches` rank-|B| updates, O(d^3). The dense refit that follows (`minillm.reconstruct`) needs the
same moments: when it follows (`ScoringContext.keep_moments`, set by `prune`; `minillm.score` sets it for this
method, whose default refit is dense) and all layers' moments take at most KEEP_MOMENTS_MAX_BYTES, each layer's are
kept in CPU memory and the refit is the solves alone, with no second pass; otherwise the refit makes its own pass.
Measured on SmolLM2-135M with 64 x 512 = 32k calibration tokens (fp32, 2 CPU cores, 2 threads, the machine otherwise
idle; `scripts/time_obs.py`, results/refit-timing/): 174 s (172 s of scoring, 2 s of refit), against 298 s in the
same run when the refit makes its own pass (170 s and 127 s), 0.58x. Counted, one pass is about 13 TFLOP (7.5 for
the layers' forward and 5.3 for the float32 Gram products), about 114 s at the 114 GFLOP/s that fp32 matmuls reached
in that run: a two-minute prune at this budget is out of reach on these two cores.

**Memory** beside the weights and the layer forward: the calibration hidden states entering the current layer
(N tokens x hidden, model dtype), the layer's moments (d_ff^2 + d^2 float64) and, during the greedy of the MLP
projection, its covariance, inverse and one update product (d_ff^2 float64 each) plus W in float64; with the
moments kept for the refit, every finished layer's moments too (at most KEEP_MOMENTS_MAX_BYTES, in CPU memory). Simulated
(`python -m minillm bench memory --simulate --model llama3-8b-shape --methods dense obs flap-reconstruct --batch 64
--seqlen 512 --dtype bfloat16`, fake tensors, no GPU; figures/simulated/llama3-8b_64x512_bf16_refit.json): for
Llama-3-8B in bf16 with 64 x 512 = 32k calibration tokens the whole step (scores, refit, surgery) peaks at 23.0 GiB
beside 14.96 GiB of weights (FLAP's selection with the same refit: 21.6 GiB); the dense forward with labels on
the same 32k tokens peaks at 58.4 GiB (its logits). Measured on CPU (SmolLM2-135M, fp32, 16 x 512 tokens, fresh
process, `python -m minillm bench memory --model smollm2-135m --methods obs --batch 16 --seqlen 512`,
results/refit-memory/): obs peaks at 1.80 GiB, 0.64x the dense forward's 2.79 GiB; its increase over the loaded
model, 0.878 GiB (0.60 GiB of it the kept moments; 0.322 GiB before they were kept), is simulated as 0.882 GiB
(+0.5%; `python scripts/simulate_obs_memory.py`, figures/simulated/smollm2-135m_16x512_float32_obs_vs_cpu.json, the
CPU protocol of `simulate.validate_cpu`), so the simulator's obs step is checked against a measurement. (The
simulator's fake device stands for the GPU: there the kept moments, which live in CPU memory, are counted as device
memory, an overestimate for models under the limit; Llama-3-8B is above it, so its figure is not affected.)

References: Hassibi & Stork (NeurIPS 1992, Optimal Brain Surgeon); Frantar & Alistarh (OBC, NeurIPS 2022; SparseGPT,
ICML 2023: the inverse update); SlimGPT (Ling et al., NeurIPS 2024: structured OBS for heads and FFN columns with
greedy batches and a least-squares refit); Týr-the-Pruner (NeurIPS 2025: the same block cost and refit).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..allocate import LayerScores
from ..layerwise import Moments, as_float64, capture_layer_calls, run_layer, shifted_cholesky
from ..offload import loaded
from . import MethodSpec
from .common import ScoringContext
from .flap import zscore

SPEC = MethodSpec(
    needs_calibration=True,
    default_allocation="global",
    default_reconstruct="dense",
    default_calibration=(32, 512),  # 16k tokens: ten times the 1536-wide MLP input of SmolLM2 (see the docstring)
)
NORMALIZE = ("output", "stream", "none")
BUDGETS = ("cumulative", "flap", "cost", "depth")
#: SlimGPT's log-increasing depth schedule, relative: the first layer loses a quarter of the last layer's fraction
#: (its README's 0.0625 -> 0.25 for 20% overall)
DEPTH_MIN_RATIO = 0.25
FORMS = ("centered", "uncentered")
#: relative ridge of the OBS inverse (the refit's default, minillm.reconstruct.DEFAULT_RIDGE)
RIDGE = 1e-2
#: when a dense refit follows (`ScoringContext.keep_moments`) the scores keep every layer's moments in CPU memory for
#: it, so that it needs no second pass over the calibration tokens, if they take at most this many bytes together
#: (float64: SmolLM2-135M 0.60 GiB, Gemma 3 270M 0.70 GiB; Llama-3-8B would need 53 GiB and its refit makes its own
#: pass)
KEEP_MOMENTS_MAX_BYTES = 2 * 2**30


def _inverse(h: torch.Tensor, ridge: float) -> torch.Tensor:
    """(h + lambda I)^-1 for symmetric PSD h, lambda = ridge * mean(diag(h)); a dead column (zero variance) gets a
    tiny lambda so that the inverse exists."""
    d = h.shape[0]
    lam = ridge * float(h.diagonal().mean()) if d else 0.0
    lam = max(lam, 1e-12 * max(float(h.diagonal().max()) if d else 0.0, 1e-30))
    a, chol = shifted_cholesky(h.clone(), lam)  # h itself is still needed by the caller
    if chol is None:
        return torch.linalg.pinv(a, hermitian=True)
    del a
    return torch.cholesky_inverse(chol)


def _block_costs(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tr(W_B ([H^-1]_BB)^-1 W_B^T) for every block, idx [U, b] (blocks of equal width b)."""
    if idx.shape[1] == 1:  # single columns: ||W_:,j||^2 / [H^-1]_jj, without U one-by-one solves
        cols = idx[:, 0]
        return w[:, cols].pow(2).sum(0) / hinv.diagonal()[cols]
    hb = hinv[idx[:, :, None], idx[:, None, :]]  # [U, b, b], principal blocks of a positive definite matrix
    wb = w[:, idx].permute(1, 2, 0)  # [U, b, m]
    # a batched Cholesky solve, not torch.linalg.solve: on CPU, torch 2.13's batched LU (MKL) raises "Pivots given to
    # lu_solve must all be greater or equal to 1" or returns wrong values for 192-wide blocks (SmolLM2's KV groups)
    # once torch.set_num_threads has been called with 2 threads (Bonsai's regression does so); the batched Cholesky
    # and the unbatched LU are not affected (tests/test_obs.py)
    chol, info = torch.linalg.cholesky_ex(hb)
    if bool((info != 0).any()):  # a block that is not numerically positive definite: one LU solve per block
        return torch.stack([(wb[u] * torch.linalg.solve(hb[u], wb[u])).sum() for u in range(hb.shape[0])])
    return (wb * torch.cholesky_solve(wb, chol)).sum((1, 2))


def greedy_removal(
    weight: torch.Tensor, h: torch.Tensor, blocks: torch.Tensor, ridge: float = RIDGE, batches: int = 64,
    ordered: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """Greedy structured OBS removal of every unit of one projection.

    weight W [m, d]; h [d, d] the input's second-moment matrix (covariance, or raw Gram); blocks [U, b] the input
    columns of each unit (equal widths). Units go in at most `batches` batches, the cheapest first, the costs
    recomputed after each batch. Returns (the units in removal order, the cumulative error [U] once each is gone,
    per token and in the units of ||W x||^2). The cumulative error is exact for the quadratic objective with the
    ridge: after removing a set, it equals tr((W - W') H (W - W')^T) for the refit W' of the kept columns.
    ordered: the caller guarantees that blocks.reshape(-1) is 0 ... d-1 (each unit's columns contiguous, in unit
    order: every stock output projection), so the inverse needs no reordered d x d copy."""
    w = weight.detach().to(torch.float64)
    hinv = _inverse(h.to(w.device, torch.float64), ridge)
    n_units, width = blocks.shape
    # columns reordered so that unit p's columns are p*width ... (p+1)*width - 1, the columns of no unit last; after
    # every batch the removed units' rows and columns are dropped, so the updates shrink with the active set
    # The bookkeeping of which units are left is host-side (Python lists, index tensors of known length, no boolean
    # masks), so that the loop's shapes never depend on tensor values and it also runs under the memory simulator's
    # fake tensors (minillm.bench.simulate), whose stand-in values could not end it.
    covered = blocks.reshape(-1).to(w.device)
    if ordered:
        if covered.numel() != w.shape[1]:
            raise ValueError(f"ordered blocks must cover all {w.shape[1]} columns, got {covered.numel()}")
        w = w.clone()  # already in unit order: no d x d copy of the inverse (this function updates w in place)
    else:
        if covered.numel() < w.shape[1]:  # columns of no unit go last
            rest = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
            rest[covered] = False
            covered = torch.cat([covered, rest.nonzero().flatten()])
        w, hinv = w[:, covered], hinv[covered[:, None], covered]
    per_batch = max(1, math.ceil(n_units / max(int(batches), 1)))
    alive = list(range(n_units))  # unit ids by position
    order: list[int] = []
    cumulative = torch.zeros(n_units, dtype=torch.float64)
    total = 0.0
    while alive:
        n_alive = len(alive)
        idx = torch.arange(n_alive * width, device=w.device).reshape(n_alive, width)
        costs = _block_costs(w, hinv, idx).cpu()
        ranked = torch.argsort(costs, stable=True)[:per_batch]
        cols = idx[ranked.to(w.device)].reshape(-1)
        hbb = hinv[cols][:, cols]
        increment = max(float((w[:, cols] * (w[:, cols] @ torch.linalg.inv(hbb))).sum()), 0.0)
        k = torch.linalg.solve(hbb, hinv[cols])  # ([H^-1]_BB)^-1 [H^-1]_B,:  [|B|, d]
        w.sub_(w[:, cols] @ k)  # in place: w and hinv are this function's own copies (indexed above)
        hinv.sub_(hinv[:, cols] @ k)
        # the batch's units get increasing scores between the error before and after it, in their own cost order
        steps = costs[ranked].cumsum(0)
        span = float(steps[-1]) if float(steps[-1]) > 0 else 1.0
        gone = ranked.tolist()
        chosen = [alive[p] for p in gone]
        cumulative[torch.tensor(chosen, dtype=torch.long)] = total + increment * steps / span
        total += increment
        order += chosen
        gone_set = set(gone)
        stay = [p for p in range(n_alive) if p not in gone_set]
        stay_idx = torch.tensor(stay, dtype=torch.long, device=w.device)
        keep = torch.cat([idx[stay_idx].reshape(-1), torch.arange(n_alive * width, w.shape[1], device=w.device)])
        w, hinv, alive = w[:, keep], hinv[keep[:, None], keep], [alive[p] for p in stay]
    return order, cumulative


def _unit_blocks(ctx: ScoringContext, layer) -> torch.Tensor | None:
    """[U, b] input columns of o_proj per attention unit (KV group: all its query heads' columns); flattened they are
    0 ... n_heads * head_dim - 1 in order (`greedy_removal`'s `ordered`)."""
    shape = ctx.adapter.attention_shape(layer)
    if not shape.n_query_heads:
        return None
    heads = torch.arange(shape.n_query_heads)
    if ctx.unit(layer) == "kv_group":
        heads = heads.reshape(shape.n_kv_heads, shape.group_size)
    else:
        heads = heads[:, None]
    cols = heads[:, :, None] * shape.head_dim + torch.arange(shape.head_dim)[None, None, :]
    return cols.reshape(heads.shape[0], -1)


def _budget_signal(kind: str, weight, moments: Moments, blocks: torch.Tensor, budget: str, ridge: float):
    """Per unit, the standardised value whose global ranking sets how many units each projection loses:
    'flap': FLAP's fluctuation Var(X_j) ||W_:,j||^2 (attention: squared and standardised over the columns, then
    averaged over each unit's columns; channels: standardised), 'cost': the one-shot OBS costs, standardised."""
    if budget == "cost":
        h, _, _, _ = moments.second_moments(centered=True)
        idx = blocks.to(weight.device)
        return zscore(_block_costs(weight, _inverse(h, ridge), idx))
    n = max(moments.n, 1)
    variance = moments.xx.diagonal() / n - (moments.sum_x / n) ** 2  # the diagonal only: no d x d copy
    metric = variance * weight.pow(2).sum(0)
    if kind == "attention":
        return zscore(metric.pow(2))[blocks.to(metric.device)].mean(1)
    return zscore(metric)


def depth_schedule(n_layers: int, first: float = DEPTH_MIN_RATIO) -> list[float]:
    """SlimGPT's log-increasing per-layer pruning fractions, relative to the last layer's (1.0)."""
    if n_layers < 2:
        return [1.0] * n_layers
    return [first + (1 - first) * math.log(1 + i) / math.log(n_layers) for i in range(n_layers)]


def _depth_signal(order: list[int], ratio: float) -> torch.Tensor:
    """Budget 'depth': ln((p + 1/2) / U) - ln(ratio) for the unit at position p of the greedy order; a global
    threshold t removes the units with (p + 1/2) / U < ratio * e^t, a fraction of the layer proportional to `ratio`."""
    n = len(order)
    signal = torch.empty(n, dtype=torch.float64)
    signal[torch.tensor(order, dtype=torch.long)] = torch.log((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return signal - math.log(ratio)


def _scores(linear, moments: Moments, blocks, kind: str, centered: bool, scale, ridge, batches, budget: str,
            depth_ratio: float = 1.0):
    """One projection's unit scores: the cumulative errors divided by `scale` (None: by its own output energy), with
    budget 'flap' / 'cost' that signal's sorted values laid along the greedy order (rank-matched), with 'depth' the
    layer's schedule (`depth_ratio`) laid along it."""
    with loaded(linear):
        weight = as_float64(linear.weight, moments.xx.device)
    h, _, _, _ = moments.second_moments(centered)
    order, cumulative = greedy_removal(weight, h, blocks, ridge, batches, ordered=True)  # see _unit_blocks
    if budget == "depth":
        return _depth_signal(order, depth_ratio)
    if budget != "cumulative":
        signal = _budget_signal(kind, weight, moments, blocks, budget, ridge).cpu()
        ranked = torch.empty_like(signal)
        ranked[torch.tensor(order)] = torch.sort(signal).values
        return ranked
    if scale is None:
        scale = float((weight @ h * weight).sum())
    return cumulative / max(scale, 1e-30)


@torch.no_grad()
def score(
    ctx: ScoringContext,
    normalize: str = "output",
    form: str = "centered",
    ridge: float = RIDGE,
    batches: int = 64,
    budget: str = "flap",
) -> list[LayerScores]:
    """Per unit, the refit's cumulative output error once the greedy OBS order reaches it (module docstring)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
    adapter = ctx.adapter
    layers = adapter.layers()
    hidden, calls = capture_layer_calls(ctx.model, layers, ctx.batches())
    ratios = depth_schedule(len(layers))
    keep = ctx.keep_moments and _moments_bytes(ctx) <= KEEP_MOMENTS_MAX_BYTES
    out = []
    for i in tqdm(range(len(layers)), desc="OBS scores", disable=not ctx.progress, leave=False):
        layer = layers[i]
        blocks = _unit_blocks(ctx, layer)
        projs = []
        if blocks is not None:
            projs.append(("attention", adapter.attn_out_proj(layer), blocks))
        n_ch = adapter.n_channels(layer)
        if n_ch:
            projs.append(("channels", adapter.mlp_out_proj(layer), torch.arange(n_ch)[:, None]))
        moments = [Moments.zeros(lin.in_features, hidden[0].device) for _, lin, _ in projs]
        stream, tokens = 0.0, 0
        for b, call in enumerate(calls[i]):
            stream += float(hidden[b].double().pow(2).sum())
            tokens += hidden[b].shape[0] * hidden[b].shape[1]
            hidden[b], inputs = run_layer(layer, hidden[b], call, [lin for _, lin, _ in projs])
            for m, x in zip(moments, inputs):
                m.add(x)
        calls[i].clear()
        scale = {"output": None, "stream": stream / max(tokens, 1), "none": 1.0}[normalize]
        found = {
            kind: _scores(lin, m, blk, kind, form == "centered", scale, ridge, batches, budget, ratios[i]).float()
            for (kind, lin, blk), m in zip(projs, moments)
        }
        out.append(LayerScores(found.get("attention"), found.get("channels")))
        if keep:
            ctx._moments.update({(i, kind): m.to("cpu") for (kind, _, _), m in zip(projs, moments)})
    return out


def _moments_bytes(ctx: ScoringContext) -> int:
    """Bytes of every layer's float64 moments of its output projections' inputs (the Grams and the sums)."""
    total = 0
    for layer in ctx.adapter.layers():
        widths = []
        if _unit_blocks(ctx, layer) is not None:
            widths.append(ctx.adapter.attn_out_proj(layer).in_features)
        if ctx.adapter.n_channels(layer):
            widths.append(ctx.adapter.mlp_out_proj(layer).in_features)
        total += sum(8 * (d * d + d) for d in widths)
    return total
