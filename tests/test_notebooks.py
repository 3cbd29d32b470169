"""The chapter notebooks as committed: executed, clean, in the TOC; and the tools that run them.

nbval itself re-executes every notebook in ``make test`` (``--nbval-lax``, see the Makefile);
these tests check what nbval cannot: the saved state the book renders, what a reader sees (no test
markers, code that fits the page, a closing summary), that a chapter runs outside the checkout
(install cell, ``minimem_tools.course`` paths), the TOC, the sanitizers, and
``tools/execute_notebooks.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from nbval.plugin import get_sanitize_patterns

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
CHAPTER_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
CHECK_TAG = "nbval-check-output"  # nbval's cell tag for a cell whose output must reproduce
# nbval's comment markers (# NBVAL_CHECK_OUTPUT, # NBVAL_SKIP, ...): readers would see them, tags they do not
COMMENT_MARKER = re.compile(r"^\s*#\s*(NBVAL_|PYTEST_VALIDATE_)", re.MULTILINE)
CODE_WIDTH = 88  # the book shows about 90 characters of a code block at 1280 px without scrolling
INSTALL = "minimem @ git+https://github.com/minimem-course/minimem"  # book/_config.yml's repository
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


# Graded exercise -> the library objects whose source solves it (a class counts by its whole source, so
# "PKM" matches show_source(PKM) but not show_source(PKM.__init__)). A chapter may call these objects;
# it must not print their code (issue 15: "a chapter explains and derives, and does not print the graded
# function's solution").
GRADED_SOURCES = {
    "swiglu_ffn": ["swiglu_ffn", "SwiGLU", "SwiGLU.forward"],
    "moe_forward": ["moe_forward", "MoE", "MoE.forward"],
    "expected_distinct": ["expected_distinct"],
    "moe_bytes_per_token": ["moe_bytes_per_token", "bytes_read"],
    "brute_force_topk": ["brute_force_topk"],
    "product_key_topk": ["product_key_topk", "multihead_product_key_topk", "subkey_scores_topk", "_candidate_cells"],
    "kl_from_uniform": ["kl_from_uniform"],
    "usage_metrics": ["usage_metrics", "usage_fraction", "memory_usage_report"],
    "pkm_queries": ["pkm_queries", "ProductKeyRouter", "ProductKeyRouter.queries"],
    "pkm_forward": ["pkm_forward", "PKM", "PKM.forward", "ProductKeyRouter", "ProductKeyRouter.route"],
    "peer_experts": ["peer_experts", "PEER", "PEER.forward"],
    "peer_forward": ["peer_forward", "PEER", "PEER.forward"],
    "rank1_core": ["rank1_core", "rank1_cores"],
    "tucker_topk": ["tucker_topk", "rank1_core", "rank1_cores"],
    "multi_core_read": ["multi_core_read", "memory_lookup_torch"],
    "implicit_value_expansion": ["implicit_value_expansion", "pool_by_block"],
    "principled_value_std": ["principled_value_std", "table_std"],
    "prevalue_read": ["prevalue_read", "UltraMemV2", "UltraMemV2.forward", "memory_lookup_torch"],
    "mcp_percent": ["mcp_percent"],
    "weighted_gather": ["weighted_gather", "_weighted_sum_fwd_kernel", "memory_lookup_triton"],
    "weighted_gather_backward": ["weighted_gather_backward", "_weighted_sum_bwd_kernel"],
    "verdict": ["verdict", "better"],
    "layer_parameters": ["layer_parameters", "memory_layer_parameters"],
    "chunk_cores": ["chunk_cores", "local_cores"],
    "rank_read": ["rank_read", "sharded_memory_lookup"],
    "sharded_lookup": ["sharded_lookup", "sharded_memory_lookup", "ShardedValueTable"],
}
# chapter 8 is edited elsewhere; every other chapter is held to the rule
GRADED_RULE_NOTEBOOKS = [p for p in NOTEBOOKS if not p.name.startswith("08_")]


def graded_functions() -> list[str]:
    """The graded function names, parsed from the exercise stubs (top-level ``def`` of exercises/chN_*.py)."""
    names = []
    for stub in sorted((REPO_ROOT / "exercises").glob("ch*.py")):
        tree = ast.parse(stub.read_text())
        names += [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    return names


def printed_sources(source: str) -> list[str]:
    """What a code cell prints the code of: the arguments of show_source(...) and inspect.getsource(...)."""
    printed = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("show_source", "getsource"):
                printed.append(ast.unparse(node.args[0]))
    return printed


def solution_leaks(nb) -> list[str]:
    """Every place where a notebook prints or defines the solution of a graded exercise."""
    leaks = []
    graded = graded_functions()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        # IPython magics (%pip, !cmd) are not Python: blank them before parsing
        source = re.sub(r"^(\s*)[%!].*$", r"\1pass", cell.source, flags=re.MULTILINE)
        for shown in printed_sources(source):
            for name in graded:
                if any(shown == obj or shown.endswith("." + obj) for obj in GRADED_SOURCES[name]):
                    leaks.append(f"cell {index} prints {shown}, the solution of exercise {name}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name in {n for g in graded for n in (g, g + "_slow")}:
                leaks.append(f"cell {index} defines {node.name}, a solution of a graded exercise")
    return leaks


def test_every_graded_function_has_its_library_objects_listed():
    graded = graded_functions()
    assert len(graded) >= 20 and "product_key_topk" in graded and "prevalue_read" in graded, graded
    assert set(graded) == set(GRADED_SOURCES), (
        f"GRADED_SOURCES must list the library objects of every graded function: "
        f"missing {sorted(set(graded) - set(GRADED_SOURCES))}, stale {sorted(set(GRADED_SOURCES) - set(graded))}"
    )


def test_the_solution_check_catches_printed_and_inline_solutions():
    leaking = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("%pip install -q minimem\nshow_source(product_keys._candidate_cells)"),
            nbformat.v4.new_code_cell("print(inspect.getsource(sharding.sharded_memory_lookup))"),
            nbformat.v4.new_code_cell("def prevalue_read_slow(layer, x):\n    return x"),
            nbformat.v4.new_code_cell("def tucker_topk(s_row, s_col, cores, m):\n    pass"),
            nbformat.v4.new_code_cell("show_source(UltraMemV2.forward)\nshow_source(PKM)"),
        ]
    )
    leaks = solution_leaks(leaking)
    for expected in [
        "cell 0 prints product_keys._candidate_cells, the solution of exercise product_key_topk",
        "cell 1 prints sharding.sharded_memory_lookup, the solution of exercise rank_read",
        "cell 2 defines prevalue_read_slow",
        "cell 3 defines tucker_topk",
        "cell 4 prints UltraMemV2.forward, the solution of exercise prevalue_read",
        "cell 4 prints PKM, the solution of exercise pkm_forward",
    ]:
        assert any(leak.startswith(expected) for leak in leaks), (expected, leaks)
    # a different piece of the same objects is allowed
    allowed = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("show_source(PKM.__init__)\nshow_source(UltraMemV2.table_rows_of)"),
            nbformat.v4.new_code_cell("scores, idx = product_key_topk(q1, q2, k1, k2, 4)  # a call, not its code"),
            nbformat.v4.new_code_cell("def diagonal_topk(q1, q2, k1, k2, m):\n    pass"),
        ]
    )
    assert solution_leaks(allowed) == []


@pytest.mark.parametrize("path", GRADED_RULE_NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_does_not_print_or_define_a_graded_solution(path):
    leaks = solution_leaks(nbformat.read(path, as_version=4))
    assert not leaks, (
        "a chapter explains and derives; it does not print the graded function's solution (show the contract, a "
        f"worked example or a different piece of code instead): {leaks}"
    )


def load_tool():
    spec = importlib.util.spec_from_file_location("execute_notebooks", REPO_ROOT / "tools" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sanitize(text: str) -> str:
    patterns = get_sanitize_patterns((REPO_ROOT / "notebooks" / "nbval_sanitize.cfg").read_text())
    for regex, replace in patterns:
        text = re.sub(regex, replace, text)
    return text


# --------------------------------------------------------------------------- committed notebooks


def test_there_are_chapter_notebooks_and_their_names_are_numbered():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
    bad = [p.name for p in NOTEBOOKS if not CHAPTER_NAME.match(p.name)]
    assert not bad, f"chapter notebooks are named NN_words.ipynb (lower case): {bad}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_executed_top_to_bottom_with_clean_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code if cell.source.strip()]
    assert counts == list(range(1, len(counts) + 1)), (
        f"execution counts {counts}: re-run with `python tools/execute_notebooks.py {path.name}`"
    )
    for cell in code:
        for output in cell.outputs:
            assert output.output_type != "error", f"saved error output in cell:\n{cell.source[:200]}"
            text = json.dumps(output)
            assert str(REPO_ROOT) not in text, "an output shows this machine's checkout path"
    checked = [cell for cell in code if CHECK_TAG in cell.metadata.get("tags", [])]
    assert checked, f"tag at least one cell that prints key numbers with the cell tag {CHECK_TAG}"
    assert all(cell.outputs for cell in checked), f"a {CHECK_TAG} cell has no saved output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shows_readers_no_test_markers_and_fits_the_page(path):
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    marked = [cell.source[:80] for cell in code if COMMENT_MARKER.search(cell.source)]
    assert not marked, f"nbval comment markers are visible to readers; use the cell tag {CHECK_TAG}: {marked}"
    wide = [line for cell in code for line in cell.source.splitlines() if len(line) > CODE_WIDTH]
    assert not wide, f"code lines wider than {CODE_WIDTH} characters scroll in the book: {wide[:5]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_anywhere_and_ends_with_a_summary(path):
    nb = nbformat.read(path, as_version=4)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    # Colab: the first code cell installs minimem when it is missing (and does nothing in a checkout)
    assert "except ImportError" in code[0] and INSTALL in code[0], "first code cell: the install cell"
    # course files and run folders through minimem_tools.course, never relative to notebooks/
    relative = [s[:80] for s in code if re.search(r"[\"']\.\./(configs|results|runs|benchmarks)|Path\(\"\.\.\"\)", s)]
    assert not relative, f"use minimem_tools.course.path / run_dir instead of '../': {relative}"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("## Summary"), "end with a ## Summary cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_displayed_widget_has_saved_state(path):
    nb = nbformat.read(path, as_version=4)
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    shown = [
        output.data[WIDGET_VIEW]["model_id"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if WIDGET_VIEW in output.get("data", {})
    ]
    missing = [model for model in shown if model not in state]
    assert not missing, f"widgets without saved state (the book cannot render them): {missing}"


def test_chapter_0_has_a_widget_and_a_plot():
    nb = nbformat.read(REPO_ROOT / "notebooks" / "00_welcome.ipynb", as_version=4)
    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any(WIDGET_VIEW in output.get("data", {}) for output in outputs)
    assert any("image/png" in output.get("data", {}) for output in outputs)


def test_toc_lists_exactly_the_chapter_notebooks():
    toc = yaml.safe_load((REPO_ROOT / "book" / "_toc.yml").read_text())

    def files(entries):
        for entry in entries or []:
            if "file" in entry:
                yield entry["file"]
            yield from files(entry.get("chapters")) if "chapters" in entry else ()
            yield from files(entry.get("sections")) if "sections" in entry else ()

    listed = [toc["root"], *files(toc.get("parts")), *files(toc.get("chapters"))]
    for name in listed:
        candidates = [REPO_ROOT / f"{name}{suffix}" for suffix in ("", ".md", ".ipynb")]
        assert any(c.is_file() for c in candidates), f"_toc.yml lists {name}, which does not exist"
    chapters = {f"notebooks/{p.stem}" for p in NOTEBOOKS}
    assert chapters <= set(listed), f"notebooks missing from book/_toc.yml: {sorted(chapters - set(listed))}"


# --------------------------------------------------------------------------- nbval sanitizers


def test_sanitizers_normalise_run_dependent_text():
    pairs = [
        ("epoch 3 took 1.52 s (12,345.6 tokens/s)", "epoch 3 took 3 s (9,876 tokens/s)"),
        ("100%|██████████| 6/6 [00:06<00:00,  1.11it/s]", "100%|██████████| 6/6 [00:09<00:00,  0.70it/s]"),
        ("<Tensor at 0x7f27a99e5be0>", "<Tensor at 0x55d0c0ffee00>"),
        ("saved /home/ada/minimem/runs/demo/ckpt.pt", "saved /work/main/runs/demo/ckpt.pt"),
        ("started 2025-01-02 03:04:05.678", "started 2026-11-22 10:11:12"),
        ("lookup 12.5 GB/s, 30ms", "lookup 9 GB/s, 7.25 ms"),
    ]
    for first, second in pairs:
        assert first != second and sanitize(first) == sanitize(second), (first, sanitize(first), sanitize(second))


def test_sanitizers_leave_key_numbers_alone():
    for text in [
        "slots N:       262,144",
        "costs 407x more per token",
        "loss 2.853",
        "512 slots 3 steps",
        "top-m = 32, D_k = 256",
        "1B/7B",
        "ratio 0.17",
    ]:
        assert sanitize(text) == text


# --------------------------------------------------------------------------- tools/execute_notebooks.py


def write_notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_execute_notebooks_runs_in_place_with_fixed_env_and_widget_state(tmp_path):
    tool = load_tool()
    path = tmp_path / "01_demo.ipynb"
    write_notebook(
        path,
        "import os\nprint('seed', os.environ['MINIMEM_SEED'], 'cwd', os.path.basename(os.getcwd()))",
        "import ipywidgets as w\nslider = w.IntSlider(value=7)\nslider",
    )
    assert tool.main([str(path)]) == 0
    nb = nbformat.read(path, as_version=4)
    assert [c.execution_count for c in nb.cells] == [1, 2]
    assert nb.cells[0].outputs[0]["text"] == f"seed 0 cwd {tmp_path.name}\n"
    model_id = nb.cells[1].outputs[0]["data"][WIDGET_VIEW]["model_id"]
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    assert state[model_id]["model_name"] == "IntSliderModel" and state[model_id]["state"]["value"] == 7
    assert all("execution" not in c.metadata for c in nb.cells), "cell timings must not be recorded"


def test_execute_notebooks_leaves_a_failing_notebook_untouched(tmp_path, capsys):
    tool = load_tool()
    path = tmp_path / "02_broken.ipynb"
    write_notebook(path, "x = 1", "raise ValueError('boom')")
    before = path.read_text()
    assert tool.main([str(path)]) == 1
    assert path.read_text() == before
    assert "FAILED 02_broken.ipynb" in capsys.readouterr().err


def test_execute_notebooks_rejects_paths_that_are_not_notebooks(tmp_path, capsys):
    tool = load_tool()
    (tmp_path / "notes.txt").write_text("hi")
    for bad in (tmp_path / "notes.txt", tmp_path / "missing.ipynb"):
        with pytest.raises(SystemExit):
            tool.main([str(bad)])
        assert "must be an existing .ipynb file" in capsys.readouterr().err
