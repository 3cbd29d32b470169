"""A small GPT, written to be read top to bottom.

Pre-norm transformer blocks (RMSNorm), causal self-attention through
``scaled_dot_product_attention`` with rotary positions, and a feed-forward *slot* that
the config fills: a dense SwiGLU FFN, a mixture of experts, or a memory layer
(PKM and PEER replace the FFN in the blocks they live in; UltraMemV2 sits beside the FFN
and reads its normalised input; UltraMem reads the residual stream at block i and adds
its output after block j > i, the skip-layer placement of [UM] §3).

Modules that produce an auxiliary loss (the MoE load-balance loss, for instance) set
``self.aux_loss`` in their forward; modules that need work after each optimiser step
(UltraMem's SVD of the Tucker core) define ``after_optimizer_step()``; parameters that
belong to memory value tables carry ``param.is_memory_value = True`` so the trainer can
give them their own learning rate. Memory modules that initialise their own weights
define ``reset_memory_parameters()``, called after the generic GPT-2 initialisation.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimem.config import MEMORY_CONFIGS, ModelConfig, PEERConfig, PKMConfig, UltraMemV2Config, memory_layers
from minimem.ffn import MoE, SwiGLU
from minimem.init import on_meta_device
from minimem.peer import PEER
from minimem.pkm import PKM
from minimem.ultramem import UltraMem
from minimem.ultramemv2 import UltraMemV2, ring_tables


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotate channel pairs by position-dependent angles.

    Channel pair (2i, 2i+1) at position t, read as the complex number x_2i + j x_2i+1, is
    multiplied by e^{j t theta_i} with theta_i = base^(-2i/d): one complex product per pair
    (as in LLaMA), a third of the cost of the real-valued cos/sin form on CPU.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, head_dim/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # x: (B, heads, T, head_dim)
        positions = slice(start, start + x.shape[-2])  # absolute positions: a cached decode step starts late
        dtype = torch.promote_types(x.dtype, torch.float32)  # complex64, or complex128 for float64
        rotation = torch.complex(self.cos[positions].to(dtype), self.sin[positions].to(dtype))  # e^{j t theta_i}
        pairs = torch.view_as_complex(x.to(dtype).unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class LayerCache(NamedTuple):
    """One layer's view of a :class:`KVCache`: key and value buffers, and how many positions they hold."""

    k: torch.Tensor  # (B, heads, block_size, head_dim)
    v: torch.Tensor
    start: int


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for decoding one token at a time.

    ``GPT.forward(idx, cache=cache)`` gives ``idx`` the positions [length, length + T): each
    attention layer writes its keys and values there and attends to all of [0, length + T); then
    ``length`` moves on by T. Only attention needs a cache: FFN, MoE and memory layers are per token.
    """

    def __init__(self, config: ModelConfig, batch_size: int, dtype=torch.float32, device=None):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.length)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.is_residual_projection = True
        self.rotary = Rotary(self.head_dim, config.block_size, config.rope_base)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: Optional[LayerCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        start = 0 if cache is None else cache.start  # position of x's first token
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q, start), self.rotary(k, start)
        mask = None  # start 0: SDPA's square causal mask; one new token: it sees every cached key
        if cache is not None:
            cache.k[:, :, start : start + T], cache.v[:, :, start : start + T] = k, v
            k, v = cache.k[:, :, : start + T], cache.v[:, :, : start + T]
            if start > 0 and T > 1:  # query i sits at position start + i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


# ----------------------------------------------------------------------------- the feed-forward slot
# Where a memory goes, one question per placement: PKM and PEER *are* the FFN of their blocks;
# UltraMemV2 sits beside the FFN of its blocks and reads the same normalised input; UltraMem reads
# the residual stream before block i and adds its output after block j > i (skip-layer, [UM] §3).


def build_ffn(config: ModelConfig, layer: int) -> nn.Module:
    """What fills block ``layer``'s feed-forward slot: PKM / PEER in their blocks, else a MoE or a SwiGLU."""
    if type(config.memory) in IN_FFN and layer in memory_layers(config):
        return IN_FFN[type(config.memory)](config, layer)
    if config.ffn == "moe":
        return MoE(config.n_embd, config.moe, config.n_layer)
    return SwiGLU(config.n_embd, config.ffn_hidden)


# Memory layers that sit beside the FFN, by config class. The experiments register their UltraMemV2
# variants here (with their own config kind); the library knows only the paper's layer.
BESIDE_FFN: dict[type, type] = {UltraMemV2Config: UltraMemV2}
IN_FFN: dict[type, type] = {PKMConfig: PKM, PEERConfig: PEER}  # and those in the FFN's place (build_ffn)


def register_beside_ffn(config_class: type, layer_class: type) -> None:
    """Make ``kind: config_class.kind`` load as ``config_class`` and build ``layer_class`` beside the FFN."""
    MEMORY_CONFIGS[config_class.kind] = config_class
    BESIDE_FFN[config_class] = layer_class


def build_beside_ffn(config: ModelConfig, layer: int, tables: dict) -> Optional[nn.Module]:
    """The memory added beside block ``layer``'s FFN (UltraMemV2, reading ``tables[layer]``), or None."""
    layer_class = BESIDE_FFN.get(type(config.memory))
    if layer_class is not None and layer in memory_layers(config):
        return layer_class(config, layer, tables[layer])
    return None


def build_skip_layers(config: ModelConfig) -> tuple[list[tuple[int, int]], list[nn.Module]]:
    """``([(i, j), ...], [module, ...])``: the skip-layer memories (UltraMem), one per pair."""
    if config.memory.kind != "ultramem":
        return [], []
    pairs = [tuple(p) for p in config.memory.skip]
    return pairs, [UltraMem(config, i, j) for i, j in pairs]


class Block(nn.Module):
    """x += attn(norm(x)); h = norm(x); x += ffn(h) [+ memory(h)]."""

    def __init__(self, config: ModelConfig, layer: int, tables: Optional[dict] = None):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm2 = RMSNorm(config.n_embd)
        self.ffn = build_ffn(config, layer)
        self.memory = build_beside_ffn(config, layer, tables or {})  # UltraMemV2, or None

    def forward(self, x: torch.Tensor, cache: Optional[LayerCache] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        h = self.norm2(x)
        out = self.ffn(h)
        if self.memory is not None:
            out = out + self.memory(h)
        return x + out


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        # UltraMemV2's ring-shared value tables: made here, one per ring group, and handed to the layers
        tables = ring_tables(config) if isinstance(config.memory, UltraMemV2Config) else {}
        self.blocks = nn.ModuleList([Block(config, i, tables) for i in range(config.n_layer)])
        # Skip-layer memories [UM]: (i, j, module) reads the residual before block i,
        # adds after block j.
        self.skip_pairs, skip_modules = build_skip_layers(config)
        self.skip_memories = nn.ModuleList(skip_modules)
        self.norm_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if not on_meta_device(self):  # the meta device (parameter counting) has nothing to initialise
            self.reset_parameters()
        self.last_ce_loss: Optional[torch.Tensor] = None
        self.last_aux_loss: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- initialisation
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L))."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                s = (
                    std / math.sqrt(2 * self.config.n_layer)
                    if getattr(module, "is_residual_projection", False)
                    else std
                )
                nn.init.normal_(module.weight, 0.0, s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_memory_parameters"):
                module.reset_memory_parameters()

    # ----------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None):
        """Return ``(logits, loss)``. ``targets`` equal to -1 are ignored (answer-only masks).

        ``loss`` is the cross-entropy plus every auxiliary loss; the two parts are kept in
        ``self.last_ce_loss`` and ``self.last_aux_loss``. With a :class:`KVCache` (inference),
        ``idx`` continues the tokens the cache holds (see :mod:`minimem.generate`).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            what = f"sequence length {T}" if cache is None else f"{start} cached + {T} new positions"
            raise ValueError(f"{what} exceeds model.block_size={self.config.block_size}")
        if cache is not None and cache.k.shape[1] != B:
            raise ValueError(f"the cache was made for batch size {cache.k.shape[1]}, got idx of batch size {B}")
        x = self.drop(self.tok_emb(idx))
        pending: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            for (src, dst), mem in zip(self.skip_pairs, self.skip_memories):
                if src == i:
                    out = mem(x)
                    pending[dst] = pending[dst] + out if dst in pending else out
            x = block(x, None if cache is None else cache.layer(i))
            if i in pending:
                x = x + pending.pop(i)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            aux = self.aux_loss()
            self.last_ce_loss, self.last_aux_loss = ce.detach(), aux.detach()
            loss = ce + aux
        return logits, loss

    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary losses that modules stored in their last forward."""
        total = torch.zeros((), device=self.tok_emb.weight.device)
        for module in self.modules():
            value = getattr(module, "aux_loss", None)
            if isinstance(value, torch.Tensor):
                total = total + value
        return total

    def after_optimizer_step(self) -> None:
        """Called by the trainer once per optimiser step (UltraMem refreshes its SVD here)."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
