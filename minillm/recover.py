"""Recovery after pruning: LoRA fine-tuning (peft) with an optional KL term towards the unpruned parent.

Loss = next-token cross-entropy + kl_weight * KL(teacher || student), the KL per predicted token averaged over
tokens (Bonsai's post-pruning adaptation uses the parent as teacher with weight 0.01; MINI-LLM and LLM-Pruner use
LoRA alone). Teacher logits are computed without gradient. The adapter is merged at the end, so the result is a
plain model of the pruned shapes that `save_pruned` writes like any other.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .device import backend


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of every non-empty attention and MLP linear (LoRA cannot wrap a 0-width matrix)."""
    adapter = get_adapter(model)
    wanted = {id(lin) for layer in adapter.layers() for lin in adapter.linears(layer) if lin.weight.numel()}
    return [name for name, mod in model.named_modules() if id(mod) in wanted]


def _check(
    rank: int, alpha: float, dropout: float, lr: float, steps: int, batch_size: int, kl_weight: float, teacher
) -> None:
    problems = [
        f"{name} must be a finite number (got {value})"
        for name, value in (("alpha", alpha), ("dropout", dropout), ("lr", lr), ("kl_weight", kl_weight))
        if not math.isfinite(value)
    ]
    if rank < 1:
        problems.append(f"rank must be >= 1 (got {rank})")
    if alpha <= 0:
        problems.append(f"alpha must be > 0 (got {alpha})")
    if not 0 <= dropout < 1:
        problems.append(f"dropout must be in [0, 1) (got {dropout})")
    if lr <= 0:
        problems.append(f"lr must be > 0 (got {lr})")
    if steps < 1:
        problems.append(f"steps must be >= 1 (got {steps})")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1 (got {batch_size})")
    if kl_weight < 0:
        problems.append(f"kl_weight must be >= 0 (got {kl_weight})")
    if kl_weight > 0 and teacher is None:
        problems.append("kl_weight > 0 needs a teacher model (the unpruned parent)")
    if problems:
        raise ValueError("invalid recovery options: " + "; ".join(problems))


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens, in fp32."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


# After the last update, the first training batch's loss may be at most this many times its loss before training
# (a run that learned something lowers it; lr 1e6 raises it by orders of magnitude).
DIVERGENCE_FACTOR = 2.0
# ... and no adapter's update (scale * B @ A) may exceed this many times the norm of the weight it adapts (a sane run
# changes weights by a few percent; lr 1e6 by a factor of 1e7, which a model that is uniform already hides in its
# loss).
MAX_UPDATE_RATIO = 100.0


@torch.no_grad()
def _check_after_training(peft_model, params, order, train_windows, batch_size, device, bf16, losses) -> float:
    """The loss is computed before each update, so the last update is never checked in the loop: check that the
    trained parameters are finite and that the cross-entropy of the first batch did not blow up, before merging."""
    bad = [i for i, p in enumerate(params) if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(
            f"recovery diverged: {len(bad)} LoRA parameter tensors hold NaN or inf after the last step; nothing was "
            "merged or saved (lower the learning rate)"
        )
    worst, where = 0.0, None
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, "lora_A", {}) and hasattr(module, "base_layer"):
            delta = module.get_delta_weight("default").float()
            ratio = float(delta.norm() / module.base_layer.weight.float().norm().clamp_min(1e-12))
            if not math.isfinite(ratio) or ratio > worst:
                worst, where = ratio, name
            if not math.isfinite(ratio):
                break
    if not math.isfinite(worst) or worst > MAX_UPDATE_RATIO:
        raise FloatingPointError(
            f"recovery diverged: the LoRA update of {where} is {worst:.3g} times the norm of the weight it adapts; "
            "nothing was merged or saved (lower the learning rate)"
        )
    was_training = peft_model.training
    peft_model.eval()
    idx = order[torch.arange(0, batch_size) % order.numel()]
    batch = train_windows[idx].to(device)
    with backend().autocast(device, torch.bfloat16, enabled=bf16):
        logits = peft_model(input_ids=batch).logits[:, :-1]
    ce = float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))
    peft_model.train(was_training)
    before = losses[0]["ce"]
    if not math.isfinite(ce) or ce > DIVERGENCE_FACTOR * before + 1.0:
        raise FloatingPointError(
            f"recovery diverged: after the last step the first batch's loss is {ce:.4g} (it was {before:.4g} before "
            "training); nothing was merged or saved (lower the learning rate)"
        )
    return ce


def _train_step(peft_model, optim, batch: torch.Tensor, teacher, kl_weight: float, bf16: bool) -> dict:
    """One optimiser step on one batch: cross-entropy, plus kl_weight * KL towards the teacher; returns the losses."""
    with backend().autocast(batch.device, torch.bfloat16, enabled=bf16):
        logits = peft_model(input_ids=batch).logits[:, :-1]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = ce
        kl = None
        if kl_weight > 0:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch).logits[:, :-1]
            kl = _kl(logits, teacher_logits)
            loss = ce + kl_weight * kl
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return {"loss": float(loss.detach()), "ce": float(ce.detach()), "kl": None if kl is None else float(kl.detach())}


def _record(settings: dict, losses: list[dict], final_loss: float, seconds: float) -> dict:
    """The recovery record: settings, first / last / checked losses, mean losses of the first and last 10% of steps."""
    tenth = max(1, len(losses) // 10)
    return {
        "method": "lora" + ("+kl" if settings["kl_weight"] > 0 else ""),
        **settings,
        "first_loss": losses[0]["loss"],
        "final_check_loss": final_loss,
        "last_loss": losses[-1]["loss"],
        "mean_loss_first_10pct": sum(x["loss"] for x in losses[:tenth]) / tenth,
        "mean_loss_last_10pct": sum(x["loss"] for x in losses[-tenth:]) / tenth,
        "time_s": seconds,
    }


def recover(
    model: nn.Module,
    train_windows: torch.Tensor,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    lr: float = 1e-4,
    steps: int = 100,
    batch_size: int = 4,
    teacher: nn.Module | None = None,
    kl_weight: float = 0.0,
    gradient_checkpointing: bool = False,
    bf16: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Fine-tune `model` with LoRA on `train_windows` (LongTensor [n, seqlen]) for `steps` optimiser steps (cycling
    through the windows in a seeded order), merge the adapter and return (merged model, record of settings and
    losses). The teacher, if given, is only read."""
    from peft import LoraConfig, get_peft_model

    _check(rank, alpha, dropout, lr, steps, batch_size, kl_weight, teacher)
    if train_windows.dim() != 2 or train_windows.dtype != torch.long:
        raise ValueError("train_windows must be a LongTensor [n_windows, seqlen]")
    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = backend().is_cuda(device) and backend().bf16_supported(device)
    targets = target_modules or lora_targets(model)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
    if gradient_checkpointing:
        peft_model.gradient_checkpointing_enable()
        peft_model.enable_input_require_grads()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(train_windows.shape[0], generator=torch.Generator().manual_seed(seed))
    if teacher is not None:
        teacher.eval()
    losses, t0 = [], time.perf_counter()
    peft_model.train()
    bar = tqdm(range(steps), desc="LoRA recovery", disable=not progress)
    for step in bar:
        idx = order[torch.arange(step * batch_size, (step + 1) * batch_size) % order.numel()]
        batch = train_windows[idx].to(device)
        losses.append({"step": step, **_train_step(peft_model, optim, batch, teacher, kl_weight, bf16)})
        value = losses[-1]["loss"]
        if progress:
            bar.set_postfix(loss=f"{value:.3f}")
        if not math.isfinite(value):
            raise FloatingPointError(f"recovery diverged at step {step} (loss {value}); lower the learning rate")
    final_loss = _check_after_training(peft_model, params, order, train_windows, batch_size, device, bf16, losses)
    merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(True)
    settings = {
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": targets,
        "lr": lr,
        "steps": steps,
        "batch_size": batch_size,
        "seqlen": int(train_windows.shape[1]),
        "train_windows": int(train_windows.shape[0]),
        "kl_weight": kl_weight,
        "gradient_checkpointing": gradient_checkpointing,
        "bf16": bf16,
        "seed": seed,
    }
    record = _record(settings, losses, final_loss, time.perf_counter() - t0)
    return merged, record
