"""Estimated run time of a profile on one H100, from counted FLOPs and bytes (`python -m minillm bench runtime`).

An ESTIMATE, not a measurement. Every step of a profile's grid (perplexity batches, zero-shot batches, each method's
scoring, Bonsai rounds x masks, LoRA steps, latency repeats) runs once, at the real model shape, on fake tensors
(torch FakeTensorMode, no weights, no data; the machinery of `minillm.bench.simulate`). A TorchDispatchMode (`CostCounter`)
sees every operator that would run on the GPU and counts

* FLOPs: matrix multiplies and attention, by torch.utils.flop_counter's formulas (plus the CPU flash-attention kernel
  that runs in the simulation in place of CUDA's); element-wise work is counted as memory traffic only;
* bytes: every tensor an operator reads or writes (views move nothing and are skipped);

and converts each operator to time with a roofline: max(FLOPs / (peak x compute efficiency), bytes / (HBM bandwidth
x memory efficiency)) + a fixed launch cost (eager mode: one kernel per operator). Steps whose count depends on a
setting (FMS queries, Bonsai masks) are counted at two small settings and extrapolated linearly (they are linear in
it); Bonsai's rounds are counted at the unpruned size (an upper bound: the model shrinks by `prune_frac` a round), and
pruned models are evaluated at the dense cost (an upper bound too). Not counted, and added as stated assumptions:
model loading (bytes / LOAD_BYTES_PER_S), the start of a fresh process per memory step (PROCESS_START_S), and Python
overheads (lm-eval's request bookkeeping, tokenisation), which are not GPU work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from minillm.bench.flops import H100, Cost, count, dummy_ids, extrapolate, shape_name

LOAD_BYTES_PER_S = 2e9  # checkpoint -> GPU (safetensors from disk / page cache)
PROCESS_START_S = 10.0  # a fresh Python process: imports, CUDA context, building the model


class Counter:
    """Costs of the steps of one model, each counted once per shape and settings (cached)."""

    def __init__(self, model: str, dtype: str, hw: dict = H100):
        self.model, self.dtype, self.hw = model, dtype, hw
        self.cache: dict = {}

    def _get(self, key, fn, setup=None, teacher: bool = False) -> Cost:
        if key not in self.cache:
            self.cache[key] = count(self.model, self.dtype, fn, self.hw, setup, teacher)
        return self.cache[key]

    def perplexity(self, windows: int, seqlen: int, batch_size: int) -> Cost:
        from minillm.evaluate import perplexity

        return self._get(
            ("ppl", windows, seqlen, batch_size),
            lambda m, _: perplexity(m, dummy_ids(windows, seqlen), batch_size=batch_size, progress=False),
        )

    def forward(self, batch: int, seqlen: int) -> Cost:
        def run(m, _):
            with torch.no_grad():
                m(input_ids=dummy_ids(batch, seqlen), use_cache=False)

        return self._get(("fwd", batch, seqlen), run)

    def prune(self, method: str, sparsity: float, n: int, seqlen: int, options: dict, prune_options: dict) -> Cost:
        from minillm.prune import prune

        key = ("prune", method, sparsity, n, seqlen, tuple(sorted(options.items())),
               tuple(sorted((k, str(v)) for k, v in prune_options.items())))
        return self._get(
            key,
            lambda m, _: prune(m, method, sparsity, dummy_ids(n, seqlen), progress=False, **prune_options, **options),
        )

    def method(self, entry: dict, sparsity: float, n: int, seqlen: int, prune_options: dict) -> Cost:
        """One scoring-and-pruning step of a method entry at its real settings (extrapolated where linear)."""
        method, options = entry["method"], dict(entry.get("options", {}))
        if method == "fms":
            q = int(options.get("queries", 1))
            c1 = self.prune(method, sparsity, n, seqlen, {**options, "queries": 1}, prune_options)
            if q == 1:
                return c1
            c2 = self.prune(method, sparsity, n, seqlen, {**options, "queries": 2}, prune_options)
            return extrapolate(c1, 1, c2, 2, q)
        if method == "bonsai":
            masks = int(options.get("masks_per_round", 40))
            frac = float(options.get("prune_frac", 0.05))
            rounds = max(1, math.ceil(sparsity / frac - 1e-9))
            one = {**options, "prune_frac": frac, "max_rounds": 1}  # one round exactly (stand-in scores can leave
            # part of a round's budget, which would add rounds)
            c2 = self.prune(method, frac, n, seqlen, {**one, "masks_per_round": 2}, prune_options)
            c4 = self.prune(method, frac, n, seqlen, {**one, "masks_per_round": 4}, prune_options)
            return extrapolate(c2, 2, c4, 4, masks) * rounds
        return self.prune(method, sparsity, n, seqlen, options, prune_options)

    def lora_steps(self, steps: int, batch: int, seqlen: int, rank: int, kl: bool) -> Cost:
        """`steps` LoRA optimiser steps (bf16 autocast as on a GPU), with the teacher's forward when kl, plus the
        final check; counted at 1 and 2 steps and extrapolated."""
        from minillm.recover import recover

        def run_for(k):
            def run(m, teacher):
                from minillm.bench.simulate import adapters_stay

                with adapters_stay():
                    _recover(m, teacher, k)

            def _recover(m, teacher, k):
                try:
                    recover(m, dummy_ids(2 * batch, seqlen), rank=rank, steps=k, batch_size=batch, teacher=teacher,
                            kl_weight=1.0 if kl else 0.0, bf16=True, progress=False)
                except FloatingPointError:
                    # the divergence check after the last step reads stand-in booleans (False: "not finite"); the
                    # steps before it are counted, the check's one forward pass and the merge are not
                    pass

            return self._get(("lora", k, batch, seqlen, rank, kl), run, lambda m, parent: parent, teacher=kl)

        return extrapolate(run_for(1), 1, run_for(2), 2, steps)

    def decode(self, batch: int, context: int) -> Cost:
        """One greedy decoding step of `batch` sequences with `context` cached tokens."""

        def setup(m, _):
            with torch.no_grad():
                return m(input_ids=dummy_ids(batch, context), use_cache=True).past_key_values

        def run(m, cache):
            with torch.no_grad():
                m(input_ids=dummy_ids(batch, 1), past_key_values=cache, use_cache=True)

        return self._get(("decode", batch, context), run, setup)

    def weights_bytes(self) -> int:
        from minillm.bench.simulate import meta_model

        meta = meta_model(shape_name(self.model), getattr(torch, self.dtype))
        return sum(p.numel() * p.element_size() for p in meta.parameters())


# --- zero-shot -----------------------------------------------------------------------------------------------------


def zeroshot_batches(tokenizer, tasks: list[str] | None, limit: int | None, batch_size: int) -> tuple[int, int]:
    """(number of batches, padded length) of lm-eval's log-likelihood requests over the bundled tasks: one request
    per (example, choice), context + choice tokens; batches padded to the longest request (upper bound: the
    mean of each batch's longest is taken as the longest overall's 90th percentile)."""
    import json

    from minillm.data import data_file
    from minillm.evaluate import load_task_specs

    lengths = []
    for spec in load_task_specs():
        if tasks is not None and spec["task"] not in tasks:
            continue
        with open(data_file(f"bigbench/{spec['file']}")) as f:
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    break
                doc = json.loads(line)
                for choice in doc["choices"]:
                    text = f"{doc['query']} {choice}".strip()
                    n = len(tokenizer(text)["input_ids"]) if tokenizer is not None else max(1, len(text) // 4)
                    lengths.append(n)
    if not lengths:
        return 0, 1
    lengths.sort()
    padded = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
    return math.ceil(len(lengths) / batch_size), max(2, padded)


# --- a profile's grid ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    what: str
    count: int
    cost: Cost
    extra_s: float = 0.0  # stated, uncounted overheads (loads, process starts)
    notes: list = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.cost.seconds + self.extra_s


def _tokenizer(model: str):
    """The tokenizer of an installed pretrained model (zero-shot request lengths), else None (4 characters a
    token)."""
    try:
        from transformers import AutoTokenizer

        from minillm.models import PRETRAINED

        if model in PRETRAINED:
            return AutoTokenizer.from_pretrained(str(PRETRAINED[model]()))
    except (OSError, ValueError, ImportError):
        pass
    return None


def _eval_cost(counter: Counter, tok, exp: dict, sparsity: float, zs_cache: dict) -> tuple[Cost, int]:
    """Perplexity (and zero-shot where the section asks for it at this sparsity) of one model; (cost, zs calls)."""
    ppl = exp["perplexity"]
    cost = counter.perplexity(ppl["windows"], ppl["seqlen"], ppl.get("batch_size", 4))
    zs = exp.get("zeroshot")
    if zs and any(abs(sparsity - s) < 1e-9 for s in zs.get("sparsities", [sparsity])):
        key = (tuple(zs.get("tasks") or ()), zs.get("limit"), zs.get("batch_size", 8))
        if key not in zs_cache:
            n_batches, length = zeroshot_batches(tok, zs.get("tasks"), zs.get("limit"), zs.get("batch_size", 8))
            zs_cache[key] = counter.forward(zs.get("batch_size", 8), length) * n_batches
        return cost + zs_cache[key], 1
    return cost, 0


def _method_row(counter, tok, section: str, exp: dict, run: dict, replicate: int, sparsities: list[float],
                load_s: float, zs_cache: dict) -> Row:
    """The cost of one method entry's replicate (`experiments.seed_replicates`): its scoring once when a method's
    scores serve every sparsity (it scores, then removes; MethodSpec), else a prune per sparsity, and each
    evaluation."""
    from minillm.artifact.experiments import entry_section
    from minillm.scores import get_method

    c, po = run["calibration"], run["prune_options"]
    shared = not get_method(run["method"]).spec.scores_and_removes and len(sparsities) > 1
    total, calls, loads = Cost(), 0, 0
    for s in sparsities:
        if not shared or s == sparsities[0]:
            total = total + counter.method(run, s, c["n_samples"], c["seqlen"], po)
        ev, k = _eval_cost(counter, tok, entry_section(exp, run), s, zs_cache)
        total, calls, loads = total + ev, calls + k, loads + 1
    label = run["label"] + (f" seed {replicate}" if replicate else "")
    return Row(section, label, len(sparsities), total, (loads + 1) * load_s,
               [f"zero-shot calls {calls}", "scores shared across sparsities" if shared else ""])


def estimate_profile(cfg: dict, hw: dict = H100, sections: list[str] | None = None) -> list[Row]:
    """One row per (section, part) with its counted cost and estimated seconds."""
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(_log(row))

    model, dtype = cfg["model"], cfg.get("dtype", "float32")
    counter = Counter(model, dtype, hw)
    load_s = counter.weights_bytes() / LOAD_BYTES_PER_S
    tok, zs_cache = None, {}
    from minillm.artifact.experiments import GRID_SECTIONS

    wanted = sections or [s for s in (*GRID_SECTIONS, "recovery", "memory", "latency") if s in cfg]
    if any(s in cfg for s in (*GRID_SECTIONS, "recovery")):
        tok = _tokenizer(model)
    from minillm.artifact.experiments import seed_replicates
    from minillm.prune import changes_weights
    from minillm.scores import get_method

    for section in GRID_SECTIONS:
        if section not in wanted or section not in cfg:
            continue
        exp = cfg[section]
        cost, zs_calls = _eval_cost(counter, tok, exp, 0.0, zs_cache)
        add(Row(section, "dense evaluation", 1, cost, load_s, [f"zero-shot calls {zs_calls}"]))
        for entry in exp["methods"]:
            for k, run, sparsities in seed_replicates(exp, entry):
                add(_method_row(counter, tok, section, exp, run, k, sparsities, load_s, zs_cache))
    if "recovery" in wanted and "recovery" in cfg:
        from minillm.artifact.experiments import control_section, recovery_controls, recovery_items
        from minillm.artifact.profiles import resolved_entry

        acc = cfg["accuracy"]
        by_group: dict = {}
        for index, entry, item_exp, s, kl, _ in recovery_items(cfg):
            by_group.setdefault((index, s), (entry, item_exp, s, []))[3].append(kl)
        for entry, item_exp, s, kls in by_group.values():
            resolved = resolved_entry(acc, entry)
            po = resolved["prune_options"]
            compensate = changes_weights(entry["method"], po)
            total = Cost()
            if compensate:  # the accuracy record cannot be reused: pruned again
                c = resolved["calibration"]
                total = total + counter.method(entry, s, c["n_samples"], c["seqlen"], po)
            before, calls = _eval_cost(counter, tok, item_exp, s, zs_cache)
            total = total + before
            train = item_exp["train"]
            loads = 1
            for kl in kls:
                total = total + counter.lora_steps(train["steps"], train["batch_size"], train["seqlen"],
                                                   train["rank"], kl > 0)
                after, k = _eval_cost(counter, tok, item_exp, s, zs_cache)
                total, calls, loads = total + after, calls + k, loads + 1 + (kl > 0)
            add(Row("recovery", f"{entry['label']} s={s:g} kl={kls}", len(kls), total, loads * load_s,
                            [f"zero-shot calls {calls}", "pruned again" if compensate else "plan reused"]))
        for path, item_exp in recovery_controls(cfg).items():  # the dense model, kl 0, evaluated twice
            section, train = control_section(item_exp), item_exp["train"]
            ev, calls = _eval_cost(counter, tok, section, 0.0, zs_cache)
            lora = counter.lora_steps(train["steps"], train["batch_size"], train["seqlen"], train["rank"], False)
            add(Row("recovery", f"dense control {path.stem}", 1, ev + lora + ev, load_s,
                    [f"zero-shot calls {2 * calls}"]))
    if "memory" in wanted and "memory" in cfg:
        exp = cfg["memory"]
        for name in exp["models"]:
            mc = Counter(name, exp["dtype"], hw)
            start = PROCESS_START_S + mc.weights_bytes() / LOAD_BYTES_PER_S
            for b, t in exp["shapes"]:
                total = mc.forward(b, t) + mc.forward(1, 8)
                for entry in exp["methods"]:
                    total = total + mc.method(entry, entry.get("sparsity", 0.2), b, t, {}) + mc.forward(1, 8)
                n = 1 + len(exp["methods"])
                add(Row("memory", f"{name} {b}x{t}", n, total, n * start, ["one fresh process per step"]))
    if "latency" in wanted and "latency" in cfg:
        from minillm.bench.measure import BENCH_REPEATS

        exp = cfg["latency"]
        repeats = exp.get("repeats", 20)
        benches = exp.get("bench_repeats", BENCH_REPEATS)
        variants = 1 + len(exp["sparsities"]) + (1 if exp.get("include_24") else 0)
        for name in exp["models"]:
            lc = Counter(name, exp["dtype"], hw)
            one = Cost()
            for b, t in exp["prefill"]:
                one = one + lc.forward(b, t) * (3 + repeats)
            d = exp["decode"]
            for b in d["batch"]:
                gen = lc.forward(b, d["prompt"]) + lc.decode(b, d["prompt"] + d["new_tokens"] // 2) * d["new_tokens"]
                one = one + gen * (1 + max(3, repeats // 4))
            for r in exp.get("round_to", [1]):
                add(Row("latency", f"{name} round_to={r}", variants, one * (variants * benches),
                                variants * lc.weights_bytes() / LOAD_BYTES_PER_S,
                                ["pruned and 2:4 variants counted at the dense cost"]))
    return rows


def _log(row: Row) -> Row:
    import logging

    logging.getLogger(__name__).info("%s %s: %.1f s (estimate)", row.section, row.what, row.seconds)
    return row


def to_json(rows: list[Row], profile: str, hw: dict = H100) -> dict:
    """The estimate as a JSON-able record (`rows_from_json` reads it back)."""
    return {
        "estimate": True,
        "profile": profile,
        "hardware": hw,
        "load_bytes_per_s": LOAD_BYTES_PER_S,
        "process_start_s": PROCESS_START_S,
        **summary(rows),
        "rows": [
            {"section": r.section, "part": r.what, "records": r.count, "flops": r.cost.flops, "bytes": r.cost.bytes,
             "kernels": r.cost.ops, "gpu_s": r.cost.seconds, "loads_s": r.extra_s, "estimated_s": r.seconds,
             "notes": [n for n in r.notes if n]}
            for r in rows
        ],
    }


def rows_from_json(data: dict) -> list[Row]:
    """Rows of a `to_json` record (to combine estimates made section by section)."""
    return [
        Row(r["section"], r["part"], r["records"], Cost(r["flops"], r["bytes"], r["kernels"], r["gpu_s"]),
            r["loads_s"], r.get("notes", []))
        for r in data["rows"]
    ]


def summary(rows: list[Row]) -> dict:
    by = {}
    for r in rows:
        by[r.section] = by.get(r.section, 0.0) + r.seconds
    return {"sections_s": by, "total_s": sum(by.values())}


def markdown(rows: list[Row], profile: str, hw: dict = H100) -> str:
    s = summary(rows)
    lines = [
        f"Estimated run time of profile `{profile}` on one {hw['name']}: {s['total_s'] / 60:.1f} min "
        "(an estimate from counted FLOPs and bytes, not a measurement; `python -m minillm bench runtime`)",
        "",
        f"Assumptions: peak {', '.join(f'{k} {v / 1e12:g} TFLOP/s' for k, v in hw['peak_flops'].items())}, "
        f"{hw['compute_efficiency']:.0%} of it achieved; HBM {hw['hbm_bytes_per_s'] / 1e12:g} TB/s, "
        f"{hw['memory_efficiency']:.0%} achieved; {hw['launch_s'] * 1e6:g} us per kernel launch; per operator the "
        f"max of compute and memory time; loads at {LOAD_BYTES_PER_S / 1e9:g} GB/s; {PROCESS_START_S:g} s per "
        "fresh process.",
        "",
        "| section | part | records | TFLOP | GB moved | GPU s | loads/starts s | estimated s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.section} | {r.what} | {r.count} | {r.cost.flops / 1e12:.1f} | {r.cost.bytes / 1e9:.1f} | "
            f"{r.cost.seconds:.1f} | {r.extra_s:.1f} | {r.seconds:.1f} |"
        )
    lines += ["", "| section | estimated min |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in s["sections_s"].items()]
    lines.append(f"| **total** | **{s['total_s'] / 60:.1f}** |")
    return "\n".join(lines) + "\n"
