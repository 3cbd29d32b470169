"""``python -m minimem_tools.bookbuild [--open] [--fresh]``: build the course book, offline.

The book is a Jupyter Book 1.x whose source root is the repository root, so its chapters are
the notebooks in ``notebooks/`` themselves, never copies; ``book/_config.yml`` and
``book/_toc.yml`` say what goes in. Notebooks are not executed (the committed outputs are shown)
and Sphinx warnings are errors. Every script the pages load is served from the build
(``book/_static/vendor``), so the site reads without a network.

After Sphinx, a post-build step (:func:`add_live_figures`) makes the widgets usable without a
kernel: every chapter's saved widget is frozen in the book (its controls move, nothing
recomputes), so each gets a note and, where ``book/live`` has one, a live twin right under it:
the same controls over a grid precomputed by the chapter's own code, drawn by Plotly, whose
``plotly.min.js`` is copied from the installed ``plotly`` package into the build (no CDN).

``--open`` serves ``book/_build/html`` on 127.0.0.1 and opens it in a browser when a display is
available; otherwise it prints where the book is and how to serve it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import html as html_lib
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import webbrowser
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]


def book_paths(root: Path = REPO_ROOT) -> dict[str, Path]:
    """The book's files under a minimem checkout ``root``."""
    book = root / "book"
    return {"config": book / "_config.yml", "toc": book / "_toc.yml", "html": book / "_build" / "html"}


def build(root: Path = REPO_ROOT, fresh: bool = False) -> Path:
    """Build the HTML book with warnings as errors; return the folder holding ``index.html``.

    ``fresh`` re-reads every page (``--all``); otherwise Sphinx rebuilds only what changed.
    Raises ``FileNotFoundError`` outside a checkout and ``RuntimeError`` when the build fails.
    """
    paths = book_paths(root)
    for key in ("config", "toc"):
        if not paths[key].is_file():
            raise FileNotFoundError(f"{paths[key]} not found: run the book build from a minimem checkout")
    command = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(root),
        "--config",
        str(paths["config"]),
        "--toc",
        str(paths["toc"]),
        "--path-output",
        str(root / "book"),
        "--warningiserror",
        "--keep-going",
    ]
    if fresh:
        command.append("--all")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"the book build failed (exit code {result.returncode}); its warnings are above")
    print(f"built the book in {time.perf_counter() - start:.0f} s: {paths['html'] / 'index.html'}")
    add_live_figures(root, paths["html"])
    return paths["html"]


# --------------------------------------------------------------------------- live figures

# what inject_live adds: each block starts with a newline and ends with one, so removing it restores the page
LIVE_BLOCK = re.compile(r"\n<!-- minimem-live:begin [\w-]+ -->.*?<!-- minimem-live:end -->\n", re.S)
WIDGET_VIEW = re.compile(r'<script type="application/vnd\.jupyter\.widget-view\+json">(.*?)</script>', re.S)
DIV_TAG = re.compile(r"<(/?)div\b")
PLOTLY_DIR = "vendor/plotly"  # under _static


def load_live(root: Path = REPO_ROOT) -> ModuleType:
    """The ``book/live`` package of a checkout (twin generators and their inventory), loaded by path."""
    init = root / "book" / "live" / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} not found: the live figures' generators are missing")
    name = "minimem_book_live"
    if name in sys.modules and Path(sys.modules[name].__file__).resolve() == init.resolve():
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def vendor_plotly(html: Path) -> Path:
    """Copy ``plotly.min.js`` (and its licence) from the installed ``plotly`` package into the build."""
    try:
        import plotly
    except ImportError as err:
        raise RuntimeError("the live figures need the plotly package: pip install -r requirements.txt") from err
    package = Path(plotly.__file__).parent
    source = package / "package_data" / "plotly.min.js"
    if not source.is_file():
        raise RuntimeError(f"{source} not found: the plotly package ships plotly.min.js there")
    target = html / "_static" / PLOTLY_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target / "plotly.min.js")
    from importlib import metadata

    files = metadata.distribution("plotly").files or []
    licence = next((f for f in files if f.name.upper().startswith("LICENSE")), None)
    notice = f"plotly.min.js from the plotly {plotly.__version__} Python package (plotly.js, MIT licence).\n\n"
    if licence is not None:
        notice += Path(licence.locate()).read_text(encoding="utf-8")
    (target / "LICENSE.txt").write_text(notice, encoding="utf-8")
    return target / "plotly.min.js"


def _short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def _after_cell(text: str, script_start: int, script_end: int, where: str) -> int:
    """The offset just after the notebook cell whose output holds the widget script at ``script_start``."""
    opening = text.rfind('<div class="cell_output', 0, script_start)
    between = [m.group(1) for m in DIV_TAG.finditer(text, opening, script_start)] if opening >= 0 else []
    if not between or len(between) - 2 * sum(map(bool, between)) != 1:  # opens minus closes: only cell_output's
        raise RuntimeError(f"{where}: the widget's script is not inside a cell_output div (page layout changed?)")
    depth = 0
    for match in DIV_TAG.finditer(text, script_end):
        depth += -1 if match.group(1) else 1
        if depth == -2:  # closed the cell_output, then the cell
            return text.index(">", match.end()) + 1
    raise RuntimeError(f"{where}: no end found for the cell holding the widget")


def _note(widget, twin_id: str | None, page_twins: list[str]) -> str:
    if twin_id:
        return (
            '<div class="admonition note mm-live-note">\n'
            '<p class="admonition-title">A frozen widget, and its live twin</p>\n'
            "<p>The widget above is the notebook's saved output: in the book its controls move but "
            "nothing recomputes, as no Python kernel runs here. To run it, open the notebook in Jupyter, "
            f'Colab or Binder; or use <a href="#mm-live-{twin_id}">the live figure below</a>, '
            "precomputed over the same controls by the chapter's own code when the book was built: "
            "it works here, offline.</p>\n</div>\n"
        )
    why = f" It has no live figure: {html_lib.escape(widget.reason)}." if widget is not None and widget.reason else ""
    elsewhere = (
        f' The live figure of this chapter\'s other widget, <a href="#mm-live-{page_twins[0]}">further on</a>, '
        "works here."
        if page_twins
        else ""
    )
    return (
        '<div class="admonition warning mm-live-note">\n'
        '<p class="admonition-title">This control needs a running kernel</p>\n'
        "<p>The widget above is the notebook's saved output: in the book its controls move but nothing "
        f"recomputes. Open the notebook in Jupyter, Colab or Binder to run it.{why}{elsewhere}</p>\n</div>\n"
    )


def _twin_block(spec: dict) -> str:
    twin_id, title = spec["id"], html_lib.escape(spec["title"])
    note = html_lib.escape(spec["note"]) + " " if spec["note"] else ""
    points = len(spec["states"])
    return (
        f'<div class="mm-live" id="mm-live-{twin_id}" data-live="{twin_id}" role="figure" aria-label="{title}">\n'
        f'<p class="mm-live-title">{title}</p>\n'
        '<div class="mm-live-controls"></div>\n'
        '<div class="mm-live-readout" aria-live="polite"></div>\n'
        '<div class="mm-live-plot"></div>\n'
        f'<p class="mm-live-footnote">{note}Precomputed at {points:,} settings of the controls when the book '
        "was built, by the notebook's own code; drawn by Plotly, with no kernel and no network.</p>\n"
        "<noscript><p>This live figure needs JavaScript.</p></noscript>\n</div>\n"
    )


def inject_live(
    page: Path, notebook: Path, widgets: list, specs: dict[str, dict], static: Path, live: ModuleType
) -> list[str]:
    """Put a note (and a twin, where there is one) after each widget of a chapter page; idempotent.

    The anchor of a declared widget is the ``model_id`` that the notebook saved for the output of
    the one cell containing the widget's marker: the page must hold a widget view with that id.
    Returns the ids of the twins placed. Raises ``RuntimeError`` when an anchor is not found.
    """
    where = page.name
    text = LIVE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    views = [(json.loads(m.group(1)).get("model_id"), m.start(), m.end()) for m in WIDGET_VIEW.finditer(text)]
    declared: dict[str, object] = {}
    for widget in widgets:
        try:
            ids = live.harness.widget_model_ids(notebook, widget.marker)
        except LookupError as err:
            raise RuntimeError(f"live figure anchor: {err} (twins in book/live/twins.py, WIDGETS)") from err
        if not ids:
            raise RuntimeError(
                f"live figure anchor: the cell of {notebook.name} containing {widget.marker!r} has no saved widget "
                "output: execute the notebook (tools/execute_notebooks.py) and rebuild"
            )
        found = [i for i in ids if any(v[0] == i for v in views)]
        if not found:
            raise RuntimeError(
                f"live figure anchor not found: {where} has no widget view with model_id {ids[-1]}, the saved output "
                f"of the cell of {notebook.name} containing {widget.marker!r} (a stale page? rebuild with --fresh)"
            )
        declared[found[-1]] = widget
    page_twins = [w.twin_id for w in widgets if w.twin_id]
    controls = live.harness.saved_controls(notebook)
    placed, insertions = [], []
    for model_id, start, end in views:
        widget = declared.get(model_id)
        if widget is None and model_id not in controls:
            continue  # an output-only widget (a progress bar): nothing a reader would try to move
        twin_id = widget.twin_id if widget is not None else None
        block = _note(widget, twin_id, [t for t in page_twins if t != twin_id])
        if twin_id:
            block += _twin_block(specs[twin_id])
            placed.append(twin_id)
        marker = twin_id or (widget.marker if widget is not None else "widget")
        wrapped = f"\n<!-- minimem-live:begin {marker} -->\n{block}<!-- minimem-live:end -->\n"
        insertions.append((_after_cell(text, start, end, where), wrapped))
    for offset, block in sorted(insertions, reverse=True):
        text = text[:offset] + block + text[offset:]
    if insertions:
        prefix = os.path.relpath(static, page.parent).replace(os.sep, "/")
        css, js = static / "live-figures.css", static / "live-figures.js"
        head = [f'<link rel="stylesheet" href="{prefix}/live-figures.css?v={_short_hash(css)}" />']
        if placed:
            head.append(f'<script defer src="{prefix}/{PLOTLY_DIR}/plotly.min.js"></script>')
            head += [f'<script defer src="{prefix}/live/{t}.js?v={specs[t]["key"]}"></script>' for t in placed]
            head.append(f'<script defer src="{prefix}/live-figures.js?v={_short_hash(js)}"></script>')
        block = "\n<!-- minimem-live:begin head -->\n" + "\n".join(head) + "\n<!-- minimem-live:end -->\n"
        if text.count("</head>") != 1:
            raise RuntimeError(f"{where}: expected one </head>")
        text = text.replace("</head>", block + "</head>")
    page.write_text(text, encoding="utf-8")
    return placed


def add_live_figures(root: Path, html: Path, log=print) -> float:
    """The post-build step: twins computed (or read from ``book/_build/live-cache``), written to
    ``_static/live/``, Plotly vendored, and every chapter page's widgets given a note and a twin.
    Returns the seconds it took."""
    start = time.perf_counter()
    live = load_live(root)
    static = html / "_static"
    for name in ("live-figures.js", "live-figures.css"):
        if not (static / name).is_file():
            raise RuntimeError(f"{static / name} missing: book/_static/{name} should be copied there by Sphinx")
    vendor_plotly(html)
    (static / "live").mkdir(exist_ok=True)
    cache = root / "book" / "_build" / "live-cache"
    specs = {}
    for widget in live.WIDGETS:
        if widget.build is None:
            continue
        try:
            spec = live.compute(root, widget, cache=cache, log=log)
        except Exception as err:
            raise RuntimeError(f"live figure {widget.twin_id} ({widget.notebook}) failed: {err!r}") from err
        specs[widget.twin_id] = spec
        payload = json.dumps(spec, separators=(",", ":"), ensure_ascii=False)
        target = static / "live" / f"{widget.twin_id}.js"
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        partial.write_text(
            f'(window.MINIMEM_LIVE = window.MINIMEM_LIVE || {{}})["{widget.twin_id}"] = {payload};\n',
            encoding="utf-8",
        )
        partial.replace(target)
    placed = []
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        page = html / "notebooks" / f"{notebook.stem}.html"
        if not page.is_file():
            continue
        widgets = [w for w in live.WIDGETS if w.notebook == notebook.stem]
        placed += inject_live(page, notebook, widgets, specs, static, live)
    missing = sorted(set(specs) - set(placed))
    if missing:
        raise RuntimeError(f"live figures computed but not placed on any page: {missing}")
    seconds = time.perf_counter() - start
    log(f"live figures: {len(placed)} twins placed, plotly vendored, in {seconds:.1f} s")
    return seconds


def has_display() -> bool:
    """Whether a browser window can be shown (a desktop session, macOS or Windows)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(html: Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``html`` on 127.0.0.1 (``port=0`` picks a free port), serving in a thread."""
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def open_book(html: Path, port: int = 0) -> int:
    """Open the built book: serve it and start a browser, or say how to do it by hand."""
    index = html / "index.html"
    if not index.is_file():
        print(f"no built book at {html}: run `python -m minimem_tools.bookbuild` first", file=sys.stderr)
        return 1
    if not has_display():
        print(f"The book is built: {index}")
        print("No display here. To read it, serve it and open the address in a browser:")
        print(f"  python -m http.server --bind 127.0.0.1 --directory {html} 8000   # then http://127.0.0.1:8000/")
        return 0
    # Served over http rather than opened as file://: browsers restrict fonts and scripts there.
    server = serve(html, port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"Serving the book at {url} (Ctrl-C to stop)")
    webbrowser.open(url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimem_tools.bookbuild", description=__doc__.split("\n\n")[0])
    parser.add_argument("--open", action="store_true", help="open the built book (build it first if needed)")
    parser.add_argument("--fresh", action="store_true", help="re-read every page instead of only changed ones")
    parser.add_argument("--port", type=int, default=0, help="port for --open's local server (default: a free one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    html = book_paths()["html"]
    if not args.open or not (html / "index.html").is_file():
        try:
            html = build(fresh=args.fresh)
        except (FileNotFoundError, RuntimeError) as err:
            print(f"bookbuild: {err}", file=sys.stderr)
            return 1
    return open_book(html, args.port) if args.open else 0


if __name__ == "__main__":
    raise SystemExit(main())
