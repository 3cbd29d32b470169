"""Graders of chapter 7 (exercises/ch7_triton.py): a Triton weighted-gather kernel and its scatter-add backward.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before
triton is imported), which is slow: the shapes here are small and the examples few. There every
kernel call is bounds-checked (``kernel_bounds_checked``): a load or store outside the tensors the
kernel was given fails the check with the offending argument, instead of reading a neighbour's
data (an unmasked load past a row often gives the right answer by luck) or crashing the process.
Beyond the numbers, the kernel must handle shapes larger than one tile and strided inputs, and do
the whole lookup itself: one launch, nothing of size T m D_v computed in torch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exercises.graders.answer_keys import questions_class
from exercises.graders.helpers import (
    GRADER_SETTINGS,
    OutOfBounds,
    TorchOps,
    assert_close,
    check_tensor,
    kernel_bounds_checked,
    raises_naming,
    seeds,
    triton_device,
)

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


def gather(solution, values, indices, scores):
    """The learner's forward with every kernel load and store bounds-checked (in the interpreter)."""
    with kernel_bounds_checked():
        return solution.weighted_gather(values, indices, scores)


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
        out = gather(solution, values, indices, scores)
        check_tensor(out, "out", (shape["T"], shape["D"]), torch.float32)
        assert_close(out.cpu(), gather_loop(values, indices, scores), "out", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(2)
    @pytest.mark.hint("mask loads and stores with cols < D_v and slots < m: the block sizes are powers of two")
    @KERNEL_SETTINGS
    @given(D=st.sampled_from([1, 3, 17, 33, 70]), m=st.sampled_from([3, 5, 7]), seed=seeds)
    def test_ragged_sizes_match_minimem(self, solution, reference, D, m, seed):
        values, indices, scores = _inputs(seed, 3, m, 9, D)
        out = gather(solution, values, indices, scores)
        assert_close(out, reference.weighted_gather(values, indices, scores), "out", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(1)
    @pytest.mark.hint("a row that appears twice in indices[t] contributes twice")
    def test_repeated_indices_add_up(self, solution):
        values, _, scores = _inputs(3, 2, 5, 4, 6)
        indices = torch.full((2, 5), 2, dtype=torch.int64, device=values.device)
        out = gather(solution, values, indices, scores)
        expected = scores.sum(1, keepdim=True).cpu() * values[2].cpu()
        assert_close(out.cpu(), expected, "out with every slot on row 2", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(2)
    @pytest.mark.hint("define a @triton.jit kernel and launch it with kernel[grid](...) inside weighted_gather")
    def test_runs_a_triton_kernel(self, solution, monkeypatch):
        values, indices, scores = _inputs(5, 3, 4, 8, 16)
        counter = LaunchCounter(monkeypatch)
        out = gather(solution, values, indices, scores)
        if counter.launches == 0:
            raise AssertionError("weighted_gather launched no Triton kernel")
        assert_close(out.cpu(), gather_loop(values, indices, scores), "out", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "one program per (token, block of columns) and a loop over the m slots in blocks: shapes are not bounded "
        "by one tile (grid = (T, cdiv(D_v, BLOCK_D)), mask the last block and the last slots)"
    )
    @pytest.mark.parametrize(
        "T, m, N, D", [(3, 17, 40, 129), (17, 5, 9, 65), (2, 65, 100, 33), (1, 3, 7, 1025), (5, 33, 50, 257)]
    )
    def test_larger_than_one_tile(self, solution, T, m, N, D):
        values, indices, scores = _inputs(11, T, m, N, D)
        indices[0, 0] = N - 1  # the last row, whose unmasked overrun leaves the table
        out = gather(solution, values, indices, scores)
        check_tensor(out, "out", (T, D), torch.float32)
        assert_close(
            out.cpu(), gather_loop(values, indices, scores), f"out (T={T}, m={m}, D={D})", rtol=1e-4, atol=1e-5
        )

    @pytest.mark.points(1)
    @pytest.mark.hint("pass the strides (values.stride(0), ...) to the kernel, or make the inputs .contiguous() first")
    def test_strided_inputs(self, solution):
        T, m, N, D = 3, 5, 9, 20
        g = torch.Generator().manual_seed(5)
        cases = {  # made on the device, then viewed: .to() would make a strided tensor contiguous
            "values, a column slice (row stride D_v + 5)": torch.randn(N, D + 5, generator=g).to(DEVICE)[:, 2 : 2 + D],
            "values, column-major": torch.randn(D, N, generator=g).to(DEVICE).t(),
        }
        indices = torch.randint(0, N, (T, 2 * m), generator=g).to(DEVICE)[:, ::2]  # every other column
        scores = torch.randn(m, T, generator=g).to(DEVICE).t()  # transposed
        for what, values in cases.items():
            out = gather(solution, values, indices, scores)
            assert_close(out.cpu(), gather_loop(values, indices, scores), f"out with {what}", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(1)
    @pytest.mark.hint("every tl.load and tl.store needs a mask unless its block fits exactly (cols < D_v, slots < m)")
    def test_no_out_of_bounds_access(self, solution):
        values, indices, scores = _inputs(2, 2, 5, 6, 33)  # D_v one past a block, m = 5 not a power of two
        indices[-1, -1] = 5  # the table's last row
        try:
            out = gather(solution, values, indices, scores)
        except OutOfBounds as err:
            raise AssertionError(str(err)) from None
        assert_close(out.cpu(), gather_loop(values, indices, scores), "out", rtol=1e-4, atol=1e-5)

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "one kernel does the whole lookup: no torch gather of (T, m, D_v) rows, no launch per slot or per token"
    )
    def test_is_one_fused_kernel(self, solution, monkeypatch):
        counter = LaunchCounter(monkeypatch)
        launches = []
        for T, m in ((2, 4), (8, 16)):
            values, indices, scores = _inputs(9, T, m, 24, 200)
            before = counter.launches
            with TorchOps() as ops:
                out = gather(solution, values, indices, scores)
            launches.append(counter.launches - before)
            assert_close(out.cpu(), gather_loop(values, indices, scores), "out", rtol=1e-4, atol=1e-5)
            if ops.computed >= T * 200:
                top = ", ".join(f"{k} {v}" for k, v in sorted(ops.by_op.items(), key=lambda kv: -kv[1])[:3])
                raise AssertionError(
                    f"torch computed {ops.computed} entries around the kernel ({top}) for T={T}, m={m}, D_v=200: "
                    f"a fused kernel leaves torch less than the {T * 200} output entries (just the index check)"
                )
        if launches[0] == 0 or launches[1] != launches[0] or launches[1] > 2:
            raise AssertionError(
                f"Triton kernel launches: {launches[0]} for T=2, m=4 and {launches[1]} for T=8, m=16; one fused "
                "kernel (at most two) launched once per call, whatever T and m, is expected"
            )

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "check on the host before launching: indices int64 in [0, N) (naming indices), scores (T, m) (naming "
        "scores), values 2-D (naming values)"
    )
    def test_rejects_bad_arguments(self, solution):
        values, indices, scores = _inputs(1, 2, 3, 4, 8)
        for bad in (4, -1):
            broken = indices.clone()
            broken[1, 2] = bad
            with raises_naming("indices"):
                solution.weighted_gather(values, broken, scores)
        with raises_naming("indices"):
            solution.weighted_gather(values, indices.to(torch.int32), scores)
        with raises_naming("scores"):
            solution.weighted_gather(values, indices, scores[:, :2])
        with raises_naming("values"):
            solution.weighted_gather(values[0], indices, scores)


@pytest.mark.exercise("weighted_gather_backward")
@pytest.mark.time_limit(60)
class TestWeightedGatherBackward:
    def _call(self, solution, grad_out, values, indices, scores):
        with kernel_bounds_checked():
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
    @pytest.mark.hint("any T, m and D_v, beyond one tile (mask the last block if you wrote a kernel)")
    def test_larger_than_one_tile(self, solution):
        T, m, N, D = 5, 17, 12, 129
        values, indices, scores = _inputs(6, T, m, N, D)
        grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(7)).to(DEVICE)
        grad_values, grad_scores = self._call(solution, grad_out, values, indices, scores)
        want_values, want_scores = backward_loop(grad_out, values, indices, scores)
        assert_close(grad_values.cpu(), want_values, "grad_values", rtol=1e-4, atol=1e-4)
        assert_close(grad_scores.cpu(), want_scores, "grad_scores", rtol=1e-4, atol=1e-4)

    @pytest.mark.points(1)
    @pytest.mark.hint("rows that no token selected get exactly zero gradient")
    def test_unselected_rows_are_zero(self, solution):
        values, _, scores = _inputs(4, 3, 2, 10, 5)
        indices = torch.tensor([[1, 3], [3, 7], [1, 1]], device=values.device)
        grad_values, _ = self._call(solution, torch.ones(3, 5, device=values.device), values, indices, scores)
        untouched = [r for r in range(10) if r not in (1, 3, 7)]
        if bool(grad_values[untouched].ne(0).any()):
            raise AssertionError(f"rows {untouched} were not selected but got non-zero gradient")


TestQuestions = questions_class(CHAPTER)
