"""Virtual masks and physical removal must agree exactly, for every family, including emptied layers."""

import pytest
import torch
from conftest import TINY

import minillm
from minillm.adapters import get_adapter
from minillm.allocate import attention_keep, n_attention_units, resolve_attention_unit
from minillm.surgery import GQAConstraintError, VirtualMasks, prune_layer


def _removal_plan(adapter, gen):
    """Per layer: attention units and channels to remove. Layer 0 loses every head, layer 1 every channel."""
    plan = []
    for i, layer in enumerate(adapter.layers()):
        shape = adapter.attention_shape(layer)
        unit = resolve_attention_unit("auto", shape)
        n_att, n_ch = n_attention_units(unit, shape), adapter.n_channels(layer)
        if unit == "query_head" and 1 < shape.n_kv_heads < shape.n_query_heads:
            unit = "kv_group"
            n_att = shape.n_kv_heads
        att = list(range(n_att)) if i == 0 else torch.randperm(n_att, generator=gen)[: max(1, n_att // 2)].tolist()
        ch = list(range(n_ch)) if i == 1 else torch.randperm(n_ch, generator=gen)[: n_ch // 3].tolist()
        plan.append((unit, shape, sorted(att), sorted(ch)))
    return plan


@pytest.mark.parametrize("name", TINY)
def test_masked_equals_physically_pruned(tiny, tokens, name):
    model = tiny(name)
    adapter = get_adapter(model)
    removal = _removal_plan(adapter, torch.Generator().manual_seed(0))
    heads, channels = {}, {}
    for i, (unit, shape, att, ch) in enumerate(removal):
        kept_q, _ = attention_keep(unit, shape, att)
        heads[i] = torch.tensor([1.0 if h in kept_q else 0.0 for h in range(shape.n_query_heads)])
        channels[i] = torch.tensor([0.0 if c in ch else 1.0 for c in range(adapter.n_channels(adapter.layers()[i]))])
    with torch.no_grad():
        dense = model(tokens).logits
        with VirtualMasks(adapter, heads, channels):
            masked = model(tokens).logits
    assert (masked - dense).abs().max() > 1e-4, "the masks changed nothing: the test would not detect a bug"
    for i, (unit, shape, att, ch) in enumerate(removal):
        kept_q, kept_kv = attention_keep(unit, shape, att)
        prune_layer(
            adapter,
            i,
            kept_q,
            kept_kv,
            [c for c in range(adapter.n_channels(adapter.layers()[i])) if c not in set(ch)],
        )
    with torch.no_grad():
        pruned = model(tokens).logits
    assert (pruned - masked).abs().max().item() <= 1e-5
    assert adapter.attention_shape(adapter.layers()[0]).n_query_heads == 0
    assert adapter.n_channels(adapter.layers()[1]) == 0
    # generation with a KV cache still works with an emptied attention block
    out = model.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_bloom_surviving_heads_keep_original_alibi_slopes(tiny, tokens):
    model = tiny("tiny-bloom")
    adapter = get_adapter(model)
    with torch.no_grad():  # random init (std 0.02) makes attention nearly uniform; sharpen it so slopes matter
        for lin in adapter.linears(adapter.layers()[1])[:2]:
            lin.weight.mul_(30)
    keep = [0, 2]  # heads 1 and 3 go; heads 0 and 2 must keep slopes 0 and 2, not fresh slopes for 2 heads
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.no_grad(), VirtualMasks(adapter, {1: mask}):
        masked = model(tokens).logits
    prune_layer(adapter, 1, keep, keep, None)
    attn = adapter.attention(adapter.layers()[1])
    assert attn.minillm_alibi_heads.tolist() == keep
    with torch.no_grad():
        pruned = model(tokens).logits
    assert (pruned - masked).abs().max().item() <= 1e-5
    # with fresh (first-two) slopes the result differs, so the test above would catch a lost mapping
    attn.minillm_alibi_heads = torch.tensor([0, 1])
    with torch.no_grad():
        fresh = model(tokens).logits
    assert (fresh - masked).abs().max().item() > 1e-3
    # a second cut selects among the surviving original heads (current index 1 is original head 2)
    attn.minillm_alibi_heads = torch.tensor(keep)
    prune_layer(adapter, 1, [1], [1], None)
    assert attn.minillm_alibi_heads.tolist() == [2]


def test_repeated_pruning_tracks_original_indices(tiny):
    model = tiny("tiny-llama-gqa")
    adapter = get_adapter(model)
    state = minillm.pruning_state(model)
    state.remove(adapter, 0, minillm.CurrentKeep([3, 4, 5], [1], list(range(10, 40))))
    state.remove(adapter, 0, minillm.CurrentKeep(None, None, [0, 5, 29]))
    keep = state.kept[0]
    assert keep.kept_query_heads == [3, 4, 5] and keep.kept_kv_heads == [1]
    assert keep.kept_channels == [10, 15, 39]


def test_unbalanced_gqa_request_is_refused(tiny):
    model = tiny("tiny-llama-gqa")  # 6 query heads in 2 KV groups of 3
    adapter = get_adapter(model)
    with pytest.raises(GQAConstraintError, match="same number of kept query heads"):
        prune_layer(adapter, 0, [0, 1, 3], [0, 1], None)
    with pytest.raises(GQAConstraintError, match="KV head 1 is removed"):
        prune_layer(adapter, 0, [0, 3], [0], None)


def test_balanced_query_heads_in_gqa(tiny, tokens):
    model = tiny("tiny-llama-gqa")
    adapter = get_adapter(model)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    with torch.no_grad(), VirtualMasks(adapter, {2: mask}):
        masked = model(tokens).logits
    prune_layer(adapter, 2, [0, 2, 4, 5], [0, 1], None)
    assert model.model.layers[2].self_attn.num_key_value_groups == 2
    with torch.no_grad():
        assert (model(tokens).logits - masked).abs().max().item() <= 1e-5
