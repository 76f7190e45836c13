"""`make lab`'s JupyterLab: the tutorial's first notebook, for root and normal users alike.

Containers and GPU servers usually run as root, where JupyterLab refuses to start unless told
`--allow-root` (harmless for other users). The port is 8888 or, when that is taken, the next free
one (JupyterLab's own port retries), and the server keeps its login token: the URL it prints has it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/01_quickstart.ipynb"


def lab_command(notebook: str = NOTEBOOK, port: int = 8888, *extra: str) -> list[str]:
    """The command line `make lab` runs (and tests/test_lab.py runs too). An option in `extra`
    replaces our default for it (JupyterLab takes each option once)."""
    defaults = ["--allow-root", f"--ServerApp.port={port}", "--ServerApp.port_retries=50",
                f"--ServerApp.root_dir={ROOT}"]
    given = {option_name(x) for x in extra}
    return [sys.executable, "-m", "jupyterlab", notebook,
            *(d for d in defaults if option_name(d) not in given), *extra]


def option_name(arg: str) -> str:
    """"--ServerApp.port=9000" -> "--serverapp.port" (the part before any "=", any case)."""
    return arg.split("=", 1)[0].lower()


def main(argv: list[str] | None = None) -> None:
    """Replace this process with JupyterLab (so Ctrl-C stops it as usual)."""
    cmd = lab_command(NOTEBOOK, 8888, *(sys.argv[1:] if argv is None else argv))
    os.chdir(ROOT)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
