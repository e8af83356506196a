"""Methods declare what they need (`MethodSpec`); `minillm.prune` reads the declaration, never the method's name."""

import importlib.machinery
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import minillm
from minillm import scores
from minillm.allocate import LayerScores
from minillm.scores import MethodSpec, get_method


def _register(monkeypatch, name: str, **attrs) -> None:
    """A method module as one file would define it, plus its registry line."""
    full = f"minillm.scores.{name}"
    mod = types.ModuleType(full)
    mod.__spec__ = importlib.machinery.ModuleSpec(full, loader=None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, full, mod)
    monkeypatch.setitem(scores.METHODS, name, name)


def _by_position(ctx, reverse: bool = False) -> list[LayerScores]:
    """Scores that keep the first units (or the last, with reverse=True)."""
    out = []
    for layer in ctx.adapter.layers():
        n_att = ctx.adapter.attention_shape(layer).n_kv_heads
        sign = 1.0 if reverse else -1.0
        out.append(
            LayerScores(
                sign * torch.arange(n_att, dtype=torch.float64),
                sign * torch.arange(ctx.adapter.n_channels(layer), dtype=torch.float64),
            )
        )
    return out


def test_a_new_method_is_one_module_and_one_registry_line(monkeypatch, tiny):
    _register(monkeypatch, "first_units", SPEC=MethodSpec(needs_calibration=False), score=_by_position)
    model = tiny("tiny-llama-gqa")
    plan = minillm.prune(model, "first_units", 0.3, progress=False, reverse=False)
    channels = plan.layers[0].kept_channels
    assert channels == list(range(len(channels)))  # the lowest-indexed channels were kept
    assert plan.options["reverse"] is False
    with pytest.raises(ValueError, match="unknown option.*'revers'.*did you mean 'reverse'"):
        minillm.prune(tiny("tiny-llama-gqa"), "first_units", 0.3, progress=False, revers=True)


def test_declared_needs_drive_the_checks(monkeypatch, tiny):
    _register(monkeypatch, "needs_grad", SPEC=MethodSpec(needs_calibration=True, needs_backward=True), score=_by_position)
    with pytest.raises(ValueError, match="needs calibration data"):
        minillm.prune(tiny("tiny-llama"), "needs_grad", 0.3, progress=False)
    calib = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="streaming supports forward-only methods; 'needs_grad' needs a backward"):
        minillm.prune(tiny("tiny-llama"), "needs_grad", 0.3, calib, stream_device="cpu", progress=False)
    assert get_method("needs_grad").needs_resident_weights({})
    assert not get_method("wanda_sp").needs_resident_weights({})
    assert get_method("fms").needs_resident_weights({"space": "weights"})
    assert not get_method("fms").needs_resident_weights({"space": "gates-split"})


def test_a_method_module_without_a_declaration_is_refused_clearly(monkeypatch):
    _register(monkeypatch, "undeclared", score=_by_position)
    with pytest.raises(TypeError, match="must declare SPEC = MethodSpec"):
        get_method("undeclared")
    _register(monkeypatch, "no_run", SPEC=MethodSpec(needs_calibration=False, scores_and_removes=True))
    with pytest.raises(TypeError, match=r"must define run\(\)"):
        get_method("no_run")


def test_every_registered_method_declares_its_needs():
    for name in scores.available_methods():
        method = get_method(name)
        assert isinstance(method.spec, MethodSpec) and callable(method.entry), name


def test_prune_knows_no_method_by_name():
    source = (Path(minillm.__file__).parent / "prune.py").read_text()
    for name in scores.METHODS:
        assert not re.search(rf"[\"']{name}[\"']", source), f"prune.py mentions method {name!r}"
    assert "hasattr(" not in source


@pytest.mark.parametrize(
    "method, options",
    [("flap", {}), ("wanda_sp", {"compensate_bias": True}), ("fms", {"queries": 2, "compensate_bias": True})],
)
def test_input_statistics_are_collected_once_per_prune(monkeypatch, tiny, method, options):
    """Scoring and bias compensation share the context's statistics cache: one pass over the calibration data."""
    from minillm.scores import common

    calls = []
    original = common.collect_input_stats
    monkeypatch.setattr(common, "collect_input_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    minillm.prune(tiny("tiny-llama"), method, 0.3, torch.randint(0, 128, (2, 8)), progress=False, **options)
    assert len(calls) == 1
