"""Result records with provenance, written atomically, and looked up again as a cache."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "lm_eval", "datasets", "peft", "numpy")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: Any = None) -> str:
    import torch

    from .device import backend

    cuda = backend()
    dev = torch.device(device) if device is not None else None
    if cuda.available() and (dev is None or cuda.is_cuda(dev)):
        return cuda.name(dev if dev is not None and dev.index is not None else 0)
    return (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()})"
    )


def provenance(device: Any = None) -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": device_name(device),
        "python": platform.python_version(),
        "packages": package_versions(),
        # CPU float reductions and every wall time depend on it (records may be made by processes sharing cores)
        "torch_threads": _torch_threads(),
    }


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees a half-written file (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; records are meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MINILLM_MARKERS = ("pruning.json", "SOURCE.txt")  # files that mark a directory written by minillm


class OutputDirError(ValueError):
    """An output directory that minillm refuses to write (it would delete data, or cannot be written)."""


def is_minillm_output(path: Path) -> bool:
    return any((Path(path) / m).is_file() for m in MINILLM_MARKERS)


def check_output_dir(target: Path, overwrite: bool = False) -> Path:
    """Fail before any work when `target` cannot receive an output directory: it is the current directory or one of
    its parents, a file, not writable, or a non-empty directory that is not a previous minillm output (unless
    `overwrite`). Returns the resolved path."""
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputDirError(
            f"refusing to write the output to {str(target)!r}: it is the current directory or one of its parents; "
            "give a new directory name"
        )
    if resolved.exists() and not resolved.is_dir():
        raise OutputDirError(f"output {str(target)!r} exists and is not a directory")
    if resolved.is_dir() and any(resolved.iterdir()) and not is_minillm_output(resolved) and not overwrite:
        raise OutputDirError(
            f"output directory {str(target)!r} is not empty and was not written by minillm (no pruning.json); "
            "choose another directory, or pass --overwrite (overwrite=True) to replace it"
        )
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot create {str(target)!r}: {parent} is not a writable directory")
    if resolved.is_dir() and not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot replace {str(target)!r}: {resolved.parent} is not writable")
    return resolved


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `target`: the new directory is written beside the
    old one, the two are swapped by renames, and only then is the old one deleted (a crash leaves the old one, or
    the complete new one). `target` is checked first (see `check_output_dir`)."""
    target = check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new."))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and (old / target.name).exists() and not target.exists():
            os.replace(old / target.name, target)  # put the old directory back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def terminate_as_exit():
    """Turn SIGTERM into SystemExit while the block runs (main thread only), so that `finally` clauses and context
    managers (temporary directories) clean up when a run is killed politely."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def temporary_directory(prefix: str = "minillm-"):
    """A temporary directory that is removed on exit, on exceptions, and when the process receives SIGTERM."""
    with terminate_as_exit(), tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield tmp


def config_hash(config: Any) -> str:
    """A stable hash of a record's effective configuration (canonical JSON: sorted keys, lists for tuples)."""
    import hashlib

    text = json.dumps(json.loads(json.dumps(config)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(stored: Any, expected: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two configurations differ (after a JSON round trip), e.g. ['options.queries']."""
    a, b = json.loads(json.dumps(stored)), json.loads(json.dumps(expected))
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(dict.fromkeys([*b, *a])):
            key = f"{prefix}{k}"
            if k not in a:
                out.append(f"{key} (missing in the record)")
            elif k not in b:
                out.append(f"{key} (not in the profile)")
            else:
                out += config_diff(a[k], b[k], key + ".")
        return out
    if a != b:
        return [f"{prefix.rstrip('.') or 'config'}: {a!r} -> {b!r}"]
    return []


def load_record(path: Path) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def save_record(
    path: Path,
    experiment: str,
    config: dict,
    metrics: dict,
    wall_time_s: float | None = None,
    device: Any = None,
    extra: dict | None = None,
) -> dict:
    record = {
        "experiment": experiment,
        "config": config,
        "config_hash": config_hash(config),
        "metrics": metrics,
        "wall_time_s": wall_time_s,
        "provenance": provenance(device),
        **(extra or {}),
    }
    write_json_atomic(path, record)
    return record
