"""Nothing lost, nothing stale. Bad or unusual inputs give a clear error or a correct result; output
directories never lose data; records are tied to their configuration; profiles and options are validated."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import minillm
from minillm.artifact import experiments
from minillm.__main__ import main
from minillm.data import describe_calibration
from minillm.plan import PlanError
from minillm.artifact.records import REPO_ROOT, load_record, save_record
from minillm.files import atomic_directory

PY = sys.executable


def _prune_cli(out, *extra, model="tiny-llama", method="magnitude", sparsity="0.2"):
    args = ["prune", "--model", model, "--method", method, "--sparsity", sparsity, "--out", str(out), "--quiet"]
    return main([*args, *extra])


def _saved(tmp_path, name="p", model="tiny-llama", sparsity=0.3):
    m, _ = minillm.load_model(model)
    plan = minillm.prune(m, "magnitude", sparsity, progress=False)
    return minillm.save_pruned(m, plan, tmp_path / name)


# --- 1. output directories ------------------------------------------------------------------------------------------


def test_out_refuses_a_non_empty_directory_not_written_by_minillm(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    assert _prune_cli(user) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert (user / "thesis.tex").read_text() == "years of work"
    assert _prune_cli(user, "--overwrite") == 0  # explicit consent to write there; the user's files stay
    assert (user / "pruning.json").exists() and (user / "thesis.tex").read_text() == "years of work"


def test_out_replaces_a_previous_minillm_output(tmp_path):
    out = tmp_path / "p"
    assert _prune_cli(out, sparsity="0.2") == 0
    assert _prune_cli(out, sparsity="0.4") == 0
    assert json.loads((out / "pruning.json").read_text())["sparsity"] == 0.4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary siblings left behind


def test_out_never_the_current_directory_or_its_parents(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "data.txt").write_text("keep")
    monkeypatch.chdir(work)
    for target in (".", "..", str(work), "sub/.."):
        assert _prune_cli(target) == 2
        assert "current directory" in capsys.readouterr().err
    assert (work / "data.txt").read_text() == "keep" and (work / "sub").is_dir()


def test_out_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(minillm, "prune", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(minillm, "load_model", lambda *a, **k: calls.append(1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _prune_cli(afile) == 2
    assert "not a directory" in capsys.readouterr().err and not calls


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_in_a_read_only_directory_fails_before_any_work(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(minillm, "load_model", lambda *a, **k: calls.append(1))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _prune_cli(ro / "out") == 2
        assert "writable" in capsys.readouterr().err and not calls
    finally:
        ro.chmod(0o700)


def test_a_failed_swap_leaves_the_previous_output_in_place(tmp_path, monkeypatch):
    """The new directory is moved in before the old one is deleted: if that move fails, the old output survives."""
    import minillm.files as results

    target = _saved(tmp_path, "p")
    before = (target / "pruning.json").read_text()

    def failing_exchange(a, b):  # moving the new directory in
        raise OSError("disk full while moving the new directory in")

    monkeypatch.setattr(results, "_exchange", failing_exchange)
    m, _ = minillm.load_model("tiny-llama")
    with pytest.raises(OSError, match="disk full"):
        minillm.save_pruned(m, minillm.prune(m, "random", 0.5, progress=False), target)
    assert (target / "pruning.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_atomic_directory_swaps_and_keeps_the_old_directory_on_failure(tmp_path):
    target = tmp_path / "t"
    with atomic_directory(target) as tmp:
        (tmp / "pruning.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "pruning.json").write_text("new")
        raise RuntimeError("crash while writing")
    assert (target / "pruning.json").read_text() == "old"
    with atomic_directory(target) as tmp:
        (tmp / "pruning.json").write_text("new")
    assert (target / "pruning.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


# --- 2. records tied to their configuration ------------------------------------------------------------------------


def _tiny_profile(name="t"):
    return {
        "profile": name,
        "model": "smollm2-135m",
        "device": "cpu",
        "accuracy": {
            "calibration": {"n_samples": 2, "seqlen": 8, "seed": 0},
            "perplexity": {"seqlen": 16, "windows": 1, "batch_size": 1},
            "sparsities": [0.2],
            "prune_options": {"attention_units": "auto", "allocation": "uniform"},
            "methods": [{"label": "mag", "method": "magnitude", "options": {"norm": "l2"}}],
        },
    }


@pytest.fixture
def fake_compute(tmp_path, monkeypatch):
    """run_accuracy on tiny-llama with random calibration ids and a stub evaluation: counts evaluations."""
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(experiments, "_load", lambda cfg: (minillm.load_model("tiny-llama")[0], None))

    def calib(tok, exp, entry):
        n, seqlen, seed = experiments._calibration_settings(exp, entry)
        return torch.randint(0, 128, (n, seqlen)), describe_calibration(n, seqlen, seed)

    monkeypatch.setattr(experiments, "_calibration", calib)
    calls = []

    def evaluate(model, tok, exp, sparsity):
        calls.append(sparsity)
        return {"perplexity": {"ppl": 10.0 + len(calls)}}

    monkeypatch.setattr(experiments, "_evaluate", evaluate)
    return calls


def test_a_record_made_with_another_configuration_is_recomputed(fake_compute, caplog):
    cfg = _tiny_profile()
    experiments.run_accuracy(cfg)
    assert len(fake_compute) == 2  # dense + mag at 0.2
    experiments.run_accuracy(cfg)
    assert len(fake_compute) == 2  # resumed: nothing recomputed
    cfg["accuracy"]["methods"][0]["options"]["norm"] = "l1"
    cfg["accuracy"]["calibration"]["n_samples"] = 3
    with caplog.at_level(logging.WARNING, logger="minillm.artifact.experiments"):
        records = experiments.run_accuracy(cfg)
    assert len(fake_compute) == 3  # the method record again; the dense one does not depend on these keys
    assert records[1]["config"]["options"] == {"norm": "l1"}
    assert "options.norm" in caplog.text and "calibration.n_samples" in caplog.text
    cfg["accuracy"]["perplexity"]["windows"] = 4
    experiments.run_accuracy(cfg)
    assert len(fake_compute) == 5  # evaluation settings changed: dense and method


def test_new_records_carry_the_hash_of_their_configuration(fake_compute):
    from minillm.artifact.records import config_hash

    records = experiments.run_accuracy(_tiny_profile())
    assert all(r["config_hash"] == config_hash(r["config"]) for r in records)


def test_refresh_pending_keeps_only_what_is_still_missing(fake_compute, tmp_path, monkeypatch):
    """`python -m minillm pending`: records computed since leave pending.json, an entry with none left goes, the
    file goes with the last entry; a listed record the profile does not name is refused. The notebooks' partial
    note counts what the file lists and disappears with it."""
    configs = tmp_path / "configs"
    configs.mkdir()
    monkeypatch.setattr(experiments, "CONFIG_DIR", configs)
    cfg = _tiny_profile("mini")
    cfg["accuracy"]["sparsities"] = [0.2, 0.5]
    (configs / "mini.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "profile"}))
    folder = experiments.RESULTS_DIR / "mini"
    folder.mkdir(parents=True)
    pending = folder / "pending.json"
    entries = [
        {"reason": "r1", "command": "c1", "records": ["accuracy/dense_s00.json", "accuracy/mag_s20.json"]},
        {"reason": "r2", "command": "c2", "records": ["accuracy/mag_s50.json"]},
    ]
    pending.write_text(json.dumps(entries))
    assert experiments.pending_note("mini").startswith("**Partial profile:** 3 records")
    assert "2 by `c1`; 1 by `c2`" in experiments.pending_note("mini")
    assert experiments.refresh_pending("mini") == entries  # nothing computed yet
    experiments.run_accuracy(cfg, labels=["dense"])
    experiments.run_accuracy(cfg)
    (folder / "accuracy" / "mag_s50.json").unlink()
    left = experiments.refresh_pending("mini")
    assert left == [entries[1]] and json.loads(pending.read_text()) == left
    experiments.run_accuracy(cfg)
    assert experiments.refresh_pending("mini") == [] and not pending.exists()
    assert experiments.pending_note("mini") == ""  # a complete profile's notebooks say nothing
    pending.write_text(json.dumps([{"reason": "r", "command": "c", "records": ["accuracy/other_s20.json"]}]))
    with pytest.raises(ValueError, match="does not name"):
        experiments.refresh_pending("mini")


@pytest.mark.parametrize("profile", ["cpu", "cpu-full"])
def test_every_committed_record_is_current_under_its_unchanged_profile(profile):
    """Nothing of the committed results is recomputed by accident: each record the profile names exists and matches
    the profile's effective configuration, and no record is left over. Records whose method changed and which have
    not been recomputed yet are listed, with the reason, in results/<profile>/pending.json (one {reason, command,
    records} entry, or a list of them); a listed record must be absent (a stale one is deleted, not kept) and
    `make reproduce` computes it."""
    cfg = experiments.load_profile(profile)
    pending_file = experiments.RESULTS_DIR / profile / "pending.json"
    pending = set()
    if pending_file.exists():
        listed = json.loads(pending_file.read_text())
        for entry in listed if isinstance(listed, list) else [listed]:
            assert entry["reason"] and entry["command"] and entry["records"]
            pending |= {experiments.RESULTS_DIR / profile / r for r in entry["records"]}
    for exp in experiments.EXPERIMENTS:
        wanted = experiments.expected_records(cfg, exp)
        assert wanted or (exp not in cfg and exp == "calibration_budget"), (profile, exp)  # the one optional section
        for path, config in wanted.items():
            if path in pending:
                assert not path.exists(), f"{path} is listed as pending but exists: recomputed? remove it from the list"
                continue
            assert path.exists(), path
            assert experiments.is_current(path, config), path
        on_disk = set(experiments.results_dir(profile, exp).glob("*.json"))
        assert on_disk == set(wanted) - pending, sorted(p.name for p in on_disk ^ (set(wanted) - pending))
        assert len(experiments.collect(profile, exp)) == len(on_disk)


def test_reports_read_only_records_the_profile_names(tmp_path, monkeypatch, fake_compute):
    configs = tmp_path / "configs"
    configs.mkdir()
    monkeypatch.setattr(experiments, "CONFIG_DIR", configs)
    cfg = _tiny_profile("mini")
    (configs / "mini.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "profile"}))
    experiments.run_accuracy(cfg)
    folder = experiments.results_dir("mini", "accuracy")
    stale = dict(load_record(folder / "mag_s20.json"), config={**cfg["accuracy"]["methods"][0], "label": "old"})
    save_record(folder / "old_s20.json", "accuracy", stale["config"], stale["metrics"])  # a label no longer there
    edited = load_record(folder / "dense_s00.json")
    edited["config"]["eval"]["perplexity"]["windows"] = 99  # made with other settings
    (folder / "dense_s00.json").write_text(json.dumps(edited))
    labels = [r["config"]["label"] for r in experiments.collect("mini", "accuracy")]
    assert labels == ["mag"]


# --- 3. profile schema ------------------------------------------------------------------------------------------


def _smoke():
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "smoke.yaml").read_text())
    cfg["profile"] = "smoke"
    return cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_profile_follows_the_schema(name):
    experiments.load_profile(name)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["accuracy"]["zeroshot"].update(limt=4), "did you mean 'limit'"),
        (lambda c: c["accuracy"]["prune_options"].update(allocaton="global"), "did you mean 'allocation'"),
        (lambda c: c.update(accuracyy=c.pop("accuracy")), "did you mean 'accuracy'"),
        (lambda c: c["accuracy"]["methods"][2]["options"].update(queries="4"), "queries='4' must be int"),
        (lambda c: c["accuracy"]["methods"][2]["options"].update(querys=4), "did you mean 'queries'"),
        (lambda c: c["accuracy"]["methods"][0].update(method="randm"), "unknown pruning method 'randm'"),
        (lambda c: c["accuracy"]["calibration"].update(seqlen=1), "seqlen: must be >= 2"),
        (lambda c: c["accuracy"].update(sparsities=[0.2, 1.5]), "sparsities[1]: must be < 1.0"),
        (lambda c: c["accuracy"]["prune_options"].update(allocation="globl"), "did you mean 'global'"),
        (lambda c: c["recovery"]["train"].update(lr="fast"), "lr: must be a number"),
        (lambda c: c["memory"].update(shapes=[[2]]), "pair [batch, seqlen]"),
        (lambda c: c.update(model="tiny-llama"), "without a tokenizer"),
        (lambda c: c.update(model="smolm2-135m"), "did you mean 'smollm2-135m'"),
        (lambda c: c["recovery"].update(methods=["randm"]), "not a label of accuracy.methods"),
    ],
)
def test_profile_errors_name_the_key_and_the_closest_valid_one(edit, message):
    from minillm.artifact.profiles import ProfileError, validate_profile

    cfg = _smoke()
    edit(cfg)
    with pytest.raises(ProfileError) as e:
        validate_profile(cfg, "smoke")
    assert message in str(e.value)


def test_a_profile_is_checked_before_any_computation(tmp_path, monkeypatch):
    from minillm.artifact.profiles import ProfileError

    monkeypatch.setattr(experiments, "CONFIG_DIR", tmp_path)
    cfg = _smoke()
    cfg["accuracy"]["zeroshot"]["limt"] = 4
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ProfileError, match="limt"):
        experiments.load_profile("bad")
    with pytest.raises(SystemExit, match="limt"):
        experiments.check_profile("bad")


def test_unknown_profile_and_profile_without_records_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no profile 'nosuch'.*known profiles"):
        experiments.check_profile("nosuch")
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path)
    with pytest.raises(SystemExit, match="no records.*make reproduce PROFILE=gpu"):
        experiments.check_records("gpu")


def test_make_targets_fail_clearly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for target, profile, message in (("reproduce", "nosuch", "no profile 'nosuch'"), ("figures", "gpu", "no records")):
        if target == "figures" and any((REPO_ROOT / "results" / "gpu").glob("*/*.json")):
            continue
        r = subprocess.run(
            ["make", "-s", target, f"PROFILE={profile}", "SETUP=", f"PYTHON={PY}"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- 5. options, calibration, loading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, message",
    [
        ("queries={2", "queries='{2' must be int"),
        ('queries="4"', "queries='4' must be int"),
        ("queries=2.5", "queries=2.5 must be int"),
        ("querys=2", "did you mean 'queries'"),
    ],
)
def test_cli_options_are_type_checked_against_the_method(tmp_path, capsys, option, message):
    assert _prune_cli(tmp_path / "o", "--option", option, method="fms") == 2
    assert message in capsys.readouterr().err


def test_api_options_are_type_checked(tiny):
    with pytest.raises(ValueError, match="must be int"):
        minillm.prune(tiny("tiny-llama"), "fms", 0.2, torch.randint(0, 128, (2, 8)), queries=2.5, progress=False)
    with pytest.raises(ValueError, match="must be float"):
        minillm.prune(tiny("tiny-llama"), "bonsai", 0.2, torch.randint(0, 128, (2, 8)), prune_frac="0.1")


@pytest.mark.parametrize("method", ["fms", "taylor", "bonsai"])
def test_calibration_of_one_token_is_refused(tiny, method):
    with pytest.raises(ValueError, match="seqlen >= 2"):
        minillm.prune(tiny("tiny-llama"), method, 0.2, torch.randint(0, 128, (2, 1)), progress=False)


def test_calibration_longer_than_the_models_positions_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        minillm.prune(tiny("tiny-opt"), "wanda_sp", 0.2, torch.randint(0, 128, (1, 300)), progress=False)
    for seqlen in ("1", "300"):
        assert _prune_cli(tmp_path / "o", "--calib-seqlen", seqlen, model="tiny-opt", method="fms") == 2
        assert "--calib-seqlen" in capsys.readouterr().err


def test_truncated_weights_name_the_file(tmp_path):
    out = _saved(tmp_path)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(PlanError, match="model.safetensors.*truncated or corrupt"):
        minillm.load_pruned(out)


def test_weights_of_another_model_name_the_file_and_the_mismatch(tmp_path):
    a, b = _saved(tmp_path, "a", "tiny-llama"), _saved(tmp_path, "b", "tiny-llama-gqa")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(PlanError, match=r"a/model.safetensors: tensor shapes do not match.*in the file.*expected"):
        minillm.load_pruned(a)
    # same model, other pruning: shapes of the pruned layers differ
    c = _saved(tmp_path, "c", "tiny-llama", sparsity=0.5)
    (c / "model.safetensors").write_bytes((_saved(tmp_path, "d", "tiny-llama", 0.2) / "model.safetensors").read_bytes())
    with pytest.raises(PlanError, match="c/model.safetensors"):
        minillm.load_pruned(c)


def test_config_of_another_model_is_named(tmp_path):
    a, b = _saved(tmp_path, "a", "tiny-llama"), _saved(tmp_path, "b", "tiny-llama-gqa")
    (a / "config.json").write_text((b / "config.json").read_text())
    with pytest.raises(PlanError, match="pruning.json and config.json describe different models.*num_kv_heads"):
        minillm.load_pruned(a)


def test_pruning_json_checksum_catches_swapped_indices_and_edited_architecture(tmp_path):
    out = _saved(tmp_path)
    plan_file = out / "pruning.json"
    original = json.loads(plan_file.read_text())
    assert original["checksum"].startswith("sha256:")
    swapped = json.loads(json.dumps(original))
    layers = swapped["layers"]
    layers[0]["mlp"], layers[1]["mlp"] = layers[1]["mlp"], layers[0]["mlp"]  # same counts, other channels
    assert len(layers[0]["mlp"]["kept_channels"]) == len(layers[1]["mlp"]["kept_channels"])
    plan_file.write_text(json.dumps(swapped))
    with pytest.raises(PlanError, match="checksum mismatch"):
        minillm.load_pruned(out)
    edited = json.loads(json.dumps(original))
    edited["architecture"]["family"] = "opt"
    plan_file.write_text(json.dumps(edited))
    with pytest.raises(PlanError, match="checksum mismatch"):
        minillm.load_pruned(out)
    old = json.loads(json.dumps(original))
    del old["checksum"]  # files written before checksums existed still load, with a warning
    plan_file.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="no checksum"):
        minillm.load_pruned(out)


def test_a_re_pruned_model_keeps_every_step_in_its_plan(tmp_path):
    model, _ = minillm.load_model("tiny-llama")
    first = minillm.prune(model, "magnitude", 0.2, progress=False)
    minillm.save_pruned(model, first, tmp_path / "one")
    again, _ = minillm.load_pruned(tmp_path / "one")
    second = minillm.prune(again, "random", 0.4, progress=False)
    assert [s["method"] for s in second.previous_steps] == ["magnitude"]
    assert second.previous_steps[0]["sparsity"] == 0.2 and second.method == "random"
    third = minillm.prune(again, "magnitude", 0.5, progress=False)  # in memory, without saving
    assert [s["method"] for s in third.previous_steps] == ["magnitude", "random"]
    minillm.save_pruned(again, third, tmp_path / "three")
    reloaded, _ = minillm.load_pruned(tmp_path / "three")
    assert [s["sparsity"] for s in minillm.pruning_state(reloaded).plan.previous_steps] == [0.2, 0.4]
    assert minillm.pruning_state(reloaded).plan.achieved_sparsity == pytest.approx(third.achieved_sparsity)


def test_eval_of_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--ppl"]) == 2
    assert "not a model directory" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert _prune_cli(tmp_path / "o", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["eval", "tiny-llama", "--ppl", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_eval_limit_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "tiny-llama", "--zeroshot", "--limit", "-3"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive integer"):
        minillm.evaluate.zeroshot(None, None, limit=-3)


# --- 6. silent surprises ------------------------------------------------------------------------------------


def test_removing_every_unit_warns(tiny):
    with pytest.warns(UserWarning, match="removed every attention head and MLP channel"):
        plan = minillm.prune(tiny("tiny-llama"), "magnitude", 0.999, progress=False)
    assert plan.prunable_params_kept == 0


def test_round_to_far_from_the_request_warns_with_both_numbers(tiny):
    with pytest.warns(UserWarning, match=r"round_to=32: achieved sparsity 0\.2\d* is far from the requested 0\.3"):
        minillm.prune(tiny("tiny-llama-gqa"), "magnitude", 0.3, round_to=32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minillm.prune(tiny("tiny-llama-gqa"), "magnitude", 0.3, round_to=8, progress=False)  # 0.275: close


def test_bonsai_with_a_target_below_the_current_sparsity_raises_like_the_others(tiny):
    calib = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    for method in ("magnitude", "bonsai"):
        model = tiny("tiny-llama")
        minillm.prune(model, "magnitude", 0.4, progress=False)
        with pytest.raises(ValueError, match="already has sparsity"):
            minillm.prune(model, method, 0.2, calib, progress=False, **({"masks_per_round": 4} if method == "bonsai" else {}))


# --- 4. recovery ----------------------------------------------------------------------------------------------------


def test_recovery_divergence_on_the_last_step_is_an_error_and_nothing_is_saved(tmp_path, capsys, monkeypatch):
    from minillm.recover import recover

    model, _ = minillm.load_model("tiny-llama")
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="diverged"):
        recover(model, windows, lr=1e6, steps=1, batch_size=2, rank=2, progress=False)
    merged, rec = recover(minillm.load_model("tiny-llama")[0], windows, lr=1e-3, steps=2, batch_size=2, rank=2,
                          progress=False)
    assert math.isfinite(rec["final_check_loss"])
    # the CLI: a clear error, no output directory
    src = _saved(tmp_path, "src")
    real_load = minillm.load_pruned
    monkeypatch.setattr(minillm, "load_pruned", lambda d, device=None: (real_load(d)[0], object()))  # a "tokenizer"
    monkeypatch.setattr("minillm.data.calibration_windows", lambda tok, n, seqlen, seed: windows)
    rc = main(["recover", str(src), "--out", str(tmp_path / "r"), "--lr", "1e6", "--steps", "1", "--rank", "2",
               "--batch-size", "2", "--quiet"])
    assert rc == 2 and "diverged" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_non_finite_parameters_after_the_last_step_are_an_error(monkeypatch):
    """The loss is computed before each update: NaN written by the last update is only seen by the final check."""
    from minillm.recover import recover

    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        recover(minillm.load_model("tiny-llama")[0], windows, steps=1, batch_size=2, rank=2, progress=False)


def test_nan_perplexity_stays_nan():
    from minillm.evaluate import perplexity

    model, _ = minillm.load_model("tiny-llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    result = perplexity(model, torch.randint(0, 128, (1, 8)), progress=False)
    assert math.isnan(result["ppl"])


# --- 7. interrupts ------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_run_notebooks_stops_papermill_and_its_kernel_when_killed(tmp_path):
    """A stand-in for python: `-m papermill` starts a 'kernel' in its own session (as jupyter_client does) and
    waits; killing the script must stop both."""
    fake = tmp_path / "python"
    fake.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            echo $$ > {tmp_path}/papermill.pid
            setsid sleep 300 &
            echo $! > {tmp_path}/kernel.pid
            wait
            """
        )
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PROFILE": "test-interrupt", "MINILLM_NO_COMPUTE": "1"}
    proc = subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "run_notebooks.sh"), "nb.ipynb"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while not (tmp_path / "kernel.pid").exists() or not (tmp_path / "kernel.pid").read_text().strip():
            assert time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.3)
        pids = [int((tmp_path / f"{n}.pid").read_text()) for n in ("papermill", "kernel")]
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "papermill or its kernel survived the interrupted script"
    finally:
        if proc.poll() is None:
            proc.kill()
        for n in ("papermill", "kernel"):
            f = tmp_path / f"{n}.pid"
            if f.exists() and f.read_text().strip() and _alive(int(f.read_text())):
                os.kill(int(f.read_text()), signal.SIGKILL)


def test_temporary_directories_are_removed_on_sigterm(tmp_path):
    script = textwrap.dedent(
        """\
        import sys, time
        from minillm.files import temporary_directory
        with temporary_directory(prefix="minillm-recovery-") as tmp:
            open(tmp + "/model.safetensors", "w").write("x" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not tmp.exists()


def test_recovery_experiment_uses_the_sigterm_safe_temporary_directory():
    import inspect

    assert "temporary_directory(" in inspect.getsource(experiments._recover_one)
    assert "tempfile.TemporaryDirectory" not in inspect.getsource(experiments._recover_one)


def test_the_cli_cleans_its_temporary_output_on_sigterm(tmp_path):
    """SIGTERM while save_pruned writes: the half-written temporary sibling is removed (no debris)."""
    script = textwrap.dedent(
        f"""\
        import time, sys
        import minillm.checkpoint as ck
        from minillm.__main__ import main
        real = ck.PruningPlan.save
        def slow_save(self, path):
            real(self, path)
            print("writing", flush=True)
            time.sleep(60)
        ck.PruningPlan.save = slow_save
        sys.exit(main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.2",
                       "--out", {str(tmp_path / "out")!r}, "--quiet"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_run_notebooks_renders_the_claims_notebook_again_after_a_computing_run(tmp_path):
    """Notebook 01's claims table reads records that notebooks 02/03 write; after a computing run of several
    notebooks the script renders them again with no_compute 1 (all of them by default, so that the executed
    notebooks kept in git are those `make figures` writes; only 01 with RENDER_AGAIN=claims), and nothing again
    after a single notebook or a render."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\ncat > /dev/null\n')
    fake.chmod(0o755)

    def calls(*notebooks, no_compute="0", again="all"):
        log.write_text("")
        env = {**os.environ, "PYTHON": str(fake), "PROFILE": "test-claims", "MINILLM_NO_COMPUTE": no_compute,
               "RENDER_AGAIN": again}
        script = REPO_ROOT / "scripts" / "run_notebooks.sh"
        subprocess.run(["bash", str(script), *notebooks], cwd=tmp_path, env=env, check=True, capture_output=True)
        return [line for line in log.read_text().splitlines() if "papermill" in line]

    run = calls("01_accuracy.ipynb", "02_memory.ipynb", "03_latency.ipynb", again="claims")
    assert len(run) == 4
    assert "01_accuracy.ipynb" in run[-1] and "no_compute 1" in run[-1]
    assert all("no_compute 0" in line for line in run[:3])
    run = calls("01_accuracy.ipynb", "02_memory.ipynb", "03_latency.ipynb")
    assert len(run) == 6 and all("no_compute 0" in line for line in run[:3])
    def notebook(line):
        return next(word for word in line.split() if word.endswith(".ipynb"))

    assert [notebook(line) for line in run[3:]] == [notebook(line) for line in run[:3]]
    assert all("no_compute 1" in line for line in run[3:])
    assert len(calls("01_accuracy.ipynb")) == 1
    assert len(calls("01_accuracy.ipynb", "02_memory.ipynb", no_compute="1")) == 2
    assert len(calls("02_memory.ipynb", "03_latency.ipynb", again="claims")) == 2
    assert len(calls("02_memory.ipynb", "03_latency.ipynb")) == 4


def test_check_outputs_flags_a_claims_table_rendered_before_its_records(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_outputs", REPO_ROOT / "scripts" / "check_outputs.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    from minillm.artifact.claims import claims_frame

    frame = claims_frame("cpu")
    frame.to_csv(tmp_path / "claims.csv", index=False)
    assert check.stale_claims("cpu", tmp_path) is None
    memory = frame["claim"].str.contains("memory akin")
    assert memory.sum() == 1
    frame.loc[memory, "verdict"] = "insufficient evidence (no memory record with both an FMS and a gradient-free step)"
    frame.to_csv(tmp_path / "claims.csv", index=False)
    message = check.stale_claims("cpu", tmp_path)
    assert message is not None and "memory akin" in message


def test_executed_notebooks_are_normalized_so_a_second_render_is_byte_identical(tmp_path):
    """scripts/normalize_notebook.py removes what papermill varies between two renders of the same records (times,
    the random id of its injected parameters cell); every committed executed notebook is already normalized, so
    `make figures` leaves git status clean."""
    import importlib.util
    import uuid

    import nbformat

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("normalize_notebook", root / "scripts" / "normalize_notebook.py")
    norm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(norm)
    # the smoke profile's executed notebooks are not kept (.gitignore) and `make test` rewrites them beside pytest,
    # so a read here could catch papermill's output before normalize_notebook.py has run on it
    committed = sorted(p for p in (root / "notebooks" / "executed").glob("*/*.ipynb") if p.parent.name != "smoke")
    assert committed
    for path in committed:
        before = path.read_bytes()
        copy = tmp_path / path.name
        copy.write_bytes(before)
        norm.normalize(copy)
        assert copy.read_bytes() == before, f"{path} is not normalized"
    nb = nbformat.read(committed[0], as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    injected[0].id = uuid.uuid4().hex[:8]  # what papermill writes
    injected[0].metadata.setdefault("papermill", {}).update(start_time="2026-01-01T00:00:00", duration=1.0)
    nbformat.write(nb, tmp_path / "again.ipynb")
    norm.normalize(tmp_path / "again.ipynb")
    assert (tmp_path / "again.ipynb").read_bytes() == committed[0].read_bytes()
