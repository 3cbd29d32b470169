"""The live twins of the chapters' widgets: one generator per chapter, and the inventory.

Each generator runs the chapter's widget cell with stand-in widgets (``harness.load_widget``),
walks the grid of its controls, and records at every point the readout the chapter's own update
callback writes and a Plotly figure of the same numbers. Where the widget draws a matplotlib
figure (chapters 2, 3 and 8) the figure is the chapter's own drawing code, recorded call by
call and converted to Plotly; where it only writes text, the figure plots the quantities of
the readout along the first control, computed by the functions the callback calls.

``WIDGETS`` lists every widget of the course: its chapter, the string that finds its cell
(the CSS class it adds for the browser tests) and either its twin's generator or the reason it
has none. ``tests/test_live_figures.py`` checks that every widget cell of every chapter is in it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

from .harness import Control, RecordingFigure, Twin, load_widget, narrow_layout, to_plotly

BLUE, ORANGE, GREEN, RED, PURPLE = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"


def notebook(root: Path, name: str) -> Path:
    return root / "notebooks" / f"{name}.ipynb"


def axes_layout(xtitle: str, ytitle: str, xlog: bool = False, ylog: bool = False, **extra) -> dict:
    """The layout of a one-panel twin: titled axes, legend under the plot."""
    layout = {
        "xaxis": {"title": {"text": xtitle}, "type": "log" if xlog else "linear"},
        "yaxis": {"title": {"text": ytitle}, "type": "log" if ylog else "linear"},
        "legend": {"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"},
        "margin": {"l": 64, "r": 16, "t": 48, "b": 40},
        "hovermode": "closest",
    }
    layout.update(extra)
    return layout


def line(name: str, x: list, y: list, color: str, **style) -> dict:
    trace = {"type": "scatter", "mode": "lines+markers", "name": name, "x": x, "y": y}
    trace["line"] = {"color": color, "width": style.pop("width", 2), **style.pop("line", {})}
    trace["marker"] = {"size": 4, "color": color}
    trace.update(style)
    return trace


def here(x: list, y: list, color: str = RED, name: str = "this setting") -> dict:
    """The controls' current point, drawn over the curves."""
    return {
        "type": "scatter",
        "mode": "markers",
        "name": name,
        "x": x,
        "y": y,
        "marker": {"size": 13, "color": "rgba(0,0,0,0)", "line": {"color": color, "width": 3}},
        "showlegend": False,
        "hoverinfo": "x+y",
    }


def title(text: str) -> dict:
    return {"title": {"text": text, "x": 0.5, "xanchor": "center", "font": {"size": 13}}}


# --------------------------------------------------------------------------- the generators


def ch00(root: Path) -> Twin:
    w = load_widget(notebook(root, "00_welcome"), "mm-n-slider")
    cost = w.namespace["cost_per_token"]
    n, m = Control.from_widget(w.control("n")), Control.from_widget(w.control("m"))
    twin = Twin("ch00", "The cost of one token, live", [n, m])
    for indices, point in twin.grid():
        sweep = [cost(v, point["m"]) for v in n.values]
        costs = cost(point["n"], point["m"])
        ratio = costs["dense layer of that size"] / costs["memory, product keys"]
        twin.add(
            indices,
            w.readout(point),
            [
                line("dense layer of that size", n.values, [c["dense layer of that size"] for c in sweep], BLUE),
                line("memory, brute-force keys", n.values, [c["memory, brute-force keys"] for c in sweep], ORANGE),
                line("memory, product keys", n.values, [c["memory, product keys"] for c in sweep], GREEN),
                here([point["n"]] * 2, [costs["dense layer of that size"], costs["memory, product keys"]]),
            ],
            {
                **axes_layout("n (sub-keys per side; N = n² slots)", "multiply-adds per token", ylog=True),
                **title(f"N = {costs['slots N']:,} slots, top-{point['m']}: {ratio:,.0f}x fewer than dense"),
            },
        )
    return twin


def ch01(root: Path) -> Twin:
    w = load_widget(notebook(root, "01_ffn_memories"), "mm-batch-slider")
    accounting, models = w.namespace["accounting"], w.namespace["access_models"]
    batch, dtype = Control.from_widget(w.control("log2 B")), Control.from_widget(w.control("weights"))
    twin = Twin("ch01", "Bytes read per token, live", [batch, dtype])
    sizes = [2**b for b in batch.values]
    reads = {
        (name, size): [accounting.bytes_read(model, B, size)["expected_per_token"] for B in sizes]
        for name, model in models.items()
        for size in dtype.values
    }
    colors = [BLUE, ORANGE, GREEN, RED, PURPLE]
    for indices, point in twin.grid():
        size, index = point["weights"], batch.values.index(point["log2 B"])
        traces = [line(name, sizes, reads[name, size], colors[i]) for i, name in enumerate(models)]
        traces.append(here([sizes[index]] * len(models), [reads[name, size][index] for name in models]))
        twin.add(
            indices,
            w.readout(point),
            traces,
            {
                **axes_layout("tokens per step B", "bytes read per token", xlog=True, ylog=True),
                **title(f"B = {sizes[index]:,} tokens per step, {dtype.labels[dtype.values.index(size)]} weights"),
            },
        )
    return twin


def ch02(root: Path) -> Twin:
    w = load_widget(notebook(root, "02_product_keys"), "mm-grid-n-slider", overrides={"Figure": RecordingFigure})
    n = Control.from_widget(w.control("n"))
    widget_m = w.control("m")  # its range follows n: m in [min, n]
    m_values = list(range(widget_m.min, max(n.values) + 1))
    m = Control("m", [str(v) for v in m_values], m_values, m_values.index(widget_m.initial), max_by="n")
    twin = Twin("ch02", "The product-key search, live", [n, m], height=460)
    narrow = {}
    for indices, point in twin.grid():
        readout, figures = w.run(point)
        traces, layout, ignored = to_plotly(figures[0])
        if ignored:
            raise RuntimeError(f"ch02: drawing calls without a Plotly equivalent: {sorted(set(ignored))}")
        narrow = narrow or narrow_layout(figures[0])
        twin.add(indices, readout, traces, {**layout, "margin": {"l": 56, "r": 16, "t": 64, "b": 48}})
    twin.narrow = narrow
    return twin


def ch03(root: Path) -> Twin:
    import tempfile

    from minimem_tools import course

    # The chapter trains two short runs into runs/ch3-*: the twin retrains them (same seeds, one
    # thread: the same counters) in a temporary folder, leaving a learner's runs alone.
    with tempfile.TemporaryDirectory(prefix="minimem-live-") as tmp:
        with mock.patch.object(course, "run_dir", lambda name: Path(tmp) / name):
            w = load_widget(notebook(root, "03_pkm"), "mm-usage-slider", overrides={"Figure": RecordingFigure})
    segment, norm = Control.from_widget(w.control("segment")), Control.from_widget(w.control("query norm"))
    twin = Twin("ch03", "Slot usage during training, live", [segment, norm], height=470)
    for indices, point in twin.grid():
        readout, figures = w.run(point)
        traces, layout, ignored = to_plotly(figures[0])
        if ignored:
            raise RuntimeError(f"ch03: drawing calls without a Plotly equivalent: {sorted(set(ignored))}")
        twin.add(indices, readout, traces, {**layout, "margin": {"l": 56, "r": 16, "t": 40, "b": 48}})
    return twin


def ch04(root: Path) -> Twin:
    w = load_widget(notebook(root, "04_peer"), "mm-peer-pool-slider")
    ns = w.namespace
    accounting, ModelConfig, PEERConfig = ns["accounting"], ns["ModelConfig"], ns["PEERConfig"]
    ffn_params, ffn_flops = ns["ffn_params"], ns["ffn_flops"]
    pool, heads, topk = (Control.from_widget(w.control(d)) for d in ("log2 n", "heads H", "top-m"))
    twin = Twin("ch04", "PEER's parameters and FLOPs, live", [pool, heads, topk])

    @functools.cache
    def costs(log2n: int, H: int, m: int) -> tuple[int, int]:
        n = 2**log2n  # the configuration update_peer builds
        config = ModelConfig(
            n_embd=768,
            n_head=12,
            n_layer=12,
            ffn_hidden=2048,
            memory=PEERConfig(n_slots=n * n, heads=H, topk=m, d_key=384, layers=[6]),
        )
        return accounting.memory_layer_parameters(config, 6), accounting.memory_layer_flops(config, 6)

    experts = [(2**v) ** 2 for v in pool.values]
    for indices, point in twin.grid():
        H, m = point["heads H"], point["top-m"]
        sweep = [costs(v, H, m) for v in pool.values]
        params, flops = costs(point["log2 n"], H, m)
        N = (2 ** point["log2 n"]) ** 2
        twin.add(
            indices,
            w.readout(point),
            [
                line("parameters ÷ dense FFN", experts, [p / ffn_params for p, _ in sweep], BLUE),
                line("FLOPs per token ÷ dense FFN", experts, [f / ffn_flops for _, f in sweep], ORANGE),
                here([N, N], [params / ffn_params, flops / ffn_flops]),
            ],
            {
                **axes_layout("experts N", "multiple of the dense FFN (2,048 wide)", xlog=True, ylog=True),
                **title(f"N = {N:,} experts, {H} heads of top-{m}"),
            },
        )
    return twin


def ch05(root: Path) -> Twin:
    w = load_widget(notebook(root, "05_ultramem"), "mm-rank-slider")
    # the callback's own recall_at_init, memoised: the curves below reuse what the readouts computed
    recall = w.namespace["recall_at_init"] = functools.cache(w.namespace["recall_at_init"])
    rank, grid = Control.from_widget(w.control("rank r")), Control.from_widget(w.control("m"))
    core, scores = Control.from_widget(w.control("core")), Control.from_widget(w.control("scores"))
    twin = Twin("ch05", "Recall of the Tucker search at initialisation, live", [rank, grid, core, scores])
    colors = [BLUE, ORANGE, GREEN, PURPLE]
    for indices, point in twin.grid():
        readout = w.readout(point)
        r, m, c, s = point["rank r"], point["m"], point["core"], point["scores"]
        traces = [
            line(
                f"rank {v}",
                grid.values,
                [recall(v, g, c, s) for g in grid.values],
                colors[i % len(colors)],
                width=3.5 if v == r else 1.2,
                opacity=1.0 if v == r else 0.45,
            )
            for i, v in enumerate(rank.values)
        ]
        traces.append(here([m], [recall(r, m, c, s)]))
        twin.add(
            indices,
            readout,
            traces,
            {
                **axes_layout("candidate grid m (top-m)", "recall of the exact top-m"),
                "yaxis": {"title": {"text": "recall of the exact top-m"}, "range": [0, 1.05]},
                **title(f"rank {r}, {c} core, {s} scores: recall {recall(r, m, c, s):.3f} at m = {m}"),
            },
        )
    return twin


def ch06(root: Path) -> Twin:
    w = load_widget(notebook(root, "06_ultramemv2"), "mm-dk-slider")
    ns = w.namespace
    variant = ns["v2_variant"] = functools.cache(ns["v2_variant"])  # one config load per point
    mcp_percent = ns["mcp_percent"]
    dk, m = Control.from_widget(w.control("D_k")), Control.from_widget(w.control("m"))
    twin = Twin("ch06", "The memory's share of compute (MCP), live", [dk, m])
    band = {"type": "rect", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": 12, "y1": 27.5}
    band.update(fillcolor="rgba(44,160,44,0.12)", line={"width": 0}, layer="below")
    for indices, point in twin.grid():
        readout = w.readout(point)
        curve = [mcp_percent(variant(d_key=v, topk=point["m"])) for v in dk.values]
        value = mcp_percent(variant(d_key=point["D_k"], topk=point["m"]))
        twin.add(
            indices,
            readout,
            [line(f"m = {point['m']}", dk.values, curve, BLUE), here([point["D_k"]], [value])],
            {
                **axes_layout("key width D_k", "memory share of compute, MCP (%)"),
                "shapes": [band],
                "annotations": [
                    {"text": "[UM2]'s sweep, 12% to 27.5%", "xref": "paper", "x": 1, "xanchor": "right"}
                    | {"yref": "y", "y": 27.5, "yanchor": "bottom", "showarrow": False, "font": {"size": 10}}
                ],
                **title(f"D_k = {point['D_k']}, m = {point['m']}: MCP {value:.1f}%"),
            },
        )
    return twin


def ch07(root: Path) -> Twin:
    w = load_widget(notebook(root, "07_triton_lookup"), "mm-lookup-t-slider")
    ns = w.namespace
    lookup_traffic, bandwidth, cores, n_rows = ns["lookup_traffic"], ns["BANDWIDTH"], ns["CORES"], ns["N_ROWS"]
    dtype_bytes = ns["DTYPE_BYTES"]
    tokens, topk = Control.from_widget(w.control("T")), Control.from_widget(w.control("m"))
    dtype = Control.from_widget(w.control("dtype"))
    # D_v and D_p stay at their starting values (the UltraMemV2-1B table): with them the grid would
    # hold 940,032 points; T, m and the dtype span 1,728.
    fixed = {d: w.control(d).initial for d in ("D_v", "D_p")}
    twin = Twin(
        "ch07",
        "Bytes moved by the fused lookup, live",
        [tokens, topk, dtype],
        note=f"Here D_v = {fixed['D_v']} and D_p = {fixed['D_p']} (the UltraMemV2-1B table) stay fixed; "
        "the notebook's widget varies them too.",
    )
    colors = {"H100": BLUE, "H200": ORANGE}
    for indices, point in twin.grid():
        readout = w.readout({**point, **fixed})
        nbytes, m = dtype_bytes[point["dtype"]], point["m"]
        sweep = [lookup_traffic(T, m, fixed["D_v"], fixed["D_p"], cores, n_rows, nbytes) for T in tokens.values]
        now = lookup_traffic(point["T"], m, fixed["D_v"], fixed["D_p"], cores, n_rows, nbytes)
        traces = []
        for device, bw in bandwidth.items():
            forward = [t["forward"] / bw * 1e6 for t in sweep]
            traces.append(line(f"{device} forward", tokens.values, forward, colors[device]))
            traces.append(
                line(
                    f"{device} forward + backward",
                    tokens.values,
                    [(t["forward"] + t["backward"]) / bw * 1e6 for t in sweep],
                    colors[device],
                    line={"dash": "dash"},
                )
            )
        traces.append(
            here(
                [point["T"]] * 2 * len(bandwidth),
                [v / bw * 1e6 for bw in bandwidth.values() for v in (now["forward"], now["forward"] + now["backward"])],
            )
        )
        twin.add(
            indices,
            readout,
            traces,
            {
                **axes_layout("tokens T", "bandwidth-bound time (µs)", xlog=True, ylog=True),
                "xaxis": {"title": {"text": "tokens T"}, "type": "log", "tickvals": tokens.values[::2]},
                **title(f"T = {point['T']:,}, m = {m}, {point['dtype']}: {now['floor'] / 1e6:,.1f} MB of rows read"),
            },
        )
    return twin


def ch08(root: Path) -> Twin:
    w = load_widget(notebook(root, "08_head_to_head"), "mm-parity-buttons", overrides={"Figure": RecordingFigure})
    controls = [Control.from_widget(w.control(d)) for d in ("parity", "task", "metric")]
    twin = Twin("ch08", "Head to head, live", controls, height=400)
    for indices, point in twin.grid():
        readout, figures = w.run(point)
        traces, layout, ignored = to_plotly(figures[0])
        if ignored:
            raise RuntimeError(f"ch08: drawing calls without a Plotly equivalent: {sorted(set(ignored))}")
        twin.add(indices, readout, traces, {**layout, "margin": {"l": 64, "r": 16, "t": 40, "b": 96}})
    return twin


def ch09(root: Path) -> Twin:
    w = load_widget(notebook(root, "09_scaling_out"), "mm-shard-p-slider")
    ns = w.namespace
    dims, L, GB, TRAIN_STATE = ns["dims"], ns["L"], ns["GB"], ns["TRAIN_STATE"]
    column_split_bytes, replicated_ddp_bytes = ns["column_split_bytes"], ns["replicated_ddp_bytes"]
    ranks, tokens = Control.from_widget(w.control("ranks P")), Control.from_widget(w.control("T per rank"))
    size = Control.from_widget(w.control("tables (B)"))
    twin = Twin("ch09", "Sharding the memory tables, live", [ranks, tokens, size])

    @functools.cache
    def per_rank(P: int, T: int, billions: float) -> tuple[float, float | None, float]:
        # GB per rank: table training state; sent per step by the column split and by DDP (as update())
        table_params = billions * GB
        d = {**dims, "N": int(table_params / (L * (dims["d_value"] + dims["d_pre"])))}
        fits = P == 1 or (dims["d_value"] % math.lcm(P, dims["c"]) == 0 and dims["d_pre"] % P == 0)
        column = column_split_bytes(P, tokens=T, d=d) / GB if fits else None
        return table_params * TRAIN_STATE / P / GB, column, replicated_ddp_bytes(P, d=d) / GB

    def positive(values) -> list:
        return [v if v else None for v in values]  # nothing is sent with P = 1: no point on a log axis

    for indices, point in twin.grid():
        T, billions, P = point["T per rank"], point["tables (B)"], point["ranks P"]
        sweep = [positive(per_rank(p, T, billions)) for p in ranks.values]
        now = positive(per_rank(P, T, billions))
        twin.add(
            indices,
            w.readout(point),
            [
                line("table training state per rank", ranks.values, [s[0] for s in sweep], BLUE),
                line("sent per step: column split", ranks.values, [s[1] for s in sweep], GREEN),
                line("sent per step: replicated + DDP", ranks.values, [s[2] for s in sweep], ORANGE),
                here([P] * 3, list(now)),
            ],
            {
                **axes_layout("ranks P", "GB per rank", xlog=True, ylog=True),
                "xaxis": {"title": {"text": "ranks P"}, "type": "log", "tickvals": ranks.values},
                **title(f"P = {P:,} ranks, T = {T:,} tokens per rank, {size.labels[size.values.index(billions)]}B"),
            },
        )
    return twin


# --------------------------------------------------------------------------- the inventory


@dataclass(frozen=True)
class Widget:
    """A widget of the course: where it is and its twin, or why it has none."""

    chapter: int
    notebook: str  # file name under notebooks/, without .ipynb
    marker: str  # a string only its cell contains: the CSS class it adds for the browser tests
    what: str  # the widget, in words
    build: Callable[[Path], Twin] | None = None
    reason: str = ""  # why it has no twin

    @property
    def twin_id(self) -> str | None:
        return f"ch{self.chapter:02d}" if self.build else None


WIDGETS = [
    Widget(0, "00_welcome", "mm-n-slider", "sliders n and m: a product-key memory's cost per token", ch00),
    Widget(1, "01_ffn_memories", "mm-batch-slider", "batch slider and dtype menu: bytes read per token", ch01),
    Widget(2, "02_product_keys", "mm-grid-n-slider", "sliders n and m: the product-key search drawn", ch02),
    Widget(3, "03_pkm", "mm-usage-slider", "segment slider and query norm: slot usage heat map", ch03),
    Widget(4, "04_peer", "mm-peer-pool-slider", "sliders n, H and m: PEER's parameters and FLOPs", ch04),
    Widget(5, "05_ultramem", "mm-rank-slider", "rank, grid, core and score controls: Tucker recall", ch05),
    Widget(
        6,
        "06_ultramemv2",
        "mm-init-h-slider",
        "five shape sliders: output variance at initialisation",
        reason="its five sliders span 376,832 shapes and each one builds a model and measures its output on "
        "4,096 tokens: too many to precompute",
    ),
    Widget(6, "06_ultramemv2", "mm-dk-slider", "sliders D_k and m: the memory's share of compute", ch06),
    Widget(7, "07_triton_lookup", "mm-lookup-t-slider", "T, m, D_v, D_p and dtype: the lookup's traffic", ch07),
    Widget(8, "08_head_to_head", "mm-parity-buttons", "parity, task and metric: the head-to-head bars", ch08),
    Widget(9, "09_scaling_out", "mm-shard-p-slider", "ranks, tokens and table size: sharding costs", ch09),
]
