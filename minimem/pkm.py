"""Product-key memory [PKM]: a huge table of values read through top-m product-key retrieval.

For one token x (the block's normalised input), each of H heads computes a query
q = Norm(W_q x) in R^{D_k}, finds its m best slots among N = n^2 with product keys
([PKM] §3.2, :func:`minimem.product_keys.multihead_product_key_topk`), turns their scores into
weights w = softmax(scores) ([PKM] §3.1; optional) and reads
sum_i w_i V[idx_i]. Heads share the value table and their reads are summed ([PKM] §3, multi-head memory).
The m weighted rows of all heads go through one :func:`minimem.kernels.memory_lookup` call
(heads concatenated along m).

:class:`ProductKeyRouter` is the retrieval half (queries, sub-keys, top-m, softmax, usage
bookkeeping); :class:`PKM` adds the values, :class:`minimem.peer.PEER` the experts.

Query normalisation: [PKM] §3 uses BatchNorm on the query to spread key usage. BatchNorm
normalises each query with statistics of the whole batch, i.e. across sequences *and* across
future positions of the same sequence: in training a token's retrieval depends on later
tokens (a small causal leak); in eval mode the running statistics remove it. LayerNorm
(per query, the later papers' choice and the default here) has neither issue.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimem.kernels import memory_lookup
from minimem.product_keys import multihead_product_key_topk


class ProductKeyRouter(nn.Module):
    """H heads of product-key retrieval [PKM] §3: x (T, h) -> weights, indices (T, H, m).

    Keeps (detached, from the last forward) ``last_indices`` (B, T, H, m), ``last_scores`` (raw
    scores) and ``last_weights`` (what multiplies the values), and in training mode two usage
    counters: ``usage_counts`` (N,) hits per slot and ``usage_weights`` (N,) summed |weight| per
    slot; ``reset_usage()`` zeroes them.
    """

    kind = "pkm"
    # the top-m search and the read (a subclass may swap in others with these signatures: minimem_tools.learner)
    search, lookup = staticmethod(multihead_product_key_topk), staticmethod(memory_lookup)

    def __init__(self, config, layer: int):
        super().__init__()
        mem = config.memory  # validated when loaded (ModelConfig.validate)
        self.layer = layer
        self.dim = config.n_embd
        self.n_slots = mem.n_slots  # N
        self.n_keys = math.isqrt(mem.n_slots)  # n sub-keys per side
        self.heads = mem.heads  # H
        self.topk = mem.topk  # m
        self.d_key = mem.widths(config.n_embd)[0]  # D_k
        self.use_softmax = mem.softmax
        self.query_norm_kind = mem.query_norm

        self.query = nn.Linear(self.dim, self.heads * self.d_key, bias=False)  # H stacked W_q
        if mem.query_norm == "layernorm":
            self.query_norm = nn.LayerNorm(self.d_key)  # per head, per token
        elif mem.query_norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(self.heads * self.d_key)  # over all tokens of the batch
        else:
            self.query_norm = nn.Identity()
        # sub-key tables: keys[h, 0] = K1 (rows), keys[h, 1] = K2 (columns), each (n, D_k / 2)
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, self.d_key // 2))
        self.register_buffer("usage_counts", torch.zeros(self.n_slots, dtype=torch.int64), persistent=False)
        self.register_buffer("usage_weights", torch.zeros(self.n_slots), persistent=False)
        self.last_indices = self.last_scores = self.last_weights = None

    def reset_router_parameters(self) -> None:
        """Sub-keys uniform in +-1/sqrt(D_k/2), as [PKM]'s code (``get_uniform_keys``)."""
        bound = 1.0 / math.sqrt(self.d_key // 2)
        nn.init.uniform_(self.keys, -bound, bound)

    def reset_usage(self) -> None:
        self.usage_counts.zero_()
        self.usage_weights.zero_()

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(T, h) -> normalised queries (T, H, D_k)."""
        q = self.query(x)
        if self.query_norm_kind == "batchnorm":
            return self.query_norm(q).view(-1, self.heads, self.d_key)
        return self.query_norm(q.view(-1, self.heads, self.d_key))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, h) -> (weights, scores, indices), each (T, H, m).

        weights = softmax over each head's m scores ([PKM] §3.1), or the raw scores if
        ``softmax`` is off.
        """
        q = self.queries(x)
        scores, indices = self.search(q, self.keys[:, 0], self.keys[:, 1], self.topk)
        if self.use_softmax:  # in float32 at least (bf16 / fp16 scores)
            weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
        else:
            weights = scores
        return weights, scores, indices

    @torch.no_grad()
    def record(self, shape: tuple, weights, scores, indices) -> None:
        """Keep the last retrieval for visualisation; count usage in training mode."""
        B, T = shape
        self.last_indices = indices.detach().view(B, T, self.heads, self.topk)
        self.last_scores = scores.detach().view(B, T, self.heads, self.topk)
        self.last_weights = weights.detach().view(B, T, self.heads, self.topk)
        if self.training:
            flat = indices.reshape(-1)
            self.usage_counts += torch.bincount(flat, minlength=self.n_slots)
            self.usage_weights.index_add_(0, flat, weights.detach().reshape(-1).abs().to(self.usage_weights.dtype))

    @torch.no_grad()
    def score_grid(self, x_token: torch.Tensor) -> torch.Tensor:
        """Scores of all N slots for one token x (h,): (H, n, n), grid[h, i, j] = s1[i] + s2[j].

        BatchNorm uses its running statistics here (one token has no batch statistics).
        """
        if x_token.shape != (self.dim,):
            raise ValueError(f"x_token must have shape (h,) = ({self.dim},), got {tuple(x_token.shape)}")
        was_training = self.query_norm.training
        self.query_norm.eval()
        try:
            q = self.queries(x_token.unsqueeze(0))[0]  # (H, D_k)
        finally:
            self.query_norm.train(was_training)
        half = self.d_key // 2
        s1 = torch.einsum("hd,hnd->hn", q[:, :half], self.keys[:, 0])
        s2 = torch.einsum("hd,hnd->hn", q[:, half:], self.keys[:, 1])
        return s1.unsqueeze(2) + s2.unsqueeze(1)


class PKM(ProductKeyRouter):
    """Product-key memory layer [PKM] in a block's FFN slot: (B, T, h) -> (B, T, h).

    Values (N, D_v), N(0, D_v^-1/2) as [PKM]; with D_v != h a linear map D_v -> h follows.
    """

    def __init__(self, config, layer: int):
        super().__init__(config, layer)
        self.d_value = config.memory.widths(config.n_embd)[1]  # D_v
        self.values = nn.Parameter(torch.empty(self.n_slots, self.d_value))
        self.values.is_memory_value = True
        self.out_proj = None
        if self.d_value != self.dim:
            self.out_proj = nn.Linear(self.d_value, self.dim, bias=False)
            self.out_proj.is_residual_projection = True
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        self.reset_router_parameters()
        nn.init.normal_(self.values, 0.0, self.d_value**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        weights, scores, indices = self.route(x.reshape(B * T, h))  # (BT, H, m)
        self.record((B, T), weights, scores, indices)
        out = self.lookup(self.values, indices.flatten(1), weights.flatten(1).unsqueeze(-1))  # heads summed
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out.view(B, T, h)
