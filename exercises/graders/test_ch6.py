"""Graders of chapter 6 (exercises/ch6_ultramemv2.py): principled init, pre-value read, MCP."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exercises.graders.answer_keys import questions_class
from exercises.graders.helpers import (
    GRADER_SETTINGS,
    assert_close,
    assert_close_dtype,
    check_grads,
    check_tensor,
    float32_copies,
    raises_naming,
    randn,
    seeds,
)

CHAPTER = 6


# --------------------------------------------------------------------------- 6.1 principled_value_std


@st.composite
def init_sizes(draw):
    return dict(
        target_variance=draw(st.floats(1e-5, 10.0)),
        sigma_s=draw(st.floats(0.0, 2.0)),
        d_pre=draw(st.integers(1, 512)),
        d_value=draw(st.integers(1, 1024)),
        topk=draw(st.integers(1, 256)),
        heads=draw(st.integers(1, 4)),
        dim=draw(st.integers(1, 4096)),
        score_mean=draw(st.floats(0.1, 3.0)),
    )


def memory_variance(sigma_v, sigma_s, d_pre, d_value, topk, heads, dim, score_mean=1.0):
    return 0.16 * score_mean**2 * (1 + sigma_s**2) * sigma_v**4 * d_pre * topk * heads * d_value / dim


def simulated_memory_variance(sigma_v, sigma_s, d_pre, d_value, topk, dim, samples=20000, seed=0):
    """Output variance of o = W^T sum_i s_i <P_i, W_p x> V_i, drawing every weight afresh per sample."""
    g = torch.Generator().manual_seed(seed)
    std = math.sqrt(2 / (5 * dim))
    x = torch.randn(samples, dim, generator=g, dtype=torch.float64)
    w_pre = torch.randn(samples, d_pre, dim, generator=g, dtype=torch.float64) * std
    px = torch.einsum("spd,sd->sp", w_pre, x)
    pre = torch.randn(samples, topk, d_pre, generator=g, dtype=torch.float64) * sigma_v
    val = torch.randn(samples, topk, d_value, generator=g, dtype=torch.float64) * sigma_v
    s = 1 + sigma_s * torch.randn(samples, topk, generator=g, dtype=torch.float64)  # mean 1, relative spread sigma_s
    read = torch.einsum("sm,sm,smv->sv", s, torch.einsum("smp,sp->sm", pre, px), val)
    w_out = torch.randn(samples, dim, d_value, generator=g, dtype=torch.float64) * std
    return float(torch.einsum("shv,sv->sh", w_out, read).var())


@pytest.mark.exercise("principled_value_std")
class TestPrincipledValueStd:
    @pytest.mark.points(2)
    @pytest.mark.hint("solve target = 0.16 mu^2 (1 + sigma_s^2) sigma_V^4 D_p m H D_v / h for sigma_V^4")
    @GRADER_SETTINGS
    @given(sizes=init_sizes())
    def test_reaches_the_target_variance(self, solution, sizes):
        sigma_v = solution.principled_value_std(**sizes)
        if not isinstance(sigma_v, float):
            raise AssertionError(f"must return a Python float, got {type(sigma_v).__name__}")
        args = {k: v for k, v in sizes.items() if k != "target_variance"}
        got = memory_variance(sigma_v, **args)
        if not math.isclose(got, sizes["target_variance"], rel_tol=1e-9):
            raise AssertionError(
                f"with sigma_V = {sigma_v:.6g} the memory variance is {got:.6g}, "
                f"not the target {sizes['target_variance']:.6g}"
            )

    @pytest.mark.points(1)
    @pytest.mark.hint("the same number as minimem.init.principled_value_std")
    @GRADER_SETTINGS
    @given(sizes=init_sizes())
    def test_matches_minimem(self, solution, reference, sizes):
        got = solution.principled_value_std(**sizes)
        want = reference.principled_value_std(**sizes)
        if not math.isclose(got, want, rel_tol=1e-9):
            raise AssertionError(f"principled_value_std({sizes}) = {got!r}, expected {want!r}")

    @pytest.mark.points(2)
    @pytest.mark.hint("sigma_V enters twice (pre-value and value), so the variance is quartic in sigma_V: 4th root")
    @settings(GRADER_SETTINGS, max_examples=3)
    @given(seed=seeds)
    def test_simulated_branch_has_the_target_variance(self, solution, seed):
        sizes = dict(d_pre=4, d_value=6, topk=3, dim=8)
        target, sigma_s = 0.004, 0.5  # far from 1, where the square root and the fourth root differ
        sigma_v = solution.principled_value_std(target, sigma_s, heads=1, **sizes)
        simulated = simulated_memory_variance(sigma_v, sigma_s, seed=seed, **sizes)
        if not 0.8 < simulated / target < 1.25:
            raise AssertionError(
                f"sigma_V = {sigma_v:.4g} gives a simulated memory output variance {simulated:.4g}, target {target}"
            )

    @pytest.mark.points(2)
    @pytest.mark.hint("check every argument: each size and target_variance > 0, score_mean > 0, sigma_s >= 0")
    def test_rejects_bad_input(self, solution):
        good = dict(target_variance=0.01, sigma_s=0.3, d_pre=4, d_value=12, topk=8, heads=1, dim=32, score_mean=1.0)
        cases = [("sigma_s", -0.1)] + [
            (name, bad)
            for name in ("target_variance", "d_pre", "d_value", "topk", "heads", "dim", "score_mean")
            for bad in (0, -1)
        ]
        for name, bad in cases:
            with raises_naming(name):
                solution.principled_value_std(**{**good, name: bad})


# --------------------------------------------------------------------------- 6.2 prevalue_read


@st.composite
def read_shapes(draw):
    c = draw(st.integers(1, 3))
    return dict(
        T=draw(st.integers(1, 4)),
        m=draw(st.integers(1, 5)),
        N=draw(st.integers(1, 8)),
        D=c * draw(st.integers(1, 3)),
        P=draw(st.integers(1, 4)),
        c=c,
        h=draw(st.integers(1, 5)),
    )


def _read_inputs(seed, T, m, N, D, P, c, h, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    values, pre_values = randn(g, N, D, requires_grad=requires_grad), randn(g, N, P, requires_grad=requires_grad)
    indices = torch.randint(0, N, (T, m), generator=g)
    scores = randn(g, T, m, c, requires_grad=requires_grad)
    px, w_out = randn(g, T, P, requires_grad=requires_grad), randn(g, h, D, requires_grad=requires_grad)
    return values, pre_values, indices, scores, px, w_out


def prevalue_loop(values, pre_values, indices, scores, px, w_out):
    T, m, c = scores.shape
    width = values.shape[1] // c
    read = torch.zeros(T, values.shape[1], dtype=values.dtype)
    for t in range(T):
        for i in range(m):
            r = indices[t, i]
            gate = pre_values[r] @ px[t]
            for k in range(c):
                read[t, k * width : (k + 1) * width] += scores[t, i, k] * gate * values[r, k * width : (k + 1) * width]
    return read @ w_out.T


@pytest.mark.exercise("prevalue_read")
class TestPrevalueRead:
    @pytest.mark.points(3)
    @pytest.mark.hint(
        "g = (pre_values[indices] * px[:, None]).sum(-1); weight slice k by scores[..., k] * g; then @ w_out.T"
    )
    @GRADER_SETTINGS
    @given(shape=read_shapes(), seed=seeds)
    def test_matches_slot_loop(self, solution, shape, seed):
        inputs = _read_inputs(seed, **shape)
        out = solution.prevalue_read(*inputs)
        check_tensor(out, "out", (shape["T"], shape["h"]), torch.float64)
        assert_close(out, prevalue_loop(*inputs), "out")

    @pytest.mark.points(2)
    @pytest.mark.hint("gradients reach values, pre-values, scores, px and w_out")
    @GRADER_SETTINGS
    @given(shape=read_shapes(), seed=seeds)
    def test_gradients_match_minimem(self, solution, reference, shape, seed):
        values, pre_values, indices, scores, px, w_out = _read_inputs(seed, **shape, requires_grad=True)
        out = solution.prevalue_read(values, pre_values, indices, scores, px, w_out)
        expected = reference.prevalue_read(values, pre_values, indices, scores, px, w_out)
        assert_close(out, expected, "out")
        check_grads(
            out,
            expected,
            (values, pre_values, scores, px, w_out),
            ("values", "pre_values", "scores", "px", "w_out"),
            seed,
        )

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=read_shapes(), seed=seeds)
    def test_float32(self, solution, shape, seed):
        values, pre_values, indices, scores, px, w_out = _read_inputs(seed, **shape)
        (values, pre_values, scores, px, w_out), high = float32_copies(values, pre_values, scores, px, w_out)
        out = solution.prevalue_read(values, pre_values, indices, scores, px, w_out)
        want = prevalue_loop(high[0], high[1], indices, high[2], high[3], high[4])
        assert_close_dtype(out, want, "out of float32 inputs", torch.float32)


# --------------------------------------------------------------------------- 6.3 mcp_percent


@st.composite
def memory_sizes(draw):
    cores, n_keys = draw(st.integers(1, 3)), draw(st.integers(2, 600))
    return dict(
        h=2 * draw(st.integers(1, 1024)),
        ffn_hidden=draw(st.integers(1, 8192)),
        n_keys=n_keys,
        d_key=2 * draw(st.integers(1, 512)),
        d_value=cores * draw(st.integers(1, 256)),
        d_pre=draw(st.integers(1, 512)),
        heads=draw(st.integers(1, 4)),
        rank=draw(st.integers(1, 4)),
        cores=cores,
        topk=draw(st.integers(1, n_keys)),
    )


@pytest.mark.exercise("mcp_percent")
class TestMCPPercent:
    @pytest.mark.points(2)
    @pytest.mark.hint("sum the nine memory terms, 6 h ffn_hidden for the FFN, then 100 * memory / (memory + FFN)")
    @GRADER_SETTINGS
    @given(sizes=memory_sizes())
    def test_matches_minimem(self, solution, reference, sizes):
        got = solution.mcp_percent(**sizes)
        want = reference.mcp_percent(**sizes)
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-9):
            raise AssertionError(f"mcp_percent({sizes}) = {got!r}, expected {want!r}")

    @pytest.mark.points(1)
    @pytest.mark.hint("at the [UM2] 227M shapes with D_k = h/2 and a 4h FFN the memory share is a few tens of percent")
    def test_worked_example(self, solution):
        h, f, n, dk, dv, dp, H, r, c, m = 768, 3072, 360, 384, 192, 192, 1, 2, 2, 32
        memory = (
            2 * h * H * r * dk
            + 2 * H * r * n * dk
            + 4 * H * r * n
            + 2 * H * (m * r * r + m * m * r)
            + 2 * H * m * c * (r * r + r)
            + 2 * h * dp
            + 2 * H * m * dp
            + 2 * H * m * dv
            + 2 * dv * h
        )
        want = 100.0 * memory / (memory + 6 * h * f)
        got = solution.mcp_percent(h, f, n, dk, dv, dp, H, r, c, m)
        if not math.isclose(got, want, rel_tol=1e-12):
            raise AssertionError(f"mcp_percent at h=768, D_k=384, n=360, m=32 = {got!r}, expected {want:.6g}")

    @pytest.mark.points(1)
    @pytest.mark.hint("a wider key D_k costs more query and key FLOPs, so the memory's share grows")
    @GRADER_SETTINGS
    @given(sizes=memory_sizes())
    def test_grows_with_key_width(self, solution, sizes):
        narrow = solution.mcp_percent(**sizes)
        wide = solution.mcp_percent(**{**sizes, "d_key": 2 * sizes["d_key"]})
        if not wide > narrow:
            raise AssertionError(f"doubling d_key must raise the memory share: {narrow:.4g}% -> {wide:.4g}%")


TestQuestions = questions_class(CHAPTER)
