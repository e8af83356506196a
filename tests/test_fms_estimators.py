"""FMS in low precision, and the forward-only estimators beside SPSA (`fms` option `estimator`)."""

import copy

import pytest
import torch

import minillm
from minillm.artifact.diagnostics import spearman


def _calib(n=4, t=16, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _flat(scores):
    return torch.cat([torch.cat([s.attention.double(), s.channels.double()]) for s in scores])


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- precision -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_estimate_of_a_low_precision_copy_follows_fp32(tiny, dtype):
    """Pure |dL/dgate| (combination='taylor'), 64 queries, same seeds: the bf16 / fp16 copy's unit scores must rank
    like the fp32 model's. Computing the perturbed forward passes in the model's dtype gave Spearman -0.04 (bf16)
    and 0.57 (fp16) here, because 1 + 1e-3 z rounds to 1 in bf16 and the product is rounded away in the residual
    sum; fp32 arithmetic on the rounded weights gives 0.997, the same as the fp32 model evaluated at the rounded
    weights (the rounding of the weights themselves is all that is left). Threshold 0.95: well above both failures,
    well below the 0.997 measured."""
    calib = _calib(8, 16)
    opts = dict(queries=64, space="gates", combination="taylor", progress=False)
    model = tiny("tiny-llama")
    reference = _flat(minillm.score(model, "fms", calib, **opts))
    low = copy.deepcopy(model).to(dtype)
    before = _snapshot(low)
    got = _flat(minillm.score(low, "fms", calib, **opts))
    assert all(torch.equal(before[k], v) for k, v in low.state_dict().items())
    assert all(v.dtype == dtype for v in low.state_dict().values() if v.is_floating_point())
    assert spearman(got, reference) >= 0.95
    native = _flat(minillm.score(low, "fms", calib, precision="native", **opts))
    if dtype == torch.bfloat16:  # the failure this guards against
        assert spearman(native, reference) < 0.5


# --- estimators --------------------------------------------------------------------------------------------------

ESTIMATORS = [
    ("ablation", {"estimator": "ablation", "shortlist": 0.5, "batch_tokens": 256}),
    ("allocation", {"estimator": "allocation", "queries": 16, "eps": 1e-2}),
]


@pytest.mark.parametrize("label,opts", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_estimator_is_deterministic_and_leaves_weights_bit_identical(tiny, label, opts, allocation):
    calib = _calib()
    model = tiny("tiny-llama-gqa3")
    before = _snapshot(model)
    scores = minillm.score(model, "fms", calib, progress=False, **opts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = minillm.score(model, "fms", calib, progress=False, **opts)
    assert torch.equal(_flat(scores), _flat(again))
    a = minillm.prune(tiny("tiny-llama-gqa3"), "fms", 0.3, calib, allocation=allocation, progress=False, **opts)
    b = minillm.prune(tiny("tiny-llama-gqa3"), "fms", 0.3, calib, allocation=allocation, progress=False, **opts)
    assert a.layers == b.layers
    assert a.options["estimator"] == label


@pytest.mark.parametrize("label,opts", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-bloom"])
def test_estimator_streamed_equals_in_memory(tiny, name, label, opts):
    calib = _calib()
    a = minillm.prune(tiny(name), "fms", 0.3, calib, allocation="global", progress=False, **opts)
    b = minillm.prune(tiny(name), "fms", 0.3, calib, allocation="global", progress=False, stream_device="cpu", **opts)
    assert a.layers == b.layers


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_ablation_scores_are_the_measured_loss_changes(tiny, name):
    """Every measured unit's score is the loss change of removing it alone, measured here on the whole model with
    VirtualMasks (no cached layers, no batching of ablations): equal to float precision, Spearman >= 0.99 over all
    attention units and the shortlisted channels; unmeasured channels rank above the measured ones."""
    from minillm.adapters import get_adapter
    from minillm.scores.common import ScoringContext, calibration_loss
    from minillm.surgery import VirtualMasks

    calib = _calib()
    model = tiny(name)
    scores = minillm.score(model, "fms", calib, estimator="ablation", shortlist=0.25, batch_tokens=200, progress=False)
    adapter = get_adapter(model)
    ctx = ScoringContext(model, adapter, calib, progress=False)
    base = calibration_loss(ctx)
    ours, measured = [], []
    for i, layer in enumerate(adapter.layers()):
        shape, unit = adapter.attention_shape(layer), ctx.unit(layer)
        g = shape.group_size if unit == "kv_group" else 1
        for u in range(len(scores[i].attention)):
            mask = torch.ones(shape.n_query_heads)
            mask[u * g : (u + 1) * g] = 0
            with VirtualMasks(adapter, {i: mask}, {}):
                measured.append(calibration_loss(ctx) - base)
            ours.append(float(scores[i].attention[u]))
        n = adapter.n_channels(layer)
        k = -(-n // 4)
        order = torch.argsort(scores[i].channels, stable=True)
        for c in order[:k].tolist():
            mask = torch.ones(n)
            mask[c] = 0
            with VirtualMasks(adapter, {}, {i: mask}):
                measured.append(calibration_loss(ctx) - base)
            ours.append(float(scores[i].channels[c]))
        assert float(scores[i].channels[order[k:]].min()) > float(scores[i].channels[order[:k]].max())
    ours, measured = torch.tensor(ours), torch.tensor(measured)
    assert torch.allclose(ours, measured, atol=5e-6)
    assert spearman(ours, measured) >= 0.99


def test_allocation_estimates_the_block_gate_gradient(tiny):
    """With n = 128 queries for d = 6 block gates the SPSA estimate must point along the backprop gradient of the
    block gates (expected cosine about sqrt(128 / 134) = 0.98): cosine >= 0.9, and the unit scores must be
    |g_block| x the unit's share of its block's prior."""
    from minillm.adapters import get_adapter
    from minillm.artifact.diagnostics import cosine
    from minillm.scores.common import ScoringContext, calibration_loss, lm_loss
    from minillm.scores.fms_estimators import BlockGateSpace
    from minillm.scores.spsa import estimate
    from minillm.surgery import VirtualMasks

    calib = _calib(8, 16)
    model = tiny("tiny-llama")
    adapter = get_adapter(model)
    gates = [torch.ones(2, requires_grad=True) for _ in adapter.layers()]
    heads = {i: g[0].expand(4) for i, g in enumerate(gates)}
    chans = {i: g[1].expand(48) for i, g in enumerate(gates)}
    with VirtualMasks(adapter, heads, chans):
        lm_loss(model, calib).backward()
    true = torch.cat([g.grad for g in gates])
    ctx = ScoringContext(model, adapter, calib, progress=False)
    space = BlockGateSpace(adapter)
    est = estimate(space, lambda: calibration_loss(ctx), 128, 1e-2, seed=0, progress=False)
    got = torch.cat([est.gradient(space, b) for b in range(3)])
    assert cosine(got, true) >= 0.9
    scores = minillm.score(model, "fms", calib, estimator="allocation", queries=128, eps=1e-2, progress=False)
    prior = minillm.score(model, "fms", calib, estimator="ablation", shortlist=0.0, progress=False)  # channels: prior
    for i, s in enumerate(scores):
        assert float(s.channels.sum()) == pytest.approx(abs(float(got[2 * i + 1])), rel=1e-6)
        assert spearman(s.channels, prior[i].channels) == pytest.approx(1.0)


def test_estimator_options_are_checked(tiny):
    with pytest.raises(ValueError, match="estimator must be one of"):
        minillm.score(tiny("tiny-llama"), "fms", _calib(), estimator="jvp", progress=False)
    with pytest.raises(ValueError, match="shortlist"):
        minillm.score(tiny("tiny-llama"), "fms", _calib(), estimator="ablation", shortlist=2.0, progress=False)


# --- the fms_diagnostics experiment ----------------------------------------------------------------------------


def test_fms_diagnostics_experiment_on_smoke_sizes(tmp_path, monkeypatch):
    """The smoke profile's section, on a tiny random model (random tokens instead of text): three records whose
    numbers obey what they must by construction."""
    from minillm.artifact import diagnostics, experiments

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    cfg = experiments.load_profile("smoke")
    section = copy.deepcopy(cfg["fms_diagnostics"])
    section["seeds"] = [0, 1]
    section["estimators"]["fms-ablation-all"] = {"estimator": "ablation", "shortlist": 1.0}
    section["oracle"]["channels"] = 10_000  # every channel
    section["criteria_queries"], section["full_n_seeds"] = [1], 1  # seed 1 stops at n = 1
    cfg = {"profile": "t", "model": "tiny-llama-gqa3", "device": "cpu", "fms_diagnostics": section}
    acc, crit, orc = experiments.run_fms_diagnostics(cfg)
    assert (tmp_path / "t" / "fms_diagnostics" / "oracle.json").exists()
    rows = acc["metrics"]["rows"]
    assert sorted((r["seed"], r["n"]) for r in rows) == [(0, 1), (0, 2), (1, 1)]
    assert all(-1 <= r["cosine"] <= 1 and 0 <= r["bottom_overlap"] <= 1 for r in rows)
    assert all(r["theory"] == pytest.approx((r["n"] / (r["n"] + r["d"])) ** 0.5) for r in rows)
    by = {r["criterion"]: r for r in orc["metrics"]["rows"]}
    # the exact ablation of every unit *is* the oracle
    assert by["fms-ablation-all"]["attention"] == pytest.approx(1.0)
    assert by["fms-ablation-all"]["channels"] == pytest.approx(1.0)
    labels = {r["criterion"] for r in crit["metrics"]["rows"]}
    assert {"fms-exact-grad (backprop)", "fms-g1", "fms-noise-g (backprop control)", "taylor (backprop)", "fms-spsa-gates-n1"} <= labels
    assert all(r["uses_backprop"] == ("backprop" in r["criterion"]) for r in crit["metrics"]["rows"])
    assert "fms-weights-exact-grad (backprop)" in labels
    bonsai_rows = orc["metrics"]["bonsai"]
    assert bonsai_rows and all(-1 <= r["coefficients"] <= 1 and r["units"] >= 3 for r in bonsai_rows)
    tables = diagnostics.frames([acc, crit, orc])
    assert set(tables) == {"accuracy", "criteria", "oracle", "oracle_bonsai", "goal"}
    assert not (tmp_path / "t" / "fms_diagnostics" / "partial").exists()  # removed once the records exist
    assert experiments.run_fms_diagnostics(cfg) == [acc, crit, orc]  # resumed from the records


def test_fms_diagnostics_resume_after_a_crash(tmp_path, monkeypatch):
    """A run that dies in the perplexity loop resumes from its partial store: nothing finished is computed again,
    and the records equal those of a run that never stopped."""
    from minillm.artifact import diagnostics, experiments
    from minillm import evaluate

    section = copy.deepcopy(experiments.load_profile("smoke")["fms_diagnostics"])
    cfg = {"profile": "t", "model": "tiny-llama-gqa3", "device": "cpu", "fms_diagnostics": section}
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "whole")
    whole = [r["metrics"] for r in experiments.run_fms_diagnostics(cfg)]

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "resumed")
    real_ppl, calls = evaluate.perplexity, {"ppl": 0, "oracle": 0}

    def dying_ppl(*a, **k):
        calls["ppl"] += 1
        if calls["ppl"] == 4:
            raise RuntimeError("session ended")
        return real_ppl(*a, **k)

    real_oracle = diagnostics.oracle_losses

    def counted_oracle(*a, **k):
        calls["oracle"] += 1
        return real_oracle(*a, **k)

    monkeypatch.setattr(evaluate, "perplexity", dying_ppl)
    monkeypatch.setattr(diagnostics, "oracle_losses", counted_oracle)
    with pytest.raises(RuntimeError, match="session ended"):
        experiments.run_fms_diagnostics(cfg)
    partial = tmp_path / "resumed" / "t" / "fms_diagnostics" / "partial"
    assert (partial / "values.json").exists() and list((partial / "scores").glob("*.safetensors"))
    monkeypatch.setattr(evaluate, "perplexity", real_ppl)
    resumed = [r["metrics"] for r in experiments.run_fms_diagnostics(cfg)]
    assert calls["oracle"] == 1  # the oracle came from the store the second time
    assert resumed == whole
    # another section empties the store instead of mixing two configurations
    store = diagnostics.PartialStore(partial, {"a": 1})
    store.value("x", lambda: 1)
    assert diagnostics.PartialStore(partial, {"a": 2}).values == {}


def test_an_spsa_estimate_interrupted_mid_way_resumes_from_its_checkpoint():
    """The diagnostics' long gate estimates keep their progress: an estimate stopped after some checkpoints and
    resumed from the last one repeats no stored query and equals the estimate that never stopped."""
    from minillm.scores.spsa import estimate

    class Space:  # a quadratic loss over a 5-vector, perturbed in place
        dim = 5
        x = torch.zeros(5)

        def noise(self, seed, block):
            return torch.randn(5, generator=torch.Generator().manual_seed(seed))

        def perturbed(self, seed, scale):
            space = self

            class Ctx:
                def __enter__(self):
                    space.x = scale * space.noise(seed, 0)

                def __exit__(self, *exc):
                    space.x = torch.zeros(5)

            return Ctx()

    space = Space()
    target = torch.arange(5.0)
    losses = []

    def loss():
        losses.append(1)
        return float(((space.x - target) ** 2).sum())

    whole = estimate(space, loss, 10, 1e-2, 7, progress=False)
    saved = []

    class Stop(Exception):
        pass

    def checkpoint(so_far):
        saved.append(so_far)
        if len(saved) == 2:
            raise Stop

    with pytest.raises(Stop):
        estimate(space, loss, 10, 1e-2, 7, progress=False, checkpoint=checkpoint, every=3)
    assert [len(p) for p in saved] == [3, 6]
    losses.clear()
    resumed = estimate(space, loss, 10, 1e-2, 7, progress=False, done=saved[-1], checkpoint=saved.append, every=3)
    assert len(losses) == 2 * 4  # only queries 7..10 ran again
    assert resumed.seeds == whole.seeds and resumed.projected == whole.projected
    assert len(saved[-1]) == 9  # a checkpoint at 9, none at the end (the caller stores the whole estimate)


def _run_dying_in_put(monkeypatch, cfg, dies):
    """Run the diagnostics of `cfg` until the partial store is asked to keep a value for which dies(name, value)
    holds (a session that ends there), then restore the store."""
    from minillm.artifact import diagnostics, experiments

    real_put = diagnostics.PartialStore.put

    def dying_put(self, name, value):
        if dies(name, value):
            raise RuntimeError("session ended")
        return real_put(self, name, value)

    monkeypatch.setattr(diagnostics.PartialStore, "put", dying_put)
    with pytest.raises(RuntimeError, match="session ended"):
        experiments.run_fms_diagnostics(cfg)
    monkeypatch.setattr(diagnostics.PartialStore, "put", real_put)


def test_fms_diagnostics_resume_inside_a_gate_estimate(tmp_path, monkeypatch):
    """A run that dies inside a gate-space SPSA estimate (checkpoints every query here) resumes from the stored
    queries of that estimate, and its records equal those of a run that never stopped."""
    import functools

    from minillm.artifact import experiments
    from minillm.scores import spsa

    section = copy.deepcopy(experiments.load_profile("smoke")["fms_diagnostics"])
    section["queries"] = [1, 3]
    cfg = {"profile": "t", "model": "tiny-llama-gqa3", "device": "cpu", "fms_diagnostics": section}
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "whole")
    whole = [r["metrics"] for r in experiments.run_fms_diagnostics(cfg)]

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "resumed")
    real_estimate, resumed_from = spsa.estimate, []

    def estimate(*a, **k):
        resumed_from.append(len(a[6] or []) if len(a) > 6 else 0)
        return functools.partial(real_estimate, every=1)(*a, **k)

    monkeypatch.setattr(spsa, "estimate", estimate)
    _run_dying_in_put(monkeypatch, cfg, lambda name, value: name == "gate-estimate-seed0-partial" and len(value) == 2)
    resumed_from.clear()
    resumed = [r["metrics"] for r in experiments.run_fms_diagnostics(cfg)]
    assert resumed_from[0] == 1  # seed 0 went on after its first stored query
    assert resumed == whole


def test_exact_weight_space_fms_with_taylor_combination_is_llm_pruner_element1(tiny):
    """The weight-space exact-gradient diagnostic computes |W dL/dW| per weight like `taylor` (element1) when its
    combination is 'taylor': one gradient, one pooling."""
    from minillm.adapters import get_adapter
    from minillm.artifact.diagnostics import exact_weight_fms_scores, flat
    from minillm.scores.common import ScoringContext

    model, calib = tiny("tiny-llama-gqa3"), _calib()
    ctx = ScoringContext(model, get_adapter(model), calib, "auto", 0, False)
    mine = flat(exact_weight_fms_scores(ctx, ctx.input_stats("all"), combination="taylor"))
    theirs = flat(minillm.score(model, "taylor", calib, progress=False))
    assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-9)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["smoke", "cpu", "cpu-full", "gpu", "paper"])
def test_profiles_fms_diagnostics_sections_use_known_options(name):
    from minillm.artifact.experiments import load_profile
    from minillm.scores import check_options, get_method

    section = load_profile(name).get("fms_diagnostics")
    if section is None:  # only profiles whose diagnostics records are made carry the section
        return
    for opts in section["estimators"].values():
        check_options(get_method("fms"), "fms", opts)
    assert set(section.get("criteria_queries", section["queries"])) <= set(section["queries"])


def test_goal_frame_verdicts_follow_the_means_and_the_seed_spread():
    from minillm.artifact.diagnostics import goal_frame, memory_ratios

    def row(criterion, allocation, ppl, k=0, comp=False):
        return {"criterion": criterion, "allocation": allocation, "sparsity": 0.2, "compensate_bias": comp,
                "seed_index": k, "ppl": ppl}

    rows = [
        row("taylor (backprop)", "uniform", 25.0),
        row("taylor (backprop)", "global", 20.0),  # the reference: the better of Taylor's allocations
        row("flap-score (no compensation)", "global", 22.0),
        row("fms-exact-grad (backprop)", "uniform", 10.0),  # uses backprop: never the best forward-only
        row("fms-g1", "uniform", 11.0),  # a control, not an estimator
        row("fms-spsa-gates-n16", "uniform", 30.0), row("fms-spsa-gates-n16", "uniform", 32.0, 1),
        row("fms-allocation-n128", "global", 20.5), row("fms-allocation-n128", "global", 21.5, 1),
        row("fms-allocation-n128", "global", 40.0, comp=True), row("taylor (backprop)", "uniform", 20.0, comp=True),
    ]
    memory = [{"metrics": {"methods": [{"label": "fms-alloc", "ratio_to_dense_forward": 1.2}]}}]
    methods = [{"label": "fms-alloc", "method": "fms", "options": {"estimator": "allocation"}}]
    ratios = memory_ratios(memory, methods)
    assert ratios == {"allocation": {"ratio": 1.2, "phase": "scoring and removal"}}
    split = {"label": "fms-alloc", "ratio_to_dense_forward": 1.3, "scoring_ratio_to_dense_forward": 1.05}
    two_shapes = memory + [{"metrics": {"methods": [split]}}]  # the highest peak over shapes, scoring alone if known
    assert memory_ratios(two_shapes, methods) == {"allocation": {"ratio": 1.2, "phase": "scoring and removal"}}
    assert memory_ratios(two_shapes[1:], methods) == {"allocation": {"ratio": 1.05, "phase": "scoring"}}
    goal = goal_frame({"rows": rows}, ratios).set_index("compensate_bias")
    plain = goal.loc[False]
    assert plain.best_forward_only == "fms-allocation-n128" and plain.ppl_mean == pytest.approx(21.0)
    assert plain.ratio_to_taylor == pytest.approx(1.05) and plain.taylor_goal == "met"
    assert plain.taylor_allocation == "global" and plain.flap_allocation == "global"
    assert plain.flap_goal == "met"
    assert not plain.flap_within_noise and not plain.taylor_within_noise  # gaps 1.0 > seed std 0.71
    assert plain.memory_goal == "not met" and plain.peak_of == "scoring and removal"
    comp = goal.loc[True]  # one seed: no spread, so no noise verdict
    assert comp.taylor_goal == "not met" and comp.ratio_to_taylor == pytest.approx(2.0)
    assert comp.taylor_within_noise is None


def test_grid_goal_frame_takes_the_accuracy_grid_labels_and_both_spreads():
    import pandas as pd

    from minillm.artifact.diagnostics import grid_goal_frame

    def row(method, ppl, seed=0, sparsity=0.2):
        return {"method": method, "pattern": "structured", "sparsity": sparsity, "ppl": ppl, "seed": seed}

    acc = pd.DataFrame(
        [
            {"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": 5.0, "seed": 0},
            row("taylor", 100.0), row("taylor", 800.0, 1), row("taylor", 900.0, 2),  # mean 600, sd 436
            row("flap", 38.0), row("flap", 37.0, 1),
            row("fms-gates-n64", 370.0), row("fms-gates-n64", 150.0, 1),  # mean 260, sd 156
            row("fms-ablation-heads", 300.0),
            row("magnitude", 1.0),  # not FMS-family: never the best forward-only
            row("taylor", 50.0, sparsity=0.1),  # no forward-only FMS at 10%: no row
        ]
    )
    goal = grid_goal_frame(acc)
    assert list(goal.sparsity) == [0.2]
    g = goal.iloc[0]
    assert g.best_forward_only == "fms-gates-n64" and g.ppl_mean == pytest.approx(260.0) and g.seeds == 2
    assert g.taylor_ppl == pytest.approx(600.0) and g.taylor_seeds == 3 and g.taylor_goal == "met"
    assert g.taylor_within_noise  # the gap 340 is below Taylor's own seed sd (436), not the FMS label's (156)
    assert g.flap_goal == "not met" and not g.flap_within_noise  # gap 222.5 > both sds
    assert grid_goal_frame(pd.DataFrame()).empty


class _Resume(dict):
    """ScoringContext.resume backed by a dict that can be made to die on its n-th put (a session that ends)."""

    def __init__(self, die_at=None):
        super().__init__()
        self.die_at, self.puts = die_at, 0

    def put(self, name, value):
        self.puts += 1
        if self.puts == self.die_at:
            raise RuntimeError("session ended")
        self[name] = copy.deepcopy(value)


def test_ablation_interrupted_between_layers_resumes_without_remeasuring(tiny, monkeypatch):
    """The ablation estimator stores each finished layer in `resume`: a run that dies after two layers resumes at
    the third (no finished layer is measured again) and gives the scores of a run that never stopped, which equal
    those without `resume`."""
    from minillm.scores import fms_estimators

    calib, model = _calib(), tiny("tiny-llama-gqa")
    opts = dict(estimator="ablation", shortlist=0.25, batch_tokens=200, progress=False)
    plain = minillm.score(model, "fms", calib, **opts)
    dying = _Resume(die_at=3)
    with pytest.raises(RuntimeError, match="session ended"):
        minillm.score(model, "fms", calib, resume=dying, **opts)
    (stored,) = dying.values()
    assert sorted(stored) == ["0", "1"]
    calls = []
    real = fms_estimators.Ablator.loss_changes
    monkeypatch.setattr(
        fms_estimators.Ablator, "loss_changes", lambda self, i, masks: calls.append(i) or real(self, i, masks)
    )
    resumed = minillm.score(model, "fms", calib, resume=dying, **opts)
    assert 0 not in calls and 1 not in calls and 2 in calls
    assert torch.equal(_flat(resumed), _flat(plain))


def _resume_after_dying(tmp_path, monkeypatch, section, dies, before_resume=lambda: None):
    """Records of an uninterrupted diagnostics run of `section` on a tiny model, and of a run that died where
    dies(name, value) holds and then resumed, with the names that the resumed run dropped from its partial store."""
    from minillm.artifact import diagnostics, experiments

    cfg = {"profile": "t", "model": "tiny-llama-gqa3", "device": "cpu", "fms_diagnostics": section}
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "whole")
    whole = [r["metrics"] for r in experiments.run_fms_diagnostics(cfg)]
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "resumed")
    _run_dying_in_put(monkeypatch, cfg, dies)
    dropped = []
    real_drop = diagnostics.PartialStore.drop
    monkeypatch.setattr(diagnostics.PartialStore, "drop", lambda self, name: dropped.append(name) or real_drop(self, name))
    before_resume()
    return whole, [r["metrics"] for r in experiments.run_fms_diagnostics(cfg)], dropped


def test_fms_diagnostics_resume_inside_the_ablation_estimator(tmp_path, monkeypatch):
    """A diagnostics run that dies inside the ablation estimator resumes from its stored layers, drops them from
    the store once the criterion's scores are stored, and writes the records of a run that never stopped."""
    from minillm.artifact import experiments

    section = copy.deepcopy(experiments.load_profile("smoke")["fms_diagnostics"])
    section["estimators"] = {"fms-ablation": {"estimator": "ablation", "shortlist": 0.25}}
    whole, resumed, dropped = _resume_after_dying(
        tmp_path, monkeypatch, section, lambda name, value: name.startswith("fms-ablation-0/") and len(value) == 2
    )
    assert any(name.startswith("fms-ablation-0/ablation-layers") for name in dropped)
    assert resumed == whole


def test_fms_diagnostics_resume_inside_the_oracle(tmp_path, monkeypatch):
    """A diagnostics run that dies inside the single-unit oracle resumes at its first unfinished layer (the
    finished ones are not measured again), drops that progress once the oracle is stored, and writes the records
    of a run that never stopped."""
    from minillm.artifact import experiments
    from minillm.scores import fms_estimators

    calls = []
    real = fms_estimators.Ablator.loss_changes

    def spy():
        monkeypatch.setattr(
            fms_estimators.Ablator, "loss_changes", lambda self, i, masks: calls.append(i) or real(self, i, masks)
        )

    section = copy.deepcopy(experiments.load_profile("smoke")["fms_diagnostics"])
    whole, resumed, dropped = _resume_after_dying(
        tmp_path, monkeypatch, section, lambda name, value: name.startswith("oracle-progress/") and len(value) == 2, spy
    )
    # the run died storing its second layer: layer 0 comes from the store, layers 1 and 2 are measured again
    assert 0 not in calls and {1, 2} <= set(calls)
    assert any(name.startswith("oracle-progress/oracle-layers") for name in dropped)
    assert resumed == whole


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_row_losses_are_each_rows_mean_cross_entropy_whatever_the_chunks(tiny, name):
    """Per-row loss from chunked LM-head calls equals the float64 cross-entropy of the full logits, row by row
    (a chunk that mixed rows or positions would not), for chunks that do and do not divide the sequence."""
    import torch.nn.functional as F

    from minillm.scores.fms_estimators import row_losses

    model = tiny(name).eval()
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
        want = torch.stack([F.cross_entropy(logits[r], ids[r, 1:]) for r in range(3)])
        for chunk_tokens in (3, 7, 12, 512):
            got = row_losses(model, ids, chunk_tokens)
            assert got.dtype == torch.float32 and got.shape == (3,)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
