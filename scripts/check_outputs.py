"""Fail if any table or figure the notebooks should produce for a profile is missing or empty."""

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
    print(f"all {len(expected)} expected outputs present in {folder}; {len(executed)} executed notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "smoke"))
