"""Where the course's files are: in the checkout, or inside an installed minimem.

The chapters, the exercises command and the tools read the course's files (``configs/*.yaml``,
``results/*``, ``exercises/``, ``benchmarks/``) through this module only, so that the same
code works in both places:

- in a checkout (``git clone`` + ``make venv``, or ``pip install -e .``): the files where the
  repository keeps them, ``<checkout>/configs/...``;
- from an installed wheel (``pip install git+https://github.com/minimem-course/minimem``,
  Colab): the copies the wheel carries in ``minimem_tools/course_files/`` (pyproject.toml maps
  each folder there with ``package-dir``, so the checkout keeps its layout), found with
  :mod:`importlib.resources`.

The API::

    course.path("configs/shakespeare-dense.yaml")   # a real file-system path (a file or a folder)
    course.run_dir("ch1-dense")                     # where a notebook writes its training run
    course.in_checkout()                            # True when minimem_tools is imported from a checkout

"In the checkout" means that ``minimem_tools`` itself is imported from a source tree (the folder
above it holds ``pyproject.toml``, ``configs/``, ``exercises/`` and ``notebooks/``), whatever
the current directory.
"""

from __future__ import annotations

import atexit
import importlib.resources
import shutil
import tempfile
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

PACKAGE = "minimem_tools"
INSTALLED = "course_files"  # the wheel's copy of the course's folders, inside PACKAGE
INSTALLED_FOLDERS = ("configs/", "results/", "exercises/", "benchmarks/")  # pyproject.toml's package-dir
CHECKOUT_MARKERS = ("pyproject.toml", "configs", "exercises", "notebooks")

_extracted: Path | None = None  # where files of a zipped install were copied out (see _real_path)


def _package_dir() -> Traversable:
    return importlib.resources.files(PACKAGE)


def checkout_root() -> Path | None:
    """The checkout ``minimem_tools`` is imported from, or None for an installed wheel."""
    package = _package_dir()
    if not isinstance(package, Path):  # imported from a zip: never a checkout
        return None
    root = package.resolve().parent
    return root if all((root / marker).exists() for marker in CHECKOUT_MARKERS) else None


def in_checkout() -> bool:
    """True when ``minimem_tools`` is imported from a source checkout (editable install or PYTHONPATH)."""
    return checkout_root() is not None


def root() -> Path | Traversable:
    """The folder that ``course.path``'s relative paths start from: the checkout, or the installed copy."""
    return checkout_root() or _package_dir() / INSTALLED


def _relative_parts(relative: str, what: str) -> tuple[str, ...]:
    text = str(relative).replace("\\", "/")
    parts = tuple(p for p in PurePosixPath(text).parts if p not in ("", "."))
    if not text.strip() or text.startswith("/") or ".." in parts or not parts:
        raise ValueError(
            f"{what} must be a path relative to the course's root without '..', "
            f"such as 'configs/shakespeare-dense.yaml'; got {relative!r}"
        )
    return parts


def _copy_out(node: Traversable, target: Path) -> None:
    if node.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in node.iterdir():
            _copy_out(child, target / child.name)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(node.read_bytes())


def _real_path(node: Traversable, parts: tuple[str, ...]) -> Path:
    """``node`` as a file-system path: itself when it is one, else a copy in a temporary folder
    (a zipped install), removed when the interpreter exits."""
    if isinstance(node, Path):
        return node
    global _extracted
    if _extracted is None:
        _extracted = Path(tempfile.mkdtemp(prefix="minimem-course-"))
        atexit.register(shutil.rmtree, _extracted, ignore_errors=True)
    target = _extracted.joinpath(*parts)
    if not target.exists():
        _copy_out(node, target)
    return target


def path(relative: str) -> Path:
    """The real path of the course file or folder ``relative`` (e.g. ``"configs/shakespeare-dense.yaml"``,
    ``"results/head2head.json"``, ``"exercises"``), in the checkout or in the installed package.

    FileNotFoundError naming the file and where it was looked for when it is not there.
    """
    parts = _relative_parts(relative, "course.path's argument")
    base = root()
    node = base.joinpath(*parts)
    if not (node.is_file() or node.is_dir()):
        where = (
            f"the checkout at {base}"
            if isinstance(base, Path) and in_checkout()
            else f"the installed minimem package ({base}, which carries {', '.join(INSTALLED_FOLDERS)}); "
            "reinstall minimem, or work in a checkout of the course"
        )
        raise FileNotFoundError(f"course file {'/'.join(parts)!r} not found in {where}")
    return _real_path(node, parts)


def run_dir(name: str) -> Path:
    """Where a notebook writes its training run ``name`` (e.g. ``"ch1-dense"``): ``<checkout>/runs/<name>``
    in a checkout, else ``./runs/<name>`` under the current directory. Not created here."""
    parts = _relative_parts(name, "course.run_dir's name")
    base = checkout_root() or Path.cwd()
    return base.joinpath("runs", *parts)
