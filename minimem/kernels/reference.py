"""The memory lookup in plain PyTorch: the reference every other backend is tested against.

Contract (Specification §6)::

    g[t, i]          = <pre_values[indices[t, i]], pre_input[t]>   (1 without pre-values)
    out[t, slice k]  = sum_i scores[t, i, k] * g[t, i] * values[indices[t, i], slice k]

This is UltraMemV2's read of the memory before the output projection ([UM2] §3.2, the
PEER-style pre-values; [UM] §2.2 multi-core scoring: core k's score weights the k-th of c
slices of the value row) and, with c = 1 and no pre-values, [PKM]'s weighted sum of the
top-m value rows (an ``nn.EmbeddingBag`` with per-sample weights).

Eager implementation: gather the m rows of every token (``index_select``, whose backward is
``index_add_``, so repeated indices accumulate), compute the optional pre-value gate and the per-
core weighted sum as elementwise products summed over the feature and the m axes.
It materialises the (T, m, D_v) and (T, m, D_p) gathered rows, which is what the fused
Triton kernel avoids. No input checking here: ``minimem.kernels.memory_lookup`` does it.
"""

from __future__ import annotations

from typing import Optional

import torch


def lookup_dtype(values: torch.Tensor, scores: torch.Tensor, pre_values=None, pre_input=None) -> torch.dtype:
    """The dtype of the computation and of the output: the promotion of all floating inputs."""
    dtype = torch.promote_types(values.dtype, scores.dtype)
    for extra in (pre_values, pre_input):
        if extra is not None:
            dtype = torch.promote_types(dtype, extra.dtype)
    return dtype


def memory_lookup_torch(
    values: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    pre_values: Optional[torch.Tensor] = None,
    pre_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(T, D_v) weighted sum of the selected value rows, per scoring core (Specification §6)."""
    T, m = indices.shape
    d_value = values.shape[1]
    cores = scores.shape[-1]
    dtype = lookup_dtype(values, scores, pre_values, pre_input)
    flat = indices.reshape(-1)
    rows = values.index_select(0, flat).to(dtype).view(T, m, cores, d_value // cores)
    weights = scores.to(dtype)  # (T, m, c)
    if pre_values is not None:
        pre_rows = pre_values.index_select(0, flat).to(dtype).view(T, m, pre_values.shape[1])
        gate = (pre_rows * pre_input.to(dtype).unsqueeze(1)).sum(-1, keepdim=True)  # (T, m, 1): g[t, i]
        weights = weights * gate
    # Sum over the m selected slots, per core. Elementwise product + sum rather than a batched
    # 1 x m matmul: on CPU its backward is ~3x faster (measured at the course's shapes).
    out = (rows * weights.unsqueeze(-1)).sum(1)  # (T, c, D_v / c)
    return out.reshape(T, d_value)
