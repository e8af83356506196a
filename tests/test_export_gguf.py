"""GGUF export (`minillm.export_gguf`, `minillm export --format gguf`): uniform widths as llama.cpp's `llama`
architecture, which transformers' GGUF loader reads back with the logits of `load_pruned`; per-layer widths as
`deci` with per-layer arrays, read back by `gguf`'s reader; tokenizer fields; refusals; atomic writes. The tests that
run llama.cpp itself need llama-cpp-python (`make engines`) and are skipped without it."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from transformers import AutoModelForCausalLM

import minillm
from minillm.__main__ import main
from minillm.export import ExportError
from minillm.gguf_export import export_gguf, plan_widths, read_gguf, rope_interleave, tokenizer_metadata
from minillm.models import SHAPES
from minillm.surgery import CurrentKeep

LLAMA_SHAPES = ("tiny-llama", "tiny-llama-gqa", "tiny-llama-mqa")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(shape: str, tok, seed: int = 0):
    """A tiny random model of a registry shape with the tiny BPE tokenizer's vocabulary (byte-level BPE needs at
    least the 256 byte tokens, more than the registry's 128)."""
    config = SHAPES[shape]()
    config.vocab_size = len(tok)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _tokens(n: int = 12, vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def _saved(tmp_path, shape, tok, alloc, method="random", **kw):
    model = _model(shape, tok)
    calib = torch.randint(0, len(tok), (8, 16), generator=torch.Generator().manual_seed(0))
    plan = minillm.prune(model, method, 0.4, calib, allocation=alloc, seed=3, progress=False, **kw)
    directory = tmp_path / f"{shape}-{alloc}-{method}"
    minillm.save_pruned(model, plan, directory, tokenizer=tok)
    return directory


def _widths_in_file(info):
    return [(h, kv, c) for h, kv, c in zip(info["head_count"], info["head_count_kv"], info["feed_forward_length"])]


@pytest.mark.parametrize("shape", LLAMA_SHAPES)
def test_uniform_widths_load_in_transformers_gguf_loader_with_load_pruned_logits(tmp_path, tok, shape):
    directory = _saved(tmp_path, shape, tok, "uniform")
    pruned, _ = minillm.load_pruned(directory)
    out = tmp_path / "u.gguf"
    record = export_gguf(directory, out, pad_to=1)
    assert record["architecture"] == "llama" and record["float_type"] == "f32"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    assert type(stock).__module__.startswith("transformers.models.llama")
    with torch.no_grad():
        diff = (stock(_tokens()).logits - pruned(_tokens()).logits).abs().max()
    assert diff <= 1e-5
    w = record["layers"][0]
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (w["heads"], w["kv_heads"])
    assert stock.config.intermediate_size == w["channels"] == pruned.model.layers[0].mlp.down_proj.in_features


@pytest.mark.parametrize("float_type,tol", [("f16", 2e-2), ("bf16", 1.5e-1)])
def test_half_types_match_within_their_precision(tmp_path, tok, float_type, tol):
    directory = _saved(tmp_path, "tiny-llama-gqa", tok, "uniform")
    pruned, _ = minillm.load_pruned(directory)
    out = tmp_path / f"{float_type}.gguf"
    export_gguf(directory, out, float_type=float_type, pad_to=1)
    info = read_gguf(out)
    assert info["tensors"]["blk.0.attn_q.weight"][1] == float_type.upper()
    assert info["tensors"]["blk.0.attn_norm.weight"][1] == "F32"  # 1-D tensors stay F32
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = stock(_tokens()).logits, pruned(_tokens()).logits
    assert 0 < (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("shape", LLAMA_SHAPES)
def test_per_layer_widths_are_deci_arrays_of_the_pruned_widths_rounded_to_pad_to(tmp_path, tok, shape):
    directory = _saved(tmp_path, shape, tok, "global")
    pruned, _ = minillm.load_pruned(directory)
    for pad_to in (1, 32):
        out = tmp_path / f"g{pad_to}.gguf"
        record = export_gguf(directory, out, pad_to=pad_to)
        info = read_gguf(out)
        layers = pruned.model.layers
        expect = [
            (
                layer.self_attn.o_proj.in_features // 8,
                layer.self_attn.k_proj.out_features // 8,
                -(-layer.mlp.down_proj.in_features // pad_to) * pad_to,
            )
            for layer in layers
        ]
        assert _widths_in_file(info) == expect
        assert info["architecture"] == ("llama" if len(set(expect)) == 1 else "deci")
        for i, (heads, kv, channels) in enumerate(expect):
            t, hidden = info["tensors"], pruned.config.hidden_size
            assert t[f"blk.{i}.attn_q.weight"][0] == (hidden, heads * 8)  # GGUF order: (in, out)
            assert t[f"blk.{i}.attn_k.weight"][0] == (hidden, kv * 8)
            assert t[f"blk.{i}.ffn_down.weight"][0] == (channels, hidden)
        assert record == info["record"]
        params = record["params"]
        assert params["stored_prunable_weights"] >= params["pruned_prunable"]
        if pad_to == 1:
            assert params["stored_prunable_weights"] == params["pruned_prunable"]  # no bias in these models
            assert len(set(expect)) > 1, "the global plan should give unequal layers"


def test_the_rope_reordering_makes_rotate_half_pairs_adjacent():
    w = torch.randn(3 * 8, 5)
    x = rope_interleave(w, 3)
    assert torch.equal(x.reshape(3, 4, 2, 5).transpose(1, 2).reshape(24, 5), w)  # rotate-half order again
    assert torch.equal(x[:4, 0], torch.stack([w[0, 0], w[4, 0], w[1, 0], w[5, 0]]))  # pairs (i, i + d/2) adjacent
    assert torch.equal(rope_interleave(torch.arange(8.0), 1), torch.tensor([0.0, 4, 1, 5, 2, 6, 3, 7]))


def test_emptied_blocks_use_zero_heads_or_zero_placeholders(tmp_path, tok):
    """tiny-llama-gqa: layer 0 keeps no head, layer 1 no MLP channel, layer 2 nothing; with o_proj biases (as the
    centred refit leaves them) an emptied attention keeps one zero KV group to carry its bias."""
    model = _model("tiny-llama-gqa", tok)
    keeps = [
        CurrentKeep([], [], list(range(64))),
        CurrentKeep(list(range(6)), [0, 1], []),
        CurrentKeep([], [], []),
    ]
    minillm.remove_units(model, keeps, progress=False)
    assert [(w.heads, w.kv_heads, w.channels) for w in plan_widths(model, 32)] == [(0, 0, 64), (6, 2, 32), (0, 0, 0)]
    export_gguf(model, tmp_path / "e.gguf", tokenizer=tok)
    info = read_gguf(tmp_path / "e.gguf")
    assert info["architecture"] == "deci"
    assert "blk.0.attn_q.weight" not in info["tensors"] and "blk.2.ffn_down.weight" not in info["tensors"]
    # 32 zero channels: llama.cpp's deci graph drops the attention of a layer whose n_ff is 0
    assert info["tensors"]["blk.1.ffn_down.weight"][0] == (32, model.config.hidden_size)
    layer0 = model.model.layers[0].self_attn.o_proj
    layer0.bias = torch.nn.Parameter(torch.full((32,), 0.5))
    assert plan_widths(model, 32)[0].heads == 3 and plan_widths(model, 32)[0].kv_heads == 1


def test_tokenizer_fields_follow_the_tokenizer(tok):
    meta = tokenizer_metadata(tok, 400)
    assert meta["model"] == "gpt2" and meta["pre"] == "gpt-2"
    assert meta["tokens"][:3] == [tok.convert_ids_to_tokens(i) for i in range(3)]
    assert meta["tokens"][390] == "[PAD390]" and meta["types"][390] == 5  # unused embedding rows
    special = tok.convert_tokens_to_ids("<|endoftext|>")
    assert meta["types"][special] == 3 and meta["ids"]["eos"] == special
    assert len(meta["merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    with pytest.raises(ExportError, match="ids up to"):
        tokenizer_metadata(tok, 100)


def test_a_tokenizer_whose_pre_tokenizer_is_unknown_needs_it_named(tok):
    from tokenizers import pre_tokenizers

    other = tiny_tokenizer()
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(r"\d{1,3}", "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with pytest.raises(ExportError, match="--tokenizer-pre"):
        tokenizer_metadata(other, 384)
    assert tokenizer_metadata(other, 384, pre="llama-bpe")["pre"] == "llama-bpe"
    digits = tiny_tokenizer()
    digits.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert tokenizer_metadata(digits, 384)["pre"] == "smollm"


def test_refusals_are_one_clear_error_before_writing(tmp_path, tok):
    model = _model("tiny-llama-gqa", tok)
    with pytest.raises(ExportError, match="directory"):
        export_gguf(model, tmp_path, tokenizer=tok)
    with pytest.raises(ExportError, match=".gguf suffix"):
        export_gguf(model, tmp_path / "model.bin", tokenizer=tok)
    with pytest.raises(ExportError, match="tokenizer"):
        export_gguf(model, tmp_path / "a.gguf")
    opt, _ = minillm.load_model("tiny-opt")
    with pytest.raises(ExportError, match="--format hf"):
        export_gguf(opt, tmp_path / "opt.gguf", tokenizer=tok)
    (tmp_path / "x.gguf").write_text("mine")
    with pytest.raises(ExportError, match="overwrite"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=tok)
    assert (tmp_path / "x.gguf").read_text() == "mine"
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(ExportError, match="overflows f16"):
        export_gguf(model, tmp_path / "h.gguf", tokenizer=tok, float_type="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no partial file, no temporary left


def test_a_dead_writers_temporary_is_removed_and_a_failed_write_leaves_nothing(tmp_path, tok, monkeypatch):
    model = _model("tiny-llama-gqa", tok)
    dead = tmp_path / ".m.gguf.999999999.minillm-tmp"
    dead.write_bytes(b"partial")
    import minillm.gguf_export as eg

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(eg, "_write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert oct(os.stat(tmp_path / "m.gguf").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_exports_gguf_and_rejects_gguf_options_for_hf(tmp_path, tok, capsys):
    directory = _saved(tmp_path, "tiny-llama-mqa", tok, "global")
    assert main(["export", str(directory), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "deci" and summary["float_type"] == "f32"
    assert read_gguf(tmp_path / "m.gguf")["record"]["pad_to"] == 32
    assert main(["export", str(directory), "--out", str(tmp_path / "hf"), "--float-type", "f16"]) == 2
    assert "GGUF options" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# --- llama.cpp itself (llama-cpp-python, built by `make engines`) ------------------------------------------------


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make engines builds it)")


def llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    """Logits of every position from llama.cpp (CPU, one thread, an F32 KV cache: its default F16 cache alone moves
    SmolLM2's log-probs by up to 4e-3)."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(
        str(path), n_ctx=max(64, len(tokens)), logits_all=True, n_threads=1, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


@pytest.mark.parametrize("shape", LLAMA_SHAPES)
@pytest.mark.parametrize("alloc", ["uniform", "global"])
def test_llama_cpp_runs_the_export_with_the_pruned_logits(tmp_path, tok, shape, alloc):
    _llama_cpp()
    directory = _saved(tmp_path, shape, tok, alloc)
    pruned, _ = minillm.load_pruned(directory)
    out = tmp_path / "m.gguf"
    export_gguf(directory, out)
    tokens = _tokens(16)[0].tolist()
    with torch.no_grad():
        expect = pruned(torch.tensor([tokens])).logits[0].double().numpy()
    got = llama_cpp_logits(out, tokens)
    assert np.abs(got - expect).max() <= 1e-3 * max(1.0, np.abs(expect).max())


def test_llama_cpp_runs_emptied_blocks_and_refit_biases(tmp_path, tok):
    """The placeholders of the deci architecture (module docstring) with biases everywhere (wanda_sp + centred
    refit) and every kind of emptied block."""
    _llama_cpp()
    model = _model("tiny-llama-gqa", tok)
    calib = torch.randint(0, len(tok), (8, 16), generator=torch.Generator().manual_seed(0))
    minillm.prune(model, "wanda_sp", 0.3, calib, reconstruct="dense", progress=False)
    layers = model.model.layers
    heads = [(range(l.self_attn.o_proj.in_features // 8), range(l.self_attn.k_proj.out_features // 8)) for l in layers]
    keeps = [
        CurrentKeep([], [], list(range(layers[0].mlp.down_proj.in_features))),
        CurrentKeep(list(heads[1][0]), list(heads[1][1]), []),
        CurrentKeep([], [], []),
    ]
    minillm.remove_units(model, keeps, progress=False)
    out = tmp_path / "e.gguf"
    export_gguf(model, out, tokenizer=tok)
    tokens = _tokens(16)[0].tolist()
    with torch.no_grad():
        expect = model(torch.tensor([tokens])).logits[0].double().numpy()
    got = llama_cpp_logits(out, tokens)
    assert np.abs(got - expect).max() <= 1e-3 * max(1.0, np.abs(expect).max())


@pytest.mark.slow
def test_llama_cpp_next_token_log_probs_of_smollm2_dense_and_pruned(tmp_path, smollm2):
    """SmolLM2-135M dense and pruned (FLAP 30% + refit, global widths: deci) in llama.cpp: next-token log-probs on
    three windows of a bundled novel agree with minillm's (F32 weights and KV cache)."""
    _llama_cpp()
    from minillm.data import calibration_windows

    model, tok = smollm2
    windows = calibration_windows(tok, 3, 64, seed=5)
    calib = calibration_windows(tok, 4, 128, seed=0)
    pruned, _ = minillm.load_model("smollm2-135m")
    minillm.prune(pruned, "flap", 0.3, calib, reconstruct="dense", progress=False)
    for name, m in (("dense", model), ("pruned", pruned)):
        out = tmp_path / f"{name}.gguf"
        record = export_gguf(m, out, tokenizer=tok)
        assert record["architecture"] == ("llama" if name == "dense" else "deci")
        for w in windows:
            tokens = w.tolist()
            with torch.no_grad():
                expect = torch.log_softmax(m(w[None]).logits[0].double(), -1).numpy()
            got = llama_cpp_logits(out, tokens)
            got = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
            target = np.array(tokens[1:])
            picked = np.take_along_axis(got[:-1], target[:, None], 1) - np.take_along_axis(expect[:-1], target[:, None], 1)
            assert np.abs(picked).max() <= 2e-4, name  # measured: at most 5e-5


def test_llama_cpp_latency_bench_rows_speedups_and_ceilings(tiny_text_model_dir):
    _llama_cpp()
    from minillm.bench.llamacpp import bench_latency_llamacpp

    r = bench_latency_llamacpp(
        tiny_text_model_dir, [0.5], [(1, 16)], prompt=8, new_tokens=4, repeats=2, bench_repeats=1, warmup=1,
        threads=1,
    )
    assert set(r["types"]) == {"f32", "q8_0"}
    for kind, rows in r["types"].items():
        assert [x["variant"] for x in rows] == ["dense", "structured", "deci", "padded"]
        assert [x["architecture"] for x in rows[:2]] == ["llama", "llama"] and rows[3]["architecture"] == "llama"
        assert rows[3]["padding_overhead"] >= 0 and rows[2]["padding_overhead"] >= 0
        for x in rows[1:]:
            assert x["decode_ceiling"][0] > 1 and x["prefill_speedup"][0] > 0 and len(x["decode_speedup_ci95"][0]) == 2
        assert rows[0]["bytes"] > rows[1]["bytes"]
    assert r["types"]["q8_0"][0]["bytes"] < r["types"]["f32"][0]["bytes"] / 2  # quantised by llama.cpp
    with pytest.raises(ValueError, match="batch 1"):
        bench_latency_llamacpp(tiny_text_model_dir, [0.5], [(2, 16)], prompt=8, new_tokens=4)


def test_committed_llama_cpp_tables_match_their_record(tmp_path):
    """figures/engines is rendered from results/engines by scripts/render_engines.py; a stale table fails here."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("render_engines", root / "scripts" / "render_engines.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    render.render(render.RECORDS, tmp_path, figure=False)
    for suffix in (".md", ".csv"):
        name = "llamacpp_latency" + suffix
        assert (tmp_path / name).read_text() == (render.OUT / name).read_text()
