"""``minimem grade`` cannot be fooled by the code it grades, and rejects bad input in one line.

Each chapter runs in its own child process and is scored from a report that this process
checks (minimem/grading.py, "grading in child processes"). Here a copy of ``exercises/`` gets
hostile stubs, one per chapter, graded in one run beside a chapter with a correct solution:
each hostile chapter must score 0 with a reason, the correct one its full points. The
checkout's exercises are never modified.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minimem_tools import grading

REPO = Path(__file__).resolve().parents[1]

# Appended to a chapter's stub: its functions still raise NotImplementedError.
HOSTILE = {
    "forges the grader's and pytest's results": """
import _pytest.reports
from minimem_tools import grading
grading.GradedTest.earned = property(lambda self: self.points)  # the grader's classes: every test earns
grading.GradedTest.passed = property(lambda self: True, lambda self, value: None)
_pytest.reports.TestReport.outcome = property(lambda self: "passed", lambda self, value: None)  # pytest's reports
""",
    "rewrites the report at exit": """
import atexit, re, sys
_report = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--junitxml="))


def _forge():  # drop every failure from the report that pytest has just written
    with open(_report) as f:
        text = f.read()
    with open(_report, "w") as f:
        f.write(re.sub(r"<(failure|error)\\b.*?</\\1>", "", text, flags=re.S))


atexit.register(_forge)
""",
    "ends the process with os._exit(0)": """
import os
os._exit(0)
""",
    "ignores SIGALRM in an endless loop": """
import signal, time


def _hang(*args, **kwargs):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the per-test time limit can no longer fire
    while True:
        time.sleep(0.05)


for _name, _function in list(globals().items()):
    if callable(_function) and getattr(_function, "__module__", None) == __name__:
        globals()[_name] = _hang
""",
    "segfaults (ctypes)": """
import ctypes
ctypes.string_at(0)
""",
    "aborts (os.abort)": """
import os
os.abort()
""",
}
EXPECTED_REASON = {  # a fragment of the reason each hostile chapter's score is 0
    "forges the grader's and pytest's results": "tampered with",
    "rewrites the report at exit": "tampered with",
    "ends the process with os._exit(0)": "exited with status 0 before writing its report",
    "ignores SIGALRM in an endless loop": "was killed",
    "segfaults (ctypes)": "killed by SIGSEGV",
    "aborts (os.abort)": "killed by SIGABRT",
}
GOOD_CHAPTER = 6  # solved: its stub hands out minimem's own implementation
HARD_LIMIT = 45.0  # seconds per chapter in this run: the endless loop costs this much


def copy_exercises(tmp_path: Path) -> Path:
    target = tmp_path / "exercises"
    shutil.copytree(REPO / "exercises", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One grading run of a copy of exercises/: a hostile stub in every chapter but GOOD_CHAPTER."""
    chapters = grading.chapters()
    exercises = copy_exercises(tmp_path_factory.mktemp("hostile"))
    hostile_chapters = dict(zip([n for n in sorted(chapters) if n != GOOD_CHAPTER], HOSTILE))
    assert len(hostile_chapters) == len(HOSTILE)
    for number, behaviour in hostile_chapters.items():
        stub = exercises / f"{chapters[number]}.py"
        stub.write_text(stub.read_text() + HOSTILE[behaviour])
    good = chapters[GOOD_CHAPTER]
    (exercises / f"{good}.py").write_text(
        "from exercises.reference import REFERENCES, namespace\n\n"
        f"globals().update({{name: getattr(namespace({good!r}), name) for name in REFERENCES[{good!r}]}})\n"
    )
    (exercises / "questions.py").write_text(  # the solved chapter's questions are answered too
        "from exercises.reference import question_answers\n\nANSWERS = question_answers()\n"
    )
    saved = os.environ.get("MINIMEM_EXERCISES")
    os.environ["MINIMEM_EXERCISES"] = str(exercises)
    try:
        report = grading.run_isolated(sorted([*hostile_chapters, GOOD_CHAPTER]), time_limit=5.0, hard_limit=HARD_LIMIT)
    finally:
        if saved is None:
            del os.environ["MINIMEM_EXERCISES"]
        else:
            os.environ["MINIMEM_EXERCISES"] = saved
    return report, {behaviour: number for number, behaviour in hostile_chapters.items()}


def test_a_solved_chapter_keeps_its_points_beside_hostile_ones(hostile_run):
    report, _ = hostile_run
    assert not report.errors, report.errors
    good = [t for t in report.tests if t.chapter == GOOD_CHAPTER]
    assert good and all(t.passed for t in good), [(t.name, t.error, t.message) for t in good if not t.passed]
    assert GOOD_CHAPTER not in report.ungraded
    assert report.earned == sum(t.points for t in good) > 0
    table = grading.format_table(report)
    assert f"ch{GOOD_CHAPTER} {report.earned}/{report.earned}" in table


@pytest.mark.parametrize("behaviour", sorted(HOSTILE))
def test_a_hostile_stub_scores_zero_for_its_own_chapter(hostile_run, behaviour):
    report, chapter_of = hostile_run
    chapter = chapter_of[behaviour]
    tests = [t for t in report.tests if t.chapter == chapter]
    assert tests, f"chapter {chapter} was not graded at all"
    assert sum(t.earned for t in tests) == 0
    assert all(t.error == grading.NOT_GRADED for t in tests), {t.error for t in tests}
    assert EXPECTED_REASON[behaviour] in report.ungraded[chapter], report.ungraded[chapter]
    assert f"ch{chapter} scored 0: " in grading.format_table(report)


def test_every_hostile_stub_still_raises_not_implemented_error(hostile_run):
    """The hostile code is appended to the stubs: without it, those chapters would fail honestly."""
    chapters = grading.chapters()
    _, chapter_of = hostile_run
    for number in chapter_of.values():
        assert "raise NotImplementedError" in (REPO / "exercises" / f"{chapters[number]}.py").read_text()


IDS = ["exercises/graders/test_ch2.py::TestA::test_x", "exercises/graders/test_ch2.py::TestA::test_y[3]"]
PASS_X, PASS_Y = ('<testcase classname="{}" name="{}" />'.format(*grading._junit_address(i)) for i in IDS)
FAIL_Y = '<testcase classname="{}" name="{}"><failure message="AssertionError: no">no</failure></testcase>'.format(
    *grading._junit_address(IDS[1])
)
CANARY_FAILED = f'<testcase classname="" name="{grading.CANARY_NAME}"><failure message="x">x</failure></testcase>'
CANARY_PASSED = f'<testcase classname="" name="{grading.CANARY_NAME}" />'
REPORTS = [  # (test cases in the report, pytest's exit status, fragment of the reason for 0, or None: scored)
    (PASS_X + FAIL_Y + CANARY_FAILED, 1, None),
    (PASS_X + PASS_Y, 1, "tampered with"),  # no canary
    (PASS_X + PASS_Y + CANARY_PASSED, 1, "tampered with"),
    (PASS_X + PASS_Y + CANARY_FAILED + CANARY_FAILED, 1, "tampered with"),
    (PASS_X + PASS_X + PASS_Y + CANARY_FAILED, 1, "1 repeated"),
    (PASS_X + CANARY_FAILED, 1, "1 missing"),
    (PASS_X + PASS_Y + PASS_Y.replace("test_y", "test_z") + CANARY_FAILED, 1, "1 unknown"),
    (PASS_X + PASS_Y + CANARY_FAILED, 0, "exited with status 0, not 1"),
    (PASS_X + PASS_Y + CANARY_FAILED, -9, "killed by SIGKILL, not 1"),
    ("<testcase", 1, "unreadable"),
]


@pytest.mark.parametrize("cases, code, reason", REPORTS)
def test_a_report_is_trusted_only_when_complete_and_consistent(tmp_path, cases, code, reason):
    xml = tmp_path / "report.xml"
    xml.write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
    found, why = grading._check_report(xml, code, False, 10.0, IDS)
    if reason is None:
        assert why == "" and sorted(found) == sorted(IDS)
        assert grading._passed(found[IDS[0]]) and not grading._passed(found[IDS[1]])
    else:
        assert found == {} and reason in why, why


def test_no_report_or_a_kill_scores_zero(tmp_path):
    assert (
        "was killed by SIGSEGV before writing its report"
        in grading._check_report(tmp_path / "none.xml", -11, False, 10.0, IDS)[1]
    )
    assert (
        "did not finish within 10 s and was killed"
        in grading._check_report(tmp_path / "none.xml", -9, True, 10.0, IDS)[1]
    )


# --------------------------------------------------------------------------- bad input


BAD_INPUT = [  # (argv, MINIMEM_EXERCISES or None, fragment of the one stderr line)
    (["--time-limit", "0"], None, "--time-limit must be a positive number of seconds, got 0"),
    (["--time-limit", "-5"], None, "--time-limit must be a positive number of seconds, got -5"),
    (["--time-limit", "nan"], None, "--time-limit must be a positive number of seconds, got nan"),
    (["--time-limit", "soon"], None, "argument --time-limit: invalid float value: 'soon'"),
    (["12"], None, "CHAPTER must be one of 1 (ch1_ffn_memory)"),
    (["2"], "{tmp}/missing/exercises", "MINIMEM_EXERCISES={tmp}/missing/exercises is not an exercises folder"),
    ([], "{tmp}/a_file", "MINIMEM_EXERCISES={tmp}/a_file is not an exercises folder"),
    (["2"], "{tmp}/exercises/graders", "is not an exercises folder"),
    (["6", "-k", "no_such_exercise"], None, "-k 'no_such_exercise' matches no grader test"),
    (["6", "-k", "mcp_percent and ("], None, "-k 'mcp_percent and (' is not a pytest -k expression"),
    (["--dir", "{tmp}/nowhere", "2"], None, "--dir={tmp}/nowhere is not an exercises folder"),
    (["--dir", "{tmp}/a_file"], None, "--dir={tmp}/a_file is not an exercises folder"),
    (["--seed", "-1"], None, "--seed must be an integer in [0, 2**32), got -1"),
    (["--seed", "soon"], None, "argument --seed: invalid int value: 'soon'"),
]


@pytest.mark.parametrize("argv, exercises, fragment", BAD_INPUT, ids=[" ".join(row[0]) or row[1] for row in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(tmp_path, argv, exercises, fragment):
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "exercises" / "graders").mkdir(parents=True)
    env = dict(os.environ)
    env.pop("MINIMEM_EXERCISES", None)
    if exercises is not None:
        env["MINIMEM_EXERCISES"] = exercises.format(tmp=tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "minimem_tools.cli", "grade", *[arg.format(tmp=tmp_path) for arg in argv]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minimem grade: error: "), done.stderr
    assert fragment.format(tmp=tmp_path) in lines[0], lines[0]
    assert "Traceback" not in done.stderr and not done.stdout
