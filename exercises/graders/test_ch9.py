"""Graders of chapter 9 (exercises/ch9_sharding.py): column-sharded value tables, simulated on one process."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exercises.graders.answer_keys import questions_class
from exercises.graders.helpers import (
    GRADER_SETTINGS,
    LargestTensor,
    assert_close,
    assert_close_dtype,
    assert_equal,
    check_grads,
    check_tensor,
    float32_copies,
    raises_naming,
    randn,
    seeds,
)

CHAPTER = 9


def cores_loop(cores: int, rank: int, world_size: int) -> list[int]:
    chunks = math.lcm(world_size, cores)
    return [j // (chunks // cores) for j in range(rank * chunks // world_size, (rank + 1) * chunks // world_size)]


@st.composite
def layouts(draw, max_world=6, max_cores=4):
    """(world_size P, cores c, D_v) with D_v a multiple of lcm(P, c)."""
    P, c = draw(st.integers(1, max_world)), draw(st.integers(1, max_cores))
    return P, c, math.lcm(P, c) * draw(st.integers(1, 3))


# --------------------------------------------------------------------------- 9.1 chunk_cores


@pytest.mark.exercise("chunk_cores")
class TestChunkCores:
    @pytest.mark.points(2)
    @pytest.mark.hint("L = lcm(P, c) chunks; rank r holds chunks r L/P .. (r+1) L/P - 1; chunk j is core j // (L/c)")
    @GRADER_SETTINGS
    @given(cores=st.integers(1, 8), world_size=st.integers(1, 12), data=st.data())
    def test_matches_chunk_loop(self, solution, cores, world_size, data):
        rank = data.draw(st.integers(0, world_size - 1), label="rank")
        got = solution.chunk_cores(cores, rank, world_size)
        want = torch.tensor(cores_loop(cores, rank, world_size), dtype=torch.int64)
        assert_equal(got, want, f"chunk_cores(cores={cores}, rank={rank}, world_size={world_size})")

    @pytest.mark.points(1)
    @pytest.mark.hint("the docstring's examples: cores=2 over 4 ranks, cores=3 over 2 ranks")
    def test_examples(self, solution):
        cases = {
            (2, 0, 4): [0],
            (2, 1, 4): [0],
            (2, 2, 4): [1],
            (2, 3, 4): [1],
            (3, 0, 2): [0, 0, 1],
            (3, 1, 2): [1, 2, 2],
        }
        for (cores, rank, world_size), want in cases.items():
            got = solution.chunk_cores(cores, rank, world_size)
            assert_equal(got, torch.tensor(want), f"chunk_cores(cores={cores}, rank={rank}, world_size={world_size})")

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming world_size (< 1), cores (< 1) or rank (outside [0, world_size))")
    def test_rejects_bad_arguments(self, solution):
        for name, args in (("world_size", (2, 0, 0)), ("cores", (0, 0, 2)), ("rank", (2, -1, 2)), ("rank", (2, 2, 2))):
            with raises_naming(name):
                solution.chunk_cores(*args)


# --------------------------------------------------------------------------- 9.2 rank_read


def _tables(seed, N, d_value, d_pre=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    values = randn(g, N, d_value, requires_grad=requires_grad)
    pre_values = randn(g, N, d_pre, requires_grad=requires_grad) if d_pre else None
    return values, pre_values


def _tokens(seed, T, m, N, c, d_pre=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed + 1)
    indices = torch.randint(0, N, (T, m), generator=g)
    scores = randn(g, T, m, c, requires_grad=requires_grad)
    pre_input = randn(g, T, d_pre, requires_grad=requires_grad) if d_pre else None
    return indices, scores, pre_input


def slice_of(table, rank, world_size):
    width = table.shape[1] // world_size
    return table[:, rank * width : (rank + 1) * width]


def rank_read_loop(local_values, indices, scores, gate, rank, world_size):
    """Chunk by chunk, slot by slot."""
    T, m, c = scores.shape
    chunk_core = cores_loop(c, rank, world_size)
    width = local_values.shape[1] // len(chunk_core)
    out = torch.zeros(T, local_values.shape[1], dtype=local_values.dtype)
    for t in range(T):
        for i in range(m):
            g = 1.0 if gate is None else gate[t, i]
            for j, core in enumerate(chunk_core):
                cols = slice(j * width, (j + 1) * width)
                out[t, cols] += scores[t, i, core] * g * local_values[indices[t, i], cols]
    return out


@st.composite
def read_cases(draw):
    P, c, d_value = draw(layouts())
    return dict(
        P=P,
        c=c,
        d_value=d_value,
        rank=draw(st.integers(0, P - 1)),
        T=draw(st.integers(1, 4)),
        m=draw(st.integers(1, 4)),
        N=draw(st.integers(1, 8)),
        gated=draw(st.booleans()),
    )


def _read_inputs(case, seed, requires_grad=False):
    values, _ = _tables(seed, case["N"], case["d_value"])
    indices, scores, _ = _tokens(seed, case["T"], case["m"], case["N"], case["c"], requires_grad=requires_grad)
    local = slice_of(values, case["rank"], case["P"]).detach().clone().requires_grad_(requires_grad)
    gate = randn(seed + 2, case["T"], case["m"], requires_grad=requires_grad) if case["gated"] else None
    return local, indices, scores, gate


@pytest.mark.exercise("rank_read")
class TestRankRead:
    @pytest.mark.points(3)
    @pytest.mark.hint("weight chunk j of the slice by scores[..., core(j)] (exercise 9.1) times the gate")
    @GRADER_SETTINGS
    @given(case=read_cases(), seed=seeds)
    def test_matches_chunk_loop(self, solution, case, seed):
        local, indices, scores, gate = _read_inputs(case, seed)
        out = solution.rank_read(local, indices, scores, gate, case["rank"], case["P"])
        check_tensor(out, "out", (case["T"], local.shape[1]), torch.float64)
        assert_close(out, rank_read_loop(local, indices, scores, gate, case["rank"], case["P"]), "out")

    @pytest.mark.points(1)
    @pytest.mark.hint("the ranks' reads side by side are memory_lookup on the whole table")
    @settings(GRADER_SETTINGS, max_examples=6)
    @given(layout=layouts(), seed=seeds)
    def test_ranks_add_up_to_the_whole_lookup(self, solution, layout, seed):
        from minimem.kernels import memory_lookup

        P, c, d_value = layout
        values, _ = _tables(seed, 7, d_value)
        indices, scores, _ = _tokens(seed, 3, 4, 7, c)
        parts = [solution.rank_read(slice_of(values, r, P), indices, scores, None, r, P) for r in range(P)]
        whole = memory_lookup(values, indices, scores, backend="torch")
        assert_close(torch.cat(parts, dim=1), whole, f"the {P} ranks' reads side by side")

    @pytest.mark.points(1)
    @pytest.mark.hint("keep it differentiable in local_values, scores and gate")
    @settings(GRADER_SETTINGS, max_examples=6)
    @given(case=read_cases(), seed=seeds)
    def test_gradients(self, solution, reference, case, seed):
        local, indices, scores, gate = _read_inputs(case, seed, requires_grad=True)
        out = solution.rank_read(local, indices, scores, gate, case["rank"], case["P"])
        expected = reference.rank_read(local, indices, scores, gate, case["rank"], case["P"])
        inputs = [t for t in (local, scores, gate) if t is not None]
        names = ["local_values", "scores", "gate"][: len(inputs)]
        check_grads(out, expected, inputs, names, seed)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(case=read_cases(), seed=seeds)
    def test_float32(self, solution, case, seed):
        local, indices, scores, gate = _read_inputs(case, seed)
        floats = [local, scores] + ([gate] if gate is not None else [])
        low, high = float32_copies(*floats)
        low_gate, high_gate = (low[2], high[2]) if gate is not None else (None, None)
        out = solution.rank_read(low[0], indices, low[1], low_gate, case["rank"], case["P"])
        want = rank_read_loop(high[0], indices, high[1], high_gate, case["rank"], case["P"])
        assert_close_dtype(out, want, "out of float32 inputs", torch.float32)

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming indices, local_values, rank or world_size (see the docstring)")
    def test_rejects_bad_arguments(self, solution):
        case = dict(P=2, c=3, d_value=12, rank=1, T=2, m=3, N=5, gated=True)
        local, indices, scores, gate = _read_inputs(case, 0)
        for wrong in (5, -1):
            bad = indices.clone()
            bad[0, 1] = wrong
            with raises_naming("indices"):
                solution.rank_read(local, bad, scores, gate, 1, 2)
        with raises_naming("local_values"):
            solution.rank_read(local[:, :5], indices, scores, gate, 1, 2)  # 3 chunks per rank: 5 columns do not split
        with raises_naming("rank"):
            solution.rank_read(local, indices, scores, gate, 2, 2)
        with raises_naming("world_size"):
            solution.rank_read(local, indices, scores, gate, 0, 0)


# --------------------------------------------------------------------------- 9.3 sharded_lookup


@st.composite
def lookup_cases(draw):
    P, c, d_value = draw(layouts(max_world=4, max_cores=3))
    return dict(
        P=P,
        c=c,
        d_value=d_value,
        d_pre=P * draw(st.integers(0, 3)),
        T=draw(st.integers(1, 4)),
        m=draw(st.integers(1, 4)),
        N=draw(st.integers(1, 8)),
    )


def _lookup_inputs(case, seed, requires_grad=False):
    values, pre_values = _tables(seed, case["N"], case["d_value"], case["d_pre"])
    indices, scores, pre_input = _tokens(
        seed, case["T"], case["m"], case["N"], case["c"], case["d_pre"], requires_grad=requires_grad
    )
    P = case["P"]
    value_slices = [slice_of(values, r, P).clone().requires_grad_(requires_grad) for r in range(P)]
    pre_slices = None
    if pre_values is not None:
        pre_slices = [slice_of(pre_values, r, P).clone().requires_grad_(requires_grad) for r in range(P)]
    return values, pre_values, value_slices, pre_slices, indices, scores, pre_input


def whole_lookup(value_slices, pre_slices, indices, scores, pre_input):
    """minimem's memory_lookup on the tables the slices make up (for the expected result only)."""
    from minimem.kernels import memory_lookup

    values = torch.cat(value_slices, dim=1)
    pre_values = torch.cat(pre_slices, dim=1) if pre_slices is not None else None
    return memory_lookup(values, indices, scores, pre_values, pre_input, backend="torch")


@pytest.mark.exercise("sharded_lookup")
class TestShardedLookup:
    @pytest.mark.points(3)
    @pytest.mark.hint("gate = sum over ranks of <P_r[idx], x[:, slice r]>; each rank's read; concatenate the slices")
    @GRADER_SETTINGS
    @given(case=lookup_cases(), seed=seeds)
    def test_matches_memory_lookup(self, solution, case, seed):
        _, _, value_slices, pre_slices, indices, scores, pre_input = _lookup_inputs(case, seed)
        out = solution.sharded_lookup(value_slices, indices, scores, pre_slices, pre_input)
        check_tensor(out, "out", (case["T"], case["d_value"]), torch.float64)
        assert_close(out, whole_lookup(value_slices, pre_slices, indices, scores, pre_input), "out")

    @pytest.mark.points(1)
    @pytest.mark.hint("keep it differentiable: gradients reach every slice, the scores and pre_input")
    @settings(GRADER_SETTINGS, max_examples=6)
    @given(case=lookup_cases(), seed=seeds)
    def test_gradients(self, solution, case, seed):
        _, _, value_slices, pre_slices, indices, scores, pre_input = _lookup_inputs(case, seed, requires_grad=True)
        out = solution.sharded_lookup(value_slices, indices, scores, pre_slices, pre_input)
        expected = whole_lookup(value_slices, pre_slices, indices, scores, pre_input)
        inputs = list(value_slices) + [scores] + (list(pre_slices) + [pre_input] if pre_slices is not None else [])
        names = [f"value slice {r}" for r in range(case["P"])] + ["scores"]
        if pre_slices is not None:
            names += [f"pre-value slice {r}" for r in range(case["P"])] + ["pre_input"]
        check_grads(out, expected, inputs, names, seed)

    @pytest.mark.points(2)
    @pytest.mark.hint("no rank holds the whole table: never torch.cat or stack the slices, gather from each slice")
    def test_never_assembles_a_table(self, solution):
        case = dict(P=4, c=2, d_value=16, d_pre=8, T=4, m=4, N=4096)
        _, _, value_slices, pre_slices, indices, scores, pre_input = _lookup_inputs(case, 3)
        with LargestTensor() as probe:
            out = solution.sharded_lookup(value_slices, indices, scores, pre_slices, pre_input)
        limit = case["N"] * case["d_pre"]  # the smaller whole table; one rank's slice of the other is half of it
        if probe.largest >= limit:
            raise AssertionError(
                f"a tensor of {probe.largest} entries (from {probe.where}) was built: as large as a whole table "
                f"(N = {case['N']} rows); each rank gathers the T m rows it needs from its own slice"
            )
        assert_close(out, whole_lookup(value_slices, pre_slices, indices, scores, pre_input), "out")

    @pytest.mark.points(1)
    @pytest.mark.hint("pre_value_slices and pre_input come together: raise ValueError naming pre_input otherwise")
    def test_rejects_pre_input_alone(self, solution):
        case = dict(P=2, c=1, d_value=4, d_pre=2, T=2, m=2, N=3)
        _, _, value_slices, pre_slices, indices, scores, pre_input = _lookup_inputs(case, 0)
        with raises_naming("pre_input"):
            solution.sharded_lookup(value_slices, indices, scores, pre_slices, None)
        with raises_naming("pre_input"):
            solution.sharded_lookup(value_slices, indices, scores, None, pre_input)


TestQuestions = questions_class(CHAPTER)
