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
solutions). :class:`GradingPlugin` chooses that code, enforces the time limits and records
points and the first failing check of every exercise; :func:`run_graders` runs pytest in this
process with it; :func:`format_table` prints the result.

Time limits use SIGALRM and raise :class:`GraderTimeout`, a ``BaseException``: hypothesis
catches ``Exception`` (and pytest's ``Failed``, which pytest-timeout raises) to shrink a failing
example, so it would re-run a hanging solution without a limit; it lets ``GraderTimeout`` through,
and so does a learner's ``except Exception``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import pytest

DEFAULT_TIME_LIMIT = 20.0  # seconds per grader test unless it says otherwise
LEARNER, REFERENCE = "learner", "reference"
MARKERS = (
    "points(n): what a grader test is worth (minimem grade)",
    "exercise(name): the exercise stub function a grader test grades",
    "hint(text): shown beside a failing grader test",
    "time_limit(seconds): a grader test fails with GraderTimeout after this long",
)


class GraderTimeout(BaseException):
    """A grader test ran past its time limit (a BaseException so that nothing swallows it)."""


# --------------------------------------------------------------------------- where things are


def find_exercises_dir() -> Path:
    """``$MINIMEM_EXERCISES``, else ``./exercises``, else the ``exercises/`` beside the package."""
    candidates = []
    if os.environ.get("MINIMEM_EXERCISES"):
        candidates.append(Path(os.environ["MINIMEM_EXERCISES"]))
    candidates += [Path.cwd() / "exercises", Path(__file__).resolve().parents[1] / "exercises"]
    for path in candidates:
        if (path / "graders").is_dir() and (path / "__init__.py").is_file():
            return path.resolve()
    raise FileNotFoundError(
        "cannot find the exercises folder (looked in: " + ", ".join(str(p) for p in candidates) + "); "
        "run minimem grade from the repository root or set MINIMEM_EXERCISES"
    )


def chapters() -> dict[int, str]:
    """Chapter number -> stub module name, from ``exercises.CHAPTERS``."""
    root = find_exercises_dir().parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return dict(importlib.import_module("exercises").CHAPTERS)


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
        raise GraderTimeout(
            f"{what} did not finish within {seconds:g} s: an endless loop, or far slower than needed"
        )

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


@dataclass
class GradeReport:
    solutions: str  # "learner", "reference" or "custom"
    tests: list[GradedTest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # collection errors of grader files
    exit_code: int = 0

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


def _describe(excinfo) -> tuple[str, str, str]:
    """(exception type name, first line of its message, hypothesis's falsifying example or '')."""
    exc = excinfo.value
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # hypothesis found several distinct failures
        exc = exc.exceptions[0]
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
    name = type(exc).__name__
    text = str(exc).strip()
    if isinstance(exc, NotImplementedError):
        text = text or "the exercise is not implemented yet"
    elif isinstance(exc, AssertionError):
        text = text.split("\nassert ")[0]  # drop pytest's rewritten-assert explanation
    lines = [line for line in text.splitlines() if line.strip()]
    return name, (lines[0] if lines else ""), _falsifying_example(exc)


def _marker_arg(item, name: str, default: Any = None) -> Any:
    marker = item.get_closest_marker(name)
    return marker.args[0] if marker is not None and marker.args else default


def is_graded(item) -> bool:
    return item.get_closest_marker("points") is not None


class GradingPlugin:
    """pytest plugin: chooses the code under test, enforces time limits, records points.

    ``solutions``: ``"learner"`` (the stub modules in ``exercises/``), ``"reference"``
    (``exercises.reference``: minimem's own implementation) or a mapping chapter module name
    -> object whose attributes are the exercise functions.
    ``time_limit``: seconds for every graded test, overriding their markers (None: the markers).
    """

    def __init__(self, solutions: Union[str, Mapping[str, Any]] = LEARNER, time_limit: Optional[float] = None,
                 progress: bool = False, print_table: bool = False):
        if isinstance(solutions, str) and solutions not in (LEARNER, REFERENCE):
            raise ValueError(f"solutions must be {LEARNER!r}, {REFERENCE!r} or a mapping, got {solutions!r}")
        self.solutions = solutions
        self.time_limit = time_limit
        self.progress = progress
        self.print_table = print_table
        self.results: list[GradedTest] = []
        self.errors: list[str] = []
        self._loaded: dict[str, Any] = {}
        self._bar = None

    @property
    def mode(self) -> str:
        return self.solutions if isinstance(self.solutions, str) else "custom"

    # ----------------------------------------------------------------- the code under test
    def solutions_for(self, chapter_module: str) -> Any:
        """The object whose attributes are chapter ``chapter_module``'s exercise functions."""
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

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.errors.append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1]}")

    def pytest_collection_finish(self, session) -> None:
        graded = [item for item in session.items if is_graded(item)]
        if self.progress and graded:
            from tqdm import tqdm

            self._bar = tqdm(total=len(graded), desc="grading", unit="test", file=sys.stderr, leave=False)

    def _limit(self, item) -> float:
        return self.time_limit if self.time_limit is not None else float(_marker_arg(item, "time_limit", DEFAULT_TIME_LIMIT))

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
            result.error, result.message, result.example = _describe(call.excinfo)
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
        return GradeReport(self.mode, list(self.results), list(self.errors), exit_code)


# --------------------------------------------------------------------------- running


def grader_files(chapter_numbers: Optional[Sequence[int]] = None) -> list[Path]:
    graders = find_exercises_dir() / "graders"
    numbers = sorted(chapters()) if not chapter_numbers else list(chapter_numbers)
    return [graders / f"test_ch{n}.py" for n in numbers]


def run_graders(
    chapter_numbers: Optional[Sequence[int]] = None,
    solutions: Union[str, Mapping[str, Any]] = LEARNER,
    time_limit: Optional[float] = None,
    select: Optional[str] = None,
    progress: bool = False,
    extra_args: Sequence[str] = (),
) -> GradeReport:
    """Run the graders of ``chapter_numbers`` (all if empty) in this process; return the report.

    ``select`` is a pytest ``-k`` expression (e.g. an exercise name) to run only some graders.
    """
    use_triton_interpreter()
    files = grader_files(chapter_numbers)
    plugin = GradingPlugin(solutions, time_limit=time_limit, progress=progress)
    root = find_exercises_dir().parent
    args = [str(f) for f in files] + [
        "-q", "-q", "--tb=no", "--no-header", "-p", "no:cacheprovider", "-p", "no:randomly",
        f"--rootdir={root}", "-W", "ignore::pytest.PytestAssertRewriteWarning",
    ]
    if select:
        args += ["-k", select]
    args += list(extra_args)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = pytest.main(args, plugins=[plugin])
    return plugin.report(int(code))


# --------------------------------------------------------------------------- the table


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(report: GradeReport, width: int = 100) -> str:
    """Exercise, points earned of possible, and the first failing check with its message and hint."""
    head = {
        LEARNER: "your solutions in exercises/ (minimem grade --reference grades minimem's own code)",
        REFERENCE: "minimem's own implementation (exercises/reference.py)",
    }.get(report.solutions, "custom solutions")
    lines = [f"Graded: {head}", ""]
    lines.append(f"{'':3}{'#':<5} {'exercise':<30} {'points':>7}   first failing check")
    lines.append("-" * width)
    by_chapter: dict[int, list[int]] = {}
    indent = " " * 10
    for ex in report.exercises():
        tally = by_chapter.setdefault(ex.chapter, [0, 0])
        tally[0] += ex.earned
        tally[1] += ex.possible
        fail = ex.first_failure
        mark = "ok" if fail is None else ""
        check = ""
        if fail is not None:
            check = "not implemented yet" if fail.error == "NotImplementedError" else fail.name.split("::")[-1]
        lines.append(f"{mark:<3}{ex.number:<5} {_clip(ex.name, 30):<30} {ex.earned:>3}/{ex.possible:<3}   {check}")
        if fail is not None and fail.error != "NotImplementedError":
            details = [f"{fail.error}: {fail.message}" if fail.message else fail.error]
            if fail.example:
                details.append(f"example: {fail.example}")
            if fail.hint:
                details.append(f"hint: {fail.hint}")
            for detail in details:
                lines += textwrap.wrap(detail, width, initial_indent=indent, subsequent_indent=indent + "  ")
    lines.append("-" * width)
    for error in report.errors:
        lines.append(f"grader error: {_clip(error, width - 14)}")
    chapter_totals = "   ".join(f"ch{c} {e}/{p}" for c, (e, p) in sorted(by_chapter.items()))
    if chapter_totals:
        lines.append(chapter_totals)
    percent = 100.0 * report.earned / report.possible if report.possible else 0.0
    lines.append(f"total: {report.earned}/{report.possible} points ({percent:.0f}%)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minimem grade",
        description="Grade the exercises in exercises/ (or, with --reference, minimem's own implementation).",
    )
    parser.add_argument("chapters", nargs="*", metavar="CHAPTER", help="chapter number(s) 1-7 (default: all)")
    parser.add_argument("--reference", action="store_true", help="grade minimem's own implementation")
    parser.add_argument("-k", dest="select", default=None, help="only graders matching this pytest -k expression")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per grader test (default: each test's own)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        numbers = [parse_chapter(c) for c in args.chapters]
    except (ValueError, FileNotFoundError) as err:
        print(f"minimem grade: error: {err}", file=sys.stderr)
        return 2
    report = run_graders(numbers, REFERENCE if args.reference else LEARNER, args.time_limit, args.select,
                         progress=sys.stderr.isatty())
    print(format_table(report))
    if report.exit_code not in (0, 1) or report.errors:
        print(f"minimem grade: pytest exited with code {report.exit_code}", file=sys.stderr)
        return 2
    return 0 if report.possible and report.earned == report.possible else 1


if __name__ == "__main__":
    raise SystemExit(main())
