"""Value tables sharded across ranks along the value dimension: the memory lookup of Specification §6 on P ranks.

Why shard. A memory's value tables hold almost all of its parameters ([UM2]: 120B parameters
of which about 2.5B are activated). Replicated on every data-parallel rank they must fit one
device and, because their gradient is a dense (N, D) tensor, DDP all-reduces all N (D_v + D_p)
gradient entries every step although each step touches a tiny fraction of the rows.

The layout (from the training code the authors of [UM] and [UM2] released, its
``vertical_parallel`` option): P ranks of a process group, each with its own T_r tokens. Rank r
holds column slice r of the tables for ALL N rows:

    V_r = V[:, r D_v/P : (r+1) D_v/P]      P_r = P[:, r D_p/P : (r+1) D_p/P]

One call, on every rank, computes what ``memory_lookup(V, idx, s, P, x)`` gives for the rank's
own tokens (Specification §6: g[t, i] = <P[idx[t, i]], x[t]>, out[t, slice k] = sum_i s[t, i, k] g[t, i]
V[idx[t, i], slice k]):

1. all-gather ``indices`` (T_r, m) and ``scores`` (T_r, m, c): every rank sees every token
   (token counts are padded to the largest T_r with index 0 and score 0);
2. all-to-all ``pre_input``: rank r receives column slice r of every token's x;
3. partial gate g_r[t, i] = <P_r[idx[t, i]], x[t, slice r]>, all-reduce: g = sum_r g_r
   (the D_p dot product, split over the ranks that hold its columns);
4. local read on every token: out_r[t] = sum_i s[t, i, core] g[t, i] V_r[idx[t, i]]
   (:func:`minimem.kernels.memory_lookup` on the slice: the fused Triton kernel on a GPU);
5. all-to-all the outputs: rank r receives every rank's column slice of its own tokens and
   concatenates them into (T_r, D_v).

Autograd runs the same steps backwards: 5 and 2 are all-to-alls again, 3 an all-reduce of the
gate gradient, 1 a reduce-scatter of the score gradients (each rank's slice contributes to every
token's score gradient). The slices' gradients are complete on their own rank: nothing of the
table is all-reduced. Under DDP the slices must therefore be kept out of DDP's gradient
all-reduce (they are different tensors on every rank), e.g. outside the module DDP wraps.

Multi-core scoring ([UM] MCS): core k weights columns [k D_v/c, (k+1) D_v/c), and those
boundaries need not match the ranks'. D_v is cut into L = lcm(P, c) equal chunks; rank r holds
chunks r L/P ... (r+1) L/P - 1 and chunk j belongs to core j // (L/c), so the local read is a
``memory_lookup`` with L/P "cores", each chunk weighted by its core's score. Hence the
constraint: D_v divisible by lcm(P, c), and D_p by P (:func:`check_sharding`).

With one rank (no process group, or a group of one) no collective runs and the lookup is one
``memory_lookup`` call. Traffic per rank and call: :func:`communication_bytes`; the bytes the
collectives actually moved: :func:`record_communication`.

``python -m torch.distributed.run --standalone --nproc_per_node=2 -m minimem.sharding``
checks a sharded lookup against one process's on every rank and prints the traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from minimem.kernels import BACKENDS, lookup_dtype, memory_lookup

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_SHAPE_FIELDS = ("ok", "T", "m", "c", "D_v / P", "D_p / P", "N", "pre-values")


# ----------------------------------------------------------------------------- layout


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised (call init_process_group)")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_sharding(d_value: int, cores: int, world_size: int, d_pre: int = 0) -> None:
    """Raise ValueError unless a (D_v, D_p) table with c scoring cores splits over ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if cores < 1:
        raise ValueError(f"cores (c, the number of scoring cores) must be >= 1, got {cores}")
    chunks = math.lcm(world_size, cores)
    if d_value < 1 or d_value % chunks != 0:
        raise ValueError(
            f"d_value (D_v) must be divisible by lcm(world_size={world_size}, cores={cores}) = {chunks} so that "
            f"every rank's column slice is made of whole pieces of the cores' slices, got D_v={d_value}"
        )
    if d_pre < 0 or d_pre % world_size != 0:
        raise ValueError(f"d_pre (D_p) must be divisible by world_size={world_size}, got D_p={d_pre}")


def column_slice(width: int, rank: int, world_size: int) -> slice:
    """The columns of a ``width``-wide table that ``rank`` of ``world_size`` holds (contiguous, equal)."""
    if width % world_size != 0:
        raise ValueError(f"width must be divisible by world_size={world_size}, got {width}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    step = width // world_size
    return slice(rank * step, (rank + 1) * step)


def local_cores(cores: int, rank: int, world_size: int) -> torch.Tensor:
    """Core of each of this rank's lcm(P, c)/P column chunks (see the module docstring)."""
    chunks = math.lcm(world_size, cores)
    mine = torch.arange(rank * chunks // world_size, (rank + 1) * chunks // world_size)
    return mine // (chunks // cores)


# ----------------------------------------------------------------------------- collectives with autograd

_LOG: Optional[list] = None  # (collective, bytes this rank sent) while record_communication() is active


@contextlib.contextmanager
def record_communication() -> Iterator[list]:
    """Collect ``(name, bytes sent by this rank)`` for every collective the sharded lookup runs.

    Bytes assume bandwidth-optimal algorithms: an all-gather sends (P - 1) times the local
    input, an all-to-all and a reduce-scatter (P - 1)/P of their input, an all-reduce twice that.
    """
    global _LOG
    saved, _LOG = _LOG, []
    try:
        yield _LOG
    finally:
        _LOG = saved


def _log(name: str, tensor: torch.Tensor, factor: float) -> None:
    if _LOG is not None:
        _LOG.append((name, factor * tensor.numel() * tensor.element_size()))


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 0 (every rank gets every rank's rows); backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x, group, world_size, name):
        ctx.group, ctx.world_size, ctx.name = group, world_size, name
        x = x.contiguous()
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _log(f"{name} all-gather", x, world_size - 1)
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
        _log(f"{ctx.name} reduce-scatter", grad, (ctx.world_size - 1) / ctx.world_size)
        _reduce_scatter_single(out, grad, group=ctx.group)
        return out, None, None, None


class _AllToAll(torch.autograd.Function):
    """Block j of dim 0 goes to rank j; block i of the result came from rank i. Backward: the same."""

    @staticmethod
    def forward(ctx, x, group, world_size, name):
        ctx.group, ctx.world_size, ctx.name = group, world_size, name
        x = x.contiguous()
        out = torch.empty_like(x)
        _log(f"{name} all-to-all", x, (world_size - 1) / world_size)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        _log(f"{ctx.name} all-to-all", grad, (ctx.world_size - 1) / ctx.world_size)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Every rank gets the sum over ranks; backward: the gradient's sum over ranks (every rank used it)."""

    @staticmethod
    def forward(ctx, x, group, world_size, name):
        ctx.group, ctx.world_size, ctx.name = group, world_size, name
        out = x.contiguous().clone()
        _log(f"{name} all-reduce", out, 2 * (world_size - 1) / world_size)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _log(f"{ctx.name} all-reduce", grad, 2 * (ctx.world_size - 1) / ctx.world_size)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None, None


def _tokens_to_columns(x: torch.Tensor, group, world_size: int, name: str) -> torch.Tensor:
    """(T, P w) on every rank -> (P T, w): column slice r of every rank's tokens, in rank order."""
    T, width = x.shape
    blocks = x.view(T, world_size, width // world_size).transpose(0, 1).reshape(world_size * T, -1)
    return _AllToAll.apply(blocks, group, world_size, name)


def _columns_to_tokens(y: torch.Tensor, group, world_size: int, name: str) -> torch.Tensor:
    """(P T, w): slice r of every rank's tokens -> (T, P w): every slice of this rank's tokens."""
    T = y.shape[0] // world_size
    blocks = _AllToAll.apply(y, group, world_size, name)  # block j: slice j of my tokens
    return blocks.view(world_size, T, -1).transpose(0, 1).reshape(T, -1)


# ----------------------------------------------------------------------------- the sharded lookup


def _local_problems(local_values, indices, scores, local_pre_values, pre_input, world_size) -> Optional[str]:
    """What is wrong with this rank's inputs (None if nothing): checked before any collective."""
    named = (("local_values", local_values), ("indices", indices), ("scores", scores))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if local_values.dim() != 2 or not local_values.is_floating_point():
        return (
            f"local_values must be a floating (N, D_v / P) tensor, got {local_values.dtype} {tuple(local_values.shape)}"
        )
    n_rows = local_values.shape[0]
    if indices.dim() != 2 or indices.dtype != torch.int64:
        return f"indices must be an int64 (T, m) tensor, got {indices.dtype} {tuple(indices.shape)}"
    if scores.dim() != 3 or scores.shape[:2] != indices.shape or not scores.is_floating_point():
        return (
            f"scores must be a floating (T, m, c) tensor with (T, m) = {tuple(indices.shape)}, "
            f"got {tuple(scores.shape)}"
        )
    if (local_pre_values is None) != (pre_input is None):
        return "local_pre_values and pre_input must be given together or not at all"
    if local_pre_values is not None:
        if not isinstance(local_pre_values, torch.Tensor) or not isinstance(pre_input, torch.Tensor):
            return "local_pre_values and pre_input must be torch.Tensors"
        if local_pre_values.dim() != 2 or local_pre_values.shape[0] != n_rows:
            return f"local_pre_values must have shape (N, D_p / P) with N={n_rows}, got {tuple(local_pre_values.shape)}"
        if local_pre_values.dtype != local_values.dtype:
            return (
                f"local_pre_values must have the dtype of local_values ({local_values.dtype}), "
                f"got {local_pre_values.dtype}"
            )
        d_pre = local_pre_values.shape[1] * world_size
        if pre_input.shape != (indices.shape[0], d_pre) or not pre_input.is_floating_point():
            return (
                f"pre_input must be a floating (T, D_p) = ({indices.shape[0]}, {d_pre}) tensor (full D_p: "
                f"{local_pre_values.shape[1]} columns on each of {world_size} ranks), got {tuple(pre_input.shape)}"
            )
    if indices.numel() and (n_rows == 0 or bool(((indices < 0) | (indices >= n_rows)).any())):
        return f"indices must lie in [0, N) = [0, {n_rows}), got values in [{int(indices.min())}, {int(indices.max())}]"
    return None


def _agree_on_shapes(
    signature: list[int], problem: Optional[str], group, rank: int, world_size: int, device: torch.device
) -> list[int]:
    """All-gather every rank's (ok, T, m, c, ...) and raise the same ValueError on every rank if they disagree."""
    mine = torch.tensor(signature, dtype=torch.int64, device=device)
    if world_size == 1:
        table = mine[None]
    else:
        table = torch.empty(world_size * len(signature), dtype=torch.int64, device=device)
        _log("shapes all-gather", mine, world_size - 1)
        _all_gather_single(table, mine, group=group)
    table = table.view(world_size, -1).cpu()
    bad = [r for r in range(world_size) if table[r, 0] == 0]
    if bad:
        raise ValueError(problem if problem else f"rank(s) {bad} rejected their inputs (see their error)")
    for col, field in enumerate(_SHAPE_FIELDS[2:], start=2):
        column = table[:, col].tolist()
        if len(set(column)) != 1:
            raise ValueError(f"every rank must pass the same {field}, got {column} on ranks 0..{world_size - 1}")
    return table[:, 1].tolist()  # tokens per rank


def sharded_memory_lookup(
    local_values: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    local_pre_values: Optional[torch.Tensor] = None,
    pre_input: Optional[torch.Tensor] = None,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """(T_r, D_v): Specification §6's lookup for this rank's tokens, from column-sharded tables (module docstring).

    local_values (N, D_v/P) and local_pre_values (N, D_p/P): this rank's column slices
    (:func:`column_slice`); indices (T_r, m), scores (T_r, m, c) and pre_input (T_r, D_p, full
    width): this rank's tokens. Every rank of ``group`` must call it (T_r may differ between
    ranks; m, c, N and the widths may not). Differentiable in the slices, scores and pre_input;
    the backward runs collectives too, so every rank must backpropagate through its output.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    rank, P = world(group)
    problem = _local_problems(local_values, indices, scores, local_pre_values, pre_input, P)
    has_pre = local_pre_values is not None
    if problem is None:
        c, w_v = scores.shape[2], local_values.shape[1]
        try:
            check_sharding(w_v * P, c, P, local_pre_values.shape[1] * P if has_pre else 0)
        except ValueError as err:
            problem = f"{err} (local_values holds D_v / P = {w_v} columns on each of P = {P} ranks)"
    signature = [0] * len(_SHAPE_FIELDS)
    if problem is None:
        signature = [
            1,
            indices.shape[0],
            indices.shape[1],
            scores.shape[2],
            local_values.shape[1],
            local_pre_values.shape[1] if has_pre else 0,
            local_values.shape[0],
            int(has_pre),
        ]
    device = local_values.device if isinstance(local_values, torch.Tensor) else torch.device("cpu")
    counts = _agree_on_shapes(signature, problem, group, rank, P, device)

    if P == 1:  # nothing to exchange: the gate needs no all-reduce, one fused call does it all
        return memory_lookup(local_values, indices, scores, local_pre_values, pre_input, backend=backend)

    T, T_max = indices.shape[0], max(counts)
    pad = T_max - T  # padded tokens read row 0 with score 0: they add nothing and are dropped at the end
    indices = torch.nn.functional.pad(indices, (0, 0, 0, pad))
    scores = torch.nn.functional.pad(scores, (0, 0, 0, 0, 0, pad))
    all_indices = _GatherTokens.apply(indices, group, P, "indices")  # (P T_max, m)
    all_scores = _GatherTokens.apply(scores, group, P, "scores")  # (P T_max, m, c)
    chunk_cores = local_cores(scores.shape[2], rank, P).to(scores.device)
    weights = all_scores.index_select(2, chunk_cores)  # (P T_max, m, L/P): each chunk's core score
    if has_pre:
        pre_input = torch.nn.functional.pad(pre_input, (0, 0, 0, pad))
        x_slice = _tokens_to_columns(pre_input, group, P, "pre_input")  # (P T_max, D_p/P)
        dtype = lookup_dtype(local_values, scores, local_pre_values, pre_input)
        rows = local_pre_values.index_select(0, all_indices.reshape(-1)).view(P * T_max, indices.shape[1], -1)
        partial_gate = torch.einsum("tid,td->ti", rows.to(dtype), x_slice.to(dtype))  # <P_r[idx], x[slice r]>
        gate = _AllReduceSum.apply(partial_gate, group, P, "gate")  # g[t, i] over the whole D_p
        weights = weights * gate.unsqueeze(-1)
    out_slice = memory_lookup(local_values, all_indices, weights, backend=backend)  # (P T_max, D_v/P)
    return _columns_to_tokens(out_slice, group, P, "output")[:T]


def communication_bytes(
    tokens: int,
    topk: int,
    cores: int,
    d_value: int,
    d_pre: int,
    world_size: int,
    index_bytes: int = 8,
    score_bytes: int = 4,
    activation_bytes: int = 4,
    backward: bool = True,
) -> dict:
    """Bytes each rank sends in one :func:`sharded_memory_lookup` (``tokens`` per rank, all equal).

    Keys as :func:`record_communication` names them; bandwidth-optimal collectives (its docstring).
    ``activation_bytes`` is the element size of pre_input and the output, ``score_bytes`` that of
    scores and the gate. With ``backward`` the gradients' collectives are added.
    """
    P, T, m, c = world_size, tokens, topk, cores
    if min(P, T, m, c, d_value) < 1 or d_pre < 0:
        raise ValueError(
            f"tokens, topk, cores, d_value and world_size must be >= 1 and d_pre >= 0, "
            f"got {(T, m, c, d_value, world_size, d_pre)}"
        )
    check_sharding(d_value, c, P, d_pre)
    if P == 1:
        return {}
    share = (P - 1) / P
    out = {
        "shapes all-gather": (P - 1) * len(_SHAPE_FIELDS) * 8,
        "indices all-gather": (P - 1) * T * m * index_bytes,
        "scores all-gather": (P - 1) * T * m * c * score_bytes,
        "output all-to-all": share * T * d_value * activation_bytes,
    }
    if d_pre:
        out["pre_input all-to-all"] = share * T * d_pre * activation_bytes
        out["gate all-reduce"] = 2 * share * P * T * m * score_bytes
    if backward:
        out["scores reduce-scatter"] = share * P * T * m * c * score_bytes
        out["output all-to-all"] *= 2
        if d_pre:
            out["pre_input all-to-all"] *= 2
            out["gate all-reduce"] *= 2
    return out


def summarise(log: list) -> dict:
    """Sum a :func:`record_communication` log by collective name."""
    totals: dict = {}
    for name, nbytes in log:
        totals[name] = totals.get(name, 0.0) + nbytes
    return totals


# ----------------------------------------------------------------------------- module


class ShardedValueTable(nn.Module):
    """This rank's column slices of a memory's value (N, D_v) and pre-value (N, D_p) tables.

    ``forward(indices, scores, pre_input=None)`` is :func:`sharded_memory_lookup`. A fresh table
    draws its slices i.i.d. N(0, std^2) from a generator seeded by (seed, rank): the same
    distribution as slicing one N(0, std^2) table, never materialised. :meth:`from_full` slices
    given tables instead (exactly one process's table).
    """

    def __init__(
        self,
        rows: int,
        d_value: int,
        d_pre: int = 0,
        cores: int = 1,
        group=None,
        std: float = 0.02,
        seed: int = 0,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.rank, self.world_size = world(group)
        if rows < 1:
            raise ValueError(f"rows (N) must be >= 1, got {rows}")
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_sharding(d_value, cores, self.world_size, d_pre)
        self.group, self.rows, self.d_value, self.d_pre, self.cores, self.backend = (
            group,
            rows,
            d_value,
            d_pre,
            cores,
            backend,
        )
        gen = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)

        def draw(width):
            return nn.Parameter((torch.randn(rows, width, generator=gen, dtype=dtype) * std).to(device))

        self.values = draw(d_value // self.world_size)
        self.pre_values = draw(d_pre // self.world_size) if d_pre else None
        self.values.is_memory_value = True
        if self.pre_values is not None:
            self.pre_values.is_memory_value = True

    @classmethod
    def from_full(
        cls,
        values: torch.Tensor,
        pre_values: Optional[torch.Tensor] = None,
        cores: int = 1,
        group=None,
        backend: str = "auto",
    ) -> "ShardedValueTable":
        """This rank's slices of full tables ``values`` (N, D_v) and ``pre_values`` (N, D_p), copied."""
        d_pre = 0 if pre_values is None else pre_values.shape[1]
        table = cls(
            values.shape[0],
            values.shape[1],
            d_pre,
            cores,
            group,
            std=0.0,
            backend=backend,
            dtype=values.dtype,
            device=values.device,
        )
        with torch.no_grad():
            table.values.copy_(values[:, column_slice(table.d_value, table.rank, table.world_size)])
            if pre_values is not None:
                table.pre_values.copy_(pre_values[:, column_slice(d_pre, table.rank, table.world_size)])
        return table

    def forward(self, indices: torch.Tensor, scores: torch.Tensor, pre_input: Optional[torch.Tensor] = None):
        if scores.dim() == 3 and scores.shape[2] != self.cores:
            raise ValueError(f"scores.shape[-1] must be the table's cores={self.cores}, got {scores.shape[2]}")
        if (pre_input is None) != (self.pre_values is None):
            raise ValueError(f"pre_input must be given exactly when the table has pre-values (d_pre={self.d_pre})")
        return sharded_memory_lookup(self.values, indices, scores, self.pre_values, pre_input, self.group, self.backend)

    @torch.no_grad()
    def full_tables(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(V, P): the whole tables, gathered from every rank's slice (every rank must call it)."""

        def gather(local):
            if self.world_size == 1:
                return local.detach().clone()
            parts = _GatherTokens.apply(local.detach().t().contiguous(), self.group, self.world_size, "table")
            return parts.t().contiguous()

        return gather(self.values), None if self.pre_values is None else gather(self.pre_values)

    def extra_repr(self) -> str:
        return (
            f"rows={self.rows}, d_value={self.d_value}, d_pre={self.d_pre}, cores={self.cores}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )


# ----------------------------------------------------------------------------- self-check under torchrun


def main(argv: Optional[list[str]] = None) -> int:
    """Compare the sharded lookup with one process's on every rank; print errors and traffic (rank 0)."""
    p = argparse.ArgumentParser(prog="python -m minimem.sharding", description=main.__doc__)
    p.add_argument("--rows", type=int, default=4096, help="N table rows")
    p.add_argument(
        "--tokens", type=int, default=64, help="tokens on rank 0 (rank r gets tokens - r, uneven on purpose)"
    )
    p.add_argument("--topk", type=int, default=16, help="m slots per token")
    p.add_argument("--cores", type=int, default=2, help="c scoring cores")
    p.add_argument("--d-value", type=int, default=96, help="D_v")
    p.add_argument("--d-pre", type=int, default=48, help="D_p (0: no pre-values)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument(
        "--backend",
        choices=["torch", "triton"],
        default="torch",
        help="lookup backend of the local reads (triton on CPU needs TRITON_INTERPRET=1 and float32)",
    )
    args = p.parse_args(argv)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")  # torchrun's environment; CPU tensors
    rank, P = world()
    dtype = getattr(torch, args.dtype)
    try:
        check_sharding(args.d_value, args.cores, P, args.d_pre)
        counts = [max(args.tokens - r, 1) for r in range(P)]
        gen = torch.Generator().manual_seed(0)  # the same full problem on every rank
        V = torch.randn(args.rows, args.d_value, generator=gen, dtype=dtype)
        Pv = torch.randn(args.rows, args.d_pre, generator=gen, dtype=dtype) if args.d_pre else None
        idx = torch.randint(0, args.rows, (sum(counts), args.topk), generator=gen)
        s = torch.randn(sum(counts), args.topk, args.cores, generator=gen, dtype=dtype)
        x = torch.randn(sum(counts), args.d_pre, generator=gen, dtype=dtype) if args.d_pre else None
        w = torch.randn(sum(counts), args.d_value, generator=gen, dtype=dtype)  # loss = sum(out * w)

        full = [t.clone().requires_grad_() if t is not None else None for t in (V, s, Pv, x)]
        ref = memory_lookup(full[0], idx, full[1], full[2], full[3], backend="torch")
        (ref * w).sum().backward()

        mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        table = ShardedValueTable.from_full(V, Pv, args.cores, backend=args.backend)
        s_r = s[mine].clone().requires_grad_()
        x_r = x[mine].clone().requires_grad_() if x is not None else None
        with record_communication() as log:
            out = table(idx[mine], s_r, x_r)
            (out * w[mine]).sum().backward()
        cols_v = column_slice(args.d_value, rank, P)
        errors = [
            (out - ref[mine]).abs().max(),
            (table.values.grad - full[0].grad[:, cols_v]).abs().max(),
            (s_r.grad - full[1].grad[mine]).abs().max(),
        ]
        if Pv is not None:
            cols_p = column_slice(args.d_pre, rank, P)
            errors += [
                (table.pre_values.grad - full[2].grad[:, cols_p]).abs().max(),
                (x_r.grad - full[3].grad[mine]).abs().max(),
            ]
        errors = torch.stack(errors).to(torch.float64)
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        sent = summarise(log)
        if rank == 0:
            names = ["output", "value-slice grad", "score grad", "pre-value-slice grad", "pre_input grad"]
            print(
                f"sharded lookup on {P} ranks ({args.dtype}, {args.backend}): tokens per rank {counts}, N={args.rows}, "
                f"m={args.topk}, c={args.cores}, D_v={args.d_value}, D_p={args.d_pre}"
            )
            for name, err in zip(names, errors.tolist()):
                print(f"  max |sharded - one process| {name:<21} {err:.1e}")
            print("  bytes sent by rank 0 (forward + backward):")
            for name, nbytes in sent.items():
                print(f"    {name:<26} {nbytes:>10,.0f}")
    finally:
        if own_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
