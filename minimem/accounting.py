"""Accounting: parameters (total, activated), forward FLOPs and bytes of weights read per token.

Conventions, stated once:

- **Parameters** are counted on the real module (built on the ``meta`` device when a config is
  given, so nothing is allocated), grouped by role: ``embedding``, ``attention``, ``norm``,
  ``ffn`` (dense SwiGLU), ``moe``, ``memory``. Tied embeddings are one matrix, counted once.
- **Activated** parameters are those one token's forward touches: every dense weight; for the
  embedding, the whole V x h matrix (the output head multiplies by all of it; an untied input
  table adds the one row looked up); for a MoE, the router, the shared expert and k of the E
  experts; for a memory layer, everything except its value tables (query, keys, Tucker cores,
  norms, projections) plus the H m rows of each value table a token reads ([PKM] §3, [UM] §3,
  [UM2] §3: values, PEER's down and up vectors, UltraMemV2's pre-values). Value tables are the
  parameters flagged ``is_memory_value``.
- **FLOPs** are forward FLOPs per token, 2 x multiply-adds of the matrix products, plus the m^2
  additions of each candidate grid. Not counted: norms, softmax, activations, rotary, top-k.
  Attention adds 4 h c per layer for QK^T and AV over ``c`` keys; by default c is the mean
  causal context over a full block, (block_size + 1) / 2.
- **Bytes read** per forward step of B tokens: every dense weight once; a MoE layer's distinct
  experts; a memory layer's distinct value rows (Specification §3). Two numbers each: the *bound*
  (min(B k, E) experts, min(B H m, N) rows) and the *expectation under uniform access*
  (E (1 - (1 - k/E)^B) experts, N (1 - (1 - H m/N)^B) rows: each token reads a uniformly random
  set of k experts, or H m rows). A table shared by several layers (UltraMemV2's ring) is read
  once per layer that uses it, so it is counted per use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from minimem.config import ModelConfig, TuckerMemoryConfig, UltraMemV2Config, memory_layers
from minimem.ffn import MoE, SwiGLU
from minimem.model import GPT
from minimem.ultramemv2 import ring_groups, ring_layout

PARTS = ("embedding", "attention", "norm", "ffn", "moe", "memory")


# ----------------------------------------------------------------------------- model structure


@dataclass
class _MoELayer:
    n_experts: int
    top_k: int
    per_expert: int  # parameters of one expert
    always: int  # router + shared expert


@dataclass
class _Table:
    rows: int
    width: int  # summed widths of the tables indexed by the same rows (values + pre-values, ...)
    reads_per_token: int  # H m row reads per token (capped at rows)


@dataclass
class _MemoryLayer:
    always: int  # everything but the value tables
    table: Optional[_Table]


@dataclass
class _Structure:
    by_part: dict
    activated_by_part: dict
    dense: int  # parameters read by every forward, whatever the routing
    moe: list = field(default_factory=list)
    memory: list = field(default_factory=list)


def build_meta(config: ModelConfig) -> nn.Module:
    """The GPT for ``config`` on the meta device: shapes only, nothing allocated, no initialisation
    run (the layers skip theirs on the meta device, :func:`minimem.init.on_meta_device`)."""
    with torch.device("meta"):
        return GPT(config)


def _as_model(model_or_config) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    if isinstance(model_or_config, ModelConfig):
        return build_meta(model_or_config)
    raise ValueError(f"expected a GPT module or a ModelConfig, got {type(model_or_config).__name__}")


def is_memory_value(param: torch.Tensor) -> bool:
    return bool(getattr(param, "is_memory_value", False))


def memory_modules(model: nn.Module) -> list[nn.Module]:
    """The memory layers of a GPT, in forward order (FFN replacements, beside-FFN, skip-layer)."""
    out = []
    for block in model.blocks:
        if not isinstance(block.ffn, (SwiGLU, MoE)):
            out.append(block.ffn)
        if getattr(block, "memory", None) is not None:
            out.append(block.memory)
    out.extend(getattr(model, "skip_memories", []))
    return out


def moe_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _part_of(model: nn.Module, name: str) -> str:
    head = name.split(".")[0]
    if head in ("tok_emb", "lm_head"):
        return "embedding"
    if head == "norm_f":
        return "norm"
    if head == "skip_memories":
        return "memory"
    if head == "blocks":
        _, i, sub = name.split(".")[:3]
        if sub == "attn":
            return "attention"
        if sub in ("norm1", "norm2"):
            return "norm"
        if sub == "memory":
            return "memory"
        if sub == "ffn":
            ffn = model.blocks[int(i)].ffn
            return "moe" if isinstance(ffn, MoE) else "ffn" if isinstance(ffn, SwiGLU) else "memory"
    return "other"


def _memory_reads_per_token(config: ModelConfig) -> int:
    """H m: rows of each value table one token reads in one memory layer."""
    return 0 if config.memory.kind == "none" else config.memory.heads * config.memory.topk


def access_structure(model: nn.Module) -> _Structure:
    """How a GPT's parameters are read: ``by_part`` / ``activated_by_part`` counts, ``dense``
    (read by every forward), ``moe`` (per MoE layer: n_experts, top_k, per_expert, always) and
    ``memory`` (per memory layer: always, table = (rows, width, reads_per_token) or None),
    in the order of :func:`moe_modules` and :func:`memory_modules`."""
    config: ModelConfig = model.config
    by_part = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():  # tied weights appear once
        part = _part_of(model, name)
        by_part[part] = by_part.get(part, 0) + p.numel()
    activated = {k: v for k, v in by_part.items() if k not in ("moe", "memory")}
    if not config.tie_embeddings:  # the input table is read one row per token
        activated["embedding"] = model.lm_head.weight.numel() + config.n_embd

    moe_layers = []
    for moe in moe_modules(model):
        E = moe.config.n_experts
        experts = sum(p.numel() for p in moe.parameters() if p.dim() == 3 and p.shape[0] == E)
        always = sum(p.numel() for p in moe.parameters()) - experts
        moe_layers.append(_MoELayer(E, moe.config.top_k, experts // E, always))
    activated["moe"] = sum(m.always + m.top_k * m.per_expert for m in moe_layers)

    mem_layers = []
    reads = _memory_reads_per_token(config)
    for mem in memory_modules(model):
        tables = {id(p): p for p in mem.parameters() if is_memory_value(p)}
        shared = getattr(mem, "table", None)  # UltraMemV2's ring table, registered in one layer only
        if isinstance(shared, nn.Module):
            tables.update({id(p): p for p in shared.parameters() if is_memory_value(p)})
        tables = list(tables.values())
        always = sum(p.numel() for p in mem.parameters() if not is_memory_value(p))
        table = None
        if tables:
            rows = {p.shape[0] for p in tables}
            if len(rows) != 1:
                raise ValueError(f"value tables of {type(mem).__name__} have different row counts {sorted(rows)}")
            (n_rows,) = rows
            width = sum(p.numel() // n_rows for p in tables)
            table = _Table(n_rows, width, min(reads, n_rows))
        mem_layers.append(_MemoryLayer(always, table))
    activated["memory"] = sum(
        m.always + (m.table.reads_per_token * m.table.width if m.table else 0) for m in mem_layers
    )

    experts = sum(m.n_experts * m.per_expert for m in moe_layers)
    memory_tables = sum(p.numel() for p in model.parameters() if is_memory_value(p))
    dense = sum(by_part.values()) - experts - memory_tables  # read by every forward
    return _Structure(by_part, activated, dense, moe_layers, mem_layers)


def count_parameters(model_or_config: Union[nn.Module, ModelConfig]) -> dict:
    """``dict(total, activated, by_part, activated_by_part)`` (see the module docstring)."""
    s = access_structure(_as_model(model_or_config))
    by_part = {k: v for k, v in s.by_part.items() if k in PARTS or v}
    act = {k: s.activated_by_part.get(k, 0) for k in by_part}
    return dict(total=sum(by_part.values()), activated=sum(act.values()), by_part=by_part, activated_by_part=act)


# ----------------------------------------------------------------------------- analytic parameter counts


def memory_dims(config: ModelConfig) -> dict:
    """Resolved memory sizes: n, D_k, D_v, D_p (:meth:`minimem.config.MemoryConfig.widths`), H, m, r, c, E."""
    mem, h = config.memory, config.n_embd
    d_key, d_value, d_pre = mem.widths(h)
    tucker = isinstance(mem, TuckerMemoryConfig)
    return dict(
        N=mem.n_slots,
        n=math.isqrt(mem.n_slots),
        H=mem.heads,
        m=mem.topk,
        d_key=d_key,
        d_value=d_value,
        d_pre=d_pre,
        r=mem.rank if tucker else 0,  # r, c, E: 0 for the kinds without Tucker retrieval (pkm, peer)
        c=mem.cores if tucker else 0,
        E=mem.value_blocks() if tucker else 0,
        h=h,
    )


def n_memory_layers(config: ModelConfig) -> int:
    if config.memory.kind == "none":
        return 0
    if config.memory.kind == "ultramem":
        return len(config.memory.skip)
    return len(memory_layers(config))


def analytic_parameters(config: ModelConfig) -> dict:
    """Parameter counts by part from the formulas (no module built): checks ``count_parameters``."""
    h, L, V = config.n_embd, config.n_layer, config.vocab_size
    by_part = dict.fromkeys(PARTS, 0)
    by_part["embedding"] = V * h * (1 if config.tie_embeddings else 2)
    by_part["attention"] = L * 4 * h * h  # qkv (3h x h) + output projection (h x h), no biases
    by_part["norm"] = (2 * L + 1) * h  # two RMSNorm gains per block + the final one
    n_mem = n_memory_layers(config)
    replaced = n_mem if config.memory.kind in ("pkm", "peer") else 0
    if config.ffn == "dense":
        by_part["ffn"] = (L - replaced) * 3 * h * config.ffn_hidden  # SwiGLU: W1, W3 (h x f), W2 (f x h)
    else:
        moe = config.moe
        per_layer = (
            h * moe.n_experts
            + moe.n_experts * 3 * h * moe.d_expert
            + (3 * h * moe.d_expert if moe.shared_expert else 0)
        )
        by_part["moe"] = (L - replaced) * per_layer
    if n_mem:
        by_part["memory"] = sum(memory_layer_parameters(config, layer) for layer in _memory_layer_ids(config))
    return dict(total=sum(by_part.values()), by_part=by_part)


def _memory_layer_ids(config: ModelConfig) -> list[int]:
    """Blocks holding a memory (pkm, peer, ultramemv2), or the index of each skip pair (ultramem)."""
    return list(range(len(config.memory.skip))) if config.memory.kind == "ultramem" else memory_layers(config)


def _ring_rows(config: ModelConfig, layer: int) -> int:
    """Slots UltraMemV2's layer ``layer`` addresses: G N for its ring group of G layers (N with share_ratio)."""
    group = next((g for g in ring_groups(config) if layer in g), None)
    if group is None:
        raise ValueError(
            f"layer {layer} is not a memory layer: model.memory.layers resolves to {memory_layers(config)}"
        )
    return ring_layout(config.memory, group, layer)[1]


def _router_parameters(config: ModelConfig) -> int:
    """Product-key router [PKM] §3.2-3.3: W_q (h -> H D_k), query norm, sub-keys 2 x (n x D_k/2) per head.

    The query LayerNorm (gain + bias over D_k) is shared by the heads; BatchNorm spans all H D_k.
    """
    d = memory_dims(config)
    h, n, H, Dk = d["h"], d["n"], d["H"], d["d_key"]
    norm = {"layernorm": 2 * Dk, "batchnorm": 2 * H * Dk, "none": 0}[config.memory.query_norm]
    return h * H * Dk + norm + H * n * Dk


def _tucker_parameters(config: ModelConfig, n_keys: int) -> int:
    """TDQKR [UM] §3.1-3.2: per head and rank a row and a column query (D_k/2 each, one W_q
    h -> H r D_k) and sub-key tables (n_keys x D_k/2 each), c cores (r x r) per head; one
    bias-free LayerNorm gain (D_k/2) shared by all queries and one by all keys."""
    d = memory_dims(config)
    h, H, r, c, Dk = d["h"], d["H"], d["r"], d["c"], d["d_key"]
    return h * H * r * Dk + H * r * n_keys * Dk + Dk + H * c * r * r


def memory_layer_parameters(config: ModelConfig, layer: int) -> int:
    """Parameters of memory layer ``layer`` (a block, or a skip-pair index for ultramem).

    Value tables included; an UltraMemV2 ring table is split evenly: N rows each (N / s with share_ratio s).
    """
    d = memory_dims(config)
    kind = config.memory.kind
    h, N, n, Dv, Dp = d["h"], d["N"], d["n"], d["d_value"], d["d_pre"]
    if kind == "pkm":  # router + values N x D_v + output projection D_v -> h when D_v != h
        return _router_parameters(config) + N * Dv + (Dv * h if Dv != h else 0)
    if kind == "peer":  # router + down u_i and up v_i in R^h per expert
        return _router_parameters(config) + 2 * N * h
    if kind == "ultramem":  # own RMSNorm + TDQKR over E N virtual slots + values + E projections
        return h + _tucker_parameters(config, math.isqrt(d["E"]) * n) + N * Dv + d["E"] * Dv * h
    if isinstance(config.memory, UltraMemV2Config):  # TDQKR over the ring table, W_p, W, N rows of V and P
        n_keys = math.isqrt(d["E"] * _ring_rows(config, layer))
        rows = N // (config.memory.share_ratio or 1)
        return _tucker_parameters(config, n_keys) + h * Dp + d["E"] * Dv * h + rows * (Dv + Dp)
    raise ValueError(f"model.memory.kind must be one of pkm, peer, ultramem, ultramemv2, got {kind!r}")


# ----------------------------------------------------------------------------- FLOPs


def tucker_flops(config: ModelConfig, n_keys: int) -> dict[str, int]:
    """TDQKR forward FLOPs per token by part, with ``n_keys`` sub-keys per side (an M x M candidate
    grid, M = ``memory.candidates`` or m, doubled by ``search: signed``; the full n_keys x n_keys grid
    with ``search: exact``)."""
    d, exact = memory_dims(config), config.memory.search == "exact"
    h, H, m, r, c, Dk = d["h"], d["H"], d["m"], d["r"], d["c"], d["d_key"]
    M = n_keys if exact else (config.memory.candidates or m) * (2 if config.memory.search == "signed" else 1)
    return {
        "query": 2 * h * H * r * Dk,  # W_q: h -> H r (D_k/2 + D_k/2)
        "keys": 2 * H * r * n_keys * Dk,  # rank-wise row and column sub-key scores
        "candidates": 0 if exact else 4 * H * r * n_keys,  # u^T S_row and t^T S_col
        "grid": 2 * H * (M * r * r + M * M * r),  # rescoring the M x M grid with the full core (C S_col first)
        "core_scores": 2 * H * m * c * (r * r + r),  # each core's score at the m chosen slots
    }


def memory_flops_per_token(config: ModelConfig, layer: int) -> dict[str, int]:
    """FLOPs per token of the UltraMemV2 layer in block ``layer``, by part (Specification §4).

    TDQKR over its ring table (E x its rows with the per-block-projection ablation), then the
    pre-value projection and gate, the weighted sum of the m value rows and the output projection.
    Norms, top-k comparisons and the shuffle are not counted.
    """
    d = memory_dims(config)
    h, H, m, Dv, Dp, E = d["h"], d["H"], d["m"], d["d_value"], d["d_pre"], d["E"]
    n_keys = math.isqrt(E * _ring_rows(config, layer))
    return {
        **tucker_flops(config, n_keys),
        "pre_proj": 2 * h * Dp,  # W_p (0 without pre-values)
        "gate": 2 * H * m * Dp,  # <P_i, px>
        "values": 2 * H * m * Dv,  # sum_i s_i g_i V_i
        "out_proj": 2 * E * Dv * h,  # W (E projections in the IVE ablation)
    }


def ffn_flops_per_token(config: ModelConfig) -> int:
    """FLOPs per token of one block's FFN slot (SwiGLU: 3 matmuls; MoE: router + k experts)."""
    h = config.n_embd
    if config.ffn == "dense":
        return 6 * h * config.ffn_hidden
    moe = config.moe
    return 2 * h * moe.n_experts + (moe.top_k + int(moe.shared_expert)) * 6 * h * moe.d_expert


def memory_layer_flops(config: ModelConfig, layer: int) -> int:
    """Forward FLOPs per token of memory layer ``layer``: query, retrieval, value read, projections."""
    d = memory_dims(config)
    kind = config.memory.kind
    h, n, H, m, Dk, Dv = d["h"], d["n"], d["H"], d["m"], d["d_key"], d["d_value"]
    if kind in ("pkm", "peer"):
        query = 2 * h * H * Dk
        retrieval = H * (2 * n * Dk + m * m)  # 2n sub-key dot products of D_k/2, m^2 grid sums
        if kind == "pkm":
            read = 2 * H * m * Dv + (2 * Dv * h if Dv != h else 0)
        else:
            read = H * m * 4 * h  # <u_i, x> and sigma(.) v_i for each selected expert
        return query + retrieval + read
    if kind == "ultramem":
        # TDQKR + weighted read of H m rows (each element times its core's score) + E projections
        return sum(tucker_flops(config, math.isqrt(d["E"]) * n).values()) + 2 * H * m * Dv + 2 * d["E"] * Dv * h
    if isinstance(config.memory, UltraMemV2Config):
        return sum(memory_flops_per_token(config, layer).values())
    raise ValueError(f"model.memory.kind must be one of pkm, peer, ultramem, ultramemv2, got {kind!r}")


def flops_per_token(config: ModelConfig, context: Optional[float] = None) -> dict:
    """Forward FLOPs per token by part (see the module docstring for what is counted).

    ``context``: keys each token attends to; default the causal mean (block_size + 1) / 2.
    """
    config.validate()
    h, L, V = config.n_embd, config.n_layer, config.vocab_size
    c = (config.block_size + 1) / 2 if context is None else context
    if c <= 0:
        raise ValueError(f"context must be > 0, got {context}")
    out = dict(attention=L * 2 * 4 * h * h, attention_context=L * 4 * h * c, lm_head=2 * h * V, ffn=0, moe=0, memory=0)
    n_mem = n_memory_layers(config)
    replaced = n_mem if config.memory.kind in ("pkm", "peer") else 0
    out["ffn" if config.ffn == "dense" else "moe"] = (L - replaced) * ffn_flops_per_token(config)
    if n_mem:
        out["memory"] = sum(memory_layer_flops(config, layer) for layer in _memory_layer_ids(config))
    out["forward"] = sum(out.values())
    return out


def mcp_percent(config: ModelConfig) -> float:
    """Memory's share of compute per token, 100 x memory / (memory + FFN) FLOPs ([UM2] §4.5: best ~17%)."""
    if config.memory.kind == "none":
        raise ValueError("mcp_percent needs a memory layer: model.memory.kind is 'none'")
    f = flops_per_token(config)
    return 100.0 * f["memory"] / (f["memory"] + f["ffn"] + f["moe"])


# ----------------------------------------------------------------------------- bytes read


def expected_distinct(population: int, per_token: int, batch_tokens: int) -> float:
    """E[# distinct items] when each of B tokens reads a uniform random ``per_token``-subset."""
    if per_token > population:
        raise ValueError(f"per_token={per_token} exceeds population={population}")
    return population * (1.0 - (1.0 - per_token / population) ** batch_tokens)


def bytes_read(model_or_config: Union[nn.Module, ModelConfig], batch_tokens: int, dtype_bytes: int = 4) -> dict:
    """Bytes of parameters one forward step over ``batch_tokens`` tokens reads.

    Returns ``dict(dense, moe_bound, moe_expected, memory_bound, memory_expected, bound,
    expected, bound_per_token, expected_per_token)``: bounds min(B k, E) experts and
    min(B H m, N) rows; expectations under uniform access (module docstring).
    """
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
    s = access_structure(_as_model(model_or_config))
    B = batch_tokens
    out = dict(
        batch_tokens=B,
        dense=s.dense * dtype_bytes,
        moe_bound=0.0,
        moe_expected=0.0,
        memory_bound=0.0,
        memory_expected=0.0,
    )
    for m in s.moe:
        out["moe_bound"] += min(B * m.top_k, m.n_experts) * m.per_expert * dtype_bytes
        out["moe_expected"] += expected_distinct(m.n_experts, m.top_k, B) * m.per_expert * dtype_bytes
    for m in s.memory:  # the non-table part of a memory layer is in ``dense``
        if m.table is not None:
            t = m.table
            out["memory_bound"] += min(B * t.reads_per_token, t.rows) * t.width * dtype_bytes
            out["memory_expected"] += expected_distinct(t.rows, t.reads_per_token, B) * t.width * dtype_bytes
    out["bound"] = out["dense"] + out["moe_bound"] + out["memory_bound"]
    out["expected"] = out["dense"] + out["moe_expected"] + out["memory_expected"]
    out["bound_per_token"] = out["bound"] / B
    out["expected_per_token"] = out["expected"] / B
    return out


def _memory_rows(module: nn.Module) -> Optional[torch.Tensor]:
    """Physical value-table rows a memory module read in its last forward."""
    return getattr(module, "last_indices", None)


@torch.no_grad()
def measured_bytes_read(model: nn.Module, idx: torch.Tensor, dtype_bytes: int = 4) -> dict:
    """Run ``model(idx)`` and count the experts and value rows its modules actually touched.

    Reads ``last_indices`` of every MoE (T, k) and memory layer (physical row ids). Returns
    ``dict(batch_tokens, dense, moe, memory, total, per_token, distinct_experts, distinct_rows)``.
    """
    s = access_structure(model)
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
    B = idx.numel()
    distinct_experts, distinct_rows = [], []
    moe_bytes = mem_bytes = 0
    for module, layer in zip(moe_modules(model), s.moe):
        e = int(module.last_indices.unique().numel())
        distinct_experts.append(e)
        moe_bytes += e * layer.per_expert * dtype_bytes
    for module, layer in zip(memory_modules(model), s.memory):
        if layer.table is None:
            continue
        rows = _memory_rows(module)
        if rows is None:
            raise ValueError(f"{type(module).__name__} does not expose last_indices: cannot measure rows read")
        r = int(rows.unique().numel())
        distinct_rows.append(r)
        mem_bytes += r * layer.table.width * dtype_bytes
    dense = s.dense * dtype_bytes
    total = dense + moe_bytes + mem_bytes
    return dict(
        batch_tokens=B,
        dense=dense,
        moe=moe_bytes,
        memory=mem_bytes,
        total=total,
        per_token=total / B,
        distinct_experts=distinct_experts,
        distinct_rows=distinct_rows,
    )


def plot_bytes_per_token(configs: dict, batch_sizes: Iterable[int], dtype_bytes: int = 4):
    """Log-log plot of bytes read per token against B: uniform-access expectation (solid), bound (dashed)."""
    from matplotlib.figure import Figure

    batch_sizes = sorted(int(b) for b in batch_sizes)
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, config) in enumerate(configs.items()):
        model = _as_model(config)
        rows = [bytes_read(model, b, dtype_bytes) for b in batch_sizes]
        color = f"C{i}"
        ax.plot(batch_sizes, [r["expected_per_token"] for r in rows], "-o", ms=3, color=color, label=label)
        ax.plot(batch_sizes, [r["bound_per_token"] for r in rows], "--", color=color, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per forward step B")
    ax.set_ylabel(f"bytes of weights read per token ({dtype_bytes}-byte weights)")
    ax.set_title("Weights read per token: uniform-access expectation (solid), bound (dashed)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
