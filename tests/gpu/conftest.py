"""What every GPU test needs, said once: a GPU, vLLM and LMCache."""

from __future__ import annotations

import importlib.util
import shutil


def gpu_stack_missing() -> str | None:
    """Why the GPU tests cannot run here (None when they can)."""
    if not shutil.which("nvidia-smi"):
        return "no NVIDIA GPU (nvidia-smi not found)"
    for name in ("vllm", "lmcache"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install -e '.[gpu]')"
    return None
