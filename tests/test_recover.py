"""LoRA recovery: lowers the training loss, merges into a reloadable plain model, never touches the teacher; the
dense control of each training budget (experiments.run_recovery) and its share of the recovered gap (report)."""

import math

import pytest
import torch

import minillm
from minillm.artifact import experiments, report
from minillm import recover as recover_module
from minillm.evaluate import perplexity
from minillm.recover import lora_targets, recover


def _windows(seed=0):
    # a repetitive pattern the model can learn quickly
    base = torch.arange(16).repeat(4)[:48] % 128
    return torch.stack(
        [torch.roll(base, int(s)) for s in torch.randint(0, 16, (8,), generator=torch.Generator().manual_seed(seed))]
    )


def test_lora_lowers_loss_and_reloads_identically(tiny, tokens, tmp_path):
    model = tiny("tiny-llama-gqa")
    plan = minillm.prune(model, "random", 0.3)
    merged, record = recover(model, _windows(), rank=4, alpha=8, lr=5e-3, steps=30, batch_size=4, progress=False)
    assert record["mean_loss_last_10pct"] < record["mean_loss_first_10pct"] - 0.1
    assert type(merged).__name__ == "LlamaForCausalLM" and merged is model
    assert not any("lora" in n for n, _ in merged.named_parameters())
    plan.recovery.append(record)
    minillm.save_pruned(merged, plan, tmp_path / "r")
    again, _ = minillm.load_pruned(tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, merged(tokens).logits)
    assert minillm.pruning_state(again).plan.recovery[0]["steps"] == 30


def test_kl_run_leaves_parent_unchanged(tiny):
    parent = tiny("tiny-opt")
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    student = tiny("tiny-opt")
    minillm.prune(student, "random", 0.3)
    _, record = recover(student, _windows(), rank=2, steps=3, teacher=parent, kl_weight=0.5, progress=False)
    assert record["method"] == "lora+kl" and record["kl_weight"] == 0.5
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items())


def test_targets_skip_emptied_matrices(tiny):
    model = tiny("tiny-bloom")
    from minillm.surgery import prune_layer

    prune_layer(minillm.get_adapter(model), 0, [], [], None)
    targets = lora_targets(model)
    assert "transformer.h.0.self_attention.query_key_value" not in targets
    assert "transformer.h.1.self_attention.query_key_value" in targets


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"rank": 0}, "rank must be >= 1"),
        ({"lr": -1}, "lr must be > 0"),
        ({"kl_weight": 0.1}, "needs a teacher"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_options(tiny, kw, msg):
    with pytest.raises(ValueError, match=msg):
        recover(tiny("tiny-llama"), _windows(), progress=False, **kw)


def test_gradient_checkpointing_gives_the_same_training_and_bf16_autocast_trains(tiny):
    runs = {}
    for gc in (False, True):
        model = tiny("tiny-llama-gqa")
        minillm.prune(model, "random", 0.3)
        _, runs[gc] = recover(
            model,
            _windows(),
            rank=4,
            alpha=8,
            lr=5e-3,
            steps=6,
            batch_size=4,
            gradient_checkpointing=gc,
            progress=False,
        )
    assert runs[True]["gradient_checkpointing"] and not runs[False]["gradient_checkpointing"]
    for key in ("first_loss", "last_loss"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-5, abs=1e-6)
    model = tiny("tiny-llama-gqa")
    minillm.prune(model, "random", 0.3)
    _, rec = recover(model, _windows(), rank=4, alpha=8, lr=5e-3, steps=30, batch_size=4, bf16=True, progress=False)
    assert rec["bf16"] and rec["mean_loss_last_10pct"] < rec["mean_loss_first_10pct"] - 0.1


# --- the dense control ----------------------------------------------------------------------------------------------

EVAL_IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
TRAIN = {"windows": 8, "seqlen": 16, "steps": 2, "batch_size": 2, "rank": 2, "alpha": 4, "lr": 1e-3, "seed": 1}


def _control_profile() -> dict:
    return {
        "profile": "t",
        "model": "tiny-llama",
        "device": "cpu",
        "accuracy": {
            "calibration": {"n_samples": 2, "seqlen": 16},
            "perplexity": {"seqlen": 16, "windows": 1},
            "sparsities": [0.3],
            "methods": [{"label": "magnitude", "method": "magnitude"}],
        },
        "recovery": {
            "methods": ["magnitude"],
            "sparsities": [0.3],
            "kl_weights": [0.0, 1.0],
            "train": dict(TRAIN),
            "perplexity": {"seqlen": 16, "windows": 1},
        },
    }


@pytest.fixture
def tiny_recovery(tmp_path, monkeypatch):
    """run_recovery on tiny-llama: seeded random token windows for calibration and training, perplexity on fixed
    random tokens; returns the list of models `recover` was called with."""
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(experiments, "_load", lambda cfg: (minillm.load_model("tiny-llama")[0], None))
    monkeypatch.setattr(
        experiments,
        "calibration_windows",
        lambda tok, n, seqlen, seed=0: torch.randint(
            0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed)
        ),
    )
    monkeypatch.setattr(
        experiments, "_evaluate", lambda model, tok, exp, s: {"perplexity": perplexity(model, EVAL_IDS, progress=False)}
    )
    trained = []

    def spy(model, windows, **kw):
        trained.append(sum(p.numel() for p in model.parameters()))
        return recover(model, windows, **kw)

    monkeypatch.setattr(recover_module, "recover", spy)
    return trained


def test_the_dense_control_is_the_unpruned_model_with_the_pruned_runs_training(tiny_recovery, tmp_path):
    cfg = _control_profile()
    kl0, _kl1, control = experiments.run_recovery(cfg)
    assert control["config"]["method"] == "dense" and control["config"]["kl_weight"] == 0.0
    assert control["config"]["train"] == kl0["config"]["train"] == TRAIN
    same = ("rank", "alpha", "lr", "steps", "batch_size", "seqlen", "train_windows", "seed", "kl_weight", "method")
    assert {k: control["metrics"]["recovery"][k] for k in same} == {k: kl0["metrics"]["recovery"][k] for k in same}
    # unpruned: trained with every parameter of the dense model, evaluated before training as the dense model;
    # trained first, before the pruned runs (a run cut off part-way leaves rows with their control)
    dense = minillm.load_model("tiny-llama")[0]
    assert tiny_recovery[0] == sum(p.numel() for p in dense.parameters()) > tiny_recovery[1] == tiny_recovery[-1]
    assert control["metrics"]["recovery"]["target_modules"] == lora_targets(dense)
    assert control["metrics"]["before"]["perplexity"]["ppl"] == perplexity(dense, EVAL_IDS, progress=False)["ppl"]
    assert control["metrics"]["after"]["perplexity"]["ppl"] != control["metrics"]["before"]["perplexity"]["ppl"]
    path = tmp_path / "t" / "recovery" / "dense_s00_kl0.json"
    assert experiments.expected_records(cfg, "recovery")[path] == control["config"]


def test_each_training_budget_has_its_own_control_recomputed_when_it_changes(tiny_recovery, tmp_path, monkeypatch):
    def untrained(model, windows, teacher=None, **kw):  # the bookkeeping is under test here, not the training
        tiny_recovery.append(sum(p.numel() for p in model.parameters()))
        return model, {**kw, "time_s": 0.0}

    monkeypatch.setattr(recover_module, "recover", untrained)
    cfg = _control_profile()
    cfg["recovery"]["kl_weights"] = [0.0]
    cfg["recovery"]["methods"] = [
        "magnitude",
        {"label": "magnitude", "tag": "same"},  # the section's budget: shares its control
        {"label": "magnitude", "train": {"steps": 3}, "tag": "steps3"},
    ]
    records = experiments.run_recovery(cfg)
    folder = tmp_path / "t" / "recovery"
    controls = sorted(p.name for p in folder.glob("dense_*.json"))
    assert controls == ["dense_s00_kl0.json", "dense_s00_kl0_steps3.json"]
    assert len(records) == 5 and len(tiny_recovery) == 5
    dense_size = sum(p.numel() for p in minillm.load_model("tiny-llama")[0].parameters())
    # both controls before any pruned run; the returned records: the pruned ones, then the controls
    assert tiny_recovery[:2] == [dense_size] * 2 and dense_size not in tiny_recovery[2:]
    assert [r["config"]["method"] for r in records] == ["magnitude"] * 3 + ["dense"] * 2
    longer = experiments.load_record(folder / "dense_s00_kl0_steps3.json")
    assert longer["config"]["train"] == {**TRAIN, "steps": 3} and longer["metrics"]["recovery"]["steps"] == 3
    experiments.run_recovery(cfg)
    assert len(tiny_recovery) == 5  # nothing changed: nothing trained again
    cfg["recovery"]["train"]["lr"] = 2e-3  # every budget changes: every record, controls included, is redone
    experiments.run_recovery(cfg)
    assert len(tiny_recovery) == 10
    assert experiments.load_record(folder / "dense_s00_kl0.json")["metrics"]["recovery"]["lr"] == 2e-3
    cfg["recovery"]["methods"].append({"label": "magnitude", "train": {"steps": 4}, "tag": "steps3"})
    with pytest.raises(ValueError, match="tag 'steps3' is used with two different train settings"):
        experiments.expected_records(cfg, "recovery")


def _record(method: str, before: float, after: float, steps: int = 20) -> dict:
    train = {**TRAIN, "steps": steps}
    return {
        "config": {
            "model": "m",
            "label": method,
            "method": method,
            "sparsity": 0.0 if method == "dense" else 0.5,
            "kl_weight": 0.0,
            "train": train,
        },
        "metrics": {
            "before": {"perplexity": {"ppl": before}},
            "after": {"perplexity": {"ppl": after}},
            "recovery": {"steps": steps, "mean_loss_first_10pct": 1.0, "mean_loss_last_10pct": 0.5, "time_s": 1.0},
        },
    }


def test_control_share_is_the_controls_log_ppl_gain_over_the_pruned_models():
    records = [
        _record("taylor", 100.0, 50.0),
        _record("flap", 100.0, 50.0, steps=100),
        _record("bonsai", 40.0, 45.0),  # worse after training: nothing recovered
        _record("random", 100.0, 50.0, steps=7),  # no control of its budget
        _record("dense", 20.0, 16.0),
        _record("dense", 20.0, 10.0, steps=100),
    ]
    df = report.recovery_frame(records).set_index("method")
    assert "dense" not in df.index
    assert df.loc["taylor", "ppl_dense_before"] == 20.0 and df.loc["taylor", "ppl_dense_after"] == 16.0
    assert df.loc["taylor", "recovered"] == pytest.approx(math.log(2))
    assert df.loc["taylor", "control_gain"] == pytest.approx(math.log(1.25))
    assert df.loc["taylor", "control_share"] == pytest.approx(math.log(1.25) / math.log(2))
    assert df.loc["flap", "ppl_dense_after"] == 10.0 and df.loc["flap", "control_share"] == pytest.approx(1.0)
    assert math.isnan(df.loc["bonsai", "control_share"])
    assert math.isnan(df.loc["random", "ppl_dense_before"]) and math.isnan(df.loc["random", "control_share"])


def test_the_recovery_figure_draws_the_dense_line_and_the_control():
    import matplotlib

    matplotlib.use("Agg")
    df = report.recovery_frame([_record("taylor", 100.0, 50.0), _record("dense", 20.0, 16.0)])
    ax = report.plot_recovery(df).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][-2:] == [
        "dense (unpruned)",
        "dense + same LoRA (control)",
    ]
    assert any(list(line.get_ydata()) == [20.0, 20.0] for line in ax.lines)  # the unpruned model
    ticks = [seg for c in ax.collections for seg in c.get_segments()]
    assert [list(seg[:, 1]) for seg in ticks] == [[16.0, 16.0]]  # the control after its LoRA, over the row
