"""`wanda_24` against Wanda's own 2:4 pruning.

Peer: locuslab/wanda@8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6
* `lib/prune.py` `prune_wanda(args, model, tokenizer, device, prune_n=2, prune_m=4)`: layer by layer, the layer's
  calibration inputs (one sample per forward) run through it with a forward hook on every `nn.Linear` of the layer
  (`find_layers`: q, k, v, o, gate, up, down); `W_metric = |W| * sqrt(scaler_row)`; for every block of 4 columns
  the 2 smallest entries of each row (`torch.topk(..., 2, largest=False)`) are zeroed; then the *pruned* layer is
  run again and its outputs become the next layer's inputs (`inps, outs = outs, inps`).
* `lib/layerwrapper.py` `WrappedGPT.add_batch`: `scaler_row` is the running mean over samples of the per-sample sum
  over tokens of x_j**2 (`scaler_row *= n / (n + tmp); n += tmp; scaler_row += ||x_j||**2 / n`).

Differences between peer and ours, with reasons:
1. Data flow. Ours (nm_sparsity.apply_nm) takes every linear's activation norms from one pass through the
   *unpruned* model; Wanda feeds each pruned layer's outputs forward. Layer 0 sees the same inputs in both, and
   within a layer both collect every linear's statistics before zeroing any weight, so layer 0's masks must be
   identical; the one-shot transcription (statistics from the unpruned model, Wanda's rule otherwise) must give
   identical masks in *every* layer. In later layers the sequential peer differs from ours: on these tiny models
   (3 layers, 10 x 16 calibration tokens) 97.0-98.7% of the mask entries of layers 1-2 agree (measured over seeds
   0-5 on tiny-llama and tiny-llama-gqa; worst single linear 91.4%); the test asserts >= 95% and < 100%, so it
   notices if either side changes its data flow or its rule. This is a documented simplification of ours (one calibration pass, streamable), not a defect.
2. Scale. Wanda's scaler_row is a per-sample mean (||X_j||^2 / n_samples) accumulated as a running mean; ours keeps
   the plain sum of squares. The factor is common to all columns, so the ranking within each row is unchanged.
3. Ties. Wanda's `topk` has no defined tie order; ours keeps ties towards the lower index (stable sort). Random
   fp32 weights have no ties.
4. Batching. Wanda runs one sample per forward; ours batches (sums over tokens agree up to fp32 rounding).
5. Calibration. Wanda draws 128 C4 windows of the model's context length; here both get the same random batch.
"""

import pytest
import torch
from torch import nn

import minillm

N, M = 2, 4


def _calib(n=10, t=16, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _linears(layer):
    """find_layers: every nn.Linear inside a decoder layer, by name."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


class _Wrapped:
    """WrappedGPT: running per-sample mean of squared input norms per column."""

    def __init__(self, lin):
        self.scaler_row = torch.zeros(lin.in_features)
        self.nsamples = 0

    def add_batch(self, inp):
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples


@torch.no_grad()
def _layer_stats(model, layer, calib):
    wrapped = {name: _Wrapped(lin) for name, lin in _linears(layer).items()}
    handles = [
        lin.register_forward_hook(lambda m, i, o, name=name: wrapped[name].add_batch(i[0].data))
        for name, lin in _linears(layer).items()
    ]
    try:
        for j in range(calib.shape[0]):  # one sample per forward, as prune_wanda
            model(calib[j : j + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return wrapped


@torch.no_grad()
def _prune_layer(layer, wrapped):
    for name, lin in _linears(layer).items():
        metric = lin.weight.data.abs() * torch.sqrt(wrapped[name].scaler_row.reshape(1, -1))
        mask = torch.zeros_like(metric, dtype=torch.bool)
        for ii in range(0, metric.shape[1], M):
            tmp = metric[:, ii : ii + M].float()
            mask.scatter_(1, ii + torch.topk(tmp, N, dim=1, largest=False)[1], True)
        lin.weight.data[mask] = 0


def peer_prune_wanda(model, calib, sequential=True):
    """prune_wanda with prune_n=2, prune_m=4. sequential=False gathers all statistics from the unpruned model first
    (our data flow) and otherwise applies Wanda's rule unchanged."""
    layers = model.model.layers
    if not sequential:
        stats = [_layer_stats(model, layer, calib) for layer in layers]
    for i, layer in enumerate(layers):
        # running the model with layers < i already pruned feeds layer i exactly the pruned layers' outputs
        _prune_layer(layer, _layer_stats(model, layer, calib) if sequential else stats[i])


def _weights(model):
    return {
        f"{i}.{name}": lin.weight.detach().clone()
        for i, layer in enumerate(model.model.layers)
        for name, lin in _linears(layer).items()
    }


def _ours(tiny, name, calib, seed):
    model = tiny(name, seed=seed)
    minillm.prune(model, "wanda_24", 0.5, calib, progress=False)
    return _weights(model)


def _peer(tiny, name, calib, seed, sequential):
    model = tiny(name, seed=seed)
    peer_prune_wanda(model, calib, sequential=sequential)
    return _weights(model)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa"])
def test_one_shot_transcription_gives_identical_masks_everywhere(tiny, name):
    calib = _calib()
    ours = _ours(tiny, name, calib, 0)
    peer = _peer(tiny, name, calib, 0, sequential=False)
    assert ours.keys() == peer.keys() and len(ours) == 7 * 3
    for key in ours:
        assert torch.equal(ours[key] == 0, peer[key] == 0), key
        assert torch.equal(ours[key], peer[key]), key  # kept weights untouched
        assert (ours[key] == 0).float().mean() == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa"])
def test_sequential_wanda_layer0_exact_later_layers_within_tolerance(tiny, name, seed):
    calib = _calib(seed=seed)
    ours = _ours(tiny, name, calib, seed)
    peer = _peer(tiny, name, calib, seed, sequential=True)
    agree, total = 0, 0
    for key in ours:
        same = (ours[key] == 0) == (peer[key] == 0)
        if key.startswith("0."):
            assert bool(same.all()), key  # same inputs, same statistics, same rule
        else:
            agree += int(same.sum())
            total += same.numel()
    assert 0.95 <= agree / total < 1.0, agree / total  # pruned-input data flow moves some masks, not most
