"""Run-time estimate from counted FLOPs and bytes (minillm.artifact.estimate), the simulated recovery peak
(simulate.simulate_recovery_step), recovery's device residency, and the profiles' sequence-length check."""

import gc
import json

import pytest
import torch
import yaml

from minillm.artifact import estimate, experiments
from minillm.artifact.profiles import ProfileError, model_max_positions, validate_profile
from minillm.bench import flops
from minillm.bench.simulate import simulate_recovery_step


def test_counter_counts_matmul_flops_and_bytes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    counter = flops.CostCounter()
    with FakeTensorMode():  # only tensors of the simulated GPU (fake ones) are counted
        layer = torch.nn.Linear(64, 32, bias=False)
        x = torch.randn(4, 64)
        with counter:
            layer(x)
    assert counter.cost.flops == 2 * 4 * 64 * 32
    assert counter.cost.bytes == 4 * (4 * 64 + 64 * 32 + 4 * 32)  # inputs and output, fp32
    hw = flops.H100
    roof = max(counter.cost.flops / (hw["peak_flops"]["float32"] * hw["compute_efficiency"]),
               counter.cost.bytes / (hw["hbm_bytes_per_s"] * hw["memory_efficiency"]))
    assert counter.cost.seconds == pytest.approx(roof + hw["launch_s"] * counter.cost.ops)


def test_extrapolation_is_linear_in_the_setting():
    c1, c2 = flops.Cost(10, 100, 3, 1.0), flops.Cost(14, 150, 5, 1.5)
    c64 = flops.extrapolate(c1, 1, c2, 2, 64)
    assert (c64.flops, c64.bytes, c64.seconds) == (10 + 63 * 4, 100 + 63 * 50, pytest.approx(1.0 + 63 * 0.5))


def test_counted_forward_matches_the_parameter_rule():
    """Forward FLOPs of a decoder are about 2 x (non-embedding parameters) per token plus attention."""
    counter = estimate.Counter("tiny-llama", "float32")
    b, t = 2, 16
    cost = counter.forward(b, t)
    from minillm.models import build_random

    model = build_random("tiny-llama")
    linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    cfg = model.config
    attention = 4 * b * cfg.num_attention_heads * t * t * (cfg.hidden_size // cfg.num_attention_heads)
    assert cost.flops == pytest.approx(2 * b * t * linear + cfg.num_hidden_layers * attention, rel=1e-6)
    # more queries cost more; Bonsai costs grow with the masks
    fms = lambda q: counter.method({"method": "fms", "options": {"queries": q}}, 0.2, 2, 8, {})  # noqa: E731
    assert fms(8).flops > fms(2).flops > 0


def test_estimate_of_a_small_profile_has_every_section():
    cfg = {
        "profile": "t",
        "model": "tiny-llama",
        "dtype": "float32",
        "accuracy": {
            "calibration": {"n_samples": 2, "seqlen": 8},
            "perplexity": {"seqlen": 16, "windows": 2, "batch_size": 2},
            "zeroshot": {"limit": 2, "batch_size": 2, "tasks": ["bb_cloze_hyperbaton"], "sparsities": [0.0]},
            "sparsities": [0.2],
            "methods": [
                {"label": "taylor", "method": "taylor"},
                {"label": "bonsai", "method": "bonsai", "prune_options": {"allocation": "global"},
                 "options": {"masks_per_round": 6, "prune_frac": 0.1, "windows_per_round": 2}},
            ],
        },
        "recovery": {
            "methods": ["taylor"], "sparsities": [0.2], "kl_weights": [1.0],
            "train": {"windows": 4, "seqlen": 8, "steps": 10, "batch_size": 2, "rank": 2, "alpha": 4, "lr": 1e-4},
            "perplexity": {"seqlen": 16, "windows": 2, "batch_size": 2},
        },
        "memory": {"models": ["tiny-llama"], "dtype": "float16", "shapes": [[2, 8]],
                   "methods": [{"label": "wanda_sp", "method": "wanda_sp"}]},
        "latency": {"models": ["tiny-llama"], "dtype": "float16", "sparsities": [0.5], "prefill": [[1, 8]],
                    "decode": {"batch": [1], "prompt": 4, "new_tokens": 4}, "repeats": 2},
    }
    rows = estimate.estimate_profile(cfg)
    assert {r.section for r in rows} == {"accuracy", "recovery", "memory", "latency"}
    assert all(r.seconds > 0 and r.cost.flops > 0 for r in rows)
    bonsai = next(r for r in rows if r.what == "bonsai")
    taylor = next(r for r in rows if r.what == "taylor")
    assert bonsai.cost.flops > taylor.cost.flops  # rounds x masks of forward passes
    total = estimate.summary(rows)["total_s"]
    assert total == pytest.approx(sum(r.seconds for r in rows))
    text = estimate.markdown(rows, "t")
    assert "estimate" in text and f"{total / 60:.1f}" in text


def _models() -> int:
    """Causal LMs alive in this process (their inner decoder, also a PreTrainedModel, is not counted apart)."""
    gc.collect()
    return sum(type(o).__name__.endswith("ForCausalLM") for o in gc.get_objects())


def test_recovery_keeps_only_the_student_and_the_teacher(tmp_path, monkeypatch):
    """During training, no other model (the pruned base, a previous merged model) is alive beside the student and
    the teacher."""
    from minillm import recover as recover_module

    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    alive = []

    def spy(model, windows, **kw):
        alive.append(_models())
        return model, {"time_s": 0.0, "steps": kw["steps"]}

    monkeypatch.setattr(recover_module, "recover", spy)
    monkeypatch.setattr(experiments, "_evaluate", lambda *a, **k: {"perplexity": {"ppl": 1.0}})
    monkeypatch.setattr(experiments, "calibration_windows", lambda tok, n, seqlen, seed=0: torch.zeros(n, seqlen,
                                                                                                    dtype=torch.long))
    from minillm.models import build_random

    monkeypatch.setattr(experiments, "_load", lambda cfg: (build_random("tiny-llama"), None))
    cfg = {
        "profile": "t", "model": "tiny-llama", "device": "cpu",
        "accuracy": {"calibration": {"n_samples": 2, "seqlen": 8}, "perplexity": {"seqlen": 8, "windows": 1},
                     "sparsities": [0.2], "methods": [{"label": "magnitude", "method": "magnitude"}]},
        "recovery": {"methods": ["magnitude"], "sparsities": [0.2], "kl_weights": [0.0, 1.0, 2.0],
                     "train": {"windows": 2, "seqlen": 8, "steps": 1, "batch_size": 1, "rank": 2, "alpha": 4,
                               "lr": 1e-4},
                     "perplexity": {"seqlen": 8, "windows": 1}},
    }
    gc.collect()
    before = _models()
    experiments.run_recovery(cfg)
    # the dense control (trained first): the dense model alone; kl 0: the student alone; kl 1 and 2: the student
    # and the teacher
    assert [n - before for n in alive] == [1, 1, 2, 2]


def test_simulated_recovery_peak_counts_the_models_kept_on_the_device():
    lean = simulate_recovery_step("tiny-llama", "float32", 2, 16, 2, kl=True)
    old = simulate_recovery_step("tiny-llama", "float32", 2, 16, 2, kl=True, extra_students=2)
    assert lean["simulated"] and lean["peak_bytes"] > lean["weights_bytes"] > 0
    student = lean["weights_bytes"] / 2  # student and teacher, both dense here
    assert old["weights_bytes"] == pytest.approx(lean["weights_bytes"] + 2 * student, rel=0.02)
    assert old["peak_bytes"] > lean["peak_bytes"]


H100_80GB_GIB = 79.19  # what torch reports as the capacity of an H100 80GB HBM3 (tests/test_device.py)


@pytest.mark.slow
def test_paper_profile_recovery_fits_one_80gb_gpu():
    """LLaMA-7B in the paper profile's dtype at its recovery settings, simulated: the largest student (the lowest
    recovery sparsity) and the teacher, with 10% of the card left for the allocator's fragmentation and the CUDA
    context."""
    cfg = experiments.load_profile("paper")
    train = cfg["recovery"]["train"]
    sim = simulate_recovery_step(
        "llama-7b-shape", cfg["dtype"], train["batch_size"], train["seqlen"], train["rank"], kl=True,
        sparsity=min(cfg["recovery"]["sparsities"]),
    )
    assert sim["peak_gib"] < 0.9 * H100_80GB_GIB, sim


def test_sequence_lengths_beyond_the_models_positions_are_refused():
    assert model_max_positions("baffo32/decapoda-research-llama-7B-hf") == 2048
    assert model_max_positions("tiny-bloom") is None
    with open(experiments.CONFIG_DIR / "paper.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["profile"] = "paper"
    cfg["recovery"]["train"]["seqlen"] = 4096
    with pytest.raises(ProfileError, match="recovery.train.seqlen: 4096 tokens is beyond the 2048 positions"):
        validate_profile(cfg, "paper")


def test_cli_combines_section_estimates_of_the_same_profile(tmp_path, capsys):
    from minillm.__main__ import main

    rows = [estimate.Row("memory", "m", 2, flops.Cost(1e12, 1e9, 10, 3.0), 7.0)]
    part = tmp_path / "memory.json"
    part.write_text(json.dumps(estimate.to_json(rows, "gpu")))
    args = ["bench", "runtime", "--profile", "gpu", "--combine", str(part), "--json", str(tmp_path / "all.json")]
    assert main(args) == 0
    out = json.loads((tmp_path / "all.json").read_text())
    assert out["estimate"] is True and out["total_s"] == pytest.approx(10.0)
    assert "estimate" in (tmp_path / "all.md").read_text()
    assert main(["bench", "runtime", "--profile", "paper", "--combine", str(part)]) == 2  # another profile's rows
    assert "not 'paper'" in capsys.readouterr().err
