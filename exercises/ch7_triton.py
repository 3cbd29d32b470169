"""Chapter 7 exercises: a fused memory lookup in Triton.

Fill in each function, then grade them with ``minimem grade 7``. Without a GPU the graders run
your kernels in Triton's interpreter on CPU tensors: ``minimem grade`` sets TRITON_INTERPRET=1
before triton is imported (to run a kernel yourself in a notebook, set it first:
``os.environ["TRITON_INTERPRET"] = "1"`` before ``import triton``). With a CUDA GPU and without
TRITON_INTERPRET the graders pass CUDA tensors and your kernel is compiled.

The operation (Specification §6 with one scoring core and no pre-values; [PKM]'s weighted sum of the
top-m value rows, an ``nn.EmbeddingBag`` with per-sample weights):

    out[t, :] = sum_{i < m} scores[t, i] * values[indices[t, i], :]

values (N, D_v) float32, indices (T, m) int64 in [0, N), scores (T, m) float32, out (T, D_v)
float32. Indices may repeat within a row: repeated slots add up.
"""

from __future__ import annotations

import torch


def weighted_gather(values: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Exercise 7.1: the forward lookup as a Triton kernel (``@triton.jit``, launched here).

    Shapes and the equation: see the module docstring. Write a kernel that gives each program
    one token t (and, if you like, one block of columns of D_v): it loops over the m slots,
    loads scores[t, i] and the row values[indices[t, i], block] and accumulates their product in
    float32, then stores the block of out[t]. Block sizes are ``tl.constexpr`` powers of two
    (``triton.next_power_of_2``, capped: a tile is not the whole row); mask the loads and the
    store when D_v is not a multiple of the block. m, D_v and T are arbitrary and may exceed any
    one tile (m need not be a power of two); the inputs may be strided views (pass the strides,
    or make them contiguous). The graders check that one fused kernel does the lookup (one launch
    per call, whatever T and m; no (T, m, D_v) gather in torch) and, in the interpreter, that no
    load or store leaves the tensors it was given. Raise ValueError naming the argument for:
    ``indices`` outside [0, N) or not int64 (check on the host before launching: a kernel
    reading out of bounds fails silently), ``scores`` not (T, m), ``values`` not 2-D.
    """
    raise NotImplementedError("exercise 7.1: write weighted_gather in exercises/ch7_triton.py")


def weighted_gather_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 7.2: the backward of :func:`weighted_gather`: a scatter-add and a gathered dot product.

    grad_out (T, D_v) is dL/d out. Return ``(grad_values, grad_scores)``:

        grad_values[r, :] = sum over (t, i) with indices[t, i] == r of scores[t, i] * grad_out[t, :]   (N, D_v)
        grad_scores[t, i] = <grad_out[t, :], values[indices[t, i], :]>                                  (T, m)

    grad_values is a *scatter-add*: several (t, i) may hit the same row r (different tokens, or
    one token repeating a slot), and all their contributions must add up. Beware
    ``grad_values[indices] += ...``: with repeated indices advanced-indexing assignment keeps
    only one write. Use ``index_add_`` / ``scatter_add_`` in PyTorch, or a Triton kernel with
    ``tl.atomic_add`` (what minimem.kernels.triton_lookup does on a GPU). Same dtypes as the
    forward; rows no token selected get zero gradient.
    """
    raise NotImplementedError("exercise 7.2: write weighted_gather_backward in exercises/ch7_triton.py")
