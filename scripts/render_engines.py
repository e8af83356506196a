"""Tables and figure of the llama.cpp latency bench from its committed record (no compute):
results/engines/llamacpp_smollm2-135m.json -> figures/engines/llamacpp_latency.{csv,md,png,pdf}.
The record is written by `python -m minillm bench latency --engine llamacpp --json ...` (needs `make engines`)."""

import json
import sys
from pathlib import Path

from minillm.artifact.report import engine_latency_frame, plot_latency, save_figure, save_table

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "results" / "engines" / "llamacpp_smollm2-135m.json"
OUT = ROOT / "figures" / "engines" / "llamacpp_latency"
COLUMNS = ["dtype", "variant", "architecture", "sparsity", "kind", "shape", "tokens_per_s", "speedup",
           "speedup_ci95_lo", "speedup_ci95_hi", "ceiling", "of_ceiling", "padding_overhead"]


def render(record_path: Path = RECORD, out: Path = OUT, figure: bool = True) -> list[Path]:
    record = json.loads(Path(record_path).read_text())
    df = engine_latency_frame(record)
    paths = save_table(df[COLUMNS], out)
    if figure:
        import matplotlib

        matplotlib.use("Agg")
        for kind in record["types"]:
            d = df[df["dtype"] == f"llama.cpp {kind}"]
            fig = plot_latency(d, f"{record['model']} in llama.cpp {kind}, {record['threads']} CPU threads")
            paths += save_figure(fig, out.parent / f"{out.name}_{kind}")
    return paths


if __name__ == "__main__":
    for p in render(figure="--no-figure" not in sys.argv):
        print(p.relative_to(ROOT))
