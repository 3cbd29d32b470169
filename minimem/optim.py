"""AdamW with parameter groups, and the learning-rate schedule.

Three groups, as in nanoGPT plus one for memories:

- ``decay``: matrices and embeddings (parameters with >= 2 dimensions) get weight decay;
- ``no_decay``: norms' gains and biases (< 2 dimensions) do not;
- ``memory_values``: parameters flagged ``p.is_memory_value = True`` (value and pre-value
  tables of the memory layers) train with ``lr * value_lr_mult`` ([PKM] gives values a larger
  learning rate; [UM] §3 decays that multiplier linearly to 1x, [UM2] keeps it constant) and
  no weight decay: a lookup touches a few rows per step, and decoupled decay would shrink
  every row, used or not, at every step (the [PKM] code trains values without decay too).

The schedule is linear warmup to ``lr`` over ``warmup_steps`` steps, then a cosine from
``lr`` down to ``min_lr`` at ``max_steps`` (nanoGPT's recipe).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minimem.config import TrainConfig

GROUP_NAMES = ("decay", "no_decay", "memory_values")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into the three groups (empty ones dropped).

    Each group carries a ``name``; tied parameters appear once (``named_parameters`` de-duplicates).
    """
    groups = {name: [] for name in GROUP_NAMES}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "is_memory_value", False):
            groups["memory_values"].append(p)
        elif p.dim() >= 2:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    decay = {"decay": weight_decay, "no_decay": 0.0, "memory_values": 0.0}
    return [{"name": name, "params": params, "weight_decay": decay[name]} for name, params in groups.items() if params]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; learning rates are set every step by :func:`set_learning_rates`."""
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        foreach=True,
    )


def learning_rate(step: int, train: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = train.max_steps - train.warmup_steps
    if decay_steps <= 0:
        return train.lr
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def value_lr_multiplier(step: int, train: TrainConfig) -> float:
    """The memory-value multiplier at ``step``: constant, or linear from ``value_lr_mult`` to 1x [UM] §3."""
    if train.value_lr_schedule == "constant":
        return train.value_lr_mult
    if train.value_lr_schedule == "linear_decay":
        progress = min(1.0, step / max(1, train.max_steps - 1))
        return train.value_lr_mult + (1.0 - train.value_lr_mult) * progress
    raise ValueError(f"train.value_lr_schedule must be 'constant' or 'linear_decay', got {train.value_lr_schedule!r}")


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, train: TrainConfig) -> float:
    """Write step ``step``'s learning rate into every group; return the base rate."""
    lr = learning_rate(step, train)
    for group in optimizer.param_groups:
        mult = value_lr_multiplier(step, train) if group.get("name") == "memory_values" else 1.0
        group["lr"] = lr * mult
    return lr
