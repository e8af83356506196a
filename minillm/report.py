"""Tables and figures from result records only (no compute): what the notebooks render.

Tables are written as CSV and Markdown, figures as PNG and PDF, under figures/<profile>/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .results import REPO_ROOT

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
    return paths


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
    seed) and the number of seeds `n_seeds`. Bootstrap bounds become their envelope over seeds (lowest lo,
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
    if "zs_avg" in df:
        out["zs_avg_std"] = grouped["zs_avg"].std(ddof=1)
    out["n_seeds"] = grouped["seed"].nunique()
    return out.reset_index().sort_values(["sparsity", "ppl"]).reset_index(drop=True)


def zeroshot_chance(task_names) -> float:
    """Chance level of the zero-shot average: the mean over the tasks of 1 / number of choices (tasks.json); a
    task whose examples have different numbers of choices ("variable") contributes its recorded `chance`, the
    mean of 1 / choices over its examples."""
    from .evaluate import load_task_specs

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
    import numpy as np

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
    """One line per method in its style (minillm.styles), with error bars where the frame has them, dodged
    sideways a little so that bars at the same sparsity stay apart. Returns whether any error bar was drawn."""
    from .styles import method_style

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


def plot_accuracy(df: pd.DataFrame, title: str = ""):
    """Perplexity (log) and, when present, the zero-shot average against sparsity: one colour and marker per method
    (minillm.styles), error bars from seeds or intervals where the records have them, the dense model as a dashed
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
    from .evaluate import load_task_specs

    known = {s["task"].removeprefix("bb_cloze_"): s["task"] for s in load_task_specs()}
    return [known[c.split(" (")[0]] for c in df.columns if " (" in c and c.split(" (")[0] in known]


# --- memory -------------------------------------------------------------------------------------------------------


def memory_frame(records: list[dict]) -> pd.DataFrame:
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
                }
            )
    df = pd.DataFrame(rows)
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
    increase over the pre-step baseline (hatched bar), in the method's colour (minillm.styles); out-of-memory steps
    as hatched outlines up to the device's capacity."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .styles import method_style

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
    rows = []
    for r in records:
        m = r["metrics"]
        for row in m["rows"]:
            for kind in ("prefill", "decode"):
                for i, x in enumerate(row[kind]):
                    speed = 1.0 if row["sparsity"] == 0 else row[f"{kind}_speedup"][i]
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
                            "tokens_per_s": x["tokens_per_s"],
                            "speedup": speed,
                            "device": r["provenance"]["device"],
                        }
                    )
    return pd.DataFrame(rows)


def _latency_variant(row: dict, device: str) -> str:
    """The row's variant; a 2:4 model whose weights stayed dense (no semi-structured kernels, e.g. on CPU) says so,
    since its timing is a dense model's."""
    variant = row.get("variant", "structured" if row["sparsity"] else "dense")
    kernels = row.get("semi_structured")
    if variant == "2:4" and kernels is not None and not kernels.get("converted"):
        where = " on CPU" if str(device).startswith("cpu") else ""
        return f"2:4 (dense kernels{where})"
    return variant


def plot_latency(df: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = df.copy()
    d["setting"] = d["kind"] + " " + d["shape"]
    d["model variant"] = d["variant"] + " " + (d["sparsity"] * 100).round().astype(int).astype(str) + "%"
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=d, x="setting", y="speedup", hue="model variant", ax=ax)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.legend(fontsize=7, title="model variant", title_fontsize=7)
    ax.set_ylabel("speed-up over dense")
    ax.tick_params(axis="x", rotation=30)
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
    import numpy as np

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
    the method's colour (minillm.styles); the unpruned model's perplexity as a horizontal line; the dense control
    of the row's training budget (the unpruned model after the same LoRA) as a dashed tick over the row, with the
    row's `control_share` written above it."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .styles import method_style

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
