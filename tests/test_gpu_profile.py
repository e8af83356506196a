"""The gpu profile exercised in CI: every section of configs/gpu.yaml runs through the same
experiment drivers, with the sizes shrunk (tiny models, a few tokens, a few queries / masks / steps) and a fake GPU
(minillm.device.FakeCuda, the CPU standing in for CUDA) so that every CUDA branch runs: peak-memory statistics,
synchronisation, bf16 autocast in recovery, the 2:4 conversion, the OOM capacity.

Shrinking keeps the structure: every section, every method entry, every label, every option key, both KL weights,
every latency variant. It changes sizes only: the text model becomes a tiny random LLaMA (GQA, SmolLM2's head
layout) saved with a tiny BPE tokenizer into a local model directory (`tiny_text_model_dir`, tests/conftest.py);
the 7B-class shape models become the tiny registry model of the same family and attention layout; sparsity lists
keep their first two values. A section this test does not know how to run, or a shape model without a tiny
counterpart, fails the test.

Two stand-ins keep it in CI time, both recorded: lm-eval's zero-shot runs for real once (the first call, ~6 s of
task set-up) and later calls are answered by a stand-in that checks the arguments; each memory step runs
`measure.memory_step` in this process instead of a fresh one (the fake GPU does not cross process boundaries).
A section whose shrunk inputs equal those of the gpu profile runs in the gpu case only (`sections_to_run`).
"""

from __future__ import annotations

import copy

import pytest
import torch

from minillm import device as mdevice
from minillm import evaluate
from minillm.artifact import experiments, report
from minillm.bench import measure

SECTION_RUNNERS = {
    "accuracy": lambda cfg: experiments.run_accuracy(cfg, experiment="accuracy"),
    "ablations": lambda cfg: experiments.run_accuracy(cfg, experiment="ablations"),
    "calibration_budget": lambda cfg: experiments.run_accuracy(cfg, experiment="calibration_budget"),
    "recovery": experiments.run_recovery,
    "memory": experiments.run_memory,
    "latency": experiments.run_latency,
    "fms_diagnostics": experiments.run_fms_diagnostics,
}
TOP_LEVEL = {"description", "model", "device", "dtype", "profile", "requires_hub"}

# sizes of the shrunk profile
SMALL = {"n_samples": 2, "calib_seqlen": 16, "ppl_seqlen": 16, "windows": 2, "batch": 2, "queries": 2, "masks": 2}


def tiny_counterpart(shape_name: str) -> str:
    """The tiny registry model with the family and attention layout of a shape model (MHA, GQA, MQA)."""
    from minillm.models import SHAPES

    if shape_name.startswith("tiny-"):
        return shape_name
    if shape_name not in SHAPES:
        raise AssertionError(f"{shape_name!r} is not a registry shape; the CI run has no tiny stand-in for it")
    config = SHAPES[shape_name]()
    kind = config.model_type
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    table = {
        ("llama", "mha"): "tiny-llama",
        ("llama", "gqa"): "tiny-llama-gqa",
        ("llama", "mqa"): "tiny-llama-mqa",
        ("opt", "mha"): "tiny-opt",
        ("bloom", "mha"): "tiny-bloom",
        ("gemma3_text", "mqa"): "tiny-gemma3",
    }
    layout = "mha" if kv == heads else ("mqa" if kv == 1 else "gqa")
    if (kind, layout) not in table:
        raise AssertionError(f"no tiny stand-in for {shape_name!r} ({kind}, {layout}); add one to the registry")
    return table[(kind, layout)]


def _shrink_options(options: dict) -> dict:
    out = dict(options)
    if "queries" in out:
        out["queries"] = min(out["queries"], SMALL["queries"])
    if "masks_per_round" in out:
        out["masks_per_round"] = SMALL["masks"]
    if "windows_per_round" in out and out["windows_per_round"]:
        out["windows_per_round"] = min(out["windows_per_round"], SMALL["n_samples"])
    return out


def _shrink_entry(entry: dict) -> dict:
    out = dict(entry)
    if "options" in out:
        out["options"] = _shrink_options(out["options"])
    if "calibration" in out:
        c = dict(out["calibration"])
        c.update({k: min(c[k], v) for k, v in (("n_samples", SMALL["n_samples"]), ("seqlen", SMALL["calib_seqlen"]))
                  if k in c})
        out["calibration"] = c
    if "sparsities" in out:
        out["sparsities"] = out["sparsities"][:2]
    return out


def _shrink_text_section(exp: dict) -> dict:
    exp = copy.deepcopy(exp)
    if "calibration" in exp:
        exp["calibration"].update(n_samples=SMALL["n_samples"], seqlen=SMALL["calib_seqlen"])
    for key in ("perplexity",):
        if key in exp:
            exp[key].update(seqlen=SMALL["ppl_seqlen"], windows=SMALL["windows"], batch_size=SMALL["batch"])
    if "zeroshot" in exp:
        exp["zeroshot"].update(limit=1, batch_size=SMALL["batch"])
    if "sparsities" in exp:
        exp["sparsities"] = exp["sparsities"][:2]
    if "methods" in exp:
        exp["methods"] = [m if isinstance(m, str) else _shrink_entry(m) for m in exp["methods"]]
    if "train" in exp:
        exp["train"].update(windows=4, seqlen=SMALL["calib_seqlen"], steps=2, batch_size=SMALL["batch"])
    return exp


def shrink_profile(cfg: dict, model_dir: str) -> dict:
    """The profile with every section kept and every size shrunk (see the module docstring)."""
    unknown = set(cfg) - TOP_LEVEL - set(SECTION_RUNNERS)
    if unknown:
        raise AssertionError(f"gpu profile sections without a CI runner: {sorted(unknown)}; add them to this test")
    out = copy.deepcopy(cfg)
    out.update(model=model_dir, device="cpu", profile=f"ci-{cfg['profile']}")
    for name in ("accuracy", "ablations", "calibration_budget", "recovery", "fms_diagnostics"):
        if name in out:
            out[name] = _shrink_text_section(out[name])
    if "recovery" in out and "accuracy" in out:
        # one recovery sparsity, also pruned by the accuracy run: the recovery rebuilds that record's pruned model
        # where it can (and prunes again where it cannot: FLAP's compensated biases are not in the record)
        first = cfg["recovery"]["sparsities"][0]
        out["recovery"]["sparsities"] = [first]
        out["accuracy"]["sparsities"] = sorted({cfg["accuracy"]["sparsities"][0], first})
    if "memory" in out:
        mem = out["memory"]
        mem["models"] = list(dict.fromkeys(tiny_counterpart(m) for m in mem["models"]))
        mem["shapes"] = [[SMALL["batch"], 8]]
        mem["methods"] = [_shrink_entry(m) for m in mem["methods"]]
    if "latency" in out:
        lat = out["latency"]
        lat["models"] = list(dict.fromkeys(tiny_counterpart(m) for m in lat["models"]))
        lat["prefill"] = list(map(list, dict.fromkeys((min(b, 2), 8) for b, _ in lat["prefill"])))
        lat["decode"] = {"batch": sorted({min(b, 2) for b in lat["decode"]["batch"]}), "prompt": 4, "new_tokens": 2}
        lat["repeats"] = 2
        lat["sparsities"] = lat["sparsities"][:2]
    return out


@pytest.fixture
def ci_run(tmp_path, monkeypatch):
    """Results into tmp_path, a fake GPU, in-process memory steps, zero-shot for real once."""
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and far faster on a loaded machine
    fake = mdevice.FakeCuda(capability=(9, 0), cusparselt=True)
    old = mdevice.use(fake)
    steps = []

    def in_process(model_name, method, batch, seqlen, dtype="float32", device="cpu", sparsity=0.2, options=None,
                   timeout_s=0):
        steps.append((model_name, method))
        return measure.memory_step(model_name, method, batch, seqlen, dtype, device, sparsity, options, warmup=False)

    monkeypatch.setattr(measure, "memory_in_subprocess", in_process)
    real_zeroshot, zs_calls = evaluate.zeroshot, []

    def zeroshot(model, tok, tasks=None, limit=None, batch_size=8, **options):
        zs_calls.append((tasks, limit, batch_size))
        if len(zs_calls) == 1:
            return real_zeroshot(model, tok, tasks=tasks, limit=limit, batch_size=batch_size, **options)
        assert limit == 1 and tok is not None
        return {"average": 0.5, "stand_in": True}

    monkeypatch.setattr(experiments, "zeroshot", zeroshot)
    yield {"fake": fake, "steps": steps, "zeroshot": zs_calls, "results": tmp_path}
    mdevice.use(old)
    torch.set_num_threads(threads)


# the profiles of this test, in order; a later one runs only the sections whose inputs differ from every earlier one's
PROFILES = ["gpu", "gpu-full"]
# what a section's run depends on besides its own settings (recovery rebuilds the accuracy section's pruned models)
DEPENDS = {"recovery": ("accuracy",)}


def section_inputs(cfg: dict, section: str) -> dict:
    """Everything a section's run reads from the shrunk profile: its settings, the sections it depends on, and the
    profile's model, device and dtype (not its name or description, which only name the results folder)."""
    keys = (section, *DEPENDS.get(section, ()), "model", "device", "dtype")
    return {k: cfg.get(k) for k in keys}


def sections_to_run(profile: str, cfg: dict, model_dir: str) -> list[str]:
    """The sections of `cfg` (the shrunk `profile`) that no earlier profile in PROFILES runs with the same inputs.
    gpu-full is gpu with more Bonsai sparsities and recovery methods: after shrinking, its ablations, memory and
    latency sections equal gpu's, so they run (and are checked) once, in the gpu case; a change that makes them
    differ makes this test run them for gpu-full too."""
    earlier = [shrink_profile(experiments.load_profile(p), model_dir) for p in PROFILES[: PROFILES.index(profile)]]
    return [
        s for s in SECTION_RUNNERS
        if s in cfg and all(section_inputs(e, s) != section_inputs(cfg, s) for e in earlier)
    ]


@pytest.mark.parametrize("profile", PROFILES)
def test_shrunk_gpu_profile_runs_every_section(profile, tiny_text_model_dir, ci_run):
    gpu = experiments.load_profile(profile)
    cfg = shrink_profile(gpu, tiny_text_model_dir)
    from minillm.artifact.profiles import validate_profile

    validate_profile(cfg, "shrunk gpu profile")  # the shrunk profile is still a valid profile
    assert set(cfg) - TOP_LEVEL == set(gpu) - TOP_LEVEL  # no section dropped
    run = sections_to_run(profile, cfg, tiny_text_model_dir)
    assert run and (profile != PROFILES[0] or run == [s for s in SECTION_RUNNERS if s in cfg])
    for section in run:
        records = SECTION_RUNNERS[section](cfg)
        wanted = experiments.expected_records(cfg, section)
        assert len(records) == len(wanted) > 0, section
        for path, config in wanted.items():
            assert path.exists() and experiments.is_current(path, config), f"{section}: {path.name} missing"
    fake, results = ci_run["fake"], ci_run["results"] / cfg["profile"]
    # the CUDA branches ran on the fake GPU
    assert fake.calls.get("reset_peak", 0) > 0 and fake.calls.get("synchronize", 0) > 0
    if "recovery" in run:
        assert fake.calls.get("autocast", 0) > 0
        recs = [experiments.load_record(p) for p in sorted((results / "recovery").glob("*.json"))]
        assert all(r["metrics"]["recovery"]["bf16"] for r in recs)
        assert {r["config"]["kl_weight"] for r in recs} == set(cfg["recovery"]["kl_weights"])
    if "latency" in run and cfg["latency"].get("include_24"):
        assert fake.requested_backends and set(fake.requested_backends) == {"cusparselt"}  # Hopper: cuSPARSELt
    if "latency" in run and cfg["latency"].get("compile") == "all":
        assert fake.calls.get("compile", 0) > 0
    # every memory step of every (model, shape) ran, none failed
    mem = [experiments.load_record(p) for p in sorted((results / "memory").glob("*.json"))]
    for rec in mem:
        rows = [rec["metrics"]["dense_forward"], *rec["metrics"]["methods"]]
        assert not [r for r in rows if r.get("error")], [r.get("error") for r in rows if r.get("error")]
        assert rec["provenance"]["device"] == "Fake H100 (CPU)"
    assert len(ci_run["steps"]) == (
        sum(len(cfg["memory"]["shapes"]) * (1 + len(cfg["memory"]["methods"])) for _ in cfg["memory"]["models"])
        if "memory" in run else 0
    )
    if {"accuracy", "ablations", "recovery"} & set(run):
        assert ci_run["zeroshot"], "no zero-shot evaluation ran"
    # the report renders every section that ran from the records, as the notebooks do
    frames = {"memory": report.memory_frame, "latency": report.latency_frame, "accuracy": report.accuracy_frame,
              "recovery": report.recovery_frame}
    for section, frame in frames.items():
        if section in run:
            frame([experiments.load_record(p) for p in sorted((results / section).glob("*.json"))])


def test_shrinking_refuses_unknown_sections_and_models():
    with pytest.raises(AssertionError, match="without a CI runner"):
        shrink_profile({"profile": "x", "model": "m", "pruning_party": {}}, "dir")
    with pytest.raises(AssertionError, match="not a registry shape"):
        tiny_counterpart("gpt-5-shape")
    assert tiny_counterpart("llama3-8b-shape") == "tiny-llama-gqa"
    assert tiny_counterpart("llama-7b-shape") == "tiny-llama"
