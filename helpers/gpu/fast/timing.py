"""Per-prompt timing of the fast path's phases (GpuBlendSettings.timing), without a sync."""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("vllm.kvblend_plugin")


class Clock:
    """Host and GPU time of each phase of one prompt, logged when `on` (settings.timing; off: free).
    GPU times are read when the next prompt starts, so timing adds no sync."""

    def __init__(self, device, on: bool):
        self.on, self.cuda = on, on and device.type == "cuda"
        self.marks = [("start", time.perf_counter(), self._event())] if on else []
        self.what = ""

    def _event(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, name: str) -> None:
        if self.on:
            self.marks.append((name, time.perf_counter(), self._event()))

    def finish(self, n_tokens: int, how: str) -> None:
        self.what = f"{n_tokens} tokens, tail {how}"

    def report(self) -> None:
        if not self.on:
            return None
        if self.cuda:
            self.marks[-1][2].synchronize()
        parts = []
        for (_, t0, e0), (name, t1, e1) in zip(self.marks, self.marks[1:], strict=False):
            gpu = f"/{e0.elapsed_time(e1):.1f}" if self.cuda else ""
            parts.append(f"{name} {1e3 * (t1 - t0):.1f}{gpu}")
        log.info("fast blend timing: %s; ms host/GPU: %s", self.what, ", ".join(parts))
        self.on = False  # once
        return None

