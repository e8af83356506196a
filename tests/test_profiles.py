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
