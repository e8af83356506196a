"""`bonsai` against a transcription of the official code.

Peer: ldery/Bonsai@2f911d7
* `lib/modelling_llama_mod.py` `LlamaAttention.forward` / `LlamaMLP.forward` (the 'wanda' prior cached by the
  forward hook: |W_out| * RMS over tokens of the out-projection input, mean over output rows, mean over a head's
  dimensions) and `main.py` `hook_fn` (average over forward batches);
* `main.py` `run_data_to_sampling_proba` (frozen top int(N (1 - 2p)) by prior, drop probability max - prior),
  `get_random_mask` / `set_masks` (int(p N) + 1 candidates zeroed without replacement; the complement flips the
  candidates and keeps the frozen units), the global selection in `investigate_score_based_mask` (argsort of the
  coefficients, cumulative parameter counts, remove while the cumsum stays within p * P0);
* `lib/scoring_model.py` `ScoreModelHP.search_best_linear_fit`, `split_train_test`, `ScoreModel.update_with_info`,
  `run_epoch`, `LinearModel` (the regression).

Tolerances, with their reasons:
* Prior: identical (1e-6) with one forward batch; the official averages per-batch values over batches, we take the
  RMS over all tokens (documented in minillm/scores/bonsai.py).
* Masks: the official draws with NumPy's global generator, we with a seeded torch generator, so single masks
  cannot match; the test checks the structure of every mask exactly and the per-candidate drop frequencies of both
  samplers over 3,000 draws to within 0.03.
* Regression: identical coefficients (1e-5) when both draw minibatch orders from the same generator (the official
  uses NumPy's global state; the order is the only randomness).
* Selection: identical removed sets when coefficients are distinct. On ties the official order is whatever
  `np.argsort` (introsort) leaves; ours breaks them by the prior.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

import minillm
from minillm.adapters import get_adapter
from minillm.scores import bonsai
from minillm.scores.common import ScoringContext

CALIB = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(5))


# --- prior ----------------------------------------------------------------------------------------------------------


def official_wanda_prior(model, calib, batch_size: int):
    """Per layer (per-head prior, per-channel prior), averaged over forward batches like `hook_fn`."""
    caches = {}

    def grab(key, w):
        def hook(mod, args):
            ins = args[0].reshape(-1, args[0].shape[-1]).float()
            val = (w.detach().float().abs() * ins.pow(2).mean(0, keepdim=True).sqrt()).mean(0)
            count, total = caches.get(key, (0, 0))
            caches[key] = (count + 1, total + val)

        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(grab((i, "a"), layer.self_attn.o_proj.weight)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(grab((i, "m"), layer.mlp.down_proj.weight)))
    with torch.no_grad():
        for start in range(0, calib.shape[0], batch_size):
            model(calib[start : start + batch_size])
    for h in hooks:
        h.remove()
    hd = model.model.layers[0].self_attn.head_dim
    out = []
    for i in range(len(model.model.layers)):
        a = caches[(i, "a")][1] / caches[(i, "a")][0]
        m = caches[(i, "m")][1] / caches[(i, "m")][0]
        out.append((a.reshape(-1, hd).mean(-1).double(), m.double()))
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa3"])
def test_wanda_prior_equals_the_official_with_one_batch(name):
    model = minillm.models.build_random(name, seed=0)
    n_kv = model.config.num_key_value_heads
    ctx = ScoringContext(model, get_adapter(model), CALIB, "auto", 0, progress=False)
    ours = bonsai.priors(ctx, CALIB, "wanda", torch.Generator().manual_seed(0))
    peer = official_wanda_prior(model, CALIB, batch_size=CALIB.shape[0])
    for (att, ch), (p_att, p_ch) in zip(ours, peer):
        # a KV group (GQA, our extension) takes the mean of its heads' priors; MHA: identity
        assert torch.allclose(att, p_att.reshape(n_kv, -1).mean(1), rtol=1e-6)
        assert torch.allclose(ch, p_ch, rtol=1e-6)


# --- frozen set, drop probabilities, masks -----------------------------------------------------------------------


def official_sampling_proba(prior: np.ndarray, pfrac: float):
    num_keep_static = int(len(prior) * (1.0 - 2 * pfrac))
    order = np.argsort(-prior)
    fixed, use = order[:num_keep_static], order[num_keep_static:]
    proba = prior.max() - prior
    proba[fixed] = 0
    return proba / proba.sum(), fixed, use


def official_random_mask(n: int, proba: np.ndarray, pfrac: float, rng: np.random.Generator) -> np.ndarray:
    mask = np.ones(n)
    num_to_zero = int(pfrac * n) + 1
    idx = np.arange(n)
    chosen = rng.choice(idx, size=num_to_zero, p=proba / proba.sum(), replace=False)
    mask[chosen] = 0
    return mask


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2])
def test_frozen_set_and_drop_probabilities_equal_the_official(p):
    prior = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    module = bonsai.make_module(0, "mlp", prior, 3, p)
    proba, fixed, use = official_sampling_proba(prior.numpy().copy(), p)
    assert set(module.frozen.nonzero().flatten().tolist()) == set(fixed.tolist())
    assert set(module.candidates.tolist()) == set(use.tolist())
    assert np.allclose(module.drop_prob.numpy(), proba, atol=1e-12)


def test_masks_have_the_official_structure_and_drop_frequencies():
    gen = torch.Generator().manual_seed(0)
    p = 0.1
    mods = [
        bonsai.make_module(0, "attention", torch.rand(12, generator=gen, dtype=torch.float64), 50, p),
        bonsai.make_module(0, "mlp", torch.rand(60, generator=gen, dtype=torch.float64), 3, p),
    ]
    n_draws = 3000
    x = bonsai.sample_masks(mods, 2 * n_draws, p, torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    offset = 0
    for m in mods:
        cand = m.candidates
        cols = x[:, offset : offset + cand.numel()]
        offset += cand.numel()
        first, complement = cols[0::2], cols[1::2]
        assert ((first == 0).sum(1) == int(p * m.n_units) + 1).all()  # int(pfrac * N) + 1 zeroed per draw
        assert torch.equal(complement, 1 - first)  # complement flips the candidates (frozen stay on, not features)
        ours = (first == 0).double().mean(0)
        proba = m.drop_prob.numpy()
        peer = np.zeros(m.n_units)
        for _ in range(n_draws):
            peer += 1 - official_random_mask(m.n_units, proba, p, rng)
        peer = torch.from_numpy(peer / n_draws)[cand]
        assert (ours - peer).abs().max() < 0.03, (m.kind, float((ours - peer).abs().max()))


def test_small_modules_draw_each_candidate_with_probability_half():
    """Deviation (bonsai.py docstring, "Small modules"): where the official count floor(p N) + 1 reaches a module's
    number of candidates (3 KV groups: 1 candidate), the official rule would drop every candidate in every random
    mask, making the attention columns of all layers identical. Ours draws each such candidate with probability 1/2,
    so the columns differ across layers and the complements still flip them."""
    gen = torch.Generator().manual_seed(0)
    p = 0.1
    priors = [torch.rand(3, generator=gen, dtype=torch.float64) for _ in range(6)]
    mods = [bonsai.make_module(i, "attention", prior, 50, p) for i, prior in enumerate(priors)]
    assert all(m.candidates.numel() == 1 for m in mods)
    x = bonsai.sample_masks(mods, 2000, p, torch.Generator().manual_seed(1))
    first, complement = x[0::2], x[1::2]
    assert torch.equal(complement, 1 - first)
    assert (first.mean(0) - 0.5).abs().max() < 0.06
    assert len({tuple(col.tolist()) for col in first.T}) == len(mods)  # no two layers share a column
    corr = torch.corrcoef(first.T)
    assert (corr - torch.eye(len(mods))).abs().max() < 0.15


# --- regression -----------------------------------------------------------------------------------------------------


class OfficialScoreModel:
    """`ScoreModel` + `LinearModel` (l1), trained as `update_with_info` does; minibatch orders come from `gen`."""

    def __init__(self, n_players: int, reg_weight: float, lr_factor: float, bsz: int, gen: torch.Generator):
        self.score_tensor = torch.zeros(n_players, 1, requires_grad=True)
        self.score_bias = torch.zeros(1, requires_grad=True)
        self.reg_weight, self.lr_factor, self.bsz, self.gen = reg_weight, lr_factor, bsz, gen

    def forward(self, xs):
        return xs @ self.score_tensor + self.score_bias

    def run_epoch(self, xs, ys, train: bool):
        """One epoch; the held-out epoch returns Kendall's tau. The training epoch's tau, which `update_with_info`
        discards, is not computed (scipy's kendalltau was most of this test's time), and the p-value is taken by
        the asymptotic method (the official's default computes an exact one it never reads; tau is the same)."""
        perm = torch.randperm(len(ys), generator=self.gen) if train else torch.arange(len(ys))
        preds, targets = [], []
        for b in range(math.ceil(len(ys) / self.bsz)):
            idx = perm[b * self.bsz : (b + 1) * self.bsz]
            out = self.forward(xs[idx])
            loss = torch.nn.functional.mse_loss(out, ys[idx].view(-1, 1))
            if train:
                (loss + self.score_tensor.abs().sum() * self.reg_weight).backward()
                self.optim.step()
                self.optim.zero_grad()
            else:
                preds.append(out.detach().flatten().numpy())
                targets.append(ys[idx].numpy())
        if train:
            return None
        return kendalltau(np.concatenate(preds), np.concatenate(targets), method="asymptotic").correlation

    def update_with_info(self, tr, ts, nepochs=50, patience=10):
        (tr_xs, tr_ys), (ts_xs, ts_ys) = tr, ts
        mean_score = tr_xs.mean(0)
        self.optim = torch.optim.Adam([self.score_tensor, self.score_bias], lr=1.0 / (len(mean_score.nonzero()) * self.lr_factor))
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optim, mode="max", factor=0.5, patience=3, min_lr=1e-5)
        best_tau, clone, since_best = -1e5, None, 0
        for _ in range(nepochs):
            self.run_epoch(tr_xs, tr_ys, True)
            with torch.no_grad():
                tau = self.run_epoch(ts_xs, ts_ys, False)
            if tau >= best_tau:
                best_tau, clone, since_best = tau, self.score_tensor.detach().clone().flatten(), 0
            sched.step(tau)
            since_best += 1
            if since_best > patience:
                break
        return best_tau, (clone if clone is not None else self.score_tensor.detach().clone().flatten())


def official_split(xs, ys, sid, num_folds=5, no_split=False):
    if no_split:
        trn = tst = list(range(len(ys)))
    else:
        size = len(ys) // num_folds
        tst = list(range(sid * size, (sid + 1) * size))
        trn = [i for i in range(len(ys)) if i not in set(tst)]
    mean_y = ys[trn].mean()
    return (xs[trn], ys[trn] - mean_y), (xs[tst], ys[tst] - mean_y)


def official_search_best_linear_fit(xs, ys, gen):
    grid = itertools.product([1e2, 1e-4, 0.0], [100.0, 10.0, 1.0, 0.1], [32, 64, 128])
    best_tau, best_hp = float("-inf"), None
    for reg, lr_factor, bsz in grid:
        taus = []
        for sid in range(5):
            tr, ts = official_split(xs, ys, sid)
            taus.append(OfficialScoreModel(xs.shape[1], reg, lr_factor, bsz, gen).update_with_info(tr, ts)[0])
        if np.mean(taus) > best_tau:
            best_tau, best_hp = np.mean(taus), (reg, lr_factor, bsz)
    tr, ts = official_split(xs, ys, 0, no_split=True)
    return OfficialScoreModel(xs.shape[1], *best_hp, gen).update_with_info(tr, ts)[1], best_hp


def test_regression_equals_the_official_fit():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(40, 30, generator=g) < 0.6).float()
    x[1::2] = 1 - x[0::2]  # antithetic pairs, as the masks are
    truth = torch.randn(30, generator=g)
    y = -(3.0 - 0.1 * (x @ truth) + 0.05 * torch.randn(40, generator=g)).exp()  # -perplexity, about -20
    peer_beta, peer_hp = official_search_best_linear_fit(x, y, torch.Generator().manual_seed(9))
    beta, info = bonsai.fit_regression(x, y, "adam", torch.Generator().manual_seed(9))
    assert (info["reg_weight"], info["lr_factor"], info["batch_size"]) == peer_hp
    assert torch.allclose(beta.float(), peer_beta, rtol=1e-5, atol=1e-7)
    assert info["nonzero"] == 30, "the official fit leaves no coefficient exactly zero here"


# --- selection ------------------------------------------------------------------------------------------------------


def official_global_selection(beta: np.ndarray, param_counts: np.ndarray, threshold: float) -> np.ndarray:
    """True = removed (the official keeps where the cumulative count of the ascending order exceeds threshold)."""
    sort_idxs = np.argsort(beta)
    keep = (np.cumsum(param_counts[sort_idxs]) > threshold) * 1.0
    return keep[np.argsort(sort_idxs)] == 0


def test_selection_equals_the_official_on_distinct_coefficients():
    gen = torch.Generator().manual_seed(4)
    mods = [
        bonsai.make_module(layer, kind, torch.rand(n, generator=gen, dtype=torch.float64), cost, 0.2)
        for layer in range(3)
        for kind, n, cost in (("attention", 8, 40), ("mlp", 50, 3))
    ]
    n = sum(m.candidates.numel() for m in mods)
    counts = np.concatenate([np.full(m.candidates.numel(), m.unit_cost) for m in mods])
    keys = [(m.layer, m.kind, u) for m in mods for u in m.candidates.tolist()]
    for trial in range(5):
        beta = torch.randn(n, generator=gen, dtype=torch.float64)
        budget = float(counts.sum()) * (0.1 + 0.15 * trial)
        removed = official_global_selection(beta.numpy(), counts, budget)
        assert set(bonsai.select_removals(mods, beta, budget)) == {k for k, r in zip(keys, removed) if r}


def test_ties_follow_the_prior_not_the_position():
    """The lasso's exact zeros tie most candidates; the removed ones must be the lowest-prior ones, from every
    layer, not the first layers' (today's order before the fix swept layer 0 first)."""
    gen = torch.Generator().manual_seed(6)
    mods = [bonsai.make_module(layer, "mlp", torch.rand(50, generator=gen, dtype=torch.float64), 3, 0.2) for layer in range(5)]
    beta = torch.zeros(sum(m.candidates.numel() for m in mods), dtype=torch.float64)
    beta[::7] = 0.5  # a few units the regression found useful
    chosen = bonsai.select_removals(mods, beta, budget=3 * 15)
    tied = sorted(
        (float(m.prior[u]), m.layer, u)
        for m in mods
        for j, u in enumerate(m.candidates.tolist())
        if float(beta[sum(mm.candidates.numel() for mm in mods[: mods.index(m)]) + j]) == 0.0
    )
    assert sorted(chosen) == sorted((layer, "mlp", u) for _, layer, u in tied[:15])
