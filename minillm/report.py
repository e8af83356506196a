"""Tables and figures from result records only (no compute): what the notebooks render.

Tables are written as CSV and Markdown, figures as PNG and PDF, under figures/<profile>/.
"""

from __future__ import annotations

from pathlib import Path

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
    """One row per (method label, sparsity): achieved sparsity, perplexity, zero-shot metric per task, average."""
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
        zs = m.get("zeroshot")
        if zs:
            for task, v in zs.items():
                if isinstance(v, dict):
                    row[f"{task.removeprefix('bb_cloze_')} ({v['metric']})"] = v["value"]
            row["zs_avg"] = zs["average"]
        timing = r.get("timing", {})
        row["scoring_s"] = timing.get("scoring_time_s")
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["sparsity", "ppl"]).reset_index(drop=True)


def plot_accuracy(df: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt
    import seaborn as sns

    dense = df[df.method == "dense"]
    pruned = df[df.method != "dense"]
    has_zs = "zs_avg" in df and df["zs_avg"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_zs else 1, figsize=(12 if has_zs else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    order = sorted(pruned.method.unique())
    palette = dict(zip(order, sns.color_palette("tab20", len(order))))  # one distinct colour per method, both panels
    sns.lineplot(data=pruned, x="sparsity", y="ppl", hue="method", hue_order=order, palette=palette, marker="o", ax=ax)
    if not dense.empty:
        ax.axhline(float(dense.ppl.iloc[0]), color="k", ls="--", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of prunable parameters removed")
    ax.set_ylabel("perplexity, Pride and Prejudice (log)")
    ax.legend(fontsize=7)
    if has_zs:
        ax2 = axes[0, 1]
        zs = pruned.dropna(subset=["zs_avg"])
        sns.lineplot(
            data=zs,
            x="sparsity",
            y="zs_avg",
            hue="method",
            hue_order=order,
            palette=palette,
            marker="o",
            ax=ax2,
            legend=False,
        )
        if not dense.empty and pd.notna(dense.zs_avg.iloc[0]):
            ax2.axhline(float(dense.zs_avg.iloc[0]), color="k", ls="--", lw=1)
        ax2.set_xlabel("fraction of prunable parameters removed")
        ax2.set_ylabel("average zero-shot accuracy (cloze tasks)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


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
    import matplotlib.pyplot as plt

    groups = list(df.groupby(["model", "shape"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, ((model, shape), g) in zip(axes[0], groups):
        oom = g[g.get("status", pd.Series(dtype=str)).fillna("").str.startswith("out of memory")]
        g = g.dropna(subset=["peak_gib"])
        bars = ax.bar(g["method"], g["peak_gib"], color=["0.5" if m == "dense forward" else "C0" for m in g["method"]])
        for _, row in oom.iterrows():  # out of memory: a hatched bar up to the device's capacity, labelled
            height = row.get("capacity_gib") or (g["peak_gib"].max() if len(g) else 1.0)
            ax.bar([row["method"]], [height], color="none", edgecolor="C3", hatch="//")
            ax.annotate("OOM", (row["method"], height), ha="center", va="bottom", fontsize=8, color="C3")
        for bar, ratio in zip(bars, g["ratio"]):
            ax.annotate(
                f"x{ratio:.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(f"{model}, {shape}", fontsize=9)
        ax.set_ylabel("peak memory of the step (GiB)")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
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
                            "variant": row.get("variant", "structured" if row["sparsity"] else "dense"),
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


def plot_latency(df: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = df.copy()
    d["setting"] = d["kind"] + " " + d["shape"]
    d["model variant"] = d["variant"] + " " + (d["sparsity"] * 100).round().astype(int).astype(str) + "%"
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=d, x="setting", y="speedup", hue="model variant", ax=ax)
    ax.axhline(1.0, color="k", lw=1, ls="--")
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
        if not plan:
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


def recovery_frame(records: list[dict]) -> pd.DataFrame:
    """Before/after LoRA recovery (with or without KL to the parent), one row per (method, sparsity, KL weight)."""
    rows = []
    for r in records:
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
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values(["sparsity", "method", "steps", "kl_weight"]).reset_index(drop=True) if not df.empty else df


def plot_recovery(df: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(df)), 4))
    labels, before, after = [], [], []
    for _, r in df.iterrows():
        labels.append(f"{r['method']} @{r['sparsity']:.0%}\nKL {r['kl_weight']:g}, {r['steps']} steps")
        before.append(r["ppl_before"])
        after.append(r["ppl_after"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], before, width=0.4, label="pruned")
    ax.bar([i + 0.2 for i in x], after, width=0.4, label="after LoRA recovery")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
