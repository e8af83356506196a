"""Which profile `make reproduce` / `make figures` runs, and why: prints the profile on stdout and the reason on
stderr. An explicit PROFILE wins. Otherwise: gpu when torch can use CUDA, cpu when the machine has no NVIDIA GPU,
and a failure (exit 1) when an NVIDIA GPU is present but torch cannot use it (a broken driver, a CPU-only torch
wheel), instead of silently running the cpu profile on a GPU box.

    python scripts/detect_profile.py [PROFILE]
"""

from __future__ import annotations

import glob
import os
import shutil
import sys


def nvidia_hardware() -> str | None:
    """A sign of an NVIDIA GPU on this machine (device node, driver, nvidia-smi), or None."""
    for sign in ("/proc/driver/nvidia/version", *sorted(glob.glob("/dev/nvidia[0-9]*"))):
        if os.path.exists(sign):
            return sign
    return shutil.which("nvidia-smi")


def torch_cuda() -> tuple[bool, str]:
    """(usable, description) of torch's CUDA."""
    try:
        import torch
    except ImportError as e:
        return False, f"torch is not importable ({e})"
    built = torch.version.cuda
    try:
        ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if ok:
            return True, f"torch {torch.__version__} sees {torch.cuda.get_device_name(0)}"
    except Exception as e:  # noqa: BLE001 - any start-up failure is the reason we report
        return False, f"torch {torch.__version__} (CUDA {built}) failed to start CUDA: {e}"
    if built is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    return False, f"torch {torch.__version__} (CUDA {built}) sees no usable GPU (driver too old or not loaded?)"


def detect(requested: str | None, usable: bool, torch_says: str, hardware: str | None) -> tuple[str | None, str]:
    """(profile or None for failure, reason)."""
    if requested:
        return requested, f"PROFILE={requested} was given"
    if usable:
        return "gpu", f"CUDA is usable: {torch_says}"
    if hardware:
        return None, (
            f"an NVIDIA GPU is present ({hardware}) but {torch_says}; fix the CUDA set-up, or run the CPU profile "
            "on purpose with PROFILE=cpu"
        )
    return "cpu", f"no NVIDIA GPU found ({torch_says})"


def main(argv: list[str]) -> int:
    requested = argv[1] if len(argv) > 1 and argv[1] else None
    usable, says = (False, "not checked") if requested else torch_cuda()
    profile, reason = detect(requested, usable, says, None if requested else nvidia_hardware())
    if profile is None:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    print(f"profile {profile}: {reason}", file=sys.stderr)
    print(profile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
