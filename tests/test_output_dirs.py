"""Output directories: minillm replaces only the files it wrote (its manifest) and keeps every other file; the model
cache and the input model are never an output; a kill at any step of a save leaves the old output or the complete
new one, and the next save clears what it left; concurrent writers fail clearly; the bytes and modes are normal."""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import minillm
import minillm.files as files
from minillm.__main__ import main
from minillm.files import MANIFEST, OutputDirError, atomic_directory, is_minillm_output, replace_directory


def _prune_cli(out, *extra, model="tiny-llama", sparsity="0.2"):
    args = ["prune", "--model", str(model), "--method", "magnitude", "--sparsity", sparsity, "--out", str(out)]
    return main([*args, "--quiet", *extra])


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


USER_FILES = {"eval.json": '{"ppl": 12.5}', "figs/curve.png": "png", ".notes": "hidden notes"}


def _add_user_files(directory):
    for name, text in USER_FILES.items():
        (directory / name).parent.mkdir(exist_ok=True)
        (directory / name).write_text(text)


def _has_user_files(*places):
    """Every user file is in one of `places` (at most a kill's worth of them waiting in the old output)."""
    return all(any((p / n).is_file() and (p / n).read_text() == t for p in places) for n, t in USER_FILES.items())


# --- 1. the model cache and the input model are no output ----------------------------------------------------------


def test_the_model_cache_is_never_an_output(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    converted = cache / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "SOURCE.txt").write_text("converted from a GGUF by minillm\n")
    (converted / "model.safetensors").write_text("weights")
    monkeypatch.setenv("MINILLM_CACHE", str(cache))
    assert not is_minillm_output(converted)  # SOURCE.txt is no output marker
    for extra in ((), ("--overwrite",)):
        assert _prune_cli(converted, *extra) == 2
        err = capsys.readouterr().err
        assert "model cache" in err and len(err.strip().splitlines()) == 1
    assert _prune_cli(cache / "new-folder") == 2 and "model cache" in capsys.readouterr().err
    assert (converted / "model.safetensors").read_text() == "weights" and _listing(cache) == ["smollm2-135m"]
    with replace_directory(cache / "other", manifest=False) as tmp:  # how models.py converts into the cache
        (tmp / "config.json").write_text("{}")
    assert not (cache / "other" / MANIFEST).exists()


def test_out_equal_to_or_inside_the_input_model_is_refused(tmp_path, monkeypatch, capsys):
    model = tmp_path / "p"
    assert _prune_cli(model) == 0
    before = (model / "model.safetensors").read_bytes()
    for out in (model, model / "sub", tmp_path / "." / "p"):
        assert _prune_cli(out, model=model) == 2
        assert "input model directory" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before and "sub" not in _listing(model)
    # a registry name is no directory, even where an earlier --out of that name exists
    monkeypatch.chdir(tmp_path)
    assert _prune_cli("tiny-llama") == 0 and _prune_cli("tiny-llama") == 0


# --- 2. minillm replaces only what it wrote ------------------------------------------------------------------------


def test_a_new_save_keeps_the_users_files(tmp_path):
    out = tmp_path / "p"
    assert _prune_cli(out, sparsity="0.2") == 0
    _add_user_files(out)
    assert _prune_cli(out, sparsity="0.4") == 0
    assert json.loads((out / "pruning.json").read_text())["sparsity"] == 0.4
    assert _has_user_files(out)
    link = tmp_path / "link"
    link.symlink_to(out)
    assert _prune_cli(link, sparsity="0.3") == 0  # through a symlinked --out
    assert link.is_symlink() and json.loads((out / "pruning.json").read_text())["sparsity"] == 0.3
    assert _has_user_files(out)
    assert _listing(tmp_path) == ["link", "p"]
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert "pruning.json" in manifest and "eval.json" not in manifest


def test_files_minillm_no_longer_writes_go_and_the_others_stay(tmp_path):
    target = tmp_path / "t"
    with atomic_directory(target) as tmp:
        (tmp / "pruning.json").write_text("1")
        (tmp / "tokenizer.json").write_text("1")
    (target / "notes.txt").write_text("mine")
    with atomic_directory(target) as tmp:
        (tmp / "pruning.json").write_text("2")
    assert _listing(target) == [MANIFEST, "notes.txt", "pruning.json"]
    assert (target / "pruning.json").read_text() == "2"


def test_eval_json_refuses_an_existing_file_before_any_work(tmp_path, monkeypatch, capsys):
    calls = []

    def load(*a, **k):
        calls.append(1)
        raise ValueError("the model would load here")

    monkeypatch.setattr(minillm, "load_model", load)
    result = tmp_path / "eval.json"
    result.write_text("hours of evaluation")
    assert main(["eval", "tiny-llama", "--ppl", "--json", str(result)]) == 2
    assert "exists" in capsys.readouterr().err and not calls
    assert result.read_text() == "hours of evaluation"
    assert main(["eval", "tiny-llama", "--ppl", "--json", str(result), "--overwrite"]) == 2
    assert "would load" in capsys.readouterr().err and calls  # consent given: on to the evaluation


# --- 3. a kill at any step of a save ---------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL: raised at one step, and at every later file operation, since a dead process does
    nothing more (its clean-up handlers fail like everything else)."""


class Killer:
    def __init__(self, monkeypatch):
        self.at, self.count, self.dead = None, 0, False
        for owner, name in ((os, "replace"), (os, "unlink"), (os, "mkdir"), (shutil, "rmtree"), (files, "_exchange")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, real):
        def step(*args, **kwargs):
            if self.at is not None:
                self.dead = self.dead or self.count == self.at
                self.count += 1
                if self.dead:
                    raise Killed
            return real(*args, **kwargs)

        return step

    def arm(self, at):
        self.at, self.count, self.dead = at, 0, False

    def disarm(self):
        self.at = None


def _write(directory, tag):
    for name in ("pruning.json", "model.safetensors"):
        (directory / name).write_text(tag)


def _complete(directory):
    """The tag of a complete output in `directory` (its manifest lists exactly its two files, all of one tag)."""
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
        tags = {(directory / name).read_text() for name in listed}
    except (OSError, ValueError):
        return None
    return tags.pop() if listed == ["model.safetensors", "pruning.json"] and len(tags) == 1 else None


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_kill_at_any_step_leaves_a_complete_output_and_the_next_save_no_debris(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # systems without renameat2
    killer = Killer(monkeypatch)
    for step in range(100):
        parent = tmp_path / str(step)
        target = parent / "p"
        with atomic_directory(target) as tmp:
            _write(tmp, "old")
        _add_user_files(target)
        killer.arm(step)
        try:
            with atomic_directory(target) as tmp:
                _write(tmp, "new")
            finished = True
        except Killed:
            finished = False
        killer.disarm()
        old = parent / ".p.old"
        state = _complete(target)
        if exchange:
            assert state in ("old", "new"), (step, _listing(parent))
        else:  # between the two renames the old output waits, complete, in .p.old
            assert state in ("old", "new") or (not target.exists() and _complete(old) == "old"), step
        assert _has_user_files(target, old), (step, _listing(parent))
        with atomic_directory(target) as tmp:  # the next save recovers what the kill left
            _write(tmp, "newer")
        assert _complete(target) == "newer" and _has_user_files(target), step
        assert _listing(parent) == ["p"], (step, _listing(parent))
        if finished:
            assert step > 5  # the sequence has that many steps, each one was cut
            return
    raise AssertionError("the save never finished")


def test_the_next_save_clears_the_leftovers_of_earlier_versions(tmp_path):
    """minillm before the manifest left `.p.new.*` (killed while writing) and `.p.old.*/p` (killed during the swap,
    possibly with no `p` at all); they are removed, or put back."""
    target = tmp_path / "p"
    (tmp_path / ".p.new.abc12345").mkdir()
    (tmp_path / ".p.new.abc12345" / "model.safetensors").write_text("half")
    (tmp_path / ".p.old.xyz_7890" / "p").mkdir(parents=True)
    _write(tmp_path / ".p.old.xyz_7890" / "p", "old")
    with files.output_lock(target):
        assert (target / "pruning.json").read_text() == "old"  # put back: there was no p
    with atomic_directory(target) as tmp:
        _write(tmp, "new")
    assert _complete(target) == "new" and _listing(tmp_path) == ["p"]


# --- 4. concurrent writers -------------------------------------------------------------------------------------


def _hold_lock(lock):
    """Another process holding the lock of an output directory (as a running prune does)."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_concurrent_writer_fails_clearly_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    holder = _hold_lock(tmp_path / ".p.lock")
    try:
        assert _prune_cli(out) == 2
        err = capsys.readouterr().err
        assert "another minillm process" in err and f"pid {holder.pid}" in err
        m, _ = minillm.load_model("tiny-llama")
        with pytest.raises(OutputDirError, match="being written"):
            minillm.save_pruned(m, minillm.prune(m, "magnitude", 0.2, progress=False), out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".p.lock").exists()  # the killed holder's lock file stays; its lock died with it
    assert _prune_cli(out) == 0
    assert _listing(tmp_path) == ["p"]


def test_prune_holds_the_lock_from_the_check_to_the_save(tmp_path, monkeypatch):
    """The lock covers the pruning, not only the save: a second prune started meanwhile fails at once."""
    real_prune, seen = minillm.prune, []

    def prune(*args, **kwargs):
        fd = os.open(tmp_path / ".p.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process would try
            seen.append(os.read(fd, 32).decode().strip())
        finally:
            os.close(fd)
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(minillm, "prune", prune)
    assert _prune_cli(tmp_path / "p") == 0
    assert seen == [str(os.getpid())] and _listing(tmp_path) == ["p"]


# --- 5. modes and bytes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_saved_files_have_normal_modes_and_reproducible_bytes(tmp_path, umask):
    m, _ = minillm.load_model("tiny-llama")
    plan = minillm.prune(m, "magnitude", 0.3, progress=False)
    previous = os.umask(umask)
    try:
        digests = set()
        for _ in range(6):  # safetensors orders the metadata by hash: a coin toss per save before sorting
            out = minillm.save_pruned(m, plan, tmp_path / "p")
            weights = (out / "model.safetensors").read_bytes()
            digests.add(hashlib.sha256(weights).hexdigest())
    finally:
        os.umask(previous)
    assert len(digests) == 1
    size = int.from_bytes(weights[:8], "little")
    metadata = json.loads(weights[8 : 8 + size])["__metadata__"]
    assert list(metadata) == sorted(metadata)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in out.iterdir()
    }
    again, _ = minillm.load_pruned(out)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in m.parameters())
