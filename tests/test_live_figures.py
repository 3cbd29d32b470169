"""The live figures: the kernel-free twins of the chapters' widgets (book/live, bookbuild's post-build step).

Fast checks: every widget cell of every chapter is in the inventory (``book/live/twins.py``) with
a twin or a reason; a twin's numbers at a grid point equal a direct call of the library; the
anchors find the widget in a page and fail clearly when they do not. In chromium, with the
network closed, every twin of the built book moves when its control does; before/after
screenshots of two chapters go to ``test-artifacts/live-*.png``.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from conftest import serve_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHAPTERS = range(10)
WIDGET_CONTROL = re.compile(
    r"\bwidgets\.(IntSlider|FloatSlider|FloatLogSlider|SelectionSlider|Dropdown|ToggleButtons)\b"
)

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def live():
    from minimem_tools.bookbuild import load_live

    return load_live(REPO_ROOT)


def notebook_path(stem: str) -> Path:
    return REPO_ROOT / "notebooks" / f"{stem}.ipynb"


def widget(twin_id: str):
    return next(w for w in live().WIDGETS if w.twin_id == twin_id)


def small_twin(monkeypatch, twin_id: str, points: list[dict]):
    """The chapter's twin computed at ``points`` only (plus its starting point), by its own generator."""
    harness = live().harness

    def grid(self):
        for point in [*points, {c.name: c.values[c.default] for c in self.controls}]:
            yield tuple(c.values.index(point[c.name]) for c in self.controls), point

    monkeypatch.setattr(harness.Twin, "grid", grid)
    return widget(twin_id).build(REPO_ROOT)


# --------------------------------------------------------------------------- the inventory


def test_every_chapter_widget_has_a_twin_or_a_reason():
    widgets = live().WIDGETS
    harness = live().harness
    for w in widgets:
        assert (w.build is None) != (not w.reason), f"{w.notebook} {w.marker}: a twin or a reason, exactly one"
        assert notebook_path(w.notebook).is_file(), f"{w.notebook}.ipynb missing"
    assert {w.chapter for w in widgets} == set(CHAPTERS), "every chapter 0-9 has a widget in the inventory"
    assert len({w.twin_id for w in widgets if w.build}) == sum(1 for w in widgets if w.build), "one twin per id"
    for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = harness.code_cells(path)
        saved = set(harness.widget_cells(path))
        built = {i for i, source in enumerate(cells) if WIDGET_CONTROL.search(source)}
        declared = [w for w in widgets if w.notebook == path.stem]
        for i in sorted(saved | built):
            owners = [w for w in declared if w.marker in cells[i]]
            assert len(owners) == 1, f"{path.name} code cell {i} has a widget: declare it in book/live/twins.py WIDGETS"
        for w in declared:
            assert sum(w.marker in source for source in cells) == 1, f"{path.name}: {w.marker!r} must be in one cell"


def test_every_chapter_has_a_twin():
    assert {w.chapter for w in live().WIDGETS if w.build} == set(CHAPTERS)


# --------------------------------------------------------------------------- numbers from the library


def test_chapter_0_twin_equals_the_cost_formula(monkeypatch):
    twin = small_twin(monkeypatch, "ch00", [{"n": 2816, "m": 16}])
    state = twin.state({"n": 2816, "m": 16})
    n, m, d_key, d_value, heads = 2816, 16, 256, 1024, 4  # [PKM] section 3, the chapter's defaults
    product_keys = heads * (n * d_key + m * m + m * d_value)
    assert state["data"]["3"]["y"] == [n * n * d_value, product_keys]
    assert f"<b>N = {n * n:,}</b> slots" in state["readout"]
    assert f"<b>{n * n * d_value / product_keys:,.0f}x</b>" in state["readout"]
    start = twin.state({"n": 512, "m": 32})["readout"]
    assert "<b>N = 262,144</b>" in start and "<b>407x</b>" in start  # the frozen widget's saved readout


def test_chapter_2_twin_draws_the_library_search(monkeypatch):
    import torch

    from minimem import product_keys
    from minimem.product_keys import product_key_topk

    twin = small_twin(monkeypatch, "ch02", [{"n": 16, "m": 5}])
    state = twin.state({"n": 16, "m": 5})
    gen = torch.Generator().manual_seed(0)  # the chapter's search_figure, seed SEED = 0
    q1, q2, k1, k2 = (torch.randn(*shape, 8, generator=gen) for shape in ((1,), (1,), (16,), (16,)))
    _, chosen = product_key_topk(q1, q2, k1, k2, 5)
    chosen = chosen[0].tolist()
    points = state["data"]["ax0/scatter1"]
    assert sorted(zip(points["y"], points["x"])) == sorted((c // 16, c % 16) for c in chosen)
    grid = (q1 @ k1.T)[0][:, None] + (q2 @ k2.T)[0][None, :]
    assert state["data"]["ax0/imshow1"]["z"][3][7] == pytest.approx(grid[3, 7].item(), rel=5e-3)  # 3 digits kept
    staircase = len(product_keys._candidate_cells(5, "cpu")[0])
    assert f"{staircase} candidate cells (of the 25 in the block)" in state["readout"]
    assert state["layout"]["title"]["text"] == "n = 16, N = 256 slots, top-5"


def test_chapter_4_twin_equals_accounting(monkeypatch):
    from minimem import accounting
    from minimem.config import ModelConfig, PEERConfig

    point = {"log2 n": 9, "heads H": 4, "top-m": 12}
    state = small_twin(monkeypatch, "ch04", [point]).state(point)
    config = ModelConfig(
        n_embd=768,
        n_head=12,
        n_layer=12,
        ffn_hidden=2048,
        memory=PEERConfig(n_slots=512 * 512, heads=4, topk=12, d_key=384, layers=[6]),
    )
    params, flops = accounting.memory_layer_parameters(config, 6), accounting.memory_layer_flops(config, 6)
    marker = state["data"]["2"]
    assert marker["x"] == [512 * 512] * 2
    assert marker["y"] == pytest.approx([params / (3 * 768 * 2048), flops / (6 * 768 * 2048)], rel=1e-5)
    assert f"parameters {params / 1e6:,.1f}M" in state["readout"]


def test_chapter_6_twin_equals_mcp_percent(monkeypatch):
    from minimem.accounting import mcp_percent
    from minimem.config import load_config

    point = {"D_k": 128, "m": 16}
    state = small_twin(monkeypatch, "ch06", [point]).state(point)
    config = load_config(
        REPO_ROOT / "configs" / "shakespeare-ultramemv2.yaml", ["model.memory.d_key=128", "model.memory.topk=16"]
    )
    expected = mcp_percent(config.model)
    assert state["data"]["1"]["y"] == [pytest.approx(expected, rel=1e-5)]
    assert f"<b>MCP {expected:.1f}%</b>" in state["readout"]


def test_chapter_8_twin_equals_the_results(monkeypatch):
    from minimem_tools.experiments.runner import load_experiment, stat

    head2head = json.loads((REPO_ROOT / "results" / "head2head.json").read_text())
    point = {"parity": "total", "task": "shakespeare", "metric": "val_loss"}
    state = small_twin(monkeypatch, "ch08", [point]).state(point)
    bars = state["data"]["ax0/bar1"]
    name_of = load_experiment("head2head").name_of
    models = [label for label in state["layout"]["xaxis"]["ticktext"]]
    expected = [stat(head2head, name_of(m, "total", "shakespeare"), "val_loss") for m in models]
    assert bars["y"] == pytest.approx([e[0] for e in expected], rel=1e-3)
    assert bars["error_y"]["array"] == pytest.approx([e[1] for e in expected], rel=1e-3, abs=1e-6)
    assert state["readout"].startswith("val_loss, equal total parameters, shakespeare")


def test_chapter_9_twin_table_state_per_rank(monkeypatch):
    point = {"ranks P": 16, "T per rank": 4096, "tables (B)": 118}
    state = small_twin(monkeypatch, "ch09", [point]).state(point)
    assert state["data"]["3"]["y"][0] == pytest.approx(118 * 16 / 16, rel=1e-6)  # 16 B per parameter, 16 ranks
    assert f"table training state <b>{118 * 16 / 16:,.1f} GB</b>" in state["readout"]


# --------------------------------------------------------------------------- anchors


def fake_cell(model_id: str) -> str:
    return (
        '<div class="cell docutils container">\n<div class="cell_input docutils container">code</div>\n'
        '<div class="cell_output docutils container">\n<div class="output stream"><pre>printed</pre>\n</div>\n'
        f'<script type="application/vnd.jupyter.widget-view+json">{{"model_id": "{model_id}", "version_major": 2, '
        f'"version_minor": 0}}</script></div>\n</div>\n<p>after {model_id}</p>\n'
    )


def fake_page(*model_ids: str) -> str:
    return "<html><head><title>t</title></head><body>\n" + "".join(map(fake_cell, model_ids)) + "</body></html>\n"


def test_anchors_place_notes_and_twin_after_the_widget_cells_idempotently(tmp_path):
    from minimem_tools import bookbuild

    harness = live().harness
    nb = notebook_path("06_ultramemv2")
    declared = [w for w in live().WIDGETS if w.notebook == "06_ultramemv2"]
    init, mcp = (harness.widget_model_ids(nb, w.marker)[-1] for w in declared)
    page = tmp_path / "notebooks" / "06_ultramemv2.html"
    page.parent.mkdir()
    page.write_text(fake_page(init, "aprogressbar", mcp))
    static = tmp_path / "_static"
    static.mkdir()
    for name in ("live-figures.js", "live-figures.css"):
        (static / name).write_text("/* */")
    spec = {"id": "ch06", "title": "T", "note": "", "states": {"0,0": []}, "key": "k"}
    args = (page, nb, declared, {"ch06": spec}, static, live())
    assert bookbuild.inject_live(*args) == ["ch06"]
    once = page.read_text()
    assert bookbuild.inject_live(*args) == ["ch06"]
    assert page.read_text() == once, "the post-build step must be idempotent"
    body = once.split("<body>")[1]
    kernel_note = body.index("This control needs a running kernel")
    assert body.index(f'"{init}"') < kernel_note < body.index(f"after {init}"), "the note follows the widget's cell"
    assert "376,832" in body[kernel_note:] and 'href="#mm-live-ch06"' in body[kernel_note:]
    twin = body.index('data-live="ch06"')
    assert body.index("A frozen widget, and its live twin") < twin, "the twin's note comes first"
    assert body.index(f'"{mcp}"') < twin < body.index(f"after {mcp}"), "the twin follows the widget's cell"
    assert body.count("mm-live-note") == 2, "a progress bar (no control) gets no note"
    assert '<script defer src="../_static/vendor/plotly/plotly.min.js">' in once
    assert '<script defer src="../_static/live/ch06.js?v=k">' in once


def test_anchor_not_found_fails_the_build_clearly(tmp_path):
    from minimem_tools import bookbuild

    w = widget("ch00")
    page = tmp_path / "00_welcome.html"
    page.write_text(fake_page("not-the-saved-model-id"))
    with pytest.raises(RuntimeError, match="live figure anchor not found.*mm-n-slider"):
        bookbuild.inject_live(page, notebook_path(w.notebook), [w], {}, tmp_path, live())


def test_dependency_slice_runs_only_what_the_widget_needs():
    harness = live().harness
    cells = ["import os\nimport json", "A = 1\nB = expensive()", "def f(x):\n    return A + x", "C = f(2)"]
    assert harness.dependency_slice(cells, 3) == ["A = 1\n", "def f(x):\n    return A + x"]


# --------------------------------------------------------------------------- the built book


@pytest.fixture(scope="module")
def live_book(built_book):
    """The built book with its live figures (added again when the build predates them)."""
    from minimem_tools import bookbuild

    if not all((built_book / "_static" / "live" / f"{w.twin_id}.js").is_file() for w in live().WIDGETS if w.build):
        bookbuild.add_live_figures(REPO_ROOT, built_book)
    return built_book


def test_every_widget_of_the_built_book_has_a_note(live_book):
    harness = live().harness
    for path in sorted((live_book / "notebooks").glob("*.html")):
        text = path.read_text(encoding="utf-8")
        views = re.findall(r'widget-view\+json">\{"model_id": "(\w+)"', text)
        controls = [v for v in views if v in harness.saved_controls(notebook_path(path.stem))]
        notes = text.count('class="admonition note mm-live-note"') + text.count(
            'class="admonition warning mm-live-note"'
        )
        assert notes == len(controls), f"{path.name}: {len(controls)} frozen controls, {notes} notes"
        for w in live().WIDGETS:
            if w.notebook == path.stem and w.build:
                assert f'data-live="{w.twin_id}"' in text, f"{path.name}: twin {w.twin_id} missing"
    plotly = live_book / "_static" / "vendor" / "plotly" / "plotly.min.js"
    assert plotly.stat().st_size > 1_000_000 and (plotly.parent / "LICENSE.txt").is_file()


@pytest.fixture(scope="module")
def live_url(live_book):
    with serve_folder(live_book) as url:
        yield url


@pytest.fixture
def offline(browser, live_url):
    """A page whose requests outside the local server are aborted and recorded, with its errors."""
    record = {"external": [], "errors": []}

    def route(r):
        url = r.request.url
        if url.startswith(live_url) or url.startswith(("data:", "blob:", "about:")):
            r.continue_()
        else:
            record["external"].append(url)
            r.abort()

    def open_page(width: int = 1280):
        context = browser.new_context(viewport={"width": width, "height": 900}, service_workers="block")
        context.route("**/*", route)
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and record["errors"].append(f"console: {m.text}"))
        page.on("pageerror", lambda e: record["errors"].append(f"uncaught: {e}"))
        contexts.append(context)
        return page

    contexts = []
    yield open_page, record
    for context in contexts:
        context.close()
    assert not record["external"], "requests to outside the book:\n" + "\n".join(record["external"])


PLOT_DATA = "el => JSON.stringify(el.querySelector('.mm-live-plot').data)"


def move_first_control(page, root) -> None:
    """Move the twin's first control one step, as a reader would."""
    kind = root.locator(".mm-live-control").first
    slider = kind.locator("input[type=range]")
    if slider.count():
        value, top = int(slider.input_value()), int(slider.get_attribute("max"))
        slider.focus()
        page.keyboard.press("ArrowLeft" if value == top else "ArrowRight")
        return
    select = kind.locator("select")
    if select.count():
        select.select_option(index=0 if select.input_value() != "0" else 1)
        return
    kind.locator("button[aria-pressed=false]").first.click()


@pytest.mark.browser
def test_every_twin_moves_offline(offline, live_url):
    open_page, record = offline
    page = open_page()
    shots = {"ch00", "ch02"}
    for w in [w for w in live().WIDGETS if w.build]:
        page.goto(f"{live_url}notebooks/{w.notebook}.html", wait_until="load", timeout=60_000)
        root = page.locator(f"#mm-live-{w.twin_id}")
        root.and_(page.locator(".mm-live-ready")).wait_for(timeout=60_000)
        root.locator(".mm-live-plot .main-svg").first.wait_for(timeout=30_000)
        root.scroll_into_view_if_needed()
        state = root.get_attribute("data-state")
        before = (root.locator(".mm-live-readout").inner_text(), root.evaluate(PLOT_DATA))
        assert before[0].strip(), f"{w.twin_id}: empty readout"
        if w.twin_id in shots:
            ARTIFACTS.mkdir(exist_ok=True)
            root.screenshot(path=str(ARTIFACTS / f"live-{w.twin_id}-before.png"))
        move_first_control(page, root)
        page.wait_for_function(
            "([el, s]) => el.dataset.state !== s", arg=[root.element_handle(), state], timeout=10_000
        )
        after = (root.locator(".mm-live-readout").inner_text(), root.evaluate(PLOT_DATA))
        assert after[0] != before[0], f"{w.twin_id}: the readout did not change"
        assert after[1] != before[1], f"{w.twin_id}: the plotted data did not change"
        if w.twin_id in shots:
            root.screenshot(path=str(ARTIFACTS / f"live-{w.twin_id}-after.png"))
    assert not record["errors"], "\n".join(record["errors"])


@pytest.mark.browser
def test_chapter_0_twin_answers_where_the_frozen_widget_cannot(offline, live_url):
    """The issue's case: n = 2816 must read N = 7,929,856 (the frozen widget stays at 262,144)."""
    open_page, record = offline
    page = open_page()
    page.goto(f"{live_url}notebooks/00_welcome.html", wait_until="load", timeout=60_000)
    root = page.locator("#mm-live-ch00.mm-live-ready")
    root.wait_for(timeout=60_000)
    readout = root.locator(".mm-live-readout")
    assert "N = 262,144" in readout.inner_text()
    slider = root.locator("input[type=range]").first
    slider.focus()
    for _ in range((2816 - 512) // 128):
        page.keyboard.press("ArrowRight")
    assert root.locator("output").first.inner_text() == "2816"
    assert "N = 7,929,856" in readout.inner_text()
    assert not record["errors"], "\n".join(record["errors"])


@pytest.mark.browser
def test_twins_fit_a_phone_screen(offline, live_url):
    open_page, record = offline
    page = open_page(width=390)
    page.goto(f"{live_url}notebooks/02_product_keys.html", wait_until="load", timeout=60_000)
    root = page.locator("#mm-live-ch02.mm-live-ready")
    root.wait_for(timeout=60_000)
    root.scroll_into_view_if_needed()
    box = root.locator(".mm-live-plot .main-svg").first.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 + 1, f"the figure overflows a 390 px screen: {box}"
    assert box["height"] > box["width"], "on a phone the two panels stack"
    ARTIFACTS.mkdir(exist_ok=True)
    root.screenshot(path=str(ARTIFACTS / "live-ch02-390px.png"))
    assert not record["errors"], "\n".join(record["errors"])
