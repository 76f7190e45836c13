"""The blend settings, in one place: every engine, benchmark and widget takes its defaults from here.

Torch-free, so the launcher and the GPU backend can read it without loading a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

EMBEDDED_DEVIATION = "v"  # the CPU engine compares V at the check layer (CacheBlend's code)
GPU_DEVIATION = "k"  # the GPU paths compare K, as LMCache's blender does
GPU_KV_STORE_GB = 6.0  # fast path GPU chunk store (--gpu-kv-store-gb): holds a 7B's corpus (5.2 GB)
BLEND_PATHS = ("fast", "fixed", "upstream")  # --blend-path; the first is the default
PREFIX_ATTENTION = ("auto", "flex", "flash", "flash16")  # GpuBlendSettings.prefix_attention


@dataclass(frozen=True)
class BlendSettings:
    ratio: float = 0.15  # share of cached tokens recomputed beyond the check layer
    check_layer: int = 1  # layers below it are recomputed for all tokens; selection happens here
    deviation: str = EMBEDDED_DEVIATION  # "v": ||V_new - V_cached||^2; "k": the same on K


BLEND = BlendSettings()  # the defaults, e.g. `ratio: float = BLEND.ratio`


@dataclass(frozen=True)
class GpuBlendSettings:
    """How the vLLM blend engine blends: decided once, by the launcher (or a benchmark), and read
    once by our vLLM plugin when it loads in the engine's processes (`from_env`). Ratio and check
    layer travel in LMCache's own YAML. The fields past `deviation` are experiment switches with the
    product's choice as default: benchmarks (scripts/) pass other values to compare."""

    path: str = BLEND_PATHS[0]  # fast: our one-pass blender; fixed: LMCache's, mended; upstream: as shipped
    store_gb: float = GPU_KV_STORE_GB  # fast path: GPU memory for chunk KV (0: none)
    deviation: str = GPU_DEVIATION  # what the check layer compares: "k" or "v"
    graphs: bool = True  # fast path: the layers past the check layer replay as CUDA graphs
    timing: bool = False  # fast path: log each prompt's host and GPU time per phase
    lookup: bool = True  # fast path: chunks in the GPU store are lookup hits without LMCache's pins
    flex_options: dict = field(default_factory=dict)  # FlexAttention kernel options, e.g. {"BLOCK_N": 128}
    flex_autotune: bool = False  # Triton autotunes FlexAttention at its first call
    prefix_attention: str = "auto"  # q-blocks' prefix keys through FlashAttention: auto|flex|flash|flash16

    ENV = "KVBLEND_GPU_SETTINGS"  # the one channel launcher -> plugin: these fields as JSON

    def __post_init__(self):
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

        choice("path", BLEND_PATHS)
        choice("deviation", ("k", "v"))
        choice("prefix_attention", PREFIX_ATTENTION)
        if not isinstance(self.store_gb, (int, float)) or self.store_gb < 0:
            raise ValueError(f"store_gb must be a number of GB >= 0, got {self.store_gb!r}")
        if not isinstance(self.flex_options, dict):
            raise ValueError(f"flex_options must be a dict of FlexAttention kernel options, such as "
                             f'{{"BLOCK_N": 128}}; got {self.flex_options!r}')

    def to_env(self) -> dict[str, str]:
        """The blend engine's environment entry that carries these settings."""
        return {self.ENV: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_env(cls, environ=None) -> GpuBlendSettings:
        """The settings in `environ` (default: this process's), the defaults when absent."""
        text = (os.environ if environ is None else environ).get(cls.ENV, "").strip()
        try:
            values = json.loads(text) if text else {}
        except ValueError:
            values = None
        names = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - names:
            raise ValueError(f"{cls.ENV} must be a JSON object with keys among {', '.join(sorted(names))}; "
                             f"got {text!r}")
        return cls(**values)


GPU_BLEND = GpuBlendSettings()
