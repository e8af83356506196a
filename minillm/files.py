"""Files written so that a crash or a kill never leaves a half-written one: JSON by temp file and rename, output
directories by build-beside-and-swap, temporary folders removed on SIGTERM.

One rule for every output directory: minillm replaces only the files it wrote there (listed in the directory's
manifest, `.minillm-manifest.json`) and keeps every other file. A save holds a lock beside the directory, so a second
writer fails at once, and puts right what an interrupted earlier save left behind."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = ".minillm-manifest.json"  # the mark of a minillm output, and the list of the files minillm wrote there
LEGACY_MARKER = "pruning.json"  # outputs written before the manifest existed


def cache_dir() -> Path:
    """Where converted models are cached (MINILLM_CACHE). Here rather than in `models` because output directories
    must never be inside it."""
    return Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(directory: Path) -> None:
    """Give everything under `directory` the modes a plain `open` would (0666/0777 less the umask): mkdtemp, mkstemp
    and safetensors create 0700/0600, which would make an output unreadable to the group that can read the rest."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, names in os.walk(directory):
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        for name in names:
            os.chmod(Path(root) / name, 0o666 & ~mask)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees a half-written file (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; records are meant to be read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputDirError(ValueError):
    """An output directory that minillm refuses to write (it would delete data, or cannot be written)."""


def is_minillm_output(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file() or (Path(path) / LEGACY_MARKER).is_file()


def _written_by_minillm(directory: Path) -> set[str]:
    """The names minillm wrote in `directory` (its manifest; nothing for a directory without one)."""
    try:
        return {MANIFEST, *json.loads((directory / MANIFEST).read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {MANIFEST}


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output_dir(target: Path, overwrite: bool = False, inputs=()) -> Path:
    """Fail before any work when `target` cannot receive an output directory: it is the current directory or one of
    its parents, inside the model cache, equal to or inside one of the `inputs` directories, a file, not writable, or
    a non-empty directory that is not a previous minillm output (unless `overwrite`). Returns the resolved path."""
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputDirError(
            f"refusing to write the output to {str(target)!r}: it is the current directory or one of its parents; "
            "give a new directory name"
        )
    if _within(resolved, cache_dir().resolve()):
        raise OutputDirError(
            f"refusing to write the output to {str(target)!r}: it is inside the model cache {cache_dir()} "
            "(MINILLM_CACHE), which minillm manages itself; give a directory outside it"
        )
    for source in inputs:
        if Path(source).is_dir() and _within(resolved, Path(source).resolve()):
            raise OutputDirError(
                f"refusing to write the output to {str(target)!r}: it is the input model directory {str(source)!r} "
                "or inside it; give another directory"
            )
    if resolved.exists() and not resolved.is_dir():
        raise OutputDirError(f"output {str(target)!r} exists and is not a directory")
    if os.path.ismount(resolved):
        raise OutputDirError(
            f"output directory {str(target)!r} is a mount point, which cannot be replaced in one step (EBUSY after "
            f"all the work); give a subdirectory of it, e.g. {str(Path(target) / 'model')!r}"
        )
    if resolved.is_dir() and any(resolved.iterdir()) and not is_minillm_output(resolved) and not overwrite:
        raise OutputDirError(
            f"output directory {str(target)!r} is not empty and was not written by minillm (no {MANIFEST}); "
            "choose another directory, or pass --overwrite (overwrite=True) to write into it (files of other names "
            "are kept)"
        )
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot create {str(target)!r}: {parent} is not a writable directory")
    if resolved.is_dir() and not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot replace {str(target)!r}: {resolved.parent} is not writable")
    return resolved


def check_output_file(path: Path, overwrite: bool = False) -> Path:
    """Fail before any work when the result file `path` exists (unless `overwrite`): a result is never replaced
    without being asked to."""
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"output file {str(path)!r} is a directory")
    if path.exists() and not overwrite:
        raise OutputDirError(f"{str(path)!r} exists; choose another file, or pass --overwrite to replace it")
    return path


def _sibling(target: Path, role: str) -> Path:
    """`.NAME.new` (the directory being written), `.NAME.old` (the previous output during the swap), `.NAME.lock`."""
    return target.parent / f".{target.name}.{role}"


_HELD: set[tuple[Path, int]] = set()  # (directory, thread) locked here: the CLI locks --out, then saves into it


def _take_lock(lock: Path, target: Path) -> int:
    """flock `lock` without waiting. The kernel drops the lock when its process dies, so a lock file left by a killed
    run is simply taken over; the inode check catches a file its holder removed while we opened it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputDirError(
                f"output directory {str(target)!r} is being written by another minillm process (pid {pid}); wait "
                "for it to finish or choose another directory"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextmanager
def output_lock(target: Path):
    """Hold `target`'s lock (`.NAME.lock` beside it) while the block runs: a concurrent writer to the same directory
    fails with a clear error instead of both reporting success while one result is lost. Taking the lock first puts
    right what an interrupted earlier save left (see `_recover`). Re-entrant within a thread."""
    target = Path(target).resolve()
    key = (target, threading.get_ident())
    if key in _HELD:
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _sibling(target, "lock")
    fd = _take_lock(lock, target)
    _HELD.add(key)
    try:
        _recover(target)
        yield target
    finally:
        _HELD.discard(key)
        try:
            os.unlink(lock)  # before closing: unlinking after would race a process that locks it meanwhile
        finally:
            os.close(fd)


def _carry_over(old: Path, target: Path) -> None:
    """Move what the previous output holds besides minillm's own files (the user's notes, evaluations, figures) into
    the new output. A name that minillm now writes itself stays minillm's."""
    owned = _written_by_minillm(old)
    for entry in sorted(old.iterdir()):
        if entry.name not in owned and not os.path.lexists(target / entry.name):
            os.replace(entry, target / entry.name)


def _legacy_leftovers(target: Path) -> list[Path]:
    """The mkdtemp names (8 characters) that minillm before the manifest used: `.NAME.new.*` held a new output being
    written, `.NAME.old.*/NAME` the previous one during the swap. Matched exactly, so that the leftovers of another
    output of a similar name are never taken for these."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(new|old)\.[a-z0-9_]{{8}}")
    return sorted(
        p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )


def _recover(target: Path) -> None:
    """Put right what a save killed at any instant left beside `target` (called with its lock held): the previous
    output goes back if the kill fell between the two renames; `.NAME.new` only ever holds minillm's files, so it is
    removed; `.NAME.old` gives the user's files back to the output, then is removed. Also clears the `.NAME.new.*`
    and `.NAME.old.*/NAME` leftovers of minillm versions before the manifest."""
    old, new = _sibling(target, "old"), _sibling(target, "new")
    for legacy in _legacy_leftovers(target):
        if (legacy / target.name).is_dir() and not os.path.lexists(target):
            os.replace(legacy / target.name, target)
        shutil.rmtree(legacy)
    if old.is_dir() and not os.path.lexists(target):
        os.replace(old, target)
    if new.is_dir():
        shutil.rmtree(new)
    if old.is_dir():
        _carry_over(old, target)
        shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), so the output directory never goes missing.
    False where the system or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), str(b))


def _swap_in(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`; the previous output, if any, ends at `.NAME.old`. At every
    instant `target` is the old output or the new one (one exchange), or, without an exchange, the old one waits
    complete in `.NAME.old` between two renames and `_recover` puts it back."""
    old = _sibling(target, "old")
    if os.path.lexists(target):
        os.replace(new, old)  # `old` names the slot that holds the previous output once the two are exchanged
        if _exchange(old, target):
            return
        os.replace(old, new)  # no exchange on this system or file system: two renames
        os.replace(target, old)
    os.replace(new, target)


@contextmanager
def replace_directory(target: Path, manifest: bool = True):
    """Yield an empty staging directory (`.NAME.new`); on success it replaces `target` (see `_swap_in`), and the
    entries of the previous `target` that minillm did not write are moved into the new one. With `manifest`, the new
    directory lists its files in `.minillm-manifest.json` (the model cache does not: it is not an output). Any
    failure, or the next save after a kill, leaves the old output or the complete new one and no debris."""
    with output_lock(target) as target:
        new = _sibling(target, "new")
        try:
            new.mkdir()
            yield new
            _normal_modes(new)
            if manifest:
                write_json_atomic(new / MANIFEST, {"written_by": "minillm", "files": sorted(os.listdir(new))})
            _swap_in(new, target)
        finally:
            _recover(target)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False, inputs=()):
    """An output directory written atomically (see `replace_directory`), checked first (see `check_output_dir`)."""
    with replace_directory(check_output_dir(target, overwrite, inputs)) as new:
        yield new


@contextmanager
def terminate_as_exit():
    """Turn SIGTERM into SystemExit while the block runs (main thread only), so that `finally` clauses and context
    managers (temporary directories) clean up when a run is killed politely."""
    import signal

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


_OWNED = re.compile(r".*pid(?P<pid>\d+)\.[a-z0-9_]{8}")  # `PREFIXpidNNN.xxxxxxxx`, named by `owned_directory`


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(path: Path) -> bool:
    """An owned directory whose owner is gone: its pid is not running here and nobody holds its flock (the kernel
    drops a killed owner's lock; the flock also keeps the directory of a live owner in another pid namespace)."""
    match = _OWNED.fullmatch(path.name)
    if not match or _pid_alive(int(match["pid"])):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_directories(parent: Path, prefix: str) -> list[Path]:
    """Remove the directories `owned_directory(parent, prefix)` made for processes that are gone: SIGKILL (or a
    power cut) skips every clean-up, so what a killed run left is removed by the next one. Only the caller's own
    directories are touched. Returns what was removed."""
    removed = []
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return removed
    for path in entries:
        try:
            mine = path.name.startswith(prefix) and path.lstat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and path.is_dir() and not path.is_symlink() and _stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def owned_directory(parent: Path, prefix: str):
    """A new directory `PREFIXpidNNN.xxxxxxxx` in `parent`, flocked by this process while the block runs and removed
    after it. The leftovers of killed earlier runs (same prefix, pid gone, lock free) are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_directories(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}pid{os.getpid()}.", dir=parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


@contextmanager
def temporary_directory(prefix: str = "minillm-"):
    """A temporary directory that is removed on exit, on exceptions, and when the process receives SIGTERM; one
    left by a SIGKILL is removed by the next run that asks for one of the same prefix (`owned_directory`)."""
    with terminate_as_exit(), owned_directory(Path(tempfile.gettempdir()), prefix) as tmp:
        yield str(tmp)
