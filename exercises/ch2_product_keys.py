"""Chapter 2 exercises: product keys.

Fill in each function, then grade them with ``minimem grade 2``.

Setting ([PKM] §3.2, Specification §1): a query q in R^{D_k} is split into halves q1, q2 (each of width
d = D_k / 2). Two sub-key tables keys1, keys2, each (n, d), define N = n^2 slots: slot (i, j)
has key concat(keys1[i], keys2[j]), score

    s(i, j) = <q1, keys1[i]> + <q2, keys2[j]>

and flat index i * n + j. Both functions return ``(scores, indices)``: scores (T, m) in the
queries' dtype, sorted by descending score, and indices (T, m) int64 flat slot indices, row t
for query t. Where several slots have exactly the same score any of them may be returned; the
graders check ties through the scores.
"""

from __future__ import annotations

import torch


def brute_force_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 2.1: the exact top-m over all N = n^2 slots, by scoring every slot.

    q1, q2 (T, d); keys1, keys2 (n, d); 1 <= m <= n (raise ValueError naming ``m`` otherwise,
    and ValueError when the shapes do not fit). Score all n^2 slots of every query, take the m
    best. O(T N d) time and O(T N) memory: the reference the fast method is checked against.
    Scores must be differentiable in q1, q2, keys1 and keys2.
    """
    raise NotImplementedError("exercise 2.1: write brute_force_topk in exercises/ch2_product_keys.py")


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 2.2: the same exact top-m without scoring all N slots [PKM] §3.2.

    Same arguments, returns and errors as :func:`brute_force_topk`, and the same result.
    Cost: O(n d + m^2) per query, not O(n^2 d) (chapter 2 derives which slots can be in the
    top-m); the grader measures how the work grows with N and fails a solution that scores all
    N slots. Scores must be differentiable in q1, q2, keys1 and keys2 (the selection itself is
    discrete).
    """
    raise NotImplementedError("exercise 2.2: write product_key_topk in exercises/ch2_product_keys.py")
