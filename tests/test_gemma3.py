"""Gemma 3: the adapter on a tiny random Gemma 3 (MQA, QK-norm, sliding and full layers), BOS in perplexity and
zero-shot, and (slow) the real Gemma 3 270M from the pinned wheels."""

import copy

import pytest
import torch

import minillm
from minillm import data
from minillm.adapters import get_adapter
from minillm.adapters.gemma3 import Gemma3Adapter
from minillm.allocate import attention_keep, resolve_attention_unit
from minillm.evaluate import perplexity, zeroshot
from minillm.prune import make_plan
from minillm.state import pruning_state
from minillm.surgery import CurrentKeep, VirtualMasks, prune_layer

NAME = "tiny-gemma3"


def _calib(n=4, t=16, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _sharpen(model):
    """Random init (std 0.02) leaves attention nearly uniform and QK-norm'd scores tiny; scale q/k so that which
    heads survive, and the sliding window, visibly change the logits."""
    with torch.no_grad():
        for layer in get_adapter(model).layers():
            layer.self_attn.q_norm.weight.fill_(3.0)
            layer.self_attn.k_norm.weight.fill_(3.0)
    return model


def test_tiny_gemma3_layout(tiny):
    model = tiny(NAME)
    adapter = get_adapter(model)
    assert isinstance(adapter, Gemma3Adapter) and type(model).__name__ == "Gemma3ForCausalLM"
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    att = adapter.original_attention
    assert (att.n_query_heads, att.n_kv_heads, att.head_dim) == (4, 1, 16)
    # head_dim is explicit (16), not hidden_size / heads (8): shapes must come from it
    assert adapter.attention_shape(adapter.layers()[0]) == att
    assert resolve_attention_unit("auto", att) == "query_head"
    assert adapter.n_channels(adapter.layers()[0]) == 48
    q_cost, kv_cost = adapter.head_costs(adapter.layers()[0])
    assert (q_cost, kv_cost) == (2 * 32 * 16, 2 * 32 * 16)
    d = adapter.describe()
    assert d["family"] == "gemma3" and d["sliding_layers"] == [0, 1, 3] and d["sliding_window"] == 4


def test_sliding_window_matters_in_the_tiny_model(tiny):
    """The window (4) is shorter than the test sequences, so sliding layers differ from full attention: the
    masked-vs-pruned test below would notice a pruned model that lost its window."""
    model = _sharpen(tiny(NAME))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens).logits
        for layer in get_adapter(model).layers():
            layer.self_attn.sliding_window = None
        model.config.layer_types = ["full_attention"] * len(model.config.layer_types)
        full = model(tokens).logits
    assert (full - ref).abs().max() > 1e-3


def test_masked_equals_physically_pruned_with_emptied_layers(tiny):
    """Layer 0 (sliding) loses every query head, layer 1 (sliding) every channel, layer 2 (full) and 3 (sliding)
    some of both. Max |logit diff| <= 1e-5; QK-norm and the window untouched; generation with a cache works."""
    model = _sharpen(tiny(NAME))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    adapter = get_adapter(model)
    norms = {
        i: (layer.self_attn.q_norm.weight.clone(), layer.self_attn.k_norm.weight.clone())
        for i, layer in enumerate(adapter.layers())
    }
    removed_heads = {0: [0, 1, 2, 3], 1: [2], 2: [0, 3], 3: [1]}
    removed_channels = {0: [5, 7], 1: list(range(48)), 2: list(range(0, 48, 3)), 3: [0, 47]}
    heads = {i: torch.tensor([0.0 if h in r else 1.0 for h in range(4)]) for i, r in removed_heads.items()}
    channels = {i: torch.tensor([0.0 if c in r else 1.0 for c in range(48)]) for i, r in removed_channels.items()}
    with torch.no_grad():
        dense = model(tokens).logits
        with VirtualMasks(adapter, heads, channels):
            masked = model(tokens).logits
    assert (masked - dense).abs().max() > 1e-4, "the masks changed nothing: the test would not detect a bug"
    for i, layer in enumerate(adapter.layers()):
        shape = adapter.attention_shape(layer)
        kept_q, kept_kv = attention_keep("query_head", shape, removed_heads[i])
        assert kept_kv == ([0] if kept_q else [])  # the single KV head stays while any query head does
        prune_layer(adapter, i, kept_q, kept_kv, [c for c in range(48) if c not in removed_channels[i]])
    with torch.no_grad():
        pruned = model(tokens).logits
    assert (pruned - masked).abs().max().item() <= 1e-5
    layers = adapter.layers()
    assert adapter.attention_shape(layers[0]).n_query_heads == 0 and adapter.n_channels(layers[1]) == 0
    for i in (1, 2, 3):
        attn = layers[i].self_attn
        n_q = 4 - len(removed_heads[i])
        assert attn.q_proj.out_features == n_q * 16 and attn.k_proj.out_features == 16
        assert attn.num_key_value_groups == n_q
        assert torch.equal(attn.q_norm.weight, norms[i][0]) and torch.equal(attn.k_norm.weight, norms[i][1])
        assert attn.sliding_window == (None if model.config.layer_types[i] == "full_attention" else 4)
    out = model.generate(tokens[:1, :5], max_new_tokens=8, do_sample=False)  # past the window of 4
    assert out.shape == (1, 13)


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_save_reload_identical_logits_and_stock_class(tiny, tmp_path, sparsity):
    model = _sharpen(tiny(NAME))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    plan = minillm.prune(model, "random", sparsity, allocation="global", seed=3)
    widths = plan.widths()
    assert len({w["query_heads"] for w in widths}) > 1 or len({w["channels"] for w in widths}) > 1
    with torch.no_grad():
        before = model(tokens).logits
    minillm.save_pruned(model, plan, tmp_path / "p")
    reloaded, _ = minillm.load_pruned(tmp_path / "p")
    assert type(reloaded) is type(model) and type(reloaded).__module__.startswith("transformers.models.gemma3")
    assert reloaded.config.layer_types == model.config.layer_types
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, before)
    assert reloaded.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False).shape == (1, 10)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_heterogeneous_head_counts_reload(tiny, tmp_path):
    """4, 3, 1 and 0 query heads in one model: the config stays the original one and load_pruned rebuilds each."""
    model = _sharpen(tiny(NAME))
    adapter = get_adapter(model)
    for i, kept in enumerate([[0, 1, 2, 3], [0, 2, 3], [1], []]):
        pruning_state(model).remove(adapter, i, CurrentKeep(kept, [0] if kept else [], None))
    plan = make_plan(model, "manual", 0.0, {}, None, None)
    assert [w["query_heads"] for w in plan.widths()] == [4, 3, 1, 0]
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    minillm.save_pruned(model, plan, tmp_path / "p")
    again, _ = minillm.load_pruned(tmp_path / "p")
    assert [again.model.layers[i].self_attn.num_key_value_groups for i in range(3)] == [4, 3, 1]
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, before)


METHOD_OPTIONS = {
    "fms": {"queries": 3},
    "bonsai": {"masks_per_round": 8, "prune_frac": 0.1},
}


@pytest.mark.parametrize("method", minillm.scores.available_methods())
def test_every_method_runs_and_reloads(tiny, tmp_path, method):
    model = _sharpen(tiny(NAME))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    sparsity = 0.5 if method.endswith("_24") else 0.3
    plan = minillm.prune(model, method, sparsity, _calib(), progress=False, **METHOD_OPTIONS.get(method, {}))
    if method.endswith("_24"):
        assert plan.history[0]["weight_sparsity"] == pytest.approx(0.5)
    else:
        assert 0.15 < plan.achieved_sparsity <= 0.4
        for keep in plan.layers:
            assert keep.kept_kv_heads == ([0] if keep.kept_query_heads else [])
    minillm.save_pruned(model, plan, tmp_path / "p")
    again, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("method", minillm.scores.available_methods())
def test_every_method_runs_on_emptied_layers(tiny, tmp_path, method):
    """Scoring must cope with a layer that has no query head left (layer 0, sliding) and one with no MLP channel
    left (layer 2, full attention), as after an earlier pruning round; both stay empty and the rest is pruned."""
    model = _sharpen(tiny(NAME))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    adapter = get_adapter(model)
    state = pruning_state(model).track(adapter)
    original = state.original_params
    state.remove(adapter, 0, CurrentKeep([], [], None))
    state.remove(adapter, 2, CurrentKeep(None, None, []))
    sparsity = 0.5 if method.endswith("_24") else 0.45
    plan = minillm.prune(model, method, sparsity, _calib(), progress=False, **METHOD_OPTIONS.get(method, {}))
    assert plan.prunable_params_original == original
    assert plan.widths()[0]["query_heads"] == 0 and plan.widths()[2]["channels"] == 0
    if not method.endswith("_24"):
        assert plan.achieved_sparsity > 0.3
    minillm.save_pruned(model, plan, tmp_path / "p")
    again, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("method,opts", [("bonsai", {"masks_per_round": 8, "prune_frac": 0.2}), ("random", {})])
def test_methods_can_empty_whole_modules(tiny, tmp_path, method, opts):
    """At high sparsity whole attention blocks go (Bonsai by itself, random with global allocation); the model still
    runs, reloads and generates. Emptied MLPs: test_masked_equals_physically_pruned_with_emptied_layers and
    test_every_method_runs_on_emptied_layers."""
    model = _sharpen(tiny(NAME))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    extra = {} if method == "bonsai" else {"allocation": "global"}
    emptied = False
    for seed in range(6):
        model = _sharpen(tiny(NAME))
        plan = minillm.prune(model, method, 0.75, _calib(), seed=seed, progress=False, **opts, **extra)
        w = plan.widths()
        emptied = any(x["query_heads"] == 0 for x in w)
        if emptied:
            break
    assert emptied, plan.widths()
    minillm.save_pruned(model, plan, tmp_path / "p")
    again, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    assert again.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False).shape == (1, 10)


def test_lora_recovery_with_kl_on_a_pruned_gemma3(tiny, tmp_path):
    """LoRA (+ KL to the dense parent) on a Gemma 3 with an emptied attention block: trains, merges, reloads."""
    from minillm.recover import lora_targets, recover

    parent = _sharpen(tiny(NAME))
    model = _sharpen(tiny(NAME))
    prune_layer(get_adapter(model), 0, [], [], None)
    plan = minillm.prune(model, "random", 0.4, seed=1)
    assert "model.layers.0.self_attn.o_proj" not in lora_targets(model)
    windows = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))
    merged, record = recover(
        model, windows, rank=2, steps=4, batch_size=4, teacher=parent, kl_weight=0.5, progress=False
    )
    assert record["method"] == "lora+kl" and type(merged).__name__ == "Gemma3ForCausalLM"
    plan.recovery.append(record)
    minillm.save_pruned(merged, plan, tmp_path / "r")
    again, _ = minillm.load_pruned(tmp_path / "r")
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, merged(tokens).logits)


# --- BOS -------------------------------------------------------------------------------------------------------


def _char_tokenizer(add_bos: bool):
    """A real (fast) HF tokenizer, one token per character, ids < 128; Gemma-like (adds <bos>) or SmolLM2-like."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path=f"char-bos{int(add_bos)}",
    )


def test_perplexity_windows_start_with_bos_only_when_the_tokenizer_adds_it():
    gemma_like, smollm_like = _char_tokenizer(True), _char_tokenizer(False)
    assert data.tokenizer_adds_bos(gemma_like) and not data.tokenizer_adds_bos(smollm_like)
    text = data.read_novel("prideprejudice")
    w = data.perplexity_windows(gemma_like, 64, 3)
    assert w.shape == (3, 64) and (w[:, 0] == 2).all() and not (w[:, 1:] == 2).any()
    chars = lambda t, ids: "".join(t.convert_ids_to_tokens(ids))  # noqa: E731
    assert chars(gemma_like, w[:, 1:].reshape(-1).tolist()) == text[: 3 * 63]  # consecutive, none skipped
    u = data.perplexity_windows(smollm_like, 64, 3)  # unchanged: 64 text tokens per window, no BOS
    assert u.shape == (3, 64) and not (u == 2).any()
    assert chars(smollm_like, u.reshape(-1).tolist()) == text[: 3 * 64]
    forced = data.perplexity_windows(smollm_like, 64, 3, add_bos=True)
    assert (forced[:, 0] == 2).all()
    # calibration from one novel: the BOS rule is the same for any text, and a character tokenizer takes ~8 s for
    # the five calibration novels together
    one = ("northangerabbey",)
    c = data.calibration_windows(gemma_like, 4, 32, seed=0, novels=one)
    assert (c[:, 0] == 2).all() and not (data.calibration_windows(smollm_like, 4, 32, seed=0, novels=one) == 2).any()


def test_perplexity_never_scores_bos(tiny):
    """BOS is only context: a window of seqlen tokens predicts seqlen - 1 text tokens."""
    model = tiny(NAME)
    w = data.perplexity_windows(_char_tokenizer(True), 32, 2)
    res = perplexity(model, w, progress=False)
    assert res["tokens"] == 2 * 31 and res["seqlen"] == 32


def _zeroshot_first_tokens(model, tok, limit: int, batch_size: int):
    """A zero-shot run on one bundled task, and the first token of every row that reached the embedding."""
    firsts = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: firsts.extend(args[0][:, 0].tolist()))
    try:
        res = zeroshot(model, tok, tasks=["bb_cloze_strategyqa"], limit=limit, batch_size=batch_size)
    finally:
        hook.remove()
    return res, firsts


@pytest.mark.parametrize("add_bos", [True, False])
def test_zeroshot_requests_start_with_bos_for_gemma_only(tiny, add_bos):
    model = tiny(NAME)
    model.config.max_position_embeddings = 4096  # char-level prompts are long; no left truncation of the BOS
    tok = _char_tokenizer(add_bos)
    res, firsts = _zeroshot_first_tokens(model, tok, limit=3, batch_size=4)
    assert res["bb_cloze_strategyqa"]["n"] == 3 and firsts
    if add_bos:
        assert set(firsts) == {2}
    else:  # lm-eval's default, unchanged: the prompt's own first character ("Q" of "Question:")
        assert 2 not in firsts and set(firsts) == {tok.convert_tokens_to_ids("Q")}


# --- the real model (slow) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip(minillm.models.GEMMA3_PACKAGE, reason=f"pip install {minillm.models.GEMMA3_PIN}")
    return minillm.load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_270m_loads_as_stock_gemma3(gemma3):
    model, tok = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (18, 4, 1, 256)
    assert (c.hidden_size, c.intermediate_size, c.sliding_window) == (640, 2048, 512)
    assert c.layer_types.count("full_attention") == 3 and c.layer_types[5] == "full_attention"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert data.tokenizer_adds_bos(tok) and tok.bos_token_id == 2
    assert (minillm.models.cache_dir() / "gemma3-270m" / "GEMMA_TERMS.html").exists()


@pytest.mark.slow
def test_gemma3_270m_dense_perplexity_with_bos(gemma3):
    """The survey that picked this model measured 24.22 with BOS, 51.52 without (20 windows of 1024). Here 2
    windows of 256 from the start of Pride and Prejudice, each BOS + 255 text tokens (about 19.8; 2 windows of 512
    gave 19.6 and the first 4 gave 22.1, each window 16 to 26); without BOS the same text scores far worse (about
    99; 71 on the windows of 512). Windows of 256 halve the cost: Gemma's 262k-token head dominates it."""
    model, tok = gemma3
    windows = data.perplexity_windows(tok, 256, 2)
    assert (windows[:, 0] == tok.bos_token_id).all()
    with_bos = perplexity(model, windows, progress=False)["ppl"]
    assert 12 < with_bos < 40, with_bos
    without = perplexity(model, windows[:, 1:], progress=False)["ppl"]
    assert without > 1.3 * with_bos, (with_bos, without)


@pytest.mark.slow
def test_gemma3_270m_prunes_and_reloads(gemma3, tmp_path):
    model0, tok = gemma3
    model = copy.deepcopy(model0)  # a fresh copy without loading Gemma's tokenizer again (~8 s)
    calib = data.calibration_windows(tok, 2, 32, seed=0, novels=("northangerabbey",))  # one novel: ~1 s, not ~7 s
    plan = minillm.prune(model, "wanda_sp", 0.2, calib, progress=False)
    assert plan.achieved_sparsity == pytest.approx(0.2, abs=0.02)
    minillm.save_pruned(model, plan, tmp_path / "p", tokenizer=tok)
    again, tok2 = minillm.load_pruned(tmp_path / "p")
    assert type(again).__name__ == "Gemma3ForCausalLM" and data.tokenizer_adds_bos(tok2)
    ids = torch.tensor([tok("It is a truth universally acknowledged")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_gemma3_270m_zeroshot_requests_start_with_bos(gemma3, smollm2):
    """Real tokenizers: Gemma's requests reach the model with <bos> first; SmolLM2's tokenizer adds none and its
    requests start with the prompt's own first token, as before."""
    model, tok = gemma3
    res, firsts = _zeroshot_first_tokens(model, tok, limit=5, batch_size=8)
    assert set(firsts) == {tok.bos_token_id} and 0.0 <= res["bb_cloze_strategyqa"]["value"] <= 1.0
    assert not data.tokenizer_adds_bos(smollm2[1])
    assert smollm2[1].bos_token_id not in data.perplexity_windows(smollm2[1], 64, 2)[:, 0].tolist()
