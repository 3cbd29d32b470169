"""``minimem doctor``: is this machine ready for the course?

Checks python, torch, triton and numpy against minimem's declared requirements (the installed
package metadata, i.e. pyproject.toml), says whether a CUDA GPU is present, and runs the fused
lookup's Triton kernels once in Triton's interpreter in a fresh subprocess with
TRITON_INTERPRET=1 (the interpreter is chosen when kernels are defined, so the parent's triton
state must not matter). With a GPU it also compiles and runs them there. Every failing item
prints FAIL and its fix; the exit code is 0 when everything passes, 1 otherwise.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

from minimem_tools.cli import usage_error

PACKAGES = ("torch", "triton", "numpy")
INSTALL_FIX = "run `make venv` in the repository (or `pip install -r requirements.txt && pip install -e .`)"

# Run in a subprocess: a tiny vector add, then the lookup kernels against the torch backend.
KERNEL_CHECK = r"""
import torch, triton, triton.language as tl

@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

device = DEVICE
x, y = torch.arange(40.0, device=device), torch.ones(40, device=device)
out = torch.empty_like(x)
add_kernel[(triton.cdiv(40, 16),)](x, y, out, 40, BLOCK=16)
assert torch.equal(out, x + 1), f"vector add kernel gave {out.tolist()}"

from minimem.kernels import memory_lookup
gen = torch.Generator().manual_seed(0)
values, pre_values = torch.randn(30, 24, generator=gen), torch.randn(30, 8, generator=gen)
indices = torch.randint(0, 30, (5, 7), generator=gen)
scores, pre_input = torch.randn(5, 7, 2, generator=gen), torch.randn(5, 8, generator=gen)
args = [t.to(device) for t in (values, indices, scores, pre_values, pre_input)]
err = (memory_lookup(*args, backend="triton") - memory_lookup(*args, backend="torch")).abs().max().item()
assert err < 1e-4, f"lookup kernel differs from the torch backend by {err}"
print(f"OK max abs error {err:.1e}")
"""


@dataclass
class Check:
    name: str
    ok: bool | None  # None: information only
    detail: str
    fix: str = ""


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def declared_requirements() -> dict[str, str]:
    """{package: specifier} for python and PACKAGES, from minimem's installed metadata."""
    meta = metadata.metadata("minimem")
    specs = {"python": meta.get("Requires-Python") or ""}
    from packaging.requirements import Requirement

    for line in metadata.requires("minimem") or []:
        req = Requirement(line)
        if req.name in PACKAGES and (req.marker is None or req.marker.evaluate({"extra": ""})):
            specs[req.name] = str(req.specifier)
    return specs


def check_versions() -> list[Check]:
    try:
        specs = declared_requirements()
    except metadata.PackageNotFoundError:
        return [Check("minimem", False, "the package is not installed", INSTALL_FIX)]
    from packaging.specifiers import SpecifierSet

    checks = []
    py = platform.python_version()
    ok = py in SpecifierSet(specs["python"])
    checks.append(
        Check(
            "python",
            ok,
            f"{py} (needs {specs['python']})",
            "" if ok else f"use Python {specs['python']}: create the venv with that interpreter (`make venv`)",
        )
    )
    for name in PACKAGES:
        spec = specs.get(name, "")
        version = installed_version(name)
        if version is None:
            checks.append(Check(name, False, f"not installed (needs {spec or 'any'})", INSTALL_FIX))
            continue
        ok = version in SpecifierSet(spec, prereleases=True)
        checks.append(
            Check(
                name,
                ok,
                f"{version} (needs {spec or 'any'})",
                "" if ok else f"pip install '{name}{spec}' (or {INSTALL_FIX})",
            )
        )
    return checks


def cuda_device_name() -> str | None:
    """Name of the first CUDA GPU, or None."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken torch is reported by check_versions
        return None


def run_kernel_check(device: str, interpret: bool, timeout: float = 300) -> Check:
    """Run KERNEL_CHECK in a fresh python (TRITON_INTERPRET=1 when interpret)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    name = "Triton interpreter" if interpret else "Triton on GPU"
    code = KERNEL_CHECK.replace("DEVICE", repr(device))
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check(name, False, f"kernel check did not finish in {timeout:.0f} s", "rerun on an idle machine")
    if proc.returncode == 0:
        return Check(name, True, "vector add and memory lookup kernels: " + proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    fix = (
        f"reinstall triton: pip install --force-reinstall 'triton{declared_requirements().get('triton', '')}' "
        "(the interpreter ships with it)"
        if interpret
        else "check the NVIDIA driver (`nvidia-smi`) and that torch and triton are CUDA builds matching it"
    )
    return Check(name, False, f"kernel check failed: {tail[0]}", fix)


def format_check(check: Check) -> str:
    status = {True: "PASS", False: "FAIL", None: "INFO"}[check.ok]
    line = f"  [{status}] {check.name:<19} {check.detail}"
    if check.ok is False:
        line += f"\n         fix: {check.fix}"
    return line


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] in ("-h", "--help"):
        print("usage: minimem doctor\n\n" + __doc__.strip())
        return 0
    if argv:
        return usage_error("minimem doctor", f"takes no arguments, got {' '.join(argv)}; run `minimem doctor` alone")
    print("minimem doctor")
    checks = check_versions()
    for check in checks:
        print(format_check(check))
    gpu = cuda_device_name()
    print(
        format_check(
            Check(
                "CUDA GPU",
                None,
                f"{gpu}: the Triton kernels compile on it"
                if gpu
                else "none: CPU only; the Triton kernels run in the interpreter (enough for the course)",
            )
        )
    )
    packages_ok = all(c.ok for c in checks)
    if packages_ok:
        kernel_checks = [run_kernel_check("cpu", interpret=True)]
        if gpu:
            kernel_checks.append(run_kernel_check("cuda", interpret=False))
    else:
        kernel_checks = [
            Check(
                "Triton interpreter",
                False,
                "not run: fix the packages above first",
                "fix the failing items above, then rerun `minimem doctor`",
            )
        ]
    for check in kernel_checks:
        print(format_check(check))
    ok = packages_ok and all(c.ok for c in kernel_checks)
    print("PASS: ready for the course" if ok else "FAIL: fix the items marked FAIL above")
    return 0 if ok else 1
