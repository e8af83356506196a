"""`bonsai`: forward-only perturbative structured pruning (Dery, Kolawole et al., "Everybody Prune Now"),
following the official code (ldery/Bonsai@2f911d7: `main.py` `investigate_score_based_mask`,
`get_random_mask_scores`, `run_data_to_sampling_proba`; `lib/scoring_model.py` `ScoreModelHP`, `ScoreModel`;
the paper is arXiv 2402.05406). `tests/peers/test_bonsai_peer.py` holds each step against a transcription.

Each round, on the current model, with p the round's fraction of the original prunable parameters:
1. prior scores per unit (Wanda-style by default) on the round's calibration windows;
2. per module (each layer's attention, each layer's MLP): the top floor(N (1 - 2p)) units by prior are frozen, the
   rest are candidates, dropped with probability proportional to (max prior - prior);
3. K/2 random sub-model masks (floor(p N) + 1 candidates dropped per module) and their antithetic complements
   (kept and dropped candidates swapped, frozen units untouched) are evaluated with forward passes only, through
   virtual masks; each gives y = -perplexity on the same windows (capped at 1e8);
4. a linear model y ~ b0 + beta . x over every candidate of every module (x = 1 if kept):
   * `regression='adam'` (default, the official fit): L1-penalised MSE trained with Adam from zero, learning rate
     1 / (candidates x factor), ReduceLROnPlateau and early stopping on held-out Kendall tau (tau-b), over the
     official grid of penalties {100, 1e-4, 0} x factors {100, 10, 1, 0.1} x minibatch sizes {32, 64, 128},
     chosen by mean tau over 5 contiguous folds and refitted on all samples; coefficients are almost never
     exactly zero;
   * `regression='lasso'`: the exact lasso solved by FISTA with the penalty chosen the same way (faster, but at
     its chosen penalty most coefficients are exactly zero, see below);
5. candidates are ranked globally by beta (attention and MLP together), ties broken by the prior (lowest first),
   and the lowest are removed while their parameter cost fits the round's budget p * P0;
6. the removal is physical, and rounds repeat until the target sparsity; the last round's p is clipped to what
   is left (the official code clips its `prune_frac`, which also narrows that round's candidates and drops).

Official defaults (README command for Llama-2-7B): 200 masks per round, p = 0.05, 32 calibration windows of the
model's full context (4,096 tokens), the Wanda prior. The defaults here are smaller so that CPU runs finish.

Differences from the official code, chosen and stated:
* The official stops when the sparsity is within 0.02 of the target; we continue until less than half a unit's
  cost is left, so every method lands on the same sparsity. To get there in one round, the last (clipped) round
  passes over candidates that do not fit its budget and takes the next ones that do; with the official prefix rule
  alone, a KV group (294,912 parameters in SmolLM2) early in the order stopped each tail round after a few channels,
  and the cpu run at 20% was still in round 9, removing 3 channels a round, when it was stopped.
* The prior's activation RMS is taken over all tokens of the round's windows (official: the mean over batches of
  per-batch values; identical with one batch).
* For GQA the attention unit is a whole KV group by default (the official code is LLaMA-1/2 MHA only).
* Every source of randomness (windows, masks, minibatch order) is seeded from `seed` (the official code leaves
  Python's `random` unseeded and uses NumPy's global state).
* Small modules. The official draw zeroes floor(p N) + 1 units among a module's candidates; with SmolLM2's 3 KV
  groups a layer (N = 3, one candidate at p = 0.05 or 0.1) that is every candidate (NumPy's `choice` in the
  official code raises when it is more). Every random mask would then drop all layers' attention candidates
  together and every complement keep them, so the attention columns of the regression are identical, the fit
  gives them one shared coefficient, and which KV group goes is decided by the prior alone (across layers, where
  the prior is not comparable). Such a module drops each candidate with probability 1/2 instead, independently
  per mask, so that its columns are identifiable. Measured on SmolLM2 with the cpu-full settings (32 masks, p = 0.1,
  seed 0): with the shared-column draw, 10% removed layer 0's weakest KV group and reached PPL 89.1, 20% removed 9
  KV groups in layers 0-9 and reached 193.6 (dense 20.8). The cpu-full accuracy records of `bonsai`
  (figures/cpu-full/accuracy.md) were made with this rule; `scripts/bonsai_investigation.py` reruns the variants.
* Ties in beta: the official `np.argsort` (quicksort) leaves their order to the sort; we break them by the prior.
  With `regression='lasso'` ties are the rule (in the earlier cpu-full records 33 of 9,270 candidates had a
  non-zero coefficient in round 0), and breaking them by position removed the earliest layers first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..allocate import AllocationConfig, attention_keep, attention_unit_cost, is_balanced_gqa, n_attention_units
from ..offload import loaded
from ..surgery import CurrentKeep, GQAConstraintError, VirtualMasks, prunable_params
from . import MethodSpec
from .common import ScoringContext, lm_loss, member_key

SPEC = MethodSpec(needs_calibration=True, scores_and_removes=True, default_allocation="global")
PRIORS = ("wanda", "magnitude", "random")
REGRESSIONS = ("adam", "lasso")
#: the official regression grid (main.py: --sm_reg_weight, --sm_lr_factor, --sm_bsz, --sm_nepochs; patience 10)
ADAM_GRID = {"reg_weight": (1e2, 1e-4, 0.0), "lr_factor": (100.0, 10.0, 1.0, 0.1), "batch_size": (32, 64, 128)}
ADAM_EPOCHS, ADAM_PATIENCE, CV_FOLDS = 50, 10, 5


@dataclass
class Module:
    """One prunable module of the current model: a layer's attention (units = attention units) or MLP."""

    layer: int
    kind: str  # "attention" | "mlp"
    n_units: int
    unit_cost: int
    prior: torch.Tensor  # [n_units]
    frozen: torch.Tensor  # bool [n_units]
    drop_prob: torch.Tensor  # [n_units], 0 for frozen

    @property
    def candidates(self) -> torch.Tensor:
        return (~self.frozen).nonzero().flatten()


# --- step 1-2: priors and candidates ----------------------------------------------------------------------------


def priors(ctx: ScoringContext, calib: torch.Tensor, kind: str, gen: torch.Generator) -> list[tuple]:
    """Per layer (attention unit prior or None, channel prior or None) on the current model."""
    adapter = ctx.adapter
    stats = {}
    if kind != "random":
        # the round's windows on the current (already pruned) model: a context of its own, so its own statistics
        sub = ScoringContext(ctx.model, adapter, calib, ctx.attention_units, ctx.seed, False, ctx.batch_size)
        stats = sub.input_stats("out")
    out = []
    for i, layer in enumerate(adapter.layers()):
        with loaded(layer):
            out.append(_layer_priors(ctx, stats, kind, gen, i, layer))
    return out


def _layer_priors(ctx: ScoringContext, stats: dict, kind: str, gen: torch.Generator, i: int, layer) -> tuple:
    adapter = ctx.adapter
    shape = adapter.attention_shape(layer)
    unit = ctx.unit(layer)
    att = ch = None
    for which in ("attention", "mlp"):
        n = n_attention_units(unit, shape) if which == "attention" else adapter.n_channels(layer)
        if not n:
            continue
        if kind == "random":
            value = torch.rand(n, generator=gen, dtype=torch.float64)
        else:
            member = (adapter.attention_members(layer) if which == "attention" else adapter.mlp_members(layer))[-1]
            st = stats[member_key(i, member)]
            rms = (st.sumsq / max(st.n, 1)).sqrt()
            col = (
                member.linear.weight.detach().float().abs().mean(0) * rms.to(member.linear.weight.device)
                if kind == "wanda"
                else rms
            )  # 'magnitude': activation size alone
            col = col.double().cpu()
            if which == "attention":
                per_head = col.reshape(shape.n_query_heads, -1).mean(1)
                value = per_head.reshape(shape.n_kv_heads, -1).mean(1) if unit == "kv_group" else per_head
            else:
                value = col
        if which == "attention":
            att = value
        else:
            ch = value
    return att, ch


def make_module(layer: int, kind: str, prior: torch.Tensor, unit_cost: int, p: float) -> Module:
    n = prior.numel()
    order = torch.argsort(prior, descending=True, stable=True)
    frozen = torch.zeros(n, dtype=torch.bool)
    frozen[order[: int(math.floor(n * (1 - 2 * p)))]] = True
    weight = (prior.max() - prior).clamp_min(0) * (~frozen)
    if weight.sum() <= 0:
        weight = (~frozen).double()
    return Module(layer, kind, n, unit_cost, prior, frozen, weight / weight.sum())


# --- step 3: masks --------------------------------------------------------------------------------------------


def sample_masks(modules: list[Module], n_masks: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Binary keep-masks over all candidates, [n_masks, n_candidates], as antithetic pairs: row 2k is a random
    draw (floor(p N) + 1 candidates dropped per module, without replacement, by drop probability), row 2k + 1 its
    complement over the candidates. A module with no more candidates than that count (a layer's 3 KV groups) drops
    each candidate with probability 1/2 instead (see the module docstring)."""
    total = sum(m.candidates.numel() for m in modules)
    x = torch.ones(n_masks, total)
    for k in range(0, n_masks, 2):
        offset = 0
        for m in modules:
            cand = m.candidates
            n_drop = int(math.floor(p * m.n_units)) + 1
            if n_drop >= cand.numel():
                drop = (torch.rand(cand.numel(), generator=gen) < 0.5).nonzero().flatten()
            else:
                drop = torch.multinomial(m.drop_prob[cand].float(), n_drop, replacement=False, generator=gen)
            x[k, offset + drop] = 0.0
            offset += cand.numel()
        if k + 1 < n_masks:
            x[k + 1] = 1.0 - x[k]
    return x


def expand_masks(modules: list[Module], row: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Full per-unit keep-masks per module from one row of candidate flags (frozen units kept)."""
    att, mlp = {}, {}
    offset = 0
    for m in modules:
        full = torch.ones(m.n_units)
        cand = m.candidates
        full[cand] = row[offset : offset + cand.numel()]
        offset += cand.numel()
        (att if m.kind == "attention" else mlp)[m.layer] = full
    return att, mlp


# --- step 4: regression ---------------------------------------------------------------------------------------


def kendall_tau(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall tau-b (scipy's `kendalltau`, which the official code uses) between each row of pred [..., m] and
    y [m]; nan where either side is constant."""
    dp = torch.sign(pred[..., :, None] - pred[..., None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    untied = (dp != 0).sum((-1, -2)).to(dp.dtype) * (dy != 0).sum().to(dp.dtype)
    return (dp * dy).sum((-1, -2)) / untied.sqrt()


def _fista(
    x: torch.Tensor, y: torch.Tensor, n_rows: torch.Tensor, lambdas: torch.Tensor, iters: int, tol: float = 1e-5
) -> torch.Tensor:
    """Batched lasso: for every problem f (x [F, K, C], y [F, K], zero rows as padding, n_rows [F] real rows) and
    every penalty, min_b (1/2n) ||x_f b - y_f||^2 + lam ||b||_1 by FISTA. Returns [F, n_lambda, C]."""
    lipschitz = (torch.linalg.matrix_norm(x, ord=2) ** 2 / n_rows).clamp_min(1e-12)  # [F]
    step = (1.0 / lipschitz)[:, None, None]
    b = x.new_zeros(x.shape[0], lambdas.numel(), x.shape[2])
    z, t = b.clone(), 1.0
    shrink = step * lambdas[None, :, None]
    xt = x.transpose(1, 2).contiguous()
    for it in range(iters):
        resid = torch.bmm(z, xt) - y[:, None, :]
        grad = torch.bmm(resid, x) / n_rows[:, None, None]
        nb = z - step * grad
        nb = torch.sign(nb) * (nb.abs() - shrink).clamp_min(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = nb + ((t - 1) / t_next) * (nb - b)
        converged = it % 20 == 19 and float((nb - b).abs().max()) <= tol * float(nb.abs().max().clamp_min(1e-12))
        b, t = nb, t_next
        if converged:
            break
    return b


def fit_regression(
    x: torch.Tensor, y: torch.Tensor, regression: str = "adam", gen: torch.Generator | None = None
) -> tuple[torch.Tensor, dict]:
    """Linear model of y [K] on candidate keep-flags x [K, C]: beta [C] (higher = removing the unit hurts more) and
    fit information. `regression` is 'adam' (the official fit) or 'lasso'."""
    if regression == "adam":
        return fit_adam(x, y, gen if gen is not None else torch.Generator().manual_seed(0))
    if regression == "lasso":
        return fit_lasso(x, y)
    raise ValueError(f"bonsai regression must be one of {REGRESSIONS}, got {regression!r}")


def _folds(k: int, folds: int = CV_FOLDS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The official split: fold f holds out samples [f * (k // folds), (f + 1) * (k // folds)); the k % folds
    samples at the end are always trained on."""
    size = k // folds
    out = []
    for f in range(folds):
        held = torch.arange(f * size, (f + 1) * size)
        out.append((held, torch.cat([torch.arange(0, f * size), torch.arange((f + 1) * size, k)])))
    return out


def _adam_fit(
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_te: torch.Tensor,
    y_te: torch.Tensor,
    hp: tuple[float, float, int],
    gen: torch.Generator,
) -> tuple[float, torch.Tensor]:
    """One official `ScoreModel.update_with_info`: beta and bias start at zero; Adam at lr 1 / (nnz(mean x) x
    factor) on MSE + reg_weight * |beta|_1; ReduceLROnPlateau on held-out tau (x0.5, patience 3, min 1e-5); the
    epoch with the best held-out tau (ties: the later) is kept; stop 10 epochs after it. Targets are centred by
    the training mean. Returns (best held-out tau, beta [C])."""
    reg_weight, lr_factor, batch_size = hp
    mean_y = y_tr.mean()
    y_tr, y_te = y_tr - mean_y, y_te - mean_y
    weight = torch.zeros(x_tr.shape[1], 1, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    nnz = max(int((x_tr.mean(0) != 0).sum()), 1)
    opt = torch.optim.Adam([weight, bias], lr=1.0 / (nnz * lr_factor))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3, min_lr=1e-5)
    best_tau, best, since_best = -1e5, None, 0
    for _ in range(ADAM_EPOCHS):
        perm = torch.randperm(y_tr.numel(), generator=gen)
        for start in range(0, perm.numel(), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.mse_loss(x_tr[idx] @ weight + bias, y_tr[idx, None]) + weight.abs().sum() * reg_weight
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            tau = float(kendall_tau((x_te @ weight + bias).flatten(), y_te))
        if tau >= best_tau:
            best_tau, best, since_best = tau, weight.detach().flatten().clone(), 0
        sched.step(tau)
        since_best += 1
        if since_best > ADAM_PATIENCE:
            break
    return best_tau, (best if best is not None else weight.detach().flatten().clone())


def fit_adam(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The official regression (`ScoreModelHP.search_best_linear_fit`, fp32): every point of ADAM_GRID is scored
    by its mean held-out tau over 5 contiguous folds (nan when a fold is constant, which disqualifies the point),
    the best (first on ties) is refitted on all samples, early-stopped on its own training tau."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny steps: thread start-up costs more than it saves
    try:
        return _fit_adam(x.float(), y.float(), gen)
    finally:
        torch.set_num_threads(threads)


def _fit_adam(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    k = x.shape[0]
    grid = [(r, f, b) for r in ADAM_GRID["reg_weight"] for f in ADAM_GRID["lr_factor"] for b in ADAM_GRID["batch_size"]]
    splits = _folds(k)
    best_hp, best_tau, taus = None, float("-inf"), []
    if k // CV_FOLDS >= 2:  # a held-out fold needs two samples for a rank correlation
        for hp in grid:
            tau = sum(_adam_fit(x[tr], y[tr], x[te], y[te], hp, gen)[0] for te, tr in splits) / len(splits)
            taus.append(round(tau, 4))
            if tau > best_tau:
                best_tau, best_hp = tau, hp
    if best_hp is None:  # too few samples (or every point nan): the official code would fail; no penalty
        best_hp = (0.0, 1.0, ADAM_GRID["batch_size"][0])
    _, beta = _adam_fit(x, y, x, y, best_hp, gen)
    info = {
        "regression": "adam",
        "reg_weight": best_hp[0],
        "lr_factor": best_hp[1],
        "batch_size": best_hp[2],
        "cv_kendall_tau": best_tau if best_tau > float("-inf") else float("nan"),
        "cv_kendall_tau_all": taus,
        "nonzero": int((beta != 0).sum()),
    }
    return beta.double(), info


def fit_lasso(
    x: torch.Tensor, y: torch.Tensor, folds: int = 5, factors=(0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3), iters: int = 300
) -> tuple[torch.Tensor, dict]:
    """L1 linear regression of y [K] on x [K, C]; the penalty (lambda_max times a factor) is chosen by mean held-out
    Kendall tau over `folds` contiguous folds, then refitted on all samples. All folds and penalties are solved
    together in one batched FISTA run. Returns (beta [C], fit info)."""
    x, y = x.double(), y.double()
    k = x.shape[0]
    y_scale = y.std().clamp_min(1e-12)
    ys = y / y_scale
    folds = max(1, min(folds, k // 2))  # every held-out fold needs two samples for a rank correlation
    bounds = torch.linspace(0, k, folds + 1).round().long().tolist()
    splits = [
        (
            torch.arange(bounds[f], bounds[f + 1]),
            torch.cat([torch.arange(0, bounds[f]), torch.arange(bounds[f + 1], k)]),
        )
        for f in range(folds)
    ]
    splits = [(h, t) for h, t in splits if h.numel() >= 2]
    splits.append((torch.arange(0), torch.arange(k)))  # the final refit on everything, solved in the same batch
    xs = x.new_zeros(len(splits), k, x.shape[1])
    yt = x.new_zeros(len(splits), k)
    means = []
    for f, (_, train) in enumerate(splits):
        mean_x, mean_y = x[train].mean(0), ys[train].mean()
        xs[f, : train.numel()] = x[train] - mean_x
        yt[f, : train.numel()] = ys[train] - mean_y
        means.append(mean_x)
    n_rows = torch.tensor([t.numel() for _, t in splits], dtype=torch.float64)
    lam_max = float((xs[-1].T @ yt[-1]).abs().max() / k) or 1.0
    lambdas = torch.tensor(factors, dtype=torch.float64) * lam_max
    b = _fista(xs, yt, n_rows, lambdas, iters)
    taus = [kendall_tau(((x[held] - means[f]) @ b[f].T).T, ys[held]) for f, (held, _) in enumerate(splits[:-1])]
    mean_tau = torch.stack(taus).mean(0) if taus else torch.full((len(factors),), float("nan"), dtype=torch.float64)
    if torch.isnan(mean_tau).all():  # too few samples (or constant folds) to cross-validate: no penalty
        best = factors.index(min(factors))
    else:
        best = int(torch.argmax(torch.nan_to_num(mean_tau, nan=-2.0)))
    beta = b[-1, best] * y_scale
    info = {
        "regression": "lasso",
        "lambda_factor": factors[best],
        "lambda": float(lambdas[best]),
        "cv_kendall_tau": float(mean_tau[best]),
        "cv_kendall_tau_all": [round(float(t), 4) for t in mean_tau],
        "nonzero": int((beta != 0).sum()),
    }
    return beta, info


# --- step 5-6: selection and rounds -----------------------------------------------------------------------------


def select_removals(
    modules: list[Module], beta: torch.Tensor, budget: float, fill: bool = False
) -> list[tuple[int, str, int]]:
    """(layer, kind, unit) of the lowest-beta candidates whose cumulative parameter cost stays within budget (the
    official prefix rule: stop at the first unit that does not fit). Ties in beta are broken by the prior (lowest
    first); only units equal in both fall back to their position. `fill` (the last round) passes over units that do
    not fit and takes the next ones that do, so that the target is reached in that round."""
    entries = [
        (float(beta[j]), float(m.prior[u]), m.layer, m.kind, u, m.unit_cost)
        for j, (m, u) in enumerate((m, u) for m in modules for u in m.candidates.tolist())
    ]
    entries.sort(key=lambda e: e[:5])
    chosen, spent = [], 0
    for _, _, layer, kind, u, cost in entries:
        if spent + cost > budget:
            if fill:
                continue
            break
        spent += cost
        chosen.append((layer, kind, u))
    return chosen


def _neg_ppl_evaluator(ctx: ScoringContext, windows: torch.Tensor) -> Callable:
    adapter = ctx.adapter
    units = {i: ctx.unit(layer) for i, layer in enumerate(adapter.layers())}
    batches = [windows[i : i + ctx.batch_size].to(ctx.device) for i in range(0, windows.shape[0], ctx.batch_size)]
    tokens = sum(b[:, 1:].numel() for b in batches)

    @torch.no_grad()
    def evaluate(att: dict[int, torch.Tensor], mlp: dict[int, torch.Tensor]) -> float:
        heads = {}
        for i, unit_mask in att.items():
            shape = adapter.attention_shape(adapter.layers()[i])
            removed = (unit_mask == 0).nonzero().flatten().tolist()
            kept_q, _ = attention_keep(units[i], shape, removed)
            hm = torch.zeros(shape.n_query_heads)
            hm[kept_q] = 1.0
            heads[i] = hm
        with VirtualMasks(adapter, heads, mlp):
            nll = sum(float(lm_loss(ctx.model, b)) * b[:, 1:].numel() for b in batches) / tokens
        return -min(math.exp(min(nll, 700.0)), 1e8)

    return evaluate


def fit_round(
    ctx: ScoringContext,
    modules: list[Module],
    evaluate: Callable,
    n_masks: int,
    p: float,
    gen: torch.Generator,
    regression: str = "adam",
) -> tuple[torch.Tensor, dict]:
    """Steps 3-4 of a round: sample masks, score the sub-models, regress; one coefficient per candidate, in the
    order of `candidate_units(modules)`."""
    x = sample_masks(modules, n_masks, p, gen)
    ys = []
    for row in tqdm(x, desc="bonsai sub-models", disable=not ctx.progress, leave=False):
        ys.append(evaluate(*expand_masks(modules, row)))
    y = torch.tensor(ys, dtype=torch.float64)
    beta, info = fit_regression(x, y, regression, gen)
    info.update({"masks": n_masks, "candidates": int(x.shape[1]), "y_mean": float(y.mean()), "y_std": float(y.std())})
    return beta, info


def candidate_units(modules: list[Module]) -> list[tuple[int, str, int]]:
    """(layer, kind, unit) of every candidate, in the column order of the masks."""
    return [(m.layer, m.kind, u) for m in modules for u in m.candidates.tolist()]


def run_round(
    ctx: ScoringContext,
    modules: list[Module],
    evaluate: Callable,
    n_masks: int,
    p: float,
    budget: float,
    gen: torch.Generator,
    regression: str = "adam",
    fill: bool = False,
) -> tuple[list[tuple[int, str, int]], dict]:
    beta, info = fit_round(ctx, modules, evaluate, n_masks, p, gen, regression)
    return select_removals(modules, beta, budget, fill), info


def first_round_coefficients(
    ctx: ScoringContext, n_masks: int = 32, p: float = 0.1, prior: str = "wanda", regression: str = "adam"
) -> dict[tuple[int, str, int], tuple[float, float]]:
    """(coefficient, prior) of every candidate of one Bonsai round on the unpruned model, scored on all of
    `ctx.calib`: the regression's estimate of each unit's value (units outside the candidates are absent). A
    diagnostic of how well the regression ranks units (the `oracle_bonsai` table of `fms_diagnostics`); pruning never
    calls it."""
    gen = torch.Generator().manual_seed(ctx.seed)
    alloc = AllocationConfig(allocation="global", attention_units=ctx.attention_units)
    modules = _round_modules(ctx, alloc, priors(ctx, ctx.calib, prior, gen), p)
    beta, _ = fit_round(ctx, modules, _neg_ppl_evaluator(ctx, ctx.calib), n_masks, p, gen, regression)
    units = candidate_units(modules)
    prior_of = {(m.layer, m.kind, u): float(m.prior[u]) for m in modules for u in m.candidates.tolist()}
    return {key: (float(b), prior_of[key]) for key, b in zip(units, beta.tolist())}


def run(
    ctx: ScoringContext,
    sparsity: float,
    original_params: int,
    alloc: AllocationConfig,
    masks_per_round: int = 40,
    prune_frac: float = 0.05,
    windows_per_round: int | None = 8,
    prior: str = "wanda",
    regression: str = "adam",
    max_rounds: int = 100,
) -> list[dict]:
    """Rounds of Bonsai until the model keeps (1 - sparsity) of `original_params`. Returns the per-round history."""
    _check_options(ctx, alloc, masks_per_round, prune_frac, prior, regression)
    gen = torch.Generator().manual_seed(ctx.seed)
    target_removed = sparsity * original_params
    history = []
    ctx.model.eval()
    for r in range(max_rounds):
        removed_so_far = original_params - prunable_params(ctx.adapter)
        budget = min(prune_frac * original_params, target_removed - removed_so_far)
        p = min(prune_frac, max(budget, 0.0) / original_params)  # the last round's fraction is clipped
        t0 = time.perf_counter()
        n_win = ctx.calib.shape[0] if not windows_per_round else min(windows_per_round, ctx.calib.shape[0])
        windows = ctx.calib[torch.randperm(ctx.calib.shape[0], generator=gen)[:n_win]]
        modules = _round_modules(ctx, alloc, priors(ctx, windows, prior, gen), p)
        min_cost = min((m.unit_cost for m in modules), default=math.inf)
        if budget < min_cost / 2 or not modules:
            break
        last = budget < prune_frac * original_params  # the clipped round: fill its budget (see the docstring)
        removals, info = run_round(
            ctx, modules, _neg_ppl_evaluator(ctx, windows), masks_per_round, p, budget, gen, regression, last
        )
        if not removals:
            break
        _apply_removals(ctx, removals)
        info.update(
            {
                "round": r,
                "budget_params": budget,
                "prune_frac": p,
                "windows": n_win,
                "seqlen": int(windows.shape[1]),
                "removed_attention_units": sum(k == "attention" for _, k, _ in removals),
                "removed_channels": sum(k == "mlp" for _, k, _ in removals),
                "sparsity_after": 1 - prunable_params(ctx.adapter) / original_params,
                "round_time_s": time.perf_counter() - t0,
            }
        )
        history.append(info)
    if not history:
        history.append({"round": None, "note": "nothing to remove"})
    return history


def check_values(options: dict) -> None:
    """The ranges of the options given (`check_options` runs this before any model is loaded, `run` again)."""
    prior, regression = options.get("prior", PRIORS[0]), options.get("regression", REGRESSIONS[0])
    if prior not in PRIORS:
        raise ValueError(f"bonsai prior must be one of {PRIORS}, got {prior!r}")
    if regression not in REGRESSIONS:
        raise ValueError(f"bonsai regression must be one of {REGRESSIONS}, got {regression!r}")
    masks = options.get("masks_per_round", 2)
    if masks < 2 or masks % 2:
        raise ValueError(f"masks_per_round must be an even number >= 2 (antithetic pairs), got {masks}")
    if not 0 < options.get("prune_frac", 0.1) < 0.5:
        raise ValueError(f"prune_frac must be in (0, 0.5), got {options['prune_frac']}")
    if options.get("max_rounds", 1) < 1:
        raise ValueError(f"max_rounds must be >= 1, got {options['max_rounds']}")
    windows = options.get("windows_per_round")
    if windows is not None and windows < 0:
        raise ValueError(f"windows_per_round must be >= 1 (or 0 / null: every calibration window), got {windows}")


def _check_options(
    ctx: ScoringContext, alloc: AllocationConfig, masks_per_round: int, prune_frac: float, prior: str, regression: str
) -> None:
    check_values(dict(masks_per_round=masks_per_round, prune_frac=prune_frac, prior=prior, regression=regression))
    if alloc.allocation != "global" or alloc.round_to != 1:
        raise ValueError("bonsai allocates globally by regression; allocation/round_to options do not apply")
    adapter = ctx.adapter
    if any(is_balanced_gqa(ctx.unit(layer), adapter.attention_shape(layer)) for layer in adapter.layers()):
        raise GQAConstraintError(
            "bonsai removes attention units freely; with grouped-query attention use "
            "attention_units='kv_group' (the default)"
        )


def _round_modules(ctx: ScoringContext, alloc: AllocationConfig, pri: list[tuple], p: float) -> list[Module]:
    """The round's prunable modules (layers not skipped, kinds targeted) that have candidates."""
    adapter, skip = ctx.adapter, set(alloc.skip_layers)
    modules = []
    for i, layer in enumerate(adapter.layers()):
        if i in skip:
            continue
        att, ch = pri[i]
        if att is not None and alloc.targets != "mlp":
            cost = attention_unit_cost(adapter, layer, ctx.unit(layer))
            modules.append(make_module(i, "attention", att, cost, p))
        if ch is not None and alloc.targets != "attention":
            modules.append(make_module(i, "mlp", ch, adapter.channel_cost(layer), p))
    return [m for m in modules if m.candidates.numel()]


def _apply_removals(ctx: ScoringContext, removals: list[tuple[int, str, int]]) -> None:
    adapter = ctx.adapter
    by_layer: dict[int, dict[str, set]] = {}
    for layer, kind, u in removals:
        by_layer.setdefault(layer, {"attention": set(), "mlp": set()})[kind].add(u)
    for i, rem in by_layer.items():
        layer = adapter.layers()[i]
        shape = adapter.attention_shape(layer)
        kept_q = kept_kv = kept_ch = None
        if rem["attention"]:
            kept_q, kept_kv = attention_keep(ctx.unit(layer), shape, sorted(rem["attention"]))
        if rem["mlp"]:
            kept_ch = [c for c in range(adapter.n_channels(layer)) if c not in rem["mlp"]]
        ctx.remove(i, CurrentKeep(kept_q, kept_kv, kept_ch))
