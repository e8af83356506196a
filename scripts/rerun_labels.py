"""Recompute the records of some labels in a profile (accuracy, ablations, calibration_budget, recovery), leaving all others as they
are: `python scripts/rerun_labels.py PROFILE LABEL [LABEL ...]`. Used when a method's computation changes; every
record whose label matches (or whose recovery reuses that label's plan) is deleted first, then the profile's
drivers recompute what is missing."""

from __future__ import annotations

import logging
import sys

from minillm.artifact.experiments import GRID_SECTIONS, check_profile, results_dir, run_accuracy, run_recovery


def main(profile: str, labels: list[str]) -> None:
    cfg = check_profile(profile)
    for experiment in (*GRID_SECTIONS, "recovery"):
        folder = results_dir(profile, experiment)
        for path in sorted(folder.glob("*.json")) if folder.exists() else []:
            if any(path.name.startswith(f"{label}_s") for label in labels):
                print(f"recompute {path}")
                path.unlink()
    for experiment in GRID_SECTIONS:
        if experiment in cfg:
            run_accuracy(cfg, experiment=experiment)
    if "recovery" in cfg:
        run_recovery(cfg)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
