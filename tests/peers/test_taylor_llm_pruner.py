"""`taylor` against LLM-Pruner's own Taylor importance and per-layer selection.

Peer: horseee/LLM-Pruner@128a07d977f9b205d60ab14cfbc6a78f8a8e39d2
* `hf_prune.py` `main` (block-wise branch): the gradients. `param_first` / `vectorize`: one backward pass of the HF
  mean next-token loss over the whole example batch. `param_second`: first one backward pass per example, each
  parameter accumulating `acc_grad += grad * grad / num_examples`, then the batch pass.
* `LLMPruner/pruner/hf_llama_pruner.py` `TaylorImportance.__call__` with `group_reduction='sum'`: salience
  `W * grad` (`param_first`, `vectorize`) or `W * acc_grad * W` (`param_second`); per out-channel (row) of q/k/v/gate/up
  and per in-channel (column) of o_proj/down either `salience.abs().sum(...)` (`param_*`) or `salience.sum(...).abs()`
  (`vectorize`); the group's vectors are aligned to the shortest one (`imp.view(len // min, min).sum(0)`) and summed.
* `LLMPruner/torch_pruning/pruner/algorithms/metapruner.py` `MetaPruner.prune_local` (global_pruning off): a head
  is `consecutive_groups = head_dim` channels (`imp.view(-1, head_dim).sum(1)`); per root module
  `n_pruned = current - int(init * (1 - ratio))` channels, i.e. `n_pruned // head_dim` heads, and the lowest
  `argsort(imp)` entries go. Roots: `q_proj` (hf_prune.py, MHA) or `k_proj` (llama3.py, GQA) and `gate_proj`.

The transcription below is plain torch on stock HF LLaMA modules. It was checked once by running the peer's own
`TaylorImportance` + `MetaPruner` dependency graph (its vendored torch_pruning, eager attention) on these tiny
models: MHA unit scores agreed with ours to print precision for all three variants, and the GQA fold below was
observed there.

Differences between peer and ours, with reasons:
1. GQA attribution. With root `k_proj` the peer's group holds k/v rows (n_kv * head_dim long) and q rows / o_proj
   columns (n_q * head_dim long); its alignment `view(n_q // n_kv, n_kv * head_dim).sum(0)` folds query head h onto
   KV head `h % n_kv`, while HF's `repeat_kv` (and the peer's own pruning index mapping, which removes query heads
   `k*g .. k*g+g-1` with KV head k) pairs query head h with KV head `h // g`. Ours scores a KV group as its k/v rows
   plus its *own* query heads (`h // g`), i.e. the units that are removed together. The k/v part, the MLP scores and
   each layer's total agree exactly; `test_gqa_peer_fold_differs_only_in_query_attribution` pins this down.
2. Unit counts. The peer removes `n - int(n * (1 - ratio))` units of each kind; ours (`allocation='uniform'`) removes
   `round(ratio * n_units)` attention units and fills the rest of the layer's *parameter* budget with MLP channels.
   The test ratios are chosen where both give the same counts, so kept sets must be identical.
3. Layers. LLM-Pruner's scripts leave the first and last layers unpruned (`block_*_layer_start/end`); ours uses
   `skip_layers` for that. The tests prune every layer in both.
4. Precision. The peer runs in the model dtype (fp16 on GPU) and sums the group in that dtype; ours forms saliences
   in fp32 and pools units in fp64. Hence scores agree to rtol 1e-5 plus atol 1e-5 x the layer's largest score
   (fp32 summation order; `vectorize` cancels before its absolute value), not bit for bit.
5. Calibration. The peer draws 10 BookCorpus examples of 64 tokens (seed 42); here both get the same random batch.
   Ours may split it into batches (token-weighted, so the gradient is the whole batch's mean-loss gradient).
"""

import pytest
import torch

import minillm
from minillm.adapters import get_adapter
from minillm.scores import taylor
from minillm.scores.common import ScoringContext

VARIANTS = {"element1": "param_first", "element2": "param_second", "vector": "vectorize"}
RTOL = 1e-5


def _close(ours, peer):
    """rtol 1e-5 plus an atol of 1e-5 of the layer's largest score: 'vectorize' sums signed terms before the
    absolute value, so near-zero scores carry fp32 cancellation error far above their own relative 1e-5."""
    torch.testing.assert_close(ours, peer, rtol=RTOL, atol=RTOL * float(peer.abs().max()))


def _calib(n=10, t=16, seed=42):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


# --- transcription of the peer ---------------------------------------------------------------------------------


def peer_gradients(model, examples, taylor_mode):
    """hf_prune.py: `grad` of the batch loss; for param_second also `acc_grad` = sum_j grad_j**2 / N."""
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    acc = {}
    try:
        if taylor_mode == "param_second":
            n = examples.shape[0]
            for j in range(n):
                x = examples[j].unsqueeze(0)
                model(x, labels=x).loss.backward()
                for name, p in model.named_parameters():
                    sq = p.grad * p.grad / n
                    acc[name] = acc[name] + sq if name in acc else sq.clone()
                    p.grad = None
        model(examples, labels=examples).loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(saved[id(p)])
    return grads, acc


def _salience(model, lin, grads, acc, taylor_mode):
    name = next(n for n, p in model.named_parameters() if p is lin.weight)
    w = lin.weight.detach()
    if taylor_mode == "param_second":
        return w * acc[name] * w
    return w * grads[name]


def _local_norm(sal, out_channels, taylor_mode):
    dim = 1 if out_channels else 0  # out-channel = row of weight, in-channel = column
    return sal.sum(dim).abs() if taylor_mode == "vectorize" else sal.abs().sum(dim)


def _align_and_sum(group_imp, attribution="peer", n_kv=None, head_dim=None):
    """TaylorImportance: align every vector to the shortest one, stack, reduce with 'sum'.
    attribution='peer' is the peer's fold; 'own_group' folds query channels onto KV head h // g instead."""
    m = min(len(v) for v in group_imp)
    out = []
    for v in group_imp:
        if len(v) > m and len(v) % m == 0:
            if attribution == "peer":
                v = v.view(len(v) // m, m).sum(0)
            else:
                v = v.view(n_kv, len(v) // m, head_dim).sum(1).reshape(-1)
        out.append(v)
    return torch.stack(out, 0).sum(0)


def peer_unit_scores(model, grads, acc, taylor_mode, attribution="peer"):
    """Per layer: (attention unit scores, MLP channel scores) as TaylorImportance + prune_local compute them."""
    res = []
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        hd = att.head_dim
        n_kv = att.k_proj.out_features // hd

        def s(lin, out_ch):
            return _local_norm(_salience(model, lin, grads, acc, taylor_mode), out_ch, taylor_mode)

        # root q_proj (MHA) / k_proj (GQA): the Linear members of the group in graph order
        head_imp = [s(att.k_proj, True), s(att.v_proj, True), s(att.q_proj, True), s(att.o_proj, False)]
        head_imp = _align_and_sum(head_imp, attribution, n_kv, hd).view(-1, hd).sum(1)  # consecutive_groups
        ch_imp = _align_and_sum([s(mlp.gate_proj, True), s(mlp.up_proj, True), s(mlp.down_proj, False)])
        res.append((head_imp.double(), ch_imp.double()))
    return res


def peer_kept(scores, ratio):
    """MetaPruner.prune_local, per-layer: kept KV heads (= heads for MHA) and kept channels."""
    kept = []
    for head_imp, ch_imp in scores:
        n_heads, n_ch = len(head_imp), len(ch_imp)
        n_heads_pruned = n_heads - int(n_heads * (1 - ratio))  # channels // head_dim, same count
        n_ch_pruned = n_ch - int(n_ch * (1 - ratio))
        gone_h = set(torch.argsort(head_imp)[:n_heads_pruned].tolist())
        gone_c = set(torch.argsort(ch_imp)[:n_ch_pruned].tolist())
        kept.append(([h for h in range(n_heads) if h not in gone_h], [c for c in range(n_ch) if c not in gone_c]))
    return kept


# --- tests -----------------------------------------------------------------------------------------------------


def _ours(model, calib, variant, batch_size=16):
    ctx = ScoringContext(model, get_adapter(model), calib, "auto", 0, progress=False, batch_size=batch_size)
    return taylor.score(ctx, variant=variant)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unit_scores_match_llm_pruner(tiny, name, variant):
    model = tiny(name)
    calib = _calib()
    grads, acc = peer_gradients(model, calib, VARIANTS[variant])
    peer = peer_unit_scores(model, grads, acc, VARIANTS[variant], attribution="own_group")
    # two batches of ours (5 + 5 rows) must still give the whole batch's gradient
    ours = _ours(model, calib, variant, batch_size=5)
    for (p_att, p_ch), o in zip(peer, ours):
        _close(o.channels, p_ch)
        _close(o.attention, p_att)
        assert o.attention.min() > 0 and o.channels.max() > 0  # a zero gradient would make the test vacuous


def test_mha_scores_are_the_peer_fold_exactly(tiny):
    """For MHA the peer's own fold is the identity, so ours equals the peer without any reinterpretation."""
    model = tiny("tiny-llama")
    calib = _calib()
    grads, acc = peer_gradients(model, calib, "param_first")
    peer = peer_unit_scores(model, grads, acc, "param_first", attribution="peer")
    for (p_att, p_ch), o in zip(peer, _ours(model, calib, "element1")):
        _close(o.attention, p_att)
        _close(o.channels, p_ch)


def test_gqa_peer_fold_differs_only_in_query_attribution(tiny):
    model = tiny("tiny-llama-gqa")
    calib = _calib()
    grads, acc = peer_gradients(model, calib, "param_first")
    peer = peer_unit_scores(model, grads, acc, "param_first", attribution="peer")
    own = peer_unit_scores(model, grads, acc, "param_first", attribution="own_group")
    ours = _ours(model, calib, "element1")
    moved = 0.0
    for (p_att, p_ch), (g_att, _), o in zip(peer, own, ours):
        _close(o.channels, p_ch)
        _close(o.attention.sum(), p_att.sum())  # same total per layer
        _close(o.attention, g_att)
        moved += float((o.attention - p_att).abs().max())
    assert moved > 1e-3  # the peer's fold really attributes query heads differently (6 query / 2 KV heads)


@pytest.mark.parametrize(
    "name,ratio",
    [("tiny-llama", 0.25), ("tiny-llama", 0.5), ("tiny-llama-gqa", 0.5)],
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kept_sets_match_llm_pruner_per_layer_selection(tiny, name, ratio, variant):
    model = tiny(name)
    calib = _calib()
    grads, acc = peer_gradients(model, calib, VARIANTS[variant])
    peer = peer_kept(peer_unit_scores(model, grads, acc, VARIANTS[variant], attribution="own_group"), ratio)
    plan = minillm.prune(model, "taylor", ratio, calib, allocation="uniform", variant=variant, progress=False)
    removed_any = False
    for (p_kv, p_ch), lk in zip(peer, plan.layers):
        assert lk.kept_kv_heads == p_kv
        assert lk.kept_channels == p_ch
        removed_any |= len(p_kv) < model.config.num_key_value_heads
    assert removed_any
