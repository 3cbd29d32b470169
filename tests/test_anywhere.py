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
  the installed wheel (slow: select chapters with ``-k``, e.g. ``-k "00_welcome or 02_product"``);
- and, quickly: requirements.txt's pins fit pyproject.toml's ranges.

All but the last are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
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

EXECUTE = FROM_THE_WHEEL + textwrap.dedent(
    """
    import sys, time
    import nbformat
    from nbclient import NotebookClient

    path = sys.argv[1]
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(GUARD))  # the kernel, too, must see the wheel
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    print(f"seconds {time.perf_counter() - start:.1f}")
    """
).replace("GUARD", repr(FROM_THE_WHEEL))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_runs_from_the_wheel_in_an_empty_folder(install, elsewhere, notebook):
    """The chapter alone in an empty folder, executed by a kernel that imports the installed wheel."""
    copy = elsewhere / notebook.name
    shutil.copy2(notebook, copy)
    start = time.perf_counter()
    result = run([install.python, "-c", EXECUTE, copy.name], elsewhere, timeout=1700, **NOTEBOOK_ENV)
    wall = time.perf_counter() - start
    print(f"\n{notebook.name}: {wall:.1f} s from the wheel in an empty folder")
    assert result.returncode == 0, f"{notebook.name} failed after {wall:.0f} s:\n{result.stderr[-4000:]}"
