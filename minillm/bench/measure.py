"""Measurement: peak memory of a step, parameter counts, latency.

CPU peak memory is the process's resident set size sampled every few milliseconds by a background thread during
the step (the peak of the step itself, unlike ru_maxrss, which is the peak of the whole process lifetime). GPU peak
memory is torch's max_memory_allocated / max_memory_reserved after a reset.

Latency is timed by hand (`_timed`) rather than with `torch.utils.benchmark.Timer`: the Timer runs with one thread
by default (CPU timings would not be those of the model as used, nor those of the committed records), reports
blocks of runs rather than each repeat (the median and IQR here are over single calls), and synchronises through
torch.cuda directly, while `minillm.device.backend` lets tests stand in a fake accelerator. The dense and pruned
models are timed in interleaved rounds (one call of each per round, rotating order) and the whole bench is repeated,
so a change in the machine's load lands on every variant alike; speed-ups are medians of per-round ratios with a
bootstrap interval, beside the ceiling their counted FLOPs allow (`bench_latency`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from minillm.device import is_oom

GIB = 1024**3
# glibc settings for CPU memory measurements (see memory_in_subprocess)
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass
class PeakMemory:
    device: str
    peak_bytes: int = 0  # CPU: peak RSS during the step; GPU: max_memory_allocated
    baseline_bytes: int = 0  # at the start of the step
    reserved_bytes: int | None = None  # GPU only: max_memory_reserved

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def increase_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "peak_bytes": self.peak_bytes,
            "baseline_bytes": self.baseline_bytes,
            "reserved_bytes": self.reserved_bytes,
            "peak_gib": round(self.peak_gib, 4),
            "increase_gib": round(self.increase_bytes / GIB, 4),
        }


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@contextmanager
def peak_memory(device: str | torch.device = "cpu", interval_s: float = 0.002):
    """Context manager yielding a PeakMemory that is filled in when the block exits."""
    from minillm.device import backend

    dev = torch.device(device)
    result = PeakMemory(str(dev))
    cuda = backend()
    if cuda.is_cuda(dev):
        cuda.synchronize(dev)
        cuda.reset_peak(dev)
        result.baseline_bytes = cuda.memory_allocated(dev)
        try:
            yield result
        finally:
            cuda.synchronize(dev)
            result.peak_bytes = cuda.max_memory_allocated(dev)
            result.reserved_bytes = cuda.max_memory_reserved(dev)
        return
    result.baseline_bytes = peak = _rss()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.peak_bytes = max(peak, _rss())


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- memory of one pruning step, each in a fresh process ------------------------------------------------------------


def memory_step(
    model_name: str,
    method: str,
    batch: int,
    seqlen: int,
    dtype: str = "float32",
    device: str = "cpu",
    sparsity: float = 0.2,
    options: dict | None = None,
    seed: int = 0,
    warmup: bool = True,
) -> dict:
    """In *this* process: load the model, then measure the peak memory of either the dense forward pass
    (method='dense', no grad) or the method's full scoring-and-pruning step on a batch of random token ids
    (memory depends on shapes, not on values). Meant to run in a fresh process (see `memory_in_subprocess`).
    For a method with a scoring step of its own, `scoring` also gives the peak of scoring alone: the removal that
    follows allocates the pruned weights anew, which is not what a scoring criterion costs.
    warmup: first run a forward pass on 1 x 8 tokens, outside the measurement."""
    import gc
    import time

    from minillm.models import load_model
    from minillm.prune import prune, score

    torch_dtype = getattr(torch, dtype)
    model, _ = load_model(model_name, dtype=torch_dtype, device=device)
    dev = next(model.parameters()).device
    tokens = torch.randint(
        0, int(model.config.vocab_size), (batch, seqlen), generator=torch.Generator().manual_seed(seed)
    ).to(dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if warmup:
        # page in the (memory-mapped) weights and initialise the kernels' one-time state, so the step's increase is
        # activations and scoring state, not the first touch of the weights
        with torch.no_grad():
            model(input_ids=tokens[:1, :8])
        gc.collect()
    t0 = time.perf_counter()
    scoring = None
    try:
        if method == "dense":
            with peak_memory(dev) as mem, torch.no_grad():
                model(input_ids=tokens)
        elif _separate_scoring(method, options or {}):
            # two phases measured one after the other in this process: scoring alone (what a scoring criterion
            # costs), then allocation and physical removal (new, smaller weight tensors) with the scores kept
            score_opts, prune_opts = _split_options(options or {})
            with peak_memory(dev) as scoring:
                scores = score(model, method, tokens, progress=False, **score_opts)
            with peak_memory(dev) as mem:
                prune(model, method, sparsity, tokens, progress=False, scores=scores, **prune_opts)
        else:
            with peak_memory(dev) as mem:
                prune(model, method, sparsity, tokens, progress=False, **(options or {}))
    except Exception as e:
        if not is_oom(e):
            raise
        return oom_result(method, dev, weights, e)
    out = {"method": method, "wall_time_s": time.perf_counter() - t0, "weights_bytes": weights, **mem.to_json()}
    if scoring is not None:  # the whole step's peak is the higher of the two phases', from the step's start
        whole = PeakMemory(mem.device, max(scoring.peak_bytes, mem.peak_bytes), scoring.baseline_bytes)
        whole.reserved_bytes = max(filter(None, (scoring.reserved_bytes, mem.reserved_bytes)), default=None)
        out.update(whole.to_json(), scoring=scoring.to_json())
    return out


# prune() keywords that belong to allocation and removal, not to scoring (see prune.prune)
_PRUNE_ONLY = {
    "allocation",
    "targets",
    "skip_layers",
    "round_to",
    "calibration",
    "compensate_bias",
    "reconstruct",
    "reconstruct_ridge",
    "reconstruct_form",
}


def _separate_scoring(method: str, options: dict) -> bool:
    """Whether the step can be measured as scoring, then removal: the method has a scoring step of its own
    (not Bonsai or the N:M baselines) and scores without layer streaming (whose peak belongs to both phases)."""
    from minillm.scores import get_method

    return not get_method(method).spec.scores_and_removes and "stream_device" not in options


def _split_options(options: dict) -> tuple[dict, dict]:
    """(score() keywords, prune() keywords with precomputed scores) from one memory entry's options."""
    score_opts = {k: v for k, v in options.items() if k not in _PRUNE_ONLY}
    prune_opts = {k: v for k, v in options.items() if k in _PRUNE_ONLY or k in ("attention_units", "seed")}
    return score_opts, prune_opts


def oom_result(method: str, device: torch.device, weights_bytes: int, exc: BaseException) -> dict:
    """An out-of-memory step is a result: the device, its capacity and the error, instead of a peak."""
    from minillm.device import backend

    cuda = backend()
    capacity = cuda.total_memory(device) if cuda.is_cuda(device) else None
    return {
        "method": method,
        "oom": True,
        "device": str(device),
        "capacity_bytes": capacity,
        "capacity_gib": round(capacity / GIB, 2) if capacity else None,
        "weights_bytes": weights_bytes,
        "error": [f"out of memory: {str(exc).splitlines()[0][:300]}"],
    }


def child_env(device: str) -> dict:
    """Environment of a memory-measuring child process (CPU: glibc returns freed large blocks at once)."""
    import os

    env = dict(os.environ)
    if torch.device(device).type == "cpu":
        env.update(CPU_MALLOC_ENV)
    return env


def memory_in_subprocess(
    model_name: str,
    method: str,
    batch: int,
    seqlen: int,
    dtype: str = "float32",
    device: str = "cpu",
    sparsity: float = 0.2,
    options: dict | None = None,
    timeout_s: float = 3600,
) -> dict:
    """Run `memory_step` in a fresh Python process and return its result (or the error it died with).

    On CPU the child's glibc malloc serves every allocation of 64 KiB or more with its own mmap and returns it to the
    system when freed (MALLOC_MMAP_THRESHOLD_), so peak RSS follows the live tensors. With the default dynamic
    threshold, freed tensors stay in the heap and the same step's peak RSS varied by up to 2x between runs."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "minillm",
        "bench",
        "memory-step",
        "--model",
        model_name,
        "--method",
        method,
        "--batch",
        str(batch),
        "--seqlen",
        str(seqlen),
        "--dtype",
        dtype,
        "--device",
        device,
        "--sparsity",
        str(sparsity),
        "--options",
        json.dumps(options or {}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env(device))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {
            "method": method,
            "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"],
            "returncode": proc.returncode,
        }
    return json.loads(lines[-1])


def bench_memory(
    model_name: str, methods: list[dict], batch: int, seqlen: int, dtype: str = "float32", device: str = "cpu"
) -> dict:
    """The dense forward pass and every method's pruning step on the same batch, each in a fresh process; peaks as
    absolute bytes and as ratios to the dense forward pass."""
    dense = memory_in_subprocess(model_name, "dense", batch, seqlen, dtype, device)
    rows = []
    for m in methods:
        r = memory_in_subprocess(
            model_name, m["method"], batch, seqlen, dtype, device, m.get("sparsity", 0.2), m.get("options")
        )
        r["label"] = m.get("label", m["method"])
        if "peak_bytes" in r and "peak_bytes" in dense:
            r["ratio_to_dense_forward"] = r["peak_bytes"] / dense["peak_bytes"]
            extra_dense = dense["peak_bytes"] - dense["baseline_bytes"]
            r["increase_ratio_to_dense_forward"] = (r["peak_bytes"] - r["baseline_bytes"]) / max(extra_dense, 1)
            if "scoring" in r:
                r["scoring_ratio_to_dense_forward"] = r["scoring"]["peak_bytes"] / dense["peak_bytes"]
        rows.append(r)
    return {
        "model": model_name,
        "batch": batch,
        "seqlen": seqlen,
        "dtype": dtype,
        "device": device,
        "protocol": "each step in a fresh process after a 1x8-token warm-up forward"
        + (f"; glibc {CPU_MALLOC_ENV}" if torch.device(device).type == "cpu" else ""),
        "dense_forward": dense,
        "methods": rows,
    }


# --- latency of dense and pruned models -----------------------------------------------------------------------------


def _timed(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Interleaved timing: `repeats` rounds with one timed call of every function per round, the order rotated by
    one each round (A B C, B C A, C A B, ...), so that drift in the machine's load falls on all of them alike
    (functions timed one after the other would each see a different stretch of it). Warm-up is the caller's.
    Each function's times in seconds, round by round."""
    import time

    from minillm.device import backend

    cuda = backend()

    def sync():
        if cuda.is_cuda(device):
            cuda.synchronize(device)

    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    sync()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _warm_up(fns: dict[str, Callable[[], object]], warmup: int, may_fail: set[str]) -> dict[str, str]:
    """Call every function `warmup` times; the functions named in `may_fail` that raise are left out of `fns` (in
    place) and their errors returned, any other error is raised."""
    errors = {}
    for name in list(fns):
        try:
            for _ in range(warmup):
                fns[name]()
        except Exception as e:  # noqa: BLE001 - the sparse kernels can fail at the first matmul; record it
            if name not in may_fail:
                raise
            errors[name] = f"{type(e).__name__}: {e}"[:500]
            del fns[name]
    return errors


def _summary(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    q1, med, q3 = (float(torch.quantile(t, q)) for q in (0.25, 0.5, 0.75))
    return {"median_s": med, "iqr_s": q3 - q1, "q1_s": q1, "q3_s": q3, "repeats": len(times)}


def speedup(dense_times: list[list[float]], times: list[list[float]], iters: int = 2000, seed: int = 0) -> dict:
    """Speed-up of a variant over dense from paired rounds (`_timed`: both timed once in each round), per bench
    repeat a list of round times. Per round the ratio dense time / variant time; `speedup` is the median of these
    ratios over all rounds, `ci95` its percentile bootstrap 95% interval (`iters` resamples of the rounds, numpy
    Generator seeded with `seed`), `per_bench` the ratio of the medians in each bench repeat (their spread shows
    how much a whole bench moves between repeats). Pairing cancels the load drift shared by both sides of a round."""
    import numpy as np

    dense = np.concatenate([np.asarray(d, dtype=np.float64) for d in dense_times])
    variant = np.concatenate([np.asarray(v, dtype=np.float64) for v in times])
    if dense.shape != variant.shape or dense.size == 0:
        raise ValueError(f"need the same non-zero number of paired rounds, got {dense.size} and {variant.size}")
    ratios = dense / variant
    idx = np.random.default_rng(seed).integers(0, ratios.size, size=(iters, ratios.size))
    lo, hi = np.quantile(np.median(ratios[idx], axis=1), [0.025, 0.975])
    return {
        "speedup": float(np.median(ratios)),
        "ci95": [float(lo), float(hi)],
        "per_bench": [float(np.median(d) / np.median(v)) for d, v in zip(dense_times, times)],
        "rounds": int(ratios.size),
    }


COMPILE_POLICIES = ("none", "all")
BENCH_REPEATS = 2  # whole-bench repeats of `bench_latency` unless told
# in every latency record's configuration: records timed by an earlier protocol (variants one after the other) are
# not current and are recomputed
LATENCY_PROTOCOL = "interleaved rounds, paired speed-ups"


def _generate_compile_kwargs(policy: str) -> dict:
    """`generate` keyword arguments that make its compilation follow the policy on every device."""
    if policy == "none":
        return {"disable_compile": True}
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return {"compile_config": config}


@torch.no_grad()
def latency(
    models: dict[str, torch.nn.Module],
    prefill: list[tuple[int, int]],
    decode_batches: list[int],
    prompt: int,
    new_tokens: int,
    repeats: int = 20,
    warmup: int = 3,
    static_cache: bool = True,
    compile: str = "none",
    bench_repeats: int = 1,
    may_fail: tuple[str, ...] = (),
) -> dict[str, dict]:
    """Prefill time per (batch, length) and decode tokens/s (greedy, fixed number of new tokens) per batch size, of
    every model in `models` (name -> model, all on one device and in memory together), per name.

    Per shape, every model is warmed up (`warmup` calls; decode: 1), then timed interleaved (`_timed`): `repeats`
    rounds of prefill (decode: max(3, repeats // 4)), one call of each model per round. The whole bench (all shapes)
    runs `bench_repeats` times; each shape's `times_s` holds the round times per bench repeat, its median and IQR
    are over all of them. A model named in `may_fail` whose warm-up raises (sparse kernels) is dropped from the
    bench and gets an `error` and no timings; any other error is raised.

    compile: 'none' runs prefill and decode eagerly everywhere (transformers' automatic compilation of static-cache
    decoding on CUDA is switched off), 'all' compiles both on every device. The policy is in the result, so a
    compiled run is never compared with an uncompiled one."""
    if compile not in COMPILE_POLICIES:
        raise ValueError(f"compile must be one of {COMPILE_POLICIES}, got {compile!r}")
    first = next(iter(models.values()))
    dev = next(first.parameters()).device
    vocab = int(first.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prefill_ids = [torch.randint(0, vocab, (b, t), generator=gen).to(dev) for b, t in prefill]
    decode_ids = [torch.randint(0, vocab, (b, prompt), generator=gen).to(dev) for b in decode_batches]
    forward = dict(models)
    # every model compiles its own graphs for every shape: room for all of them in dynamo's cache
    limit = max(torch._dynamo.config.recompile_limit, 2 * len(models) * (len(prefill) + len(decode_batches)))
    if compile == "all":
        torch._dynamo.reset()
        from minillm.device import backend

        forward = {name: backend().compile(m) for name, m in models.items()}
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    kwargs.update(_generate_compile_kwargs(compile))
    if static_cache:
        kwargs["cache_implementation"] = "static"
    benches = [("prefill", i, ids, warmup, repeats) for i, ids in enumerate(prefill_ids)]
    benches += [("decode", i, ids, 1, max(3, repeats // 4)) for i, ids in enumerate(decode_ids)]
    times: dict[tuple[str, int], dict[str, list[list[float]]]] = {(kind, i): {} for kind, i, *_ in benches}
    errors: dict[str, str] = {}
    with torch._dynamo.config.patch(recompile_limit=limit):
        for _ in range(bench_repeats):
            for kind, i, ids, n_warm, n_rounds in benches:
                if kind == "prefill":
                    fns = {n: (lambda f=f, ids=ids: f(input_ids=ids, use_cache=False)) for n, f in forward.items()}
                else:
                    fns = {n: (lambda m=m, ids=ids: m.generate(ids, **kwargs)) for n, m in models.items()}
                fns = {n: fn for n, fn in fns.items() if n not in errors}
                errors.update(_warm_up(fns, n_warm, set(may_fail)))
                for name, t in _timed(fns, dev, n_rounds).items():
                    times[(kind, i)].setdefault(name, []).append(t)
    out = {}
    for name in models:
        out[name] = {"prefill": [], "decode": [], "compile": compile}
        if name in errors:
            out[name]["error"] = errors[name]
            continue
        for i, (b, t) in enumerate(prefill):
            per_bench = times[("prefill", i)][name]
            s = _summary([x for rep in per_bench for x in rep])
            out[name]["prefill"].append(
                {"batch": b, "seqlen": t, **s, "tokens_per_s": b * t / s["median_s"], "times_s": per_bench}
            )
        for i, b in enumerate(decode_batches):
            per_bench = times[("decode", i)][name]
            s = _summary([x for rep in per_bench for x in rep])
            out[name]["decode"].append(
                {
                    "batch": b,
                    "prompt": prompt,
                    "new_tokens": new_tokens,
                    **s,
                    "tokens_per_s": b * new_tokens / s["median_s"],
                    "cache": "static" if static_cache else "dynamic",
                    "times_s": per_bench,
                }
            )
    return out


def _latency_copies(model_name, variants, dtype, device, round_to, method, sparse_backend, work) -> tuple:
    """The copies `bench_latency` times, all in memory at once: ({"0": dense, "1": ..., ...}, one row per copy with
    its achieved sparsity, counted FLOPs of `work` = (prefill, decode_batches, prompt, new_tokens) and parameter
    counts, the attention implementation)."""
    from minillm.bench.flops import latency_flops
    from minillm.models import load_model
    from minillm.prune import prune
    from minillm.semi_structured import stored_parameters, to_semi_structured

    rows, models, attn_impl = [], {}, None
    for i, (kind, s) in enumerate(variants):
        model, _ = load_model(model_name, dtype=getattr(torch, dtype), device=device)
        attn_impl = getattr(model.config, "_attn_implementation", None)
        row = {"variant": kind, "sparsity": s, "achieved_sparsity": 0.0}
        if kind == "structured":
            row["achieved_sparsity"] = prune(model, method, s, None, round_to=round_to, progress=False).achieved_sparsity
        elif kind == "2:4":
            plan = prune(model, "magnitude_24", 0.5, None, progress=False)
            row["achieved_sparsity"] = plan.history[0]["weight_sparsity"]
        flops = latency_flops(model, *work)
        row["prefill_flops"], row["decode_flops"] = flops["prefill"], flops["decode"]
        if kind == "2:4":
            row["semi_structured"] = to_semi_structured(model, sparse_backend)
        row["params"] = count_parameters(model)
        row["params_stored"] = stored_parameters(model)
        rows.append(row)
        models[str(i)] = model
    return models, rows, attn_impl


def _add_speedups(rows: list[dict]) -> None:
    """Each copy's speed-up over the dense row (first) from paired rounds, with its interval and its FLOP ceiling
    (none for a 2:4 copy on sparse kernels)."""
    dense = rows[0]
    for r in rows[1:]:
        sparse_kernels = bool(r.get("semi_structured", {}).get("converted"))
        for kind in ("prefill", "decode"):
            ratios = (
                [] if r.get("error") else [speedup(d["times_s"], x["times_s"]) for d, x in zip(dense[kind], r[kind])]
            )
            r[f"{kind}_speedup"] = [x["speedup"] for x in ratios]
            r[f"{kind}_speedup_ci95"] = [x["ci95"] for x in ratios]
            r[f"{kind}_speedup_per_bench"] = [x["per_bench"] for x in ratios]
            r[f"{kind}_ceiling"] = [
                None if sparse_kernels else d / f for d, f in zip(dense[f"{kind}_flops"], r[f"{kind}_flops"])
            ]


def bench_latency(
    model_name: str,
    sparsities: list[float],
    prefill: list[tuple[int, int]],
    decode_batches: list[int],
    prompt: int,
    new_tokens: int,
    repeats: int = 20,
    dtype: str = "float32",
    device: str = "cpu",
    round_to: int = 1,
    method: str = "random",
    include_24: bool = False,
    compile: str = "none",
    sparse_backend: str = "auto",
    bench_repeats: int = BENCH_REPEATS,
) -> dict:
    """Dense and uniformly pruned copies of one model, timed together (`latency`: interleaved rounds, the whole bench
    `bench_repeats` times). Latency depends on the kept shapes only, so the pruned copies use `method` (default
    random scores) with per-layer uniform allocation. `include_24` adds a semi-structured 2:4 copy (magnitude), on
    sparse kernels where the GPU has them (`sparse_backend`: 'auto', 'cutlass' or 'cusparselt'); a failed conversion
    or a failed timing of the sparse copy is recorded in its row (`semi_structured.reason`, `error`) and the run goes
    on. `compile`: see `latency`.

    All copies are in memory at once: on a GPU, a 7B-class model in fp16 and its pruned copies must fit together
    (dense, 20%, 50% and 2:4 of LLaMA-7B: about 40 GB); if they do not, loading a copy fails with the device's
    out-of-memory error before anything is timed (time fewer sparsities per run).

    Each pruned row has, per prefill shape and decode batch, the speed-up over dense from paired rounds (`speedup`:
    `*_speedup`, `*_speedup_ci95`, `*_speedup_per_bench`) and its ceiling from counted FLOPs
    (`flops.latency_flops`): `*_ceiling` = dense FLOPs / the copy's FLOPs, the speed-up if time were proportional
    to multiply-adds. A 2:4 copy is counted before its conversion; on sparse kernels it has no ceiling (None): the
    counter does not see the kernels' skipped multiply-adds."""
    from minillm.device import backend

    variants = [("dense", 0.0)] + [("structured", s) for s in sparsities] + ([("2:4", 0.5)] if include_24 else [])
    work = (prefill, decode_batches, prompt, new_tokens)
    models, rows, attn_impl = _latency_copies(model_name, variants, dtype, device, round_to, method, sparse_backend, work)
    timed = latency(
        models,
        prefill,
        decode_batches,
        prompt,
        new_tokens,
        repeats,
        compile=compile,
        bench_repeats=bench_repeats,
        may_fail=tuple(str(i) for i, (kind, _) in enumerate(variants) if kind == "2:4"),
    )
    for i, row in enumerate(rows):
        row.update(timed[str(i)])
    del models, timed
    backend().empty_cache()
    _add_speedups(rows)
    return {
        "model": model_name,
        "dtype": dtype,
        "device": device,
        "round_to": round_to,
        "method": method,
        "attn_implementation": attn_impl,
        "compile": compile,
        "sparse_backend": sparse_backend,
        "protocol": LATENCY_PROTOCOL,
        "repeats": repeats,
        "bench_repeats": bench_repeats,
        "rows": rows,
    }
