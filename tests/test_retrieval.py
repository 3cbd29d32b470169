"""minimem.product_keys and minimem.tucker: product keys and TDQKR against slow loop references, ties included."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimem.product_keys import (
    brute_force_topk,
    multihead_product_key_topk,
    ordered_topk,
    product_key_topk,
    subkey_scores_topk,
)
from minimem.tucker import rank1_core, rank1_cores, tucker_exact_topk, tucker_recall, tucker_topk

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- references


def loop_topk(s1, s2, m):
    """Python sort of every slot by the documented key (score desc, s1 desc, i, s2 desc, j)."""
    T, n = s1.shape
    grid = s1.unsqueeze(2) + s2.unsqueeze(1)  # the float sums, in the inputs' dtype
    out = []
    for t in range(T):
        keyed = sorted(
            (-grid[t, i, j].item(), -s1[t, i].item(), i, -s2[t, j].item(), j) for i in range(n) for j in range(n)
        )
        out.append([i * n + j for (_, _, i, _, j) in keyed[:m]])
    return torch.tensor(out, dtype=torch.int64)


def random_inputs(T, n, d, integer, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def make(*shape):
        if integer:  # small integers: many exactly equal scores
            return torch.randint(-2, 3, shape, generator=g).to(dtype)
        return torch.randn(*shape, generator=g, dtype=dtype)

    return make(T, d), make(T, d), make(n, d), make(n, d)


# ----------------------------------------------------------------------------- product keys


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 4),
    n=st.integers(1, 9),
    d=st.integers(1, 4),
    m_frac=st.floats(0, 1),
    integer=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_product_key_topk_equals_loop_reference_including_ties(T, n, d, m_frac, integer, seed):
    m = 1 + round(m_frac * (n - 1))  # 1 .. n, including m = n
    q1, q2, k1, k2 = random_inputs(T, n, d, integer, torch.float32, seed)
    expected = loop_topk(q1 @ k1.T, q2 @ k2.T, m)
    scores, indices = product_key_topk(q1, q2, k1, k2, m)
    bscores, bindices = brute_force_topk(q1, q2, k1, k2, m)
    assert torch.equal(indices, expected)
    assert torch.equal(bindices, expected)
    assert torch.equal(scores, bscores)
    # scores are the slot scores, sorted descending
    s_full = (q1 @ k1.T).unsqueeze(2) + (q2 @ k2.T).unsqueeze(1)
    assert torch.equal(scores, s_full.flatten(1).gather(1, expected))
    assert bool((scores[:, 1:] <= scores[:, :-1]).all())


def test_ties_break_to_the_better_row_then_lower_index():
    # exact integer totals:   j=0 j=1 j=2
    #   i=0 (s1=1)             2   1   2
    #   i=1 (s1=2)             3   2   3
    #   i=2 (s1=0)             1   0   1
    s1 = torch.tensor([[1.0, 2.0, 0.0]])
    s2 = torch.tensor([[1.0, 0.0, 1.0]])
    _, idx = subkey_scores_topk(s1, s2, 3)
    # score 3: (1,0), (1,2) by column index; score 2: (1,1) has the better row (s1 = 2), so it
    # precedes (0,0) and (0,2) although its flat index 4 is larger
    assert idx.tolist() == [[3, 5, 4]] == loop_topk(s1, s2, 3).tolist()
    assert subkey_scores_topk(s1, s2, 3)[0].tolist() == [[3.0, 3.0, 2.0]]


def test_rounding_ties_follow_the_row_score_not_the_flat_index():
    # s1[1] is one ulp above s1[0], but both round to the same total once s2 = 4 is added.
    # Plain "lower flat index wins" would pick row 0; the documented rule picks row 1, and the
    # fast path agrees with the brute force only under the documented rule.
    one_ulp = 2.0**-23
    s1 = torch.tensor([[1.0, 1.0 + one_ulp]])
    s2 = torch.tensor([[4.0, -10.0]])
    assert (s1[0, 0] + s2[0, 0]) == (s1[0, 1] + s2[0, 0]) and s1[0, 1] > s1[0, 0]
    _, idx = subkey_scores_topk(s1, s2, 1)
    assert idx.tolist() == [[1 * 2 + 0]] == loop_topk(s1, s2, 1).tolist()
    # the same through the public API: q1 @ keys1.T == s1, q2 @ keys2.T == s2
    q = torch.tensor([[1.0]])
    keys1, keys2 = s1.T.contiguous(), s2.T.contiguous()
    assert product_key_topk(q, q, keys1, keys2, 1)[1].tolist() == [[2]]
    assert brute_force_topk(q, q, keys1, keys2, 1)[1].tolist() == [[2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("integer", [False, True])
def test_product_key_topk_equals_brute_force_at_moderate_size(dtype, integer):
    q1, q2, k1, k2 = random_inputs(50, 40, 8, integer, dtype, seed=3)
    for m in (1, 7, 40):
        fs, fi = product_key_topk(q1, q2, k1, k2, m)
        bs, bi = brute_force_topk(q1, q2, k1, k2, m, chunk_elements=4000)  # several chunks
        assert torch.equal(fi, bi) and torch.equal(fs, bs)
    assert torch.equal(product_key_topk(q1[:3], q2[:3], k1, k2, 40)[1], loop_topk(q1[:3] @ k1.T, q2[:3] @ k2.T, 40))


@settings(max_examples=40, deadline=None)
@given(
    R=st.integers(1, 5),
    L=st.integers(1, 30),
    k_frac=st.floats(0, 1),
    high=st.integers(1, 6),
    seed=st.integers(0, 10**6),
)
def test_ordered_topk_is_a_stable_sort_prefix(R, L, k_frac, high, seed):
    k = 1 + round(k_frac * (L - 1))
    x = torch.randint(0, high, (R, L), generator=torch.Generator().manual_seed(seed)).float()
    values, pos = ordered_topk(x, k)
    ref = torch.sort(x, dim=-1, descending=True, stable=True)
    assert torch.equal(pos, ref.indices[:, :k]) and torch.equal(values, ref.values[:, :k])


def test_product_key_scores_gradcheck():
    g = torch.Generator().manual_seed(0)
    q1, q2 = (torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k1, k2 = (torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: product_key_topk(*a, 4)[0], (q1, q2, k1, k2))
    # the gradient is the one of the selected slots' scores
    scores, idx = product_key_topk(q1, q2, k1, k2, 4)
    scores.sum().backward()
    i = idx // 5
    expected_q1 = k1.detach()[i].sum(1)  # d/dq1 sum_slots <q1, K1[i]>
    assert torch.allclose(q1.grad, expected_q1)


def test_multihead_equals_one_retrieval_per_head():
    g = torch.Generator().manual_seed(1)
    T, H, d_k, n, m = 6, 3, 8, 7, 5
    q = torch.randn(T, H, d_k, generator=g)
    k1, k2 = torch.randn(H, n, d_k // 2, generator=g), torch.randn(H, n, d_k // 2, generator=g)
    scores, indices = multihead_product_key_topk(q, k1, k2, m)
    assert scores.shape == indices.shape == (T, H, m)
    for h in range(H):
        s, i = brute_force_topk(q[:, h, : d_k // 2], q[:, h, d_k // 2 :], k1[h], k2[h], m)
        assert torch.equal(indices[:, h], i)
        assert torch.allclose(scores[:, h], s, atol=1e-6)
    qd = q.double().requires_grad_()
    k1d, k2d = k1.double().requires_grad_(), k2.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: multihead_product_key_topk(*a, m)[0], (qd, k1d, k2d))


def test_product_key_bad_input_raises_naming_the_argument():
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"m must be in \[1, n=5\]"):
        product_key_topk(q, q, k, k, 6)
    with pytest.raises(ValueError, match=r"m must be in \[1, n=5\]"):
        product_key_topk(q, q, k, k, 0)
    with pytest.raises(ValueError, match=r"m must be an integer"):
        product_key_topk(q, q, k, k, 2.0)
    with pytest.raises(ValueError, match="q1 and q2 must have the same shape"):
        product_key_topk(q, torch.randn(3, 2), k, k, 2)
    with pytest.raises(ValueError, match="keys1 and keys2 must have the same shape"):
        product_key_topk(q, q, k, torch.randn(6, 4), 2)
    with pytest.raises(ValueError, match="keys width d=3 must equal the query half width d=4"):
        product_key_topk(q, q, torch.randn(5, 3), torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="q1 must be a 2-D tensor"):
        brute_force_topk(q[0], q, k, k, 2)
    with pytest.raises(ValueError, match="keys1 must be a floating-point tensor"):
        product_key_topk(q, q, k.long(), k, 2)
    with pytest.raises(ValueError, match=r"keys shape .* must be \(H=2, n, D_k/2=2\)"):
        multihead_product_key_topk(torch.randn(3, 2, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 3), 2)
    with pytest.raises(ValueError, match=r"k must be in \[1, n=3\]"):
        ordered_topk(torch.randn(2, 3), 4)
    with pytest.raises(ValueError, match=r"x must be a 2-D \(R, L\) tensor"):
        ordered_topk(torch.randn(3), 1)


# ----------------------------------------------------------------------------- TDQKR


def loop_tucker_exact(s_row, s_col, cores, m):
    """Every slot's summed score by explicit loops; (score desc, flat index asc); per-core scores."""
    T, r, n = s_row.shape
    C = cores.sum(0)
    idx_out, per_core = [], []
    for t in range(T):
        slots = []
        for i in range(n):
            for j in range(n):
                s = sum(s_row[t, a, i] * C[a, b] * s_col[t, b, j] for a in range(r) for b in range(r))
                slots.append((-float(s), i * n + j))
        chosen = [f for _, f in sorted(slots)[:m]]
        idx_out.append(chosen)
        per_core.append(
            [
                [
                    float(
                        sum(
                            s_row[t, a, f // n] * cores[k, a, b] * s_col[t, b, f % n]
                            for a in range(r)
                            for b in range(r)
                        )
                    )
                    for k in range(cores.shape[0])
                ]
                for f in chosen
            ]
        )
    return torch.tensor(per_core, dtype=s_row.dtype), torch.tensor(idx_out)


def test_rank1_core_sign_convention_and_reconstruction():
    g = torch.Generator().manual_seed(0)
    C = torch.randn(3, 3, generator=g, dtype=torch.float64)
    u, t = rank1_core(C)
    U, S, Vh = torch.linalg.svd(C)
    assert torch.allclose(S[0] * torch.outer(u, t), S[0] * torch.outer(U[:, 0], Vh[0]))  # same rank-1 term
    assert u[u.abs().argmax()] > 0
    assert torch.isclose(u.norm(), torch.tensor(1.0, dtype=torch.float64))
    # a rank-1 core whose u has its largest entry negative: the convention flips both
    a, b = torch.tensor([0.2, -0.9, 0.1]), torch.tensor([0.5, 0.5, -0.7])
    u, t = rank1_core(torch.outer(a, b))
    assert torch.allclose(u, -a / a.norm(), atol=1e-6) and torch.allclose(t, -b / b.norm(), atol=1e-6)
    assert rank1_core(-torch.outer(a, b))[0][1] > 0
    with pytest.raises(ValueError, match=r"core must be a square \(r, r\) tensor"):
        rank1_core(torch.randn(2, 3))


@pytest.mark.parametrize("seed", range(3))
def test_tucker_rank1_core_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    T, r, n, m, c = 5, 3, 9, 4, 2
    a, b = torch.rand(r, generator=g, dtype=torch.float64), torch.rand(r, generator=g, dtype=torch.float64)
    cores = torch.stack([0.3 * torch.outer(a, b), 0.7 * torch.outer(a, b)])  # C = outer(a, b): rank 1
    s_row = torch.rand(T, r, n, generator=g, dtype=torch.float64)  # non-negative row/column scores
    s_col = torch.rand(T, r, n, generator=g, dtype=torch.float64)
    ref_scores, ref_idx = loop_tucker_exact(s_row, s_col, cores, m)
    scores, idx = tucker_topk(s_row, s_col, cores, m)
    assert torch.equal(idx, ref_idx)
    assert scores.shape == (T, m, c) and torch.allclose(scores, ref_scores)
    exact_scores, exact_idx = tucker_exact_topk(s_row, s_col, cores, m)
    assert torch.equal(exact_idx, ref_idx) and torch.allclose(exact_scores, ref_scores)
    assert tucker_recall(s_row, s_col, cores, m) == 1.0


def test_tucker_rank2_recall_is_measured_and_can_be_below_one():
    g = torch.Generator().manual_seed(0)
    T, r, n, m, c = 40, 2, 16, 4, 2
    s_row, s_col = torch.randn(T, r, n, generator=g), torch.randn(T, r, n, generator=g)
    cores = torch.randn(c, r, r, generator=g)
    _, fast = tucker_topk(s_row, s_col, cores, m)
    _, exact = loop_tucker_exact(s_row, s_col, cores, m)
    manual = sum(len(set(fast[t].tolist()) & set(exact[t].tolist())) for t in range(T)) / (T * m)
    recall = tucker_recall(s_row, s_col, cores, m)
    assert recall == pytest.approx(manual)
    assert 0.0 < recall < 1.0


def test_tucker_topk_rescoring_and_per_core_scores_against_loops():
    g = torch.Generator().manual_seed(2)
    T, r, n, m, c = 4, 2, 6, 3, 3
    s_row = torch.randn(T, r, n, generator=g, dtype=torch.float64)
    s_col = torch.randn(T, r, n, generator=g, dtype=torch.float64)
    cores = torch.randn(c, r, r, generator=g, dtype=torch.float64)
    u, t = rank1_core(cores.sum(0))
    scores, idx = tucker_topk(s_row, s_col, cores, m)
    for tok in range(T):
        # candidates by loop: top-m rows of u^T s_row, top-m columns of t^T s_col
        row_key = [float(sum(u[a] * s_row[tok, a, i] for a in range(r))) for i in range(n)]
        col_key = [float(sum(t[b] * s_col[tok, b, j] for b in range(r))) for j in range(n)]
        rows = sorted(range(n), key=lambda i: (-row_key[i], i))[:m]
        cols = sorted(range(n), key=lambda j: (-col_key[j], j))[:m]
        C = cores.sum(0)
        grid = sorted(
            (-float(s_row[tok, :, i] @ C @ s_col[tok, :, j]), a, b, i * n + j)
            for a, i in enumerate(rows)
            for b, j in enumerate(cols)
        )
        assert idx[tok].tolist() == [f for *_, f in grid[:m]]
        for slot, f in enumerate(idx[tok].tolist()):
            for k in range(c):
                expect = s_row[tok, :, f // n] @ cores[k] @ s_col[tok, :, f % n]
                assert torch.isclose(scores[tok, slot, k], expect)
    # given u, t: same result; gradcheck through the per-core scores
    assert torch.equal(tucker_topk(s_row, s_col, cores, m, u=u, t=t)[1], idx)
    args = (s_row.clone().requires_grad_(), s_col.clone().requires_grad_(), cores.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, k: tucker_topk(a, b, k, m, u=u, t=t)[0], args)


@pytest.mark.parametrize("seed", range(3))
def test_tucker_candidates_n_equals_exact_topk(seed):
    """M = n candidate rows and columns: the whole grid, rescored with the full core = the exact top-m."""
    g = torch.Generator().manual_seed(seed)
    T, r, n, m, c = 30, 3, 7, 4, 2
    s_row, s_col, cores = (
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(T, r, n)] * 2 + [(c, r, r)]
    )
    scores, idx = tucker_topk(s_row, s_col, cores, m, candidates=n)
    exact_scores, exact_idx = tucker_exact_topk(s_row, s_col, cores, m)
    assert torch.equal(idx, exact_idx) and torch.equal(scores, exact_scores)  # same slots, same order
    assert torch.equal(tucker_topk(s_row, s_col, cores, m, candidates=m)[1], tucker_topk(s_row, s_col, cores, m)[1])
    assert tucker_recall(s_row, s_col, cores, m) < 1.0 == tucker_recall(s_row, s_col, cores, m, candidates=n)


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 6),
    r=st.integers(1, 3),
    n=st.integers(2, 9),
    m_frac=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_tucker_recall_is_monotone_in_candidates(T, r, n, m_frac, seed):
    """A wider candidate grid contains the narrower one, so it finds at least the same exact top-m slots."""
    g = torch.Generator().manual_seed(seed)
    m = 1 + round(m_frac * (n - 1))
    s_row, s_col, cores = (
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(T, r, n)] * 2 + [(2, r, r)]
    )
    recalls = [tucker_recall(s_row, s_col, cores, m, candidates=M) for M in range(m, n + 1)]
    assert all(a <= b for a, b in zip(recalls, recalls[1:])) and recalls[-1] == 1.0
    assert recalls[0] == tucker_recall(s_row, s_col, cores, m)  # candidates = m is the default


def test_rank1_cores_continuous_sign_follows_the_previous_u():
    g = torch.Generator().manual_seed(1)
    cores = torch.randn(3, 3, 3, generator=g, dtype=torch.float64)
    u, t = rank1_cores(cores)  # fixed rule: largest |u_a| positive
    previous = torch.stack([u[0] + 0.3, -u[1] + 0.3, torch.zeros(3, dtype=torch.float64)])  # near u, near -u, none
    u2, t2 = rank1_cores(cores, previous)
    flip = torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)  # a zero previous keeps the fixed rule
    torch.testing.assert_close(u2, u * flip)
    torch.testing.assert_close(t2, t * flip)  # t flips with u: u t^T unchanged


def test_tucker_bad_input_raises():
    s = torch.randn(2, 2, 5)
    cores = torch.randn(2, 2, 2)
    with pytest.raises(ValueError, match=r"m must be in \[1, n=5\]"):
        tucker_topk(s, s, cores, 6)
    with pytest.raises(ValueError, match=r"cores must be \(c, r, r\) with r=2"):
        tucker_topk(s, s, torch.randn(2, 3, 3), 2)
    with pytest.raises(ValueError, match="s_row and s_col must be"):
        tucker_exact_topk(s, torch.randn(2, 2, 4), cores, 2)
    with pytest.raises(ValueError, match="u and t must be given together"):
        tucker_topk(s, s, cores, 2, u=torch.ones(2))
    with pytest.raises(ValueError, match=r"u and t must have shape \(2,\)"):
        tucker_topk(s, s, cores, 2, u=torch.ones(3), t=torch.ones(3))
    for bad in (1, 6):
        with pytest.raises(ValueError, match=rf"candidates must be 0 \(m\) or in \[m=2, n=5\], got {bad}"):
            tucker_topk(s, s, cores, 2, candidates=bad)


def test_candidate_pruning_keeps_exactness_at_m_equals_n():
    # m = n: the pruned grid has about m ln m cells; the result must still be the full top-n
    g = torch.Generator().manual_seed(5)
    s1, s2 = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    _, idx = subkey_scores_topk(s1, s2, 16)
    assert torch.equal(idx, loop_topk(s1, s2, 16))
    assert 16 * math.log(16) < 16 * 16  # the pruning is worth it


def test_retrieval_bench_script_runs_small(capsys):
    from minimem_tools.bench.retrieval import main

    assert main(["--n", "32", "--m", "8", "--tokens", "16", "--d-key", "8", "--sweep", "8", "16"]) == 0
    out = capsys.readouterr().out
    assert "ratio" in out and "same indices" in out and "1,024" in out and "256" in out
    with pytest.raises(SystemExit):
        main(["--m", "8", "--sweep", "4"])  # n < m is refused, not clamped


def test_signed_search_finds_the_slots_whose_factor_scores_are_both_negative():
    """``signed`` adds the bottom-M of each side: on signed scores it recalls far more of the exact top-m
    than top-M alone; with 2M = n it searches every row and column, so it is exact; and it rejects 2M > n."""
    from minimem.tucker import tucker_exact_topk, tucker_recall, tucker_topk

    g = torch.Generator().manual_seed(0)
    T, r, n, m = 256, 2, 16, 4
    s_row, s_col = torch.randn(T, r, n, generator=g), torch.randn(T, r, n, generator=g)
    cores = torch.rand(2, r, r, generator=g)
    plain = tucker_recall(s_row, s_col, cores, m)
    signed = tucker_recall(s_row, s_col, cores, m, signed=True)
    assert signed > plain + 0.2, (plain, signed)
    _, full = tucker_topk(s_row, s_col, cores, m, candidates=n // 2, signed=True)
    _, exact = tucker_exact_topk(s_row, s_col, cores, m)
    assert torch.equal(full.sort(1).values, exact.sort(1).values)  # every row and column: exact
    with pytest.raises(ValueError, match="candidates"):
        tucker_topk(s_row, s_col, cores, m, candidates=n // 2 + 1, signed=True)
