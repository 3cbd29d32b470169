"""Shared tools of the graders: hypothesis settings, random tensors, checks with clear messages."""

from __future__ import annotations

from datetime import timedelta

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

# Few examples and a deadline, so grading is quick; no example database in the learner's folder.
GRADER_SETTINGS = settings(
    max_examples=12,
    deadline=timedelta(seconds=5),
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no 'explain': it re-runs a failing test many times
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors],
)

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def randn(seed_or_gen, *shape: int, dtype=torch.float64, requires_grad: bool = False) -> torch.Tensor:
    gen = generator(seed_or_gen) if isinstance(seed_or_gen, int) else seed_or_gen
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    return x.requires_grad_(requires_grad)


def check_tensor(actual, name: str, shape=None, dtype=None) -> None:
    """AssertionError unless ``actual`` is a tensor of ``shape`` (tuple) and ``dtype``."""
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{name} must be a torch.Tensor, got {type(actual).__name__}")
    if shape is not None and tuple(actual.shape) != tuple(shape):
        raise AssertionError(f"{name} has shape {tuple(actual.shape)}, expected {tuple(shape)}")
    if dtype is not None and actual.dtype != dtype:
        raise AssertionError(f"{name} has dtype {actual.dtype}, expected {dtype}")


def assert_close(
    actual, expected: torch.Tensor, name: str, rtol: float = 1e-6, atol: float = 1e-8, check_dtype: bool = True
) -> None:
    """AssertionError naming ``name``, the largest difference and where it is."""
    check_tensor(actual, name, expected.shape, expected.dtype if check_dtype else None)
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=False)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        diff = float((a - e).abs().max())
        raise AssertionError(
            f"{name} is wrong at index {where}: got {float(a[where]):.6g}, expected {float(e[where]):.6g} "
            f"(largest difference {diff:.3g}, {int(bad.sum())} of {bad.numel()} entries off)"
        )


def assert_equal(actual, expected: torch.Tensor, name: str) -> None:
    check_tensor(actual, name, expected.shape, expected.dtype)
    bad = actual != expected
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name} is wrong at index {where}: got {actual[where].tolist()}, expected {expected[where].tolist()} "
            f"({int(bad.sum())} of {bad.numel()} entries off)"
        )


def grads(output: torch.Tensor, inputs, grad_output: torch.Tensor) -> tuple:
    """d<output, grad_output>/d inputs (None where an input does not reach the output)."""
    return torch.autograd.grad(output, inputs, grad_output, allow_unused=True)


def check_grads(actual_out, expected_out, inputs, names, seed: int, rtol=1e-6, atol=1e-8) -> None:
    """The gradients of both outputs (one shared random upstream gradient) agree for every input."""
    upstream = randn(seed + 1, *expected_out.shape, dtype=expected_out.dtype)
    if not actual_out.requires_grad:
        raise AssertionError("the output carries no gradient: keep autograd working (no .detach(), .item(), numpy)")
    got = grads(actual_out, inputs, upstream)
    want = grads(expected_out, inputs, upstream)
    for g, w, name in zip(got, want, names):
        if w is None:
            continue
        if g is None:
            raise AssertionError(f"no gradient reaches {name}")
        assert_close(g, w, f"gradient of {name}", rtol=rtol, atol=atol)


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor (number of elements) that a torch computation inside produces.

    Allocations, initialisers and copies (``torch.empty``, ``normal_``, ``.to``, ...) are not
    computations and are not counted: only what scores, gathers or multiplies is.
    """

    NOT_COMPUTATIONS = {
        "empty",
        "zeros",
        "ones",
        "full",
        "rand",
        "randn",
        "randint",
        "randperm",
        "arange",
        "tensor",
        "as_tensor",
        "to",
        "detach",
        "clone",
        "contiguous",
        "requires_grad_",
        "normal_",
        "uniform_",
        "fill_",
        "zero_",
        "copy_",
        "new_empty",
        "new_zeros",
        "new_ones",
        "new_full",
        "new_tensor",
        "__get__",
        "__set__",
    }

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.where = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if name in self.NOT_COMPUTATIONS or name.endswith("_like"):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.where = t.numel(), name
        return out


def triton_device() -> str:
    """'cuda' when kernels can be compiled (a GPU and no TRITON_INTERPRET), else 'cpu' (interpreter)."""
    import os

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "cuda"
    return "cpu"
