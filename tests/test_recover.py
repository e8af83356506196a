"""LoRA recovery: lowers the training loss, merges into a reloadable plain model, never touches the teacher."""

import pytest
import torch

import minillm
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
