"""OpenAI-compatible server for the embedded engine, one process per engine (`--mode blend|full`).

    python -m helpers.embedded.server --mode blend --port 8000

Requests run one at a time on the model, in a worker thread, so /health answers while a request
runs; a client that disconnects mid-stream frees the model at the next token. Bad input gets an
OpenAI-style JSON error with a 4xx status. Extra endpoints for the notebooks: GET /v1/kv/stats,
POST /v1/kv/precompute {"texts": [...]}, POST /v1/kv/clear.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..settings import BLEND, BlendSettings
from .blend import ContextTooLong
from .generate import Generator
from .generate import Request as GenRequest

MAX_LOGPROBS = 20


class BadRequest(Exception):
    """A request that validated but cannot be served (unknown model, too long): an OpenAI-style error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_value", type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type_


def error_response(e: BadRequest) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


# ------------------------------------------------------------------ request models
# Strict: "5" is no integer and true is no number, as in OpenAI's API. A validator that knows better
# than pydantic's message raises PydanticCustomError with the OpenAI error code as its type.
CODES = ("invalid_value", "invalid_type", "invalid_json")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Common(Strict):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)  # the upper bound is the model's context: checked later
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
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
            return [v]
        if isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) and s for s in v):
            return v
        raise PydanticCustomError("invalid_value",
                                  "'stop' must be a string or a list of up to 4 non-empty strings.")


class CompletionRequest(Common):
    prompt: str
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
    content: str

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
    texts: list[str]  # chunk texts


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
    return BadRequest(f"'{param}': {err['msg']}, got {err.get('input')!r}", param, code=code)


# ------------------------------------------------------------------ the app
def sse(data) -> bytes:
    """One server-sent event: `data` as JSON (or a bare string such as OpenAI's "[DONE]")."""
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


def create_app(gen: Generator) -> FastAPI:
    app = FastAPI(title=f"kvblend embedded engine ({gen.mode})")
    model_lock = threading.Lock()
    state = {"busy": False, "waiting": 0, "served": 0}

    def run_in_worker(req: GenRequest, loop, queue: asyncio.Queue):
        """Run the generator in a thread, one request at a time, posting steps to the event loop."""
        def work():
            state["waiting"] += 1
            with model_lock:
                state["waiting"] -= 1
                state["busy"] = True
                try:
                    if not req.cancelled.is_set():
                        for step in gen.run(req):
                            loop.call_soon_threadsafe(queue.put_nowait, step)
                    loop.call_soon_threadsafe(queue.put_nowait, None)
                except Exception as e:  # reported to the client as an error event
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                finally:
                    state["busy"] = False
                    state["served"] += 1
        threading.Thread(target=work, daemon=True).start()

    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return error_response(validation_error(e))

    @app.get("/health")
    async def health():
        blend = {"ratio": gen.blend.ratio, "check_layer": gen.blend.check_layer,
                 "deviation": gen.blend.deviation} if gen.mode == "blend" else {}
        return {"status": "ok", "backend": "embedded", "mode": gen.mode, "model": gen.model_name, **blend,
                **state}

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
        def work():
            with model_lock:
                return [gen.cache_chunk(t) for t in body.texts]
        return {"results": await asyncio.to_thread(work), **gen.runner.store.stats()}

    def gen_request(body: CompletionRequest | ChatRequest, chat: bool) -> GenRequest:
        """Checks that need the model, then the generator's request (its segments: token ids)."""
        if body.model != gen.model_name:
            raise BadRequest(f"The model '{body.model}' does not exist here; this engine serves "
                             f"'{gen.model_name}'.", "model", status=404, code="model_not_found")
        ctx = gen.context_length
        max_tokens = body.max_tokens or (body.max_completion_tokens or 256 if chat else 16)
        if max_tokens > ctx:
            raise BadRequest(f"'max_tokens' is out of range: an integer from 1 to {ctx}, got {max_tokens}",
                             "max_tokens")
        if chat:
            text = gen.chat_text([m.model_dump() for m in body.messages])
            logprobs = (body.top_logprobs or 1) if body.logprobs else None
        else:
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

    async def complete(body: CompletionRequest | ChatRequest, chat: bool):
        req = gen_request(body, chat)
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
        try:
            while (step := await queue.get()) is not None:
                if isinstance(step, Exception):
                    raise BadRequest(f"The engine failed: {step}", status=500, code="engine_error",
                                     type_="server_error")
                steps.append(step)
        finally:
            req.cancelled.set()
        text = "".join(st.text for st in steps)
        finish = steps[-1].finish_reason if steps else "stop"
        return {"id": rid, "object": kind, "created": created, "model": gen.model_name,
                "choices": [choice(text, finish, steps)],
                "usage": usage(sum(st.token is not None for st in steps)),
                "x_blend": public_info(req)}

    def public_info(req: GenRequest) -> dict:
        return {k: v for k, v in req.info.items() if k not in ("deviation", "selected")}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await complete(body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await complete(body, chat=True)

    return app


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
    args = ap.parse_args(argv)
    gen = Generator(args.model, args.mode, BlendSettings(args.ratio, args.check_layer, args.deviation),
                    int(args.cache_bytes), args.cache_dir)
    uvicorn.run(create_app(gen), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
