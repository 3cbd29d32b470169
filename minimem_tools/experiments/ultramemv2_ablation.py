"""UltraMemV2 with changes 2 and 3 undone, for the ablations ([UM2] §4, Specification §4).

The library's :class:`minimem.ultramemv2.UltraMemV2` is the paper's layer and nothing else. The
ablations need three switches it does not have; they live here, as a config kind of their own
(``kind: ultramemv2-ablation``, every UltraMemV2 field plus the switches) and a subclass of the layer:

- ``pre_values: false`` undoes change 3: plain values, o = W^T sum_i s_i V_i (no P, no W_p). The
  principled std is then :func:`minimem.init.plain_value_std` (sigma_V enters the output once).
- ``activation``: a gate activation on <P_i, W_p x>, which the paper dropped (Specification §4.3).
  The gate is computed outside the fused lookup: act(<P_i, px>) scales the scores.
- ``value_projections: E > 1`` undoes change 2 with UltraMem's implicit value expansion: the key
  grid addresses E x rows virtual slots, the shuffle maps a virtual slot to (block, row), the reads
  are pooled per block and W is E projections side by side (E D_v -> h), as in
  :class:`minimem.ultramem.UltraMem`.

Importing this module registers the kind (``minimem.model.register_beside_ffn``), so a YAML config
or a saved run with ``kind: ultramemv2-ablation`` loads and builds wherever the tooling runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimem.config import ACTIVATIONS, UltraMemV2Config, check_choice, check_range, check_square
from minimem.init import ffn_output_variance, on_meta_device, plain_value_std
from minimem.kernels import memory_lookup
from minimem.model import register_beside_ffn
from minimem.ultramem import SHUFFLE_SEED, TuckerRetrieval, pool_by_block, seeded_permutation
from minimem.ultramemv2 import UltraMemV2

GATE_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "silu": F.silu}


@dataclass
class UltraMemV2AblationConfig(UltraMemV2Config):
    """UltraMemV2's fields plus the ablation switches (the defaults give the paper's layer)."""

    kind: str = "ultramemv2-ablation"
    activation: str = "none"  # act(<P_i, W_p x>); none = the paper's choice
    pre_values: bool = True  # False -> plain values, o = W^T sum_i s_i V_i (no P, no W_p)
    value_projections: int = 1  # E > 1 (a perfect square) -> UltraMem's E per-block projections

    def widths(self, h: int) -> tuple[int, int, int]:
        d_key, d_value, d_pre = super().widths(h)
        return d_key, d_value, d_pre if self.pre_values else 0

    def value_blocks(self) -> int:
        return self.value_projections

    def validate(self, model) -> None:
        if not isinstance(self.pre_values, bool):
            raise ValueError(f"model.memory.pre_values must be true or false, got {self.pre_values!r}")
        check_choice("model.memory.activation", self.activation, ACTIVATIONS)
        if self.activation != "none" and not self.pre_values:
            raise ValueError("model.memory.activation gates the pre-values: it needs model.memory.pre_values true")
        check_range("model.memory.value_projections", self.value_projections, 1, 1024)
        check_square("model.memory.value_projections", self.value_projections, " >= 1 (1, 4, 9, ...)")
        super().validate(model)


class UltraMemV2Ablation(UltraMemV2):
    """:class:`UltraMemV2` with the switches of :class:`UltraMemV2AblationConfig`."""

    def __init__(self, config, layer: int, table=None):
        super().__init__(config, layer, table)
        mem, h = config.memory, config.n_embd
        self.activation = mem.activation
        self.projections = E = mem.value_projections
        if E > 1:  # the key grid addresses E x the table's rows; W is E projections side by side
            virtual = E * self.table_rows
            self.retrieval = TuckerRetrieval(
                h,
                math.isqrt(virtual),
                self.d_key,
                mem.rank,
                mem.cores,
                mem.heads,
                mem.topk,
                mem.softmax,
                **mem.retrieval_options(),
            )
            self.out_proj = nn.Linear(E * self.d_value, h, bias=False)
            self.shuffle = seeded_permutation(virtual, SHUFFLE_SEED + 104729 + layer)
            if not on_meta_device(self):
                self.reset_memory_parameters()

    def table_std(self) -> float:
        if self.pre_proj is None and self.config.memory.value_init in ("principled", "paper"):
            # plain values: sigma_V enters the output once (no second factor <P_i, px>)
            return plain_value_std(
                ffn_output_variance(self.config),
                self.sigma_s,
                self.d_value,
                self.topk,
                self.heads,
                self.config.n_embd,
                self.score_mean,
            )
        return super().table_std()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(B * T, h)
        scores, slots = self.retrieval(flat)  # (BT, Hm, c), (BT, Hm)
        virtual = self.shuffle[slots]
        block, rows = virtual // self.table_rows, (virtual % self.table_rows + self.offset) % self.table_rows
        table = self.table
        px = self.pre_proj(flat) if self.pre_proj is not None else None  # (BT, D_p)
        weights, pre_values = scores, table.pre_values
        if px is not None and self.activation != "none":  # act(<P_i, px>) scales the scores
            ones = scores.new_ones(rows.numel(), 1, 1)
            pre_rows = memory_lookup(table.pre_values, rows.reshape(-1, 1), ones).view(B * T, -1, self.d_pre)
            gate = GATE_ACTIVATIONS[self.activation](torch.einsum("tmd,td->tm", pre_rows, px))
            weights, pre_values, px = scores * gate.unsqueeze(-1), None, None
        if self.projections == 1:
            read = memory_lookup(table.values, rows, weights, pre_values, px)
        else:  # pool per block, as UltraMem
            read = pool_by_block(table.values, rows, block, weights, self.projections, pre_values, px)
        self.record(rows, scores, B, T)
        return self.out_proj(read).view(B, T, h)


register_beside_ffn(UltraMemV2AblationConfig, UltraMemV2Ablation)

__all__ = ["UltraMemV2AblationConfig", "UltraMemV2Ablation", "GATE_ACTIVATIONS"]
