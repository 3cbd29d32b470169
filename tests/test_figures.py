"""The book's drawn figures (book/figures/): present, accessible, readable in light and dark mode, up to date.

``book/figures/draw.py`` generates every SVG and the manifest ``figures.json`` (regenerate with
``python -m book.figures.draw``). These tests check the committed files against the manifest
(well-formed SVG with a <title> and a <desc>, no absolute path or date, sized for a ~700 px column),
the colour rules that keep them readable on white and on near-black pages, and that
regenerating them gives the same bytes, i.e. that nobody changed draw.py without re-running it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIGURES = REPO_ROOT / "book" / "figures"
MANIFEST = FIGURES / "figures.json"
SVG_NS = "{http://www.w3.org/2000/svg}"
# The names the chapters refer to (notebooks/NN_*.ipynb embed them): renaming one breaks a chapter.
REQUIRED = {
    "memory-layer-overview.svg": 0,
    "ffn-as-memory.svg": 1,
    "product-keys.svg": 2,
    "pkm-layer.svg": 3,
    "peer-experts.svg": 4,
    "tucker-retrieval.svg": 5,
    "multicore-scoring.svg": 5,
    "implicit-value-expansion.svg": 5,
    "ultramemv2-block.svg": 6,
    "pre-values.svg": 6,
    "ring-sharing.svg": 6,
    "kernel-tiling.svg": 7,
    "head-to-head-parity.svg": 8,
    "sharded-lookup.svg": 9,
}
DATE = re.compile(r"\b(19|20)\d\d-[01]\d-[0-3]\d\b|<dc:date>")
ABSOLUTE = re.compile(r"(?<![\w.:/])(/home/|/root/|/tmp/|/work/|/Users/|/usr/|/var/|[A-Za-z]:\\\\)")


def load_draw():
    name = "minimem_book_figures_draw"
    spec = importlib.util.spec_from_file_location(name, FIGURES / "draw.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def draw():
    return load_draw()


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def regenerated(draw) -> Path:
    """Every figure and the manifest drawn afresh into a temporary folder (once per module)."""
    with tempfile.TemporaryDirectory() as tmp:
        draw.write_all(Path(tmp))
        yield Path(tmp)


def pinned_matplotlib() -> str | None:
    for line in (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line.lower().startswith("matplotlib=="):
            return line.split("==", 1)[1].strip()
    return None


def test_manifest_entries(manifest):
    assert isinstance(manifest, list) and len(manifest) >= 10
    files = [entry["file"] for entry in manifest]
    assert len(files) == len(set(files)), "duplicate file in figures.json"
    for entry in manifest:
        assert set(entry) == {"file", "chapter", "title", "alt", "caption"}, entry
        assert isinstance(entry["chapter"], int) and 0 <= entry["chapter"] <= 9, entry
        assert re.fullmatch(r"[a-z0-9-]+\.svg", entry["file"]), entry["file"]
        assert (FIGURES / entry["file"]).is_file(), f"{entry['file']} is listed but missing"
        for key in ("title", "alt", "caption"):
            assert entry[key].strip() == entry[key] and entry[key], (entry["file"], key)
        assert len(entry["alt"]) >= 80 and entry["alt"].endswith("."), f"{entry['file']}: alt should be sentences"
    on_disk = {p.name for p in FIGURES.glob("*.svg")}
    assert on_disk == set(files), f"SVGs not in the manifest: {sorted(on_disk - set(files))}"


def test_every_chapter_has_a_figure(manifest):
    chapters = {entry["chapter"] for entry in manifest}
    assert chapters == set(range(10)), f"chapters without a figure: {sorted(set(range(10)) - chapters)}"
    by_file = {entry["file"]: entry["chapter"] for entry in manifest}
    for name, chapter in REQUIRED.items():
        assert by_file.get(name) == chapter, f"{name} must be in the manifest for chapter {chapter}"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_svg_is_well_formed_and_accessible(name, manifest):
    entry = next(e for e in manifest if e["file"] == name)
    text = (FIGURES / name).read_text(encoding="utf-8")
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == f"{SVG_NS}svg"
    assert root.get("role") == "img"
    title, desc = root.find(f"{SVG_NS}title"), root.find(f"{SVG_NS}desc")
    assert title is not None and title.text == entry["title"]
    assert desc is not None and desc.text == entry["alt"]
    assert list(root).index(title) == 0, "<title> must be the first child of <svg>"
    assert root.get("aria-labelledby") == f"{title.get('id')} {desc.get('id')}"
    # sized for a 700-800 px column: 525 pt = 700 CSS px
    width = float(root.get("width").removesuffix("pt"))
    height = float(root.get("height").removesuffix("pt"))
    assert 500 <= width <= 600 and 150 <= height <= 600, (width, height)
    assert not DATE.search(text), "a date in the SVG makes every regeneration a diff"
    assert not ABSOLUTE.search(text), f"absolute path in the SVG: {ABSOLUTE.search(text).group(0)}"
    assert str(REPO_ROOT) not in text and str(Path.home()) not in text


def test_colours_read_on_light_and_dark_pages(draw):
    """WCAG contrast: INK (free text, lines) >= 4:1 and every fill >= 3:1 on white and on dark pages;
    white text on every fill >= 4.5:1."""
    for background in draw.BACKGROUNDS:
        assert draw.contrast(draw.INK, background) >= 4.0, (draw.INK, background)
        for fill in draw.PALETTE:
            assert draw.contrast(fill, background) >= 3.0, (fill, background)
    for fill in draw.PALETTE:
        assert draw.contrast(draw.WHITE, fill) >= 4.5, fill


def test_svgs_use_only_the_checked_colours(draw, manifest):
    """Every fill and stroke in the files is INK, a palette colour or white (white only on fills)."""
    allowed = {draw.INK, draw.WHITE, *draw.PALETTE}
    for entry in manifest:
        text = (FIGURES / entry["file"]).read_text(encoding="utf-8")
        used = set(re.findall(r"(?:fill|stroke): (#[0-9a-f]{6})", text))
        assert used <= allowed, f"{entry['file']}: unchecked colours {sorted(used - allowed)}"


def test_fonts_are_legible(draw, regenerated):
    """No text under MIN_FONT_PT on a canvas of WIDTH_PT = 525 pt (700 px): >= 10 pt at a 700 px column.
    ``svg_bytes`` checks every text of every figure (``Sheet.check``) and raises, so the figures drawn by the
    ``regenerated`` fixture passed it."""
    assert draw.WIDTH_PT == 525 and draw.MIN_FONT_PT >= 10
    assert {p.name for p in regenerated.glob("*.svg")} == {spec.file for spec in draw.FIGURES}
    sheet = draw.Sheet(100)
    sheet.text(10, 10, "too small", fs=draw.MIN_FONT_PT - 1)
    with pytest.raises(ValueError, match="too small"):
        sheet.check("probe")


def test_figures_are_up_to_date(regenerated, draw):
    """Regenerating gives byte-identical files (run `python -m book.figures.draw` after editing draw.py)."""
    pinned = pinned_matplotlib()
    if pinned and matplotlib.__version__ != pinned:
        pytest.skip(f"the files are drawn with matplotlib {pinned} (glyph outlines), not {matplotlib.__version__}")
    if not draw.fonts_are_bundled():
        pytest.skip("DejaVu Sans resolves to a system copy, not matplotlib's bundled one the files were drawn with")
    stale = [
        p.name
        for p in sorted(regenerated.iterdir())
        if not (FIGURES / p.name).is_file() or (FIGURES / p.name).read_bytes() != p.read_bytes()
    ]
    assert not stale, f"out of date, run `python -m book.figures.draw`: {stale}"


def test_regeneration_is_deterministic(draw):
    """The same figure drawn twice in one process gives the same bytes (no date, fixed ids)."""
    spec = next(f for f in draw.FIGURES if f.file == "ring-sharing.svg")
    assert draw.svg_bytes(spec) == draw.svg_bytes(spec)


def test_head_to_head_numbers_match_the_results(draw):
    """The parameter counts drawn in head-to-head-parity.svg are those of results/head2head.json."""
    path = REPO_ROOT / "results" / "head2head.json"
    if not path.is_file():
        pytest.skip("results/head2head.json not present")
    runs = {run["name"]: run["metrics"] for run in json.loads(path.read_text(encoding="utf-8"))["runs"]}
    for parity, models in draw.HEAD2HEAD_PARAMS.items():
        for model, (activated, total) in models.items():
            metrics = runs.get(f"{model}/{parity}/shakespeare") or runs[f"{model}/active/shakespeare"]
            assert round(metrics["params_activated"] / 1e6, 2) == activated, (model, parity)
            assert round(metrics["params_total"] / 1e6, 2) == total, (model, parity)
