"""`launch_engines.sh`'s command line (the same as `python -m helpers.launcher`): start, status and
stop of the two engines, with its arguments checked and every error a user can act on in one line
and a non-zero exit, never a traceback. Relative paths are the caller's: the shell script does not
change directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import engines, runtime, scale
from .runtime import PORTS, EngineError
from .settings import BLEND, GPU_BLEND


def warm(e: runtime.Engine, texts: list[str]) -> None:
    """Precompute the chunks' KV; a failure leaves the (healthy) engines running and says so."""
    try:
        res = engines.precompute(e, texts)
    except EngineError as err:
        raise EngineError(f"{err}\nThe engines are running but the chunk KV cache is not warm: run "
                          "`./launch_engines.sh` again to retry, or `./launch_engines.sh stop`.") from err
    print(f"chunk KV ready on {e.name}: {res['tokens']} tokens, {res['computed']} chunks computed now")


def blend_engines(started: list[runtime.Engine]) -> list[runtime.Engine]:
    """The engines that hold chunk KV: the blend engine, or each blend replica behind its router."""
    reps = [e for e in started if e.role == "replica" and e.name.startswith("blend-")]
    return reps or started[:1]


def load_library(docs: str | None):
    """The chunks to precompute: ffmpeg/ plus the documents in `docs`, with skipped files as notes.
    Raises DocumentsError for a folder that gives no chunks."""
    import warnings

    from . import library
    from .documents import DocumentsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DocumentsWarning)
        lib = library.load(docs)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch_engines.sh", description="Start/stop the two engines.")
    ap.add_argument("action", nargs="?", default="start", choices=["start", "stop", "status"])
    ap.add_argument("--backend", default="auto", choices=["auto", *engines.BACKENDS])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2 on CPU, Mistral-7B on GPU)")
    ap.add_argument("--blend-port", type=int, default=PORTS["blend"])
    ap.add_argument("--full-port", type=int, default=PORTS["full"])
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-precompute", action="store_true", help="skip warming the chunk KV cache")
    ap.add_argument("--docs", metavar="DIR", default=None,
                    help="also serve your own .txt/.md files in DIR: chunked, precomputed on the blend "
                         "engine, offered in the notebooks' picker and retriever next to ffmpeg/")
    ap.add_argument("--load-format", default=None, help="vLLM only: 'dummy' for random weights")
    ap.add_argument("--blend-path", default=None,  # checked by the vLLM backend (helpers/gpu/launch.py)
                    help="vLLM only: 'fast' (default: our one-pass blender, chunks kept in GPU memory), "
                         "'fixed' (LMCache's blender, mended) or 'upstream' (LMCache's, as shipped)")
    ap.add_argument("--gpu-kv-store-gb", type=float, default=None,
                    help="vLLM fast path only: GPU memory for chunk KV, taken from the blend engine's "
                         f"--gpu-memory-utilization share (default {GPU_BLEND.store_gb:g})")
    ap.add_argument("--ratio", type=float, default=BLEND.ratio,
                    help=f"share of cached tokens the blend engine recomputes (default {BLEND.ratio})")
    ap.add_argument("--check-layer", type=int, default=BLEND.check_layer,
                    help=f"layer where tokens are selected; layers below it are recomputed for all tokens "
                         f"(default {BLEND.check_layer})")
    ap.add_argument("--no-disk-cache", action="store_true",
                    help="embedded only: keep chunk KV in memory only (default: also in .cache/chunk-kv)")
    ap.add_argument("--kv-store", default=None, metavar="redis|redis://HOST:PORT",
                    help="share chunk KV among blend engines through Redis: 'redis' starts a local "
                         f"redis-server on 127.0.0.1:{scale.REDIS_PORT} (stopped by `stop`); a URL, yours")
    ap.add_argument("--blend-replicas", type=int, default=1,
                    help="N > 1: N blend engines behind vllm-router on --blend-port (default 1: no router)")
    ap.add_argument("--full-replicas", type=int, default=1, help="the same for the full engine")
    ap.add_argument("--router-policy", default=scale.DEFAULT_POLICY, choices=scale.POLICIES,
                    help=f"vllm-router's policy for replicas (default {scale.DEFAULT_POLICY})")
    ap.add_argument("--json", action="store_true",
                    help="status: every managed process (engines, replicas, routers, Redis) as a JSON list")
    return runtime.run_cli(ap, argv, bad_arguments, run)


def bad_arguments(args) -> str | None:
    """What is wrong with the command line, in one line; None when nothing is. Relative paths are
    made absolute here, against the caller's folder (the engines run in the checkout)."""
    for name in ("blend_port", "full_port"):
        if not 1 <= getattr(args, name) <= 65535:
            return f"--{name.replace('_', '-')} must be a port number from 1 to 65535"
    if args.blend_port == args.full_port:
        return "--blend-port and --full-port must differ"
    if args.timeout <= 0:
        return "--timeout must be positive"
    if not 0 < args.ratio <= 1 or args.check_layer < 0:
        return "--ratio must be in (0, 1] and --check-layer >= 0"
    if args.kv_store not in (None, "redis") and not args.kv_store.startswith(("redis://", "rediss://")):
        return "--kv-store takes 'redis' (start a local one) or a URL redis://HOST:PORT"
    if not (1 <= args.blend_replicas <= 16 and 1 <= args.full_replicas <= 16):
        return "--blend-replicas and --full-replicas must be from 1 to 16"
    if args.docs is not None:
        args.docs = str(Path(args.docs).expanduser().resolve())
    if args.model and Path(args.model).expanduser().exists():
        args.model = str(Path(args.model).expanduser().resolve())
    return None


def start_kwargs(args, docs) -> dict:
    """engines.start's settings from the command line; a backend's own options only when given."""
    kw = {"ratio": args.ratio, "check_layer": args.check_layer, "docs": docs}
    for opt in ("load_format", "blend_path", "gpu_kv_store_gb"):  # vLLM's: passed only when given
        if getattr(args, opt) is not None:
            kw[opt] = getattr(args, opt)
    if args.no_disk_cache:
        kw["kv_dir"] = None
    if args.kv_store:
        kw["kv_store"] = args.kv_store
    if args.blend_replicas > 1 or args.full_replicas > 1:
        kw["replicas"] = {"blend": args.blend_replicas, "full": args.full_replicas}
        kw["policy"] = args.router_policy
    return kw


def run(args) -> int:
    if args.action == "stop":
        from .library import record_docs

        stopped = engines.stop(ports={"blend": args.blend_port, "full": args.full_port})
        try:
            record_docs(None)
        except OSError as err:
            raise runtime.unusable_run_dir(err) from err
        print("stopped: " + ", ".join(stopped) if stopped else "no engines of this checkout were running")
        return 0
    if args.action == "status":
        st = engines.status()
        if args.json:
            print(json.dumps([{"name": n, "role": s.get("role"), "url": s.get("url"), "pid": s.get("pid"),
                               "healthy": s.get("healthy", False), "log": s.get("log")}
                              for n, s in st.items() if s["running"]], indent=2))
        else:
            print(json.dumps(st, indent=2))
        return 0 if all(s.get("healthy") for s in st.values()) else 1
    from .documents import DocumentsError

    try:  # a bad folder stops here, before any engine is touched
        lib = load_library(args.docs)
    except DocumentsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        started = engines.start(args.backend, args.model, args.blend_port, args.full_port, args.timeout,
                                **start_kwargs(args, lib.docs))
        if args.docs:
            print(f"your documents: {len(lib.doc_names())} chunks from {lib.docs}")
        if not args.no_precompute:
            for e in blend_engines(started):  # with a shared Redis, the first computes, the rest load
                warm(e, list(lib.texts.values()))
    except (EngineError, DocumentsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: engines this launch started were stopped", file=sys.stderr)
        return 130
    for e in started:
        what = {"router": "vllm-router", "redis": "chunk KV store"}.get(e.role, f"engine ({e.backend})")
        print(f"{e.name:5s} {what}: {e.url}{'' if e.role == 'redis' else '/v1'}   log: {e.log}")
    settings = (runtime.blend_settings(blend_engines(started)[0]) if started else "") or \
        f"ratio {args.ratio}, check layer {args.check_layer}"
    print(f"blend settings: {settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
