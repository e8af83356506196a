"""The structured-OBS method (`obs`): its greedy order against brute force, its cumulative error against the refit's
error computed directly, and the method end to end (default refit, options, allocation)."""

from __future__ import annotations

import itertools

import pytest
import torch

import minillm
from minillm.scores.obs import greedy_removal


def _problem(m=5, d=8, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = torch.randn(m, d, generator=g, dtype=torch.float64)
    return w, x.T @ x / n


def _refit_error(w, h, ridge, removed_cols):
    """min over W' with W'[:, removed] = 0 of tr((W - W') H_lambda (W - W')^T), solved directly."""
    d = h.shape[0]
    hl = h + ridge * h.diagonal().mean() * torch.eye(d, dtype=h.dtype)  # the relative ridge of obs
    kept = [j for j in range(d) if j not in set(removed_cols)]
    if not kept:
        return float((w @ hl * w).sum())
    r, s = list(removed_cols), kept
    # W'_S = W_S + W_R H_RS H_SS^-1: the error left is W_R (H_RR - H_RS H_SS^-1 H_SR) W_R^T
    schur = hl[r][:, r] - hl[r][:, s] @ torch.linalg.solve(hl[s][:, s], hl[s][:, r])
    return float((w[:, r] @ schur * w[:, r]).sum())


@pytest.mark.parametrize("width", [1, 2])
def test_cumulative_error_is_the_refit_error(width):
    w, h = _problem()
    blocks = torch.arange(8).reshape(-1, width)
    order, cumulative = greedy_removal(w, h, blocks, ridge=1e-2, batches=blocks.shape[0])
    assert sorted(order) == list(range(blocks.shape[0]))
    for k in range(1, len(order) + 1):
        cols = blocks[order[:k]].reshape(-1).tolist()
        assert float(cumulative[order[k - 1]]) == pytest.approx(_refit_error(w, h, 1e-2, cols), rel=1e-6, abs=1e-9)
    assert all(cumulative[a] <= cumulative[b] for a, b in itertools.pairwise(order))  # monotone along the order


def test_greedy_order_matches_brute_force():
    w, h = _problem(seed=3)
    blocks = torch.arange(8)[:, None]
    order, _ = greedy_removal(w, h, blocks, ridge=1e-3, batches=8)
    removed: list[int] = []
    for step in range(8):
        best = min(
            (u for u in range(8) if u not in removed), key=lambda u: _refit_error(w, h, 1e-3, removed + [u])
        )
        assert order[step] == best, f"step {step}"
        removed.append(best)


def test_batches_cover_every_unit_once():
    w, h = _problem(m=4, d=12, seed=1)
    order, cumulative = greedy_removal(w, h, torch.arange(12)[:, None], batches=3)
    assert sorted(order) == list(range(12))
    assert (cumulative >= 0).all()
    assert all(cumulative[a] <= cumulative[b] + 1e-12 for a, b in itertools.pairwise(order))


def test_correlated_column_is_cheap_to_remove():
    """A column that is a copy of another costs nothing under the refit (the copy takes over), while its plain
    variance is as large as any: the point of scoring by the conditional variance."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], 1)  # column 4 duplicates column 0
    w = torch.ones(3, 5, dtype=torch.float64)
    order, cumulative = greedy_removal(w, x.T @ x / 200, torch.arange(5)[:, None], ridge=1e-8, batches=5)
    assert order[0] in (0, 4) and float(cumulative[order[0]]) < 1e-5


def test_obs_prunes_with_its_refit(tiny):
    model = tiny("tiny-llama-gqa")
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = minillm.prune(model, "obs", 0.3, calib, progress=False)
    assert plan.options["reconstruct"]["mode"] == "dense" and plan.options["compensate_bias"] is False
    assert plan.options["allocation"] == "global"
    assert abs(plan.achieved_sparsity - 0.3) < 0.05
    assert "reconstruct_time_s" in plan.history[-1]


def _count_passes(monkeypatch):
    """Count the capture passes (one per pass over the calibration tokens) of the scores and of the refit."""
    import minillm.reconstruct as rec
    import minillm.scores.obs as obs

    passes = {"scores": 0, "refit": 0}

    def counting(module, key):
        real = module.capture_layer_calls

        def wrapper(*args, **kwargs):
            passes[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "capture_layer_calls", wrapper)

    counting(obs, "scores")
    counting(rec, "refit")
    return passes


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-gemma3", "tiny-opt"])
def test_dense_refit_reuses_the_moments_of_the_scores(tiny, tokens, monkeypatch, name):
    """The dense refit after obs's scores uses the moments the scores computed, with no pass of its own, and writes
    exactly the weights that its own pass gives; over the byte limit it makes that pass. Through `minillm.score`, the
    Scores carry the moments to `prune(scores=...)`."""
    import minillm.scores.obs as obs

    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    passes = _count_passes(monkeypatch)
    kept = tiny(name)
    minillm.prune(kept, "obs", 0.4, calib, progress=False)
    assert passes == {"scores": 1, "refit": 0}

    monkeypatch.setattr(obs, "KEEP_MOMENTS_MAX_BYTES", 0)
    own = tiny(name)
    minillm.prune(own, "obs", 0.4, calib, progress=False)
    assert passes == {"scores": 2, "refit": 1}
    monkeypatch.undo()

    passes = _count_passes(monkeypatch)
    via = tiny(name)
    scores = minillm.score(via, "obs", calib, progress=False)
    assert scores.moments and all(m.xx.dtype == torch.float64 for m in scores.moments.values())
    minillm.prune(via, "obs", 0.4, calib, scores=scores, progress=False)
    assert passes == {"scores": 1, "refit": 0}
    with torch.no_grad():
        reference = own(tokens).logits
        assert torch.equal(kept(tokens).logits, reference) and torch.equal(via(tokens).logits, reference)


def test_moments_are_kept_only_for_a_dense_refit(tiny, monkeypatch):
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    passes = _count_passes(monkeypatch)
    minillm.prune(tiny("tiny-llama-gqa"), "obs", 0.4, calib, reconstruct="sequential", progress=False)
    assert passes == {"scores": 1, "refit": 1}
    assert not minillm.score(tiny("tiny-llama-gqa"), "flap", calib, progress=False).moments


def test_obs_without_its_refit_and_uniform(tiny):
    model = tiny("tiny-llama-gqa")
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = minillm.prune(
        model, "obs", 0.3, calib, progress=False, reconstruct="none", allocation="uniform", normalize="none"
    )
    assert plan.options["reconstruct"] is None and plan.options["normalize"] == "none"


@pytest.mark.parametrize(
    "option", [{"normalize": "layer"}, {"form": "raw"}, {"ridge": -1.0}, {"ridge": float("inf")}, {"batches": 0}]
)
def test_obs_refuses_bad_options(tiny, option):
    model = tiny("tiny-llama-gqa")
    calib = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        minillm.prune(model, "obs", 0.3, calib, progress=False, **option)


def test_flap_budget_keeps_flaps_layer_widths_with_the_obs_order(tiny):
    """budget='flap': every layer keeps as many KV groups and channels as FLAP keeps (FLAP's global standardised
    ranking sets the widths), and within a layer the units that go are the first of the greedy OBS order."""
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    flap_model, obs_model = tiny("tiny-llama-gqa"), tiny("tiny-llama-gqa")
    flap_plan = minillm.prune(flap_model, "flap", 0.4, calib, progress=False)
    scores = minillm.score(obs_model, "obs", calib, progress=False, budget="flap")
    obs_plan = minillm.prune(obs_model, "obs", 0.4, calib, progress=False, scores=scores)
    assert [len(k.kept_kv_heads) for k in obs_plan.layers] == [len(k.kept_kv_heads) for k in flap_plan.layers]
    assert [len(k.kept_channels) for k in obs_plan.layers] == [len(k.kept_channels) for k in flap_plan.layers]
    assert [k.kept_channels for k in obs_plan.layers] != [k.kept_channels for k in flap_plan.layers]


def test_cli_gives_obs_its_default_calibration_within_the_models_positions(tmp_path, capsys):
    """`prune --method obs` with no calibration flags: the method's 32 windows, of 512 tokens or of the model's
    positions where it reads fewer (tiny-llama-gqa: 256), and its refit."""
    import json

    from minillm.__main__ import main

    out = tmp_path / "obs"
    assert main(["prune", "--model", "tiny-llama-gqa", "--method", "obs", "--sparsity", "0.3", "--out", str(out)]) == 0
    plan = json.loads((out / "pruning.json").read_text())
    text = json.dumps(plan)
    assert '"n_samples": 32' in text and '"seqlen": 256' in text and '"mode": "dense"' in text
    rc = main(["prune", "--model", "tiny-llama-gqa", "--method", "obs", "--sparsity", "0.3", "--calib-seqlen", "512",
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "--calib-seqlen 512 must be between 2" in capsys.readouterr().err


def test_depth_schedule_is_slimgpts_log_increasing_ratio():
    """SlimGPT's README prunes 20% overall with a log-increasing ratio from 0.0625 (first layer) to 0.25 (last): on
    LLaMA-7B's 32 layers that schedule averages 20%."""
    from minillm.scores.obs import depth_schedule

    ratios = [0.25 * r for r in depth_schedule(32)]
    assert ratios[0] == pytest.approx(0.0625) and ratios[-1] == pytest.approx(0.25)
    assert all(a < b for a, b in itertools.pairwise(ratios))
    assert sum(ratios) / 32 == pytest.approx(0.20, abs=0.002)


def test_depth_budget_removes_more_of_the_deeper_layers(tiny):
    """budget='depth': each layer loses a fraction of its MLP channels proportional to the schedule (3 layers: 0.25,
    0.72, 1 relative), scaled by one threshold to the sparsity asked for."""
    from minillm.scores.obs import depth_schedule

    model = tiny("tiny-llama-gqa")
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = minillm.prune(model, "obs", 0.3, calib, progress=False, budget="depth")
    assert abs(plan.achieved_sparsity - 0.3) < 0.05
    n = model.config.intermediate_size
    removed = [1 - len(k.kept_channels) / n for k in plan.layers]
    assert all(a < b for a, b in itertools.pairwise(removed)), removed
    for got, rel in zip(removed, depth_schedule(len(removed))):
        assert got == pytest.approx(removed[-1] * rel, abs=1.5 / n + 0.02), (removed, rel)


def test_ordered_blocks_skip_the_reordering_and_give_the_same_greedy():
    """ordered=True (the stock projections' blocks, 0 ... d-1 in order) only drops the reordered copy of the inverse;
    blocks that do not cover every column are refused in that mode."""
    w, h = _problem(m=4, d=12, seed=2)
    blocks = torch.arange(12).reshape(4, 3)
    a = greedy_removal(w, h, blocks, batches=2)
    b = greedy_removal(w, h, blocks, batches=2, ordered=True)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="cover all 12 columns"):
        greedy_removal(w, h, torch.arange(9).reshape(3, 3), ordered=True)


def test_block_costs_are_right_after_torch_set_num_threads_2():
    """torch 2.13's batched LU on CPU fails or returns wrong values for 192-wide blocks once torch.set_num_threads(2)
    has been called (Bonsai calls it); the block costs use a batched Cholesky solve and match one solve per block."""
    from minillm.scores.obs import _block_costs

    g = torch.Generator().manual_seed(0)
    d, width = 3 * 192, 192
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    hinv = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    w = torch.randn(64, d, dtype=torch.float64, generator=g)
    idx = torch.arange(d).reshape(3, width)
    expected = torch.stack([(w[:, b] @ torch.linalg.inv(hinv[b][:, b]) * w[:, b]).sum() for b in idx])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _block_costs(w, hinv, idx)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(got, expected, rtol=1e-10)
