"""``python -m minimem_tools.bookbuild [--open] [--fresh]``: build the course book, offline.

The book is a Jupyter Book 1.x whose source root is the repository root, so its chapters are
the notebooks in ``notebooks/`` themselves, never copies; ``book/_config.yml`` and
``book/_toc.yml`` say what goes in. Notebooks are not executed (the committed outputs are shown)
and Sphinx warnings are errors. Every script the pages load is served from the build
(``book/_static/vendor``), so the site reads without a network.

``--open`` serves ``book/_build/html`` on 127.0.0.1 and opens it in a browser when a display is
available; otherwise it prints where the book is and how to serve it.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import subprocess
import sys
import threading
import time
import webbrowser
from pathlib import Path

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
    return paths["html"]


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
