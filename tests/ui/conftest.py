"""Fixtures for the real-browser tests: a JupyterLab server on a free port (token, temporary config,
settings and workspaces, so a user's own JupyterLab setup is neither read nor changed) serving a
copy of a notebook whose parameters point at the engines pytest started, and headless Debian
Chromium driven by Playwright.

Anything that cannot start fails the test with what to do about it: these tests never skip."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("KVBLEND_CHROMIUM", "/usr/bin/chromium")
# JupyterLab's news/update-check toast may cover the widgets; nothing else is turned off.
PAGE_CONFIG = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}


def parameterized_copy(src: Path, dest: Path, params: dict) -> Path:
    """`src` with `params` appended to its `parameters` cell (what papermill would inject)."""
    nb = nbformat.read(src, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    assert cell is not None, f"{src.name} has no cell tagged 'parameters'"
    cell.source += "\n# set by tests/ui\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    nbformat.write(nb, dest)
    return dest


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def lab_factory(tmp_path_factory):
    """start(notebooks: {name: Path}) -> {"url", "token", "dir", "log"}: a JupyterLab server
    serving those notebooks from a temporary folder; stopped at the end of the session."""
    procs: list[subprocess.Popen] = []

    def start(notebooks: dict[str, Path]) -> dict:
        base = tmp_path_factory.mktemp("lab")
        work, cfg = base / "work", base / "config"
        (cfg / "labconfig").mkdir(parents=True)
        work.mkdir()
        (cfg / "labconfig" / "page_config.json").write_text(json.dumps(PAGE_CONFIG))
        for name, path in notebooks.items():
            shutil.copy(path, work / name)
        port, token = free_port(), secrets.token_hex(16)
        env = {**os.environ,
               "JUPYTER_CONFIG_DIR": str(cfg),
               "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
               "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
               "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
               # the kernels import `helpers` from this checkout, installed or not
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log = base / "jupyterlab.log"
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={work}",
               # nothing looks for updates or extensions on the network
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly",
               *(["--allow-root"] if os.geteuid() == 0 else [])]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} before answering on :{port}.\n"
                            f"Command: {' '.join(cmd)}\nLog ({log}):\n{tail(log)}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {url} within 90 s.\nLog ({log}):\n{tail(log)}",
                            pytrace=False)
            time.sleep(0.3)
        return {"url": url, "token": token, "dir": work, "log": log}

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()  # the server shuts its kernels down on SIGTERM
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium through Playwright (its own browser download is not used)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        pytest.fail(f"Playwright is not installed ({err}): run `make setup`.", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"No Chromium at {CHROMIUM}: install Debian's package (`sudo apt-get install chromium`; "
                    "`make setup` does as root) or point KVBLEND_CHROMIUM at a Chromium binary.",
                    pytrace=False)
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox", "--disable-dev-shm-usage"])
    except Exception as err:  # noqa: BLE001 - any launch failure becomes a readable test failure
        pw.stop()
        pytest.fail(f"Chromium ({CHROMIUM}) did not start under Playwright:\n{err}", pytrace=False)
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def page(browser):
    """A fresh page, 1400 x 1800 so the whole quick-start app fits; console errors are kept in
    `page.console_errors` for failure messages."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
    pg = ctx.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
    pg.on("pageerror", lambda e: pg.console_errors.append(f"page error: {e}"))
    yield pg
    ctx.close()
