"""Remove what changes from one execution of a notebook to the next although nothing it shows changed: papermill's
start and end times and durations (notebook and cells), Jupyter's per-cell execution timestamps, the random id
papermill gives the cell it injects with the parameters (named "injected-parameters" here, after its tag), and the
state of progress-bar widgets, whose model ids are random (their text form stays in the output). An executed
notebook rendered again from the same records is then byte-identical, so `git status` shows only real changes.

Usage: python scripts/normalize_notebook.py NOTEBOOK.ipynb [...]  (rewritten in place)
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

TIMES = ("start_time", "end_time", "duration")


def normalize(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for key in TIMES:
        notebook.metadata.get("papermill", {}).pop(key, None)
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"
        cell.metadata.pop("execution", None)
        for key in TIMES:
            cell.metadata.get("papermill", {}).pop(key, None)
    nbformat.write(notebook, path)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        normalize(Path(name))
