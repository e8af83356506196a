"""Command line: python -m minillm {prune,eval,info} ... (see --help of each)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_layers(text: str | None) -> list[int]:
    """'0-3,28,29' -> [0, 1, 2, 3, 28, 29]. A reversed range ('2-0') would silently skip nothing: it is an error, as
    is anything but non-negative integers and ranges (the model's layer count is checked by the allocation)."""
    if not text:
        return []
    out: list[int] = []
    for part in text.split(","):
        a, dash, b = part.strip().partition("-")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise ValueError(f"--skip-layers {text!r}: {part.strip()!r} is not a layer index or a range such as 0-3")
        if dash and int(b) < int(a):
            raise ValueError(f"--skip-layers {text!r}: the range {part.strip()!r} is empty; write it as {b}-{a}")
        out += list(range(int(a), int(b) + 1)) if dash else [int(a)]
    return out


def parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def finite_float(text: str) -> float:
    """A float flag: argparse's float() takes 'inf' and 'nan', which would make every score or loss NaN downstream."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _device(name: str | None) -> str | None:
    """Check a --device value before any work: a valid torch device string, and CUDA only where it exists."""
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        from minillm.device import backend

        if not backend().available():
            raise ValueError(f"--device {name!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= backend().device_count():
            raise ValueError(f"--device {name!r}: only {backend().device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name!r}: MPS is not available on this machine")
    return name


def _dtype(name: str | None):
    if name is None:
        return None
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def _holding_out(cmd):
    """Lock --out from the first check until the model is saved in it: a second run writing the same --out fails at
    once (naming the pid that holds it) instead of both reporting success while one result is silently lost."""

    @functools.wraps(cmd)
    def run(args) -> int:
        from minillm.files import check_output_dir, output_lock

        check_output_dir(args.out, args.overwrite)  # the clear messages first: the lock file goes beside --out
        with output_lock(args.out):
            return cmd(args)

    return run


def _load(name: str, dtype, device):
    """`minillm.load_model`, where a local directory without pruning.json that transformers cannot read (a pruned
    directory that lost its pruning.json: its weights are smaller than its config.json says) is one line, not a
    transformers traceback. A plain transformers directory loads as a dense model."""
    import minillm

    try:
        return minillm.load_model(name, dtype=dtype, device=device)
    except RuntimeError as e:
        path = Path(name)
        if not path.is_dir() or (path / "pruning.json").exists():
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{path} has no pruning.json and transformers cannot load it as a checkpoint ({reason}); if minillm prune "
            "wrote it, restore its pruning.json (the weights are pruned, the config.json is the original model's)"
        ) from None


def _check_seqlen(flag: str, seqlen: int, config) -> None:
    """A window must hold a next-token pair and fit the model's positions (beyond them: an IndexError or minutes of
    extrapolated nonsense)."""
    from minillm.prune import max_positions

    longest = max_positions(config)
    if seqlen < 2 or (longest is not None and seqlen > longest):
        raise ValueError(
            f"{flag} {seqlen} must be between 2 and the model's {longest} positions"
            if longest
            else f"{flag} {seqlen} must be >= 2"
        )


def _random_calibration(args, model, tok) -> tuple[torch.Tensor, dict]:
    """Seeded random token ids and their description. Scores from them say nothing about real text, so only the
    random-weight registry models (shape and tiny, which have no tokenizer) get them unasked; any other model without
    a tokenizer stops here unless --random-calibration asks for them."""
    from minillm.models import SHAPES

    if not args.random_calibration and args.model not in SHAPES:
        raise ValueError(
            f"{args.model} has no tokenizer (no tokenizer files), so there is no text to calibrate on: add the "
            "tokenizer files to the directory, or pass --random-calibration to calibrate on random token ids"
        )
    vocab = int(model.config.vocab_size)
    calib = torch.randint(
        0, vocab, (args.calib_samples, args.calib_seqlen), generator=torch.Generator().manual_seed(args.seed)
    )
    why = "--random-calibration" if args.random_calibration else "random-weight registry model"
    info = {
        "source": f"random token ids ({why}; model has {'a' if tok is not None else 'no'} tokenizer)",
        "n_samples": args.calib_samples,
        "seqlen": args.calib_seqlen,
        "seed": args.seed,
    }
    return calib, info


@_holding_out
def cmd_prune(args) -> int:
    import minillm
    from minillm.bench.measure import peak_memory
    from minillm.data import calibration_windows, describe_calibration
    from minillm.files import check_output_dir
    from minillm.prune import check_sparsity, max_positions, resolve_compensation
    from minillm.reconstruct import REFIT_CALIBRATION, ReconstructConfig
    from minillm.scores import check_options, get_method

    options = dict(args.option or [])
    for flag in ("queries", "eps", "space", "sign", "combination", "variant", "norm"):
        value = getattr(args, flag, None)
        if value is not None:
            options[flag] = value
    # everything that can be checked without the model is checked before loading it
    # a registry name is no directory, even where a folder of that name exists (a previous --out, say)
    inputs = [] if args.model in minillm.models.registry_names() else [args.model]
    check_output_dir(args.out, args.overwrite, inputs)
    check_sparsity(args.sparsity)
    skip_layers = parse_layers(args.skip_layers)
    method = get_method(args.method)
    check_options(method, args.method, options)
    rebuild = ReconstructConfig.for_method(
        method.spec.default_reconstruct, args.reconstruct, args.reconstruct_ridge, args.reconstruct_form
    )
    n_default, len_default = method.spec.default_calibration
    if rebuild is not None and n_default * len_default < REFIT_CALIBRATION[0] * REFIT_CALIBRATION[1]:
        n_default, len_default = REFIT_CALIBRATION  # a refit needs many more tokens than its widest projection's inputs
    seqlen_given = args.calib_seqlen is not None
    args.calib_samples = n_default if args.calib_samples is None else args.calib_samples
    args.calib_seqlen = len_default if args.calib_seqlen is None else args.calib_seqlen
    resolve_compensation(args.method, method.spec, args.compensate_bias, rebuild)
    _device(args.device)
    _device(args.stream_device)
    model, tok = _load(args.model, _dtype(args.dtype), args.device)
    calib, calib_info = None, None
    if method.spec.needs_calibration or rebuild is not None:
        longest = max_positions(model.config)
        if not seqlen_given and longest is not None and args.calib_seqlen > longest:
            args.calib_seqlen = longest  # the method's default windows are longer than this model reads
        _check_seqlen("--calib-seqlen", args.calib_seqlen, model.config)
        if tok is None or args.random_calibration:
            calib, calib_info = _random_calibration(args, model, tok)
        else:
            calib = calibration_windows(tok, args.calib_samples, args.calib_seqlen, seed=args.seed)
            calib_info = describe_calibration(args.calib_samples, args.calib_seqlen, args.seed)
    t0 = time.perf_counter()
    device = torch.device(args.stream_device) if args.stream_device else next(model.parameters()).device
    with peak_memory(device) as mem:
        plan = minillm.prune(
            model,
            args.method,
            args.sparsity,
            calib,
            allocation=args.allocation,
            attention_units=args.attention_units,
            targets=args.targets,
            skip_layers=skip_layers,
            round_to=args.round_to,
            seed=args.seed,
            calibration=calib_info,
            progress=not args.quiet,
            stream_device=args.stream_device,
            compensate_bias=args.compensate_bias,
            reconstruct=args.reconstruct,
            reconstruct_ridge=args.reconstruct_ridge,
            reconstruct_form=args.reconstruct_form,
            **options,
        )
    elapsed = time.perf_counter() - t0
    plan.history[-1]["peak_memory"] = mem.to_json()
    minillm.save_pruned(model, plan, args.out, tokenizer=tok, overwrite=args.overwrite)
    summary = {
        "out": str(args.out),
        "method": args.method,
        "requested_sparsity": args.sparsity,
        "achieved_sparsity": round(plan.achieved_sparsity, 6),
        "prune_time_s": round(elapsed, 3),
        "peak_memory_gib": round(mem.peak_gib, 3),
        "memory_device": mem.device,
    }
    print(json.dumps(summary, indent=1))
    return 0


def cmd_eval(args) -> int:
    from minillm.data import perplexity_windows
    from minillm.evaluate import perplexity, zeroshot
    from minillm.files import check_output_file, write_json_atomic
    from minillm.provenance import provenance

    if not (args.ppl or args.zeroshot):
        raise SystemExit("nothing to do: give --ppl and/or --zeroshot")
    if args.json:
        check_output_file(args.json, args.overwrite)  # before the evaluation, not after an hour of it
    _device(args.device)
    model, tok = _load(args.model, _dtype(args.dtype), args.device)
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer; evaluation needs real text")
    if args.ppl:
        _check_seqlen("--ppl-seqlen", args.ppl_seqlen, model.config)
    out: dict = {"model": args.model}
    if args.ppl:
        windows = perplexity_windows(tok, args.ppl_seqlen, args.ppl_windows)
        out["perplexity"] = perplexity(
            model, windows, batch_size=args.batch_size, progress=not args.quiet, bootstrap_iters=args.ppl_bootstrap
        )
        out["perplexity"]["text"] = "austen/prideprejudice"
    if args.zeroshot:
        out["zeroshot"] = zeroshot(
            model, tok, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, stderr=args.stderr
        )
    out["provenance"] = provenance(next(model.parameters()).device)
    print(json.dumps({k: v for k, v in out.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json_atomic(Path(args.json), out)
    return 0


def cmd_info(args) -> int:
    from minillm.adapters import supported_model_types
    from minillm.data import verify_checksums
    from minillm.models import registry_names
    from minillm.scores import available_methods

    info = {
        "models": registry_names(),
        "model_types": supported_model_types(),
        "methods": available_methods(),
        "data_checksums_ok": all(verify_checksums().values()),
    }
    print(json.dumps(info, indent=1))
    return 0


def _shape(text: str) -> tuple[int, int]:
    b, _, t = text.lower().partition("x")
    return int(b), int(t)


def cmd_bench(args) -> int:
    from minillm.bench import measure
    from minillm.files import write_json_atomic
    from minillm.provenance import provenance

    if args.simulate:
        return _bench_simulate(args)
    if args.what == "runtime":
        return _bench_runtime(args)
    args.model = args.model or "smollm2-135m"
    args.batch, args.seqlen = args.batch or 10, args.seqlen or 128
    args.dtype = args.dtype or "float32"
    if args.what == "memory-step":
        print(
            json.dumps(
                measure.memory_step(
                    args.model,
                    args.method,
                    args.batch,
                    args.seqlen,
                    args.dtype,
                    args.device,
                    args.sparsity,
                    json.loads(args.options),
                )
            )
        )
        return 0
    from minillm.device import backend

    device = args.device or ("cuda" if backend().available() else "cpu")
    if args.what == "memory":
        methods = [
            {"label": m, "method": m, "options": {"queries": 2} if m == "fms" else {}}
            for m in (args.methods or ["wanda_sp", "flap", "taylor", "fms"])
        ]
        result = measure.bench_memory(args.model, methods, args.batch, args.seqlen, args.dtype, device)
        for r in result["methods"]:
            print(
                f"{r['label']:>12}: peak {r.get('peak_gib', float('nan')):.3f} GiB, "
                f"x{r.get('ratio_to_dense_forward', float('nan')):.2f} dense forward {r.get('error', '')}"
            )
        print(f"{'dense':>12}: peak {result['dense_forward'].get('peak_gib', float('nan')):.3f} GiB")
    elif args.engine == "llamacpp":
        from minillm.bench import llamacpp

        if args.device not in (None, "cpu"):
            raise ValueError("--engine llamacpp runs on the CPU build of llama.cpp (make engines); leave --device out")
        device = "cpu"
        result = llamacpp.bench_latency_llamacpp(
            args.model or "smollm2-135m",
            args.sparsities,
            [_shape(s) for s in (args.prefill or ["1x128", "1x512"])],
            args.prompt,
            args.new_tokens,
            args.repeats,
            quant_types=tuple(args.quant_types),
            threads=args.threads,
            global_method=None if args.global_method == "none" else args.global_method,
            round_to=args.round_to,
            bench_repeats=args.bench_repeats or measure.BENCH_REPEATS,
        )
        llamacpp.print_speedups(result)
    else:
        prefill = [_shape(s) for s in (args.prefill or ["1x128", "16x128"])]
        result = measure.bench_latency(
            args.model,
            args.sparsities,
            prefill,
            args.decode_batch,
            args.prompt,
            args.new_tokens,
            args.repeats,
            args.dtype,
            device,
            args.round_to,
            include_24=args.include_24,
            compile=args.compile,
            sparse_backend=args.sparse_backend,
            bench_repeats=args.bench_repeats or measure.BENCH_REPEATS,
        )
        _print_speedups(result)
    result["provenance"] = provenance(device)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        write_json_atomic(Path(args.json), result)
    return 0


def _print_speedups(result: dict) -> None:
    """One line per pruned variant and shape: measured speed-up, its 95% interval, and the FLOP ceiling."""
    dense = result["rows"][0]
    shapes = {
        "prefill": [f"{x['batch']}x{x['seqlen']}" for x in dense["prefill"]],
        "decode": [f"b{x['batch']}" for x in dense["decode"]],
    }
    for r in result["rows"][1:]:
        name = f"{r['variant']} {r['sparsity']:.2f}"
        if r.get("error"):
            print(f"{name}: {r['error']}")
            continue
        for kind in ("prefill", "decode"):
            for shape, x, (lo, hi), ceiling in zip(
                shapes[kind], r[f"{kind}_speedup"], r[f"{kind}_speedup_ci95"], r[f"{kind}_ceiling"]
            ):
                bound = "n/a (sparse kernels)" if ceiling is None else f"{ceiling:.2f}x"
                print(f"{name} {kind} {shape}: speed-up {x:.2f}x (95% CI {lo:.2f}-{hi:.2f}), FLOP ceiling {bound}")


def _on_request(wanted: set) -> list[dict]:
    """The simulator's steps outside its default table that --methods names by label (obs, flap-reconstruct)."""
    from minillm.bench import simulate

    return [s for s in simulate.ON_REQUEST_STEPS if s["label"] in wanted]


def _bench_simulate(args) -> int:
    """`bench memory --simulate`: simulated peak memory (no GPU), or the validation tables with --validate."""
    from minillm.bench import simulate
    from minillm.files import write_json_atomic
    from minillm.models import SHAPES

    if args.what != "memory":
        raise ValueError("--simulate applies to `bench memory` only")
    if args.validate:
        out = simulate.write_validation(args.validate, args.cpu_records, table=not args.no_table)
        rows = out["h100"] + out["cpu"]
        print(simulate.validation_markdown(out["h100"], out["cpu"]) if args.json != "-" else json.dumps(rows))
        return 0
    wanted = set(args.methods or [])
    shapes = [(args.batch or 10, args.seqlen or 128)] if args.batch or args.seqlen else list(simulate.SHAPES)
    dtype = args.dtype or "float16"
    if args.model and args.model not in SHAPES:  # else every row would be a KeyError
        shapes_known = ", ".join(name for name in SHAPES if name.endswith("-shape"))
        raise ValueError(f"--model {args.model!r}: --simulate builds registry shapes only: {shapes_known} (or tiny-*)")
    if args.model:  # one model: the in-memory steps, or the streamed ones for the 70B shape (unless --methods says)
        default = simulate.STREAMED_STEPS if args.model == simulate.STREAMED_MODEL else simulate.STEPS
        pool = simulate.STEPS + simulate.STREAMED_STEPS if wanted else default
        steps = [s for s in pool if not wanted or {s["label"], s["method"]} & wanted] + _on_request(wanted)
        rows = simulate.simulate_table([args.model], shapes, steps, dtype, streamed=False)
    else:
        steps = [s for s in simulate.STEPS if not wanted or {s["label"], s["method"]} & wanted] + _on_request(wanted)
        rows = simulate.simulate_table(simulate.MODELS, shapes, steps, dtype, streamed=not wanted)
    if args.json == "-":
        print(json.dumps(rows))
    else:
        if args.json:
            write_json_atomic(Path(args.json), {"simulated": True, "rows": rows})
        for r in rows:
            peak = f"{r['peak_gib']:8.2f} GiB" if "peak_gib" in r else f"not simulable: {r['error']}"
            print(f"{r['model']:>18} {r['batch']:>3}x{r['seqlen']:<5} {r['label']:>20}: {peak} (simulated)")
    return 0


def _bench_runtime(args) -> int:
    """`bench runtime --profile P`: estimated run time of a profile on one H100 from counted FLOPs and bytes."""
    from minillm.artifact import estimate, experiments
    from minillm.files import write_json_atomic

    cfg = experiments.load_profile(args.profile or "gpu")
    if args.combine:  # estimates made section by section (one process each), joined
        rows = []
        for path in args.combine:
            data = json.loads(Path(path).read_text())
            if data.get("profile") != cfg["profile"]:
                raise ValueError(f"{path} estimates profile {data.get('profile')!r}, not {cfg['profile']!r}")
            rows += estimate.rows_from_json(data)
    else:
        rows = estimate.estimate_profile(cfg, sections=args.sections)
    text = estimate.markdown(rows, cfg["profile"])
    out = estimate.to_json(rows, cfg["profile"])
    if args.json == "-":
        print(json.dumps(out, indent=1))
        return 0
    if args.json:
        write_json_atomic(Path(args.json), out)
        Path(args.json).with_suffix(".md").write_text(text)
    print(text)
    return 0


def cmd_experiment(args) -> int:
    from minillm.artifact import experiments

    cfg = experiments.load_profile(args.profile)
    runners = {
        **{
            name: functools.partial(experiments.run_accuracy, cfg, args.force, name, not args.quiet, args.labels)
            for name in experiments.GRID_SECTIONS
        },
        "memory": lambda: experiments.run_memory(cfg, args.force),
        "latency": lambda: experiments.run_latency(cfg, args.force),
        "recovery": lambda: experiments.run_recovery(cfg, args.force, not args.quiet),
        "fms_diagnostics": lambda: experiments.run_fms_diagnostics(cfg, args.force, not args.quiet),
    }
    if args.labels is not None and args.name not in experiments.GRID_SECTIONS:
        raise SystemExit(f"--labels selects method entries of {', '.join(experiments.GRID_SECTIONS)}, not of {args.name}")
    records = runners[args.name]()
    print(f"{len(records)} records in {experiments.results_dir(args.profile, args.name)}")
    return 0


def cmd_pending(args) -> int:
    """`pending --profile P`: drop the records computed since from pending.json (results/P), print what is left."""
    from minillm.artifact import experiments

    left = experiments.refresh_pending(args.profile)
    if not left:
        print(f"nothing pending for profile {args.profile}")
    for entry in left:
        print(f"{len(entry['records'])} left: {entry['command']}")
    return 0


def _load_parent(directory: Path, base: str, device):
    """The unpruned parent of a pruned directory (its pruning.json's base_model), the KL teacher. minillm records a
    local directory as an absolute path; a relative one (plans of older versions) was recorded relative to where
    prune ran: it is looked for relative to the pruned directory first, then to the current directory, and a miss
    names both; registry names, absolute paths and Hub ids load as recorded."""
    import minillm
    from minillm.models import registry_names

    path = Path(base)
    if path.is_absolute() and not path.is_dir():
        raise FileNotFoundError(
            f"the parent model {base!r} (base_model in pruning.json) is no longer there; put it back, or recover "
            "without --kl-weight"
        )
    if base in registry_names() or path.is_absolute():
        return minillm.load_model(base, device=device)
    tried = [Path(directory) / path, path]
    for candidate in tried:
        if candidate.is_dir():
            return minillm.load_model(str(candidate), device=device)
    where = f"{tried[0]} (relative to the pruned directory) nor at {tried[1].resolve()} (relative to the current one)"
    if base.count("/") != 1 or base.startswith("."):  # not a Hub id 'org/name'
        raise FileNotFoundError(f"the parent model {base!r} (base_model in pruning.json) is neither at {where}")
    try:
        return minillm.load_model(base, device=device)
    except OSError as e:
        raise OSError(f"{e}; as a local path, the parent model {base!r} is neither at {where}") from None


@_holding_out
def cmd_recover(args) -> int:
    import minillm
    from minillm.data import calibration_windows
    from minillm.files import check_output_dir
    from minillm.recover import recover

    check_output_dir(args.out, args.overwrite, [args.directory])  # recovery leaves its input untouched
    _device(args.device)
    model, tok = minillm.load_pruned(args.directory, device=args.device)
    plan = minillm.pruning_state(model).plan
    if tok is None:
        raise SystemExit(f"{args.directory} has no tokenizer; recovery needs real text")
    windows = calibration_windows(tok, args.windows, args.seqlen, seed=args.seed + 1)
    teacher = None
    if args.kl_weight > 0:
        teacher, _ = _load_parent(args.directory, plan.base_model, args.device)
    merged, record = recover(
        model,
        windows,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        lr=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        teacher=teacher,
        kl_weight=args.kl_weight,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        progress=not args.quiet,
    )
    record["data"] = {
        "source": "austen (calibration novels, not the perplexity text)",
        "windows": args.windows,
        "seqlen": args.seqlen,
        "seed": args.seed + 1,
    }
    plan.recovery.append(record)
    minillm.save_pruned(merged, plan, args.out, tokenizer=tok, overwrite=args.overwrite)
    print(json.dumps({k: record[k] for k in ("method", "steps", "first_loss", "last_loss", "time_s")}, indent=1))
    return 0


def cmd_export(args) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    if args.float_type or args.tokenizer_pre:
        raise ValueError("--float-type and --tokenizer-pre are GGUF options (--format gguf)")
    return _export_hf(args)


def _export_gguf(args) -> int:
    from minillm.gguf_export import DEFAULT_PAD_TO, export_gguf

    pad_to = DEFAULT_PAD_TO if args.pad_to is None else args.pad_to
    if pad_to < 1:
        raise ValueError(f"--pad-to must be a positive integer, got {pad_to}")
    record = export_gguf(
        args.directory, args.out, float_type=args.float_type, pad_to=pad_to, tokenizer_pre=args.tokenizer_pre,
        overwrite=args.overwrite,
    )
    summary = {"out": str(args.out), "format": "gguf", **{k: record[k] for k in ("architecture", "float_type")}}
    summary |= {k: record["params"][k] for k in ("pruned_prunable", "stored_prunable_weights", "padding_overhead")}
    print(json.dumps(summary, indent=1))
    return 0


@_holding_out
def _export_hf(args) -> int:
    from minillm.export import export_pretrained
    from minillm.files import check_output_dir

    check_output_dir(args.out, args.overwrite, [args.directory])  # the export leaves its input untouched
    pad_to = 1 if args.pad_to is None else args.pad_to
    if pad_to < 1:
        raise ValueError(f"--pad-to must be a positive integer, got {pad_to}")
    record = export_pretrained(
        args.directory, args.out, pad_to=pad_to, overwrite=args.overwrite, verify=not args.no_verify
    )
    params = record["params"]
    summary = {
        "out": str(args.out),
        "format": args.format,
        **record["stock_widths"],
        **{k: params[k] for k in ("pruned_prunable", "stored_prunable", "padding_overhead")},
        "notes": record["notes"],
    }
    print(json.dumps(summary, indent=1))
    return 0


def _add_prune(sub) -> None:
    """`prune`: score, remove, write a reloadable directory."""
    pr = sub.add_parser("prune", help="score, remove units physically, write a reloadable directory")
    pr.add_argument("--model", default="smollm2-135m", help="registry name, local directory or Hub id")
    pr.add_argument("--method", required=True, help="fms, bonsai, taylor, wanda_sp, flap, magnitude, random")
    pr.add_argument("--sparsity", type=finite_float, required=True, help="fraction of prunable parameters to remove")
    pr.add_argument("--out", required=True, type=Path, help="output directory (pruning.json + model.safetensors)")
    pr.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --out even when it is a non-empty directory not written by minillm (other files stay)",
    )
    pr.add_argument(
        "--calib-samples",
        type=positive_int,
        default=None,
        help="calibration windows (default: the method's own, 10 x 64 tokens for most, 16 x 512 for flap, 32 x 512 "
        "for obs and for any --reconstruct; see docs/methods.md)",
    )
    pr.add_argument(
        "--calib-seqlen", type=int, default=None, help="tokens per calibration window (default: the method's own)"
    )
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument(
        "--random-calibration",
        action="store_true",
        help="calibrate on seeded random token ids instead of text (needed for a model without a tokenizer, other "
        "than the random-weight registry models; recorded in the plan)",
    )
    pr.add_argument(
        "--allocation",
        choices=("uniform", "global"),
        default=None,
        help="per-layer uniform or global ranking (default: the method's own)",
    )
    pr.add_argument("--attention-units", choices=("auto", "kv_group", "query_head"), default="auto")
    pr.add_argument("--targets", choices=("both", "attention", "mlp"), default="both")
    pr.add_argument("--skip-layers", help="layers left intact, e.g. '0-3,28,29'")
    pr.add_argument("--round-to", type=int, default=1, help="round kept MLP widths to a multiple of this")
    pr.add_argument("--queries", type=int, help="fms: number of SPSA queries")
    pr.add_argument("--eps", type=finite_float, help="fms: SPSA perturbation scale")
    pr.add_argument("--space", help="fms: perturbation space (weights | gates)")
    pr.add_argument("--sign", help="fms: sign handling")
    pr.add_argument("--combination", help="fms: per-weight combination (product | additive | taylor)")
    pr.add_argument("--variant", help="taylor: element1 | element2 | vector")
    pr.add_argument("--norm", help="magnitude: l1 | l2")
    pr.add_argument(
        "--option",
        action="append",
        type=parse_option,
        metavar="KEY=VALUE",
        help="any other method option (value parsed as JSON when possible)",
    )
    pr.add_argument("--dtype", help="float32 | bfloat16 | float16")
    pr.add_argument("--device", help="where the model is loaded: cpu, cuda, cuda:1, ...")
    pr.add_argument(
        "--stream-device",
        help="keep weights on --device (e.g. cpu) and stream one decoder layer at a "
        "time to this device (e.g. cuda) for scoring: models larger than the GPU",
    )
    pr.add_argument(
        "--compensate-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fold removed units' mean output into biases (FLAP; default: on for flap only, off with "
        "--reconstruct)",
    )
    pr.add_argument(
        "--reconstruct",
        choices=("dense", "sequential", "none"),
        default=None,
        help="refit the output projections to the kept units by least squares on the calibration data before "
        "removal: statistics of the dense model, or layer by layer from the pruned prefix (supersedes "
        "--compensate-bias; after bonsai's last round; not with the N:M methods, which remove no column); default: the method's own (dense for obs, none "
        "for the others)",
    )
    pr.add_argument(
        "--reconstruct-ridge",
        type=finite_float,
        default=None,
        help="relative ridge of the refit, times the mean input variance (default 1e-2)",
    )
    pr.add_argument(
        "--reconstruct-form",
        choices=("centered", "uncentered"),
        default=None,
        help="centered: fit a bias (created where the model has none; default); uncentered: no bias, stock shape",
    )
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=cmd_prune)


def _add_eval(sub) -> None:
    """`eval`: perplexity and zero-shot accuracy."""
    ev = sub.add_parser("eval", help="perplexity on Pride and Prejudice and/or zero-shot accuracy")
    ev.add_argument("model", help="a pruned directory, registry name, local directory or Hub id")
    ev.add_argument("--ppl", action="store_true")
    ev.add_argument("--ppl-seqlen", type=positive_int, default=512)
    ev.add_argument("--ppl-windows", type=positive_int, default=8)
    ev.add_argument(
        "--ppl-bootstrap",
        type=positive_int,
        default=0,
        metavar="ITERS",
        help="add a bootstrap 95%% interval over windows (ppl_ci95) from this many resamples",
    )
    ev.add_argument("--zeroshot", action="store_true")
    ev.add_argument("--stderr", action="store_true", help="zero-shot standard errors from lm-eval")
    ev.add_argument("--tasks", nargs="*", help="bundled task names (default: all)")
    ev.add_argument("--limit", type=positive_int, help="examples per task")
    ev.add_argument("--batch-size", type=positive_int, default=4)
    ev.add_argument("--json", help="also write the result (with provenance) to this file")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ev.add_argument("--dtype")
    ev.add_argument("--device")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)


def _add_bench(sub) -> None:
    """`bench`: memory, latency, simulated memory, estimated run time."""
    be = sub.add_parser("bench", help="peak memory of pruning steps, latency of pruned models")
    be.add_argument("what", choices=("memory", "latency", "memory-step", "runtime"),
                    help="runtime: estimated H100 run time of --profile from counted FLOPs and bytes (no GPU)")
    be.add_argument("--profile", help="runtime: the profile to estimate (default gpu)")
    be.add_argument("--sections", nargs="*", help="runtime: only these sections")
    be.add_argument("--combine", nargs="*", help="runtime: join estimates written with --json (no counting)")
    be.add_argument("--model", help="registry name, directory or Hub id (default smollm2-135m; with --simulate: "
                    "the 7B-class shapes and the streamed 70B shape)")
    be.add_argument("--methods", nargs="*", help="memory: methods to compare with the dense forward pass")
    be.add_argument("--method", default="dense", help="memory-step: one method (internal)")
    be.add_argument("--batch", type=int, help="default 10 (with --simulate: 10 x 128 and 4 x 2048)")
    be.add_argument("--seqlen", type=int, help="default 128")
    be.add_argument("--sparsity", type=finite_float, default=0.2)
    be.add_argument("--options", default="{}", help="memory-step: method options as JSON (internal)")
    be.add_argument("--sparsities", type=finite_float, nargs="*", default=[0.2, 0.5])
    be.add_argument(
        "--prefill", nargs="*", help="BATCHxLENGTH (default 1x128 16x128; --engine llamacpp: 1x128 1x512)"
    )
    be.add_argument("--decode-batch", type=int, nargs="*", default=[1])
    be.add_argument("--prompt", type=int, default=128)
    be.add_argument("--new-tokens", type=int, default=64)
    be.add_argument("--repeats", type=int, default=20)
    be.add_argument(
        "--bench-repeats",
        type=int,
        help="latency: repeats of the whole interleaved bench, the speed-up intervals are over all their paired rounds "
        "(default 2)",
    )
    be.add_argument("--round-to", type=int, default=1)
    be.add_argument("--include-24", action="store_true", help="latency: add a semi-structured 2:4 copy")
    be.add_argument(
        "--engine",
        choices=("transformers", "llamacpp"),
        default="transformers",
        help="latency: transformers (default) or llama.cpp on GGUF exports (make engines)",
    )
    be.add_argument(
        "--quant-types", nargs="*", default=["f32", "q8_0"], help="latency, llamacpp: GGUF types (f32, q8_0)"
    )
    be.add_argument("--threads", type=int, help="latency, llamacpp: CPU threads (default: every core)")
    be.add_argument(
        "--global-method",
        default="magnitude",
        help="latency, llamacpp: method of the global plans timed per-layer (deci) and padded (stock); none: skip",
    )
    be.add_argument(
        "--compile",
        choices=("none", "all"),
        default="none",
        help="latency: prefill and decode both eager or both compiled",
    )
    be.add_argument(
        "--sparse-backend", choices=("auto", "cutlass", "cusparselt"), default="auto", help="latency: 2:4 kernels"
    )
    be.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default float32 (simulated: float16)")
    be.add_argument("--device")
    be.add_argument("--json", nargs="?", const="-", help="write the result record here (no path: print JSON)")
    be.add_argument(
        "--simulate", action="store_true", help="memory: predict the peak GPU memory without a GPU (fake tensors)"
    )
    be.add_argument(
        "--validate",
        nargs="?",
        const="figures/simulated/memory_sim.md",
        help="with --simulate: write the validation tables (H100 reference figures, CPU records) to this markdown",
    )
    be.add_argument(
        "--cpu-records",
        default="results/cpu-full/memory",
        help="with --validate: the measured CPU memory records to compare with (default: %(default)s)",
    )
    be.add_argument("--no-table", action="store_true", help="with --validate: skip the table of every step")
    be.set_defaults(func=cmd_bench)


def _add_experiment(sub) -> None:
    """`experiment`: compute the missing records of one experiment of a profile."""
    ex = sub.add_parser("experiment", help="compute the missing records of one experiment of a profile")
    ex.add_argument(
        "name",
        choices=("accuracy", "ablations", "calibration_budget", "memory", "latency", "recovery", "fms_diagnostics"),
    )
    ex.add_argument("--profile", default="cpu")
    ex.add_argument("--force", action="store_true", help="recompute records that exist")
    ex.add_argument("--quiet", action="store_true")
    ex.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="accuracy, ablations, calibration_budget: only these method entries (and the dense record if 'dense' is listed), e.g. to "
        "share a long grid between processes",
    )
    ex.set_defaults(func=cmd_experiment)


def _add_pending(sub) -> None:
    """`pending`: what is left of a long grid."""
    pe = sub.add_parser(
        "pending", help="update results/<profile>/pending.json from the records on disk and list what is left"
    )
    pe.add_argument("--profile", default="cpu-full")
    pe.set_defaults(func=cmd_pending)


def _add_recover(sub) -> None:
    """`recover`: LoRA fine-tuning of a pruned directory."""
    rc = sub.add_parser("recover", help="LoRA fine-tuning of a pruned directory (optionally KL to the parent)")
    rc.add_argument("directory", type=Path, help="a directory written by prune (left untouched)")
    rc.add_argument("--out", type=Path, required=True)
    rc.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --out even when it is a non-empty directory not written by minillm (other files stay)",
    )
    rc.add_argument("--rank", type=int, default=8)
    rc.add_argument("--alpha", type=finite_float, default=16.0)
    rc.add_argument("--dropout", type=finite_float, default=0.05)
    rc.add_argument("--lr", type=finite_float, default=1e-4)
    rc.add_argument("--steps", type=int, default=100)
    rc.add_argument("--batch-size", type=int, default=4)
    rc.add_argument("--windows", type=int, default=256, help="training windows drawn from the calibration novels")
    rc.add_argument("--seqlen", type=int, default=256)
    rc.add_argument(
        "--kl-weight", type=finite_float, default=0.0, help="weight of KL(parent || pruned); 0 = LoRA alone"
    )
    rc.add_argument("--gradient-checkpointing", action="store_true")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--device")
    rc.add_argument("--quiet", action="store_true")
    rc.set_defaults(func=cmd_recover)


def _add_export(sub) -> None:
    """`export`: a pruned directory in the stock transformers form, for tools without minillm."""
    ex = sub.add_parser(
        "export", help="write a pruned directory in a form the stock transformers class loads (zero-padded widths)"
    )
    ex.add_argument("directory", type=Path, help="a directory written by prune or recover (left untouched)")
    ex.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: a directory of config.json + safetensors for from_pretrained (default); gguf: one .gguf file for "
        "llama.cpp (LLaMA family; per-layer widths as llama.cpp's deci architecture)",
    )
    ex.add_argument("--out", type=Path, required=True, help="hf: a directory; gguf: a file named *.gguf")
    ex.add_argument(
        "--pad-to",
        type=int,
        default=None,
        help="round MLP widths up to a multiple of this. hf: the common width of all layers (e.g. 64 or 256 for "
        "kernels; never beyond the original width), default 1; gguf: each layer's width, default 32 (Q8_0 needs "
        "rows of 32 values, the k-quants 256)",
    )
    ex.add_argument(
        "--float-type", choices=("f32", "f16", "bf16"), default=None, help="gguf: tensor type (default: the model's)"
    )
    ex.add_argument(
        "--tokenizer-pre",
        default=None,
        help="gguf: llama.cpp's pre-tokenizer name (e.g. llama-bpe), needed when the tokenizer's own does not say",
    )
    ex.add_argument(
        "--no-verify", action="store_true", help="hf: skip the logit comparison with the pruned model"
    )
    ex.add_argument(
        "--overwrite",
        action="store_true",
        help="hf: write into --out even when it is a non-empty directory not written by minillm (other files stay); "
        "gguf: replace an existing file",
    )
    ex.set_defaults(func=cmd_export)


def _add_info(sub) -> None:
    """`info`: registry, architectures, methods, data checksums."""
    info = sub.add_parser("info", help="registry names, supported architectures, methods, data checksums")
    info.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    # the console script is `minillm`; `python -m minillm` runs this module as __main__.py
    prog = "python -m minillm" if Path(sys.argv[0]).name == "__main__.py" else "minillm"
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_experiment(sub)
    _add_pending(sub)
    _add_recover(sub)
    _add_export(sub)
    _add_info(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from minillm.files import terminate_as_exit

    try:
        with terminate_as_exit():  # SIGTERM runs the clean-up of temporary directories
            return args.func(args)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
