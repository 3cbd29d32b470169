"""Shared tools of the graders: hypothesis settings, random tensors, checks with clear messages.

- :data:`GRADER_SETTINGS`: few examples, no deadline (each test has a time limit instead) and no
  example database; ``minimem grade`` fixes hypothesis's seed (``--seed``), so a score never
  changes between two runs of the same code.
- :func:`assert_close` / :func:`assert_close_dtype`: tolerances that fit the dtype under test.
- :func:`raises_naming`: a ValueError whose message names the argument as a whole word.
- :class:`WorkCounter` and :func:`check_work_growth`: what a computation costs, measured at two
  sizes (torch elements produced, matmul FLOPs, Python lines of the learner's code).
- :class:`TorchOps`, :func:`kernel_bounds_checked`: chapter 7's fusion and memory-safety checks.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Few examples and no deadline (each grader has a time limit: a deadline would make a slow but
# correct solution fail at random), no example database in the learner's folder.
GRADER_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no 'explain': it re-runs a failing test many times
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors],
)

seeds = st.integers(min_value=0, max_value=2**31 - 1)

EXERCISES = Path(__file__).resolve().parents[1]  # the folder being graded (the learner's)


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
    a, e = actual.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64)
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=False)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        diff = float((a - e).abs().max())
        raise AssertionError(
            f"{name} is wrong at index {where}: got {float(a[where]):.6g}, expected {float(e[where]):.6g} "
            f"(largest difference {diff:.3g}, {int(bad.sum())} of {bad.numel()} entries off)"
        )


# Relative tolerance of a result computed in each dtype, against float64 arithmetic on the same
# (rounded) inputs: a few hundred units in the last place of a sum of a few dozen terms.
DTYPE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 4e-3}


def assert_close_dtype(actual, expected64: torch.Tensor, name: str, dtype: torch.dtype, scale: float = 1.0) -> None:
    """``actual`` has ``dtype`` and equals ``expected64`` (computed in float64 from the same inputs)
    up to ``dtype``'s rounding: relative tolerance :data:`DTYPE_TOLERANCE` (times ``scale``), and the
    same absolute tolerance relative to the largest |entry| (sums with cancellation)."""
    check_tensor(actual, name, expected64.shape, dtype)
    tol = DTYPE_TOLERANCE[dtype] * scale
    magnitude = float(expected64.detach().abs().max()) if expected64.numel() else 1.0
    assert_close(actual, expected64.to(dtype), name, rtol=tol, atol=tol * max(magnitude, 1.0), check_dtype=False)


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


def float32_copies(*tensors):
    """The tensors rounded to float32, and those float32 values in float64 (for the expected result)."""
    low = [t.detach().to(torch.float32) if t.is_floating_point() else t for t in tensors]
    return low, [t.to(torch.float64) if t.is_floating_point() else t for t in low]


# --------------------------------------------------------------------------- error messages


@contextlib.contextmanager
def raises_naming(*names: str, also: tuple[str, ...] = ()):
    """Expect a ValueError whose message names one of ``names`` as a whole word (``'m'`` is not
    found in ``'must'``; ``'norm'`` not in ``'layernorm'``) and contains every word in ``also``."""
    with pytest.raises(ValueError) as caught:
        yield caught
    message = str(caught.value)
    pattern = r"(?<![\w])(?:" + "|".join(re.escape(n) for n in names) + r")(?![\w])"
    if not re.search(pattern, message):
        wanted = " or ".join(repr(n) for n in names)
        raise AssertionError(f"the ValueError must name {wanted} (as a word), got: {message!r}")
    missing = [w for w in also if not re.search(r"(?<![\w])" + re.escape(w) + r"(?![\w])", message)]
    if missing:
        raise AssertionError(f"the ValueError must also list {missing}, got: {message!r}")


# --------------------------------------------------------------------------- how much work


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor (number of elements) that a torch computation inside produces.

    Views of an input (a reshape, a slice) are not produced; allocations, initialisers and copies
    (``torch.empty``, ``normal_``, ``.to``, ...) are not computations and are not counted: only
    what scores, gathers or multiplies is.
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
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "trunc_normal_",
        "constant_",
        "ones_",
        "zeros_",
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
        inputs = {_storage(a) for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest and _storage(t) not in inputs:  # not a view
                self.largest, self.where = t.numel(), name
        return out


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - a tensor without storage (meta, functorch wrappers)
        return None


_LEARNER_FILES: dict[str, bool] = {}


def _learner_file(filename: str) -> bool:
    """A file of the folder being graded that the learner writes (not a grader, not the reference)."""
    known = _LEARNER_FILES.get(filename)
    if known is not None:
        return known
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        path = None
    mine = False
    if path is not None and EXERCISES in path.parents:
        parts = path.relative_to(EXERCISES).parts
        mine = parts[0] != "graders" and parts[-1] not in ("conftest.py", "reference.py", "test_graders.py")
    _LEARNER_FILES[filename] = mine
    return mine


class WorkCounter(TorchFunctionMode):
    """What a computation inside costs, in three currencies that a cheaper method cannot dodge:

    - ``elements``: entries of every tensor a torch operation computes (views and allocations
      excluded; in-place results counted), however small each tensor is;
    - ``flops``: matrix-multiply FLOPs (``torch.utils.flop_counter.FlopCounterMode``);
    - ``lines``: Python lines executed in the learner's own files (a loop over Python numbers),
      and entries taken out of torch (``tolist``, ``numpy``, ``item``) to compute elsewhere.

    ``total`` adds them up. One number at one size says little; :func:`check_work_growth` compares
    two sizes.
    """

    EXPORTS = {"tolist", "numpy", "item", "__array__", "__float__", "__int__", "__index__", "__bool__"}

    def __init__(self):
        super().__init__()
        self.elements = self.flops = self.lines = 0
        self.by_op: dict[str, int] = {}
        self._flop_counter = None
        self._previous_trace = None

    @property
    def total(self) -> int:
        return self.elements + self.flops + self.lines

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in self.EXPORTS:
            if args and isinstance(args[0], torch.Tensor):
                self.lines += args[0].numel()
            return out
        if name in LargestTensor.NOT_COMPUTATIONS or name.endswith("_like"):
            return out
        in_place = name.endswith("_") or name.startswith("__i")
        inputs = {_storage(a) for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            if not in_place and _storage(t) in inputs:  # a view of an input: no work
                continue
            self.elements += t.numel()
            self.by_op[name] = self.by_op.get(name, 0) + t.numel()
        return out

    def _trace(self, frame, event, arg):
        if event != "call" or not _learner_file(frame.f_code.co_filename):
            return None

        def count_lines(frame, event, arg):
            if event == "line":
                self.lines += 1
            return count_lines

        return count_lines

    def __enter__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self._flop_counter = FlopCounterMode(display=False)
        self._flop_counter.__enter__()
        self._previous_trace = sys.gettrace()
        sys.settrace(self._trace)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            sys.settrace(self._previous_trace)
            self._flop_counter.__exit__(*exc)
            self.flops = int(self._flop_counter.get_total_flops())

    def describe(self) -> str:
        top = sorted(self.by_op.items(), key=lambda kv: -kv[1])[:3]
        ops = ", ".join(f"{name} {count:,}" for name, count in top)
        return f"{self.elements:,} tensor entries ({ops}), {self.flops:,} matmul FLOPs, {self.lines:,} Python steps"


def check_work_growth(run, small, large, allowed: float, what: str, growth: str) -> None:
    """``run(size)`` at two sizes: the work (:class:`WorkCounter`) must grow by less than ``allowed``.

    ``what`` names the quantity that grows from ``small`` to ``large``; ``growth`` says how a right
    solution's work grows, for the message.
    """
    counts = []
    for size in (small, large):
        with WorkCounter() as work:
            run(size)
        counts.append(work)
    ratio = counts[1].total / max(counts[0].total, 1)
    if ratio >= allowed:
        raise AssertionError(
            f"the work grew {ratio:.1f}x when {what} went from {small} to {large} (at most {allowed:g}x allowed: "
            f"{growth}). At {large}: {counts[1].describe()}; at {small}: {counts[0].describe()}"
        )


# --------------------------------------------------------------------------- chapter 7: Triton kernels


def triton_device() -> str:
    """'cuda' when kernels can be compiled (a GPU and no TRITON_INTERPRET), else 'cpu' (interpreter)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "cuda"
    return "cpu"


class TorchOps(TorchDispatchMode):
    """Every ATen operation run inside, with the entries it computed.

    ``computed`` sums the outputs of the operations that compute (allocations, views, copies and
    the interpreter's own argument transfers excluded): what a fused kernel leaves to torch.
    """

    NOT_COMPUTED = (
        "empty",
        "empty_strided",
        "zeros",
        "ones",
        "full",
        "new_empty",
        "new_empty_strided",
        "new_zeros",
        "new_ones",
        "new_full",
        "set_",
        "copy_",
        "_to_copy",
        "clone",
        "lift_fresh",
        "detach",
        "alias",
        "_local_scalar_dense",
        "promote_types",
        "zero_",
        "fill_",
        "resize_",
    )

    def __init__(self):
        super().__init__()
        self.computed = 0
        self.largest = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        for t in outs:
            self.largest = max(self.largest, t.numel())
        is_view = bool(getattr(func, "is_view", False))
        if name in self.NOT_COMPUTED or is_view:
            return out
        for t in outs:
            self.computed += t.numel()
            self.by_op[name] = self.by_op.get(name, 0) + t.numel()
        return out


class OutOfBounds(AssertionError):
    """A Triton kernel read or wrote memory outside every tensor it was given."""


def _logical_addresses(t: torch.Tensor):
    """Byte addresses of every element of ``t`` (its shape and strides, not its storage)."""
    import numpy as np

    idx = np.zeros(1, dtype=np.int64)
    for size, stride in zip(t.shape, t.stride()):
        idx = (idx[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
    if t.numel() == 0:
        idx = idx[:0]
    return t.data_ptr() + idx * t.element_size()


@contextlib.contextmanager
def kernel_bounds_checked():
    """In Triton's interpreter, every load, store and atomic a kernel makes is checked first: the
    (unmasked) addresses must be elements of the tensors passed to that launch, in their shape and
    strides. Otherwise :class:`OutOfBounds` is raised before memory is touched, so an unmasked load
    past a row fails this check instead of reading a neighbour's data or crashing the process.

    Compiled kernels (a GPU) are not checked.
    """
    if triton_device() != "cpu":
        yield
        return
    import numpy as np
    from triton.runtime import interpreter
    from triton.runtime.jit import TensorWrapper

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    names = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    original = {name: getattr(builder, name) for name in names}
    original_init = executor._init_args_hst
    launch = {"valid": None, "tensors": []}

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init(self, args_dev, kwargs)
        parts, tensors = [], []
        for name, arg in list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items()):
            tensor = arg.base if isinstance(arg, TensorWrapper) else arg
            if isinstance(tensor, torch.Tensor):
                parts.append(_logical_addresses(tensor))
                tensors.append((name, tensor))
        launch["valid"] = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        launch["tensors"] = tensors
        return args_hst, kwargs_hst

    def describe(address: int) -> str:
        best = None
        for name, tensor in launch["tensors"]:
            start = tensor.data_ptr()
            distance = address - start
            if best is None or abs(distance) < abs(best[1]):
                best = (name, distance, tensor)
        if best is None:
            return f"address {address:#x} (the kernel got no tensor)"
        name, distance, tensor = best
        element = distance / tensor.element_size()
        return (
            f"element offset {element:g} from the start of argument '{name}' (shape {tuple(tensor.shape)}, "
            f"strides {tuple(tensor.stride())})"
        )

    def check(kind, ptrs, mask):
        valid = launch["valid"]
        if valid is None:
            return
        p = np.asarray(ptrs.data).astype(np.int64)
        if mask is not None:
            p = p[np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape)]
        p = p.reshape(-1)
        if p.size == 0:
            return
        if valid.size == 0:
            bad = np.ones(p.shape, dtype=bool)
        else:
            found = valid[np.searchsorted(valid, p).clip(0, valid.size - 1)]
            bad = found != p
        if bad.any():
            raise OutOfBounds(
                f"out-of-bounds {kind}: {int(bad.sum())} of the {p.size} addresses that one {kind} touches are not "
                f"elements of the tensors passed to the kernel (first: {describe(int(p[bad.argmax()]))}); mask every "
                "load and store with the row, column and slot bounds"
            )

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return original["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return original["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        check("atomic", ptr, mask)
        return original["create_atomic_rmw"](self, op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        check("atomic", ptr, None)
        return original["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    patched = dict(
        create_masked_load=load, create_masked_store=store, create_atomic_rmw=atomic_rmw, create_atomic_cas=atomic_cas
    )
    for name, function in patched.items():
        setattr(builder, name, function)
    executor._init_args_hst = init_args
    try:
        yield
    except Exception as err:  # the interpreter wraps what a kernel raises: give the check's own message
        cause = err
        while cause is not None and not isinstance(cause, OutOfBounds):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise OutOfBounds(str(cause)) from None
        raise
    finally:
        for name, function in original.items():
            setattr(builder, name, function)
        executor._init_args_hst = original_init


def relative_gap(sorted_scores: torch.Tensor, m: int) -> float:
    """Smallest gap between the m-th and (m+1)-th best (rows of descending scores), relative to their scale."""
    if sorted_scores.shape[-1] <= m:
        return math.inf
    gap = (sorted_scores[..., m - 1] - sorted_scores[..., m]).abs().min()
    return float(gap) / max(float(sorted_scores.abs().max()), 1e-12)
