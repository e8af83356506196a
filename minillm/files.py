"""Files written so that a crash or a kill never leaves a half-written one: JSON by temp file and rename, output
directories by build-beside-and-swap, temporary folders removed on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
