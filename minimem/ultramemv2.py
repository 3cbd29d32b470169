"""UltraMemV2 [UM2]: a memory layer beside the FFN of every block.

Five changes over UltraMem [UM] (Specification §4):

1. Placement: in every block, beside the FFN; it reads the FFN's normalised input x (B, T, h)
   and its output is added to the residual together with the FFN's (``minimem.model.Block``).
2. One output projection W (D_v -> h) after pooling, instead of UltraMem's E projections.
3. PEER-style pre-values: slot i has a pre-value row P_i (D_p) beside its value row V_i (D_v);
   with px = W_p x,   o = W^T sum_i s_i <P_i, px> V_i   (per multi-core-scoring slice),
   with no activation on <P_i, px> (``memory.activation`` keeps one for the ablation).
4. Principled initialisation (:mod:`minimem.init`): memory linear weights N(0, 2/(5h)),
   query/key norm gains calibrated so the mean top-m score is 1, and value / pre-value std
   sigma_V = (sigma_ffn^2 h / (0.16 (1 + sigma_s^2) D_p m H D_v))^(1/4), with sigma_s estimated
   by Monte Carlo through this layer's retrieval (or ``memory.sigma_s`` when > 0).
5. Compute rebalancing: D_k defaults to h/2 (``memory.d_key = 0``); :func:`mcp_percent` gives
   the memory's share of compute per token.

Retrieval is UltraMem's TDQKR with multi-core scoring (:class:`TuckerRetrieval`), with its
choices (per-rank queries and keys, U(0, 1) cores, rank-1 SVD refreshed in
``after_optimizer_step``). Slot s is mapped to a table row through a fixed permutation (a
buffer from a generator seeded by the layer index: the "shuffle" of the scattered scores).

Ring-shared value tables ([UM2] §4, official code's ``share_ratio = 1``): the memory layers,
in increasing order, are cut into consecutive groups of ``memory.ring_group`` layers (the last
group may be shorter). Each layer owns N = ``memory.n_slots`` rows of budget; a group of G
layers pools them into ONE table of G N rows (the same total parameters as unshared tables)
that every layer of the group addresses in full, through a key grid of sqrt(G N) sub-keys per
side (so G N must be a perfect square: with N = n^2, G in {1, 4, 9, ...}). The layer at
position k of its group has offset k N: its slot s reads row (shuffle[s] + k N) mod G N, i.e.
its window starts at its own offset and wraps around the ring. The first layer of a group
creates the table (a :class:`RingValueTable` registered as its submodule ``value_table``);
the others of the same model reuse that very module, unregistered (parameters, state_dict and
optimiser see it once). Layers must therefore be built in order, as ``GPT`` does.

Ablation switches (defaults give the paper's layer): ``memory.pre_values = false`` removes change
3 (plain values, o = W^T sum_i s_i V_i: no P, no W_p; the principled std is then
:func:`minimem.init.plain_value_std`, sigma_V entering the output once);
``memory.value_projections = E > 1`` undoes change 2 with UltraMem's implicit value expansion:
the key grid addresses E x rows virtual slots, the shuffle maps a virtual slot to (block, row),
the reads are pooled per block and W is E projections side by side (E D_v -> h), exactly as
:class:`minimem.ultramem.UltraMem` does.

``value_init``: ``"principled"`` (fourth root, derived), ``"paper"`` (the formula as printed:
sigma_V^2 = the same right-hand side), ``"std0.02"`` (the official code), ``"naive"`` (N(0, 1)).
Only the table std differs between them; the other weights follow item 4 in all four.

Visualisation: ``last_indices`` (B, T, H m) table rows read, ``last_scores`` (B, T, H m, c),
``usage_counts`` (G N,) reads per table row since ``reset_usage()``.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimem.config import memory_layers
from minimem.init import (
    estimate_score_moments,
    ffn_output_variance,
    linear_std,
    plain_value_std,
    principled_value_std,
    printed_value_std,
)
from minimem.kernels import memory_lookup
from minimem.ultramem import (
    SHUFFLE_SEED,
    TuckerRetrieval,
    pool_by_block,
    seeded_permutation,
    usage_update,
)

GATE_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "silu": F.silu}
MC_TOKENS = 2048  # Monte Carlo tokens for the score calibration and sigma_s

# (id(model config), first layer of the group) -> the group's table, while a layer holds it
_RING_TABLES: "weakref.WeakValueDictionary[tuple[int, int], RingValueTable]" = weakref.WeakValueDictionary()


class RingValueTable(nn.Module):
    """Value rows V (rows, D_v) and pre-value rows P (rows, D_p) shared by one ring group.

    ``d_pre = 0`` (the plain-values ablation): no P, ``pre_values`` is None.
    """

    def __init__(self, rows: int, d_value: int, d_pre: int, layers: tuple[int, ...]):
        super().__init__()
        self.layers = layers
        self.values = nn.Parameter(torch.empty(rows, d_value))
        self.values.is_memory_value = True
        if d_pre > 0:
            self.pre_values = nn.Parameter(torch.empty(rows, d_pre))
            self.pre_values.is_memory_value = True
        else:
            self.pre_values = None


def ring_groups(config) -> list[list[int]]:
    """The memory layers cut into consecutive groups of ``memory.ring_group``."""
    layers = sorted(memory_layers(config))
    size = config.memory.ring_group
    return [layers[i : i + size] for i in range(0, len(layers), size)]


class UltraMemV2(nn.Module):
    """UltraMemV2 memory layer [UM2] beside the FFN of block ``layer``: (B, T, h) -> (B, T, h)."""

    def __init__(self, config, layer: int):
        super().__init__()
        mem = config.memory  # validated when loaded (ModelConfig.validate)
        groups = ring_groups(config)
        group = next((g for g in groups if layer in g), None)
        if group is None:
            raise ValueError(
                f"layer {layer} is not a memory layer: model.memory.layers resolves to {sorted(memory_layers(config))}"
            )
        self.config, self.layer, self.group = config, layer, tuple(group)
        h = config.n_embd
        self.d_key, self.d_value, self.d_pre = config.memory.widths(config.n_embd)
        self.n_cores, self.heads, self.topk = mem.cores, mem.heads, mem.topk
        self.activation = mem.activation
        self.table_rows = len(group) * mem.n_slots
        self.projections = mem.value_projections  # E: 1 in UltraMemV2, > 1 for the IVE ablation
        n_keys = math.isqrt(self.projections * self.table_rows)  # a square grid (checked by the config)
        self.offset = group.index(layer) * mem.n_slots
        self.retrieval = TuckerRetrieval(h, n_keys, self.d_key, mem.rank, mem.cores, mem.heads, mem.topk, mem.softmax)
        self.pre_proj = nn.Linear(h, self.d_pre, bias=False) if self.d_pre else None  # W_p
        self.out_proj = nn.Linear(self.projections * self.d_value, h, bias=False)  # W (E blocks side by side)
        key = (id(config), group[0])
        shared = _RING_TABLES.get(key) if layer != group[0] else None
        pre_shape = None if shared is None or shared.pre_values is None else tuple(shared.pre_values.shape)
        if (
            shared is None
            or shared.values.shape != (self.table_rows, self.d_value)
            or pre_shape != ((self.table_rows, self.d_pre) if self.d_pre else None)
        ):
            self.value_table = RingValueTable(self.table_rows, self.d_value, self.d_pre, self.group)
            _RING_TABLES[key] = self.value_table
            self.owns_table = True
        else:
            self.__dict__["_ring_table"] = shared  # plain attribute: not registered a second time
            self.owns_table = False
        self.register_buffer(
            "shuffle", seeded_permutation(self.projections * self.table_rows, SHUFFLE_SEED + 104729 + layer)
        )
        self.register_buffer("usage_counts", torch.zeros(self.table_rows, dtype=torch.long), persistent=False)
        self.last_indices = None
        self.last_scores = None
        self.score_mean = self.sigma_s = self.value_std = float("nan")
        self.reset_memory_parameters()

    @property
    def table(self) -> RingValueTable:
        return self.value_table if self.owns_table else self.__dict__["_ring_table"]

    @property
    def values(self) -> nn.Parameter:
        return self.table.values

    @property
    def pre_values(self):  # None in the plain-values ablation
        return self.table.pre_values

    # ----------------------------------------------------------------- initialisation
    def reset_memory_parameters(self) -> None:
        """[UM2] App. A (module docstring item 4); the owner of the ring table also fills it."""
        h, mem = self.config.n_embd, self.config.memory
        std = linear_std(h)
        self.retrieval.init_weights(query_std=std, key_std=(self.d_key // 2) ** -0.5, norm_gain=1.0)
        if self.pre_proj is not None:
            nn.init.normal_(self.pre_proj.weight, 0.0, std)
        nn.init.normal_(self.out_proj.weight, 0.0, std)
        mean, sigma_s = estimate_score_moments(self.retrieval, MC_TOKENS, seed=SHUFFLE_SEED + self.layer)
        if not mem.softmax:  # calibrate: mean top-m score 1 (softmax scores are fixed to sum to 1)
            self.retrieval.scale_scores(1.0 / mean)
            mean = 1.0
        self.score_mean = mean
        self.sigma_s = mem.sigma_s if mem.sigma_s > 0 else sigma_s
        self.value_std = self.table_std()
        if self.owns_table:
            nn.init.normal_(self.table.values, 0.0, self.value_std)
            if self.table.pre_values is not None:
                nn.init.normal_(self.table.pre_values, 0.0, self.value_std)

    def table_std(self) -> float:
        """The value / pre-value std that ``memory.value_init`` asks for."""
        mode = self.config.memory.value_init
        if mode == "std0.02":
            return 0.02
        if mode == "naive":
            return 1.0
        if not self.d_pre and mode in ("principled", "paper"):  # plain values: sigma_V enters once, no 2nd vs 4th root
            return plain_value_std(
                ffn_output_variance(self.config),
                self.sigma_s,
                self.d_value,
                self.topk,
                self.heads,
                self.config.n_embd,
                self.score_mean,
            )
        args = (
            ffn_output_variance(self.config),
            self.sigma_s,
            self.d_pre,
            self.d_value,
            self.topk,
            self.heads,
            self.config.n_embd,
            self.score_mean,
        )
        if mode == "principled":
            return principled_value_std(*args)
        if mode == "paper":
            return printed_value_std(*args)
        raise ValueError(f"model.memory.value_init must be 'principled', 'paper', 'std0.02' or 'naive', got {mode!r}")

    def after_optimizer_step(self) -> None:
        self.retrieval.refresh_rank1()

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(B * T, h)
        scores, slots = self.retrieval(flat)  # (BT, Hm, c), (BT, Hm)
        rows = self.shuffle[slots]
        if self.projections > 1:  # IVE ablation: a virtual slot is (block, row)
            block, rows = rows // self.table_rows, rows % self.table_rows
        if self.offset:  # the layer's window on the ring starts at its offset and wraps
            rows = (rows + self.offset) % self.table_rows
        table = self.table
        px = self.pre_proj(flat) if self.pre_proj is not None else None  # (BT, D_p)
        if px is None or self.activation == "none":
            weights, pre_values = scores, table.pre_values
        else:  # ablation: act(<P_i, px>) needs the gate outside the fused lookup
            ones = scores.new_ones(rows.numel(), 1, 1)
            pre_rows = memory_lookup(table.pre_values, rows.reshape(-1, 1), ones).view(B * T, -1, self.d_pre)
            gate = GATE_ACTIVATIONS[self.activation](torch.einsum("tmd,td->tm", pre_rows, px))
            weights, pre_values, px = scores * gate.unsqueeze(-1), None, None
        if self.projections == 1:
            read = memory_lookup(table.values, rows, weights, pre_values, px)
        else:  # the IVE ablation pools per block, as UltraMem
            read = pool_by_block(table.values, rows, block, weights, self.projections, pre_values, px)
        usage_update(self.usage_counts, rows)
        self.last_indices = rows.detach().view(B, T, -1)
        self.last_scores = scores.detach().view(B, T, -1, self.n_cores)
        return self.out_proj(read).view(B, T, h)


__all__ = ["UltraMemV2", "RingValueTable", "ring_groups", "GATE_ACTIVATIONS"]
