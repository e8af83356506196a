"""Measurement: the memory probe sees allocations; the latency bench produces complete records."""


from minillm.measure import CPU_MALLOC_ENV, bench_latency, child_env, memory_in_subprocess

PROBE = """
import json, torch
from minillm.measure import peak_memory
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

    from minillm.results import REPO_ROOT

    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=120
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = res["small"], res["large"]
    increase = lambda r: r["peak_bytes"] - r["baseline_bytes"]  # noqa: E731
    assert increase(large) > increase(small) + 300 * 2**20
    assert large["peak_bytes"] >= large["baseline_bytes"] > 0


def test_memory_step_in_fresh_process_dense_and_method():
    dense = memory_in_subprocess("tiny-llama", "dense", 2, 16)
    taylor = memory_in_subprocess("tiny-llama", "taylor", 2, 16)
    assert "error" not in dense and "error" not in taylor, (dense, taylor)
    assert dense["peak_bytes"] > 0 and taylor["weights_bytes"] == dense["weights_bytes"]


def test_cpu_memory_children_return_freed_blocks_to_the_system():
    env = child_env("cpu")
    assert all(env[k] == v for k, v in CPU_MALLOC_ENV.items())
    assert "MALLOC_MMAP_THRESHOLD_" not in child_env("cuda") or "MALLOC_MMAP_THRESHOLD_" in __import__("os").environ


def test_latency_bench_record_has_every_field():
    res = bench_latency("tiny-llama-gqa", [0.5], [(1, 8)], [1], prompt=4, new_tokens=3, repeats=3, include_24=True)
    assert res["attn_implementation"] and res["dtype"] == "float32"
    dense, pruned, semi = res["rows"]
    assert semi["variant"] == "2:4" and "CUDA" in semi["semi_structured"]["reason"]
    assert pruned["achieved_sparsity"] > 0.4 and pruned["params"] < dense["params"]
    for row in res["rows"]:
        p, d = row["prefill"][0], row["decode"][0]
        for key in ("median_s", "iqr_s", "repeats", "tokens_per_s"):
            assert key in p and key in d
        assert d["cache"] == "static" and d["new_tokens"] == 3
    assert len(pruned["prefill_speedup"]) == 1 and len(pruned["decode_speedup"]) == 1
