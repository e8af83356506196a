"""Experiment drivers end to end at minimal sizes: record reuse, re-pruning, resumption and recovery entries.

The model is a tiny random LLaMA with SmolLM2's head layout and a tiny BPE tokenizer, saved as a local model directory
(`tiny_text_model_dir`, tests/conftest.py): what is checked here is the drivers' bookkeeping (which records are
reused, rebuilt or redone, and that a rebuilt model is the recorded one), which does not depend on the model's size;
SmolLM2-135M made each test load, prune, train and evaluate a 135M model several times."""

import json

import pytest

from minillm.artifact import experiments

pytestmark = pytest.mark.slow


def _profile(name: str, compensate: bool, model: str) -> dict:
    prune_options = {"attention_units": "auto", "allocation": "uniform"}
    if compensate:
        prune_options["compensate_bias"] = True
    eval_cfg = {"seqlen": 64, "windows": 1, "batch_size": 1}
    return {
        "profile": name,
        "model": model,
        "device": "cpu",
        "accuracy": {
            "calibration": {"n_samples": 2, "seqlen": 32, "seed": 0},
            "perplexity": eval_cfg,
            "sparsities": [0.2],
            "prune_options": prune_options,
            "methods": [{"label": "wanda_sp", "method": "wanda_sp"}],
        },
        "recovery": {
            "methods": ["wanda_sp"],
            "sparsities": [0.2],
            "kl_weights": [0.0],
            "train": {"windows": 4, "seqlen": 16, "steps": 1, "batch_size": 2, "rank": 2, "alpha": 4, "lr": 1e-4},
            "perplexity": eval_cfg,
        },
    }


def test_recovery_rebuilds_the_accuracy_records_pruned_model(tmp_path, monkeypatch, tiny_text_model_dir):
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    cfg = _profile("t", compensate=False, model=tiny_text_model_dir)
    acc = experiments.run_accuracy(cfg)[1]
    rec, _control = experiments.run_recovery(cfg)
    source = rec["plan_source"]
    assert source["record"].endswith("wanda_sp_s20.json")
    # the model rebuilt from the recorded kept indices is the accuracy run's pruned model: same perplexity
    assert rec["metrics"]["before"]["perplexity"]["ppl"] == pytest.approx(acc["metrics"]["perplexity"]["ppl"], 1e-6)
    assert source["perplexity_in_record"] == acc["metrics"]["perplexity"]["ppl"]
    assert rec["plan"]["layers"] == acc["plan"]["layers"]


def test_recovery_prunes_again_when_the_record_cannot_be_reused(tmp_path, monkeypatch, tiny_text_model_dir):
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    cfg = _profile("t", compensate=True, model=tiny_text_model_dir)  # compensation biases are not in the record
    acc = experiments.run_accuracy(cfg)[1]
    rec, _control = experiments.run_recovery(cfg)
    assert rec["plan_source"] == "pruned here"
    assert rec["metrics"]["before"]["perplexity"]["ppl"] == pytest.approx(acc["metrics"]["perplexity"]["ppl"], 1e-5)


def test_a_record_made_with_other_calibration_is_not_reused(tmp_path, monkeypatch, tiny_text_model_dir):
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    cfg = _profile("t", compensate=False, model=tiny_text_model_dir)
    experiments.run_accuracy(cfg)
    path = tmp_path / "t" / "accuracy" / "wanda_sp_s20.json"
    record = json.loads(path.read_text())
    record["config"]["calibration"]["seed"] = 7
    path.write_text(json.dumps(record))
    rec, _control = experiments.run_recovery(cfg)
    assert rec["plan_source"] == "pruned here"


def test_recovery_entries_override_training_and_experiments_resume(tmp_path, monkeypatch, tiny_text_model_dir):
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    cfg = _profile("t", compensate=False, model=tiny_text_model_dir)
    first = experiments.run_accuracy(cfg)
    assert experiments.run_accuracy(cfg) == first  # resumed from the records, nothing recomputed
    cfg["recovery"]["methods"] = ["wanda_sp", {"label": "wanda_sp", "train": {"steps": 2}, "tag": "steps2"}]
    default, longer, control, longer_control = experiments.run_recovery(cfg)
    assert (tmp_path / "t" / "recovery" / "wanda_sp_s20_kl0_steps2.json").exists()
    assert default["metrics"]["recovery"]["steps"] == 1 and longer["metrics"]["recovery"]["steps"] == 2
    assert longer["config"]["train"]["steps"] == 2 and longer["config"]["train"]["rank"] == 2
    # the dense control of each budget, on the same evaluation windows as the pruned runs
    assert (tmp_path / "t" / "recovery" / "dense_s00_kl0_steps2.json").exists()
    assert control["config"]["train"] == default["config"]["train"]
    assert longer_control["config"]["train"] == longer["config"]["train"]
    assert control["metrics"]["before"]["perplexity"]["ppl"] == pytest.approx(first[0]["metrics"]["perplexity"]["ppl"])
    cfg["recovery"]["methods"] = [{"label": "wanda_sp", "train": {"steps": 3}}]
    with pytest.raises(ValueError, match="needs a 'tag'"):
        experiments.run_recovery(cfg)
    cfg["recovery"]["methods"] = ["nope"]
    with pytest.raises(ValueError, match="not an accuracy method label"):
        experiments.run_recovery(cfg)
