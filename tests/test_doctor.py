"""``minimem doctor``: a healthy install passes; a broken item prints FAIL with its fix and exits 1."""

import os
import subprocess
import sys

from minimem_tools import doctor


def test_doctor_passes_on_this_install_without_triton_interpret_in_the_environment():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "minimem_tools", "doctor"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("python", "torch", "triton", "numpy", "Triton interpreter"):
        assert f"[PASS] {name}" in out, out
    import numpy
    import torch
    import triton

    for version in (torch.__version__, triton.__version__, numpy.__version__):
        assert version in out
    assert "CUDA GPU" in out and "FAIL" not in out
    assert out.strip().splitlines()[-1].startswith("PASS")


def test_failing_kernel_check_prints_fail_and_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "KERNEL_CHECK", "raise SystemExit('simulated: triton interpreter broken')")
    monkeypatch.setattr(doctor, "cuda_device_name", lambda: None)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] Triton interpreter" in out and "simulated: triton interpreter broken" in out
    assert "fix: reinstall triton: pip install --force-reinstall 'triton>=" in out
    assert "[PASS] torch" in out
    assert out.strip().splitlines()[-1].startswith("FAIL")


def test_too_old_or_missing_package_fails_with_install_fix(monkeypatch, capsys):
    real = doctor.installed_version
    fake = {"triton": "3.0.0", "numpy": None}
    monkeypatch.setattr(doctor, "installed_version", lambda name: fake[name] if name in fake else real(name))
    monkeypatch.setattr(doctor, "run_kernel_check", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] triton              3.0.0 (needs >=3.4)" in out
    assert "fix: pip install 'triton>=3.4'" in out
    assert "[FAIL] numpy               not installed" in out and "make venv" in out
    assert "[FAIL] Triton interpreter  not run" in out


def test_doctor_rejects_arguments(capsys):
    assert doctor.main(["--fast"]) == 2
    assert (
        capsys.readouterr().err == "minimem doctor: error: takes no arguments, got --fast; run `minimem doctor` alone\n"
    )
