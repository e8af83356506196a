"""Evaluation: perplexity over fixed windows, and zero-shot accuracy through lm-eval on an in-memory model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import DATA_DIR, data_file, tokenizer_adds_bos
from .files import temporary_directory

TASK_DIR_PREFIX = "minillm-tasks-"  # lm-eval task folders, in the system's temporary folder


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    bootstrap_iters: int = 0,
    bootstrap_seed: int = 0,
) -> dict:
    """exp of the token-weighted mean next-token NLL over `windows` (LongTensor [n, seqlen]); every window predicts
    seqlen - 1 tokens. The loss is computed in fp32 whatever the model's dtype.

    With `bootstrap_iters` > 0 the result also holds `ppl_ci95`, a percentile bootstrap 95% interval over windows
    (`bootstrap_interval`, from the same forward passes), and the per-window NLL sums it was drawn from."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, seqlen >= 2], got {tuple(windows.shape)}")
    if isinstance(bootstrap_iters, bool) or not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise ValueError(f"bootstrap_iters must be a non-negative integer, got {bootstrap_iters!r}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    window_nll = []
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        for i in range(batch.shape[0]):  # one window at a time keeps the fp32 copy of the logits small
            nll = F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += batch.shape[1] - 1
            window_nll.append(float(nll))
    model.train(was_training)
    mean = total_nll / total_tokens
    out = {
        "ppl": _ppl(mean),
        "nll": mean,
        "tokens": total_tokens,
        "n_windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
    }
    if bootstrap_iters:
        tokens = [int(windows.shape[1]) - 1] * len(window_nll)
        out["ppl_ci95"] = bootstrap_interval(window_nll, tokens, bootstrap_iters, bootstrap_seed)
        out["bootstrap"] = {"iters": bootstrap_iters, "seed": bootstrap_seed, "unit": "window", "level": 0.95}
        out["window_nll"] = window_nll
    return out


def _ppl(mean_nll: float) -> float:
    # NaN stays NaN (a broken model), only a finite but huge loss overflows to inf
    return float("nan") if math.isnan(mean_nll) else math.exp(mean_nll) if mean_nll < 700 else float("inf")


def bootstrap_interval(window_nll, window_tokens, iters: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval [lo, hi] of the perplexity over windows: `iters` resamples (with replacement,
    drawn by a numpy Generator seeded with `seed`) of the windows' NLL sums and token counts, each giving
    exp(sum of NLL / sum of tokens). One window gives [ppl, ppl]: no spread can be estimated from it."""
    import numpy as np

    nll = np.asarray(window_nll, dtype=np.float64)
    tokens = np.asarray(window_tokens, dtype=np.float64)
    if nll.ndim != 1 or nll.shape != tokens.shape or nll.size == 0:
        raise ValueError(
            f"window_nll and window_tokens must be equally long non-empty lists, got {nll.shape} and {tokens.shape}"
        )
    if (tokens <= 0).any():
        raise ValueError("every window must have a positive token count")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, nll.size, size=(iters, nll.size))
    means = nll[idx].sum(axis=1) / tokens[idx].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [_ppl(float(lo)), _ppl(float(hi))]


def load_task_specs() -> list[dict]:
    """The bundled BIG-bench cloze tasks (minillm/resources/bigbench/tasks.json): name, file, metric, chance level."""
    return json.loads(data_file("bigbench/tasks.json").read_text())


def task_yaml(spec: dict, jsonl: Path) -> str:
    metrics = "\n".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in ("acc", "acc_norm")
    )
    return (
        f"task: {spec['task']}\ntag: bb_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(jsonl))}\noutput_type: multiple_choice\ntest_split: test\n"
        f"doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n{metrics}\n"
        f"metadata:\n  version: 1.0\n"
    )


def write_task_dir(directory: Path, specs: list[dict]) -> Path:
    """lm-eval task YAMLs with absolute paths to the bundled JSONL files."""
    directory.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (directory / f"{spec['task']}.yaml").write_text(
            task_yaml(spec, data_file(f"bigbench/{spec['file']}").resolve())
        )
    return directory


# passed to lm-eval when standard errors are asked for: any value > 0 turns them on; mean-aggregated metrics get the
# closed form, so this only matters for bootstrappable metrics, which the bundled tasks do not declare
STDERR_BOOTSTRAP_ITERS = 1000
SCORERS = {
    "continuation": "minillm.loglikelihood.ContinuationHFLM (LM head at continuation positions only)",
    "hflm": "lm_eval HFLM",
}


def _number(x):
    """lm-eval reports 'N/A' for a stderr it did not bootstrap."""
    return float(x) if isinstance(x, (int, float)) else None


def zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    stderr: bool = False,
    scorer: str = "continuation",
) -> dict:
    """Zero-shot accuracy on the bundled cloze tasks, fully offline. Returns {task: {"metric", "value",
    "stderr", "chance", "n"}} plus "average" of the declared metrics. `tasks` are names from tasks.json (all when
    None); `limit` caps examples per task.

    `stderr`: ask lm-eval for standard errors (bootstrap_iters > 0). For the mean-aggregated acc and acc_norm of
    these tasks lm-eval does not resample: it returns the closed form sample_std / sqrt(n) (ddof 1, i.e.
    sqrt(p (1 - p) / (n - 1))), so this costs nothing. The result then also holds "average_stderr", the standard
    error of the unweighted task mean, sqrt(sum of squared task stderrs) / number of tasks (tasks independent).
    Without it lm-eval reports no stderr (None here), as records made before this option hold.

    `scorer`: "continuation" (default) scores requests with `loglikelihood.ContinuationHFLM`, which applies the LM
    head only at continuation positions (the same log-likelihoods up to float rounding; 1.49x faster for Gemma 3
    270M, measured by scripts/bench_zeroshot.py); "hflm" with lm-eval's own `HFLM`. The result names it under
    "scorer"; records without that key were made with "hflm"."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {scorer!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit (examples per task) must be a positive integer or None, got {limit!r}")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if scorer == "hflm":
        from lm_eval.models.huggingface import HFLM
    else:
        from .loglikelihood import ContinuationHFLM as HFLM

    specs = load_task_specs()
    by_name = {s["task"]: s for s in specs}
    names = list(by_name) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in by_name]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; bundled: {', '.join(by_name)}")
    device = str(next(model.parameters()).device)
    # BOS as in perplexity: a tokenizer that adds it (Gemma) gets it in front of every request, stated explicitly
    # rather than left to lm-eval's default; for one that adds none (SmolLM2) lm-eval's default is left unchanged.
    bos = {"add_bos_token": True} if tokenizer_adds_bos(tokenizer) else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **bos)
    # removed on exit and on SIGTERM; one a SIGKILL left behind is removed by the next zeroshot call
    with temporary_directory(prefix=TASK_DIR_PREFIX) as tmp:
        # only the bundled tasks can be asked for: indexing lm-eval's own ~15k task files (15-20 s a call) is skipped
        folder = write_task_dir(Path(tmp), [by_name[t] for t in names])
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            num_fewshot=0,
            bootstrap_iters=STDERR_BOOTSTRAP_ITERS if stderr else 0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    out = {}
    for t in names:
        r, metric = res["results"][t], by_name[t]["metric"]
        out[t] = {
            "metric": metric,
            "value": float(r[f"{metric},none"]),
            "stderr": _number(r.get(f"{metric}_stderr,none")),
            "chance": by_name[t].get("chance"),
            "n": int(res["n-samples"][t]["effective"]),
        }
    out["average"] = sum(v["value"] for v in out.values()) / len(names)
    if stderr:
        errors = [out[t]["stderr"] for t in names]
        out["average_stderr"] = None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(names)
    out["scorer"] = SCORERS[scorer]
    out["lm_eval_version"] = lm_eval.__version__ if hasattr(lm_eval, "__version__") else None
    return out


__all__ = ["perplexity", "bootstrap_interval", "zeroshot", "load_task_specs", "DATA_DIR"]
