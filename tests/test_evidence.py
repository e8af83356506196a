"""Evidence a reviewer can trust: bootstrap intervals, seed replicates, one style per method, the claims
table's verdict rules. Fast: tiny models and synthetic records only."""

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch

from minillm.artifact import claims, experiments, report, styles
from minillm.evaluate import bootstrap_interval, perplexity
from minillm.artifact.profiles import ProfileError, validate_profile
from minillm.artifact.records import REPO_ROOT

# --- perplexity interval -----------------------------------------------------------------------------------------


def test_bootstrap_interval_known_answers():
    # identical windows: every resample has the same mean, the interval is the point
    assert bootstrap_interval([20.0] * 5, [10] * 5, iters=200, seed=3) == pytest.approx([math.e**2] * 2)
    # two windows of mean NLL 1 and 3: a resample's mean is 1, 2 or 3 (probabilities 1/4, 1/2, 1/4), so the 2.5%
    # and 97.5% quantiles of 4000 resamples are 1 and 3
    assert bootstrap_interval([10.0, 30.0], [10, 10], iters=4000, seed=0) == pytest.approx([math.e, math.e**3])
    # token-weighted: windows of 1 and 3 tokens with NLL sums 1 and 9 -> resample means in {1, 2.5, 3}
    lo, hi = bootstrap_interval([1.0, 9.0], [1, 3], iters=4000, seed=1)
    assert (lo, hi) == pytest.approx((math.e, math.e**3))


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(7)
    nll = list(rng.uniform(300, 500, size=12))
    tokens = [127] * 12
    a = bootstrap_interval(nll, tokens, iters=500, seed=11)
    assert a == bootstrap_interval(nll, tokens, iters=500, seed=11)
    assert a != bootstrap_interval(nll, tokens, iters=500, seed=12)
    point = math.exp(sum(nll) / sum(tokens))
    assert a[0] < point < a[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1.0], [1, 2]), "equally long"),
        (([], []), "non-empty"),
        (([1.0], [0]), "positive token count"),
        (([1.0], [1], 0), "positive integer"),
        (([1.0], [1], 10, 0, 1.5), "level"),
    ],
)
def test_bootstrap_interval_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(*args)


def test_perplexity_interval_comes_from_the_same_forward_passes(tiny):
    model = tiny("tiny-llama")
    windows = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    plain = perplexity(model, windows, batch_size=2, progress=False)
    assert set(plain) == {"ppl", "nll", "tokens", "n_windows", "seqlen"}  # records without the option: unchanged
    with_ci = perplexity(model, windows, batch_size=2, progress=False, bootstrap_iters=300, bootstrap_seed=4)
    assert with_ci["ppl"] == plain["ppl"]
    assert sum(with_ci["window_nll"]) / with_ci["tokens"] == pytest.approx(plain["nll"], rel=1e-12)
    lo, hi = with_ci["ppl_ci95"]
    assert lo <= plain["ppl"] <= hi
    assert with_ci["ppl_ci95"] == bootstrap_interval(with_ci["window_nll"], [11] * 5, 300, 4)
    with pytest.raises(ValueError, match="bootstrap_iters"):
        perplexity(model, windows, progress=False, bootstrap_iters=-1)


# --- seed replicates -----------------------------------------------------------------------------------------------


def _cfg(accuracy_extra=None, entry_extra=None) -> dict:
    entry = {"label": "rnd", "method": "random", **(entry_extra or {})}
    return {
        "profile": "t",
        "model": "smollm2-135m",
        "accuracy": {
            "calibration": {"n_samples": 2, "seqlen": 32, "seed": 5},
            "perplexity": {"seqlen": 64, "windows": 2},
            "sparsities": [0.1, 0.2],
            "methods": [entry, {"label": "mag", "method": "magnitude", "seed": 3}],
            **(accuracy_extra or {}),
        },
    }


def _names(cfg) -> dict[str, dict]:
    return {p.name: c for p, c in experiments.expected_records(cfg, "accuracy").items()}


def test_without_seeds_records_keep_their_names_and_configurations():
    plain = _names(_cfg())
    assert sorted(plain) == ["dense_s00.json", "mag_s10.json", "mag_s20.json", "rnd_s10.json", "rnd_s20.json"]
    assert _names(_cfg({"seeds": [0]})) == plain
    assert "replicate" not in plain["rnd_s20.json"]


def test_seed_replicates_get_their_own_names_and_shifted_seeds():
    cfg = _cfg({"seeds": [0, 1, 2], "seed_sparsities": [0.2]})
    validate_profile(cfg)
    names = _names(cfg)
    plain = _names(_cfg())
    assert set(names) - set(plain) == {
        "rnd_s20_seed1.json",
        "rnd_s20_seed2.json",
        "mag_s20_seed1.json",
        "mag_s20_seed2.json",
    }
    assert all(names[n] == plain[n] for n in plain)  # replicate 0 unchanged
    rep = names["mag_s20_seed2.json"]
    assert (rep["replicate"], rep["seed"], rep["calibration"]["seed"]) == (2, 3 + 2, 5 + 2)
    # an entry's own seeds override the section's
    only = _names(_cfg(entry_extra={"seeds": [0, 1]}))
    assert set(only) - set(plain) == {"rnd_s10_seed1.json", "rnd_s20_seed1.json"}


def test_run_accuracy_writes_one_record_per_seed_and_resumes(tmp_path, monkeypatch):
    """tiny-llama, random calibration ids drawn from the calibration seed, a stub evaluation: replicate 1 of the
    random method is its own record, pruned with the shifted seed (other kept units), and a second run reuses it."""
    import minillm
    from minillm.data import describe_calibration

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(experiments, "_load", lambda cfg: (minillm.load_model("tiny-llama")[0], None))

    def calibration(tok, exp, entry):
        n, seqlen, seed = experiments._calibration_settings(exp, entry)
        ids = torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))
        return ids, describe_calibration(n, seqlen, seed)

    calls = []
    monkeypatch.setattr(experiments, "_calibration", calibration)
    monkeypatch.setattr(experiments, "_evaluate", lambda *a: calls.append(a[-1]) or {"perplexity": {"ppl": 1.0}})
    cfg = _cfg({"seeds": [0, 1], "seed_sparsities": [0.2], "sparsities": [0.2]})
    cfg["accuracy"]["methods"] = cfg["accuracy"]["methods"][:1]
    records = experiments.run_accuracy(cfg)
    assert len(calls) == 3  # dense, seed 0, seed 1
    by_name = {p.name: r for p, r in zip(experiments.expected_records(cfg, "accuracy"), records)}
    assert sorted(by_name) == ["dense_s00.json", "rnd_s20.json", "rnd_s20_seed1.json"]
    seed0, seed1 = by_name["rnd_s20.json"], by_name["rnd_s20_seed1.json"]
    assert (seed1["config"]["seed"], seed1["config"]["calibration"]["seed"]) == (1, 6)
    assert seed0["plan"]["layers"] != seed1["plan"]["layers"]
    experiments.run_accuracy(cfg)
    assert len(calls) == 3


def test_run_accuracy_computes_seed_0_of_every_entry_before_any_replicate(tmp_path, monkeypatch):
    """A grid cut off part-way must leave a complete single-seed table: the computation order is replicate 0 of
    every entry, then replicate 1 of every entry; the returned records keep the order of expected_records."""
    import minillm

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(experiments, "_load", lambda cfg: (minillm.load_model("tiny-llama")[0], None))
    monkeypatch.setattr(
        experiments, "_calibration", lambda tok, exp, entry: (torch.randint(0, 128, (2, 32)), {"seed": 0})
    )
    order = []
    real = experiments._run_method

    def run_method(cfg, exp, entry, *args):
        order.append((entry["label"], args[-1]))
        return real(cfg, exp, entry, *args)

    monkeypatch.setattr(experiments, "_run_method", run_method)
    monkeypatch.setattr(experiments, "_evaluate", lambda *a: {"perplexity": {"ppl": 1.0}})
    cfg = _cfg({"sparsities": [0.2], "seeds": [0, 1, 2]}, {"seeds": [0, 1]})  # rnd: 2 seeds, mag: 3
    records = experiments.run_accuracy(cfg)
    assert order == [("rnd", 0), ("mag", 0), ("rnd", 1), ("mag", 1), ("mag", 2)]
    expected = [c for c in experiments.expected_records(cfg, "accuracy").values()]
    assert [r["config"] for r in records] == expected


def test_run_accuracy_labels_select_entries_and_dense(tmp_path, monkeypatch):
    """`labels` (CLI --labels) runs only the named entries, and the dense record only when "dense" is named; an
    unknown label is refused with the profile's labels; a second run without labels computes only what is left."""
    import minillm

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(experiments, "_load", lambda cfg: (minillm.load_model("tiny-llama")[0], None))
    monkeypatch.setattr(
        experiments, "_calibration", lambda tok, exp, entry: (torch.randint(0, 128, (2, 32)), {"seed": 0})
    )
    calls = []
    monkeypatch.setattr(experiments, "_evaluate", lambda *a: calls.append(a[-1]) or {"perplexity": {"ppl": 1.0}})
    cfg = _cfg({"sparsities": [0.2]})
    records = experiments.run_accuracy(cfg, labels=["mag"])
    assert [r["config"]["label"] for r in records] == ["mag"] and len(calls) == 1
    folder = experiments.results_dir(cfg["profile"], "accuracy")
    assert sorted(p.name for p in folder.glob("*.json")) == ["mag_s20.json"]
    with pytest.raises(ValueError, match=r"no method labels \['nosuch'\]; it has \['dense', 'rnd', 'mag'\]"):
        experiments.run_accuracy(cfg, labels=["nosuch"])
    experiments.run_accuracy(cfg)
    assert len(calls) == 3  # dense and rnd only


def test_cli_runs_the_calibration_budget_section_into_its_own_records(tmp_path, monkeypatch, capsys):
    """`minillm experiment calibration_budget --labels ...`: the section's entries, with their own calibration
    sizes, written under results/<profile>/calibration_budget; --labels is refused for a section without entries."""
    import minillm
    from minillm.__main__ import main

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(experiments, "_load", lambda cfg: (minillm.load_model("tiny-llama")[0], None))
    seen = []

    def calibration(tok, exp, entry):
        n, seqlen, seed = experiments._calibration_settings(exp, entry)
        seen.append((entry["label"], n, seqlen))
        return torch.randint(0, 128, (n, seqlen)), {"n_samples": n, "seqlen": seqlen, "seed": seed}

    monkeypatch.setattr(experiments, "_calibration", calibration)
    monkeypatch.setattr(experiments, "_evaluate", lambda *a: {"perplexity": {"ppl": 1.0}})
    cfg = _cfg({"sparsities": [0.2]})
    section = dict(cfg["accuracy"])
    section["methods"] = [
        {"label": "rnd-c2x8", "method": "random", "calibration": {"n_samples": 2, "seqlen": 8, "seed": 0}},
        {"label": "rnd-c4x16", "method": "random", "calibration": {"n_samples": 4, "seqlen": 16, "seed": 0}},
    ]
    cfg["calibration_budget"] = section
    validate_profile(cfg)
    monkeypatch.setattr(experiments, "load_profile", lambda name: cfg)
    assert main(["experiment", "calibration_budget", "--profile", cfg["profile"], "--labels", "rnd-c4x16"]) == 0
    assert seen == [("rnd-c4x16", 4, 16)]
    folder = experiments.results_dir(cfg["profile"], "calibration_budget")
    assert sorted(p.name for p in folder.glob("*.json")) == ["rnd-c4x16_s20.json"]
    assert "1 records in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--labels selects method entries of accuracy, ablations, calibration_budget"):
        main(["experiment", "memory", "--profile", cfg["profile"], "--labels", "x"])


def test_an_entry_can_skip_zero_shot_and_its_records_say_so(tmp_path, monkeypatch):
    """`zeroshot: false` on a method entry: its records are evaluated without zero-shot and their configuration says
    so (a record made with zero-shot is not reused for it); the other entries and the dense record keep theirs."""
    import minillm

    zs = {"limit": 5, "sparsities": [0.0, 0.2]}
    cfg = _cfg({"zeroshot": zs, "sparsities": [0.2]}, {"zeroshot": False})
    validate_profile(cfg)
    with_zs = _names(_cfg({"zeroshot": zs, "sparsities": [0.2]}))
    names = _names(cfg)
    assert names["rnd_s20.json"]["eval"]["zeroshot"] is None and with_zs["rnd_s20.json"]["eval"]["zeroshot"] == zs
    assert names["mag_s20.json"] == with_zs["mag_s20.json"] and names["dense_s00.json"] == with_zs["dense_s00.json"]

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(experiments, "_load", lambda cfg: (minillm.load_model("tiny-llama")[0], None))
    monkeypatch.setattr(
        experiments, "_calibration", lambda tok, exp, entry: (torch.randint(0, 128, (2, 32)), {"seed": 0})
    )
    seen = []

    def evaluate(model, tok, exp, sparsity):
        seen.append(exp.get("zeroshot"))
        return {"perplexity": {"ppl": 1.0}}

    monkeypatch.setattr(experiments, "_evaluate", evaluate)
    experiments.run_accuracy(cfg)
    assert seen == [zs, None, zs]  # dense, rnd (no zero-shot), mag
    with pytest.raises(ProfileError, match="zeroshot: must be true or false"):
        validate_profile(_cfg(entry_extra={"zeroshot": "no"}))


def test_seed_zeroshot_false_gives_replicates_perplexity_only():
    """`seed_zeroshot: false` (section, or the entry's own): replicate 0 keeps zero-shot, replicates k > 0 are
    evaluated by perplexity only and their configuration says so; an entry's `seed_zeroshot: true` wins."""
    zs = {"limit": 5, "sparsities": [0.0, 0.2]}
    base = {"zeroshot": zs, "sparsities": [0.2], "seeds": [0, 1]}
    both = _names(_cfg(base))
    cfg = _cfg({**base, "seed_zeroshot": False})
    validate_profile(cfg)
    off = _names(cfg)
    assert both["rnd_s20_seed1.json"]["eval"]["zeroshot"] == zs
    for label in ("rnd", "mag"):
        assert off[f"{label}_s20_seed1.json"]["eval"]["zeroshot"] is None
        assert off[f"{label}_s20.json"] == both[f"{label}_s20.json"]
    kept = _names(_cfg({**base, "seed_zeroshot": False}, {"seed_zeroshot": True}))
    assert kept["rnd_s20_seed1.json"]["eval"]["zeroshot"] == zs and kept["mag_s20_seed1.json"]["eval"]["zeroshot"] is None
    with pytest.raises(ProfileError, match="seed_zeroshot: must be true or false"):
        validate_profile(_cfg({**base, "seed_zeroshot": "no"}))


@pytest.mark.parametrize(
    ("accuracy_extra", "entry_extra", "message"),
    [
        ({"seeds": [1, 2]}, None, "must include 0"),
        ({"seeds": [0, 1, 1]}, None, "repeat"),
        ({"seeds": [0, -1]}, None, ">= 0"),
        (None, {"seeds": [0, 1], "seed_sparsities": [0.3]}, "not among its sparsities"),
        ({"seeds": [0, 1], "seed_sparsities": [0.5]}, None, "not among the methods' sparsities"),
        ({"seed": [0, 1]}, None, "did you mean 'seeds'"),
    ],
)
def test_bad_seed_settings_are_named(accuracy_extra, entry_extra, message):
    with pytest.raises(ProfileError, match=message):
        validate_profile(_cfg(accuracy_extra, entry_extra))


def test_interval_fields_are_validated():
    cfg = _cfg()
    cfg["accuracy"]["perplexity"]["bootstrap_iters"] = 0
    with pytest.raises(ProfileError, match="bootstrap_iters: must be >= 1"):
        validate_profile(cfg)
    cfg = _cfg()
    cfg["accuracy"]["zeroshot"] = {"stderr": "yes"}
    with pytest.raises(ProfileError, match="stderr: must be true or false"):
        validate_profile(cfg)


@pytest.mark.parametrize("profile", ["cpu", "cpu-full"])
def test_committed_records_stay_named_and_current(profile):
    """Every committed accuracy, ablation and calibration-budget record, seed replicates included, is expected by its profile under its
    name and still current (nothing to recompute)."""
    cfg = experiments.load_profile(profile)
    for exp in experiments.GRID_SECTIONS:
        wanted = experiments.expected_records(cfg, exp)
        for path in sorted((REPO_ROOT / "results" / profile / exp).glob("*.json")):
            assert path in wanted, path
            assert experiments.is_current(path, wanted[path]), path


def test_seed_summary_aggregates_over_seeds():
    df = pd.DataFrame(
        [
            {"method": "a", "pattern": "structured", "sparsity": 0.2, "ppl": 10.0, "zs_avg": 0.5, "seed": 0},
            {"method": "a", "pattern": "structured", "sparsity": 0.2, "ppl": 14.0, "zs_avg": 0.7, "seed": 1},
            {"method": "b", "pattern": "structured", "sparsity": 0.2, "ppl": 12.0, "zs_avg": 0.6, "seed": 0},
        ]
    )
    out = report.seed_summary(df).set_index("method")
    assert out.loc["a", "ppl"] == 12.0 and out.loc["a", "ppl_std"] == pytest.approx(math.sqrt(8))
    assert out.loc["a", "zs_avg_std"] == pytest.approx(math.sqrt(0.02)) and out.loc["a", "n_seeds"] == 2
    assert out.loc["b", "n_seeds"] == 1 and math.isnan(out.loc["b", "ppl_std"])
    ppl_only = df.copy()
    ppl_only.loc[1, "zs_avg"] = float("nan")  # a replicate evaluated by perplexity only
    out = report.seed_summary(ppl_only).set_index("method")
    assert (out.loc["a", "zs_avg"], out.loc["a", "zs_n_seeds"], out.loc["a", "n_seeds"]) == (0.5, 1, 2)
    assert math.isnan(out.loc["a", "zs_avg_std"])
    no_seeds = df[df.seed == 0].drop(columns="seed")
    assert report.seed_summary(no_seeds) is no_seeds


def _acc_record(label, method, sparsity, ppl, ci=None, replicate=0):
    perplexity = {"ppl": ppl, **({"ppl_ci95": list(ci)} if ci else {})}
    config = {"label": label, "method": method, "sparsity": sparsity, **({"replicate": replicate} if replicate else {})}
    return {"config": config, "metrics": {"perplexity": perplexity}}


def test_accuracy_frame_carries_intervals_and_seeds_only_when_present():
    plain = report.accuracy_frame([_acc_record("a", "fms", 0.2, 10.0)])
    assert not {"seed", "ppl_ci95_lo", "zs_avg_se"} & set(plain.columns)
    df = report.accuracy_frame(
        [_acc_record("a", "fms", 0.2, 10.0, (9, 11)), _acc_record("a", "fms", 0.2, 12.0, (11, 13), replicate=1)]
    )
    assert list(df.seed) == [0, 1] and list(df.ppl_ci95_hi) == [11, 13]
    summary = report.seed_summary(df)
    assert (summary.ppl_ci95_lo[0], summary.ppl_ci95_hi[0], summary.n_seeds[0]) == (9, 13, 2)


def test_calibration_budget_frame_counts_tokens_and_the_time_of_shared_scores():
    """The series is the label without its -c<n>x<seqlen> suffix, tokens are windows x window length, and the
    time of a point adds the shared scoring to the pruning only where scores were shared across sparsities."""

    def rec(label, method, n, seqlen, ppl, timing):
        r = _acc_record(label, method, 0.5, ppl, (ppl - 1, ppl + 1))
        r["config"]["calibration"] = {"n_samples": n, "seqlen": seqlen, "seed": 0}
        r["timing"] = timing
        return r

    shared = {"scoring_time_s": 10.0, "prune_time_s": 1.0, "scoring_peak_memory_in_process": {"increase_gib": 0.4},
              "prune_peak_memory_in_process": {"increase_gib": 0.3}}
    alone = {"scoring_time_s": 4.0, "prune_time_s": 6.0, "prune_peak_memory_in_process": {"increase_gib": 0.9}}
    df = report.calibration_budget_frame([
        rec("flap-reconstruct-c256x512", "flap", 256, 512, 20.0, shared),
        rec("flap-reconstruct-c1024x128", "flap", 1024, 128, 21.0, shared),
        rec("obs-c10x64", "obs", 10, 64, 90.0, alone),
        {"config": {"label": "dense", "method": "dense", "sparsity": 0.0}, "metrics": {}},
    ])
    assert list(df.method) == ["flap-reconstruct", "flap-reconstruct", "obs"]
    assert list(df.tokens) == [131072, 131072, 640] and list(df.seqlen) == [128, 512, 64]
    assert list(df.total_s) == [11.0, 11.0, 6.0] and list(df.peak_increase_gib) == [0.4, 0.4, 0.9]
    fig = report.plot_calibration_budget(df, "t")  # the 128-token point is drawn apart from the line
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["flap-reconstruct", "flap-reconstruct (128-token windows)", "obs"]


def test_conclusions_frame_checks_old_orders_against_new_intervals():
    old = report.accuracy_frame(
        [_acc_record(m, m, 0.2, v) for m, v in (("a", 10.0), ("b", 20.0), ("c", 30.0), ("d", 40.0), ("e", 50.0))]
    )
    new = report.accuracy_frame(
        [
            _acc_record("a", "a", 0.2, 10.0, (9, 11)),
            _acc_record("a", "a", 0.2, 14.0, (13, 15), replicate=1),  # envelope of a: 9-15
            _acc_record("b", "b", 0.2, 18.0, (16, 20)),  # above a's envelope: a < b holds
            _acc_record("c", "c", 0.2, 12.0, (11, 14)),  # inside a's envelope: within noise; below b: reversed
            _acc_record("d", "d", 0.2, 99.0),  # a point value without an interval is its own envelope
        ]
    )
    got = report.conclusions_frame(old, new).set_index(["better", "worse"])
    assert len(got) == 10  # every pair of the five old methods, once, the better one first
    assert got.loc[("a", "b"), "verdict"] == "holds" and got.loc[("a", "b"), "min_seeds"] == 1
    assert got.loc[("a", "c"), "verdict"] == "within noise"
    assert got.loc[("b", "c"), "verdict"] == "reversed"
    assert got.loc[("c", "d"), "verdict"] == "holds"
    assert got.loc[("a", "e"), "verdict"] == "not measured yet" and math.isnan(got.loc[("a", "e"), "new_worse"])
    assert got.loc[("a", "b"), "new_better"] == 12.0  # the mean over a's two seeds
    assert report.conclusions_frame(old.iloc[0:0], new).empty


def test_compare_conclusions_script_on_the_committed_records(capsys):
    """The records of HEAD against themselves: every order is measured, none is reversed, nothing changed."""
    spec = importlib.util.spec_from_file_location("compare", REPO_ROOT / "scripts" / "compare_conclusions.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    assert compare.main(["--old", "HEAD", "--profile", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "not measured yet" not in out and "| reversed |" not in out and "holds" in out
    old = compare.records_at("HEAD", "results/cpu/accuracy")
    assert old and not any(compare.changed_settings(old, old).values())
    with pytest.raises(SystemExit, match="cannot list"):
        compare.records_at("HEAD", "results/no-such-profile/accuracy")


def test_zeroshot_chance_is_the_mean_of_one_over_choices():
    assert report.zeroshot_chance(["bb_cloze_hyperbaton", "bb_cloze_wikihow_step"]) == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="no chance level"):
        report.zeroshot_chance(["nope"])


def test_2_4_latency_rows_without_sparse_kernels_are_labelled():
    row = {"variant": "2:4", "sparsity": 0.5, "semi_structured": {"converted": 0, "reason": "needs CUDA"}}
    assert report._latency_variant(row, "cpu") == "2:4 (dense kernels on CPU)"
    assert report._latency_variant({**row, "semi_structured": {"converted": 84}}, "cuda") == "2:4"
    assert report._latency_variant({"sparsity": 0.2}, "cpu") == "structured"


def _latency_record(speedup: dict | None) -> dict:
    timing = {"batch": 1, "seqlen": 8, "median_s": 0.2, "iqr_s": 0.04, "q1_s": 0.18, "q3_s": 0.22, "tokens_per_s": 40}
    pruned = {
        "variant": "structured",
        "sparsity": 0.5,
        "prefill": [{**timing, "median_s": 0.1, "q1_s": 0.09, "q3_s": 0.12}],
        "decode": [],
        "prefill_speedup": [1.9],
        **(speedup or {}),
    }
    dense = {"variant": "dense", "sparsity": 0.0, "prefill": [timing], "decode": []}
    return {
        "metrics": {"model": "m", "dtype": "float32", "device": "cpu", "rows": [dense, pruned]},
        "provenance": {"device": "cpu"},
    }


def test_latency_frame_has_interval_ceiling_and_quartiles():
    new = _latency_record({"prefill_speedup_ci95": [[1.7, 2.1]], "prefill_ceiling": [1.65]})
    df = report.latency_frame([new, _latency_record(None)])  # the second: a record made before intervals
    dense, pruned, _, old = df.to_dict("records")
    assert (pruned["speedup_ci95_lo"], pruned["speedup_ci95_hi"], pruned["ceiling"]) == (1.7, 2.1, 1.65)
    assert (dense["q1_ms"], dense["q3_ms"]) == pytest.approx((180, 220)) and dense["ceiling"] == 1.0
    assert math.isnan(old["speedup_ci95_lo"]) and math.isnan(old["ceiling"]) and old["speedup"] == 1.9


def test_latency_plot_draws_the_recorded_iqr_and_interval():
    import matplotlib

    matplotlib.use("Agg")
    df = report.latency_frame([_latency_record({"prefill_speedup_ci95": [[1.7, 2.1]], "prefill_ceiling": [1.65]})])
    from matplotlib.container import ErrorbarContainer

    times, speed = report.plot_latency(df).axes
    dense_bars, pruned_bars = (c for c in times.containers if isinstance(c, ErrorbarContainer))
    (speed_bars,) = (c for c in speed.containers if isinstance(c, ErrorbarContainer))

    def segment(bars: ErrorbarContainer) -> np.ndarray:
        return bars.lines[2][0].get_segments()[0][:, 1]  # the first bar's error line: its low and high end

    assert segment(dense_bars) == pytest.approx([180, 220]) and segment(pruned_bars) == pytest.approx([90, 120])
    assert segment(speed_bars) == pytest.approx([1.7, 2.1])
    assert speed.collections[-1].get_offsets()[0][1] == pytest.approx(1.65)  # the ceiling mark


# --- one style per method ------------------------------------------------------------------------------------------


def _committed_labels() -> set[str]:
    labels = set()
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        cfg = experiments.load_profile(path.stem)
        for exp in ("accuracy", "ablations", "memory"):
            labels |= {m["label"] for m in cfg.get(exp, {}).get("methods", [])}
    return labels


def test_every_committed_label_has_its_own_colour_and_marker():
    labels = _committed_labels() | {"dense", "dense forward"}
    unlisted = sorted(x for x in labels if not styles.is_listed(x))
    assert not unlisted, f"add these labels to minillm/artifact/styles.py VARIANTS: {unlisted}"
    listed = [x for variants in styles.VARIANTS.values() for x in variants]
    pairs = [(styles.method_style(x)["color"], styles.method_style(x)["marker"]) for x in listed]
    assert len(set(pairs)) == len(pairs) == len(set(listed))


def test_labels_of_one_accuracy_figure_can_be_told_apart():
    """In every profile's accuracy figure two labels of one family (one hue) differ in both shade and marker, and
    any two labels differ in colour or marker (it failed for fms-weights-n64 / fms-allocation-n128, one light blue,
    and fms-gates-n64 / fms-ablation-heads, two stars in close blues, before PINNED)."""
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        methods = experiments.load_profile(path.stem).get("accuracy", {}).get("methods", [])
        shown = [(m["label"], styles.method_family(m["label"], m["method"])) for m in methods]
        for i, (a, fa) in enumerate(shown):
            for b, fb in shown[i + 1 :]:
                sa, sb = styles.method_style(a, fa), styles.method_style(b, fb)
                assert sa != sb, (path.stem, a, b)
                if fa == fb:
                    assert sa["color"] != sb["color"] and sa["marker"] != sb["marker"], (path.stem, a, b, sa, sb)


def test_style_follows_the_family_and_is_stable():
    assert styles.method_family("fms-gates-n16") == "fms"
    assert styles.method_family("wanda_sp+comp") == "wanda_sp"
    assert styles.method_family("magnitude_24") == "magnitude_24"
    assert styles.method_family("my-label", method="taylor") == "taylor"
    assert styles.method_style("taylor")["color"] == styles.FAMILY_COLOURS["taylor"]
    new = styles.method_style("fms-gates-n999")
    assert new == styles.method_style("fms-gates-n999") and new["marker"] in styles.MARKERS
    with pytest.raises(ValueError, match="non-empty string"):
        styles.method_style("")


# --- claims --------------------------------------------------------------------------------------------------------


def _verdict(rows, start):
    (row,) = [r for r in rows if r["claim"].startswith(start)]
    return row["verdict"]


FREE = "better than gradient-free methods on the profile's model"  # assess() without a model names none
BACKPROP = "in some cases better than backprop"


def _accuracy(fms, others):
    """fms / others: {label-or-method: (ppl, ci or None)} at 20%."""
    recs = [_acc_record("fms-x", "fms", 0.2, p, ci) for p, ci in [fms]]
    recs += [_acc_record(m, m, 0.2, p, ci) for m, (p, ci) in others.items()]
    return recs


def test_claims_overlapping_intervals_are_insufficient_evidence():
    far = (900.0, (800, 1000))
    recs = _accuracy(
        (20.0, (18, 24)), {"wanda_sp": (22.0, (19, 25)), "taylor": (21.0, (20, 23)), "magnitude": far, "flap": far}
    )
    rows = claims.assess(recs, [], [])
    assert _verdict(rows, FREE) == "insufficient evidence (intervals overlap in some comparison)"
    assert _verdict(rows, BACKPROP).startswith("insufficient evidence (intervals overlap")


def test_claims_one_seed_without_interval_is_insufficient_evidence():
    recs = _accuracy((20.0, None), {"wanda_sp": (2000.0, None), "magnitude": (3000.0, None), "flap": (99.0, None)})
    assert "one seed without an interval" in _verdict(claims.assess(recs, [], []), FREE)


def test_claims_separated_intervals_decide():
    baselines = {"wanda_sp": (30.0, (28, 33)), "flap": (25.0, (22, 24.5)), "magnitude": (90.0, (80, 99))}
    assert _verdict(claims.assess(_accuracy((20.0, (19, 21)), baselines), [], []), FREE) == "supported"
    del baselines["magnitude"]  # a gradient-free family without records: the claim is not tested against it
    verdict = _verdict(claims.assess(_accuracy((20.0, (19, 21)), baselines), [], []), FREE)
    assert verdict == "insufficient evidence (no records of magnitude to compare with)"
    worse = _accuracy((20.0, (19, 21)), {"wanda_sp": (30.0, (28, 33)), "flap": (15.0, (14, 16))})
    assert _verdict(claims.assess(worse, [], []), FREE) == "not supported"
    backprop_better = _accuracy((20.0, (19, 21)), {"taylor": (10.0, (9, 11))})
    assert _verdict(claims.assess(backprop_better, [], []), BACKPROP) == "not supported"


def test_claims_seed_spreads_count_as_intervals():
    recs = [_acc_record("fms-x", "fms", 0.2, p, replicate=k) for k, p in enumerate((20.0, 21.0, 22.0))]
    recs += [_acc_record("taylor", "taylor", 0.2, p, replicate=k) for k, p in enumerate((30.0, 31.0))]
    groups = claims.accuracy_groups(recs)
    assert groups[("fms-x", 0.2)]["interval"] == [20.0, 22.0] and groups[("fms-x", 0.2)]["n_seeds"] == 3
    assert _verdict(claims.assess(recs, [], []), BACKPROP) == "supported"


def _memory_record(steps):
    methods = [
        {"label": label, "method": method, "weights_bytes": 2**30, "increase_gib": inc, "peak_gib": 1 + inc}
        for label, method, inc in steps
    ]
    return {
        "metrics": {"model": "m", "batch": 1, "seqlen": 8, "methods": methods},
        "provenance": {"device": "cpu (x)"},
    }


def test_claims_memory_rules():
    # GiB counted: weights (1) + increase; taylor / bonsai = 4 / 1.3 = 3.1, interval [2.5, 3.8]
    akin = _memory_record(
        [
            ("wanda_sp", "wanda_sp", 0.3),
            ("fms-gates", "fms", 0.35),
            ("taylor", "taylor", 3.0),
            ("bonsai", "bonsai", 0.3),
        ]
    )
    rows = claims.assess([], [akin], [])
    assert _verdict(rows, "pruning memory akin") == "supported"
    assert _verdict(rows, "2-3x less") == "supported"
    # fms 2.5 (interval from 2.25) above wanda_sp 1.3 (up to 1.43); taylor / bonsai = 1.4 / 1.3, below 2 throughout
    heavy = _memory_record(
        [("wanda_sp", "wanda_sp", 0.3), ("fms-gates", "fms", 1.5), ("taylor", "taylor", 0.4), ("bonsai", "bonsai", 0.3)]
    )
    rows = claims.assess([], [heavy], [])
    assert _verdict(rows, "pruning memory akin") == "not supported"
    assert _verdict(rows, "2-3x less") == "not supported"


def test_claims_speed_is_not_testable_without_sparse_kernels():
    row = {"variant": "2:4", "sparsity": 0.5, "semi_structured": {"converted": 0, "reason": "needs a CUDA GPU"}}
    latency = [{"metrics": {"model": "m", "rows": [row]}}]
    verdict = _verdict(claims.assess([], [], latency), "about 2x faster")
    assert verdict.startswith("not testable on this hardware (") and "CUDA" in verdict


def test_claims_untestable_models_and_missing_records():
    rows = claims.assess([], [], [])
    assert _verdict(rows, "better than gradient-free methods on BLOOM").startswith("not testable")
    assert _verdict(rows, "state-of-the-art").startswith("insufficient evidence (no sparsity with records")
    assert all(r["quoted"].startswith("quoted: ") for r in rows)


def test_claims_name_the_models_architecture_as_the_paper_sees_it():
    """MINI-LLM claims LLaMA, BLOOM and OPT: SmolLM2 (LLaMA) tests the claim as stated, Gemma 3 is labelled a
    transfer test outside the paper's architectures, and a model the registry does not know gets no architecture."""
    rows = {m: claims.assess([], [], [], m)[0]["claim"] for m in ("smollm2-135m", "gemma3-270m", "/some/local/dir")}
    assert rows["smollm2-135m"] == "better than gradient-free methods on a LLaMA-architecture model (smollm2-135m)"
    assert "LLaMA-architecture" not in rows["gemma3-270m"]
    assert rows["gemma3-270m"].startswith("better than gradient-free methods on gemma3-270m (gemma3_text: not one of")
    assert "transfer test" in rows["gemma3-270m"]
    assert rows["/some/local/dir"] == "better than gradient-free methods on the profile's model (/some/local/dir)"
    opt = claims.gradient_free_claim("tiny-opt")
    assert opt == "better than gradient-free methods on an OPT-architecture model (tiny-opt)"
    llama2 = "meta-llama/Llama-2-7b-hf"
    assert claims.gradient_free_claim(llama2).endswith(f"on a LLaMA-architecture model ({llama2})")


@pytest.mark.parametrize("profile", ["cpu", "cpu-full", "cpu-full-gemma3"])
def test_committed_claims_tables_match_their_records(profile):
    """figures/<profile>/claims.csv, as notebook 01 saved it, states the claims and verdicts that minillm.artifact.claims
    derives from the committed records now (a rule or a claim's wording changed without re-rendering fails here)."""
    saved = pd.read_csv(REPO_ROOT / "figures" / profile / "claims.csv", keep_default_na=False)
    now = claims.claims_frame(profile)
    assert list(saved["claim"]) == list(now["claim"])
    assert list(saved["verdict"]) == [str(v) for v in now["verdict"]]
    assert list(saved["evidence"]) == [str(v) for v in now["evidence"]]


@pytest.mark.parametrize("profile", ["cpu", "cpu-full"])
def test_committed_fms_diagnostics_tables_match_their_records(profile, tmp_path):
    """figures/<profile>/fms_diagnostics_*.csv, as notebook 07 saved them, are what minillm.artifact.diagnostics
    computes from the committed records now: a new column or rule without a re-render fails here."""
    from minillm.artifact import diagnostics

    cfg = experiments.load_profile(profile)
    memory = diagnostics.memory_ratios(experiments.collect(profile, "memory"), cfg.get("memory", {}).get("methods", []))
    tables = diagnostics.frames(experiments.collect(profile, "fms_diagnostics"), memory)
    tables["goal_grid"] = diagnostics.grid_goal_frame(report.accuracy_frame(experiments.collect(profile, "accuracy")),
                                                      memory)
    committed = sorted((REPO_ROOT / "figures" / profile).glob("fms_diagnostics_*.csv"))
    assert {p.stem.removeprefix("fms_diagnostics_") for p in committed} == {k for k, v in tables.items() if len(v)}
    for path in committed:
        report.save_table(tables[path.stem.removeprefix("fms_diagnostics_")], tmp_path / path.stem)
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


def _make_reproducing():
    """scripts/make_reproducing.py as a module."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "make_reproducing.py"
    spec = importlib.util.spec_from_file_location("make_reproducing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproducing_tolerances_come_from_the_seed_spread():
    """REPRODUCING.md's perplexity tolerance is 2 x the measured relative seed SD of each (method, sparsity), the
    same method's largest for a sparsity without replicates, the fixed one for a method never replicated, and the
    fixed text only when no record has replicates."""
    import statistics

    mod = _make_reproducing()

    def rec(label, sparsity, ppl):
        return {"config": {"label": label, "method": label, "sparsity": sparsity}, "metrics": {"perplexity": {"ppl": ppl}}}

    records = [rec("a", 0.2, 10.0), rec("a", 0.2, 12.0), rec("a", 0.2, 11.0), rec("b", 0.2, 30.0), rec("b", 0.2, 30.0),
               rec("a", 0.1, 9.0)]
    spread, largest = mod.seed_spread(records)
    assert spread[("a", 0.2)] == pytest.approx(statistics.stdev([10, 12, 11]) / 11)
    assert spread[("b", 0.2)] == 0.0 and ("a", 0.1) not in spread
    assert largest == spread[("a", 0.2)]
    assert f"the largest is {largest:.1%}" in mod.tolerance_text(spread, largest)
    assert "no seed replicates" in mod.tolerance_text(*mod.seed_spread([rec("a", 0.1, 9.0)]))
    # a row without replicates takes its own method's largest spread; a method never replicated the fixed one
    records.append(rec("a", 0.5, 50.0))
    records += [rec("a", 0.5, 70.0), rec("b", 0.5, 30.0)]
    spread, _ = mod.seed_spread(records)
    assert mod.row_tolerance(spread, "a", 0.2) == spread[("a", 0.2)]
    assert mod.row_tolerance(spread, "a", 0.1) == spread[("a", 0.5)] > spread[("a", 0.2)]
    assert mod.row_tolerance(spread, "b", 0.1) == 0.0
    assert mod.row_tolerance(spread, "dense", 0.0) is None


def test_latency_frame_of_no_records_is_empty():
    """Notebook 03 renders the gpu profile's latency too; without records that must be an empty frame, not an
    error (the cpu run of 2026-11-25 stopped there)."""
    assert report.latency_frame([]).empty


def test_reproducing_cross_model_section_waits_for_both_profiles(monkeypatch):
    """REPRODUCING.md's last section (the cross-model comparison) appears only when both profiles have accuracy
    records, and then states Kendall's tau from the same report functions as notebook 01."""
    mod = _make_reproducing()
    collect = mod.experiments.collect
    monkeypatch.setattr(mod.experiments, "collect", lambda p, e: [] if p == "cpu-full-gemma3" else collect(p, e))
    assert mod.cross_model_section("cpu-full", "cpu-full-gemma3") == []
    monkeypatch.setattr(mod.experiments, "collect", lambda p, e: collect("cpu", e))  # one profile's records twice
    lines = mod.cross_model_section("cpu", "cpu-full")
    assert lines[0].startswith("## method order across models") and "Kendall tau-b" in "\n".join(lines)
    text = "\n".join(lines)
    assert "tau = 1.00" in text  # a model against itself orders the methods identically
    # and separates no pair in opposite ways, nor any pair on one side only
    assert "Pairwise perplexity conclusions" in text and "opposite orders" not in text and "only cpu" not in text


def test_claims_table_reason_summarises_the_comparisons():
    """The claims table's one-line reason counts the comparisons each way and names who beat the claim's method."""
    evidence = ("10%: fms 33.3 [31.8, 34.9] vs flap 30.3 [29.1, 31.6]: flap better; "
                "20%: fms 55.7 [50.5, 63.4] (3 seeds) vs wanda_sp 1283 [669, 1876] (3 seeds): fms better; "
                "30%: fms 68.4 [65.1, 72.0] vs flap 63.7 [60.6, 66.9]: intervals overlap; "
                "50%: fms 1319 [1182, 1455] vs flap 250 [222, 278]: flap better")
    assert claims.reason(evidence, "not supported") == (
        "better in 1, worse in 2, within noise in 1 of 4 comparisons; lower: flap (10%/50%)"
    )
    assert claims.reason("-", "not testable on this hardware (no GPU here)") == "no GPU here"
    table = claims.claims_markdown(claims.claims_frame("cpu-full"))
    head = table.split("<details>")[0]
    assert head.count("\n| ") == 9 and "better in" in head and "Evidence:" not in head
    assert "Evidence: 10%: fms-weights-n64" in table  # the full evidence stays, collapsed


OBS_FLAP = "a forward-only method that beats FLAP"
OBS_24 = "obs at 50% better than 2:4 Wanda"


def test_obs_claim_compares_with_flap_as_published_not_with_flaps_best_variant():
    recs = [
        _acc_record("obs", "obs", 0.5, 60.0, (55, 65)),
        _acc_record("flap", "flap", 0.5, 160.0, (150, 170)),
        _acc_record("flap-reconstruct", "flap", 0.5, 58.0, (54, 62)),  # FLAP's best variant: not the reference
        _acc_record("wanda_24", "wanda_24", 0.5, 120.0, (110, 130)),
    ]
    rows = claims.assess(recs, [], [])
    assert _verdict(rows, OBS_FLAP) == "supported"
    assert _verdict(rows, OBS_24) == "supported"
    recs[1] = _acc_record("flap", "flap", 0.5, 50.0, (45, 54))
    assert _verdict(claims.assess(recs, [], []), OBS_FLAP) == "not supported"
    recs[1] = _acc_record("flap", "flap", 0.5, 62.0, (58, 70))
    assert _verdict(claims.assess(recs, [], []), OBS_FLAP).startswith("insufficient evidence (intervals overlap")
    assert _verdict(claims.assess(recs[1:], [], []), OBS_FLAP).startswith("insufficient evidence (no sparsity")
