"""Memory usage metrics [PKM] §4: is the memory used, and how evenly?

Over an evaluation set, let z_i be the number of times slot i was selected (unweighted) or
the sum of the weights it received (weighted). [PKM] reports
- usage: the fraction of slots with z_i != 0 ("memory usage");
- KL divergence of the normalised z from the uniform distribution,
  KL(p || uniform) = log N + sum_i p_i log p_i with p = z / sum(z) (0 log 0 = 0):
  0 for perfectly even use, log N when one slot takes everything.
Collapse onto few keys is the classic failure; these numbers show it.

Any memory module can be measured by :func:`memory_usage_report` if it exposes ``n_slots``
(int) and, after each forward, ``last_indices`` (..., m) int64 and ``last_weights`` of the same
shape (or with one extra trailing axis of c scoring cores, summed). Weights enter as |w|, so
signed scores (no softmax, [UM]) count by magnitude.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm


def slot_counts(indices: torch.Tensor, n_slots: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z (N,) float64: hits per slot, or, with ``weights`` (same shape as indices), summed weight."""
    if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
        raise ValueError(f"n_slots must be a positive integer, got {n_slots!r}")
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must have dtype torch.int64, got {indices.dtype}")
    flat = indices.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_slots):
        lo, hi = int(flat.min()), int(flat.max())
        raise ValueError(f"indices must lie in [0, n_slots={n_slots}), got values in [{lo}, {hi}]")
    z = torch.zeros(n_slots, dtype=torch.float64, device=indices.device)
    if weights is None:
        return z.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    if weights.shape != indices.shape:
        raise ValueError(f"weights must have the shape of indices {tuple(indices.shape)}, got {tuple(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative (pass |w| for signed scores)")
    return z.index_add_(0, flat, weights.detach().reshape(-1).to(torch.float64))


def usage_fraction(z: torch.Tensor) -> float:
    """Fraction of slots with z_i != 0."""
    if z.dim() != 1 or z.numel() == 0:
        raise ValueError(f"z must be a non-empty 1-D tensor of per-slot counts, got shape {tuple(z.shape)}")
    return float((z != 0).sum()) / z.numel()


def kl_from_uniform(z: torch.Tensor) -> float:
    """KL(z / sum z || uniform over N) = log N + sum p log p, in nats."""
    if z.dim() != 1 or z.numel() == 0:
        raise ValueError(f"z must be a non-empty 1-D tensor of per-slot counts, got shape {tuple(z.shape)}")
    if bool((z < 0).any()):
        raise ValueError("z must be non-negative")
    total = float(z.sum())
    if total <= 0:
        raise ValueError("z must have a positive sum (no slot was used)")
    p = z.double() / total
    return math.log(z.numel()) + float(torch.xlogy(p, p).sum())  # xlogy: 0 log 0 = 0


def usage_metrics(indices: torch.Tensor, n_slots: int, weights: Optional[torch.Tensor] = None) -> dict:
    """{'usage', 'kl_unweighted', 'kl_weighted' (if weights given)} for one set of retrievals."""
    hits = slot_counts(indices, n_slots)
    out = {"usage": usage_fraction(hits), "kl_unweighted": kl_from_uniform(hits)}
    if weights is not None:
        mass = slot_counts(indices, n_slots, weights)
        out["usage"] = usage_fraction(mass)  # slots that received non-zero weight
        out["kl_weighted"] = kl_from_uniform(mass)
    return out


def named_memory_modules(model: torch.nn.Module) -> dict:
    """{qualified name: module} for every module exposing ``n_slots`` and ``last_indices``."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "n_slots") and hasattr(module, "last_indices")
    }


def _weights_like_indices(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    weights = weights.detach().abs()
    if weights.shape == indices.shape:
        return weights
    if weights.dim() == indices.dim() + 1 and weights.shape[:-1] == indices.shape:
        return weights.sum(-1)  # multi-core scores: total magnitude per slot
    raise ValueError(f"last_weights shape {tuple(weights.shape)} does not match last_indices {tuple(indices.shape)}")


@torch.no_grad()
def memory_usage_report(model: torch.nn.Module, batches: Iterable, max_batches: Optional[int] = None) -> dict:
    """Run ``model`` (eval mode) over ``batches`` and return the usage metrics per memory layer.

    ``batches`` yields token tensors (B, T) or (x, y) pairs. Returns
    ``{name: {'n_slots', 'usage', 'kl_unweighted', 'kl_weighted'}}``; 'kl_weighted' only for
    layers with ``last_weights``. The model's training mode is restored afterwards.
    """
    layers = named_memory_modules(model)
    if not layers:
        raise ValueError("model has no memory layer (no module with n_slots and last_indices)")
    hits = {name: None for name in layers}
    mass = {name: None for name in layers}
    was_training = model.training
    model.eval()
    try:
        for step, batch in enumerate(tqdm(batches, total=max_batches, desc="memory usage", leave=False)):
            if max_batches is not None and step >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for module in layers.values():
                module.last_indices = None  # a layer this forward skips must not count twice
            model(x)
            for name, module in layers.items():
                idx = module.last_indices
                if idx is None:
                    continue  # layer not reached (e.g. not in this forward)
                h = slot_counts(idx, module.n_slots)
                hits[name] = h if hits[name] is None else hits[name] + h
                w = getattr(module, "last_weights", None)
                if w is not None:
                    z = slot_counts(idx, module.n_slots, _weights_like_indices(w, idx))
                    mass[name] = z if mass[name] is None else mass[name] + z
    finally:
        model.train(was_training)
    report = {}
    for name, module in layers.items():
        if hits[name] is None:
            continue
        entry = {
            "n_slots": module.n_slots,
            "usage": usage_fraction(hits[name]),
            "kl_unweighted": kl_from_uniform(hits[name]),
        }
        if mass[name] is not None and float(mass[name].sum()) > 0:
            entry["usage"] = usage_fraction(mass[name])
            entry["kl_weighted"] = kl_from_uniform(mass[name])
        report[name] = entry
    return report
