"""End-to-end path: prune (random) -> plan -> save -> reload, budgets and error messages."""

import json

import pytest
import torch
from conftest import TINY

import minillm
from minillm.adapters import UnsupportedArchitectureError, get_adapter
from minillm.allocate import attention_unit_cost, resolve_attention_unit
from minillm.plan import PlanError


@pytest.mark.parametrize("name", TINY)
def test_save_reload_identical_logits_and_stock_class(tiny, tokens, tmp_path, name):
    model = tiny(name)
    plan = minillm.prune(model, "random", 0.4, seed=3)
    with torch.no_grad():
        before = model(tokens).logits
    minillm.save_pruned(model, plan, tmp_path / "p")
    written = ["config.json", "model.safetensors", "pruning.json"]  # and the manifest that lists them
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [".minillm-manifest.json", *written]
    reloaded, _ = minillm.load_pruned(tmp_path / "p")
    assert type(reloaded) is type(model)
    assert type(reloaded).__module__.startswith("transformers.")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, before)
    out = reloaded.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    saved = json.loads((tmp_path / "p" / "pruning.json").read_text())
    for layer in saved["layers"]:
        att = layer["attention"]
        assert att["kept_query_heads"] == sorted(att["kept_query_heads"])
        if name in ("tiny-llama", "tiny-opt", "tiny-bloom"):
            assert att["kept_kv_heads"] == att["kept_query_heads"]
    assert saved["method"] == "random" and saved["seed"] == 3 and saved["sparsity"] == 0.4


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_removed_fraction_matches_request_within_one_unit_per_layer(tiny, name, sparsity):
    model = tiny(name)
    adapter = get_adapter(model)
    costs = []
    for layer in adapter.layers():
        unit = resolve_attention_unit("auto", adapter.attention_shape(layer))
        costs.append(max(attention_unit_cost(adapter, layer, unit), adapter.channel_cost(layer)))
    plan = minillm.prune(model, "random", sparsity)
    removed = plan.prunable_params_original - plan.prunable_params_kept
    target = sparsity * plan.prunable_params_original
    assert abs(removed - target) <= sum(costs)
    assert plan.achieved_sparsity == pytest.approx(removed / plan.prunable_params_original)


def test_skip_layers_are_untouched_and_budget_still_met(tiny):
    model = tiny("tiny-llama")
    plan = minillm.prune(model, "random", 0.2, skip_layers=[0])
    assert plan.layers[0].kept_channels == list(range(48)) and plan.layers[0].kept_query_heads == [0, 1, 2, 3]
    assert abs(plan.achieved_sparsity - 0.2) < 0.05


def test_global_allocation_and_round_to(tiny):
    model = tiny("tiny-llama")
    plan = minillm.prune(model, "random", 0.3, allocation="global", seed=1)
    assert abs(plan.achieved_sparsity - 0.3) < 0.05
    model = tiny("tiny-llama")
    plan = minillm.prune(model, "random", 0.3, round_to=8, targets="mlp")
    assert all(len(k.kept_channels) % 8 == 0 for k in plan.layers)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "x"])
def test_sparsity_out_of_range_is_refused(tiny, bad):
    with pytest.raises(ValueError, match=r"sparsity must be"):
        minillm.prune(tiny("tiny-llama"), "random", bad)


def test_unknown_method_and_option(tiny):
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        minillm.prune(tiny("tiny-llama"), "nope", 0.2)
    with pytest.raises(ValueError, match="unknown option"):
        minillm.prune(tiny("tiny-llama"), "random", 0.2, queries=3)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        minillm.load_model("no-such-model")


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'"):
        get_adapter(model)


def test_gqa_request_that_cannot_be_met(tiny):
    with pytest.raises(minillm.GQAConstraintError, match="balanced"):
        minillm.prune(tiny("tiny-llama-gqa"), "random", 0.3, attention_units="query_head", allocation="global")


def test_corrupt_or_missing_plan(tiny, tmp_path):
    model = tiny("tiny-opt")
    plan = minillm.prune(model, "random", 0.2)
    minillm.save_pruned(model, plan, tmp_path / "p")
    (tmp_path / "p" / "pruning.json").write_text("{not json")
    with pytest.raises(PlanError, match="corrupt JSON"):
        minillm.load_pruned(tmp_path / "p")
    (tmp_path / "p" / "pruning.json").write_text(
        json.dumps({"format_version": 1, "base_model": "x", "architecture": {}, "layers": [{"attention": {}}]})
    )
    with pytest.raises(PlanError, match=r"layers\[0\]"):
        minillm.load_pruned(tmp_path / "p")
    (tmp_path / "p" / "pruning.json").unlink()
    with pytest.raises(PlanError, match="not found"):
        minillm.load_pruned(tmp_path / "p")


def test_plan_indices_out_of_range(tiny, tmp_path):
    model = tiny("tiny-llama")
    plan = minillm.prune(model, "random", 0.2)
    minillm.save_pruned(model, plan, tmp_path / "p")
    d = json.loads((tmp_path / "p" / "pruning.json").read_text())
    d["layers"][0]["mlp"]["kept_channels"] = [0, 1, 999]
    # a consistent checksum (the file was written wrong, not edited afterwards): the range check still applies
    from minillm.plan import document_checksum

    d["checksum"] = document_checksum(d)
    (tmp_path / "p" / "pruning.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="channel indices must be distinct and in"):
        minillm.load_pruned(tmp_path / "p")


def test_local_directory_and_reload_through_load_model(tiny, tmp_path, tokens):
    model = tiny("tiny-llama")
    model.save_pretrained(tmp_path / "dense")
    loaded, tok = minillm.load_model(str(tmp_path / "dense"))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    plan = minillm.prune(loaded, "random", 0.25)
    minillm.save_pruned(loaded, plan, tmp_path / "pruned")
    again, _ = minillm.load_model(str(tmp_path / "pruned"))
    assert minillm.pruning_state(again).plan.achieved_sparsity == pytest.approx(plan.achieved_sparsity)


def test_same_seed_same_plan(tiny):
    a = minillm.prune(tiny("tiny-bloom"), "random", 0.3, seed=5)
    b = minillm.prune(tiny("tiny-bloom"), "random", 0.3, seed=5)
    c = minillm.prune(tiny("tiny-bloom"), "random", 0.3, seed=6)
    assert a.layers == b.layers and a.layers != c.layers


def test_prune_with_scores_reuses_the_scoring_statistics_for_flaps_compensation(tiny, monkeypatch):
    """FLAP's bias compensation reads the same input statistics as its scores: with scores from `minillm.score` on
    the same calibration tokens, `prune` runs no second calibration pass and writes the same model as a prune that
    collects them itself; with other tokens it collects them again."""
    from minillm.scores import common

    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    passes = []
    collect = common.collect_input_stats
    monkeypatch.setattr(common, "collect_input_stats", lambda ctx, linears: passes.append(1) or collect(ctx, linears))
    shared, alone, other = tiny("tiny-llama-gqa"), tiny("tiny-llama-gqa"), tiny("tiny-llama-gqa")
    scores = minillm.score(shared, "flap", calib, progress=False)
    assert len(passes) == 1
    minillm.prune(shared, "flap", 0.3, calib.clone(), scores=scores, progress=False)
    assert len(passes) == 1
    minillm.prune(alone, "flap", 0.3, calib, progress=False)
    assert len(passes) == 2
    probe = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(shared(probe).logits, alone(probe).logits)
    minillm.prune(other, "flap", 0.3, calib[:, :8], scores=scores, progress=False)
    assert len(passes) == 3
