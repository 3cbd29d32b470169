"""Live figures of the course book: a kernel-free twin for each chapter's widget.

``minimem_tools.bookbuild`` loads this package by path after Sphinx has built the book, calls
:func:`compute` for every twin (cached by a hash of what it depends on) and injects the twins
into the chapter pages. See ``README.md`` beside this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .harness import code_cells, dependency_slice, find_cell, saved_readout
from .twins import WIDGETS, Widget

__all__ = ["WIDGETS", "Widget", "cache_key", "compute", "starting_readout"]

HERE = Path(__file__).resolve().parent
FORMAT = 1  # bump when the JSON a twin produces changes shape


def _data_files(root: Path) -> list[Path]:
    """The data a twin's numbers can depend on, besides code: configs and experiment results."""
    files = [*(root / "configs").rglob("*.yaml"), *(root / "results").glob("*.json")]
    files += (root / "benchmarks" / "results").glob("*.json")
    return sorted(files)


def imported_sources(root: Path) -> list[str]:
    """The repository's Python files imported in this process (minimem, minimem_tools), relative."""
    out, root = set(), root.resolve()
    for module in list(sys.modules.values()):
        path = Path(getattr(module, "__file__", None) or "/").resolve()
        if path.suffix == ".py" and path.is_relative_to(root) and path.name != "bookbuild.py":
            if path.relative_to(root).parts[0] in ("minimem", "minimem_tools"):
                out.add(path.relative_to(root).as_posix())
    return sorted(out)


_DIGESTS: dict[tuple, str] = {}


def _digest(root: Path, files: list[Path]) -> str:
    """A hash of ``files`` (names and contents), recomputed only when one of them changed."""
    files = [p for p in files if p.is_file()]
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
        _DIGESTS[stamp] = digest.hexdigest()
    return _DIGESTS[stamp]


def cache_key(root: Path, widget: Widget, sources: list[str]) -> str:
    """A hash of the twin's inputs: this package, the repository modules ``sources`` it imported,
    the configs and results, the torch version, and the notebook code that runs (the widget cell
    and its dependency slice; not the other cells, the outputs or the text)."""
    import torch

    digest = hashlib.sha256(f"{FORMAT} {torch.__version__} {sys.version_info[:2]}".encode())
    code = sorted(HERE.glob("*.py")) + [root / s for s in sources]
    digest.update(_digest(root, code).encode() + _digest(root, _data_files(root)).encode())
    digest.update("\0".join(sources).encode())
    cells = code_cells(root / "notebooks" / f"{widget.notebook}.ipynb")
    index = find_cell(cells, widget.marker, root / "notebooks" / f"{widget.notebook}.ipynb")
    for source in [*dependency_slice(cells, index), cells[index]]:  # the code that runs, not the rest
        digest.update(source.encode() + b"\0")
    return digest.hexdigest()[:16]


def starting_readout(spec: dict) -> str:
    """The readout a twin shows before any control moves (its controls' starting values)."""
    pieces = spec["states"][",".join(str(c["default"]) for c in spec["controls"])][0]
    return "".join(spec["pieces"][i] for i in pieces)


def compute(root: Path, widget: Widget, cache: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """The twin of ``widget`` as JSON-ready data, from ``cache`` when its inputs are unchanged."""
    import torch

    if widget.build is None:
        raise ValueError(f"chapter {widget.chapter}'s widget {widget.marker!r} has no twin: {widget.reason}")
    path = cache / f"{widget.twin_id}.json" if cache else None
    if path and path.is_file():  # still valid when the code and data it used are unchanged
        spec = json.loads(path.read_text(encoding="utf-8"))
        if spec.get("format") == FORMAT and spec.get("key") == cache_key(root, widget, spec.get("sources", [])):
            return spec
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # as the chapters: the same numbers on every machine
    try:
        spec = widget.build(root).to_json()
    finally:
        torch.set_num_threads(threads)
    sources = imported_sources(root)
    spec.update(chapter=widget.chapter, notebook=widget.notebook, marker=widget.marker, format=FORMAT)
    spec.update(sources=sources, key=cache_key(root, widget, sources))
    log(f"live figure {widget.twin_id}: {len(spec['states'])} states computed in {time.perf_counter() - start:.1f} s")
    saved = saved_readout(root / "notebooks" / f"{widget.notebook}.ipynb", widget.marker)
    if saved is not None and saved != starting_readout(spec):
        log(
            f"live figure {widget.twin_id}: note: at its starting point the twin reads differently from the widget "
            f"output saved in {widget.notebook}.ipynb (outputs older than the code? re-execute the notebook)"
        )
    if path:
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")  # atomic: builds may run side by side
        partial.write_text(json.dumps(spec, separators=(",", ":"), ensure_ascii=False), encoding="utf-8")
        partial.replace(path)
    return spec
