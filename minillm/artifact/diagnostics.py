"""Diagnostics of the FMS criterion and its gradient estimators (experiment `fms_diagnostics`).

Small pure functions: rank statistics, the exact (backprop) gate gradient, FMS unit scores from a given gate
gradient, and the single-unit removal oracle. Anything here that calls `backward` is a *diagnostic*: it is labelled
as using backprop wherever its numbers are reported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from minillm.adapters import get_adapter
from minillm.allocate import LayerScores
from minillm.files import write_json_atomic
from minillm.scores.common import ScoringContext, lm_loss
from minillm.surgery import VirtualMasks


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


def _mean_loss_backward(model, calib: torch.Tensor, trainable: list, batch_size: int = 16) -> None:
    """Backward of the token-mean calibration loss in batches; only `trainable` parameters (and any tensors the
    caller's hooks make require grad) get gradients; every parameter's requires_grad flag is restored."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        batches = [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
        tokens = sum(b[:, 1:].numel() for b in batches)
        device = next(model.parameters()).device
        for b in batches:
            (lm_loss(model, b.to(device)) * (b[:, 1:].numel() / tokens)).backward()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


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
    with VirtualMasks(adapter, gates_h, gates_c):
        _mean_loss_backward(model, calib, [], batch_size)
    out = {(i, "heads"): g.grad.double() for i, g in gates_h.items()}
    out.update({(i, "channels"): g.grad.double() for i, g in gates_c.items()})
    return out


def gate_fms_scores(ctx: ScoringContext, grads: dict, stats: dict, combination: str = "product", sign: str = "abs_mean"):
    """FMS unit scores (gate space) from a given gate gradient, e.g. the exact one, ones, or noise."""
    from minillm.scores.fms import _gate_scores

    return [_gate_scores(ctx, grads, stats, i, layer, sign, combination) for i, layer in enumerate(ctx.adapter.layers())]


# --- the experiment `fms_diagnostics` ------------------------------------------------------------------------------


def _gate_estimate_space(ctx):
    from minillm.scores.spsa import GateSpace

    return GateSpace(ctx.adapter)


def _gate_estimate(ctx, n: int, eps: float, seed: int, done=None, checkpoint=None):
    from minillm.precision import fp32_forward
    from minillm.scores.common import calibration_loss
    from minillm.scores.spsa import estimate

    space = _gate_estimate_space(ctx)
    with fp32_forward(ctx.model):
        est = estimate(space, lambda: calibration_loss(ctx), n, eps, seed, ctx.progress, done, checkpoint)
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


def oracle_losses(ctx, channels: int, seed: int, batch_tokens: int = 4096, resume=None) -> dict:
    """Exact loss change of removing each attention unit alone and `channels` random MLP channels alone (all of
    them when `channels` exceeds their number), measured with forward passes (fms_estimators.Ablator).

    `resume` (get/put, like ScoringContext.resume) keeps each finished layer's measurements, so that a run that
    dies (about 1,100 ablations, close to an hour on 2 cores for SmolLM2) resumes at its first unfinished layer."""
    from minillm.scores.fms_estimators import Ablator, LayerProgress, single_unit_losses

    adapter = ctx.adapter
    ablator = Ablator(ctx, batch_tokens)
    layers = adapter.layers()
    all_ch = [(i, c) for i, layer in enumerate(layers) for c in range(adapter.n_channels(layer))]
    pick = torch.randperm(len(all_ch), generator=torch.Generator().manual_seed(seed))[: min(channels, len(all_ch))]
    chosen = sorted(all_ch[j] for j in pick.tolist())
    att, ch = [], []
    progress = LayerProgress(resume, f"oracle-layers-channels{channels}-seed{seed}-batch{batch_tokens}")
    for i, layer in enumerate(tqdm(layers, desc="oracle ablations", disable=not ctx.progress, leave=False)):
        mine = [c for (j, c) in chosen if j == i]
        heads, values = progress.measure(i, lambda: single_unit_losses(ablator, i, ctx.unit(layer), mine))
        att += [(i, u, v) for u, v in enumerate(heads)]
        ch += [(i, c, v) for c, v in zip(mine, values)]
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


class PartialStore:
    """Finished pieces of one diagnostics run (criteria's unit scores as safetensors, everything else in one JSON
    file), so that a run that dies, or a session that ends, resumes where it stopped; committed beside the records
    until they are written, then deleted. Tied to the configuration it was made with (`key.json`): another
    configuration empties it. `folder=None` keeps nothing."""

    def __init__(self, folder: Path | None, key: dict, fresh: bool = False):
        self.folder = folder
        self.values: dict = {}
        if folder is None:
            return
        stored = _read_json(folder / "key.json")
        if fresh or stored != json.loads(json.dumps(key)):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_json_atomic(folder / "key.json", key)
        self.values = _read_json(folder / "values.json") or {}

    def value(self, name: str, compute):
        if name not in self.values:
            self.put(name, compute())
        return self.values[name]

    def put(self, name: str, value) -> None:
        """Store a value now (the progress of a long piece, which `value` would only store once it finishes)."""
        self.values[name] = value
        if self.folder is not None:
            write_json_atomic(self.folder / "values.json", self.values)

    def drop(self, name: str) -> None:
        if self.values.pop(name, None) is not None and self.folder is not None:
            write_json_atomic(self.folder / "values.json", self.values)

    def scores(self, name: str, compute) -> list[LayerScores]:
        if self.folder is None:
            return compute()
        path = self.folder / "scores" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".safetensors")
        if path.exists():
            return _scores_from(load_file(path))
        scores = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(_scores_to(scores), tmp)
        os.replace(tmp, path)
        return scores

    def clear(self) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


class _StoreProgress:
    """ScoringContext.resume for one criterion run: its progress under a prefix in the diagnostics' PartialStore."""

    def __init__(self, store: PartialStore, prefix: str):
        self.store, self.prefix, self.names = store, prefix, set()

    def get(self, name: str):
        return self.store.values.get(self.prefix + name)

    def put(self, name: str, value) -> None:
        self.names.add(name)
        self.store.put(self.prefix + name, value)

    def clear(self) -> None:
        for name in self.names or [n[len(self.prefix) :] for n in self.store.values if n.startswith(self.prefix)]:
            self.store.drop(self.prefix + name)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _scores_to(scores: list[LayerScores]) -> dict[str, torch.Tensor]:
    out = {"n_layers": torch.tensor([len(scores)])}
    for i, s in enumerate(scores):
        for kind in ("attention", "channels"):
            value = getattr(s, kind)
            if value is not None:
                out[f"{i}.{kind}"] = value.detach().cpu().contiguous()
    return out


def _scores_from(tensors: dict[str, torch.Tensor]) -> list[LayerScores]:
    n = int(tensors["n_layers"][0])
    return [LayerScores(tensors.get(f"{i}.attention"), tensors.get(f"{i}.channels")) for i in range(n)]


def exact_weight_fms_scores(ctx: ScoringContext, stats: dict, combination: str = "product") -> list[LayerScores]:
    """Weight-space FMS (the paper's space) with the exact dL/dW of every decoder linear, by backprop (a
    diagnostic: uses a backward pass). combination='taylor' is LLM-Pruner's element1 (a test holds it to
    `taylor`)."""
    from minillm.scores.common import all_members
    from minillm.scores.fms import weight_fms_scores

    model = ctx.model
    linears = [m.linear for _, m in all_members(ctx.adapter).values()]
    for lin in linears:
        lin.weight.grad = None
    try:
        _mean_loss_backward(model, ctx.calib, [lin.weight for lin in linears])
        grads = {id(lin): lin.weight.grad.detach() for lin in linears}
        return weight_fms_scores(ctx, stats, lambda lin: grads[id(lin)], combination=combination)
    finally:
        for lin in linears:
            lin.weight.grad = None


def _bonsai_oracle_rows(coefficients: dict, oracle: dict) -> list[dict]:
    """Spearman with the oracle of Bonsai's first-round coefficients, and of its prior on the same units (its
    candidates: the lower-prior units of each module, so not comparable with the whole-model rows)."""
    rows = []
    for kind, bonsai_kind in (("attention", "attention"), ("channels", "mlp")):
        triples = [(coefficients.get((i, bonsai_kind, u)), v) for i, u, v in oracle[kind]]
        pairs = [(c, v) for c, v in triples if c is not None]
        if len(pairs) < 3:
            continue
        beta = torch.tensor([c[0] for c, _ in pairs])
        prior = torch.tensor([c[1] for c, _ in pairs])
        truth = torch.tensor([v for _, v in pairs])
        rows.append({"kind": kind, "units": len(pairs), "coefficients": spearman(beta, truth),
                     "prior": spearman(prior, truth)})
    return rows


def run(model_loader, tok, section: dict, progress: bool = False, store: PartialStore | None = None) -> dict:
    """Everything the experiment measures, as three parts (see `fms_diagnostics` in configs/*.yaml):

    * accuracy: per seed and n, the gate-space SPSA estimate against the exact (backprop) gate gradient: cosine,
      Spearman of FMS unit scores with exact-gradient FMS, overlap of the bottom-p units, and sqrt(n / (n + d));
      smaller n are prefixes of the largest run's queries (nested estimates, one run per seed; `full_n_seeds` limits
      how many seeds run beyond the largest n that is pruned with, `criteria_queries`).
    * criteria: perplexity after pruning with each criterion's unit scores, per sparsity, allocation and seed.
    * oracle: Spearman of each criterion's unit scores with the exact single-unit removal loss change, and of
      Bonsai's first-round regression coefficients over its candidates.

    Every finished piece goes into `store` first, so that an interrupted run resumes (PartialStore).
    """
    from minillm.data import describe_calibration

    store = store or PartialStore(None, {})
    c = section["calibration"]
    base, _ = model_loader()
    calib = _tokens(base, tok, c["n_samples"], c["seqlen"], c.get("seed", 0), calibration=True)
    units = section.get("prune_options", {}).get("attention_units", "auto")
    ctx = ScoringContext(base, get_adapter(base), calib, units, 0, progress)
    stats = ctx.input_stats("all")
    exact = exact_gate_gradient(base, calib)
    eps, p = section.get("eps", 1e-3), section.get("overlap_p", 0.2)
    exact_fms = gate_fms_scores(ctx, exact, stats)
    thunks = _backprop_and_baseline_criteria(ctx, exact, exact_fms, stats, section.get("seeds", [0]), progress)
    accuracy, spsa = _spsa_accuracy(ctx, exact, exact_fms, stats, section, store, eps, p)
    thunks.update(spsa)
    for n in section.get("weight_queries", []):
        thunks[f"fms-spsa-weights-n{n}"] = [
            _method_thunk(ctx, "fms", progress, seed=s, queries=n, space="weights") for s in section.get("seeds", [0])
        ]
    criteria = _criteria_scores(ctx, thunks, section, store, progress)
    oracle_part = _oracle(ctx, criteria, section, store)
    ppl_cfg = section["perplexity"]
    windows = _tokens(base, tok, ppl_cfg["windows"], ppl_cfg["seqlen"], 12345, calibration=False)
    rows, dense_ppl = _criteria_perplexity(base, calib, windows, criteria, section, store, progress)
    return {
        "accuracy": {"rows": accuracy, "d": int(sum(len(v) for v in exact.values())), "eps": eps, "overlap_p": p},
        "criteria": {"rows": rows, "dense_ppl": dense_ppl},
        "oracle": oracle_part,
        "calibration": describe_calibration(c["n_samples"], c["seqlen"], c.get("seed", 0)),
    }


def _tokens(base, tok, n: int, seqlen: int, seed: int, calibration: bool) -> torch.Tensor:
    """Calibration windows (seeded draw from the calibration novels) or perplexity windows; tiny random models
    (tests) have no tokenizer: seeded random tokens then."""
    from minillm.data import calibration_windows, perplexity_windows

    if tok is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, int(base.config.vocab_size), (n, seqlen), generator=gen)
    return calibration_windows(tok, n, seqlen, seed=seed) if calibration else perplexity_windows(tok, seqlen, n)


def _method_thunk(ctx, name: str, progress: bool, **kw):
    from minillm.prune import score

    return lambda: score(ctx.model, name, ctx.calib, attention_units=ctx.attention_units, progress=progress, **kw)


def _backprop_and_baseline_criteria(ctx, exact, exact_fms, stats, seeds: list[int], progress: bool) -> dict:
    """label -> list over seeds of thunks computing unit scores (one entry when deterministic): the backprop
    references and controls and the gradient-free baselines."""
    return {
        "fms-exact-grad (backprop)": [lambda: exact_fms],
        "fms-weights-exact-grad (backprop)": [lambda: exact_weight_fms_scores(ctx, stats)],
        "fms-g1": [lambda: gate_fms_scores(ctx, {k: torch.ones_like(v) for k, v in exact.items()}, stats)],
        "fms-noise-g (backprop control)": [lambda s=s: gate_fms_scores(ctx, _noise_like(exact, s), stats) for s in seeds],
        "taylor (backprop)": [_method_thunk(ctx, "taylor", progress)],
        "wanda_sp": [_method_thunk(ctx, "wanda_sp", progress)],
        "flap-score (no compensation)": [_method_thunk(ctx, "flap", progress)],
    }


def _spsa_accuracy(ctx, exact, exact_fms, stats, section: dict, store, eps: float, p: float) -> tuple[list, dict]:
    """Per seed and n, the gate-space SPSA estimate against the exact gate gradient (rows), and the SPSA criteria
    (`criteria_queries`) as label -> thunks. The first `full_n_seeds` seeds run to the largest n; the others stop at
    the largest n pruned with."""
    from minillm.scores.spsa import SPSAEstimate

    seeds, ns = section.get("seeds", [0]), sorted(section["queries"])
    d = int(sum(len(v) for v in exact.values()))
    accuracy, spsa = [], {}
    short = max(section.get("criteria_queries", ns))
    for j, s in enumerate(seeds):
        n_max = ns[-1] if j < section.get("full_n_seeds", len(seeds)) else short

        def projections(s=s, n_max=n_max):
            # the queries done so far are kept too (seed 0 of cpu-full runs 1,024 queries, over an hour on 2 cores)
            partial = f"gate-estimate-seed{s}-partial"
            done = store.values.get(partial)
            est = _gate_estimate(ctx, n_max, eps, s, done, lambda so_far: store.put(partial, so_far))[1]
            return {"seeds": list(est.seeds), "projected": [float(v) for v in est.projected], "eps": est.eps}

        est = store.value(f"gate-estimate-seed{s}", projections)
        store.drop(f"gate-estimate-seed{s}-partial")
        space = _gate_estimate_space(ctx)
        for n in (n for n in ns if n <= n_max):
            g = _grads_of(space, SPSAEstimate(est["seeds"][:n], est["projected"][:n], est["eps"]))
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
                spsa.setdefault(f"fms-spsa-gates-n{n}", []).append(lambda fms=fms: fms)
    return accuracy, spsa


def _criteria_scores(ctx, thunks: dict, section: dict, store, progress: bool) -> dict:
    """label -> unit scores per seed of every criterion, the forward-only estimators included (they keep their own
    progress in the store: the ablation one takes hours on 2 cores)."""
    seeds = section.get("seeds", [0])
    progresses = []
    for label, opts in section.get("estimators", {}).items():
        stochastic = opts.get("estimator") == "allocation"
        runs = []
        for k, s in enumerate(seeds if stochastic else seeds[:1]):
            progresses.append(_StoreProgress(store, f"{label}-{k}/"))
            runs.append(_method_thunk(ctx, "fms", progress, seed=s, resume=progresses[-1], **opts))
        thunks[label] = runs
    criteria = {
        label: [store.scores(f"{label}-{k}", thunk) for k, thunk in enumerate(runs)]
        for label, runs in tqdm(thunks.items(), desc="diagnostics: criteria", disable=not progress)
    }
    for finished in progresses:  # their scores are stored now
        finished.clear()
    return criteria


def _oracle(ctx, criteria: dict, section: dict, store) -> dict:
    """The exact single-unit removal loss changes, each criterion's Spearman with them, and Bonsai's first-round
    regression coefficients against them."""
    from minillm.scores import bonsai

    o = section.get("oracle", {})
    oracle_progress = _StoreProgress(store, "oracle-progress/")
    oracle = store.value(
        "oracle",
        lambda: oracle_losses(
            ctx, o.get("channels", 1000), o.get("seed", 0), section.get("batch_tokens", 4096), oracle_progress
        ),
    )
    oracle_progress.clear()  # the whole oracle is stored now
    oracle_rows = [
        {"criterion": label, "seed_index": k, **_oracle_spearman(sc, oracle)}
        for label, runs in criteria.items()
        for k, sc in enumerate(runs)
    ]
    b = section.get("bonsai")
    bonsai_rows = []
    if b is not None:

        def coefficients():
            found = bonsai.first_round_coefficients(
                ctx, b.get("masks", 32), b.get("prune_frac", 0.1), b.get("prior", "wanda")
            )
            return [[i, kind, u, beta, prior] for (i, kind, u), (beta, prior) in found.items()]

        found = {(i, kind, u): (beta, prior) for i, kind, u, beta, prior in store.value("bonsai", coefficients)}
        bonsai_rows = _bonsai_oracle_rows(found, oracle)
    return {"rows": oracle_rows, "oracle": oracle, "bonsai": bonsai_rows, "bonsai_settings": b}


def _criteria_perplexity(base, calib, windows, criteria: dict, section: dict, store, progress: bool):
    """(rows, dense perplexity): perplexity after pruning with each criterion's scores, per sparsity, allocation,
    bias compensation and seed."""
    import copy

    from minillm.evaluate import perplexity
    from minillm.prune import prune

    batch = section["perplexity"].get("batch_size", 4)
    dense_ppl = store.value("dense_ppl", lambda: perplexity(base, windows, batch_size=batch, progress=False)["ppl"])
    prune_options = {k: v for k, v in section.get("prune_options", {}).items() if k != "allocation"}

    def pruned_row(label, k, sc, allocation, sparsity, compensate):
        model = copy.deepcopy(base)
        plan = prune(
            model, "fms", sparsity, calib, scores=copy.deepcopy(sc), allocation=allocation, progress=False,
            compensate_bias=compensate, **prune_options,
        )
        ppl = perplexity(model, windows, batch_size=batch, progress=False)["ppl"]
        return {
            "criterion": label,
            "uses_backprop": "backprop" in label,
            "allocation": allocation,
            "sparsity": sparsity,
            "compensate_bias": compensate,
            "seed_index": k,
            "ppl": ppl,
            "achieved_sparsity": plan.achieved_sparsity,
        }

    jobs = [
        (label, k, sc, allocation, sparsity, compensate)
        for compensate in section.get("compensate_bias", [False])
        for allocation in section.get("allocations", ["uniform"])
        for sparsity in section["sparsities"]
        for label, runs in criteria.items()
        for k, sc in enumerate(runs)
    ]
    rows = [
        store.value(f"ppl/{j[3]}/{j[4]}/comp{int(j[5])}/{j[0]}/{j[1]}", lambda j=j: pruned_row(*j))
        for j in tqdm(jobs, desc="diagnostics: prune + perplexity", disable=not progress)
    ]
    return rows, dense_ppl


# --- tables and figures from the records (notebook 07) -------------------------------------------------------------


def frames(records: list[dict], memory: dict | None = None) -> dict:
    """pandas tables from the fms_diagnostics records: accuracy (mean and std over seeds per n), criteria
    (perplexity mean +- std over seeds), oracle (Spearman with the exact removal loss change, mean over seeds) and,
    where the section has `bonsai`, oracle_bonsai (Bonsai's first-round coefficients and its prior on its
    candidates); goal: the forward-only target (GOAL_TAYLOR_RATIO, GOAL_MEMORY_RATIO) from the criteria rows
    (`goal_frame`, with `memory` ratios if given)."""
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
        df["compensate_bias"] = df.get("compensate_bias", False)
        keys = ["criterion", "uses_backprop", "allocation", "compensate_bias", "sparsity"]
        agg = df.groupby(keys).agg(ppl_mean=("ppl", "mean"), ppl_std=("ppl", "std"), runs=("ppl", "size"))
        agg = agg.reset_index().sort_values(["allocation", "compensate_bias", "sparsity", "ppl_mean"])
        agg["dense_ppl"] = by_part["criteria"]["dense_ppl"]
        out["criteria"] = agg
        goal = goal_frame(by_part["criteria"], memory)
        if not goal.empty:
            out["goal"] = goal
    if "oracle" in by_part:
        df = pd.DataFrame(by_part["oracle"]["rows"])
        cols = [c for c in ("attention", "channels") if c in df]
        agg = df.groupby("criterion")[cols].agg(["mean", "std"])
        agg.columns = [f"spearman_{a}_{b}" for a, b in agg.columns]
        out["oracle"] = agg.reset_index().sort_values(agg.columns[0], ascending=False)
        if by_part["oracle"].get("bonsai"):
            out["oracle_bonsai"] = pd.DataFrame(by_part["oracle"]["bonsai"])
    return out


GOAL_TAYLOR_RATIO = 1.05  # the forward-only target: within 1.05x of backprop Taylor's perplexity
GOAL_MEMORY_RATIO = 1.15  # ... at a scoring peak <= 1.15x the dense forward


def _forward_only_fms(label: str) -> bool:
    """SPSA FMS and the forward-only estimators; not the controls (g = 1, noise) or anything using backprop."""
    return label.startswith("fms-") and "backprop" not in label and label != "fms-g1"


def _best_of(part, criterion: str):
    """The row of `criterion` with the lowest mean perplexity over its allocations, or None."""
    rows = part[part.criterion == criterion].sort_values("mean")
    return None if rows.empty else next(rows.itertuples())


def goal_frame(
    criteria: dict,
    memory_ratios: dict | None = None,
    taylor: str = "taylor (backprop)",
    flap: str = "flap-score (no compensation)",
):
    """The forward-only target (within GOAL_TAYLOR_RATIO of Taylor, at or below FLAP), per sparsity and bias
    compensation: the forward-only FMS-family criterion with the lowest
    mean perplexity over its seeds (best of its allocations) against backprop Taylor and FLAP's score, each also
    at the better of its allocations (the stricter comparison: with few calibration tokens Taylor's per-layer
    uniform allocation, LLM-Pruner's, can be far worse than its global one), all pruned from the same calibration
    tokens. `memory_ratios`
    maps an estimator name ('spsa', 'ablation', 'allocation') to its measured peak / dense forward and the phase
    that peak covers (memory_ratios).
    Verdicts are 'met' / 'not met' on the means; `within_noise` says when the gap to the reference is smaller than
    the larger seed standard deviation of the two (None when neither has two seeds). `taylor` and `flap` name the
    reference criteria (grid_goal_frame passes the accuracy grid's labels)."""
    import pandas as pd

    df = pd.DataFrame(criteria["rows"])
    if df.empty:
        return df
    df["compensate_bias"] = df.get("compensate_bias", False)
    agg = df.groupby(["criterion", "allocation", "compensate_bias", "sparsity"]).ppl.agg(["mean", "std", "size"])
    agg = agg.reset_index()
    out = []
    for (comp, sparsity), part in agg.groupby(["compensate_bias", "sparsity"]):
        ref_taylor, ref_flap = _best_of(part, taylor), _best_of(part, flap)
        mine = part[part.criterion.map(_forward_only_fms)]
        if mine.empty or ref_taylor is None:
            continue
        best = mine.sort_values("mean").iloc[0]
        estimator = "ablation" if "ablation" in best.criterion else "allocation" if "allocation" in best.criterion else "spsa"

        def seed_sd(r):  # None without two seeds
            return None if r["size"] < 2 or pd.isna(r["std"]) else float(r["std"])

        best_sd = seed_sd(best)

        def within(ref):
            sds = [x for x in (best_sd, seed_sd(ref._asdict())) if x is not None]
            return None if not sds else abs(best["mean"] - ref.mean) < max(sds)
        row = {
            "sparsity": sparsity,
            "compensate_bias": bool(comp),
            "best_forward_only": best.criterion,
            "allocation": best.allocation,
            "ppl_mean": best["mean"],
            "ppl_std": best_sd,
            "seeds": int(best["size"]),
            "taylor_ppl": ref_taylor.mean,
            "taylor_seeds": int(ref_taylor.size),
            "taylor_allocation": ref_taylor.allocation,
            "ratio_to_taylor": best["mean"] / ref_taylor.mean,
            "taylor_goal": "met" if best["mean"] <= GOAL_TAYLOR_RATIO * ref_taylor.mean else "not met",
            "taylor_within_noise": within(ref_taylor),
        }
        if ref_flap is not None:
            row.update(
                {
                    "flap_ppl": ref_flap.mean,
                    "flap_allocation": ref_flap.allocation,
                    "flap_goal": "met" if best["mean"] <= ref_flap.mean else "not met",
                    "flap_within_noise": within(ref_flap),
                }
            )
        if memory_ratios and estimator in memory_ratios:
            ratio, phase = memory_ratios[estimator]["ratio"], memory_ratios[estimator]["phase"]
            row.update(
                {
                    "peak_ratio_to_dense": ratio,
                    "peak_of": phase,
                    "memory_goal": "met" if ratio <= GOAL_MEMORY_RATIO else "not met",
                }
            )
        out.append(row)
    return pd.DataFrame(out)


def grid_goal_frame(accuracy: "pd.DataFrame", memory_ratios: dict | None = None):
    """The forward-only target on the accuracy grid (report.accuracy_frame rows): its forward-only FMS labels against
    its `taylor` and `flap` (FLAP with its own bias compensation, as its authors run it), means over the seed
    replicates, perplexity over the grid's windows. Unlike the diagnostics' criteria rows, every method draws its
    own calibration tokens per seed, so Taylor's calibration spread enters its mean and the noise verdicts."""
    import pandas as pd

    if accuracy.empty:
        return pd.DataFrame()
    df = accuracy[(accuracy.method != "dense") & (accuracy.pattern == "structured")]
    rows = [
        {"criterion": r.method, "allocation": "as configured", "sparsity": r.sparsity, "compensate_bias": False,
         "seed_index": int(getattr(r, "seed", 0)), "ppl": r.ppl}
        for r in df.itertuples()
    ]
    goal = goal_frame({"rows": rows}, memory_ratios, taylor="taylor", flap="flap")
    return goal.drop(columns=[c for c in goal.columns if c.endswith("allocation")])  # the labels carry it


def memory_ratios(memory_records: list[dict], methods: list[dict]) -> dict:
    """estimator name -> {ratio, phase}: the highest peak / dense forward among the memory records' FMS entries
    (`methods`: the profile's memory methods, which say each label's estimator). The peak is that of scoring alone
    where the record has it (measure.memory_step), else that of the whole step, scoring and removal."""
    estimator_of = {
        m["label"]: (m.get("options") or {}).get("estimator", "spsa") for m in methods if m.get("method") == "fms"
    }
    out: dict = {}
    for rec in memory_records:
        for m in rec["metrics"].get("methods", []):
            name = estimator_of.get(m.get("label"))
            if name is None or "ratio_to_dense_forward" not in m:
                continue
            scoring = "scoring_ratio_to_dense_forward" in m
            ratio = m["scoring_ratio_to_dense_forward" if scoring else "ratio_to_dense_forward"]
            phase = "scoring" if scoring else "scoring and removal"
            if name not in out or ratio > out[name]["ratio"]:
                out[name] = {"ratio": ratio, "phase": phase}
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
