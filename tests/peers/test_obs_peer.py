"""`obs` (structured OBS, `minillm.scores.obs.greedy_removal`) and its refit against Týr-the-Pruner's local pruning.

Peer: AMD-AGI/Tyr-the-Pruner@f4466ea6e637770145b948afdd7d3785fa2da986 (the last commit touching the file; unchanged
at HEAD c69d040)
* `src/local_pruner.py` `LocalPruner.update`: H = sum over tokens of x x^T (raw, uncentred; not divided by the
  token count) of the o_proj / down_proj input;
* `LocalPruner.prune`: B = W^T [d_in, d_out] with the rows of dead inputs (diag H == 0) zeroed,
  H += 1e-2 * mean(diag H) * I, G = H @ B (the damped H times the *original* weights);
* `LocalPruner.local_prune_core(W, H, G, num_total_groups, num_groups_to_remain, update_iter)`: groups of
  d_in / num_total_groups consecutive input columns (o_proj: `num_attention_heads` query heads; down_proj: single
  columns); groups whose weights are all zero count as pruned already; the groups still to remove are split over
  `min(update_iter, remaining)` rounds (`divmod`, the first `extra` rounds one larger); per round every live group g
  gets the score
      s_g = 1/2 tr(W_g^T ([H^-1]_gg)^-1 W_g) + tr(W_g^T G_g)      (group size 1: ([H^-1]_jj)^-1 w_j^2 / 2 + ...)
  the k lowest go, W -= [H^-1]_:,P ([H^-1]_PP)^-1 W_P, H^-1 -= [H^-1]_:,P ([H^-1]_PP)^-1 [H^-1]_P,:, rows/columns P
  zeroed; at the end the kept rows are refit in closed form, W_S = (H_SS)^-1 G_S, the removed rows are zero, and
  `prune_loss = sum(-W*G + W*(H W)/2)` is returned;
* `LocalPruner.__init__` defaults `mha_update_iter=1`, `mlp_update_iter=16` (`src/pruner.py` `_create_handle` passes
  neither), `src/pruner.py` `_prune_group` / `LocalPruner.step` (several sparsity levels per projection, the layer's
  weight then set to the expected level's: layer-by-layer with the pruned prefix, "error accumulation").
The AMD blog post of the method (rocm.blogs.amd.com/artificial-intelligence/tyr-the-pruner) calls this local pruning
"Taylor-informed ... first- and second-order saliency": the tr(W_g^T G_g) term is deliberate.

The transcription below follows `local_prune_core` step by step (its already-zero branch included) in float64 on
[d_in, d_out] weights, as the peer stores them; it also records, per round, the two parts of the score and the groups
taken, and `first_order=False` drops the tr(W_g^T G_g) term (a variation, named as such where used).

What the two compute in common, tested exactly (1e-8 relative):
* The second-order part of the peer's score is half our block cost tr(W_B ([H^-1]_BB)^-1 W_B^T) (with our H = the
  peer's H / n_tokens: the relative ridge makes the two inverses proportional), at every round.
* The update of W and of H^-1 after a removal is the same block-OBS / Schur-complement update, so with the
  first-order term dropped and one group per round the peer's greedy sequence is our `order`, and its per-round
  second-order cost is our cumulative error's increment.
* The peer's final weights (closed-form refit with G = H_damped W0) equal its accumulated OBS weights, i.e. our
  greedy's implied weights W_S + W_R H_RS H_SS^-1 (H damped); our cumulative error is their damped error
  tr((W0 - W') H (W0 - W')^T), to round-off.
* Without ridge (`ridge=0`, peer's damping set to 0) our pipeline refit (`minillm.reconstruct.refit_columns`,
  uncentred form) equals the peer's final weights.

Differences between the peer and ours:
1. Ranking. The peer adds the first-order term tr(W_g^T G_g) = tr(W_g^T (H W0)_g) to half the OBS cost (G is fixed
   at the original weights; at round 1 these terms sum to the damped output energy tr(W0^T H W0)). Ours ranks by the
   OBS cost alone. On the synthetic MLP projection below the removed sets then differ at most sizes
   (`test_peer_taylor_term_changes_the_choice`); neither is uniformly better on the damped error (greedy is not
   optimal): for 3 of 6 heads the peer's set has the lower error here, for 16 of 64 channels ours.
2. Batch schedule. Peer: `min(update_iter, k)` rounds of near-equal size sized for the k units it removes
   (attention: 1 round, all heads ranked by the initial scores; MLP: 16 rounds), then stops. Ours: a fixed batch of
   ceil(U / batches) units (batches=64 by default), down to the last unit; the selection is a prefix of that order.
   They coincide when the peer's round sizes equal our batch size (tested: one per round; 16 rounds of 2 =
   batches=32; 1 round = batches=1).
3. Final weights with a ridge: none left. The peer refits W'_S = H_SS^-1 (H W0)_S with the damped H = M + lambda I
   (M the undamped Gram), i.e. W_S + W_R M_RS (M_SS + lambda I)^-1 with lambda = 1e-2 mean(diag M) over *all*
   columns: the ridge pulls towards the original weights. Ours (`refit_columns`) is (W M_:S + lambda W_S)
   (M_SS + lambda I)^-1 with the same lambda, the same solution, and the greedy OBS weights that the `obs` score
   measures (`test_refit_with_ridge_is_the_peer_and_obs_weights`). An earlier version of ours pulled towards zero
   (W M_:S (M_SS + lambda_S I)^-1, lambda_S over the kept columns): written against this transcription, that version
   failed here (weights 1-15% apart; one MLP column removed, calibration error 8.7 against 3.7).
4. Statistics. Peer: raw Gram, summed (scale-free here, the damping being relative), float32, `torch.linalg.inv`;
   layer by layer on the already pruned prefix. Ours: centred covariance by default (`form='uncentered'` gives the
   peer's), float64 Cholesky, all layers from the dense model in one pass (`reconstruct='sequential'` refits on the
   pruned prefix). The tests use the uncentred Gram in float64 on both sides.
5. Attention units. Peer: query heads of o_proj (`num_attention_heads`), also in GQA models. Ours: query heads or
   KV groups (the columns of all a group's query heads); the block arithmetic is the same for any equal width
   (tested with both).
6. Degenerate inputs. Peer: dead input rows zeroed, all-zero groups pre-pruned and the rest re-solved with the
   zeroed (not Schur-updated) inverse; ours: a dead column gets a tiny ridge, an all-zero unit costs 0 and goes
   first. Ties: peer `torch.argsort` (unstable), ours stable. Not exercised here (random weights, full-rank Gram).
7. Across layers: the peer searches the sparsity distribution over a supernet of levels (evolutionary search);
   ours thresholds the normalised cumulative errors. Out of scope of this layer-wise test.
"""

from __future__ import annotations

import math

import pytest
import torch

from minillm.layerwise import Moments
from minillm.reconstruct import refit_columns
from minillm.scores.obs import _block_costs, _inverse, greedy_removal

DAMP = 1e-2  # the peer's hard-coded relative damping, our RIDGE / DEFAULT_RIDGE
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(11))


# --- transcription of Týr-the-Pruner ------------------------------------------------------------------------------


def tyr_prepare(weight: torch.Tensor, gram: torch.Tensor, damp: float = DAMP):
    """`LocalPruner.prune`: (B = W^T with dead rows zeroed, damped H, G = H B). weight [m, d], gram [d, d] summed."""
    b = weight.T.clone()
    dead = torch.diag(gram) == 0
    b[dead, :] = 0
    h = gram + torch.eye(gram.shape[0], dtype=gram.dtype) * torch.mean(torch.diag(gram)) * damp
    return b, h, h @ b


def _group_cols(groups, group_size):
    return torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in groups])


def tyr_local_prune_core(w, h, g, num_total_groups, num_groups_to_remain, update_iter=1, first_order=True):
    """`LocalPruner.local_prune_core`. Returns (W_pruned [d, m], prune_loss, trace); trace: per round a dict with the
    groups taken ('picked', in score order), the score's two parts per group ('second', 'first') and the weights
    after the round's OBS update ('w'). first_order=False: the score without tr(W_g^T G_g) (not the peer's)."""
    w = w.clone()
    cin, cout = w.shape
    gs = cin // num_total_groups
    h_inv = torch.linalg.inv(h)
    pruned = torch.abs(w.reshape(num_total_groups, gs, cout)).sum((1, 2)) <= 1e-12
    trace = []
    n_zero = int(pruned.sum())
    if n_zero > 0:
        zero_idx = _group_cols(pruned.nonzero().flatten().tolist(), gs)
        h_inv[zero_idx, :] = 0
        h_inv[:, zero_idx] = 0
        w = h_inv @ g
        if num_total_groups - num_groups_to_remain - n_zero <= 0:
            w[zero_idx, :] = 0
            return w, 0.0, trace
    remaining = num_total_groups - num_groups_to_remain - n_zero
    rounds = []
    if remaining > 0:
        n_rounds = max(min(update_iter, remaining), 1)
        base, extra = divmod(remaining, n_rounds)
        rounds = [base + (1 if r < extra else 0) for r in range(n_rounds)]
    for k in rounds:
        if gs > 1:
            half_obs = torch.zeros_like(w)
            for grp in range(num_total_groups):
                if pruned[grp]:
                    continue
                sl = slice(grp * gs, (grp + 1) * gs)
                half_obs[sl, :] = torch.linalg.inv(h_inv[sl, sl]) @ w[sl, :] / 2.0
        else:
            safe_den = (pruned.to(w.dtype) + torch.diag(h_inv)).clamp_min(1e-12)
            half_obs = (1.0 / safe_den)[:, None] * (w / 2.0)
        second = (w * half_obs).reshape(num_total_groups, gs, cout).sum((1, 2))
        first = (w * g).reshape(num_total_groups, gs, cout).sum((1, 2))
        val = (second + first if first_order else second) + 1e20 * pruned.to(w.dtype)
        pick = torch.argsort(val)[:k]
        idx = _group_cols(pick.tolist(), gs)
        block_inv = torch.linalg.inv(h_inv[idx][:, idx])
        w -= h_inv[:, idx] @ block_inv @ w[idx, :]
        w[idx, :] = 0
        h_inv -= h_inv[:, idx] @ block_inv @ h_inv[idx, :]
        h_inv[idx, :] = 0
        h_inv[:, idx] = 0
        pruned[pick] = True
        trace.append({"picked": pick.tolist(), "second": second.clone(), "first": first.clone(), "w": w.clone()})
    kept = ~torch.repeat_interleave(pruned, gs)
    w_pruned = torch.zeros_like(w)
    w_pruned[kept, :] = torch.linalg.inv(h[kept][:, kept]) @ g[kept, :]
    prune_loss = float(torch.sum(-w_pruned * g + 0.5 * w_pruned * (h @ w_pruned)))
    return w_pruned, prune_loss, trace


def tyr_prune(weight, gram, group_size, k, update_iter, damp=DAMP, first_order=True):
    """The peer on one projection: remove k groups. Returns (W' [m, d] in our layout, removed groups in order,
    the damped error tr((W - W') H (W - W')^T) in the peer's summed units, trace)."""
    b, h, g = tyr_prepare(weight, gram, damp)
    n_groups = weight.shape[1] // group_size
    w_p, loss, trace = tyr_local_prune_core(b, h, g, n_groups, n_groups - k, update_iter, first_order)
    removed = [u for t in trace for u in t["picked"]]
    return w_p.T, removed, 2.0 * loss + float((b * g).sum()), trace


# --- problems ------------------------------------------------------------------------------------------------------

SHAPES = {"heads": (32, 48, 8), "kv_groups": (32, 48, 24), "channels": (32, 64, 1)}


def problem(m, d, n=256, seed=0):
    """W [m, d] with unequal column scales; x [n, d] correlated activations with a mean; float64."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d) + torch.eye(d, dtype=torch.float64)
    x = z @ mix + 0.5 * torch.randn(1, d, generator=gen, dtype=torch.float64)
    w = torch.randn(m, d, generator=gen, dtype=torch.float64) * (1 + torch.rand(d, generator=gen, dtype=torch.float64))
    return w, x


def setup(kind, seed=0):
    m, d, gs = SHAPES[kind]
    w, x = problem(m, d, seed=seed)
    return w, x, gs, torch.arange(d).reshape(d // gs, gs)


def moments_of(x):
    return Moments(x.sum(0), x.T @ x, n=x.shape[0])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny linear-algebra calls: with two threads on a shared two-core machine they run ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a, b, rel=1e-8):
    return float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-30)


# --- the shared core ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SHAPES))
def test_peer_second_order_score_is_half_our_block_cost(kind):
    w, x, gs, blocks = setup(kind)
    gram, n = x.T @ x, x.shape[0]
    _, _, _, trace = tyr_prune(w, gram, gs, 1, 1)
    ours = _block_costs(w, _inverse(gram / n, DAMP), blocks)  # per token
    assert torch.allclose(2.0 * trace[0]["second"] / n, ours, rtol=1e-9, atol=0)
    # the first-order term is each group's share of the damped output energy tr(W0^T H W0) at the original weights
    b, h, _ = tyr_prepare(w, gram)
    assert float(trace[0]["first"].sum()) == pytest.approx(float((b * (h @ b)).sum()), rel=1e-10)


@pytest.mark.parametrize("ridge", [DAMP, 0.0])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_greedy_sequence_and_increments_match_peer_obs_part(kind, ridge):
    """One group per round, the peer's score without its first-order term: its greedy sequence is our order and
    its second-order cost of each round's group is twice our cumulative error's increment."""
    w, x, gs, blocks = setup(kind, seed=1)
    gram, n = x.T @ x, x.shape[0]
    n_units = blocks.shape[0]
    order, cumulative = greedy_removal(w, gram / n, blocks, ridge=ridge, batches=n_units)
    k = n_units - 1  # the peer refuses to remove the last group (its refit needs one)
    _, removed, _, trace = tyr_prune(w, gram, gs, k, update_iter=k, damp=ridge, first_order=False)
    assert removed == order[:k]
    previous = 0.0
    for t, rnd in enumerate(trace):
        (u,) = rnd["picked"]
        step = float(cumulative[order[t]]) - previous
        assert step == pytest.approx(2.0 * float(rnd["second"][u]) / n, rel=1e-8, abs=1e-12 * float(cumulative[-1]))
        previous = float(cumulative[order[t]])


@pytest.mark.parametrize(
    "kind,k,peer_iter,our_batches",
    [
        ("channels", 32, 16, 32),  # the peer's mlp_update_iter=16: 16 rounds of 2 = our batches of 2
        ("channels", 24, 8, 22),  # 8 rounds of 3 = ceil(64 / 22)
        ("heads", 3, 1, 1),  # the peer's mha_update_iter=1: one round by the initial scores = our single batch
        ("heads", 4, 2, 3),  # 2 rounds of 2 = ceil(6 / 3)
    ],
)
def test_batched_removal_matches_peer_obs_part_when_batch_sizes_agree(kind, k, peer_iter, our_batches):
    w, x, gs, blocks = setup(kind, seed=2)
    gram, n = x.T @ x, x.shape[0]
    order, _ = greedy_removal(w, gram / n, blocks, ridge=DAMP, batches=our_batches)
    _, removed, _, trace = tyr_prune(w, gram, gs, k, update_iter=peer_iter, first_order=False)
    assert len({len(t["picked"]) for t in trace}) == 1  # equal rounds, else the schedules differ by design
    assert set(removed) == set(order[:k])


@pytest.mark.parametrize("kind", list(SHAPES))
def test_peer_final_weights_are_our_obs_weights(kind):
    """The peer's closed-form refit = its accumulated OBS weights, and our cumulative error is their damped error."""
    w, x, gs, blocks = setup(kind, seed=3)
    gram, n = x.T @ x, x.shape[0]
    n_units = blocks.shape[0]
    order, cumulative = greedy_removal(w, gram / n, blocks, ridge=DAMP, batches=n_units)
    for k in sorted({1, n_units // 4, n_units // 2, n_units - 1} - {0}):
        w_p, removed, damped_error, trace = tyr_prune(w, gram, gs, k, update_iter=k, first_order=False)
        assert set(removed) == set(order[:k])
        assert close(w_p, trace[-1]["w"].T)  # closed form = accumulated OBS updates (peer-internal)
        assert not w_p[:, blocks[removed].reshape(-1)].any()
        assert float(cumulative[order[k - 1]]) == pytest.approx(damped_error / n, rel=1e-8)
        # and the same weights in our notation: W_S + W_R H_RS H_SS^-1 with the damped H
        hl = gram + DAMP * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        r = blocks[order[:k]].reshape(-1)
        s = torch.tensor(sorted(set(range(w.shape[1])) - set(r.tolist())))
        obs_w = w[:, s] + w[:, r] @ hl[r][:, s] @ torch.linalg.inv(hl[s][:, s])
        assert close(w_p[:, s], obs_w)


# --- the refit ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["heads", "channels"])
def test_refit_equals_peer_weights_without_ridge(kind):
    w, x, gs, blocks = setup(kind, seed=4)
    gram, n = x.T @ x, x.shape[0]
    n_units = blocks.shape[0]
    order, _ = greedy_removal(w, gram / n, blocks, ridge=0.0, batches=n_units)
    for k in (1, n_units // 2):
        w_p, removed, _, _ = tyr_prune(w, gram, gs, k, update_iter=k, damp=0.0, first_order=False)
        assert set(removed) == set(order[:k])
        keep = torch.tensor(sorted(set(range(w.shape[1])) - set(blocks[order[:k]].reshape(-1).tolist())))
        w_s, delta = refit_columns(w, moments_of(x), keep, 0.0, centered=False)
        assert delta is None
        assert close(w_s, w_p[:, keep])


@pytest.mark.parametrize("kind", ["heads", "channels"])
@pytest.mark.parametrize("k", [1, "half"])
def test_refit_with_ridge_is_the_peer_and_obs_weights(kind, k):
    """Difference 3, closed: with ridge 1e-2 our refit of the kept columns is the peer's final weights (the ridge
    pulls towards W, lambda from all columns), the weights whose error our cumulative score is."""
    w, x, gs, blocks = setup(kind, seed=4)
    gram, n = x.T @ x, x.shape[0]
    g = gram / n
    n_units = blocks.shape[0]
    k = n_units // 2 if k == "half" else k
    order, cumulative = greedy_removal(w, g, blocks, ridge=DAMP, batches=n_units)
    w_p, removed, _, _ = tyr_prune(w, gram, gs, k, update_iter=k, first_order=False)
    assert set(removed) == set(order[:k])
    r = blocks[order[:k]].reshape(-1)
    s = torch.tensor(sorted(set(range(w.shape[1])) - set(r.tolist())))
    w_s, _ = refit_columns(w, moments_of(x), s, DAMP, centered=False)
    assert close(w_s, w_p[:, s])
    eye = torch.eye(len(s), dtype=g.dtype)
    lam = DAMP * g.diagonal().mean()
    assert close(w_s, w[:, s] + w[:, r] @ g[r][:, s] @ torch.linalg.inv(g[s][:, s] + lam * eye))
    # the score is the damped error of exactly these weights
    full = torch.zeros_like(w)
    full[:, s] = w_s
    damped = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
    assert float(cumulative[order[k - 1]]) == pytest.approx(float(((w - full) @ damped * (w - full)).sum()), rel=1e-8)
    # nothing removed: both return W
    w_all, _ = refit_columns(w, moments_of(x), torch.arange(w.shape[1]), DAMP, centered=False)
    _, h, gg = tyr_prepare(w, gram)
    assert close(torch.linalg.solve(h, gg).T, w)
    assert close(w_all, w)


# --- the deliberate difference in the ranking ---------------------------------------------------------------------


def test_peer_taylor_term_changes_the_choice():
    """Difference 1: the peer's own score (with tr(W_g^T G_g)) takes other channels than the OBS cost; its first
    pick is the argmin of the full score, ours the argmin of the OBS cost."""
    w, x, gs, blocks = setup("channels")
    gram, n = x.T @ x, x.shape[0]
    order, _ = greedy_removal(w, gram / n, blocks, ridge=DAMP, batches=blocks.shape[0])
    _, removed, _, trace = tyr_prune(w, gram, gs, 16, update_iter=16)
    assert removed[0] == int(torch.argmin(trace[0]["second"] + trace[0]["first"]))
    assert order[0] == int(torch.argmin(trace[0]["second"]))
    assert set(removed) != set(order[:16])


# --- on a tiny model's layer --------------------------------------------------------------------------------------


@torch.no_grad()
def test_tiny_gqa_layer_matches_peer_obs_part(tiny):
    """Layer 0 of tiny-llama-gqa, real inputs (128 tokens): query heads and KV groups of o_proj, channels of
    down_proj; the peer's OBS-part sequence is our order and its damped error our cumulative error."""
    model = tiny("tiny-llama-gqa")
    layer = model.model.layers[0]
    seen = {}
    hooks = [
        lin.register_forward_pre_hook(lambda mod, a, key=key: seen.setdefault(key, []).append(a[0]))
        for key, lin in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))
    ]
    model(CALIB)
    for hk in hooks:
        hk.remove()
    cfg = model.config
    cases = [("o", layer.self_attn.o_proj, cfg.head_dim), ("o", layer.self_attn.o_proj, cfg.head_dim * 3)]
    cases.append(("down", layer.mlp.down_proj, 1))
    for key, lin, gs in cases:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]]).double()
        w = lin.weight.double()
        gram, n = x.T @ x, x.shape[0]
        blocks = torch.arange(w.shape[1]).reshape(-1, gs)
        n_units = blocks.shape[0]
        order, cumulative = greedy_removal(w, gram / n, blocks, ridge=DAMP, batches=n_units)
        k = n_units - 1
        w_p, removed, damped_error, _ = tyr_prune(w, gram, gs, k, update_iter=k, first_order=False)
        assert removed == order[:k]
        assert float(cumulative[order[k - 1]]) == pytest.approx(damped_error / n, rel=1e-7)
