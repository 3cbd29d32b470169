"""Chapter 5 exercises: UltraMem [UM]: TDQKR, multi-core scoring, implicit value expansion.

Fill in each function, then grade them with ``minimem grade 5``.

TDQKR ([UM] §3.1): with Tucker rank r, every token has r row scores per row i and r column
scores per column j of the n x n slot grid, s_row (T, r, n) and s_col (T, r, n); a learned core
C (r, r) scores grid cell (i, j) as

    S[t, i, j] = sum_{a, b} s_row[t, a, i] C[a, b] s_col[t, b, j]       (flat slot index i * n + j)

With multi-core scoring (MCS, [UM] §3.2) there are c cores C^(1..c), ``cores`` (c, r, r), and
C = sum_k C^(k) is the one used to select slots.
"""

from __future__ import annotations

import torch


def rank1_core(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 5.1: the rank-1 approximation C ~ sigma u t^T that TDQKR selects candidates with.

    core (r, r). Return ``(u, t)``, each (r,) in core's dtype: the leading left and right
    singular vectors of core (``torch.linalg.svd``; unit length; sigma > 0 is the largest
    singular value). Singular vectors are defined up to a common sign; fix it like minimem:
    make the entry of u with the largest absolute value positive (the first one if several tie)
    and flip t with it, so u t^T is unchanged. Computed outside autograd (no gradient; [UM]
    recomputes it once per optimiser step). Raise ValueError naming ``core`` unless it is a
    square 2-D tensor.
    """
    raise NotImplementedError("exercise 5.1: write rank1_core in exercises/ch5_ultramem.py")


def tucker_topk(
    s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 5.2: TDQKR candidate scoring with multi-core scores [UM] §3.1-3.2.

    s_row, s_col (T, r, n); cores (c, r, r); 1 <= m <= n. Steps, per token:
      1. C = cores.sum(0); (u, t) = rank1_core(C) (exercise 5.1, with its sign rule).
      2. Candidate rows: the m rows i with the largest u^T s_row[:, i]; candidate columns: the m
         columns j with the largest t^T s_col[:, j].
      3. Rescore the m x m candidate grid exactly with the full C (formula in the module
         docstring) and keep its m best cells, sorted by descending score.
    Return ``(scores, indices)``: indices (T, m) int64 flat slot indices i * n + j; scores
    (T, m, c) in the inputs' dtype (float64 or float32), where
    scores[t, l, k] = s_row[t, :, i]^T C^(k) s_col[t, :, j] is core k's own score at the l-th
    chosen slot (they sum to the selection score). Scores must be
    differentiable in s_row, s_col and cores; the selection is not. This is approximate when C
    has rank > 1 (that is the point of the rank-1 trick); it is exact for a rank-1 core with
    non-negative u^T s_row and t^T s_col. Raise ValueError naming ``m`` unless 1 <= m <= n.
    """
    raise NotImplementedError("exercise 5.2: write tucker_topk in exercises/ch5_ultramem.py")


def multi_core_read(values: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Exercise 5.3: the multi-core-scoring read of the value table [UM] §3.2 (Specification §6).

    values (N, D_v); indices (T, m) int64 in [0, N); scores (T, m, c) with D_v divisible by c.
    The value row is cut into c slices of D_v / c columns, and core k's score weights slice k:

        out[t, k D_v/c : (k+1) D_v/c] = sum_i scores[t, i, k] * values[indices[t, i], k D_v/c : (k+1) D_v/c]

    Returns (T, D_v) in the dtype of values and scores (float64, float32 or bfloat16, the same for
    both). Repeated indices add up. Raise ValueError naming ``scores`` when c does not divide D_v,
    and naming ``indices`` when an index is outside [0, N). Differentiable in values and scores.
    (minimem: ``minimem.kernels.memory_lookup``.)
    """
    raise NotImplementedError("exercise 5.3: write multi_core_read in exercises/ch5_ultramem.py")


def implicit_value_expansion(
    values: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, projections: torch.Tensor
) -> torch.Tensor:
    """Exercise 5.4: implicit value expansion (IVE) [UM] §3.3: E virtual tables from one physical table.

    The virtual memory has E N slots; virtual slot v is physical row ``rows`` = v % N of virtual
    block ``blocks`` = v // N (after UltraMem's fixed shuffle), and the virtual value of (row,
    block p) is values[row] @ projections[p]. Computing every virtual value would cost E N D_v h;
    IVE pools first, on the physical table, then projects once per block:

        pooled[t, p] = sum over the i with blocks[t, i] == p of  scores[t, i] (*) values[rows[t, i]]   (D_v,)
        out[t]       = sum_p pooled[t, p] @ projections[p]                                              (h,)

    where (*) is the multi-core product of exercise 5.3 (core k's score weights slice k of the row).
    values (N, D_v); rows, blocks (T, m) int64 with rows in [0, N) and blocks in [0, E);
    scores (T, m, c); projections (E, D_v, h). Returns (T, h) in the dtype of values (float64
    or float32, the same for all); equals summing
    scores (*) (values[row] @ projections[block]) over the m slots. Differentiable in values,
    scores and projections.
    """
    raise NotImplementedError("exercise 5.4: write implicit_value_expansion in exercises/ch5_ultramem.py")
