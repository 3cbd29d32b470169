"""Compiled Triton lookup kernels vs the torch backend on a CUDA GPU (fp32 and bf16 tables)."""

import pytest
import torch

from minimem.kernels import memory_lookup

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)"),
]

# (N, T, m, D_v, D_p, c, pre): ragged small shapes, then the [UM2] Table 10 widths with few tokens.
CASES = [
    (7, 5, 3, 10, 6, 2, True),
    (50, 33, 20, 200, 140, 1, True),
    (1000, 64, 17, 96, 0, 2, False),
    (360**2, 256, 32, 192, 192, 2, True),
    (528**2, 128, 128, 768, 384, 2, True),
    (528**2, 128, 128, 768, 0, 1, False),
]


def make_inputs(N, T, m, d_value, d_pre, cores, pre, table_dtype, act_dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    values = torch.randn(N, d_value, **kw).to(table_dtype)
    indices = torch.randint(0, N, (T, m), **kw)
    indices[:, -1] = indices[:, 0]  # repeated slot in every row
    indices[-1] = indices[0, 0]  # a whole row on one slot (atomic contention)
    scores = torch.randn(T, m, cores, **kw).to(act_dtype)
    pre_values = pre_input = None
    if pre:
        pre_values = (torch.randn(N, d_pre, **kw) / d_pre**0.5).to(table_dtype)
        pre_input = torch.randn(T, d_pre, **kw).to(act_dtype)
    return [values, indices, scores, pre_values, pre_input]


def run(backend, inputs, grad_out, upcast=False):
    inputs = [None if x is None else x.detach() for x in inputs]
    if upcast:  # the reference in fp32 on the same (rounded) table entries
        inputs = [None if x is None or not x.is_floating_point() else x.float() for x in inputs]
    for x in inputs:
        if x is not None and x.is_floating_point():
            x.requires_grad_()
    out = memory_lookup(*inputs, backend=backend)
    trainable = [x for x in inputs if x is not None and x.is_floating_point()]
    return [out] + list(torch.autograd.grad(out, trainable, grad_out.to(out.dtype)))


def check(got, want, rtol, atol):
    for name, a, b in zip(["out", "grad_values", "grad_scores", "grad_pre_values", "grad_pre_input"], got, want):
        scale = b.abs().max().clamp_min(1.0).item()
        torch.testing.assert_close(
            a.float(), b.float(), rtol=rtol, atol=atol * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-T{}-m{}-Dv{}-Dp{}-c{}-pre{}".format(*c))
def test_fp32_matches_torch(case):
    inputs = make_inputs(*case, torch.float32, torch.float32)
    grad_out = torch.randn(case[1], case[3], device="cuda")
    check(run("triton", inputs, grad_out), run("torch", inputs, grad_out), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-T{}-m{}-Dv{}-Dp{}-c{}-pre{}".format(*c))
def test_bf16_tables_accumulate_in_fp32(case):
    inputs = make_inputs(*case, torch.bfloat16, torch.float32)
    grad_out = torch.randn(case[1], case[3], device="cuda")
    got = run("triton", inputs, grad_out)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    want = run("torch", inputs, grad_out, upcast=True)
    # forward and score/pre_input gradients: fp32 results on bf16 entries, fp32 accumulation in both.
    check(got[:1] + got[2:3], want[:1] + want[2:3], rtol=1e-4, atol=1e-5)
    # table gradients are rounded once to bf16 at the end.
    check(got[1:2], [want[1].to(torch.bfloat16)], rtol=1e-2, atol=1e-2)


def test_all_bf16_inputs_give_bf16_output():
    inputs = make_inputs(100, 16, 8, 64, 32, 2, True, torch.bfloat16, torch.bfloat16)
    grad_out = torch.randn(16, 64, device="cuda")
    got = run("triton", inputs, grad_out)
    assert got[0].dtype == torch.bfloat16
    want = run("torch", inputs, grad_out, upcast=True)
    check(got, want, rtol=2e-2, atol=2e-2)


def test_auto_backend_uses_triton_on_cuda(monkeypatch):
    import minimem.kernels.triton_lookup as triton_lookup

    calls = []
    monkeypatch.setattr(triton_lookup, "memory_lookup_triton", lambda *a: calls.append(a) or "triton")
    inputs = make_inputs(10, 2, 2, 4, 0, 1, False, torch.float32, torch.float32)
    assert memory_lookup(*inputs) == "triton" and len(calls) == 1
