"""Graders of chapter 4 (exercises/ch4_peer.py): PEER's singleton experts and the PEER layer."""

from __future__ import annotations

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
    check_work_growth,
    float32_copies,
    raises_naming,
    randn,
    relative_gap,
    seeds,
)

CHAPTER = 4
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "silu": F.silu, "none": lambda z: z}
activations = st.sampled_from(sorted(ACTIVATIONS))


# --------------------------------------------------------------------------- 4.1 peer_experts


@st.composite
def expert_shapes(draw):
    n = draw(st.integers(1, 5))
    return dict(T=draw(st.integers(1, 5)), h=2 * draw(st.integers(1, 4)), n=n, k=draw(st.integers(1, n)))


def _expert_inputs(seed, T, h, n, k, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = randn(g, T, h, requires_grad=requires_grad)
    indices = torch.randint(0, n * n, (T, k), generator=g)
    weights = randn(g, T, k, requires_grad=requires_grad)
    down, up = randn(g, n * n, h, requires_grad=requires_grad), randn(g, n * n, h, requires_grad=requires_grad)
    return x, indices, weights, down, up


def experts_loop(x, indices, weights, down, up, activation):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for i, e in enumerate(indices[t].tolist()):
            out[t] += weights[t, i] * ACTIVATIONS[activation](down[e] @ x[t]) * up[e]
    return out


@pytest.mark.exercise("peer_experts")
class TestPEERExperts:
    @pytest.mark.points(3)
    @pytest.mark.hint("gather down[indices] (T, k, h), dot with x, activation, times weights, then sum of up rows")
    @GRADER_SETTINGS
    @given(shape=expert_shapes(), activation=activations, seed=seeds)
    def test_matches_expert_loop(self, solution, shape, activation, seed):
        inputs = _expert_inputs(seed, **shape)
        out = solution.peer_experts(*inputs, activation)
        check_tensor(out, "out", (shape["T"], shape["h"]), torch.float64)
        assert_close(out, experts_loop(*inputs, activation), f"out ({activation})", rtol=1e-6, atol=1e-8)

    @pytest.mark.points(1)
    @pytest.mark.hint("the same output as minimem.peer.PEER's expert half")
    @GRADER_SETTINGS
    @given(shape=expert_shapes(), activation=activations, seed=seeds)
    def test_matches_minimem(self, solution, reference, shape, activation, seed):
        inputs = _expert_inputs(seed, **shape)
        out = solution.peer_experts(*inputs, activation)
        assert_close(out, reference.peer_experts(*inputs, activation), f"out ({activation})", rtol=1e-6, atol=1e-8)

    @pytest.mark.points(2)
    @pytest.mark.hint("keep every step a differentiable torch operation")
    @GRADER_SETTINGS
    @given(shape=expert_shapes(), activation=activations, seed=seeds)
    def test_gradients(self, solution, reference, shape, activation, seed):
        x, indices, weights, down, up = _expert_inputs(seed, **shape, requires_grad=True)
        out = solution.peer_experts(x, indices, weights, down, up, activation)
        expected = reference.peer_experts(x, indices, weights, down, up, activation)
        check_grads(out, expected, (x, weights, down, up), ("x", "weights", "down", "up"), seed)

    @pytest.mark.points(1)
    @pytest.mark.hint(
        "gather the k chosen rows; x @ down.T scores all N experts (whole or in chunks), which PEER must never do"
    )
    def test_reads_only_the_chosen_experts(self, solution):
        def run(n):  # N = n^2 experts, the same 4 tokens with 8 chosen experts each
            x, indices, weights, down, up = _expert_inputs(3, 4, 8, n, 8)
            return solution.peer_experts(x, indices, weights, down, up, "gelu")

        check_work_growth(run, 16, 128, 4, "N (experts)", "k gathered experts per token: no growth with N")
        x, indices, weights, down, up = _expert_inputs(3, 4, 8, 64, 8)  # N = 4096 experts
        out = solution.peer_experts(x, indices, weights, down, up, "gelu")
        assert_close(out, experts_loop(x, indices, weights, down, up, "gelu"), "out", rtol=1e-6, atol=1e-8)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out (gathers, activation and sum in the inputs' dtype)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=expert_shapes(), activation=activations, seed=seeds)
    def test_float32(self, solution, shape, activation, seed):
        x, indices, weights, down, up = _expert_inputs(seed, **shape)
        (x, weights, down, up), (x64, w64, d64, u64) = float32_copies(x, weights, down, up)
        out = solution.peer_experts(x, indices, weights, down, up, activation)
        want = experts_loop(x64, indices, w64, d64, u64, activation)
        assert_close_dtype(out, want, f"out of float32 inputs ({activation})", torch.float32)

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming activation and listing gelu, relu, sigmoid, silu and none")
    def test_rejects_unknown_activation(self, solution):
        inputs = _expert_inputs(0, 2, 4, 2, 2)
        with raises_naming("activation", also=tuple(ACTIVATIONS)):
            solution.peer_experts(*inputs, "tanh")


# --------------------------------------------------------------------------- 4.2 peer_forward


@st.composite
def peer_shapes(draw):
    n = draw(st.integers(1, 5))
    return dict(
        T=draw(st.integers(1, 4)),
        h=2 * draw(st.integers(1, 4)),
        H=draw(st.integers(1, 3)),
        n=n,
        d_key=2 * draw(st.integers(1, 3)),
        m=draw(st.integers(1, n)),
    )


def _peer_inputs(seed, T, h, H, n, d_key, m, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = ((T, h), (H, d_key, h), (H, n, d_key // 2), (H, n, d_key // 2), (n * n, h), (n * n, h))
    return [randn(g, *s, requires_grad=requires_grad) for s in shapes]


def peer_loop(x, w_query, keys1, keys2, down, up, m, activation):
    """All slots of every head scored, top-m by sorting, softmax, then the experts one by one."""
    H, D, _ = w_query.shape
    n = keys1.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(H):
            q = F.layer_norm(w_query[k] @ x[t], (D,), eps=1e-5)
            slot_scores = torch.stack(
                [q[: D // 2] @ keys1[k, i] + q[D // 2 :] @ keys2[k, j] for i in range(n) for j in range(n)]
            )
            top = torch.sort(slot_scores, descending=True)
            for w, e in zip(torch.softmax(top.values[:m], dim=0), top.indices[:m].tolist()):
                out[t] += w * ACTIVATIONS[activation](down[e] @ x[t]) * up[e]
    return out


def _routing_gap(x, w_query, keys1, keys2, m):
    """The smallest relative gap, over tokens and heads, between the m-th and (m+1)-th slot score."""
    D = w_query.shape[1]
    q = F.layer_norm(torch.einsum("kdh,th->tkd", w_query, x), (D,), eps=1e-5)
    s1 = torch.einsum("tkd,knd->tkn", q[..., : D // 2], keys1)
    s2 = torch.einsum("tkd,knd->tkn", q[..., D // 2 :], keys2)
    return relative_gap(torch.sort((s1[..., :, None] + s2[..., None, :]).flatten(2), -1, descending=True).values, m)


@pytest.mark.exercise("peer_forward")
class TestPEERForward:
    @pytest.mark.points(3)
    @pytest.mark.hint("PKM's router (layernorm query, product-key top-m, softmax) feeding exercise 4.1's experts")
    @GRADER_SETTINGS
    @given(shape=peer_shapes(), activation=activations, seed=seeds)
    def test_matches_all_slot_loop(self, solution, shape, activation, seed):
        inputs = _peer_inputs(seed, **shape)
        out = solution.peer_forward(*inputs, shape["m"], activation)
        check_tensor(out, "out", (shape["T"], shape["h"]), torch.float64)
        assert_close(out, peer_loop(*inputs, shape["m"], activation), f"out ({activation})", rtol=1e-5, atol=1e-6)

    @pytest.mark.points(1)
    @pytest.mark.hint("the default activation is gelu, as in [PEER]")
    @GRADER_SETTINGS
    @given(shape=peer_shapes(), seed=seeds)
    def test_matches_minimem_with_default_activation(self, solution, reference, shape, seed):
        inputs = _peer_inputs(seed, **shape)
        out = solution.peer_forward(*inputs, shape["m"])
        assert_close(out, reference.peer_forward(*inputs, shape["m"]), "out", rtol=1e-5, atol=1e-6)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out; and an unknown activation is a ValueError naming the allowed ones")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=peer_shapes(), activation=activations, seed=seeds)
    def test_float32_and_bad_activation(self, solution, shape, activation, seed):
        low, high = float32_copies(*_peer_inputs(seed, **shape))
        assume(_routing_gap(*high[:4], shape["m"]) > 1e-4)  # float32 routes like float64
        out = solution.peer_forward(*low, shape["m"], activation)
        assert_close_dtype(out, peer_loop(*high, shape["m"], activation), "out of float32 inputs", torch.float32)
        with raises_naming("activation", also=tuple(ACTIVATIONS)):
            solution.peer_forward(*low, shape["m"], "tanh")

    @pytest.mark.points(2)
    @pytest.mark.hint("gradients reach the queries and keys through the softmax, and the experts' vectors directly")
    @GRADER_SETTINGS
    @given(shape=peer_shapes(), activation=activations, seed=seeds)
    def test_gradients(self, solution, reference, shape, activation, seed):
        inputs = _peer_inputs(seed, **shape, requires_grad=True)
        out = solution.peer_forward(*inputs, shape["m"], activation)
        check_grads(
            out,
            reference.peer_forward(*inputs, shape["m"], activation),
            inputs,
            ("x", "w_query", "keys1", "keys2", "down", "up"),
            seed,
            rtol=1e-5,
            atol=1e-6,
        )


TestQuestions = questions_class(CHAPTER)
