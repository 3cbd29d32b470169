"""Execute chapter notebooks in place, the same way for every author, so the book shows their outputs.

    .venv/bin/python tools/execute_notebooks.py                        # every notebooks/*.ipynb
    .venv/bin/python tools/execute_notebooks.py notebooks/00_welcome.ipynb

Each notebook runs top to bottom with nbclient in its own folder (as nbval and JupyterLab run it),
in a fixed environment (``FIXED_ENV``: notebooks seed from ``MINIMEM_SEED``), with the widget state
stored in the notebook's metadata so that widgets render in the built book. Cell timings are not
recorded, so re-running an unchanged notebook changes as little as possible. A cell that raises
stops that notebook and leaves its file untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
FIXED_ENV = {
    "MINIMEM_SEED": "0",  # notebooks: SEED = int(os.environ.get("MINIMEM_SEED", "0"))
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TQDM_MININTERVAL": "1",  # fewer progress-bar redraws in saved outputs
}
KERNEL_SPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def execute_notebook(path: Path, timeout: int = 600, progress: bool = True) -> nbformat.NotebookNode:
    """Execute ``path`` in its folder and return the executed notebook (the file is not written)."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = dict(KERNEL_SPEC)
    n_code = sum(cell.cell_type == "code" for cell in nb.cells)
    bar = tqdm(total=n_code, desc=path.name, unit="cell", disable=not progress, leave=True)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL_SPEC["name"],
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
        record_timing=False,
        on_cell_executed=lambda **_: bar.update(1),
    )
    saved = {key: os.environ.get(key) for key in FIXED_ENV}
    os.environ.update(FIXED_ENV)  # the kernel inherits this process's environment
    try:
        client.execute()
    finally:
        bar.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def notebook_paths(args: list[str]) -> list[Path]:
    paths = [Path(a).resolve() for a in args] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if path.suffix != ".ipynb" or not path.is_file():
            raise ValueError(f"notebook must be an existing .ipynb file, got {path}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to execute (default: notebooks/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = parser.parse_args(argv)
    try:
        paths = notebook_paths(args.notebooks)
    except ValueError as err:
        parser.error(str(err))
    failed = []
    for path in tqdm(paths, desc="notebooks", unit="nb", disable=len(paths) < 2):
        start = time.perf_counter()
        try:
            nb = execute_notebook(path, timeout=args.timeout)
        except CellExecutionError as err:
            print(f"FAILED {path.name}: a cell raised; the file is unchanged\n{err}", file=sys.stderr)
            failed.append(path.name)
            continue
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(
            f"executed {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}"
            f" in {time.perf_counter() - start:.1f} s"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
