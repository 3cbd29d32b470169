"""The fused memory lookup (Specification §6): one contract, two backends.

``memory_lookup(values, indices, scores, pre_values=None, pre_input=None, backend="auto")``
returns ``out`` of shape (T, D_v) with::

    g[t, i]         = <pre_values[indices[t, i]], pre_input[t]>   (1 without pre-values)
    out[t, slice k] = sum_i scores[t, i, k] * g[t, i] * values[indices[t, i], slice k]

where slice k is columns [k D_v / c, (k+1) D_v / c) and c = scores.shape[-1] ([UM] multi-core
scoring; [UM2] pre-values). Differentiable in values, scores, pre_values and pre_input;
repeated indices within a row accumulate.

Backends: ``"torch"`` (:mod:`minimem.kernels.reference`, eager PyTorch), ``"triton"``
(:mod:`minimem.kernels.triton_lookup`: compiled on a CUDA GPU, or Triton's interpreter on CPU
tensors when ``TRITON_INTERPRET=1`` was in the environment before triton was first imported),
``"auto"`` (triton for CUDA tensors, torch otherwise). Importing this module never imports
triton; the triton backend imports it on first use.

dtypes: indices int64; values/pre_values one floating dtype, scores/pre_input floating. The
computation and the output use the promoted dtype of all floating inputs; the Triton backend
accumulates in float32 and accepts float32, bfloat16 and float16. The index range check reads
the indices back (one device synchronisation on a GPU); benchmarks call the backends directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from minimem.kernels.reference import lookup_dtype, memory_lookup_torch

BACKENDS = ("auto", "torch", "triton")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_lookup_inputs(values, indices, scores, pre_values=None, pre_input=None) -> None:
    """Raise ValueError naming the offending argument if the inputs break the Specification §6 contract."""
    for name, t in (("values", values), ("indices", indices), ("scores", scores)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if values.dim() != 2:
        raise ValueError(f"values must have shape (N, D_v), got {_shape(values)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating dtype (float32, bfloat16, float16, float64), got {values.dtype}")
    N, d_value = values.shape
    if indices.dim() != 2:
        raise ValueError(f"indices must have shape (T, m), got {_shape(indices)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must have dtype torch.int64, got {indices.dtype}")
    T, m = indices.shape
    if scores.dim() != 3 or scores.shape[:2] != (T, m):
        raise ValueError(f"scores must have shape (T, m, c) = ({T}, {m}, c) to match indices, got {_shape(scores)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating dtype, got {scores.dtype}")
    cores = scores.shape[2]
    if cores < 1 or d_value % cores != 0:
        raise ValueError(
            f"scores.shape[-1] (c, the number of scoring cores) must be >= 1 and divide D_v={d_value}, got c={cores}"
        )
    if (pre_values is None) != (pre_input is None):
        given, missing = ("pre_values", "pre_input") if pre_input is None else ("pre_input", "pre_values")
        raise ValueError(f"{given} was given without {missing}: pass pre_values and pre_input together or neither")
    if pre_values is not None:
        if not isinstance(pre_values, torch.Tensor) or not isinstance(pre_input, torch.Tensor):
            raise ValueError("pre_values and pre_input must be torch.Tensors")
        if pre_values.dim() != 2 or pre_values.shape[0] != N:
            raise ValueError(
                f"pre_values must have shape (N, D_p) with N={N} rows like values, got {_shape(pre_values)}"
            )
        d_pre = pre_values.shape[1]
        if pre_input.dim() != 2 or pre_input.shape != (T, d_pre):
            raise ValueError(f"pre_input must have shape (T, D_p) = ({T}, {d_pre}), got {_shape(pre_input)}")
        if pre_values.dtype != values.dtype:
            raise ValueError(f"pre_values must have the dtype of values ({values.dtype}), got {pre_values.dtype}")
        if not pre_input.is_floating_point():
            raise ValueError(f"pre_input must be a floating dtype, got {pre_input.dtype}")
    tensors = [values, indices, scores] + ([pre_values, pre_input] if pre_values is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if indices.numel() and (N == 0 or bool(((indices < 0) | (indices >= N)).any())):
        lo, hi = int(indices.min()), int(indices.max())
        raise ValueError(f"indices must lie in [0, N) = [0, {N}), got values in [{lo}, {hi}]")


def memory_lookup(
    values: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    pre_values: Optional[torch.Tensor] = None,
    pre_input: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """(T, D_v) memory read: per-core weighted sum of the m selected value rows (Specification §6)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_lookup_inputs(values, indices, scores, pre_values, pre_input)
    if backend == "auto":
        backend = "triton" if values.is_cuda else "torch"
    if backend == "torch":
        return memory_lookup_torch(values, indices, scores, pre_values, pre_input)
    from minimem.kernels.triton_lookup import memory_lookup_triton

    return memory_lookup_triton(values, indices, scores, pre_values, pre_input)


__all__ = ["BACKENDS", "memory_lookup", "memory_lookup_torch", "check_lookup_inputs", "lookup_dtype"]
