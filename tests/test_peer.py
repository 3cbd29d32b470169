"""PEER [PEER]: singleton experts against a loop reference, both lookup paths, gradcheck, training."""

import math
from pathlib import Path

import pytest
import torch

from minimem.config import ModelConfig, PEERConfig, config_from_dict
from minimem.model import GPT
from minimem.peer import PEER

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_config(**memory):
    fields = dict(kind="peer", n_slots=25, heads=2, topk=3, d_key=6, activation="gelu")
    fields.update(memory)
    config = ModelConfig(n_embd=12, n_head=2, n_layer=2, block_size=8, memory=PEERConfig(**fields))
    config.validate()  # what loading does; the layer itself does not re-check
    return config


def make_peer(seed=0, **memory):
    torch.manual_seed(seed)
    return PEER(make_config(**memory), layer=0).double()


ACT = {
    "none": lambda z: z,
    "gelu": lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))),  # exact (erf) GELU
    "relu": lambda z: max(z, 0.0),
    "sigmoid": lambda z: 1 / (1 + math.exp(-z)),
    "silu": lambda z: z / (1 + math.exp(-z)),
}


def loop_peer(peer, x):
    """f(x) = sum_heads sum_i softmax(scores)_i act(<u_i, x>) v_i, every slot scored by loops."""
    B, T, h = x.shape
    x = x.reshape(B * T, h).detach()
    n, half, H, m = peer.n_keys, peer.d_key // 2, peer.heads, peer.topk
    keys = peer.keys.detach()
    q = x @ peer.query.weight.detach().T
    if peer.query_norm_kind == "batchnorm":
        bn = peer.query_norm
        q = (q - q.mean(0)) / torch.sqrt(q.var(0, unbiased=False) + bn.eps) * bn.weight.detach() + bn.bias.detach()
    q = q.view(-1, H, peer.d_key)
    if peer.query_norm_kind == "layernorm":
        ln = peer.query_norm
        q = (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=False, keepdim=True) + ln.eps)
        q = q * ln.weight.detach() + ln.bias.detach()
    out = torch.zeros(B * T, h, dtype=x.dtype)
    for t in range(B * T):
        for head in range(H):
            slots = []
            for i in range(n):
                for j in range(n):
                    s1 = float(q[t, head, :half] @ keys[head, 0, i])
                    s2 = float(q[t, head, half:] @ keys[head, 1, j])
                    slots.append((-(s1 + s2), -s1, i, -s2, j))
            chosen = sorted(slots)[:m]
            scores = torch.tensor([-s for s, *_ in chosen], dtype=x.dtype)
            w = torch.softmax(scores, 0) if peer.use_softmax else scores
            for k, (_, _, i, _, j) in enumerate(chosen):
                e = i * n + j
                gate = ACT[peer.activation](float(peer.down[e].detach() @ x[t]))
                out[t] += w[k] * gate * peer.up[e].detach()
    return out.view(B, T, h)


@pytest.mark.parametrize("activation", ["gelu", "none", "relu", "sigmoid", "silu"])
def test_peer_equals_loop_reference(activation):
    peer = make_peer(activation=activation)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    out = peer(x)
    assert out.shape == (2, 3, 12)
    assert torch.allclose(out, loop_peer(peer, x), atol=1e-10)


@pytest.mark.parametrize("memory", [{"softmax": False}, {"query_norm": "batchnorm"}, {"heads": 1, "topk": 5}])
def test_peer_options_equal_loop_reference(memory):
    peer = make_peer(seed=1, **memory)
    x = torch.randn(1, 4, 12, dtype=torch.float64)
    assert torch.allclose(peer(x), loop_peer(peer, x), atol=1e-10)


@pytest.mark.parametrize("activation", ["gelu", "none"])
def test_peer_gradcheck_float64(activation):
    peer = make_peer(seed=2, activation=activation)
    x = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(peer, (x,))
    # gradients reach the down and up vectors of the selected experts only
    peer(x).pow(2).sum().backward()
    used = set(peer.last_indices.flatten().tolist())
    for table in (peer.down, peer.up):
        assert set(torch.nonzero(table.grad.abs().sum(1)).flatten().tolist()) == used
    assert peer.keys.grad.abs().sum() > 0 and peer.query.weight.grad.abs().sum() > 0


def test_peer_tables_are_memory_values_and_init():
    peer = PEER(make_config(n_slots=4096, topk=8), layer=0)
    assert peer.down.is_memory_value and peer.up.is_memory_value
    assert peer.down.std().item() == pytest.approx(12**-0.5, rel=0.05)
    assert peer.up.std().item() == pytest.approx(12**-0.5, rel=0.05)


def test_peer_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model.memory.n_slots must be a perfect square"):
        PEER(make_config(n_slots=24), layer=0)
    with pytest.raises(ValueError, match=r"model.memory.topk \(m\) must be in \[1, n=5\]"):
        PEER(make_config(topk=6), layer=0)
    with pytest.raises(ValueError, match=r"model.memory.d_value is not a field of kind 'peer'"):  # experts: R^h
        config_from_dict({"model": {"memory": {"kind": "peer", "d_value": 6}}})
    with pytest.raises(ValueError, match=r"model.memory.activation must be one of"):
        PEER(make_config(activation="tanh"), layer=0)
    with pytest.raises(ValueError, match=r"model.memory.kind of a PEERConfig must be 'peer', got 'pkm'"):
        PEER(make_config(kind="pkm"), layer=0)


def test_gpt_with_peer_trains():
    text = (Path(__file__).resolve().parents[1] / "minimem" / "assets" / "tinyshakespeare.txt").read_text()[:200_000]
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    data = torch.tensor([stoi[c] for c in text])
    config = ModelConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        block_size=32,
        ffn_hidden=86,
        memory=PEERConfig(n_slots=256, heads=2, topk=8, activation="gelu"),
    )
    torch.manual_seed(0)
    model = GPT(config)
    peer = model.blocks[1].ffn
    assert isinstance(peer, PEER)
    up_init = peer.up.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        start = torch.randint(0, len(data) - 33, (8,), generator=g)
        x = torch.stack([data[s : s + 32] for s in start])
        y = torch.stack([data[s + 1 : s + 33] for s in start])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 3.8 and last < first - 0.6, (first, last)
    moved = (peer.up.detach() - up_init).abs().sum(1) > 0
    assert torch.equal(moved, peer.usage_counts > 0) and int(moved.sum()) > 64
