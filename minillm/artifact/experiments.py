"""Experiment drivers used by the notebooks: compute what is missing, write one record per configuration, reuse the
records that exist. Profiles (configs/*.yaml) say which model, data sizes, sparsities and methods.

Records live in results/<profile>/<experiment>/; each is written atomically, so an interrupted run resumes where
it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import yaml

from minillm.artifact.profiles import GRID_SECTIONS, ProfileError, resolved_entry, validate_profile
from minillm.artifact.records import REPO_ROOT, config_diff, load_record, save_record
from minillm.bench.measure import BENCH_REPEATS, LATENCY_PROTOCOL, peak_memory
from minillm.data import calibration_windows, describe_calibration, perplexity_windows
from minillm.evaluate import perplexity, zeroshot
from minillm.files import temporary_directory, write_json_atomic
from minillm.models import load_model
from minillm.prune import changes_weights, prune, score
from minillm.scores import get_method

log = logging.getLogger(__name__)
CONFIG_DIR = REPO_ROOT / "configs"
RESULTS_DIR = REPO_ROOT / "results"


def profile_path(name: str) -> Path:
    """configs/<name>.yaml; an unknown name is an error listing the known profiles (with the closest one)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        import difflib

        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(f"no profile {name!r} ({path}){hint}; known profiles: {', '.join(known)}")
    return path


def load_profile(name: str) -> dict:
    """Read configs/<name>.yaml and check it against the schema (minillm.artifact.profiles) before anything runs."""
    path = profile_path(name)
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ProfileError(f"{path}: expected a mapping of sections, got {type(cfg).__name__}")
    cfg["profile"] = name
    cfg["dtype"] = check_dtype(cfg.get("dtype", "float32"), f"profile {name!r}")
    validate_profile(cfg, str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path))
    return cfg


PROFILE_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(value, where: str = "profile") -> str:
    """The `dtype` a profile loads its model in: one of PROFILE_DTYPES (default float32)."""
    if value not in PROFILE_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {PROFILE_DTYPES}, got {value!r}")
    return value


def check_profile(name: str) -> dict:
    """Fail early with a clear message when a profile cannot run here (unknown or invalid profile, Hub unreachable,
    no CUDA)."""
    try:
        cfg = load_profile(name)
    except (FileNotFoundError, ProfileError) as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.get("requires_hub"):
        import os
        import urllib.request

        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise SystemExit(
                f"profile {name!r} downloads checkpoints from the Hugging Face Hub, but HF_HUB_OFFLINE=1; "
                "run with HF_HUB_OFFLINE=0 on a machine with network access"
            )
        try:
            urllib.request.urlopen("https://huggingface.co", timeout=10)
        except OSError as e:
            raise SystemExit(f"profile {name!r} needs the Hugging Face Hub, which is unreachable here ({e})") from None
    if cfg.get("device") == "cuda":
        from minillm.device import backend

        if not backend().available():
            raise SystemExit(f"profile {name!r} expects a CUDA GPU; none is available (use PROFILE=cpu)")
    return cfg


def results_dir(profile: str, experiment: str) -> Path:
    return RESULTS_DIR / profile / experiment


def _record_file(profile: str, experiment: str, label: str, sparsity: float, suffix: str = "") -> Path:
    return results_dir(profile, experiment) / f"{label}_s{round(sparsity * 100):02d}{suffix}.json"


def replicate_suffix(replicate: int) -> str:
    """The record-name suffix of seed replicate k: none for 0 (the record made before seeds existed), `_seed<k>`."""
    return f"_seed{replicate}" if replicate else ""


def seed_replicates(exp: dict, entry: dict) -> list[tuple[int, dict, list[float]]]:
    """(replicate k, the method entry of replicate k, the sparsities it runs) for one accuracy or ablation entry:
    the one enumeration of a section's grid that the drivers, `expected_records` and the run-time estimate share.
    Each entry comes with its section's settings applied (`profiles.resolved_entry`: the entry's own win).

    The resolved `seeds` list the replicates. Replicate 0 is the entry itself at all its sparsities, so its records
    keep their names and configurations. Replicate k > 0 adds k to the calibration seed (a new draw of calibration
    windows) and to the method seed together, and runs at the resolved `seed_sparsities`. With `seed_zeroshot:
    false` the replicates are evaluated by perplexity only: zero-shot then comes from replicate 0 with lm-eval's
    standard error, and its seed spread from the entries that keep `seed_zeroshot: true`."""
    resolved = resolved_entry(exp, entry)
    out = [(0, resolved, resolved["sparsities"])]
    for k in sorted(set(resolved["seeds"]) - {0}):
        replicate = {
            **resolved,
            "seed": resolved.get("seed", 0) + k,
            "calibration": {**resolved["calibration"], "seed": resolved["calibration"]["seed"] + k},
        }
        if not resolved["seed_zeroshot"]:
            replicate["zeroshot"] = False
        if resolved["seed_sparsities"]:
            out.append((k, replicate, resolved["seed_sparsities"]))
    return out


def _load(cfg: dict):
    """The profile's model on the profile's device (cpu unless the profile says otherwise), in its dtype."""
    import torch

    return load_model(cfg["model"], dtype=getattr(torch, cfg.get("dtype", "float32")), device=cfg.get("device", "cpu"))


def _calibration_settings(exp: dict, entry: dict) -> tuple[int, int, int]:
    """(n_samples, seqlen, seed) of one method entry: its own calibration settings over the experiment's."""
    c = resolved_entry(exp, entry)["calibration"]
    return c["n_samples"], c["seqlen"], c["seed"]


def _calibration(tok, exp: dict, entry: dict):
    """Calibration windows of one method entry and their description."""
    n, seqlen, seed = _calibration_settings(exp, entry)
    return calibration_windows(tok, n, seqlen, seed=seed), describe_calibration(n, seqlen, seed)


def _prune_entry(model, entry: dict, sparsity: float, calib, calib_info: dict, prune_options: dict, progress, **kw):
    """Prune `model` in place as the method entry says (its options over the experiment's prune options)."""
    return prune(
        model,
        entry["method"],
        sparsity,
        calib,
        seed=entry.get("seed", 0),
        calibration=calib_info,
        progress=progress,
        **kw,
        **prune_options,
        **entry.get("options", {}),
    )


def _plan_summary(plan) -> dict:
    return {
        "achieved_sparsity": plan.achieved_sparsity,
        "architecture": plan.architecture,
        "prunable_params_original": plan.prunable_params_original,
        "prunable_params_kept": plan.prunable_params_kept,
        "widths": plan.widths(),
        "history": plan.history,
        "layers": [k.to_json() for k in plan.layers],
    }


def _evaluate(model, tok, cfg: dict, sparsity: float) -> dict:
    ppl_cfg = cfg["perplexity"]
    windows = perplexity_windows(tok, ppl_cfg["seqlen"], ppl_cfg["windows"])
    ppl = perplexity(
        model,
        windows,
        batch_size=ppl_cfg.get("batch_size", 4),
        progress=False,
        bootstrap_iters=ppl_cfg.get("bootstrap_iters", 0),
        bootstrap_seed=ppl_cfg.get("bootstrap_seed", 0),
    )
    metrics = {"perplexity": ppl}
    zs = cfg.get("zeroshot")
    if zs and any(abs(sparsity - s) < 1e-9 for s in zs.get("sparsities", [sparsity])):
        metrics["zeroshot"] = zeroshot(
            model,
            tok,
            tasks=zs.get("tasks"),
            limit=zs.get("limit"),
            batch_size=zs.get("batch_size", 8),
            stderr=zs.get("stderr", False),
        )
    return metrics


def run_accuracy(
    cfg: dict, force: bool = False, experiment: str = "accuracy", progress: bool = False, labels=None
) -> list[dict]:
    """Prune the profile's model with every configured method at every sparsity, evaluate, write records.
    Scores that do not depend on the sparsity are computed once per method and reused for each sparsity.
    `labels` (None: all) runs only those method entries, and the dense record only when "dense" is among them, so
    that several processes can share a long grid (each record is its own file, written atomically). Replicate 0
    (seed 0) of every entry is computed before any seed replicate."""
    profile = cfg["profile"]
    exp = cfg[experiment]
    if labels is not None:
        known = ["dense"] + [e["label"] for e in exp["methods"]]
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise ValueError(f"{experiment} of profile {profile!r} has no method labels {unknown}; it has {known}")
    records = []
    dense_file = _record_file(profile, experiment, "dense", 0.0)
    if labels is None or "dense" in labels:
        if force or not is_current(dense_file, _dense_config(cfg, exp)):
            model, tok = _load(cfg)
            t0 = time.perf_counter()
            metrics = _evaluate(model, tok, exp, 0.0)
            save_record(dense_file, experiment, _dense_config(cfg, exp), metrics, time.perf_counter() - t0)
        records.append(load_record(dense_file))
    plans = [seed_replicates(exp, e) for e in exp["methods"] if labels is None or e["label"] in labels]
    done: dict[tuple[int, int], list[dict]] = {}
    # replicate 0 of every entry first, then the next replicate of every entry, ...: a run cut off part-way (the
    # cpu-full grids span sessions) leaves a complete single-seed table before any seed spread
    for position in range(max((len(p) for p in plans), default=0)):
        for i, plan in enumerate(plans):
            if position < len(plan):
                replicate, replicate_entry, sparsities = plan[position]
                done[i, position] = _run_method(
                    cfg, exp, replicate_entry, force, experiment, progress, sparsities, replicate
                )
    for key in sorted(done):  # returned in the order of expected_records: entry by entry
        records += done[key]
    return records


def _eval_cfg(exp: dict) -> dict:
    return {"perplexity": exp["perplexity"], "zeroshot": exp.get("zeroshot")}


def entry_section(exp: dict, entry: dict) -> dict:
    """The section as one method entry is evaluated: an entry with `zeroshot: false` gets perplexity only (a
    profile's time budget buys zero-shot for some methods; the others keep the same perplexity protocol)."""
    if entry.get("zeroshot", True) or not exp.get("zeroshot"):
        return exp
    return {**exp, "zeroshot": None}


def _dense_config(cfg: dict, exp: dict) -> dict:
    return {"model": cfg["model"], "method": "dense", "sparsity": 0.0, "label": "dense", "eval": _eval_cfg(exp)}


def _method_config(cfg: dict, exp: dict, entry: dict, sparsity: float, replicate: int = 0) -> dict:
    """The effective configuration of one (method entry, sparsity) record: what the record's `config` must equal
    for the record to be reused. A seed replicate k > 0 (`seed_replicates`) also carries `replicate: k`."""
    return {
        "model": cfg["model"],
        "method": entry["method"],
        "label": entry["label"],
        "sparsity": sparsity,
        "options": dict(entry.get("options", {})),
        "prune_options": resolved_entry(exp, entry)["prune_options"],
        "calibration": describe_calibration(*_calibration_settings(exp, entry)),
        "seed": entry.get("seed", 0),
        "eval": _eval_cfg(entry_section(exp, entry)),
        **({"replicate": replicate} if replicate else {}),
    }


def is_current(path: Path, config: dict, record: dict | None = None) -> bool:
    """Whether the record at `path` exists and was made with exactly `config` (its stored `config`, which records
    without a `config_hash` also carry, is compared, so records made before hashes existed stay valid). A record
    made with another configuration is reported with the differing keys and is not reused."""
    record = load_record(path) if record is None else record
    if record is None:
        return False
    diff = config_diff(record.get("config"), config)
    if diff:
        log.warning(
            "%s was made with another configuration than the profile's (%s); it is recomputed",
            path,
            "; ".join(diff[:8]) + (f"; ... {len(diff) - 8} more" if len(diff) > 8 else ""),
        )
        return False
    return True


def _run_method(cfg, exp, entry, force, experiment, progress, sparsities, replicate=0) -> list[dict]:
    profile, label, method = cfg["profile"], entry["label"], entry["method"]
    options = dict(entry.get("options", {}))
    prune_options = resolved_entry(exp, entry)["prune_options"]
    suffix = replicate_suffix(replicate)
    files = {s: _record_file(profile, experiment, label, s, suffix) for s in sparsities}
    configs = {s: _method_config(cfg, exp, entry, s, replicate) for s in sparsities}
    todo = [s for s in sparsities if force or not is_current(files[s], configs[s])]
    if todo:
        base, tok = _load(cfg)
        calib, calib_info = _calibration(tok, exp, entry)
        mod = get_method(method)
        shared_scores, score_time, score_mem = None, None, None
        reusable = not mod.spec.scores_and_removes
        if reusable and len(todo) > 1:
            t0 = time.perf_counter()
            with peak_memory(cfg.get("device", "cpu")) as mem:
                shared_scores = score(
                    base,
                    method,
                    calib,
                    seed=entry.get("seed", 0),
                    progress=progress,
                    attention_units=prune_options.get("attention_units", "auto"),
                    **options,
                )
            score_time, score_mem = time.perf_counter() - t0, mem.to_json()
        for s in todo:
            model, _ = _load(cfg)
            t0 = time.perf_counter()
            with peak_memory(cfg.get("device", "cpu")) as mem:
                plan = _prune_entry(
                    model, entry, s, calib, calib_info, prune_options, progress, scores=copy.deepcopy(shared_scores)
                )
            prune_time = time.perf_counter() - t0
            metrics = _evaluate(model, tok, entry_section(exp, entry), s)
            config = configs[s]
            timing = {"prune_time_s": prune_time, "prune_peak_memory_in_process": mem.to_json()}
            if shared_scores is not None:
                timing.update(
                    {
                        "scoring_time_s": score_time,
                        "scoring_peak_memory_in_process": score_mem,
                        "note": "scores computed once and shared across sparsities",
                    }
                )
            else:
                timing["scoring_time_s"] = plan.history[0].get("scoring_time_s", prune_time) if plan.history else None
            save_record(
                files[s], experiment, config, metrics, prune_time, extra={"timing": timing, "plan": _plan_summary(plan)}
            )
            log.info("%s %s s=%.2f ppl=%.2f", profile, label, s, metrics["perplexity"]["ppl"])
            del model
    return [load_record(files[s]) for s in sparsities]


def expected_records(cfg: dict, experiment: str) -> dict[Path, dict]:
    """Every record file a profile's experiment consists of, with the configuration it must have been made with."""
    profile = cfg["profile"]
    if experiment not in cfg:
        return {}
    exp = cfg[experiment]
    out: dict[Path, dict] = {}
    if experiment in GRID_SECTIONS:
        out[_record_file(profile, experiment, "dense", 0.0)] = _dense_config(cfg, exp)
        for entry in exp["methods"]:
            for k, replicate_entry, sparsities in seed_replicates(exp, entry):
                for s in sparsities:
                    path = _record_file(profile, experiment, entry["label"], s, replicate_suffix(k))
                    out[path] = _method_config(cfg, exp, replicate_entry, s, k)
    elif experiment == "recovery":
        for _, entry, item_exp, s, kl, path in recovery_items(cfg):
            out[path] = _recovery_config(cfg, cfg["accuracy"], item_exp, entry, s, kl)
        for path, item_exp in recovery_controls(cfg).items():
            out[path] = _control_config(cfg, item_exp)
    elif experiment == "memory":
        for model in exp["models"]:
            for batch, seqlen in exp["shapes"]:
                out[_memory_file(profile, exp, model, batch, seqlen)] = _memory_config(cfg, model, batch, seqlen)
    elif experiment == "latency":
        for model in exp["models"]:
            for round_to in exp.get("round_to", [1]):
                out[_latency_file(profile, exp, model, round_to)] = _latency_config(cfg, model, round_to)
    elif experiment == "fms_diagnostics":
        for part in DIAGNOSTICS_PARTS:
            out[results_dir(profile, experiment) / f"{part}.json"] = _diagnostics_config(cfg, part)
    return out


EXPERIMENTS = (*GRID_SECTIONS, "recovery", "memory", "latency", "fms_diagnostics")  # a profile's record sets


def _pending_entries(profile: str) -> list[dict]:
    """The entries of results/<profile>/pending.json as written ({reason, command, records}); none without it."""
    path = RESULTS_DIR / profile / "pending.json"
    if not path.exists():
        return []
    listed = json.loads(path.read_text())
    return listed if isinstance(listed, list) else [listed]


def refresh_pending(profile: str) -> list[dict]:
    """Update results/<profile>/pending.json after records were computed: each entry ({reason, command, records})
    keeps the records that are still missing or not current, an entry with none left is dropped, and the file is
    deleted when no entry remains. Returns the entries left. (A long run that spans sessions commits its records
    with this list, which `tests/test_reliability.py` checks against the records on disk.) An unknown profile is an
    error, not "nothing pending"."""
    profile_path(profile)
    path = RESULTS_DIR / profile / "pending.json"
    entries = _pending_entries(profile)
    if not entries:
        path.unlink(missing_ok=True)  # an empty list is nothing pending
        return []
    cfg = load_profile(profile)
    wanted = {}
    for exp in EXPERIMENTS:
        wanted.update(expected_records(cfg, exp))
    left = []
    for entry in entries:
        records = []
        for r in entry["records"]:
            p = RESULTS_DIR / profile / r
            if p not in wanted:
                raise ValueError(f"{path} lists {r}, which profile {profile!r} does not name (edit the list by hand)")
            if not is_current(p, wanted[p]):
                records.append(r)
        if records:
            left.append({**entry, "records": records})
    if left:
        write_json_atomic(path, left)
    else:
        path.unlink()
    return left


def pending_note(profile: str) -> str:
    """A sentence for the top of each notebook when results/<profile>/pending.json lists records still to compute
    (read as it is, not refreshed): the tables and figures of such a profile are partial. Empty when none are."""
    entries = _pending_entries(profile)
    parts = [f"{len(e['records'])} by `{e['command']}`" for e in entries if e.get("records")]
    if not parts:
        return ""
    return (
        f"**Partial profile:** {sum(len(e['records']) for e in entries)} records of profile {profile!r} are still "
        f"to compute ({'; '.join(parts)}; list in `results/{profile}/pending.json`). The tables and figures below "
        "show the records that exist, so rows, seeds and intervals may be missing."
    )


def collect(profile: str, experiment: str) -> list[dict]:
    """The records of one experiment that the profile names and that were made with the profile's configuration,
    sorted by file name. Records of labels the profile no longer has, or made with another configuration, are left
    out (with a warning for the latter). A profile without a configs/ file (tests) reads every record."""
    folder = results_dir(profile, experiment)
    if not folder.exists():
        return []
    try:
        cfg = load_profile(profile)
    except FileNotFoundError:
        return [load_record(p) for p in sorted(folder.glob("*.json"))]
    wanted = expected_records(cfg, experiment)
    out = []
    for path in sorted(folder.glob("*.json")):
        if path in wanted:
            record = load_record(path)
            if is_current(path, wanted[path], record):
                out.append(record)
        else:
            log.info("%s: not named by profile %r, left out of the report", path, profile)
    return out


def check_records(profile: str) -> None:
    """Fail with a clear message when a profile has no records to render (make figures)."""
    try:
        load_profile(profile)
    except (FileNotFoundError, ProfileError) as e:
        raise SystemExit(f"error: {e}") from None
    folder = RESULTS_DIR / profile
    if not any(p.name != "run_times.json" for p in folder.glob("*/*.json")):
        raise SystemExit(
            f"error: no records in {folder} to render figures from; compute them first with "
            f"`make reproduce PROFILE={profile}`"
        )


def _memory_file(profile: str, exp: dict, model: str, batch: int, seqlen: int) -> Path:
    return results_dir(profile, "memory") / f"{model}_{batch}x{seqlen}_{exp['dtype']}.json"


def _memory_config(cfg: dict, model: str, batch: int, seqlen: int) -> dict:
    exp = cfg["memory"]
    return {
        "model": model,
        "batch": batch,
        "seqlen": seqlen,
        "dtype": exp["dtype"],
        "device": cfg.get("device", "cpu"),
        "methods": exp["methods"],
    }


def _latency_file(profile: str, exp: dict, model: str, round_to: int) -> Path:
    return results_dir(profile, "latency") / f"{model}_{exp['dtype']}_round{round_to}.json"


def _latency_config(cfg: dict, model: str, round_to: int) -> dict:
    exp = cfg["latency"]
    return {
        "model": model,
        "dtype": exp["dtype"],
        "device": cfg.get("device", "cpu"),
        "round_to": round_to,
        **{k: exp[k] for k in ("sparsities", "prefill", "decode")},
        **({"compile": exp["compile"]} if "compile" in exp else {}),  # absent in older profiles and their records
        "include_24": exp.get("include_24", False),
        "repeats": exp.get("repeats", 20),
        "bench_repeats": exp.get("bench_repeats", BENCH_REPEATS),
        "protocol": LATENCY_PROTOCOL,
    }


def run_memory(cfg: dict, force: bool = False) -> list[dict]:
    """Peak memory of every configured method's pruning step vs the dense forward pass, per model and shape."""
    from minillm.bench.measure import bench_memory

    exp, profile = cfg["memory"], cfg["profile"]
    device = cfg.get("device", "cpu")
    out = []
    for model in exp["models"]:
        for batch, seqlen in exp["shapes"]:
            path = _memory_file(profile, exp, model, batch, seqlen)
            config = _memory_config(cfg, model, batch, seqlen)
            if force or not is_current(path, config):
                t0 = time.perf_counter()
                res = bench_memory(model, exp["methods"], batch, seqlen, exp["dtype"], device)
                save_record(
                    path,
                    "memory",
                    config,
                    res,
                    time.perf_counter() - t0,
                    device=device,
                )
            out.append(load_record(path))
    return out


def run_latency(cfg: dict, force: bool = False) -> list[dict]:
    """Prefill and decode latency of dense and uniformly pruned copies of each configured model (interleaved rounds,
    the whole bench `bench_repeats` times; see `measure.bench_latency`)."""
    from minillm.bench.measure import bench_latency

    exp, profile = cfg["latency"], cfg["profile"]
    device = cfg.get("device", "cpu")
    out = []
    for model in exp["models"]:
        for round_to in exp.get("round_to", [1]):
            path = _latency_file(profile, exp, model, round_to)
            config = _latency_config(cfg, model, round_to)
            if force or not is_current(path, config):
                t0 = time.perf_counter()
                res = bench_latency(
                    model,
                    exp["sparsities"],
                    [tuple(x) for x in exp["prefill"]],
                    exp["decode"]["batch"],
                    exp["decode"]["prompt"],
                    exp["decode"]["new_tokens"],
                    exp.get("repeats", 20),
                    exp["dtype"],
                    device,
                    round_to,
                    include_24=exp.get("include_24", False),
                    compile=exp.get("compile", "none"),
                    bench_repeats=config["bench_repeats"],
                )
                save_record(
                    path,
                    "latency",
                    config,
                    res,
                    time.perf_counter() - t0,
                    device=device,
                )
            out.append(load_record(path))
    return out


def run_recovery(cfg: dict, force: bool = False, progress: bool = False) -> list[dict]:
    """Prune with each configured method (re-using the accuracy configuration of the same label), evaluate, then
    recover with LoRA (optionally with KL to the parent) and evaluate again. One record per (label, sparsity, kl),
    and one dense control per training budget (`recovery_controls`).

    The controls are computed first: every pruned row's `control_share` needs its budget's control, so a run cut
    off part-way still leaves rows that can be read. The returned list is the pruned records, then the controls."""
    from minillm.recover import recover

    controls = recovery_controls(cfg)
    for path, item_exp in controls.items():
        if force or not is_current(path, _control_config(cfg, item_exp)):
            _recover_control(cfg, item_exp, path, recover, progress)
    out = []
    groups: dict = {}
    for index, entry, item_exp, s, kl, path in recovery_items(cfg):
        groups.setdefault((index, s), (entry, item_exp, s, {}))[3][kl] = path
    for entry, item_exp, s, files in groups.values():
        configs = {kl: _recovery_config(cfg, cfg["accuracy"], item_exp, entry, s, kl) for kl in files}
        todo = [kl for kl, f in files.items() if force or not is_current(f, configs[kl])]
        if todo:
            _recover_one(cfg, cfg["accuracy"], item_exp, entry, s, todo, files, recover, progress)
        out += [load_record(f) for f in files.values()]
    return out + [load_record(path) for path in controls]


def recovery_entries(cfg: dict):
    """(item index, accuracy entry, item, item's experiment settings, record-name suffix) for every recovery item of
    a profile. An item is a label, or {label, sparsities, kl_weights, train, tag}: train overrides the experiment's
    training settings (the tag, e.g. "steps200", keeps its records apart from the default ones)."""
    exp, profile = cfg["recovery"], cfg["profile"]
    by_label = {e["label"]: e for e in cfg["accuracy"]["methods"]}
    for index, raw in enumerate(exp["methods"]):
        item = {"label": raw} if isinstance(raw, str) else dict(raw)
        label = item["label"]
        if label not in by_label:
            raise ValueError(f"recovery entry {label!r} is not an accuracy method label of profile {profile!r}")
        if "train" in item and not item.get("tag"):
            raise ValueError(f"recovery entry {label!r} overrides train settings and needs a 'tag' for its records")
        item_exp = {**exp, "train": {**exp["train"], **item.get("train", {})}}
        yield index, by_label[label], item, item_exp, f"_{item['tag']}" if item.get("tag") else ""


def recovery_items(cfg: dict):
    """(item index, accuracy entry, item's experiment settings, sparsity, kl weight, record file) for every recovery
    record of a profile that prunes (`recovery_entries`)."""
    exp, profile = cfg["recovery"], cfg["profile"]
    for index, entry, item, item_exp, suffix in recovery_entries(cfg):
        for s in item.get("sparsities", exp["sparsities"]):
            for kl in item.get("kl_weights", exp["kl_weights"]):
                path = _record_file(profile, "recovery", item["label"], s, f"_kl{kl:g}{suffix}")
                yield index, entry, item_exp, s, kl, path


def recovery_controls(cfg: dict) -> dict[Path, dict]:
    """The dense control of every training budget (distinct `train` settings) the recovery items use: record file
    -> the item's experiment settings. The control trains the unpruned model with the budget's LoRA settings on the
    same windows and evaluates it as the pruned runs are, so its gain is what LoRA on the other novels gives a model
    that lost nothing (domain adaptation). The section's budget names its control dense_s00_kl0.json; another budget
    takes the tag of the first item that uses it (dense_s00_kl0_steps100.json)."""
    exp, profile = cfg["recovery"], cfg["profile"]
    out: dict[Path, dict] = {}
    for _, _, _, item_exp, suffix in recovery_entries(cfg):
        if any(other["train"] == item_exp["train"] for other in out.values()):
            continue
        budget = "" if item_exp["train"] == exp["train"] else suffix
        path = _record_file(profile, "recovery", "dense", 0.0, "_kl0" + budget)
        if path in out:
            raise ValueError(
                f"recovery tag {suffix[1:]!r} is used with two different train settings; its dense control would "
                "stand for both (give each training budget its own tag)"
            )
        out[path] = item_exp
    return out


def control_section(exp: dict) -> dict:
    """The section as the dense control evaluates it: with zero-shot whenever the section has any (the control
    stands beside the pruned runs of every sparsity), so without the zero-shot `sparsities` list."""
    zs = exp.get("zeroshot")
    return {**exp, "zeroshot": {k: v for k, v in zs.items() if k != "sparsities"} if zs else zs}


def _control_config(cfg: dict, exp: dict) -> dict:
    return {
        "model": cfg["model"],
        "method": "dense",
        "label": "dense",
        "sparsity": 0.0,
        "kl_weight": 0.0,
        "train": exp["train"],
        "eval": _eval_cfg(control_section(exp)),
    }


def _recovery_config(cfg: dict, acc: dict, exp: dict, entry: dict, sparsity: float, kl: float) -> dict:
    return {
        "model": cfg["model"],
        "method": entry["method"],
        "label": entry["label"],
        "sparsity": sparsity,
        "options": entry.get("options", {}),
        "prune_options": resolved_entry(acc, entry)["prune_options"],
        "kl_weight": kl,
        "train": exp["train"],
        "eval": _eval_cfg(exp),
    }


def _train_windows(tok, train: dict):
    """The recovery training windows of one budget (from the calibration novels, never the perplexity text)."""
    return calibration_windows(tok, train["windows"], train["seqlen"], seed=train.get("seed", 1))


def _lora(recover, model, windows, train: dict, teacher, kl: float, progress: bool):
    """`recover` with one budget's settings; every recovery record, pruned or control, is trained through here."""
    return recover(
        model,
        windows,
        rank=train["rank"],
        alpha=train["alpha"],
        lr=train["lr"],
        steps=train["steps"],
        batch_size=train["batch_size"],
        teacher=teacher if kl else None,
        kl_weight=kl,
        seed=train.get("seed", 0),
        progress=progress,
    )


def _recover_control(cfg: dict, exp: dict, path: Path, recover, progress: bool) -> None:
    """The dense control of one budget: the unpruned model evaluated, trained with the pruned runs' kl=0 loss
    (cross-entropy alone: KL to itself would only hold the model in place), evaluated again."""
    section = control_section(exp)
    model, tok = _load(cfg)
    before = _evaluate(model, tok, section, 0.0)
    merged, rec = _lora(recover, model, _train_windows(tok, exp["train"]), exp["train"], None, 0.0, progress)
    del model
    after = _evaluate(merged, tok, section, 0.0)
    del merged
    _free_device()
    save_record(
        path, "recovery", _control_config(cfg, exp), {"before": before, "after": after, "recovery": rec}, rec["time_s"]
    )


def _recover_one(cfg, acc, exp, entry, sparsity, kl_weights, files, recover, progress) -> None:
    from minillm.checkpoint import load_pruned, save_pruned

    label = entry["label"]
    prune_options = resolved_entry(acc, entry)["prune_options"]
    base, tok = _load(cfg)
    calib_info = describe_calibration(*_calibration_settings(acc, entry))
    t0 = time.perf_counter()
    acc_file = _record_file(cfg["profile"], "accuracy", label, sparsity)
    plan = _reuse_accuracy_plan(base, acc_file, entry, prune_options, calib_info, sparsity)
    if plan is None:  # calibration windows are only read when pruning again
        calib, calib_info = _calibration(tok, acc, entry)
        plan = _prune_entry(base, entry, sparsity, calib, calib_info, prune_options, progress)
    prune_time = time.perf_counter() - t0
    before = _evaluate(base, tok, exp, sparsity)
    windows = _train_windows(tok, exp["train"])
    teacher = None
    plan_summary = _plan_summary(plan)
    # removed on exit, on errors and on SIGTERM (a killed run must not leave a model copy in /tmp)
    with temporary_directory(prefix="minillm-recovery-") as tmp:
        save_pruned(base, plan, tmp, tokenizer=tok)
        # At most two models on the device at once: the student being trained (reloaded from `tmp` for each KL
        # weight) and, for KL > 0, the unpruned teacher in the profile's dtype. The pruned base is only needed to
        # write `tmp`, and each merged model is freed before the next student is loaded (LLaMA-7B in bf16: 13.5 GB
        # teacher + at most 13.5 GB student + LoRA activations; see simulate.simulate_recovery_step).
        del base
        _free_device()
        for kl in kl_weights:
            model, _ = load_pruned(tmp, device=cfg.get("device", "cpu"), dtype=_dtype(cfg))
            if kl > 0 and teacher is None:
                teacher, _ = _load(cfg)
            merged, rec = _lora(recover, model, windows, exp["train"], teacher, kl, progress)
            del model
            after = _evaluate(merged, tok, exp, sparsity)
            del merged
            _free_device()
            save_record(
                files[kl],
                "recovery",
                _recovery_config(cfg, acc, exp, entry, sparsity, kl),
                {"before": before, "after": after, "recovery": rec},
                prune_time + rec["time_s"],
                extra={"plan": plan_summary, "plan_source": plan.options.get("plan_source", "pruned here")},
            )
    del teacher
    _free_device()


def _dtype(cfg: dict):
    import torch

    return getattr(torch, cfg.get("dtype", "float32"))


def _free_device() -> None:
    """Return freed blocks of the accelerator's caching allocator (a no-op on CPU, where a full garbage collection
    would only cost time)."""
    import gc

    from minillm.device import backend

    if backend().available():
        gc.collect()
        backend().empty_cache()


def _reuse_accuracy_plan(base, acc_file: Path, entry: dict, prune_options: dict, calib_info: dict, sparsity: float):
    """Rebuild the pruned model of an existing accuracy record from its kept indices instead of scoring again (FMS
    and Bonsai take minutes on CPU). Only when the record was made with the same method settings and calibration,
    and without bias compensation or a refit (the weights they write are not in the record). Returns the plan, or
    None."""
    from minillm.adapters import get_adapter
    from minillm.plan import OriginalKeep
    from minillm.prune import make_plan
    from minillm.state import restore_keep

    record = load_record(acc_file)
    if record is None or "plan" not in record:
        return None
    method, options = entry["method"], entry.get("options", {})
    rc = record["config"]
    compensate = changes_weights(method, prune_options)
    same = (
        rc.get("method") == method
        and rc.get("options") == options
        and rc.get("prune_options") == prune_options
        and rc.get("calibration") == calib_info
        and rc.get("seed") == entry.get("seed", 0)
        and abs(rc.get("sparsity", -1) - sparsity) < 1e-9
    )
    if not same or compensate:
        return None
    where = str(acc_file.relative_to(REPO_ROOT)) if acc_file.is_relative_to(REPO_ROOT) else str(acc_file)
    keeps = [OriginalKeep.from_json(x, f"{where}: plan.layers[{i}]") for i, x in enumerate(record["plan"]["layers"])]
    adapter = get_adapter(base)
    restore_keep(base, adapter, keeps)
    source = {"record": where, "perplexity_in_record": record["metrics"]["perplexity"]["ppl"]}
    log.info("recovery: %s rebuilt from the kept indices in %s", entry["label"], where)
    return make_plan(
        base,
        method,
        sparsity,
        {**prune_options, **options, "plan_source": source},
        entry.get("seed", 0),
        calib_info,
        record["plan"].get("history"),
        adapter,
    )


DIAGNOSTICS_PARTS = ("accuracy", "criteria", "oracle")
_RESUMED_WALL_NOTE = "wall time of the last (possibly resumed) invocation only, not of the whole computation"


def _diagnostics_config(cfg: dict, part: str) -> dict:
    return {"model": cfg["model"], "part": part, "section": cfg["fms_diagnostics"]}


def run_fms_diagnostics(cfg: dict, force: bool = False, progress: bool = False) -> list[dict]:
    """Why the forward-only FMS gradient fails (minillm/artifact/diagnostics.py). One record per part
    (accuracy, criteria, oracle) under results/<profile>/fms_diagnostics/; a profile without the section has none.
    Records made with another section are recomputed, like every other experiment's."""
    from minillm.artifact import diagnostics

    exp = cfg.get("fms_diagnostics")
    if not exp:
        return []
    wanted = expected_records(cfg, "fms_diagnostics")
    if force or not all(is_current(path, config) for path, config in wanted.items()):
        t0 = time.perf_counter()
        _, tok = _load(cfg)
        # finished pieces are kept (and committed) here until the records are written, so a run spans sessions
        folder = results_dir(cfg["profile"], "fms_diagnostics") / "partial"
        store = diagnostics.PartialStore(folder, _diagnostics_config(cfg, "all"), fresh=force)
        out = diagnostics.run(lambda: _load(cfg), tok, exp, progress, store)
        wall = time.perf_counter() - t0
        for (path, config), part in zip(wanted.items(), DIAGNOSTICS_PARTS):
            extra = {"calibration": out["calibration"], "wall_note": _RESUMED_WALL_NOTE}
            save_record(path, "fms_diagnostics", config, out[part], wall, device=cfg.get("device", "cpu"), extra=extra)
        store.clear()
    return [load_record(path) for path in wanted]
