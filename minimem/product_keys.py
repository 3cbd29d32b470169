"""Product keys: the exact top-m of N = n^2 memory slots without scoring all of them.

Product keys [PKM] §3.2: slot (i, j) has key concat(K1[i], K2[j]), so its score splits into a
row part and a column part, s[i, j] = s1[i] + s2[j] with s1 = q1 K1^T and s2 = q2 K2^T. The
top-m slots lie in the grid of the top-m rows times the top-m columns: score that m x m grid
and keep its top-m. Cost O((2n + m^2) D_k) instead of O(N D_k). Flat slot index i * n + j.

Tie rule (every function here and in :mod:`minimem.tucker`): slots are ordered by the key

    (score descending, s1[i] descending, i ascending, s2[j] descending, j ascending),

i.e. by score, ties going to the better *row* (higher row score, then lower row index), then
to the better *column*. Equivalently: rank the rows by (s1 desc, i asc) and the columns by
(s2 desc, j asc); among equal scores the slot with the lower (row rank, column rank) wins.
In exact arithmetic (integer keys, say) equal scores with equal s1 have equal s2, so this
reads "score, then row score, then lower flat index".

Why the fast path returns exactly the brute-force top-m under this rule: take a slot (i, j)
whose row i is not among the top-m rows. Each of the m top rows i' ranks ahead of i, so
s1[i'] >= s1[i], hence fl(s1[i'] + s2[j]) >= fl(s1[i] + s2[j]) (rounding is monotone), and
on equality the row rank decides for (i', j). So m slots precede (i, j): it is not in the
top-m. Same for columns. Hence the brute-force top-m lies in the candidate grid, and the grid
keeps the brute-force order. (Plain "lower flat index wins" is not enough in floating point:
s1[i'] > s1[i] can round to the same sum, and then i' > i would lose.) The same argument
inside the grid prunes it: cell (a, b) of ranked rows x ranked columns is preceded by every
cell (a' <= a, b' <= b), so only the cells with (a+1)(b+1) <= m can be in the top-m.
"""

from __future__ import annotations

import torch

__all__ = [
    "product_key_topk",
    "brute_force_topk",
    "multihead_product_key_topk",
    "subkey_scores_topk",
    "ordered_topk",
]


# --------------------------------------------------------------------------- helpers


def ordered_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim of (R, L) ``x``, ties to the lower position.

    Returns (values, positions), each (R, k), sorted by (value desc, position asc): exactly
    ``torch.sort(x, descending=True, stable=True)[:, :k]``. Fast path: ``torch.topk`` of k + 1
    values. A row whose k + 1 values are strictly decreasing has no tie inside its top-k nor
    across the boundary, so ``torch.topk``'s answer is the stable sort's; only the other rows
    (equal values, where ``torch.topk`` picks arbitrarily, or NaNs) take the full stable sort.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D (R, L) tensor, got shape {tuple(x.shape)}")
    L = x.shape[-1]
    _check_m(k, L, name="k")
    values, pos = torch.topk(x, min(k + 1, L), dim=-1)  # one extra to see a tie at the boundary
    decreasing = values.diff(dim=1) < 0  # False at a tie or a NaN
    values, pos = values.narrow(1, 0, k), pos.narrow(1, 0, k)
    if not bool(decreasing.all()):
        rows = (~decreasing.all(dim=1)).nonzero().squeeze(1)  # rows not strictly decreasing
        exact = torch.sort(x[rows], dim=-1, descending=True, stable=True)
        values, pos = values.clone(), pos.clone()
        values[rows], pos[rows] = exact.values[:, :k], exact.indices[:, :k]
    return values, pos


def _check_m(m, n: int, name: str = "m") -> None:
    if isinstance(m, bool) or not isinstance(m, int):
        raise ValueError(f"{name} must be an integer in [1, n={n}], got {m!r}")
    if not 1 <= m <= n:
        raise ValueError(f"{name} must be in [1, n={n}], got {m}")


def _check_product_key_inputs(q1, q2, keys1, keys2, m) -> None:
    for name, t in (("q1", q1), ("q2", q2), ("keys1", keys1), ("keys2", keys2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got shape {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q1.shape != q2.shape:
        raise ValueError(f"q1 and q2 must have the same shape (T, d), got {tuple(q1.shape)} and {tuple(q2.shape)}")
    if keys1.shape != keys2.shape:
        raise ValueError(
            f"keys1 and keys2 must have the same shape (n, d), got {tuple(keys1.shape)} and {tuple(keys2.shape)}"
        )
    if keys1.shape[1] != q1.shape[1]:
        raise ValueError(f"keys width d={keys1.shape[1]} must equal the query half width d={q1.shape[1]}")
    _check_m(m, keys1.shape[0])


def _ranked(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (R, n) sub-key scores by (score desc, index asc): (sorted scores, original indices)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True)


# --------------------------------------------------------------------------- product keys [PKM]


def _candidate_cells(m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells (a, b) of the m x m grid of ranked rows x ranked columns with (a+1)(b+1) <= m.

    Every cell (a', b') with a' <= a and b' <= b precedes (a, b) (score >=, ties to lower rank),
    so a cell with (a+1)(b+1) > m has more than m - 1 predecessors and is never in the top-m.
    That leaves about m ln m cells instead of m^2. Listed in lexicographic (a, b) order.
    """
    r = torch.arange(1, m + 1, device=device)
    return ((r[:, None] * r[None, :]) <= m).nonzero(as_tuple=True)


def subkey_scores_topk(s1: torch.Tensor, s2: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-m of s1[i] + s2[j] from row scores s1 (R, n) and column scores s2 (R, n).

    The core of :func:`product_key_topk` [PKM] §3.2, with the module's tie rule. Returns scores
    (R, m) (differentiable in s1, s2) and flat indices i * n + j (R, m), best first.
    """
    if s1.dim() != 2 or s1.shape != s2.shape:
        raise ValueError(f"s1 and s2 must be (R, n) tensors of one shape, got {tuple(s1.shape)} and {tuple(s2.shape)}")
    n = s1.shape[1]
    _check_m(m, n)
    with torch.no_grad():
        top1, rows = ordered_topk(s1, m)  # (R, m): the m best rows, best first
        top2, cols = ordered_topk(s2, m)
        a, b = _candidate_cells(m, s1.device)  # the (a, b) grid cells with (a+1)(b+1) <= m
        grid = top1.index_select(1, a) + top2.index_select(1, b)  # (R, P), cells in (a, b) order
        _, cell = ordered_topk(grid, m)  # ties -> lower (row rank, column rank)
        i = rows.gather(1, a[cell])
        j = cols.gather(1, b[cell])
    scores = s1.gather(1, i) + s2.gather(1, j)  # recomputed with autograd, same values
    return scores, i * n + j


def product_key_topk(q1, q2, keys1, keys2, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-m product-key retrieval [PKM] §3.2 (Specification §6).

    q1, q2 (T, d) query halves; keys1, keys2 (n, d) sub-key tables; 1 <= m <= n.
    Returns scores (T, m), sorted descending, differentiable in the queries and keys, and flat
    slot indices (T, m) = i * n + j, equal to :func:`brute_force_topk` including ties.
    """
    _check_product_key_inputs(q1, q2, keys1, keys2, m)
    return subkey_scores_topk(q1 @ keys1.T, q2 @ keys2.T, m)


def brute_force_topk(q1, q2, keys1, keys2, m: int, chunk_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all N = n^2 slots and take the top-m under the module's tie rule.

    O(T N): all N sums per token, formed in (row rank, column rank) order so that the tie rule is
    "lower position wins"; tokens are processed in chunks of about ``chunk_elements`` scores.
    """
    _check_product_key_inputs(q1, q2, keys1, keys2, m)
    s1, s2 = q1 @ keys1.T, q2 @ keys2.T
    n = keys1.shape[0]
    chunk = max(1, chunk_elements // (n * n))
    out_i = []
    with torch.no_grad():
        for start in range(0, s1.shape[0], chunk):
            v1, r1 = _ranked(s1[start : start + chunk].detach())
            v2, r2 = _ranked(s2[start : start + chunk].detach())
            all_scores = (v1.unsqueeze(2) + v2.unsqueeze(1)).flatten(1)  # (t, N)
            _, cell = ordered_topk(all_scores, m)
            out_i.append(r1.gather(1, cell // n) * n + r2.gather(1, cell % n))
    flat = torch.cat(out_i)
    scores = s1.gather(1, flat // n) + s2.gather(1, flat % n)
    return scores, flat


def multihead_product_key_topk(q, keys1, keys2, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H independent product-key retrievals ([PKM] §3, multi-head memory).

    q (T, H, D_k); keys1, keys2 (H, n, D_k/2). Head h uses q[:, h, :D_k/2] with keys1[h] and
    q[:, h, D_k/2:] with keys2[h]. Returns scores and flat indices, each (T, H, m).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (T, H, D_k), got shape {tuple(q.shape)}")
    if keys1.dim() != 3 or keys1.shape != keys2.shape:
        raise ValueError(
            f"keys1 and keys2 must be (H, n, D_k/2) of one shape, got {tuple(keys1.shape)} and {tuple(keys2.shape)}"
        )
    T, H, d_k = q.shape
    if keys1.shape[0] != H or 2 * keys1.shape[2] != d_k:
        raise ValueError(
            f"keys shape {tuple(keys1.shape)} must be (H={H}, n, D_k/2={d_k / 2:g}) for q of shape {tuple(q.shape)}"
        )
    _check_m(m, keys1.shape[1])
    half = d_k // 2
    s1 = torch.einsum("thd,hnd->thn", q[..., :half], keys1)
    s2 = torch.einsum("thd,hnd->thn", q[..., half:], keys2)
    scores, indices = subkey_scores_topk(s1.reshape(T * H, -1), s2.reshape(T * H, -1), m)
    return scores.view(T, H, m), indices.view(T, H, m)
