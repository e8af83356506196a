"""Tables and figures from result records only (no compute): what the notebooks render.

Tables are written as CSV and Markdown, figures as PNG and PDF, under figures/<profile>/.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from minillm.artifact.records import REPO_ROOT

FIGURES_DIR = REPO_ROOT / "figures"


def out_dir(profile: str) -> Path:
    path = FIGURES_DIR / profile
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_table(df: pd.DataFrame, path_stem: Path, floatfmt: str = ".3f") -> list[Path]:
    """CSV (full precision) and Markdown (rounded) versions of a table."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = path_stem.with_suffix(".csv"), path_stem.with_suffix(".md")
    df.to_csv(csv, index=False)
    md.write_text(df.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    return [csv, md]


def save_figure(fig, path_stem: Path) -> list[Path]:
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None})
    _show_in_notebook(paths[0])
    return paths


def _show_in_notebook(png: Path) -> None:
    """Embed the saved PNG in the executed notebook (the Agg backend shows nothing by itself), so that committed
    notebooks carry their figures; outside a kernel nothing happens."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        display(Image(filename=str(png)))


# --- accuracy -----------------------------------------------------------------------------------------------------


def accuracy_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: method label, sparsity, achieved sparsity, perplexity, zero-shot metric per task and
    average. Columns that only some profiles produce appear only when a record has them: `ppl_ci95_lo` /
    `ppl_ci95_hi` (bootstrap interval over windows), `zs_avg_se` (standard error of the zero-shot average) and
    `seed` (the seed replicate, when a record is one; `seed_summary` aggregates over it)."""
    rows = []
    for r in records:
        if r is None:
            continue
        cfg, m = r["config"], r["metrics"]
        history = r.get("plan", {}).get("history") or [{}]
        pattern = history[0].get("pattern", "structured" if cfg["sparsity"] else "-")
        achieved = r.get("plan", {}).get("achieved_sparsity", 0.0)
        if pattern != "structured" and pattern != "-":  # N:M: zeros inside dense matrices, nothing removed
            achieved = history[0]["weight_sparsity"]
        row = {
            "method": cfg.get("label", cfg["method"]),
            "pattern": pattern,
            "sparsity": cfg["sparsity"],
            "achieved": achieved,
            "ppl": m["perplexity"]["ppl"],
        }
        if "ppl_ci95" in m["perplexity"]:
            row["ppl_ci95_lo"], row["ppl_ci95_hi"] = m["perplexity"]["ppl_ci95"]
        zs = m.get("zeroshot")
        if zs:
            for task, v in zs.items():
                if isinstance(v, dict):
                    row[f"{task.removeprefix('bb_cloze_')} ({v['metric']})"] = v["value"]
            row["zs_avg"] = zs["average"]
            if zs.get("average_stderr") is not None:
                row["zs_avg_se"] = zs["average_stderr"]
        if cfg.get("replicate"):
            row["seed"] = cfg["replicate"]
        timing = r.get("timing", {})
        row["scoring_s"] = timing.get("scoring_time_s")
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if "seed" in df:
        df["seed"] = df["seed"].fillna(0).astype(int)
    return df.sort_values(["sparsity", "ppl"]).reset_index(drop=True)


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, pattern, sparsity) over seed replicates: the mean of every numeric column, the
    sample standard deviation (ddof 1) of `ppl` and `zs_avg` across seeds (`ppl_std`, `zs_avg_std`; NaN for one
    seed), the number of seeds `n_seeds` and of those with zero-shot `zs_n_seeds`. Bootstrap bounds become their envelope over seeds (lowest lo,
    highest hi). A frame without a `seed` column (no replicates) is returned as it is."""
    if df.empty or "seed" not in df:
        return df
    keys = ["method", "pattern", "sparsity"]
    numeric = [c for c in df.columns if c not in keys + ["seed"] and pd.api.types.is_numeric_dtype(df[c])]
    how = {c: "mean" for c in numeric}
    how.update({c: f for c, f in (("ppl_ci95_lo", "min"), ("ppl_ci95_hi", "max")) if c in df})
    grouped = df.groupby(keys, sort=False)
    out = grouped.agg(how)
    out["ppl_std"] = grouped["ppl"].std(ddof=1)
    if "zs_avg" in df:  # replicates evaluated by perplexity only (`seed_zeroshot: false`) are not counted here
        out["zs_avg_std"] = grouped["zs_avg"].std(ddof=1)
        out["zs_n_seeds"] = grouped["zs_avg"].count()
    out["n_seeds"] = grouped["seed"].nunique()
    return out.reset_index().sort_values(["sparsity", "ppl"]).reset_index(drop=True)


def zeroshot_chance(task_names) -> float:
    """Chance level of the zero-shot average: the mean over the tasks of 1 / number of choices (tasks.json); a
    task whose examples have different numbers of choices ("variable") contributes its recorded `chance`, the
    mean of 1 / choices over its examples."""
    from minillm.evaluate import load_task_specs

    specs = {s["task"]: s for s in load_task_specs()}
    names = list(task_names)
    unknown = [t for t in names if t not in specs]
    if unknown or not names:
        raise ValueError(f"no chance level for tasks {unknown or names}; bundled: {', '.join(specs)}")

    def chance(spec):
        n = spec["n_choices"]
        return 1 / n if isinstance(n, int) and n > 0 else float(spec["chance"])

    return sum(chance(specs[t]) for t in names) / len(names)


def _error_bars(g: pd.DataFrame, y: str):
    """Error bars of column `y` per row: the spread over seeds (std) where a row aggregates several seeds, else
    the 95% interval (bootstrap for perplexity, 1.96 standard errors for zero-shot) where the record has one; None
    when no row has either."""
    values = g[y].to_numpy(dtype=float)
    lo, hi = np.full(len(g), np.nan), np.full(len(g), np.nan)
    if f"{y}_std" in g and "n_seeds" in g:
        std = g[f"{y}_std"].where(g["n_seeds"] > 1).to_numpy(dtype=float)
        lo, hi = std.copy(), std.copy()
    free = np.isnan(lo)
    if y == "ppl" and "ppl_ci95_lo" in g:
        lo = np.where(free, values - g["ppl_ci95_lo"].to_numpy(dtype=float), lo)
        hi = np.where(free, g["ppl_ci95_hi"].to_numpy(dtype=float) - values, hi)
    if y == "zs_avg" and "zs_avg_se" in g:
        half = 1.96 * g["zs_avg_se"].to_numpy(dtype=float)
        lo, hi = np.where(free, half, lo), np.where(free, half, hi)
    if np.isnan(lo).all():
        return None
    return np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)])


def _method_lines(ax, df: pd.DataFrame, y: str) -> bool:
    """One line per method in its style (minillm.artifact.styles), with error bars where the frame has them, dodged
    sideways a little so that bars at the same sparsity stay apart. Returns whether any error bar was drawn."""
    from minillm.artifact.styles import method_style

    methods = sorted(df.method.unique())
    drawn = False
    for i, method in enumerate(methods):
        g = df[df.method == method].dropna(subset=[y]).sort_values("sparsity")
        if g.empty:
            continue
        n = int(g["n_seeds"].max()) if "n_seeds" in g and g["n_seeds"].notna().any() else 1
        bars = _error_bars(g, y)
        drawn |= bars is not None
        ax.errorbar(
            g["sparsity"] + 0.003 * (i - (len(methods) - 1) / 2),
            g[y],
            yerr=bars,
            label=method + (f" (n={n} seeds)" if n > 1 else ""),
            capsize=3,
            ms=5,
            lw=1.2,
            **method_style(method),
        )
    return drawn


def ranking_markdown(df: pd.DataFrame, metric: str = "ppl") -> str:
    """Prose generated from the records: per sparsity, the methods from best to worst by `metric` (lowest
    perplexity, or highest zero-shot average for "zs_avg"), with values, and whether the gaps are backed by
    intervals or seeds. Nothing in it is typed by hand."""
    if df.empty or metric not in df:
        return "No records to summarise."
    d = seed_summary(df)
    d = d[d.method != "dense"].dropna(subset=[metric])
    has_spread = any(c in d for c in ("ppl_ci95_lo", "zs_avg_se")) or ("n_seeds" in d and (d.n_seeds > 1).any())
    lines = []
    for sparsity, g in d.groupby("sparsity"):
        g = g.sort_values(metric, ascending=metric == "ppl")
        ranked = ", ".join(f"{m} {v:.4g}" for m, v in zip(g.method, g[metric]))
        lines.append(f"* {sparsity:.0%} removed, {'perplexity' if metric == 'ppl' else metric} best first: {ranked}.")
    note = (
        "Intervals or seed spreads are in the table and figure; a gap counts only where they do not overlap."
        if has_spread
        else "These records have one seed and no intervals: the order above is measured once and may not survive "
        "another calibration draw or seed."
    )
    return "\n".join(["Generated from this profile's records:", "", *lines, "", note])


def _envelope(row) -> tuple[float, float]:
    """(low, high) of a seed-summary row: its bootstrap envelope over seeds, or the point value without one."""
    lo, hi = row.get("ppl_ci95_lo"), row.get("ppl_ci95_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return float(row["ppl"]), float(row["ppl"])
    return float(lo), float(hi)


def conclusions_frame(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Does each perplexity order of an earlier set of records (`old`, accuracy_frame rows) survive a newer one
    (`new`)? One row per sparsity and pair of methods present in `old`, the better one first as `old` had it:

    * ``holds``: the newer records separate them the same way: the better one's highest bound (bootstrap interval
      over windows, enveloped over seeds) lies below the other's lowest;
    * ``reversed``: separated the other way;
    * ``within noise``: the ranges overlap, so the newer evidence cannot order them;
    * ``not measured yet``: either method has no newer record at that sparsity.

    `min_seeds` is the fewer seeds of the two: an order that holds with one seed only excludes window noise, not the
    calibration draw's, which for some methods moves perplexity several-fold."""
    cols = ["sparsity", "better", "worse", "old_better", "old_worse", "new_better", "new_worse", "min_seeds", "verdict"]
    if old.empty:
        return pd.DataFrame(columns=cols)
    o = seed_summary(old)
    n = seed_summary(new) if not new.empty else new
    rows = []
    for sparsity, g in o[o.method != "dense"].groupby("sparsity"):
        g = g.sort_values("ppl")
        current = {} if n.empty else {r["method"]: r for _, r in n[np.isclose(n.sparsity, sparsity)].iterrows()}
        for (_, a), (_, b) in itertools.combinations(list(g.iterrows()), 2):
            ra, rb = current.get(a["method"]), current.get(b["method"])
            row = {"sparsity": sparsity, "better": a["method"], "worse": b["method"], "old_better": a["ppl"],
                   "old_worse": b["ppl"], "new_better": np.nan, "new_worse": np.nan, "min_seeds": 0}
            if ra is None or rb is None:
                row["verdict"] = "not measured yet"
            else:
                (alo, ahi), (blo, bhi) = _envelope(ra), _envelope(rb)
                row.update(new_better=float(ra["ppl"]), new_worse=float(rb["ppl"]),
                           min_seeds=int(min(ra.get("n_seeds", 1), rb.get("n_seeds", 1))))
                row["verdict"] = "holds" if ahi < blo else "reversed" if bhi < alo else "within noise"
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def plot_accuracy(df: pd.DataFrame, title: str = ""):
    """Perplexity (log) and, when present, the zero-shot average against sparsity: one colour and marker per method
    (minillm.artifact.styles), error bars from seeds or intervals where the records have them, the dense model as a dashed
    line, chance as a dotted one, a legend in each panel. `df` is `accuracy_frame`'s or `seed_summary`'s."""
    import matplotlib.pyplot as plt

    df = seed_summary(df)
    dense = df[df.method == "dense"]
    pruned = df[df.method != "dense"]
    has_zs = "zs_avg" in df and df["zs_avg"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_zs else 1, figsize=(13 if has_zs else 6.5, 4.6), squeeze=False)
    ax = axes[0, 0]
    if _method_lines(ax, pruned, "ppl"):
        ax.set_title("error bars: std over seeds, else bootstrap 95% over windows", fontsize=8)
    if not dense.empty:
        ax.axhline(float(dense.ppl.iloc[0]), color="k", ls="--", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of prunable parameters removed")
    ax.set_ylabel("perplexity, Pride and Prejudice (log)")
    ax.legend(fontsize=6, ncol=2)
    if has_zs:
        ax2 = axes[0, 1]
        if _method_lines(ax2, pruned, "zs_avg"):
            ax2.set_title("error bars: std over seeds, else 1.96 standard errors", fontsize=8)
        if not dense.empty and pd.notna(dense.zs_avg.iloc[0]):
            ax2.axhline(float(dense.zs_avg.iloc[0]), color="k", ls="--", lw=1, label="dense")
        tasks = _zeroshot_tasks(df)
        if tasks:
            ax2.axhline(zeroshot_chance(tasks), color="0.4", ls=":", lw=1.2, label="chance (mean of 1/choices)")
        ax2.set_xlabel("fraction of prunable parameters removed")
        ax2.set_ylabel("average zero-shot accuracy (cloze tasks)")
        ax2.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _zeroshot_tasks(df: pd.DataFrame) -> list[str]:
    """The bundled task names behind the per-task columns of an accuracy frame ("hyperbaton (acc)" ->
    "bb_cloze_hyperbaton")."""
    from minillm.evaluate import load_task_specs

    known = {s["task"].removeprefix("bb_cloze_"): s["task"] for s in load_task_specs()}
    return [known[c.split(" (")[0]] for c in df.columns if " (" in c and c.split(" (")[0] in known]


# --- across models --------------------------------------------------------------------------------------------------

# the per-model columns a cross-model frame carries, where a model's frame has them
CROSS_COLUMNS = (
    "achieved",
    "ppl",
    "ppl_std",
    "ppl_ci95_lo",
    "ppl_ci95_hi",
    "zs_avg",
    "zs_avg_std",
    "zs_avg_se",
    "n_seeds",
)


def cross_model_frame(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (method label, sparsity) that every model's accuracy frame has (`accuracy_frame`'s or
    `seed_summary`'s; seed replicates are aggregated here), keyed by the model name in `frames`. Each model's
    columns carry its name, `ppl (gemma3-270m)`, and are those of CROSS_COLUMNS its frame has: perplexity, its seed
    std and bootstrap bounds, the zero-shot average and its std or standard error, the seed count, and the achieved
    sparsity (which can differ between models at the same target). Labels that only some models have are dropped;
    the dense row stays."""
    if len(frames) < 2:
        raise ValueError(f"a cross-model frame needs two or more models, got {list(frames)}")
    if any(df.empty for df in frames.values()):
        return pd.DataFrame(columns=["method", "sparsity"])
    keys = ["method", "pattern", "sparsity"]
    if not all("pattern" in df for df in frames.values()):
        keys.remove("pattern")
    merged = None
    for model, df in frames.items():
        d = seed_summary(df)
        columns = [c for c in CROSS_COLUMNS if c in d]
        d = d[keys + columns].rename(columns={c: f"{c} ({model})" for c in columns})
        merged = d if merged is None else merged.merge(d, on=keys, how="inner")
    return merged.sort_values(["sparsity", f"ppl ({next(iter(frames))})"]).reset_index(drop=True)


def _cross_models(cross_df: pd.DataFrame, metric: str) -> list[str]:
    """The model names of a cross-model frame that have a `metric` column."""
    prefix = f"{metric} ("
    return [c[len(prefix) : -1] for c in cross_df.columns if c.startswith(prefix) and c.endswith(")")]


def _model_view(cross_df: pd.DataFrame, model: str) -> pd.DataFrame:
    """One model's columns of a cross-model frame under their accuracy-frame names (`ppl (m)` -> `ppl`)."""
    suffix = f" ({model})"
    names = {c: c.removesuffix(suffix) for c in cross_df.columns if c.endswith(suffix)}
    if not names:
        raise ValueError(f"no columns of model {model!r}; models: {_cross_models(cross_df, 'ppl')}")
    return cross_df[["method", "sparsity", *names]].rename(columns=names)


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b of two equally long vectors (scipy.stats.kendalltau): (concordant - discordant pairs) /
    sqrt(pairs untied in x * pairs untied in y), so that a pair tied on either side counts as neither. 1: the same
    order, -1: reversed; NaN when either vector is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"kendall_tau_b needs two equally long vectors, got shapes {x.shape} and {y.shape}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    from scipy import stats  # here, not at import: 1.6 s that only the cross-model statistics need

    return float(stats.kendalltau(x, y, variant="b").statistic)


def _concordance(x, y, axis=-1):
    """Sum over pairs i < j of sign(x_i - x_j) sign(y_i - y_j), along `axis` (batched for permutation_test)."""
    x, y = np.moveaxis(np.asarray(x), axis, -1), np.moveaxis(np.asarray(y), axis, -1)
    i, j = np.triu_indices(x.shape[-1], 1)
    return np.sum(np.sign(x[..., i] - x[..., j]) * np.sign(y[..., i] - y[..., j]), axis=-1)


def permutation_p_values(x, y, max_exact: int = 10, draws: int = 100_000, seed: int = 0) -> tuple[float, float, str]:
    """(one-sided, two-sided) permutation p-values of Kendall's tau-b between x and y, and how they were found
    (scipy.stats.permutation_test over the pairings of x with y). The null hypothesis is that y's values are
    assigned to x's at random: one-sided is the share of the assignments whose tau is at least the observed one
    (orders at least this concordant), two-sided the share whose |tau| is at least the observed |tau|. Exact (all
    n! assignments, ties kept as they are) for n <= `max_exact`, else `draws` seeded random assignments with the
    observed one counted in ((1 + hits) / (1 + draws)). Tau-b's denominator does not change under permutation, so
    the test statistic is the concordance sum (integer, no rounding ties)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    exact = math.factorial(n) <= math.factorial(max_exact)
    # one sample with "pairings": y's order is permuted against the fixed x (n! assignments, not (n!)^2)
    from scipy import stats

    result = stats.permutation_test(
        (y,), lambda y_, axis=-1: _concordance(np.broadcast_to(x, y_.shape), y_, axis), permutation_type="pairings",
        vectorized=True, alternative="greater", n_resamples=math.factorial(n) if exact else draws, batch=50_000,
        rng=np.random.default_rng(seed),
    )
    observed, null = abs(result.statistic), np.abs(result.null_distribution)
    if exact:
        return float(result.pvalue), float(np.count_nonzero(null >= observed) / null.size), "exact"
    two_sided = (1 + np.count_nonzero(null >= observed)) / (1 + draws)
    return float(result.pvalue), float(two_sided), f"{draws:,} random permutations"


def rank_agreement(cross_df: pd.DataFrame, metric: str = "ppl") -> pd.DataFrame:
    """Whether two models order the methods alike: per pair of models and per sparsity, Kendall's tau-b between
    their `metric` values over the method labels both have (the dense row excluded), the number of methods, and
    permutation p-values (`permutation_p_values`: exact up to 10 methods; one-sided for "at least this much
    agreement", two-sided for "at least this much agreement or disagreement").

    tau = 1: both models put the methods in the same order; -1: opposite orders; 0: as much agreement as
    disagreement over the pairs of methods. With 8 to 12 methods tau is coarse (two methods swapping places moves it
    by 2/28 with 8) and its null distribution wide: without ties, a one-sided p below 0.05 needs tau >= 0.57 with 8
    methods, >= 0.47 with 10 and about 0.4 with 12, so a moderate tau is not distinguishable from no agreement."""
    columns = ["model_a", "model_b", "sparsity", "n_methods", "kendall_tau_b", "p_one_sided", "p_two_sided", "p_method"]
    rows = []
    pruned = cross_df[cross_df.method != "dense"]
    for a, b in itertools.combinations(_cross_models(cross_df, metric), 2):
        for sparsity, g in pruned.groupby("sparsity"):
            g = g.dropna(subset=[f"{metric} ({a})", f"{metric} ({b})"])
            if len(g) < 2:
                continue
            x, y = g[f"{metric} ({a})"].to_numpy(dtype=float), g[f"{metric} ({b})"].to_numpy(dtype=float)
            tau = kendall_tau_b(x, y)
            p_one, p_two, how = permutation_p_values(x, y) if not math.isnan(tau) else (math.nan, math.nan, "-")
            rows.append(dict(zip(columns, (a, b, sparsity, len(g), tau, p_one, p_two, how))))
    return pd.DataFrame(rows, columns=columns)


def rank_agreement_markdown(agreement: pd.DataFrame, metric: str = "ppl") -> str:
    """Prose generated from `rank_agreement`'s table: per pair of models and sparsity, tau-b, the number of methods
    and the one-sided p-value. Nothing in it is typed by hand."""
    if agreement.empty:
        return "No sparsity has two or more methods measured on both models: no rank correlation to report."
    what = "perplexity" if metric == "ppl" else metric
    lines = ["Generated from the two profiles' records:", ""]
    for (a, b), g in agreement.groupby(["model_a", "model_b"], sort=False):
        per_sparsity = "; ".join(
            f"{r.sparsity:.0%} removed, tau = {r.kendall_tau_b:.2f} over {r.n_methods} methods "
            f"(one-sided p = {r.p_one_sided:.3g}, {r.p_method})"
            for r in g.itertuples()
        )
        lines.append(
            f"* Kendall tau-b between the method orders by {what} of {a} and {b}, per sparsity: {per_sparsity}."
        )
    note = (
        "The p-value is the chance that randomly paired values agree at least this well; with this few methods only "
        "a large tau is distinguishable from no agreement."
    )
    return "\n".join([*lines, "", note])


# what cross_model_orders calls each combination of the two models' separations
SAME_ORDER, OPPOSITE_ORDERS, NEITHER_SEPARATES = "same order on both", "opposite orders", "neither separates"


def _separation(a_row, b_row) -> str:
    """'<' if method a's perplexity range lies wholly below b's, '>' if wholly above, '~' if they overlap (ranges:
    `_envelope`)."""
    (alo, ahi), (blo, bhi) = _envelope(a_row), _envelope(b_row)
    return "<" if ahi < blo else ">" if bhi < alo else "~"


def cross_model_orders(cross_df: pd.DataFrame, models) -> pd.DataFrame:
    """Which pairwise perplexity conclusions hold on both models of a cross-model frame. For every sparsity and pair
    of methods measured on both (dense excluded), each model separates the two, or not, as `conclusions_frame` does:
    one method's range (bootstrap 95% interval over windows, enveloped over seeds) wholly below the other's. The
    verdict is

    * ``same order on both``: both models separate them, the same way round;
    * ``opposite orders``: both separate them, in opposite ways (a conclusion of one model that the other reverses);
    * ``only <model> separates``: one model orders them, the other's ranges overlap (no conclusion carries over);
    * ``neither separates``.

    `better` is the method with the lower perplexity on models[0] (on models[1] where models[0] ties it)."""
    if len(models) != 2:
        raise ValueError(f"cross_model_orders compares two models, got {list(models)}")
    a, b = models
    cols = ["sparsity", "better", "worse", f"ppl_better ({a})", f"ppl_worse ({a})", f"ppl_better ({b})",
            f"ppl_worse ({b})", "min_seeds", "verdict"]
    if cross_df.empty:
        return pd.DataFrame(columns=cols)
    views = {m: _model_view(cross_df, m) for m in models}
    rows = []
    for sparsity in sorted(set(cross_df.sparsity[cross_df.method != "dense"])):
        per_model = {
            m: {r["method"]: r for _, r in v[(v.method != "dense") & np.isclose(v.sparsity, sparsity)].iterrows()}
            for m, v in views.items()
        }
        methods = sorted(
            (x for x in per_model[a] if x in per_model[b] and pd.notna(per_model[a][x]["ppl"])
             and pd.notna(per_model[b][x]["ppl"])),
            key=lambda x: (float(per_model[a][x]["ppl"]), float(per_model[b][x]["ppl"])),
        )
        for x, y in itertools.combinations(methods, 2):
            sa, sb = _separation(per_model[a][x], per_model[a][y]), _separation(per_model[b][x], per_model[b][y])
            if sa != "~" and sb != "~":
                verdict = SAME_ORDER if sa == sb else OPPOSITE_ORDERS
            elif sa == "~" and sb == "~":
                verdict = NEITHER_SEPARATES
            else:
                verdict = f"only {a if sa != '~' else b} separates"
            seeds = [per_model[m][k].get("n_seeds", 1) for m in models for k in (x, y)]
            rows.append(dict(zip(cols, (
                sparsity, x, y, float(per_model[a][x]["ppl"]), float(per_model[a][y]["ppl"]),
                float(per_model[b][x]["ppl"]), float(per_model[b][y]["ppl"]),
                int(min(1 if pd.isna(s) else s for s in seeds)), verdict,
            ))))
    return pd.DataFrame(rows, columns=cols)


def cross_model_orders_markdown(orders: pd.DataFrame) -> str:
    """Prose generated from `cross_model_orders`: per sparsity, how many method pairs each verdict has, and every
    pair whose order the two models separate in opposite ways, by name."""
    if orders.empty:
        return "No sparsity has two or more methods measured on both models: no pairwise conclusions to compare."
    lines = ["Pairwise perplexity conclusions on both models (generated from the records):", ""]
    for sparsity, g in orders.groupby("sparsity"):
        counts = g.verdict.value_counts()
        order = [SAME_ORDER, *sorted(v for v in counts.index if v.startswith("only ")), NEITHER_SEPARATES,
                 OPPOSITE_ORDERS]
        text = ", ".join(f"{counts[v]} {v}" for v in order if v in counts)
        flipped = g[g.verdict == OPPOSITE_ORDERS]
        names = "; ".join(f"{r.better} vs {r.worse}" for r in flipped.itertuples())
        pairs = f"{len(g)} pair" + ("s" if len(g) != 1 else "")
        lines.append(f"* {sparsity:.0%} removed, {pairs}: {text}" + (f" (opposite: {names})" if names else "") + ".")
    return "\n".join(lines)


def plot_cross_model(cross_df: pd.DataFrame, models, metric: str = "ppl", title: str = ""):
    """One panel per sparsity: each method's `metric` on models[0] (x) against models[1] (y), log-log for
    perplexity, one colour and marker per method (minillm.artifact.styles), error bars (seed std, else the 95% interval)
    where the records have them, the dense models as dashed lines, Kendall's tau-b in the panel's title and a
    legend in each panel. `cross_df` is `cross_model_frame`'s."""
    import matplotlib.pyplot as plt

    from minillm.artifact.styles import method_style

    if len(models) != 2:
        raise ValueError(f"plot_cross_model compares two models, got {list(models)}")
    views = [_model_view(cross_df, m).dropna(subset=[metric]) for m in models]
    both = cross_df.loc[views[0].index.intersection(views[1].index)]
    sparsities = sorted(both.loc[both.method != "dense", "sparsity"].unique())
    if not sparsities:
        raise ValueError(f"no pruned method has {metric} on both {models[0]} and {models[1]}")
    ncols = min(len(sparsities), 4)
    nrows = math.ceil(len(sparsities) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.2 * nrows), squeeze=False)
    what = "perplexity (log)" if metric == "ppl" else metric
    for ax, sparsity in zip(axes.flat, sparsities):
        rows = both[(both.sparsity == sparsity) & (both.method != "dense")].sort_values("method").index
        x, y = views[0].loc[rows], views[1].loc[rows]
        xerr, yerr = _error_bars(x, metric), _error_bars(y, metric)
        for k, method in enumerate(x.method):
            ax.errorbar(
                x[metric].iloc[k],
                y[metric].iloc[k],
                xerr=None if xerr is None else xerr[:, k : k + 1],
                yerr=None if yerr is None else yerr[:, k : k + 1],
                ls="none",
                ms=6,
                capsize=3,
                label=method,
                **method_style(method),
            )
        dense = [v[v.method == "dense"][metric] for v in views]
        if all(len(d) for d in dense):
            ax.axvline(float(dense[0].iloc[0]), color="k", ls="--", lw=0.8, label="dense")
            ax.axhline(float(dense[1].iloc[0]), color="k", ls="--", lw=0.8)
        if metric == "ppl":
            ax.set_xscale("log")
            ax.set_yscale("log")
        tau = kendall_tau_b(x[metric], y[metric])
        ax.set_title(f"{sparsity:.0%} removed: Kendall tau-b {tau:.2f} over {len(x)} methods", fontsize=9)
        ax.set_xlabel(f"{what}, {models[0]}")
        ax.set_ylabel(f"{what}, {models[1]}")
        ax.legend(fontsize=6)
    for ax in axes.flat[len(sparsities) :]:
        fig.delaxes(ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- memory -------------------------------------------------------------------------------------------------------


BUDGET_SUFFIX = r"-c(\d+)x(\d+)$"  # a calibration_budget label: the accuracy label, then -c<windows>x<tokens a window>


def calibration_budget_frame(records: list[dict]) -> pd.DataFrame:
    """One row per calibration_budget record: the method series (the label without its `-c<n>x<seqlen>` suffix),
    sparsity, calibration windows, window length and tokens (their product, as sampled: what the method saw),
    perplexity with its bootstrap interval, the time and the in-process peak-memory increase of scoring and
    pruning (for methods whose scores are shared across sparsities, scoring is timed once and pruning after it)."""
    rows = []
    for r in records:
        if r is None or r["config"]["method"] == "dense":
            continue
        cfg, m, timing = r["config"], r["metrics"], r.get("timing", {})
        calib = cfg["calibration"]
        row = {
            "method": re.sub(BUDGET_SUFFIX, "", cfg["label"]),
            "label": cfg["label"],
            "sparsity": cfg["sparsity"],
            "windows": calib["n_samples"],
            "seqlen": calib["seqlen"],
            "tokens": calib["n_samples"] * calib["seqlen"],
            "ppl": m["perplexity"]["ppl"],
        }
        if "ppl_ci95" in m["perplexity"]:
            row["ppl_ci95_lo"], row["ppl_ci95_hi"] = m["perplexity"]["ppl_ci95"]
        shared = "scoring_peak_memory_in_process" in timing
        row["scoring_s"] = timing.get("scoring_time_s")
        row["prune_s"] = timing.get("prune_time_s")
        row["total_s"] = (row["scoring_s"] or 0.0) * shared + (row["prune_s"] or 0.0)
        peaks = [timing.get(k, {}).get("increase_gib") for k in ("scoring_peak_memory_in_process",
                                                                  "prune_peak_memory_in_process")]
        peaks = [p for p in peaks if p is not None]
        row["peak_increase_gib"] = max(peaks) if peaks else None
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["sparsity", "method", "tokens", "seqlen"]).reset_index(drop=True)


def plot_calibration_budget(df: pd.DataFrame, title: str = ""):
    """Perplexity against calibration tokens (both log scales), one panel per sparsity, one line per method through
    its budgets (at a token count with two window lengths, the line takes the longer windows and the other is an
    open marker), with the bootstrap intervals as error bars."""
    import matplotlib.pyplot as plt

    from minillm.artifact.styles import method_style

    sparsities = sorted(df.sparsity.unique())
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.5 * len(sparsities), 4.2), squeeze=False)
    for ax, s in zip(axes[0], sparsities):
        for method, g in df[df.sparsity == s].groupby("method"):
            g = g.sort_values(["tokens", "seqlen"], ascending=[True, False])
            line = g.drop_duplicates("tokens")
            style = method_style(method)
            ax.errorbar(line.tokens, line.ppl, yerr=_error_bars(line, "ppl"), capsize=3, ms=5, lw=1.2, label=method,
                        **style)
            for seqlen, other in g.drop(line.index).groupby("seqlen"):
                ax.errorbar(other.tokens, other.ppl, yerr=_error_bars(other, "ppl"), capsize=3, ms=7, ls="none",
                            mfc="none", label=f"{method} ({seqlen}-token windows)", **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("calibration tokens (log)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{s:.0%} sparsity")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def memory_frame(records: list[dict]) -> pd.DataFrame:
    """One row per step and shape: absolute peak, its ratio to the dense forward, the increase over the pre-step
    baseline, status; `scoring_peak_gib` / `scoring_ratio` where a record measured scoring apart from removal."""
    rows = []
    for r in records:
        m = r["metrics"]
        dense = m["dense_forward"]
        base = {
            "model": m["model"],
            "shape": f"{m['batch']}x{m['seqlen']}",
            "dtype": m["dtype"],
            "device": r["provenance"]["device"],
        }
        rows.append(
            {
                **base,
                "method": "dense forward",
                "peak_gib": dense.get("peak_gib"),
                "ratio": 1.0,
                "increase_gib": dense.get("increase_gib"),
            }
        )
        for x in m["methods"]:
            rows.append(
                {
                    **base,
                    "method": x["label"],
                    "peak_gib": x.get("peak_gib"),
                    "ratio": x.get("ratio_to_dense_forward"),
                    "increase_gib": x.get("increase_gib"),
                    "status": memory_status(x),
                    "capacity_gib": x.get("capacity_gib"),
                    "error": "; ".join(x.get("error", [])) or None,
                    # scoring alone, where the step was measured in two phases (measure.memory_step)
                    "scoring_peak_gib": (x.get("scoring") or {}).get("peak_gib"),
                    "scoring_ratio": x.get("scoring_ratio_to_dense_forward"),
                }
            )
    df = pd.DataFrame(rows)
    df = df.drop(columns=[c for c in ("scoring_peak_gib", "scoring_ratio") if c in df and df[c].isna().all()])
    if "status" in df:
        df["status"] = df["status"].fillna("ok")
    return df


def memory_status(x: dict) -> str:
    """'ok', 'out of memory (N GiB device)' or 'failed': an out-of-memory step is a result and stays in tables."""
    if x.get("oom"):
        cap = x.get("capacity_gib")
        return f"out of memory ({cap:g} GiB device)" if cap else "out of memory"
    return "failed" if x.get("error") else "ok"


def plot_memory(df: pd.DataFrame, title: str = ""):
    """Per (model, shape): each step's absolute peak (solid bar, ratio to the dense forward annotated) beside its
    increase over the pre-step baseline (hatched bar), in the method's colour (minillm.artifact.styles); out-of-memory steps
    as hatched outlines up to the device's capacity."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from minillm.artifact.styles import method_style

    groups = list(df.groupby(["model", "shape"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.4), squeeze=False)
    has_increase = "increase_gib" in df and df["increase_gib"].notna().any()
    width = 0.4 if has_increase else 0.8
    for ax, ((model, shape), g) in zip(axes[0], groups):
        oom = g[g.get("status", pd.Series(dtype=str)).fillna("").str.startswith("out of memory")]
        g = g.dropna(subset=["peak_gib"]).reset_index(drop=True)
        x = list(range(len(g)))
        colours = [method_style(m)["color"] for m in g["method"]]
        shift = -width / 2 if has_increase else 0.0
        bars = ax.bar([i + shift for i in x], g["peak_gib"], width=width, color=colours)
        if has_increase:
            ax.bar([i + width / 2 for i in x], g["increase_gib"], width=width, color=colours, alpha=0.45, hatch="//")
        for bar, ratio in zip(bars, g["ratio"]):
            ax.annotate(
                f"x{ratio:.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        labels = list(g["method"])
        for _, row in oom.iterrows():  # out of memory: a hatched bar up to the device's capacity, labelled
            height = row.get("capacity_gib") or (g["peak_gib"].max() if len(g) else 1.0)
            ax.bar([len(labels)], [height], color="none", edgecolor="C3", hatch="//")
            ax.annotate("OOM", (len(labels), height), ha="center", va="bottom", fontsize=8, color="C3")
            labels.append(row["method"])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{model}, {shape}", fontsize=9)
        ax.set_ylabel("memory of the step (GiB)")
        handles = [Patch(facecolor="0.6", label="absolute peak (x dense forward)")]
        if has_increase:
            handles.append(Patch(facecolor="0.6", alpha=0.45, hatch="//", label="increase over pre-step baseline"))
        ax.legend(handles=handles, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- latency ------------------------------------------------------------------------------------------------------


def latency_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (record, variant, prefill shape or decode batch): median time and IQR (q1, q3), tokens/s, the
    speed-up over dense with its 95% interval over paired rounds (`speedup_ci95_lo/hi`, NaN in records made before
    interleaved timing), and the `ceiling` its counted FLOPs allow (NaN where not recorded, e.g. 2:4 on sparse
    kernels)."""
    rows = []
    for r in records:
        m = r["metrics"]
        for row in m["rows"]:
            for kind in ("prefill", "decode"):
                for i, x in enumerate(row[kind]):
                    dense = row["sparsity"] == 0
                    speed = 1.0 if dense else row[f"{kind}_speedup"][i]
                    ci = [None, None] if dense else row.get(f"{kind}_speedup_ci95", [[None, None]] * (i + 1))[i]
                    ceiling = 1.0 if dense else row.get(f"{kind}_ceiling", [None] * (i + 1))[i]
                    shape = f"{x['batch']}x{x['seqlen']}" if kind == "prefill" else f"b{x['batch']}"
                    rows.append(
                        {
                            "model": m["model"],
                            "dtype": m["dtype"],
                            "round_to": m.get("round_to", 1),
                            "variant": _latency_variant(row, m.get("device", "")),
                            "sparsity": row["sparsity"],
                            "kind": kind,
                            "shape": shape,
                            "median_ms": 1000 * x["median_s"],
                            "iqr_ms": 1000 * x["iqr_s"],
                            "q1_ms": 1000 * x["q1_s"],
                            "q3_ms": 1000 * x["q3_s"],
                            "tokens_per_s": x["tokens_per_s"],
                            "speedup": speed,
                            "speedup_ci95_lo": ci[0],
                            "speedup_ci95_hi": ci[1],
                            "ceiling": ceiling,
                            "device": r["provenance"]["device"],
                        }
                    )
    if not rows:  # no records (e.g. the gpu profile here): an empty frame the notebook can test
        return pd.DataFrame()
    return pd.DataFrame(rows).astype({"speedup_ci95_lo": float, "speedup_ci95_hi": float, "ceiling": float})


def engine_latency_frame(record: dict) -> pd.DataFrame:
    """The llama.cpp bench record (`minillm.bench.llamacpp`) as `latency_frame` rows, one group per GGUF type (in
    the `dtype` column, e.g. "llama.cpp q8_0"), plus each row's architecture, padding overhead and the fraction of
    its FLOP ceiling reached (`of_ceiling`)."""
    frames = []
    for kind, rows in record["types"].items():
        metrics = {"model": record["model"], "dtype": f"llama.cpp {kind}", "device": "cpu", "rows": rows}
        df = latency_frame([{"metrics": metrics, "provenance": record["provenance"]}])
        per_row = [r for r in rows for _ in range(len(r["prefill"]) + len(r["decode"]))]
        df["architecture"] = [r["architecture"] for r in per_row]
        df["padding_overhead"] = [r.get("padding_overhead") for r in per_row]
        frames.append(df)
    out = pd.concat(frames, ignore_index=True).astype({"padding_overhead": float})
    out["of_ceiling"] = out["speedup"] / out["ceiling"]
    return out


def _latency_variant(row: dict, device: str) -> str:
    """The row's variant; a 2:4 model whose weights stayed dense (no semi-structured kernels, e.g. on CPU) says so,
    since its timing is a dense model's."""
    variant = row.get("variant", "structured" if row["sparsity"] else "dense")
    kernels = row.get("semi_structured")
    if variant == "2:4" and kernels is not None and not kernels.get("converted"):
        where = " on CPU" if str(device).startswith("cpu") else ""
        return f"2:4 (dense kernels{where})"
    return variant


def _latency_style(variant: str, index: int) -> dict:
    """Bar colour of a latency variant from minillm.artifact.styles (dense: 'dense'; structured copies are pruned with
    random scores: 'random'; 2:4: 'magnitude_24'), with a hatch per sparsity of the same variant."""
    from minillm.artifact.styles import method_style

    family = "dense" if variant == "dense" else "magnitude_24" if variant.startswith("2:4") else "random"
    # the llama.cpp bench's global plans (magnitude): per-layer widths (deci) and their padded stock export
    color = {"deci": "tab:blue", "padded": "tab:orange"}.get(variant, method_style(family)["color"])
    return {"color": color, "hatch": ("", "//", "..", "xx")[index % 4], "edgecolor": "w"}


def plot_latency(df: pd.DataFrame, title: str = ""):
    """Left: median time per setting and variant, error bars from the recorded quartiles (the IQR). Right: speed-up
    over dense, error bars the recorded 95% interval over paired rounds, and a black bar mark at the ceiling the
    variant's counted FLOPs allow."""
    import matplotlib.pyplot as plt
    import numpy as np

    d = df.copy()
    d["setting"] = d["kind"] + " " + d["shape"]
    d["model variant"] = d["variant"] + " " + (d["sparsity"] * 100).round().astype(int).astype(str) + "%"
    settings = list(dict.fromkeys(d["setting"]))
    variants = list(dict.fromkeys(d["model variant"]))
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(variants)
    seen: dict[str, int] = {}
    for j, name in enumerate(variants):
        g = d[d["model variant"] == name].set_index("setting").reindex(settings)
        variant = g["variant"].dropna().iloc[0]
        seen[variant] = seen.get(variant, -1) + 1  # the how-many-th sparsity of this variant: its hatch
        style = _latency_style(variant, seen[variant])
        x = np.arange(len(settings)) + (j - (len(variants) - 1) / 2) * width
        iqr = [(g["median_ms"] - g["q1_ms"]).clip(lower=0), (g["q3_ms"] - g["median_ms"]).clip(lower=0)]
        ax_time.bar(x, g["median_ms"], width, yerr=iqr, capsize=2, label=name, **style)
        if variant == "dense":
            continue
        ci = [(g["speedup"] - g["speedup_ci95_lo"]).clip(lower=0), (g["speedup_ci95_hi"] - g["speedup"]).clip(lower=0)]
        ax_speed.bar(x, g["speedup"], width, yerr=ci, capsize=2, label=name, **style)
        ax_speed.scatter(x, g["ceiling"], marker="_", s=200, color="k", zorder=3)
    for ax in (ax_time, ax_speed):
        ax.set_xticks(np.arange(len(settings)), settings, rotation=30)
        ax.legend(fontsize=7, title="model variant", title_fontsize=7)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("median time (ms)")
    ax_time.set_title("error bars: IQR over all rounds", fontsize=8)
    ax_speed.axhline(1.0, color="k", lw=1, ls="--")
    ax_speed.set_ylabel("speed-up over dense")
    ax_speed.set_title("error bars: 95% CI over paired rounds; black mark: ceiling from counted FLOPs", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- architecture ---------------------------------------------------------------------------------------------------


def widths_frame(records: list[dict]) -> pd.DataFrame:
    """Kept query heads and channels per layer, as fractions of the original, per (method, sparsity)."""
    rows = []
    for r in records:
        plan = r.get("plan")
        if not plan or r["config"].get("replicate"):  # seed replicates: the widths of seed 0 are shown
            continue
        cfg, arch = r["config"], plan.get("architecture", {})
        for i, w in enumerate(plan["widths"]):
            rows.append(
                {
                    "method": cfg.get("label", cfg["method"]),
                    "sparsity": cfg["sparsity"],
                    "layer": i,
                    "query_heads": w["query_heads"],
                    "channels": w["channels"],
                    "heads_frac": w["query_heads"] / arch.get("num_query_heads", 1),
                    "channels_frac": w["channels"] / arch.get("intermediate_size", 1),
                }
            )
    return pd.DataFrame(rows)


def plot_widths(df: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt

    labels = sorted({(m, s) for m, s in zip(df.method, df.sparsity)}, key=lambda x: (x[1], x[0]))
    n_layers = int(df.layer.max()) + 1
    heads = np.full((len(labels), n_layers), np.nan)
    chans = np.full((len(labels), n_layers), np.nan)
    for k, (m, s) in enumerate(labels):
        sub = df[(df.method == m) & (df.sparsity == s)]
        heads[k, sub.layer.values] = sub.heads_frac.values
        chans[k, sub.layer.values] = sub.channels_frac.values
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.32 * len(labels) + 1.5))
    for ax, mat, name in ((axes[0], heads, "kept query heads"), (axes[1], chans, "kept MLP channels")):
        im = ax.imshow(mat, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(labels)), [f"{m} @{s:.0%}" for m, s in labels], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(name + " (fraction of original)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- recovery -------------------------------------------------------------------------------------------------------


def _recovery_row(r: dict) -> dict:
    """The before/after values and training summary of one recovery record."""
    cfg, m = r["config"], r["metrics"]
    row = {
        "method": cfg["label"],
        "sparsity": cfg["sparsity"],
        "kl_weight": cfg["kl_weight"],
        "ppl_before": m["before"]["perplexity"]["ppl"],
        "ppl_after": m["after"]["perplexity"]["ppl"],
    }
    if "zeroshot" in m["before"] and "zeroshot" in m["after"]:
        row["zs_before"] = m["before"]["zeroshot"]["average"]
        row["zs_after"] = m["after"]["zeroshot"]["average"]
    rec = m["recovery"]
    row.update(
        {
            "steps": rec["steps"],
            "loss_first": rec["mean_loss_first_10pct"],
            "loss_last": rec["mean_loss_last_10pct"],
            "train_s": rec["time_s"],
        }
    )
    return row


def recovery_frame(records: list[dict]) -> pd.DataFrame:
    """Before/after LoRA recovery (with or without KL to the parent), one row per pruned (method, sparsity, KL
    weight), beside the dense control of the same training budget.

    The dense control (records with method "dense") is the unpruned model trained with the same LoRA settings on the
    same windows, without KL; a row's control is the one whose `train` settings and model equal the row's. Its
    columns: `ppl_dense_before` (the unpruned model), `ppl_dense_after` (after the control's LoRA), and
    `zs_dense_before` / `zs_dense_after` where zero-shot was measured. In log-perplexity (mean NLL per token, nats):
    `recovered` = ln(ppl_before) - ln(ppl_after), what LoRA gave the pruned model; `control_gain` =
    ln(ppl_dense_before) - ln(ppl_dense_after), what the same LoRA gave the unpruned model (adaptation to the
    training text, not repair of pruning damage); `control_share` = control_gain / recovered. A share near 1 means
    the pruned model gained no more than the dense one did; near 0 (or below), that the gain repaired the pruning.
    The share is NaN without a control or when recovered <= 0 (nothing recovered to explain)."""

    def budget(r: dict) -> str:
        return json.dumps([r["config"]["model"], r["config"]["train"]], sort_keys=True)

    controls = {budget(r): r["metrics"] for r in records if r["config"]["method"] == "dense"}
    rows = []
    for r in records:
        if r["config"]["method"] == "dense":
            continue
        row = _recovery_row(r)
        control = controls.get(budget(r), {})
        before, after = control.get("before", {}), control.get("after", {})
        row["ppl_dense_before"] = before.get("perplexity", {}).get("ppl", np.nan)
        row["ppl_dense_after"] = after.get("perplexity", {}).get("ppl", np.nan)
        if "zeroshot" in before and "zeroshot" in after:
            row["zs_dense_before"] = before["zeroshot"]["average"]
            row["zs_dense_after"] = after["zeroshot"]["average"]
        row["recovered"] = math.log(row["ppl_before"]) - math.log(row["ppl_after"])
        row["control_gain"] = math.log(row["ppl_dense_before"]) - math.log(row["ppl_dense_after"])
        row["control_share"] = row["control_gain"] / row["recovered"] if row["recovered"] > 0 else np.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values(["sparsity", "method", "steps", "kl_weight"]).reset_index(drop=True) if not df.empty else df


def plot_recovery(df: pd.DataFrame, title: str = ""):
    """Per row of `recovery_frame`: the pruned model's perplexity (light bar) and after LoRA recovery (solid bar) in
    the method's colour (minillm.artifact.styles); the unpruned model's perplexity as a horizontal line; the dense control
    of the row's training budget (the unpruned model after the same LoRA) as a dashed tick over the row, with the
    row's `control_share` written above it."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from minillm.artifact.styles import method_style

    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(df)), 4))
    dense = method_style("dense")["color"]
    labels = []
    for i, (_, r) in enumerate(df.iterrows()):
        labels.append(f"{r['method']} @{r['sparsity']:.0%}\nKL {r['kl_weight']:g}, {r['steps']} steps")
        colour = method_style(r["method"])["color"]
        ax.bar(i - 0.2, r["ppl_before"], width=0.4, color=colour, alpha=0.35)
        ax.bar(i + 0.2, r["ppl_after"], width=0.4, color=colour)
        if np.isfinite(r["ppl_dense_after"]):
            ax.hlines(r["ppl_dense_after"], i - 0.45, i + 0.45, colors=dense, linestyles="--", lw=1.5)
        if np.isfinite(r["control_share"]):
            top = max(r["ppl_before"], r["ppl_after"])
            ax.annotate(f"{r['control_share']:.0%}", (i, top), ha="center", va="bottom", fontsize=7)
    dense_ppl = df["ppl_dense_before"].dropna().unique() if len(df) else []
    for value in dense_ppl:
        ax.axhline(value, color=dense, lw=1.0)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    handles = [
        Patch(facecolor="0.6", alpha=0.35, label="pruned"),
        Patch(facecolor="0.6", label="after LoRA recovery"),
        Line2D([], [], color=dense, lw=1.0, label="dense (unpruned)"),
        Line2D([], [], color=dense, ls="--", lw=1.5, label="dense + same LoRA (control)"),
    ]
    ax.legend(handles=handles, fontsize=7, title="above bars: control_share", title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
