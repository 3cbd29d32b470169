"""The chapter notebooks as committed: executed, clean, in the TOC; and the tools that run them.

nbval itself re-executes every notebook in ``make test`` (``--nbval-lax``, see the Makefile);
these tests check what nbval cannot: the saved state the book renders, the TOC, the sanitizers,
and ``tools/execute_notebooks.py``.
"""

from __future__ import annotations

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
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


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
    checked = [cell for cell in code if "# NBVAL_CHECK_OUTPUT" in cell.source]
    assert checked, "mark at least one cell that prints key numbers with # NBVAL_CHECK_OUTPUT"
    assert all(cell.outputs for cell in checked), "a # NBVAL_CHECK_OUTPUT cell has no saved output"


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
