"""vLLM's Python code on a machine without a GPU, for the tests that check our GPU code against vLLM's
own (tests/test_against_vllm.py). No kernel runs: vLLM's config reader and rotary embeddings are
Python and PyTorch. Installed with --no-deps into .cache/vllm-python, never into the venv (a venv that
imports vllm would look like a GPU install): the gpu extra's vllm, and the few modules that code
imports which the venv lacks ([tool.kvblend] vllm-python in pyproject.toml).

    python scripts/vllm_python.py     # install once per set of pins; prints the folder
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / ".cache" / "vllm-python"


def pins() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    vllm = [p for p in data["project"]["optional-dependencies"]["gpu"] if p.startswith("vllm==")]
    return vllm + data["tool"]["kvblend"]["vllm-python"]


def install(target: Path = TARGET) -> Path:
    """The folder to put on sys.path (after the venv's own) to import vllm; installs it if its pins
    changed."""
    want = "\n".join(pins())
    stamp = target / ".pins"
    if stamp.exists() and stamp.read_text() == want:
        return target
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
                    str(target), *pins()], check=True)
    stamp.write_text(want)
    return target


if __name__ == "__main__":
    print(install())
