"""The three layers and their import contract: the library (`minillm`) imports neither measurement (`minillm.bench`)
nor the paper harness (`minillm.artifact`), `import minillm` loads no harness module, no package has an import cycle
(pyproject.toml's [tool.importlinter]), and the library works from a copy that has no repository around it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package below `root` with `root`'s pyproject.toml (the package imported from `root`)."""
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root), "PATH": ""}, capture_output=True,
        text=True, timeout=120,
    )


def test_the_import_contract_holds():
    out = _lint(REPO_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("minillm/prune.py", "from minillm.bench import measure  # noqa", "library < bench < artifact < CLI"),
        ("minillm/bench/flops.py", "from minillm.artifact import records  # noqa", "library < bench < artifact < CLI"),
        ("minillm/checkpoint.py", "from minillm import models  # noqa", "no import cycles"),
    ],
)
def test_the_contract_catches_an_upward_import_or_a_cycle(tmp_path, module, line, broken):
    """The same contract on a copy of the package with one bad import added: it must fail, naming the contract."""
    shutil.copytree(REPO_ROOT / "minillm", tmp_path / "minillm", ignore=shutil.ignore_patterns("resources", "__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert f"{broken} BROKEN" in out.stdout


def test_import_minillm_loads_no_harness_or_measurement_module():
    code = "import sys, minillm; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = set(out.stdout.split())
    assert "minillm.prune" in loaded
    upper = sorted(m for m in loaded if m.startswith(("minillm.artifact", "minillm.bench", "minillm.__main__")))
    assert upper == []
    # nor the harness's heavy dependencies
    assert not loaded & {"pandas", "matplotlib", "lm_eval", "papermill", "yaml"}


def test_the_library_runs_from_a_copy_without_the_repository(tmp_path):
    """A copy of the package alone (as pip installs it): the bundled texts are found, their checksums hold, and a
    tiny model is pruned, saved and reloaded; nothing reads or writes outside the copy and the output folder."""
    shutil.copytree(REPO_ROOT / "minillm", tmp_path / "site" / "minillm", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import torch, minillm
from minillm import data
assert data.DATA_DIR.is_relative_to({str(tmp_path / 'site')!r}), data.DATA_DIR
assert all(data.verify_checksums().values()), data.verify_checksums()
assert len(data.read_novel("emma")) > 800_000
model, _ = minillm.load_model("tiny-llama")
calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
plan = minillm.prune(model, "wanda_sp", 0.3, calib, progress=False)
minillm.save_pruned(model, plan, {str(tmp_path / 'out')!r})
again, _ = minillm.load_pruned({str(tmp_path / 'out')!r})
assert torch.equal(model(calib).logits, again(calib).logits)
print("ok")
"""
    env = {"PATH": "", "HOME": str(tmp_path), "MINILLM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
