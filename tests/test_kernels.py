"""The memory lookup (Specification §6): torch backend vs a python loop, gradcheck, Triton (interpreter) vs torch.

Triton's interpreter is chosen when the kernels are defined, so TRITON_INTERPRET=1 is set here
before anything imports minimem.kernels.triton_lookup (CPU only: on a GPU the kernels compile).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

import minimem.kernels as kernels  # noqa: E402
from minimem.kernels import memory_lookup  # noqa: E402


def loop_lookup(values, indices, scores, pre_values=None, pre_input=None):
    """Specification §6 written slot by slot and core by core: the slow, obviously-correct version."""
    T, m = indices.shape
    d_value, cores = values.shape[1], scores.shape[2]
    width = d_value // cores
    rows = []
    for t in range(T):
        out_t = [torch.zeros(width, dtype=values.dtype) for _ in range(cores)]
        for i in range(m):
            row = int(indices[t, i])
            gate = 1.0 if pre_values is None else (pre_values[row] * pre_input[t]).sum()
            for k in range(cores):
                out_t[k] = out_t[k] + scores[t, i, k] * gate * values[row, k * width : (k + 1) * width]
        rows.append(torch.cat(out_t))
    return torch.stack(rows)


def make_inputs(N, T, m, d_value, d_pre, cores, pre, dtype=torch.float32, seed=0, repeat=True):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(N, d_value, generator=gen, dtype=dtype).requires_grad_()
    indices = torch.randint(0, N, (T, m), generator=gen)
    if repeat and m > 1:
        indices[:, -1] = indices[:, 0]  # repeated slot within every row: must accumulate
    scores = torch.randn(T, m, cores, generator=gen, dtype=dtype).requires_grad_()
    pre_values = pre_input = None
    if pre:
        pre_values = (torch.randn(N, d_pre, generator=gen, dtype=dtype) / d_pre**0.5).requires_grad_()
        pre_input = torch.randn(T, d_pre, generator=gen, dtype=dtype).requires_grad_()
    return values, indices, scores, pre_values, pre_input


def grads(fn, values, indices, scores, pre_values, pre_input, grad_out=None):
    out = fn(values, indices, scores, pre_values, pre_input)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    inputs = [x for x in (values, scores, pre_values, pre_input) if x is not None]
    return [out.detach()] + list(torch.autograd.grad(out, inputs, grad_out))


def assert_close_all(got, want, rtol=1e-5, atol=1e-5):
    names = ["out", "grad_values", "grad_scores", "grad_pre_values", "grad_pre_input"]
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = b.abs().max().clamp_min(1.0) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("cores,pre", [(1, False), (2, False), (1, True), (2, True), (3, True)])
def test_torch_backend_matches_python_loop(cores, pre):
    inputs = make_inputs(N=6, T=4, m=5, d_value=6, d_pre=4, cores=cores, pre=pre, dtype=torch.float64)
    torch_backend = lambda *a: memory_lookup(*a, backend="torch")  # noqa: E731
    assert_close_all(grads(torch_backend, *inputs), grads(loop_lookup, *inputs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cores,pre", [(1, False), (2, True)])
def test_torch_backend_gradcheck_float64(cores, pre):
    values, indices, scores, pre_values, pre_input = make_inputs(8, 3, 4, 6, 5, cores, pre, dtype=torch.float64)
    indices[0] = 2  # the whole first row on one slot

    def fn(*tensors):
        return memory_lookup(*tensors[:1], indices, *tensors[1:], backend="torch")

    tensors = (values, scores) + ((pre_values, pre_input) if pre else ())
    assert torch.autograd.gradcheck(fn, tensors)


def test_torch_backend_mixed_dtypes_return_each_inputs_dtype():
    """bfloat16 tables with float32 scores and pre-input: computed in float32, each gradient in its input's dtype."""
    inputs = list(make_inputs(N=7, T=5, m=4, d_value=6, d_pre=3, cores=2, pre=True, dtype=torch.float32, seed=3))
    for k in (0, 3):  # values, pre_values -> bfloat16 leaves
        inputs[k] = inputs[k].detach().to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    got = grads(lambda *a: memory_lookup(*a, backend="torch"), *inputs, grad_out=grad_out)
    assert [g.dtype for g in got] == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    wide = [x if x is None or not x.is_floating_point() else x.detach().double().requires_grad_() for x in inputs]
    want = grads(loop_lookup, *wide, grad_out=grad_out.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


@pytest.mark.parametrize("frozen", ["values", "scores", "pre_values", "pre_input"])
def test_torch_backend_gradients_hold_with_any_input_frozen(frozen):
    """Freezing one input leaves the others' gradients exact (a backend that skips work for inputs that
    need no gradient must not skip what the others need)."""
    names = ["values", "indices", "scores", "pre_values", "pre_input"]
    inputs = list(make_inputs(N=6, T=4, m=3, d_value=4, d_pre=2, cores=2, pre=True, dtype=torch.float64))
    want = grads(loop_lookup, *inputs)[1:]
    inputs[names.index(frozen)] = inputs[names.index(frozen)].detach()
    out = memory_lookup(*inputs, backend="torch")
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    for name, expected in zip(["values", "scores", "pre_values", "pre_input"], want):
        if name != frozen:  # a detached input's .grad stays None whatever the backend does: nothing to check
            torch.testing.assert_close(inputs[names.index(name)].grad, expected, rtol=1e-10, atol=1e-12)


def test_repeated_indices_accumulate():
    values = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    indices = torch.tensor([[1, 1, 0]])
    scores = torch.tensor([[[0.5], [0.25], [2.0]]])
    out = memory_lookup(values, indices, scores, backend="torch")
    torch.testing.assert_close(out, torch.tensor([[0.75 * 10 + 2.0, 0.75 * 20 + 4.0]]))


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "memory_lookup_torch", lambda *a: calls.append(a) or "torch")
    values, indices, scores, _, _ = make_inputs(4, 2, 2, 4, 0, 1, pre=False)
    assert memory_lookup(values, indices, scores) == "torch" and len(calls) == 1


# --------------------------------------------------------------------------- bad input


def _bad(**changes):
    values, indices, scores, pre_values, pre_input = make_inputs(8, 3, 4, 6, 5, 2, pre=True)
    args = dict(values=values, indices=indices, scores=scores, pre_values=pre_values, pre_input=pre_input)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(indices=torch.full((3, 4), 8)), r"indices must lie in \[0, N\) = \[0, 8\)"),
        (dict(indices=torch.full((3, 4), -1)), r"indices must lie in \[0, N\)"),
        (dict(indices=torch.zeros(3, 4, dtype=torch.int32)), "indices must have dtype torch.int64"),
        (dict(indices=torch.zeros(12, dtype=torch.int64)), r"indices must have shape \(T, m\)"),
        (dict(scores=torch.randn(3, 4, 4)), r"scores.shape\[-1\] \(c.*divide D_v=6"),
        (dict(scores=torch.randn(3, 5, 2)), r"scores must have shape \(T, m, c\) = \(3, 4, c\)"),
        (dict(scores=torch.ones(3, 4, 2, dtype=torch.int64)), "scores must be a floating dtype"),
        (dict(values=torch.randn(8, 6).to(torch.int32)), "values must be a floating dtype"),
        (dict(values=torch.randn(8, 6, 1)), r"values must have shape \(N, D_v\)"),
        (dict(pre_input=None), "pre_values was given without pre_input"),
        (dict(pre_values=None), "pre_input was given without pre_values"),
        (dict(pre_values=torch.randn(7, 5)), r"pre_values must have shape \(N, D_p\) with N=8"),
        (dict(pre_input=torch.randn(3, 4)), r"pre_input must have shape \(T, D_p\) = \(3, 5\)"),
        (dict(pre_values=torch.randn(8, 5, dtype=torch.float64)), "pre_values must have the dtype of values"),
    ],
)
def test_bad_input_raises_value_error(changes, match):
    with pytest.raises(ValueError, match=match):
        memory_lookup(**_bad(**changes))


def test_unknown_backend_lists_allowed_values():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        memory_lookup(**_bad(), backend="cuda")


def test_triton_backend_rejects_float64():
    with pytest.raises(ValueError, match="backend='triton' supports float32, bfloat16 and float16"):
        memory_lookup(*make_inputs(8, 3, 4, 6, 5, 2, pre=True, dtype=torch.float64), backend="triton")


def test_import_is_lazy_and_cpu_triton_without_interpreter_explains_the_fix():
    code = (
        "import sys, torch, minimem, minimem.kernels as k\n"
        "assert 'triton' not in sys.modules, 'importing minimem.kernels imported triton'\n"
        "v = torch.randn(4, 2); i = torch.zeros(1, 2, dtype=torch.long); s = torch.ones(1, 2, 1)\n"
        "print(k.memory_lookup(v, i, s).sum().item())\n"
        "try:\n    k.memory_lookup(v, i, s, backend='triton')\n"
        "except RuntimeError as e:\n    print('ERROR', e)\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1" in proc.stdout


# --------------------------------------------------------------------------- triton vs torch


def _triton_ready():
    from minimem.kernels import triton_lookup

    if not torch.cuda.is_available() and not triton_lookup.interpreter_enabled():
        pytest.skip("triton_lookup was imported before TRITON_INTERPRET=1 was set in this process")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _on(device, inputs):
    return [None if x is None else x.detach().to(device).requires_grad_(x.is_floating_point()) for x in inputs]


# (N, T, m, D_v, D_p, c, pre): repeated indices in every row, m not a power of two, m > BLOCK_M,
# D_v and D_p not multiples of the column block (masked tails), D_v / c not a power of two,
# c = 3 (masked cores), column blocks that straddle two core slices.
TRITON_CASES = [
    (7, 5, 3, 10, 6, 2, True),
    (50, 4, 20, 200, 140, 1, True),
    (50, 4, 20, 200, 0, 2, False),
    (40, 3, 17, 12, 16, 3, True),
    (9, 3, 6, 24, 0, 1, False),
    (30, 3, 8, 192, 64, 2, True),  # 64-column blocks straddle the two 96-column core slices
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "N{}-T{}-m{}-Dv{}-Dp{}-c{}-pre{}".format(*c))
def test_triton_matches_torch_forward_and_all_gradients(case):
    _triton_ready()
    N, T, m, d_value, d_pre, cores, pre = case
    inputs = _on(_device(), make_inputs(N, T, m, d_value, d_pre, cores, pre, seed=sum(case)))
    inputs[1] = inputs[1].detach()
    torch_grads = grads(lambda *a: memory_lookup(*a, backend="torch"), *inputs)
    triton_grads = grads(lambda *a: memory_lookup(*a, backend="triton"), *inputs)
    assert_close_all(triton_grads, torch_grads, rtol=1e-5, atol=1e-5)


def test_triton_random_shapes_match_torch():
    _triton_ready()
    gen = torch.Generator().manual_seed(123)
    for trial in range(3):
        N, T, m = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((2, 30), (1, 5), (1, 24)))
        cores = int(torch.randint(1, 3, (1,), generator=gen))
        d_value = cores * int(torch.randint(1, 90, (1,), generator=gen))
        d_pre = int(torch.randint(1, 150, (1,), generator=gen))
        pre = trial != 1
        inputs = _on(_device(), make_inputs(N, T, m, d_value, d_pre, cores, pre, seed=trial))
        want = grads(lambda *a: memory_lookup(*a, backend="torch"), *inputs)
        got = grads(lambda *a: memory_lookup(*a, backend="triton"), *inputs)
        assert_close_all(got, want)


def test_triton_gradients_only_for_inputs_that_need_them():
    _triton_ready()
    values, indices, scores, pre_values, pre_input = _on(_device(), make_inputs(20, 3, 5, 8, 6, 2, pre=True))
    for trainable in ([values], [scores], [pre_input], [scores, pre_values]):
        for x in (values, scores, pre_values, pre_input):
            x.requires_grad_(any(x is y for y in trainable))
        out = memory_lookup(values, indices, scores, pre_values, pre_input, backend="triton")
        got = torch.autograd.grad(out.sum(), trainable)
        want = torch.autograd.grad(
            memory_lookup(values, indices, scores, pre_values, pre_input, backend="torch").sum(), trainable
        )
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_empty_batch_and_zero_slots():
    _triton_ready()
    for T, m in ((0, 4), (3, 0)):
        inputs = _on(_device(), make_inputs(10, T, m, 8, 4, 2, pre=True))
        got = grads(lambda *a: memory_lookup(*a, backend="triton"), *inputs)
        want = grads(lambda *a: memory_lookup(*a, backend="torch"), *inputs)
        assert_close_all(got, want)
