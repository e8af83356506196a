"""`taylor`: LLM-Pruner's first-order Taylor importance with a real backward pass (the backprop baseline).

* element1 (default): per weight |W * dL/dW|, summed over the unit's group.
* element2: per weight |W^2 * H_ii| with the Fisher diagonal H_ii = mean over samples of g_i^2 (one backward pass
  per calibration sample).
* vector: per row (or column) |sum of W * dL/dW| along it, then summed over the unit's lines.

For GQA a KV group scores its k/v rows plus its own query heads (h // group_size, the heads removed with it);
LLM-Pruner's llama3.py group alignment (`view(len // min, min).sum(0)`) instead folds query head h onto KV head
h % n_kv, a deliberate deviation pinned in tests/peers/test_taylor_llm_pruner.py. MHA scores equal the peer's.

The gradient is accumulated over calibration batches; gradients of parameters that are not scored (embeddings,
norms, the LM head) are never kept.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..allocate import LayerScores
from . import MethodSpec
from .common import ScoringContext, lm_loss, pool_layer

SPEC = MethodSpec(needs_calibration=True, needs_backward=True)
VARIANTS = ("element1", "element2", "vector")


def _scored_weights(ctx):
    return [lin.weight for layer in ctx.adapter.layers() for lin in ctx.adapter.linears(layer) if lin.weight.numel()]


def score(ctx: ScoringContext, variant: str = "element1") -> list[LayerScores]:
    if variant not in VARIANTS:
        raise ValueError(f"taylor variant must be one of {VARIANTS}, got {variant!r}")
    model = ctx.model
    weights = _scored_weights(ctx)
    scored = {id(w) for w in weights}
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in scored)
        p.grad = None
    fisher = {id(w): torch.zeros_like(w, dtype=torch.float32) for w in weights} if variant == "element2" else None
    try:
        if variant == "element2":
            samples = [row[None] for batch in ctx.batches() for row in batch]
            for sample in tqdm(samples, desc="taylor (per-sample backward)", disable=not ctx.progress, leave=False):
                lm_loss(model, sample).backward()
                for w in weights:
                    fisher[id(w)] += w.grad.float() ** 2 / len(samples)
                    w.grad = None
        else:
            batches = ctx.batches()
            n_tokens = sum(b[:, 1:].numel() for b in batches)
            for batch in tqdm(batches, desc="taylor (backward)", disable=not ctx.progress, leave=False):
                (lm_loss(model, batch) * (batch[:, 1:].numel() / n_tokens)).backward()

        def salience(m):
            w = m.linear.weight.detach().float()
            if variant == "element2":
                return (w * w * fisher[id(m.linear.weight)]).abs().sum(dim=1 - m.dim)
            wg = w * m.linear.weight.grad.float()
            return wg.sum(dim=1 - m.dim).abs() if variant == "vector" else wg.abs().sum(dim=1 - m.dim)

        return [pool_layer(ctx.adapter, layer, ctx.unit(layer), salience) for layer in ctx.adapter.layers()]
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(saved_flags[id(p)])
