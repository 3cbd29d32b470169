"""UltraMem [UM]: forward vs a slow loop reference, gradcheck, SVD refresh, IVE shuffle, errors, training."""

import math
from pathlib import Path

import pytest
import torch

from minimem.config import config_from_dict, load_config
from minimem.model import GPT
from minimem.tucker import tucker_exact_topk
from minimem.ultramem import TuckerRetrieval, UltraMem, retrieval_recall

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(**memory):
    mem = dict(
        kind="ultramem",
        skip=[[0, 1]],
        n_slots=16,
        expansion=4,
        topk=3,
        d_key=8,
        d_value=8,
        cores=2,
        rank=2,
        heads=2,
        softmax=False,
    )
    mem.update(memory)
    return config_from_dict({"model": {"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 8, "memory": mem}}).model


# --------------------------------------------------------------------------- slow loop reference


def layer_norm(v, gain, eps=1e-5):
    mu = sum(v) / len(v)
    var = sum((e - mu) ** 2 for e in v) / len(v)
    return [(e - mu) / math.sqrt(var + eps) * g for e, g in zip(v, gain)]


def rms_norm(v, gain, eps):
    rms = math.sqrt(sum(e * e for e in v) / len(v) + eps)
    return [e / rms * g for e, g in zip(v, gain)]


def loop_tucker(retrieval, x):
    """TDQKR + MCS for one token x (list of h floats), in plain loops: [(per-core scores, slot)].

    The options: RMSNorm query / key norms, M = ``candidates`` rows and columns, all n (exact search).
    """
    H, r, d, n, m = retrieval.heads, retrieval.rank, retrieval.half, retrieval.n_keys, retrieval.topk
    M = n if retrieval.exact else retrieval.candidates or m
    norm = layer_norm
    if isinstance(retrieval.query_norm, torch.nn.RMSNorm):
        assert retrieval.query_norm.eps == retrieval.key_norm.eps == 1e-6
        norm = lambda v, gain: rms_norm(v, gain, 1e-6)  # noqa: E731

    W = retrieval.query.weight.tolist()
    q_all = [sum(w * e for w, e in zip(row, x)) for row in W]
    gq, gk = retrieval.query_norm.weight.tolist(), retrieval.key_norm.weight.tolist()
    keys = retrieval.keys.tolist()  # (H, 2, r, n, d)
    out = []
    for head in range(H):
        S = [[None] * r for _ in range(2)]  # S[side][rank] = list of n scores
        for side in range(2):
            for a in range(r):
                start = ((head * 2 + side) * r + a) * d  # weight rows ordered (head, side, rank, channel)
                q = norm(q_all[start : start + d], gq)
                S[side][a] = [sum(qe * ke for qe, ke in zip(q, norm(keys[head][side][a][i], gk))) for i in range(n)]
        u, t = retrieval.u[head].tolist(), retrieval.t[head].tolist()
        cores = retrieval.cores[head].tolist()  # (c, r, r)
        row_key = [sum(u[a] * S[0][a][i] for a in range(r)) for i in range(n)]
        col_key = [sum(t[b] * S[1][b][j] for b in range(r)) for j in range(n)]
        rows = sorted(range(n), key=lambda i: -row_key[i])[:M]
        cols = sorted(range(n), key=lambda j: -col_key[j])[:M]
        cand = []
        for i in rows:
            for j in cols:
                per_core = [sum(S[0][a][i] * C[a][b] * S[1][b][j] for a in range(r) for b in range(r)) for C in cores]
                cand.append((sum(per_core), per_core, i * n + j))
        cand.sort(key=lambda c: -c[0])
        out += [(c[1], c[2]) for c in cand[:m]]
    return out


def loop_ultramem(layer, x):
    """UltraMem forward for x (B, T, h), token by token: RMSNorm, TDQKR, IVE pooling, E projections."""
    B, T, h = x.shape
    N, E, Dv = layer.n_slots, layer.expansion, layer.d_value
    c = layer.n_cores
    width = Dv // c
    g = layer.norm.weight.tolist()
    Wp = layer.value_proj.weight  # (h, E Dv) = [W_1 ... W_E] side by side
    out = torch.zeros(B, T, h, dtype=x.dtype)
    rows_read = []
    for b in range(B):
        for t in range(T):
            v = x[b, t].tolist()
            rms = math.sqrt(sum(e * e for e in v) / h + 1e-6)
            xn = [e / rms * w for e, w in zip(v, g)]
            pooled = [torch.zeros(Dv, dtype=x.dtype) for _ in range(E)]
            token_rows = []
            for scores, slot in loop_tucker(layer.retrieval, xn):
                virtual = int(layer.shuffle[slot])
                p, row = virtual // N, virtual % N
                token_rows.append(row)
                for k in range(c):
                    pooled[p][k * width : (k + 1) * width] += scores[k] * layer.values[row, k * width : (k + 1) * width]
            for p in range(E):
                out[b, t] += Wp[:, p * Dv : (p + 1) * Dv] @ pooled[p]
            rows_read.append(sorted(token_rows))
    return out, rows_read


@pytest.mark.parametrize("expansion,heads,softmax", [(4, 2, False), (1, 1, False), (4, 1, True)])
def test_forward_matches_loop_reference(expansion, heads, softmax):
    torch.manual_seed(0)
    layer = UltraMem(tiny_config(expansion=expansion, heads=heads, softmax=softmax), 0, 1).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    if softmax:  # reference: softmax of each core's m scores per head, applied to the loop's raw scores
        ref = softmax_reference(layer, x)
    else:
        ref, rows = loop_ultramem(layer, x)
        assert [sorted(r) for r in layer.last_indices.view(-1, heads * 3).tolist()] == rows
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        dict(qk_norm="rmsnorm"),  # the official config's query / key norm
        dict(candidates=5),  # a 5 x 5 candidate grid instead of m x m = 3 x 3
        dict(search="exact"),  # the exact top-m of all 64 virtual slots
        dict(candidates=8, qk_norm="rmsnorm", rank1_sign="continuous"),
    ],
)
def test_retrieval_options_match_loop_reference(options):
    torch.manual_seed(0)
    layer = UltraMem(tiny_config(**options), 0, 1).double()
    with torch.no_grad():  # signed cores: the rank-1 candidates miss some of the exact top-m
        layer.retrieval.cores.normal_()
        layer.retrieval.refresh_rank1()
    x = torch.randn(4, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    ref, rows = loop_ultramem(layer, x)
    assert [sorted(r) for r in layer.last_indices.view(-1, 2 * 3).tolist()] == rows
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    default = UltraMem(tiny_config(), 0, 1).double()  # the same weights with today's retrieval differ
    default.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert not torch.allclose(default(x), out)


def test_rmsnorm_scale_scores_scales_every_grid_score():
    torch.manual_seed(1)
    retrieval = TuckerRetrieval(16, 8, 8, rank=2, cores=2, heads=2, topk=3, softmax=False, qk_norm="rmsnorm")
    retrieval.double().init_weights(0.3, 0.3, 0.7)
    assert isinstance(retrieval.query_norm, torch.nn.RMSNorm) and torch.all(retrieval.key_norm.weight == 0.7)
    x = torch.randn(5, 16, dtype=torch.float64)

    def grid():  # (H, T, n, n): every slot's summed-core score
        s = retrieval.rank_scores(x)  # (T, H, 2, r, n)
        return torch.einsum("thai,hab,thbj->htij", s[:, :, 0], retrieval.cores.sum(1), s[:, :, 1])

    with torch.no_grad():
        before, (scores, slots) = grid(), retrieval(x)
        retrieval.scale_scores(2.5)
        after, (scores2, slots2) = grid(), retrieval(x)
    torch.testing.assert_close(after, 2.5 * before, rtol=1e-12, atol=0)
    assert torch.equal(slots, slots2)
    torch.testing.assert_close(scores2, 2.5 * scores, rtol=1e-12, atol=0)


def test_rank1_sign_fixed_and_continuous():
    """(u, t) of a core whose u moves past the point where its largest |entry| changes sign."""
    retrievals = {
        sign: TuckerRetrieval(16, 8, 8, rank=2, cores=1, heads=1, topk=3, softmax=False, rank1_sign=sign)
        for sign in ("fixed", "continuous")
    }
    b = torch.tensor([0.6, 0.8])
    for a in ([0.8, -0.6], [0.6, -0.8]):  # u turns by 16 degrees; its largest |entry| changes sign
        for retrieval in retrievals.values():
            with torch.no_grad():
                retrieval.cores.copy_(torch.outer(torch.tensor(a), b).view(1, 1, 2, 2))
            retrieval.refresh_rank1()
        fixed, continuous = retrievals["fixed"], retrievals["continuous"]
        for r in (fixed, continuous):  # both are the leading singular pair: u t^T = C / sigma
            torch.testing.assert_close(torch.outer(r.u[0], r.t[0]), torch.outer(torch.tensor(a), b))
        assert fixed.u[0, fixed.u[0].abs().argmax()] > 0  # fixed: largest |u_a| positive
    # fixed flipped to (-0.6, 0.8) at the second core; continuous kept following the first u
    torch.testing.assert_close(fixed.u[0], torch.tensor([-0.6, 0.8]))
    torch.testing.assert_close(fixed.t[0], -b)
    torch.testing.assert_close(continuous.u[0], torch.tensor([0.6, -0.8]))
    torch.testing.assert_close(continuous.t[0], b)


def test_retrieval_recall_of_a_small_model():
    """Exact top-m found by each layer's configured search, on the model's own hidden states."""
    torch.manual_seed(4)
    idx = torch.randint(tiny_config().vocab_size, (2, 8))
    first = GPT(tiny_config(skip=[[0, 1], [0, 1]], rank=3, cores=1))
    with torch.no_grad():  # signed cores: the rank-1 candidates miss some of the exact top-m
        for mem in first.skip_memories:
            mem.retrieval.cores.normal_()
            mem.retrieval.refresh_rank1()
    recalls = {}
    options = {"m": {}, "5": dict(candidates=5), "n_keys": dict(candidates=8), "exact": dict(search="exact")}
    for name, option in options.items():
        model = GPT(tiny_config(skip=[[0, 1], [0, 1]], rank=3, cores=1, **option)).train()
        model.load_state_dict(first.state_dict())
        recalls[name] = retrieval_recall(model, idx)
        assert model.training  # its mode is restored
    assert 0.0 < recalls["m"] < recalls["5"] < 1.0 and recalls["n_keys"] == recalls["exact"] == 1.0
    # against the layers' own searches run by hand on the hidden state each layer reads (block 0's input)
    found = []
    for mem in first.skip_memories:
        ret, hidden = mem.retrieval, mem.norm(first.tok_emb(idx)).reshape(-1, 16)
        for head, s in enumerate(ret.rank_scores(hidden).unbind(1)):
            _, fast = ret.search(*s.unbind(1), ret.cores[head], 3, ret.u[head], ret.t[head])
            _, exact = tucker_exact_topk(*s.unbind(1), ret.cores[head], 3)
            found.append(float((fast.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean()))
    assert recalls["m"] == pytest.approx(sum(found) / len(found), rel=1e-12)
    with pytest.raises(ValueError, match="retrieval_recall needs a model with Tucker retrieval"):
        retrieval_recall(GPT(config_from_dict({"model": {"n_layer": 1, "n_embd": 16, "n_head": 2}}).model), idx)


def softmax_reference(layer, x):
    """Loop reference with per-head, per-core softmax over the m scores (the ablation option)."""
    B, T, h = x.shape
    N, E, Dv, c, m = layer.n_slots, layer.expansion, layer.d_value, layer.n_cores, layer.retrieval.topk
    width = Dv // c
    out = torch.zeros(B, T, h, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            xn = (layer.norm(x[b, t : t + 1])[0]).tolist()
            picks = loop_tucker(layer.retrieval, xn)
            pooled = [torch.zeros(Dv, dtype=x.dtype) for _ in range(E)]
            for start in range(0, len(picks), m):  # one head at a time
                head = picks[start : start + m]
                weights = torch.softmax(torch.tensor([s for s, _ in head], dtype=x.dtype), dim=0)  # (m, c)
                for (_, slot), w in zip(head, weights):
                    virtual = int(layer.shuffle[slot])
                    for k in range(c):
                        pooled[virtual // N][k * width : (k + 1) * width] += (
                            w[k] * layer.values[virtual % N, k * width : (k + 1) * width]
                        )
            out[b, t] = layer.value_proj(torch.cat(pooled))
    return out


def test_usage_and_visualisation_state():
    layer = UltraMem(tiny_config(), 0, 1)
    x = torch.randn(2, 5, 16)
    layer(x)
    assert layer.last_indices.shape == (2, 5, 6) and layer.last_scores.shape == (2, 5, 6, 2)
    assert int(layer.usage_counts.sum()) == 2 * 5 * 6
    expected = torch.bincount(layer.last_indices.flatten(), minlength=16)
    assert torch.equal(layer.usage_counts, expected)
    assert int(layer.last_indices.max()) < 16  # physical rows, not virtual slots
    layer.reset_usage()
    assert int(layer.usage_counts.sum()) == 0


# --------------------------------------------------------------------------- gradients


def test_gradcheck_float64():
    torch.manual_seed(1)
    layer = UltraMem(tiny_config(), 0, 1).double()
    names = [n for n, _ in layer.named_parameters()]
    assert {
        "values",
        "value_proj.weight",
        "retrieval.cores",
        "retrieval.keys",
        "retrieval.query.weight",
        "retrieval.query_norm.weight",
        "retrieval.key_norm.weight",
        "norm.weight",
    } <= set(names)
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


# --------------------------------------------------------------------------- SVD refresh


def test_rank1_refresh_only_in_after_optimizer_step():
    torch.manual_seed(2)
    retrieval = TuckerRetrieval(dim=16, n_keys=8, d_key=8, rank=3, cores=2, heads=2, topk=3, softmax=False)
    retrieval.init_weights(0.1, 0.1, 1.0)
    for head in range(2):  # (u, t) are the leading singular pair of the summed core, sign fixed
        C = retrieval.cores[head].sum(0).detach().double()
        U, S, Vh = torch.linalg.svd(C)
        u, t = retrieval.u[head].double(), retrieval.t[head].double()
        torch.testing.assert_close(S[0] * torch.outer(u, t), S[0] * torch.outer(U[:, 0], Vh[0]), rtol=1e-5, atol=1e-6)
        assert u[u.abs().argmax()] > 0  # sign rule: largest |entry| of u positive
        assert (u > 0).all() and (t > 0).all()  # U(0, 1) cores: Perron vectors, all positive
    before = (retrieval.u.clone(), retrieval.t.clone())
    with torch.no_grad():
        retrieval.cores.copy_(torch.randn_like(retrieval.cores))  # an "optimiser step" on the cores
    scores, _ = retrieval(torch.randn(4, 16))
    scores.sum().backward()
    assert torch.equal(retrieval.u, before[0]) and torch.equal(retrieval.t, before[1])  # forward never refreshes
    retrieval.refresh_rank1()
    for head in range(2):
        U, S, Vh = torch.linalg.svd(retrieval.cores[head].sum(0).detach())
        sign = 1.0 if U[:, 0][U[:, 0].abs().argmax()] > 0 else -1.0
        torch.testing.assert_close(retrieval.u[head], sign * U[:, 0])
        torch.testing.assert_close(retrieval.t[head], sign * Vh[0])


def test_gpt_after_optimizer_step_refreshes_ultramem():
    model = GPT(tiny_config())
    mem = model.skip_memories[0]
    with torch.no_grad():
        mem.retrieval.cores.mul_(-1.0).add_(torch.randn_like(mem.retrieval.cores))
    stale = mem.retrieval.u.clone()
    model.after_optimizer_step()
    assert not torch.equal(mem.retrieval.u, stale)
    u = mem.retrieval.u[0]
    assert u[u.abs().argmax()] > 0


# --------------------------------------------------------------------------- IVE shuffle


def test_ive_shuffle_is_a_fixed_permutation():
    torch.manual_seed(3)
    a = UltraMem(tiny_config(), 0, 1)
    torch.manual_seed(4)
    b = UltraMem(tiny_config(), 0, 1)
    assert torch.equal(torch.sort(a.shuffle).values, torch.arange(4 * 16))  # a permutation of the E N slots
    assert torch.equal(a.shuffle, b.shuffle)  # seeded by the layer, not the global RNG
    assert not torch.equal(a.shuffle, torch.arange(64))
    other = UltraMem(
        config_from_dict(
            {
                "model": {
                    "n_layer": 3,
                    "n_embd": 16,
                    "n_head": 2,
                    "memory": dict(kind="ultramem", skip=[[0, 2]], n_slots=16, expansion=4, topk=3, d_key=8, d_value=8),
                }
            }
        ).model,
        0,
        2,
    )
    assert not torch.equal(a.shuffle, other.shuffle)  # another (i, j): another permutation
    saved = a.shuffle.clone()
    a(torch.randn(1, 4, 16)).sum().backward()
    a.after_optimizer_step()
    a.reset_memory_parameters()
    assert torch.equal(a.shuffle, saved)
    assert "shuffle" in a.state_dict()  # persistent: a reloaded model maps slots to the same rows


def test_ive_blocks_use_their_own_projection():
    """Zero every projection but W_p: only slots whose shuffled block is p contribute."""
    torch.manual_seed(5)
    layer = UltraMem(tiny_config(heads=1), 0, 1).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    full = layer(x)
    total = torch.zeros_like(full)
    weight = layer.value_proj.weight.detach().clone()
    for p in range(4):
        with torch.no_grad():
            layer.value_proj.weight.zero_()
            layer.value_proj.weight[:, p * 8 : (p + 1) * 8] = weight[:, p * 8 : (p + 1) * 8]
        total += layer(x)
    torch.testing.assert_close(total, full)  # sum over blocks of W_p^T pooled_p


# --------------------------------------------------------------------------- errors


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="d_value=12 must be divisible by model.memory.cores=5"):
        tiny_config(d_value=12, cores=5)
    with pytest.raises(ValueError, match=r"skip pair \[i, j\] = \[1, 1\] needs j > i"):
        tiny_config(skip=[[1, 1]])
    with pytest.raises(ValueError, match=r"skip pair \[i, j\] = \[1, 0\] needs j > i"):
        tiny_config(skip=[[1, 0]])
    with pytest.raises(ValueError, match=r"model.memory.topk \(m\) must be in \[1, n=4\]"):
        tiny_config(topk=5)
    with pytest.raises(ValueError, match="model.memory.expansion .* must be a perfect square, got 2"):
        UltraMem(tiny_config(expansion=2), 0, 1)
    with pytest.raises(ValueError, match=r"skip-layer pair \(i, j\) = \(1, 0\)"):
        UltraMem(tiny_config(), 1, 0)
    for field, bad in (("search", "fast"), ("rank1_sign", "flip"), ("qk_norm", "batchnorm")):
        with pytest.raises(ValueError, match=rf"model.memory.{field} must be one of \(.*\), got '{bad}'"):
            tiny_config(**{field: bad})
    with pytest.raises(ValueError, match=r"model.memory.candidates must be 0 or in \[m=3, n_keys\], got 2"):
        tiny_config(candidates=2)
    with pytest.raises(ValueError, match=r"model.memory.candidates must be 0 or in \[m=3, n_keys=8\], got 9"):
        UltraMem(tiny_config(candidates=9), 0, 1)  # E N = 64 virtual slots: 8 sub-keys per side


# --------------------------------------------------------------------------- config and training


def activated_parameters(model):
    """Parameters a token touches: all, minus the value tables, plus the m D_v entries it reads per head."""
    total = model.num_parameters()
    for mem in model.skip_memories:
        total -= mem.values.numel()
        total += mem.retrieval.heads * mem.retrieval.topk * mem.d_value
    return total


def test_config_matches_dense_activated_parameters():
    cfg = load_config(ROOT / "configs" / "shakespeare-ultramem.yaml")
    dense = GPT(config_from_dict({}).model)
    model = GPT(cfg.model)
    assert cfg.model.memory.kind == "ultramem" and not cfg.model.memory.softmax
    assert abs(activated_parameters(model) - dense.num_parameters()) / dense.num_parameters() < 0.002
    assert model.num_parameters() > 1.1 * dense.num_parameters()  # the memory adds sparse parameters


def shakespeare_batches(block, batch, steps, seed=0):
    text = (ROOT / "minimem" / "assets" / "tinyshakespeare.txt").read_text()
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}  # nanoGPT's 65 characters
    data = torch.tensor([stoi[ch] for ch in text[:200_000]])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + block] for s in start])
        y = torch.stack([data[s + 1 : s + block + 1] for s in start])
        yield x, y


def train_and_check(model, steps=50, lr=3e-3, block=32, batch=8):
    """AdamW on tiny Shakespeare: the loss falls and every value table changes."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    values_before = {id(p): p.detach().clone() for p in model.parameters() if getattr(p, "is_memory_value", False)}
    losses = []
    for x, y in shakespeare_batches(block, batch, steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isfinite(last) and last < first - 0.3, (first, last)
    changed = [not torch.equal(values_before[id(p)], p.detach()) for p in model.parameters() if id(p) in values_before]
    assert changed and all(changed)  # the value tables learn
    return first, last


def test_trains_on_shakespeare():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "shakespeare-ultramem.yaml")
    train_and_check(GPT(cfg.model))
