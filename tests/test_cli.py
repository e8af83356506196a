"""The command line: prune writes a reloadable directory and reports; bad input gives a clear error."""

import json
import re

import torch

import minillm
from minillm.__main__ import main, parse_layers


def test_parse_layers():
    assert parse_layers("0-3,28,29") == [0, 1, 2, 3, 28, 29]
    assert parse_layers(None) == []


def test_prune_cli_on_tiny_model(tmp_path, capsys):
    out = tmp_path / "p"
    rc = main(
        [
            "prune",
            "--model",
            "tiny-llama-gqa",
            "--method",
            "fms",
            "--sparsity",
            "0.3",
            "--out",
            str(out),
            "--queries",
            "2",
            "--calib-samples",
            "2",
            "--calib-seqlen",
            "8",
            "--quiet",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0.2 < summary["achieved_sparsity"] < 0.4 and summary["peak_memory_gib"] > 0
    model, _ = minillm.load_pruned(out)
    assert minillm.pruning_state(model).plan.options["queries"] == 2
    assert minillm.pruning_state(model).plan.calibration["n_samples"] == 2
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_cli_errors_are_clear(tmp_path, capsys):
    rc = main(
        ["prune", "--model", "tiny-llama", "--method", "random", "--sparsity", "1.2", "--out", str(tmp_path / "x")]
    )
    assert rc == 2 and "sparsity must be in [0, 1)" in capsys.readouterr().err
    rc = main(["prune", "--model", "nope", "--method", "random", "--sparsity", "0.2", "--out", str(tmp_path / "x")])
    assert rc == 2 and "unknown model 'nope'" in capsys.readouterr().err


def test_bench_latency_prints_each_speedup_with_its_interval_and_ceiling(capsys):
    args = ["bench", "latency", "--model", "tiny-llama", "--sparsities", "0.5", "--prefill", "1x8", "--prompt", "4"]
    args += ["--new-tokens", "3", "--repeats", "3", "--bench-repeats", "2", "--device", "cpu"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["structured 0.50 prefill 1x8", "structured 0.50 decode b1"]
    for line in lines:
        speed, lo, hi, ceiling = (float(x) for x in re.findall(r"(\d+\.\d+)x?", line.split(":", 1)[1]))
        assert lo <= speed <= hi and 1.5 < ceiling < 2.5
