"""Bonsai at 20% and 50% on SmolLM2 with the cpu-full settings, under variants that isolate what drives its quality
(regression, bias compensation, masks per round, attention left whole). Two controls replace the regression's output inside the same
candidate sets: `prior-only` sets every coefficient to zero, so that the selection falls back to its tie-break, the
prior; `noise-beta` draws the coefficients at random (seeded), what a regression without signal would give.
Writes one JSON line per run to the file given as argv[1]:
`python scripts/bonsai_investigation.py OUT.jsonl [VARIANT ...] [--sparsity=0.2]`. Perplexity on Pride and Prejudice,
4 x 512."""

from __future__ import annotations

import json
import sys
import time

import torch

import minillm
from minillm.data import calibration_windows, perplexity_windows
from minillm.evaluate import perplexity
from minillm.scores import bonsai

BASE = {"masks_per_round": 32, "prune_frac": 0.1, "windows_per_round": 8}
VARIANTS = {
    "adam": ({}, {}, (0.2, 0.5)),
    "lasso": ({"regression": "lasso"}, {}, (0.2, 0.5)),
    "adam+comp": ({}, {"compensate_bias": True}, (0.2, 0.5)),
    # attention left whole: a KV group costs 170 channels and its coefficient is the noisiest (see the small-modules note in minillm/scores/bonsai.py)
    "adam-mlp-only": ({}, {"targets": "mlp"}, (0.2, 0.5)),
    "prior-only": ({}, {}, (0.2, 0.5)),
    "noise-beta": ({}, {}, (0.2, 0.5)),
    "adam-masks64": ({"masks_per_round": 64}, {}, (0.5,)),
    "lasso-masks64": ({"regression": "lasso", "masks_per_round": 64}, {}, (0.5,)),
}


def _zero_fit(x: torch.Tensor, y: torch.Tensor, regression: str = "adam", gen=None) -> tuple[torch.Tensor, dict]:
    """The `prior-only` variant's regression: no information from the sub-model scores at all."""
    return torch.zeros(x.shape[1], dtype=torch.float64), {"regression": "none (prior-only)", "nonzero": 0}


def _noise_fit(x: torch.Tensor, y: torch.Tensor, regression: str = "adam", gen=None) -> tuple[torch.Tensor, dict]:
    """The `noise-beta` variant's regression: coefficients drawn from N(0, 1), seeded by the round's generator."""
    beta = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
    return beta, {"regression": "none (noise)", "nonzero": int(x.shape[1])}


CONTROLS = {"prior-only": _zero_fit, "noise-beta": _noise_fit}


def main(out: str, names: list[str], only: list[float] | None = None) -> None:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    fit = bonsai.fit_regression
    _, tok = minillm.load_model("smollm2-135m")
    calib = calibration_windows(tok, n_samples=8, seqlen=128, seed=0)
    windows = perplexity_windows(tok, 512, 4)
    for name in names:
        options, prune_options, sparsities = VARIANTS[name]
        bonsai.fit_regression = CONTROLS.get(name, fit)
        for s in [s for s in sparsities if not only or s in only]:
            model, _ = minillm.load_model("smollm2-135m")
            t0 = time.perf_counter()
            plan = minillm.prune(
                model, "bonsai", s, calib, allocation="global", progress=False, **{**BASE, **options}, **prune_options
            )
            ppl = perplexity(model, windows, batch_size=2, progress=False)["ppl"]
            nonzero = [h.get("nonzero") for h in plan.history]
            row = {"variant": name, "kv_heads": [w["kv_heads"] for w in plan.widths()],
                   "removed_attention_units": [h.get("removed_attention_units") for h in plan.history], "sparsity": s, "ppl": ppl, "achieved": plan.achieved_sparsity,
                   "rounds": len(plan.history), "nonzero_per_round": nonzero,
                   "candidates_per_round": [h.get("candidates") for h in plan.history],
                   "cv_tau_per_round": [h.get("cv_kendall_tau") for h in plan.history],
                   "widths": plan.widths(), "time_s": time.perf_counter() - t0}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(name, s, round(ppl, 2), round(row["time_s"]), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[2:] if not a.startswith("--sparsity=")]
    only = [float(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("--sparsity=")]
    main(sys.argv[1], args or list(VARIANTS), only)
