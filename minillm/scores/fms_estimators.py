"""Forward-only alternatives to SPSA for the `fms` method (option `estimator`).

SPSA in gate space estimates d ~ 10^4..10^5 gate derivatives from n two-sided queries; its cosine with the true
gradient is about sqrt(n / (n + d)) (Spall 1992; for Gaussian directions, Nesterov & Spokoiny 2017, "Random
gradient-free minimization of convex functions"; MeZO, Malladi et al. 2023, uses the same estimator), i.e. ~0.04 at
n = 64 for SmolLM2, so the ranking is mostly the |W| x ||X|| factor. The estimators here spend the same kind of
budget (forward passes, no backward, no stored activations for a backward pass) where it is well determined.

Both start from the forward-only *prior* of a unit, the FMS score with g = 1: the sum over its group of
|W_ij| * ||X_j||_2 (Wanda's per-weight criterion, Sun et al. 2024, pooled over the unit like Wanda-SP / FLAP's
structured variants, An et al. 2024).

* ``ablation``: the exact loss change of removing each unit alone, measured with forward passes on the
  calibration tokens, on a shortlist. Every attention unit (head or KV group: a few per layer) is measured; MLP
  channels are measured for the lowest `shortlist` fraction of each layer by the prior (the ones that can fall
  below a pruning threshold up to that sparsity); the rest rank above the measured ones, in prior order. This is
  the "oracle" of Molchanov et al. 2017/2019 ("Importance estimation for neural network pruning": the loss change
  of removing a unit, which Taylor scores approximate) computed exactly, as in the ablation studies of
  Michel et al. 2019 ("Are sixteen heads really better than one?"). The score is the signed change (removing a
  unit that lowers the loss scores below zero). Each layer's input is cached from one clean pass, so ablating a
  unit of layer l re-runs only layers l..L-1 (the earlier layers replay their cached output), and `batch_tokens`
  tokens of ablations run as one batch (each copy of the calibration rows carries its own mask). Cost: with U_l
  measured units in layer l, sum_l U_l (L - l) / L full forward passes' worth of compute (SmolLM2-135M with
  shortlist 0.5: 30 x (3 + 768) ablations, about 12,000 forward-equivalents), peak memory the dense forward on a
  batch of `batch_tokens` tokens plus the cached layer outputs (L x calibration tokens x hidden).
* ``allocation``: the prior ranks units inside each (layer, attention | MLP) block, and SPSA estimates only the
  2L block gates (one scalar scaling each layer's attention output and MLP output), where n >> d is affordable:
  the cosine of the estimate with the block-gate gradient is about sqrt(n / (n + 2L)), 0.82 at n = 128 for 30
  layers, instead of 0.04 over 46,350 unit gates. A unit's score is |dL/dgate_block| times its share of the
  block's prior (a first-order loss change of removing that share of the block), so scores are comparable across
  blocks and layers: use it with `allocation='global'`, which lets it set per-layer attention and MLP ratios (under
  per-layer uniform allocation only the within-block order, the prior's, matters). Cost: 2n forward passes plus
  one for the activation statistics; peak memory that of a forward pass.

Both leave the weights bit-identical (nothing is written: masks act on inputs of the output projections through
hooks), run under layer streaming and with accelerate-offloaded layers (only forward passes and `loaded` reads),
and compute in fp32 for bf16 / fp16 models when `precision='fp32'` (see minillm/precision.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..offload import execution_device
from ..allocate import LayerScores
from ..precision import fp32_forward
from ..surgery import VirtualMasks
from .common import ScoringContext, member_key, pool_layer
from .spsa import PerturbationSpace, estimate, noise

ESTIMATORS = ("spsa", "ablation", "allocation")


# --- the forward-only prior --------------------------------------------------------------------------------------


def prior_scores(ctx: ScoringContext, stats: dict) -> list[LayerScores]:
    """Per unit: sum over its group of |W| x ||X||_2 (the FMS score with g = 1)."""
    out = []
    for i, layer in enumerate(ctx.adapter.layers()):
        out.append(
            pool_layer(
                ctx.adapter,
                layer,
                ctx.unit(layer),
                lambda m, i=i: (
                    m.linear.weight.detach().float().abs()
                    * stats[member_key(i, m)].norm.to(m.linear.weight.device)[None, :]
                ).sum(dim=1 - m.dim),
            )
        )
    return out


# --- per-row loss ------------------------------------------------------------------------------------------------


def row_losses(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int = 512) -> torch.Tensor:
    """Mean next-token cross-entropy of every row, fp32, [batch] (LM head applied in chunks like `lm_loss`).

    The cross-entropy takes the chunk's logits as [tokens, vocab], contiguous, as `lm_loss` does. Taking them as
    [rows, vocab, positions] (a transposed view, as this function did before) made log-softmax copy the chunk and
    reduce over a strided dimension. Measured on SmolLM2-135M, 10 x 64 tokens, fp32, one thread: this function's
    peak above the baseline was 289 MiB and is 192 MiB (the dense forward without a loss: 152 MiB); on random
    tokens (loss 14) the largest per-row error against a float64 reference was 5.5e-5 and is 4.2e-6. On the
    calibration text, the loss change of removing one MLP channel (12 channels of layer 10, changes of 2.5e-5
    to 2.8e-3) differed from float64 by 1e-9 to 7e-7 with either layout, so scores and records made before the
    change differ from today's by about that."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    head = model.get_output_embeddings()
    rows = hidden.shape[0]
    total = hidden.new_zeros(rows, dtype=torch.float32)
    chunk = max(1, chunk_tokens // rows)
    for start in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, start : start + chunk]).float()
        part = targets[:, start : start + chunk]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), part.reshape(-1), reduction="none")
        total = total + nll.view(rows, -1).sum(1)
    return total / targets.shape[1]


# --- exact ablation with cached layer inputs ---------------------------------------------------------------------


class _Replay(nn.Module):
    """Stands in for decoder layers before the ablated one: returns the cached output of the last of them,
    repeated once per ablation copy, without computing anything."""

    def __init__(self, output, copies: int):
        super().__init__()
        self.output = output
        self.copies = copies

    def forward(self, *args, **kwargs):
        out = self.output
        if isinstance(out, tuple):
            return (out[0].repeat(self.copies, *([1] * (out[0].dim() - 1))),) + tuple(out[1:])
        return out.repeat(self.copies, *([1] * (out.dim() - 1)))


def _units_of(adapter: Adapter, layer, unit: str) -> int:
    shape = adapter.attention_shape(layer)
    if not shape.n_query_heads:
        return 0
    return shape.n_query_heads if unit == "query_head" else shape.n_kv_heads


def _head_mask(adapter: Adapter, layer, unit: str, index: int) -> torch.Tensor:
    """Query-head mask [n_query_heads] with the heads of one attention unit set to 0."""
    shape = adapter.attention_shape(layer)
    m = torch.ones(shape.n_query_heads)
    if unit == "query_head":
        m[index] = 0
    else:
        g = shape.group_size
        m[index * g : (index + 1) * g] = 0
    return m


class Ablator:
    """Exact loss change of removing single units, re-running only the layers from the ablated one on.

    `clean` holds, per calibration batch, the output of every decoder layer and the per-row loss, from one pass."""

    def __init__(self, ctx: ScoringContext, batch_tokens: int = 4096):
        self.ctx = ctx
        self.adapter = ctx.adapter
        self.batch_tokens = batch_tokens
        self.batches = ctx.batches()
        self.outputs: list[list] = []  # [batch][layer] -> layer output
        self.base: list[torch.Tensor] = []  # [batch] -> per-row clean loss
        layers = self.adapter.layers()
        with torch.no_grad():
            for batch in self.batches:
                outs = []
                handles = [
                    layer.register_forward_hook(lambda mod, a, o: outs.append(_detach(o))) for layer in layers
                ]
                try:
                    self.base.append(row_losses(ctx.model, batch))
                finally:
                    for h in handles:
                        h.remove()
                self.outputs.append(outs)
        self.tokens = [b[:, 1:].numel() for b in self.batches]
        self.base_loss = sum(float(lo.mean()) * t for lo, t in zip(self.base, self.tokens)) / sum(self.tokens)

    def loss_changes(self, layer_idx: int, masks: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> list[float]:
        """Loss change of each (head mask, channel mask) of layer `layer_idx` against the clean model (a mask of
        None keeps that kind whole)."""
        out = [0.0] * len(masks)
        total = sum(self.tokens)
        for b, batch in enumerate(self.batches):
            rows = batch.shape[0]
            per = max(1, self.batch_tokens // batch.numel())
            for start in range(0, len(masks), per):
                chunk = masks[start : start + per]
                losses = self._run(layer_idx, b, batch, chunk)  # [len(chunk) * rows]
                delta = losses.view(len(chunk), rows) - self.base[b].to(losses.device)[None, :]
                for k, d in enumerate(delta.mean(1).tolist()):
                    out[start + k] += d * self.tokens[b] / total
        return out

    def _run(self, layer_idx, b, batch, chunk) -> torch.Tensor:
        copies, rows = len(chunk), batch.shape[0]
        layers = self.adapter.layers()
        layer = layers[layer_idx]
        saved = [layers[j] for j in range(layer_idx)]
        handles = []
        for kind, proj, width in (
            (0, self.adapter.attn_out_proj(layer) if self.adapter.attention_shape(layer).n_query_heads else None, 0),
            (1, self.adapter.mlp_out_proj(layer) if self.adapter.n_channels(layer) else None, 1),
        ):
            if proj is None or all(m[kind] is None for m in chunk):
                continue
            n = proj.in_features
            rows_masks = []
            for m in chunk:
                mk = m[kind]
                if mk is None:
                    rows_masks.append(torch.ones(n))
                else:
                    rows_masks.append(mk.repeat_interleave(n // mk.numel()).float())
            table = torch.stack(rows_masks).repeat_interleave(rows, dim=0)[:, None, :]  # [copies * rows, 1, n]

            def hook(module, args, table=table):
                x = args[0]  # [batch, seq, n], or [batch * seq, n] (OPT flattens before fc1 / fc2)
                y = x.reshape(table.shape[0], -1, x.shape[-1]) * table.to(device=x.device, dtype=x.dtype)
                return (y.reshape(x.shape),) + tuple(args[1:])

            handles.append(proj.register_forward_pre_hook(hook))
        try:
            if layer_idx:
                replay = _Replay(self.outputs[b][layer_idx - 1], copies)
                for j in range(layer_idx):
                    layers[j] = replay
            with torch.no_grad():
                return row_losses(self.ctx.model, batch.repeat(copies, 1))
        finally:
            for j, mod in enumerate(saved):
                layers[j] = mod
            for h in handles:
                h.remove()


def _detach(o):
    if isinstance(o, tuple):
        return tuple(x.detach() if torch.is_tensor(x) else x for x in o)
    return o.detach()


class LayerProgress:
    """The finished layers of one long ablation run, kept through `resume` (get/put, like ScoringContext.resume)
    under `name`, so that a run that dies resumes at its first unfinished layer. Without `resume` it only runs."""

    def __init__(self, resume, name: str):
        self.resume, self.name = resume, name
        self.done = (resume.get(name) if resume is not None else None) or {}

    def measure(self, i: int, run):
        """`run()`'s value for layer `i`: the kept one when layer `i` finished before, else run and kept."""
        key = str(i)
        if key in self.done:
            return self.done[key]
        value = run()
        if self.resume is not None:
            self.done[key] = value
            self.resume.put(self.name, self.done)
        return value


def single_unit_losses(ablator: Ablator, i: int, unit: str, channels: list[int]) -> list[list[float]]:
    """[loss changes of removing each attention unit of layer `i` alone, those of removing each of `channels`
    alone]: one list each, in unit order and in the order of `channels`."""
    adapter = ablator.ctx.adapter
    layer = adapter.layers()[i]
    n_att = _units_of(adapter, layer, unit)
    heads = [(_head_mask(adapter, layer, unit, u), None) for u in range(n_att)]
    masks = []
    for c in channels:
        m = torch.ones(adapter.n_channels(layer))
        m[c] = 0
        masks.append((None, m))
    return [ablator.loss_changes(i, heads) if heads else [], ablator.loss_changes(i, masks) if masks else []]


def ablation_scores(
    ctx: ScoringContext, prior: list[LayerScores], shortlist: float, batch_tokens: int
) -> tuple[list[LayerScores], dict]:
    adapter = ctx.adapter
    ablator = Ablator(ctx, batch_tokens)
    out, measured = [], {"attention": 0, "channels": 0}
    layers = adapter.layers()
    progress = LayerProgress(ctx.resume, f"ablation-layers-shortlist{shortlist:g}-batch{batch_tokens}")
    for i, layer in enumerate(tqdm(layers, desc="exact ablations", disable=not ctx.progress, leave=False)):
        unit = ctx.unit(layer)
        n_att = _units_of(adapter, layer, unit)
        n_ch = adapter.n_channels(layer)
        p = prior[i].channels.double() if n_ch else None
        k = min(n_ch, max(1, math.ceil(shortlist * n_ch))) if n_ch and shortlist > 0 else 0
        order = torch.argsort(p, stable=True) if n_ch else None
        chosen = order[:k].tolist() if n_ch else []
        att_values, values = progress.measure(i, lambda: single_unit_losses(ablator, i, unit, chosen))
        att = torch.tensor(att_values, dtype=torch.float64) if n_att else torch.zeros(0, dtype=torch.float64)
        measured["attention"] += n_att
        ch = torch.zeros(n_ch, dtype=torch.float64)
        if n_ch:
            for c, v in zip(chosen, values):
                ch[c] = v
            measured["channels"] += k
            rest = order[k:]
            if len(rest):
                top = max(values) if values else 0.0
                scale = abs(top) + 1e-12
                # unmeasured channels rank above every measured one, in prior order
                ch[rest] = top + scale * (1.0 + p[rest] / (p[rest].max() + 1e-30))
        out.append(LayerScores(att, ch))
    return out, {"base_loss": ablator.base_loss, "measured": measured}


# --- zeroth-order estimate of the allocation ---------------------------------------------------------------------


class BlockGateSpace(PerturbationSpace):
    """One scalar gate per (layer, attention) and (layer, MLP) block: 2 per layer, d = 2L."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.layers = list(adapter.layers())
        self.device = execution_device(adapter.model)

    def shapes(self):
        return [(torch.Size([2]), torch.device("cpu")) for _ in self.layers]

    def perturbed(self, seed: int, scale: float):
        heads, channels = {}, {}
        for i, layer in enumerate(self.layers):
            g = 1.0 + scale * noise(seed, i, (2,), torch.device("cpu"))
            n_q = self.adapter.attention_shape(layer).n_query_heads
            if n_q:
                heads[i] = torch.full((n_q,), float(g[0]))
            n_ch = self.adapter.n_channels(layer)
            if n_ch:
                channels[i] = torch.full((n_ch,), float(g[1]))
        return VirtualMasks(self.adapter, heads, channels)


def allocation_scores(ctx: ScoringContext, prior: list[LayerScores], queries: int, eps: float, loss) -> tuple:
    space = BlockGateSpace(ctx.adapter)
    est = estimate(space, loss, queries, eps, ctx.seed, ctx.progress)
    out = []
    for i, p in enumerate(prior):
        g = est.gradient(space, i).double().abs()
        att = p.attention.double()
        ch = p.channels.double()
        att = g[0] * att / att.sum() if att.numel() and float(att.sum()) > 0 else att
        ch = g[1] * ch / ch.sum() if ch.numel() and float(ch.sum()) > 0 else ch
        out.append(LayerScores(att, ch))
    return out, est


def score(ctx: ScoringContext, estimator: str, stats: dict, queries: int, eps: float, precision: str,
          shortlist: float, batch_tokens: int, loss) -> list[LayerScores]:
    if not 0.0 <= shortlist <= 1.0:
        raise ValueError(f"fms shortlist must be in [0, 1], got {shortlist}")
    if batch_tokens < 1:
        raise ValueError(f"fms batch_tokens must be >= 1, got {batch_tokens}")
    prior = prior_scores(ctx, stats)
    with fp32_forward(ctx.model, precision == "fp32"):
        if estimator == "ablation":
            scores, _ = ablation_scores(ctx, prior, shortlist, batch_tokens)
        else:
            scores, _ = allocation_scores(ctx, prior, queries, eps, loss)
    return scores
