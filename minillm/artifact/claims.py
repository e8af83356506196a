"""The papers' headline claims, each with the evidence in one profile's records and a verdict.

Verdicts, decided by the explicit, conservative rules below and nothing else:

* "supported" / "not supported": the records decide the claim under its rule;
* "not testable on this hardware (...)": the records cannot hold the evidence here; the parenthesis says what
  would test it;
* "insufficient evidence (...)": the records bear on the claim but do not decide it; the parenthesis says why.

Accuracy comparisons use perplexity (lower is better). A (method, sparsity) has an interval only when its records
give one: with two or more seeds, the range over seeds (each seed's bootstrap bounds where it has them); with one
seed, its bootstrap 95% interval over windows; a single seed without an interval has none. One method is "better"
than another only when their intervals do not overlap; a comparison where either side has no interval is
insufficient evidence. Each method family is represented at each sparsity by its best label there (so "FMS" is the
best FMS variant, and each baseline its strongest variant). Memory has one measurement per step; its interval is
the measurement's stated tolerance (±10% relative, REPRODUCING.md). Numbers from the papers are only ever quoted,
in the "quoted" column, never used as evidence.
"""

from __future__ import annotations

import pandas as pd

MEMORY_TOLERANCE = 0.10  # relative, REPRODUCING.md's memory tolerance
STRUCTURED_FAMILIES = ("random", "magnitude", "wanda_sp", "flap", "taylor", "fms", "bonsai", "obs")
GRADIENT_FREE = ("magnitude", "wanda_sp", "flap")
BACKPROP = ("taylor",)
SEMI_STRUCTURED = ("wanda_24", "magnitude_24")
SPEEDUP_ABOUT_2X = 1.5  # "about 2x faster": the slower end of the interval must reach 1.5x
BACKPROP_MEMORY_FACTOR = 2.0  # "2-3x memory": backprop must need at least 2x

SUPPORTED, NOT_SUPPORTED = "supported", "not supported"


def not_testable(what_would: str) -> str:
    return f"not testable on this hardware ({what_would})"


def insufficient(why: str) -> str:
    return f"insufficient evidence ({why})"


# --- accuracy evidence -----------------------------------------------------------------------------------------------


def accuracy_groups(records: list[dict]) -> dict[tuple[str, float], dict]:
    """{(label, sparsity): {"family", "label", "sparsity", "ppl" (mean over seeds), "interval" ([lo, hi] or None),
    "n_seeds", "basis"}} from accuracy records (dense left out)."""
    by_key: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        cfg = r["config"]
        if cfg["method"] == "dense":
            continue
        by_key.setdefault((cfg.get("label", cfg["method"]), round(cfg["sparsity"], 6)), []).append(r)
    out = {}
    for (label, sparsity), rs in by_key.items():
        ppls = [r["metrics"]["perplexity"]["ppl"] for r in rs]
        cis = [r["metrics"]["perplexity"].get("ppl_ci95") for r in rs]
        if len(rs) >= 2:
            lows = [ci[0] if ci else p for ci, p in zip(cis, ppls)]
            highs = [ci[1] if ci else p for ci, p in zip(cis, ppls)]
            interval, basis = [min(lows), max(highs)], f"range over {len(rs)} seeds"
        elif cis[0]:
            interval, basis = list(cis[0]), "bootstrap 95% over windows"
        else:
            interval, basis = None, "one seed, no interval"
        out[(label, sparsity)] = {
            "family": rs[0]["config"]["method"],
            "label": label,
            "sparsity": sparsity,
            "ppl": sum(ppls) / len(ppls),
            "interval": interval,
            "n_seeds": len(rs),
            "basis": basis,
        }
    return out


def best_per_family(groups: dict, family: str, sparsity: float) -> dict | None:
    """The family's label with the lowest perplexity at `sparsity`, or None."""
    found = [g for g in groups.values() if g["family"] == family and abs(g["sparsity"] - sparsity) < 1e-9]
    return min(found, key=lambda g: g["ppl"]) if found else None


def compare(a: dict, b: dict, lower_is_better: bool = True) -> str:
    """ "a better", "b better", "overlap" (intervals overlap) or "no interval" (either side has none)."""
    if a.get("interval") is None or b.get("interval") is None:
        return "no interval"
    (alo, ahi), (blo, bhi) = a["interval"], b["interval"]
    if ahi < blo:
        return "a better" if lower_is_better else "b better"
    if bhi < alo:
        return "b better" if lower_is_better else "a better"
    return "overlap"


def _describe(g: dict) -> str:
    spread = "" if g["interval"] is None else f" [{g['interval'][0]:.4g}, {g['interval'][1]:.4g}]"
    seeds = f" ({g['n_seeds']} seeds)" if g["n_seeds"] > 1 else ""
    return f"{g['label']} {g['ppl']:.4g}{spread}{seeds}"


def _pairs(groups: dict, family: str, others: tuple[str, ...]) -> list[tuple[float, dict, dict, str]]:
    """(sparsity, best of `family`, best of another family, outcome) at every sparsity both have records."""
    sparsities = sorted({g["sparsity"] for g in groups.values() if g["family"] == family})
    pairs = []
    for s in sparsities:
        a = best_per_family(groups, family, s)
        for other in others:
            b = best_per_family(groups, other, s)
            if b is not None:
                pairs.append((s, a, b, compare(a, b)))
    return pairs


def _evidence(pairs) -> str:
    def outcome_text(a, b, outcome):
        return {"a better": f"{a['label']} better", "b better": f"{b['label']} better"}.get(
            outcome, "intervals overlap" if outcome == "overlap" else "no interval"
        )

    return "; ".join(f"{s:.0%}: {_describe(a)} vs {_describe(b)}: {outcome_text(a, b, o)}" for s, a, b, o in pairs)


def _label_pairs(groups: dict, family: str, label: str, sparsities=None) -> list[tuple[float, dict, dict, str]]:
    """(sparsity, best of `family`, the records labelled `label`, outcome) where both exist (at `sparsities` only,
    when given): a comparison with one exact configuration, not with the best of its family."""
    pairs = []
    for s in sorted({g["sparsity"] for g in groups.values() if g["family"] == family}):
        b = groups.get((label, s))
        if b is not None and (sparsities is None or any(abs(s - x) < 1e-9 for x in sparsities)):
            a = best_per_family(groups, family, s)
            pairs.append((s, a, b, compare(a, b)))
    return pairs


def verdict_better_than_all(pairs, family: str, others: tuple[str, ...]) -> str:
    """Claim "`family` is better than each of `others`": not supported as soon as one of them is better (intervals
    apart); supported only when the family is better in every comparison; otherwise insufficient evidence."""
    if not pairs:
        return insufficient(f"no sparsity with records of both {family} and any of {', '.join(others)}")
    outcomes = [p[3] for p in pairs]
    if "b better" in outcomes:
        return NOT_SUPPORTED
    missing = [f for f in others if not any(b["family"] == f for _, _, b, _ in pairs)]
    if missing:
        return insufficient(f"no records of {', '.join(missing)} to compare with")
    if all(o == "a better" for o in outcomes):
        return SUPPORTED
    if "no interval" in outcomes:
        return insufficient("one seed without an interval in some comparison")
    return insufficient("intervals overlap in some comparison")


def verdict_better_somewhere(pairs, family: str, others: tuple[str, ...]) -> str:
    """Claim "`family` is better than `others` in some cases": supported when it is better (intervals apart) in at
    least one comparison; not supported when the other is better in every one; otherwise insufficient."""
    if not pairs:
        return insufficient(f"no sparsity with records of both {family} and any of {', '.join(others)}")
    outcomes = [p[3] for p in pairs]
    if "a better" in outcomes:
        return SUPPORTED
    if all(o == "b better" for o in outcomes):
        return NOT_SUPPORTED
    if "no interval" in outcomes:
        return insufficient("one seed without an interval in some comparison")
    return insufficient("intervals overlap where the other is not clearly better")


# --- memory and speed evidence --------------------------------------------------------------------------------------


def _step_gib(step: dict) -> float | None:
    """GPU-comparable memory of a step: the weights plus the step's increase over its pre-step baseline (a CPU
    baseline also holds the Python runtime and libraries, which a GPU allocator does not count); the absolute peak
    when the record has no baseline."""
    if step.get("increase_gib") is not None and step.get("weights_bytes"):
        return step["weights_bytes"] / 2**30 + step["increase_gib"]
    return step.get("peak_gib")


def memory_steps(records: list[dict]) -> list[dict]:
    """One entry per (model, shape): {"where", "steps": {label: (family, GiB)}} from memory records."""
    out = []
    for r in records:
        m = r["metrics"]
        steps = {
            x["label"]: (x["method"], _step_gib(x))
            for x in m["methods"]
            if _step_gib(x) is not None and not x.get("oom")
        }
        where = f"{m['model']} {m['batch']}x{m['seqlen']} on {r['provenance']['device'].split(' (')[0]}"
        out.append({"where": where, "steps": steps})
    return out


def _tol(v: float) -> tuple[float, float]:
    return v * (1 - MEMORY_TOLERANCE), v * (1 + MEMORY_TOLERANCE)


def verdict_memory_akin(shapes: list[dict]) -> tuple[str, str]:
    """MINI-LLM: every FMS step's memory (±tolerance) reaches down to at least one gradient-free step's (±tolerance)
    in every shape: supported; above all of them in some shape: not supported."""
    evidence, fails, any_pair = [], [], False
    for shape in shapes:
        fms = {k: v for k, (f, v) in shape["steps"].items() if f == "fms"}
        free = {k: v for k, (f, v) in shape["steps"].items() if f in GRADIENT_FREE}
        if not fms or not free:
            continue
        any_pair = True
        top = max(_tol(v)[1] for v in free.values())
        for label, v in fms.items():
            ok = _tol(v)[0] <= top
            fails += [] if ok else [f"{label} in {shape['where']}"]
        evidence.append(f"{shape['where']}: " + ", ".join(f"{k} {v:.3f} GiB" for k, v in {**free, **fms}.items()))
    if not any_pair:
        return insufficient("no memory record with both an FMS and a gradient-free step"), ""
    return (NOT_SUPPORTED if fails else SUPPORTED), "; ".join(evidence)


def verdict_backprop_memory(shapes: list[dict]) -> tuple[str, str]:
    """Bonsai: backprop (Taylor) needs >= 2x Bonsai's memory. Per shape, the ratio's interval from both steps'
    tolerances; all at or above 2: supported; all below: not supported; mixed: insufficient (depends on shape)."""
    results, evidence = [], []
    for shape in shapes:
        bonsai = [v for f, v in shape["steps"].values() if f == "bonsai"]
        backprop = [v for f, v in shape["steps"].values() if f in BACKPROP]
        if not bonsai or not backprop:
            continue
        ratio = max(backprop) / min(bonsai)
        lo = ratio * (1 - MEMORY_TOLERANCE) / (1 + MEMORY_TOLERANCE)
        hi = ratio * (1 + MEMORY_TOLERANCE) / (1 - MEMORY_TOLERANCE)
        results.append("yes" if lo >= BACKPROP_MEMORY_FACTOR else "no" if hi < BACKPROP_MEMORY_FACTOR else "?")
        evidence.append(f"{shape['where']}: backprop / Bonsai {ratio:.2f}x [{lo:.2f}, {hi:.2f}]")
    if not results:
        return insufficient("no memory record with both a Bonsai and a backprop step"), ""
    if all(x == "yes" for x in results):
        return SUPPORTED, "; ".join(evidence)
    if all(x == "no" for x in results):
        return NOT_SUPPORTED, "; ".join(evidence)
    return insufficient("the ratio's interval straddles 2x or differs between shapes"), "; ".join(evidence)


def speed_vs_semi_structured(records: list[dict]) -> tuple[str | None, list[tuple[str, float, float, float]]]:
    """(None or the reason no 2:4 row ran sparse kernels, [(setting, ratio, lo, hi)]): the time of a 2:4 model over
    a structured one at the same sparsity, its interval from the quartiles (slowest against fastest)."""
    out, reason = [], None
    for r in records:
        m = r["metrics"]
        structured = {row["sparsity"]: row for row in m["rows"] if row.get("variant") == "structured"}
        for row in m["rows"]:
            if row.get("variant") != "2:4":
                continue
            kernels = row.get("semi_structured") or {}
            if not kernels.get("converted"):
                reason = kernels.get("reason", "the 2:4 model kept dense weights")
                continue
            twin = structured.get(row["sparsity"])
            if twin is None:
                continue
            for kind in ("prefill", "decode"):
                for semi, struct in zip(row[kind], twin[kind]):
                    ratio = semi["median_s"] / struct["median_s"]
                    lo, hi = semi["q1_s"] / struct["q3_s"], semi["q3_s"] / struct["q1_s"]
                    out.append((f"{m['model']} {kind} b{semi['batch']} @{row['sparsity']:.0%}", ratio, lo, hi))
    return (None if out else reason or "no 2:4 latency rows"), out


# --- the table -------------------------------------------------------------------------------------------------------

QUOTES = {  # from the papers' abstracts (MINI-LLM arXiv 2407.11681, Bonsai arXiv 2402.05406); quoted, never evidence
    "mini_free": 'MINI-LLM abstract: better than "existing gradient-free methods" on "three LLMs: LLaMA, BLOOM, '
    'and OPT"',
    "mini_backprop": 'MINI-LLM (secondary summary): "rivals backpropagation-based pruning"',
    "mini_memory": 'MINI-LLM abstract: "maintains a GPU memory footprint akin to gradient-free methods"',
    "bonsai_memory": 'Bonsai v3 abstract: "backprop-based methods, which require 2-3x memory"',
    "bonsai_speed": 'Bonsai v2/v3 abstract: "twice as fast (with comparable accuracy) as those generated by '
    'semi-structured pruning methods"',
    "obs_flap": "no paper: minillm's own claim for its method `obs` (docs/methods.md)",
    "obs_24": "no paper: minillm's own claim for its method `obs` (docs/methods.md)",
    "bonsai_sota": 'Bonsai abstract: "state-of-the-art performance on 4/6 tasks" (its sub-2B model); '
    '"At 50% sparsity Bonsai yields lower perplexity than FLAP" (secondary, unverified)',
}

GENERAL_RULE = (
    "in general: one method is better than another only where their perplexity intervals (the range over two or "
    "more seeds, else a bootstrap 95% interval over windows) do not overlap; a comparison where either side has one "
    "seed and no interval is insufficient evidence; each method family is represented at each sparsity by its best "
    "label there; memory is measured once per step and its interval is the stated ±10% tolerance"
)
RULES = {
    "mini_free": "best FMS label vs the best label of each gradient-free family (magnitude, Wanda-SP, FLAP) at "
    "every sparsity: better in all (intervals apart) -> supported; any baseline better -> not supported",
    "mini_backprop": "best FMS label vs backprop Taylor per sparsity: better at one or more (intervals apart) -> "
    "supported; Taylor better at all -> not supported",
    "mini_memory": "weights + the step's increase over its baseline, ±10%: every FMS step reaches down to some "
    "gradient-free step -> supported; above all of them -> not supported",
    "bonsai_memory": "backprop Taylor / Bonsai step memory (weights + increase), interval from ±10% on each: at or "
    "above 2x in every shape -> supported; below in every shape -> not supported",
    "bonsai_speed": f"2:4 time / structured time at equal sparsity, quartile interval: at or above "
    f"{SPEEDUP_ABOUT_2X}x everywhere with Bonsai's perplexity not clearly worse than the best 2:4 -> supported",
    "obs_flap": "best obs label vs the label `flap` (FLAP as published: its selection, global allocation and bias "
    "compensation) at every sparsity both ran: better in all (intervals apart) -> supported; FLAP better at any -> "
    "not supported",
    "obs_24": "best obs label vs the label `wanda_24` at 50%: better (intervals apart) -> supported; 2:4 better -> not "
    "supported",
    "bonsai_sota": "best Bonsai label vs the best label of every other structured family at every sparsity Bonsai "
    "ran: better in all (intervals apart) -> supported; any better -> not supported",
}


#: the architectures MINI-LLM's abstract names, as transformers' model_type -> "a/an <name>" in a claim's wording
PAPER_ARCHITECTURES = {"llama": "a LLaMA", "bloom": "a BLOOM", "opt": "an OPT"}


def gradient_free_claim(model: str | None = None) -> str:
    """The claim row "better than gradient-free methods" for the profile's model, named by what its architecture is
    to the paper: a LLaMA-architecture model (SmolLM2) tests the claim as stated; another architecture (Gemma 3) is a
    transfer test outside the paper's three, and the row says so; an unknown model (a local directory, a Hub id
    without a registered shape) is named as it is, without an architecture it may not have."""
    from minillm.models import architecture

    if not model:
        return "better than gradient-free methods on the profile's model"
    arch = architecture(model)
    if arch is None:
        return f"better than gradient-free methods on the profile's model ({model})"
    if arch in PAPER_ARCHITECTURES:
        return f"better than gradient-free methods on {PAPER_ARCHITECTURES[arch]}-architecture model ({model})"
    return (
        f"better than gradient-free methods on {model} ({arch}: not one of the paper's LLaMA, BLOOM and OPT, "
        "so a transfer test of the claim)"
    )


def assess(accuracy: list[dict], memory: list[dict], latency: list[dict], model: str | None = None) -> list[dict]:
    """Every headline claim with its evidence and verdict, from the given records (see the module docstring)."""
    groups = accuracy_groups(accuracy)
    rows = []

    def add(paper, key, claim, evidence, verdict):
        rows.append(
            {
                "paper": paper,
                "claim": claim,
                "quoted": f"quoted: {QUOTES[key]}",
                "evidence": evidence or "-",
                "verdict": verdict,
                "rule": "-" if verdict.startswith("not testable") else RULES[key],
            }
        )

    pairs = _pairs(groups, "fms", GRADIENT_FREE)
    add(
        "MINI-LLM",
        "mini_free",
        gradient_free_claim(model),
        _evidence(pairs),
        verdict_better_than_all(pairs, "fms", GRADIENT_FREE),
    )
    add(
        "MINI-LLM",
        "mini_free",
        "better than gradient-free methods on BLOOM and OPT",
        "-",
        not_testable(
            "no pretrained BLOOM/OPT weights offline; a profile with Hub checkpoints, e.g. `paper` with "
            "network, would test it"
        ),
    )
    pairs = _pairs(groups, "fms", BACKPROP)
    add(
        "MINI-LLM",
        "mini_backprop",
        "in some cases better than backprop-based methods (LLM-Pruner Taylor)",
        _evidence(pairs),
        verdict_better_somewhere(pairs, "fms", BACKPROP),
    )
    shapes = memory_steps(memory)
    verdict, evidence = verdict_memory_akin(shapes)
    add("MINI-LLM", "mini_memory", "pruning memory akin to gradient-free methods", evidence, verdict)
    verdict, evidence = verdict_backprop_memory(shapes)
    add("Bonsai", "bonsai_memory", "2-3x less pruning memory than backprop-based methods", evidence, verdict)
    add(
        "Bonsai",
        "bonsai_speed",
        "about 2x faster models than semi-structured (2:4) pruning at comparable quality",
        *_speed_claim(groups, latency),
    )
    others = tuple(f for f in STRUCTURED_FAMILIES if f != "bonsai")
    pairs = _pairs(groups, "bonsai", others)
    add(
        "Bonsai",
        "bonsai_sota",
        "state-of-the-art accuracy among structured methods at equal sparsity",
        _evidence(pairs),
        verdict_better_than_all(pairs, "bonsai", others),
    )
    pairs = _label_pairs(groups, "obs", "flap")
    add(
        "minillm",
        "obs_flap",
        "a forward-only method that beats FLAP: obs better than FLAP as published",
        _evidence(pairs),
        verdict_better_than_all(pairs, "obs", ("flap",)),
    )
    pairs = _label_pairs(groups, "obs", "wanda_24", sparsities=(0.5,))
    add(
        "minillm",
        "obs_24",
        "obs at 50% better than 2:4 Wanda (semi-structured, no speed-up without sparse kernels)",
        _evidence(pairs),
        verdict_better_than_all(pairs, "obs", ("wanda_24",)),
    )
    return rows


def _speed_claim(groups: dict, latency: list[dict]) -> tuple[str, str]:
    reason, ratios = speed_vs_semi_structured(latency)
    if reason is not None:
        return f"2:4 rows: {reason}", not_testable(
            "2:4 timings here run dense kernels; a CUDA GPU with semi-structured sparse kernels (gpu profile, "
            "latency.include_24: true) would test it"
        )
    evidence = "; ".join(f"{s}: {r:.2f}x [{lo:.2f}, {hi:.2f}]" for s, r, lo, hi in ratios)
    if all(hi < SPEEDUP_ABOUT_2X for _, _, _, hi in ratios):
        return evidence, NOT_SUPPORTED
    quality = []
    for s in sorted({g["sparsity"] for g in groups.values() if g["family"] in SEMI_STRUCTURED}):
        bonsai = best_per_family(groups, "bonsai", s)
        semi = [g for f in SEMI_STRUCTURED if (g := best_per_family(groups, f, s)) is not None]
        if bonsai is not None and semi:
            quality.append(compare(bonsai, min(semi, key=lambda g: g["ppl"])))
    if not quality:
        return evidence, insufficient("no sparsity with accuracy records of both Bonsai and a 2:4 method")
    if "b better" in quality:
        return evidence, NOT_SUPPORTED
    if not all(lo >= SPEEDUP_ABOUT_2X for _, _, lo, _ in ratios):
        return evidence, insufficient(f"the speed-up's interval reaches below {SPEEDUP_ABOUT_2X}x")
    if "no interval" in quality:
        return evidence, insufficient("quality compared with one seed and no interval")
    return evidence, SUPPORTED


def claims_frame(profile: str) -> pd.DataFrame:
    """The claims table of one profile, from its records (minillm.artifact.experiments.collect)."""
    from minillm.artifact.experiments import collect, load_profile

    try:
        model = load_profile(profile)["model"]
    except FileNotFoundError:
        model = None
    rows = assess(collect(profile, "accuracy"), collect(profile, "memory"), collect(profile, "latency"), model)
    return pd.DataFrame(rows)


def reason(evidence: str, verdict: str) -> str:
    """One line for the claims table: for comparisons ("S%: a x [..] vs b y [..]: a better"), how many the claim's
    method wins, loses and leaves within noise, and which rivals beat it at which sparsities; otherwise the verdict's
    own explanation (in brackets) or the evidence itself when it is short."""
    items = [e for e in str(evidence).split("; ") if " vs " in e and ": " in e]
    if not items:
        detail = verdict.partition(" (")[2].rstrip(")") if " (" in verdict else ""
        return detail or (evidence if len(str(evidence)) <= 160 else str(evidence)[:157] + "...")
    wins, losses, ties, beaten_by = 0, 0, 0, {}
    for item in items:
        sparsity, _, rest = item.partition(": ")
        ours = rest.split(" ", 1)[0]
        outcome = rest.rsplit(": ", 1)[1]
        if outcome == "intervals overlap":
            ties += 1
        elif outcome == f"{ours} better":
            wins += 1
        else:
            losses += 1
            beaten_by.setdefault(outcome.removesuffix(" better"), []).append(sparsity)
    line = f"better in {wins}, worse in {losses}, within noise in {ties} of {len(items)} comparisons"
    if beaten_by:
        line += "; lower: " + ", ".join(f"{rival} ({'/'.join(at)})" for rival, at in beaten_by.items())
    return line


def claims_markdown(df: pd.DataFrame) -> str:
    """The claims table as Markdown: paper, claim, verdict and a one-line reason per claim (readable on a page),
    then each claim's quoted source and full evidence in a collapsed block, then the verdict rules."""
    columns = ["paper", "claim", "verdict", "reason"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in df.iterrows():
        cells = [row["paper"], row["claim"], str(row["verdict"]).partition(" (")[0], reason(row["evidence"], str(row["verdict"]))]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    details = ["<details><summary>Quoted sources and the full evidence of each claim</summary>", ""]
    for _, row in df.iterrows():
        details += [f"* **{row['paper']}: {row['claim']}** ({row['quoted']}). Verdict: {row['verdict']}. "
                    f"Evidence: {row['evidence']}", ""]
    details += ["</details>", ""]
    rules = [f"* {GENERAL_RULE}"] + [f"* {c}: {r}" for c, r in zip(df["claim"], df["rule"]) if r != "-"]
    return "\n".join([*lines, "", *details, "Verdict rules (minillm/artifact/claims.py):", "", *rules, ""])
