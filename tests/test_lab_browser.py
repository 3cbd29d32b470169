"""A chapter notebook in a real JupyterLab: run every cell, move a widget, see its output change.

JupyterLab runs headless on 127.0.0.1 with a token, on a copy of the notebook in a temporary
folder (the committed notebook is never touched), with its own config, settings and workspace
folders. Debian's chromium drives it through Playwright with the network closed. A screenshot
goes to ``test-artifacts/lab.png`` (``lab-<notebook>.png`` for further cases).

To cover another chapter, add a ``LabCase`` to ``LAB_CASES``: its notebook, the CSS class of a
slider (``widget.add_class(...)`` in the notebook), the class of the output that the slider
drives, and the text that output must show after one ArrowRight step.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"


@dataclass(frozen=True)
class LabCase:
    notebook: str  # file name in notebooks/
    slider: str  # CSS selector of the slider to move one step with ArrowRight
    output: str  # CSS selector of the output that the slider's callback rewrites
    expected_after: str  # text the output must contain after the step
    screenshot: str = "lab.png"


LAB_CASES = [
    # n: 512 -> 640 (step 128), so N = 640^2 slots.
    LabCase("00_welcome.ipynb", slider=".mm-n-slider", output=".mm-readout", expected_after="N = 409,600"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path):
    """Start ``jupyter lab`` on a fresh folder; yield (base URL, token, folder); shut it down."""
    root, home = tmp_path / "notebooks", tmp_path / "jupyter"
    root.mkdir()
    settings = {
        # Every cell in the DOM (JupyterLab 4 otherwise renders only the cells near the viewport).
        "notebook-extension/tracker": '{"windowingMode": "none"}',
        # No "official Jupyter news?" toast over the notebook.
        "apputils-extension/notification": '{"fetchNews": "false"}',
    }
    for name, value in settings.items():
        path = home / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(
        os.environ,
        MINIMEM_SEED="0",
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:  # CI runs as root
        command.append("--allow-root")
    log = (tmp_path / "lab.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not start:\n{(tmp_path / 'lab.log').read_text()}")
            time.sleep(0.3)
        yield base, token, root
    finally:
        try:  # a clean shutdown also stops the kernels it started
            request = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(request, timeout=5).close()
            process.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


ALL_CELLS_RUN = """(n) => {
    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
    return prompts.length === n && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""


def start_kernel_session(base: str, token: str, notebook: str) -> None:
    """Start the notebook's kernel session through the REST API.

    JupyterLab would start it lazily, on the first execution, and drop the cells queued meanwhile;
    with a session already there, the opened notebook connects to it.
    """
    body = json.dumps({"path": notebook, "name": notebook, "type": "notebook", "kernel": {"name": "python3"}})
    request = urllib.request.Request(
        f"{base}/api/sessions?token={token}",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).close()


def copy_without_outputs(source: Path, target: Path) -> int:
    """Copy a notebook with its outputs, counts and widget state removed; return its code-cell count."""
    nb = nbformat.read(source, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code_cells:
        cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, target)
    return len(code_cells)


@pytest.mark.browser
@pytest.mark.parametrize("case", LAB_CASES, ids=lambda case: case.notebook)
def test_notebook_runs_and_widget_drives_its_output(case, jupyter_lab, browser):
    base, token, root = jupyter_lab
    n_code = copy_without_outputs(REPO_ROOT / "notebooks" / case.notebook, root / case.notebook)
    external = []

    def route(request_route):
        url = request_route.request.url
        if url.startswith(base) or url.startswith(("ws://127.0.0.1", "data:", "blob:")):
            request_route.continue_()
        else:
            external.append(url)
            request_route.abort()

    context = browser.new_context(viewport={"width": 1400, "height": 1000}, service_workers="block")
    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        start_kernel_session(base, token, case.notebook)
        page.goto(f"{base}/lab/tree/{case.notebook}?token={token}", wait_until="domcontentloaded")
        page.locator(".jp-Notebook .jp-CodeCell").first.wait_for()
        # Connected to the session's kernel: its name in the toolbar, its status idle.
        page.locator(".jp-NotebookPanel-toolbar .jp-KernelName", has_text="Python 3").first.wait_for()
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for()

        # Run > Run All Cells, then wait until every code cell has an execution count.
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(
            "li.lm-Menu-item[data-command='runmenu:run-all'], li.lm-Menu-item[data-command='notebook:run-all-cells']"
        ).first.click()
        page.wait_for_function(ALL_CELLS_RUN, arg=n_code, timeout=60_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for()
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
        assert errors.count() == 0, f"a cell raised: {errors.first.inner_text()}"

        # Move the slider one step from the keyboard; the kernel's callback rewrites the output.
        slider, output = page.locator(case.slider), page.locator(case.output)
        slider.scroll_into_view_if_needed()
        output.wait_for(state="visible")
        before = output.inner_text()
        slider.locator(".noUi-handle").focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(
            "([selector, before]) => document.querySelector(selector).innerText !== before",
            arg=[case.output, before],
            timeout=30_000,
        )
        after = output.inner_text()
        assert case.expected_after in after, f"after one step the output reads {after!r}"
        assert case.expected_after not in before
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / case.screenshot))
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)  # what the page showed, for the failure report
        page.screenshot(path=str(ARTIFACTS / f"failed-{case.screenshot}"))
        raise
    finally:
        context.close()
    assert not external, "JupyterLab requested outside addresses:\n" + "\n".join(external)
