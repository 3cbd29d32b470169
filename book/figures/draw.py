"""The course's drawn figures: one SVG per mechanism, generated from this file.

Run from the repository root (either form)::

    python -m book.figures.draw            # writes book/figures/*.svg and book/figures/figures.json
    python book/figures/draw.py --out DIR  # somewhere else (the tests regenerate into a temp dir)

Every figure is plain matplotlib on a transparent canvas, in points: the canvas is ``WIDTH_PT``
(525 pt = 700 CSS px) wide, so at a 700 px column every font is shown at its nominal size, and no
text is smaller than ``MIN_FONT_PT`` (10 pt). The output is deterministic: fixed ``svg.hashsalt``
and ``svg.id``, no date, a fixed creator string, glyphs written as paths from the DejaVu fonts
that matplotlib bundles (so the drawing does not depend on the reader's fonts). Each SVG starts
with a ``<title>`` and a ``<desc>`` (the manifest's title and alt text) and carries
``role="img"``.

Light and dark mode
-------------------
The background is transparent, so the page's colour shows through; every colour must read on
white and on near-black (``#111111``, and the book theme's dark ``#14181e``). Two rules, checked
by ``tests/test_figures.py`` with the WCAG contrast ratio:

* free text, arrows and outlines use one mid grey, ``INK`` (#7a7a7a): about 4.3:1 against white
  and 4.4:1 against #111 (a single colour cannot do better on both at once);
* filled shapes use mid-dark saturated colours (``PALETTE``, relative luminance 0.13-0.17): at
  least 3:1 against both backgrounds (the WCAG minimum for graphics), and text on them is white
  and bold, at least 4.7:1 whatever the page. A short label written in a palette colour on the
  page itself (to tie it to a shape of that colour) is bold and at least 10 pt (3.1:1 or more).

Unselected or background items are drawn in ``INK`` at low opacity with an ``INK`` outline:
visible on both backgrounds, deliberately quiet. In the Jupyter Book (pydata theme) an image
without the ``dark-light`` class gets a white backing and a brightness filter in dark mode;
give these figures ``:class: dark-light`` to show them on the page's own dark background.

The manifest ``figures.json`` (file, chapter, title, alt, caption) is written from ``FIGURES``
below, so the texts and the drawings cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import escape

import matplotlib
from matplotlib import patches
from matplotlib.colors import to_hex, to_rgba
from matplotlib.figure import Figure  # a bare Figure: no pyplot, no GUI backend, no global state
from matplotlib.text import Text

HERE = Path(__file__).resolve().parent
WIDTH_PT = 525.0  # 700 CSS px: nominal font sizes at a 700 px column
MIN_FONT_PT = 10.0
INK = "#7a7a7a"  # free text, arrows, outlines: ~4.3:1 on white and on #111
WHITE = "#ffffff"  # text on PALETTE fills only
BLUE, ORANGE, GREEN, RED = "#2a6fc0", "#b5560f", "#2c7f3b", "#c0392b"
PURPLE, TEAL, GOLD, PINK, GREY = "#7b4fbf", "#137f7a", "#946800", "#b03a78", "#707070"
PALETTE = (BLUE, ORANGE, GREEN, RED, PURPLE, TEAL, GOLD, PINK, GREY)
FAINT = 0.22  # opacity of unselected items (INK fill)
TINT = 0.08  # opacity of container backgrounds
BACKGROUNDS = ("#ffffff", "#111111", "#14181e")  # what the figures are checked against

RC = {
    "svg.fonttype": "path",
    "svg.hashsalt": "minimem-figures",
    "font.family": "DejaVu Sans",
    "mathtext.fontset": "dejavusans",
    "font.size": 11,
    "axes.unicode_minus": True,
    "lines.solid_capstyle": "round",
}
METADATA = {"Date": None, "Creator": "minimem book/figures/draw.py (matplotlib)"}


# ----------------------------------------------------------------------------- colour checks


def luminance(color: str) -> float:
    """WCAG relative luminance of a #rrggbb colour."""
    rgb = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two #rrggbb colours (1 to 21)."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def fonts_are_bundled() -> bool:
    """Whether the DejaVu faces the figures use resolve to matplotlib's own copies (the committed files were
    drawn with those; a system DejaVu of another version would change the glyph outlines)."""
    from matplotlib import font_manager

    data = Path(matplotlib.get_data_path()).resolve()
    faces = [{}, {"weight": "bold"}, {"style": "oblique"}, {"weight": "bold", "style": "oblique"}]
    with matplotlib.rc_context(RC):
        found = [font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", **f)) for f in faces]
    return all(data in Path(path).resolve().parents for path in found)


# ----------------------------------------------------------------------------- drawing primitives


class Sheet:
    """A transparent canvas WIDTH_PT x height points; data coordinates are points, origin bottom left."""

    def __init__(self, height: float):
        self.width, self.height = WIDTH_PT, float(height)
        self.fig = Figure(figsize=(self.width / 72, self.height / 72))
        self.fig.patch.set_alpha(0.0)
        ax = self.fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, self.width)
        ax.set_ylim(0, self.height)
        ax.set_axis_off()
        ax.patch.set_alpha(0.0)
        self.ax = ax

    # -- shapes
    def box(self, x, y, w, h, text=None, color=BLUE, fs=11, radius=3.0, weight="bold", alpha=1.0, lw=1.0, z=2):
        """A filled rounded box; text on it is white and bold."""
        pad = min(radius, w / 4, h / 4)
        p = patches.FancyBboxPatch(
            (x + pad, y + pad),
            w - 2 * pad,
            h - 2 * pad,
            boxstyle=f"round,pad={pad}",
            fc=color,
            ec=color,
            lw=lw,
            alpha=alpha,
            zorder=z,
        )
        self.ax.add_patch(p)
        if text is not None:
            self.text(x + w / 2, y + h / 2, text, fs=fs, color=WHITE, weight=weight, z=z + 1)
        return p

    def frame(self, x, y, w, h, color=INK, label=None, fs=10.5, ls="--", lw=1.1, tint=True, z=0.5, label_pos="tl"):
        """An outlined container (dashed by default) with a faint tint and an optional corner label."""
        if tint:
            self.ax.add_patch(
                patches.FancyBboxPatch(
                    (x, y), w, h, boxstyle="round,pad=0,rounding_size=5", fc=color, ec="none", alpha=TINT, zorder=z
                )
            )
        self.ax.add_patch(
            patches.FancyBboxPatch(
                (x, y), w, h, boxstyle="round,pad=0,rounding_size=5", fc="none", ec=color, lw=lw, ls=ls, zorder=z
            )
        )
        if label:
            if label_pos == "tl":
                self.text(x + 6, y + h - 5, label, fs=fs, ha="left", va="top", color=color, weight="bold")
            elif label_pos == "bl":
                self.text(x + 6, y + 5, label, fs=fs, ha="left", va="bottom", color=color, weight="bold")
            elif label_pos == "tr":
                self.text(x + w - 6, y + h - 5, label, fs=fs, ha="right", va="top", color=color, weight="bold")

    def rect(self, x, y, w, h, fc="none", ec=INK, lw=0.8, alpha=1.0, z=1, ls="-"):
        r = patches.Rectangle((x, y), w, h, fc=fc, ec=ec, lw=lw, alpha=alpha, zorder=z, ls=ls)
        self.ax.add_patch(r)
        return r

    def cell(self, x, y, w, h, color=None, lw=0.6, z=1):
        """One cell of a table or vector: a palette fill, or a faint INK fill (color=None)."""
        if color is None:  # one patch: translucent fill, opaque outline
            self.rect(x, y, w, h, fc=to_rgba(INK, FAINT), ec=INK, lw=lw, alpha=None, z=z)
        else:  # a hairline gap between neighbouring cells shows whatever the page's background is
            g = min(0.6, w / 8, h / 8)
            self.rect(x + g, y + g, w - 2 * g, h - 2 * g, fc=color, ec="none", z=z + 0.2)

    def vector(self, x, y, n, size, colors=None, vertical=False, gap=0.0):
        """n cells from (x, y) rightwards (or downwards if vertical); colors: list of None/palette."""
        colors = colors or [None] * n
        for k in range(n):
            if vertical:
                self.cell(x, y - (k + 1) * size - k * gap, size, size, colors[k])
            else:
                self.cell(x + k * (size + gap), y, size, size, colors[k])

    def circle(self, x, y, r, color=INK, fill=False, lw=1.2, z=3):
        self.ax.add_patch(
            patches.Circle((x, y), r, fc=color if fill else "none", ec=color, lw=lw, zorder=z),
        )

    def plus(self, x, y, r=7, color=INK, lw=1.3, z=4):
        """A summation node: a circle with a plus."""
        self.circle(x, y, r, color=color, lw=lw, z=z)
        self.line([x - r * 0.6, x + r * 0.6], [y, y], color=color, lw=lw, z=z)
        self.line([x, x], [y - r * 0.6, y + r * 0.6], color=color, lw=lw, z=z)

    def times(self, x, y, r=7, color=INK, lw=1.3, z=4):
        """A product node: a circle with a cross."""
        self.circle(x, y, r, color=color, lw=lw, z=z)
        d = r * 0.45
        self.line([x - d, x + d], [y - d, y + d], color=color, lw=lw, z=z)
        self.line([x - d, x + d], [y + d, y - d], color=color, lw=lw, z=z)

    def line(self, xs, ys, color=INK, lw=1.3, ls="-", z=1.5, alpha=1.0):
        self.ax.plot(xs, ys, color=color, lw=lw, ls=ls, zorder=z, alpha=alpha, solid_capstyle="round")

    def arrow(self, x1, y1, x2, y2, color=INK, lw=1.4, ls="-", rad=0.0, head=9, z=2.5, shrink=0.0, style="-|>"):
        a = patches.FancyArrowPatch(
            (x1, y1),
            (x2, y2),
            arrowstyle=style,
            mutation_scale=head,
            color=color,
            lw=lw,
            ls=ls,
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=shrink,
            shrinkB=shrink,
            zorder=z,
        )
        self.ax.add_patch(a)
        return a

    def path_arrow(self, points, color=INK, lw=1.4, head=9, ls="-", z=2.5):
        """A polyline through ``points`` with an arrow head at the end."""
        xs, ys = zip(*points)
        if len(points) > 2:
            self.line(xs[:-1], ys[:-1], color=color, lw=lw, ls=ls, z=z)
        self.arrow(*points[-2], *points[-1], color=color, lw=lw, head=head, ls=ls, z=z)

    def brace(self, x1, y1, x2, y2, color=INK, lw=1.1, tick=4.0):
        """A bracket from (x1, y1) to (x2, y2) with end ticks (perpendicular, towards the left/bottom)."""
        self.line([x1, x2], [y1, y2], color=color, lw=lw)
        dx, dy = x2 - x1, y2 - y1
        length = math.hypot(dx, dy)
        nx, ny = dy / length * tick, -dx / length * tick
        self.line([x1, x1 + nx], [y1, y1 + ny], color=color, lw=lw)
        self.line([x2, x2 + nx], [y2, y2 + ny], color=color, lw=lw)

    # -- text
    def text(self, x, y, s, fs=11, color=INK, ha="center", va="center", weight="normal", z=5, rotation=0, **kw):
        return self.ax.text(
            x, y, s, fontsize=fs, color=color, ha=ha, va=va, weight=weight, zorder=z, rotation=rotation, **kw
        )

    def title(self, x, y, s, fs=12, ha="left"):
        return self.text(x, y, s, fs=fs, ha=ha, va="top", weight="bold")

    # -- output
    def check(self, name: str) -> None:
        for t in self.fig.findobj(Text):
            if not (t.get_visible() and t.get_text()):
                continue
            if t.get_fontsize() < MIN_FONT_PT:
                raise ValueError(f"{name}: text {t.get_text()!r} is {t.get_fontsize()} pt < {MIN_FONT_PT} pt")
            if to_hex(t.get_color()) in PALETTE and t.get_weight() not in ("bold", 700):
                raise ValueError(f"{name}: text {t.get_text()!r} in a palette colour must be bold")


# ----------------------------------------------------------------------------- the figures


@dataclass(frozen=True)
class FigureSpec:
    file: str
    chapter: int
    title: str
    alt: str
    caption: str
    draw: Callable[[], Sheet]


def fig_memory_overview() -> Sheet:
    s = Sheet(318)
    # left: one pre-norm block, FFN and memory side by side on the same normalised input h
    s.frame(8, 40, 212, 270, label="block (one of $L$)", label_pos="tr")
    sx = 30  # the residual stream
    s.arrow(sx, 30, sx, 318, lw=2.0, head=11)
    s.text(sx - 12, 150, "residual stream $x$", rotation=90, fs=10.5)
    # attention
    s.path_arrow([(sx, 72), (58, 72)])
    s.box(58, 62, 52, 20, "Norm", GREY, fs=10)
    s.arrow(84, 82, 84, 94)
    s.box(58, 94, 150, 24, "Attention", BLUE)
    s.path_arrow([(58, 106), (sx + 7, 106)])
    s.plus(sx, 106)
    # FFN and memory read the same h; their outputs are added together
    s.path_arrow([(sx, 140), (58, 140)])
    s.box(58, 130, 52, 20, "Norm", GREY, fs=10)
    s.text(118, 140, "$h$", ha="left", fs=12)
    s.line([84, 84], [150, 162])
    s.line([84, 172], [162, 162])
    s.arrow(84, 162, 84, 178)
    s.arrow(172, 162, 172, 178)
    s.box(50, 178, 68, 36, "FFN", GREEN)
    s.box(130, 178, 84, 36, "memory\nlayer", ORANGE, fs=11)
    s.line([84, 84], [214, 244])
    s.line([172, 172], [214, 244])
    s.line([84, 121], [244, 244])
    s.line([172, 135], [244, 244])
    s.plus(128, 244)
    s.path_arrow([(121, 244), (sx + 7, 244)])
    s.plus(sx, 244)
    s.text(122, 272, "$x \\leftarrow x + \\mathrm{FFN}(h) + \\mathrm{Mem}(h)$", fs=10.5)
    s.text(114, 18, "PKM, PEER: the memory replaces\nthe FFN of one block instead", fs=10)
    # right: the memory layer, zoomed
    s.line([214, 246], [214, 310], lw=0.9, ls=":")
    s.line([214, 246], [178, 40], lw=0.9, ls=":")
    s.frame(246, 40, 272, 270, color=ORANGE, label="memory layer", fs=11)
    s.text(262, 270, "$h$", fs=12)
    s.arrow(262, 260, 262, 242)
    s.box(252, 214, 96, 28, "query $q$", BLUE)
    s.text(300, 203, "$q = \\mathrm{Norm}(W_q h)$", fs=10.5)
    s.arrow(300, 193, 300, 176)
    s.box(252, 138, 96, 38, "product-key\nsearch: top-$m$", PURPLE, fs=10.5)
    s.text(300, 126, "$2n$ sub-keys,\n$n = \\sqrt{N}$", fs=10.5, va="top")
    # the value table: N rows, m of them selected
    rows, top, x0, wt = 24, 272, 378, 56
    rh = 8.0
    chosen = {3: "$w_1$", 9: "$w_2$", 14: "$w_3$", 20: "$w_4$"}
    for k in range(rows):
        y = top - (k + 1) * rh
        s.cell(x0, y, wt, rh - 1.2, ORANGE if k in chosen else None)
        if k in chosen:
            s.arrow(348, 157, x0 - 2, y + rh / 2 - 0.6, lw=1.1, head=7, color=ORANGE)
            s.arrow(x0 + wt + 2, y + rh / 2 - 0.6, 482, 170, lw=1.1, head=7, color=ORANGE)
            s.text(x0 + wt + 5, y + rh / 2 + 2, chosen[k], fs=10, ha="left", va="bottom", color=ORANGE, weight="bold")
    s.text(x0 + wt / 2, top + 11, "values $V$", fs=11)
    s.brace(x0 - 8, top - rows * rh, x0 - 8, top - 1, tick=-3)
    s.text(x0 - 14, 255, "$N$ rows", fs=10.5, ha="right")
    s.text(x0 + wt / 2, top - rows * rh - 6, "$D_v$ wide", fs=10.5, va="top")
    s.plus(490, 170, r=8)
    s.arrow(490, 162, 490, 112)
    s.text(484, 108, "output\n$\\sum_i w_i V[\\mathrm{idx}_i]$", fs=10.5, va="top")
    s.text(382, 18, "parameters grow with $N$, compute with $m$", fs=10.5)
    return s


def fig_ffn_as_memory() -> Sheet:
    s = Sheet(380)
    # top: the dense SwiGLU FFN read as a key-value memory with d_ff slots
    s.frame(6, 200, 513, 176, label=r"FFN: a key-value memory of $d_{ff}$ slots, all read by every token")
    h, d, c = 6, 10, 9.0  # drawn model width, drawn d_ff, cell size
    cy = 294  # vertical centre of the row
    slot = 6  # the highlighted slot i
    top = cy + d * c / 2
    s.vector(16, cy + h * c / 2, h, c, vertical=True, colors=[BLUE] * h, gap=1)
    s.text(20, cy - h * c / 2 - 12, "$x$", fs=12, va="top")
    s.arrow(32, cy, 54, cy)
    for r in range(d):  # keys: rows of W1 (d_ff x h)
        for k in range(h):
            s.cell(58 + k * c, top - (r + 1) * c, c, c, GREEN if r == slot else None)
    s.text(58 + h * c / 2, top + 6, r"$W_1$  ($W_3$)", fs=10.5, va="bottom")
    s.text(58 + h * c + 4, top - (slot + 0.5) * c, "$k_i$", fs=10.5, ha="left", color=GREEN, weight="bold")
    s.arrow(130, cy, 156, cy)
    mags = [0.5, 0.9, 0.2, 0.7, 0.35, 0.6, 1.0, 0.3, 0.8, 0.45]
    for r in range(d):  # the memory coefficients m_i(x): one per slot, all computed
        y = top - (r + 1) * c
        s.rect(160, y + 1, 26 * mags[r], c - 2, fc=BLUE, ec=BLUE, lw=0.5, z=1.2)
    s.line([160, 160], [top - d * c, top], lw=1.0)
    s.text(170, top + 6, "$m_i(x)$", fs=10.5, va="bottom")
    s.arrow(202, cy, 228, cy)
    for r in range(h):  # values: columns of W2 (h x d_ff)
        for k in range(d):
            s.cell(232 + k * c, cy + h * c / 2 - (r + 1) * c, c, c, ORANGE if k == slot else None)
    s.text(232 + d * c / 2, cy + h * c / 2 + 6, "$W_2$", fs=10.5, va="bottom")
    s.text(232 + (slot + 0.5) * c, cy - h * c / 2 - 4, "$v_i$", fs=10.5, va="top", color=ORANGE, weight="bold")
    s.arrow(326, cy, 348, cy)
    s.vector(352, cy + h * c / 2, h, c, vertical=True, colors=[GREEN] * h, gap=1)
    s.text(356, cy - h * c / 2 - 12, "FFN$(x)$", fs=11, va="top")
    s.text(
        370,
        cy + 4,
        "keys $k_i$ = rows of $W_1$\ngates $g_i$ = rows of $W_3$\nvalues $v_i$ = columns of $W_2$",
        fs=10.5,
        linespacing=1.5,
        ha="left",
    )
    s.text(
        262,
        222,
        r"$\mathrm{FFN}(x) = \sum_{i=1}^{d_{ff}} m_i(x)\, v_i, \quad "
        r"m_i(x) = \mathrm{silu}(\langle k_i, x\rangle)\,\langle g_i, x\rangle$",
        fs=11,
    )
    # bottom: a mixture of experts reads k of E blocks of slots
    s.frame(6, 4, 513, 188, label=r"mixture of experts: the router picks top-$k$ of $E$ experts")
    E, k_top = 8, (2, 5)
    cy = 88
    s.vector(26, cy + h * c / 2, h, c, vertical=True, colors=[BLUE] * h, gap=1)
    s.text(30, cy - h * c / 2 - 12, "$x$", fs=12, va="top")
    s.arrow(42, cy, 60, cy)
    s.box(60, cy - 17, 60, 34, "router\n$W_r$", TEAL, fs=10.5)
    s.arrow(120, cy, 136, cy)
    probs = [0.08, 0.1, 0.27, 0.05, 0.07, 0.22, 0.13, 0.08]
    x0, ew = 204, 12
    for e in range(E):  # softmax probabilities p_e(x), then the experts (small SwiGLUs of d slots)
        y = cy + E * 7 - (e + 1) * 14 + 2
        chosen = e in k_top
        s.rect(
            140,
            y,
            110 * probs[e],
            10,
            fc=TEAL if chosen else INK,
            ec=TEAL if chosen else INK,
            lw=0.6,
            alpha=1.0 if chosen else FAINT,
            z=1.2,
        )
        if chosen:
            s.text(
                140 + 110 * probs[e] + 3,
                y + 12,
                f"$p_{e + 1}$",
                fs=10,
                ha="left",
                va="bottom",
                color=TEAL,
                weight="bold",
            )
            s.box(x0, y - 1, ew * 6, 12, None, GREEN, radius=2)
            s.text(x0 + ew * 3, y + 5, f"FFN$_{e + 1}$", fs=10, color=WHITE, weight="bold")
            s.arrow(140 + 110 * probs[e] + 3, y + 5, x0 - 2, y + 5, color=TEAL, lw=1.2, head=7)
            s.arrow(x0 + ew * 6 + 2, y + 5, 292, cy, color=GREEN, lw=1.2, head=7)
        else:
            for j in range(6):
                s.cell(x0 + j * ew, y, ew, 10)
    s.text(160, cy - E * 7 - 4, "softmax $p(x)$", fs=10.5, va="top")
    s.text(x0 + ew * 3, cy + E * 7 + 10, r"$E$ experts, $d$ slots each", fs=10.5, va="bottom")
    s.plus(298, cy, r=7)
    s.arrow(305, cy, 322, cy)
    s.text(
        420,
        cy + 30,
        r"$\mathrm{MoE}(x) = \sum_{e \in \mathrm{top}\text{-}k} p_e(x)\,\mathrm{FFN}_e(x)$",
        fs=10.5,
    )
    s.text(
        420,
        cy - 22,
        "a token reads $k\\,d$ of the $E\\,d$ slots\n(drawn: $k = 2$ of $E = 8$;\nOLMoE: $k = 8$ of $E = 64$)",
        fs=10.5,
        linespacing=1.4,
    )
    return s


def _product_key_example(n: int, m: int):
    """Fixed sub-key scores for the product-key figure and the exact top-m (ties: row rank, then column rank)."""
    s1 = [0.1, 2.3, -0.5, 0.4, 1.9, -1.2, 0.0, 2.8, -0.3, 0.6, 1.5, -0.8][:n]
    s2 = [-0.4, 0.3, 2.1, -1.0, 0.5, 1.2, -0.2, 0.9, 2.6, 0.1, -0.6, 0.7][:n]
    rows = sorted(range(n), key=lambda i: (-s1[i], i))[:m]
    cols = sorted(range(n), key=lambda j: (-s2[j], j))[:m]
    block = [(a, b) for a in range(m) for b in range(m)]
    block.sort(key=lambda ab: (-(s1[rows[ab[0]]] + s2[cols[ab[1]]]), ab[0], ab[1]))
    best = block[:m]
    brute = sorted(((i, j) for i in range(n) for j in range(n)), key=lambda ij: -(s1[ij[0]] + s2[ij[1]]))[:m]
    assert {(rows[a], cols[b]) for a, b in best} == set(brute), "the drawn top-m must equal brute force"
    return s1, s2, rows, cols, best


def fig_product_keys() -> Sheet:
    s = Sheet(270)
    n, m, c = 12, 4, 14.0
    s1, s2, rows, cols, best = _product_key_example(n, m)
    lo = min(s1) + min(s2)
    hi = max(s1) + max(s2)
    gx, gy = 62, 44  # grid bottom left
    top = gy + n * c
    # the query halves and their sub-key scores
    s.text(4, top + 32, "$q = [q_1; q_2]$", fs=11, ha="left")
    for i in range(n):  # s1 down the left
        y = top - (i + 1) * c
        s.cell(gx - c - 6, y, c, c, BLUE if i in rows else None)
    for j in range(n):  # s2 along the top
        s.cell(gx + j * c, top + 6, c, c, ORANGE if j in cols else None)
    s.text(
        gx - c - 6,
        gy - 6,
        r"$s_1[i] = \langle q_1, K_1[i]\rangle$",
        fs=10.5,
        va="top",
        ha="left",
        color=BLUE,
        weight="bold",
    )
    s.text(
        gx + n * c / 2 + 20,
        top + 24,
        r"$s_2[j] = \langle q_2, K_2[j]\rangle$",
        fs=10.5,
        va="bottom",
        color=ORANGE,
        weight="bold",
    )
    # the n x n grid: shade = score, candidate rows and columns, the m x m block, the top-m
    chosen = {(rows[a], cols[b]) for a, b in best}
    for i in range(n):
        for j in range(n):
            x, y = gx + j * c, top - (i + 1) * c
            v = (s1[i] + s2[j] - lo) / (hi - lo)
            if i in rows and j in cols:
                s.rect(x, y, c, c, fc=PURPLE, ec=PURPLE, lw=0.5, z=1.3)
            else:
                s.rect(x, y, c, c, fc=INK, ec="none", alpha=0.05 + 0.4 * v, z=1)
                s.rect(x, y, c, c, fc="none", ec=INK, lw=0.3, alpha=0.6, z=1.1)
            if (i, j) in chosen:
                s.circle(x + c / 2, y + c / 2, 3.6, color=WHITE, fill=True, lw=0.5, z=4)
    for i in rows:
        s.rect(gx, top - (i + 1) * c, n * c, c, fc="none", ec=BLUE, lw=1.4, z=3)
    for j in cols:
        s.rect(gx + j * c, gy, c, n * c, fc="none", ec=ORANGE, lw=1.4, z=3)
    s.text(gx + n * c / 2, gy - 24, r"$n \times n$ grid, $N = n^2$ slots", fs=10.5, va="top")
    # right: the candidate block with rows and columns sorted by rank, and the staircase
    bx, by, bc = 352, 104, 30.0
    btop = by + m * bc
    s.text(bx + m * bc / 2 - 4, btop + 34, r"$m \times m$ candidates, sorted by rank", fs=11, weight="bold")
    for a in range(m):
        s.text(bx - 6, btop - (a + 0.5) * bc, f"$a={a}$", fs=10, ha="right", color=BLUE, weight="bold")
        for b in range(m):
            x, y = bx + b * bc, btop - (a + 1) * bc
            stair = (a + 1) * (b + 1) <= m
            s.rect(x, y, bc, bc, fc=PURPLE, ec=WHITE if stair else PURPLE, lw=0.8, alpha=1.0 if stair else 0.45, z=1.3)
            if (a, b) in best:
                s.circle(x + bc / 2, y + bc / 2, 5.5, color=WHITE, fill=True, lw=0.5, z=4)
    for b in range(m):
        s.text(bx + (b + 0.5) * bc, btop + 6, f"$b={b}$", fs=10, color=ORANGE, va="bottom", weight="bold")
    stair = [(0, m)]  # outline of the cells with (a + 1)(b + 1) <= m
    for a in range(m):
        width = m // (a + 1)
        stair += [(width, m - a), (width, m - a - 1)]
    stair.append((0, 0))
    xs = [bx + b * bc for b, _ in stair] + [bx]
    ys = [by + a * bc for _, a in stair] + [by + m * bc]
    s.line(xs, ys, color=GOLD, lw=2.4, z=3.5)
    s.text(bx + m * bc / 2, by - 6, r"staircase $(a{+}1)(b{+}1) \leq m$", fs=10.5, va="top", color=GOLD, weight="bold")
    s.text(bx + m * bc + 8, by + m * bc / 2, "dots:\nthe\ntop-$m$", fs=10.5, ha="left", linespacing=1.3)
    s.arrow(gx + n * c + 8, top - 3.5 * c, bx - 44, btop - 24, rad=-0.2, lw=1.2)
    s.text(
        404,
        6,
        "$s(i, j) = s_1[i] + s_2[j]$: $2n$ sub-key\n"
        "scores and $m^2$ sums, not $N = n^2$ scores\n"
        f"(drawn: $n = {n}$, $m = {m}$)",
        fs=10.5,
        va="bottom",
        linespacing=1.45,
    )
    return s


def fig_pkm_layer() -> Sheet:
    s = Sheet(300)
    # one head of the router, drawn with the shadows of the other H - 1 heads behind it
    for k in (2, 1):
        s.frame(70 + 5 * k, 150 + 5 * k, 440, 126, color=INK, tint=False, ls="-", lw=0.8)
    s.frame(70, 150, 440, 126, color=PURPLE, label="head $k$ (of $H$): own $W_q^{(k)}$, $K_1^{(k)}$, $K_2^{(k)}$")
    cy = 214
    s.text(22, cy, "$x$", fs=13)
    s.text(22, cy - 16, r"$\in\mathbb{R}^h$", fs=10)
    s.arrow(32, cy, 80, cy)
    s.box(80, cy - 16, 50, 32, "$W_q^{(k)}$", BLUE)
    s.arrow(130, cy, 142, cy)
    s.box(142, cy - 16, 54, 32, "Norm", GREY)
    s.text(169, cy - 24, "BatchNorm [PKM]\nor LayerNorm", fs=10, va="top")
    s.arrow(196, cy, 208, cy)
    s.vector(210, cy + 10, 4, 10, colors=[BLUE] * 4)
    s.vector(250, cy + 10, 4, 10, colors=[ORANGE] * 4)
    s.text(230, cy + 24, "$q_1$", fs=10.5, va="bottom", color=BLUE, weight="bold")
    s.text(270, cy + 24, "$q_2$", fs=10.5, va="bottom", color=ORANGE, weight="bold")
    s.text(250, cy - 8, r"$q^{(k)} \in \mathbb{R}^{D_k}$", fs=10.5, va="top")
    s.arrow(292, cy, 304, cy)
    s.box(304, cy - 22, 92, 44, "product keys\ntop-$m$", PURPLE, fs=10.5)
    s.text(350, cy - 30, "$K_1, K_2$: $n \\times D_k/2$", fs=10, va="top")
    s.arrow(396, cy, 408, cy)
    s.box(408, cy - 16, 60, 32, "softmax", TEAL, fs=10.5)
    s.arrow(468, cy, 482, cy)
    s.text(496, cy + 8, "$w^{(k)}$", fs=11)
    s.text(496, cy - 10, r"$\mathcal{I}^{(k)}$", fs=11)
    # the value table shared by the heads
    s.path_arrow([(496, cy - 22), (496, 140), (330, 140), (330, 128)], lw=1.3)
    rows, top, x0, wt, rh = 15, 126, 298, 64, 7.6
    picks = {1: ORANGE, 4: ORANGE, 8: ORANGE, 12: ORANGE, 3: GREEN, 6: GREEN, 10: GREEN, 13: GREEN}
    for r in range(rows):
        y = top - (r + 1) * rh
        s.cell(x0, y, wt, rh - 1.2, picks.get(r))
        if r in picks:
            s.arrow(x0 - 2, y + rh / 2 - 0.6, 244, 70, color=picks[r], lw=1.0, head=6)
    s.text(
        x0 + wt + 8,
        top - 10,
        "values $V$: $N \\times D_v$,\none table shared by\nall heads",
        fs=10.5,
        ha="left",
        va="top",
    )
    s.text(
        x0 + wt + 8, 30, "head $k$'s $m$ rows $\\mathcal{I}^{(k)}$\n(two heads drawn)", fs=10.5, ha="left", va="bottom"
    )
    s.plus(236, 70, r=8)
    s.arrow(228, 70, 160, 70)
    s.text(
        86,
        70,
        r"$\mathrm{PKM}(x) = \sum_{k=1}^{H} \sum_{\ell=1}^{m} w^{(k)}_\ell \, V[\mathcal{I}^{(k)}_\ell]$",
        fs=11,
    )
    s.text(86, 44, r"$\in \mathbb{R}^{D_v}$", fs=10.5)
    return s


def fig_peer_experts() -> Sheet:
    s = Sheet(300)
    cy = 196
    s.vector(10, cy + 27, 6, 9, vertical=True, colors=[BLUE] * 6, gap=1)
    s.text(15, cy - 38, "$x$", fs=12)
    s.arrow(24, cy, 40, cy)
    s.box(40, cy - 30, 84, 60, "product-key\nrouter\n($H$ heads)", PURPLE, fs=10.5)
    s.text(82, cy - 38, "as in PKM:\ntop-$m$ per head,\nsoftmax weights $w$", fs=10, va="top")
    # the two tables: down vectors u_i and up vectors v_i, N rows each
    rows, top, rh = 18, 276, 8.0
    picks = {2: ORANGE, 7: ORANGE, 13: ORANGE, 4: GREEN, 10: GREEN, 15: GREEN}
    for name, x0, label in (("U", 152, "down $u_i$"), ("V", 214, "up $v_i$")):
        for r in range(rows):
            y = top - (r + 1) * rh
            s.cell(x0, y, 48, rh - 1.2, picks.get(r))
        s.text(x0 + 24, top + 4, label, fs=10.5, va="bottom")
        s.text(x0 + 24, top - rows * rh - 6, f"${name}$: $N \\times h$", fs=10.5, va="top")
    for r, col in picks.items():
        y = top - (r + 0.5) * rh - 0.6
        s.arrow(124, cy, 150, y, color=col, lw=1.0, head=6)
    s.text(186, top - rows * rh - 24, "same rows $\\mathcal{I}$ in both", fs=10.5, va="top")
    # one singleton expert, drawn as a neural network with a single hidden unit
    s.frame(282, 112, 236, 184, color=ORANGE, label="expert $i$: one hidden neuron")
    r_in = [268, 252, 236, 220, 204, 188]
    s.line([262, 282], [top - 2.5 * rh, 262], color=ORANGE, lw=0.9, ls=":")
    for y in r_in:
        s.circle(306, y - 30, 5.5, color=BLUE, fill=True, lw=0.8)
        s.line([312, 388], [y - 30, 198], color=ORANGE, lw=1.0)
        s.circle(478, y - 30, 5.5, color=GREEN, fill=True, lw=0.8)
        s.line([402, 472], [198, y - 30], color=ORANGE, lw=1.0)
    s.circle(395, 198, 10, color=ORANGE, fill=True)
    s.text(395, 198, r"$\sigma$", fs=12, color=WHITE, weight="bold")
    s.text(306, 140, "$x$", fs=11)
    s.text(350, 242, "$u_i$", fs=11, color=ORANGE, weight="bold")
    s.text(440, 242, "$v_i$", fs=11, color=ORANGE, weight="bold")
    s.text(478, 140, "$e_i(x)$", fs=11)
    s.text(395, 124, r"$e_i(x) = \sigma(\langle u_i, x\rangle)\, v_i$,  $\sigma$ = GELU", fs=10.5)
    # the sum over heads and selected experts
    s.text(
        262,
        58,
        r"$\mathrm{PEER}(x) = \sum_{k=1}^{H}\, \sum_{\ell=1}^{m} w^{(k)}_\ell\;"
        r"\sigma(\langle u_{\mathcal{I}^{(k)}_\ell}, x\rangle)\; v_{\mathcal{I}^{(k)}_\ell}$",
        fs=11.5,
    )
    s.text(
        262,
        22,
        "$H m$ experts of $2h$ numbers run per token, retrieved from a pool of $N = n^2$ (over a million in [PEER]);\n"
        "drawn: 2 heads (orange, green) of $m = 3$",
        fs=10,
        linespacing=1.4,
    )
    return s


def _tucker_example(n: int, r: int, m: int):
    """Fixed row/column scores and a positive core; TDQKR's candidate search and the exact top-m."""
    import numpy as np

    rng = np.random.default_rng(22)  # a seed where the search misses one of the exact top-3
    s_row = np.round(rng.normal(size=(r, n)), 2)
    s_col = np.round(rng.normal(size=(r, n)), 2)
    core = np.round(rng.uniform(size=(r, r)), 2)
    u, sig, vt = np.linalg.svd(core)
    u1, t1 = u[:, 0], vt[0]
    if u1[np.argmax(np.abs(u1))] < 0:  # minimem's sign rule: the largest |entry| of u is positive
        u1, t1 = -u1, -t1
    alpha, beta = u1 @ s_row, t1 @ s_col
    rows = sorted(range(n), key=lambda i: (-alpha[i], i))[:m]
    cols = sorted(range(n), key=lambda j: (-beta[j], j))[:m]
    grid = s_row.T @ core @ s_col
    cand = sorted(((i, j) for i in rows for j in cols), key=lambda ij: -grid[ij])[:m]
    exact = sorted(((i, j) for i in range(n) for j in range(n)), key=lambda ij: -grid[ij])[:m]
    return grid, alpha, beta, rows, cols, cand, exact


def fig_tucker_retrieval() -> Sheet:
    s = Sheet(258)
    n, r, m, c = 10, 2, 3, 12.0
    grid, alpha, beta, rows, cols, cand, exact = _tucker_example(n, r, m)
    lo, hi = grid.min(), grid.max()
    # left: the Tucker form of the score grid
    gx, gy = 84, 62
    top = gy + n * c
    s.title(6, 254, "score: $S_\\mathrm{grid} = S_\\mathrm{row}^\\top\\, C\\, S_\\mathrm{col}$", fs=11.5)
    for i in range(n):
        for a in range(r):
            s.cell(gx - (r - a) * c - 6, top - (i + 1) * c, c, c, BLUE)
    for b in range(r):
        for j in range(n):
            s.cell(gx + j * c, top + 6 + (r - 1 - b) * c, c, c, ORANGE)
    for a in range(r):
        for b in range(r):
            s.cell(gx - (r - a) * c - 6, top + 6 + (r - 1 - b) * c, c, c, PURPLE)
    for i in range(n):
        for j in range(n):
            v = (grid[i, j] - lo) / (hi - lo)
            x, y = gx + j * c, top - (i + 1) * c
            s.rect(x, y, c, c, fc=INK, ec="none", alpha=0.05 + 0.45 * v, z=1)
            s.rect(x, y, c, c, fc="none", ec=INK, lw=0.3, alpha=0.6, z=1.1)
    s.text(gx - r * c - 12, top + 6 + c, "$C$: $r \\times r$", fs=10.5, ha="right", color=PURPLE, weight="bold")
    s.text(
        gx - r * c - 12,
        top - n * c / 2,
        "$S_\\mathrm{row}^\\top$\n$n \\times r$",
        fs=10.5,
        ha="right",
        color=BLUE,
        weight="bold",
    )
    s.text(
        gx + n * c / 2,
        top + 6 + r * c + 4,
        "$S_\\mathrm{col}$: $r \\times n$",
        fs=10.5,
        va="bottom",
        color=ORANGE,
        weight="bold",
    )
    s.text(
        gx + n * c / 2 - 12,
        gy - 8,
        "$S_\\mathrm{grid}[i, j] = \\sum_{a, b} S_\\mathrm{row}[a, i]\\,C[a, b]\\, S_\\mathrm{col}[b, j]$",
        fs=10.5,
        va="top",
    )
    s.text(6, 6, f"drawn: $n = {n}$, $r = {r}$, $m = {m}$", fs=10, ha="left", va="bottom")
    # right: candidates from the rank-1 approximation, exact rescoring
    hx, hy = 300, 62
    htop = hy + n * c
    s.title(262, 254, "search: rank-1 candidates", fs=11.5)
    s.text(
        hx + n * c + 10,
        htop + 4,
        "$C \\approx \\sigma\\, u\\, t^\\top$\n(rank-1 SVD)\n\n"
        "$\\alpha = u^\\top S_\\mathrm{row}$\n$\\beta = t^\\top S_\\mathrm{col}$",
        fs=10.5,
        ha="left",
        va="top",
        linespacing=1.35,
    )
    for i in range(n):
        s.cell(hx - c - 6, htop - (i + 1) * c, c, c, BLUE if i in rows else None)
    for j in range(n):
        s.cell(hx + j * c, htop + 6, c, c, ORANGE if j in cols else None)
    s.text(hx - c - 10, htop - n * c / 2, "$\\alpha$", fs=12, ha="right", color=BLUE, weight="bold")
    s.text(hx + n * c / 2, htop + 6 + c + 4, "$\\beta$", fs=12, va="bottom", color=ORANGE, weight="bold")
    for i in range(n):
        for j in range(n):
            x, y = hx + j * c, htop - (i + 1) * c
            if i in rows and j in cols:
                s.rect(x, y, c, c, fc=PURPLE, ec="none", z=1.3)
            else:
                s.rect(x, y, c, c, fc=INK, ec="none", alpha=FAINT * 0.6, z=1)
            s.rect(x, y, c, c, fc="none", ec=INK, lw=0.3, alpha=0.6, z=1.4)
            if (i, j) in cand:
                s.circle(x + c / 2, y + c / 2, 3.2, color=WHITE, fill=True, lw=0.5, z=4)
            if (i, j) in exact and (i, j) not in cand:
                s.circle(x + c / 2, y + c / 2, 4.4, color=RED, lw=1.8, z=4)
    s.text(
        hx + n * c / 2 + 20,
        hy - 8,
        "purple: top-$m$ of $\\alpha$ $\\times$ top-$m$ of $\\beta$,\nrescored with the full $C$; dots: their top-$m$",
        fs=10.5,
        va="top",
        linespacing=1.3,
    )
    if any(ij not in cand for ij in exact):
        s.circle(268, 12, 4.4, color=RED, lw=1.8)
        s.text(278, 12, "an exact top-$m$ slot the search missed", fs=10.5, ha="left", color=RED, weight="bold")
    return s


def fig_multicore_scoring() -> Sheet:
    s = Sheet(270)
    c = 12.0
    # cores: selection by their sum
    for k, (col, x0) in enumerate(((BLUE, 20), (ORANGE, 68))):
        for a in range(2):
            for b in range(2):
                s.cell(x0 + b * c, 240 - a * c, c, c, col)
        s.text(x0 + c, 256, f"$C^{{({k + 1})}}$", fs=11, va="bottom", color=col, weight="bold")
    s.text(56, 240, "+", fs=14)
    s.text(104, 240, "=", fs=14)
    for a in range(2):
        for b in range(2):
            s.cell(116 + b * c, 240 - a * c, c, c, PURPLE)
    s.text(116 + c, 256, "$C$", fs=11, va="bottom", color=PURPLE, weight="bold")
    s.arrow(146, 240, 166, 240)
    s.text(
        170, 240, "TDQKR with the summed core $C$ selects the top-$m$ slots $(i_\\ell, j_\\ell)$", fs=10.5, ha="left"
    )
    # each core's own score at the chosen slots
    m, rh = 3, 24
    ys = [150 - ell * rh for ell in range(m)]
    s.text(14, 190, "each core's own score at the chosen slots:", fs=10.5, ha="left")
    for ell, y in enumerate(ys):
        s.text(40, y + 9, f"$\\ell = {ell + 1}$", fs=10.5, ha="right")
        s.box(46, y, 46, 18, f"$S^{{(1)}}_{ell + 1}$", BLUE, fs=10.5, radius=2)
        s.box(98, y, 46, 18, f"$S^{{(2)}}_{ell + 1}$", ORANGE, fs=10.5, radius=2)
    s.text(
        14,
        64,
        r"$S^{(k)}_\ell = S_\mathrm{row}[:, i_\ell]^\top\, C^{(k)}\, S_\mathrm{col}[:, j_\ell]$",
        fs=10.5,
        ha="left",
    )
    # value rows: slice k weighted by core k's score
    vx, cw, dv = 250, 14.0, 8
    half = dv // 2 * cw
    s.brace(vx, ys[0] + 26, vx + half - 2, ys[0] + 26, tick=-4, color=BLUE)
    s.brace(vx + half + 2, ys[0] + 26, vx + 2 * half, ys[0] + 26, tick=-4, color=ORANGE)
    s.text(
        vx + half / 2, ys[0] + 32, "slice 1\n$\\times S^{(1)}_\\ell$", fs=10.5, va="bottom", color=BLUE, weight="bold"
    )
    s.text(
        vx + 1.5 * half,
        ys[0] + 32,
        "slice 2\n$\\times S^{(2)}_\\ell$",
        fs=10.5,
        va="bottom",
        color=ORANGE,
        weight="bold",
    )
    for ell, y in enumerate(ys):
        for j in range(dv):
            s.cell(vx + j * cw, y, cw, 18, BLUE if j < dv // 2 else ORANGE)
        s.text(vx + 2 * half + 8, y + 9, f"$V[\\mathrm{{idx}}_{ell + 1}]$", fs=10.5, ha="left")
        s.line([150, 242], [y + 9, y + 9], lw=0.9, ls=":")
    s.arrow(vx + half, ys[-1] - 4, vx + half, 62)
    s.text(vx + half + 8, ys[-1] - 18, "$\\sum_{\\ell=1}^{m}$", fs=11, ha="left")
    for j in range(dv):
        s.cell(vx + j * cw, 42, cw, 18, BLUE if j < dv // 2 else ORANGE)
    s.text(vx - 8, 51, "read", fs=11, ha="right")
    s.text(
        vx + half,
        16,
        r"$\mathrm{read}[\mathrm{slice}\ k] = \sum_{\ell=1}^{m} S^{(k)}_\ell\,"
        r"V[\mathrm{idx}_\ell, \mathrm{slice}\ k]$",
        fs=10.5,
    )
    s.text(
        vx + 2 * half + 72,
        66,
        "slice $k$: columns\n$[k D_v/c,\\ (k{+}1) D_v/c)$\n(drawn: $c = 2$, $m = 3$)",
        fs=10.5,
        linespacing=1.4,
    )
    return s


def fig_implicit_value_expansion() -> Sheet:
    import random

    s = Sheet(282)
    E, N = 4, 8
    perm = list(range(E * N))
    random.Random(7).shuffle(perm)  # the fixed shuffle pi (drawn size)
    picks = [2, 6, 8, 16, 19, 25]  # selected virtual slots: blocks 1, 3 and 4 hit, block 2 not; row 0 twice
    colors = (BLUE, ORANGE, GREEN, PURPLE)
    block = {v: perm[v] // N for v in picks}
    row = {v: perm[v] % N for v in picks}
    # virtual slots
    cw, vx, vy = 13.0, 54, 244
    s.text(
        vx,
        vy + 20,
        "virtual slots $v = 0 \\ldots EN{-}1$: the key grid addresses $E N$",
        fs=10.5,
        ha="left",
        va="bottom",
    )
    for v in range(E * N):
        s.cell(vx + v * cw, vy, cw, 14, colors[block[v]] if v in picks else None)
    # the physical table
    tx, ty, rh, tw = 206, 206, 14.0, 84
    s.text(tx + tw / 2, ty - N * rh - 6, "physical $V$: $N \\times D_v$", fs=10.5, va="top")
    for r in range(N):
        y = ty - (r + 1) * rh
        hits = sorted({block[v] for v in picks if row[v] == r})
        if not hits:
            s.cell(tx, y, tw, rh - 2)
        for k, p in enumerate(hits):
            s.cell(tx + k * tw / len(hits), y, tw / len(hits), rh - 2, colors[p])
    for v in picks:
        hits = sorted({block[u] for u in picks if row[u] == row[v]})
        xe = tx + (hits.index(block[v]) + 0.5) * tw / len(hits)
        s.arrow(vx + (v + 0.5) * cw, vy - 1, xe, ty - row[v] * rh - 1, color=colors[block[v]], lw=1.0, head=6)
    s.text(
        6,
        120,
        "fixed shuffle $\\pi$:\nblock $p = \\pi(v)$ div $N$\nrow $= \\pi(v)$ mod $N$\n\ncolour = block $p$",
        fs=10.5,
        ha="left",
        linespacing=1.45,
    )
    # pooling per block, then one projection per block
    px, wx = 334, 396
    s.text(px + 20, ty + 8, "pooled$_p$", fs=10.5, va="bottom")
    s.text(wx + 20, ty + 8, "$W_p$: $D_v \\to h$", fs=10.5, va="bottom")
    for p in range(E):
        y = ty - 18 - p * 44
        rows_p = sorted({row[v] for v in picks if block[v] == p})
        s.cell(px, y, 40, 14, colors[p] if rows_p else None)
        for r in rows_p:
            s.arrow(tx + tw + 2, ty - (r + 0.5) * rh - 1, px - 2, y + 7, color=colors[p], lw=1.0, head=6)
        if not rows_p:
            s.text(px + 20, y - 3, "nothing: 0", fs=10, va="top")
        s.arrow(px + 42, y + 7, wx - 2, y + 7)
        s.box(wx, y - 4, 40, 22, f"$W_{p + 1}$", colors[p], fs=10.5)
        s.arrow(wx + 42, y + 7, 464, 122, lw=1.0, head=6)
    s.plus(470, 122, r=7)
    s.arrow(477, 122, 492, 122)
    s.text(495, 122, "out", fs=11, ha="left")
    s.text(
        262,
        18,
        r"$\mathrm{pooled}_p = \sum_{\ell:\, p_\ell = p} S_\ell \odot V[\mathrm{row}_\ell]$,   "
        r"$\mathrm{out} = \sum_{p=1}^{E} \mathrm{pooled}_p\, W_p$   (drawn: $E = 4$, $N = 8$, 6 slots)",
        fs=10.5,
    )
    return s


def fig_ultramemv2_block() -> Sheet:
    s = Sheet(352)
    ys = [62, 130, 198, 266]  # bottoms of blocks 0..3
    bh = 44
    # left: UltraMem with two skip-layer memories (the course config: skip [[0, 2], [1, 3]])
    s.frame(4, 40, 252, 308, label="UltraMem: skip-layer memories", label_pos="tr")
    sx = 34
    s.arrow(sx, 46, sx, 344, lw=2.0, head=11)
    for k, y in enumerate(ys):
        s.frame(sx - 12, y, 120, bh, color=INK, ls="-", lw=0.9)
        s.box(sx + 2, y + 10, 48, 24, "attn", BLUE, fs=10)
        s.box(sx + 56, y + 10, 48, 24, "FFN", GREEN, fs=10)
        s.text(sx - 16, y + bh / 2, f"{k}", fs=10.5, ha="right", weight="bold")
    for i, j, col, mx in ((0, 2, ORANGE, 172), (1, 3, PURPLE, 224)):
        y_in, y_out = ys[i] - 12, ys[j] + bh + 12
        mid = (y_in + y_out) / 2
        s.circle(sx, y_in, 3.0, color=col, fill=True)
        s.line([sx, mx, mx], [y_in, y_in, mid - 22], color=col, lw=1.5)
        s.box(mx - 23, mid - 22, 46, 44, f"Mem\n{i}$\\to${j}", col, fs=10)
        s.line([mx, mx], [mid + 22, y_out], color=col, lw=1.5)
        s.arrow(mx, y_out, sx + 7, y_out, color=col, lw=1.5)
        s.plus(sx, y_out, r=6.5, color=col)
    s.text(
        130,
        20,
        "Mem $i{\\to}j$ reads the stream before block $i$\nand adds its output after block $j > i$",
        fs=10,
        linespacing=1.3,
    )
    # right: UltraMemV2, a memory beside the FFN of every block
    s.frame(264, 40, 257, 308, label="UltraMemV2: every block", label_pos="tr")
    sx = 296
    s.arrow(sx, 46, sx, 344, lw=2.0, head=11)
    for k, y in enumerate(ys):
        s.text(sx - 16, y + bh / 2, f"{k}", fs=10.5, ha="right", weight="bold")
        s.frame(sx - 12, y, 222, bh, color=INK, ls="-", lw=0.9)
        s.box(sx + 4, y + 10, 52, 24, "attn", BLUE, fs=10)
        s.box(sx + 62, y + 10, 52, 24, "FFN", GREEN, fs=10)
        s.text(sx + 124, y + bh / 2, "+", fs=13)
        s.box(sx + 134, y + 10, 62, 24, "Mem", ORANGE, fs=10)
        s.brace(sx + 62, y + 6, sx + 196, y + 6, tick=3)
    s.text(
        400,
        20,
        "$u = \\mathrm{Norm}_2(x)$ feeds both:\n$x \\leftarrow x + \\mathrm{FFN}(u) + \\mathrm{Mem}(u)$",
        fs=10,
        linespacing=1.3,
    )
    return s


def fig_pre_values() -> Sheet:
    s = Sheet(292)
    cy = 170
    s.vector(10, cy + 27, 6, 9, vertical=True, colors=[BLUE] * 6, gap=1)
    s.text(15, cy - 38, "$x$", fs=12)
    # the pre-input p_x = W_p x
    s.path_arrow([(24, cy + 12), (36, cy + 12), (36, 264), (50, 264)])
    s.box(50, 252, 40, 24, "$W_p$", BLUE, fs=10.5)
    s.arrow(90, 264, 102, 264)
    s.vector(104, 259, 4, 11, colors=[TEAL] * 4, gap=0.8)
    s.text(126, 274, "$p_x \\in \\mathbb{R}^{D_p}$", fs=10.5, va="bottom", color=TEAL, weight="bold")
    # retrieval: rows i and scores s_i
    s.path_arrow([(24, cy - 12), (36, cy - 12), (36, 82), (50, 82)])
    s.box(50, 62, 96, 40, "TDQKR, MCS\ntop-$m$: $i$, $s_i$", PURPLE, fs=10)
    # tables P (N x D_p) and V (N x D_v): the same rows i
    rows, top, rh = 16, 236, 8.5
    picks = (2, 7, 12)
    px0, pw, vx0, vw = 176, 40, 224, 66
    for r in range(rows):
        y = top - (r + 1) * rh
        s.cell(px0, y, pw, rh - 1.4, TEAL if r in picks else None)
        s.cell(vx0, y, vw, rh - 1.4, ORANGE if r in picks else None)
    s.text(px0 + pw / 2, top + 4, "$P$", fs=11, va="bottom", color=TEAL, weight="bold")
    s.text(vx0 + vw / 2, top + 4, "$V$", fs=11, va="bottom", color=ORANGE, weight="bold")
    s.text(px0 + pw / 2, top - rows * rh - 4, "$N \\times D_p$", fs=10, va="top")
    s.text(vx0 + vw / 2, top - rows * rh - 4, "$N \\times D_v$", fs=10, va="top")
    s.arrow(146, 90, px0 - 3, top - 9 * rh, color=PURPLE, lw=1.2, head=7)
    s.text(98, 112, "rows $i$", fs=10.5, color=PURPLE, weight="bold")
    # per selected slot, on the row's own line: gate x score x value
    gx, sx_, vx = 330, 410, 452
    s.path_arrow(
        [(150, 264), (320, 264), (320, top - (picks[-1] + 0.5) * rh), (gx - 1, top - (picks[-1] + 0.5) * rh)],
        color=TEAL,
        lw=1.2,
        head=7,
    )
    s.path_arrow([(146, 94), (sx_ + 14, 94), (sx_ + 14, 119)], color=PURPLE, lw=1.2, head=7)
    for r in picks:
        y = top - (r + 0.5) * rh
        s.line([vx0 + vw + 2, gx - 2], [y, y], lw=0.9, ls=":")
        if r != picks[-1]:
            s.arrow(320, y, gx - 1, y, color=TEAL, lw=1.2, head=7)
        s.box(gx, y - 9, 64, 18, "$\\langle P_i, p_x\\rangle$", TEAL, fs=10, radius=2)
        s.text(gx + 71, y, "$\\times$", fs=11)
        s.box(sx_, y - 9, 28, 18, "$s_i$", PURPLE, fs=10.5, radius=2)
        s.text(sx_ + 35, y, "$\\times$", fs=11)
        s.vector(vx, y - 8, 6, 10, colors=[ORANGE] * 6, gap=0.5)
    s.text(gx + 32, top + 4, "gate, no activation", fs=10.5, va="bottom", color=TEAL, weight="bold")
    s.text(vx + 30, top + 4, "$V_i$", fs=11, va="bottom", color=ORANGE, weight="bold")
    # sum over the slots, then one projection W
    s.arrow(vx + 30, top - (picks[-1] + 0.5) * rh - 12, vx + 30, 62)
    s.text(vx + 37, 90, "$\\sum_i$", fs=12, ha="left")
    s.vector(vx, 46, 6, 10, colors=[ORANGE] * 6, gap=0.5)
    s.arrow(vx - 2, 52, 428, 52)
    s.box(386, 40, 40, 24, "$W$", BLUE, fs=10.5)
    s.text(406, 72, "$D_v \\to h$", fs=10, va="bottom")
    s.arrow(384, 52, 364, 52)
    s.text(354, 52, "$o$", fs=12)
    s.text(
        240,
        14,
        r"$o = W^\top \sum_{i \in \mathrm{top}\text{-}m} s_i\, \langle P_i, p_x\rangle\, V_i$"
        "   (per MCS slice; drawn: $m = 3$)",
        fs=11,
    )
    return s


def fig_ring_sharing() -> Sheet:
    s = Sheet(280)
    G, N = 4, 4  # drawn: 4 layers, N = 4 rows each -> one ring of G N = 16 rows
    colors = (BLUE, ORANGE, GREEN, PURPLE)
    total = G * N
    # left: the ring of G N rows, coloured by whose N-row budget they are; layer k starts at k N
    cx, cy, r_out, r_in = 146, 152, 72, 50
    for row in range(total):
        a0 = 90 - row * 360 / total  # clockwise from the top
        a1 = a0 - 360 / total
        wedge = patches.Wedge(
            (cx, cy), r_out, a1 + 0.8, a0 - 0.8, width=r_out - r_in, fc=colors[row // N], ec="none", zorder=2
        )
        s.ax.add_patch(wedge)
    for k in range(G):
        a = math.radians(90 - k * 90)
        s.text(
            cx + (r_in - 11) * math.cos(a),
            cy + (r_in - 11) * math.sin(a),
            ["$0$", "$N$", "$2N$", "$3N$"][k],
            fs=10,
            weight="bold",
        )
        x0, y0 = cx + (r_out + 18) * math.cos(a), cy + (r_out + 18) * math.sin(a)
        x1, y1 = cx + (r_out + 2) * math.cos(a), cy + (r_out + 2) * math.sin(a)
        s.arrow(x0, y0, x1, y1, color=colors[k], lw=1.6, head=8)
        ha = {0: "center", 1: "left", 2: "center", 3: "right"}[k]
        va = {0: "bottom", 1: "center", 2: "top", 3: "center"}[k]
        lx, ly = cx + (r_out + 21) * math.cos(a), cy + (r_out + 21) * math.sin(a)
        s.text(lx, ly, f"layer {k}", fs=10.5, color=colors[k], weight="bold", ha=ha, va=va)
    s.text(cx, cy, "one table\nof $G N$ rows", fs=10.5, linespacing=1.3)
    # right: each layer's window, the rows in the order of its slots
    x0, cw = 302, 13.0
    s.text(x0 - 18, 262, "rows in slot order, per layer:", fs=10.5, ha="left")
    for k in range(G):
        y = 214 - k * 44
        s.text(x0 - 6, y + 7, f"{k}", fs=10.5, ha="right", color=colors[k], weight="bold")
        for row in range(total):
            s.cell(x0 + row * cw, y, cw, 14, colors[row // N])
        xs = x0 + k * N * cw
        s.arrow(xs, y + 27, xs, y + 16, color=colors[k], lw=1.6, head=7)
        s.path_arrow([(xs, y - 5), (x0 + total * cw, y - 5)], color=colors[k], lw=1.4, head=6)
        if k:
            s.path_arrow([(x0, y - 5), (xs - 3, y - 5)], color=colors[k], lw=1.4, head=6, ls=(0, (2, 2)))
    s.text(
        x0 + total * cw / 2,
        42,
        "solid: from offset $kN$ to the end;\ndashed: wrapped to the start",
        fs=10,
        linespacing=1.3,
    )
    s.text(
        262,
        10,
        r"layer $k$ of a group reads $\mathrm{row}(s) = (\pi_\ell(s) + k N)\ \mathrm{mod}\ G N$;  "
        r"drawn: $G = 4$, $N = 4$",
        fs=10.5,
    )
    return s


def _grid(s: Sheet, x, y, rows, cols, c, fill=None, block=None, lw=0.5):
    """A rows x cols grid of faint cells from top-left (x, y); fill(r, k) -> palette colour or None."""
    for r in range(rows):
        for k in range(cols):
            col = fill(r, k) if fill else None
            s.cell(x + k * c, y - (r + 1) * c, c, c, col, lw=lw)
    if block:  # thicker separators every `block` columns
        for k in range(0, cols + 1, block):
            s.line([x + k * c, x + k * c], [y - rows * c, y], lw=1.4)


def fig_kernel_tiling() -> Sheet:
    s = Sheet(446)
    c = 8.0
    D, BD, T, t, pid = 12, 4, 6, 2, 1  # D_v, BLOCK_D, tokens, the drawn program (t, pid_d)
    cols = range(pid * BD, (pid + 1) * BD)
    core = [j // (D // 2) for j in range(D)]  # c = 2 cores of D_v / c = 6 columns: core(j) = j // 6
    step1, step2 = [1, 5, 8, 12], [3, 10]  # idx[t, :] with m = 6, BLOCK_M = 4 slots per step
    # ---- forward
    s.frame(4, 230, 517, 212, label="forward: _weighted_sum_fwd_kernel, program $(t, \\mathrm{pid\\_d})$")
    oy = 402
    ox = 22
    _grid(s, ox, oy, T, D, c, lambda r, k: GREEN if (r == t and k in cols) else None, block=BD)
    s.text(ox + D * c / 2, oy + 4, "out: $T \\times D_v$", fs=10.5, va="bottom")
    s.text(
        ox,
        oy - T * c - 6,
        "one program per\ntoken and BLOCK_D\ncolumns; green:\nprogram $(t, \\mathrm{pid\\_d})$",
        fs=10,
        ha="left",
        va="top",
        linespacing=1.3,
    )
    # the slot indices, BLOCK_M at a time (a column, each cell pointing at its row)
    ix, ic = 212, 10.0
    s.text(ix + ic / 2, oy + 4, "idx$[t, :]$", fs=10.5, va="bottom")
    for k in range(8):
        y = oy - (k + 1) * ic
        s.cell(ix, y, ic, ic, ORANGE if k < 4 else (GOLD if k < 6 else None))
        if k >= 6:
            s.line([ix + 2, ix + ic - 2], [y + 2, y + ic - 2], lw=1.0)
    s.text(ix - 5, oy - 2 * ic, "step 1", fs=10, ha="right", color=ORANGE, weight="bold")
    s.text(ix - 5, oy - 6 * ic, "step 2", fs=10, ha="right", color=GOLD, weight="bold")
    s.text(
        ix + ic,
        oy - 8 * ic - 6,
        "$m = 6$, BLOCK_M = 4\nslots a step; lanes\npast $m$ masked",
        fs=10,
        ha="right",
        va="top",
        linespacing=1.3,
    )
    # the value table: this program reads its columns of the selected rows
    vx, N = 262, 14
    rowcol = {r: ORANGE for r in step1} | {r: GOLD for r in step2}
    for r in range(N):
        for k in range(D):
            s.cell(vx + k * c, oy - (r + 1) * c, c, c, rowcol[r] if (r in rowcol and k in cols) else None)
    s.rect(vx + pid * BD * c, oy - N * c, BD * c, N * c, ec=GREEN, lw=1.8, z=3)
    s.text(vx + D * c / 2, oy + 4, "$V$: $N \\times D_v$", fs=10.5, va="bottom")
    for k, r in enumerate(step1 + step2):
        s.arrow(
            ix + ic + 1,
            oy - (k + 0.5) * ic,
            vx - 2,
            oy - (r + 0.5) * c,
            color=ORANGE if k < 4 else GOLD,
            lw=0.9,
            head=5,
        )
    # one step's tiles and the accumulator
    tx, tc = 380, 9.0
    s.text(tx + 2 * tc, oy + 4, "rows", fs=10.5, va="bottom", color=ORANGE, weight="bold")
    _grid(s, tx, oy, 4, BD, tc, lambda r, k: ORANGE)
    s.text(tx + 4 * tc + 11, oy - 2 * tc, "$\\odot$", fs=12)
    wx = tx + 4 * tc + 22
    s.text(wx + 2 * tc, oy + 4, "$w$", fs=11, va="bottom", weight="bold")
    _grid(s, wx, oy, 4, BD, tc, lambda r, k: (BLUE, PURPLE)[core[pid * BD + k]])
    s.text(wx + 4 * tc + 6, oy - 2 * tc + 6.5, "core 1", fs=10, ha="left", color=BLUE, weight="bold")
    s.text(wx + 4 * tc + 6, oy - 2 * tc - 6.5, "core 2", fs=10, ha="left", color=PURPLE, weight="bold")
    s.text(
        tx - 4,
        oy - 4 * tc - 8,
        "$w[i, j] = s[t, i, \\mathrm{core}(j)]\\; g[t, i]$\n$\\mathrm{core}(j) = \\lfloor j\\, c / D_v \\rfloor$",
        fs=10,
        ha="left",
        va="top",
        linespacing=1.5,
    )
    s.text(
        tx - 4,
        318,
        "acc ${+}{=}\\, \\sum_i w \\odot \\mathrm{rows}$\n(fp32, in registers)",
        fs=10,
        ha="left",
        va="top",
        linespacing=1.4,
    )
    s.vector(tx + 100, 292, BD, tc, colors=[GREEN] * BD)
    s.text(tx + 100 + 2 * tc, 304, "acc", fs=10, va="bottom", color=GREEN, weight="bold")
    s.path_arrow(
        [
            (tx + 100 + 2 * tc, 290),
            (tx + 100 + 2 * tc, 264),
            (10, 264),
            (10, oy - (t + 0.5) * c),
            (ox - 1, oy - (t + 0.5) * c),
        ],
        lw=1.2,
        head=7,
    )
    s.text(300, 260, "after the loop over the $m$ slots: store out$[t$, cols$]$ once", fs=10, va="top")
    s.text(
        262,
        236,
        "(with pre-values, _gate_fwd_kernel first computes $g[t, i] = \\langle P[\\mathrm{idx}], x_t"
        "\\rangle$; without them $g = 1$)",
        fs=10,
        va="bottom",
    )
    # ---- backward
    s.frame(4, 4, 517, 218, label="backward: _weighted_sum_bwd_kernel, program $(t$, block of BLOCK_M slots$)$")
    bx, by = 12, 170
    for r in range(4):
        for k in range(D):
            s.cell(bx + k * c, by - (r + 1) * c, c, c, ORANGE)
    for k in range(3):
        s.rect(
            bx + k * BD * c,
            by - 4 * c,
            BD * c,
            4 * c,
            ec=GREEN,
            lw=1.8 if k == 0 else 1.0,
            z=3,
            ls="-" if k == 0 else "--",
        )
    s.path_arrow([(bx, by + 6), (bx + D * c, by + 6)], color=GREEN, lw=1.4, head=7)
    s.text(bx, by + 12, "walk $D_v$, BLOCK_D at a time", fs=10, ha="left", va="bottom", color=GREEN, weight="bold")
    s.text(bx + D * c + 6, by - 2 * c, "$V[\\mathrm{idx}_i]$", fs=10, ha="left")
    s.vector(bx, 118, D, c, colors=[TEAL] * D)
    s.text(bx + D * c + 6, 122, "$G[t]$", fs=10, ha="left", color=TEAL, weight="bold")
    s.text(bx, 110, "$G = \\partial L / \\partial\\,\\mathrm{out}$", fs=10, ha="left", va="top")
    s.text(
        bx,
        82,
        "each tile of $V$ is read once, used twice:\n"
        "1. dots$[i, k]$ ${+}{=}\\, \\langle G[t, S_k], V[\\mathrm{idx}_i, S_k]\\rangle$ on the tile\n"
        "    grad $s$ = $g\\cdot$dots,  grad $g$ = $\\Sigma_k\\, s_k\\,$dots$_k$\n"
        "2. tl.atomic_add into grad_V$[\\mathrm{idx}_i$, cols$]$ of $s\\, g\\, G[t$, cols$]$",
        fs=10,
        ha="left",
        va="top",
        linespacing=1.45,
    )
    # the atomics: two programs adding into the same gradient row
    gx, gy, N2 = 408, 182, 12
    hits = {1: ORANGE, 4: RED, 7: ORANGE, 10: ORANGE, 2: PINK, 9: PINK, 11: PINK}
    for r in range(N2):
        for k in range(D):
            s.cell(gx + k * c, gy - (r + 1) * c, c, c, hits.get(r))
    s.text(gx + D * c / 2, gy + 4, "grad_V: $N \\times D_v$, fp32", fs=10, va="bottom")
    s.text(gx - 44, 164, "program\n$(t, \\cdot)$", fs=10, color=ORANGE, weight="bold", linespacing=1.2)
    s.text(gx - 44, 100, "program\n$(t', \\cdot)$", fs=10, color=PINK, weight="bold", linespacing=1.2)
    for r in (1, 4, 7, 10):
        s.arrow(gx - 24, 160, gx - 2, gy - (r + 0.5) * c, color=ORANGE, lw=0.9, head=5)
    for r in (2, 4, 9, 11):
        s.arrow(gx - 24, 104, gx - 2, gy - (r + 0.5) * c, color=PINK, lw=0.9, head=5)
    s.text(
        gx + D * c / 2,
        gy - N2 * c - 6,
        "red: a row both add to;\nthe atomics serialise\nthe two adds",
        fs=10,
        va="top",
        linespacing=1.25,
        color=RED,
        weight="bold",
    )
    s.text(
        262, 10, "the float summation order of grad_V (not its value) can change from run to run", fs=10, va="bottom"
    )
    return s


# Parameters of the course's head-to-head models (tiny Shakespeare, results/head2head.json, the
# ``params_activated`` / ``params_total`` of each run), in millions. tests/test_figures.py checks
# them against that file when it is present.
HEAD2HEAD_PARAMS = {
    "active": {
        "dense": (0.80, 0.80),
        "moe2": (0.80, 2.38),
        "moe8": (0.80, 4.24),
        "pkm": (0.80, 1.32),
        "peer": (0.80, 1.84),
        "ultramem": (0.80, 0.93),
        "ultramemv2": (0.80, 1.06),
    },
    "total": {
        "dense": (4.24, 4.24),
        "moe2": (0.80, 4.20),
        "moe8": (0.80, 4.24),
        "pkm": (0.80, 4.24),
        "peer": (0.80, 4.24),
        "ultramem": (0.80, 4.24),
        "ultramemv2": (0.80, 4.24),
    },
}


def fig_head_to_head_parity() -> Sheet:
    s = Sheet(356)
    models = [
        ("dense", "dense", GREEN, "every weight of every\nblock's SwiGLU FFN"),
        ("moe2", "MoE-2", TEAL, "its top-2 experts\nin every block"),
        ("moe8", "MoE-8", TEAL, "its top-8 fine-grained\nexperts in every block"),
        ("pkm", "PKM", ORANGE, "$H m = 4 \\cdot 8$ value rows\n(block 2) + query, sub-keys"),
        ("peer", "PEER", PINK, "$H m = 4 \\cdot 4$ experts\n$(u_i, v_i)$ in block 2"),
        ("ultramem", "UltraMem", PURPLE, "$m = 8$ rows in each of\n2 skip-layer memories"),
        ("ultramemv2", "UltraMemV2", BLUE, "$m = 8$ value + pre-value\nrows beside every FFN"),
    ]
    scale = 88 / 4.24  # points per million parameters, both panels
    ax0, bx0 = 254, 396
    top = 300
    s.text(8, top + 30, "model", fs=10.5, ha="left", weight="bold")
    s.text(92, top + 30, "what one token activates", fs=10.5, ha="left", weight="bold")
    s.text(ax0, top + 42, "equal activated", fs=10.5, ha="left", weight="bold")
    s.text(ax0, top + 27, "all activate $\\approx$0.80M", fs=10, ha="left")
    s.text(bx0, top + 42, "equal total", fs=10.5, ha="left", weight="bold")
    s.text(bx0, top + 27, "all hold $\\approx$4.24M", fs=10, ha="left")
    for k, (key, name, col, what) in enumerate(models):
        y = top - k * 40
        s.text(8, y, name, fs=10.5, ha="left", color=col, weight="bold")
        s.text(92, y, what, fs=10, ha="left", linespacing=1.25)
        for x0, parity in ((ax0, "active"), (bx0, "total")):
            act, tot = HEAD2HEAD_PARAMS[parity][key]
            s.rect(x0, y - 7, tot * scale, 14, fc=col, ec="none", alpha=FAINT, z=1)
            s.rect(x0, y - 7, tot * scale, 14, fc="none", ec=col, lw=1.2, z=1.2)
            s.rect(x0, y - 7, act * scale, 14, fc=col, ec="none", z=1.4)
            label = f"{tot:.2f}M" if parity == "active" else f"{act:.2f}M"
            s.text(x0 + tot * scale + 4, y, label, fs=10, ha="left")
    s.line([ax0, ax0], [top - 6 * 40 - 14, top + 16], lw=1.0)
    s.line([bx0, bx0], [top - 6 * 40 - 14, top + 16], lw=1.0)
    s.rect(ax0, 16, 20, 10, fc=INK, ec="none", z=1.4)
    s.text(ax0 + 26, 21, "activated per token", fs=10, ha="left")
    s.rect(bx0, 16, 20, 10, fc=INK, ec=INK, alpha=FAINT, z=1)
    s.rect(bx0, 16, 20, 10, fc="none", ec=INK, lw=1.2, z=1.2)
    s.text(bx0 + 26, 21, "total parameters", fs=10, ha="left")
    s.text(8, 21, "numbers: left total, right activated", fs=10, ha="left")
    return s


def fig_sharded_lookup() -> Sheet:
    s = Sheet(420)
    P = 3
    colors = (BLUE, ORANGE, GREEN)
    # top: the column split of the tables
    tx, ty, c, N = 14, 404, 11.0, 8
    dv, dp = 12, 6
    for r in range(N):
        for k in range(dv):
            s.cell(tx + k * c, ty - (r + 1) * c, c, c, colors[k // (dv // P)])
        for k in range(dp):
            s.cell(tx + (dv + 1) * c + k * c, ty - (r + 1) * c, c, c, colors[k // (dp // P)])
    s.text(tx + dv * c / 2, ty + 4, "$V$: $N \\times D_v$", fs=10.5, va="bottom")
    s.text(tx + (dv + 1 + dp / 2) * c, ty + 4, "$P$: $N \\times D_p$", fs=10.5, va="bottom")
    for r in range(P):
        s.text(tx + (r + 0.5) * 4 * c, ty - N * c - 4, f"rank {r}", fs=10, va="top", color=colors[r], weight="bold")
    s.text(
        244,
        ty + 2,
        "rank $r$ holds columns $[r D_v/P, (r{+}1) D_v/P)$ of $V$\n"
        "and $[r D_p/P, (r{+}1) D_p/P)$ of $P$, for all $N$ rows,\n"
        "and its own $T_r$ tokens. $D_v$ must be divisible by\n"
        "lcm$(P, c)$: each rank then holds whole pieces of\n"
        "the cores' slices (drawn: $P = 3$ ranks)",
        fs=10,
        ha="left",
        va="top",
        linespacing=1.4,
    )
    # the five steps, one lane per rank
    lanes = [236 - r * 56 for r in range(P)]
    cols_x = [78, 156, 234, 312, 390, 470]
    heads = [
        "own\ntokens",
        "1. all-gather\nidx, scores",
        "2. all-to-all\npre-input $x$",
        "3. partial $g_r$,\nall-reduce",
        "4. local read\non $V_r$, $P_r$",
        "5. all-to-all\noutputs",
    ]
    for x, h in zip(cols_x, heads):
        s.text(x, 258, h, fs=10, va="bottom", linespacing=1.2, weight="bold")
    for r, y in enumerate(lanes):
        s.text(8, y, f"rank {r}", fs=10, ha="left", color=colors[r], weight="bold")

    def tokens(x, y, owners, w, h=12, outline=None):
        total = len(owners) * w + (len(owners) - 1) * 2
        x0 = x - total / 2
        for k, o in enumerate(owners):
            s.cell(x0 + k * (w + 2), y - h / 2, w, h, colors[o])
        if outline is not None:
            s.rect(x0 - 3, y - h / 2 - 3, total + 6, h + 6, ec=colors[outline], lw=1.5, z=3)

    for r, y in enumerate(lanes):
        tokens(cols_x[0], y, [r], 24)
        tokens(cols_x[1], y, [0, 1, 2], 12)
        tokens(cols_x[2], y, [0, 1, 2], 5, outline=r)
        tokens(cols_x[3], y, [0, 1, 2], 4)
        tokens(cols_x[4], y, [0, 1, 2], 8, outline=r)
        tokens(cols_x[5], y, [r, r, r], 8)
    below = [
        "$T_r$ tokens",
        "idx, $s$: all $T$",
        "slice $r$ of\nevery $x_t$",
        "$g$: all $T$",
        "slice $r$ of\nevery out$_t$",
        "own tokens,\nfull $D_v$",
    ]
    for x, t in zip(cols_x, below):
        s.text(x, lanes[-1] - 14, t, fs=10, va="top", linespacing=1.2)
    for a, b in zip(cols_x[:-1], cols_x[1:]):
        if b == cols_x[4]:  # the read is local
            for y in lanes:
                s.arrow(a + 20, y, b - 24, y, lw=1.1, head=7)
            continue
        for y1 in lanes:  # a collective: every rank sends to every rank
            for y2 in lanes:
                s.line([a + 24, b - 24], [y1, y2], lw=0.8, alpha=0.9)
    s.text(262, 80, "fill colour: the rank that owns the token; outline: the rank's column slice", fs=10, va="top")
    s.text(
        262,
        6,
        "backward: all-to-alls, an all-reduce of the gate gradient, a reduce-scatter of the score\n"
        "gradients. Each rank's slice gradient is complete on that rank: no table gradient is\n"
        "all-reduced. (A row split would instead reduce-scatter every token's partial output:\n"
        "$P$ times this activation traffic.)",
        fs=10,
        va="bottom",
        linespacing=1.4,
    )
    return s


FIGURES: list[FigureSpec] = [
    FigureSpec(
        "memory-layer-overview.svg",
        0,
        "A memory layer beside the feed-forward layer",
        "A transformer block: attention, then a normalised input h that feeds both the FFN and a memory "
        "layer, whose outputs are added to the residual stream. Beside it, the memory layer's query "
        "selects m of the N rows of its value table and returns their weighted sum.",
        "A memory layer keeps a table of N value vectors and lets each token read only the m best "
        "matching rows: parameters grow with N, compute with m.",
        fig_memory_overview,
    ),
    FigureSpec(
        "ffn-as-memory.svg",
        1,
        "A feed-forward layer is a key-value memory; a mixture of experts reads some of it",
        "Top: a SwiGLU FFN read as a memory: each row k_i of W1 (with gate g_i, a row of W3) is a key compared "
        "with x, giving one coefficient m_i(x) per slot, and each column v_i of W2 is the value that coefficient "
        "scales; all d_ff slots are read for every token. Bottom: a mixture of experts: a softmax router scores E "
        "experts, the top-k (here 2 of 8) run, and their outputs are summed weighted by their probabilities.",
        "An FFN is a memory of d_ff key-value slots that every token reads in full; a mixture of experts cuts "
        "it into E experts and reads k of them.",
        fig_ffn_as_memory,
    ),
    FigureSpec(
        "product-keys.svg",
        2,
        "Exact top-m with product keys",
        "Left: the n by n grid of slot scores s1[i] + s2[j] for one query, with the top-m rows of s1 and the "
        "top-m columns of s2 outlined; their m by m intersections are the candidate block, and white dots mark "
        "the final top-m slots, all inside it. Right: the candidate block with rows and columns sorted by rank, "
        "the staircase of cells with (a+1)(b+1) at most m, and the top-m inside the staircase.",
        "Product keys score 2n sub-keys instead of N = n^2 slots; the exact top-m always lies in the m x m "
        "block of the two sides' top-m, and even within its staircase (a+1)(b+1) <= m.",
        fig_product_keys,
    ),
    FigureSpec(
        "pkm-layer.svg",
        3,
        "The PKM layer",
        "Each of H heads projects the token x with its own W_q, normalises the query (BatchNorm in the PKM "
        "paper, LayerNorm by default in minimem), splits it into halves q1 and q2, finds the top-m slots with "
        "its own sub-keys K1 and K2 and turns their scores into softmax weights. The heads' selected rows of "
        "one shared value table V (N by D_v) are summed with those weights.",
        "The PKM layer: H heads of query, normalisation, product-key top-m and softmax, reading one shared "
        "value table.",
        fig_pkm_layer,
    ),
    FigureSpec(
        "peer-experts.svg",
        4,
        "PEER: retrieved singleton experts",
        "A product-key router with H heads picks m experts per head from a pool of N. Each expert i is a row "
        "u_i of a down table U and the same row v_i of an up table V, both N by h: an MLP with one hidden "
        "neuron, e_i(x) = GELU(<u_i, x>) v_i. The layer sums the retrieved experts of all heads, weighted by "
        "the router's softmax weights.",
        "PEER: every slot of the product-key memory is an expert with one hidden neuron; each token runs the "
        "H m experts its heads retrieve.",
        fig_peer_experts,
    ),
    FigureSpec(
        "tucker-retrieval.svg",
        5,
        "Tucker-decomposed query-key retrieval (TDQKR)",
        "Left: the n by n score grid as S_row transposed (n by r) times a small core C (r by r) times S_col "
        "(r by n). Right: the search: the rank-1 approximation of C by its SVD gives row scores alpha and "
        "column scores beta; the top-m of each define an m by m candidate block, which is rescored exactly "
        "with the full core, and its top-m cells are returned; a ring marks an exact top-m slot outside the "
        "candidates, which the approximate search misses.",
        "TDQKR scores slot (i, j) as S_row[:, i]^T C S_col[:, j]; candidates come from the rank-1 part of C, "
        "the exact score only ranks the m x m candidates.",
        fig_tucker_retrieval,
    ),
    FigureSpec(
        "multicore-scoring.svg",
        5,
        "Multi-core scoring (MCS)",
        "Two cores C1 and C2 are summed into the core that selects the top-m slots; at each chosen slot each "
        "core keeps its own score. The value row of each chosen slot is cut into c = 2 column slices, and "
        "slice k is weighted by core k's score before the rows are summed into the read.",
        "Multi-core scoring: selection by the summed core, and core k's own score weights slice k of the value row.",
        fig_multicore_scoring,
    ),
    FigureSpec(
        "implicit-value-expansion.svg",
        5,
        "Implicit value expansion (IVE)",
        "The key grid addresses E times N virtual slots. A fixed random permutation maps each selected virtual "
        "slot to a block p and a row of the physical table V (N by D_v). The weighted rows are pooled per "
        "block, each block's pool is multiplied by its own projection W_p (D_v to h), and the projections are "
        "summed; a block with no selected slot contributes zero.",
        "Implicit value expansion: E virtual memories from one physical table, pooled per block before the "
        "E projections, so no virtual value is ever formed.",
        fig_implicit_value_expansion,
    ),
    FigureSpec(
        "ultramemv2-block.svg",
        6,
        "Where the memory sits: UltraMem's skip layers and UltraMemV2's every block",
        "Left: UltraMem with the course's two skip-layer memories: memory 0 to 2 reads the residual stream "
        "before block 0 and adds its output after block 2, memory 1 to 3 reads before block 1 and adds after "
        "block 3, so each lookup can overlap the blocks in between. Right: UltraMemV2: every block has "
        "attention, then an FFN and a memory side by side on the same normalised input, their outputs added "
        "to the stream together.",
        "UltraMem places a few memories that read the stream before block i and write after block j > i; "
        "UltraMemV2 puts a memory beside the FFN of every block.",
        fig_ultramemv2_block,
    ),
    FigureSpec(
        "pre-values.svg",
        6,
        "Pre-values: a PEER-style gate on every selected value",
        "The token x is projected to p_x = W_p x of width D_p. The retrieval picks rows i with scores s_i. "
        "Each slot has a pre-value row P_i (table P, N by D_p) beside its value row V_i (table V, N by D_v); "
        "the gate is the dot product of P_i and p_x, with no activation. The gated, scored value rows are "
        "summed, and one projection W maps the sum from D_v to h.",
        "UltraMemV2's read: o = W^T sum_i s_i <P_i, p_x> V_i, per multi-core slice, with no activation on the gate.",
        fig_pre_values,
    ),
    FigureSpec(
        "ring-sharing.svg",
        6,
        "Value tables shared in a ring",
        "Left: G = 4 layers pool their N-row budgets into one table of G N rows drawn as a ring, coloured by "
        "the layer whose budget each quarter is; layer k's window starts at offset k N. Right: for each layer, "
        "the rows in the order its slots read them: from its offset to the end of the table, then wrapping "
        "around to the start, so every layer reaches every row.",
        "Ring sharing: a group of G layers shares one table of G N rows, and layer k reads row "
        "(pi(s) + k N) mod G N for its slot s.",
        fig_ring_sharing,
    ),
    FigureSpec(
        "kernel-tiling.svg",
        7,
        "The fused Triton lookup: one program's work",
        "Forward: the output (T by D_v) is cut into one program per token and block of BLOCK_D columns. The "
        "highlighted program loads its token's slot indices BLOCK_M at a time (lanes past m masked), gathers "
        "the BLOCK_M by BLOCK_D tile of those rows of the value table in its own columns, multiplies it by a "
        "weight tile whose columns take the score of their core times the pre-value gate, accumulates the sum "
        "over slots in BLOCK_D float32 registers and stores its part of the output once. Backward: one program "
        "per token and block of slots walks the value columns tile by tile; each tile is read once, for the "
        "score and gate gradients and for atomic adds into the value gradient, where two programs can hit the "
        "same row.",
        "The lookup kernel: a program per (token, block of value columns) gathers, weights and sums the m "
        "selected rows in registers; the backward scatters into the table gradient with atomics.",
        fig_kernel_tiling,
    ),
    FigureSpec(
        "head-to-head-parity.svg",
        8,
        "Equal activated parameters and equal total parameters",
        "For the seven models of the head-to-head experiment (dense, MoE-2, MoE-8, PKM, PEER, UltraMem, "
        "UltraMemV2) a row says what one token activates and draws two bars to scale: a filled part for the "
        "parameters activated per token and an outline for the total. At equal activated parameters every "
        "model activates about 0.80 million and the totals range from 0.80 to 4.24 million; at equal total "
        "parameters every model holds about 4.24 million, the sparse models still activate 0.80 million and "
        "the dense model activates all of them.",
        "The two comparisons of chapter 8, to scale for the course's models: equal activated parameters "
        "(same compute per token) and equal total parameters (MoE-8's).",
        fig_head_to_head_parity,
    ),
    FigureSpec(
        "sharded-lookup.svg",
        9,
        "The memory lookup sharded by columns over ranks",
        "Top: the value table V and the pre-value table P split along their width into one column slice per "
        "rank, each slice holding all N rows. Bottom: the five steps of the sharded lookup for three ranks: "
        "each rank starts with its own tokens; all-gather of indices and scores; all-to-all of the pre-input so "
        "that each rank gets its column slice of every token; partial gates and an all-reduce; a local read of "
        "every token on the rank's slice; and an all-to-all that returns to each rank every slice of its own "
        "tokens' outputs.",
        "minimem shards value tables along the value dimension: every rank reads its slice of every token's "
        "rows, and no table gradient is ever all-reduced.",
        fig_sharded_lookup,
    ),
]


# ----------------------------------------------------------------------------- output


def svg_bytes(spec: FigureSpec) -> bytes:
    """The figure as deterministic SVG bytes, with <title> and <desc> first."""
    import io

    with matplotlib.rc_context({**RC, "svg.id": Path(spec.file).stem}):
        sheet = spec.draw()
        sheet.check(spec.file)
        buf = io.StringIO()
        sheet.fig.savefig(buf, format="svg", transparent=True, metadata=METADATA)
    svg = buf.getvalue()
    stem = Path(spec.file).stem
    head = re.search(r"<svg\b[^>]*>", svg)
    if head is None:
        raise RuntimeError(f"{spec.file}: no <svg> element in matplotlib's output")
    tag = head.group(0)
    new_tag = tag[:-1] + f' role="img" aria-labelledby="{stem}-title {stem}-desc">'
    accessible = (
        f'\n <title id="{stem}-title">{escape(spec.title)}</title>\n <desc id="{stem}-desc">{escape(spec.alt)}</desc>'
    )
    svg = svg[: head.start()] + new_tag + accessible + svg[head.end() :]
    return svg.encode("utf-8")


def manifest() -> list[dict]:
    return [
        {"file": f.file, "chapter": f.chapter, "title": f.title, "alt": f.alt, "caption": f.caption} for f in FIGURES
    ]


def write_all(out: Path, only: list[str] | None = None) -> list[Path]:
    """Write every figure (or those whose file names are in ``only``) and the manifest into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in FIGURES:
        if only and spec.file not in only and Path(spec.file).stem not in only:
            continue
        path = out / spec.file
        path.write_bytes(svg_bytes(spec))
        written.append(path)
    path = out / "figures.json"
    path.write_text(json.dumps(manifest(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: book/figures)")
    parser.add_argument("only", nargs="*", help="file names or stems to draw (default: all)")
    args = parser.parse_args(argv)
    for path in write_all(args.out, args.only):
        print(path)


if __name__ == "__main__":
    main()
