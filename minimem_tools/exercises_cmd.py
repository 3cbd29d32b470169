"""``minimem exercises init DIR [--force]``: your own copy of the exercises, to fill in and grade.

Copies the course's exercise folder (the stubs ``chN_*.py``, the graders ``graders/test_chN.py``
and their pytest wiring ``conftest.py``, ``reference.py``, ``README.md``) into DIR, from the
checkout or from the installed minimem (:mod:`minimem_tools.course`), and prints the command
that grades them. A file already in DIR with other content (your work) is never overwritten
unless ``--force`` is given; files identical to the course's are left as they are.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from minimem_tools import course
from minimem_tools.cli import ArgumentParser, usage_error

PROG = "minimem exercises"
# Not copied: the CI meta-test of the graders, and caches.
SKIP_FILES = {"test_graders.py"}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis"}


def exercise_files(source: Path) -> list[Path]:
    """The files of the exercise folder ``source`` a learner gets, relative to it, sorted."""
    found = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and relative.name not in SKIP_FILES and not SKIP_DIRS & set(relative.parts):
            if path.suffix not in (".pyc", ".pyo"):
                found.append(relative)
    return found


def _same(a: Path, b: Path) -> bool:
    return b.is_file() and a.read_bytes() == b.read_bytes()


def init(target: Path, force: bool = False) -> tuple[list[Path], list[Path], list[Path]]:
    """Copy the exercises into ``target``: (copied, overwritten, unchanged) relative paths.

    ValueError (one line, with the fix) for a bad target or, without ``force``, when files of
    the learner's in ``target`` would be overwritten; nothing is written then.
    """
    source = course.path("exercises")
    if target.exists() and not target.is_dir():
        raise ValueError(f"DIR {target} is a file, not a folder; give a new or existing folder")
    if target.resolve() == source.resolve():
        raise ValueError(f"DIR {target} is the course's own exercises folder; give another folder, e.g. my-exercises")
    for parent in target.resolve().parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"DIR {target} is inside {parent}, which is a file; give a folder path")
    files = exercise_files(source)
    conflicts = [f for f in files if (target / f).exists() and not _same(source / f, target / f)]
    if conflicts and not force:
        more = len(conflicts) - 3
        shown = ", ".join(str(f) for f in conflicts[:3]) + (f" and {more} more" if more > 0 else "")
        raise ValueError(
            f"{len(conflicts)} file(s) in {target} differ from the course's and would be overwritten ({shown}); "
            "keep your work: choose another DIR, or add --force to overwrite them"
        )
    copied, overwritten, unchanged = [], [], []
    for f in files:
        src, dst = source / f, target / f
        if _same(src, dst):
            unchanged.append(f)
            continue
        (overwritten if dst.exists() else copied).append(f)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return copied, overwritten, unchanged


def grade_command(target: str) -> str:
    return f"minimem grade --dir {shlex.quote(target)}"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description="Your own copy of the exercises, to fill in and grade.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "init", help="copy the exercise stubs and graders into DIR", description="Copy the exercises into DIR."
    )
    p.add_argument("dir", metavar="DIR", help="the folder to copy the exercises into (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files in DIR that differ from the course's")
    args = parser.parse_args(argv)

    if not args.dir.strip():
        return usage_error(f"{PROG} init", "DIR is empty; give a folder, e.g. minimem exercises init my-exercises")
    target = Path(args.dir).expanduser()
    try:
        copied, overwritten, unchanged = init(target, force=args.force)
    except ValueError as err:
        return usage_error(f"{PROG} init", str(err))
    except OSError as err:  # permissions, a read-only file system, ...
        reason = err.strerror or type(err).__name__
        return usage_error(f"{PROG} init", f"cannot write into DIR {target}: {reason}; give a folder you can write to")

    done = [f"{len(copied)} copied"]
    done += [f"{len(overwritten)} overwritten (--force)"] if overwritten else []
    done += [f"{len(unchanged)} already there"] if unchanged else []
    print(f"exercises in {target}: {', '.join(done)}")
    print("fill in the stubs (chN_*.py; each function's docstring states its task), then grade them:")
    print(f"  {grade_command(args.dir)}          # every chapter")
    print(f"  {grade_command(args.dir)} 2        # chapter 2 only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
