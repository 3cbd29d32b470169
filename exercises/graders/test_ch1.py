"""Graders of chapter 1 (exercises/ch1_ffn_memory.py): FFN as key-value memory, MoE, memory access."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
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
    relative_gap,
    seeds,
)

CHAPTER = 1


# --------------------------------------------------------------------------- 1.1 swiglu_ffn


def _swiglu_inputs(seed, T, h, d_ff, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [randn(g, *s, requires_grad=requires_grad) for s in ((T, h), (d_ff, h), (d_ff, h), (h, d_ff))]


@pytest.mark.exercise("swiglu_ffn")
class TestSwigluFFN:
    @pytest.mark.points(3)
    @pytest.mark.hint("with nn.Linear weights: (silu(x @ w1.T) * (x @ w3.T)) @ w2.T")
    @GRADER_SETTINGS
    @given(T=st.integers(1, 6), h=st.integers(1, 8), d_ff=st.integers(1, 12), seed=seeds)
    def test_matches_minimem(self, solution, reference, T, h, d_ff, seed):
        inputs = _swiglu_inputs(seed, T, h, d_ff)
        out = solution.swiglu_ffn(*inputs)
        assert_close(out, reference.swiglu_ffn(*inputs), "swiglu_ffn(x, w1, w3, w2)")

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "the memory view: out = sum_i silu(<k_i, x>) <g_i, x> v_i with k_i = w1[i], g_i = w3[i], v_i = w2[:, i]"
    )
    @GRADER_SETTINGS
    @given(T=st.integers(1, 3), h=st.integers(1, 5), d_ff=st.integers(1, 6), seed=seeds)
    def test_is_a_key_value_memory(self, solution, T, h, d_ff, seed):
        x, w1, w3, w2 = _swiglu_inputs(seed, T, h, d_ff)
        out = solution.swiglu_ffn(x, w1, w3, w2)
        memory = torch.zeros(T, h, dtype=x.dtype)
        for t in range(T):
            for i in range(d_ff):  # every key scored, every value read
                key_score = float(w1[i] @ x[t])
                memory[t] += key_score / (1 + math.exp(-key_score)) * float(w3[i] @ x[t]) * w2[:, i]
        assert_close(out, memory, "swiglu_ffn vs the key-value sum")

    @pytest.mark.points(1)
    @pytest.mark.hint("use differentiable torch operations only (no .detach(), .item(), numpy)")
    @GRADER_SETTINGS
    @given(seed=seeds)
    def test_gradients(self, solution, reference, seed):
        inputs = _swiglu_inputs(seed, 3, 4, 5, requires_grad=True)
        out = solution.swiglu_ffn(*inputs)
        check_grads(out, reference.swiglu_ffn(*inputs), inputs, ("x", "w1", "w3", "w2"), seed)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out: compute in the inputs' dtype (no .double() on the way)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(T=st.integers(1, 6), h=st.integers(1, 8), d_ff=st.integers(1, 12), seed=seeds)
    def test_float32(self, solution, reference, T, h, d_ff, seed):
        low, high = float32_copies(*_swiglu_inputs(seed, T, h, d_ff))
        out = solution.swiglu_ffn(*low)
        assert_close_dtype(out, reference.swiglu_ffn(*high), "swiglu_ffn of float32 inputs", torch.float32)

    @pytest.mark.points(1)
    @pytest.mark.hint("check every argument: w3 like w1, w2 (h, d_ff), x (T, h); raise ValueError naming it")
    def test_rejects_bad_shapes(self, solution):
        x, w1, w3, w2 = _swiglu_inputs(0, 2, 4, 6)
        with raises_naming("w3"):
            solution.swiglu_ffn(x, w1, w3[:5], w2)
        with raises_naming("w2"):
            solution.swiglu_ffn(x, w1, w3, w2[:, :5])
        with raises_naming("w2"):
            solution.swiglu_ffn(x, w1, w3, w2[:3])
        with raises_naming("x"):
            solution.swiglu_ffn(x[:, :3], w1, w3, w2)


# --------------------------------------------------------------------------- 1.2 moe_forward


@st.composite
def moe_shapes(draw):
    E = draw(st.integers(1, 6))
    return dict(
        T=draw(st.integers(1, 8)), h=draw(st.integers(1, 6)), E=E, d=draw(st.integers(1, 4)), k=draw(st.integers(1, E))
    )


def _moe_inputs(seed, T, h, E, d, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [randn(g, *s, requires_grad=requires_grad) for s in ((T, h), (E, h), (E, h, 2 * d), (E, d, h))]


def _expert(x, w13, w2, e):
    d = w2.shape[1]
    a, b = x @ w13[e][:, :d], x @ w13[e][:, d:]
    return (F.silu(a) * b) @ w2[e]


def _check_moe_output(result, T, h, dtype):
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"moe_forward must return a tuple (out, aux_loss), got {type(result).__name__}")
    check_tensor(result[0], "out", (T, h), dtype)
    check_tensor(result[1], "aux_loss", ())


@pytest.mark.exercise("moe_forward")
class TestMoEForward:
    @pytest.mark.points(3)
    @pytest.mark.hint("p = softmax(x @ router_weight.T); keep the top_k p[t, e] as they are (no renormalising)")
    @GRADER_SETTINGS
    @given(shape=moe_shapes(), seed=seeds)
    def test_matches_minimem(self, solution, reference, shape, seed):
        x, router, w13, w2 = _moe_inputs(seed, shape["T"], shape["h"], shape["E"], shape["d"])
        result = solution.moe_forward(x, router, w13, w2, shape["k"])
        _check_moe_output(result, shape["T"], shape["h"], x.dtype)
        out, aux = reference.moe_forward(x, router, w13, w2, shape["k"])
        assert_close(result[0], out, "out", rtol=1e-5, atol=1e-6)
        assert_close(result[1], aux.to(result[1].dtype), "aux_loss", rtol=1e-5, atol=1e-6, check_dtype=False)

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "out[t] = sum over the top_k experts e of p[t, e] * expert_e(x[t]); expert_e splits w13[e] into W1 | W3"
    )
    @GRADER_SETTINGS
    @given(shape=moe_shapes(), seed=seeds)
    def test_matches_token_loop(self, solution, shape, seed):
        T, k = shape["T"], shape["k"]
        x, router, w13, w2 = _moe_inputs(seed, T, shape["h"], shape["E"], shape["d"])
        out = solution.moe_forward(x, router, w13, w2, k)[0]
        p = torch.softmax(x @ router.T, dim=-1)
        expected = torch.zeros_like(x)
        for t in range(T):
            for e in torch.sort(p[t], descending=True).indices[:k].tolist():
                expected[t] += p[t, e] * _expert(x[t], w13, w2, e)
        assert_close(out, expected, "out", rtol=1e-5, atol=1e-6)

    @pytest.mark.points(1)
    @pytest.mark.hint("aux_loss = E * sum_e f_e * P_e; with equal router probabilities it is exactly 1")
    @GRADER_SETTINGS
    @given(shape=moe_shapes(), seed=seeds)
    def test_balanced_router_has_unit_aux_loss(self, solution, shape, seed):
        x, router, w13, w2 = _moe_inputs(seed, shape["T"], shape["h"], shape["E"], shape["d"])
        aux = solution.moe_forward(x, torch.zeros_like(router), w13, w2, shape["k"])[1]
        assert_close(
            torch.as_tensor(aux, dtype=torch.float64),
            torch.tensor(1.0, dtype=torch.float64),
            "aux_loss of a uniform router",
            rtol=1e-5,
        )

    @pytest.mark.points(2)
    @pytest.mark.hint("gradients reach the router through the softmax weights p[t, e] of the chosen experts")
    @GRADER_SETTINGS
    @given(shape=moe_shapes(), seed=seeds)
    def test_gradients(self, solution, reference, shape, seed):
        inputs = _moe_inputs(seed, shape["T"], shape["h"], shape["E"], shape["d"], requires_grad=True)
        out = solution.moe_forward(*inputs, shape["k"])[0]
        check_grads(
            out,
            reference.moe_forward(*inputs, shape["k"])[0],
            inputs,
            ("x", "router_weight", "w13", "w2"),
            seed,
            rtol=1e-4,
            atol=1e-6,
        )

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out (softmax, experts and sum in the inputs' dtype)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=moe_shapes(), seed=seeds)
    def test_float32(self, solution, reference, shape, seed):
        low, high = float32_copies(*_moe_inputs(seed, shape["T"], shape["h"], shape["E"], shape["d"]))
        probs = torch.sort(torch.softmax(high[0] @ high[1].T, dim=-1), dim=-1, descending=True).values
        assume(relative_gap(probs, shape["k"]) > 1e-4)  # no near-tie at the top-k boundary: float32 picks the same
        result = solution.moe_forward(*low, shape["k"])
        _check_moe_output(result, shape["T"], shape["h"], torch.float32)
        out, aux = reference.moe_forward(*high, shape["k"])
        assert_close_dtype(result[0], out, "out of float32 inputs", torch.float32)
        assert_close(result[1].double(), aux.double(), "aux_loss of float32 inputs", rtol=1e-4, check_dtype=False)

    @pytest.mark.points(1)
    @pytest.mark.hint("check 1 <= top_k <= E before routing and raise ValueError naming top_k")
    def test_rejects_bad_top_k(self, solution):
        x, router, w13, w2 = _moe_inputs(0, 4, 3, 4, 2)
        for bad in (0, 5):
            with raises_naming("top_k"):
                solution.moe_forward(x, router, w13, w2, bad)


# --------------------------------------------------------------------------- 1.3 expected_distinct


@st.composite
def routing(draw):
    population = draw(st.integers(1, 5000))
    return population, draw(st.integers(1, min(population, 64))), draw(st.integers(1, 5000))


@pytest.mark.exercise("expected_distinct")
class TestExpectedDistinct:
    @pytest.mark.points(2)
    @pytest.mark.hint("population * (1 - (1 - per_token / population) ** B)")
    @GRADER_SETTINGS
    @given(args=routing())
    def test_matches_minimem(self, solution, reference, args):
        got = solution.expected_distinct(*args)
        want = reference.expected_distinct(*args)
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9):
            raise AssertionError(f"expected_distinct{args} = {got!r}, expected {want!r}")

    @pytest.mark.points(2)
    @pytest.mark.hint("simulate it: each token draws per_token distinct items uniformly; count the distinct ones")
    @GRADER_SETTINGS
    @given(E=st.integers(2, 64), data=st.data())
    def test_matches_simulation(self, solution, E, data):
        k, B = data.draw(st.integers(1, E), label="per_token"), data.draw(st.integers(1, 40), label="B")
        got = solution.expected_distinct(E, k, B)
        trials = 400
        g = torch.Generator().manual_seed(E * 1000 + k * 50 + B)
        picks = torch.rand(trials, B, E, generator=g).argsort(-1)[..., :k]  # k distinct items per token
        hit = torch.zeros(trials, E, dtype=torch.bool).scatter_(1, picks.reshape(trials, -1), True)
        counts = hit.sum(1).double()
        tolerance = 5 * float(counts.std()) / math.sqrt(trials) + 0.05
        if abs(got - float(counts.mean())) > tolerance:
            raise AssertionError(
                f"expected_distinct({E}, {k}, {B}) = {got:.4g}, but {trials} simulated batches touch "
                f"{float(counts.mean()):.4g} items on average"
            )

    @pytest.mark.points(1)
    @pytest.mark.hint("one token reads per_token items; a huge batch reads the whole population")
    def test_limits(self, solution):
        assert math.isclose(solution.expected_distinct(64, 8, 1), 8.0), "B = 1 must give per_token"
        assert math.isclose(solution.expected_distinct(64, 8, 10_000), 64.0), "a huge B must give the population"
        assert math.isclose(solution.expected_distinct(64, 64, 3), 64.0), "per_token = population reads everything"

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming per_token when it exceeds the population")
    def test_rejects_too_many_per_token(self, solution):
        with raises_naming("per_token"):
            solution.expected_distinct(8, 9, 10)


# --------------------------------------------------------------------------- 1.4 moe_bytes_per_token


@st.composite
def moe_sizes(draw):
    E = draw(st.integers(1, 64))
    return dict(
        n_experts=E,
        top_k=draw(st.integers(1, E)),
        h=2 * draw(st.integers(1, 16)),
        d_expert=draw(st.integers(1, 32)),
        batch_tokens=draw(st.integers(1, 4096)),
        dtype_bytes=draw(st.sampled_from([1, 2, 4])),
    )


@pytest.mark.exercise("moe_bytes_per_token")
class TestMoEBytesPerToken:
    @pytest.mark.points(2)
    @pytest.mark.hint("expected distinct experts * (3 h d parameters) * dtype_bytes, divided by the B tokens")
    @settings(GRADER_SETTINGS, max_examples=5)
    @given(sizes=moe_sizes())
    def test_matches_minimem(self, solution, reference, sizes):
        got = solution.moe_bytes_per_token(**sizes)
        want = reference.moe_bytes_per_token(**sizes)
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-9):
            raise AssertionError(f"moe_bytes_per_token({sizes}) = {got!r}, expected {want!r}")

    @pytest.mark.points(1)
    @pytest.mark.hint("one token reads its top_k experts: top_k * 3 h d * dtype_bytes")
    def test_single_token_reads_its_experts(self, solution):
        got = solution.moe_bytes_per_token(64, 8, 128, 32, 1, dtype_bytes=2)
        want = 8 * 3 * 128 * 32 * 2
        if not math.isclose(got, want, rel_tol=1e-12):
            raise AssertionError(f"one token of top-8 experts (h=128, d=32, 2 bytes) reads {want} bytes, got {got!r}")

    @pytest.mark.points(1)
    @pytest.mark.hint("every expert of the parameters of a real minimem MoE (3 h d each) once the batch is large")
    def test_large_batch_reads_every_expert_of_a_real_moe(self, solution):
        from minimem.config import MoEConfig
        from minimem.ffn import MoE

        moe = MoE(16, MoEConfig(n_experts=8, top_k=2, d_expert=6))
        expert_params = moe.w13.numel() + moe.w2.numel()
        got = solution.moe_bytes_per_token(8, 2, 16, 6, 100_000)
        if not math.isclose(got * 100_000, expert_params * 4, rel_tol=1e-9):
            raise AssertionError(
                f"100000 tokens read all {expert_params} expert parameters (4 bytes each) once: "
                f"{expert_params * 4 / 100_000} bytes per token, got {got!r}"
            )


TestQuestions = questions_class(CHAPTER)
