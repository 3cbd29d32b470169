"""The feed-forward slot's two fillings: a dense SwiGLU, and a mixture of experts [OLMoE].

The mixture has a softmax router, top-k and a load-balance loss. Each expert is a small SwiGLU of
inner width ``d_expert``. The router's softmax probabilities of the k chosen experts weight their
outputs (OLMoE does not renormalise them). The load-balance loss is Switch Transformer's ``E * sum_e
f_e P_e``: f_e the fraction of routed (token, slot) pairs sent to expert e, P_e the mean router
probability of e. An optional shared expert is always on (DeepSeekMoE style).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimem.config import MoEConfig


class SwiGLU(nn.Module):
    """Dense feed-forward: W2 (silu(W1 x) * W3 x) (Shazeer 2020). W1 and W3 are one matrix."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w2.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(a) * b)


class MoE(nn.Module):
    def __init__(self, dim: int, config: MoEConfig, n_layer: int = 1):
        super().__init__()
        config.validate()
        self.dim, self.config, self.n_layer = dim, config, n_layer
        E, d = config.n_experts, config.d_expert
        self.router = nn.Linear(dim, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, dim, 2 * d))  # per-expert W1 | W3
        self.w2 = nn.Parameter(torch.empty(E, d, dim))
        self.shared = None
        if config.shared_expert:
            self.shared = SwiGLU(dim, d)
        self.aux_loss = None
        self.last_indices = None  # (T, k) expert ids of the last forward, for accounting
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        nn.init.normal_(self.w13, 0.0, 0.02)
        nn.init.normal_(self.w2, 0.0, 0.02 / math.sqrt(2 * self.n_layer))  # GPT-2 residual scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        cfg = self.config
        logits = self.router(x)
        # at least float32 (bf16 routing is noisy), float64 stays float64 (gradcheck)
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # (T, E)
        weights, experts = probs.topk(cfg.top_k, dim=-1)  # (T, k)
        self.last_indices = experts.detach()
        # load balance: f_e (fraction of assignments) * P_e (mean probability), times E
        counts = torch.bincount(experts.flatten(), minlength=cfg.n_experts).to(probs.dtype)
        f = counts / experts.numel()
        self.aux_loss = cfg.aux_loss_weight * cfg.n_experts * (f * probs.mean(0)).sum()
        # dispatch: sort (token, slot) pairs by expert, run each expert on its tokens
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)
        token_of = order // cfg.top_k
        w_sorted = weights.flatten()[order].to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.long().tolist()):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            a, b = (x[tok] @ self.w13[e]).split(cfg.d_expert, dim=-1)
            y = (F.silu(a) * b) @ self.w2[e]
            out.index_add_(0, tok, y * w_sorted[start : start + n, None])
            start += n
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)
