"""UltraMemV2 [UM2]: a memory layer beside the FFN of every block.

Five changes over UltraMem [UM] (Specification §4):

1. Placement: in every block, beside the FFN; it reads the FFN's normalised input x (B, T, h)
   and its output is added to the residual together with the FFN's (``minimem.model.Block``).
2. One output projection W (D_v -> h) after pooling, instead of UltraMem's E projections.
3. PEER-style pre-values: slot i has a pre-value row P_i (D_p) beside its value row V_i (D_v);
   with px = W_p x,   o = W^T sum_i s_i <P_i, px> V_i   (per multi-core-scoring slice),
   with no activation on <P_i, px>.
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
its window starts at its own offset and wraps around the ring. The model makes one
:class:`RingValueTable` per group (:func:`ring_tables`) and hands it to every layer of the
group; the group's first layer registers it as its submodule ``value_table``, the others keep
a plain reference (parameters, state_dict and optimiser see it once). A layer built alone
makes its own table.

``memory.share_ratio`` s >= 1 (official code's sliding window; ``ring_group`` must be 1): ONE table
of R = L N / s rows for all L memory layers; each layer keeps its N-slot key grid and reads the
window of N rows starting at l N / s (l its rank among the memory layers): slot k reads row
(shuffle[k] + l N / s) mod R. So every row is read by s layers (s = 1: disjoint windows, no
sharing, L N rows; s = L: every layer reads the whole table, rotated by l N / L), and a token still
reads H m rows: activated parameters do not change, the total shrinks by s. ``ring_group`` G's
disjoint groups agree with it only when all layers share one table: ring_group = L with n_slots N
is exactly share_ratio = L with n_slots L N (one L N-row table, a sqrt(L N) key grid, windows at
l N, the same shuffles); for s < L the windows overlap, which no disjoint grouping reproduces.

``value_init``: ``"principled"`` (fourth root, derived), ``"paper"`` (the formula as printed:
sigma_V^2 = the same right-hand side), ``"std0.02"`` (the official code), ``"naive"`` (N(0, 1)).
Only the table std differs between them; the other weights follow item 4 in all four.

The ablations that undo changes 2 and 3 (E per-block projections, plain values, a gate
activation) are subclasses that live with the experiments (``minimem_tools.experiments.ultramemv2_ablation``).

Visualisation: ``last_indices`` (B, T, H m) table rows read, ``last_scores`` (B, T, H m, c),
``usage_counts`` (G N,) reads per table row since ``reset_usage()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minimem.config import memory_layers
from minimem.init import (
    estimate_score_moments,
    ffn_output_variance,
    linear_std,
    on_meta_device,
    principled_value_std,
    printed_value_std,
)
from minimem.kernels import memory_lookup
from minimem.ultramem import SHUFFLE_SEED, TuckerRetrieval, seeded_permutation, usage_update

MC_TOKENS = 2048  # Monte Carlo tokens for the score calibration and sigma_s


class RingValueTable(nn.Module):
    """Value rows V (rows, D_v) and pre-value rows P (rows, D_p) shared by the ring group ``layers``.

    ``d_pre = 0``: no P (``pre_values`` is None), for the experiments' plain-values ablation.
    """

    def __init__(self, rows: int, d_value: int, d_pre: int, layers: tuple[int, ...]):
        super().__init__()
        self.layers = tuple(layers)
        self.values = nn.Parameter(torch.empty(rows, d_value))
        self.values.is_memory_value = True
        self.pre_values = nn.Parameter(torch.empty(rows, d_pre)) if d_pre > 0 else None
        if self.pre_values is not None:
            self.pre_values.is_memory_value = True


def ring_groups(config) -> list[list[int]]:
    """The memory layers cut into consecutive groups of ``memory.ring_group`` (one group with share_ratio)."""
    layers = sorted(memory_layers(config))
    size = len(layers) if config.memory.share_ratio else config.memory.ring_group
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def ring_layout(mem, group: list[int], layer: int) -> tuple[int, int, int]:
    """(table rows, slots the layer's key grid addresses, its window's first row): G N, G N, k N for
    the k-th layer of a ring group of G; L N / s, N, l N / s with share_ratio s."""
    rows = len(group) * mem.n_slots // (mem.share_ratio or 1)
    return rows, mem.n_slots if mem.share_ratio else rows, group.index(layer) * mem.n_slots // (mem.share_ratio or 1)


def ring_tables(config) -> dict[int, RingValueTable]:
    """layer -> its group's table: one :class:`RingValueTable` per group (:func:`ring_layout`), made by the model."""
    _, d_value, d_pre = config.memory.widths(config.n_embd)
    tables = {}
    for group in ring_groups(config):
        table = RingValueTable(ring_layout(config.memory, group, group[0])[0], d_value, d_pre, tuple(group))
        tables.update(dict.fromkeys(group, table))
    return tables


class UltraMemV2(nn.Module):
    """UltraMemV2 memory layer [UM2] beside the FFN of block ``layer``: (B, T, h) -> (B, T, h).

    ``table``: the ring group's :class:`RingValueTable` (from :func:`ring_tables`); None makes one.
    """

    def __init__(self, config, layer: int, table: RingValueTable | None = None):
        super().__init__()
        mem = config.memory  # validated when loaded (ModelConfig.validate)
        group = next((g for g in ring_groups(config) if layer in g), None)
        if group is None:
            raise ValueError(
                f"layer {layer} is not a memory layer: model.memory.layers resolves to {sorted(memory_layers(config))}"
            )
        self.config, self.layer, self.group = config, layer, tuple(group)
        h = config.n_embd
        self.d_key, self.d_value, self.d_pre = mem.widths(h)
        self.n_cores, self.heads, self.topk = mem.cores, mem.heads, mem.topk
        # rows on the ring (G N), slots of the key grid (G N; N with share_ratio), window start (k N)
        self.table_rows, slots, self.offset = ring_layout(mem, group, layer)
        self.owns_table = table is None or layer == group[0]  # a layer built alone makes and owns its table
        if table is None:
            table = RingValueTable(self.table_rows, self.d_value, self.d_pre, self.group)
        if table.layers != self.group or table.values.shape != (self.table_rows, self.d_value):
            raise ValueError(f"layer {layer} needs its group {self.group}'s table of {self.table_rows} rows")
        if self.owns_table:
            self.value_table = table  # registered once, by the group's first layer
        else:
            self.__dict__["_ring_table"] = table  # a plain attribute: not registered a second time
        n_keys = math.isqrt(slots)  # a square key grid (checked by the config)
        options = mem.retrieval_options()
        self.retrieval = TuckerRetrieval(
            h, n_keys, self.d_key, mem.rank, mem.cores, mem.heads, mem.topk, mem.softmax, **options
        )
        self.pre_proj = nn.Linear(h, self.d_pre, bias=False) if self.d_pre else None  # W_p
        self.out_proj = nn.Linear(self.d_value, h, bias=False)  # W
        self.register_buffer("shuffle", seeded_permutation(slots, SHUFFLE_SEED + 104729 + layer))
        self.register_buffer("usage_counts", torch.zeros(self.table_rows, dtype=torch.long), persistent=False)
        self.last_indices = None
        self.last_scores = None
        self.score_mean = self.sigma_s = self.value_std = float("nan")
        if not on_meta_device(self):  # the meta device (parameter counting) has no numbers to calibrate
            self.reset_memory_parameters()

    @property
    def table(self) -> RingValueTable:
        return self.value_table if self.owns_table else self.__dict__["_ring_table"]

    @property
    def values(self) -> nn.Parameter:
        return self.table.values

    @property
    def pre_values(self):
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
            for table in (self.table.values, self.table.pre_values):
                if table is not None:
                    nn.init.normal_(table, 0.0, self.value_std)

    def table_std(self) -> float:
        """The value / pre-value std that ``memory.value_init`` asks for."""
        mode = self.config.memory.value_init
        if mode == "std0.02":
            return 0.02
        if mode == "naive":
            return 1.0
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
    def table_rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots (any shape) -> table rows: the fixed shuffle, then this layer's window on the ring."""
        return (self.shuffle[slots] + self.offset) % self.table_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(B * T, h)
        scores, slots = self.retrieval(flat)  # (BT, Hm, c), (BT, Hm)
        rows = self.table_rows_of(slots)  # (BT, Hm)
        px = self.pre_proj(flat)  # (BT, D_p)
        read = memory_lookup(self.table.values, rows, scores, self.table.pre_values, px)  # (BT, D_v)
        self.record(rows, scores, B, T)
        return self.out_proj(read).view(B, T, h)

    def record(self, rows: torch.Tensor, scores: torch.Tensor, B: int, T: int) -> None:
        """Keep what the visualisations read: usage counts, last rows and scores."""
        usage_update(self.usage_counts, rows)
        self.last_indices = rows.detach().view(B, T, -1)
        self.last_scores = scores.detach().view(B, T, -1, self.n_cores)


__all__ = ["UltraMemV2", "RingValueTable", "ring_groups", "ring_layout", "ring_tables"]
