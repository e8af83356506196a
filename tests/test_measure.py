"""Measurement: the memory probe sees allocations; the latency bench produces complete records, times its variants
in interleaved rounds and puts each speed-up beside its FLOP ceiling."""

import json

import pytest
import torch

from minillm.artifact import experiments
from minillm.bench import measure
from minillm.bench.flops import latency_flops
from minillm.bench.measure import CPU_MALLOC_ENV, bench_latency, child_env, memory_in_subprocess
from minillm.prune import prune

PROBE = """
import json, torch
from minillm.bench.measure import peak_memory
with peak_memory("cpu") as small:
    a = torch.ones(1_000_000)  # 4 MB
    a.sum()
with peak_memory("cpu") as large:
    b = torch.ones(100_000_000)  # 400 MB, touched so it is resident
    b.sum()
print(json.dumps({"small": small.to_json(), "large": large.to_json()}))
"""


def test_peak_memory_sees_a_larger_allocation():
    # in a fresh process: in this one, memory freed by earlier tests may still be resident and get reused, so a new
    # 400 MB tensor need not raise the RSS at all
    import json
    import subprocess
    import sys

    from minillm.artifact.records import REPO_ROOT

    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=120
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = res["small"], res["large"]
    increase = lambda r: r["peak_bytes"] - r["baseline_bytes"]  # noqa: E731
    assert increase(large) > increase(small) + 300 * 2**20
    assert large["peak_bytes"] >= large["baseline_bytes"] > 0


def test_memory_step_in_fresh_process_dense_and_method():
    # one fresh process (its start, importing torch and transformers, is most of this test's time): the method step
    # goes through the child's command line and JSON; the dense step, the same `memory_step` with the same
    # arguments that the child would run, runs here
    dense = measure.memory_step("tiny-llama", "dense", 2, 16)
    taylor = memory_in_subprocess("tiny-llama", "taylor", 2, 16)
    assert "error" not in dense and "error" not in taylor, (dense, taylor)
    assert dense["peak_bytes"] > 0 and taylor["weights_bytes"] == dense["weights_bytes"]


def test_memory_step_measures_scoring_alone_where_the_method_has_a_scoring_step():
    from minillm.bench import measure

    fms = measure.memory_step("tiny-llama", "fms", 2, 8, options={"queries": 2, "allocation": "global"}, warmup=False)
    s = fms["scoring"]
    assert s["baseline_bytes"] == fms["baseline_bytes"] and 0 < s["peak_bytes"] <= fms["peak_bytes"]
    assert fms["increase_gib"] == round((fms["peak_bytes"] - fms["baseline_bytes"]) / 2**30, 4)
    bonsai = measure.memory_step("tiny-llama", "bonsai", 2, 8, sparsity=0.05, options={"masks_per_round": 2}, warmup=False)
    dense = measure.memory_step("tiny-llama", "dense", 2, 8, warmup=False)
    assert "scoring" not in bonsai and "scoring" not in dense  # one phase: scores and removes in one go
    assert measure._split_options({"queries": 2, "allocation": "global", "seed": 1, "compensate_bias": True}) == (
        {"queries": 2, "seed": 1},
        {"allocation": "global", "seed": 1, "compensate_bias": True},
    )
    assert not measure._separate_scoring("fms", {"stream_device": "cpu"})


def test_cpu_memory_children_return_freed_blocks_to_the_system():
    env = child_env("cpu")
    assert all(env[k] == v for k, v in CPU_MALLOC_ENV.items())
    assert "MALLOC_MMAP_THRESHOLD_" not in child_env("cuda") or "MALLOC_MMAP_THRESHOLD_" in __import__("os").environ


def test_latency_bench_record_has_every_field():
    res = bench_latency(
        "tiny-llama-gqa", [0.5], [(1, 8)], [1], prompt=4, new_tokens=3, repeats=3, include_24=True, bench_repeats=2
    )
    assert res["attn_implementation"] and res["dtype"] == "float32" and res["bench_repeats"] == 2
    dense, pruned, semi = res["rows"]
    assert semi["variant"] == "2:4" and "CUDA" in semi["semi_structured"]["reason"]
    assert pruned["achieved_sparsity"] > 0.4 and pruned["params"] < dense["params"]
    for row in res["rows"]:
        p, d = row["prefill"][0], row["decode"][0]
        for key in ("median_s", "iqr_s", "repeats", "tokens_per_s"):
            assert key in p and key in d
        assert d["cache"] == "static" and d["new_tokens"] == 3
        assert [len(t) for t in p["times_s"]] == [3, 3] and p["repeats"] == 6  # 3 rounds in each of 2 benches
    for row in (pruned, semi):
        for kind in ("prefill", "decode"):
            (x,), ((lo, hi),), (per_bench,) = (row[f"{kind}_speedup{k}"] for k in ("", "_ci95", "_per_bench"))
            assert lo <= x <= hi and len(per_bench) == 2
    assert pruned["prefill_ceiling"][0] > 1.5 and pruned["decode_ceiling"][0] > 1.5
    assert semi["prefill_ceiling"] == [1.0] and semi["decode_ceiling"] == [1.0]  # dense kernels: every multiply-add


def test_interleaved_rounds_rotate_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    times = measure._timed(fns, torch.device("cpu"), repeats=4)
    assert "".join(calls) == "ABC" + "BCA" + "CAB" + "ABC"
    assert all(len(t) == 4 for t in times.values())


def test_latency_times_its_models_interleaved_and_repeats_the_bench(tiny):
    calls = []
    models = {name: tiny("tiny-llama") for name in ("dense", "pruned")}
    for name, model in models.items():
        model.register_forward_pre_hook(lambda *_, name=name: calls.append(name[0]))
    out = measure.latency(models, [(1, 4)], [], 4, 2, repeats=3, warmup=1, bench_repeats=2)
    one_bench = "dp" + "dp" + "pd" + "dp"  # warm-up, then rounds in rotating order
    assert "".join(calls) == one_bench * 2
    assert [len(t) for t in out["pruned"]["prefill"][0]["times_s"]] == [3, 3]


def test_speedup_interval_over_paired_rounds():
    gen = torch.Generator().manual_seed(0)
    dense = [(1 + 0.3 * torch.rand(20, generator=gen)).tolist() for _ in range(2)]
    exact = measure.speedup(dense, [[t / 2 for t in rep] for rep in dense])
    assert exact["speedup"] == pytest.approx(2) and exact["ci95"] == pytest.approx([2, 2])
    assert exact["per_bench"] == pytest.approx([2, 2]) and exact["rounds"] == 40
    noisy = measure.speedup(dense, [(0.6 + 0.3 * torch.rand(20, generator=gen)).tolist() for _ in range(2)])
    lo, hi = noisy["ci95"]
    assert lo < noisy["speedup"] < hi
    with pytest.raises(ValueError, match="paired rounds"):
        measure.speedup(dense, [dense[0]])


def _hand_flops(model, batch: int, query: int, keys: int) -> float:
    """FLOPs of one forward pass over `query` new tokens attending to `keys` positions: 2 per multiply-add of every
    linear (the LM head included; the embedding is a lookup) and 4 * heads * query * keys * head_dim of attention
    per layer and sequence (scores and weighted values)."""
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = model.config.head_dim
    heads = [layer.self_attn.q_proj.out_features // head_dim for layer in model.model.layers]
    return 2 * linears * batch * query + sum(4 * batch * h * query * keys * head_dim for h in heads)


def test_flop_ceiling_matches_a_hand_count(tiny):
    dense, pruned = tiny("tiny-llama"), tiny("tiny-llama")
    prune(pruned, "random", 0.5, None, progress=False)
    prompt, new_tokens = 4, 3
    context = prompt + new_tokens // 2 + 1  # the counted step's keys: the cache and the new token
    for model in (dense, pruned):
        counted = latency_flops(model, [(2, 8)], [3], prompt, new_tokens)
        assert counted["prefill"] == [_hand_flops(model, 2, 8, 8)]
        step = _hand_flops(model, 3, 1, context)
        assert counted["decode"] == [_hand_flops(model, 3, prompt, prompt) + (new_tokens - 1) * step]
    hand = _hand_flops(dense, 2, 8, 8) / _hand_flops(pruned, 2, 8, 8)
    assert 1.5 < hand < 2.5


def test_latency_records_of_another_protocol_are_not_current(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    cfg = {
        "profile": "t",
        "model": "smollm2-135m",
        "latency": {
            "models": ["tiny-llama"],
            "dtype": "float32",
            "sparsities": [0.5],
            "prefill": [[1, 8]],
            "decode": {"batch": [1], "prompt": 4, "new_tokens": 3},
            "repeats": 3,
        },
    }
    path = experiments._latency_file("t", cfg["latency"], "tiny-llama", 1)
    config = experiments._latency_config(cfg, "tiny-llama", 1)
    assert config["protocol"] == measure.LATENCY_PROTOCOL and config["bench_repeats"] == measure.BENCH_REPEATS
    old = {k: v for k, v in config.items() if k not in ("protocol", "repeats", "bench_repeats", "include_24")}
    experiments.save_record(path, "latency", old, {"rows": []})
    assert not experiments.is_current(path, config)
    experiments.save_record(path, "latency", config, {"rows": []})
    assert experiments.is_current(path, config)
    cfg["latency"]["bench_repeats"] = 3
    assert not experiments.is_current(path, experiments._latency_config(cfg, "tiny-llama", 1))
    assert json.loads(path.read_text())["config"]["bench_repeats"] == measure.BENCH_REPEATS
