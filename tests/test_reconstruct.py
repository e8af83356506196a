"""Least-squares reconstruction of the output projections (`minillm.reconstruct`, `prune(..., reconstruct=...)`)."""

import json
import weakref

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import minillm
import minillm.layerwise as layerwise
import minillm.reconstruct as rec
from minillm.__main__ import main
from minillm.adapters import get_adapter
from minillm.compensate import compensate
from minillm.models import SHAPES, build_random
from minillm.offload import has_offloaded
from minillm.reconstruct import Moments, ReconstructConfig, refit_columns, write_refit
from minillm.scores.common import ScoringContext
from minillm.state import pruning_state
from minillm.surgery import CurrentKeep

FAMILIES = ["tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom", "tiny-gemma3"]


def _calib(n=8, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _keeps(model, calib, sparsity=0.4, **alloc):
    scores = minillm.score(model, "wanda_sp", calib, progress=False)
    return minillm.allocate_units(model, scores, sparsity, **alloc)


def _kept_columns(adapter, layer, keep):
    """(attention output projection's kept columns, MLP output projection's kept columns) of an unpruned layer."""
    hd = adapter.attention_shape(layer).head_dim
    att = torch.tensor([h * hd + j for h in keep.kept_q for j in range(hd)], dtype=torch.long)
    return att, torch.tensor(keep.kept_channels, dtype=torch.long)


def _out_proj_inputs(model, adapter, calib):
    """Inputs [tokens, d] (float64) of every layer's two output projections on the unpruned model."""
    seen, handles = {}, []
    for i, layer in enumerate(adapter.layers()):
        for kind, lin in (("att", adapter.attn_out_proj(layer)), ("mlp", adapter.mlp_out_proj(layer))):
            hook = lambda mod, args, key=(i, kind): seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1]))
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.base_model(input_ids=calib, use_cache=False)
    for h in handles:
        h.remove()
    return {k: v.double() for k, v in seen.items()}


# --- 1. the uncorrelated special case is FLAP's bias compensation ------------------------------------------------


def test_diagonal_covariance_without_ridge_is_exactly_bias_compensation():
    g = torch.Generator().manual_seed(0)
    d, m, n = 12, 5, 1000
    mu = torch.randn(d, dtype=torch.float64, generator=g)
    var = torch.rand(d, dtype=torch.float64, generator=g) + 0.5
    moments = Moments(sum_x=n * mu, xx=n * (torch.diag(var) + torch.outer(mu, mu)), n=n)
    weight = torch.randn(m, d, dtype=torch.float64, generator=g)
    keep = torch.tensor([0, 2, 3, 7, 11])
    removed = torch.tensor([c for c in range(d) if c not in keep.tolist()])

    w_s, delta = refit_columns(weight, moments, keep, ridge=0.0)
    # fp64 round-off: W'_S = W_S and b' - b = W_R mu_R
    assert torch.allclose(w_s, weight[:, keep], rtol=0, atol=1e-12)
    assert torch.allclose(delta, weight[:, removed] @ mu[removed], rtol=0, atol=1e-12)

    for with_bias in (True, False):  # today's compensation (fp32) adds to a bias or creates one; so does the refit
        ref = nn.Linear(d, m, bias=with_bias)
        with torch.no_grad():
            ref.weight.copy_(weight)
        refit = nn.Linear(d, m, bias=with_bias)
        refit.load_state_dict(ref.state_dict())
        compensate(ref, removed, mu.float())
        write_refit(refit, keep, w_s, delta)
        assert torch.allclose(refit.bias, ref.bias, rtol=0, atol=1e-5)
        assert torch.equal(refit.weight[:, keep], ref.weight[:, keep])
        assert torch.equal(refit.weight[:, removed], torch.zeros(m, removed.numel()))


# --- 2. never worse than compensation or removal on the calibration tokens -----------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gemma3"])
def test_refit_error_is_never_above_compensation_nor_removal(tiny, name):
    model, calib = tiny(name), _calib(16)
    adapter = get_adapter(model)
    keeps = _keeps(model, calib)
    inputs = _out_proj_inputs(model, adapter, calib)
    before = {}
    for i, layer in enumerate(adapter.layers()):
        for kind, lin in (("att", adapter.attn_out_proj(layer)), ("mlp", adapter.mlp_out_proj(layer))):
            bias = lin.bias.detach().double() if lin.bias is not None else torch.zeros(lin.out_features).double()
            keep = _kept_columns(adapter, layer, keeps[i])[kind == "mlp"]
            before[(i, kind)] = (lin.weight.detach().double().clone(), bias, keep)
    minillm.remove_units(model, keeps, calib, reconstruct="dense", reconstruct_ridge=1e-10, progress=False)
    improved = 0
    for (i, kind), (w, b, keep) in before.items():
        layer = adapter.layers()[i]
        lin = adapter.attn_out_proj(layer) if kind == "att" else adapter.mlp_out_proj(layer)
        x = inputs[(i, kind)]
        removed = torch.tensor([c for c in range(w.shape[1]) if c not in keep.tolist()], dtype=torch.long)
        target = x @ w.T + b
        plain = x[:, keep] @ w[:, keep].T + b
        compensated = plain + w[:, removed] @ x[:, removed].mean(0)
        refit = x[:, keep] @ lin.weight.detach().double().T + lin.bias.detach().double()
        fits = {"plain": plain, "comp": compensated, "refit": refit}
        err = {k: float(((target - y) ** 2).sum()) for k, y in fits.items()}
        assert err["refit"] <= err["comp"] * (1 + 1e-6) + 1e-9, (i, kind, err)
        assert err["comp"] <= err["plain"] * (1 + 1e-9) + 1e-12, (i, kind, err)
        improved += err["refit"] < 0.9 * err["comp"]
    assert improved > 0  # the refit does more than compensation somewhere


def _residual_is_orthogonal(x_s, r):
    """Normal equations of the centred least-squares fit: the residual r [N, m] has zero mean and is orthogonal to
    every kept input column x_s [N, k]."""
    scale = float(x_s.norm() * r.norm())
    orthogonal = float((x_s.T @ r).abs().max()) <= 1e-5 * scale
    return orthogonal and float(r.mean(0).abs().max()) <= 1e-5 * float(r.abs().max())


@pytest.mark.parametrize("mode", ["dense", "sequential"])
def test_each_mode_solves_its_own_objective(tiny, mode):
    """dense: fit W X + b from X_S; sequential: the attention fits the dense stream's output W T + b from the pruned
    stream's X_S, the MLP the unpruned projection on the pruned stream's own input (module docstring)."""
    calib = _calib(16)
    dense_model, model = tiny("tiny-llama"), tiny("tiny-llama")  # no biases: the targets have none
    adapter = get_adapter(model)
    keeps = _keeps(dense_model, calib)
    ctx = ScoringContext(model, adapter, calib, progress=False)
    rec.reconstruct(ctx, keeps, ReconstructConfig(mode, ridge=1e-10))  # removed columns zeroed, nothing removed
    dense_in = _out_proj_inputs(dense_model, get_adapter(dense_model), calib)
    pruned_in = _out_proj_inputs(model, adapter, calib)  # the pruned stream
    for i, (layer, dense_layer) in enumerate(zip(adapter.layers(), get_adapter(dense_model).layers())):
        for kind, cols in zip(("att", "mlp"), _kept_columns(adapter, layer, keeps[i])):
            w = (dense_layer.self_attn.o_proj if kind == "att" else dense_layer.mlp.down_proj).weight.detach().double()
            lin = adapter.attn_out_proj(layer) if kind == "att" else adapter.mlp_out_proj(layer)
            target_in = dense_in if mode == "dense" or kind == "att" else pruned_in
            x_s = (dense_in if mode == "dense" else pruned_in)[(i, kind)][:, cols]
            fit = x_s @ lin.weight.detach().double()[:, cols].T + lin.bias.detach().double()
            r = target_in[(i, kind)] @ w.T - fit
            assert _residual_is_orthogonal(x_s, r), (mode, i, kind)


# --- 3. masked == pruned, and a saved refit model reloads identically ----------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "sequential"])
@pytest.mark.parametrize("name", FAMILIES)
def test_refit_masked_equals_pruned_and_reloads_identically(tiny, tokens, tmp_path, name, mode):
    calib = _calib()
    model = tiny(name)
    adapter = get_adapter(model)
    keeps = _keeps(model, calib)
    rec.reconstruct(ScoringContext(model, adapter, calib, progress=False), keeps, ReconstructConfig(mode))
    with torch.no_grad():
        masked = model(tokens).logits  # removed columns zeroed, nothing removed yet
        pruning_state(model).remove_all(adapter, keeps)
        pruned = model(tokens).logits
    assert (masked - pruned).abs().max() <= 1e-5

    other = tiny(name)
    plan = minillm.prune(other, "wanda_sp", 0.4, calib, reconstruct=mode, progress=False)
    assert plan.options["reconstruct"] == {"mode": mode, "ridge": rec.DEFAULT_RIDGE, "form": "centered"}
    assert plan.history[-1]["reconstruct_time_s"] > 0
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, pruned)
    minillm.save_pruned(other, plan, tmp_path / "p")
    reloaded, _ = minillm.load_pruned(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "pruning.json").read_text())["options"]["reconstruct"]["mode"] == mode
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, pruned)


@pytest.mark.parametrize("name,mode", [("tiny-llama", "dense"), ("tiny-llama", "sequential"), ("tiny-llama-gqa", "dense")])
def test_bonsai_refits_after_its_last_round(tiny, tokens, tmp_path, name, mode):
    """Bonsai's rounds prune a copy; the original is then refit to the copy's final units: the units are Bonsai's
    own (as without a refit), the weights are the refit `remove_units` writes for those units on the unpruned model,
    and the saved model reloads to identical logits."""
    calib, opts = _calib(), dict(masks_per_round=8, prune_frac=0.1, seed=2, progress=False)
    plain = tiny(name)
    without = minillm.prune(plain, "bonsai", 0.4, calib, **opts)
    model = tiny(name)
    plan = minillm.prune(model, "bonsai", 0.4, calib, reconstruct=mode, **opts)
    assert [k.to_json() for k in plan.layers] == [k.to_json() for k in without.layers]
    # the centred refit creates output-projection biases where the model has none: a few parameters more
    assert 0 < without.achieved_sparsity - plan.achieved_sparsity < 0.01 and plan.achieved_sparsity > 0.3
    assert plan.options["reconstruct"]["mode"] == mode and plan.history[-1]["reconstruct_time_s"] > 0
    assert len(plan.history) == len(without.history) > 1  # the rounds, the refit timed in the last one
    reference = tiny(name)  # unpruned: current indices are the original ones
    keeps = [CurrentKeep(k.kept_query_heads, k.kept_kv_heads, k.kept_channels) for k in plan.layers]
    minillm.remove_units(reference, keeps, calib, reconstruct=mode, progress=False)
    with torch.no_grad():
        logits = model(tokens).logits
        assert torch.equal(logits, reference(tokens).logits)
        assert (logits - plain(tokens).logits).abs().max() > 1e-3  # the refit changed the weights
    minillm.save_pruned(model, plan, tmp_path / "p")
    reloaded, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, logits)


def test_bonsai_with_reconstruct_refuses_layer_streaming(tiny):
    with pytest.raises(ValueError, match="layer streaming does not apply to it"):
        minillm.prune(tiny("tiny-llama"), "bonsai", 0.3, _calib(), reconstruct="dense", stream_device="cpu")


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_replayed_layer_calls_reproduce_the_model_forward(tiny, name):
    """Gemma 3's sliding and global layers get different masks: each layer is replayed with its own arguments. The
    capture pass itself computes only layer 0, once (to learn its output's structure): the other layers' linears
    never run, and every layer has its own forward back afterwards."""
    model, calib = tiny(name), _calib(4, 16)  # window 4 < 16 tokens
    adapter = get_adapter(model)
    layers = adapter.layers()
    runs = [0] * len(layers)
    handles = [
        adapter.mlp_out_proj(layer).register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
        for i, layer in enumerate(layers)
    ]
    hidden, calls = layerwise.capture_layer_calls(model, layers, [calib, calib])
    for h in handles:
        h.remove()
    assert runs == [1] + [0] * (len(layers) - 1)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert [len(c) for c in calls] == [2] * len(layers) and len(hidden) == 2
    with torch.no_grad():
        expected = model.base_model(input_ids=calib, output_hidden_states=True).hidden_states
        h = hidden[0]
        for i, layer in enumerate(layers):
            assert torch.equal(h, expected[i]), i
            h = layerwise.run_layer(layer, h, calls[i][0])[0]


# --- 4. sequential vs dense statistics ---------------------------------------------------------------------------


def _refit_state(model, keeps, calib, mode, **kw):
    minillm.remove_units(model, keeps, calib, reconstruct=mode, progress=False, **kw)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sequential_differs_from_dense_where_the_pruned_prefix_matters(tiny):
    calib = _calib()
    keeps = _keeps(tiny("tiny-llama"), calib)
    dense = _refit_state(tiny("tiny-llama"), keeps, calib, "dense")
    seq = _refit_state(tiny("tiny-llama"), keeps, calib, "sequential")
    layers = "model.layers.{}.{}.weight"
    assert torch.equal(dense[layers.format(0, "self_attn.o_proj")], seq[layers.format(0, "self_attn.o_proj")])
    # layer 0's MLP sees the pruned attention; layers 1 and 2 see the pruned prefix
    differing = [(0, "mlp.down_proj")] + [(i, p) for i in (1, 2) for p in ("self_attn.o_proj", "mlp.down_proj")]
    for i, p in differing:
        assert not torch.allclose(dense[layers.format(i, p)], seq[layers.format(i, p)], atol=1e-6), (i, p)


def test_sequential_equals_dense_on_a_one_layer_model():
    def one_layer():
        config = SHAPES["tiny-llama"]()
        config.num_hidden_layers = 1
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    calib = _calib()
    for targets in ("mlp", "both"):
        keeps = _keeps(one_layer(), calib, targets=targets)
        dense = _refit_state(one_layer(), keeps, calib, "dense")
        seq = _refit_state(one_layer(), keeps, calib, "sequential")
        differ = [k for k in dense if not torch.equal(dense[k], seq[k])]
        # with the attention pruned, the MLP of the pruned stream sees the refit attention's output
        down = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.bias"]
        assert differ == ([] if targets == "mlp" else down)


# --- 5. the uncentred form ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "sequential"])
def test_uncentered_form_creates_no_bias_and_keeps_the_stock_shape(tiny, tokens, tmp_path, mode):
    calib = _calib()
    keeps = _keeps(tiny("tiny-gemma3"), calib)
    plain, refit = tiny("tiny-gemma3"), tiny("tiny-gemma3")
    minillm.remove_units(plain, keeps)
    minillm.remove_units(refit, keeps, calib, reconstruct=mode, reconstruct_form="uncentered", progress=False)
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert {k: v.shape for k, v in refit.state_dict().items()} == shapes
    assert not any(k.endswith(("o_proj.bias", "down_proj.bias")) for k in shapes)
    assert not torch.equal(plain.state_dict()["model.layers.1.mlp.down_proj.weight"],
                           refit.state_dict()["model.layers.1.mlp.down_proj.weight"])
    plan = minillm.make_plan(refit, "wanda_sp", 0.4, {}, 0, None)
    minillm.save_pruned(refit, plan, tmp_path / "p")
    reloaded, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, refit(tokens).logits)


def test_uncentered_form_leaves_an_existing_bias_alone(tiny):
    calib = _calib()
    model = tiny("tiny-opt")
    biases = [layer.fc2.bias.clone() for layer in get_adapter(model).layers()]
    minillm.remove_units(model, _keeps(tiny("tiny-opt"), calib), calib, reconstruct="dense",
                         reconstruct_form="uncentered", progress=False)
    for layer, bias in zip(get_adapter(model).layers(), biases):
        assert torch.equal(layer.fc2.bias, bias)


# --- 6. one layer's moments at a time ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "sequential"])
def test_moments_of_one_layer_at_a_time(tiny, monkeypatch, mode):
    model, calib = tiny("tiny-llama-gqa"), _calib()
    adapter = get_adapter(model)
    keeps = _keeps(model, calib)
    live, peak, count = [], [0], [0]
    allocate = layerwise._gram

    def tracked(rows, cols, device):
        t = allocate(rows, cols, device)
        live.append(weakref.ref(t))
        count[0] += 1
        peak[0] = max(peak[0], sum(r().numel() * 8 for r in live if r() is not None))
        return t

    monkeypatch.setattr(layerwise, "_gram", tracked)
    minillm.remove_units(model, keeps, calib, reconstruct=mode, progress=False)
    d_att, d_ff = 6 * 8, 64
    n_layers = len(adapter.layers())
    if mode == "dense":  # the two projections' Grams of one layer
        assert count[0] == 2 * n_layers and peak[0] == 8 * (d_att**2 + d_ff**2)
    else:  # the attention's Gram and cross-moments, then the MLP's Gram
        assert count[0] == 3 * n_layers and peak[0] == 8 * max(2 * d_att**2, d_ff**2)


# --- options, refusals, offload, streaming, CLI --------------------------------------------------------------------


def test_flap_with_reconstruct_drops_its_default_compensation(tiny):
    plan = minillm.prune(tiny("tiny-llama"), "flap", 0.3, _calib(), reconstruct="dense", progress=False)
    assert plan.options["compensate_bias"] is False and plan.options["reconstruct"]["mode"] == "dense"
    plan = minillm.prune(tiny("tiny-llama"), "flap", 0.3, _calib(), progress=False)
    assert plan.options["compensate_bias"] is True and plan.options["reconstruct"] is None


@pytest.mark.parametrize(
    "method,kwargs,message",
    [
        ("wanda_24", {"reconstruct": "sequential"}, "method 'wanda_24' zeroes weights in place"),
        ("magnitude_24", {"reconstruct": "dense"}, "removes no column, so there is nothing to refit"),
        ("flap", {"reconstruct": "dense", "compensate_bias": True}, "reconstruct supersedes compensate_bias"),
        ("wanda_sp", {"reconstruct": "full"}, "reconstruct must be one of dense, sequential"),
        ("wanda_sp", {"reconstruct": "dense", "reconstruct_ridge": -1.0}, "reconstruct_ridge must be"),
        ("wanda_sp", {"reconstruct": "dense", "reconstruct_form": "raw"}, "reconstruct_form must be one of"),
        ("wanda_sp", {"reconstruct_ridge": 0.1}, "need reconstruct='dense' or 'sequential'"),
    ],
)
def test_refusals_name_what_to_change(tiny, method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        minillm.prune(tiny("tiny-llama"), method, 0.3, _calib(), progress=False, **kwargs)


def test_reconstruct_needs_calibration_even_for_data_free_methods(tiny):
    with pytest.raises(ValueError, match="'reconstruct' needs calibration data"):
        minillm.prune(tiny("tiny-llama"), "magnitude", 0.3, reconstruct="dense")
    plan = minillm.prune(tiny("tiny-llama"), "magnitude", 0.3, _calib(), reconstruct="dense", progress=False)
    assert plan.options["reconstruct"]["mode"] == "dense"
    with pytest.raises(ValueError, match="supersedes"):
        minillm.remove_units(tiny("tiny-llama"), [], _calib(), compensate_bias=True, reconstruct="dense")


def test_fewer_calibration_tokens_than_kept_columns_warn(tiny):
    model, calib = tiny("tiny-llama"), _calib(2, 8)  # 16 tokens; 48 MLP channels, about 29 kept
    with pytest.warns(UserWarning, match="16 calibration tokens .* underdetermined"):
        minillm.prune(model, "wanda_sp", 0.4, calib, reconstruct="dense", progress=False)


def test_offloaded_model_refits_like_in_memory(tmp_path, tokens):
    build_random("tiny-llama").save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    ref, _ = minillm.load_model(str(tmp_path / "dense"))
    off, _ = minillm.load_model(str(tmp_path / "dense"), device_map=device_map, offload_folder=str(tmp_path / "o"))
    assert has_offloaded(off)
    a = minillm.prune(ref, "wanda_sp", 0.3, _calib(), reconstruct="sequential", progress=False)
    b = minillm.prune(off, "wanda_sp", 0.3, _calib(), reconstruct="sequential", progress=False)
    assert a.layers == b.layers and not has_offloaded(off)
    with torch.no_grad():
        assert torch.allclose(off(tokens).logits, ref(tokens).logits, atol=1e-5)


def test_streamed_model_refits_like_in_memory(tiny, tokens):
    a, b = tiny("tiny-gemma3"), tiny("tiny-gemma3")
    minillm.prune(a, "wanda_sp", 0.3, _calib(), reconstruct="sequential", progress=False)
    minillm.prune(b, "wanda_sp", 0.3, _calib(), reconstruct="sequential", progress=False, stream_device="cpu")
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_prune_cli_reconstruct_options(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.3", "--out", str(out)]
    args += ["--reconstruct", "sequential", "--reconstruct-ridge", "0.05", "--reconstruct-form", "uncentered"]
    assert main(args + ["--calib-samples", "4", "--calib-seqlen", "8", "--quiet"]) == 0
    model, _ = minillm.load_pruned(out)
    plan = pruning_state(model).plan
    assert plan.options["reconstruct"] == {"mode": "sequential", "ridge": 0.05, "form": "uncentered"}
    assert plan.calibration["n_samples"] == 4
    assert main(["prune", "--model", "tiny-llama", "--method", "wanda_24", "--sparsity", "0.5", "--out",
                 str(tmp_path / "b"), "--reconstruct", "dense"]) == 2
    assert "method 'wanda_24' zeroes weights in place" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, extra, windows, tokens",
    [
        ("flap", [], 16, 256),  # FLAP's 16 x 512 (tiny-llama-gqa reads 256 positions)
        ("flap", ["--reconstruct", "dense"], 32, 256),  # the refit's 32 x 512
        ("wanda_sp", ["--reconstruct", "dense"], 32, 256),
        ("wanda_sp", [], 10, 64),  # LLM-Pruner's 10 x 64: more tokens made Wanda-SP worse
        ("wanda_sp", ["--reconstruct", "dense", "--calib-samples", "4"], 4, 256),  # what is given is kept
    ],
)
def test_prune_cli_calibrates_as_the_method_and_its_refit_need(tmp_path, method, extra, windows, tokens):
    out = tmp_path / "p"
    args = ["prune", "--model", "tiny-llama-gqa", "--method", method, "--sparsity", "0.3", "--out", str(out)]
    assert main(args + extra + ["--quiet"]) == 0
    calibration = pruning_state(minillm.load_pruned(out)[0]).plan.calibration
    assert (calibration["n_samples"], calibration["seqlen"]) == (windows, tokens)
