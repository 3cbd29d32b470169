"""Shared fixtures: one torch thread, the repository root, the built book, and Debian's chromium for browser tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from pathlib import Path

# The Triton interpreter must be chosen before triton is first imported, by whichever test
# module comes first: on a machine without CUDA every Triton test runs interpreted on CPU.
if not os.environ.get("TRITON_INTERPRET") and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors run faster without OpenMP's pool, which spins
    against other processes on a shared 2-core machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium; skipped when missing, except under CI=true where that is a failure."""
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} not found: run `make chromium` (apt-get install chromium) for the browser tests"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: browser tests may not be skipped)")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="session")
def built_book() -> Path:
    """``book/_build/html``, (re)built first when a book source is newer than the build."""
    from minimem_tools.bookbuild import book_paths, build

    html = book_paths(REPO_ROOT)["html"]
    stamp = html / "searchindex.js"  # rewritten by every build
    book = REPO_ROOT / "book"
    sources = [*book.glob("*.*"), *book.glob("_static/*.*"), *(REPO_ROOT / "notebooks").glob("*.ipynb")]
    if not stamp.is_file() or max(p.stat().st_mtime for p in sources) > stamp.stat().st_mtime:
        build(REPO_ROOT)
    return html


@pytest.fixture(scope="module")
def browser(chromium):
    """A headless chromium (Playwright), one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


@contextlib.contextmanager
def serve_folder(folder: Path):
    """A local http.server for ``folder`` on a free port, for the browser tests: yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
