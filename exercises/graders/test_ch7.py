"""Graders of chapter 7 (exercises/ch7_triton.py): a Triton weighted-gather kernel and its scatter-add backward.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before
triton is imported), which is slow: the shapes here are small and the examples few.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exercises.graders.helpers import GRADER_SETTINGS, assert_close, check_tensor, seeds, triton_device

CHAPTER = 7
DEVICE = triton_device()
KERNEL_SETTINGS = settings(GRADER_SETTINGS, max_examples=4, deadline=None)


@st.composite
def lookup_shapes(draw, max_d=40):
    return dict(
        T=draw(st.integers(1, 4)), m=draw(st.integers(1, 6)), N=draw(st.integers(1, 10)), D=draw(st.integers(1, max_d))
    )


def _inputs(seed, T, m, N, D):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=g)
    indices = torch.randint(0, N, (T, m), generator=g)
    scores = torch.randn(T, m, generator=g)
    return values.to(DEVICE), indices.to(DEVICE), scores.to(DEVICE)


def gather_loop(values, indices, scores):
    """out[t] = sum_i scores[t, i] * values[indices[t, i]], one slot at a time."""
    T, m = indices.shape
    out = torch.zeros(T, values.shape[1], dtype=torch.float64)
    for t in range(T):
        for i in range(m):
            out[t] += float(scores[t, i]) * values[int(indices[t, i])].double().cpu()
    return out.float()


def backward_loop(grad_out, values, indices, scores):
    T, m = indices.shape
    grad_values = torch.zeros(values.shape, dtype=torch.float64)
    grad_scores = torch.zeros(T, m, dtype=torch.float64)
    for t in range(T):
        for i in range(m):
            r = int(indices[t, i])
            grad_values[r] += float(scores[t, i]) * grad_out[t].double().cpu()
            grad_scores[t, i] = float(grad_out[t].double().cpu() @ values[r].double().cpu())
    return grad_values.float(), grad_scores.float()


class LaunchCounter:
    """Counts Triton kernel launches (interpreted or compiled) while active."""

    def __init__(self, monkeypatch):
        import triton.runtime.jit as jit

        self.launches = 0
        classes = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:  # pragma: no cover - older triton
            pass
        for cls in classes:
            original = cls.run

            def counting_run(kernel, *args, _original=original, **kwargs):
                self.launches += 1
                return _original(kernel, *args, **kwargs)

            monkeypatch.setattr(cls, "run", counting_run)


@pytest.mark.exercise("weighted_gather")
@pytest.mark.time_limit(90)
class TestWeightedGather:
    @pytest.mark.points(3)
    @pytest.mark.hint("accumulate scores[t, i] * values[indices[t, i], cols] over i in a float32 block, then store")
    @KERNEL_SETTINGS
    @given(shape=lookup_shapes(), seed=seeds)
    def test_matches_slot_loop(self, solution, shape, seed):
        values, indices, scores = _inputs(seed, **shape)
        out = solution.weighted_gather(values, indices, scores)
        check_tensor(out, "out", (shape["T"], shape["D"]), torch.float32)
        assert_close(out.cpu(), gather_loop(values, indices, scores), "out", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(2)
    @pytest.mark.hint("mask loads and stores with cols < D_v and slots < m: the block sizes are powers of two")
    @KERNEL_SETTINGS
    @given(D=st.sampled_from([1, 3, 17, 33, 70]), m=st.sampled_from([3, 5, 7]), seed=seeds)
    def test_ragged_sizes_match_minimem(self, solution, reference, D, m, seed):
        values, indices, scores = _inputs(seed, 3, m, 9, D)
        out = solution.weighted_gather(values, indices, scores)
        assert_close(out, reference.weighted_gather(values, indices, scores), "out", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(1)
    @pytest.mark.hint("a row that appears twice in indices[t] contributes twice")
    def test_repeated_indices_add_up(self, solution):
        values, _, scores = _inputs(3, 2, 5, 4, 6)
        indices = torch.full((2, 5), 2, dtype=torch.int64, device=values.device)
        out = solution.weighted_gather(values, indices, scores)
        expected = scores.sum(1, keepdim=True).cpu() * values[2].cpu()
        assert_close(out.cpu(), expected, "out with every slot on row 2", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(2)
    @pytest.mark.hint("define a @triton.jit kernel and launch it with kernel[grid](...) inside weighted_gather")
    def test_runs_a_triton_kernel(self, solution, monkeypatch):
        values, indices, scores = _inputs(5, 3, 4, 8, 16)
        counter = LaunchCounter(monkeypatch)
        out = solution.weighted_gather(values, indices, scores)
        if counter.launches == 0:
            raise AssertionError("weighted_gather launched no Triton kernel")
        assert_close(out.cpu(), gather_loop(values, indices, scores), "out", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(1)
    @pytest.mark.hint("check 0 <= indices < N on the host and raise ValueError mentioning 'indices'")
    def test_rejects_out_of_range_indices(self, solution):
        values, indices, scores = _inputs(1, 2, 3, 4, 8)
        for bad in (4, -1):
            broken = indices.clone()
            broken[1, 2] = bad
            with pytest.raises(ValueError, match="indices"):
                solution.weighted_gather(values, broken, scores)


@pytest.mark.exercise("weighted_gather_backward")
@pytest.mark.time_limit(60)
class TestWeightedGatherBackward:
    def _call(self, solution, grad_out, values, indices, scores):
        result = solution.weighted_gather_backward(grad_out, values, indices, scores)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError(f"must return a tuple (grad_values, grad_scores), got {type(result).__name__}")
        check_tensor(result[0], "grad_values", tuple(values.shape), values.dtype)
        check_tensor(result[1], "grad_scores", tuple(scores.shape), scores.dtype)
        return result

    @pytest.mark.points(3)
    @pytest.mark.hint("grad_values[r] += scores[t, i] * grad_out[t] for every (t, i) with indices[t, i] == r")
    @GRADER_SETTINGS
    @given(shape=lookup_shapes(), seed=seeds)
    def test_matches_slot_loop(self, solution, shape, seed):
        values, indices, scores = _inputs(seed, **shape)
        grad_out = torch.randn(shape["T"], shape["D"], generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
        grad_values, grad_scores = self._call(solution, grad_out, values, indices, scores)
        want_values, want_scores = backward_loop(grad_out, values, indices, scores)
        assert_close(grad_values.cpu(), want_values, "grad_values", rtol=1e-4, atol=1e-5)
        assert_close(grad_scores.cpu(), want_scores, "grad_scores", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(2)
    @pytest.mark.hint("grad_values[indices] += ... keeps one write per repeated row: use index_add_ or atomics")
    @GRADER_SETTINGS
    @given(seed=seeds)
    def test_repeated_indices_accumulate(self, solution, seed):
        values, indices, scores = _inputs(seed, 6, 5, 3, 4)  # 30 slots on 3 rows: every row hit many times
        grad_out = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
        grad_values, _ = self._call(solution, grad_out, values, indices, scores)
        assert_close(
            grad_values.cpu(), backward_loop(grad_out, values, indices, scores)[0], "grad_values", rtol=1e-4, atol=1e-5
        )

    @pytest.mark.points(2)
    @pytest.mark.hint("it must equal what autograd computes through minimem's Triton lookup")
    @KERNEL_SETTINGS
    @given(shape=lookup_shapes(), seed=seeds)
    def test_matches_minimem(self, solution, reference, shape, seed):
        values, indices, scores = _inputs(seed, **shape)
        grad_out = torch.randn(shape["T"], shape["D"], generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
        got = self._call(solution, grad_out, values, indices, scores)
        want = reference.weighted_gather_backward(grad_out, values, indices, scores)
        assert_close(got[0], want[0], "grad_values", rtol=1e-4, atol=1e-5)
        assert_close(got[1], want[1], "grad_scores", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(1)
    @pytest.mark.hint("rows that no token selected get exactly zero gradient")
    def test_unselected_rows_are_zero(self, solution):
        values, _, scores = _inputs(4, 3, 2, 10, 5)
        indices = torch.tensor([[1, 3], [3, 7], [1, 1]], device=values.device)
        grad_values, _ = self._call(solution, torch.ones(3, 5, device=values.device), values, indices, scores)
        untouched = [r for r in range(10) if r not in (1, 3, 7)]
        if bool(grad_values[untouched].ne(0).any()):
            raise AssertionError(f"rows {untouched} were not selected but got non-zero gradient")
