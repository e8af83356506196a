"""Bonsai at 20% and 50% on SmolLM2 with the cpu-full settings, under variants that isolate what drives its quality
(regression, bias compensation, masks per round). Writes one JSON line per run to the file given as argv[1]:
`python scripts/bonsai_investigation.py OUT.jsonl [VARIANT ...]`. Perplexity on Pride and Prejudice, 4 x 512."""

from __future__ import annotations

import json
import sys
import time

import minillm
from minillm.data import calibration_windows, perplexity_windows
from minillm.evaluate import perplexity

BASE = {"masks_per_round": 32, "prune_frac": 0.1, "windows_per_round": 8}
VARIANTS = {
    "adam": ({}, {}, (0.2, 0.5)),
    "lasso": ({"regression": "lasso"}, {}, (0.2, 0.5)),
    "adam+comp": ({}, {"compensate_bias": True}, (0.2, 0.5)),
    "adam-masks64": ({"masks_per_round": 64}, {}, (0.5,)),
    "lasso-masks64": ({"regression": "lasso", "masks_per_round": 64}, {}, (0.5,)),
}


def main(out: str, names: list[str]) -> None:
    _, tok = minillm.load_model("smollm2-135m")
    calib = calibration_windows(tok, n_samples=8, seqlen=128, seed=0)
    windows = perplexity_windows(tok, 512, 4)
    for name in names:
        options, prune_options, sparsities = VARIANTS[name]
        for s in sparsities:
            model, _ = minillm.load_model("smollm2-135m")
            t0 = time.perf_counter()
            plan = minillm.prune(
                model, "bonsai", s, calib, allocation="global", progress=False, **{**BASE, **options}, **prune_options
            )
            ppl = perplexity(model, windows, batch_size=2, progress=False)["ppl"]
            nonzero = [h.get("nonzero") for h in plan.history]
            row = {"variant": name, "sparsity": s, "ppl": ppl, "achieved": plan.achieved_sparsity,
                   "rounds": len(plan.history), "nonzero_per_round": nonzero,
                   "candidates_per_round": [h.get("candidates") for h in plan.history],
                   "cv_tau_per_round": [h.get("cv_kendall_tau") for h in plan.history],
                   "widths": plan.widths(), "time_s": time.perf_counter() - t0}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(name, s, round(ppl, 2), round(row["time_s"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(VARIANTS))
