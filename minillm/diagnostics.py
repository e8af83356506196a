"""Diagnostics of the FMS criterion and its gradient estimators (issue 17; experiment `fms_diagnostics`).

Small pure functions: rank statistics, the exact (backprop) gate gradient, FMS unit scores from a given gate
gradient, and the single-unit removal oracle. Anything here that calls `backward` is a *diagnostic*: it is labelled
as using backprop wherever its numbers are reported.
"""

from __future__ import annotations

import torch

from .adapters import get_adapter
from .allocate import LayerScores
from .scores.common import ScoringContext, lm_loss
from .surgery import VirtualMasks


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), float64."""
    x = x.detach().double().flatten().cpu()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts.double())[inverse]
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long vectors (tie-aware)."""
    ra, rb = _rank(torch.as_tensor(a)), _rank(torch.as_tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def cosine(a, b) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def bottom_overlap(a, b, p: float) -> float:
    """|bottom-p of a  and  bottom-p of b| / k with k = round(p * len): how much of the set to remove agrees."""
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    k = max(1, round(p * len(a)))
    sa = set(torch.argsort(a, stable=True)[:k].tolist())
    sb = set(torch.argsort(b, stable=True)[:k].tolist())
    return len(sa & sb) / k


def flat(scores: list[LayerScores], kind: str = "both") -> torch.Tensor:
    """All unit scores of a model as one vector (attention units then channels, layer by layer)."""
    parts = []
    for s in scores:
        if kind in ("both", "attention") and s.attention is not None:
            parts.append(s.attention.double().flatten().cpu())
        if kind in ("both", "channels") and s.channels is not None:
            parts.append(s.channels.double().flatten().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def exact_gate_gradient(model, calib: torch.Tensor, batch_size: int = 16) -> dict[tuple[int, str], torch.Tensor]:
    """dL/dgate for every head output and MLP channel gate at gates = 1, by backprop through `VirtualMasks`
    (a diagnostic: uses a backward pass). Keys (layer, 'heads' | 'channels'), fp64 on CPU."""
    adapter = get_adapter(model)
    gates_h, gates_c = {}, {}
    for i, layer in enumerate(adapter.layers()):
        n_q = adapter.attention_shape(layer).n_query_heads
        if n_q:
            gates_h[i] = torch.ones(n_q, requires_grad=True)
        if adapter.n_channels(layer):
            gates_c[i] = torch.ones(adapter.n_channels(layer), requires_grad=True)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        batches = [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
        tokens = sum(b[:, 1:].numel() for b in batches)
        with VirtualMasks(adapter, gates_h, gates_c):
            for b in batches:
                (lm_loss(model, b.to(next(model.parameters()).device)) * (b[:, 1:].numel() / tokens)).backward()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    out = {(i, "heads"): g.grad.double() for i, g in gates_h.items()}
    out.update({(i, "channels"): g.grad.double() for i, g in gates_c.items()})
    return out


def gate_fms_scores(ctx: ScoringContext, grads: dict, stats: dict, combination: str = "product", sign: str = "abs_mean"):
    """FMS unit scores (gate space) from a given gate gradient, e.g. the exact one, ones, or noise."""
    from .scores.fms import _gate_scores

    return [_gate_scores(ctx, grads, stats, i, layer, sign, combination) for i, layer in enumerate(ctx.adapter.layers())]


# --- the experiment `fms_diagnostics` ------------------------------------------------------------------------------


def _gate_estimate(ctx, n: int, eps: float, seed: int):
    from .precision import fp32_forward
    from .scores.common import calibration_loss
    from .scores.spsa import GateSpace, estimate

    space = GateSpace(ctx.adapter)
    with fp32_forward(ctx.model):
        est = estimate(space, lambda: calibration_loss(ctx), n, eps, seed, ctx.progress)
    return space, est


def _grads_of(space, est) -> dict:
    return {(i, k): est.gradient(space, b).double().cpu() for b, (i, k, _) in enumerate(space.blocks)}


def _vec(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k] for k in sorted(grads)])


def _noise_like(grads: dict, seed: int) -> dict:
    """g replaced by noise of the same distribution: the exact gradient's entries, randomly permuted."""
    keys = sorted(grads)
    flat_g = _vec(grads)
    perm = torch.randperm(len(flat_g), generator=torch.Generator().manual_seed(seed))
    shuffled, out, start = flat_g[perm], {}, 0
    for k in keys:
        out[k] = shuffled[start : start + len(grads[k])]
        start += len(grads[k])
    return out


def oracle_losses(ctx, channels: int, seed: int, batch_tokens: int = 4096) -> dict:
    """Exact loss change of removing each attention unit alone and `channels` random MLP channels alone (all of
    them when `channels` exceeds their number), measured with forward passes (fms_estimators.Ablator)."""
    from .scores.fms_estimators import Ablator, _head_mask, _units_of

    adapter = ctx.adapter
    ablator = Ablator(ctx, batch_tokens)
    layers = adapter.layers()
    all_ch = [(i, c) for i, layer in enumerate(layers) for c in range(adapter.n_channels(layer))]
    pick = torch.randperm(len(all_ch), generator=torch.Generator().manual_seed(seed))[: min(channels, len(all_ch))]
    chosen = sorted(all_ch[j] for j in pick.tolist())
    att, ch = [], []
    for i, layer in enumerate(layers):
        unit = ctx.unit(layer)
        n_att = _units_of(adapter, layer, unit)
        if n_att:
            d = ablator.loss_changes(i, [(_head_mask(adapter, layer, unit, u), None) for u in range(n_att)])
            att += [(i, u, v) for u, v in enumerate(d)]
        mine = [c for (j, c) in chosen if j == i]
        if mine:
            n = adapter.n_channels(layer)
            masks = []
            for c in mine:
                m = torch.ones(n)
                m[c] = 0
                masks.append((None, m))
            ch += [(i, c, v) for c, v in zip(mine, ablator.loss_changes(i, masks))]
    return {"base_loss": ablator.base_loss, "attention": att, "channels": ch}


def _oracle_spearman(scores: list[LayerScores], oracle: dict) -> dict:
    a = torch.tensor([float(scores[i].attention[u]) for i, u, _ in oracle["attention"]])
    c = torch.tensor([float(scores[i].channels[j]) for i, j, _ in oracle["channels"]])
    oa = torch.tensor([v for *_, v in oracle["attention"]])
    oc = torch.tensor([v for *_, v in oracle["channels"]])
    out = {}
    if len(a) > 1:
        out["attention"] = spearman(a, oa)
    if len(c) > 1:
        out["channels"] = spearman(c, oc)
    return out


def run(model_loader, tok, section: dict, progress: bool = False) -> dict:
    """Everything the experiment measures, as three parts (see `fms_diagnostics` in configs/*.yaml):

    * accuracy: per seed and n, the gate-space SPSA estimate against the exact (backprop) gate gradient: cosine,
      Spearman of FMS unit scores with exact-gradient FMS, overlap of the bottom-p units, and sqrt(n / (n + d));
      smaller n are prefixes of the largest run's queries (nested estimates, one run per seed).
    * criteria: perplexity after pruning with each criterion's unit scores, per sparsity, allocation and seed.
    * oracle: Spearman of each criterion's unit scores with the exact single-unit removal loss change.
    """
    import copy

    from .data import calibration_windows, describe_calibration, perplexity_windows
    from .evaluate import perplexity
    from .prune import prune, score
    from .scores.spsa import SPSAEstimate

    c = section["calibration"]
    base, _ = model_loader()
    if tok is None:  # tiny random models (tests) have no tokenizer: seeded random tokens
        vocab = int(base.config.vocab_size)
        gen = torch.Generator().manual_seed(c.get("seed", 0))
        calib = torch.randint(0, vocab, (c["n_samples"], c["seqlen"]), generator=gen)
    else:
        calib = calibration_windows(tok, c["n_samples"], c["seqlen"], seed=c.get("seed", 0))
    units = section.get("prune_options", {}).get("attention_units", "auto")
    ctx = ScoringContext(base, get_adapter(base), calib, units, 0, progress)
    stats = ctx.input_stats("all")
    exact = exact_gate_gradient(base, calib)
    d = int(sum(len(v) for v in exact.values()))
    eps, p = section.get("eps", 1e-3), section.get("overlap_p", 0.2)
    seeds, ns = section.get("seeds", [0]), sorted(section["queries"])
    exact_fms = gate_fms_scores(ctx, exact, stats)
    criteria = {  # label -> list over seeds of unit scores (one entry when deterministic)
        "fms-exact-grad (backprop)": [exact_fms],
        "fms-g1": [gate_fms_scores(ctx, {k: torch.ones_like(v) for k, v in exact.items()}, stats)],
        "fms-noise-g": [gate_fms_scores(ctx, _noise_like(exact, s), stats) for s in seeds],
        "taylor (backprop)": [score(base, "taylor", calib, attention_units=units, progress=progress)],
        "wanda_sp": [score(base, "wanda_sp", calib, attention_units=units, progress=progress)],
        "flap-score (no compensation)": [score(base, "flap", calib, attention_units=units, progress=progress)],
    }
    accuracy = []
    for s in seeds:
        space, est = _gate_estimate(ctx, ns[-1], eps, s)
        for n in ns:
            sub = SPSAEstimate(est.seeds[:n], est.projected[:n], est.eps)
            g = _grads_of(space, sub)
            fms = gate_fms_scores(ctx, g, stats)
            accuracy.append(
                {
                    "seed": s,
                    "n": n,
                    "d": d,
                    "cosine": cosine(_vec(g), _vec(exact)),
                    "theory": (n / (n + d)) ** 0.5,
                    "spearman_vs_exact_fms": spearman(flat(fms), flat(exact_fms)),
                    "bottom_overlap": bottom_overlap(flat(fms), flat(exact_fms), p),
                }
            )
            if n in section.get("criteria_queries", ns):
                criteria.setdefault(f"fms-spsa-gates-n{n}", []).append(fms)
    for n in section.get("weight_queries", []):
        criteria[f"fms-spsa-weights-n{n}"] = [
            score(base, "fms", calib, seed=s, queries=n, space="weights", attention_units=units, progress=progress)
            for s in seeds
        ]
    for label, opts in section.get("estimators", {}).items():
        stochastic = opts.get("estimator") == "allocation"
        criteria[label] = [
            score(base, "fms", calib, seed=s, attention_units=units, progress=progress, **opts)
            for s in (seeds if stochastic else seeds[:1])
        ]
    o = section.get("oracle", {})
    oracle = oracle_losses(ctx, o.get("channels", 1000), o.get("seed", 0), section.get("batch_tokens", 4096))
    oracle_rows = [
        {"criterion": label, "seed_index": k, **_oracle_spearman(sc, oracle)}
        for label, runs in criteria.items()
        for k, sc in enumerate(runs)
    ]
    ppl_cfg = section["perplexity"]
    if tok is None:
        gen = torch.Generator().manual_seed(12345)
        windows = torch.randint(0, vocab, (ppl_cfg["windows"], ppl_cfg["seqlen"]), generator=gen)
    else:
        windows = perplexity_windows(tok, ppl_cfg["seqlen"], ppl_cfg["windows"])
    dense_ppl = perplexity(base, windows, batch_size=ppl_cfg.get("batch_size", 4), progress=False)["ppl"]
    rows = []
    prune_options = {k: v for k, v in section.get("prune_options", {}).items() if k != "allocation"}
    for allocation in section.get("allocations", ["uniform"]):
        for sparsity in section["sparsities"]:
            for label, runs in criteria.items():
                for k, sc in enumerate(runs):
                    model = copy.deepcopy(base)
                    plan = prune(
                        model, "fms", sparsity, calib, scores=copy.deepcopy(sc), allocation=allocation,
                        progress=False, **prune_options,
                    )
                    ppl = perplexity(model, windows, batch_size=ppl_cfg.get("batch_size", 4), progress=False)["ppl"]
                    rows.append(
                        {
                            "criterion": label,
                            "uses_backprop": "backprop" in label,
                            "allocation": allocation,
                            "sparsity": sparsity,
                            "seed_index": k,
                            "ppl": ppl,
                            "achieved_sparsity": plan.achieved_sparsity,
                        }
                    )
                    del model
    calib_info = describe_calibration(c["n_samples"], c["seqlen"], c.get("seed", 0))
    return {
        "accuracy": {"rows": accuracy, "d": d, "eps": eps, "overlap_p": p},
        "criteria": {"rows": rows, "dense_ppl": dense_ppl},
        "oracle": {"rows": oracle_rows, "oracle": oracle},
        "calibration": calib_info,
    }


# --- tables and figures from the records (notebook 07) -------------------------------------------------------------


def frames(records: list[dict]) -> dict:
    """pandas tables from the fms_diagnostics records: accuracy (mean and std over seeds per n), criteria
    (perplexity mean +- std over seeds), oracle (Spearman with the exact removal loss change, mean over seeds)."""
    import pandas as pd

    by_part = {r["config"]["part"]: r["metrics"] for r in records if r}
    out = {}
    if "accuracy" in by_part:
        df = pd.DataFrame(by_part["accuracy"]["rows"])
        agg = df.groupby("n").agg(
            d=("d", "first"),
            cosine_mean=("cosine", "mean"),
            cosine_std=("cosine", "std"),
            theory=("theory", "first"),
            spearman_mean=("spearman_vs_exact_fms", "mean"),
            spearman_std=("spearman_vs_exact_fms", "std"),
            bottom_overlap_mean=("bottom_overlap", "mean"),
            seeds=("seed", "nunique"),
        )
        out["accuracy"] = agg.reset_index()
    if "criteria" in by_part:
        df = pd.DataFrame(by_part["criteria"]["rows"])
        keys = ["criterion", "uses_backprop", "allocation", "sparsity"]
        agg = df.groupby(keys).agg(ppl_mean=("ppl", "mean"), ppl_std=("ppl", "std"), runs=("ppl", "size"))
        agg = agg.reset_index().sort_values(["allocation", "sparsity", "ppl_mean"])
        agg["dense_ppl"] = by_part["criteria"]["dense_ppl"]
        out["criteria"] = agg
    if "oracle" in by_part:
        df = pd.DataFrame(by_part["oracle"]["rows"])
        cols = [c for c in ("attention", "channels") if c in df]
        agg = df.groupby("criterion")[cols].agg(["mean", "std"])
        agg.columns = [f"spearman_{a}_{b}" for a, b in agg.columns]
        out["oracle"] = agg.reset_index().sort_values(agg.columns[0], ascending=False)
    return out


def plot_accuracy(df, title: str = ""):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(df.n, df.cosine_mean, yerr=df.cosine_std.fillna(0), marker="o", label="cosine with exact gradient")
    ax.errorbar(
        df.n, df.spearman_mean, yerr=df.spearman_std.fillna(0), marker="s", label="Spearman with exact-gradient FMS"
    )
    ax.plot(df.n, df.bottom_overlap_mean, marker="^", label="bottom-p overlap")
    ax.plot(df.n, df.theory, "k--", label="sqrt(n / (n + d))")
    ax.set_xscale("log")
    ax.set_xlabel("SPSA queries n (gate space)")
    ax.set_ylabel("agreement")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
