"""LMCache's lookup, store first: the fast path's chunks in GPU memory need no host pins."""

from __future__ import annotations

import functools

from . import FastPath


def store_first_lookup(original, path: FastPath):
    """Wrap `LMCacheEngine.lookup` for the fast path: a chunk held in the GPU chunk store is a hit
    without asking LMCache's storage. Layer-wise, LMCache 0.5.3 checks and pins the key of every
    layer of every chunk and unpins them after the load (about 11 ms at 8K tokens for a 7B model,
    while the scheduler waits on the lookup); the fast path never reads the host copy of a chunk it
    holds, so that copy needs no pin. Other chunks are checked and pinned as LMCache does. A prompt
    whose chunks cannot all fit the store goes to LMCache's blender, which reads every chunk from
    the host: it gets LMCache's own lookup, pins and all."""

    @functools.wraps(original)
    def lookup(self, tokens=None, hashes=None, offsets=None, search_range=None, lookup_id=None,
               pin=False, request_configs=None):
        store = path.store
        if (store is None or not self.use_layerwise or tokens is None
                or not self.is_healthy()):
            return original(self, tokens, hashes, offsets, search_range, lookup_id, pin, request_configs)
        segments = list(self.token_database.process_tokens(tokens=tokens, request_configs=request_configs))
        if not store.fits([end - start for start, end, _ in segments]):
            return original(self, tokens, hashes, offsets, search_range, lookup_id, pin, request_configs)
        stats, hit = self.stats_monitor.on_lookup_request(len(tokens)), 0
        for _, end, key in segments:
            if not store.holds(key):
                layer_keys = key.split_layers(self.num_layers)
                found, where = self.storage_manager.batched_contains(
                    layer_keys, search_range or self.retrieve_locations, pin)
                if found != self.num_layers or len(where) != 1:
                    for location, pinned in where.items() if pin else ():
                        self.storage_manager.batched_unpin(pinned, [location])  # LMCache leaks these
                    break
                if pin:
                    self.lookup_pins[lookup_id][next(iter(where))].extend(layer_keys)
            hit = end
        self.stats_monitor.on_lookup_finished(stats, hit)
        if pin:
            self.storage_manager.touch_cache()
        return hit

    lookup._kvblend = True
    return lookup
