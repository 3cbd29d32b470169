"""The built book: offline, complete, and working in a real browser.

The HTML checks (no external resources, every internal link and anchor resolves) read the files.
The browser checks drive Debian's chromium through Playwright against a local http.server with
the network closed: any request that does not go to that server is aborted and fails the test.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from bs4 import BeautifulSoup
from conftest import serve_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
# Links OUT of the book that are allowed: launch buttons, the repository, and the papers'
# arXiv/DOI pages in the bibliography. Nothing the pages *load* may be external.
ALLOWED_LINKS = (
    "https://github.com/minimem-course/minimem",
    "https://mybinder.org/v2/gh/minimem-course/minimem/",
    "https://colab.research.google.com/github/minimem-course/minimem/",
    "https://arxiv.org/abs/",
    "https://doi.org/",
    "http://www.w3.org/",  # XML namespaces of inline SVG, never fetched
)
URL_PATTERN = re.compile(r"""https?://[^\s"'<>)\\]+""")
RESOURCE_ATTRS = {
    "script": "src",
    "img": "src",
    "iframe": "src",
    "source": "src",
    "video": "src",
    "audio": "src",
    "embed": "src",
    "object": "data",
    "link": "href",
}
LOADED_LINK_RELS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "manifest"}


def html_pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.relative_to(html).parts)


@functools.cache
def element_ids(page: Path) -> frozenset[str]:
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    return frozenset(tag["id"] for tag in soup.find_all(id=True))


# --------------------------------------------------------------------------- the HTML files


def test_built_book_has_the_toc_pages(built_book):
    for page in ("index.html", "book/intro.html", "notebooks/00_welcome.html", "book/bibliography.html", "search.html"):
        assert (built_book / page).is_file(), f"{page} missing from the built book"
    # The chapters are the notebooks themselves, never copies inside book/.
    copies = [p for p in (REPO_ROOT / "book").rglob("*.ipynb") if "_build" not in p.parts]
    assert not copies, f"notebook copies found under book/: {copies}"


def test_built_html_references_no_external_url_except_links_out(built_book):
    problems = []
    for page in html_pages(built_book):
        text = page.read_text(encoding="utf-8")
        rel = page.relative_to(built_book)
        for url in URL_PATTERN.findall(text):
            if not url.startswith(ALLOWED_LINKS):
                problems.append(f"{rel}: {url}")
        soup = BeautifulSoup(text, "html.parser")
        for tag, attr in RESOURCE_ATTRS.items():
            for element in soup.find_all(tag):
                value = element.get(attr, "")
                if tag == "link" and not LOADED_LINK_RELS & set(element.get("rel", [])):
                    continue  # navigation (next, prev, search), not loaded by the page
                if value.startswith(("http://", "https://", "//")):
                    problems.append(f"{rel}: <{tag} {attr}={value}> loads from outside the book")
    assert not problems, "external URLs in the built book:\n" + "\n".join(problems)


def test_internal_links_and_anchors_resolve(built_book):
    problems, checked = [], 0
    for page in html_pages(built_book):
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        rel = page.relative_to(built_book)
        targets = [a.get("href") for a in soup.find_all("a")] + [i.get("src") for i in soup.find_all("img")]
        targets += [s.get("src") for s in soup.find_all("script")] + [l.get("href") for l in soup.find_all("link")]
        for href in filter(None, targets):
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("//", "mailto:", "javascript:")):
                continue
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            checked += 1
            if not target.is_relative_to(built_book.resolve()):
                problems.append(f"{rel}: {href} -> outside the built book")
            elif not target.is_file():
                problems.append(f"{rel}: {href} -> missing file")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in element_ids(target):
                problems.append(f"{rel}: {href} -> no element with id {parts.fragment!r}")
    assert checked > 50, f"only {checked} internal links found: is the book empty?"
    assert not problems, "broken internal links:\n" + "\n".join(problems)


def test_bibliography_lists_every_paper_of_the_spec(built_book):
    text = (built_book / "book" / "bibliography.html").read_text(encoding="utf-8")
    for arxiv_id, title in [
        ("1907.05242", "Large Memory Layers with Product Keys"),
        ("2407.04153", "Mixture of A Million Experts"),
        ("2412.09764", "Memory Layers at Scale"),
        ("2411.12364", "Ultra-Sparse Memory Network"),
        ("2508.18756", "UltraMemV2"),
        ("2409.02060", "OLMoE"),
    ]:
        assert f"https://arxiv.org/abs/{arxiv_id}" in text, f"arXiv {arxiv_id} missing from the bibliography"
        assert title.lower() in text.lower(), f"{title!r} missing from the bibliography"


# --------------------------------------------------------------------------- minimem_tools.bookbuild


def test_bookbuild_open_without_display_prints_how_to_serve(built_book, monkeypatch, capsys):
    from minimem_tools import bookbuild

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(bookbuild.sys, "platform", "linux")
    assert bookbuild.open_book(built_book) == 0
    out = capsys.readouterr().out
    assert str(built_book / "index.html") in out and "http.server" in out


def test_bookbuild_rejects_bad_input(tmp_path, capsys):
    from minimem_tools import bookbuild

    assert bookbuild.open_book(tmp_path) == 1
    assert "no built book" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="_config.yml"):
        bookbuild.build(root=tmp_path)
    with pytest.raises(SystemExit):
        bookbuild.main(["--open", "--port", "70000"])
    assert "--port must be in [0, 65535]" in capsys.readouterr().err


def test_bookserver_serves_the_book_on_loopback(built_book):
    import urllib.request

    from minimem_tools.bookbuild import serve

    server = serve(built_book)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/book/intro.html", timeout=10) as response:
            assert response.status == 200 and b"minimem" in response.read()
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- in chromium


@pytest.fixture(scope="module")
def book_url(built_book):
    with serve_folder(built_book) as url:
        yield url


class OfflinePage:
    """A chromium page that aborts (and records) every request not sent to ``base``, and records
    console errors, uncaught exceptions, failed requests and HTTP errors."""

    def __init__(self, context, base: str):
        self.base, self.external, self.errors = base, [], []
        context.route("**/*", self._route)
        self.page = context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on(
            "requestfailed",
            # ERR_ABORTED: a request still in flight when the test moved on to the next page (a missing
            # file is an HTTP 404, caught below; an outside address is caught by _route)
            lambda r: (
                r.url.startswith(base)
                and "ERR_ABORTED" not in str(r.failure)
                and self.errors.append(f"request failed: {r.url} {r.failure}")
            ),
        )
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(f"HTTP {r.status}: {r.url}"))

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.base) or url.startswith(("data:", "blob:", "about:")):
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def visit(self, url: str):
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.page.goto(url, wait_until="load", timeout=60_000)
        try:
            self.page.wait_for_load_state("networkidle", timeout=30_000)
        except PlaywrightTimeout:  # on a loaded machine the network may never go quiet for 500 ms
            pass
        # whatever the network did: math typeset and web fonts loaded before the page is checked
        self.page.wait_for_function(
            "() => !window.MathJax || !window.MathJax.startup || !window.MathJax.startup.promise"
            " || window.__typeset === true"
            " || (window.MathJax.startup.promise.then(() => window.__typeset = true), false)",
            timeout=60_000,
        )


@pytest.fixture
def offline_page(browser, book_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = OfflinePage(context, book_url)
    yield page
    context.close()
    assert not page.external, "requests to outside the book:\n" + "\n".join(page.external)


MATH_READY = """async () => {
    if (!document.querySelector('.math')) return true;
    await window.MathJax.startup.promise;
    return true;
}"""
UNTYPESET_MATH = "() => document.querySelectorAll('.math:not(:has(mjx-container))').length"
BROKEN_IMAGES = """async () => {
    const broken = [];
    for (const img of document.images) {
        img.loading = 'eager';
        try { await img.decode(); } catch (e) { broken.push(img.currentSrc || img.src); }
        if (!(img.naturalWidth > 0)) broken.push(img.currentSrc || img.src);
    }
    return [...new Set(broken)];
}"""


@pytest.mark.browser
def test_every_page_loads_offline_with_math_images_and_no_errors(built_book, book_url, offline_page):
    problems, math_pages = [], 0
    for page_path in html_pages(built_book):
        rel = page_path.relative_to(built_book).as_posix()
        offline_page.errors.clear()
        offline_page.visit(book_url + rel)
        page = offline_page.page
        page.evaluate(MATH_READY)
        if page.locator(".math").count():
            math_pages += 1
            if page.locator("mjx-container").count() == 0 or page.evaluate(UNTYPESET_MATH):
                problems.append(f"{rel}: math not typeset by MathJax")
            if page.locator("mjx-merror").count():
                problems.append(f"{rel}: MathJax reports a TeX error")
        problems += [f"{rel}: broken image {src}" for src in page.evaluate(BROKEN_IMAGES)]
        problems += [f"{rel}: {error}" for error in offline_page.errors]
    assert math_pages >= 2, "the front page and chapter 0 have math: MathJax output expected on both"
    assert not problems, "\n".join(problems)


@pytest.mark.browser
def test_search_finds_pages(book_url, offline_page):
    offline_page.visit(book_url + "search.html?q=product+keys")
    results = offline_page.page.locator("#search-results ul.search li")
    results.first.wait_for(timeout=30_000)
    linked = [results.nth(i).locator("a").first.get_attribute("href") for i in range(results.count())]
    assert any("00_welcome" in href for href in linked), f"chapter 0 not among the results: {linked}"
    offline_page.visit(book_url + "search.html?q=zyxwvutsrq")
    summary = offline_page.page.locator("#search-results .search-summary")
    summary.wait_for(timeout=30_000)
    assert results.count() == 0, "a nonsense query must find nothing"
    assert not offline_page.errors, "\n".join(offline_page.errors)


@pytest.mark.browser
def test_saved_widget_state_renders_and_moves_in_chapter_0(book_url, offline_page):
    offline_page.visit(book_url + "notebooks/00_welcome.html")
    page = offline_page.page
    slider = page.locator(".mm-n-slider")
    slider.wait_for(state="visible", timeout=30_000)  # rendered by the html-manager from saved state
    assert "jupyter-widgets" in (slider.get_attribute("class") or "")
    assert "N = 262,144" in page.locator(".mm-readout").inner_text()  # the saved output
    readout = slider.locator(".widget-readout")
    assert readout.inner_text().strip() == "512"
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")  # the widget's own JavaScript moves it, no kernel needed
    page.wait_for_function(
        "() => document.querySelector('.mm-n-slider .widget-readout').innerText.trim() === '640'", timeout=10_000
    )
    assert not offline_page.errors, "\n".join(offline_page.errors)
