#!/usr/bin/env python3
"""Regenerate minillm/resources/bigbench/*.jsonl and minillm/resources/bigbench/tasks.json: six BIG-bench tasks in cloze form.

Source: the `bigbench==1.0.0` sdist on PyPI (bigbench-1.0.0.tar.gz, 358 MB, Apache-2.0), which ships every JSON
task. Only the six task.json members below are read, streamed out of the tarball with `tarfile` (nothing else is
extracted, bigbench is never installed). Standard library only.

How to run (from the repository root):

    pip download --no-deps bigbench==1.0.0 -d /tmp/bb        # about 40 s; runs the sdist's setup for metadata only
    python3 minillm/resources/make_bigbench.py --sdist /tmp/bb/bigbench-1.0.0.tar.gz --out minillm/resources/bigbench

Without --sdist the script runs that `pip download` into a temporary directory itself (with the pip of the
interpreter that runs it). The sdist is checked against the SHA-256 of the file used for the committed data;
--any-sdist skips that check.

Conversion (cloze: the answers are scored as continuations of the query, no "choice:" listing):
  * Multiple choice comes from `target_scores`: choices in the JSON order, label = the index of the unique highest
    score. Examples without target_scores, or whose highest score is tied, are dropped (none are, in these six).
  * Cleaning, the same for every task: inputs and choices are stripped and runs of whitespace inside them are
    collapsed to one space (BIG-bench has stray double spaces, e.g. strategyqa "Was  Godfrey of Bouillon ...").
    An example is dropped as malformed when two of its choices are equal after lower-casing and deleting every
    non-alphanumeric character. This hits exactly 2 goal_inference examples, whose distractor is the gold answer
    without its dots ("Upload an Image to TinyPiccom" vs the gold "Upload an Image to TinyPic.com").
  * Queries per task (see TASKS): wikihow and cause_and_effect use the input as is; social_iqa and strategyqa use
    "Question: {input}\\nAnswer:"; hyperbaton has an empty query and the two candidate phrases, parsed out of the
    input with HYPERBATON_RE, become the sentences "The {a}." and "The {b}." (a minimal pair).
  * Exact duplicate examples in the source are kept (social_iqa has 19, goal_inference 4, step_inference 1,
    strategyqa 1), so the pools match BIG-bench.
  * Tasks with more than MAX_KEEP usable examples are subsampled: random.Random(SEED).sample(range(n), MAX_KEEP),
    sorted, so the kept examples stay in source order.
  * Each line is {"query", "choices", "label", "canary"}; the canary is the task.json's BIG-bench canary string,
    kept in every line on purpose (the data must stay recognisable if it is ever scraped).

tasks.json lists, per task: the lm-eval task name, file, source member, n_source_mc (usable multiple-choice examples
in the source, i.e. the pool the subsample is drawn from), n_kept, n_choices (an int, or "variable"), the metric
to report (acc or acc_norm, whichever separated SmolLM2-135M and Gemma 3 270M from chance better in a
200-example zero-shot run of each task; see README.md here) and chance (the mean of 1/len(choices) over the kept
examples).

Output is byte-reproducible: json.dumps(..., ensure_ascii=False), UTF-8, "\\n" line ends.
Tested with Python 3.11.7.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MAX_KEEP = 1000
SEED = 0
HYPERBATON_RE = re.compile(r'a " (.*?) " b " (.*?) "')


def qa(s: str) -> str:
    return f"Question: {s}\nAnswer:"


def as_is(s: str) -> str:
    return s


# short name, task.json under benchmark_tasks/, query format ("hyperbaton" = special minimal-pair handling), metric
TASKS = [
    ("hyperbaton", "hyperbaton/task.json", "hyperbaton", "acc"),
    ("wikihow_step", "goal_step_wikihow/step_inference/task.json", as_is, "acc"),
    ("wikihow_goal", "goal_step_wikihow/goal_inference/task.json", as_is, "acc_norm"),
    ("social_iqa", "social_iqa/task.json", qa, "acc_norm"),
    ("cause_and_effect", "cause_and_effect/one_sentence_no_prompt/task.json", as_is, "acc"),
    ("strategyqa", "strategyqa/task.json", qa, "acc"),
]


def clean(s: str) -> str:
    return " ".join(s.split())


def squash(s: str) -> str:
    return re.sub(r"[\W_]+", "", s.lower())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_sdist(workdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(workdir)],
                   check=True)
    return workdir / SDIST_NAME


def read_members(sdist: Path, wanted: set[str]) -> dict[str, bytes]:
    """Stream the tarball once and return the wanted members' bytes (stops as soon as all are found)."""
    found = {}
    with tarfile.open(sdist, "r|gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                found[member.name] = tar.extractfile(member).read()
                if len(found) == len(wanted):
                    break
    missing = wanted - set(found)
    if missing:
        sys.exit(f"{sdist} lacks {sorted(missing)}")
    return found


def convert_example(e: dict, fmt) -> tuple[dict | None, str]:
    """One BIG-bench example -> ({query, choices, label} or None, reason)."""
    ts = e.get("target_scores") or {}
    if not ts:
        return None, "no target_scores"
    if fmt == "hyperbaton":
        m = HYPERBATON_RE.search(e["input"])
        if not m or set(ts) != {"a", "b"}:
            return None, "hyperbaton input not parsed"
        choices = [f"The {clean(m.group(1))}.", f"The {clean(m.group(2))}."]
        scores = [float(ts["a"]), float(ts["b"])]
        query = ""
    else:
        choices = [clean(c) for c in ts]
        scores = [float(v) for v in ts.values()]
        query = fmt(clean(e["input"]))
    best = max(scores)
    if scores.count(best) != 1:
        return None, "tied best score"
    if len({squash(c) for c in choices}) != len(choices):
        return None, "near-duplicate choices"
    return {"query": query, "choices": choices, "label": scores.index(best)}, ""


def convert_task(short: str, member: str, blob: bytes, fmt, metric: str, out: Path) -> dict:
    task = json.loads(blob.decode("utf-8"))
    canary = task["canary"]
    if "canary GUID" not in canary:
        sys.exit(f"{member}: unexpected canary {canary!r}")
    usable, dropped = [], {}
    for e in task["examples"]:
        row, why = convert_example(e, fmt)
        if row is None:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            usable.append(row)
    n = len(usable)
    keep = sorted(random.Random(SEED).sample(range(n), MAX_KEEP)) if n > MAX_KEEP else list(range(n))
    rows = [usable[i] for i in keep]
    lines = [json.dumps({**r, "canary": canary}, ensure_ascii=False) + "\n" for r in rows]
    path = out / f"{short}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes("".join(lines).encode("utf-8"))
    os.replace(tmp, path)

    ks = [len(r["choices"]) for r in rows]
    labels = [r["label"] for r in rows]
    print(f"{short:17s} source examples {len(task['examples']):6d}  usable {n:6d}  kept {len(rows):5d}  "
          f"dropped {dropped or '{}'}  choices {sorted(set(ks))}  "
          f"label counts {[labels.count(i) for i in range(max(ks))]}  {path.stat().st_size} bytes")
    return {
        "task": f"bb_cloze_{short}",
        "file": path.name,
        "source": member,
        "n_source_mc": n,
        "n_kept": len(rows),
        "n_choices": ks[0] if len(set(ks)) == 1 else "variable",
        "metric": metric,
        "chance": round(sum(1 / k for k in ks) / len(ks), 4),
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, help=f"path to {SDIST_NAME} (default: pip download it)")
    ap.add_argument("--out", type=Path, default=here / "bigbench", help="output folder (default: minillm/resources/bigbench)")
    ap.add_argument("--any-sdist", action="store_true", help="do not insist on the SHA-256 of the sdist")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bigbench-") as tmp:
        sdist = args.sdist.resolve() if args.sdist else download_sdist(Path(tmp))
        digest = sha256_file(sdist)
        print(f"sdist: {sdist.name}  sha256 {digest}")
        if digest != SDIST_SHA256 and not args.any_sdist:
            sys.exit(f"{sdist} is not the sdist the committed files came from (sha256 {SDIST_SHA256}); "
                     f"use --any-sdist to convert it anyway")
        blobs = read_members(sdist, {PREFIX + t[1] for t in TASKS})

    args.out.mkdir(parents=True, exist_ok=True)
    index = [convert_task(short, PREFIX + rel, blobs[PREFIX + rel], fmt, metric, args.out)
             for short, rel, fmt, metric in TASKS]
    (args.out / "tasks.json").write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'tasks.json'}")
    write_yamls(index, args.out)


def write_yamls(index: list[dict], out: Path) -> None:
    """lm-eval task files (one per task) in out/lm_eval/, with data paths relative to the repository root, so that
    `lm_eval --include_path minillm/resources/bigbench/lm_eval --tasks bb_cloze` works from there. minillm writes its own copies
    with absolute paths at run time (minillm.evaluate.write_task_dir)."""
    folder = out / "lm_eval"
    folder.mkdir(exist_ok=True)
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in ("acc", "acc_norm"))
    for spec in index:
        text = (f"# generated by minillm/resources/make_bigbench.py; declared metric for this task: {spec['metric']}\n"
                f"task: {spec['task']}\ntag: bb_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: minillm/resources/bigbench/{spec['file']}\noutput_type: multiple_choice\ntest_split: test\n"
                f"doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n{metrics}"
                f"metadata:\n  version: 1.0\n")
        (folder / f"{spec['task']}.yaml").write_text(text, encoding="utf-8")
    print(f"wrote {len(index)} task files to {folder}")


if __name__ == "__main__":
    main()
