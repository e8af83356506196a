"""Simulated CPU memory of `obs` on SmolLM2-135M (fp32, 16 x 512 calibration tokens) beside the dense forward, with the
protocol of `minillm.bench.simulate.validate_cpu` (no labels, replaced weights kept counted), for comparison with the
measured record of `python -m minillm bench memory --model smollm2-135m --methods obs --batch 16 --seqlen 512`
(results/refit-memory/). Fake tensors, no weights: about 6 minutes on one CPU thread.

    python scripts/simulate_obs_memory.py [--out figures/simulated/smollm2-135m_16x512_float32_obs_vs_cpu.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minillm.bench import simulate
from minillm.files import write_json_atomic

MEASURED = "results/refit-memory/smollm2-135m_16x512_float32_obs.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="figures/simulated/smollm2-135m_16x512_float32_obs_vs_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape, batch, seqlen, dtype = "smollm2-135m-shape", 16, 512, "float32"
    rows = []
    for method in ("dense", "obs"):
        row = simulate.simulate_step(
            shape, {"method": method}, batch, seqlen, dtype, labels=False, keep_replaced_weights=True
        )
        rows.append({"model": shape, "label": method, "method": method, "options": {}, "batch": batch,
                     "seqlen": seqlen, "dtype": dtype, "simulated": True, **row})
        print(method, row.get("increase_gib"), row.get("peak_gib"), flush=True)
    record = {
        "simulated": True,
        "note": f"as simulate.validate_cpu: labels=False, replaced weights kept; compare with {MEASURED} (measured)",
        "rows": rows,
    }
    write_json_atomic(Path(args.out), record)


if __name__ == "__main__":
    main()
