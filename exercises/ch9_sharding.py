"""Chapter 9 exercises: value tables sharded across ranks (``minimem.sharding``), simulated on one process.

Fill in each function, then grade them with ``minimem grade 9``.

The layout (Specification §6 on P ranks; the UltraMem authors' ``vertical_parallel``): rank r of P
holds column slice r of the value table V (N, D_v) for ALL N rows, V_r = V[:, r D_v/P : (r+1) D_v/P],
and likewise of the pre-value table P (N, D_p). With multi-core scoring (c cores; core k weights
columns [k D_v/c, (k+1) D_v/c)) the rank and core boundaries need not agree: D_v is cut into
L = lcm(P, c) equal chunks, rank r holds chunks r L/P ... (r+1) L/P - 1, and chunk j belongs to
core j // (L/c). One lookup (what ``memory_lookup(V, idx, s, P, x)`` computes) becomes, per rank:

1. every rank sees every token's indices (T, m) and scores (T, m, c) (an all-gather);
2. the gate g[t, i] = <P[idx[t, i]], x[t]> is a sum over ranks of partial dot products on their
   own columns, g_r[t, i] = <P_r[idx[t, i]], x[t, slice r]> (an all-reduce);
3. each rank reads its slice: out_r[t, chunk j] = sum_i s[t, i, core(j)] g[t, i] V_r[idx[t, i], chunk j];
4. the slices of each token's output are concatenated (an all-to-all): out[t] = [out_0[t], ..., out_{P-1}[t]].

No rank ever holds the whole table: that is the point.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def chunk_cores(cores: int, rank: int, world_size: int) -> torch.Tensor:
    """Exercise 9.1: the scoring core of each column chunk that ``rank`` holds.

    With L = lcm(world_size, cores) chunks of D_v / L columns, rank r holds chunks
    r L/P, ..., (r+1) L/P - 1 and chunk j belongs to core j // (L / c). Return an int64 tensor of
    L / P entries, the core of each of the rank's chunks in order (e.g. cores=2, world_size=4: every
    rank holds one chunk; ranks 0, 1 -> [0], ranks 2, 3 -> [1]; cores=3, world_size=2: L = 6, rank 0
    -> [0, 0, 1], rank 1 -> [1, 2, 2]). Raise ValueError naming ``world_size`` if it is < 1,
    ``cores`` if < 1, and ``rank`` unless 0 <= rank < world_size. (minimem: ``sharding.local_cores``.)
    """
    raise NotImplementedError("exercise 9.1: write chunk_cores in exercises/ch9_sharding.py")


def rank_read(
    local_values: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    gate: Optional[torch.Tensor],
    rank: int,
    world_size: int,
) -> torch.Tensor:
    """Exercise 9.2: step 3, one rank's read of its column slice for every token.

    local_values (N, D_v / P): rank ``rank``'s slice V_r; indices (T, m) int64 in [0, N); scores
    (T, m, c); gate (T, m), the summed gates g, or None (no pre-values: g = 1). Returns
    (T, D_v / P) in the dtype of local_values and scores:

        out_r[t, chunk j] = sum_i scores[t, i, core(j)] * g[t, i] * local_values[indices[t, i], chunk j]

    where the slice holds L/P chunks of D_v / L columns (L = lcm(P, c)) and core(j) is exercise
    9.1's. Differentiable in local_values, scores and gate. Raise ValueError naming ``indices``
    when an index is outside [0, N), ``local_values`` when its width is not a multiple of L / P,
    ``rank`` unless 0 <= rank < world_size, and ``world_size`` if it is < 1.
    """
    raise NotImplementedError("exercise 9.2: write rank_read in exercises/ch9_sharding.py")


def sharded_lookup(
    value_slices: Sequence[torch.Tensor],
    indices: torch.Tensor,
    scores: torch.Tensor,
    pre_value_slices: Optional[Sequence[torch.Tensor]] = None,
    pre_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exercise 9.3: the whole sharded lookup, every rank simulated in this process (steps 1-4).

    value_slices: P tensors (N, D_v / P), rank r's slice of V; pre_value_slices: None, or P
    tensors (N, D_p / P), rank r's slice of the pre-value table; indices (T, m); scores (T, m, c);
    pre_input (T, D_p) the full pre-value input x (given exactly when pre_value_slices is).
    Returns (T, D_v): what ``minimem.kernels.memory_lookup`` returns on the whole tables.

    Work as the ranks would: the partial gates of step 2 on each rank's own columns of the
    pre-value table and of x, summed; each rank's read of its slice (exercise 9.2); the slices'
    outputs side by side. Never assemble a whole table (the grader fails a solution that builds a
    tensor as large as the full N x D_v table). Differentiable in the slices, scores and pre_input.
    Raise ValueError naming ``pre_input`` when exactly one of pre_value_slices and pre_input is given.
    """
    raise NotImplementedError("exercise 9.3: write sharded_lookup in exercises/ch9_sharding.py")
