"""Graders of chapter 3 (exercises/ch3_pkm.py): usage metrics, query normalisation, the PKM forward."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exercises.graders.answer_keys import questions_class
from exercises.graders.helpers import (
    DTYPE_TOLERANCE,
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

CHAPTER = 3


def kl_loop(z: list) -> float:
    """log N + sum p log p, one slot at a time."""
    total = sum(z)
    return math.log(len(z)) + sum(v / total * math.log(v / total) for v in z if v > 0)


def _close(got, want, name, rel=1e-9, abs_=1e-12):
    if not isinstance(got, float) or not math.isclose(got, want, rel_tol=rel, abs_tol=abs_):
        raise AssertionError(f"{name} = {got!r}, expected {want!r}")


# --------------------------------------------------------------------------- 3.1 kl_from_uniform


@st.composite
def slot_counts(draw):
    n = draw(st.integers(1, 40))
    z = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n).filter(lambda v: sum(v) > 0))
    return torch.tensor(z, dtype=torch.float64)


@pytest.mark.exercise("kl_from_uniform")
class TestKLFromUniform:
    @pytest.mark.points(2)
    @pytest.mark.hint("p = z / z.sum(); KL = log N + sum of p log p over the slots with p > 0")
    @GRADER_SETTINGS
    @given(z=slot_counts())
    def test_matches_slot_loop(self, solution, z):
        _close(solution.kl_from_uniform(z), kl_loop(z.tolist()), f"kl_from_uniform({z.tolist()})")

    @pytest.mark.points(1)
    @pytest.mark.hint("uniform use gives 0; all mass on one slot gives log N")
    def test_limits(self, solution):
        _close(solution.kl_from_uniform(torch.full((16,), 3.0, dtype=torch.float64)), 0.0, "KL of uniform counts")
        one_hot = torch.zeros(16, dtype=torch.float64)
        one_hot[5] = 2.0
        _close(solution.kl_from_uniform(one_hot), math.log(16), "KL of one used slot")

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 and integer counts work too (a Python float either way)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(z=slot_counts())
    def test_float32_and_integer_counts(self, solution, z):
        want = kl_loop(z.tolist())
        tol = DTYPE_TOLERANCE[torch.float32] * max(abs(want), 1.0)  # float32 arithmetic is allowed here
        _close(solution.kl_from_uniform(z.float()), want, "kl_from_uniform of float32 counts", rel=tol, abs_=tol)
        _close(solution.kl_from_uniform(z.long()), want, "kl_from_uniform of int64 counts", rel=tol, abs_=tol)

    @pytest.mark.points(1)
    @pytest.mark.hint("the same value as minimem.metrics.kl_from_uniform on weight masses")
    @GRADER_SETTINGS
    @given(n=st.integers(1, 200), seed=seeds)
    def test_matches_minimem(self, solution, reference, n, seed):
        z = randn(seed, n).abs()
        _close(solution.kl_from_uniform(z), reference.kl_from_uniform(z), "kl_from_uniform")

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming z for a negative entry, an all-zero z, an empty or a 2-D z")
    def test_rejects_bad_counts(self, solution):
        for bad in (torch.tensor([1.0, -1.0, 2.0]), torch.zeros(4), torch.zeros(0), torch.ones(2, 3)):
            with raises_naming("z"):
                solution.kl_from_uniform(bad)


# --------------------------------------------------------------------------- 3.2 usage_metrics


@st.composite
def retrievals(draw):
    n_slots = draw(st.integers(1, 30))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    return n_slots, shape, draw(seeds)


def _retrieval_tensors(n_slots, shape, seed):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_slots, shape, generator=g)
    weights = torch.rand(shape, generator=g, dtype=torch.float64)
    weights[torch.rand(shape, generator=g) < 0.3] = 0.0  # some selections get no weight ...
    weights.view(-1)[0] = 0.5  # ... but not all of them
    return indices, weights


def _check_metrics(got, want, name):
    if not isinstance(got, dict) or set(got) != set(want):
        raise AssertionError(f"{name} must be a dict with keys {sorted(want)}, got {got!r}")
    for key in want:
        _close(got[key], want[key], f"{name}[{key!r}]")


@pytest.mark.exercise("usage_metrics")
class TestUsageMetrics:
    @pytest.mark.points(3)
    @pytest.mark.hint("hits: bincount of indices; mass: index_add of weights; usage counts slots with mass > 0")
    @GRADER_SETTINGS
    @given(case=retrievals())
    def test_matches_counting_loop(self, solution, case):
        n_slots, shape, seed = case
        indices, weights = _retrieval_tensors(n_slots, shape, seed)
        got = solution.usage_metrics(indices, n_slots, weights)
        hits, mass = [0] * n_slots, [0.0] * n_slots
        for i, w in zip(indices.flatten().tolist(), weights.flatten().tolist()):
            hits[i] += 1
            mass[i] += w
        want = {
            "usage": sum(v > 0 for v in mass) / n_slots,
            "kl_unweighted": kl_loop(hits),
            "kl_weighted": kl_loop(mass),
        }
        _check_metrics(got, want, "usage_metrics(indices, n_slots, weights)")
        unweighted = solution.usage_metrics(indices, n_slots)
        _check_metrics(
            unweighted,
            {"usage": sum(v > 0 for v in hits) / n_slots, "kl_unweighted": kl_loop(hits)},
            "usage_metrics(indices, n_slots)",
        )

    @pytest.mark.points(1)
    @pytest.mark.hint("the same dict as minimem.metrics.usage_metrics")
    @GRADER_SETTINGS
    @given(case=retrievals())
    def test_matches_minimem(self, solution, reference, case):
        n_slots, shape, seed = case
        indices, weights = _retrieval_tensors(n_slots, shape, seed)
        weights = weights + 0.01  # every selection carries weight
        _check_metrics(
            solution.usage_metrics(indices, n_slots, weights),
            reference.usage_metrics(indices, n_slots, weights),
            "usage_metrics",
        )

    @pytest.mark.points(2)
    @pytest.mark.hint(
        "check every argument: indices int64 in [0, n_slots), n_slots >= 1, weights of indices' shape and >= 0"
    )
    def test_rejects_bad_input(self, solution):
        indices = torch.tensor([[0, 3], [2, 2]])
        good_weights = torch.tensor([[0.5, 0.1], [0.2, 0.2]], dtype=torch.float64)
        cases = [
            ("indices", (indices, 3, None)),  # 3 is not < n_slots
            ("indices", (indices - 1, 4, None)),  # -1
            ("indices", (indices.double(), 4, None)),  # not int64
            ("n_slots", (indices, 0, None)),
            ("weights", (indices, 4, torch.tensor([[0.5, -0.1], [0.2, 0.2]], dtype=torch.float64))),
            ("weights", (indices, 4, good_weights[:, :1])),  # another shape
        ]
        for name, args in cases:
            with raises_naming(name):
                solution.usage_metrics(*args)


# --------------------------------------------------------------------------- 3.3 pkm_queries


@st.composite
def query_shapes(draw):
    return dict(
        T=draw(st.integers(2, 6)),
        h=2 * draw(st.integers(1, 3)),
        H=draw(st.integers(1, 3)),
        d_key=2 * draw(st.integers(1, 4)),
    )


def _query_inputs(seed, T, h, H, d_key, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return randn(g, T, h, requires_grad=requires_grad), randn(g, H, d_key, h, requires_grad=requires_grad)


def _raw_queries(x, w_query):
    return torch.einsum("kdh,th->tkd", w_query, x)


@pytest.mark.exercise("pkm_queries")
class TestPKMQueries:
    @pytest.mark.points(2)
    @pytest.mark.hint("layernorm normalises over D_k (last axis), batchnorm over the T tokens (first axis)")
    @GRADER_SETTINGS
    @given(shape=query_shapes(), norm=st.sampled_from(["layernorm", "batchnorm", "none"]), seed=seeds)
    def test_matches_minimem(self, solution, reference, shape, norm, seed):
        x, w_query = _query_inputs(seed, **shape)
        q = solution.pkm_queries(x, w_query, norm)
        check_tensor(q, "queries", (shape["T"], shape["H"], shape["d_key"]), x.dtype)
        assert_close(q, reference.pkm_queries(x, w_query, norm), f"{norm} queries", rtol=1e-6, atol=1e-7)

    @pytest.mark.points(2)
    @pytest.mark.hint("(q - mean) / sqrt(biased variance + 1e-5): over D_k for layernorm, over tokens for batchnorm")
    @GRADER_SETTINGS
    @given(shape=query_shapes(), seed=seeds)
    def test_normalisation_formulas(self, solution, shape, seed):
        x, w_query = _query_inputs(seed, **shape)
        layer = solution.pkm_queries(x, w_query, "layernorm")
        batch = solution.pkm_queries(x, w_query, "batchnorm")
        raw = _raw_queries(x, w_query)
        want_layer = torch.empty_like(raw)
        want_batch = torch.empty_like(raw)
        T, H, D = raw.shape
        for t in range(T):
            for k in range(H):
                v = raw[t, k]
                want_layer[t, k] = (v - v.mean()) / math.sqrt(float(((v - v.mean()) ** 2).mean()) + 1e-5)
        for k in range(H):
            for d in range(D):
                v = raw[:, k, d]
                want_batch[:, k, d] = (v - v.mean()) / math.sqrt(float(((v - v.mean()) ** 2).mean()) + 1e-5)
        assert_close(layer, want_layer, "layernorm queries", rtol=1e-6, atol=1e-7)
        assert_close(batch, want_batch, "batchnorm queries", rtol=1e-6, atol=1e-7)

    @pytest.mark.points(1)
    @pytest.mark.hint("batchnorm statistics come from every token of the batch, later ones included")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(seed=seeds)
    def test_batchnorm_mixes_tokens_layernorm_does_not(self, solution, seed):
        x, w_query = _query_inputs(seed, 6, 4, 2, 4)
        changed = x.clone()
        changed[-1] += 3.0  # only the last (future) token differs
        for norm, should_change in (("batchnorm", True), ("layernorm", False)):
            first_before = solution.pkm_queries(x, w_query, norm)[0]
            first_after = solution.pkm_queries(changed, w_query, norm)[0]
            moved = not torch.allclose(first_before, first_after, rtol=1e-9, atol=1e-9)
            if moved != should_change:
                raise AssertionError(
                    f"with {norm}, changing the last token {'must' if should_change else 'must not'} change the "
                    "first token's query"
                )

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out (the normalisation in the inputs' dtype)")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=query_shapes(), norm=st.sampled_from(["layernorm", "batchnorm", "none"]), seed=seeds)
    def test_float32(self, solution, reference, shape, norm, seed):
        low, high = float32_copies(*_query_inputs(seed, **shape))
        q = solution.pkm_queries(*low, norm)
        assert_close_dtype(q, reference.pkm_queries(*high, norm), f"{norm} queries of float32 inputs", torch.float32)

    @pytest.mark.points(1)
    @pytest.mark.hint(
        "raise ValueError naming norm and listing 'layernorm', 'batchnorm', 'none'; and naming x for batchnorm "
        "of one token"
    )
    def test_rejects_bad_arguments(self, solution):
        x, w_query = _query_inputs(0, 3, 4, 1, 2)
        with raises_naming("norm", also=("layernorm", "batchnorm", "none")):
            solution.pkm_queries(x, w_query, "rmsnorm")
        with raises_naming("x"):
            solution.pkm_queries(x[:1], w_query, "batchnorm")


# --------------------------------------------------------------------------- 3.4 pkm_forward


@st.composite
def pkm_shapes(draw):
    n = draw(st.integers(1, 5))
    return dict(
        T=draw(st.integers(1, 4)),
        h=2 * draw(st.integers(1, 4)),
        H=draw(st.integers(1, 3)),
        n=n,
        d_key=2 * draw(st.integers(1, 3)),
        m=draw(st.integers(1, n)),
    )


def _pkm_inputs(seed, T, h, H, n, d_key, m, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = ((T, h), (H, d_key, h), (H, n, d_key // 2), (H, n, d_key // 2), (n * n, h))
    return [randn(g, *s, requires_grad=requires_grad) for s in shapes]


def pkm_loop(x, w_query, keys1, keys2, values, m):
    """Every slot of every head scored, top-m by sorting, softmax, weighted sum."""
    H, D, _ = w_query.shape
    n = keys1.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(H):
            q = torch.nn.functional.layer_norm(w_query[k] @ x[t], (D,), eps=1e-5)
            slot_scores = torch.tensor(
                [float(q[: D // 2] @ keys1[k, i] + q[D // 2 :] @ keys2[k, j]) for i in range(n) for j in range(n)],
                dtype=x.dtype,
            )
            top = torch.sort(slot_scores, descending=True)
            weights = torch.softmax(top.values[:m], dim=0)
            for w, slot in zip(weights, top.indices[:m].tolist()):
                out[t] += w * values[slot]
    return out


def _retrieval_gap(x, w_query, keys1, keys2, values, m):
    """The smallest relative gap, over tokens and heads, between the m-th and (m+1)-th slot score."""
    H, D, _ = w_query.shape
    q = torch.nn.functional.layer_norm(torch.einsum("kdh,th->tkd", w_query, x), (D,), eps=1e-5)
    s1 = torch.einsum("tkd,knd->tkn", q[..., : D // 2], keys1)
    s2 = torch.einsum("tkd,knd->tkn", q[..., D // 2 :], keys2)
    slots = torch.sort((s1[..., :, None] + s2[..., None, :]).flatten(2), dim=-1, descending=True).values
    return relative_gap(slots, m)


@pytest.mark.exercise("pkm_forward")
class TestPKMForward:
    @pytest.mark.points(3)
    @pytest.mark.hint("per head: layernorm query, product-key top-m, softmax over the m scores; sum the heads")
    @GRADER_SETTINGS
    @given(shape=pkm_shapes(), seed=seeds)
    def test_matches_all_slot_loop(self, solution, shape, seed):
        inputs = _pkm_inputs(seed, **shape)
        out = solution.pkm_forward(*inputs, shape["m"])
        check_tensor(out, "out", (shape["T"], shape["h"]), torch.float64)
        assert_close(out, pkm_loop(*inputs, shape["m"]), "out", rtol=1e-5, atol=1e-6)

    @pytest.mark.points(2)
    @pytest.mark.hint("the same output as minimem.pkm.PKM with these weights")
    @GRADER_SETTINGS
    @given(shape=pkm_shapes(), seed=seeds)
    def test_matches_minimem(self, solution, reference, shape, seed):
        inputs = _pkm_inputs(seed, **shape)
        out = solution.pkm_forward(*inputs, shape["m"])
        assert_close(out, reference.pkm_forward(*inputs, shape["m"]), "out", rtol=1e-5, atol=1e-6)

    @pytest.mark.points(1)
    @pytest.mark.hint("float32 in, float32 out: queries, retrieval, softmax and the sum in the inputs' dtype")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(shape=pkm_shapes(), seed=seeds)
    def test_float32(self, solution, shape, seed):
        low, high = float32_copies(*_pkm_inputs(seed, **shape))
        assume(_retrieval_gap(*high, shape["m"]) > 1e-4)  # float32 selects the same slots as float64
        out = solution.pkm_forward(*low, shape["m"])
        assert_close_dtype(out, pkm_loop(*high, shape["m"]), "out of float32 inputs", torch.float32)

    @pytest.mark.points(2)
    @pytest.mark.hint("gradients flow through the softmax weights into queries and keys, and into the value rows")
    @GRADER_SETTINGS
    @given(shape=pkm_shapes(), seed=seeds)
    def test_gradients(self, solution, reference, shape, seed):
        inputs = _pkm_inputs(seed, **shape, requires_grad=True)
        out = solution.pkm_forward(*inputs, shape["m"])
        check_grads(
            out,
            reference.pkm_forward(*inputs, shape["m"]),
            inputs,
            ("x", "w_query", "keys1", "keys2", "values"),
            seed,
            rtol=1e-5,
            atol=1e-6,
        )


TestQuestions = questions_class(CHAPTER)
