"""Bonsai: sampling, antithetic complements, regression on planted importances, global removal, families."""

import pytest
import torch

import minillm
from minillm.scores.bonsai import expand_masks, fit_regression, kendall_tau, make_module, sample_masks, select_removals


def _modules(p=0.2):
    gen = torch.Generator().manual_seed(0)
    return [
        make_module(0, "attention", torch.rand(6, generator=gen, dtype=torch.float64), 100, p),
        make_module(0, "mlp", torch.rand(40, generator=gen, dtype=torch.float64), 3, p),
        make_module(1, "mlp", torch.rand(40, generator=gen, dtype=torch.float64), 3, p),
    ]


def test_frozen_units_are_the_top_prior_and_never_candidates():
    mods = _modules(0.2)
    for m in mods:
        n_frozen = int(m.n_units * 0.6)
        assert int(m.frozen.sum()) == n_frozen
        top = torch.argsort(m.prior, descending=True)[:n_frozen]
        assert set(top.tolist()) == set(m.frozen.nonzero().flatten().tolist())
        assert (m.drop_prob[m.frozen] == 0).all() and m.drop_prob.sum() == pytest.approx(1.0)


def test_antithetic_complement_flips_exactly_the_candidates():
    mods = _modules()
    x = sample_masks(mods, 10, 0.2, torch.Generator().manual_seed(1))
    for k in range(0, 10, 2):
        assert torch.equal(x[k + 1], 1 - x[k])
        a_att, a_mlp = expand_masks(mods, x[k])
        b_att, b_mlp = expand_masks(mods, x[k + 1])
        for m in mods:
            a = (a_att if m.kind == "attention" else a_mlp)[m.layer]
            b = (b_att if m.kind == "attention" else b_mlp)[m.layer]
            assert (a[m.frozen] == 1).all() and (b[m.frozen] == 1).all()
            cand = m.candidates
            assert torch.equal(a[cand], 1 - b[cand])
    # each draw drops floor(p N) + 1 candidates per module
    offset = 0
    for m in mods:
        n = m.candidates.numel()
        assert int((x[0, offset : offset + n] == 0).sum()) == int(0.2 * m.n_units) + 1
        offset += n


def test_regression_ranks_planted_units_on_top():
    """Synthetic objective evaluated on the *expanded* per-unit masks (what the model would see): only planted
    units matter. If features and masks were misaligned, the planted units would not come out on top."""
    mods = _modules(0.25)
    planted = {
        (0, "mlp", int(mods[1].candidates[3])): 5.0,
        (1, "mlp", int(mods[2].candidates[0])): 4.0,
        (0, "attention", int(mods[0].candidates[1])): 3.0,
    }
    gen = torch.Generator().manual_seed(2)
    x = sample_masks(mods, 120, 0.25, gen)
    ys = []
    for row in x:
        att, mlp = expand_masks(mods, row)
        y = sum(w * float((att if kind == "attention" else mlp)[layer][u]) for (layer, kind, u), w in planted.items())
        ys.append(y + 0.05 * float(torch.randn(1, generator=gen)))
    beta, info = fit_regression(x, torch.tensor(ys))
    assert info["cv_kendall_tau"] > 0.5
    offset, flat = 0, []
    for m in mods:
        for j, u in enumerate(m.candidates.tolist()):
            flat.append(((m.layer, m.kind, u), float(beta[offset + j])))
        offset += m.candidates.numel()
    top = [key for key, _ in sorted(flat, key=lambda e: -e[1])[:3]]
    assert set(top) == set(planted)
    # and the planted units are the last to be removed under a budget
    removed = select_removals(mods, beta, budget=60)
    assert not set(removed) & set(planted)


def test_kendall_tau():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(kendall_tau(y, y)) == pytest.approx(12 / 12)
    assert float(kendall_tau(-y, y)) == pytest.approx(-1.0)


def test_select_removals_respects_budget():
    mods = _modules()
    beta = torch.arange(sum(m.candidates.numel() for m in mods), dtype=torch.float64)
    chosen = select_removals(mods, beta, budget=110)
    cost = {"attention": 100, "mlp": 3}
    assert sum(cost[k] for _, k, _ in chosen) <= 110


def test_last_round_fills_its_budget_past_a_unit_that_does_not_fit():
    """An attention unit (cost 100) lowest in beta stops the official prefix rule at once with a budget of 60; the
    last round (`fill`) passes over it and spends the budget on channels (cost 3), lowest beta first."""
    mods = _modules()
    n = sum(m.candidates.numel() for m in mods)
    beta = torch.arange(n, dtype=torch.float64)  # the attention candidates come first, so they are the lowest
    assert select_removals(mods, beta, budget=60) == []
    chosen = select_removals(mods, beta, budget=60, fill=True)
    assert [k for _, k, _ in chosen] == ["mlp"] * 20
    keys = [(m.layer, m.kind, u) for m in mods for u in m.candidates.tolist()]
    assert chosen == [k for k in keys if k[1] == "mlp"][:20]


def _calib():
    return torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_bonsai_end_to_end_on_families(tiny, tokens, tmp_path, name):
    model = tiny(name)
    plan = minillm.prune(model, "bonsai", 0.4, _calib(), masks_per_round=8, prune_frac=0.1, progress=False)
    round_tol = 0.1
    assert abs(plan.achieved_sparsity - 0.4) <= round_tol and plan.achieved_sparsity <= 0.4 + 1e-9
    assert len(plan.history) >= 3 and all("cv_kendall_tau" in h for h in plan.history)
    minillm.save_pruned(model, plan, tmp_path / "p")
    again, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_bonsai_is_deterministic_and_non_uniform(tiny):
    a = minillm.prune(
        tiny("tiny-opt"), "bonsai", 0.5, _calib(), masks_per_round=8, prune_frac=0.1, seed=3, progress=False
    )
    b = minillm.prune(
        tiny("tiny-opt"), "bonsai", 0.5, _calib(), masks_per_round=8, prune_frac=0.1, seed=3, progress=False
    )
    assert a.layers == b.layers
    widths = [w["channels"] for w in a.widths()]
    assert len(set(widths)) > 1, "global removal should give non-uniform per-layer widths"


def test_bonsai_can_remove_whole_modules(tiny, tokens, tmp_path):
    model = tiny("tiny-bloom")
    plan = minillm.prune(model, "bonsai", 0.7, _calib(), masks_per_round=8, prune_frac=0.2, seed=1, progress=False)
    assert any(w["query_heads"] == 0 for w in plan.widths()), plan.widths()
    minillm.save_pruned(model, plan, tmp_path / "p")
    again, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_bonsai_rejects_bad_options(tiny):
    with pytest.raises(ValueError, match="even number"):
        minillm.prune(tiny("tiny-llama"), "bonsai", 0.3, _calib(), masks_per_round=7)
    with pytest.raises(ValueError, match="prior must be one of"):
        minillm.prune(tiny("tiny-llama"), "bonsai", 0.3, _calib(), prior="fluctuation")


def test_regression_with_too_few_samples_for_cross_validation():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    beta, info = fit_regression(x, torch.tensor([1.0, 0.0]), "lasso")
    assert beta[0] > beta[1] and info["lambda_factor"] == 0.0
    beta, info = fit_regression(x, torch.tensor([1.0, 0.0]), "adam")
    assert beta[0] > beta[1] and info["reg_weight"] == 0.0 and info["cv_kendall_tau_all"] == []
    with pytest.raises(ValueError, match="regression must be one of"):
        fit_regression(x, torch.tensor([1.0, 0.0]), "ridge")


def test_ties_in_beta_are_broken_by_the_prior_not_by_position():
    """Equal coefficients (the lasso's exact zeros): the lowest prior goes first, whatever its layer."""
    gen = torch.Generator().manual_seed(0)
    mods = [make_module(layer, "mlp", torch.rand(40, generator=gen, dtype=torch.float64), 3, 0.25) for layer in range(4)]
    beta = torch.zeros(sum(m.candidates.numel() for m in mods), dtype=torch.float64)
    chosen = select_removals(mods, beta, budget=3 * 12)
    priors = sorted((float(m.prior[u]), m.layer, u) for m in mods for u in m.candidates.tolist())
    assert sorted(chosen) == sorted((layer, "mlp", u) for _, layer, u in priors[:12])
    assert len({layer for layer, _, _ in chosen}) > 1
