"""The method order across two models (SmolLM2-135M and Gemma 3 270M): the cross-model table, Kendall's tau-b with
its permutation p-values, the figure and notebook 01's cells. Hand-made frames only."""

import importlib.util
import itertools
import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest

from minillm.artifact import report
from minillm.artifact.records import REPO_ROOT

matplotlib.use("Agg")


def _frame(ppl: dict, sparsity: float = 0.2, dense: float | None = 20.0, **extra) -> pd.DataFrame:
    """An accuracy frame with one row per method label at `sparsity` (and a dense row), perplexities from `ppl`;
    `extra` adds columns, one list of values per column in `ppl`'s order (the dense row gets NaN)."""
    rows = [
        {"method": m, "pattern": "structured", "sparsity": sparsity, "achieved": sparsity, "ppl": v}
        for m, v in ppl.items()
    ]
    for column, values in extra.items():
        for row, value in zip(rows, values):
            row[column] = value
    if dense is not None:
        rows.insert(0, {"method": "dense", "pattern": "-", "sparsity": 0.0, "achieved": 0.0, "ppl": dense})
    return pd.DataFrame(rows)


# --- Kendall's tau-b ------------------------------------------------------------------------------------------------


def test_tau_b_identical_reversed_and_hand_computed_ties():
    assert report.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert report.kendall_tau_b([1, 2, 3, 4], [40, 30, 20, 10]) == -1.0
    # x = 1 2 3 4, y = 2 1 2 3: pair (0,1) discordant, (0,2) tied in y, the other four concordant -> S = 3;
    # untied pairs 6 in x, 5 in y -> 3 / sqrt(30)
    assert report.kendall_tau_b([1, 2, 3, 4], [2, 1, 2, 3]) == pytest.approx(3 / math.sqrt(30))
    # ties on both sides: x = 1 1 2 3, y = 1 2 2 3: S = 4 over 5 untied pairs each -> 0.8 (tau-a would be 4/6)
    assert report.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert math.isnan(report.kendall_tau_b([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="equally long"):
        report.kendall_tau_b([1, 2, 3], [1, 2])


def test_tau_b_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, size=9), rng.integers(0, 5, size=9)
        expected = stats.kendalltau(x, y, variant="b").statistic
        assert report.kendall_tau_b(x, y) == pytest.approx(expected, nan_ok=True)


def test_exact_p_values_for_four_methods():
    # identical orders: of the 4! = 24 assignments only the identity reaches tau = 1 (one-sided 1/24), and only the
    # identity and the reversal reach |tau| = 1 (two-sided 2/24)
    assert report.permutation_p_values([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx((1 / 24, 2 / 24, "exact"))
    # reversed: every assignment has tau >= -1
    assert report.permutation_p_values([1, 2, 3, 4], [8, 7, 6, 5]) == pytest.approx((1.0, 2 / 24, "exact"))


def test_exact_p_values_with_ties_match_brute_force():
    x, y = np.array([1.0, 2, 3, 4, 5, 6]), np.array([2.0, 1, 2, 5, 3, 5])
    observed = report.kendall_tau_b(x, y)
    taus = np.array([report.kendall_tau_b(x, y[list(p)]) for p in itertools.permutations(range(6))])
    one, two, how = report.permutation_p_values(x, y)
    assert how == "exact"
    assert one == pytest.approx(np.mean(taus >= observed - 1e-12))
    assert two == pytest.approx(np.mean(np.abs(taus) >= abs(observed) - 1e-12))
    assert 0 < one < two < 1


def test_random_permutation_p_values_beyond_the_exact_limit():
    """Past `max_exact`, seeded random assignments estimate the exact p-values ((1 + hits) / (1 + draws)), the same
    for the same seed. 8 methods (8! = 40,320 assignments, more than the 20,000 draws, so they are not all drawn)."""
    x, y = [1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 3, 5, 4, 6, 8, 7]
    exact_one, exact_two, how = report.permutation_p_values(x, y)
    assert how == "exact" and 0 < exact_one < exact_two < 0.05
    one, two, how = report.permutation_p_values(x, y, max_exact=3, draws=20_000, seed=1)
    assert how == "20,000 random permutations"
    assert one == pytest.approx(exact_one, abs=0.002) and two == pytest.approx(exact_two, abs=0.003)
    assert (one, two, how) == report.permutation_p_values(x, y, 3, 20_000, 1)
    assert (one, two) != report.permutation_p_values(x, y, 3, 20_000, 2)[:2]


# --- cross-model table and rank agreement ---------------------------------------------------------------------------


def test_cross_model_frame_keeps_labels_both_models_have():
    a = _frame({"taylor": 30.0, "flap": 25.0, "random": 60.0, "only-a": 40.0}, zs_avg=[0.5, 0.6, 0.4, 0.45])
    b = _frame({"flap": 35.0, "taylor": 33.0, "random": 90.0, "only-b": 50.0}, dense=25.0)
    cross = report.cross_model_frame({"m-a": a, "m-b": b})
    assert set(cross.method) == {"dense", "taylor", "flap", "random"}
    assert {"ppl (m-a)", "ppl (m-b)", "zs_avg (m-a)", "achieved (m-b)"} <= set(cross.columns)
    assert "zs_avg (m-b)" not in cross  # a column only the frame that has it gets
    row = cross.set_index("method").loc["flap"]
    assert (row["ppl (m-a)"], row["ppl (m-b)"], row["zs_avg (m-a)"]) == (25.0, 35.0, 0.6)
    with pytest.raises(ValueError, match="two or more"):
        report.cross_model_frame({"m-a": a})


def test_cross_model_frame_aggregates_seeds():
    a = pd.concat(
        [_frame({"fms": 30.0, "flap": 25.0}).assign(seed=0), _frame({"fms": 34.0}, dense=None).assign(seed=1)]
    )
    b = _frame({"fms": 40.0, "flap": 35.0})
    row = report.cross_model_frame({"a": a, "b": b}).set_index("method").loc["fms"]
    assert row["ppl (a)"] == pytest.approx(32.0)
    assert row["ppl_std (a)"] == pytest.approx(np.std([30.0, 34.0], ddof=1))
    assert row["n_seeds (a)"] == 2


def test_rank_agreement_per_sparsity_without_dense():
    a = pd.concat(
        [
            _frame({"m1": 10.0, "m2": 20.0, "m3": 30.0, "m4": 40.0, "only-a": 1.0}, sparsity=0.1),
            _frame({"m1": 10.0, "m2": 20.0, "m3": 30.0, "m4": 40.0}, sparsity=0.5, dense=None),
        ]
    )
    b = pd.concat(
        [
            _frame({"m1": 11.0, "m2": 21.0, "m3": 31.0, "m4": 41.0}, sparsity=0.1, dense=5.0),
            _frame({"m1": 44.0, "m2": 33.0, "m3": 22.0, "m4": 11.0}, sparsity=0.5, dense=None),
        ]
    )
    cross = report.cross_model_frame({"a": a, "b": b})
    agreement = report.rank_agreement(cross).set_index("sparsity")
    assert list(agreement.index) == [0.1, 0.5]  # no row for the dense model
    assert list(agreement.n_methods) == [4, 4]  # only-a dropped, dense excluded
    # the dense row is no method even where it shares a sparsity with them
    cross.loc[cross.method == "dense", "sparsity"] = 0.1
    assert report.rank_agreement(cross).n_methods.tolist() == [4, 4]
    assert list(agreement.kendall_tau_b) == [1.0, -1.0]
    assert agreement.loc[0.1, ["p_one_sided", "p_two_sided"]].tolist() == pytest.approx([1 / 24, 2 / 24])
    assert (agreement.model_a == "a").all() and (agreement.model_b == "b").all()
    text = report.rank_agreement_markdown(agreement.reset_index())
    assert "10% removed, tau = 1.00 over 4 methods (one-sided p = 0.0417, exact)" in text
    assert "50% removed, tau = -1.00 over 4 methods (one-sided p = 1, exact)" in text


def test_rank_agreement_on_zero_shot_skips_unmeasured_methods():
    a = _frame({"m1": 10.0, "m2": 20.0, "m3": 30.0}, zs_avg=[0.6, 0.5, math.nan])
    b = _frame({"m1": 12.0, "m2": 22.0, "m3": 32.0}, zs_avg=[0.4, 0.7, 0.3])
    agreement = report.rank_agreement(report.cross_model_frame({"a": a, "b": b}), metric="zs_avg")
    assert agreement.n_methods.tolist() == [2]
    assert agreement.kendall_tau_b.tolist() == [-1.0]
    empty = report.rank_agreement(report.cross_model_frame({"a": _frame({"m1": 1.0}), "b": _frame({"m2": 1.0})}))
    assert empty.empty
    assert "no rank correlation" in report.rank_agreement_markdown(empty)


def _with_ranges(df: pd.DataFrame, ranges: dict) -> pd.DataFrame:
    """`df` with bootstrap bounds (lo, hi) per method label from `ranges` (NaN elsewhere)."""
    df = df.copy()
    df["ppl_ci95_lo"] = df["method"].map(lambda m: ranges.get(m, (np.nan, np.nan))[0])
    df["ppl_ci95_hi"] = df["method"].map(lambda m: ranges.get(m, (np.nan, np.nan))[1])
    return df


def test_cross_model_orders_every_verdict_by_hand():
    # model a: flap [24, 26] < taylor [27, 29] < random [50, 70]; bonsai [25, 30] overlaps flap and taylor
    a = _with_ranges(
        _frame({"flap": 25.0, "taylor": 28.0, "bonsai": 27.5, "random": 60.0}),
        {"flap": (24, 26), "taylor": (27, 29), "bonsai": (25, 30), "random": (50, 70)},
    )
    # model b: taylor [30, 32] < flap [33, 36]: the opposite way; bonsai [31, 34] overlaps both; random far above
    b = _with_ranges(
        _frame({"flap": 34.0, "taylor": 31.0, "bonsai": 32.0, "random": 90.0}),
        {"flap": (33, 36), "taylor": (30, 32), "bonsai": (31, 34), "random": (80, 100)},
    )
    orders = report.cross_model_orders(report.cross_model_frame({"a": a, "b": b}), ["a", "b"])
    verdicts = {(r.better, r.worse): r.verdict for r in orders.itertuples()}
    assert verdicts == {
        ("flap", "bonsai"): "neither separates",
        ("flap", "taylor"): "opposite orders",
        ("flap", "random"): "same order on both",
        ("bonsai", "taylor"): "neither separates",
        ("bonsai", "random"): "same order on both",
        ("taylor", "random"): "same order on both",
    }
    assert orders["min_seeds"].tolist() == [1] * 6
    text = report.cross_model_orders_markdown(orders)
    assert "20% removed, 6 pairs: 3 same order on both, 2 neither separates, 1 opposite orders" in text
    assert "(opposite: flap vs taylor)" in text


def test_cross_model_orders_one_model_separates_and_point_values_only():
    a = _with_ranges(_frame({"flap": 25.0, "taylor": 28.0}), {"flap": (24, 26), "taylor": (27, 29)})
    b = _with_ranges(_frame({"flap": 30.0, "taylor": 31.0}), {"flap": (28, 33), "taylor": (29, 34)})
    orders = report.cross_model_orders(report.cross_model_frame({"a": a, "b": b}), ["a", "b"])
    assert orders.verdict.tolist() == ["only a separates"]
    # without intervals a point value is its own range: any difference separates, equal values do not
    c, d = _frame({"flap": 25.0, "taylor": 25.0}), _frame({"flap": 30.0, "taylor": 31.0})
    orders = report.cross_model_orders(report.cross_model_frame({"c": c, "d": d}), ["c", "d"])
    assert orders.verdict.tolist() == ["only d separates"]
    assert (orders.better.tolist(), orders.worse.tolist()) == (["flap"], ["taylor"])  # the tie broken by model d
    with pytest.raises(ValueError, match="two models"):
        report.cross_model_orders(report.cross_model_frame({"c": c, "d": d}), ["c"])
    empty = report.cross_model_orders(report.cross_model_frame({"c": c, "d": _frame({})}), ["c", "d"])
    assert empty.empty and "no pairwise conclusions" in report.cross_model_orders_markdown(empty)


# --- figure ---------------------------------------------------------------------------------------------------------


def test_plot_cross_model_one_panel_and_legend_per_sparsity():
    import matplotlib.pyplot as plt

    methods, reversed_order = (
        {"taylor": 30.0, "flap": 25.0, "bonsai": 28.0},
        {"taylor": 25.0, "flap": 30.0, "bonsai": 28.0},
    )
    a = pd.concat([_frame(methods, sparsity=s, dense=20.0 if s == 0.1 else None) for s in (0.1, 0.2, 0.5)])
    b = pd.concat([_frame(methods, sparsity=0.1, dense=25.0), _frame(reversed_order, sparsity=0.2, dense=None)])
    b["ppl_ci95_lo"], b["ppl_ci95_hi"] = b["ppl"] * 0.9, b["ppl"] * 1.1
    cross = report.cross_model_frame({"a": a, "b": b})
    fig = report.plot_cross_model(cross, ["a", "b"], title="t")
    assert isinstance(fig, plt.Figure)
    assert len(fig.axes) == 2  # 10% and 20%: the sparsity only model a has gets no panel
    for ax in fig.axes:
        assert ax.get_legend() is not None
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert set(labels) == {"taylor", "flap", "bonsai", "dense"}
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert all(c.has_yerr and not c.has_xerr for c in ax.containers)  # only model b has intervals
    assert [ax.get_title() for ax in fig.axes] == [
        "10% removed: Kendall tau-b 1.00 over 3 methods",
        "20% removed: Kendall tau-b -1.00 over 3 methods",
    ]
    plt.close(fig)
    with pytest.raises(ValueError, match="two models"):
        report.plot_cross_model(cross, ["a"])


# --- notebook 01 ----------------------------------------------------------------------------------------------------


def _cross_model_cells() -> list[str]:
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO_ROOT / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cells = module.NOTEBOOKS["01_accuracy_vs_sparsity.ipynb"]
    start = next(i for i, c in enumerate(cells) if c.cell_type == "code" and "cpu-full-gemma3" in c.source)
    return [cells[start].source, cells[start + 1].source]


def _run_cells(namespace: dict) -> None:
    """Run notebook 01's cross-model cells in `namespace`, as the kernel would after the cells before them."""
    for source in _cross_model_cells():
        exec(source, namespace)  # noqa: S102 (the notebook's own cells, from scripts/make_notebooks.py)


def _record(label: str, sparsity: float, ppl: float) -> dict:
    return {"config": {"label": label, "method": label, "sparsity": sparsity}, "metrics": {"perplexity": {"ppl": ppl}}}


@pytest.mark.parametrize("computed", [False, True])
def test_notebook_cells_with_and_without_the_second_model(tmp_path, capsys, computed):
    records = [_record("dense", 0.0, 30.0), _record("flap", 0.2, 40.0), _record("taylor", 0.2, 45.0)]
    experiments = SimpleNamespace(
        collect=lambda profile, experiment: records if computed and profile == "cpu-full-gemma3" else [],
        load_profile=lambda profile: {"model": "gemma3-270m"},
    )
    shown = []
    namespace = {
        "profile": "cpu-full",
        "cfg": {"model": "smollm2-135m"},
        "out": tmp_path,
        "df": _frame({"flap": 25.0, "taylor": 28.0, "random": 60.0}),
        "experiments": experiments,
        "report": report,
        "display": shown.append,
        "Markdown": str,
    }
    _run_cells(namespace)
    written = sorted(p.name for p in tmp_path.glob("cross_model*"))
    if computed:
        assert written == [
            f"cross_model{s}" for s in (".csv", ".md", ".pdf", ".png", "_orders.csv", "_orders.md", "_tau.csv", "_tau.md")
        ]
        assert "tau = 1.00 over 2 methods" in shown[-3]
        assert "20% removed, 1 pair: 1 same order on both." in shown[-2]
        assert capsys.readouterr().out == ""
    else:
        assert written == []
        assert "python -m minillm experiment accuracy --profile cpu-full-gemma3" in capsys.readouterr().out
    namespace["profile"] = "cpu"
    shown.clear()
    _run_cells(namespace)
    assert shown == [] and capsys.readouterr().out.count("\n") == 1
