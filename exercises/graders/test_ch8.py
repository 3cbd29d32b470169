"""Graders of chapter 8 (exercises/ch8_head_to_head.py): the verdict rule and parameter parity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exercises.graders.answer_keys import questions_class
from exercises.graders.helpers import GRADER_SETTINGS, raises_naming

CHAPTER = 8
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")


# --------------------------------------------------------------------------- 8.1 verdict


def verdict_loop(a: list, b: list, lower: bool) -> str:
    """The rule, step by step: finite values, n >= 2, gain against 2 standard errors of the difference."""
    stats = []
    for values in (a, b):
        xs = [float(v) for v in values if math.isfinite(float(v))]
        if not xs:
            return "not run"
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        stats.append((mean, var, len(xs)))
    if min(stats[0][2], stats[1][2]) < 2:
        return "inconclusive"
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = stats
    gain = mean_b - mean_a if lower else mean_a - mean_b
    bar = 2 * math.sqrt(var_a / n_a + var_b / n_b)
    if gain > bar:
        return "reproduced"
    if -gain > bar:
        return "not reproduced"
    return "inconclusive"


def _margin(a: list, b: list) -> float:
    """|gain| - 2 SE relative to the scale: near 0 a last-bit difference may flip the verdict."""
    xa = [v for v in a if math.isfinite(v)]
    xb = [v for v in b if math.isfinite(v)]
    if len(xa) < 2 or len(xb) < 2:
        return math.inf
    ma, mb = sum(xa) / len(xa), sum(xb) / len(xb)
    va = sum((x - ma) ** 2 for x in xa) / (len(xa) - 1)
    vb = sum((x - mb) ** 2 for x in xb) / (len(xb) - 1)
    se = math.sqrt(va / len(xa) + vb / len(xb))
    return abs(abs(mb - ma) - 2 * se) / max(abs(ma), abs(mb), se, 1e-12)


seed_values = st.lists(
    st.one_of(st.floats(-5, 5, allow_nan=False), st.sampled_from([math.nan, math.inf])), min_size=0, max_size=6
)


@st.composite
def close_arms(draw):
    """Two arms whose means differ by about their spread: the interesting cases."""
    n_a, n_b = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    center, shift, noise = draw(st.floats(1, 3)), draw(st.floats(-0.1, 0.1)), draw(st.floats(0.001, 0.1))
    a = [center + noise * draw(st.floats(-2, 2)) for _ in range(n_a)]
    b = [center + shift + noise * draw(st.floats(-2, 2)) for _ in range(n_b)]
    return a, b


def _check_verdict(got, want, args):
    if got not in VERDICTS:
        raise AssertionError(f"verdict must be one of {VERDICTS}, got {got!r}")
    if got != want:
        raise AssertionError(f"verdict{args} = {got!r}, expected {want!r}")


@pytest.mark.exercise("verdict")
class TestVerdict:
    @pytest.mark.points(3)
    @pytest.mark.hint("gain = mean_b - mean_a for a loss; reproduced when gain > 2 sqrt(s_a^2/n_a + s_b^2/n_b)")
    @GRADER_SETTINGS
    @given(arms=close_arms(), lower=st.booleans())
    def test_matches_rule(self, solution, arms, lower):
        a, b = arms
        assume(_margin(a, b) > 1e-9)
        _check_verdict(solution.verdict(a, b, lower), verdict_loop(a, b, lower), (a, b, lower))

    @pytest.mark.points(2)
    @pytest.mark.hint("leave out NaN and inf first; no finite value: 'not run'; one: 'inconclusive'")
    @GRADER_SETTINGS
    @given(a=seed_values, b=seed_values, lower=st.booleans())
    def test_non_finite_and_few_seeds(self, solution, a, b, lower):
        assume(_margin(a, b) > 1e-9)
        _check_verdict(solution.verdict(a, b, lower), verdict_loop(a, b, lower), (a, b, lower))

    @pytest.mark.points(1)
    @pytest.mark.hint("the same verdict as minimem_tools.experiments.claims.better, on lists and 1-D tensors")
    @settings(GRADER_SETTINGS, max_examples=6)
    @given(arms=close_arms(), lower=st.booleans())
    def test_matches_minimem(self, solution, reference, arms, lower):
        a, b = arms
        assume(_margin(a, b) > 1e-9)
        want = reference.verdict(a, b, lower)
        _check_verdict(solution.verdict(tuple(a), torch.tensor(b, dtype=torch.float64), lower), want, (a, b, lower))

    @pytest.mark.points(1)
    @pytest.mark.hint("higher is better when lower=False: the gain changes sign")
    def test_worked_examples(self, solution):
        loss_a, loss_b = [2.10, 2.12, 2.08, 2.11, 2.09], [2.16, 2.14, 2.15, 2.17, 2.13]
        cases = [
            ((loss_a, loss_b, True), "reproduced"),
            ((loss_b, loss_a, True), "not reproduced"),
            ((loss_a, loss_b, False), "not reproduced"),
            ((loss_a[:1], loss_b, True), "inconclusive"),
            (([math.nan, math.nan], loss_b, True), "not run"),
            ((loss_a, loss_a, True), "inconclusive"),
        ]
        for args, want in cases:
            _check_verdict(solution.verdict(*args), want, args)

    @pytest.mark.points(1)
    @pytest.mark.hint(
        "the bar is exactly 2 SE (not 1.96), with the sample variance (ddof = 1, not the population's): "
        "statistics.stdev, torch.std(correction=1) or np.std(ddof=1)"
    )
    def test_just_inside_and_outside_the_bar(self, solution):
        # a = [0, 1] and b = a + gain: s^2 = 1/2 each, SE = sqrt(1/4 + 1/4) = 0.7071, 2 SE = 1.4142,
        # 1.96 SE = 1.3859; with the population variance (1/4) 2 SE would be 1.0.
        # Each gain below sits between two of those bars, well away from each (no rounding decides it).
        cases = [
            (1.2, "inconclusive"),  # > 2 SE with ddof = 0, < 2 SE with ddof = 1
            (1.40, "inconclusive"),  # > 1.96 SE, < 2 SE
            (1.45, "reproduced"),  # > 2 SE
            (0.9, "inconclusive"),
        ]
        base = [0.0, 1.0]
        for gain, want in cases:
            shifted = [v + gain for v in base]
            for args, expected in (
                ((base, shifted, True), want),  # A's loss is lower by gain
                ((shifted, base, False), want),  # A's accuracy is higher by gain
                ((shifted, base, True), want.replace("reproduced", "not reproduced")),  # A is worse by gain
            ):
                assert verdict_loop(*args) == expected, (args, expected)  # the cases themselves are right
                _check_verdict(solution.verdict(*args), expected, args)
        # unequal seed counts: a = [0, 1, 2] (s^2 = 1, n = 3), b = [g, g + 2] (s^2 = 2, n = 2): 2 SE = 2.3094
        for gain, want in ((2.25, "inconclusive"), (2.36, "reproduced")):
            args = ([0.0, 1.0, 2.0], [gain, gain + 2.0], True)
            assert verdict_loop(*args) == want, (args, want)
            _check_verdict(solution.verdict(*args), want, args)

    @pytest.mark.points(1)
    @pytest.mark.hint("raise ValueError naming a or b for a non-sequence or a non-number, lower for a non-bool")
    def test_rejects_bad_arguments(self, solution):
        good = [1.0, 2.0, 3.0]
        cases = [
            ("a", ("1.0, 2.0", good, True)),
            ("b", (good, [1.0, "2.0"], True)),
            ("a", (torch.ones(2, 3), good, True)),
            ("b", (good, 3.5, True)),
            ("lower", (good, good, "yes")),
        ]
        for name, args in cases:
            with raises_naming(name):
                solution.verdict(*args)


# --------------------------------------------------------------------------- 8.2 layer_parameters


@st.composite
def layer_sizes(draw):
    n_keys = draw(st.integers(1, 64))
    return dict(
        kind=draw(st.sampled_from(["pkm", "peer"])),
        h=2 * draw(st.integers(1, 64)),
        n_keys=n_keys,
        heads=draw(st.integers(1, 4)),
        d_key=2 * draw(st.integers(1, 32)),
        topk=draw(st.integers(1, n_keys)),
        query_norm=draw(st.sampled_from(["layernorm", "batchnorm", "none"])),
    )


def parameters_formula(kind, h, n_keys, heads, d_key, topk, query_norm):
    norm = {"layernorm": 2 * d_key, "batchnorm": 2 * heads * d_key, "none": 0}[query_norm]
    router = h * heads * d_key + norm + heads * n_keys * d_key
    row = h if kind == "pkm" else 2 * h
    return {"total": router + n_keys * n_keys * row, "activated": router + heads * topk * row}


def _check_counts(got, want, sizes):
    if not isinstance(got, dict) or set(got) != {"total", "activated"}:
        raise AssertionError(f"layer_parameters must return a dict with keys 'total' and 'activated', got {got!r}")
    for key in ("total", "activated"):
        if not isinstance(got[key], int) or isinstance(got[key], bool):
            raise AssertionError(f"layer_parameters(...)[{key!r}] must be an int, got {got[key]!r}")
    if got != want:
        raise AssertionError(f"layer_parameters({sizes}) = {got}, expected {want}")


@pytest.mark.exercise("layer_parameters")
class TestLayerParameters:
    @pytest.mark.points(3)
    @pytest.mark.hint("router h H D_k + norm + H n D_k; table N h (PKM) or 2 N h (PEER); a token reads H m rows")
    @GRADER_SETTINGS
    @given(sizes=layer_sizes())
    def test_matches_formula(self, solution, sizes):
        _check_counts(solution.layer_parameters(**sizes), parameters_formula(**sizes), sizes)

    @pytest.mark.points(1)
    @pytest.mark.hint("the same counts as minimem.accounting for a one-block model with this memory")
    @settings(GRADER_SETTINGS, max_examples=4)
    @given(sizes=layer_sizes())
    def test_matches_minimem(self, solution, reference, sizes):
        _check_counts(solution.layer_parameters(**sizes), reference.layer_parameters(**sizes), sizes)

    @pytest.mark.points(1)
    @pytest.mark.hint("check every argument and raise ValueError naming it (kind, h, n_keys, heads, d_key, topk, ...)")
    def test_rejects_bad_arguments(self, solution):
        good = dict(kind="pkm", h=16, n_keys=8, heads=2, d_key=8, topk=4, query_norm="layernorm")
        cases = [
            ("kind", {"kind": "moe"}, ("pkm", "peer")),
            ("h", {"h": 0}, ()),
            ("n_keys", {"n_keys": 0}, ()),
            ("heads", {"heads": 0}, ()),
            ("d_key", {"d_key": 7}, ()),
            ("d_key", {"d_key": 0}, ()),
            ("topk", {"topk": 0}, ()),
            ("topk", {"topk": 9}, ()),
            ("query_norm", {"query_norm": "rmsnorm"}, ("layernorm", "batchnorm", "none")),
        ]
        for name, change, listed in cases:
            with raises_naming(name, also=listed):
                solution.layer_parameters(**{**good, **change})


TestQuestions = questions_class(CHAPTER)
