"""Configuration of the memory layers (Specification §1-§4). ``kind="none"`` means no memory.

One dataclass serves every kind; each field says which kinds read it. Widths left at 0
take the kind's default from the model width h (documented per field).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MEMORY_KINDS = ("none", "pkm", "peer", "ultramem", "ultramemv2")
QUERY_NORMS = ("layernorm", "batchnorm", "none")
VALUE_INITS = ("principled", "std0.02", "naive", "paper")
ACTIVATIONS = ("none", "gelu", "relu", "sigmoid", "silu")


@dataclass
class MemoryConfig:
    kind: str = "none"
    # Blocks that hold a memory. [] means the kind's default: pkm/peer the middle block,
    # ultramemv2 every block; ultramem uses ``skip`` pairs instead.
    layers: list[int] = field(default_factory=list)
    n_slots: int = 4096  # N physical slots; must be a perfect square, n = sqrt(N) sub-keys per side
    heads: int = 1  # H retrieval heads (own queries and sub-keys, shared values)
    topk: int = 16  # m slots per token per head
    d_key: int = 0  # D_k query/key width; 0 -> h/2 (the [UM2] rule)
    d_value: int = 0  # D_v value width; 0 -> h (pkm, peer-free kinds)
    d_pre: int = 0  # D_p pre-value width (ultramemv2); 0 -> d_value / 3 (the 1:3 split)
    query_norm: str = "layernorm"  # pkm/peer: "layernorm", "batchnorm" ([PKM]) or "none"
    softmax: bool = True  # softmax over the m scores: [PKM]/[PEER] use it; [UM] removed it (set false, as the ultramem configs do)
    rank: int = 2  # r, Tucker rank of TDQKR (ultramem, ultramemv2)
    cores: int = 2  # c, multi-core scoring cores (ultramem, ultramemv2)
    expansion: int = 4  # E, implicit value expansion (ultramem)
    skip: list[list[int]] = field(default_factory=list)  # ultramem: [[i, j], ...] read before i, add after j > i
    activation: str = "none"  # ultramemv2 pre-value activation (none = the paper's choice); peer expert activation
    ring_group: int = 1  # ultramemv2: layers per group sharing one value table in a ring
    value_init: str = "principled"  # ultramemv2 value/pre-value init; pkm uses N(0, D_v^-1/2)
    sigma_s: float = 0.0  # ultramemv2 top-m score spread; 0 -> estimated by Monte Carlo at init
    # Ablation switches of UltraMemV2's changes 2 and 3 ([UM2] §4; the defaults are the paper's layer):
    pre_values: bool = True  # ultramemv2: False -> plain values, o = W^T sum_i s_i V_i (no P, no W_p)
    value_projections: int = 1  # ultramemv2: E > 1 (a perfect square) -> UltraMem's E per-block projections

    def validate(self, model) -> None:  # model: ModelConfig
        from minimem.config import MAX_SIZE, MAX_SLOTS, check_range  # here: minimem.config imports this module

        if self.kind not in MEMORY_KINDS:
            raise ValueError(f"model.memory.kind must be one of {MEMORY_KINDS}, got {self.kind!r}")
        for layer in self.layers:
            if not 0 <= layer < model.n_layer:
                raise ValueError(
                    f"model.memory.layers entries must be in [0, model.n_layer={model.n_layer}), got {layer}"
                )
        if self.kind == "none":
            return
        check_range("model.memory.n_slots", self.n_slots, 1, MAX_SLOTS)
        for name in ("heads", "rank", "cores", "expansion", "ring_group", "value_projections"):
            check_range(f"model.memory.{name}", getattr(self, name), 1, MAX_SIZE)
        for name in ("d_key", "d_value", "d_pre"):  # 0: the kind's default width
            check_range(f"model.memory.{name}", getattr(self, name), 0, MAX_SIZE)
        check_range("model.memory.sigma_s", self.sigma_s, 0.0)
        n = math.isqrt(self.n_slots)
        if n * n != self.n_slots:
            raise ValueError(f"model.memory.n_slots must be a perfect square (N = n^2), got {self.n_slots}")
        if not 1 <= self.topk <= n:
            raise ValueError(f"model.memory.topk (m) must be in [1, n={n}] where n = sqrt(n_slots), got {self.topk}")
        d_key = self.d_key or model.n_embd // 2
        if d_key % 2 != 0:
            raise ValueError(f"model.memory.d_key must be even (split into two halves), got {d_key}")
        d_value = self.d_value or model.n_embd
        if d_value % self.cores != 0:
            raise ValueError(
                f"model.memory.d_value={d_value} must be divisible by model.memory.cores={self.cores}"
            )
        if not isinstance(self.pre_values, bool):
            raise ValueError(f"model.memory.pre_values must be true or false, got {self.pre_values!r}")
        root = math.isqrt(self.value_projections)
        if root * root != self.value_projections:
            raise ValueError(
                f"model.memory.value_projections must be a perfect square >= 1 (1, 4, 9, ...), got {self.value_projections}"
            )
        if self.query_norm not in QUERY_NORMS:
            raise ValueError(f"model.memory.query_norm must be one of {QUERY_NORMS}, got {self.query_norm!r}")
        if self.value_init not in VALUE_INITS:
            raise ValueError(f"model.memory.value_init must be one of {VALUE_INITS}, got {self.value_init!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.memory.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for pair in self.skip:
            if len(pair) != 2:
                raise ValueError(f"model.memory.skip entries must be [i, j] pairs, got {pair}")
            i, j = pair
            if not (0 <= i < model.n_layer and 0 <= j < model.n_layer):
                raise ValueError(f"model.memory.skip pair {pair} must name blocks in [0, {model.n_layer})")
            if j <= i:
                raise ValueError(f"model.memory.skip pair [i, j] = {pair} needs j > i (skip-layer reads at i, adds at j)")
        if self.kind == "ultramem" and not self.skip:
            raise ValueError("model.memory.skip must list at least one [i, j] pair for kind 'ultramem'")
