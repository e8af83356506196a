"""Time the two zero-shot scorers on one model in one run, interleaved (A B A B ...), and compare their results.

    python scripts/bench_zeroshot.py --model gemma3-270m --limit 50 --repeats 2

Each repeat runs `minillm.evaluate.zeroshot` on all bundled tasks once with lm-eval's HFLM ("hflm") and once with
ContinuationHFLM ("continuation"), alternating which goes first. Prints each scorer's median wall time, their
ratio, and the per-task values of both (which must agree: the scorers compute the same log-likelihoods up to float
rounding). A benchmark, not a test: the ratio depends on the machine, the model's vocabulary and the tasks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import minillm  # noqa: E402
from minillm.evaluate import zeroshot  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--limit", type=int, default=50, help="examples per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.limit < 1:
        ap.error("--repeats and --limit must be >= 1")
    model, tok = minillm.load_model(args.model)
    times: dict[str, list[float]] = {"hflm": [], "continuation": []}
    results: dict[str, dict] = {}
    for r in range(args.repeats):
        for scorer in ("hflm", "continuation") if r % 2 == 0 else ("continuation", "hflm"):
            start = time.perf_counter()
            results[scorer] = zeroshot(model, tok, limit=args.limit, batch_size=args.batch_size, scorer=scorer)
            times[scorer].append(time.perf_counter() - start)
            print(f"repeat {r}: {scorer:<12} {times[scorer][-1]:7.1f} s", flush=True)
    hf, cont = statistics.median(times["hflm"]), statistics.median(times["continuation"])
    print(f"\nmodel {args.model}, {args.limit} examples a task, batch {args.batch_size}, {torch.get_num_threads()} "
          f"torch threads, {args.repeats} repeats interleaved")
    print(f"median wall time: hflm {hf:.1f} s, continuation {cont:.1f} s, ratio {hf / cont:.2f}x")
    tasks = [t for t, v in results["hflm"].items() if isinstance(v, dict)]
    differ = 0
    for t in tasks:
        a, b = results["hflm"][t]["value"], results["continuation"][t]["value"]
        differ += a != b
        print(f"  {t:<28} hflm {a:.4f}  continuation {b:.4f}")
    print(f"tasks whose value differs between the scorers: {differ} of {len(tasks)}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
