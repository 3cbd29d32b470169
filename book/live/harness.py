"""Machinery of the live figures: run a chapter's widget cell without a kernel, and pack a twin.

A twin's numbers come from the chapter's own code. :func:`load_widget` reads the notebook,
executes the code cells the widget cell depends on (only those: a dependency slice over the
top-level statements, so a chapter's training runs or plots are not redone unless the widget
reads them), then executes the widget cell itself with a stand-in ``ipywidgets`` module. The
stand-in records every control (its kind, range and initial value), every output widget and
every ``observe`` callback, so that :meth:`LoadedWidget.readout` can set the controls to any
point of their grid and call the chapter's own update function: the readout text a twin shows
is the HTML that function writes, character for character.

:class:`Twin` packs what a generator computes into the JSON the page's JavaScript reads
(``book/_static/live-figures.js``): the controls, a base Plotly figure, and one state per grid
point (the readout, a patch per trace and a layout patch). Readout fragments and patches are
deduplicated, so thousands of states stay small.
"""

from __future__ import annotations

import ast
import contextlib
import io
import itertools
import json
import math
import re
import symtable
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

# --------------------------------------------------------------------------- notebooks


def code_cells(notebook: Path) -> list[str]:
    """The notebook's code cells as Python: IPython syntax (``%magic``, ``!cmd``) transformed."""
    from IPython.core.inputtransformer2 import TransformerManager

    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    transform = TransformerManager().transform_cell
    return [transform("".join(c["source"])) for c in cells if c["cell_type"] == "code"]


def widget_cells(notebook: Path) -> list[int]:
    """Indices (among code cells) of the cells whose saved output is an ipywidgets view holding a
    control (progress bars and other output-only widgets are left out: see :func:`saved_controls`)."""
    cells = [c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    controls = saved_controls(notebook)
    view = "application/vnd.jupyter.widget-view+json"
    return [
        i
        for i, c in enumerate(cells)
        if any(o.get("data", {}).get(view, {}).get("model_id") in controls for o in c.get("outputs", []))
    ]


def widget_model_ids(notebook: Path, marker: str) -> list[str]:
    """The saved ``model_id`` of each widget view output by the one code cell containing ``marker``."""
    cells = [c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    hits = [c for c in cells if marker in "".join(c["source"])]
    if len(hits) != 1:
        raise LookupError(f"{notebook.name}: {len(hits)} code cells contain {marker!r} (expected exactly 1)")
    return [
        o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
        for o in hits[0].get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]


CONTROL_MODEL = re.compile(
    r"(Slider|Dropdown|ToggleButtons?|RadioButtons|Checkbox|Text|Textarea|Button|Select|SelectMultiple|Play)Model$"
)


def saved_controls(notebook: Path) -> set[str]:
    """The model ids of the widget views saved in ``notebook`` that hold a control (a slider, a menu,
    buttons...), as opposed to output-only widgets such as tqdm's progress bars."""
    metadata = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {})
    state = metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})

    def has_control(model_id: str, seen: set[str]) -> bool:
        if model_id in seen or model_id not in state:
            return False
        seen.add(model_id)
        model = state[model_id]
        if CONTROL_MODEL.search(model.get("model_name", "")):
            return True
        children = model.get("state", {}).get("children", [])
        return any(has_control(str(c).removeprefix("IPY_MODEL_"), seen) for c in children)

    return {model_id for model_id in state if has_control(model_id, set())}


def saved_readout(notebook: Path, marker: str) -> str | None:
    """The HTML the widget of the cell containing ``marker`` showed when the notebook was saved
    (its HTML outputs, in order), or None when the notebook has no saved widget state for it."""
    metadata = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {})
    state = metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    try:
        ids = widget_model_ids(notebook, marker)
    except LookupError:
        return None
    if not ids or ids[-1] not in state:
        return None
    html: list[str] = []

    def walk(model_id: str) -> None:
        model = state.get(model_id, {})
        if model.get("model_name") == "HTMLModel":
            html.append(model.get("state", {}).get("value", ""))
        for child in model.get("state", {}).get("children", []):
            walk(str(child).removeprefix("IPY_MODEL_"))

    walk(ids[-1])
    return "".join(html)


def find_cell(cells: list[str], marker: str, notebook: Path) -> int:
    hits = [i for i, source in enumerate(cells) if marker in source]
    if len(hits) != 1:
        raise LookupError(f"{notebook.name}: {len(hits)} code cells contain {marker!r} (expected exactly 1)")
    return hits[0]


@dataclass
class _Statement:
    cell: int
    node: ast.stmt
    source: str
    binds: set[str]
    needs: set[str]


def _bound_names(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds in the module (nested function and class bodies excluded)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    names: set[str] = set()
    stack: list[ast.AST] = [node]
    while stack:
        current = stack.pop()
        for child in ast.iter_child_nodes(current):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(child.name)
            elif isinstance(child, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                continue
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                names |= _bound_names(child)
            else:
                if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                    names.add(child.id)
                stack.append(child)
    return names


def _global_reads(source: str) -> set[str]:
    """Module-level names a piece of code reads, in any scope of it (symtable's view)."""
    top = symtable.symtable(source, "<cell>", "exec")
    names = {s.get_name() for s in top.get_symbols() if s.is_referenced()}
    stack = list(top.get_children())
    while stack:
        table = stack.pop()
        stack.extend(table.get_children())
        for s in table.get_symbols():
            if s.is_referenced() and (s.is_global() or table.get_type() == "class" and not s.is_assigned()):
                names.add(s.get_name())
    return names


def _statements(cells: list[str], upto: int) -> list[_Statement]:
    out = []
    for index, source in enumerate(cells[:upto]):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # not Python even after IPython's transforms: nothing a twin can use
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            # whole lines, decorators included (a FunctionDef's own position starts at `def`)
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            segment = "".join(lines[first - 1 : node.end_lineno])
            binds = _bound_names(node)
            reads = _global_reads(segment)
            needs = reads if isinstance(node, ast.AugAssign) else reads - binds
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                needs = _global_reads(segment)  # a recursive function reads its own name: fine
                needs.discard(node.name)
            out.append(_Statement(index, node, segment, binds, needs))
    return out


def dependency_slice(cells: list[str], cell: int) -> list[str]:
    """Sources of the top-level statements of ``cells[:cell]`` that ``cells[cell]`` depends on, in order."""
    earlier = _statements(cells, cell)
    target_reads = _global_reads(cells[cell])
    chosen: set[int] = set()

    def require(names: Iterable[str], before: int) -> None:
        for name in names:
            binder = next((i for i in range(before - 1, -1, -1) if name in earlier[i].binds), None)
            if binder is not None and binder not in chosen:
                chosen.add(binder)
                require(earlier[binder].needs, binder)

    require(sorted(target_reads), len(earlier))
    return [earlier[i].source for i in sorted(chosen)]


# --------------------------------------------------------------------------- a stand-in ipywidgets


class FakeWidget:
    """Records what a chapter builds: keyword arguments, classes and observers; never renders."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.kind = type(self).__name__
        self.children = list(args[0]) if args else list(kwargs.pop("children", []))
        self.classes: list[str] = []
        self.observers: list[Callable] = []
        self.__dict__.update(kwargs)
        self.initial = kwargs.get("value")
        _REGISTRY.append(self)

    def add_class(self, name: str):
        self.classes.append(name)
        return self

    def observe(self, handler: Callable, names: Any = None, type: str = "change") -> None:  # noqa: A002
        self.observers.append(handler)

    def __repr__(self) -> str:
        return f"<fake {self.kind} {getattr(self, 'description', '')!r}>"


_REGISTRY: list[FakeWidget] = []
WIDGET_KINDS = (
    "IntSlider",
    "FloatSlider",
    "FloatLogSlider",
    "SelectionSlider",
    "Dropdown",
    "ToggleButtons",
    "RadioButtons",
    "Checkbox",
    "HTML",
    "Image",
    "Output",
    "Label",
    "VBox",
    "HBox",
    "Layout",
)
CONTROL_KINDS = {"IntSlider", "FloatSlider", "FloatLogSlider", "SelectionSlider", "Dropdown", "ToggleButtons"}


def fake_ipywidgets() -> types.ModuleType:
    module = types.ModuleType("ipywidgets")
    for kind in WIDGET_KINDS:
        setattr(module, kind, type(kind, (FakeWidget,), {}))

    def interact(*args, **kwargs):
        raise NotImplementedError("interact() has no twin support: build the widget from controls and observe()")

    module.interact = module.interactive = interact
    return module


def options_of(widget: FakeWidget) -> list[tuple[str, Any]]:
    """(label, value) pairs of a selection control, as ipywidgets reads ``options``."""
    pairs = []
    for option in widget.options:
        if isinstance(option, tuple) and len(option) == 2:
            pairs.append((str(option[0]), option[1]))
        else:
            pairs.append((str(option), option))
    return pairs


def grid_of(widget: FakeWidget) -> list[tuple[str, Any]]:
    """(label, value) of every position of a control, with ipywidgets' defaults for min, max, step."""
    kind = widget.kind
    if kind == "IntSlider":
        lo, hi, step = getattr(widget, "min", 0), getattr(widget, "max", 100), getattr(widget, "step", 1)
        return [(str(v), v) for v in range(lo, hi + 1, step)]
    if kind in ("SelectionSlider", "Dropdown", "ToggleButtons", "RadioButtons"):
        return options_of(widget)
    if kind == "FloatLogSlider":
        base, lo, hi = getattr(widget, "base", 10.0), getattr(widget, "min", 0.0), getattr(widget, "max", 4.0)
        step = getattr(widget, "step", 0.1)
        count = round((hi - lo) / step)
        values = [round(base ** (lo + k * step), 12) for k in range(count + 1)]
        if widget.initial is not None and widget.initial not in values:
            values = sorted([*values, widget.initial])  # the saved starting point stays reachable
        fmt = getattr(widget, "readout_format", ".3g")
        return [(format(v, fmt), v) for v in values]
    raise NotImplementedError(f"no grid for a {kind}")


@dataclass
class LoadedWidget:
    """A chapter's widget cell, executed with stand-in widgets: its namespace, controls and outputs."""

    notebook: Path
    namespace: dict
    controls: list[FakeWidget]
    outputs: list[FakeWidget]
    callbacks: list[Callable]
    source: str  # the code that ran: the dependency slice and the widget cell

    def control(self, description: str) -> FakeWidget:
        hits = [c for c in self.controls if getattr(c, "description", None) == description]
        if len(hits) != 1:
            names = [getattr(c, "description", None) for c in self.controls]
            raise LookupError(f"{self.notebook.name}: no single control {description!r} among {names}")
        return hits[0]

    def run(self, values: dict[str, Any]) -> tuple[str, list["RecordingFigure"]]:
        """Set the controls (by description), run the chapter's update callbacks: the HTML outputs
        and the figures drawn (when ``matplotlib.figure.Figure`` is replaced by :class:`RecordingFigure`)."""
        for description, value in values.items():
            self.control(description).value = value
        RecordingFigure.created.clear()
        with contextlib.redirect_stdout(io.StringIO()):
            for callback in self.callbacks:
                callback({"name": "value", "new": None, "old": None, "type": "change"})
        figures = list(RecordingFigure.created)
        RecordingFigure.created.clear()
        return "".join(str(w.value) for w in self.outputs if w.kind == "HTML"), figures

    def readout(self, values: dict[str, Any]) -> str:
        return self.run(values)[0]

    def initial(self) -> dict[str, Any]:
        """The controls' starting values (by description)."""
        return {c.description: c.initial for c in self.controls}


def load_widget(
    notebook: Path, marker: str, overrides: dict[str, Any] | None = None, upto_marker: str | None = None
) -> LoadedWidget:
    """Execute the code cell of ``notebook`` containing ``marker`` with stand-in widgets.

    Only the earlier top-level statements it depends on run first. ``overrides`` replace names in
    the namespace once the widget cell has run (say, a figure renderer the twin replaces by
    Plotly, so that the update callback skips drawing PNGs it does not need).
    """
    cells = code_cells(notebook)
    index = find_cell(cells, marker, notebook)
    prelude = dependency_slice(cells, index)
    namespace: dict[str, Any] = {"__name__": f"minimem_live_{notebook.stem}"}
    _REGISTRY.clear()
    fake = fake_ipywidgets()
    saved = sys.modules.get("ipywidgets")
    sys.modules["ipywidgets"] = fake
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for source in prelude:
                exec(compile(source, f"<{notebook.name} slice>", "exec"), namespace)
            exec(compile(cells[index], f"<{notebook.name} widget cell>", "exec"), namespace)
    finally:
        if saved is None:
            sys.modules.pop("ipywidgets", None)
        else:
            sys.modules["ipywidgets"] = saved
    widgets = list(_REGISTRY)
    _REGISTRY.clear()
    controls = [w for w in widgets if w.kind in CONTROL_KINDS]
    callbacks = list(dict.fromkeys(cb for w in controls for cb in w.observers))
    if not callbacks:
        raise LookupError(f"{notebook.name}: the cell with {marker!r} registers no observe() callback")
    namespace.update(overrides or {})
    return LoadedWidget(
        notebook=notebook,
        namespace=namespace,
        controls=controls,
        outputs=[w for w in widgets if w.kind in ("HTML", "Image")],
        callbacks=callbacks,
        source="\n\n".join([*prelude, cells[index]]),
    )


# --------------------------------------------------------------------------- packing a twin


_PIECE = re.compile(r"(<[^>]+>|[;,:] |\(|\))")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (Plotly draws a gap), floats keep 6 significant digits."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = float(f"{value:.6g}")
        return int(value) if value.is_integer() and abs(value) < 1e15 else value  # 6, not 6.0
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return value


@dataclass
class Control:
    """One control of a twin: the widget's description, its grid, and where it starts."""

    name: str
    labels: list[str]
    values: list[Any]
    default: int
    kind: str = "slider"  # slider, buttons or select
    max_by: str | None = None  # this control's value may not exceed that control's (ch. 2's m <= n)

    @classmethod
    def from_widget(cls, widget: FakeWidget, values: list[Any] | None = None, **kwargs) -> "Control":
        grid = grid_of(widget)
        if values is not None:
            grid = [(label, v) for label, v in grid if v in values]
        labels, vals = [label for label, _ in grid], [v for _, v in grid]
        if widget.initial not in vals:
            raise ValueError(f"{widget!r}: its initial value {widget.initial!r} is not on the twin's grid")
        kind = {"ToggleButtons": "buttons", "RadioButtons": "buttons", "Dropdown": "select"}.get(widget.kind, "slider")
        return cls(widget.description, labels, vals, vals.index(widget.initial), kind, **kwargs)


_MISSING = object()


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _common(values: list) -> Any:
    """The part shared by all ``values`` (dicts: key by key, recursively); ``_MISSING`` if none."""
    if all(isinstance(v, dict) for v in values):
        keys = set(values[0]).intersection(*values[1:])
        shared = {k: _common([v[k] for v in values]) for k in sorted(keys)}
        return {k: v for k, v in shared.items() if v is not _MISSING}
    first = _canon(values[0])
    return values[0] if all(_canon(v) == first for v in values[1:]) else _MISSING


def _diff(value: dict, base: dict) -> dict:
    """What ``value`` adds to or changes in ``base`` (the page merges it back, arrays whole)."""
    out = {}
    for key, v in value.items():
        if key not in base:
            out[key] = v
        elif isinstance(v, dict) and isinstance(base[key], dict):
            sub = _diff(v, base[key])
            if sub:
                out[key] = sub
        elif _canon(v) != _canon(base[key]):
            out[key] = v
    return out


@dataclass
class Twin:
    """A live figure: controls, and per grid point the readout HTML, Plotly traces and layout.

    Generators add whole traces and layouts; :meth:`to_json` factors out what all states share
    (the base figure) and keeps per state only the differences, deduplicated, so that thousands
    of states stay small. Traces are matched across states by position or by slot name.
    """

    id: str
    title: str
    controls: list[Control]
    narrow: dict = field(default_factory=dict)  # layout patch for narrow screens (< 600 px)
    note: str = ""  # shown under the figure: what the twin fixes or leaves out
    height: int = 420
    config: dict = field(default_factory=dict)  # extra Plotly config
    _states: dict[str, tuple[str, dict[str, dict], dict]] = field(default_factory=dict)

    def grid(self) -> Iterable[tuple[tuple[int, ...], dict[str, Any]]]:
        """Every valid grid point: (indices, {control name: value})."""
        for indices in itertools.product(*(range(len(c.values)) for c in self.controls)):
            point = {c.name: c.values[i] for c, i in zip(self.controls, indices)}
            if all(c.max_by is None or point[c.name] <= point[c.max_by] for c in self.controls):
                yield indices, point

    def add(
        self, indices: tuple[int, ...], readout: str, traces: list[dict] | dict[str, dict], layout: dict | None = None
    ) -> None:
        """One state: the readout HTML, the traces (a list, or a dict by slot) and the layout."""
        if isinstance(traces, list):
            traces = {str(i): t for i, t in enumerate(traces)}
        self._states[",".join(map(str, indices))] = (readout, _clean(traces), _clean(layout or {}))

    def key(self, values: dict[str, Any]) -> str:
        return ",".join(str(c.values.index(values[c.name])) for c in self.controls)

    def state(self, values: dict[str, Any]) -> dict:
        """The readout, traces and layout of one grid point (what the page shows there)."""
        readout, traces, layout = self._states[self.key(values)]
        return {"readout": readout, "data": traces, "layout": layout}

    def to_json(self) -> dict:
        states = list(self._states.values())
        slots = list(dict.fromkeys(slot for _, traces, _ in states for slot in traces))
        base = []
        for slot in slots:
            shared = _common([traces[slot] for _, traces, _ in states if slot in traces])
            base.append(shared if shared is not _MISSING else {})
        layout = _common([layout for _, _, layout in states])
        layout = layout if layout is not _MISSING else {}
        pieces: dict[str, int] = {}
        patches: dict[str, int] = {}

        def patch(value: dict) -> int:
            return patches.setdefault(_canon(value), len(patches))

        packed = {}
        for key, (readout, traces, state_layout) in self._states.items():
            packed[key] = [
                [pieces.setdefault(p, len(pieces)) for p in _PIECE.split(readout) if p],
                [patch(_diff(traces[s], b)) if s in traces else -1 for s, b in zip(slots, base)],
                patch(_diff(state_layout, layout)),
            ]
        return {
            "id": self.id,
            "title": self.title,
            "note": self.note,
            "height": self.height,
            "config": self.config,
            "controls": [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "labels": c.labels,
                    "values": _clean(c.values) if all(isinstance(v, (int, float)) for v in c.values) else None,
                    "default": c.default,
                    "max_by": c.max_by,
                }
                for c in self.controls
            ],
            "base": base,
            "layout": layout,
            "narrow": _clean(self.narrow),
            "pieces": list(pieces),
            "patches": [json.loads(p) for p in patches],
            # per state: readout pieces, a patch index per trace (-1: hidden here), a layout patch index
            "states": packed,
        }


# --------------------------------------------------------------------------- matplotlib, recorded


class RecordingAxes:
    """Records the drawing calls a chapter makes on a matplotlib Axes (nothing is drawn)."""

    def __init__(self, figure: "RecordingFigure", index: int):
        self.figure, self.index, self.calls = figure, index, []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return _Handle(self, len(self.calls) - 1)

        return record


@dataclass
class _Handle:
    """What a recorded call returns (an AxesImage, a Line2D...): remembers which call made it."""

    axes: RecordingAxes
    call: int


class RecordingFigure:
    """A stand-in for ``matplotlib.figure.Figure`` that records what the chapter draws on it."""

    created: list["RecordingFigure"] = []

    def __init__(self, figsize: tuple[float, float] = (6.4, 4.8), **kwargs: Any):
        self.figsize, self.axes, self.calls, self.grid = figsize, [], [], (1, 1)
        RecordingFigure.created.append(self)

    def subplots(self, nrows: int = 1, ncols: int = 1, **kwargs: Any):
        self.grid = (nrows, ncols)
        self.axes = [RecordingAxes(self, i) for i in range(nrows * ncols)]
        if nrows == ncols == 1:
            return self.axes[0]
        if nrows == 1 or ncols == 1:
            return list(self.axes)
        return [self.axes[r * ncols : (r + 1) * ncols] for r in range(nrows)]

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))

        return record


_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def colorscale(cmap: Any, steps: int = 16) -> list:
    """A matplotlib colormap (by name or object) as a Plotly colorscale."""
    import matplotlib
    from matplotlib.colors import to_hex

    colormap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    return [[round(k / (steps - 1), 4), to_hex(colormap(k / (steps - 1)))] for k in range(steps)]


IGNORED_CALLS = {"savefig", "tight_layout", "legend", "grid", "set_aspect"}


def css_color(color: Any, alpha: float | None = None) -> Any:
    """A matplotlib colour as CSS (``C3`` is the default cycle's fourth colour)."""
    if isinstance(color, (list, tuple)) and color and isinstance(color[0], str):
        return [css_color(c, alpha) for c in color]
    from matplotlib.colors import to_rgba

    if isinstance(color, str) and re.fullmatch(r"C\d", color):
        color = _TAB10[int(color[1])]
    r, g, b, a = to_rgba(color)
    a = a if alpha is None else alpha
    return f"rgba({round(255 * r)},{round(255 * g)},{round(255 * b)},{a:g})"


def _rounded(array: Any, digits: int = 4) -> Any:
    import numpy as np

    values = np.asarray(array, dtype=float)
    return (
        [[float(f"{v:.{digits}g}") for v in row] for row in values.tolist()]
        if values.ndim == 2
        else [float(f"{v:.{digits}g}") for v in values.tolist()]
    )


def to_plotly(figure: RecordingFigure) -> tuple[dict[str, dict], dict, list[str]]:
    """Plotly traces (by slot), layout and ignored call names for what was drawn on ``figure``.

    The slot of a trace is its subplot and its kind (``ax0/imshow``...), so that every state of
    a twin puts the same kind of trace at the same place (Plotly animates between them).
    """
    import numpy as np

    traces: dict[str, dict] = {}
    layout: dict[str, Any] = {"shapes": [], "annotations": [], "barmode": "overlay", "showlegend": False}
    ignored: list[str] = []
    nrows, ncols = figure.grid
    for axes in figure.axes:
        suffix = "" if axes.index == 0 else str(axes.index + 1)
        xref, yref = f"x{suffix}", f"y{suffix}"
        xaxis, yaxis = layout.setdefault(f"xaxis{suffix}", {}), layout.setdefault(f"yaxis{suffix}", {})
        column, row = axes.index % ncols, axes.index // ncols
        gap = 0.1 if ncols > 1 else 0.0
        width = (1 - gap * (ncols - 1)) / ncols
        xaxis["domain"] = [column * (width + gap), column * (width + gap) + width]
        height = (1 - 0.15 * (nrows - 1)) / nrows
        top = 1 - row * (height + 0.15)
        yaxis["domain"] = [top - height, top]
        xaxis["anchor"], yaxis["anchor"] = yref, xref
        extent = None  # the image's (columns, rows), once imshow is seen
        spans: dict[str, list] = {"axhspan": [], "axvspan": []}
        span_style: dict[str, dict] = {}
        count: dict[str, int] = {}

        def slot(kind: str, count: dict = count, index: int = axes.index) -> str:
            count[kind] = count.get(kind, 0) + 1
            return f"ax{index}/{kind}{count[kind]}"

        for name, args, kwargs in axes.calls:
            if name == "imshow":
                data = np.asarray(args[0], dtype=float)
                extent = (data.shape[1], data.shape[0])
                trace = {"type": "heatmap", "xaxis": xref, "yaxis": yref, "showscale": False}
                trace["colorscale"] = colorscale(kwargs.get("cmap", "viridis"))
                norm = kwargs.get("norm")
                if norm is not None and type(norm).__name__ == "LogNorm":
                    trace["z"] = _rounded(np.log10(data), 3)
                    lo, hi = math.log10(norm.vmin), math.log10(norm.vmax)
                    trace.update(zmin=lo, zmax=hi)
                    ticks = list(range(math.ceil(lo), math.floor(hi) + 1))
                    trace["colorbar"] = {
                        "tickvals": [lo, *ticks] if lo < ticks[0] else ticks,
                        "ticktext": [f"{norm.vmin:g}", *(f"{10**t:g}" for t in ticks)]
                        if lo < ticks[0]
                        else [f"{10**t:g}" for t in ticks],
                    }
                    trace["hovertemplate"] = "row %{y}, column %{x}<br>log10 = %{z:.2f}<extra></extra>"
                else:
                    trace["z"] = _rounded(data, 3)
                    trace["hovertemplate"] = "row %{y}, column %{x}: %{z:.3f}<extra></extra>"
                traces[slot("imshow")] = trace
                # the image's own extent, rows downwards (as imshow), square cells
                yaxis.update(range=[extent[1] - 0.5, -0.5], scaleanchor=xref, constrain="domain")
                xaxis.update(range=[-0.5, extent[0] - 0.5], constrain="domain")
            elif name in ("axhspan", "axvspan"):
                spans[name].append(args[:2])
                span_style[name] = kwargs
            elif name == "scatter":
                size = kwargs.get("s", 36)
                marker = {"size": round(math.sqrt(size) * 1.2, 1), "color": css_color(kwargs.get("c", "C0"))}
                if "edgecolors" in kwargs:
                    marker["line"] = {"color": css_color(kwargs["edgecolors"]), "width": kwargs.get("linewidths", 1)}
                traces[slot("scatter")] = {
                    "type": "scatter",
                    "mode": "markers",
                    "x": _rounded(args[0]),
                    "y": _rounded(args[1]),
                    "marker": marker,
                    "xaxis": xref,
                    "yaxis": yref,
                    "hovertemplate": "(%{x}, %{y})<extra></extra>",
                }
            elif name == "plot":
                traces[slot("plot")] = {
                    "type": "scatter",
                    "mode": "lines",
                    "x": _rounded(args[0]),
                    "y": _rounded(args[1]),
                    "line": {"color": css_color(kwargs.get("color", "C0")), "width": kwargs.get("lw", 1.5) * 1.3},
                    "xaxis": xref,
                    "yaxis": yref,
                    "hoverinfo": "skip",
                }
            elif name == "bar":
                x, heights = list(args[0]), _rounded(args[1])
                trace = {"type": "bar", "x": x, "y": heights, "xaxis": xref, "yaxis": yref}
                if kwargs.get("yerr") is not None:
                    trace["error_y"] = {"type": "data", "array": _rounded(kwargs["yerr"]), "visible": True}
                if "color" in kwargs:
                    trace["marker"] = {"color": css_color(kwargs["color"])}
                traces[slot("bar")] = trace
            elif name == "add_patch":
                patch = args[0]
                (x0, y0), w, h = patch.get_xy(), patch.get_width(), patch.get_height()
                shape = {"type": "rect", "xref": xref, "yref": yref, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h}
                shape["line"] = {"color": css_color(patch.get_edgecolor()), "width": patch.get_linewidth() * 1.3}
                if patch.get_fill():
                    shape["fillcolor"] = css_color(patch.get_facecolor())
                layout["shapes"].append(shape)
            elif name == "text":
                text = {"text": str(args[2]), "x": args[0], "y": args[1], "showarrow": False}
                layout["annotations"].append({**text, "xref": f"{xref} domain", "yref": f"{yref} domain"})
            elif name == "set_axis_off":
                xaxis["visible"] = yaxis["visible"] = False
            elif name in ("set", "set_title", "set_xlabel", "set_ylabel", "set_xticks", "set_xticklabels", "set_ylim"):
                settings = dict(kwargs) if name == "set" else {name[4:]: args[0] if len(args) == 1 else args}
                if name == "set_xticklabels":
                    xaxis["tickangle"] = -kwargs.get("rotation", 0)
                for key, value in settings.items():
                    if key == "title":
                        layout["annotations"].append(
                            {
                                "text": str(value),
                                "x": 0.5,
                                "y": 1.0,
                                "xref": f"{xref} domain",
                                "yref": f"{yref} domain",
                                "yanchor": "bottom",
                                "showarrow": False,
                                "font": {"size": 12},
                            }
                        )
                    elif key in ("xlabel", "ylabel"):
                        (xaxis if key == "xlabel" else yaxis)["title"] = {"text": str(value)}
                    elif key == "xticks":
                        xaxis.update(tickmode="array", tickvals=list(value))
                    elif key == "xticklabels":
                        xaxis["ticktext"] = [str(v) for v in value]
                    elif key == "ylim":
                        yaxis["range"] = _clean(list(value))
                    else:
                        ignored.append(f"set({key}=)")
            elif name not in IGNORED_CALLS:
                ignored.append(name)
        for name, kind in (("axhspan", "h"), ("axvspan", "v")):
            if not spans[name]:
                continue
            style = span_style[name]
            centres = [(a + b) / 2 for a, b in spans[name]]
            widths = [b - a for a, b in spans[name]]
            length = (extent[0] if kind == "h" else extent[1]) if extent else 1
            traces[slot(name)] = {
                "type": "bar",
                "orientation": kind,
                ("y" if kind == "h" else "x"): _rounded(centres),
                ("x" if kind == "h" else "y"): [length] * len(centres),
                "width": widths[0] if len(set(widths)) == 1 else _rounded(widths),
                "base": -0.5 if extent else 0,
                "marker": {"color": css_color(style.get("color", "grey"), style.get("alpha")), "line": {"width": 0}},
                "xaxis": xref,
                "yaxis": yref,
                "hoverinfo": "skip",
            }
    for name, args, kwargs in figure.calls:
        if name == "suptitle":
            layout["title"] = {"text": str(args[0]), "x": 0.5, "xanchor": "center", "font": {"size": 13}}
        elif name == "colorbar":
            handle = args[0]
            image_slots = [k for k in traces if k.startswith(f"ax{handle.axes.index}/imshow")]
            for key in image_slots:
                traces[key]["showscale"] = True
                traces[key].setdefault("colorbar", {})["title"] = {"text": kwargs.get("label", ""), "side": "right"}
        elif name not in IGNORED_CALLS:
            ignored.append(f"figure.{name}")
    return traces, layout, ignored


def narrow_layout(figure: RecordingFigure, height_per_row: int = 330, gap: float = 0.2) -> dict:
    """Layout patch stacking a figure's subplots in one column (for phones)."""
    count = len(figure.axes)
    if count <= 1:
        return {}
    patch: dict[str, Any] = {"height": 60 + height_per_row * count}
    height = (1 - gap * (count - 1)) / count
    for i in range(count):
        suffix = "" if i == 0 else str(i + 1)
        top = 1 - i * (height + gap)
        patch[f"xaxis{suffix}"] = {"domain": [0, 1]}
        patch[f"yaxis{suffix}"] = {"domain": [top - height, top]}
    return patch
