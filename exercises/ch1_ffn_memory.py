"""Chapter 1 exercises: FFN layers are memories.

Fill in each function, then grade them with ``minimem grade 1``. Work in PyTorch; every
function must accept float32 and float64 tensors and keep autograd working (no ``.numpy()``,
no in-place writes into your inputs).
"""

from __future__ import annotations

import torch


def swiglu_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Exercise 1.1: the dense SwiGLU feed-forward layer, read as a key-value memory.

    Shapes (``nn.Linear`` weight layout, out x in):
        x  (T, h)      T tokens of width h
        w1 (d_ff, h)   row i is the *key* k_i
        w3 (d_ff, h)   row i is the gate g_i
        w2 (h, d_ff)   column i is the *value* v_i
    Returns (T, h), the dtype of x:

        FFN(x) = W2 (silu(W1 x) * (W3 x))  =  sum_i silu(<k_i, x>) <g_i, x> v_i

    (Shazeer 2020, SwiGLU; silu(z) = z sigmoid(z).) The second form is the memory view of
    Geva et al. 2021 that [PKM] §1 starts from: every one of the d_ff keys is scored
    against x, and the output mixes all d_ff value vectors, so the whole table is read for
    every token. minimem's version is ``minimem.model.SwiGLU``.

    Check every argument and raise ValueError naming it: ``w3`` if it does not have the shape of
    w1, ``w2`` unless it is (h, d_ff), ``x`` unless it is (T, h) (w1 fixes d_ff and h).
    """
    raise NotImplementedError("exercise 1.1: write swiglu_ffn in exercises/ch1_ffn_memory.py")


def moe_forward(
    x: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 1.2: a mixture of SwiGLU experts with a softmax router and top-k routing [OLMoE].

    Shapes:
        x             (T, h)
        router_weight (E, h)        router logits = x @ router_weight.T, (T, E)
        w13           (E, h, 2 d)   expert e's W1 is w13[e][:, :d], its W3 is w13[e][:, d:]
        w2            (E, d, h)
        top_k         int, 1 <= top_k <= E
    Returns ``(out, aux_loss)``: out (T, h) in x's dtype and a scalar tensor.

        p = softmax(router logits) over the E experts              (T, E)
        chosen(t) = the top_k experts of p[t]
        expert_e(x) = (silu(x W1_e) * (x W3_e)) W2_e                 (a SwiGLU of width d)
        out[t] = sum_{e in chosen(t)} p[t, e] * expert_e(x[t])      (no renormalisation of p)

    The load-balance loss (Switch Transformer's, as OLMoE uses it, weight 1 here):

        f_e = (number of (token, choice) pairs routed to e) / (T * top_k)
        P_e = mean over tokens of p[t, e]
        aux_loss = E * sum_e f_e P_e

    It is E * sum_e (1/E)(1/E) = 1 when routing is perfectly balanced. Gradients flow into x,
    router_weight (through p), w13 and w2; f_e counts and carries no gradient. minimem's
    version is ``minimem.ffn.MoE``. Raise ValueError naming ``top_k`` unless 1 <= top_k <= E.
    """
    raise NotImplementedError("exercise 1.2: write moe_forward in exercises/ch1_ffn_memory.py")


def expected_distinct(population: int, per_token: int, batch_tokens: int) -> float:
    """Exercise 1.3: how many experts (or value rows) a batch reads: the memory-access problem [UM] §1.

    A batch of B = ``batch_tokens`` tokens is routed: each token reads ``per_token`` of the
    ``population`` items (top_k of E experts for a MoE; H m of N value rows for a memory
    layer). Under *uniform* routing (each token reads a uniformly random set of per_token
    distinct items, independently of the other tokens), one token misses a given item with
    probability 1 - per_token / population, so the expected number of distinct items the
    batch reads is

        population * (1 - (1 - per_token / population) ** B)

    per_token at B = 1, approaching the whole population as B grows: at large batches a
    fine-grained MoE reads all of its experts, while a memory layer with N >> B m reads
    only about B m of its N rows. Return a Python float. Raise ValueError naming
    ``per_token`` if it exceeds ``population``. (minimem: ``minimem.accounting``.)
    """
    raise NotImplementedError("exercise 1.3: write expected_distinct in exercises/ch1_ffn_memory.py")


def moe_bytes_per_token(
    n_experts: int, top_k: int, h: int, d_expert: int, batch_tokens: int, dtype_bytes: int = 4
) -> float:
    """Exercise 1.4: bytes of expert weights a MoE layer reads per token, expected under uniform routing.

    Each of the E = ``n_experts`` experts is a SwiGLU of model width h and inner width
    d = ``d_expert`` (exercise 1.2: W1, W3 of h x d and W2 of d x h, so 3 h d parameters of
    ``dtype_bytes`` bytes each). A forward step over B = ``batch_tokens`` tokens reads the
    weights of every distinct expert the batch routes to, once; the router is not counted.
    Return the expected bytes per token, a Python float:

        expected_distinct(E, top_k, B) * 3 h d * dtype_bytes / B

    (top_k * 3 h d * dtype_bytes at B = 1, falling like 1 / B once every expert is read.)
    minimem's model of every layer is ``minimem.accounting.bytes_read``.
    """
    raise NotImplementedError("exercise 1.4: write moe_bytes_per_token in exercises/ch1_ffn_memory.py")
