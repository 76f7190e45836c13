"""vLLM general plugin that lets LMCache 0.5.3's CacheBlend run on vLLM 0.26.

vLLM calls `register()` in every process it starts (API server, engine core, workers) through the
entry point `vllm.general_plugins: kvblend_lmcache` declared in pyproject.toml. It does nothing
unless blending is configured (the blend engine's LMCache YAML says `enable_blending: true`), so a
plain vLLM engine, such as our baseline, runs untouched.

It closes two gaps between the two releases, by monkeypatching at start-up (never on disk), and
quiets one known LMCache warning (see `FirstOnly`):

1. **The blender cannot find the model.** LMCache's blender looks the vLLM model up under
   `ENGINE_NAME` in `VLLMModelTracker`, but nothing registers it there, so the engine dies with
   "vllm model for vllm-instance not found" (LMCache #4131). We register it right after
   `Worker.load_model`, which runs before the KV connector (and the blender with it) is built.
2. **The KV layout.** vLLM 0.26's FlashAttention keeps each layer's cache as one 4-D tensor with K
   and V packed in the last axis: `[blocks, block_size, heads, 2*head_size]` (NHD) or
   `[blocks, heads, block_size, 2*head_size]` (HND). LMCache detects these layouts (it names them
   `NL_X_NB_BS_NH_CS` and `NL_X_NB_NH_BS_CS`), but its compiled `single_layer_kv_transfer`, which
   the blending connector calls for every layer, indexes a 5-D tensor and fails with
   `IndexError: Dimension out of range (... got 4)`. We send those two layouts to
   `paged_kv_transfer`, a plain PyTorch gather/scatter by slot mapping; every other layout still
   goes to the compiled op.
"""

from __future__ import annotations

import functools
import logging
import os
import re

log = logging.getLogger("vllm.kvblend_plugin")  # a child of vLLM's logger: lands in the engine log

# LMCache's names for vLLM 0.26's 4-D layouts -> the order of the middle axes
LAYOUTS = {"NL_X_NB_BS_NH_CS": "NB_BS_NH_CS", "NL_X_NB_NH_BS_CS": "NB_NH_BS_CS"}


def blending_enabled(environ=None) -> bool:
    """True when this vLLM process is a blend engine: LMCache's config enables blending."""
    environ = os.environ if environ is None else environ
    if environ.get("LMCACHE_ENABLE_BLENDING", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    path = environ.get("LMCACHE_CONFIG_FILE", "")
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return False
    match = re.search(r"^enable_blending\s*:\s*(\S+)", text, re.MULTILINE)
    return bool(match) and match.group(1).strip("'\"").lower() in ("true", "yes", "on", "1")


def paged_kv_transfer(lmc, paged, slot_mapping, layout: str, to_paged: bool, token_major: bool = False):
    """Copy K and V between LMCache's buffer and one layer of vLLM's paged cache, by slot.

    `lmc` is LMCache's buffer, `[2, tokens, heads*head_size]` (or `[tokens, 2, ...]` when
    `token_major`); `paged` is one layer of vLLM's cache in `layout` ("NB_BS_NH_CS" or "NB_NH_BS_CS",
    last axis K then V). Token i lives at slot `slot_mapping[i]`, i.e. block `slot // block_size`,
    offset `slot % block_size`; a negative slot (padding) is skipped. `to_paged` copies LMCache ->
    vLLM (LMCache's H2D), else vLLM -> LMCache (D2H). Same semantics as LMCache's compiled op has for
    its 5-D layouts, for any strides of `paged` (advanced indexing, no reshape of the cache).
    """
    import torch

    if layout == "NB_BS_NH_CS":
        block_size, num_heads = paged.shape[1], paged.shape[2]
    elif layout == "NB_NH_BS_CS":
        num_heads, block_size = paged.shape[1], paged.shape[2]
    else:
        raise ValueError(f"unknown layout {layout!r}: expected NB_BS_NH_CS or NB_NH_BS_CS")
    head_size = paged.shape[3] // 2

    slots = slot_mapping.to(device=lmc.device, dtype=torch.long)
    tokens = torch.nonzero(slots >= 0).squeeze(1)  # positions in LMCache's buffer
    if tokens.numel() == 0:
        return
    slots = slots[tokens].to(paged.device)
    blocks, offsets = slots // block_size, slots % block_size
    # paged[where] is [n, heads, 2*head_size] in both layouts (advanced-index axes come first)
    where = (blocks, offsets) if layout == "NB_BS_NH_CS" else (blocks, slice(None), offsets)

    def lmc_index(kv):
        return (tokens, kv) if token_major else (kv, tokens)

    if to_paged:
        k = lmc[lmc_index(0)].reshape(-1, num_heads, head_size)
        v = lmc[lmc_index(1)].reshape(-1, num_heads, head_size)
        paged[where] = torch.cat([k, v], dim=-1).to(device=paged.device, dtype=paged.dtype)
    else:
        entries = paged[where].to(device=lmc.device, dtype=lmc.dtype)
        lmc[lmc_index(0)] = entries[..., :head_size].reshape(-1, num_heads * head_size)
        lmc[lmc_index(1)] = entries[..., head_size:].reshape(-1, num_heads * head_size)


class KVTransferOps:
    """Stands in for `lmcache.c_ops` inside LMCache's GPU connector module: the same module, except
    that `single_layer_kv_transfer` on a 4-D layout goes to `paged_kv_transfer`."""

    def __init__(self, ops):
        self._ops = ops
        self._layouts = {int(getattr(ops.EngineKVFormat, name)): layout for name, layout in LAYOUTS.items()}
        self._to_paged = int(ops.TransferDirection.H2D)

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def single_layer_kv_transfer(self, lmc, paged, slot_mapping, direction, engine_kv_format,
                                 token_major=False):
        layout = self._layouts.get(int(engine_kv_format))
        if layout is None or paged.dim() != 4:
            return self._ops.single_layer_kv_transfer(lmc, paged, slot_mapping, direction,
                                                      engine_kv_format, token_major=token_major)
        paged_kv_transfer(lmc, paged, slot_mapping, layout, int(direction) == self._to_paged, token_major)


class FirstOnly(logging.Filter):
    """Lets the first record that contains `text` through and drops the rest (counted in `dropped`).

    LMCache 0.5.3's layer-wise blending unpins each retrieved memory object twice and warns
    "Double unpin occurred ... Setting pin count back to 0" for every layer of every chunk: some
    1,500 lines per 32K-token request, written in the engine's step, on the time to first token."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.dropped = text, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        self.dropped += 1
        return self.dropped == 1


def _register_model_after_load() -> None:
    """Wrap `Worker.load_model` so the loaded model is registered for LMCache's blender."""
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.load_model
    if getattr(original, "_kvblend", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.compute.models.utils import VLLMModelTracker

        VLLMModelTracker.register_model(ENGINE_NAME, self.model_runner.get_model())
        return result

    load_model._kvblend = True
    gpu_worker.Worker.load_model = load_model


def _route_4d_kv_transfer() -> None:
    """Give LMCache's GPU connectors a `lmc_ops` whose KV transfer handles the 4-D layouts."""
    from lmcache.v1.gpu_connector import gpu_connectors

    if not isinstance(gpu_connectors.lmc_ops, KVTransferOps):
        gpu_connectors.lmc_ops = KVTransferOps(gpu_connectors.lmc_ops)


def register() -> None:
    """vLLM's entry point: activate both fixes in this process if blending is configured."""
    if not blending_enabled():
        return
    try:
        _register_model_after_load()
        _route_4d_kv_transfer()
    except ImportError as err:  # vLLM or LMCache missing: the engine itself will say so
        log.warning("kvblend plugin inactive, cannot import %s", err.name or err)
        return
    lmcache_memory = logging.getLogger("lmcache.v1.memory_management")
    if not any(isinstance(f, FirstOnly) for f in lmcache_memory.filters):
        lmcache_memory.addFilter(FirstOnly("Double unpin"))
    log.info("kvblend plugin active: model registered for LMCache's blender, 4-D KV transfer in PyTorch")
