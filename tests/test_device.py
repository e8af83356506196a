"""CUDA branches exercised on CPU through a fake backend (minillm.device): 2:4 kernel choice and failed conversion
on Hopper, out-of-memory steps recorded and shown, the latency compile policy recorded."""

import pytest
import torch

import minillm
from minillm import device as mdevice
from minillm.bench import measure
from minillm.artifact import report
from minillm.semi_structured import stored_parameters, to_semi_structured


FakeCuda = mdevice.FakeCuda  # the fake GPU lives in minillm.device (the gpu-profile CI run uses it too)


@pytest.fixture
def fake_cuda():
    installed = []

    def install(**kw):
        fake = FakeCuda(**kw)
        installed.append(mdevice.use(fake))
        return fake

    yield install
    if installed:
        mdevice.use(installed[0])


@pytest.mark.parametrize(
    "capability,cusparselt,requested,expected",
    [
        ((9, 0), True, "auto", "cusparselt"),
        ((9, 0), False, "auto", None),  # Hopper: CUTLASS kernels do not exist for sm90
        ((9, 0), True, "cutlass", None),
        ((8, 0), False, "auto", "cutlass"),
        ((8, 6), True, "auto", "cusparselt"),
        ((8, 0), True, "cutlass", "cutlass"),
        ((7, 5), True, "auto", None),
    ],
)
def test_semi_structured_backend_choice(capability, cusparselt, requested, expected):
    assert mdevice.semi_structured_backend(capability, cusparselt, requested) == expected


def _pruned_24(tiny):
    model = tiny("tiny-llama", dtype=torch.float16)
    minillm.prune(model, "magnitude_24", 0.5, None, progress=False)
    return model


def test_hopper_conversion_failure_is_recorded_and_weights_stay_dense(tiny, fake_cuda):
    fake = fake_cuda(capability=(9, 0), convert_error=RuntimeError("CUTLASS kernel not available for sm90"))
    model = _pruned_24(tiny)
    before = [p.detach().clone() for p in model.parameters()]
    out = to_semi_structured(model)
    assert out["converted"] == 0 and out["backend"] == "cusparselt" and "conversion failed" in out["reason"]
    assert fake.requested_backends and set(fake.requested_backends) == {"cusparselt"}
    assert all(type(p.data) is torch.Tensor and torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # the 2:4 model stores half of its linear weights
    linear = sum(lin.weight.numel() for layer in model.model.layers for lin in (layer.mlp.up_proj,))
    assert stored_parameters(model) < measure.count_parameters(model) - linear // 2


def test_hopper_without_cusparselt_says_why(tiny, fake_cuda):
    fake_cuda(capability=(9, 0), cusparselt=False)
    out = to_semi_structured(_pruned_24(tiny))
    assert out["converted"] == 0 and "sm90" in out["reason"]


def test_conversion_on_a_supported_gpu_uses_the_chosen_backend(tiny, fake_cuda):
    fake = fake_cuda(capability=(8, 0), cusparselt=False)
    out = to_semi_structured(_pruned_24(tiny))
    assert out["converted"] > 0 and out["backend"] == "cutlass" and out["reason"] is None
    assert set(fake.requested_backends) == {"cutlass"}


def test_latency_goes_on_after_a_failed_24_conversion(fake_cuda):
    fake_cuda(capability=(9, 0), convert_error=RuntimeError("boom"))
    res = measure.bench_latency(
        "tiny-llama", [], [(1, 8)], [1], 4, 2, repeats=2, dtype="float32", device="cpu", include_24=True
    )
    assert res["compile"] == "none"
    row = res["rows"][-1]
    assert row["variant"] == "2:4" and row["semi_structured"]["converted"] == 0
    assert row["prefill"] and row["params_stored"] < row["params"]


def test_latency_records_the_compile_policy(tiny):
    model = tiny("tiny-llama")
    out = measure.latency({"dense": model}, [(1, 8)], [1], 4, 2, repeats=2, warmup=1)
    assert out["dense"]["compile"] == "none"
    with pytest.raises(ValueError):
        measure.latency({"dense": model}, [(1, 8)], [1], 4, 2, compile="sometimes")
    assert measure._generate_compile_kwargs("none") == {"disable_compile": True}
    assert measure._generate_compile_kwargs("all")["compile_config"]._compile_all_devices


def test_out_of_memory_is_a_result(monkeypatch, fake_cuda):
    fake_cuda(total=80 * 10**9)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    import importlib

    monkeypatch.setattr(importlib.import_module("minillm.prune"), "prune", oom)
    res = measure.memory_step("tiny-llama", "taylor", 2, 8, warmup=False)
    assert res["oom"] is True and res["capacity_gib"] == pytest.approx(74.51, abs=0.01)
    assert "out of memory" in res["error"][0]


def test_report_keeps_out_of_memory_rows():
    record = {
        "provenance": {"device": "NVIDIA H100 80GB HBM3"},
        "metrics": {
            "model": "llama3-8b-shape",
            "batch": 4,
            "seqlen": 2048,
            "dtype": "float16",
            "dense_forward": {"peak_gib": 25.9, "increase_gib": 10.9},
            "methods": [
                {"label": "fms", "peak_gib": 16.0, "ratio_to_dense_forward": 0.62, "increase_gib": 1.0},
                {"label": "taylor", "oom": True, "capacity_gib": 79.19, "error": ["out of memory: ..."]},
            ],
        },
    }
    assert "scoring_ratio" not in report.memory_frame([record])  # no record measured scoring apart: no column
    fms = record["metrics"]["methods"][0]
    fms.update(scoring={"peak_gib": 14.0}, scoring_ratio_to_dense_forward=0.54)
    df = report.memory_frame([record])
    assert df.set_index("method").loc["fms", ["scoring_peak_gib", "scoring_ratio"]].tolist() == [14.0, 0.54]
    assert list(df["method"]) == ["dense forward", "fms", "taylor"]
    assert df.loc[df["method"] == "taylor", "status"].item() == "out of memory (79.19 GiB device)"
    fig = report.plot_memory(df)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "OOM" in labels


def test_hub_and_local_models_load_straight_onto_the_accelerator(monkeypatch, tmp_path):
    """A non-CPU device becomes from_pretrained's device_map (no fp32 CPU copy first); the dtype is passed through."""
    import transformers

    from minillm import models

    seen = {}

    def fake_from_pretrained(path, **kw):
        seen.update(kw)
        return models.build_random("tiny-llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake_from_pretrained))
    models._from_pretrained(str(tmp_path), torch.bfloat16, "cuda:1", None)
    assert seen["device_map"] == "cuda:1" and seen["dtype"] == torch.bfloat16
    seen.clear()
    models._from_pretrained(str(tmp_path), None, "cpu", None)
    assert "device_map" not in seen


def test_load_pruned_builds_in_the_target_dtype_without_random_init(tiny, tmp_path, monkeypatch):
    model = tiny("tiny-llama")
    plan = minillm.prune(model, "magnitude", 0.3, None, progress=False)
    minillm.save_pruned(model, plan, tmp_path / "p")
    calls = []
    monkeypatch.setattr(torch.nn.init, "normal_", lambda *a, **k: calls.append(1))
    loaded, _ = minillm.load_pruned(tmp_path / "p", dtype=torch.bfloat16)
    assert not calls  # no random initialisation of the full model
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = loaded.float()(input_ids=ids).logits
    assert torch.allclose(ref, got, atol=0.1, rtol=0.05)


CUDA_ONLY = ("torch.cuda.", "torch.compile", "torch.autocast", "torch.backends.cusparselt", "to_sparse_semi_structured")


def _dotted(node) -> str:
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_cuda_only_call_outside_the_device_interface():
    """Every CUDA-only call of the package goes through minillm.device (so FakeCuda reaches every branch): no
    torch.cuda.*, torch.compile, torch.autocast or semi-structured conversion in any other module (code, not
    docstrings, is checked)."""
    import ast
    from pathlib import Path

    root = Path(mdevice.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "device.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = ""
            if isinstance(node, ast.Attribute):
                name = _dotted(node)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                name = " ".join([getattr(node, "module", "") or "", *names])
            if any(name.startswith(c) or c in name.split(" ") for c in CUDA_ONLY) or name.startswith("torch.cuda"):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {name}")
    assert not found, "CUDA-only calls outside minillm/device.py:\n" + "\n".join(sorted(set(found)))


def test_fake_cuda_reaches_recovery_autocast_and_the_compile_policy(tiny, fake_cuda):
    fake = fake_cuda()
    model = tiny("tiny-llama")
    windows = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    from minillm.recover import recover

    _, rec = recover(model, windows, steps=2, batch_size=2, lr=1e-4, progress=False)
    assert rec["bf16"] is True and fake.calls["autocast"] >= 2
    out = measure.latency({"dense": tiny("tiny-llama")}, [(1, 8)], [], 4, 2, repeats=2, warmup=1, compile="all")
    assert out["dense"]["compile"] == "all" and fake.calls["compile"] == 1 and fake.calls["synchronize"] > 0
    assert minillm.provenance.device_name("cpu") == "Fake H100 (CPU)"
