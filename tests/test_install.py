"""The package is installed into the environment (`make setup`: editable), not found through the repository on
PYTHONPATH: `import minillm` and the `minillm` console script work from any directory (scripts, notebooks, Lab)."""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HINT = "minillm is not installed in this environment; run `make setup` (pip install -e . into the venv)"


def _outside_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_import_works_outside_the_repository(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import minillm, tqdm.auto; print(minillm.__file__)"],
        cwd=tmp_path,
        env=_outside_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"{HINT}\n{out.stderr[-2000:]}"
    assert Path(out.stdout.strip()).resolve().is_relative_to(REPO_ROOT / "minillm")


def test_console_script_works_outside_the_repository(tmp_path):
    script = Path(sys.executable).parent / ("minillm.exe" if os.name == "nt" else "minillm")
    assert script.exists(), f"{HINT} (no {script})"
    out = subprocess.run([str(script), "--help"], cwd=tmp_path, env=_outside_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: minillm ") and "prune" in out.stdout


def test_notebook_progress_bars_have_widgets():
    """tqdm.auto draws widget bars in notebooks only with ipywidgets installed ("IProgress not found" otherwise)."""
    import ipywidgets  # noqa: F401
