"""OpenAI-compatible server for the embedded engine, one process per engine (`--mode blend|full`).

    python -m helpers.embedded.server --mode blend --port 8000

Requests run one at a time on the model, in a worker thread, so /health answers while a request
runs; a client that disconnects (streaming or not) frees the model at the next token. At most
`--max-queue` requests wait for the model; more get a 429 with Retry-After. Every error, bad input or
not, is OpenAI-style JSON and never repeats a large input back (`schema.py`); every request first
passes the local-server checks of `guard.py` (loopback Host and Origin, JSON bodies, a size cap and,
with `--api-key` or KVBLEND_API_KEY, the key). Extra endpoints for the notebooks: GET /v1/kv/stats,
POST /v1/kv/precompute {"texts": [...]}, POST /v1/kv/clear.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime import api_key
from ..settings import BLEND, BlendSettings
from .blend import ContextTooLong
from .generate import Generator
from .generate import Request as GenRequest
from .guard import MAX_BODY_BYTES, Guard
from .schema import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    PrecomputeRequest,
    clip,
    error_response,
    validation_error,
)

MAX_QUEUE = 16  # requests running or waiting for the model; more get a 429
CHARS_PER_TOKEN = 32  # no real text is longer per token: a longer prompt is refused untokenized


class Admission:
    """At most `limit` requests running or waiting for the model; the next one gets a 429 at once
    rather than a wait no client would sit through."""

    def __init__(self, limit: int):
        self.limit, self.count, self._lock = limit, 0, threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.count >= self.limit:
                raise BadRequest(f"The engine is busy: {self.count} requests are running or waiting. "
                                 "Retry in a few seconds.", status=429, code="queue_full",
                                 type_="rate_limit_error", headers={"Retry-After": "5"})
            self.count += 1

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


class Engine:
    """The model and who may use it: one task at a time under a lock, at most `max_queue` admitted.
    The routes below are thin; what needs the model or the tokenizer is here."""

    def __init__(self, gen: Generator, max_queue: int = MAX_QUEUE):
        self.gen, self.admission, self.lock = gen, Admission(max_queue), threading.Lock()
        self.state = {"busy": False, "task": None, "served": 0}

    def on_model(self, fn, task: str):
        """Run fn holding the model, one task at a time; /health says busy, and with what."""
        with self.lock:
            self.state["busy"], self.state["task"] = True, task
            try:
                return fn()
            finally:
                self.state["busy"], self.state["task"] = False, None
                self.state["served"] += 1

    def start(self, req: GenRequest, loop, queue: asyncio.Queue) -> None:
        """Run the generator in a thread (the request was admitted), posting its steps to `queue` on
        the event loop, then None, or the exception it raised."""
        def generate():
            if not req.cancelled.is_set():  # its client may have gone while it waited
                for step in self.gen.run(req):
                    loop.call_soon_threadsafe(queue.put_nowait, step)

        def work():
            try:
                self.on_model(generate, "generate")
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as e:  # reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                self.admission.leave()
        threading.Thread(target=work, daemon=True).start()

    def check_chars(self, n_chars: int, param: str) -> None:
        """Refuse a text that cannot fit the context before paying for tokenizing it."""
        ctx = self.gen.context_length
        if n_chars > ctx * CHARS_PER_TOKEN:
            raise BadRequest(f"'{param}' is {n_chars} characters: it cannot fit the context of {ctx} "
                             f"tokens (at most {ctx * CHARS_PER_TOKEN} characters are read).", param,
                             code="context_length_exceeded")

    def check_texts(self, texts: list[str]) -> None:
        """Every chunk text must fit the context, checked before any is computed. Tokenizes: call it
        off the event loop."""
        for i, text in enumerate(texts):
            self.check_chars(len(text), f"texts[{i}]")
        ctx = self.gen.context_length
        for i, text in enumerate(texts):
            n = len(self.gen.tok.encode(text, add_special_tokens=False))
            if n > ctx:
                raise BadRequest(f"'texts[{i}]' is {n} tokens, over the context of {ctx}: split it into "
                                 "smaller chunks.", f"texts[{i}]", code="context_length_exceeded")

    def request(self, body: CompletionRequest | ChatRequest, chat: bool) -> GenRequest:
        """Checks that need the model, then the generator's request (its segments: token ids).
        Tokenizes: call it off the event loop."""
        gen, ctx = self.gen, self.gen.context_length
        max_tokens = body.max_tokens or (body.max_completion_tokens or 256 if chat else 16)
        if max_tokens > ctx:
            raise BadRequest(f"'max_tokens' is out of range: an integer from 1 to {ctx}, got {max_tokens}",
                             "max_tokens")
        if chat:
            self.check_chars(sum(len(m.content) for m in body.messages), "messages")
            text = gen.chat_text([m.model_dump() for m in body.messages])
            logprobs = (body.top_logprobs or 1) if body.logprobs else None
        else:
            self.check_chars(len(body.prompt), "prompt")
            text, logprobs = body.prompt, body.logprobs
        req = GenRequest(segments=gen.segments(text, chat), max_tokens=max_tokens,
                         temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop,
                         logprobs=logprobs)
        n_prompt = sum(len(s) for s in req.segments)
        if n_prompt == 0:
            raise BadRequest("The prompt has no tokens.", "prompt")
        if n_prompt + req.max_tokens > ctx:
            raise BadRequest(str(ContextTooLong(n_prompt + req.max_tokens, ctx))
                             + f" (prompt: {n_prompt} tokens, max_tokens: {req.max_tokens})",
                             "messages" if chat else "prompt", code="context_length_exceeded")
        return req

    def health(self) -> dict:
        gen = self.gen
        waiting = self.admission.count - self.state["busy"]
        blend = {"ratio": gen.blend.ratio, "check_layer": gen.blend.check_layer,
                 "deviation": gen.blend.deviation} if gen.mode == "blend" else {}
        return {"status": "ok", "backend": "embedded", "mode": gen.mode, "model": gen.model_name, **blend,
                **self.state, "waiting": max(waiting, 0)}


class Reply:
    """One completion's answer in OpenAI's shape (chat or text), whole or as stream chunks."""

    def __init__(self, model: str, chat: bool, want_logprobs: bool, n_prompt: int):
        self.model, self.chat, self.want_logprobs, self.n_prompt = model, chat, want_logprobs, n_prompt
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    def usage(self, n_out: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n_out,
                "total_tokens": self.n_prompt + n_out}

    def choice(self, text: str, finish: str | None, steps: list, delta=False, first=False) -> dict:
        steps = [st for st in steps if st.token is not None]
        if self.chat:
            msg = {"role": "assistant", "content": text} if first or not delta else {"content": text}
            c = {"index": 0, ("delta" if delta else "message"): msg}
            if self.want_logprobs:
                c["logprobs"] = chat_logprobs(steps)
        else:
            c = {"index": 0, "text": text,
                 "logprobs": completion_logprobs(steps) if self.want_logprobs else None}
        c["finish_reason"] = finish
        return c

    def body(self, choices: list, chunk: bool = False, **extra) -> dict:
        """The response object (`chunk`: one of a stream's, "chat.completion.chunk" for chat)."""
        obj = self.kind + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def sse(data) -> bytes:
    """One server-sent event: `data` as JSON (or a bare string such as OpenAI's "[DONE]")."""
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


async def stream(reply: Reply, req: GenRequest, queue: asyncio.Queue, include_usage: bool):
    """The answer as server-sent events. A step whose text is still held back (a stop string may be
    starting) sends nothing, but its token's logprobs ride with the next event, so every generated
    token's logprobs reach the client whatever the stop strings."""
    n_out, first, pending = 0, True, []
    try:
        while (step := await queue.get()) is not None:
            if isinstance(step, Exception):
                yield sse({"error": {"message": f"The engine failed: {step}", "type": "server_error",
                                     "code": "engine_error"}})
                break
            n_out += step.token is not None
            pending.append(step)
            if not step.text and not step.finish_reason and not first:
                continue
            yield sse(reply.body([reply.choice(step.text, step.finish_reason, pending, True, first)], True))
            first, pending = False, []
        if include_usage:
            yield sse(reply.body([], True, usage=reply.usage(n_out), x_blend=public_info(req)))
        yield sse("[DONE]")
    finally:
        req.cancelled.set()  # client gone (or done): free the model at the next token


async def whole(reply: Reply, request: Request, req: GenRequest, queue: asyncio.Queue) -> dict:
    """The answer as one JSON body, once the generator is done."""
    steps = []
    watch = asyncio.create_task(cancel_when_gone(request, req))
    try:
        while (step := await queue.get()) is not None:
            if isinstance(step, Exception):
                raise BadRequest(f"The engine failed: {step}", status=500, code="engine_error",
                                 type_="server_error")
            steps.append(step)
    finally:
        req.cancelled.set()
        watch.cancel()
    text = "".join(st.text for st in steps)
    finish = steps[-1].finish_reason if steps else "stop"
    return reply.body([reply.choice(text, finish, steps)], usage=reply.usage(sum(st.token is not None
                                                                                  for st in steps)),
                      x_blend=public_info(req))


def public_info(req: GenRequest) -> dict:
    return {k: v for k, v in req.info.items() if k not in ("deviation", "selected")}


async def cancel_when_gone(request: Request, req: GenRequest, every: float = 0.25) -> None:
    """A non-streaming client that gave up frees the model as a closed stream does."""
    while not req.cancelled.is_set():
        if await request.is_disconnected():
            req.cancelled.set()
            return
        await asyncio.sleep(every)


def completion_logprobs(steps) -> dict:
    """OpenAI completions format: parallel lists, one entry per generated token."""
    offsets, pos = [], 0
    for st in steps:
        offsets.append(pos)
        pos += len(st.token_str)
    return {"tokens": [st.token_str for st in steps], "token_logprobs": [st.logprob for st in steps],
            "top_logprobs": [st.top_logprobs for st in steps], "text_offset": offsets}


def chat_logprobs(steps) -> dict:
    return {"content": [{"token": st.token_str, "logprob": st.logprob,
                         "top_logprobs": [{"token": t, "logprob": lp} for t, lp in
                                          (st.top_logprobs or {}).items()]} for st in steps]}


def http_error(e: StarletteHTTPException) -> BadRequest:
    """Starlette's own errors (404, 405, a body that cannot be parsed, 413) in OpenAI's shape."""
    if e.status_code == 400 and isinstance(e.__cause__, RecursionError):
        return BadRequest("The request body is nested too deeply to parse.", code="invalid_json")
    if e.status_code == 400:
        return BadRequest(f"The request body could not be parsed: {e.detail}.", code="invalid_json")
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return BadRequest(str(e.detail), status=e.status_code, code=codes.get(e.status_code, "http_error"),
                      headers=e.headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-style JSON; an unexpected one's traceback goes to the log."""
    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        path = clip(request.url.path)
        if e.status_code == 404:
            e.detail = f"No route {request.method} {path}: see /docs for this engine's API."
        elif e.status_code == 405:
            e.detail = f"{request.method} is not allowed on {path}; use {(e.headers or {}).get('Allow')}."
        return error_response(http_error(e))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        return error_response(BadRequest(f"The engine failed ({type(e).__name__}): {clip(str(e), 200)}. "
                                         "See the engine's log.", status=500, code="engine_error",
                                         type_="server_error"))


def create_app(gen: Generator, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title=f"kvblend embedded engine ({gen.mode})")
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    add_error_handlers(app)
    engine = Engine(gen, max_queue)

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": gen.model_name, "object": "model", "created": 0,
                                            "owned_by": "kvblend", "max_model_len": gen.context_length}]}

    @app.get("/v1/kv/stats")
    async def kv_stats():
        return {"mode": gen.mode, **gen.runner.store.stats()}

    @app.post("/v1/kv/clear")
    async def kv_clear():
        gen.runner.store.clear()
        return {"cleared": True}

    @app.post("/v1/kv/precompute")
    async def kv_precompute(body: PrecomputeRequest):
        await asyncio.to_thread(engine.check_texts, body.texts)
        engine.admission.enter()
        try:
            results = await asyncio.to_thread(engine.on_model,
                                              lambda: [gen.cache_chunk(t) for t in body.texts], "precompute")
        finally:
            engine.admission.leave()
        return {"results": results, **gen.runner.store.stats()}

    async def complete(request: Request, body: CompletionRequest | ChatRequest, chat: bool):
        if body.model != gen.model_name:
            raise BadRequest(f"The model {clip(body.model)} does not exist here; this engine serves "
                             f"'{gen.model_name}'.", "model", status=404, code="model_not_found")
        req = await asyncio.to_thread(engine.request, body, chat)
        engine.admission.enter()
        queue: asyncio.Queue = asyncio.Queue()
        engine.start(req, asyncio.get_running_loop(), queue)
        reply = Reply(gen.model_name, chat, req.logprobs is not None, sum(len(s) for s in req.segments))
        if body.stream:
            return EventSourceResponse(stream(reply, req, queue, body.stream_options.include_usage))
        return await whole(reply, request, req, queue)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await complete(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await complete(request, body, chat=True)

    return app


def main(argv=None):
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["blend", "full"], default="blend")
    ap.add_argument("--model", default=None, help="local HF model folder (default: SmolLM2 from its wheel)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ratio", type=float, default=BLEND.ratio, help="recompute ratio")
    ap.add_argument("--check-layer", type=int, default=BLEND.check_layer)
    ap.add_argument("--deviation", choices=["v", "k"], default=BLEND.deviation)
    ap.add_argument("--cache-bytes", type=float, default=4e9, help="in-memory chunk KV budget")
    ap.add_argument("--cache-dir", default=None, help="directory that keeps chunk KV across restarts")
    ap.add_argument("--cache-disk-bytes", type=float, default=8e9, help="disk budget of --cache-dir")
    ap.add_argument("--kv-store", default=None, help="redis://HOST:PORT: chunk KV shared by blend engines")
    ap.add_argument("--api-key", default=api_key(),
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $KVBLEND_API_KEY)")
    ap.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests running or waiting")
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    args = ap.parse_args(argv)
    gen = Generator(args.model, args.mode, BlendSettings(args.ratio, args.check_layer, args.deviation),
                    int(args.cache_bytes), args.cache_dir, int(args.cache_disk_bytes), args.kv_store)
    app = create_app(gen, args.api_key, args.max_queue, args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
