"""UltraMem [UM]: Tucker-decomposed retrieval, multi-core scoring, implicit value expansion.

The layer reads the residual stream before block i and adds its output after block j > i
(skip-layer placement, [UM] §3.4), so the memory lookup can overlap the dense blocks between.

    x_n            = RMSNorm(x)                                   (own norm: x is the raw stream)
    S_row, S_col   = rank-wise row / column scores of x_n          TDQKR, [UM] §3.1
    scores, slots  = top-m of S_row^T C S_col, per core           MCS,   [UM] §3.2 (no softmax)
    block, row     = shuffle[slot] // N, shuffle[slot] % N         IVE,   [UM] §3.3
    pooled_p       = sum_{i: block_i = p} scores_i . V[row_i]      pool on the physical table first
    out            = sum_p W_p^T pooled_p                          then the E projections

Choices the paper leaves open (made here, with the official code as tie-breaker):

- Queries: every rank a has its own row query and column query (each D_k / 2 wide) and its own
  row / column sub-keys, so ``W_q`` maps h -> H r D_k, as Specification §3 describes. (The official
  code shares one query across ranks, and still does with its ``mem_q_for_each_tucker_rank`` flag
  on: per-rank queries are minimem's reading of the paper, not an official option.)
- Query and key normalisation over the D_k / 2 channels, one gain vector shared by all queries
  and one by all keys: bias-free LayerNorm (``memory.qk_norm: layernorm``, minimem's default) or
  RMSNorm (``rmsnorm``, what the official config uses). UltraMem initialises both gains to
  (D_k / 2)^(-1/3) (official v1 constant); UltraMemV2 calibrates them instead.
- Cores: c cores per head, each (r, r), initialised U(0, 1) (official code) so the summed core
  starts positive and its leading singular vectors u, t start positive.
- Candidate selection: (u, t) = :func:`minimem.tucker.rank1_core` of the summed core, whose
  sign rule makes the largest |entry| of u positive (``memory.rank1_sign: fixed``); ``continuous``
  (official code) instead flips (u, t) when the new u points against the last one. Recomputed
  only by :meth:`TuckerRetrieval.refresh_rank1` (called from ``after_optimizer_step`` and at
  init), outside autograd, and stored as buffers. ``memory.candidates`` M widens the search to
  an M x M grid; ``memory.search: signed`` adds the bottom-M of each side (a 2M x 2M grid: slots
  whose two factor scores are both negative score high too); ``exact`` takes the exact top-m of
  all slots (a reference).
- Heads: each head has its own queries, keys, cores and (u, t); values are shared; the H m
  selected slots of a token are pooled together (their outputs summed).
- ``softmax=True`` (ablation only; the paper removes it): softmax over the m scores of each
  head, separately for each core.
- IVE: E must be a perfect square. The virtual table has E N slots, addressed by a key grid of
  sqrt(E) n sub-keys per side (official code). A fixed random permutation (a buffer drawn from
  a generator seeded by the layer's (i, j), never re-drawn) maps virtual slot v to block
  ``perm[v] // N`` and physical row ``perm[v] % N``. The E projections W_p (D_v -> h) are one
  Linear on the concatenated E pooled vectors, which equals sum_p W_p^T pooled_p.
- Pooling goes through :func:`minimem.kernels.memory_lookup`: one call with one slot per
  (token, slot) pair reads each selected row once, then an ``index_add`` sums the pairs into
  their (token, block) bucket. With E = 1 a single ordinary lookup does it.
- Init (official v1 code): query projection and keys N(0, (D_k/2)^-1/2) (their scale is
  removed by the norms), values N(0, 0.02^2), output projection N(0, 1 / (E D_v)).
  ``memory.value_init`` is an UltraMemV2 field and is not read here.
- The Tucker-core rank penalty of [UM] (relu(sigma_2 - 0.15)^2) is not implemented: [UM2]
  removed it and the config has no weight for it.
- Visualisation: ``last_indices`` (B, T, H m) physical rows read, ``last_scores``
  (B, T, H m, c), and ``usage_counts`` (N,) counting reads of each physical row since the last
  ``reset_usage()``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimem.init import on_meta_device
from minimem.kernels import memory_lookup
from minimem.tucker import exact_search, rank1_cores, tucker_recall, tucker_topk

SHUFFLE_SEED = 0x5EED  # base seed of the fixed IVE / UltraMemV2 slot permutations


def seeded_permutation(size: int, seed: int) -> torch.Tensor:
    """A fixed random permutation of range(size), independent of the global RNG."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


class TuckerRetrieval(nn.Module):
    """TDQKR with multi-core scoring [UM] §3.1-3.2: x (T, h) -> scores (T, H m, c), slots (T, H m).

    Slot ``i * n_keys + j`` is grid cell (row i, column j) of an n_keys x n_keys grid. Per head
    and rank a: S_row[a, i] = <Norm(q_row,a), Norm(K_row[a, i])>, likewise S_col. Core k scores
    cell (i, j) as S_row[:, i]^T C^(k) S_col[:, j]; selection uses the summed core
    (:func:`minimem.tucker.tucker_topk`), and each core's own score is returned so that it
    can weight its slice of the value vector. The keyword options are the config fields of the
    same names (module docstring; :class:`minimem.config.TuckerMemoryConfig`).
    """

    def __init__(self, dim, n_keys, d_key, rank, cores, heads, topk, softmax, search="tdqkr", candidates=0,
                 rank1_sign="fixed", qk_norm="layernorm"):  # fmt: skip
        super().__init__()
        if d_key % 2 != 0:
            raise ValueError(f"d_key must be even (row and column halves), got {d_key}")
        if not 1 <= topk <= n_keys:
            raise ValueError(f"topk (m) must be in [1, n_keys={n_keys}], got {topk}")
        most = n_keys // 2 if search == "signed" else n_keys  # signed: top and bottom M of n_keys
        if candidates and not topk <= candidates <= most:
            bound = f"n_keys{'/2' if search == 'signed' else ''}={most}"
            raise ValueError(f"model.memory.candidates must be 0 or in [m={topk}, {bound}], got {candidates}")
        if search == "signed" and 2 * topk > n_keys:
            raise ValueError(f"model.memory.search 'signed' needs 2 m <= n_keys, got m={topk}, n_keys={n_keys}")
        self.dim, self.n_keys, self.half = dim, n_keys, d_key // 2
        self.rank, self.n_cores, self.heads, self.topk, self.softmax = rank, cores, heads, topk, softmax
        self.exact, self.candidates, self.rank1_sign = search == "exact", candidates, rank1_sign
        self.signed = search == "signed"
        if self.exact or candidates or self.signed:  # else the class's search, called with its 6 arguments
            options = dict(candidates=candidates, signed=self.signed)
            self.search = exact_search if self.exact else functools.partial(tucker_topk, **options)
        # one row and one column query per (head, rank): (H, 2, r, D_k/2) after the view
        self.query = nn.Linear(dim, heads * 2 * rank * self.half, bias=False)
        self.keys = nn.Parameter(torch.empty(heads, 2, rank, n_keys, self.half))  # side 0 rows, 1 columns
        norm = dict(
            layernorm=functools.partial(nn.LayerNorm, bias=False), rmsnorm=functools.partial(nn.RMSNorm, eps=1e-6)
        )
        self.query_norm, self.key_norm = norm[qk_norm](self.half), norm[qk_norm](self.half)
        self.cores = nn.Parameter(torch.empty(heads, cores, rank, rank))
        # rank-1 factors of each head's summed core, refreshed once per optimiser step
        self.register_buffer("u", torch.zeros(heads, rank))
        self.register_buffer("t", torch.zeros(heads, rank))

    # the candidate search (an instance may swap in another with the same signature: the learner's own)
    search = staticmethod(tucker_topk)

    def init_weights(self, query_std: float, key_std: float, norm_gain: float) -> None:
        nn.init.normal_(self.query.weight, 0.0, query_std)
        nn.init.normal_(self.keys, 0.0, key_std)
        nn.init.constant_(self.query_norm.weight, norm_gain)
        nn.init.constant_(self.key_norm.weight, norm_gain)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        self.refresh_rank1()

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """(u, t) = leading singular vectors of each head's summed core (``rank1_sign`` rule)."""
        u, t = rank1_cores(self.cores.sum(1).float(), self.u if self.rank1_sign == "continuous" else None)
        self.u.copy_(u)
        self.t.copy_(t)

    @torch.no_grad()
    def scale_scores(self, factor: float) -> None:
        """Multiply every grid score by ``factor`` > 0 (both norm gains by factor^(1/4)).

        A grid score is bilinear in the row and column scores, each bilinear in the query and
        key gains, so the gains scale by the fourth root. The top-m selection is unchanged.
        """
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.query_norm.weight.mul_(factor**0.25)
        self.key_norm.weight.mul_(factor**0.25)

    def rank_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H, 2, r, n_keys): per head, side (0 row, 1 column) and rank, the sub-key scores.

        A permuted view of a contiguous (H, 2, r, T, n_keys) tensor, so that each head's row and
        column scores are views of (r, T, n_keys) tensors, the layout
        :func:`minimem.tucker.tucker_topk` works in.
        """
        q = self.query_norm(self.query(x).view(x.shape[0], self.heads, 2, self.rank, self.half))
        k = self.key_norm(self.keys)
        return torch.einsum("thsad,hsand->hsatn", q, k).permute(3, 0, 1, 2, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, slots = [], []
        # unbind, not indexing: its backward stacks the heads' gradients in one copy
        for head, s in enumerate(self.rank_scores(x).unbind(1)):  # s (T, 2, r, n)
            s_row, s_col = s.unbind(1)
            sc, idx = self.search(s_row, s_col, self.cores[head], self.topk, self.u[head], self.t[head])
            if self.softmax:  # ablation: normalise each core's m scores
                sc = F.softmax(sc, dim=1)
            scores.append(sc)
            slots.append(idx)
        if self.heads == 1:
            return scores[0], slots[0]
        return torch.cat(scores, dim=1), torch.cat(slots, dim=1)


def pool_by_block(values, rows, block, scores, expansion: int, pre_values=None, pre_input=None) -> torch.Tensor:
    """IVE's pooling on the physical table ([UM] §3.3): (T, E D_v), block p's pool at columns p D_v.

    rows, block (T, k) physical row and virtual block of each selected slot; scores (T, k, c).
    One lookup row per (token, slot) pair reads each selected row once (with its pre-value gate
    when ``pre_values`` / ``pre_input`` (T, D_p) are given), then the pairs are summed into their
    (token, block) bucket.
    """
    T, k = rows.shape
    pairs = memory_lookup(
        values,
        rows.reshape(-1, 1),
        scores.reshape(-1, 1, scores.shape[-1]),
        pre_values,
        None if pre_input is None else pre_input.repeat_interleave(k, dim=0),
    )
    bucket = (torch.arange(T, device=rows.device).unsqueeze(1) * expansion + block).reshape(-1)
    pooled = pairs.new_zeros(T * expansion, values.shape[1]).index_add(0, bucket, pairs)
    return pooled.view(T, expansion * values.shape[1])


def usage_update(counts: torch.Tensor, rows: torch.Tensor) -> None:
    """Add the reads in ``rows`` to the (N,) ``counts`` buffer."""
    with torch.no_grad():
        counts += torch.bincount(rows.reshape(-1), minlength=counts.numel())


class UltraMem(nn.Module):
    """UltraMem memory layer [UM] reading before block ``i`` and adding after block ``j``.

    Input: the raw residual stream (B, T, h); output (B, T, h). See the module docstring.
    """

    def __init__(self, config, i: int, j: int):
        super().__init__()
        mem = config.memory  # validated when loaded (ModelConfig.validate)
        if not (0 <= i < j < config.n_layer):
            raise ValueError(f"skip-layer pair (i, j) = ({i}, {j}) needs 0 <= i < j < model.n_layer={config.n_layer}")
        self.config, self.i, self.j = config, i, j
        h = config.n_embd
        self.n_slots = mem.n_slots  # N physical rows
        self.d_key, self.d_value, _ = mem.widths(h)
        self.expansion = mem.expansion  # E virtual memories
        self.n_keys = math.isqrt(mem.expansion) * math.isqrt(mem.n_slots)  # sub-keys per side of the E N virtual grid
        self.n_cores = mem.cores
        self.norm = nn.RMSNorm(h, eps=1e-6)  # the blocks' RMSNorm (minimem.model.RMSNorm computes the same)
        self.retrieval = TuckerRetrieval(
            h, self.n_keys, self.d_key, mem.rank, mem.cores, mem.heads, mem.topk, mem.softmax, **mem.retrieval_options()
        )
        self.values = nn.Parameter(torch.empty(mem.n_slots, self.d_value))
        self.values.is_memory_value = True
        self.value_proj = nn.Linear(self.expansion * self.d_value, h, bias=False)  # W_1 ... W_E side by side
        self.register_buffer("shuffle", seeded_permutation(self.expansion * mem.n_slots, SHUFFLE_SEED + 7919 * i + j))
        self.register_buffer("usage_counts", torch.zeros(mem.n_slots, dtype=torch.long), persistent=False)
        self.last_indices = None
        self.last_scores = None
        if not on_meta_device(self):  # the meta device (parameter counting) has nothing to initialise
            self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Official UltraMem init (module docstring); the shuffle is kept."""
        half = self.d_key // 2
        self.retrieval.init_weights(half**-0.5, half**-0.5, half ** (-1 / 3))
        nn.init.normal_(self.values, 0.0, 0.02)
        nn.init.normal_(self.value_proj.weight, 0.0, (self.expansion * self.d_value) ** -0.5)

    def after_optimizer_step(self) -> None:
        self.retrieval.refresh_rank1()

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = self.norm(x).reshape(B * T, h)
        scores, slots = self.retrieval(flat)  # (BT, Hm, c), (BT, Hm) virtual slots
        virtual = self.shuffle[slots]
        block, rows = virtual // self.n_slots, virtual % self.n_slots
        if self.expansion == 1:
            pooled = memory_lookup(self.values, rows, scores)
        else:  # pool per block on the physical table, then the E projections (one Linear)
            pooled = pool_by_block(self.values, rows, block, scores, self.expansion)
        usage_update(self.usage_counts, rows)
        self.last_indices = rows.detach().view(B, T, -1)
        self.last_scores = scores.detach().view(B, T, -1, self.n_cores)
        return self.value_proj(pooled).view(B, T, h)


@torch.no_grad()
def retrieval_recall(model: nn.Module, idx: torch.Tensor) -> float:
    """Mean over a GPT's :class:`TuckerRetrieval` layers and heads of the fraction of the exact top-m
    that the layer's configured search (with its candidates and stored (u, t)) finds on the hidden
    states of the batch ``idx`` (B, T); 1.0 for ``search: exact``. Runs one forward in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, TuckerRetrieval)]
    if not layers:
        raise ValueError("retrieval_recall needs a model with Tucker retrieval (kind ultramem or ultramemv2)")
    inputs, was_training = {}, model.training
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.update({mod: args[0]})) for layer in layers]
    try:
        model.eval()(idx)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    recalls = []
    for layer in layers:
        for k, s in enumerate(layer.rank_scores(inputs[layer]).unbind(1)):  # s (T, 2, r, n): head k
            args = (layer.cores[k], layer.topk, layer.candidates, layer.u[k], layer.t[k], layer.signed)
            recalls.append(1.0 if layer.exact else tucker_recall(*s.unbind(1), *args))
    return sum(recalls) / len(recalls)


__all__ = [
    "TuckerRetrieval",
    "retrieval_recall",
    "UltraMem",
    "pool_by_block",
    "seeded_permutation",
    "usage_update",
    "SHUFFLE_SEED",
]
