"""PEER, parameter-efficient expert retrieval [PEER]: a million singleton experts.

Expert i is a down vector u_i in R^h and an up vector v_i in R^h: e_i(x) = act(<u_i, x>) v_i,
a one-neuron MLP ([PEER] §2). Each of H heads retrieves its m experts with product
keys (the router of :mod:`minimem.pkm`); all heads share the pool:

    f(x) = sum_heads sum_i softmax(scores)_i act(<u_idx_i, x>) v_idx_i        ([PEER] §2)

The read goes through :func:`minimem.kernels.memory_lookup`. With ``activation="none"`` the
gate <u_i, x> is exactly the lookup's pre-value gate (pre_values=u, pre_input=x); with a
nonlinear activation (GELU, [PEER]'s choice) g_i = act(<u_i, x>) is computed on the gathered
down vectors and folded into the weights (w_i g_i) before the lookup.

Initialisation (the paper gives none): u ~ N(0, h^-1/2), so <u_i, x> has unit variance for
the unit-variance normalised input; v ~ N(0, h^-1/2) like [PKM]'s values. Both tables are
memory values (``is_memory_value``: the trainer's value learning rate applies).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimem.pkm import ProductKeyRouter

ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "silu": F.silu}


class PEER(ProductKeyRouter):
    """PEER layer in a block's FFN slot: (B, T, h) -> (B, T, h). Activation from ``memory.activation``."""

    kind = "peer"

    def __init__(self, config, layer: int):
        super().__init__(config, layer)
        self.activation = config.memory.activation
        self.down = nn.Parameter(torch.empty(self.n_slots, self.dim))  # u_i
        self.up = nn.Parameter(torch.empty(self.n_slots, self.dim))  # v_i
        self.down.is_memory_value = True
        self.up.is_memory_value = True
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        self.reset_router_parameters()
        nn.init.normal_(self.down, 0.0, self.dim**-0.5)
        nn.init.normal_(self.up, 0.0, self.dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        x = x.reshape(B * T, h)
        weights, scores, indices = self.route(x)  # (BT, H, m)
        self.record((B, T), weights, scores, indices)
        indices, weights = indices.flatten(1), weights.flatten(1)  # heads along m: (BT, H*m)
        if self.activation == "none":
            out = self.lookup(self.up, indices, weights.unsqueeze(-1), pre_values=self.down, pre_input=x)
        else:
            down = self.down.index_select(0, indices.reshape(-1)).view(*indices.shape, h)  # (BT, H*m, h)
            gate = ACTIVATION_FUNCTIONS[self.activation](torch.einsum("tkh,th->tk", down, x))
            out = self.lookup(self.up, indices, (weights * gate).unsqueeze(-1))
        return out.view(B, T, h)
