"""OpenAI-compatible server for the embedded engine, one process per engine (`--mode blend|full`).

    python -m helpers.embedded.server --mode blend --port 8000

Requests run one at a time on the model, in a worker thread, so /health answers while a request
runs; a client that disconnects (streaming or not) frees the model at the next token. At most
`--max-queue` requests wait for the model; more get a 429 with Retry-After. Every error, bad input or
not, is OpenAI-style JSON and never repeats a large input back. Extra endpoints for the notebooks:
GET /v1/kv/stats, POST /v1/kv/precompute {"texts": [...]}, POST /v1/kv/clear.

A local server is reachable from any web page the user visits, so `Guard` turns away requests whose
Host is not loopback (DNS rebinding) or whose Origin is a foreign site, POSTs that are not JSON (a
page's "simple" requests need no preflight), bodies over `--max-body-bytes`, and, with `--api-key`
(or KVBLEND_API_KEY), /v1 requests without `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..settings import BLEND, BlendSettings
from .blend import ContextTooLong
from .generate import Generator
from .generate import Request as GenRequest

MAX_LOGPROBS = 20
MAX_BODY_BYTES = 4 << 20  # a full 8K-token prompt is well under 1 MB of JSON
MAX_QUEUE = 16  # requests running or waiting for the model; more get a 429
MAX_TEXTS = 32  # chunk texts per precompute request
MAX_STOP_CHARS = 200  # per stop string (the decoder holds back that many characters)
CHARS_PER_TOKEN = 32  # no real text is longer per token: a longer prompt is refused untokenized
ECHO = 80  # characters of a user's value that an error message repeats
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def clip(value, n: int = ECHO) -> str:
    """repr(value), cut to n characters: errors never echo a large input back."""
    r = repr(value)
    return r if len(r) <= n else f"{r[:n]}... ({len(r)} characters)"


class BadRequest(Exception):
    """A request that validated but cannot be served (unknown model, too long): an OpenAI-style error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_value", type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type_
        self.headers = headers


def error_response(e: BadRequest) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------ local-server hygiene
def hostname(netloc: str) -> str:
    """"127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    return (urlsplit("//" + netloc).hostname or "") if netloc else ""


class Guard:
    """ASGI middleware: the checks every request passes before any route runs (see the module doc)."""

    def __init__(self, app, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
                 hosts: frozenset = frozenset(LOOPBACK)):
        self.app, self.api_key, self.max_body, self.hosts = app, api_key, max_body, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.check(scope["method"], scope["path"], Headers(scope=scope))
        if problem:
            return await error_response(problem)(scope, receive, send)
        await self.app(scope, self.limited(receive), send)

    def check(self, method: str, path: str, h: Headers) -> BadRequest | None:
        if "host" in h and hostname(h["host"]) not in self.hosts:
            return BadRequest(f"Host {clip(h['host'])} is not this local server's: only loopback names "
                              "are served (this blocks DNS rebinding).", status=403, code="forbidden_host")
        origin = h.get("origin")
        if origin is not None and (urlsplit(origin).scheme not in ("http", "https")
                                   or hostname(urlsplit(origin).netloc) not in self.hosts):
            return BadRequest(f"Requests from the web page {clip(origin)} are refused: only local "
                              "clients may drive this engine.", status=403, code="forbidden_origin")
        if self.api_key and path.startswith("/v1/"):
            given = h.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return BadRequest("Missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                                  "key the engine was started with (KVBLEND_API_KEY).", status=401,
                                  code="invalid_api_key")
        if method == "POST" and h.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return BadRequest("POST bodies must be JSON: send 'Content-Type: application/json'.",
                              status=415, code="unsupported_media_type")
        if int(h.get("content-length") or 0) > self.max_body:
            return too_large(self.max_body)
        return None

    def limited(self, receive):
        """`receive`, counting the body: a chunked body over the limit stops being read there."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, too_large(self.max_body).message)
            return message
        return wrapped


def too_large(limit: int) -> BadRequest:
    return BadRequest(f"The request body is over {limit} bytes; send less text per request.", status=413,
                      code="request_too_large")


# ------------------------------------------------------------------ request models
# Strict: "5" is no integer and true is no number, as in OpenAI's API. A validator that knows better
# than pydantic's message raises PydanticCustomError with the OpenAI error code as its type.
CODES = ("invalid_value", "invalid_type", "invalid_json")


def _unicode(v: str) -> str:
    """A lone surrogate ("\\ud800") is valid JSON but no text: the tokenizer cannot take it."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        where = {"bad": clip(e.object[e.start]), "at": e.start}
        raise PydanticCustomError("invalid_value", "The text holds a lone surrogate ({bad}) at index {at}: "
                                  "not valid Unicode.", where) from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Common(Strict):
    """What completions and chat completions share."""

    model: Text
    max_tokens: int | None = Field(None, ge=1)  # the upper bound is the model's context: checked later
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    n: int = Field(1, ge=1, le=1, description="only n = 1 is supported")
    stop: list[str] = []
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """`"temperature": null` means the default, as for OpenAI."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and len(v) <= 4 and all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in v):
            return [_unicode(s) for s in v]
        raise PydanticCustomError("invalid_value", "'stop' must be a string or a list of up to 4 "
                                  f"non-empty strings of at most {MAX_STOP_CHARS} characters.")


class CompletionRequest(Common):
    prompt: Text
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]
        if not isinstance(v, str):
            raise PydanticCustomError("invalid_type", "'prompt' must be a string (one prompt per request; "
                                      "token ids are not accepted by the embedded engine).")
        if not v.strip():
            raise PydanticCustomError("invalid_value", "'prompt' is empty.")
        return v


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """[{"type": "text", "text": ...}, ...] is one text."""
        if not isinstance(v, list):
            return v
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in v):
            raise PydanticCustomError("invalid_value", "content parts must be text parts.")
        return "".join(p["text"] for p in v)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _not_all_empty(cls, v):
        if not any(m.content.strip() for m in v):
            raise PydanticCustomError("invalid_value", "All messages are empty.")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid_value", "'top_logprobs' needs 'logprobs': true.")
        return v


class PrecomputeRequest(Strict):
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)  # chunk texts


def validation_error(exc: RequestValidationError) -> BadRequest:
    """The first problem pydantic found, as OpenAI reports it: a code, the parameter, a message."""
    err = exc.errors()[0]
    kind, loc = err["type"], [p for p in err["loc"][1:]]  # loc[0] is "body"
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if kind == "json_invalid":
        return BadRequest(f"The request body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                          code="invalid_json")
    if param is None and kind.endswith("_type"):
        return BadRequest("The request body must be a JSON object.", code="invalid_json")
    if kind == "missing":
        return BadRequest(f"'{param}' is required.", param, code="missing_required_parameter")
    if kind in CODES:
        return BadRequest(err["msg"], param, code=kind)
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return BadRequest(f"'{param}': {err['msg']}, got {clip(err.get('input'))}", param, code=code)


# ------------------------------------------------------------------ the app
def sse(data) -> bytes:
    """One server-sent event: `data` as JSON (or a bare string such as OpenAI's "[DONE]")."""
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


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


def http_error(e: StarletteHTTPException) -> BadRequest:
    """Starlette's own errors (404, 405, a body that cannot be parsed, 413) in OpenAI's shape."""
    if e.status_code == 400 and isinstance(e.__cause__, RecursionError):
        return BadRequest("The request body is nested too deeply to parse.", code="invalid_json")
    if e.status_code == 400:
        return BadRequest(f"The request body could not be parsed: {e.detail}.", code="invalid_json")
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return BadRequest(str(e.detail), status=e.status_code, code=codes.get(e.status_code, "http_error"),
                      headers=e.headers)


def create_app(gen: Generator, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title=f"kvblend embedded engine ({gen.mode})")
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    model_lock = threading.Lock()
    admission = Admission(max_queue)
    state = {"busy": False, "task": None, "served": 0}

    def on_model(fn, task: str):
        """Run fn holding the model, one task at a time; /health says busy, and with what."""
        with model_lock:
            state["busy"], state["task"] = True, task
            try:
                return fn()
            finally:
                state["busy"], state["task"] = False, None
                state["served"] += 1

    def run_in_worker(req: GenRequest, loop, queue: asyncio.Queue):
        """Run the generator in a thread, one request at a time, posting steps to the event loop."""
        def generate():
            if not req.cancelled.is_set():  # its client may have gone while it waited
                for step in gen.run(req):
                    loop.call_soon_threadsafe(queue.put_nowait, step)

        def work():
            try:
                on_model(generate, "generate")
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as e:  # reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                admission.leave()
        threading.Thread(target=work, daemon=True).start()

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
        """The last resort: still JSON, and the traceback goes to the engine's log."""
        return error_response(BadRequest(f"The engine failed ({type(e).__name__}): {clip(str(e), 200)}. "
                                         "See the engine's log.", status=500, code="engine_error",
                                         type_="server_error"))

    @app.get("/health")
    async def health():
        waiting = admission.count - state["busy"]
        blend = {"ratio": gen.blend.ratio, "check_layer": gen.blend.check_layer,
                 "deviation": gen.blend.deviation} if gen.mode == "blend" else {}
        return {"status": "ok", "backend": "embedded", "mode": gen.mode, "model": gen.model_name, **blend,
                **state, "waiting": max(waiting, 0)}

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
        """Every text must fit the context (checked, off the event loop, before any is computed)."""
        for i, text in enumerate(body.texts):
            check_chars(len(text), f"texts[{i}]")
        counts = await asyncio.to_thread(lambda: [len(gen.tok.encode(t, add_special_tokens=False))
                                                  for t in body.texts])
        for i, n in enumerate(counts):
            if n > gen.context_length:
                raise BadRequest(f"'texts[{i}]' is {n} tokens, over the context of {gen.context_length}: "
                                 "split it into smaller chunks.", f"texts[{i}]",
                                 code="context_length_exceeded")
        admission.enter()
        try:
            results = await asyncio.to_thread(on_model, lambda: [gen.cache_chunk(t) for t in body.texts],
                                              "precompute")
        finally:
            admission.leave()
        return {"results": results, **gen.runner.store.stats()}

    def check_chars(n_chars: int, param: str) -> None:
        """Refuse a text that cannot fit the context before paying for tokenizing it."""
        limit = gen.context_length * CHARS_PER_TOKEN
        if n_chars > limit:
            raise BadRequest(f"'{param}' is {n_chars} characters: it cannot fit the context of "
                             f"{gen.context_length} tokens (at most {limit} characters are read).", param,
                             code="context_length_exceeded")

    def gen_request(body: CompletionRequest | ChatRequest, chat: bool) -> GenRequest:
        """Checks that need the model, then the generator's request (its segments: token ids).
        Tokenizes: call it off the event loop."""
        ctx = gen.context_length
        max_tokens = body.max_tokens or (body.max_completion_tokens or 256 if chat else 16)
        if max_tokens > ctx:
            raise BadRequest(f"'max_tokens' is out of range: an integer from 1 to {ctx}, got {max_tokens}",
                             "max_tokens")
        if chat:
            check_chars(sum(len(m.content) for m in body.messages), "messages")
            text = gen.chat_text([m.model_dump() for m in body.messages])
            logprobs = (body.top_logprobs or 1) if body.logprobs else None
        else:
            check_chars(len(body.prompt), "prompt")
            text, logprobs = body.prompt, body.logprobs
        req = GenRequest(segments=gen.segments(text, chat), max_tokens=max_tokens,
                         temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop,
                         logprobs=logprobs)
        n_prompt = sum(len(s) for s in req.segments)
        if n_prompt == 0:
            raise BadRequest("The prompt has no tokens.", "prompt")
        if n_prompt + req.max_tokens > gen.context_length:
            raise BadRequest(str(ContextTooLong(n_prompt + req.max_tokens, gen.context_length))
                             + f" (prompt: {n_prompt} tokens, max_tokens: {req.max_tokens})",
                             "messages" if chat else "prompt", code="context_length_exceeded")
        return req

    async def complete(request: Request, body: CompletionRequest | ChatRequest, chat: bool):
        if body.model != gen.model_name:
            raise BadRequest(f"The model {clip(body.model)} does not exist here; this engine serves "
                             f"'{gen.model_name}'.", "model", status=404, code="model_not_found")
        req = await asyncio.to_thread(gen_request, body, chat)
        admission.enter()
        n_prompt = sum(len(s) for s in req.segments)
        want_logprobs = req.logprobs is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        run_in_worker(req, loop, queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage(n_out):
            return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                    "total_tokens": n_prompt + n_out}

        def choice(text, finish, steps, delta=False, first=False):
            steps = [st for st in steps if st.token is not None]
            if chat:
                msg = {"role": "assistant", "content": text} if first or not delta else {"content": text}
                c = {"index": 0, ("delta" if delta else "message"): msg}
                if want_logprobs:
                    c["logprobs"] = chat_logprobs(steps)
            else:
                c = {"index": 0, "text": text,
                     "logprobs": completion_logprobs(steps) if want_logprobs else None}
            c["finish_reason"] = finish
            return c

        if body.stream:
            async def events():
                n_out, first = 0, True
                try:
                    while True:
                        step = await queue.get()
                        if step is None:
                            break
                        if isinstance(step, Exception):
                            yield sse({"error": {"message": f"The engine failed: {step}",
                                                 "type": "server_error", "code": "engine_error"}})
                            break
                        n_out += step.token is not None
                        if not step.text and not step.finish_reason and not first:
                            continue
                        yield sse({"id": rid, "object": kind + ("" if not chat else ".chunk"),
                                   "created": created, "model": gen.model_name,
                                   "choices": [choice(step.text, step.finish_reason, [step], True, first)]})
                        first = False
                    if body.stream_options.include_usage:
                        yield sse({"id": rid, "object": kind + ("" if not chat else ".chunk"),
                                   "created": created, "model": gen.model_name, "choices": [],
                                   "usage": usage(n_out), "x_blend": public_info(req)})
                    yield sse("[DONE]")
                finally:
                    req.cancelled.set()  # client gone (or done): free the model at the next token

            return EventSourceResponse(events())

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
        return {"id": rid, "object": kind, "created": created, "model": gen.model_name,
                "choices": [choice(text, finish, steps)],
                "usage": usage(sum(st.token is not None for st in steps)),
                "x_blend": public_info(req)}

    def public_info(req: GenRequest) -> dict:
        return {k: v for k, v in req.info.items() if k not in ("deviation", "selected")}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await complete(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await complete(request, body, chat=True)

    return app


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
    ap.add_argument("--api-key", default=os.environ.get("KVBLEND_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $KVBLEND_API_KEY)")
    ap.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests running or waiting")
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    args = ap.parse_args(argv)
    gen = Generator(args.model, args.mode, BlendSettings(args.ratio, args.check_layer, args.deviation),
                    int(args.cache_bytes), args.cache_dir, int(args.cache_disk_bytes))
    app = create_app(gen, args.api_key, args.max_queue, args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
