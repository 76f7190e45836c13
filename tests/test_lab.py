"""`make lab` starts JupyterLab as root (this suite runs as root in CI) and as any user: the same
command line the Makefile runs, on a taken port, with a token, serving the first notebook."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from helpers.lab import NOTEBOOK, ROOT, lab_command
from tests.conftest import free_port


def wait_for(url: str, timeout: float = 60):
    """The URL's response once the server accepts connections (it prints its URL a bit before)."""
    deadline = time.time() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=20)
        except urllib.error.URLError as err:
            if isinstance(err, urllib.error.HTTPError) or time.time() > deadline:
                raise
            time.sleep(0.5)


def test_makefile_runs_lab_command():
    assert "-m helpers.lab" in (ROOT / "Makefile").read_text()


@pytest.mark.slow
def test_lab_starts_on_a_taken_port_with_token(tmp_path):
    port = free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    with socket.socket() as taken:  # someone else holds the port we ask for
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cmd = lab_command(NOTEBOOK, port, "--no-browser", "--ServerApp.ip=127.0.0.1")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            url, log = None, []
            deadline = time.time() + 90
            while url is None and time.time() < deadline and proc.poll() is None:
                line = proc.stdout.readline()
                log.append(line)
                m = re.search(r"(http://127\.0\.0\.1:(\d+)/lab\S*\?token=(\w+))", line)
                if m:
                    url, got_port, token = m.group(1), int(m.group(2)), m.group(3)
            assert url, "JupyterLab did not start:\n" + "".join(log[-30:])
            assert got_port != port and token
            api = f"http://127.0.0.1:{got_port}/api/contents/{NOTEBOOK}?content=0&token={token}"
            assert json.load(wait_for(api))["type"] == "notebook"
            with pytest.raises(urllib.error.HTTPError):  # and nothing without the token
                urllib.request.urlopen(api.split("&token=")[0], timeout=20)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
