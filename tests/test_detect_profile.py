"""scripts/detect_profile.py: the Makefile's profile choice is printed with its reason and never silently falls
back to cpu on a machine whose NVIDIA GPU torch cannot use."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "detect_profile.py"
spec = importlib.util.spec_from_file_location("detect_profile", SCRIPT)
detect_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(detect_profile)


def test_explicit_profile_wins():
    assert detect_profile.detect("smoke", False, "", "/dev/nvidia0") == ("smoke", "PROFILE=smoke was given")


def test_usable_cuda_picks_gpu():
    profile, reason = detect_profile.detect(None, True, "torch sees NVIDIA H100", "/dev/nvidia0")
    assert profile == "gpu" and "H100" in reason


def test_gpu_present_but_unusable_fails():
    profile, reason = detect_profile.detect(None, False, "torch 2.13.0+cpu is a CPU-only build", "/dev/nvidia0")
    assert profile is None and "/dev/nvidia0" in reason and "PROFILE=cpu" in reason


def test_no_gpu_picks_cpu_and_says_why():
    profile, reason = detect_profile.detect(None, False, "CPU-only build", None)
    assert profile == "cpu" and "no NVIDIA GPU" in reason


def test_script_prints_profile_on_stdout_and_reason_on_stderr():
    out = subprocess.run([sys.executable, str(SCRIPT), "smoke"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "smoke" and "PROFILE=smoke" in out.stderr
