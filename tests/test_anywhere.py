"""The course from an installed wheel, outside the checkout: what a learner on Colab or with
``pip install git+...`` gets.

A module fixture builds the wheel from a copy of the checkout's files (``pip wheel --no-deps
--no-build-isolation``, so nothing is written into the checkout) and installs it with ``--no-deps``
into a fresh venv that reuses this interpreter's packages (torch, triton, jupyter) through a
``.pth`` line naming this venv's site-packages (a plain path: the checkout's editable-install hook
there is not run, so ``minimem`` can only come from the wheel; every child process checks that).
``venv --system-site-packages`` would not do: it shares the *base* interpreter's site-packages,
not this venv's. Every command then runs in an empty folder outside the checkout.

- the wheel holds every module of minimem/ and minimem_tools/ and every course file
  (configs/, results/, exercises/, benchmarks/, minimem/assets/), and ``course.path`` finds each
  one, byte for byte, with ``course.in_checkout()`` False and runs going to ``./runs``;
- ``minimem exercises init`` copies the exercises, refuses to overwrite a learner's edits
  without ``--force``, and gives one-line errors; ``minimem doctor`` passes;
- every chapter notebook, copied alone into an empty folder, executes top to bottom against
  the installed wheel under nbval, its checked cells matching under the CPU's ``default`` code path,
  and those of the chapters that train or compute float32 numbers under ``avx2`` too (see "the
  chapters" below; slow: select chapters with ``-k``, e.g. ``-k "00_welcome or 02_product"``);
- and, quickly: requirements.txt's pins fit pyproject.toml's ranges.

All but the last are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
COURSE_FOLDERS = ("configs", "results", "exercises", "benchmarks")  # mapped into minimem_tools/course_files/
INSTALLED = "minimem_tools/course_files"
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints"}
# What a copy of the checkout needs to build the wheel when git cannot list its files.
BUILD_FILES = ("pyproject.toml", "MANIFEST.in", "README.md", "requirements.txt", "environment.yml")
BUILD_FOLDERS = ("minimem", "minimem_tools", *COURSE_FOLDERS)
# The environment the chapters are executed in (tools/execute_notebooks.py's FIXED_ENV).
NOTEBOOK_ENV = {
    "MINIMEM_SEED": "0",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TQDM_MININTERVAL": "1",
}


@dataclass
class Install:
    wheel: Path
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def minimem(self) -> Path:
        return self.venv / "bin" / "minimem"


def course_files() -> list[str]:
    """Every file of the course's folders in the checkout (caches left out), as posix paths."""
    found = []
    for folder in COURSE_FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            relative = path.relative_to(REPO_ROOT)
            if path.is_file() and not SKIP_PARTS & set(relative.parts) and path.suffix != ".pyc":
                found.append(relative.as_posix())
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that points a child python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINIMEM_EXERCISES", "PYTHONSTARTUP")}
    env.pop("VIRTUAL_ENV", None)
    return {**env, **extra}


def run(argv, cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=clean_env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def copy_checkout(dest: Path) -> None:
    """The files a clone would have (tracked, plus new files git does not ignore) into ``dest``."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = [n for n in listed.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = list(BUILD_FILES) + [
            p.relative_to(REPO_ROOT).as_posix()
            for folder in BUILD_FOLDERS
            for p in (REPO_ROOT / folder).rglob("*")
            if p.is_file() and not SKIP_PARTS & set(p.relative_to(REPO_ROOT).parts)
        ]
    for name in names:
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def test_requirements_pins_satisfy_the_declared_ranges():
    """requirements.txt (what `make venv` installs) must fit pyproject.toml's ranges (what pip resolves)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith(("#", "-")):
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    wrong = []
    for text in declared:
        req = Requirement(text)
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            wrong.append(f"{text} (requirements.txt: {pinned or 'not pinned'})")
    assert not wrong, f"pyproject.toml requirements that requirements.txt does not satisfy: {wrong}"


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Install:
    """Build the wheel from a copy of the checkout and install it into a fresh venv."""
    tmp = tmp_path_factory.mktemp("anywhere")
    source, dist, venv = tmp / "source", tmp / "dist", tmp / "venv"
    copy_checkout(source)
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source], tmp
    )
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (wheel,) = dist.glob("minimem-*.whl")

    made = run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    assert made.returncode == 0, made.stderr
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([venv / "bin" / "python", "-c", purelib], tmp).stdout.strip())
    (site / "zz_reuse_checkout_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # pip, torch, jupyter
    installed = run(
        [venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel], tmp
    )
    assert installed.returncode == 0, f"pip install failed:\n{installed.stdout}\n{installed.stderr}"
    return Install(wheel=wheel, venv=venv)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """An empty folder outside the checkout."""
    folder = tmp_path / "learner"
    folder.mkdir()
    assert not folder.resolve().is_relative_to(REPO_ROOT)
    return folder


# A guard every child python runs first: minimem must come from the venv's wheel, not the checkout.
FROM_THE_WHEEL = """
import sys, minimem, minimem_tools
for module in (minimem, minimem_tools):
    assert module.__file__.startswith(sys.prefix), f"{module.__name__} imported from {module.__file__}, not the wheel"
"""


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_course_file(install):
    names = set(zipfile.ZipFile(install.wheel).namelist())
    modules = [
        p.relative_to(REPO_ROOT).as_posix()
        for package in ("minimem", "minimem_tools")
        for p in (REPO_ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml's packages): {missing}"
    data = [f"{INSTALLED}/{f}" for f in course_files()] + ["minimem/assets/tinyshakespeare.txt"]
    missing = [f for f in data if f not in names]
    assert not missing, f"course files missing from the wheel (widen pyproject.toml's package-data): {missing}"


@pytest.mark.slow
def test_course_path_finds_every_course_file_outside_the_checkout(install, elsewhere):
    expected = {f: hashlib.sha256((REPO_ROOT / f).read_bytes()).hexdigest() for f in course_files()}
    check = FROM_THE_WHEEL + textwrap.dedent(
        """
        import hashlib, json, sys
        from pathlib import Path
        from minimem_tools import course
        from minimem.data import load_shakespeare

        expected = json.loads(sys.argv[1])
        assert not course.in_checkout(), "course.in_checkout() is True outside the checkout"
        wrong = [f for f, digest in expected.items()
                 if hashlib.sha256(course.path(f).read_bytes()).hexdigest() != digest]
        assert not wrong, f"course.path gives other bytes than the checkout for {wrong}"
        for folder in ("configs", "results", "exercises", "exercises/graders"):
            assert course.path(folder).is_dir(), folder
        assert course.run_dir("ch1-dense") == Path.cwd() / "runs" / "ch1-dense"
        try:
            course.path("configs/no-such-config.yaml")
        except FileNotFoundError as err:
            assert "configs/no-such-config.yaml" in str(err), err
        else:
            raise AssertionError("a missing course file raised nothing")
        assert len(load_shakespeare()) == 1115394
        print("ok", len(expected))
        """
    )
    result = run([install.python, "-c", check, json.dumps(expected)], elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", str(len(expected))]


@pytest.mark.slow
def test_course_path_copies_files_out_of_a_zipped_install(install, elsewhere):
    """Imported from a zip (the wheel itself on sys.path), course.path still gives real paths."""
    check = textwrap.dedent(
        """
        import minimem_tools
        from minimem_tools import course
        assert ".whl" in minimem_tools.__file__, minimem_tools.__file__
        assert course.path("configs/shakespeare-dense.yaml").read_text().strip()
        assert (course.path("exercises") / "graders" / "test_ch2.py").is_file()
        print("ok")
        """
    )
    result = run([install.python, "-c", check], elsewhere, PYTHONPATH=str(install.wheel))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_exercises_init_copies_and_never_overwrites_your_work(install, elsewhere):
    first = run([install.minimem, "exercises", "init", "mine"], elsewhere)
    assert first.returncode == 0, first.stderr
    assert "minimem grade --dir mine" in first.stdout
    mine = elsewhere / "mine"
    stubs = sorted(p.name for p in mine.glob("ch*_*.py"))
    assert stubs == sorted(p.name for p in (REPO_ROOT / "exercises").glob("ch*_*.py")) and stubs
    for name in (
        "__init__.py",
        "conftest.py",
        "reference.py",
        "README.md",
        "graders/helpers.py",
        "graders/test_ch7.py",
    ):
        assert (mine / name).read_bytes() == (REPO_ROOT / "exercises" / name).read_bytes(), name
    assert not (mine / "test_graders.py").exists(), "the CI meta-test of the graders is not the learner's"

    again = run([install.minimem, "exercises", "init", "mine"], elsewhere)  # nothing of yours changed: fine
    assert again.returncode == 0 and "already there" in again.stdout, again.stderr

    work = mine / "ch2_product_keys.py"
    work.write_text(work.read_text() + "\n# my solution\n")
    refused = run([install.minimem, "exercises", "init", "mine"], elsewhere)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "ch2_product_keys.py" in refused.stderr and "--force" in refused.stderr
    assert work.read_text().endswith("# my solution\n"), "init overwrote the learner's work"

    forced = run([install.minimem, "exercises", "init", "mine", "--force"], elsewhere)
    assert forced.returncode == 0, forced.stderr
    assert work.read_bytes() == (REPO_ROOT / "exercises" / "ch2_product_keys.py").read_bytes()

    (elsewhere / "a-file").write_text("")
    for bad in ("a-file", "a-file/below", ""):
        result = run([install.minimem, "exercises", "init", bad], elsewhere)
        assert result.returncode == 2 and result.stderr.startswith("minimem exercises init: error: "), (bad, result)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_doctor_passes_from_the_wheel(install, elsewhere):
    result = run([install.minimem, "doctor"], elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("PASS")


@pytest.mark.slow
def test_grade_dir_grades_an_initialised_copy(install, elsewhere):
    usage = run([install.minimem, "grade", "--help"], elsewhere)
    if "--dir" not in usage.stdout:
        pytest.skip("minimem grade has no --dir option yet")
    assert run([install.minimem, "exercises", "init", "mine"], elsewhere).returncode == 0
    graded = run([install.minimem, "grade", "--dir", "mine", "2"], elsewhere)
    assert graded.returncode == 1, graded.stdout + graded.stderr  # the untouched stubs score 0
    assert "not implemented yet" in graded.stdout and "total: 0/" in graded.stdout, graded.stdout


# --------------------------------------------------------------------------- the chapters
#
# Every chapter runs once more here, from the wheel, alone in an empty folder, under nbval exactly as
# ``make test`` runs it, and under other code paths of this machine's CPU: ATen runs vectorised kernels
# chosen for the CPU (``ATEN_CPU_CAPABILITY``: avx512, avx2, default) and MKL picks its own; they round
# differently in the last digit, and 150 training steps grow that into the second decimal of a loss. So a
# cell tagged ``nbval-check-output`` prints only what does not depend on the CPU (notebooks/README.md),
# and these runs require every checked cell to reproduce its committed output there too. One run per
# code path, both at once (each on one core: the chapters train with one thread):
#
# - ``default`` runs every chapter: test_chapter_runs_from_the_wheel_in_an_empty_folder reads it, one
#   test per chapter, and test_checked_cells_match_under_another_cpu_code_path[default] too;
# - ``avx2`` runs the chapters that train or compute float32 numbers (CHAPTERS); 00 and 08 print only
#   counts, formulas and the committed results/*.json.

CPU_PATHS = ("default", "avx2")
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
CHECK_TAG = "nbval-check-output"
ANSI = re.compile(r"(\x1b|#x1B)\[[0-9;]*m")  # colour codes in nbval's messages (escaped as #x1B in the XML)
PROBE = "zz_probe"  # a notebook of two checked cells: the code path the kernel runs, and the wheel it imports
PROBE_CODE = (
    "import torch\n\nprint(torch.backends.cpu.get_cpu_capability())",
    FROM_THE_WHEEL.strip() + '\nprint("minimem from the wheel")',
)


def torch_capability(python: Path, env: dict[str, str]) -> str:
    """The code path torch takes in a fresh interpreter with ``env`` (AVX2, AVX512, DEFAULT, ...)."""
    done = subprocess.run([str(python), "-c", PROBE_CODE[0]], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def probe_notebook(capability: str):
    # Checked cells whose saved outputs are the code path asked for and the wheel's guard: they fail unless
    # the kernel nbval starts really runs there (the variables must reach it before it imports torch) and
    # imports minimem from the wheel, as every chapter's kernel does (same interpreter, same environment).
    import nbformat

    cells = []
    for number, (code, output) in enumerate(zip(PROBE_CODE, (capability, "minimem from the wheel")), 1):
        cell = nbformat.v4.new_code_cell(code, execution_count=number, metadata={"tags": [CHECK_TAG]})
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output + "\n")]
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def code_cells(path: Path) -> int:
    import nbformat

    return sum(cell.cell_type == "code" for cell in nbformat.read(path, as_version=4).cells)


class ChapterRun:
    """nbval over ``chapters``, each alone in an empty folder (nbval's kernel starts in the notebook's
    folder, so its runs go to that folder's ./runs), with the wheel's interpreter under one code path."""

    def __init__(self, install: Install, capability: str, root: Path, chapters: list[str]):
        self.capability, self.root = capability, root
        env = clean_env(**NOTEBOOK_ENV, ATEN_CPU_CAPABILITY=capability, MKL_CBWR="COMPATIBLE")
        self.runs_here = torch_capability(install.python, env)
        self.proc, self.results = None, None
        if not self.available:
            return
        import nbformat

        shutil.copy(REPO_ROOT / "notebooks" / "nbval_sanitize.cfg", root)
        (root / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: no conftest or options from above
        self.paths = {}
        for name in [*chapters, PROBE]:
            (root / name).mkdir()
            self.paths[name] = root / name / f"{name}.ipynb"
            if name == PROBE:
                nbformat.write(probe_notebook(self.runs_here), self.paths[name])
            else:
                shutil.copy(REPO_ROOT / "notebooks" / f"{name}.ipynb", self.paths[name])
        self.log, self.xml = root / "nbval.log", root / "nbval.xml"
        nbval = ["--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with", "nbval_sanitize.cfg"]
        argv = [install.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={self.xml}", *nbval]
        with self.log.open("w") as log:  # a file, not a pipe: the other run must not wait on this one
            self.proc = subprocess.Popen(
                [str(a) for a in argv] + [str(p.relative_to(root)) for p in self.paths.values()],
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def available(self) -> bool:
        # ATEN_CPU_CAPABILITY cannot raise the CPU's level: asking for avx2 on ARM runs another path.
        return self.runs_here == self.capability.upper()

    def outcomes(self, timeout: float = 2400) -> dict[str, list[tuple[str, str]]]:
        """{chapter: [(cell, failure text or "")]} once the run has ended (nbval makes one test per code cell)."""
        if self.results is None:
            import xml.etree.ElementTree as ET

            self.proc.wait(timeout=timeout)
            log = self.log.read_text()[-4000:]
            assert self.xml.is_file(), f"nbval under ATEN_CPU_CAPABILITY={self.capability} wrote no report:\n{log}"
            self.results = {name: [] for name in self.paths}
            for case in ET.parse(self.xml).iter("testcase"):
                chapter = case.get("classname", "").split(".")[0]  # "<chapter>.<chapter>.ipynb"
                problems = [case.find(kind) for kind in ("failure", "error", "skipped")]
                problem = next((p for p in problems if p is not None), None)  # a skipped cell counts too
                text = "" if problem is None else f"{problem.tag}: {problem.get('message', '')}\n{problem.text or ''}"
                self.results.setdefault(chapter, []).append((case.get("name"), ANSI.sub("", text)))
        return self.results

    def check(self, chapter: str) -> None:
        """Every code cell of ``chapter`` ran and passed (checked cells matched their saved output)."""
        assert self.proc is not None, f"no {self.capability} code path on this CPU (torch runs {self.runs_here})"
        cells = self.outcomes()[chapter]
        failed = [f"{cell}: {text[-3000:]}" for cell, text in cells if text]
        where = f"{chapter} from the wheel under ATEN_CPU_CAPABILITY={self.capability} MKL_CBWR=COMPATIBLE"
        assert not failed, f"{where}:\n" + "\n".join(failed)
        assert len(cells) == code_cells(self.paths[chapter]), f"{where}: {len(cells)} cells ran, {self.log}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # nbval and the kernels it started
            self.proc.wait()


@pytest.fixture(scope="module")
def chapter_runs(request, install, tmp_path_factory):
    """{code path: ChapterRun} for the chapters that the selected tests read, all started at once."""
    wanted = {}
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if getattr(item, "originalname", None) == "test_chapter_runs_from_the_wheel_in_an_empty_folder":
            wanted.setdefault("default", set()).add(params["notebook"].stem)
        elif getattr(item, "originalname", None) == "test_checked_cells_match_under_another_cpu_code_path":
            wanted.setdefault(params["capability"], set()).update(CHAPTERS)
    runs = {
        cap: ChapterRun(install, cap, tmp_path_factory.mktemp(f"chapters-{cap}"), sorted(chapters))
        for cap, chapters in wanted.items()
    }
    yield runs
    for chapter_run in runs.values():
        chapter_run.stop()


def test_every_chapter_is_checked_across_cpus_or_exempt():
    assert {path.stem for path in NOTEBOOKS} == set(CHAPTERS) | set(EXEMPT), (
        "add each chapter to CHAPTERS (it trains or computes float32 numbers) or to EXEMPT (it does not)"
    )
    import nbformat

    for name in EXEMPT:
        nb = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        assert not any("train(" in cell.source for cell in nb.cells if cell.cell_type == "code"), (
            f"{name} trains: it belongs in CHAPTERS"
        )


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_runs_from_the_wheel_in_an_empty_folder(chapter_runs, notebook):
    """The chapter alone in an empty folder, executed by a kernel that imports the installed wheel,
    its checked cells matching under the default code path."""
    chapter_runs["default"].check(PROBE)
    chapter_runs["default"].check(notebook.stem)


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("capability", CPU_PATHS)
def test_checked_cells_match_under_another_cpu_code_path(chapter_runs, capability):
    chapter_run = chapter_runs[capability]
    if not chapter_run.available:
        pytest.skip(f"this CPU has no {capability} code path (torch runs {chapter_run.runs_here})")
    for name in [PROBE, *CHAPTERS]:
        chapter_run.check(name)
