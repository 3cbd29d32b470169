"""PKM [PKM]: the layer against a slot-by-slot loop, gradcheck, BatchNorm, usage, config errors, training."""

import math
from pathlib import Path

import pytest
import torch

from minimem.config import ModelConfig, PKMConfig
from minimem.model import GPT
from minimem.pkm import PKM

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_config(**memory):
    fields = dict(kind="pkm", n_slots=36, heads=2, topk=4, d_key=8)
    fields.update(memory)
    config = ModelConfig(n_embd=16, n_head=2, n_layer=2, block_size=8, memory=PKMConfig(**fields))
    config.validate()  # what loading does; the layer itself does not re-check
    return config


def make_pkm(seed=0, **memory):
    torch.manual_seed(seed)
    pkm = PKM(make_config(**memory), layer=0).double()
    with torch.no_grad():  # non-trivial norm affine parameters
        for p in pkm.query_norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return pkm


def loop_queries(pkm, x):
    """x (T, h) -> (T, H, D_k): W_q x, then LayerNorm per head / BatchNorm per feature, written out."""
    H, d_k = pkm.heads, pkm.d_key
    q = x @ pkm.query.weight.T
    if pkm.query_norm_kind == "layernorm":
        q = q.view(-1, H, d_k)
        mu = q.mean(-1, keepdim=True)
        var = ((q - mu) ** 2).mean(-1, keepdim=True)
        return (q - mu) / torch.sqrt(var + pkm.query_norm.eps) * pkm.query_norm.weight + pkm.query_norm.bias
    if pkm.query_norm_kind == "batchnorm":
        bn = pkm.query_norm
        if bn.training:
            mu, var = q.mean(0), ((q - q.mean(0)) ** 2).mean(0)  # batch statistics, biased variance
        else:
            mu, var = bn.running_mean, bn.running_var
        return ((q - mu) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias).view(-1, H, d_k)
    return q.view(-1, H, d_k)


def loop_retrieve(pkm, q_head, head):
    """All N slot scores of one head's query by two loops; top-m by (score desc, s1 desc, i, s2 desc, j)."""
    n, half = pkm.n_keys, pkm.d_key // 2
    K1, K2 = pkm.keys[head, 0], pkm.keys[head, 1]
    slots = []
    for i in range(n):
        s1 = float((q_head[:half] @ K1[i]).detach())
        for j in range(n):
            s2 = float((q_head[half:] @ K2[j]).detach())
            slots.append((-(s1 + s2), -s1, i, -s2, j))
    slots.sort()
    chosen = slots[: pkm.topk]
    idx = [i * n + j for (_, _, i, _, j) in chosen]
    scores = torch.stack([q_head[:half] @ K1[i] + q_head[half:] @ K2[j] for (_, _, i, _, j) in chosen])
    return idx, scores


def loop_pkm(pkm, x):
    B, T, h = x.shape
    x = x.reshape(B * T, h)
    q = loop_queries(pkm, x)
    outs = []
    for t in range(B * T):
        out = torch.zeros(pkm.d_value, dtype=x.dtype)
        for head in range(pkm.heads):
            idx, scores = loop_retrieve(pkm, q[t, head], head)
            w = torch.softmax(scores, 0) if pkm.use_softmax else scores
            for i, slot in enumerate(idx):
                out = out + w[i] * pkm.values[slot]
        outs.append(out)
    out = torch.stack(outs)
    if pkm.out_proj is not None:
        out = out @ pkm.out_proj.weight.T
    return out.view(B, T, h)


@pytest.mark.parametrize(
    "memory",
    [
        {},
        {"heads": 1, "topk": 6},
        {"softmax": False},
        {"d_value": 12},
        {"query_norm": "none", "heads": 3},
        {"query_norm": "batchnorm"},
    ],
    ids=["default", "one-head-m=n", "no-softmax", "dv-projection", "no-norm", "batchnorm"],
)
def test_pkm_equals_loop_reference(memory):
    pkm = make_pkm(**memory)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    out = pkm(x)
    assert out.shape == (2, 3, 16)
    assert torch.allclose(out, loop_pkm(pkm, x), atol=1e-10)
    # last retrieval kept for visualisation
    assert pkm.last_indices.shape == pkm.last_scores.shape == pkm.last_weights.shape == (2, 3, pkm.heads, pkm.topk)
    if pkm.use_softmax:
        assert torch.allclose(pkm.last_weights.sum(-1), torch.ones(2, 3, pkm.heads, dtype=torch.float64))


def test_pkm_batchnorm_eval_uses_running_stats_and_train_leaks_across_positions():
    pkm = make_pkm(query_norm="batchnorm")
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    pkm.train()
    out = pkm(x)
    x2 = x.clone()
    x2[0, -1] += 3.0  # change only the last position
    out2 = pkm(x2)
    assert not torch.allclose(out[0, 0], out2[0, 0])  # BatchNorm: position 0 saw position 5
    pkm.eval()
    assert torch.allclose(pkm(x), loop_pkm(pkm, x), atol=1e-10)
    assert torch.allclose(pkm(x)[0, :5], pkm(x2)[0, :5])  # running statistics: no leak
    ln = make_pkm(query_norm="layernorm").train()
    assert torch.allclose(ln(x)[0, :5], ln(x2)[0, :5])  # LayerNorm never leaks


def test_pkm_gradcheck_float64():
    pkm = make_pkm(seed=1)
    x = torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pkm, (x,))
    pkm(x).pow(2).sum().backward()
    for name in ("query.weight", "keys", "values"):
        grad = dict(pkm.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # only the selected value rows get a gradient
    used = set(pkm.last_indices.flatten().tolist())
    rows_with_grad = set(torch.nonzero(pkm.values.grad.abs().sum(1)).flatten().tolist())
    assert rows_with_grad == used


def test_pkm_usage_counters_and_score_grid():
    pkm = make_pkm(seed=2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pkm.train()
    pkm(x)
    pkm(x)
    idx, w = pkm.last_indices.flatten(), pkm.last_weights.flatten()
    expected_counts = 2 * torch.bincount(idx, minlength=36)
    assert torch.equal(pkm.usage_counts, expected_counts)
    expected_mass = torch.zeros(36, dtype=torch.float64).index_add_(0, idx, w)
    assert torch.allclose(pkm.usage_weights, 2 * expected_mass)
    pkm.eval()
    pkm(x)
    assert torch.equal(pkm.usage_counts, expected_counts)  # eval mode does not count
    pkm.reset_usage()
    assert pkm.usage_counts.sum() == 0 and pkm.usage_weights.sum() == 0
    # score grid of one token: every slot's score; its top-m are the retrieved slots
    grid = pkm.score_grid(x[1, 2])
    assert grid.shape == (2, 6, 6)
    q = loop_queries(pkm, x[1, 2].unsqueeze(0))[0]
    for head in range(2):
        for i in range(6):
            for j in range(6):
                expect = q[head, :4] @ pkm.keys[head, 0, i] + q[head, 4:] @ pkm.keys[head, 1, j]
                assert torch.isclose(grid[head, i, j], expect)
        top = torch.sort(grid[head].flatten(), descending=True).indices[:4]
        assert set(top.tolist()) == set(pkm.last_indices[1, 2, head].tolist())
    with pytest.raises(ValueError, match=r"x_token must have shape \(h,\) = \(16,\)"):
        pkm.score_grid(x[1])


def test_pkm_values_init_and_flags():
    pkm = PKM(make_config(n_slots=4096, topk=8), layer=0)
    assert pkm.values.is_memory_value
    assert pkm.values.std().item() == pytest.approx(16**-0.5, rel=0.05)  # N(0, D_v^-1/2) [PKM]
    bound = 1 / math.sqrt(4)
    assert pkm.keys.abs().max() <= bound and pkm.keys.abs().max() > 0.9 * bound


def test_pkm_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model.memory.n_slots must be a perfect square"):
        PKM(make_config(n_slots=40), layer=0)
    with pytest.raises(ValueError, match=r"model.memory.topk \(m\) must be in \[1, n=6\]"):
        PKM(make_config(topk=7), layer=0)
    with pytest.raises(ValueError, match=r"model.memory.kind of a PKMConfig must be 'pkm', got 'peer'"):
        PKM(make_config(kind="peer"), layer=0)
    with pytest.raises(ValueError, match=r"model.memory.query_norm must be one of"):
        PKM(make_config(query_norm="rmsnorm"), layer=0)


# ----------------------------------------------------------------------------- training


def shakespeare_batches(block, batch, steps, seed=0):
    root = Path(__file__).resolve().parents[1]
    text = (root / "minimem" / "assets" / "tinyshakespeare.txt").read_text()[:200_000]
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([stoi[c] for c in text])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + block] for s in start])
        y = torch.stack([data[s + 1 : s + block + 1] for s in start])
        yield x, y


def train_losses(config, steps=50, lr=3e-3):
    torch.manual_seed(0)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for x, y in shakespeare_batches(config.block_size, 8, steps):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_gpt_with_pkm_trains():
    config = ModelConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        block_size=32,
        ffn_hidden=86,
        memory=PKMConfig(n_slots=256, heads=2, topk=8),
    )
    model, losses = train_losses(config)
    pkm = model.blocks[1].ffn
    assert isinstance(pkm, PKM) and not isinstance(model.blocks[0].ffn, PKM)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 3.8  # about log(65) at the start
    assert last < first - 0.6, (first, last)
    assert int((pkm.usage_counts > 0).sum()) > 64  # many slots were used while training
    torch.manual_seed(0)
    init = GPT(config).blocks[1].ffn
    moved = (pkm.values.detach() - init.values).abs().sum(1) > 0
    assert torch.equal(moved, pkm.usage_counts > 0)  # exactly the retrieved value rows were trained
    assert not torch.equal(pkm.keys.detach(), init.keys)
