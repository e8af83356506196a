"""Provenance of a result or an output: date, source commit, device, package versions, torch threads."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# the folder the package was imported from; its git commit is recorded when it is a checkout (None otherwise)
_SOURCE = Path(__file__).resolve().parent

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
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_SOURCE,
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
