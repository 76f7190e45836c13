"""vLLM's and LMCache's Python code on a machine without a GPU, for the tests that check our GPU code
against theirs (tests/test_against_vllm.py). No kernel runs: vLLM's config, command line, plugin
loader and model classes, and LMCache's connector code are Python and PyTorch. Never installed into
the venv (a venv that imports vllm would look like a GPU install):
- .cache/vllm-python: the gpu extra's vllm with --no-deps, and the modules it and LMCache's Python
  import which the venv lacks ([tool.kvblend] upstream-python in pyproject.toml);
- .cache/lmcache-python: the gpu extra's lmcache, the Python files of its wheel for the GPU
  machines' Python (3.12) without its compiled modules (CUDA only); `use_on_cpu(lmcache=True)`
  stands in for those with a module whose functions raise when called.

    python scripts/upstream_python.py     # install once per set of pins; prints the folders
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / ".cache" / "vllm-python"
LMCACHE_TARGET = ROOT / ".cache" / "lmcache-python"


def gpu_pin(name: str) -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return next(p for p in data["project"]["optional-dependencies"]["gpu"] if p.startswith(f"{name}=="))


def pins() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [gpu_pin("vllm"), *data["tool"]["kvblend"]["upstream-python"]]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q"], check=True)


def install() -> tuple[Path, Path]:
    """(vLLM's folder, LMCache's folder), each installed if its pins changed."""
    want = "\n".join(pins())
    stamp = TARGET / ".pins"
    if not (stamp.exists() and stamp.read_text() == want):
        pip("install", "--no-deps", "--upgrade", "--target", str(TARGET), *pins())
        stamp.write_text(want)
    want = gpu_pin("lmcache")
    stamp = LMCACHE_TARGET / ".pins"
    if not (stamp.exists() and stamp.read_text() == want):
        with tempfile.TemporaryDirectory() as tmp:
            pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "312", "--platform",
                "manylinux_2_28_x86_64", "--dest", tmp, want)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                z.extractall(LMCACHE_TARGET, [n for n in z.namelist() if not n.endswith(".so")])
        stamp.write_text(want)
    return TARGET, LMCACHE_TARGET


class NoKernel:
    """Stands in for a compiled module's member (`lmcache.c_ops.X`, `X.Y`): comparable, usable as an
    int (an enum value), and raising when called."""

    ids: dict[str, int] = {}

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return NoKernel(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}, a compiled kernel, was called on the CPU")

    def __int__(self):
        return NoKernel.ids.setdefault(self._name, len(NoKernel.ids))

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, NoKernel) and other._name == self._name

    def __hash__(self):
        return hash(self._name)

    def __repr__(self):
        return self._name


def use_on_cpu(lmcache: bool = False) -> None:
    """Make vLLM's Python code (and LMCache's, if asked) importable and usable in this process and
    the ones it starts, on a machine without a GPU:
    - on sys.path after the venv's own packages, and on PYTHONPATH (vLLM inspects model classes in a
      subprocess), installed first if needed; a GPU install's own vllm is kept;
    - vLLM's cache in a fresh folder (no model inspections from earlier runs), no hub;
    - vLLM's CPU platform: no GPU here. Its defaults for what our load checks read (prefix caching
      on, CUDA graphs on, a token budget below the context) are CUDA's;
    - the compiled ops some layers look up when they are built (SiluAndMul's) and LMCache's
      `lmcache.c_ops` stand in by ops that raise when called: with vLLM's custom ops off
      (`CompilationConfig(custom_ops=["none"])`) every layer runs its PyTorch forward, and a kernel
      reached by mistake fails loudly."""
    import importlib.util
    import os
    import types

    if importlib.util.find_spec("vllm") is None:
        vllm_dir, lmcache_dir = (str(p) for p in install())
        dirs = [vllm_dir, *([lmcache_dir] if lmcache else [])]
        sys.path.extend(dirs)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), *dirs]))
    os.environ["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="vllm-cache-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()
    if not hasattr(torch.ops._C, "silu_and_mul"):
        lib = torch.library.Library("_C", "FRAGMENT")
        lib.define("silu_and_mul(Tensor(a!) out, Tensor input) -> ()")
        lib.impl("silu_and_mul", NoKernel("vllm._C.silu_and_mul"), "CompositeExplicitAutograd")
        _KEEP.append(lib)
    if lmcache and importlib.util.find_spec("lmcache") is not None:
        try:
            import lmcache.c_ops  # noqa: F401  (a GPU install's)
        except ImportError:
            ops = types.ModuleType("lmcache.c_ops")
            ops.__getattr__ = lambda name: NoKernel(f"lmcache.c_ops.{name}").__getattr__(name) \
                if name.startswith("__") else NoKernel(f"lmcache.c_ops.{name}")
            sys.modules["lmcache.c_ops"] = ops


_KEEP: list = []  # the op library lives as long as the process


if __name__ == "__main__":
    print(*install(), sep="\n")
