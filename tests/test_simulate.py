"""The peak-memory simulator (minillm.bench.simulate): tracker semantics, every step under fake tensors, the CLI
contract, and the validation against the H100 reference figures and the committed CPU records."""

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from minillm.artifact.records import REPO_ROOT
from minillm.bench import simulate
from minillm.__main__ import main

MIB = 2**20


def test_tracker_counts_live_storages_and_frees_them():
    with FakeTensorMode():
        tracker = simulate.StorageTracker()
        with tracker:
            a = torch.empty(MIB // 4, dtype=torch.float32)  # 1 MiB
            b = a.view(2, -1)  # a view shares the storage: not counted twice
            c = torch.empty(MIB // 2, dtype=torch.float16)  # 1 MiB
            assert tracker.current_bytes == 2 * MIB
            del a, b, c
            assert tracker.current_bytes == 0
            d = torch.empty(3, dtype=torch.float32)  # rounded up to 512 bytes, as CUDA's caching allocator does
            assert tracker.current_bytes == 512
            del d
    assert tracker.peak_bytes == 2 * MIB


def test_every_step_simulates_on_a_tiny_gqa_model():
    rows = {
        r["label"]: r
        for r in simulate.simulate_table(
            ["tiny-llama-gqa"], [(2, 16)], simulate.STEPS, "float32", streamed=False
        )
    }
    for label, r in rows.items():
        assert "error" not in r, (label, r.get("error"))
        assert r["simulated"] is True and r["peak_gib"] > r["weights_gib"] > 0, label
        assert r["materialised_attention"] == 0, label
        assert any("flash_attention" in k for k in r["attention_kernels"]), label
    # gradients of every parameter cost more than a forward pass
    assert rows["backprop"]["peak_gib"] > rows["dense"]["peak_gib"]
    assert rows["taylor"]["peak_gib"] > rows["wanda_sp"]["peak_gib"]


def test_float64_casts_turn_real_and_the_refits_float64_buffers_stay_counted():
    """A cast to float64 (pooled unit scores, Bonsai's regression) becomes a real tensor with stand-in values; the
    refit's float64 buffers (minillm.layerwise: a Gram summed with add_, a weight copied by as_float64) stay fake
    tensors on the simulated device and are counted."""
    from minillm.layerwise import Moments, as_float64

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(256, 128, device=simulate.SIM_DEVICE)
        standins, tracker = simulate.StandIns(), simulate.StorageTracker()
        with standins, tracker:
            scores = x[0].to(torch.float64)
            moments = Moments.zeros(128, x.device)
            moments.add(x)
            w = as_float64(x)
        assert type(scores) is torch.Tensor  # real
        assert type(moments.xx) is not torch.Tensor and type(w) is not torch.Tensor  # fake
    assert tracker.peak_bytes >= 128 * 128 * 8 + 256 * 128 * 8  # the Gram and the copy
    assert standins.count >= 128


def test_obs_and_the_refit_simulate_with_their_moments():
    """obs (structured OBS scores, then the refit) runs under fake tensors to the end, and its peak holds at least
    the weights, one float64 Gram of the MLP input and its float64 copy of W."""
    steps = [{"label": "dense", "method": "dense"}, *simulate.ON_REQUEST_STEPS]
    steps[1] = dict(steps[1], options={"batches": 4})  # 4 greedy batches, not 64: the same allocations, fewer steps
    rows = {r["label"]: r for r in simulate.simulate_table(["tiny-llama-gqa"], [(4, 16)], steps, "float32",
                                                           streamed=False)}
    for label in ("obs", "flap-reconstruct"):
        assert "error" not in rows[label], rows[label].get("error")
    d_ff, d = 64, 48  # tiny-llama-gqa
    moments = 8 * (d_ff * d_ff + d * d_ff)
    assert rows["obs"]["peak_bytes"] >= rows["obs"]["weights_bytes"] + moments
    assert rows["obs"]["peak_bytes"] > rows["dense"]["peak_bytes"]


def test_streamed_scoring_holds_less_than_the_whole_model():
    step = {"label": "fms-gates", "method": "fms", "options": {"queries": 1, "space": "gates"}}
    whole = simulate.simulate_step("tiny-llama-gqa", step, 1, 8, "float32")
    streamed = simulate.simulate_step("tiny-llama-gqa", dict(step, stream=True), 1, 8, "float32")
    assert streamed["streamed"] and not whole["streamed"]
    layers = whole["weights_bytes"] - streamed["weights_bytes"]  # decoder layers stay on the host when streamed
    assert layers > 0.5 * whole["weights_bytes"]
    # the device holds at most one decoder layer (of three) at a time
    assert streamed["peak_bytes"] < whole["peak_bytes"] - 0.6 * layers


def test_cli_prints_a_json_list_of_steps(capsys):
    argv = ["bench", "memory", "--simulate", "--json", "--model", "tiny-llama", "--batch", "2", "--seqlen", "8"]
    assert main([*argv, "--methods", "dense", "backprop", "fms-gates"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["dense", "backprop", "fms"]
    for r in rows:
        assert r["simulated"] is True and r["peak_gib"] > 0
        assert (r["model"], r["batch"], r["seqlen"], r["dtype"]) == ("tiny-llama", 2, 8, "float16")


@pytest.mark.slow
def test_h100_reference_figures_within_2_percent():
    """The H100 reference figures (docs/measurement.md): each predicted within 2% by the same simulation (no
    per-shape constants)."""
    rows = simulate.validate_h100()
    assert len(rows) == len(simulate.REFERENCE_H100) == 8
    for r in rows:
        assert abs(r["simulated_gib"] / r["reference_gib"] - 1) <= 0.02, r


@pytest.mark.slow
def test_committed_cpu_records_within_15_percent():
    rows = simulate.validate_cpu(REPO_ROOT / "results" / "cpu-full" / "memory")
    assert {r["step"] for r in rows} == set(simulate.CPU_LABELS)
    assert len(rows) == 8
    for r in rows:
        assert abs(r["error_pct"]) <= 15, r
