"""Fail if any table or figure the notebooks should produce for a profile is missing or empty, or if the claims table
was rendered before the records it reads existed."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = [
    "accuracy.csv",
    "accuracy.md",
    "accuracy_vs_sparsity.png",
    "accuracy_vs_sparsity.pdf",
    "claims.csv",
    "claims.md",
    "ablations.csv",
    "ablation_fms_queries.png",
    "widths.csv",
    "pruned_architecture.png",
    "memory_{p}.csv",
    "memory_{p}.png",
    "latency_{p}.csv",
    "latency_{p}.png",
    "recovery.csv",
    "recovery.png",
]

# Not required: notebook 01's cross_model.csv, cross_model_tau.csv and cross_model.png, which exist only once a
# second model's records (profile cpu-full-gemma3) are computed.

# notebook 07, for profiles with an fms_diagnostics section
DIAGNOSTICS = [
    "fms_diagnostics_accuracy.csv",
    "fms_diagnostics_criteria.csv",
    "fms_diagnostics_oracle.csv",
    "fms_diagnostics_goal.csv",
]


def stale_claims(profile: str, folder: Path) -> str | None:
    """The claims table at the end of notebook 01 reads the memory and latency records of notebooks 02 and 03; a
    table rendered before those records existed (a run from scratch renders 01 first) differs from one rendered from
    the records on disk now. Returns a message when the verdicts differ, else None."""
    import pandas as pd

    from minillm.artifact import claims

    saved = pd.read_csv(folder / "claims.csv", keep_default_na=False)
    now = claims.claims_frame(profile)
    if list(saved["verdict"]) == [str(v) for v in now["verdict"]]:
        return None
    changed = [c for c, a, b in zip(now["claim"], saved["verdict"], now["verdict"]) if a != str(b)]
    return f"claims.csv in {folder} is stale (rendered before some records existed): {'; '.join(changed)}"


def main(profile: str) -> int:
    folder = ROOT / "figures" / profile
    config = ROOT / "configs" / f"{profile}.yaml"
    expected = EXPECTED + (DIAGNOSTICS if config.exists() and "\nfms_diagnostics:" in config.read_text() else [])
    missing = [
        name.format(p=profile)
        for name in expected
        if not (folder / name.format(p=profile)).exists() or (folder / name.format(p=profile)).stat().st_size == 0
    ]
    executed = sorted((ROOT / "notebooks" / "executed" / profile).glob("*.ipynb"))
    if missing:
        print(f"missing outputs in {folder}: {', '.join(missing)}")
        return 1
    stale = stale_claims(profile, folder)
    if stale:
        print(stale)
        return 1
    print(f"all {len(expected)} expected outputs present in {folder}; {len(executed)} executed notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "smoke"))
