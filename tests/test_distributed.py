"""minimem.sharding: the column-sharded lookup gives one process's output and gradients.

In this process (no process group): the one-rank path against a slow loop, gradcheck, the
layout helpers against brute force, and the errors. Then ONE spawn of two gloo processes on a
free 127.0.0.1 port runs every multi-rank case (uneven and empty token counts, cores that
straddle the ranks' column slices, the Triton backend in its interpreter, inconsistent inputs)
and saves what it got; the tests compare that with a single-process ``memory_lookup`` on the
whole table and all tokens.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import traceback

import pytest
import torch

from minimem.kernels import memory_lookup
from minimem.sharding import (
    ShardedValueTable,
    check_sharding,
    column_slice,
    communication_bytes,
    local_cores,
    record_communication,
    sharded_memory_lookup,
    summarise,
    world,
)

F64 = dict(rtol=1e-10, atol=1e-12)


def slow_lookup(values, indices, scores, pre_values=None, pre_input=None):
    """Specification §6 with Python loops over tokens, slots and columns."""
    T, m = indices.shape
    d_value, c = values.shape[1], scores.shape[2]
    out = torch.zeros(T, d_value, dtype=torch.float64)
    for t in range(T):
        for i in range(m):
            row = int(indices[t, i])
            gate = 1.0 if pre_values is None else float(pre_values[row] @ pre_input[t])
            for col in range(d_value):
                core = col // (d_value // c)
                out[t, col] += float(scores[t, i, core]) * gate * float(values[row, col])
    return out


# ----------------------------------------------------------------------------- one rank, in process


def test_one_rank_equals_the_slow_loop_with_repeated_indices():
    gen = torch.Generator().manual_seed(0)
    values, pre_values = (
        torch.randn(9, 6, generator=gen, dtype=torch.float64),
        torch.randn(9, 4, generator=gen, dtype=torch.float64),
    )
    indices = torch.tensor([[1, 1, 8], [0, 4, 4], [3, 3, 3]])  # repeats accumulate
    scores, pre_input = (
        torch.randn(3, 3, 3, generator=gen, dtype=torch.float64),
        torch.randn(3, 4, generator=gen, dtype=torch.float64),
    )
    assert world() == (0, 1)
    out = sharded_memory_lookup(values, indices, scores, pre_values, pre_input)
    torch.testing.assert_close(out, slow_lookup(values, indices, scores, pre_values, pre_input), **F64)
    out = sharded_memory_lookup(values, indices, scores[..., :1])
    torch.testing.assert_close(out, slow_lookup(values, indices, scores[..., :1]), **F64)


def test_one_rank_gradcheck():
    gen = torch.Generator().manual_seed(1)
    args = [
        torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randint(0, 7, (3, 5), generator=gen),
        torch.randn(3, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(7, 2, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(
        lambda v, s, p, x: sharded_memory_lookup(v, args[1], s, p, x), (args[0], args[2], args[3], args[4])
    )


def test_local_cores_match_each_columns_core():
    for P in range(1, 7):
        for c in range(1, 7):
            d_value = 2 * math.lcm(P, c)
            check_sharding(d_value, c, P)
            for rank in range(P):
                cols = range(d_value)[column_slice(d_value, rank, P)]
                chunk = d_value // math.lcm(P, c)
                expected = [col // (d_value // c) for col in cols]  # the core of each column, directly
                got = local_cores(c, rank, P).repeat_interleave(chunk).tolist()
                assert got == expected, (P, c, rank)


def test_column_slices_partition_the_columns():
    for P in (1, 2, 3, 4, 6):
        cols = [list(range(12))[column_slice(12, r, P)] for r in range(P)]
        assert sum(cols, []) == list(range(12)) and len({len(c) for c in cols}) == 1
    with pytest.raises(ValueError, match=r"width must be divisible by world_size=5, got 12"):
        column_slice(12, 0, 5)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        column_slice(12, 2, 2)


def test_check_sharding_needs_the_lcm_not_the_product():
    check_sharding(4, 2, 4)  # lcm(P=4, c=2) = 4 divides D_v = 4 although P c = 8 does not
    check_sharding(6, 3, 2, d_pre=2)
    check_sharding(12, 4, 3)


@pytest.mark.parametrize(
    "d_value,cores,world_size,d_pre,match",
    [
        (18, 4, 3, 0, r"d_value \(D_v\) must be divisible by lcm\(world_size=3, cores=4\) = 12 .* got D_v=18"),
        (6, 4, 1, 0, r"d_value \(D_v\) must be divisible by lcm\(world_size=1, cores=4\) = 4 .* got D_v=6"),
        (8, 2, 2, 3, r"d_pre \(D_p\) must be divisible by world_size=2, got D_p=3"),
        (8, 0, 2, 0, r"cores \(c, the number of scoring cores\) must be >= 1, got 0"),
        (8, 2, 0, 0, r"world_size must be >= 1, got 0"),
    ],
)
def test_check_sharding_errors(d_value, cores, world_size, d_pre, match):
    with pytest.raises(ValueError, match=match):
        check_sharding(d_value, cores, world_size, d_pre)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(indices=torch.zeros(2, 3, dtype=torch.int32)), r"indices must be an int64 \(T, m\) tensor"),
        (
            dict(indices=torch.tensor([[0, 1, 5], [0, 0, 0]])),
            r"indices must lie in \[0, N\) = \[0, 5\), got values in \[0, 5\]",
        ),
        (dict(scores=torch.zeros(2, 4, 1)), r"scores must be a floating \(T, m, c\) tensor with \(T, m\) = \(2, 3\)"),
        (dict(local_pre_values=torch.zeros(5, 2)), r"local_pre_values and pre_input must be given together"),
        (
            dict(local_pre_values=torch.zeros(5, 2, dtype=torch.float64), pre_input=torch.zeros(2, 2)),
            r"local_pre_values must have the dtype of local_values",
        ),
        (
            dict(local_pre_values=torch.zeros(5, 2), pre_input=torch.zeros(2, 3)),
            r"pre_input must be a floating \(T, D_p\) = \(2, 2\)",
        ),
        (
            dict(scores=torch.zeros(2, 3, 3)),
            r"d_value \(D_v\) must be divisible by lcm\(world_size=1, cores=3\) = 3 .* got D_v=4",
        ),
        (
            dict(local_values=torch.zeros(5, 4, dtype=torch.int64)),
            r"local_values must be a floating \(N, D_v / P\) tensor",
        ),
        (dict(backend="cuda"), r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"),
    ],
)
def test_bad_inputs_raise(change, match):
    args = dict(
        local_values=torch.zeros(5, 4), indices=torch.zeros(2, 3, dtype=torch.int64), scores=torch.zeros(2, 3, 1)
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        sharded_memory_lookup(**args)


def test_group_without_process_group_raises():
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        world(group=object())


def test_sharded_table_on_one_rank():
    gen = torch.Generator().manual_seed(2)
    values, pre_values = torch.randn(20, 6, generator=gen), torch.randn(20, 3, generator=gen)
    table = ShardedValueTable.from_full(values, pre_values, cores=3)
    full_v, full_p = table.full_tables()
    assert torch.equal(full_v, values) and torch.equal(full_p, pre_values) and table.values.is_memory_value
    indices, scores, x = (
        torch.randint(0, 20, (4, 5), generator=gen),
        torch.randn(4, 5, 3, generator=gen),
        torch.randn(4, 3, generator=gen),
    )
    torch.testing.assert_close(table(indices, scores, x), memory_lookup(values, indices, scores, pre_values, x))
    fresh = ShardedValueTable(4096, 64, 16, cores=2, std=0.5, seed=3)
    assert fresh.values.shape == (4096, 64) and abs(fresh.values.std().item() - 0.5) < 0.01
    assert abs(fresh.pre_values.std().item() - 0.5) < 0.02 and abs(fresh.values.mean().item()) < 0.01
    with pytest.raises(ValueError, match=r"scores.shape\[-1\] must be the table's cores=3, got 1"):
        table(indices, scores[..., :1], x)
    with pytest.raises(ValueError, match=r"pre_input must be given exactly when the table has pre-values \(d_pre=3\)"):
        table(indices, scores)
    with pytest.raises(ValueError, match=r"rows \(N\) must be >= 1, got 0"):
        ShardedValueTable(0, 8)
    with pytest.raises(ValueError, match=r"lcm\(world_size=1, cores=3\) = 3 .* got D_v=8"):
        ShardedValueTable(10, 8, cores=3)


def test_communication_bytes_formula():
    assert communication_bytes(16, 4, 2, 8, 4, world_size=1) == {}
    got = communication_bytes(10, 4, 2, 8, 8, world_size=4, backward=False)
    assert got["indices all-gather"] == 3 * 10 * 4 * 8  # every rank's indices reach the 3 others
    assert got["output all-to-all"] == 0.75 * 10 * 8 * 4  # 3 of 4 column slices leave
    assert got["gate all-reduce"] == 2 * 0.75 * 40 * 4 * 4  # ring all-reduce of the (P T, m) partial gates
    assert "scores reduce-scatter" not in got and "pre_input all-to-all" in got
    with pytest.raises(ValueError, match=r"tokens, topk, cores, d_value and world_size must be >= 1"):
        communication_bytes(0, 4, 2, 8, 4, world_size=2)
    with pytest.raises(ValueError, match=r"d_pre \(D_p\) must be divisible by world_size=4, got D_p=6"):
        communication_bytes(10, 4, 2, 8, 6, world_size=4)


# ----------------------------------------------------------------------------- two gloo ranks

CASES = {  # name: (tokens per rank, N, m, c, D_v, D_p, dtype, backend)
    "c2_pre": ((6, 6), 50, 5, 2, 12, 8, torch.float64, "torch"),
    "c3_straddling_uneven": ((7, 3), 40, 4, 3, 12, 4, torch.float64, "torch"),  # lcm(2, 3) = 6 chunks
    "c4_pre": ((4, 5), 30, 3, 4, 16, 6, torch.float64, "torch"),
    "c1_empty_rank": ((5, 0), 25, 3, 1, 8, 0, torch.float64, "torch"),
    "triton_interpreter": ((3, 4), 30, 4, 2, 8, 4, torch.float32, "triton"),
}


def make_case(name):
    """The whole problem of one case, the same on every rank and in the test process."""
    counts, N, m, c, d_value, d_pre, dtype, _ = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    T = sum(counts)
    indices = torch.randint(0, N, (T, m), generator=gen)
    if T:
        indices[0, 1] = indices[0, 0]  # a repeated slot within a row
    return dict(
        values=torch.randn(N, d_value, generator=gen, dtype=dtype),
        pre_values=torch.randn(N, d_pre, generator=gen, dtype=dtype) if d_pre else None,
        indices=indices,
        scores=torch.randn(T, m, c, generator=gen, dtype=dtype),
        pre_input=torch.randn(T, d_pre, generator=gen, dtype=dtype) if d_pre else None,
        weight=torch.randn(T, d_value, generator=gen, dtype=dtype),  # loss = sum(out * weight)
    )


def _run_case(name, rank, P):
    counts, *_, backend = CASES[name]
    case = make_case(name)
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    cores = case["scores"].shape[2]
    table = ShardedValueTable.from_full(case["values"], case["pre_values"], cores=cores, backend=backend)
    scores = case["scores"][mine].clone().requires_grad_()
    pre_input = case["pre_input"][mine].clone().requires_grad_() if case["pre_input"] is not None else None
    with record_communication() as log:
        out = table(case["indices"][mine], scores, pre_input)
        (out * case["weight"][mine]).sum().backward()
    grad = lambda t: None if t is None else t.grad  # noqa: E731
    return dict(
        out=out.detach(),
        values_grad=table.values.grad,
        pre_values_grad=grad(table.pre_values),
        scores_grad=scores.grad,
        pre_input_grad=grad(pre_input),
        sent=summarise(log),
    )


def _catch(fn):
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _worker(rank, port, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the triton case)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    results = {}
    try:
        for name in CASES:
            results[name] = _run_case(name, rank, 2)
        # Inconsistent inputs: every rank raises (no rank is left waiting in a collective).
        v, s = torch.zeros(10, 4), torch.zeros(2, 3 + rank, 1)
        results["m_mismatch"] = _catch(lambda: sharded_memory_lookup(v, torch.zeros(2, 3 + rank, dtype=torch.long), s))
        results["d_value"] = _catch(
            lambda: sharded_memory_lookup(torch.zeros(10, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 4))
        )
        bad = torch.full((2, 3), 10 if rank == 1 else 0, dtype=torch.long)
        results["bad_rank"] = _catch(lambda: sharded_memory_lookup(v, bad, torch.zeros(2, 3, 1)))
        results["table_init"] = _catch(lambda: ShardedValueTable(10, 6, cores=4))
        fresh = ShardedValueTable(64, 8, 4, cores=2, std=1.0, seed=5)
        full_v, full_p = fresh.full_tables()
        results["fresh"] = dict(
            values=fresh.values.detach(), pre_values=fresh.pre_values.detach(), full_v=full_v, full_p=full_p
        )
        check = torch.ones(1)
        dist.all_reduce(check)  # the group still works after the errors
        results["alive"] = check.item()
    except Exception:  # noqa: BLE001 - report it to the test instead of hanging the other rank
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("ranks")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(_worker, args=(port, str(out_dir)), nprocs=2, join=False)
    while not context.join(timeout=120):
        pass
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


@pytest.mark.slow  # the two processes start in about 10 s on 2 busy cores (the fixture runs once)
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process(two_ranks, name):
    counts, *_, dtype, _ = CASES[name]
    case = make_case(name)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    leaves = {
        k: (case[k].clone().requires_grad_() if case[k] is not None else None)
        for k in ("values", "scores", "pre_values", "pre_input")
    }
    ref = memory_lookup(
        leaves["values"], case["indices"], leaves["scores"], leaves["pre_values"], leaves["pre_input"], backend="torch"
    )
    (ref * case["weight"]).sum().backward()
    d_value, d_pre = CASES[name][4], CASES[name][5]
    for rank, res in enumerate(two_ranks):
        got = res[name]
        mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        assert got["out"].shape == (counts[rank], d_value)
        torch.testing.assert_close(got["out"], ref.detach()[mine], **tol)
        torch.testing.assert_close(got["values_grad"], leaves["values"].grad[:, column_slice(d_value, rank, 2)], **tol)
        torch.testing.assert_close(got["scores_grad"], leaves["scores"].grad[mine], **tol)
        if d_pre:
            torch.testing.assert_close(
                got["pre_values_grad"], leaves["pre_values"].grad[:, column_slice(d_pre, rank, 2)], **tol
            )
            torch.testing.assert_close(got["pre_input_grad"], leaves["pre_input"].grad[mine], **tol)


@pytest.mark.slow
def test_two_ranks_traffic_matches_the_formula(two_ranks):
    counts, N, m, c, d_value, d_pre, dtype, _ = CASES["c2_pre"]
    size = torch.finfo(dtype).bits // 8
    predicted = communication_bytes(
        counts[0], m, c, d_value, d_pre, world_size=2, score_bytes=size, activation_bytes=size
    )
    for res in two_ranks:
        assert res["c2_pre"]["sent"] == pytest.approx(predicted)
    assert two_ranks[0]["c2_pre"]["sent"]["output all-to-all"] == 2 * 0.5 * 6 * 12 * 8  # forward + backward


@pytest.mark.slow
def test_two_ranks_raise_the_same_errors(two_ranks):
    for res in two_ranks:
        assert res["alive"] == 2.0
        assert res["m_mismatch"] == "every rank must pass the same m, got [3, 4] on ranks 0..1"
        assert (
            "lcm(world_size=2, cores=4) = 4" in res["d_value"]
            and "D_v / P = 3 columns on each of P = 2" in res["d_value"]
        )
        assert "lcm(world_size=2, cores=4) = 4" in res["table_init"]
    assert two_ranks[1]["bad_rank"].startswith("indices must lie in [0, N) = [0, 10)")
    assert two_ranks[0]["bad_rank"] == "rank(s) [1] rejected their inputs (see their error)"


@pytest.mark.slow
def test_two_ranks_fresh_table_slices_and_gather(two_ranks):
    slices = [res["fresh"] for res in two_ranks]
    full_v = torch.cat([s["values"] for s in slices], dim=1)
    full_p = torch.cat([s["pre_values"] for s in slices], dim=1)
    for s in slices:
        assert torch.equal(s["full_v"], full_v) and torch.equal(s["full_p"], full_p)
    assert not torch.equal(slices[0]["values"], slices[1]["values"])  # each rank draws its own columns
