"""What a pruned output carries and what loading it checks: the weights belong to the plan, floating-point weights
stay floating point, every field of pruning.json is under its checksum, the source's terms travel with the output,
base_model is absolute; and what a kill leaves (the model cache, lm-eval task folders), what a mount point as --out
does."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillm
from minillm.__main__ import main
from minillm.artifact.records import REPO_ROOT
from minillm.files import OutputDirError
from minillm.plan import PlanError, plan_checksum
from minillm.state import set_source


def _saved(tmp_path, name="p", model="tiny-llama", sparsity=0.2):
    m, _ = minillm.load_model(model)
    plan = minillm.prune(m, "magnitude", sparsity, progress=False)
    return minillm.save_pruned(m, plan, tmp_path / name)


def _plan(directory) -> dict:
    return json.loads((Path(directory) / "pruning.json").read_text())


def _killed_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a SIGKILLed run leaves behind."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. the weights belong to the plan -------------------------------------------------------------------------------


def test_weights_of_another_model_with_the_same_widths_are_refused(tmp_path):
    a = _saved(tmp_path, "a")
    digest = "sha256:" + hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest()
    other, _ = minillm.load_pruned(a)  # same plan, same widths, other weights
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    b = minillm.save_pruned(other, minillm.pruning_state(other).plan, tmp_path / "b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(PlanError, match=r"a/model.safetensors does not belong to .*a/pruning.json.*SHA-256"):
        minillm.load_pruned(a)
    minillm.load_pruned(b)  # its own weights load
    assert _plan(a)["weights_sha256"] == digest  # of the file's bytes


# --- 2. integer tensors are not cast into float weights --------------------------------------------------------------


def test_an_integer_tensor_in_place_of_a_float_weight_is_refused(tmp_path):
    out = _saved(tmp_path)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    name = "model.layers.0.mlp.down_proj.weight"
    state[name] = torch.ones_like(state[name], dtype=torch.int32)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(PlanError, match=rf"{name} is int32, float32 expected"):
        minillm.load_pruned(out)


# --- 3. every field of pruning.json is under the checksum -----------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("prunable_params_original", 10**9), ("base_model", "smollm2-135m"), ("sparsity", 0.9), ("weights_sha256", None)],
)
def test_an_edited_field_outside_the_indices_is_caught(tmp_path, field, value):
    out = _saved(tmp_path)
    d = _plan(out)
    d[field] = value
    (out / "pruning.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="checksum mismatch"):
        minillm.load_pruned(out)


def test_a_format_1_file_loads_with_a_warning_and_a_newer_format_is_named(tmp_path):
    out = _saved(tmp_path)
    d = _plan(out)
    old = {k: v for k, v in d.items() if k != "weights_sha256"}
    old.update(format_version=1, checksum=plan_checksum(d["architecture"], d["layers"]))
    (out / "pruning.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="format 1.*save it again"):
        minillm.load_pruned(out)
    old["layers"][0], old["layers"][1] = old["layers"][1], old["layers"][0]
    (out / "pruning.json").write_text(json.dumps(old))
    with pytest.raises(PlanError, match="checksum mismatch"):  # the old checksum is still checked
        minillm.load_pruned(out)
    (out / "pruning.json").write_text(json.dumps({**d, "format_version": 3}))
    with pytest.raises(PlanError, match="unsupported format_version 3.*newer minillm"):
        minillm.load_pruned(out)


# --- 4. a killed conversion leaves nothing in the model cache --------------------------------------------------------


def test_leftovers_of_killed_conversions_are_removed_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "smollm2-135m").mkdir(parents=True)
    (cache / "smollm2-135m" / "model.safetensors").write_text("complete")
    leftovers = [
        cache / ".gemma3-270m.new",  # a Gemma conversion killed while writing
        cache / ".smollm2-135m.new",
        cache / f".gemma3-gguf-pid{_killed_pid()}.abcd_123",  # the joined GGUF of that conversion
    ]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 4096)
    running = cache / f".gemma3-gguf-pid{os.getpid()}.live_123"  # a conversion still running keeps its files
    running.mkdir()
    monkeypatch.setenv("MINILLM_CACHE", str(cache))
    assert minillm.models.smollm2_checkpoint() == cache / "smollm2-135m"
    assert sorted(p.name for p in cache.iterdir()) == [running.name, "smollm2-135m"]
    assert (cache / "smollm2-135m" / "model.safetensors").read_text() == "complete"


def test_a_killed_conversion_never_leaves_a_partial_model_in_place(tmp_path, monkeypatch):
    """SIGKILL while the converted model is written: the cache holds no `smollm2-135m` (a later run would take a
    half-written one for complete), only the staging sibling, which the next look-up removes."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""\
        import time, types
        from pathlib import Path
        import transformers
        import minillm.models as m
        m.smollm2_gguf_path = lambda: Path({str(tmp_path)!r}) / "fake.gguf"
        def save(path):
            (Path(path) / "model.safetensors").write_bytes(b"0" * 100000)
            print("writing", flush=True)
            time.sleep(60)
        fake = types.SimpleNamespace(config=types.SimpleNamespace(), save_pretrained=save)
        transformers.AutoTokenizer.from_pretrained = lambda *a, **k: fake
        transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: fake
        m.smollm2_checkpoint()
        """
    )
    (tmp_path / "fake.gguf").write_bytes(b"gguf")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MINILLM_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (cache / "smollm2-135m").exists() and (cache / ".smollm2-135m.new").is_dir()
    monkeypatch.setenv("MINILLM_CACHE", str(cache))
    minillm.models.clear_interrupted_conversions()
    assert list(cache.iterdir()) == []


# --- 5. a killed evaluation's lm-eval task folder is removed by the next ---------------------------------------------


class _Stop(Exception):
    pass


def test_the_task_folder_of_a_killed_evaluation_is_removed_by_the_next(tmp_path, monkeypatch):
    script = textwrap.dedent(
        """\
        import time, torch
        import minillm.evaluate as ev, minillm.loglikelihood as ll
        ll.ContinuationHFLM = lambda **kw: None
        def write(folder, specs):
            (folder / "task.yaml").write_text("x")
            print(folder, flush=True)
            time.sleep(60)
        ev.write_task_dir = write
        ev.zeroshot(torch.nn.Linear(1, 1), None, tasks=None)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        folder = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert folder.parent == tmp_path and (folder / "task.yaml").exists()  # SIGKILL skips every clean-up

    import minillm.evaluate as ev
    import minillm.loglikelihood as ll

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ll, "ContinuationHFLM", lambda **kw: None)
    seen = []

    def stop(folder, specs):
        seen.append(folder)
        raise _Stop

    monkeypatch.setattr(ev, "write_task_dir", stop)
    with pytest.raises(_Stop):
        ev.zeroshot(torch.nn.Linear(1, 1), None)
    assert not folder.exists() and seen[0].parent == tmp_path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("minillm-tasks-")]  # its own one is removed too


# --- 6. the terms of the source model travel with the pruned output --------------------------------------------------


def test_gemma_terms_are_copied_into_the_pruned_output_and_the_next(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "gemma3-270m").mkdir(parents=True)
    (cache / "gemma3-270m" / "GEMMA_TERMS.html").write_text("Gemma Terms of Use")
    monkeypatch.setenv("MINILLM_CACHE", str(cache))
    model, _ = minillm.load_model("tiny-gemma3")
    set_source(model, "gemma3-270m")  # as load_model("gemma3-270m") records it, without the 1 GB model
    one = minillm.save_pruned(model, minillm.prune(model, "magnitude", 0.2, progress=False), tmp_path / "one")
    assert (one / "GEMMA_TERMS.html").read_text() == "Gemma Terms of Use"
    assert "GEMMA_TERMS.html" in json.loads((one / ".minillm-manifest.json").read_text())["files"]
    (cache / "gemma3-270m" / "GEMMA_TERMS.html").unlink()  # pruned again elsewhere: the loaded output carries them
    again, _ = minillm.load_pruned(one)
    two = minillm.save_pruned(again, minillm.prune(again, "magnitude", 0.4, progress=False), tmp_path / "two")
    assert (two / "GEMMA_TERMS.html").read_text() == "Gemma Terms of Use"


def test_licence_files_of_a_local_source_directory_are_copied(tmp_path):
    model, _ = minillm.load_model("tiny-llama")
    model.save_pretrained(tmp_path / "dense")
    for name in ("LICENSE", "NOTICE.md", "USE_POLICY.md"):
        (tmp_path / "dense" / name).write_text(name)
    (tmp_path / "dense" / "README.md").write_text("not a notice")
    dense, _ = minillm.load_model(str(tmp_path / "dense"))
    out = minillm.save_pruned(dense, minillm.prune(dense, "magnitude", 0.2, progress=False), tmp_path / "out")
    assert all((out / name).read_text() == name for name in ("LICENSE", "NOTICE.md", "USE_POLICY.md"))
    assert not (out / "README.md").exists()


# --- 7. base_model is absolute for local directories ----------------------------------------------------------------


def test_base_model_of_a_local_directory_is_absolute(tmp_path, monkeypatch):
    model, _ = minillm.load_model("tiny-llama")
    model.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    dense, _ = minillm.load_model("base")
    out = minillm.save_pruned(dense, minillm.prune(dense, "magnitude", 0.2, progress=False), tmp_path / "p")
    assert _plan(out)["base_model"] == str(tmp_path / "base")
    assert _plan(_saved(tmp_path, "q"))["base_model"] == "tiny-llama"  # registry names as given


# --- 8. a mount point as --out is refused before any work ------------------------------------------------------------


def test_a_mount_point_as_out_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    mount = tmp_path / "mnt"
    mount.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount or real(p))
    monkeypatch.setattr(minillm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.2", "--out", str(mount)]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mount point" in err and str(mount / "model") in err
    model, _ = minillm.models.load_model("tiny-llama")  # (minillm.load_model is the stub above)
    with pytest.raises(OutputDirError, match="mount point"):
        minillm.save_pruned(model, minillm.prune(model, "magnitude", 0.2, progress=False), mount)
