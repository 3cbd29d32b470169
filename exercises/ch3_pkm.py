"""Chapter 3 exercises: the PKM layer, its usage metrics and its query normalisation.

Fill in each function, then grade them with ``minimem grade 3``. Use your chapter 2
``product_key_topk`` (import it from ``exercises.ch2_product_keys``) or
``minimem.product_keys.product_key_topk`` inside :func:`pkm_forward`.
"""

from __future__ import annotations

import torch


def kl_from_uniform(z: torch.Tensor) -> float:
    """Exercise 3.1: how far slot usage is from uniform [PKM] §4 ("KL").

    z (N,), any real dtype (float64, float32, int64): per-slot counts (how often each slot was
    selected) or per-slot weight mass, all >= 0. With p = z / sum(z), return the Kullback-Leibler
    divergence from the uniform distribution over the N slots, in nats, as a Python float:

        KL(p || uniform) = sum_i p_i log(p_i / (1/N)) = log N + sum_i p_i log p_i     (0 log 0 = 0)

    0 when every slot is used equally, log N when one slot takes everything. Raise ValueError
    naming ``z`` if it is not a non-empty 1-D tensor, has a negative entry, or sums to 0.
    """
    raise NotImplementedError("exercise 3.1: write kl_from_uniform in exercises/ch3_pkm.py")


def usage_metrics(indices: torch.Tensor, n_slots: int, weights: torch.Tensor | None = None) -> dict:
    """Exercise 3.2: [PKM]'s memory-usage metrics for a set of retrievals (§4.4, Table 2).

    indices: int64 tensor of any shape (e.g. (T, H, m)) of slots in [0, n_slots) selected over an
    evaluation set; weights: None, or a float tensor of the same shape, >= 0 (the softmax
    weights those selections received). Per slot i let

        hits_i = number of times i appears in indices
        mass_i = sum of the weights at the positions where i appears

    Return a dict of Python floats:
        "usage":          fraction of the n_slots slots with mass_i > 0 (hits_i > 0 without weights)
        "kl_unweighted":  KL from uniform of the hits (exercise 3.1)
        "kl_weighted":    KL from uniform of the mass; only when weights are given
    Raise ValueError naming the argument for: indices not int64 or outside [0, n_slots),
    weights of another shape or with negative entries, n_slots < 1.
    """
    raise NotImplementedError("exercise 3.2: write usage_metrics in exercises/ch3_pkm.py")


def pkm_queries(x: torch.Tensor, w_query: torch.Tensor, norm: str) -> torch.Tensor:
    """Exercise 3.3: PKM's normalised multi-head queries q = Norm(W_q x) [PKM] §3.3.

    x (T, h); w_query (H, D_k, h): head k's query is w_query[k] @ x[t]. Returns (T, H, D_k) in
    x's dtype (float64 or float32),
    normalised per ``norm`` (no learned gain or bias; eps = 1e-5 inside the square roots):

        "layernorm": each query q[t, k] (D_k numbers) minus its mean, divided by
                     sqrt(its biased variance + eps)                (per token: what later papers use)
        "batchnorm": each feature (k, d) minus its mean over the T tokens, divided by
                     sqrt(its biased variance over the T tokens + eps)   ([PKM]'s choice, training mode)
        "none":      the raw queries

    BatchNorm mixes the tokens of the batch: a token's query (hence its retrieval) depends on the
    other tokens, later positions of its own sequence included (the grader checks both). Raise
    ValueError naming ``norm`` and the allowed values for anything else, and ValueError naming
    ``x`` for batchnorm with T < 2.
    """
    raise NotImplementedError("exercise 3.3: write pkm_queries in exercises/ch3_pkm.py")


def pkm_forward(
    x: torch.Tensor, w_query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, values: torch.Tensor, m: int
) -> torch.Tensor:
    """Exercise 3.4: the PKM layer's forward pass [PKM] §3 (what ``minimem.pkm.PKM`` does).

    x (T, h); w_query (H, D_k, h); keys1, keys2 (H, n, D_k / 2) the sub-keys of each head;
    values (N, h) with N = n^2 shared by all heads; 1 <= m <= n. Returns (T, h) in x's dtype
    (float64 or float32, the same for all):

        q[t, k]       = layernorm(w_query[k] @ x[t])               (exercise 3.3, "layernorm")
        s, idx        = product-key top-m of head k: q1 = q[t, k, :D_k/2] with keys1[k],
                        q2 = q[t, k, D_k/2:] with keys2[k]           (exercise 2.2), each (m,)
        w             = softmax(s) over the m slots of the head
        out[t]        = sum over heads k, sum_i w_i values[idx_i]

    Differentiable in x, w_query, keys1, keys2 and values.
    """
    raise NotImplementedError("exercise 3.4: write pkm_forward in exercises/ch3_pkm.py")
