"""Tables and figures of the llama.cpp latency bench from its committed records (no compute):
results/engines/llamacpp_*.json -> figures/engines/llamacpp_latency.{csv,md} (every record, one row per copy, type
and shape) and figures/engines/<record>_<type>.{png,pdf}.
A record is written by `python -m minillm bench latency --engine llamacpp --json ...` (needs `make engines`); its
global plans (the `deci` and `padded` rows) come from `--global-method` (magnitude by default)."""

import json
import sys
from pathlib import Path

import pandas as pd

from minillm.artifact.report import engine_latency_frame, plot_latency, save_figure, save_table

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "results" / "engines"
OUT = ROOT / "figures" / "engines"
COLUMNS = ["record", "global_method", "dtype", "variant", "architecture", "sparsity", "kind", "shape", "tokens_per_s",
           "speedup", "speedup_ci95_lo", "speedup_ci95_hi", "ceiling", "of_ceiling", "padding_overhead"]


def render(records: Path = RECORDS, out: Path = OUT, figure: bool = True) -> list[Path]:
    frames, paths = [], []
    for path in sorted(Path(records).glob("llamacpp_*.json")):
        record = json.loads(path.read_text())
        df = engine_latency_frame(record)
        df.insert(0, "record", path.stem)
        df.insert(1, "global_method", record.get("global_method"))
        frames.append(df)
        if figure:
            import matplotlib

            matplotlib.use("Agg")
            for kind in record["types"]:
                d = df[df["dtype"] == f"llama.cpp {kind}"]
                title = f"{record['model']} in llama.cpp {kind}, {record['threads']} CPU threads"
                if record.get("global_method"):
                    title += f" (deci / padded: global {record['global_method']})"
                paths += save_figure(plot_latency(d, title), Path(out) / f"{path.stem}_{kind}")
    table = pd.concat(frames, ignore_index=True)[COLUMNS]
    return save_table(table, Path(out) / "llamacpp_latency") + paths


if __name__ == "__main__":
    for p in render(figure="--no-figure" not in sys.argv):
        print(p.relative_to(ROOT))
