"""The chapters' checked outputs hold on any CPU, not only on the one that executed them.

ATen runs vectorised kernels chosen for the CPU (``ATEN_CPU_CAPABILITY``: avx512, avx2, default) and MKL
picks its own code paths; they round differently in the last digit, and 150 training steps grow that into
the second decimal of a loss. So a cell tagged ``nbval-check-output`` prints only what does not depend
on the CPU: float64 comparisons, counts, shapes, and verdicts whose margins are many times the spread
(notebooks/README.md). This test re-runs the chapters that train or compute float32 numbers under other
code paths of this machine's CPU, with nbval exactly as ``make test`` runs it, and requires every checked
cell to reproduce its committed output.

The chapters run from a copy laid out like the repository (configs/, results/, benchmarks/, exercises/
and pyproject.toml linked, minimem_tools/ copied and first on PYTHONPATH), so that
``minimem_tools.course`` takes the copy for the checkout: their runs go to the copy's runs/ and never
touch the checkout's while the main nbval pass may run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every chapter that trains or checks numbers computed in float32; 00 and 08 print only counts,
# formulas and the committed results/*.json.
CHAPTERS = [
    "01_ffn_memories",
    "02_product_keys",
    "03_pkm",
    "04_peer",
    "05_ultramem",
    "06_ultramemv2",
    "07_triton_lookup",
    "09_scaling_out",
]
EXEMPT = ["00_welcome", "08_head_to_head"]
# Read by the chapters through minimem_tools.course; with COPIED, they make the copy a checkout for it
# (course.checkout_root: the folder above the imported minimem_tools, holding these markers).
LINKED = ["configs", "results", "benchmarks", "exercises", "pyproject.toml"]
COPIED = "minimem_tools"  # a real copy: course resolves symlinks, and a link would lead back here
CHECK_TAG = "nbval-check-output"
# The flags of the Makefile's nbval pass (NBVAL), with the copy's notebooks.
NBVAL_FLAGS = ["--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with", "notebooks/nbval_sanitize.cfg"]
PROBE = "zz_cpu_code_path.ipynb"


def torch_capability(env: dict[str, str]) -> str:
    """The code path torch takes in a fresh interpreter with ``env`` (AVX2, AVX512, DEFAULT, ...)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def probe_notebook(capability: str) -> nbformat.NotebookNode:
    # A checked cell whose saved output is the code path asked for: it fails unless the kernel nbval
    # starts really runs there (the variables must reach it before it imports torch).
    cell = nbformat.v4.new_code_cell(
        "import torch\n\nprint(torch.backends.cpu.get_cpu_capability())",
        execution_count=1,
        metadata={"tags": [CHECK_TAG]},
    )
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=capability + "\n")]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def repository_copy(root: Path) -> list[Path]:
    """Lay out ``root`` like the repository with the chapters to run; return their paths."""
    (root / "notebooks").mkdir()
    shutil.copy(REPO_ROOT / "notebooks" / "nbval_sanitize.cfg", root / "notebooks")
    for name in LINKED:
        (root / name).symlink_to(REPO_ROOT / name, target_is_directory=(REPO_ROOT / name).is_dir())
    shutil.copytree(REPO_ROOT / COPIED, root / COPIED, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pytest.ini").write_text("[pytest]\n")  # the copy is its own rootdir: no conftest from above
    paths = []
    for name in CHAPTERS:
        paths.append(root / "notebooks" / f"{name}.ipynb")
        shutil.copy(REPO_ROOT / "notebooks" / f"{name}.ipynb", paths[-1])
    return paths


def code_cells(path: Path) -> int:
    return sum(cell.cell_type == "code" for cell in nbformat.read(path, as_version=4).cells)


class NbvalRun:
    """nbval over a fresh copy of the chapters, in a subprocess under one CPU code path."""

    def __init__(self, capability: str, root: Path):
        self.capability, self.root = capability, root
        self.env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "MKL_CBWR": "COMPATIBLE"}
        # the copy's minimem_tools first, so that minimem_tools.course finds the copy as the checkout
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        self.runs_here = torch_capability(self.env)
        self.proc = None
        if not self.available:
            return
        self.paths = repository_copy(root)
        nbformat.write(probe_notebook(self.runs_here), root / "notebooks" / PROBE)
        self.paths.append(root / "notebooks" / PROBE)
        self.log = root / "nbval.log"
        with self.log.open("w") as log:  # a file, not a pipe: the other run must not wait on this one
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    *NBVAL_FLAGS,
                    *[str(p.relative_to(root)) for p in self.paths],
                ],
                cwd=root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def available(self) -> bool:
        # ATEN_CPU_CAPABILITY cannot raise the CPU's level: asking for avx2 on ARM runs another path.
        return self.runs_here == self.capability.upper()

    def wait(self, timeout: float) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, self.log.read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # nbval and the kernels it started
            self.proc.wait()


@pytest.fixture(scope="module")
def nbval_runs(request, tmp_path_factory):
    # Start every selected code path at once: each runs on one core (the chapters train with one thread),
    # so on 2 cores the two take the wall time of one.
    wanted = [
        item.callspec.params["capability"]
        for item in request.session.items
        if getattr(item, "originalname", None)
        == "test_checked_cells_match_under_another_cpu_code_path"  # nbval cells have none
    ]
    runs = {cap: NbvalRun(cap, tmp_path_factory.mktemp(f"cpu-{cap}")) for cap in dict.fromkeys(wanted)}
    yield runs
    for run in runs.values():
        run.stop()


def test_every_chapter_is_run_here_or_exempt():
    names = {path.stem for path in (REPO_ROOT / "notebooks").glob("*.ipynb")}
    assert names == set(CHAPTERS) | set(EXEMPT), (
        "add each chapter to CHAPTERS (it trains or computes float32 numbers) or to EXEMPT (it does not)"
    )
    for name in EXEMPT:
        nb = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        assert not any("train(" in cell.source for cell in nb.cells if cell.cell_type == "code"), (
            f"{name} trains: it belongs in CHAPTERS"
        )


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_checked_cells_match_under_another_cpu_code_path(capability, nbval_runs):
    run = nbval_runs[capability]
    if not run.available:
        pytest.skip(f"this CPU has no {capability} code path (torch runs {run.runs_here})")
    rc, log = run.wait(timeout=1500)
    report = log[-8000:]
    assert rc == 0, f"nbval under ATEN_CPU_CAPABILITY={capability} MKL_CBWR=COMPATIBLE:\n{report}"
    # nbval makes one test of every code cell: all of them ran, none was skipped or deselected.
    passed = re.search(r"(\d+) passed", log)
    assert passed and int(passed.group(1)) == sum(map(code_cells, run.paths)), report
    assert (run.root / "runs").is_dir(), "the chapters' demo runs should have gone to the copy's runs/"
