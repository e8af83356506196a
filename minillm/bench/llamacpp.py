"""Latency of pruned models in llama.cpp (through llama-cpp-python, `make engines`): the speed a user of the GGUF
export sees, measured with the protocol of `measure.bench_latency` (interleaved rounds, paired speed-ups with
bootstrap intervals, every copy in memory at once, the whole bench repeated) and set beside the same FLOP ceilings.

Copies, each written by `minillm.export_gguf` and, for Q8_0, quantised by llama.cpp itself:

* `dense`, and `structured` at each sparsity with per-layer uniform widths (llama.cpp's `llama` architecture);
* with `global_method`, at each sparsity a global plan of that method (layers of different widths) twice: `deci`
  (the per-layer widths, MLP widths rounded to 32 per layer) and `padded` (the stock transformers export of the
  same model, zero-padded to its widest layer, written as `llama`): what the padding of a stock export costs.

Work per copy, as in the transformers bench: prefill = one forward pass of BATCHxLENGTH tokens (batch 1: llama.cpp
evaluates one sequence per context here); decode = the prompt's forward pass then `new_tokens` - 1 single-token
steps (fixed token ids: the time does not depend on which). FLOP ceilings come from `flops.latency_flops` on the
torch model each copy was written from (the padded copy: the padded torch model), so a copy at its ceiling runs
exactly as much faster as it does fewer multiply-adds.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import torch

from minillm.bench.measure import LATENCY_PROTOCOL, _add_speedups, _summary, _timed, count_parameters

QUANT_TYPES = ("f32", "q8_0")
ENGINE_MISSING = "llama-cpp-python is not installed: `make engines` builds it (about 12 minutes on 2 cores)"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeError(ENGINE_MISSING) from e
    return llama_cpp


def quantize(src: Path, dst: Path, kind: str = "q8_0", threads: int = 0) -> None:
    """llama.cpp's own quantiser (`llama_model_quantize`) from an F32/F16 GGUF."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantise {src} to {kind} (code {rc})")


def _copies(model_name, sparsities, method, global_method, round_to, work, directory: Path) -> tuple[list, list]:
    """Write every copy's F32 GGUF: (rows with FLOPs and parameter counts, GGUF paths)."""
    from minillm.bench.flops import latency_flops
    from minillm.export import export_pretrained
    from minillm.gguf_export import export_gguf
    from minillm.models import load_model
    from minillm.prune import prune

    variants = [("dense", 0.0, None)] + [("structured", s, "uniform") for s in sparsities]
    variants += [(kind, s, "global") for s in sparsities for kind in ("deci", "padded")] if global_method else []
    rows, paths = [], []
    for i, (kind, s, alloc) in enumerate(variants):
        model, tok = load_model(model_name)
        row = {"variant": kind, "sparsity": s, "achieved_sparsity": 0.0, "allocation": alloc}
        if alloc is not None:
            m = method if alloc == "uniform" else global_method
            row["method"] = m
            row["achieved_sparsity"] = prune(
                model, m, s, None, allocation=alloc, round_to=round_to, progress=False
            ).achieved_sparsity
        if kind == "padded":
            from transformers import AutoModelForCausalLM

            record = export_pretrained(model, directory / f"hf{i}", tokenizer=tok)
            row["padding_overhead"] = record["params"]["padding_overhead"]
            model = AutoModelForCausalLM.from_pretrained(directory / f"hf{i}").eval()
        flops = latency_flops(model, *work)
        row["prefill_flops"], row["decode_flops"] = flops["prefill"], flops["decode"]
        row["params"] = count_parameters(model)
        path = directory / f"{i}.gguf"
        gguf = export_gguf(model, path, tokenizer=tok, float_type="f32")
        row["architecture"] = gguf["architecture"]
        if kind == "deci":
            row["padding_overhead"] = gguf["params"]["padding_overhead"]
        rows.append(row)
        paths.append(path)
        del model
    return rows, paths


def _time_engine(paths, prefill, prompt, new_tokens, repeats, warmup, threads, bench_repeats) -> list[dict]:
    """Every GGUF loaded at once; prefill and decode timed in interleaved rounds (`measure._timed`)."""
    llama_cpp = _llama_cpp()
    n_ctx = max([t for _, t in prefill] + [prompt + new_tokens]) + 8
    models = {
        str(i): llama_cpp.Llama(
            str(p), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
            logits_all=False, verbose=False,
        )
        for i, p in enumerate(paths)
    }
    vocab = models["0"].n_vocab()
    gen = torch.Generator().manual_seed(0)
    prefill_ids = [torch.randint(0, vocab, (t,), generator=gen).tolist() for _, t in prefill]
    prompt_ids = torch.randint(0, vocab, (prompt,), generator=gen).tolist()
    step_ids = torch.randint(0, vocab, (new_tokens,), generator=gen).tolist()

    def run_prefill(llm, ids):
        llm.reset()
        llm.eval(ids)

    def run_decode(llm):
        llm.reset()
        llm.eval(prompt_ids)
        for t in step_ids[:-1]:
            llm.eval([t])

    benches = [("prefill", i, warmup, repeats) for i in range(len(prefill))]
    benches += [("decode", 0, 1, max(3, repeats // 4))]
    times: dict = {(kind, i): {} for kind, i, *_ in benches}
    cpu = torch.device("cpu")
    try:
        for _ in range(bench_repeats):
            for kind, i, n_warm, n_rounds in benches:
                if kind == "prefill":
                    fns = {n: (lambda m=m, ids=prefill_ids[i]: run_prefill(m, ids)) for n, m in models.items()}
                else:
                    fns = {n: (lambda m=m: run_decode(m)) for n, m in models.items()}
                for fn in fns.values():
                    for _ in range(n_warm):
                        fn()
                for name, t in _timed(fns, cpu, n_rounds).items():
                    times[(kind, i)].setdefault(name, []).append(t)
    finally:
        for m in models.values():
            m.close()
    out = []
    for name in models:
        row = {"prefill": [], "decode": []}
        for i, (b, t) in enumerate(prefill):
            per_bench = times[("prefill", i)][name]
            s = _summary([x for rep in per_bench for x in rep])
            row["prefill"].append({"batch": b, "seqlen": t, **s, "tokens_per_s": t / s["median_s"], "times_s": per_bench})
        per_bench = times[("decode", 0)][name]
        s = _summary([x for rep in per_bench for x in rep])
        row["decode"].append(
            {"batch": 1, "prompt": prompt, "new_tokens": new_tokens, **s, "tokens_per_s": new_tokens / s["median_s"],
             "times_s": per_bench}
        )
        out.append(row)
    return out


def bench_latency_llamacpp(
    model_name: str,
    sparsities: list[float],
    prefill: list[tuple[int, int]],
    prompt: int,
    new_tokens: int,
    repeats: int = 20,
    quant_types: tuple[str, ...] = QUANT_TYPES,
    threads: int | None = None,
    method: str = "random",
    global_method: str | None = "magnitude",
    round_to: int = 1,
    bench_repeats: int = 2,
    warmup: int = 3,
) -> dict:
    """The record of the bench (module docstring): per quantisation type, one row per copy with its timings,
    speed-ups over dense with intervals and FLOP ceilings (`measure._add_speedups`)."""
    llama_cpp = _llama_cpp()
    if any(b != 1 for b, _ in prefill):
        raise ValueError(f"llama.cpp prefill is timed for batch 1 (one sequence per context), got {prefill}")
    bad = [q for q in quant_types if q not in QUANT_TYPES]
    if bad:
        raise ValueError(f"quantisation types must be among {QUANT_TYPES}, got {bad}")
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    work = (prefill, [1], prompt, new_tokens)
    result = {
        "engine": "llama.cpp",
        "engine_version": getattr(llama_cpp, "__version__", None),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "model": model_name,
        "threads": threads,
        "method": method,
        "global_method": global_method,
        "round_to": round_to,
        "protocol": LATENCY_PROTOCOL,
        "repeats": repeats,
        "bench_repeats": bench_repeats,
        "types": {},
    }
    with tempfile.TemporaryDirectory(prefix="minillm-llamacpp-") as tmp:
        tmp = Path(tmp)
        rows, paths = _copies(model_name, sparsities, method, global_method, round_to, work, tmp)
        for kind in quant_types:
            typed = paths
            if kind != "f32":
                typed = [p.with_suffix(f".{kind}.gguf") for p in paths]
                for src, dst in zip(paths, typed):
                    quantize(src, dst, kind, threads)
            timed = _time_engine(typed, prefill, prompt, new_tokens, repeats, warmup, threads, bench_repeats)
            typed_rows = [{**r, **t, "bytes": p.stat().st_size} for r, t, p in zip(rows, timed, typed)]
            _add_speedups(typed_rows)
            result["types"][kind] = typed_rows
    return result


def print_speedups(result: dict) -> None:
    """One line per copy, type and shape: speed-up, its 95% interval, the FLOP ceiling and the fraction reached."""
    for kind, rows in result["types"].items():
        dense = rows[0]
        print(f"llama.cpp {kind}: dense decode {dense['decode'][0]['tokens_per_s']:.1f} tokens/s, prefill "
              + ", ".join(f"1x{x['seqlen']} {x['tokens_per_s']:.0f} tokens/s" for x in dense["prefill"]))
        for r in rows[1:]:
            name = f"{r['variant']} {r['sparsity']:.2f} ({r['architecture']})"
            for shape, x, (lo, hi), ceiling in zip(
                [f"1x{p['seqlen']}" for p in r["prefill"]] + ["decode"],
                r["prefill_speedup"] + r["decode_speedup"],
                r["prefill_speedup_ci95"] + r["decode_speedup_ci95"],
                r["prefill_ceiling"] + r["decode_ceiling"],
            ):
                print(f"  {name} {shape}: speed-up {x:.2f}x (95% CI {lo:.2f}-{hi:.2f}), FLOP ceiling {ceiling:.2f}x, "
                      f"{100 * x / ceiling:.0f}% of it")


__all__ = ["bench_latency_llamacpp", "print_speedups", "quantize"]
