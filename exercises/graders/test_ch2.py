"""Graders of chapter 2 (exercises/ch2_product_keys.py): exact top-m over product keys."""

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
    relative_gap,
    seeds,
)

CHAPTER = 2


@st.composite
def retrieval_shapes(draw, max_n=12):
    n = draw(st.integers(1, max_n))
    return dict(T=draw(st.integers(1, 5)), d=draw(st.integers(1, 4)), n=n, m=draw(st.integers(1, n)))


def _inputs(seed, T, d, n, requires_grad=False, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: many exactly equal scores
        return [torch.randint(-2, 3, s, generator=g).double() for s in ((T, d), (T, d), (n, d), (n, d))]
    return [randn(g, *s, requires_grad=requires_grad) for s in ((T, d), (T, d), (n, d), (n, d))]


def all_slot_scores(q1, q2, keys1, keys2):
    """(T, n * n): the score of every slot, flat index i * n + j, from the full concatenated keys."""
    n = keys1.shape[0]
    full_keys = torch.cat([keys1.repeat_interleave(n, 0), keys2.repeat(n, 1)], dim=1)  # row i*n+j = [K1[i], K2[j]]
    return torch.cat([q1, q2], dim=1) @ full_keys.T


def _check_result(result, T, m, dtype):
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"must return a tuple (scores, indices), got {type(result).__name__}")
    check_tensor(result[0], "scores", (T, m), dtype)
    check_tensor(result[1], "indices", (T, m), torch.int64)
    return result


def _check_against_all_slots(scores, indices, q1, q2, keys1, keys2, m, exact_indices):
    """Scores are the m best of all slots, sorted, and each index's own score; indices distinct."""
    full = all_slot_scores(q1, q2, keys1, keys2)
    best = torch.sort(full, dim=1, descending=True)
    assert_close(scores, best.values[:, :m], "scores (the m best slot scores, sorted descending)", rtol=1e-9, atol=1e-9)
    if bool(((indices < 0) | (indices >= full.shape[1])).any()):
        raise AssertionError(f"indices must be flat slot indices in [0, n*n) = [0, {full.shape[1]})")
    assert_close(full.gather(1, indices), scores, "the score of the returned slot indices", rtol=1e-9, atol=1e-9)
    for t in range(indices.shape[0]):
        if len(set(indices[t].tolist())) != m:
            raise AssertionError(f"indices[{t}] = {indices[t].tolist()} repeats a slot")
    if exact_indices:
        assert_equal(indices, best.indices[:, :m], "indices (flat i * n + j)")


class _Common:
    """Checks both exercises share; ``FUNCTION`` names the one graded."""

    FUNCTION = ""

    def call(self, module, *args):
        return getattr(module, self.FUNCTION)(*args)

    @pytest.mark.points(3)
    @pytest.mark.hint("score(i, j) = <q1, keys1[i]> + <q2, keys2[j]>, flat index i * n + j, sorted best first")
    @GRADER_SETTINGS
    @given(shape=retrieval_shapes(), seed=seeds)
    def test_equals_all_slot_scoring(self, solution, shape, seed):
        q1, q2, k1, k2 = _inputs(seed, shape["T"], shape["d"], shape["n"])
        scores, indices = _check_result(
            self.call(solution, q1, q2, k1, k2, shape["m"]), shape["T"], shape["m"], q1.dtype
        )
        _check_against_all_slots(scores, indices, q1, q2, k1, k2, shape["m"], exact_indices=True)

    @pytest.mark.points(2)
    @pytest.mark.hint("with equal scores any tied slot may win, but the m scores must still be the m best")
    @GRADER_SETTINGS
    @given(shape=retrieval_shapes(max_n=6), seed=seeds)
    def test_ties(self, solution, shape, seed):
        q1, q2, k1, k2 = _inputs(seed, shape["T"], shape["d"], shape["n"], integer=True)
        scores, indices = _check_result(
            self.call(solution, q1, q2, k1, k2, shape["m"]), shape["T"], shape["m"], q1.dtype
        )
        _check_against_all_slots(scores, indices, q1, q2, k1, k2, shape["m"], exact_indices=False)

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "compute scores with differentiable ops (gather the selected s1[i] + s2[j]); select under no_grad"
    )
    @GRADER_SETTINGS
    @given(shape=retrieval_shapes(max_n=8), seed=seeds)
    def test_gradients(self, solution, reference, shape, seed):
        inputs = _inputs(seed, shape["T"], shape["d"], shape["n"], requires_grad=True)
        scores = _check_result(self.call(solution, *inputs, shape["m"]), shape["T"], shape["m"], torch.float64)[0]
        expected = self.call(reference, *inputs, shape["m"])[0]
        check_grads(scores, expected, inputs, ("q1", "q2", "keys1", "keys2"), seed)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 queries and keys give float32 scores (select and score in the inputs' dtype)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=retrieval_shapes(), seed=seeds)
    def test_float32(self, solution, shape, seed):
        T, m = shape["T"], shape["m"]
        low, high = float32_copies(*_inputs(seed, T, shape["d"], shape["n"]))
        best = torch.sort(all_slot_scores(*high), dim=1, descending=True)
        assume(relative_gap(best.values, m) > 1e-4)  # the m-th and (m+1)-th slots are apart in float32 too
        scores, indices = _check_result(self.call(solution, *low, m), T, m, torch.float32)
        assert_close_dtype(scores, best.values[:, :m], "scores of float32 inputs", torch.float32)
        assert_equal(torch.sort(indices, dim=1).values, torch.sort(best.indices[:, :m], dim=1).values, "indices")

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming m unless 1 <= m <= n, and ValueError when the shapes do not fit")
    def test_rejects_bad_arguments(self, solution):
        q1, q2, k1, k2 = _inputs(0, 2, 3, 4)
        for bad in (0, 5):
            with raises_naming("m"):
                self.call(solution, q1, q2, k1, k2, bad)
        for args in ((q1[:, :2], q2, k1, k2), (q1, q2[:1], k1, k2), (q1, q2, k1[:3], k2), (q1, q2, k1, k2[:, :2])):
            with pytest.raises(ValueError):
                self.call(solution, *args, 2)


@pytest.mark.exercise("brute_force_topk")
class TestBruteForceTopk(_Common):
    FUNCTION = "brute_force_topk"


@pytest.mark.exercise("product_key_topk")
class TestProductKeyTopk(_Common):
    FUNCTION = "product_key_topk"

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "never score all n*n slots, not even a few rows at a time: top-m rows, top-m columns, then the m x m grid"
    )
    def test_never_scores_all_slots(self, solution):
        T, d, m = 4, 4, 4

        def run(n):
            q1, q2, k1, k2 = _inputs(7, T, d, n)
            scores, indices = _check_result(solution.product_key_topk(q1, q2, k1, k2, m), T, m, q1.dtype)
            return scores

        # the right method's work grows like n (2n sub-key scores), scoring every slot like N = n^2: 16x vs 256x
        check_work_growth(run, 32, 512, 64, "n (N = n^2 slots)", "2n sub-key scores plus the m x m grid grow like n")
        q1, q2, k1, k2 = _inputs(7, T, d, 128)
        scores, indices = _check_result(solution.product_key_topk(q1, q2, k1, k2, m), T, m, q1.dtype)
        _check_against_all_slots(scores, indices, q1, q2, k1, k2, m, exact_indices=True)

    @pytest.mark.points(1)
    @pytest.mark.hint("the same result as minimem.product_keys.product_key_topk on larger tables")
    @GRADER_SETTINGS
    @given(n=st.integers(16, 64), m=st.integers(1, 16), seed=seeds)
    def test_matches_minimem(self, solution, reference, n, m, seed):
        q1, q2, k1, k2 = _inputs(seed, 6, 8, n)
        scores, indices = _check_result(solution.product_key_topk(q1, q2, k1, k2, m), 6, m, q1.dtype)
        want_scores, want_indices = reference.product_key_topk(q1, q2, k1, k2, m)
        assert_close(scores, want_scores, "scores", rtol=1e-9, atol=1e-9)
        assert_equal(indices, want_indices, "indices")


TestQuestions = questions_class(CHAPTER)
