"""Graders of chapter 5 (exercises/ch5_ultramem.py): rank-1 core, TDQKR, multi-core scoring, IVE."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exercises.graders.answer_keys import questions_class
from exercises.graders.helpers import (
    GRADER_SETTINGS,
    assert_close,
    assert_close_dtype,
    assert_equal,
    check_grads,
    check_tensor,
    check_work_growth,
    float32_copies,
    raises_naming,
    randn,
    seeds,
)

CHAPTER = 5


def _pair(result, name0, name1):
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"must return a tuple ({name0}, {name1}), got {type(result).__name__}")
    return result


# --------------------------------------------------------------------------- 5.1 rank1_core


@pytest.mark.exercise("rank1_core")
class TestRank1Core:
    @pytest.mark.points(2)
    @pytest.mark.hint("U, S, Vh = torch.linalg.svd(core): u = U[:, 0], t = Vh[0]; then the sign rule")
    @GRADER_SETTINGS
    @given(r=st.integers(1, 5), seed=seeds)
    def test_leading_singular_pair_with_sign_rule(self, solution, r, seed):
        core = randn(seed, r, r)
        u, t = _pair(solution.rank1_core(core), "u", "t")
        check_tensor(u, "u", (r,), core.dtype)
        check_tensor(t, "t", (r,), core.dtype)
        sigma = float(torch.linalg.svdvals(core)[0])
        assert_close(torch.stack([u.norm(), t.norm()]), torch.ones(2, dtype=core.dtype), "lengths of u and t")
        assert_close(
            u @ core @ t,
            torch.tensor(sigma, dtype=core.dtype),
            "u^T C t (must be the largest singular value)",
            rtol=1e-8,
        )
        first_largest = int(u.abs().argmax())
        if not u[first_largest] > 0:
            raise AssertionError(
                f"sign rule: u's largest |entry| (position {first_largest}) must be positive, u = {u.tolist()}"
            )

    @pytest.mark.points(1)
    @pytest.mark.hint("the same (u, t) as minimem.tucker.rank1_core")
    @GRADER_SETTINGS
    @given(r=st.integers(1, 5), seed=seeds)
    def test_matches_minimem(self, solution, reference, r, seed):
        core = randn(seed, r, r)
        u, t = _pair(solution.rank1_core(core), "u", "t")
        want_u, want_t = reference.rank1_core(core)
        assert_close(u, want_u, "u", rtol=1e-7, atol=1e-9)
        assert_close(t, want_t, "t", rtol=1e-7, atol=1e-9)

    @pytest.mark.points(1)
    @pytest.mark.hint("a rank-1 core a b^T gives u = a / |a| and t = b / |b| (up to the common sign)")
    @GRADER_SETTINGS
    @given(r=st.integers(2, 5), seed=seeds)
    def test_rank_one_core(self, solution, r, seed):
        g = torch.Generator().manual_seed(seed)
        a, b = randn(g, r), randn(g, r)
        u, t = _pair(solution.rank1_core(torch.outer(a, b)), "u", "t")
        sign = 1.0 if a[a.abs().argmax()] > 0 else -1.0
        assert_close(u, sign * a / a.norm(), "u of a b^T", rtol=1e-7, atol=1e-9)
        assert_close(t, sign * b / b.norm(), "t of a b^T", rtol=1e-7, atol=1e-9)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 core, float32 u and t (the SVD in the core's dtype)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(r=st.integers(1, 5), seed=seeds)
    def test_float32(self, solution, r, seed):
        (core,), (core64,) = float32_copies(randn(seed, r, r))
        u, t = _pair(solution.rank1_core(core), "u", "t")
        check_tensor(u, "u", (r,), torch.float32)
        check_tensor(t, "t", (r,), torch.float32)
        U, S, Vh = torch.linalg.svd(core64)
        assume(r == 1 or float(S[0] - S[1]) > 1e-3 * float(S[0]))  # a leading pair float32 resolves too
        assert_close_dtype(torch.outer(u, t), torch.outer(U[:, 0], Vh[0]), "u t^T of a float32 core", torch.float32)
        if not u[int(u.abs().argmax())] > 0:
            raise AssertionError(f"sign rule: u's largest |entry| must be positive, u = {u.tolist()}")

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming core unless it is a square 2-D (r, r) tensor")
    def test_rejects_non_square_core(self, solution):
        for bad in (torch.ones(2, 3), torch.ones(3), torch.ones(2, 2, 2)):
            with raises_naming("core"):
                solution.rank1_core(bad)


# --------------------------------------------------------------------------- 5.2 tucker_topk


@st.composite
def tucker_shapes(draw):
    n = draw(st.integers(1, 8))
    return dict(
        T=draw(st.integers(1, 3)), r=draw(st.integers(1, 3)), n=n, c=draw(st.integers(1, 3)), m=draw(st.integers(1, n))
    )


def _tucker_inputs(seed, T, r, n, c, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [randn(g, *s, requires_grad=requires_grad) for s in ((T, r, n), (T, r, n), (c, r, r))]


def _check_tucker(result, T, m, c):
    scores, indices = _pair(result, "scores", "indices")
    check_tensor(scores, "scores", (T, m, c), torch.float64)
    check_tensor(indices, "indices", (T, m), torch.int64)
    return scores, indices


def _per_core(s_row, s_col, cores, indices):
    """(T, m, c): core k's score at each chosen flat slot, slot by slot."""
    n = s_row.shape[2]
    T, m = indices.shape
    out = torch.zeros(T, m, cores.shape[0], dtype=s_row.dtype)
    for t in range(T):
        for l, slot in enumerate(indices[t].tolist()):
            i, j = divmod(slot, n)
            for k in range(cores.shape[0]):
                out[t, l, k] = s_row[t, :, i] @ cores[k] @ s_col[t, :, j]
    return out


@pytest.mark.exercise("tucker_topk")
class TestTuckerTopk:
    @pytest.mark.points(3)
    @pytest.mark.hint(
        "candidates from u^T s_row and t^T s_col (rank1_core of cores.sum(0)), then rescore the m x m grid"
    )
    @GRADER_SETTINGS
    @given(shape=tucker_shapes(), seed=seeds)
    def test_matches_minimem(self, solution, reference, shape, seed):
        s_row, s_col, cores = _tucker_inputs(seed, shape["T"], shape["r"], shape["n"], shape["c"])
        scores, indices = _check_tucker(
            solution.tucker_topk(s_row, s_col, cores, shape["m"]), shape["T"], shape["m"], shape["c"]
        )
        want_scores, want_indices = reference.tucker_topk(s_row, s_col, cores, shape["m"])
        assert_equal(indices, want_indices, "indices")
        assert_close(scores, want_scores, "per-core scores", rtol=1e-8, atol=1e-10)

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "scores[t, l, k] = s_row[t, :, i]^T cores[k] s_col[t, :, j] for the l-th slot i * n + j, best first"
    )
    @GRADER_SETTINGS
    @given(shape=tucker_shapes(), seed=seeds)
    def test_per_core_scores_of_the_chosen_slots(self, solution, shape, seed):
        s_row, s_col, cores = _tucker_inputs(seed, shape["T"], shape["r"], shape["n"], shape["c"])
        scores, indices = _check_tucker(
            solution.tucker_topk(s_row, s_col, cores, shape["m"]), shape["T"], shape["m"], shape["c"]
        )
        assert_close(
            scores,
            _per_core(s_row, s_col, cores, indices),
            "per-core scores at the returned slots",
            rtol=1e-8,
            atol=1e-10,
        )
        total = scores.sum(-1)
        if bool((total[:, 1:] > total[:, :-1] + 1e-12).any()):
            raise AssertionError("slots must be sorted by descending summed score")

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "for a rank-1 core with non-negative u^T s_row and t^T s_col the candidates contain the exact top-m"
    )
    @GRADER_SETTINGS
    @given(shape=tucker_shapes(), seed=seeds)
    def test_exact_for_rank_one_core(self, solution, shape, seed):
        g = torch.Generator().manual_seed(seed)
        T, r, n, c, m = (shape[k] for k in ("T", "r", "n", "c", "m"))
        a, b = randn(g, r).abs() + 0.1, randn(g, r).abs() + 0.1
        cores = randn(g, c, r, r)
        cores[-1] = torch.outer(a, b) - cores[:-1].sum(0)  # the cores sum to the rank-1 core a b^T
        s_row, s_col = randn(g, T, r, n).abs(), randn(g, T, r, n).abs()
        scores, indices = _check_tucker(solution.tucker_topk(s_row, s_col, cores, m), T, m, c)
        full = torch.einsum("tai,ab,tbj->tij", s_row, cores.sum(0), s_col).flatten(1)
        best = torch.sort(full, dim=1, descending=True)
        assert_equal(indices, best.indices[:, :m], "indices (the exact top-m for a rank-1 core)")

    @pytest.mark.points(1)
    @pytest.mark.hint("select under torch.no_grad(), then compute the chosen slots' scores with autograd on")
    @GRADER_SETTINGS
    @given(shape=tucker_shapes(), seed=seeds)
    def test_gradients(self, solution, reference, shape, seed):
        inputs = _tucker_inputs(seed, shape["T"], shape["r"], shape["n"], shape["c"], requires_grad=True)
        scores = _check_tucker(solution.tucker_topk(*inputs, shape["m"]), shape["T"], shape["m"], shape["c"])[0]
        check_grads(scores, reference.tucker_topk(*inputs, shape["m"])[0], inputs, ("s_row", "s_col", "cores"), seed)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 scores: select and rescore in the inputs' dtype")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=tucker_shapes(), seed=seeds)
    def test_float32(self, solution, shape, seed):
        low, high = float32_copies(*_tucker_inputs(seed, shape["T"], shape["r"], shape["n"], shape["c"]))
        scores, indices = _pair(solution.tucker_topk(*low, shape["m"]), "scores", "indices")
        check_tensor(scores, "scores", (shape["T"], shape["m"], shape["c"]), torch.float32)
        check_tensor(indices, "indices", (shape["T"], shape["m"]), torch.int64)
        want = _per_core(*high, indices)  # the chosen slots' own scores, in float64
        assert_close_dtype(scores, want, "per-core scores of float32 inputs", torch.float32)

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming m unless 1 <= m <= n")
    def test_rejects_bad_m(self, solution):
        s_row, s_col, cores = _tucker_inputs(0, 2, 2, 4, 1)
        for bad in (0, 5):
            with raises_naming("m"):
                solution.tucker_topk(s_row, s_col, cores, bad)


# --------------------------------------------------------------------------- 5.3 multi_core_read


@st.composite
def read_shapes(draw):
    c = draw(st.integers(1, 3))
    return dict(
        T=draw(st.integers(1, 4)),
        m=draw(st.integers(1, 5)),
        N=draw(st.integers(1, 8)),
        D=c * draw(st.integers(1, 4)),
        c=c,
    )


def _read_inputs(seed, T, m, N, D, c, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    values = randn(g, N, D, requires_grad=requires_grad)
    indices = torch.randint(0, N, (T, m), generator=g)
    return values, indices, randn(g, T, m, c, requires_grad=requires_grad)


def read_loop(values, indices, scores):
    T, m, c = scores.shape
    width = values.shape[1] // c
    out = torch.zeros(T, values.shape[1], dtype=values.dtype)
    for t in range(T):
        for i in range(m):
            for k in range(c):
                out[t, k * width : (k + 1) * width] += (
                    scores[t, i, k] * values[indices[t, i], k * width : (k + 1) * width]
                )
    return out


@pytest.mark.exercise("multi_core_read")
class TestMultiCoreRead:
    @pytest.mark.points(3)
    @pytest.mark.hint("view the gathered rows as (T, m, c, D_v / c) and weight slice k by scores[..., k]")
    @GRADER_SETTINGS
    @given(shape=read_shapes(), seed=seeds)
    def test_matches_slice_loop(self, solution, shape, seed):
        values, indices, scores = _read_inputs(seed, **shape)
        out = solution.multi_core_read(values, indices, scores)
        assert_close(out, read_loop(values, indices, scores), "out")

    @pytest.mark.points(1)
    @pytest.mark.hint("the same output and gradients as minimem.kernels.memory_lookup")
    @GRADER_SETTINGS
    @given(shape=read_shapes(), seed=seeds)
    def test_gradients_match_minimem(self, solution, reference, shape, seed):
        values, indices, scores = _read_inputs(seed, **shape, requires_grad=True)
        out = solution.multi_core_read(values, indices, scores)
        check_grads(
            out, reference.multi_core_read(values, indices, scores), (values, scores), ("values", "scores"), seed
        )

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 and bfloat16 in, the same dtype out (no .double() on the way)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=read_shapes(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=seeds)
    def test_float32_and_bfloat16(self, solution, shape, dtype, seed):
        values, indices, scores = _read_inputs(seed, **shape)
        values, scores = values.to(dtype), scores.to(dtype)
        out = solution.multi_core_read(values, indices, scores)
        want = read_loop(values.double(), indices, scores.double())
        assert_close_dtype(out, want, f"out of {dtype} inputs", dtype)

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming scores when c does not divide D_v, indices when one is outside [0, N)")
    def test_rejects_bad_input(self, solution):
        values, indices, scores = _read_inputs(0, 2, 3, 5, 6, 2)
        with raises_naming("scores"):
            solution.multi_core_read(values[:, :5], indices, scores)
        for wrong in (5, -1):
            bad = indices.clone()
            bad[0, 0] = wrong
            with raises_naming("indices"):
                solution.multi_core_read(values, bad, scores)


# --------------------------------------------------------------------------- 5.4 implicit_value_expansion


@st.composite
def ive_shapes(draw):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 2))
    return dict(
        T=draw(st.integers(1, 4)),
        m=draw(st.integers(1, n)),
        N=n * n,
        D=c * draw(st.integers(1, 3)),
        c=c,
        E=draw(st.sampled_from([1, 4, 9])),
        h=2 * draw(st.integers(1, 3)),
    )


def _ive_inputs(seed, T, m, N, D, c, E, h, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    values = randn(g, N, D, requires_grad=requires_grad)
    rows = torch.randint(0, N, (T, m), generator=g)
    blocks = torch.randint(0, E, (T, m), generator=g)
    scores = randn(g, T, m, c, requires_grad=requires_grad)
    return values, rows, blocks, scores, randn(g, E, D, h, requires_grad=requires_grad)


def ive_loop(values, rows, blocks, scores, projections):
    """Each slot's virtual value (physical row times its block's projection), weighted per core slice."""
    T, m, c = scores.shape
    width = values.shape[1] // c
    out = torch.zeros(T, projections.shape[2], dtype=values.dtype)
    for t in range(T):
        for i in range(m):
            weighted = torch.cat([scores[t, i, k] * values[rows[t, i], k * width : (k + 1) * width] for k in range(c)])
            out[t] += weighted @ projections[blocks[t, i]]
    return out


@pytest.mark.exercise("implicit_value_expansion")
class TestImplicitValueExpansion:
    @pytest.mark.points(3)
    @pytest.mark.hint(
        "pool the weighted physical rows into their block's bucket (T, E, D_v), then one matmul per block"
    )
    @GRADER_SETTINGS
    @given(shape=ive_shapes(), seed=seeds)
    def test_matches_virtual_value_loop(self, solution, shape, seed):
        inputs = _ive_inputs(seed, **shape)
        out = solution.implicit_value_expansion(*inputs)
        check_tensor(out, "out", (shape["T"], shape["h"]), torch.float64)
        assert_close(out, ive_loop(*inputs), "out")

    @pytest.mark.points(1)
    @pytest.mark.hint("the same output and gradients as minimem.ultramem.UltraMem's pooling")
    @GRADER_SETTINGS
    @given(shape=ive_shapes(), seed=seeds)
    def test_gradients_match_minimem(self, solution, reference, shape, seed):
        values, rows, blocks, scores, projections = _ive_inputs(seed, **shape, requires_grad=True)
        out = solution.implicit_value_expansion(values, rows, blocks, scores, projections)
        expected = reference.implicit_value_expansion(values, rows, blocks, scores, projections)
        check_grads(out, expected, (values, scores, projections), ("values", "scores", "projections"), seed)

    @pytest.mark.points(1)
    @pytest.mark.hint(
        "never compute virtual values, not even a few rows at a time: pool the physical rows per block first"
    )
    def test_never_builds_the_virtual_table(self, solution):
        def run(n):  # N = n^2 physical rows, the same 4 tokens reading 8 slots each
            return solution.implicit_value_expansion(*_ive_inputs(1, T=4, m=8, N=n * n, D=8, c=2, E=4, h=16))

        check_work_growth(run, 16, 128, 4, "N (rows)", "pooling the m read rows and E projections do not grow with N")
        inputs = _ive_inputs(1, T=4, m=8, N=4096, D=8, c=2, E=4, h=16)
        assert_close(solution.implicit_value_expansion(*inputs), ive_loop(*inputs), "out")

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=ive_shapes(), seed=seeds)
    def test_float32(self, solution, shape, seed):
        values, rows, blocks, scores, projections = _ive_inputs(seed, **shape)
        (values, scores, projections), high = float32_copies(values, scores, projections)
        out = solution.implicit_value_expansion(values, rows, blocks, scores, projections)
        want = ive_loop(high[0], rows, blocks, high[1], high[2])
        assert_close_dtype(out, want, "out of float32 inputs", torch.float32)


TestQuestions = questions_class(CHAPTER)
