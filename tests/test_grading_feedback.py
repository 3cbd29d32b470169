"""What ``minimem grade`` tells a learner, graded as a learner grades: ``--dir`` on a folder of their own.

A copy of ``exercises/`` under another name (as ``minimem exercises init DIR`` makes) gets a
chapter 8 whose ``verdict`` has bugs: it crashes on an empty arm (a line of the learner's own
code), keeps a single seed and validates nothing. The table must list every failing check of the exercise, each with
the learner's line and a command that re-runs it; that command must print pytest's traceback with
the same line. The checkout's exercises are never modified.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BUGGY_CHAPTER_8 = """
from exercises.reference import layer_parameters  # solved with minimem's own code


def verdict(a, b, lower=True):
    a, b = [float(v) for v in a], [float(v) for v in b]
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((x - mean_a) ** 2 for x in a) / max(len(a) - 1, 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / max(len(b) - 1, 1)
    bar = 2 * (var_a / len(a) + var_b / len(b)) ** 0.5
    gain = mean_b - mean_a if lower else mean_a - mean_b
    return "reproduced" if gain > bar else "not reproduced" if -gain > bar else "inconclusive"
"""
BUG_LINE = "mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)"


def grade(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MINIMEM_EXERCISES"}
    return subprocess.run(
        [sys.executable, "-m", "minimem_tools.cli", "grade", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def learner_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("learner") / "my-answers"  # not named 'exercises'
    shutil.copytree(REPO / "exercises", folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "ch8_head_to_head.py").write_text(BUGGY_CHAPTER_8)
    return folder


@pytest.fixture(scope="module")
def graded(learner_folder) -> subprocess.CompletedProcess:
    return grade("--dir", str(learner_folder), "8")


def test_a_folder_of_any_name_is_graded(graded, learner_folder):
    assert graded.returncode == 1, graded.stdout[-3000:] + graded.stderr[-3000:]
    out = graded.stdout
    assert f"your solutions in {learner_folder}/" in out
    assert "ok 8.2   layer_parameters" in out  # the solved exercise keeps its points
    assert "not implemented yet" in out  # the unanswered questions
    assert "hypothesis seed 0" in out


def test_every_failing_check_is_listed_with_the_learners_line(graded):
    out = graded.stdout
    row = next(line for line in out.splitlines() if " verdict " in line)
    assert "checks fail" in row, row
    failing = [line.strip() for line in out.splitlines() if line.strip().startswith("x test_")]
    names = {line.split()[1] for line in failing}
    assert {"test_non_finite_and_few_seeds", "test_rejects_bad_arguments"} <= names, failing
    assert f"your code: ch8_head_to_head.py:7 in verdict: {BUG_LINE}" in out
    assert "ZeroDivisionError" in out


def test_the_rerun_command_reproduces_the_check_with_its_traceback(graded, learner_folder):
    reruns = [
        line.strip()[len("re-run: ") :] for line in graded.stdout.splitlines() if line.strip().startswith("re-run:")
    ]
    command = next(r for r in reruns if "test_non_finite_and_few_seeds" in r)
    argv = shlex.split(command)
    assert argv[:4] == ["minimem", "grade", "--dir", str(learner_folder)] and argv[-1] == "--traceback", argv
    again = grade(*argv[2:])
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    assert "x test_non_finite_and_few_seeds" in again.stdout
    assert "pytest's failure report" in again.stdout
    report = again.stdout.split("pytest's failure report", 1)[1]
    assert BUG_LINE in report and "ZeroDivisionError" in report and "Failing test case" in report
    assert f"{learner_folder}/ch8_head_to_head.py" in report  # the learner's own file, not a temporary link
    assert "total: 0/2 points" in again.stdout
