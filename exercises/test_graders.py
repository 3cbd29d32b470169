"""CI meta-tests of the exercise graders (run by ``make test``).

- minimem's own implementation (``--reference``) scores 100%;
- the untouched stubs score 0, every grader failing with NotImplementedError (a negative
  control: a grader that passes on a stub, or fails to import, is a defect),
  both graded as ``minimem grade`` grades, one child process per chapter (``run_isolated``;
  tests/test_grading_isolation.py checks that hostile stubs cannot fool it);
- deliberately wrong solutions each lose points on their exercise (graded in this process by
  ``run_graders``, which takes solution objects): :data:`WRONG_SOLUTIONS`, each naming the grader
  test that must catch it. Besides plain bugs (an off-by-one in top-m, a missing softmax, a
  transposed slice, a wrong sign, ...) they cover every class of mistake a held-out set of wrong
  solutions once slipped through:

  a. a float32 input answered in float64 (``test_float32*``);
  b. only some arguments validated (``test_rejects_*`` check every argument);
  c. O(N) work in a loop of small tensors (``check_work_growth``: the work at two sizes);
  d. an error message that names the argument only inside another word (whole-word match);
  e. Triton kernels that handle one tile only, assume contiguous inputs or are not fused;
  f. a kernel's unmasked out-of-bounds load (the interpreter's loads are bounds-checked);
  g. scores that change between runs (hypothesis's seed is fixed: :func:`test_grading_is_deterministic`);

- correct solutions written differently from minimem's (:data:`CORRECT_SOLUTIONS`: another
  algorithm, float32 arithmetic, other error messages, two other Triton kernels) score full marks;
- the conceptual questions accept right answers in any form and reject wrong ones;
- a hanging solution is failed by the time limit, inside hypothesis too;
- the stubs, graders and reference cover each other.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
import signal
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import exercises
from exercises.graders import answer_keys
from exercises.questions import ANSWERS, QUESTIONS
from exercises.reference import REFERENCES, namespace, question_answers
from minimem_tools import grading

grading.use_triton_interpreter()  # before triton is imported: the kernels below run in the interpreter on CPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

EXERCISES = Path(__file__).resolve().parent
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "silu": F.silu, "none": lambda z: z}


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


def chapter_of(chapter_module: str) -> int:
    return next(n for n, name in exercises.CHAPTERS.items() if name == chapter_module)


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
    assert f"hypothesis seed {grading.DEFAULT_SEED}" in table


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
        assert (number, "questions") in graded, f"chapter {number} has no graded conceptual question"
    assert total >= 21 and set(exercises.CHAPTERS) == set(range(1, 10))
    assert all(t.points > 0 and t.hint for t in reference_report.tests), "every grader needs points and a hint"


def test_questions_stub_keys_and_reference_agree():
    assert set(QUESTIONS) == set(ANSWERS) == set(answer_keys.KEYS) == set(question_answers())
    assert all(value is None for value in ANSWERS.values()), "the stub's answers must be unanswered"
    for question, key in answer_keys.KEYS.items():
        assert int(question[0]) == key.chapter
        assert (key.kind == "choice") == bool(key.options)
        for letter in key.options:
            assert f"{letter}) " in QUESTIONS[question], f"question {question} lacks option {letter}"


# --------------------------------------------------------------------------- plain bugs


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


# --------------------------------------------------------------------------- solutions written from scratch
# Correct ones (CORRECT_SOLUTIONS must score full marks) and, beside each, the wrong variants.


def _swiglu(x, w1, w3, w2, check_all=True):
    """SwiGLU with einsum, in the inputs' dtype; other error messages than minimem's."""
    if w3.shape != w1.shape:
        raise ValueError(f"the gate w3 {tuple(w3.shape)} must match w1 {tuple(w1.shape)}")
    d_ff, h = w1.shape
    if check_all:
        if tuple(w2.shape) != (h, d_ff):
            raise ValueError(f"w2 has shape {tuple(w2.shape)}, wanted ({h}, {d_ff})")
        if x.dim() != 2 or x.shape[1] != h:
            raise ValueError(f"x has width {x.shape[-1]} but the keys have {h}")
    gated = F.silu(torch.einsum("th,fh->tf", x, w1)) * torch.einsum("th,fh->tf", x, w3)
    return torch.einsum("tf,hf->th", gated, w2)


def _swiglu_checking_only_w3(x, w1, w3, w2):
    return _swiglu(x, w1, w3, w2, check_all=False)


def _swiglu_in_float64(x, w1, w3, w2):
    """float32 inputs, float64 output: the dtype is not kept."""
    return _swiglu(x.double(), w1.double(), w3.double(), w2.double())


def _kl(z, message="z"):
    """KL from uniform in z's own dtype (float32 arithmetic for float32 counts)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 1 or z.numel() == 0:
        raise ValueError("z must be a non-empty 1-D tensor" if message == "z" else "empty or not a vector")
    if bool((z < 0).any()):
        raise ValueError("z has a negative count" if message == "z" else "a negative count")
    total = z.sum()
    if float(total) <= 0:
        raise ValueError("z sums to 0: no slot was used" if message == "z" else "zero total usage")
    p = z / total
    return float(math.log(z.numel()) + torch.xlogy(p, p).sum())


def _kl_messages_without_z(z):
    """Right value, but the messages name z only inside 'zero' (or not at all)."""
    return _kl(z, message="other")


def _usage_metrics(indices, n_slots, weights=None, check_all=True):
    if check_all:
        if not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots = {n_slots!r}: a memory has at least one slot")
        if indices.dtype != torch.int64:
            raise ValueError(f"indices are {indices.dtype}, not int64")
    flat = indices.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_slots):
        raise ValueError(f"indices must lie in [0, {n_slots})")
    if check_all and weights is not None:
        if weights.shape != indices.shape:
            raise ValueError(f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} differ in shape")
        if bool((weights < 0).any()):
            raise ValueError("weights has a negative entry")

    def kl(counts):
        p = counts / counts.sum()
        return math.log(n_slots) + float(torch.xlogy(p, p).sum())

    hits = torch.bincount(flat, minlength=n_slots).double()
    result = {"usage": float((hits > 0).sum()) / n_slots, "kl_unweighted": kl(hits)}
    if weights is not None:
        mass = torch.zeros(n_slots, dtype=torch.float64).index_add_(0, flat, weights.reshape(-1).double())
        result.update(usage=float((mass > 0).sum()) / n_slots, kl_weighted=kl(mass))
    return result


def _usage_metrics_checking_range_only(indices, n_slots, weights=None):
    return _usage_metrics(indices, n_slots, weights, check_all=False)


def _pk_topk(q1, q2, keys1, keys2, m, message="m"):
    """Product keys from scratch: top-m rows and columns, the m x m grid, its top-m."""
    if q1.dim() != 2 or q2.shape != q1.shape or keys1.dim() != 2 or keys2.shape != keys1.shape:
        raise ValueError("the shapes do not fit: q1, q2 must be (T, d) and keys1, keys2 (n, d)")
    if keys1.shape[1] != q1.shape[1]:
        raise ValueError("keys and query halves differ in width")
    n = keys1.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"m = {m} is outside [1, n = {n}]" if message == "m" else f"top-k must be between 1 and {n}")
    s1, s2 = q1 @ keys1.T, q2 @ keys2.T
    with torch.no_grad():
        rows, cols = s1.topk(m, dim=1).indices, s2.topk(m, dim=1).indices
        grid = s1.gather(1, rows).unsqueeze(2) + s2.gather(1, cols).unsqueeze(1)
        best = grid.flatten(1).topk(m, dim=1).indices
        i, j = rows.gather(1, best // m), cols.gather(1, best % m)
    return s1.gather(1, i) + s2.gather(1, j), i * n + j


def _pk_topk_saying_must(q1, q2, keys1, keys2, m):
    """Right result, but a bad m's message names m only inside 'must'."""
    return _pk_topk(q1, q2, keys1, keys2, m, message="must")


def _pk_topk_row_by_row(q1, q2, keys1, keys2, m):
    """Exact, never a big tensor, yet every one of the n^2 slots is scored: one row of slots at a time."""
    n = keys1.shape[0]
    s2 = q2 @ keys2.T
    best_scores = best_slots = None
    for i in range(n):
        row = (q1 @ keys1[i]).unsqueeze(1) + s2  # (T, n): the n slots of row i
        slots = (i * n + torch.arange(n)).expand_as(row)
        if best_scores is not None:
            row, slots = torch.cat([best_scores, row], 1), torch.cat([best_slots, slots], 1)
        top = row.topk(m, dim=1)
        best_scores, best_slots = top.values, slots.gather(1, top.indices)
    return best_scores, best_slots


def _pkm_forward_in_float64(x, w_query, keys1, keys2, values, m):
    return namespace("ch3_pkm").pkm_forward(*(t.double() for t in (x, w_query, keys1, keys2, values)), m)


def _pkm_queries_vague_error(x, w_query, norm):
    """Right queries, but an unknown norm's message names norm only inside 'normalisation' and lists nothing."""
    if norm not in ("layernorm", "batchnorm", "none"):
        raise ValueError(f"unsupported normalisation {norm!r}")
    return namespace("ch3_pkm").pkm_queries(x, w_query, norm)


def _peer_experts(x, indices, weights, down, up, activation):
    """Gather the k experts of each token, from scratch."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    shape = (*indices.shape, -1)
    d, u = down.index_select(0, indices.reshape(-1)).view(shape), up.index_select(0, indices.reshape(-1)).view(shape)
    gates = ACTIVATIONS[activation]((d * x.unsqueeze(1)).sum(-1))
    return ((weights * gates).unsqueeze(-1) * u).sum(1)


def _peer_experts_in_chunks(x, indices, weights, down, up, activation):
    """Never a (T, N) tensor, yet every expert is scored: 64 experts at a time, keeping the chosen ones."""
    pre = torch.zeros(indices.shape, dtype=x.dtype)
    for start in range(0, down.shape[0], 64):
        block = x @ down[start : start + 64].T  # (T, <= 64)
        inside = (indices >= start) & (indices < start + block.shape[1])
        pre = pre + torch.where(inside, block.gather(1, (indices - start).clamp(0, block.shape[1] - 1)), 0.0)
    return torch.einsum("tk,tk,tkh->th", weights, ACTIVATIONS[activation](pre), up[indices])


def _multi_core_read(values, indices, scores, keep_dtype=True):
    N, D = values.shape
    T, m, c = scores.shape
    if D % c:
        raise ValueError(f"c = {c} cores do not divide D_v = {D}: check scores")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= N):
        raise ValueError(f"indices must be in [0, {N})")
    if not keep_dtype:
        values, scores = values.float() if values.dtype == torch.bfloat16 else values, scores.float()
    rows = values[indices].view(T, m, c, D // c)
    return torch.einsum("tmk,tmkd->tkd", scores, rows).reshape(T, D)


def _multi_core_read_upcasting(values, indices, scores):
    """bfloat16 in, float32 out."""
    return _multi_core_read(values, indices, scores, keep_dtype=False)


def _ive(values, rows, blocks, scores, projections):
    """Implicit value expansion from scratch: index_add into (token, block) buckets, then one einsum."""
    T, m, c = scores.shape
    N, D = values.shape
    E = projections.shape[0]
    weighted = (values[rows].view(T, m, c, D // c) * scores.unsqueeze(-1)).reshape(T * m, D)
    buckets = (torch.arange(T).unsqueeze(1) * E + blocks).reshape(-1)
    pooled = values.new_zeros(T * E, D).index_add(0, buckets, weighted)
    return torch.einsum("tpd,pdh->th", pooled.view(T, E, D), projections)


def _ive_in_chunks(values, rows, blocks, scores, projections):
    """Never an (E N, h) tensor, yet every virtual value is computed: 256 physical rows at a time."""
    T, m, c = scores.shape
    N, D = values.shape
    E = projections.shape[0]
    width = D // c
    out = values.new_zeros(T, projections.shape[2])
    for start in range(0, N, 256):
        stop = min(start + 256, N)
        inside = (rows >= start) & (rows < stop)
        local = (rows - start).clamp(0, stop - start - 1)
        for p in range(E):
            chosen = (inside & (blocks == p)).to(values.dtype)
            for k in range(c):
                cols = slice(k * width, (k + 1) * width)
                virtual = values[start:stop, cols] @ projections[p, cols]  # (rows, h): virtual values
                out = out + torch.einsum("tm,tmh->th", chosen * scores[..., k], virtual[local])
    return out


def _value_std(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean=1.0, check_all=True):
    sizes = dict(target_variance=target_variance, topk=topk)
    if check_all:
        sizes.update(d_pre=d_pre, d_value=d_value, heads=heads, dim=dim, score_mean=score_mean)
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} = {value}: must be positive")
    if sigma_s < 0:
        raise ValueError(f"sigma_s = {sigma_s} < 0")
    fourth = target_variance * dim / (0.16 * score_mean**2 * (1 + sigma_s**2) * d_pre * topk * heads * d_value)
    return math.sqrt(math.sqrt(fourth))


def _value_std_checking_three(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean=1.0):
    return _value_std(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean, check_all=False)


def _verdict(a, b, lower=True, z=2.0, variance=statistics.variance):
    """The rule with the statistics module (``z`` and ``variance`` let the wrong variants below differ)."""
    if not isinstance(lower, bool):
        raise ValueError(f"lower should be True or False, not {lower!r}")
    arms = []
    for name, xs in (("a", a), ("b", b)):
        if isinstance(xs, torch.Tensor):
            if xs.dim() != 1:
                raise ValueError(f"{name} is a {xs.dim()}-D tensor, not a list of per-seed values")
            xs = xs.tolist()
        if not isinstance(xs, (list, tuple)):
            raise ValueError(f"{name}: a list of numbers please, not {type(xs).__name__}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in xs):
            raise ValueError(f"{name} holds something that is not a number")
        arms.append([float(v) for v in xs if math.isfinite(v)])
    if not arms[0] or not arms[1]:
        return "not run"
    if min(len(arms[0]), len(arms[1])) < 2:
        return "inconclusive"
    mean_a, mean_b = statistics.fmean(arms[0]), statistics.fmean(arms[1])
    bar = z * math.sqrt(sum(variance(xs) / len(xs) for xs in arms))
    gain = mean_b - mean_a if lower else mean_a - mean_b
    return "reproduced" if gain > bar else "not reproduced" if -gain > bar else "inconclusive"


def _verdict_at_196_se(a, b, lower=True):
    """The 1.96 of a two-sided normal 95% test instead of the rule's 2 SE."""
    return _verdict(a, b, lower, z=1.96)


def _verdict_population_variance(a, b, lower=True):
    """The population variance (ddof = 0) instead of the sample variance."""
    return _verdict(a, b, lower, variance=statistics.pvariance)


def _layer_parameters(kind, h, n_keys, heads, d_key, topk, query_norm="layernorm"):
    rows = {"pkm": 1, "peer": 2}
    if kind not in rows:
        raise ValueError(f"unknown kind {kind!r} (pkm or peer)")
    for name, value in (("h", h), ("n_keys", n_keys), ("heads", heads)):
        if value < 1:
            raise ValueError(f"{name} < 1")
    if d_key < 2 or d_key % 2:
        raise ValueError(f"d_key = {d_key} is not an even width")
    if not 1 <= topk <= n_keys:
        raise ValueError(f"topk = {topk} out of range")
    norms = {"layernorm": 2 * d_key, "batchnorm": 2 * heads * d_key, "none": 0}
    if query_norm not in norms:
        raise ValueError(f"query_norm {query_norm!r}: choose layernorm, batchnorm or none")
    router = heads * d_key * (h + n_keys) + norms[query_norm]
    read = min(heads * topk, n_keys**2)  # H m slots, but never more than the N there are
    return {"total": router + n_keys**2 * rows[kind] * h, "activated": router + read * rows[kind] * h}


def _chunk_cores(cores, rank, world_size):
    if world_size < 1:
        raise ValueError(f"world_size {world_size} < 1")
    if cores < 1:
        raise ValueError(f"cores {cores} < 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    chunks = math.lcm(world_size, cores)
    per_rank = chunks // world_size
    return torch.arange(rank * per_rank, (rank + 1) * per_rank) * cores // chunks


def _rank_read(local_values, indices, scores, gate, rank, world_size):
    chunk_cores = _chunk_cores(scores.shape[-1], rank, world_size)
    N, width = local_values.shape
    if width % len(chunk_cores):
        raise ValueError(f"local_values: {width} columns do not split into {len(chunk_cores)} chunks")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= N):
        raise ValueError("indices out of range")
    weights = scores[..., chunk_cores]
    if gate is not None:
        weights = weights * gate.unsqueeze(-1)
    rows = local_values[indices].view(*indices.shape, len(chunk_cores), width // len(chunk_cores))
    return torch.einsum("tmj,tmjd->tjd", weights, rows).reshape(indices.shape[0], width)


def _sharded_lookup(value_slices, indices, scores, pre_value_slices=None, pre_input=None):
    if (pre_value_slices is None) != (pre_input is None):
        raise ValueError("pre_input goes with pre_value_slices")
    P = len(value_slices)
    gate = None
    if pre_input is not None:
        width = pre_input.shape[1] // P
        gate = sum(
            torch.einsum("tmd,td->tm", part[indices], pre_input[:, r * width : (r + 1) * width])
            for r, part in enumerate(pre_value_slices)
        )
    return torch.cat([_rank_read(v, indices, scores, gate, r, P) for r, v in enumerate(value_slices)], dim=1)


def _sharded_lookup_assembling(value_slices, indices, scores, pre_value_slices=None, pre_input=None):
    """Right numbers, but it assembles the whole tables on one 'rank'."""
    from minimem.kernels import memory_lookup

    pre_values = torch.cat(pre_value_slices, 1) if pre_value_slices is not None else None
    return memory_lookup(torch.cat(value_slices, 1), indices, scores, pre_values, pre_input, backend="torch")


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _rows_kernel(
    values_ptr,
    idx_ptr,
    scores_ptr,
    out_ptr,
    m,
    D,
    sv0,
    sv1,
    si0,
    si1,
    ss0,
    ss1,
    so0,
    BLOCK_D: tl.constexpr,
    MASK_LOADS: tl.constexpr,
):
    """One program per (token, block of columns); one slot at a time; any strides."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(m):
        row = tl.load(idx_ptr + t * si0 + i * si1)
        score = tl.load(scores_ptr + t * ss0 + i * ss1)
        if MASK_LOADS:
            values = tl.load(values_ptr + row * sv0 + cols * sv1, mask=inside, other=0.0)
        else:
            values = tl.load(values_ptr + row * sv0 + cols * sv1)
        acc += score * values
    tl.store(out_ptr + t * so0 + cols, acc, mask=inside)


@triton.jit
def _tiles_kernel(
    values_ptr, idx_ptr, scores_ptr, out_ptr, m, row_stride, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Contiguous inputs; BLOCK_M slots at a time as a (BLOCK_M, BLOCK_D) tile."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        slots = m0 + tl.arange(0, BLOCK_M)
        mask_m = slots < m
        rows = tl.load(idx_ptr + t * row_stride + slots, mask=mask_m, other=0)
        scores = tl.load(scores_ptr + t * row_stride + slots, mask=mask_m, other=0.0)
        tile = tl.load(
            values_ptr + rows[:, None] * D + cols[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
        )
        acc += tl.sum(scores[:, None] * tile, axis=0)
    tl.store(out_ptr + t * D + cols, acc, mask=mask_d)


def _check_gather_arguments(values, indices, scores, check_all=True):
    if check_all:
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise ValueError("values must be a 2-D (N, D_v) table")
        if indices.dim() != 2 or indices.dtype != torch.int64:
            raise ValueError(f"indices must be an int64 (T, m) tensor, got {indices.dtype}")
        if scores.shape != indices.shape:
            raise ValueError(f"scores {tuple(scores.shape)} must have the shape of the indices {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= values.shape[0]):
        raise ValueError(f"indices must lie in [0, {values.shape[0]})")


def _gather_rows(values, indices, scores, mask_loads=True, strides=True, one_tile=False, check_all=True):
    """A correct kernel launcher (the defaults) and, through its switches, four wrong ones."""
    _check_gather_arguments(values, indices, scores, check_all)
    (T, m), D = indices.shape, values.shape[1]
    out = torch.zeros(T, D, dtype=torch.float32, device=values.device)
    block = 64 if one_tile else min(128, triton.next_power_of_2(D))
    grid = (T, 1 if one_tile else triton.cdiv(D, block))
    sv, si, ss = (values.stride(), indices.stride(), scores.stride()) if strides else ((D, 1), (m, 1), (m, 1))
    _rows_kernel[grid](
        values, indices, scores, out, m, D, *sv, *si, *ss, out.stride(0), BLOCK_D=block, MASK_LOADS=mask_loads
    )
    return out


def _gather_tiles(values, indices, scores, first_block_only=False):
    _check_gather_arguments(values, indices, scores)
    values, indices, scores = values.contiguous(), indices.contiguous(), scores.contiguous()
    (T, m), D = indices.shape, values.shape[1]
    out = torch.empty(T, D, dtype=torch.float32, device=values.device)
    slots = min(m, 16) if first_block_only else m  # the wrong variant reads the first 16 slots only
    _tiles_kernel[(T, triton.cdiv(D, 64))](values, indices, scores, out, slots, m, D, BLOCK_M=16, BLOCK_D=64)
    return out


def _gather_one_tile(values, indices, scores):
    """Columns beyond the first 64 are never computed: one tile per token."""
    return _gather_rows(values, indices, scores, one_tile=True)


def _gather_first_slot_block(values, indices, scores):
    """Slots beyond the first 16 are never read: one block of slots, no loop."""
    return _gather_tiles(values, indices, scores, first_block_only=True)


def _gather_assuming_contiguous(values, indices, scores):
    """Row strides taken as D_v and m: strided views are read wrongly."""
    return _gather_rows(values, indices, scores, strides=False)


def _gather_unmasked_loads(values, indices, scores):
    """Loads a whole power-of-two block of columns: past the row, past the table for its last row."""
    return _gather_rows(values, indices, scores, mask_loads=False)


def _gather_in_torch_summed_in_triton(values, indices, scores):
    """Not fused: torch gathers the (T, m, D_v) rows, a kernel only sums them."""
    _check_gather_arguments(values, indices, scores)
    T, m = indices.shape
    rows = values[indices].reshape(T * m, -1)
    return _gather_rows(rows, torch.arange(T * m, device=values.device).view(T, m), scores)


def _gather_launch_per_slot(values, indices, scores):
    """Not fused: one launch per slot, the partial sums added in torch."""
    _check_gather_arguments(values, indices, scores)
    out = 0
    for i in range(indices.shape[1]):
        out = out + _gather_rows(values, indices[:, i : i + 1], scores[:, i : i + 1])
    return out


def _gather_checking_range_only(values, indices, scores):
    return _gather_rows(values, indices, scores, check_all=False)


def _gather_backward(grad_out, values, indices, scores):
    """index_add_ scatter and a gathered dot product."""
    contributions = (scores.unsqueeze(-1) * grad_out.unsqueeze(1)).reshape(-1, values.shape[1])
    grad_values = torch.zeros_like(values).index_add_(0, indices.reshape(-1), contributions)
    return grad_values, torch.einsum("td,tmd->tm", grad_out, values[indices])


# --------------------------------------------------------------------------- the wrong solutions


# name -> (chapter module, the grader test (class and name) that must catch it, replacements)
WRONG_SOLUTIONS = {
    "off-by-one in top-m": ("ch2_product_keys", "TestProductKeyTopk", {"product_key_topk": _pk_topk_off_by_one}),
    "brute force in the fast path": (
        "ch2_product_keys",
        "TestProductKeyTopk and test_never_scores_all_slots",
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
    "no Triton kernel": (
        "ch7_triton",
        "TestWeightedGather and test_runs_a_triton_kernel",
        {"weighted_gather": _weighted_gather_in_torch},
    ),
    "verdict at 1.96 SE": (
        "ch8_head_to_head",
        "TestVerdict and test_just_inside_and_outside_the_bar",
        {"verdict": _verdict_at_196_se},
    ),
    "verdict with the population variance": (
        "ch8_head_to_head",
        "TestVerdict and test_just_inside_and_outside_the_bar",
        {"verdict": _verdict_population_variance},
    ),
    # a. float32 (or bfloat16) in, another dtype out
    "a: SwiGLU answers float32 in float64": (
        "ch1_ffn_memory",
        "TestSwigluFFN and test_float32",
        {"swiglu_ffn": _swiglu_in_float64},
    ),
    "a: PKM answers float32 in float64": (
        "ch3_pkm",
        "TestPKMForward and test_float32",
        {"pkm_forward": _pkm_forward_in_float64},
    ),
    "a: multi-core read answers bfloat16 in float32": (
        "ch5_ultramem",
        "TestMultiCoreRead and test_float32_and_bfloat16",
        {"multi_core_read": _multi_core_read_upcasting},
    ),
    # b. some arguments never validated
    "b: SwiGLU checks w3 only": (
        "ch1_ffn_memory",
        "TestSwigluFFN and test_rejects_bad_shapes",
        {"swiglu_ffn": _swiglu_checking_only_w3},
    ),
    "b: usage_metrics checks the index range only": (
        "ch3_pkm",
        "TestUsageMetrics and test_rejects_bad_input",
        {"usage_metrics": _usage_metrics_checking_range_only},
    ),
    "b: principled_value_std checks three arguments": (
        "ch6_ultramemv2",
        "TestPrincipledValueStd and test_rejects_bad_input",
        {"principled_value_std": _value_std_checking_three},
    ),
    "b: weighted_gather checks the index range only": (
        "ch7_triton",
        "TestWeightedGather and test_rejects_bad_arguments",
        {"weighted_gather": _gather_checking_range_only},
    ),
    # c. O(N) work in a loop of small tensors
    "c: product keys scoring every slot, one row at a time": (
        "ch2_product_keys",
        "TestProductKeyTopk and test_never_scores_all_slots",
        {"product_key_topk": _pk_topk_row_by_row},
    ),
    "c: PEER scoring every expert, 64 at a time": (
        "ch4_peer",
        "TestPEERExperts and test_reads_only_the_chosen_experts",
        {"peer_experts": _peer_experts_in_chunks},
    ),
    "c: IVE computing every virtual value, 256 rows at a time": (
        "ch5_ultramem",
        "TestImplicitValueExpansion and test_never_builds_the_virtual_table",
        {"implicit_value_expansion": _ive_in_chunks},
    ),
    "c: sharded lookup assembling the whole table": (
        "ch9_sharding",
        "TestShardedLookup and test_never_assembles_a_table",
        {"sharded_lookup": _sharded_lookup_assembling},
    ),
    # d. the argument named only inside another word
    "d: a bad m's message says 'must'": (
        "ch2_product_keys",
        "TestProductKeyTopk and test_rejects_bad_arguments",
        {"product_key_topk": _pk_topk_saying_must},
    ),
    "d: a bad z's message says 'zero'": (
        "ch3_pkm",
        "TestKLFromUniform and test_rejects_bad_counts",
        {"kl_from_uniform": _kl_messages_without_z},
    ),
    "d: an unknown norm's message says 'normalisation'": (
        "ch3_pkm",
        "TestPKMQueries and test_rejects_bad_arguments",
        {"pkm_queries": _pkm_queries_vague_error},
    ),
    # e. kernels: one tile, contiguous inputs only, not fused
    "e: kernel computing one tile of columns": (
        "ch7_triton",
        "TestWeightedGather and test_larger_than_one_tile",
        {"weighted_gather": _gather_one_tile},
    ),
    "e: kernel reading one block of slots": (
        "ch7_triton",
        "TestWeightedGather and test_larger_than_one_tile",
        {"weighted_gather": _gather_first_slot_block},
    ),
    "e: kernel assuming contiguous inputs": (
        "ch7_triton",
        "TestWeightedGather and test_strided_inputs",
        {"weighted_gather": _gather_assuming_contiguous},
    ),
    "e: torch gathers, the kernel only sums": (
        "ch7_triton",
        "TestWeightedGather and test_is_one_fused_kernel",
        {"weighted_gather": _gather_in_torch_summed_in_triton},
    ),
    "e: one launch per slot": (
        "ch7_triton",
        "TestWeightedGather and test_is_one_fused_kernel",
        {"weighted_gather": _gather_launch_per_slot},
    ),
    # f. unmasked loads past the row (right numbers when unchecked)
    "f: kernel with unmasked loads": (
        "ch7_triton",
        "TestWeightedGather and test_no_out_of_bounds_access",
        {"weighted_gather": _gather_unmasked_loads},
    ),
}


@pytest.mark.parametrize("mistake", sorted(WRONG_SOLUTIONS))
def test_wrong_solution_is_caught(mistake):
    chapter_module, grader, replacements = WRONG_SOLUTIONS[mistake]
    report = grading.run_graders(
        [chapter_of(chapter_module)], {chapter_module: Patched(chapter_module, **replacements)}, select=grader
    )
    assert report.tests and not report.errors
    failed = [t for t in report.tests if not t.passed]
    assert failed, f"{mistake}: every grader of {grader} passed a wrong solution"
    assert all(t.error != "NotImplementedError" for t in failed)
    assert report.earned < report.possible


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need the interpreter")
def test_an_unmasked_load_passes_without_the_bounds_check():
    """Why class f needs the check: unchecked, the unmasked kernel's numbers are right."""
    g = torch.Generator().manual_seed(0)
    values, scores = torch.randn(6, 33, generator=g), torch.randn(2, 5, generator=g)
    indices = torch.randint(0, 5, (2, 5), generator=g)  # not the last row: the overrun stays inside the table
    expected = torch.einsum("tm,tmd->td", scores, values[indices])
    assert torch.allclose(_gather_unmasked_loads(values, indices, scores), expected, atol=1e-5)


# --------------------------------------------------------------------------- correct solutions, written differently


CORRECT_SOLUTIONS = {  # name -> (chapter module, grader class, replacements): every test of the class must pass
    "SwiGLU with einsum": ("ch1_ffn_memory", "TestSwigluFFN", {"swiglu_ffn": _swiglu}),
    "KL in float32 arithmetic": ("ch3_pkm", "TestKLFromUniform", {"kl_from_uniform": _kl}),
    "usage metrics from bincount": ("ch3_pkm", "TestUsageMetrics", {"usage_metrics": _usage_metrics}),
    "product keys from scratch": ("ch2_product_keys", "TestProductKeyTopk", {"product_key_topk": _pk_topk}),
    "PEER experts with index_select": ("ch4_peer", "TestPEERExperts", {"peer_experts": _peer_experts}),
    "multi-core read with einsum": ("ch5_ultramem", "TestMultiCoreRead", {"multi_core_read": _multi_core_read}),
    "IVE with index_add buckets": ("ch5_ultramem", "TestImplicitValueExpansion", {"implicit_value_expansion": _ive}),
    "principled std, other messages": (
        "ch6_ultramemv2",
        "TestPrincipledValueStd",
        {"principled_value_std": _value_std},
    ),
    "a row-at-a-time kernel with strides": ("ch7_triton", "TestWeightedGather", {"weighted_gather": _gather_rows}),
    "a tiled kernel on contiguous copies": ("ch7_triton", "TestWeightedGather", {"weighted_gather": _gather_tiles}),
    "backward with index_add_": (
        "ch7_triton",
        "TestWeightedGatherBackward",
        {"weighted_gather_backward": _gather_backward},
    ),
    "verdict with statistics": ("ch8_head_to_head", "TestVerdict", {"verdict": _verdict}),
    "parameter counts by formula": ("ch8_head_to_head", "TestLayerParameters", {"layer_parameters": _layer_parameters}),
    "chunk cores by arithmetic": ("ch9_sharding", "TestChunkCores", {"chunk_cores": _chunk_cores}),
    "rank read with einsum": ("ch9_sharding", "TestRankRead", {"rank_read": _rank_read}),
    "sharded lookup rank by rank": ("ch9_sharding", "TestShardedLookup", {"sharded_lookup": _sharded_lookup}),
}


@pytest.mark.parametrize("name", sorted(CORRECT_SOLUTIONS))
def test_correct_solution_scores_full_marks(name):
    chapter_module, grader_class, replacements = CORRECT_SOLUTIONS[name]
    report = grading.run_graders(
        [chapter_of(chapter_module)], {chapter_module: Patched(chapter_module, **replacements)}, select=grader_class
    )
    assert report.tests and not report.errors
    failing = [f"{t.name}: {t.error}: {t.message}" for t in report.tests if not t.passed]
    assert not failing, f"{name} is correct but lost points:\n" + "\n".join(failing)


# --------------------------------------------------------------------------- conceptual questions


def _grade_answers(chapters, answers):
    return grading.run_graders(chapters, {"questions": SimpleNamespace(ANSWERS=answers)}, select="TestQuestions")


def test_right_answers_in_other_forms_score_full_marks():
    right = question_answers()
    forms = {}
    for question, answer in right.items():
        if isinstance(answer, str):
            forms[question] = f"({answer.upper()})."
        elif float(answer).is_integer():
            forms[question] = str(int(answer))
        else:
            forms[question] = f"{float(answer):.6g}"  # more digits than graded: rounded to 3 first
    report = _grade_answers(sorted({int(q[0]) for q in right}), forms)
    assert len(report.tests) == len(right)
    assert report.earned == report.possible, [(t.name, t.message) for t in report.tests if not t.passed]
    rounded = {q: (float(f"{a:.3g}") if not isinstance(a, str) else a) for q, a in right.items()}
    assert _grade_answers([1, 2, 3], rounded).earned == sum(1 for q in right if q[0] in "123")


def test_wrong_and_unreadable_answers_lose_the_point():
    right = question_answers()
    wrong = {
        "2a": 512 * 512 / (2 * 512),  # N / 2n: forgot the m x m candidate grid
        "6a": 2**-0.5,  # the square root: sigma_V^2 as printed
        "8a": "b",
        "9a": "twelve",
    }
    report = _grade_answers([2, 6, 8, 9], {**right, **wrong})
    failed = {t.name.split("[")[-1].rstrip("]"): t for t in report.tests if not t.passed}
    assert set(failed) == set(wrong), {q: t.message for q, t in failed.items()}
    assert all(t.error == "AssertionError" for t in failed.values())
    assert "is not the right answer" in failed["2a"].message and "must be a number" in failed["9a"].message


# --------------------------------------------------------------------------- determinism and feedback


def _expected_distinct_sometimes_wrong(population, per_token, batch_tokens):
    """Wrong only for some batch sizes: whether an example hits them is up to hypothesis's draws."""
    value = population * (1.0 - (1.0 - per_token / population) ** batch_tokens)
    return value * 1.01 if batch_tokens % 7 == 3 else value


def test_grading_is_deterministic():
    solutions = {"ch1_ffn_memory": Patched("ch1_ffn_memory", expected_distinct=_expected_distinct_sometimes_wrong)}
    runs = [grading.run_graders([1], solutions, select="TestExpectedDistinct") for _ in range(2)]
    outcomes = [[(t.name, t.passed, t.message, t.example) for t in run.tests] for run in runs]
    assert outcomes[0] == outcomes[1]
    assert runs[0].seed == runs[1].seed == grading.DEFAULT_SEED
    assert grading.run_graders([1], solutions, select="TestExpectedDistinct", seed=12345).seed == 12345


def test_every_failing_check_is_listed_with_its_line_and_a_rerun_command():
    solutions = {"ch1_ffn_memory": Patched("ch1_ffn_memory", swiglu_ffn=_swiglu_checking_only_w3)}
    report = grading.run_graders([1], solutions, select="TestSwigluFFN")
    report.tests.append(
        grading.GradedTest(1, "swiglu_ffn", "exercises/graders/test_ch1.py::TestSwigluFFN::test_extra", 2, error="E")
    )
    table = grading.format_table(report)
    assert "2 of 6 checks fail" in table
    assert "x test_rejects_bad_shapes (1 point)" in table and "x test_extra (2 points)" in table
    assert "re-run: minimem grade 1 -k 'TestSwigluFFN and test_rejects_bad_shapes' --traceback" in table
    failed = next(t for t in report.tests if t.name.endswith("test_rejects_bad_shapes"))
    assert failed.where.startswith("checked at: graders/test_ch1.py:"), failed.where


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


def test_work_counter_counts_python_loops_of_the_learners_code(monkeypatch):
    """Work done on Python numbers (after .tolist()) counts too: one step per line the learner's code runs."""
    from exercises.graders import helpers

    monkeypatch.setattr(helpers, "_learner_file", lambda filename: filename == __file__)

    def squares(n):
        total = 0.0
        for value in torch.arange(n, dtype=torch.float64).tolist():
            total += value * value
        return total

    counts = []
    for n in (10, 1000):
        with helpers.WorkCounter() as work:
            squares(n)
        counts.append(work)
    assert counts[1].lines > 50 * counts[0].lines and counts[1].total > 50 * counts[0].total
