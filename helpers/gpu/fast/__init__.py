"""The fast blend path (`--blend-path fast`): CacheBlend for one prompt in one pass over vLLM's layers.

LMCache 0.5.3 blends through per-layer generators that fetch each chunk's KV from host memory,
synchronize the device and scatter into vLLM's paged cache with host syncs. `FastBlender.blend`
runs the same algorithm, as our plugin mends it, in one loop with no device-wide or host sync:

    ids -> embed
    for each layer:
        norm -> qkv -> rotary (new positions)
        cached K/V of every chunk token: two row gathers from the GPU chunk store, K re-rotated
        below the check layer: every token computed, its fresh K/V kept
        at the check layer:    select the gap tokens + ceil(ratio x cached) cached tokens whose
                               fresh K (or V) deviates most; every token keeps its fresh K/V
        past it:               only the selected tokens are computed; they overwrite their rows
        K/V of all tokens -> vLLM's paged cache (vLLM's own `reshape_and_cache_flash`)
        attention (all queries: FlashAttention; selected ones: FlexAttention with the exact causal
                   mask, or FlashAttention for each q-block's prefix keys merged with it)
        -> o_proj -> norm -> MLP             (skipped at the last layer: only its K/V are used)

One job per module: `store` (the GPU chunk store), `masks` (exact causal block masks), `attention`
(attention of the selected tokens), `graphs` (bucketed buffers and CUDA graphs of the layers past
the check layer), `timing`, `lookup` (LMCache's lookup, store first) and `blender` (the pass, and
the hook that falls back to LMCache's mended blender when the store cannot hold a prompt or
anything fails). Its switches are `helpers.settings.GpuBlendSettings`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...settings import GPU_BLEND, GpuBlendSettings

if TYPE_CHECKING:
    from .store import ChunkStore


FALLBACKS = "kvblend_fast_path_fallbacks"  # served as kvblend_fast_path_fallbacks_total{reason=...}
REASONS = ("no_room", "error")  # no room in the store or no chunk hit; an exception


@dataclass
class FastPath:
    """The fast path in one engine process: its settings, its GPU chunk store (None until the
    model is loaded, or with none) and how many prompts fell back to LMCache's blender: all of
    them (`fallbacks`: no room in the store, no chunk hit, or an error) and those after an error
    (`failures`). A failure sends that prompt alone to LMCache's blender; the next one tries again.
    Both are logged and counted in `kvblend_fast_path_fallbacks_total{reason="no_room"|"error"}`
    (`fallback_counter`), which vLLM's /metrics serves from its API server, another process, when
    PROMETHEUS_MULTIPROC_DIR names a folder for both: the launcher gives each blend engine an empty
    one; a hand-started `vllm serve` needs one set."""

    settings: GpuBlendSettings = GPU_BLEND
    store: ChunkStore | None = None
    fallbacks: int = 0
    failures: int = 0

    def use(self, store: ChunkStore) -> None:
        """Blend with `store` from now on; the fallback counter's series show on /metrics at 0."""
        self.store = store
        fallback_counter()


@functools.cache  # one per process: prometheus_client refuses a second metric of the same name
def fallback_counter():
    """This process's Prometheus counter of fallbacks, its two series created at 0 (so /metrics
    shows them from the start); None without prometheus_client. Never raises into vLLM."""
    try:
        from prometheus_client import Counter

        counter = Counter(FALLBACKS, "Prompts the fast blend path sent to LMCache's blender", ["reason"])
        for reason in REASONS:
            counter.labels(reason=reason)
        return counter
    except Exception:  # no prometheus_client, or an unusable PROMETHEUS_MULTIPROC_DIR
        return None


def count_fallback(reason: str) -> None:
    """One more fallback for `reason` on the Prometheus counter, if there is one."""
    counter = fallback_counter()
    if counter is not None:
        try:
            counter.labels(reason=reason).inc()
        except Exception:  # a metrics file that cannot be written must not fail the prompt
            pass


def tp_group():
    """vLLM's tensor-parallel process group when this engine has more than one rank, else None:
    `select_tokens` all-reduces the deviation over it, so every rank selects the same tokens."""
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tp_group()
    return group.device_group if group.world_size > 1 else None
