"""The Triton lookup kernels compiled for sm_80 and sm_90 on any machine, checked from their PTX.

The interpreter tests (tests/test_kernels.py) check what the kernels compute, not that they
compile for a GPU nor what code they become. Triton compiles for an NVIDIA target without a GPU
(the wheel ships ptxas), so this module compiles every kernel that a forward and a backward of
``MemoryLookupFunction`` launch (every input trainable), for sm_90 and sm_80 (``VARIANTS``:
float32, bfloat16 and float16 inputs, 1, 2 and 4 cores, with and without pre-values), and
checks three things:

1. every kernel compiles to PTX and, through ptxas, to a cubin;
2. the forward reads table rows (value rows, and pre-value rows for the gate) with 128-bit
   loads (``ld.global.v4.b32``): the lookup is bandwidth bound, and narrower loads mean a hint
   was lost on the way;
3. the backward adds the table gradients with atomics (``red.global`` / ``atom.global``), as
   the module docstring of :mod:`minimem.kernels.triton_lookup` says.

How. conftest.py sets TRITON_INTERPRET=1 before triton is imported, which makes every
``@triton.jit`` function an interpreted one in this process, so the compiling runs in a child
process: this file run as a script, without TRITON_INTERPRET and with TRITON_CACHE_DIR in the
test's temporary folder. The child runs the real launch code (``MemoryLookupFunction`` forward
and backward on CPU tensors) with the kernels replaced by recorders, so it compiles exactly the
arguments the launcher passes. It specialises them with Triton's own binder, as
``JITFunction.run`` does: a 16-byte aligned tensor and an int divisible by 16 (all widths here)
get the ``tt.divisibility = 16`` hint of a real launch. Then
``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``.

Reading the PTX: Triton emits ``.loc file line col`` before the instructions of each source
line, so a load is attributed to the ``tl.load`` call it came from (found with ``ast`` in
triton_lookup.py, not by hand-copied line numbers).
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

KERNELS_FILE = Path(__file__).resolve().parents[1] / "minimem" / "kernels" / "triton_lookup.py"

# (dtype, cores, pre-values, arch): every combination for sm_90 (H100), and for sm_80 (A100)
# every dtype and pre-value setting at c = 2. The arch changes how loads, dtype conversions and
# atomics are lowered; the core count only unrolls the static loop that builds the weight tile,
# the same on both. 60 compiles (with ptxas): about 40 s of CPU time.
VARIANTS = [
    (dtype, cores, pre, arch)
    for dtype, cores, pre, arch in itertools.product(
        ("float32", "bfloat16", "float16"), (1, 2, 4), (False, True), (90, 80)
    )
    if arch == 90 or cores == 2
]
# [UM2] Table 10 widths: D_v, D_p and D_v / c for every c above are divisible by 16, as is m.
N, T, M, D_VALUE, D_PRE = 64, 2, 32, 768, 384

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- child process


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _record_launches(dtype: str, cores: int, pre: bool) -> list:
    """(kernel, args, kwargs) of each launch of one forward and backward, every input trainable."""
    import torch
    from triton.runtime.jit import JITFunction

    from minimem.kernels import triton_lookup

    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(N, D_VALUE, generator=gen, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, N, (T, M), generator=gen)
    scores = torch.randn(T, M, cores, generator=gen, dtype=dtype, requires_grad=True)
    pre_values = torch.randn(N, D_PRE, generator=gen, dtype=dtype, requires_grad=True) if pre else None
    pre_input = torch.randn(T, D_PRE, generator=gen, dtype=dtype, requires_grad=True) if pre else None
    kernels = {name: obj for name, obj in vars(triton_lookup).items() if isinstance(obj, JITFunction)}
    launches = []
    try:
        for name, kernel in kernels.items():
            setattr(triton_lookup, name, _Recorder(kernel, launches))
        out = triton_lookup.MemoryLookupFunction.apply(values, indices, scores, pre_values, pre_input)
        out.backward(torch.ones_like(out))
    finally:  # the kernels must be back before compiling: they call each other by module global
        for name, kernel in kernels.items():
            setattr(triton_lookup, name, kernel)
    return launches


def _compile(kernel, args, kwargs, arch: int):
    """Compile one recorded launch for sm_<arch>, specialised the way JITFunction.run does it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    names = list(signature)
    hinted = [names[key[0]] for key, attr in attrs.items() if ["tt.divisibility", 16] in attr]
    return {"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"]), "divisible_by_16": hinted}


def variant_id(variant: tuple) -> str:
    dtype, cores, pre, arch = variant
    return f"{dtype}-c{cores}-{'pre' if pre else 'nopre'}-sm{arch}"


def compile_all(out_path: str) -> None:
    """Child process: compile every variant and write {variant id: {"kernels": ..., "error": ...}} as JSON."""
    results, launches = {}, {}
    for variant in VARIANTS:
        dtype, cores, pre, arch = variant
        if (dtype, cores, pre) not in launches:
            launches[dtype, cores, pre] = _record_launches(dtype, cores, pre)
        try:
            kernels = {
                kernel.__name__: _compile(kernel, args, kwargs, arch)
                for kernel, args, kwargs in launches[dtype, cores, pre]
            }
            results[variant_id(variant)] = {"kernels": kernels, "error": None}
        except Exception:  # reported by the tests, named by variant
            results[variant_id(variant)] = {"kernels": {}, "error": traceback.format_exc()}
    Path(out_path).write_text(json.dumps(results))


# --------------------------------------------------------------------------- reading PTX


def _kernel_def(kernel: str) -> ast.FunctionDef:
    """The definition of ``kernel`` in triton_lookup.py, parsed."""
    tree = ast.parse(KERNELS_FILE.read_text())
    return next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == kernel)


def _runtime_params(kernel: str) -> list:
    """Names of the parameters of ``kernel`` that are not ``tl.constexpr``."""
    return [
        p.arg
        for p in _kernel_def(kernel).args.args
        if p.annotation is None or ast.unparse(p.annotation) != "tl.constexpr"
    ]


def _source_lines(kernel: str, call: str, pointer: str) -> set:
    """Lines of triton_lookup.py spanned by the calls of ``kernel`` to ``tl.<call>`` on an address
    built from ``pointer``. The whole span: Triton may place the instructions at the closing line
    (for example where a no-op ``.to(tl.float32)`` follows the load)."""
    lines = {
        line
        for node in ast.walk(_kernel_def(kernel))
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == f"tl.{call}"
        and ast.unparse(node.args[0]).startswith(pointer)
        for line in range(node.lineno, node.end_lineno + 1)
    }
    assert lines, f"no tl.{call}({pointer} + ...) in {kernel}: update this test to the kernel"
    return lines


def _instructions(ptx: str, opcode: str) -> list:
    """(line of triton_lookup.py or None, instruction) for each PTX instruction containing ``opcode``."""
    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.MULTILINE))
    found, line = [], None
    for text in ptx.splitlines():
        loc = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", text)
        if loc:
            line = int(loc.group(2)) if Path(files.get(loc.group(1), "")).name == KERNELS_FILE.name else None
        elif opcode in text:
            found.append((line, text.strip()))
    return found


def _load_bits(instruction: str) -> int:
    """Bits one ld.global moves per thread: 128 for ld.global.v4.b32, 16 for ld.global.b16."""
    op = re.search(r"ld\.global\S*", instruction).group()
    vector = re.search(r"\.v(\d)\.", op)
    return (int(vector.group(1)) if vector else 1) * int(re.search(r"(\d+)$", op).group(1))


def _listing(ops: list, limit: int = 16) -> str:
    """The first ``limit`` instructions with their source lines, for a failure message."""
    shown = [f"  triton_lookup.py:{line}: {text}" for line, text in ops[:limit]]
    return "\n".join(shown + ([f"  ... {len(ops) - limit} more"] if len(ops) > limit else []))


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ptx")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "triton-cache")  # not the user's ~/.triton/cache
    proc = subprocess.run(
        [sys.executable, __file__, str(folder / "ptx.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
        cwd=KERNELS_FILE.parents[2],
    )
    assert proc.returncode == 0, f"compiling child failed:\n{proc.stderr[-6000:]}"
    return json.loads((folder / "ptx.json").read_text())


def _kernels(compiled, variant) -> dict:
    """The compiled kernels of one variant; a compile error fails the test with the traceback."""
    result = compiled[variant]
    if result["error"]:
        pytest.fail(f"{variant} failed to compile:\n{result['error']}")
    return result["kernels"]


@pytest.mark.parametrize("variant", [variant_id(v) for v in VARIANTS])
def test_every_variant_compiles(compiled, variant):
    kernels = _kernels(compiled, variant)
    pre = "-pre-" in variant
    expected = {"_weighted_sum_fwd_kernel", "_weighted_sum_bwd_kernel"}
    expected |= {"_gate_fwd_kernel", "_gate_bwd_kernel"} if pre else set()
    assert set(kernels) == expected, f"{variant}: launched {sorted(kernels)}"
    for name, kernel in kernels.items():
        assert kernel["cubin_bytes"] > 0, f"{variant} {name}: empty cubin"
        # every pointer and width of this launch is divisible by 16, so every non-constexpr
        # argument carries the hint; without it the loads below could not be vectorised.
        runtime = _runtime_params(name)
        assert kernel["divisible_by_16"] == runtime, (
            f"{variant} {name}: divisibility hints on {kernel['divisible_by_16']}, want {runtime}"
        )


# (kernel, table pointer): the row loads that carry the forward's bytes.
FORWARD_ROW_LOADS = [("_weighted_sum_fwd_kernel", "values_ptr"), ("_gate_fwd_kernel", "pre_values_ptr")]


@pytest.mark.parametrize("variant", [variant_id(v) for v in VARIANTS])
def test_forward_table_row_loads_are_128_bit(compiled, variant):
    kernels = _kernels(compiled, variant)
    for name, pointer in FORWARD_ROW_LOADS:
        if name not in kernels:
            continue  # no gate kernel without pre-values
        lines = _source_lines(name, "load", pointer)
        loads = _instructions(kernels[name]["ptx"], "ld.global")
        rows = [(line, text) for line, text in loads if line in lines]
        assert rows, f"{variant} {name}: no ld.global at lines {sorted(lines)}; all loads:\n{_listing(loads)}"
        narrow = [(line, text) for line, text in rows if _load_bits(text) != 128]
        assert not narrow, f"{variant} {name}: {pointer} rows loaded in under 128 bits:\n{_listing(narrow)}"


# (kernel, table gradient pointer): the scatter-adds into the dense table gradients.
BACKWARD_ATOMICS = [("_weighted_sum_bwd_kernel", "grad_values_ptr"), ("_gate_bwd_kernel", "grad_pre_values_ptr")]


@pytest.mark.parametrize("variant", [variant_id(v) for v in VARIANTS])
def test_backward_table_gradients_use_float32_atomic_adds(compiled, variant):
    kernels = _kernels(compiled, variant)
    for name, pointer in BACKWARD_ATOMICS:
        if name not in kernels:
            continue
        lines = _source_lines(name, "atomic_add", pointer)
        ptx = kernels[name]["ptx"]
        atomics = [op for op in _instructions(ptx, "red.global") + _instructions(ptx, "atom.global") if op[0] in lines]
        assert atomics, f"{variant} {name}: no red.global/atom.global at lines {sorted(lines)}"
        wrong = [(line, text) for line, text in atomics if ".add" not in text or "f32" not in text]
        assert not wrong, f"{variant} {name}: atomics that are not float32 adds:\n{_listing(wrong)}"


if __name__ == "__main__":
    compile_all(sys.argv[1])
