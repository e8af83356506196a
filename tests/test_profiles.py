"""Every profile in configs/ can drive every notebook: all sections present, labels consistent, methods known."""

import pytest

from minillm.artifact.experiments import CONFIG_DIR, load_profile
from minillm.models import SHAPES
from minillm.scores import check_options, get_method

PROFILES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
SECTIONS = ("accuracy", "ablations", "recovery", "memory", "latency")


def test_the_documented_profiles_exist():
    assert {"smoke", "cpu", "cpu-full", "gpu", "paper"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_is_complete_and_consistent(name):
    cfg = load_profile(name)
    missing = [s for s in SECTIONS if s not in cfg]
    assert not missing, f"profile {name} lacks {missing} (a notebook would fail)"
    for exp in ("accuracy", "ablations"):
        labels = [e["label"] for e in cfg[exp]["methods"]]
        assert len(labels) == len(set(labels)), f"{name}/{exp}: duplicate labels"
        for e in cfg[exp]["methods"]:
            # raise on an unknown method or an option it does not take
            check_options(get_method(e["method"]), e["method"], e.get("options", {}))
    accuracy_labels = {e["label"] for e in cfg["accuracy"]["methods"]}
    for item in cfg["recovery"]["methods"]:
        label = item if isinstance(item, str) else item["label"]
        assert label in accuracy_labels, f"{name}: recovery entry {label!r} is not an accuracy label"
    for exp in ("memory", "latency"):
        for model in cfg[exp]["models"]:
            assert model in SHAPES or model == cfg["model"] or model == "smollm2-135m", (name, exp, model)
        if exp == "memory":
            for m in cfg[exp]["methods"]:
                check_options(get_method(m["method"]), m["method"], m.get("options", {}))


@pytest.mark.parametrize("name", PROFILES)
def test_profile_declares_a_valid_dtype(name):
    from minillm.artifact.experiments import PROFILE_DTYPES

    assert load_profile(name)["dtype"] in PROFILE_DTYPES


def test_an_invalid_profile_dtype_is_refused(tmp_path, monkeypatch):
    import minillm.artifact.experiments as ex

    (tmp_path / "bad.yaml").write_text("model: tiny-llama\ndtype: fp8\n")
    monkeypatch.setattr(ex, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ex.load_profile("bad")


def test_the_paper_profile_does_not_run_7b_in_fp32():
    assert load_profile("paper")["dtype"] in ("bfloat16", "float16")


# --- the schema (minillm.artifact.profiles) ------------------------------------------------------------------------


def _smoke():
    import yaml

    cfg = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    cfg["profile"] = "smoke"
    return cfg


def test_every_problem_of_a_profile_is_reported_at_once():
    """Several mistakes in several sections, schema and checks across keys alike: one ProfileError, one line each,
    each starting with the dotted path of its key."""
    from minillm.artifact.profiles import ProfileError, validate_profile

    cfg = _smoke()
    cfg["accuracy"]["zeroshot"]["limt"] = 4
    cfg["accuracy"]["calibration"]["seqlen"] = 1
    cfg["accuracy"]["methods"][2]["options"]["queries"] = "4"
    cfg["ablations"]["methods"].append(dict(cfg["ablations"]["methods"][0]))
    cfg["recovery"]["train"]["lr"] = "fast"
    cfg["recovery"]["methods"] = ["randm"]
    cfg["latency"]["compile"] = "al"
    with pytest.raises(ProfileError) as e:
        validate_profile(cfg, "smoke")
    lines = str(e.value).splitlines()
    expected = [
        "smoke.accuracy.calibration.seqlen: must be >= 2, got 1",
        "smoke.accuracy.zeroshot.limt: unknown key 'limt'; did you mean 'limit'? (valid keys: stderr, limit, "
        "batch_size, tasks, sparsities)",
        "smoke.accuracy.methods[2]: invalid option value(s) for method 'fms': queries='4' must be int, got str",
        "smoke.ablations.methods: duplicate labels ['fms-gates-n1']",
        "smoke.recovery.train.lr: must be a number, got 'fast'",
        "smoke.latency.compile: must be one of none, all, got 'al' (did you mean 'all'?)",
        "smoke.recovery.methods[0]: 'randm' is not a label of accuracy.methods; did you mean 'random'?",
    ]
    assert sorted(lines) == sorted(expected)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["accuracy"]["calibration"].update(n_samples="4"), "calibration.n_samples: must be an integer"),
        (lambda c: c["accuracy"]["calibration"].update(n_samples=2.5), "calibration.n_samples: must be an integer"),
        (lambda c: c["accuracy"]["calibration"].update(n_samples=True), "calibration.n_samples: must be an integer"),
        (lambda c: c["recovery"]["train"].update(alpha=True), "train.alpha: must be a number, got True"),
        (lambda c: c["accuracy"]["perplexity"].update(batch_size=None), "batch_size: must be an integer, got None"),
        (lambda c: c["accuracy"]["prune_options"].update(skip_layers=[1, "2"]), "skip_layers[1]: must be an integer"),
        (lambda c: c["accuracy"]["zeroshot"].update(limit="all"), "zeroshot.limit: must be an integer or null"),
        (lambda c: c["latency"].update(include_24="yes"), "latency.include_24: must be true or false, got 'yes'"),
        (lambda c: c["accuracy"]["methods"][0].update(label=3), "accuracy.methods[0].label: must be a string, got 3"),
        (lambda c: c["accuracy"]["calibration"].pop("seqlen"), "smoke.accuracy.calibration.seqlen: required key"),
        (lambda c: c.update(memory=[1]), "smoke.memory: must be a mapping, got [1]"),
        (lambda c: c["fms_diagnostics"].update(allocations=["globl"]), "allocations[0]: must be one of uniform, "
         "global, got 'globl' (did you mean 'global'?)"),
        (lambda c: c["fms_diagnostics"]["bonsai"].update(prune_frac=0.5), "bonsai.prune_frac: must be < 0.5"),
        (lambda c: c["latency"].update(prefill=[[1, 0]]), "latency.prefill[0]: must be a pair [batch, seqlen]"),
        (lambda c: c["recovery"].update(methods=[3]), "recovery.methods[0]: must be a label or a mapping, got 3"),
        (lambda c: c["recovery"].update(methods=[{"label": "random", "train": {"steps": 1}}]), "needs a 'tag'"),
        (lambda c: c["latency"].update(models=["tiny-lama-gqa"]), "latency.models[0]: unknown model 'tiny-lama-gqa'"),
        (lambda c: c["accuracy"]["methods"][1].update(calibration={"seqlen": 10000}),
         "smoke.accuracy.methods[1].calibration.seqlen: 10000 tokens is beyond the 8192 positions"),
    ],
)
def test_values_are_strictly_typed_and_named_by_their_path(edit, message):
    from minillm.artifact.profiles import ProfileError, validate_profile

    cfg = _smoke()
    edit(cfg)
    with pytest.raises(ProfileError) as e:
        validate_profile(cfg, "smoke")
    assert message in str(e.value)
    assert len(str(e.value).splitlines()) == 1, str(e.value)  # one mistake, one line


def test_a_valid_profile_is_returned_as_the_same_plain_dict():
    import copy

    from minillm.artifact.profiles import validate_profile

    cfg = _smoke()
    cfg["recovery"]["train"]["alpha"] = 4  # an integer where a number is wanted
    before = copy.deepcopy(cfg)
    assert validate_profile(cfg, "smoke") is cfg
    assert cfg == before


def test_resolved_entry_applies_the_section_under_the_entry():
    import copy

    from minillm.artifact.profiles import resolved_entry

    section = {
        "calibration": {"n_samples": 2, "seqlen": 32},
        "sparsities": [0.1, 0.2, 0.3],
        "prune_options": {"allocation": "uniform", "skip_layers": [0]},
        "seeds": [0, 1],
        "seed_sparsities": [0.2, 0.5],
        "seed_zeroshot": False,
    }
    entry = {"label": "b", "method": "bonsai", "options": {"masks_per_round": 4}, "zeroshot": False,
             "prune_options": {"allocation": "global"}, "calibration": {"seed": 7}}
    before = copy.deepcopy((section, entry))
    r = resolved_entry(section, entry)
    assert r == {
        **entry,
        "prune_options": {"allocation": "global", "skip_layers": [0]},
        "calibration": {"n_samples": 2, "seqlen": 32, "seed": 7},
        "sparsities": [0.1, 0.2, 0.3],
        "seeds": [0, 1],
        "seed_sparsities": [0.2],  # the section's, among the sparsities this entry runs
        "seed_zeroshot": False,
    }
    r["prune_options"]["skip_layers"].append(1)
    r["sparsities"].append(0.9)
    assert (section, entry) == before  # a copy: the profile is left as it is

    own = {"label": "m", "method": "magnitude", "sparsities": [0.5, 0.2], "seeds": [0, 2], "seed_sparsities": [0.5],
           "seed_zeroshot": True, "calibration": {"n_samples": 4}}
    r = resolved_entry(section, own)
    assert (r["sparsities"], r["seeds"], r["seed_sparsities"], r["seed_zeroshot"]) == ([0.5, 0.2], [0, 2], [0.5], True)
    assert r["calibration"] == {"n_samples": 4, "seqlen": 32, "seed": 0}

    bare = resolved_entry({"calibration": {"n_samples": 2, "seqlen": 32}, "sparsities": [0.2, 0.4]}, {"label": "m"})
    assert bare["prune_options"] == {} and bare["seeds"] == [0] and bare["seed_zeroshot"] is True
    assert bare["seed_sparsities"] == [0.2, 0.4]  # none named: replicates would run at every sparsity


@pytest.mark.parametrize("name", PROFILES)
def test_resolved_entry_agrees_with_what_the_experiments_run(name):
    """For every committed entry, resolved_entry gives the prune options, calibration, sparsities and seed
    replicates that the experiment drivers use today."""
    from minillm.artifact import experiments as ex
    from minillm.artifact.profiles import resolved_entry

    cfg = load_profile(name)
    for exp in ("accuracy", "ablations"):
        section = cfg[exp]
        for entry in section["methods"]:
            r = resolved_entry(section, entry)
            assert r["prune_options"] == ex._method_config(cfg, section, entry, r["sparsities"][0])["prune_options"]
            c = r["calibration"]
            assert (c["n_samples"], c["seqlen"], c["seed"]) == ex._calibration_settings(section, entry)
            replicates = ex.seed_replicates(section, entry)
            assert replicates[0][2] == r["sparsities"]
            wanted = sorted(set(r["seeds"]) - {0}) if r["seed_sparsities"] else []
            assert [k for k, _, _ in replicates[1:]] == wanted
            for _, replicate, runs in replicates[1:]:
                assert runs == r["seed_sparsities"]
                assert replicate.get("zeroshot", True) is (r["seed_zeroshot"] and entry.get("zeroshot", True))
