"""Hostile values: non-finite numbers, corrupt weights, missing tokenizers, empty ranges and lengths the model cannot
hold are refused with one line that names the input (exit 2 on the command line); results far from the request warn
with both numbers."""

import copy
import json
import os
import shutil
import warnings

import pytest
import torch
import yaml

import minillm
from minillm.__main__ import main, parse_layers
from minillm.artifact.records import REPO_ROOT
from minillm.recover import recover
from minillm.scores import check_options, get_method


def _prune_cli(out, *extra, model="tiny-llama", method="magnitude", sparsity="0.2"):
    args = ["prune", "--model", model, "--method", method, "--sparsity", sparsity, "--out", str(out), "--quiet"]
    return main([*args, *extra])


# --- 1. numbers are finite and in range wherever they enter --------------------------------------------------------


def test_non_finite_option_values_are_refused_on_the_command_line(tmp_path, capsys):
    for option in ("eps=Infinity", "eps=NaN", "alpha=-Infinity"):
        assert _prune_cli(tmp_path / "o", "--option", option, "--option", "queries=2", method="fms") == 2
        assert "must be a finite number" in capsys.readouterr().err
    for flag in ("--eps", "--sparsity", "--reconstruct-ridge"):
        with pytest.raises(SystemExit) as e:
            _prune_cli(tmp_path / "o", flag, "inf", method="fms")
        assert e.value.code == 2 and f"argument {flag}: expected a finite number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_option_ranges_are_checked_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minillm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for option, message in [("queries=0", "queries must be >= 1"), ("eps=-1", "eps must be > 0")]:
        assert _prune_cli(tmp_path / "o", "--option", option, method="fms") == 2
        assert message in capsys.readouterr().err


def test_non_finite_and_out_of_range_options_are_refused_in_python(tiny):
    calib = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="eps=nan must be a finite number"):
        minillm.prune(tiny("tiny-llama"), "fms", 0.2, calib, eps=float("nan"), progress=False)
    with pytest.raises(ValueError, match="fms shortlist must be in"):
        check_options(get_method("fms"), "fms", {"shortlist": 1.5})
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        check_options(get_method("bonsai"), "bonsai", {"max_rounds": 0})
    with pytest.raises(ValueError, match="prune_frac=inf must be a finite number"):
        check_options(get_method("bonsai"), "bonsai", {"prune_frac": float("inf")})
    with pytest.raises(ValueError, match="lr must be a finite number"):
        recover(tiny("tiny-llama"), calib, lr=float("inf"), steps=1)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["recovery"]["train"].update(lr=float("inf")), "train.lr: must be a finite number"),
        (lambda c: c["recovery"].update(kl_weights=[float("inf")]), "kl_weights[0]: must be a finite number"),
        (lambda c: c["accuracy"]["methods"][2]["options"].update(eps=float("inf")), "eps=inf must be a finite"),
        (lambda c: c["accuracy"]["methods"][2]["options"].update(queries=0), "queries must be >= 1"),
    ],
)
def test_profile_numbers_are_finite_and_in_range(edit, message):
    from minillm.artifact.profiles import ProfileError, validate_profile

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "smoke.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    with pytest.raises(ProfileError) as e:
        validate_profile(cfg, "smoke")
    assert message in str(e.value)


# --- 2. weights -------------------------------------------------------------------------------------------------------


def test_non_finite_weights_are_refused_before_scoring(tiny):
    model = tiny("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter model\.layers\.1\.mlp\.up_proj\.weight has non-finite values"):
        minillm.prune(model, "magnitude", 0.3, progress=False)
    assert model.model.layers[1].mlp.up_proj.weight.shape[0] == 48  # nothing removed
    from minillm.prune import check_finite_weights

    check_finite_weights(torch.nn.Linear(2, 2, device="meta"))  # offloaded weights: skipped
    big = torch.nn.Linear(4, 4).half()
    with torch.no_grad():
        big.weight.fill_(60000.0)  # finite, but their fp16 sum overflows: still accepted
        assert not torch.isfinite(big.weight.sum())
        check_finite_weights(big)
        big.weight[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="weight has non-finite"):
        check_finite_weights(big)


# --- 3. calibration ---------------------------------------------------------------------------------------------------


def test_a_model_without_a_tokenizer_needs_random_calibration_asked_for(tiny, tmp_path, capsys):
    tiny("tiny-llama").save_pretrained(tmp_path / "notok")
    assert _prune_cli(tmp_path / "o", model=str(tmp_path / "notok"), method="wanda_sp") == 2
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "--random-calibration" in err and not (tmp_path / "o").exists()
    assert _prune_cli(tmp_path / "o", "--random-calibration", model=str(tmp_path / "notok"), method="wanda_sp") == 0
    plan = json.loads((tmp_path / "o" / "pruning.json").read_text())
    assert plan["calibration"]["source"].startswith("random token ids (--random-calibration")


# --- 4. surprises -----------------------------------------------------------------------------------------------------


def test_achieved_sparsity_far_from_the_request_warns_for_any_reason(tiny):
    with pytest.warns(UserWarning, match=r"sparsity 0\.001 removed nothing \(achieved sparsity 0\.0000\)"):
        minillm.prune(tiny("tiny-llama"), "magnitude", 0.001, progress=False)
    with pytest.warns(UserWarning, match=r"achieved sparsity 0\.15\d* is far from the requested 0\.2 \(units"):
        minillm.prune(tiny("tiny-llama"), "magnitude", 0.2, targets="attention", skip_layers=[0, 1], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minillm.prune(tiny("tiny-llama"), "magnitude", 0.2, progress=False)  # 0.206: close
        minillm.prune(tiny("tiny-llama"), "magnitude", 0.0, progress=False)  # nothing asked, nothing removed


# --- 5. layer lists ---------------------------------------------------------------------------------------------------


def test_reversed_empty_or_malformed_layer_ranges_are_errors(tmp_path, capsys):
    assert parse_layers("0-3,28,29") == [0, 1, 2, 3, 28, 29] and parse_layers("1-1") == [1]
    for text, message in [("2-0", "the range '2-0' is empty; write it as 0-2"), ("-1", "'-1' is not a layer"),
                          ("0,,1", "'' is not a layer"), ("a", "'a' is not a layer")]:
        with pytest.raises(ValueError, match=message):
            parse_layers(text)
        assert _prune_cli(tmp_path / "o", f"--skip-layers={text}") == 2
        assert f"--skip-layers {text!r}" in capsys.readouterr().err
    assert _prune_cli(tmp_path / "o", "--skip-layers", "7") == 2
    assert "skip_layers [7] out of range for a model with 3 layers" in capsys.readouterr().err


# --- 6, 7. eval -------------------------------------------------------------------------------------------------------


def test_eval_refuses_a_perplexity_window_beyond_the_models_positions(tiny_text_model_dir, capsys):
    args = ["eval", tiny_text_model_dir, "--ppl", "--ppl-windows", "1", "--quiet"]
    assert main([*args, "--ppl-seqlen", "4096"]) == 2
    assert "--ppl-seqlen 4096 must be between 2 and the model's 2048 positions" in capsys.readouterr().err


def test_eval_of_a_pruned_directory_without_pruning_json_is_one_line(tmp_path, capsys, tiny_text_model_dir):
    model, _ = minillm.load_model("tiny-llama")
    out = minillm.save_pruned(model, minillm.prune(model, "magnitude", 0.3, progress=False), tmp_path / "p")
    (out / "pruning.json").unlink()
    assert main(["eval", str(out), "--ppl"]) == 2
    assert "has no pruning.json and transformers cannot load it" in capsys.readouterr().err
    # a plain transformers directory (no pruning.json either) is evaluated as a dense model
    args = ["eval", tiny_text_model_dir, "--ppl", "--ppl-seqlen", "16", "--ppl-windows", "1", "--quiet"]
    assert main(args) == 0 and "perplexity" in json.loads(capsys.readouterr().out)


# --- 8, 9. unknown names ----------------------------------------------------------------------------------------------


def test_pending_of_an_unknown_profile_is_an_error(capsys):
    assert main(["pending", "--profile", "nosuch"]) == 2
    assert "no profile 'nosuch'" in (err := capsys.readouterr().err) and "known profiles: cpu" in err


def test_simulated_memory_of_an_unknown_shape_is_an_error(capsys):
    assert main(["bench", "memory", "--simulate", "--model", "nosuch-shape"]) == 2
    assert "--model 'nosuch-shape'" in (err := capsys.readouterr().err) and "llama-7b-shape" in err


# --- 10. recover's teacher --------------------------------------------------------------------------------------------


def test_recover_finds_a_relative_parent_from_the_pruned_directory(tmp_path, monkeypatch, capsys, tiny_text_model_dir):
    from minillm.plan import document_checksum

    shutil.copytree(tiny_text_model_dir, tmp_path / "base")
    for d in ("x", "y/z"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "x")  # prune records base_model '../base' as an absolute path
    assert _prune_cli(tmp_path / "p", model="../base") == 0
    plan = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert plan["base_model"] == os.fspath(tmp_path / "base")
    monkeypatch.chdir(tmp_path / "y" / "z")  # '../base' relative to here does not exist; relative to p it does
    args = ["recover", str(tmp_path / "p"), "--steps", "1", "--windows", "2", "--seqlen", "16", "--batch-size", "1"]
    assert main([*args, "--kl-weight", "0.5", "--quiet", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "pruning.json").read_text())["recovery"][0]["kl_weight"] == 0.5
    plan["base_model"] = "../base"  # as older versions recorded it: relative to where prune ran
    plan["checksum"] = document_checksum(plan)
    (tmp_path / "p" / "pruning.json").write_text(json.dumps(plan))
    assert main([*args, "--kl-weight", "0.5", "--quiet", "--out", str(tmp_path / "r1")]) == 0
    shutil.rmtree(tmp_path / "base")
    capsys.readouterr()
    assert main([*args, "--kl-weight", "0.5", "--quiet", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert f"neither at {tmp_path / 'p' / '..' / 'base'}" in err and os.fspath(tmp_path / "y" / "base") in err
    plan["base_model"] = os.fspath(tmp_path / "base")
    plan["checksum"] = document_checksum(plan)
    (tmp_path / "p" / "pruning.json").write_text(json.dumps(plan))
    assert main([*args, "--kl-weight", "0.5", "--quiet", "--out", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err
    assert f"{os.fspath(tmp_path / 'base')!r} (base_model in pruning.json) is no longer there" in err


def test_an_unreachable_hub_id_fails_at_once(monkeypatch):
    """A Hub id that is not cached, with no network, fails in about the probe's timeout, not after ~50 s of
    retries, and says why."""
    import time

    from huggingface_hub import constants

    import minillm.models as models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline (conftest); this one may not
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=models.HUB_PROBE_TIMEOUT_S: False)
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="not in the local Hugging Face cache and the Hub"):
        models.load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - t0 < 10
