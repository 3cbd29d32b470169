"""Tucker-decomposed query-key retrieval (TDQKR) and multi-core scoring [UM] §3.1.

With r ranks, s[i, j] = sum_ab S_row[a, i] C[a, b] S_col[b, j]. The grid no
longer splits into a sum, so candidates come from the rank-1 approximation C ~ sigma u t^T
(top-m of u^T S_row and of t^T S_col), and the m x m candidate grid is rescored with the full
C. Multi-core scoring (MCS, [UM]): C = sum_k C^(k), selection by the summed score, and
each core's own score is returned so that it can weight its slice of the value vector.

Candidate order and ties follow :mod:`minimem.product_keys`' rule; ``tucker_exact_topk`` scores all
N slots, the reference that ``tucker_recall`` measures the fast path against. ``candidates`` M >= m
widens the search to the top-M rows and columns (an M x M grid; M = n finds the exact top-m).
"""

from __future__ import annotations

from typing import Optional

import torch

from minimem.product_keys import _check_m, ordered_topk

__all__ = ["rank1_core", "rank1_cores", "tucker_topk", "tucker_exact_topk", "exact_search", "tucker_recall"]


@torch.no_grad()
def rank1_core(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular vectors of the (r, r) Tucker core: C ~ sigma u t^T [UM] §3.1.

    Computed by ``torch.linalg.svd`` outside autograd. Sign convention: the entry of u with
    the largest |.| (the first such) is made positive and t is flipped with it, so u t^T (and
    sigma > 0) is unchanged. Returns unit vectors u, t, each (r,).
    """
    if core.dim() != 2 or core.shape[0] != core.shape[1]:
        raise ValueError(f"core must be a square (r, r) tensor, got shape {tuple(core.shape)}")
    u, t = rank1_cores(core.unsqueeze(0))
    return u[0], t[0]


@torch.no_grad()
def rank1_cores(cores: torch.Tensor, previous: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rank1_core` of each of the (B, r, r) cores at once (one batched SVD): u, t (B, r).

    ``previous`` (B, r): the continuous sign rule (official code): (u, t) flips where u . previous < 0.
    """
    if cores.dim() != 3 or cores.shape[1] != cores.shape[2]:
        raise ValueError(f"cores must be a (B, r, r) tensor, got shape {tuple(cores.shape)}")
    U, _, Vh = torch.linalg.svd(cores.detach())
    u, t = U[:, :, 0], Vh[:, 0, :]
    sign = u.gather(1, u.abs().argmax(1, keepdim=True)).sign()  # of the first entry of largest |.| (never 0)
    if previous is not None:  # a zero previous (before the first refresh) keeps the fixed rule
        sign = torch.where((u * sign * previous.to(u)).sum(1, keepdim=True) < 0, -sign, sign)
    return u * sign, t * sign  # -1 flips u and t together, +1 keeps them


def _check_tucker_inputs(s_row, s_col, cores, m) -> None:
    if s_row.dim() != 3 or s_row.shape != s_col.shape:
        raise ValueError(
            f"s_row and s_col must be (T, r, n) tensors of one shape, got {tuple(s_row.shape)} and {tuple(s_col.shape)}"
        )
    r = s_row.shape[1]
    if cores.dim() != 3 or cores.shape[1:] != (r, r):
        raise ValueError(f"cores must be (c, r, r) with r={r}, got shape {tuple(cores.shape)}")
    _check_m(m, s_row.shape[2])


def _per_core_scores(rows: torch.Tensor, cols: torch.Tensor, cores: torch.Tensor, i, j) -> torch.Tensor:
    """Core k's score S_row[:, i]^T C^(k) S_col[:, j] at slots (i, j) (T, m): (T, m, c), with autograd.

    rows, cols (r, T, n) rank-wise scores, tokens inside. The score is the inner product of
    C^(k) with the outer product of the slot's row and column rank scores: one (T m, r^2) x
    (r^2, c) matmul, so that the backward's reductions over the T m slots are matmuls too.
    """
    r, T, _ = rows.shape
    c, m = cores.shape[0], i.shape[1]
    R = rows.gather(2, i.expand(r, T, m))  # (r, T, m)
    K = cols.gather(2, j.expand(r, T, m))
    pairs = (R.unsqueeze(1) * K.unsqueeze(0)).view(r * r, T * m)  # [a, b] = R[a] K[b]
    return (pairs.T @ cores.reshape(c, r * r).T).view(T, m, c)


def tucker_topk(
    s_row: torch.Tensor,
    s_col: torch.Tensor,
    cores: torch.Tensor,
    m: int,
    u: Optional[torch.Tensor] = None,
    t: Optional[torch.Tensor] = None,
    candidates: int = 0,
    signed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TDQKR candidate search + exact rescoring [UM] §3.1, with multi-core scoring (MCS) [UM].

    s_row, s_col (T, r, n) rank-wise row / column scores; cores (c, r, r); C = cores.sum(0).
    (u, t) = :func:`rank1_core` (C) unless given. Candidates: top-M rows of u^T s_row, top-M
    columns of t^T s_col (M = ``candidates`` in [m, n], 0 -> m); the M x M grid is rescored with
    the full C and its top-m kept (ties to the lower candidate row rank, then column rank).
    ``signed``: the bottom-M of each side as well (a 2M x 2M grid, 2M <= n): a slot whose row and
    column factor scores are both negative has a large positive product, which top-M alone misses.

    Returns per-core scores (T, m, c) at the chosen slots (differentiable in s_row, s_col,
    cores) and flat indices (T, m) = i * n + j, sorted by descending summed score. Exact when
    C has rank 1 and u^T s_row, t^T s_col are non-negative; otherwise measure with
    :func:`tucker_recall`.

    Layout: the work runs on (r, T, n) views, tokens inside, and the r x r contractions are
    elementwise products summed over the rank axis (r is tiny: a T-batched matmul of r x r
    matrices is slower on CPU). Fastest when s_row and s_col are transposed views of (r, T, n)
    tensors, as :meth:`minimem.ultramem.TuckerRetrieval.rank_scores` returns them.
    """
    _check_tucker_inputs(s_row, s_col, cores, m)
    if (u is None) != (t is None):
        raise ValueError("u and t must be given together or both left None")
    T, r, n = s_row.shape
    M = candidates or m
    if not m <= M <= (n // 2 if signed else n):
        raise ValueError(f"candidates must be 0 (m) or in [m={m}, {'n/2' if signed else 'n'}={n}], got {candidates}")
    rows_rt, cols_rt = s_row.transpose(0, 1), s_col.transpose(0, 1)  # (r, T, n)
    with torch.no_grad():
        C = cores.detach().sum(0)
        if u is None:
            u, t = rank1_core(C)
        if u.shape != (r,) or t.shape != (r,):
            raise ValueError(f"u and t must have shape ({r},), got {tuple(u.shape)} and {tuple(t.shape)}")
        u, t = u.to(s_row).view(r, 1, 1), t.to(s_row).view(r, 1, 1)  # dtype and device of the scores
        R_all, K_all = rows_rt.detach(), cols_rt.detach()
        row_keys, col_keys = (u * R_all).sum(0), (t * K_all).sum(0)  # (T, n): u^T S_row, t^T S_col
        _, rows = ordered_topk(row_keys, M)  # (T, M): top-M of u^T S_row
        _, cols = ordered_topk(col_keys, M)
        if signed:  # and the bottom-M: (T, 2M), disjoint from the top-M since 2M <= n
            rows = torch.cat((rows, ordered_topk(-row_keys, M)[1]), 1)
            cols = torch.cat((cols, ordered_topk(-col_keys, M)[1]), 1)
            M = 2 * M
        R = R_all.gather(2, rows.expand(r, T, M))  # (r, T, M): the candidates' rank scores
        K = K_all.gather(2, cols.expand(r, T, M))
        RC = (C.view(r, r, 1, 1) * R.unsqueeze(1)).sum(0)  # (r, T, M): [b, i] = sum_a R[a, i] C[a, b]
        grid = (RC.unsqueeze(-1) * K.unsqueeze(-2)).sum(0)  # (T, M, M): [i, j] = sum_b RC[b, i] K[b, j]
        _, cell = ordered_topk(grid.view(T, M * M), m)
        a = torch.div(cell, M, rounding_mode="floor")  # candidate row rank, column rank b = cell - a M
        i, j = rows.gather(1, a), cols.gather(1, cell - a * M)
    return _per_core_scores(rows_rt, cols_rt, cores, i, j), i * n + j


def tucker_exact_topk(s_row, s_col, cores, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`tucker_topk`: score the full n x n grid with C = cores.sum(0).

    Top-m by (summed score desc, flat index asc). Returns per-core scores (T, m, c) and flat
    indices (T, m). O(T n^2 r).
    """
    _check_tucker_inputs(s_row, s_col, cores, m)
    n = s_row.shape[2]
    with torch.no_grad():
        full = torch.einsum("tai,ab,tbj->tij", s_row.detach(), cores.detach().sum(0), s_col.detach())
        _, flat = ordered_topk(full.flatten(1), m)
    return _per_core_scores(s_row.transpose(0, 1), s_col.transpose(0, 1), cores, flat // n, flat % n), flat


def exact_search(s_row, s_col, cores, m: int, u=None, t=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tucker_exact_topk` with :func:`tucker_topk`'s signature (``search: exact``; u, t unused)."""
    return tucker_exact_topk(s_row, s_col, cores, m)


def tucker_recall(s_row, s_col, cores, m: int, candidates: int = 0, u=None, t=None, signed=False) -> float:
    """Fraction of the exact top-m slots (over all tokens) that :func:`tucker_topk` finds."""
    _, fast = tucker_topk(s_row, s_col, cores, m, u, t, candidates, signed)
    _, exact = tucker_exact_topk(s_row, s_col, cores, m)
    hits = (fast.unsqueeze(2) == exact.unsqueeze(1)).any(2).sum()
    return float(hits) / exact.numel()
