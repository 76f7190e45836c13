"""The blend settings, in one place: every engine, benchmark and widget takes its defaults from here.

Torch-free, so the launcher and the GPU backend can read it without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlendSettings:
    ratio: float = 0.15  # share of cached tokens recomputed beyond the check layer
    check_layer: int = 1  # layers below it are recomputed for all tokens; selection happens here
    deviation: str = "v"  # "v": ||V_new - V_cached||^2 (CacheBlend's code); "k": as LMCache's blender


BLEND = BlendSettings()  # the defaults, e.g. `ratio: float = BLEND.ratio`
