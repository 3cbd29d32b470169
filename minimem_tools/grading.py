"""``minimem grade [CHAPTER ...] [--reference]``: run the exercise graders, print a score table.

The exercises live in the repository's ``exercises/`` folder: one stub module per chapter
(``exercises/ch2_product_keys.py``, ...) whose functions raise ``NotImplementedError`` until the
learner fills them in, and one grader file per chapter (``exercises/graders/test_ch2.py``, ...).
A grader is a pytest test that carries

- ``@pytest.mark.points(n)``: what it is worth,
- ``@pytest.mark.exercise(name)`` (usually on its class): the stub function it grades,
- ``@pytest.mark.hint(text)``: what to look at when it fails,
- ``@pytest.mark.time_limit(seconds)`` (default :data:`DEFAULT_TIME_LIMIT`).

It receives the code under test from the ``solution`` fixture (``exercises/conftest.py``):
the learner's stub module, or minimem's own implementation (``--reference``, mapped in
``exercises/reference.py``), or any mapping the caller passes (the CI meta-tests pass wrong
solutions). The conceptual questions' answers come from the ``answers`` fixture the same way
(``exercises/questions.py``'s ANSWERS, or the reference's). :class:`GradingPlugin` chooses that code,
enforces the time limits and records points and every failing check (message, failing input, the
line where it failed); :func:`format_table` prints the result.

Two ways to run the graders:

- :func:`run_isolated` (what ``minimem grade`` does): every chapter in its own child process,
  scored by this process from a report it checks; the learner's code never runs here, so no
  stub can patch the score, end the grader, hang it or crash it (see "grading in child
  processes" below);
- :func:`run_graders`: pytest in this process, for the CI meta-tests that pass solution
  objects (deliberately wrong ones) that a child process could not receive.

Every run is deterministic: hypothesis draws its examples from one seed (``--seed``, default
:data:`DEFAULT_SEED`, printed with the table), so the same code always gets the same score. The
table lists every failing check of an exercise with its message, hypothesis's smallest failing
input, the line of the learner's code where it failed and a command that re-runs just that check
with the full traceback (``--traceback``).

Time limits use SIGALRM and raise :class:`GraderTimeout`, a ``BaseException``: hypothesis
catches ``Exception`` (and pytest's ``Failed``, which pytest-timeout raises) to shrink a failing
example, so it would re-run a hanging solution without a limit; it lets ``GraderTimeout`` through,
and so does a learner's ``except Exception``. They are the soft limit: code that ignores SIGALRM
is stopped by the hard limit of its chapter's child process, which is killed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import random
import re
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union
from xml.etree import ElementTree

import pytest
from _pytest.junitxml import mangle_test_address  # how pytest's JUnit XML names a test id

from minimem_tools.cli import ArgumentParser, usage_error

DEFAULT_TIME_LIMIT = 20.0  # seconds per grader test unless it says otherwise
DEFAULT_SEED = 0  # hypothesis's seed unless --seed (or pytest's --hypothesis-seed) says otherwise
LEARNER, REFERENCE = "learner", "reference"
QUESTIONS = "questions"  # the pseudo chapter module of the conceptual questions (exercises/questions.py)
# GradedTest.error of a NotImplementedError that a library call raised ("bincount" not implemented for
# 'Double'): a bug to show, unlike a stub's own ``raise NotImplementedError`` ("not implemented yet")
LIBRARY_NOT_IMPLEMENTED = "NotImplementedError (raised by a library call)"
MARKERS = (
    "points(n): what a grader test is worth (minimem grade)",
    "exercise(name): the exercise stub function a grader test grades",
    "hint(text): shown beside a failing grader test",
    "time_limit(seconds): a grader test fails with GraderTimeout after this long",
)


class GraderTimeout(BaseException):
    """A grader test ran past its time limit (a BaseException so that nothing swallows it)."""


# --------------------------------------------------------------------------- where things are


def _is_exercises_dir(path: Path) -> bool:
    """A folder with ``graders/`` and ``__init__.py``: the layout of ``exercises/`` (any name: it is
    imported as the package ``exercises`` either way, see :func:`import_root`)."""
    path = path.resolve()
    return path.is_dir() and (path / "graders").is_dir() and (path / "__init__.py").is_file()


def exercises_folder(path: Union[str, Path], what: str) -> Path:
    """``path`` as an exercises folder (or the ``exercises/`` inside it); FileNotFoundError naming ``what``."""
    path = Path(path).expanduser()
    for candidate in (path, path / "exercises"):
        if _is_exercises_dir(candidate):
            return candidate.resolve()
    raise FileNotFoundError(
        f"{what}={path} is not an exercises folder (a folder holding graders/ and __init__.py, as "
        "`minimem exercises init DIR` makes); point it at one"
    )


def find_exercises_dir() -> Path:
    """``$MINIMEM_EXERCISES`` when set (it must be an exercises folder), else ``./exercises``, else the
    ``exercises/`` beside the package (a checkout), else the installed minimem's copy."""
    if os.environ.get("MINIMEM_EXERCISES"):
        path = Path(os.environ["MINIMEM_EXERCISES"])
        if not _is_exercises_dir(path):
            raise FileNotFoundError(
                f"MINIMEM_EXERCISES={path} is not an exercises folder (a folder holding graders/ "
                "and __init__.py); point it at one, or unset it to grade ./exercises"
            )
        return path.resolve()
    candidates = [Path.cwd() / "exercises", Path(__file__).resolve().parents[1] / "exercises"]
    with contextlib.suppress(Exception):  # an installed minimem: the copy it carries (minimem_tools.course)
        from minimem_tools import course

        candidates.append(Path(course.path("exercises")))
    for path in candidates:
        if _is_exercises_dir(path):
            return path.resolve()
    raise FileNotFoundError(
        "cannot find the exercises folder (looked in: " + ", ".join(str(p) for p in candidates) + "); "
        "run minimem grade from the repository root, or give --dir DIR"
    )


def import_root(work: Optional[Path] = None) -> Path:
    """A folder whose ``exercises`` is the exercises folder: its parent when it is named
    ``exercises``, else ``work/root`` holding a link ``exercises`` to it (made once)."""
    folder = find_exercises_dir()
    if folder.name == "exercises":
        return folder.parent
    if work is None:
        raise ValueError(f"{folder} is not named 'exercises': grading it needs a work folder for the link")
    root = Path(work) / "root"
    if not (root / "exercises").exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "exercises").symlink_to(folder, target_is_directory=True)
    return root


def chapters() -> dict[int, str]:
    """Chapter number -> stub module name: ``CHAPTERS`` of the exercises folder's ``__init__.py``.

    The file is executed on its own, not imported: this process may already hold another
    ``exercises`` package (the checkout's, when the tests grade a copy).
    """
    return dict(runpy.run_path(str(find_exercises_dir() / "__init__.py"))["CHAPTERS"])


def parse_chapter(text: str) -> int:
    """``"2"``, ``"ch2"`` or ``"ch2_product_keys"`` -> 2; ValueError naming the allowed values."""
    known = chapters()
    key = str(text).strip().lower()
    for number, name in known.items():
        if key in (str(number), f"ch{number}", name):
            return number
    allowed = ", ".join(f"{n} ({name})" for n, name in known.items())
    raise ValueError(f"CHAPTER must be one of {allowed}; got {text!r}")


def use_triton_interpreter() -> None:
    """Set TRITON_INTERPRET=1 (before triton is imported) unless a CUDA GPU can compile kernels."""
    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no GPU
        has_cuda = False
    if not has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"


# --------------------------------------------------------------------------- time limit


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`GraderTimeout` in this thread after ``seconds`` (SIGALRM; nests with other alarms)."""
    if seconds is None or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise GraderTimeout(f"{what} did not finish within {seconds:g} s: an endless loop, or far slower than needed")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:  # an outer alarm (pytest-timeout, say) was pending: re-arm what is left
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - start), 1e-3))


# --------------------------------------------------------------------------- results


@dataclass
class GradedTest:
    chapter: int
    exercise: str
    name: str
    points: int
    passed: bool = False
    error: str = ""  # exception type name of the failure
    message: str = ""  # first line of the failure
    example: str = ""  # hypothesis's falsifying example, if any
    hint: str = ""
    seconds: float = 0.0
    where: str = ""  # the learner's line where it failed ("ch2_product_keys.py:40 in f: code"), or the grader's

    @property
    def earned(self) -> int:
        return self.points if self.passed else 0


@dataclass
class ExerciseResult:
    chapter: int
    number: str  # "2.1"
    name: str
    tests: list[GradedTest] = field(default_factory=list)

    @property
    def earned(self) -> int:
        return sum(t.earned for t in self.tests)

    @property
    def possible(self) -> int:
        return sum(t.points for t in self.tests)

    @property
    def first_failure(self) -> Optional[GradedTest]:
        return next((t for t in self.tests if not t.passed), None)

    @property
    def failures(self) -> list[GradedTest]:
        return [t for t in self.tests if not t.passed]


@dataclass
class GradeReport:
    solutions: str  # "learner", "reference" or "custom"
    tests: list[GradedTest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # collection errors of grader files
    exit_code: int = 0
    ungraded: dict[int, str] = field(default_factory=dict)  # chapter -> why it scored 0 (run_isolated)
    seed: int = DEFAULT_SEED  # hypothesis's seed
    folder: str = ""  # the exercises folder graded (run_isolated), for the re-run commands
    tracebacks: dict[int, str] = field(default_factory=dict)  # chapter -> pytest's failure report (traceback=True)
    dir_option: str = ""  # the --dir the table's re-run commands repeat

    @property
    def earned(self) -> int:
        return sum(t.earned for t in self.tests)

    @property
    def possible(self) -> int:
        return sum(t.points for t in self.tests)

    def exercises(self) -> list[ExerciseResult]:
        """Tests grouped by exercise, in grader order, numbered per chapter."""
        groups: dict[tuple[int, str], ExerciseResult] = {}
        per_chapter: dict[int, int] = {}
        for t in self.tests:
            key = (t.chapter, t.exercise)
            if key not in groups:
                per_chapter[t.chapter] = per_chapter.get(t.chapter, 0) + 1
                groups[key] = ExerciseResult(t.chapter, f"{t.chapter}.{per_chapter[t.chapter]}", t.exercise)
            groups[key].tests.append(t)
        return sorted(groups.values(), key=lambda e: (e.chapter, int(e.number.split(".")[1])))


def _falsifying_example(exc: BaseException) -> str:
    """hypothesis's "Failing test case: test(...)" note, on one line, without the fixtures."""
    for note in getattr(exc, "__notes__", []):
        if note.startswith(("Failing test case", "Falsifying example")):
            lines = [line.strip() for line in note.splitlines()[1:]]
            args = [a for a in lines if a and a != ")" and not a.startswith(("self=", "solution=", "reference=", "#"))]
            return " ".join(a.split("  #")[0] for a in args).rstrip(",")
    return ""


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions of a (nested) exception group, in order; [exc] for a plain exception."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _frame_text(frame: traceback.FrameSummary, base: Path) -> str:
    path = Path(frame.filename)
    with contextlib.suppress(ValueError, OSError):
        path = path.resolve().relative_to(base)
    code = (frame.line or "").strip()
    return f"{path}:{frame.lineno} in {frame.name}" + (f": {code}" if code else "")


def _frames(exc: BaseException, folder: Optional[Path]) -> tuple[Optional[Any], Optional[Any]]:
    """(deepest frame of the learner's own files, deepest frame of a grader test file) of ``exc``'s traceback."""
    learner = grader = helper = None
    if folder is None:
        return None, None
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            path = Path(frame.filename).resolve()
        except (OSError, ValueError):
            continue
        if folder not in path.parents:
            continue
        parts = path.relative_to(folder).parts
        if parts[0] == "graders":
            if parts[-1].startswith("test_"):
                grader = frame
            else:
                helper = frame
        elif parts[-1] not in ("conftest.py", "reference.py", "test_graders.py"):
            learner = frame
    return learner, grader or helper


def _folder() -> Optional[Path]:
    try:
        return find_exercises_dir()
    except FileNotFoundError:
        return None


def describe_failure(exc: BaseException) -> tuple[str, str, str, str]:
    """(exception type name, first line of its message, hypothesis's falsifying example or '', where it
    failed): where is the deepest line of the learner's own files (the exercises folder outside
    ``graders/``), else the grader line that found the failure. When hypothesis found several distinct
    failures, one raised in the learner's code is described, and the message says how many there were."""
    folder = _folder()
    leaves = _leaves(exc)
    exc = next((leaf for leaf in leaves if _frames(leaf, folder)[0] is not None), leaves[0])
    name = type(exc).__name__
    text = str(exc).strip()
    if isinstance(exc, NotImplementedError):
        text = text or "the exercise is not implemented yet"
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and not (frames[-1].line or "").lstrip().startswith("raise"):  # torch's "not implemented for ..."
            name = LIBRARY_NOT_IMPLEMENTED
    elif isinstance(exc, AssertionError):
        text = text.split("\nassert ")[0]  # drop pytest's rewritten-assert explanation
    lines = [line for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if len(leaves) > 1:
        message += f" (one of {len(leaves)} distinct failures hypothesis found; --traceback shows them all)"
    learner, grader = _frames(exc, folder)
    where = ""
    if learner is not None:
        where = "your code: " + _frame_text(learner, folder)
    elif grader is not None:
        where = "checked at: " + _frame_text(grader, folder)
    return name, message, _falsifying_example(exc), where


def _marker_arg(item, name: str, default: Any = None) -> Any:
    marker = item.get_closest_marker(name)
    return marker.args[0] if marker is not None and marker.args else default


def is_graded(item) -> bool:
    return item.get_closest_marker("points") is not None


def _collection_error(report) -> str:
    """``nodeid: last line of the error`` for a grader file that failed to load."""
    return f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1]}"


class GradingPlugin:
    """pytest plugin: chooses the code under test, enforces time limits, records points.

    ``solutions``: ``"learner"`` (the stub modules in ``exercises/``), ``"reference"``
    (``exercises.reference``: minimem's own implementation) or a mapping chapter module name
    -> object whose attributes are the exercise functions.
    ``time_limit``: seconds for every graded test, overriding their markers (None: the markers).
    """

    def __init__(
        self,
        solutions: Union[str, Mapping[str, Any]] = LEARNER,
        time_limit: Optional[float] = None,
        progress: bool = False,
        print_table: bool = False,
        seed: Optional[int] = None,
    ):
        if isinstance(solutions, str) and solutions not in (LEARNER, REFERENCE):
            raise ValueError(f"solutions must be {LEARNER!r}, {REFERENCE!r} or a mapping, got {solutions!r}")
        self.solutions = solutions
        self.time_limit = time_limit
        self.progress = progress
        self.print_table = print_table
        self.seed = seed
        self._saved_seed: Any = None
        self.results: list[GradedTest] = []
        self.errors: list[str] = []
        self._loaded: dict[str, Any] = {}
        self._bar = None

    @property
    def mode(self) -> str:
        return self.solutions if isinstance(self.solutions, str) else "custom"

    # ----------------------------------------------------------------- the code under test
    def solutions_for(self, chapter_module: str) -> Any:
        """The object whose attributes are chapter ``chapter_module``'s exercise functions (or, for
        :data:`QUESTIONS`, the object whose ``ANSWERS`` are the answers to the conceptual questions)."""
        if chapter_module in self._loaded:
            return self._loaded[chapter_module]
        if isinstance(self.solutions, Mapping):
            if chapter_module not in self.solutions:
                raise KeyError(f"no solutions given for {chapter_module}; given: {sorted(self.solutions)}")
            found = self.solutions[chapter_module]
        elif self.solutions == REFERENCE:
            found = importlib.import_module("exercises.reference").namespace(chapter_module)
        else:  # the learner's file, re-read so that edits since the last run count
            name = f"exercises.{chapter_module}"
            found = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
        self._loaded[chapter_module] = found
        return found

    # ----------------------------------------------------------------- hooks
    def pytest_configure(self, config) -> None:
        for line in MARKERS:
            config.addinivalue_line("markers", line)
        # One seed for every hypothesis test: the same code always gets the same examples, hence the same score.
        given = config.getoption("hypothesis_seed", None) if self.seed is None else self.seed
        try:
            self.seed = DEFAULT_SEED if given is None else int(given)
        except ValueError:
            raise pytest.UsageError(f"--hypothesis-seed must be an integer, got {given!r}") from None
        from hypothesis import core

        self._saved_seed = core.global_force_seed
        core.global_force_seed = self.seed

    def pytest_unconfigure(self, config) -> None:
        from hypothesis import core

        core.global_force_seed = self._saved_seed

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.errors.append(_collection_error(report))

    @pytest.hookimpl(tryfirst=True)  # before pytest's -k deselects
    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:  # -k product_key_topk: an exercise's name selects its graders
            if is_graded(item):
                item.extra_keyword_matches.add(str(_marker_arg(item, "exercise", item.name)))

    def pytest_collection_finish(self, session) -> None:
        graded = [item for item in session.items if is_graded(item)]
        if self.progress and graded:
            from tqdm import tqdm

            self._bar = tqdm(total=len(graded), desc="grading", unit="test", file=sys.stderr, leave=False)

    def _limit(self, item) -> float:
        return (
            self.time_limit
            if self.time_limit is not None
            else float(_marker_arg(item, "time_limit", DEFAULT_TIME_LIMIT))
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):  # loading the solutions (a learner's module runs on import)
        if not is_graded(item):
            return (yield)
        with time_limit(self._limit(item), f"{item.name} (setup: importing the solutions)"):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        if not is_graded(item):
            return (yield)
        random.seed(self.seed)  # the learner's own random draws, too, are the same in every run
        if "torch" in sys.modules:
            sys.modules["torch"].manual_seed(self.seed)
        with time_limit(self._limit(item), item.name):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if not is_graded(item) or (call.when != "call" and call.excinfo is None):
            return report
        if call.when == "teardown" and any(r.name == item.nodeid for r in self.results):
            return report  # a teardown error after a recorded call: the call result stands
        result = GradedTest(
            chapter=int(getattr(item.module, "CHAPTER", 0)),
            exercise=str(_marker_arg(item, "exercise", item.name)),
            name=item.nodeid,
            points=int(_marker_arg(item, "points", 0)),
            hint=str(_marker_arg(item, "hint", "")),
            seconds=call.duration,
        )
        if call.excinfo is None:
            result.passed = True
        else:
            result.error, result.message, result.example, result.where = describe_failure(call.excinfo.value)
            # for the JUnit XML report of a child process (run_isolated): what the table shows
            item.user_properties += [
                ("error", result.error),
                ("message", result.message),
                ("example", result.example),
                ("where", result.where),
            ]
        self.results.append(result)
        if self._bar is not None and call.when in ("call", "setup"):
            self._bar.update(1)
        return report

    def pytest_sessionfinish(self, session) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.print_table and self.results:
            terminalreporter.write_line("")
            terminalreporter.write_line(format_table(self.report()))

    def report(self, exit_code: int = 0) -> GradeReport:
        return GradeReport(
            self.mode,
            list(self.results),
            list(self.errors),
            exit_code,
            seed=DEFAULT_SEED if self.seed is None else self.seed,
        )


# --------------------------------------------------------------------------- running


def grader_files(chapter_numbers: Optional[Sequence[int]] = None, root: Optional[Path] = None) -> list[Path]:
    """The grader file of each chapter (all if empty), under ``root/exercises`` when given."""
    graders = (root / "exercises" if root is not None else find_exercises_dir()) / "graders"
    numbers = sorted(chapters()) if not chapter_numbers else list(chapter_numbers)
    return [graders / f"test_ch{n}.py" for n in numbers]


def run_graders(
    chapter_numbers: Optional[Sequence[int]] = None,
    solutions: Union[str, Mapping[str, Any]] = LEARNER,
    time_limit: Optional[float] = None,
    select: Optional[str] = None,
    progress: bool = False,
    extra_args: Sequence[str] = (),
    seed: Optional[int] = None,
) -> GradeReport:
    """Run the graders of ``chapter_numbers`` (all if empty) in this process; return the report.

    ``select`` is a pytest ``-k`` expression (e.g. an exercise name) to run only some graders.
    The solutions run in this process too: this is for the meta-tests, which pass solution
    objects; ``minimem grade`` uses :func:`run_isolated`.
    """
    use_triton_interpreter()
    files = grader_files(chapter_numbers)
    plugin = GradingPlugin(solutions, time_limit=time_limit, progress=progress, seed=seed)
    root = import_root()
    args = [str(f) for f in files] + [
        "-q",
        "-q",
        "--tb=no",
        "--no-header",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        f"--rootdir={root}",
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
    ]
    if select:
        args += ["-k", select]
    args += list(extra_args)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = pytest.main(args, plugins=[plugin])
    return plugin.report(int(code))


# --------------------------------------------------------------------------- grading in child processes
#
# `minimem grade` never runs the learner's code in its own process: that code could patch the
# grader's classes, end the process (os._exit), ignore SIGALRM or crash the interpreter. Instead:
#
# 1. a clean child process collects the graders and writes, for every selected test, its id,
#    chapter, exercise, points, hint and time limit. It imports the grader files but never the
#    learner's code, which the ``solution`` fixture loads only when the first test runs;
# 2. one child process per chapter runs exactly those test ids and then a canary test that
#    always fails; pytest's own junitxml plugin writes the report to a file that this process
#    chooses. A child that outlives its hard limit is killed (SIGKILL, with its process group);
# 3. this process scores the chapter, with the points it collected, only when the report lists
#    every test id exactly once and nothing else, the canary failed, and pytest exited with 1
#    ("some tests failed", which the canary guarantees). Otherwise the chapter scores 0, the
#    table says why, and the other chapters are graded as usual.
#
# The child runs as the same user, so a determined author who reads this file could still write
# a report that passes these checks (only a sandbox stops that). What the checks stop is every
# crash, early exit and hang, and the generic tricks: a patched grader or pytest that passes
# everything, a report rewritten or written in advance, a process that exits 0.

CANARY_NAME = "test_grader_canary"
CANARY = f'''"""Written by minimem grade: runs after a chapter's graders and always fails."""


def {CANARY_NAME}():
    raise AssertionError("this check always fails: a report in which it passed was tampered with")
'''
NOT_GRADED = "NotGraded"  # GradedTest.error of every test of a chapter without a trustworthy report
STARTUP_SECONDS = 60.0  # a child's allowance for starting Python and importing torch, beyond its tests' limits


def _child_dir(work: Path, name: str) -> Path:
    """A new folder under ``work`` for one child, named so that no earlier child could predict it (and
    write there in advance), holding the child's pytest config (empty: not the checkout's) and the canary."""
    here = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    (here / "pytest.ini").write_text("[pytest]\n")
    (here / f"{CANARY_NAME}.py").write_text(CANARY)
    return here


def _pytest_options(work: Path, root: Path) -> list[str]:
    """Options of every child: the config in ``work`` (see `_child_dir`), the import root, no cache, and of
    the installed plugins only hypothesis's (`_run_child` turns autoloading off: nbval alone takes 5 s to import)."""
    return [
        "-c",
        str(work / "pytest.ini"),
        f"--rootdir={root}",
        "-p",
        "no:cacheprovider",
        "-p",
        "_hypothesis_pytestplugin",
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
    ]


def _run_child(argv: list[str], log: Path, seconds: float, root: Path) -> tuple[int, bool]:
    """Run ``argv`` in ``root`` (where ``exercises`` imports), its output into ``log``: (exit status, killed on time).

    The child leads its own process group; the group is killed when the child ends or runs
    past ``seconds`` (or this process is interrupted), so nothing it started lives on.
    """
    env = dict(os.environ, MINIMEM_EXERCISES=str(find_exercises_dir()), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    with open(log, "wb") as out:
        child = subprocess.Popen(
            argv,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return child.wait(timeout=seconds), False
        except subprocess.TimeoutExpired:
            return -signal.SIGKILL, True
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _ended(code: int) -> str:
    """How a child process ended, in words."""
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


class _Collector:
    """pytest plugin of the collecting child: every selected graded test's id and markers."""

    def __init__(self):
        self.tests: list[dict] = []
        self.errors: list[str] = []

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.errors.append(_collection_error(report))

    def pytest_collection_finish(self, session) -> None:
        self.tests = [
            dict(
                id=item.nodeid,
                chapter=int(getattr(item.module, "CHAPTER", 0)),
                exercise=str(_marker_arg(item, "exercise", item.name)),
                points=int(_marker_arg(item, "points", 0)),
                hint=str(_marker_arg(item, "hint", "")),
                time_limit=float(_marker_arg(item, "time_limit", DEFAULT_TIME_LIMIT)),
            )
            for item in session.items
            if is_graded(item)
        ]


def collect_graders(out: str, args: Sequence[str]) -> int:
    """The collecting child's program: write the graded tests that ``pytest args`` selects to ``out`` (JSON)."""
    collector = _Collector()
    code = pytest.main(["--collect-only", "-q", *args], plugins=[collector])
    Path(out).write_text(json.dumps(dict(tests=collector.tests, errors=collector.errors)))
    return int(code)


def _collect(work: Path, root: Path, files: list[Path], select: Optional[str]) -> tuple[list[dict], list[str], int]:
    """(graded tests, grader files that failed to load, pytest's exit status), from a clean child."""
    work = _child_dir(work, "collect")
    out, log = work / "collected.json", work / "output.log"
    args = _pytest_options(work, root) + [str(f) for f in files] + (["-k", select] if select else [])
    program = (
        "import sys; from minimem_tools.grading import collect_graders; "
        "sys.exit(collect_graders(sys.argv[1], sys.argv[2:]))"
    )
    code, killed = _run_child([sys.executable, "-c", program, str(out), *args], log, STARTUP_SECONDS * 2, root)
    if code == pytest.ExitCode.USAGE_ERROR and select:
        raise ValueError(
            f"-k {select!r} is not a pytest -k expression ({_last_line(log)}); "
            "give an exercise or grader name such as product_key_topk"
        )
    if killed or not out.is_file():
        what = "did not finish in time" if killed else _ended(code)
        return [], [f"collecting the graders failed: the process {what} ({_last_line(log)})"], code
    collected = json.loads(out.read_text())
    return collected["tests"], collected["errors"], code


def _junit_address(nodeid: str) -> tuple[str, str]:
    """(classname, name) of a test id in pytest's JUnit XML."""
    names = mangle_test_address(nodeid)
    return ".".join(names[:-1]), names[-1]


def _passed(case: ElementTree.Element) -> bool:
    return not any(child.tag in ("failure", "error", "skipped") for child in case)


def _check_report(xml: Path, code: int, killed: bool, seconds: float, ids: list[str]) -> tuple[dict, str]:
    """The report's test cases by test id, or ({}, why the chapter scores 0)."""
    if killed:
        return {}, (
            f"the grader process did not finish within {seconds:g} s and was killed: an endless loop "
            "that the per-test time limit could not stop (does your code catch or ignore SIGALRM?)"
        )
    if not xml.is_file():
        return {}, (
            f"the grader process {_ended(code)} before writing its report: your code (or a library "
            "it calls) crashed or ended the process"
        )
    try:
        cases = list(ElementTree.parse(xml).getroot().iter("testcase"))
    except ElementTree.ParseError as err:
        return {}, f"the grader's report is unreadable ({err}): was it written by something else?"
    canaries = [case for case in cases if case.get("name") == CANARY_NAME]
    if len(canaries) != 1 or _passed(canaries[0]):
        return {}, (
            "a check that always fails is missing from the report or passed in it: the report was "
            "tampered with (does your code patch pytest or the grader, or write files?)"
        )
    cases = [case for case in cases if case.get("name") != CANARY_NAME]
    found = Counter((case.get("classname", ""), case.get("name", "")) for case in cases)
    by_address = {_junit_address(i): i for i in ids}
    if set(found) != set(by_address) or max(found.values()) > 1:
        return {}, (
            f"the grader's report does not list each of the {len(ids)} selected tests exactly once "
            f"({len(set(found) - set(by_address))} unknown, {len(set(by_address) - set(found))} missing, "
            f"{sum(n > 1 for n in found.values())} repeated): was it written by something else?"
        )
    if code != pytest.ExitCode.TESTS_FAILED:
        return {}, f"the grader process {_ended(code)}, not 1 as pytest does after a failing check: it was ended early"
    return {by_address[(case.get("classname", ""), case.get("name", ""))]: case for case in cases}, ""


def _failure_report(log: Path) -> str:
    """pytest's failure sections from a child's output, without the canary's."""
    text = log.read_text(errors="replace")
    start = re.search(r"^=+ FAILURES =+$", text, flags=re.M)
    if start is None:
        return ""
    end = re.search(r"^=+ (short test summary info|\d+ (failed|passed)).*=+$", text[start.end() :], flags=re.M)
    body = text[start.end() : start.end() + end.start()] if end else text[start.end() :]
    sections = re.split(r"(?m)^(?=_{3,} .+ _{3,}$)", body)
    return "".join(part for part in sections if part.strip() and CANARY_NAME not in part.splitlines()[0]).strip()


def _grade_chapter(
    work: Path,
    root: Path,
    tests: list[dict],
    solutions: str,
    time_limit: Optional[float],
    seconds: float,
    seed: int,
    tracebacks: bool = False,
) -> tuple[list[GradedTest], str, str]:
    """Run one chapter's ``tests`` in a child process: (graded tests, why it scored 0 or '', pytest's
    failure report when ``tracebacks``)."""
    chapter = tests[0]["chapter"]
    work = _child_dir(work, f"ch{chapter}")
    xml, log = work / "report.xml", work / "output.log"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        *_pytest_options(work, root),
        "-q",
        "--tb=long" if tracebacks else "--tb=no",
        f"--hypothesis-seed={seed}",
        f"--junitxml={xml}",
        *[t["id"] for t in tests],
        str(work / f"{CANARY_NAME}.py"),
    ]
    argv += ["--reference"] if solutions == REFERENCE else []
    argv += ["--time-limit", repr(time_limit)] if time_limit is not None else []
    code, killed = _run_child(argv, log, seconds, root)
    cases, why = _check_report(xml, code, killed, seconds, [t["id"] for t in tests])
    graded = []
    for t in tests:
        result = GradedTest(chapter, t["exercise"], t["id"], t["points"], hint=t["hint"])
        case = cases.get(t["id"])
        if case is None:
            result.error, result.message = NOT_GRADED, why
            graded.append(result)
            continue
        result.seconds = float(case.get("time", 0))
        if _passed(case):
            result.passed = True
        else:  # the details our plugin recorded; else the first line of pytest's own message
            details = {p.get("name"): p.get("value", "") for p in case.iter("property")}
            failure = next(child for child in case if child.tag in ("failure", "error", "skipped"))
            result.error = details.get("error") or failure.tag
            result.message = details.get("message", (failure.get("message") or "").strip().split("\n")[0])
            result.example = details.get("example", "")
            result.where = details.get("where", "")
        graded.append(result)
    failures = _failure_report(log) if tracebacks and log.is_file() else ""
    return graded, why, failures.replace(str(root / "exercises"), str(find_exercises_dir()))


def run_isolated(
    chapter_numbers: Optional[Sequence[int]] = None,
    solutions: str = LEARNER,
    time_limit: Optional[float] = None,
    select: Optional[str] = None,
    progress: bool = False,
    hard_limit: Optional[float] = None,
    seed: int = DEFAULT_SEED,
    tracebacks: bool = False,
) -> GradeReport:
    """Grade ``chapter_numbers`` (all if empty), each chapter in its own child process (see above).

    ``solutions``: ``"learner"`` or ``"reference"``; ``select``: a pytest ``-k`` expression;
    ``hard_limit``: seconds before a chapter's process is killed (default: the time limits of its
    tests, twice, for setup and call, plus :data:`STARTUP_SECONDS`); ``seed``: hypothesis's seed;
    ``tracebacks``: keep pytest's full failure report of every chapter. ValueError for a bad ``select``.
    """
    if solutions not in (LEARNER, REFERENCE):
        raise ValueError(f"solutions must be {LEARNER!r} or {REFERENCE!r}, got {solutions!r}")
    report = GradeReport(solutions, seed=int(seed), folder=str(find_exercises_dir()))
    with tempfile.TemporaryDirectory(prefix="minimem-grade-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        root = import_root(work)
        collected, report.errors, report.exit_code = _collect(work, root, grader_files(chapter_numbers, root), select)
        bar = None
        if progress and collected:
            from tqdm import tqdm

            bar = tqdm(total=len(collected), desc="grading", unit="test", file=sys.stderr, leave=False)
        for chapter in sorted({t["chapter"] for t in collected}):
            tests = [t for t in collected if t["chapter"] == chapter]
            seconds = hard_limit or STARTUP_SECONDS + 2 * sum(time_limit or t["time_limit"] for t in tests)
            graded, why, failures = _grade_chapter(
                work, root, tests, solutions, time_limit, seconds, report.seed, tracebacks
            )
            report.tests += graded
            if why:
                report.ungraded[chapter] = why
            if failures:
                report.tracebacks[chapter] = failures
            if bar is not None:
                bar.update(len(tests))
        if bar is not None:
            bar.close()
    return report


# --------------------------------------------------------------------------- the table


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _selector(test_id: str) -> str:
    """A ``-k`` expression that selects the grader test ``test_id`` (its class and name)."""
    names = test_id.split("::")[1:]
    return " and ".join(names) if names else test_id


def rerun_command(report: GradeReport, test: GradedTest) -> str:
    """The command that re-runs one failing check alone, with pytest's full traceback."""
    argv = ["minimem", "grade"]
    if report.dir_option:
        argv += ["--dir", report.dir_option]
    argv += [str(test.chapter), "-k", _selector(test.name)]
    if report.solutions == REFERENCE:
        argv.append("--reference")
    if report.seed != DEFAULT_SEED:
        argv += ["--seed", str(report.seed)]
    return shlex.join(argv + ["--traceback"])


def format_table(report: GradeReport, width: int = 100) -> str:
    """Exercise and points earned of possible; below a failing exercise, every failing check with its
    message, failing input, the line where it failed, a hint and the command that re-runs it."""
    head = {
        LEARNER: "your solutions in exercises/ (minimem grade --reference grades minimem's own code)",
        REFERENCE: "minimem's own implementation (exercises/reference.py)",
    }.get(report.solutions, "custom solutions")
    if report.dir_option:
        head = head.replace("exercises/", f"{report.dir_option}/", 1)
    seed = f"hypothesis seed {report.seed} (every run draws the same examples; --seed N draws others)"
    lines = [f"Graded: {head}", seed, ""]
    lines.append(f"{'':3}{'#':<5} {'exercise':<30} {'points':>7}   failing checks")
    lines.append("-" * width)
    by_chapter: dict[int, list[int]] = {}
    indent = " " * 10
    for ex in report.exercises():
        tally = by_chapter.setdefault(ex.chapter, [0, 0])
        tally[0] += ex.earned
        tally[1] += ex.possible
        failures = ex.failures
        real = [t for t in failures if t.error not in ("NotImplementedError", NOT_GRADED)]
        missing = len(failures) - len(real)
        if not failures:
            mark, summary = "ok", ""
        elif any(t.error == NOT_GRADED for t in failures):
            mark, summary = "", "chapter not graded (see below)"
        elif not real:
            mark, summary = "", "not implemented yet"
        else:
            mark = ""
            summary = f"{len(real)} of {len(ex.tests)} checks fail"
            if missing:
                summary += f" ({missing} more not implemented yet)"
        lines.append(f"{mark:<3}{ex.number:<5} {_clip(ex.name, 30):<30} {ex.earned:>3}/{ex.possible:<3}   {summary}")
        for fail in real:
            check = fail.name.split("::")[-1]
            lines += textwrap.wrap(
                f"x {check} ({fail.points} point{'s' if fail.points != 1 else ''}): "
                + (f"{fail.error}: {fail.message}" if fail.message else fail.error),
                width,
                initial_indent=indent,
                subsequent_indent=indent + "    ",
            )
            details = []
            if fail.example:
                details.append(f"failing input: {fail.example}")
            if fail.hint:
                details.append(f"hint: {fail.hint}")
            for detail in details:
                lines += textwrap.wrap(
                    detail,
                    width,
                    initial_indent=indent + "  ",
                    subsequent_indent=indent + "    ",
                    break_on_hyphens=False,
                )
            if fail.where:  # one line each: the code as written, the command to copy
                lines.append(f"{indent}  {fail.where}")
            lines.append(f"{indent}  re-run: {rerun_command(report, fail)}")
    lines.append("-" * width)
    for error in report.errors:
        lines.append(f"grader error: {_clip(error, width - 14)}")
    for chapter, why in sorted(report.ungraded.items()):
        lines += textwrap.wrap(f"ch{chapter} scored 0: {why}", width, subsequent_indent="  ")
    chapter_totals = "   ".join(f"ch{c} {e}/{p}" for c, (e, p) in sorted(by_chapter.items()))
    if chapter_totals:
        lines.append(chapter_totals)
    percent = 100.0 * report.earned / report.possible if report.possible else 0.0
    lines.append(f"total: {report.earned}/{report.possible} points ({percent:.0f}%)")
    for chapter, text in sorted(report.tracebacks.items()):
        lines += ["", f"{'=' * 30} chapter {chapter}: pytest's failure report {'=' * 30}", text]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    prog = "minimem grade"
    parser = ArgumentParser(
        prog=prog,
        description="Grade the exercises in exercises/ (or --dir DIR; or, with --reference, minimem's own "
        "implementation); each chapter runs in its own process. MINIMEM_EXERCISES names another exercises folder.",
    )
    parser.add_argument("chapters", nargs="*", metavar="CHAPTER", help="chapter number(s) 1-9 (default: all)")
    parser.add_argument("--reference", action="store_true", help="grade minimem's own implementation")
    parser.add_argument(
        "--dir",
        dest="folder",
        default=None,
        help="the exercises folder to grade (`minimem exercises init DIR` makes one)",
    )
    parser.add_argument("-k", dest="select", default=None, help="only graders matching this pytest -k expression")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds per grader test (default: each test's own)"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"hypothesis's seed (default {DEFAULT_SEED}: the same every run)"
    )
    parser.add_argument(
        "--traceback", action="store_true", help="print pytest's full failure report (tracebacks) after the table"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.time_limit is not None and not 0 < args.time_limit < math.inf:
        return usage_error(
            prog,
            f"--time-limit must be a positive number of seconds, got {args.time_limit:g}; "
            "leave it out to use each grader's own limit",
        )
    if not 0 <= args.seed < 2**32:
        return usage_error(prog, f"--seed must be an integer in [0, 2**32), got {args.seed}")
    saved = os.environ.get("MINIMEM_EXERCISES")
    try:
        if args.folder is not None:
            os.environ["MINIMEM_EXERCISES"] = str(exercises_folder(args.folder, "--dir"))
        find_exercises_dir()
        numbers = [parse_chapter(c) for c in args.chapters]
        report = run_isolated(
            numbers,
            REFERENCE if args.reference else LEARNER,
            args.time_limit,
            args.select,
            progress=sys.stderr.isatty(),
            seed=args.seed,
            tracebacks=args.traceback,
        )
    except (ValueError, FileNotFoundError) as err:
        return usage_error(prog, str(err))
    finally:
        if args.folder is not None:
            if saved is None:
                os.environ.pop("MINIMEM_EXERCISES", None)
            else:
                os.environ["MINIMEM_EXERCISES"] = saved
    report.dir_option = args.folder or ""
    if not report.tests and not report.errors and args.select:
        return usage_error(
            prog, f"-k {args.select!r} matches no grader test; give an exercise or grader name such as product_key_topk"
        )
    print(format_table(report))
    if report.errors or not report.tests:
        print(
            f"{prog}: error: the graders did not load (see 'grader error' above); they, not your code, need fixing",
            file=sys.stderr,
        )
        return 2
    return 0 if report.earned == report.possible else 1


if __name__ == "__main__":
    raise SystemExit(main())
