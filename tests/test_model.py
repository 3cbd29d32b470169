"""The GPT (minimem.model) and the MoE FFN (minimem.ffn) against slow references written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimem.config import ModelConfig, MoEConfig
from minimem.ffn import MoE
from minimem.generate import generate
from minimem.model import GPT, RMSNorm, Rotary, SwiGLU

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, ffn_hidden=24)
    base.update(kw)
    return ModelConfig(**base)


def tiny_moe(**moe) -> ModelConfig:
    return tiny(ffn="moe", moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "d_expert": 8, **moe}))


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("make", [tiny, tiny_moe], ids=["dense", "moe"])
def test_future_tokens_do_not_change_past_logits(make):
    torch.manual_seed(0)
    model = GPT(make()).eval()
    idx = torch.randint(0, 11, (3, 16))
    logits, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 9, changed[:, t:].shape)) % 11
        new, _ = model(changed)
        torch.testing.assert_close(new[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(new[:, t], logits[:, t]), "the changed token must change its own logits"


# ----------------------------------------------------------------------------- rotary


def rotary_slow(x: torch.Tensor, base: float) -> torch.Tensor:
    """Su et al. (2021), eq. 34: channel pair (2i, 2i+1) at position t rotated by t * base^(-2i/d)."""
    *lead, T, d = x.shape
    out = torch.empty_like(x)
    for t in range(T):
        for i in range(d // 2):
            theta = t * base ** (-2 * i / d)
            rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=x.dtype)
            out[..., t, 2 * i : 2 * i + 2] = x[..., t, 2 * i : 2 * i + 2] @ rot.T
    return out


def test_rotary_matches_slow_rotation_matrices():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    rotary = Rotary(head_dim=8, max_len=12, base=100.0)
    torch.testing.assert_close(rotary(x), rotary_slow(x, 100.0), rtol=1e-6, atol=1e-6)


def test_rotary_gradcheck_float64_and_dtype_round_trip():
    rotary = Rotary(head_dim=6, max_len=5)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rotary, (x,))
    half = torch.randn(1, 2, 5, 6, dtype=torch.bfloat16)
    out = rotary(half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rotary(half.float()), rtol=1e-2, atol=1e-2)
    strided = torch.randn(3, 5, 2, 6)[:, :, 1]  # a non-contiguous view, like q out of the qkv projection
    torch.testing.assert_close(rotary(strided), rotary(strided.contiguous()))


def test_rotary_scores_depend_only_on_the_offset():
    torch.manual_seed(1)
    rotary = Rotary(head_dim=16, max_len=32)
    q, k = torch.randn(16), torch.randn(16)

    def score(tq, tk):  # place q at position tq and k at tk in otherwise empty sequences
        xq, xk = torch.zeros(1, 32, 16), torch.zeros(1, 32, 16)
        xq[0, tq], xk[0, tk] = q, k
        return (rotary(xq)[0, tq] @ rotary(xk)[0, tk]).item()

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-4)
    assert score(7, 3) == pytest.approx(score(4, 0), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


# ----------------------------------------------------------------------------- norms, FFN, attention


def test_rmsnorm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
    x = torch.randn(4, 6)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_swiglu_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(6, 5)
    x = torch.randn(3, 6)
    w1, w3 = ffn.w13.weight[:5], ffn.w13.weight[5:]
    expected = (F.silu(x @ w1.T) * (x @ w3.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)


def test_attention_matches_explicit_causal_softmax():
    torch.manual_seed(0)
    model = GPT(tiny())
    attn = model.blocks[0].attn
    x = torch.randn(2, 7, 16)
    B, T, C, H, d = 2, 7, 16, 2, 8
    q, k, v = (x @ attn.qkv.weight.T).split(C, dim=-1)
    heads = lambda t: t.view(B, T, H, d).transpose(1, 2)
    q, k, v = rotary_slow(heads(q), 10000.0), rotary_slow(heads(k), 10000.0), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), y @ attn.proj.weight.T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPT


def test_gpt_loss_is_masked_cross_entropy_and_ties_embeddings():
    torch.manual_seed(0)
    model = GPT(tiny())
    assert model.lm_head.weight is model.tok_emb.weight
    idx = torch.randint(0, 11, (2, 16))
    targets = torch.randint(0, 11, (2, 16))
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 11)
    keep = targets != -1
    expected = -logits.log_softmax(-1)[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.last_ce_loss, expected)
    assert model.last_aux_loss.item() == 0.0


def test_gpt_rejects_too_long_input_and_samples_past_its_block():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 3, temperature=-1.0)
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), 20)  # runs past block_size: crops the context
    assert out.shape == (2, 23) and out.min() >= 0 and out.max() < 11


def test_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, n_embd=64, n_head=4, ffn_hidden=256))
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].ffn.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)


def test_after_optimizer_step_reaches_every_module():
    model = GPT(tiny())
    calls = []
    for block in model.blocks:
        block.ffn.after_optimizer_step = lambda b=block: calls.append(b)
    model.after_optimizer_step()
    assert calls == list(model.blocks)


# ----------------------------------------------------------------------------- MoE


def moe_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: softmax router, top-k experts weighted by their probabilities."""
    d = moe.config.d_expert
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ moe.router.weight.T, dim=-1)
        for e in torch.topk(probs, moe.config.top_k).indices.tolist():
            w1, w3 = moe.w13[e][:, :d], moe.w13[e][:, d:]
            out[t] += probs[e] * ((F.silu(x[t] @ w1) * (x[t] @ w3)) @ moe.w2[e])
        if moe.shared is not None:
            out[t] += moe.shared(x[t])
    return out


def moe_aux_by_hand(moe: MoE, x: torch.Tensor) -> float:
    """Switch Transformer balance loss: weight * E * sum_e f_e P_e, counted with loops."""
    E, k = moe.config.n_experts, moe.config.top_k
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    counts = [0] * E
    for t in range(x.shape[0]):
        for e in torch.topk(probs[t], k).indices.tolist():
            counts[e] += 1
    total = 0.0
    for e in range(E):
        f_e = counts[e] / (x.shape[0] * k)
        p_e = sum(probs[t, e].item() for t in range(x.shape[0])) / x.shape[0]
        total += f_e * p_e
    return moe.config.aux_loss_weight * E * total


@pytest.mark.parametrize("shared", [False, True])
def test_moe_matches_per_token_loop(shared):
    torch.manual_seed(0)
    moe = MoE(12, MoEConfig(n_experts=5, top_k=2, d_expert=7, shared_expert=shared), n_layer=2)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # spread the routing over the experts
        moe.w2.normal_(0, 0.2)
    x = torch.randn(2, 9, 12)
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, 12), moe_loop(moe, x.reshape(-1, 12)), rtol=1e-5, atol=1e-6)
    assert moe.last_indices.shape == (18, 2)


@pytest.mark.parametrize("tokens, experts_run", [(1, 2), (3, None)])
def test_moe_runs_only_the_experts_its_tokens_chose(tokens, experts_run):
    """Each expert runs on exactly the tokens that chose it: decoding one token runs its k experts, not all E."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    moe = MoE(12, MoEConfig(n_experts=8, top_k=2, d_expert=5))
    x = torch.randn(tokens, 12)
    with FlopCounterMode(display=False) as counter:
        out = moe(x)
    used = int((torch.bincount(moe.last_indices.flatten(), minlength=8) > 0).sum())
    assert experts_run is None or used == experts_run
    router, per_pair = 2 * tokens * 12 * 8, 2 * (12 * 2 * 5 + 5 * 12)  # x W13 (12 x 10) and h W2 (5 x 12)
    assert counter.get_total_flops() == router + tokens * 2 * per_pair  # top-2: two (token, expert) pairs a token
    torch.testing.assert_close(out, moe_loop(moe, x), rtol=1e-5, atol=1e-6)


def test_moe_aux_loss_matches_hand_computation():
    torch.manual_seed(0)
    moe = MoE(12, MoEConfig(n_experts=6, top_k=3, d_expert=4, aux_loss_weight=0.5))
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    x = torch.randn(20, 12)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(moe_aux_by_hand(moe, x), rel=1e-5)
    # perfectly uniform routing gives weight * E * k/E... = weight * 1: the loss's minimum value
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(0.5, rel=1e-6)


def test_moe_gradcheck_float64():
    torch.manual_seed(0)
    moe = MoE(4, MoEConfig(n_experts=3, top_k=2, d_expert=2)).double()
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    named = dict(moe.named_parameters())
    params = [named[n].detach().clone().requires_grad_(True) for n in ("router.weight", "w13", "w2")]

    def f(x, router, w13, w2):
        out = torch.func.functional_call(moe, {"router.weight": router, "w13": w13, "w2": w2}, (x,))
        return out, moe.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_gpt_with_moe_adds_the_aux_loss():
    torch.manual_seed(0)
    model = GPT(tiny_moe(aux_loss_weight=0.1))
    idx = torch.randint(0, 11, (2, 16))
    _, loss = model(idx, idx)
    aux = sum(block.ffn.aux_loss for block in model.blocks)
    assert model.last_aux_loss.item() > 0
    torch.testing.assert_close(model.last_aux_loss, aux.detach())
    torch.testing.assert_close(loss, model.last_ce_loss + aux)


def test_moe_rejects_bad_config():
    with pytest.raises(ValueError, match="moe.top_k"):
        MoE(8, MoEConfig(n_experts=4, top_k=5))
    with pytest.raises(ValueError, match="moe.n_experts"):
        MoE(8, MoEConfig(n_experts=0, top_k=1))
