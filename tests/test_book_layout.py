"""The built book reads without horizontal scrolling (issue 16), in Debian's chromium.

Every page at 1280 px, and every chapter at 390 px (a phone), is loaded with the network closed;
once MathJax, the fonts, the images and the saved widgets are in, each code source, output,
prose code block, display formula, table and image is measured. A block overflows when its
content is wider than its box (``scrollWidth > clientWidth + 1``: something is hidden behind a
scrollbar) or when it sticks out of the text column. ``book/_static/layout.css`` makes code and
text outputs wrap; what still overflows comes from a cell's source or output (a formula or a
table too wide for the column) and is listed by page, kind, width and a snippet (the longest
line, the TeX of a formula). Also: no visible text holds an nbval marker (``# NBVAL_...``), and on a phone every
ipywidgets slider keeps a track a thumb can travel along, its readout visible. Screenshots go to
``test-artifacts/layout-*.png``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import serve_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
DESKTOP, PHONE = 1280, 390
MIN_TRACK_PX = 150  # the narrowest slider track a reader can still set a value on
SCREENSHOTS = {DESKTOP: ("03_pkm", "05_ultramem", "06_ultramemv2"), PHONE: ("00_welcome",)}

pytestmark = pytest.mark.browser

# Everything a page loads after ``load``: typeset math, web fonts, images, the saved widgets
# (the html-manager renders each <script type=...widget-view+json> into the div before it).
READY = """async () => {
    for (const img of document.images) img.loading = 'eager';
    if (window.MathJax && window.MathJax.startup) await window.MathJax.startup.promise;
    await document.fonts.ready;
    await Promise.all([...document.images].map(img => img.complete ? null : img.decode().catch(() => null)));
    await new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    return true;
}"""
WIDGETS_RENDERED = """() => [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')]
    .every(s => s.previousElementSibling && s.previousElementSibling.classList.contains('widget-subarea')
                && s.previousElementSibling.childElementCount > 0)"""

# The blocks a reader must see whole, first match wins (a <pre> of an output is an output);
# the .cell_output box itself comes last, for whatever else an output holds (widgets).
MEASURE = """() => {
    const markers = document.body.innerText.split('\\n').filter(line => line.includes('NBVAL'));
    const stylesheet = [...document.styleSheets].some(s => (s.href || '').includes('/_static/layout.css'));
    const article = document.querySelector('article.bd-article');
    if (!article) return {blocks: 0, overflows: [], markers, stylesheet};
    const box = article.getBoundingClientRect();
    const right = box.right - parseFloat(getComputedStyle(article).paddingRight);
    const kinds = [
        ['code', '.cell_input pre'],
        ['output', '.cell_output pre, .cell_output .output, .cell_output > div[class*="highlight-"]'],
        ['code block', 'pre'],
        ['math', 'mjx-container[display="true"]'],
        ['table', 'table'],
        ['image', 'img'],
        ['output', '.cell_output'],
    ];
    const tex = el => {
        const doc = window.MathJax && MathJax.startup && MathJax.startup.document;
        const item = doc && doc.getMathItemsWithin(el)[0];
        return item ? item.math.trim().replace(/\\s+/g, ' ') : el.textContent;
    };
    const snippet = (kind, el) => {
        if (kind === 'math') return tex(el);
        if (kind === 'image') return el.getAttribute('src') || '';
        if (kind === 'table') {
            const row = r => [...r.cells].map(c => c.innerText.trim().replace(/\\s+/g, ' ')).join(' | ');
            const body = el.querySelector('tbody tr') || el.rows[0];
            return (el.tHead ? row(el.tHead.rows[0]) + ' // ' : '') + (body ? row(body) : '');
        }
        const lines = (el.innerText || '').split('\\n');
        return lines.reduce((a, b) => (b.length > a.length ? b : a), '');
    };
    const seen = new Set(), found = [];
    let blocks = 0;
    for (const [kind, selector] of kinds) {
        for (const el of article.querySelectorAll(selector)) {
            if (seen.has(el) || !el.getClientRects().length) continue;  // counted, or not rendered
            seen.add(el);
            blocks++;
            const rect = el.getBoundingClientRect();
            const hidden = el.scrollWidth > el.clientWidth + 1 && kind !== 'table' && kind !== 'image';
            const sticksOut = rect.right > right + 1;
            if (!hidden && !sticksOut) continue;
            found.push({el, kind, width: Math.round(hidden ? el.scrollWidth : rect.width),
                        room: Math.round(hidden ? el.clientWidth : right - rect.left),
                        snippet: snippet(kind, el).slice(0, 160)});
        }
    }
    // A box that overflows because a block inside it does is the same problem: report the block.
    const inner = found.filter(f => !found.some(g => g !== f && f.el.contains(g.el)));
    return {blocks, overflows: inner.map(({el, ...rest}) => rest), markers, stylesheet};
}"""

SLIDERS = """() => {
    const article = document.querySelector('article.bd-article');
    const right = article.getBoundingClientRect().right - parseFloat(getComputedStyle(article).paddingRight);
    return [...article.querySelectorAll('.widget-hslider')].filter(w => w.getClientRects().length).map(w => {
        const track = w.querySelector('.noUi-target, .slider-container');
        const readout = w.querySelector('.widget-readout');
        const box = w.getBoundingClientRect();
        const r = readout && readout.getClientRects().length ? readout.getBoundingClientRect() : null;
        return {
            label: (w.querySelector('.widget-label') || {}).innerText || '',
            track: track ? Math.round(track.getBoundingClientRect().width) : 0,
            right: Math.round(box.right - right),
            readout: r === null || !readout.innerText.trim() ? 'none'
                : (r.bottom <= box.bottom + 1 && r.right <= right + 1 && r.width > 0 ? 'visible' : 'clipped'),
        };
    });
}"""


@pytest.fixture(scope="module")
def book_server(built_book):
    with serve_folder(built_book) as url:
        yield url


def book_pages(html: Path, chapters_only: bool = False) -> list[str]:
    """The built pages (not the redirect ``index.html``), or only the chapters."""
    pages = (html / "notebooks").glob("*.html") if chapters_only else html.rglob("*.html")
    return sorted(
        p.relative_to(html).as_posix()
        for p in pages
        if "_static" not in p.relative_to(html).parts and 'http-equiv="refresh"' not in p.read_text().lower()
    )


def read_pages(browser, base: str, pages: list[str], width: int, sliders: bool = False) -> dict[str, dict]:
    """Each page's measurements at ``width`` (and its sliders); screenshots of SCREENSHOTS[width]."""
    context = browser.new_context(viewport={"width": width, "height": 900}, service_workers="block")
    external: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith((base, "data:", "blob:", "about:")):
            r.continue_()
        else:
            external.append(url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    results = {}
    try:
        for rel in pages:
            page.goto(base + rel, wait_until="load", timeout=60_000)
            page.wait_for_function(WIDGETS_RENDERED, timeout=60_000)
            page.evaluate(READY)
            results[rel] = page.evaluate(MEASURE)
            if sliders:
                results[rel]["sliders"] = page.evaluate(SLIDERS)
            if Path(rel).stem in SCREENSHOTS.get(width, ()):
                screenshot(page, Path(rel).stem, width)
    finally:
        context.close()
    assert not external, "requests to outside the book:\n" + "\n".join(external)
    return results


def screenshot(page, stem: str, width: int) -> None:
    """The screen at the chapter's first widget (on a phone) or its widest code cell (on a desktop)."""
    if width == PHONE and page.locator(".widget-hslider").count():
        target = page.locator(".widget-hslider").first
    else:
        index = page.evaluate(
            """() => { const pres = [...document.querySelectorAll('.cell_input pre')];
                const longest = pre => Math.max(...pre.innerText.split('\\n').map(l => l.length));
                return pres.reduce((best, pre, i) => longest(pre) > longest(pres[best]) ? i : best, 0); }"""
        )
        target = page.locator(".cell_input pre").nth(index)
    target.scroll_into_view_if_needed()
    page.evaluate("() => window.scrollBy(0, -120)")  # below the sticky header, with some context
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"layout-{stem}-{width}px.png"))


@pytest.fixture(scope="module")
def desktop(browser, book_server, built_book) -> dict[str, dict]:
    return read_pages(browser, book_server, book_pages(built_book), DESKTOP)


@pytest.fixture(scope="module")
def phone(browser, book_server, built_book) -> dict[str, dict]:
    return read_pages(browser, book_server, book_pages(built_book, chapters_only=True), PHONE, sliders=True)


def overflow_report(results: dict[str, dict], width: int) -> tuple[int, list[str]]:
    """(blocks measured, one line per overflowing block), code first, then outputs, math, tables."""
    order = ["code", "code block", "output", "math", "table", "image"]
    rows = [(order.index(o["kind"]), rel, o) for rel, r in results.items() for o in r["overflows"]]
    lines = [
        f"{rel} @{width}px [{o['kind']}] {o['width']} px in {o['room']} px: {o['snippet']!r}"
        for _, rel, o in sorted(rows, key=lambda row: row[:2])
    ]
    return sum(r["blocks"] for r in results.values()), lines


def test_every_page_loads_the_layout_stylesheet(desktop):
    missing = [rel for rel, r in desktop.items() if not r["stylesheet"]]
    assert not missing, f"_static/layout.css not loaded (book/_config.yml html_css_files): {missing}"


def test_no_code_output_math_or_table_overflows_at_1280px(desktop):
    blocks, lines = overflow_report(desktop, DESKTOP)
    assert blocks > 300, f"only {blocks} blocks measured: is the book empty?"
    if lines:  # pytest.fail: the list alone, without assert's repr of it
        pytest.fail(f"{len(lines)} of {blocks} blocks need horizontal scrolling at {DESKTOP} px:\n" + "\n".join(lines))


# On a phone a long formula or the six-column claims table may scroll inside its own box (layout.css);
# code and outputs, where a conclusion could hide, must not.
PHONE_MAY_SCROLL = ("math", "table")


def test_no_code_or_output_overflows_at_390px(phone):
    blocks, lines = overflow_report(phone, PHONE)
    assert blocks > 200, f"only {blocks} blocks measured in the chapters: is the book empty?"
    lines = [line for line in lines if not any(f"[{kind}]" in line for kind in PHONE_MAY_SCROLL)]
    if lines:  # pytest.fail: the list alone, without assert's repr of it
        pytest.fail(f"{len(lines)} of {blocks} blocks need horizontal scrolling at {PHONE} px:\n" + "\n".join(lines))


def test_no_test_marker_is_visible(desktop):
    found = [f"{rel}: {line.strip()[:120]!r}" for rel, r in desktop.items() for line in r["markers"]]
    assert not found, "nbval markers visible to readers (move them into cell tags):\n" + "\n".join(found)


def test_sliders_keep_a_usable_track_on_a_phone(phone):
    sliders = [(rel, s) for rel, r in phone.items() for s in r["sliders"]]
    assert sliders, "no ipywidgets slider found in the chapters"
    problems = [
        f"{rel}: slider {s['label']!r}: track {s['track']} px, {s['right']} px past the column, readout {s['readout']}"
        for rel, s in sliders
        if s["track"] < MIN_TRACK_PX or s["right"] > 1 or s["readout"] == "clipped"
    ]
    assert not problems, f"sliders at {PHONE} px (track >= {MIN_TRACK_PX} px expected):\n" + "\n".join(problems)
