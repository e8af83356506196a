"""Which perplexity orders of an earlier set of accuracy records survive the current ones?

    python scripts/compare_conclusions.py [--old REV] [--profile cpu-full]

Reads the accuracy records of `--profile` as they were committed at git revision `--old` (default d7366c5, the last
cpu-full records before seeds and intervals were added: one seed, 4 x 512 perplexity tokens, no intervals) and as they
are in the working tree now (seeds, 64 x 512 tokens, bootstrap intervals), and prints Markdown: for every sparsity and
pair of methods the earlier records ordered, whether the current ones separate them the same way
(minillm.artifact.report.conclusions_frame), and which methods' own settings (method, options, prune options) changed
between the two, since a changed method is a different comparison, not a failed replication. Nothing is computed
beyond reading the records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minillm.artifact import report
from minillm.artifact.records import load_record

METHOD_KEYS = ("method", "options", "prune_options")


def records_at(rev: str, folder: str) -> list[dict]:
    """The JSON records under `folder` as committed at `rev` (git show), without touching the working tree."""
    try:
        names = subprocess.run(
            ["git", "ls-tree", "--name-only", f"{rev}:{folder}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.split()
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"cannot list {folder} at {rev}: {e.stderr.strip()}") from None
    out = []
    for name in sorted(n for n in names if n.endswith(".json")):
        text = subprocess.run(
            ["git", "show", f"{rev}:{folder}/{name}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        out.append(json.loads(text))
    return out


def changed_settings(old: list[dict], new: list[dict]) -> dict[str, list[str]]:
    """Per label present in both: the method settings (METHOD_KEYS) whose values differ, as 'key: old -> new'."""

    def settings(records):
        return {r["config"].get("label", r["config"]["method"]): r["config"] for r in records}

    o, n = settings(old), settings(new)
    return {
        label: [
            f"{k}: {o[label].get(k)} -> {n[label].get(k)}" for k in METHOD_KEYS if o[label].get(k) != n[label].get(k)
        ]
        for label in sorted(o.keys() & n.keys())
    }


def code_changes(old: list[dict], methods: set[str]) -> dict[str, list[str]]:
    """Per method: the commits that touched its scoring module (minillm/scores/<method>.py) after the commit its
    earliest old record was made with (provenance; a '-dirty' suffix is dropped, so uncommitted edits of that time
    are not seen), one line each. A fix there changes what the label computes even when its configuration did
    not change."""
    out = {}
    for method in sorted(methods):
        module = ROOT / "minillm" / "scores" / f"{method}.py"
        made = sorted(
            (r["provenance"]["date"], r["provenance"]["git_commit"] or "")
            for r in old
            if r["config"]["method"] == method and r.get("provenance")
        )
        if not module.exists() or not made or not made[0][1]:
            continue
        since = made[0][1].removesuffix("-dirty")
        log = subprocess.run(
            ["git", "log", "--format=%h %s", f"{since}..HEAD", "--", str(module.relative_to(ROOT))],
            cwd=ROOT, capture_output=True, text=True,
        )
        lines = log.stdout.splitlines() if log.returncode == 0 else [f"(commit {since[:10]} not in this clone)"]
        if lines:
            out[method] = lines
    return out


def markdown(conclusions, changes: dict[str, list[str]], code: dict[str, list[str]], rev: str, folder: str) -> str:
    lines = [f"Perplexity orders of `{folder}` at {rev} checked against the working tree's records.", ""]
    counts = conclusions.groupby(["sparsity", "verdict"]).size().unstack(fill_value=0)
    lines += ["| sparsity | " + " | ".join(counts.columns) + " |", "|---|" + "---|" * len(counts.columns)]
    lines += [f"| {s:.0%} | " + " | ".join(str(v) for v in row) + " |" for s, row in counts.iterrows()]
    lines += ["", "Orders that do not hold (old: one seed, no interval; new: mean over seeds, envelope decides):", ""]
    lines += ["| sparsity | old order | old ppl | new ppl (mean) | fewest seeds | verdict |", "|---|---|---|---|---|---|"]
    shown = conclusions[conclusions.verdict.isin(["reversed", "within noise"])]
    for _, r in shown.iterrows():
        lines.append(
            f"| {r.sparsity:.0%} | {r.better} < {r.worse} | {r.old_better:.4g} / {r.old_worse:.4g} | "
            f"{r.new_better:.4g} / {r.new_worse:.4g} | {r.min_seeds} | {r.verdict} |"
        )
    held_one_seed = conclusions[(conclusions.verdict == "holds") & (conclusions.min_seeds < 2)]
    lines += [
        "",
        f"{len(held_one_seed)} of the orders that hold rest on a single seed of one side: they exclude the window "
        "noise, not the calibration draw's.",
        "",
        "Methods whose own settings changed between the two (a different method, not a failed replication):",
    ]
    lines += [f"* {label}: {'; '.join(c)}" for label, c in changes.items() if c] or ["* none"]
    lines += ["", "Commits to each method's scoring module after its old records were made (what a label computes):"]
    for method, log in code.items():
        lines += [f"* {method} ({len(log)}): " + "; ".join(line[:90] for line in log)]
    if not code:
        lines.append("* none")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="d7366c5", help="git revision of the earlier records")
    ap.add_argument("--profile", default="cpu-full")
    args = ap.parse_args(argv)
    folder = f"results/{args.profile}/accuracy"
    old = records_at(args.old, folder)
    new = [load_record(p) for p in sorted((ROOT / folder).glob("*.json"))]
    new = [r for r in new if r is not None]
    conclusions = report.conclusions_frame(report.accuracy_frame(old), report.accuracy_frame(new))
    methods = {r["config"]["method"] for r in old} & {r["config"]["method"] for r in new}
    print(markdown(conclusions, changed_settings(old, new), code_changes(old, methods), args.old, folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
