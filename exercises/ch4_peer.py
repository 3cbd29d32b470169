"""Chapter 4 exercises: PEER, a million singleton experts [PEER].

Fill in each function, then grade them with ``minimem grade 4``.

Expert i is a pair of vectors: a down vector u_i = down[i] and an up vector v_i = up[i], both in
R^h, and computes e_i(x) = act(<u_i, x>) v_i: an MLP with one hidden neuron ([PEER] §2).
``activation`` is one of "gelu" ([PEER]'s choice, exact erf form), "relu", "sigmoid", "silu" or
"none" (the identity); raise ValueError naming ``activation`` and the allowed values otherwise.
"""

from __future__ import annotations

import torch


def peer_experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Exercise 4.1: evaluate the routed singleton experts of every token (the PEER expert forward).

    x (T, h); indices (T, k) int64 experts chosen for each token (all heads' choices side by
    side); weights (T, k) their router weights; down, up (N, h). Returns (T, h) in the dtype
    of x (float64 or float32, the same for all):

        out[t] = sum_{i < k} weights[t, i] * act(<down[indices[t, i]], x[t]>) * up[indices[t, i]]

    Gather the k down and up vectors of each token (never multiply x by the whole (N, h)
    table: N is a million in the paper). Repeated experts count once per occurrence.
    Differentiable in x, weights, down and up.
    """
    raise NotImplementedError("exercise 4.1: write peer_experts in exercises/ch4_peer.py")


def peer_forward(
    x: torch.Tensor,
    w_query: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    m: int,
    activation: str = "gelu",
) -> torch.Tensor:
    """Exercise 4.2: the PEER layer [PEER] §2 (what ``minimem.peer.PEER`` does).

    x (T, h); w_query (H, D_k, h); keys1, keys2 (H, n, D_k / 2); down, up (N, h) with N = n^2,
    the expert pool shared by the H heads; 1 <= m <= n. Returns (T, h) in x's dtype (float64
    or float32, the same for all):

        q[t, k]   = layernorm(w_query[k] @ x[t])     (eps 1e-5, no gain or bias: exercise 3.3)
        s, idx    = product-key top-m of head k       (exercise 2.2: q1 = first half with keys1[k],
                                                        q2 = second half with keys2[k])
        w         = softmax(s) over the head's m experts
        out[t]    = sum over heads k, sum_i w_i act(<u_idx_i, x[t]>) v_idx_i    (exercise 4.1)

    The product-key router is PKM's; what changes is what a slot holds: an expert instead of a
    value row. Differentiable in every tensor argument.
    """
    raise NotImplementedError("exercise 4.2: write peer_forward in exercises/ch4_peer.py")
