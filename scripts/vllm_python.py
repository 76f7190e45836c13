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


def use_on_cpu() -> None:
    """Make vLLM's Python code importable and usable in this process (and the ones it starts), on a
    machine without a GPU:
    - vllm on sys.path (after the venv's own packages) and on PYTHONPATH (vLLM inspects model classes
      in a subprocess), installed first if needed; a GPU install's own vllm is kept;
    - vLLM's cache in a fresh folder (no model inspections from earlier runs), no hub;
    - vLLM's CPU platform: no GPU here. Its defaults for what our load checks read (prefix caching
      on, CUDA graphs on, a token budget below the context) are CUDA's;
    - the compiled ops some layers look up when they are built (SiluAndMul's) defined as ops that
      raise when called: with vLLM's custom ops off (`CompilationConfig(custom_ops=["none"])`)
      every layer runs its PyTorch forward, and a kernel reached by mistake fails loudly."""
    import importlib.util
    import os
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        target = str(install())
        sys.path.append(target)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), target]))
    os.environ["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="vllm-cache-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()
    if not hasattr(torch.ops._C, "silu_and_mul"):
        lib = torch.library.Library("_C", "FRAGMENT")
        lib.define("silu_and_mul(Tensor(a!) out, Tensor input) -> ()")

        def never(*args, **kwargs):
            raise RuntimeError("vLLM's compiled silu_and_mul was called on the CPU")

        lib.impl("silu_and_mul", never, "CompositeExplicitAutograd")
        _KEEP.append(lib)


_KEEP: list = []  # the op library lives as long as the process


if __name__ == "__main__":
    print(install())
