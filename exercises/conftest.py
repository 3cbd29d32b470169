"""pytest wiring of the graders: whose code they test, their points and their time limits.

``pytest exercises/graders`` grades your stubs in ``exercises/``; add ``--reference`` to grade
minimem's own implementation and ``--time-limit SECONDS`` to give every grader test that limit.
hypothesis draws its examples from seed 0 unless ``--hypothesis-seed N`` says otherwise, so every
run grades the same examples. ``minimem grade`` runs the same tests, one chapter per child
process, and prints only the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minimem_tools.grading import LEARNER, QUESTIONS, REFERENCE, GradingPlugin, use_triton_interpreter

use_triton_interpreter()  # before anything imports triton: chapter 7 runs its kernels in the interpreter


def pytest_addoption(parser):
    parser.addoption(
        "--reference", action="store_true", help="grade minimem's own implementation instead of exercises/*.py"
    )
    parser.addoption(
        "--time-limit", type=float, default=None, help="seconds for every grader test (default: each test's own)"
    )


def pytest_ignore_collect(collection_path, config):
    """``pytest exercises`` grades; the CI meta-tests (test_graders.py) run only when named."""
    if collection_path.name != "test_graders.py":
        return None
    here = Path(config.invocation_params.dir)
    named = any((here / str(arg).split("::")[0]).resolve() == collection_path.resolve() for arg in config.args)
    return None if named else True


def _grading_plugin(config) -> GradingPlugin | None:
    return next((p for p in config.pluginmanager.get_plugins() if isinstance(p, GradingPlugin)), None)


def pytest_configure(config):
    if _grading_plugin(config) is None:  # plain pytest: grade the stubs (or --reference) and print the table
        mode = REFERENCE if config.getoption("--reference", False) else LEARNER
        plugin = GradingPlugin(mode, time_limit=config.getoption("--time-limit", None), print_table=True)
        config.pluginmanager.register(plugin, "minimem-grading")


def _chapter_module(request) -> str:
    import exercises

    return exercises.CHAPTERS[request.module.CHAPTER]


@pytest.fixture(scope="module")
def solution(request):
    """The code under test for this grader file's chapter: an object with the exercise functions."""
    return _grading_plugin(request.config).solutions_for(_chapter_module(request))


@pytest.fixture(scope="module")
def reference(request):
    """minimem's own implementation of this chapter's exercises (exercises/reference.py)."""
    from exercises.reference import namespace

    return namespace(_chapter_module(request))


@pytest.fixture(scope="module")
def answers(request) -> dict:
    """The answers to the conceptual questions under test (exercises/questions.py's ANSWERS, or the
    reference's, computed from minimem): question id -> answer."""
    found = _grading_plugin(request.config).solutions_for(QUESTIONS).ANSWERS
    return found() if callable(found) else found
