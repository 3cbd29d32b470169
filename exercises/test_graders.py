"""CI meta-tests of the exercise graders (run by ``make test``).

- minimem's own implementation (``--reference``) scores 100%;
- the untouched stubs score 0, every grader failing with NotImplementedError (a negative
  control: a grader that passes on a stub, or fails to import, is a defect),
  both graded as ``minimem grade`` grades, one child process per chapter (``run_isolated``;
  tests/test_grading_isolation.py checks that hostile stubs cannot fool it);
- deliberately wrong solutions (an off-by-one in top-m, a missing softmax, a transposed slice,
  a wrong sign, ...) each lose points on their exercise (graded in this process by
  ``run_graders``, which takes solution objects);
- a hanging solution is failed by the time limit, inside hypothesis too;
- the stubs, graders and reference cover each other.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import exercises
from exercises.reference import REFERENCES, namespace
from minimem_tools import grading

EXERCISES = Path(__file__).resolve().parent


def stub_functions(chapter_module: str) -> list[str]:
    """Public functions defined in a stub module, in file order."""
    tree = ast.parse((EXERCISES / f"{chapter_module}.py").read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]


class Patched:
    """minimem's reference for one chapter, with some exercises replaced by (wrong) solutions."""

    def __init__(self, chapter_module: str, **replacements):
        self._reference = namespace(chapter_module)
        self._replacements = replacements

    def __getattr__(self, name):
        if name in self._replacements:
            return self._replacements[name]
        return getattr(self._reference, name)


# --------------------------------------------------------------------------- reference and stubs


@pytest.fixture(scope="module")
def reference_report():
    return grading.run_isolated(solutions=grading.REFERENCE)


def test_reference_scores_full_marks(reference_report):
    report = reference_report
    assert not report.errors, f"grader files failed to load: {report.errors}"
    assert not report.ungraded, f"chapters without a trustworthy report: {report.ungraded}"
    failing = [f"{t.name}: {t.error}: {t.message}" for t in report.tests if not t.passed]
    assert not failing, "the reference fails graders:\n" + "\n".join(failing)
    assert report.possible > 0 and report.earned == report.possible
    table = grading.format_table(report)
    assert f"total: {report.possible}/{report.possible} points (100%)" in table


def test_stubs_score_zero_with_not_implemented_errors():
    report = grading.run_isolated(solutions=grading.LEARNER)  # the stubs in this folder, untouched
    assert not report.errors, f"grader files failed to load: {report.errors}"
    assert not report.ungraded, f"chapters without a trustworthy report: {report.ungraded}"
    assert report.tests, "no graded tests ran"
    wrong = [f"{t.name}: {t.error or 'passed'} {t.message}" for t in report.tests if t.error != "NotImplementedError"]
    assert not wrong, "graders that do not fail with NotImplementedError on the stubs:\n" + "\n".join(wrong)
    assert report.earned == 0
    assert "not implemented yet" in grading.format_table(report)


def test_every_stub_function_is_graded_and_has_a_reference(reference_report):
    graded = {(t.chapter, t.exercise) for t in reference_report.tests}
    total = 0
    for number, chapter_module in exercises.CHAPTERS.items():
        functions = stub_functions(chapter_module)
        total += len(functions)
        assert len(functions) >= 2, f"{chapter_module} has {len(functions)} exercises, at least 2 wanted"
        assert set(functions) == set(REFERENCES[chapter_module]), f"{chapter_module}: stubs and references differ"
        for name in functions:
            assert (number, name) in graded, f"exercise {chapter_module}.{name} has no grader"
            stub = getattr(importlib.import_module(f"exercises.{chapter_module}"), name)
            assert len(inspect.getdoc(stub)) > 200, f"{chapter_module}.{name} needs the full task in its docstring"
    assert total >= 16
    assert all(t.points > 0 and t.hint for t in reference_report.tests), "every grader needs points and a hint"


# --------------------------------------------------------------------------- wrong solutions


def _pk_topk_off_by_one(q1, q2, keys1, keys2, m):
    """Product-key top-m that drops the best slot and keeps the (m+1)-th: an off-by-one in top-m."""
    s1, s2 = q1 @ keys1.T, q2 @ keys2.T
    n = keys1.shape[0]
    rows, cols = s1.topk(m, dim=1).indices, s2.topk(m, dim=1).indices
    grid = (s1.gather(1, rows)[:, :, None] + s2.gather(1, cols)[:, None, :]).flatten(1)
    best = grid.topk(min(m + 1, grid.shape[1]), dim=1).indices[:, 1:]
    i, j = rows.gather(1, best // m), cols.gather(1, best % m)
    return s1.gather(1, i) + s2.gather(1, j), i * n + j


def _pk_topk_brute_force(q1, q2, keys1, keys2, m):
    """Right answer, wrong cost: scores all n^2 slots."""
    from minimem.product_keys import brute_force_topk

    return brute_force_topk(q1, q2, keys1, keys2, m)


def _pkm_forward_without_softmax(x, w_query, keys1, keys2, values, m):
    from minimem.product_keys import multihead_product_key_topk

    heads, d_key, h = w_query.shape
    q = F.layer_norm(torch.einsum("kdh,th->tkd", w_query, x), (d_key,), eps=1e-5)
    scores, indices = multihead_product_key_topk(q, keys1, keys2, m)
    return torch.einsum("tkm,tkmh->th", scores, values[indices])  # raw scores as weights


def _multi_core_read_transposed(values, indices, scores):
    """Slice k taken as the strided columns k, k + c, ... instead of the contiguous block."""
    T, m, c = scores.shape
    rows = values[indices].view(T, m, values.shape[1] // c, c)  # (.., D_v/c, c): transposed
    return torch.einsum("tmk,tmdk->tdk", scores, rows).permute(0, 2, 1).reshape(T, -1)


def _moe_forward_swapped_halves(x, router_weight, w13, w2, top_k):
    """W1 and W3 read from the wrong halves of w13."""
    d = w2.shape[1]
    probs = torch.softmax(x @ router_weight.T, dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t].tolist()):
            a, b = x[t] @ w13[e][:, d:], x[t] @ w13[e][:, :d]
            out[t] += w * (F.silu(a) * b) @ w2[e]
    counts = torch.bincount(experts.flatten(), minlength=w13.shape[0]).to(x.dtype)
    return out, w13.shape[0] * (counts / experts.numel() * probs.mean(0)).sum()


def _rank1_core_wrong_sign(core):
    from minimem.tucker import rank1_core

    u, t = rank1_core(core)
    return -u, -t


def _kl_wrong_sign(z):
    p = z.double() / z.sum()
    return math.log(z.numel()) - float(torch.xlogy(p, p).sum())


def _expected_distinct_hard_coded(population, per_token, batch_tokens):
    return 8.0  # the docstring's B = 1, k = 8 case


def _value_std_printed_form(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean=1.0):
    """The formula as the extracted paper prints it: sigma_V^2 = the right-hand side."""
    return math.sqrt(target_variance * dim / (0.16 * score_mean**2 * (1 + sigma_s**2) * d_pre * topk * heads * d_value))


def _peer_experts_scoring_all(x, indices, weights, down, up, activation):
    gates = F.gelu(x @ down.T) if activation == "gelu" else x @ down.T  # (T, N): every expert
    return torch.einsum("tk,tk,tkh->th", weights, gates.gather(1, indices), up[indices])


def _gather_backward_lossy(grad_out, values, indices, scores):
    """grad[indices] += ...: advanced-indexing assignment keeps one write per repeated row."""
    grad_values = torch.zeros_like(values)
    grad_values[indices] += scores[..., None] * grad_out[:, None, :]
    return grad_values, torch.einsum("td,tmd->tm", grad_out, values[indices])


def _weighted_gather_in_torch(values, indices, scores):
    """Right numbers, but no Triton kernel."""
    if bool(((indices < 0) | (indices >= values.shape[0])).any()):
        raise ValueError("indices out of range")
    return torch.einsum("tm,tmd->td", scores, values[indices])


WRONG_SOLUTIONS = {
    "off-by-one in top-m": ("ch2_product_keys", "TestProductKeyTopk", {"product_key_topk": _pk_topk_off_by_one}),
    "brute force in the fast path": (
        "ch2_product_keys",
        "TestProductKeyTopk",
        {"product_key_topk": _pk_topk_brute_force},
    ),
    "missing softmax": ("ch3_pkm", "TestPKMForward", {"pkm_forward": _pkm_forward_without_softmax}),
    "transposed core slice": ("ch5_ultramem", "TestMultiCoreRead", {"multi_core_read": _multi_core_read_transposed}),
    "swapped W1 / W3 slices": ("ch1_ffn_memory", "TestMoEForward", {"moe_forward": _moe_forward_swapped_halves}),
    "wrong sign convention": ("ch5_ultramem", "TestRank1Core", {"rank1_core": _rank1_core_wrong_sign}),
    "wrong sign in the KL": ("ch3_pkm", "TestKLFromUniform", {"kl_from_uniform": _kl_wrong_sign}),
    "hard-coded answer": (
        "ch1_ffn_memory",
        "TestExpectedDistinct",
        {"expected_distinct": _expected_distinct_hard_coded},
    ),
    "sigma_V^2 as printed": (
        "ch6_ultramemv2",
        "TestPrincipledValueStd",
        {"principled_value_std": _value_std_printed_form},
    ),
    "PEER scoring every expert": ("ch4_peer", "TestPEERExperts", {"peer_experts": _peer_experts_scoring_all}),
    "lossy scatter-add": (
        "ch7_triton",
        "TestWeightedGatherBackward",
        {"weighted_gather_backward": _gather_backward_lossy},
    ),
    "no Triton kernel": ("ch7_triton", "TestWeightedGather", {"weighted_gather": _weighted_gather_in_torch}),
}


@pytest.mark.parametrize("mistake", sorted(WRONG_SOLUTIONS))
def test_wrong_solution_is_caught(mistake):
    chapter_module, grader_class, replacements = WRONG_SOLUTIONS[mistake]
    number = next(n for n, name in exercises.CHAPTERS.items() if name == chapter_module)
    report = grading.run_graders(
        [number], {chapter_module: Patched(chapter_module, **replacements)}, select=grader_class
    )
    assert report.tests and not report.errors
    failed = [t for t in report.tests if not t.passed]
    assert failed, f"{mistake}: every grader of {grader_class} passed a wrong solution"
    assert all(t.error != "NotImplementedError" for t in failed)
    assert report.earned < report.possible


# --------------------------------------------------------------------------- time limits


def _hang(*args, **kwargs):
    while True:
        pass


def test_hanging_solution_fails_on_time_even_under_hypothesis():
    solutions = {"ch1_ffn_memory": Patched("ch1_ffn_memory", expected_distinct=_hang)}
    start = time.monotonic()
    report = grading.run_graders(
        [1], solutions, time_limit=1.0, select="TestExpectedDistinct and (test_limits or test_matches_simulation)"
    )
    elapsed = time.monotonic() - start
    assert len(report.tests) == 2, [t.name for t in report.tests]
    assert all(not t.passed and t.error == "GraderTimeout" for t in report.tests), report.tests
    assert "did not finish within 1 s" in report.tests[0].message
    assert elapsed < 30, f"two 1 s limits took {elapsed:.1f} s"


def test_time_limit_restores_an_outer_alarm():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with grading.time_limit(5.0, "inner"):
            pass
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0, "the outer alarm was not re-armed"
        time.sleep(1.0)
        assert fired, "the outer alarm did not fire"
        with pytest.raises(grading.GraderTimeout, match="did not finish within 0.2 s"):
            with grading.time_limit(0.2, "loop"):
                while True:
                    pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- the command line


def test_parse_chapter_and_bad_chapter(capsys):
    assert grading.parse_chapter("2") == grading.parse_chapter("ch2") == grading.parse_chapter("ch2_product_keys") == 2
    with pytest.raises(ValueError, match="CHAPTER must be one of"):
        grading.parse_chapter("12")
    assert grading.main(["12"]) == 2
    assert "CHAPTER must be one of" in capsys.readouterr().err


def test_cli_reference_prints_the_table(capsys):
    code = grading.main(["--reference", "6", "-k", "mcp_percent"])  # an exercise's name selects its graders
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mcp_percent" in out and "total: 4/4 points (100%)" in out and "minimem's own implementation" in out
