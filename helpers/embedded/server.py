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

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .blend import BlendConfig, ContextTooLong
from .generate import Generator
from .generate import Request as GenRequest

MAX_LOGPROBS = 20
ROLES = {"system", "user", "assistant"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_value", type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type_


def error_response(e: BadRequest) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


# ------------------------------------------------------------------ request validation
def _get(body: dict, name: str, types, default=None, check=None, hint: str = ""):
    """body[name] if present: of `types` (a JSON true is no number here) and passing `check`."""
    value = body.get(name)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise BadRequest(f"'{name}' must be {hint or ' or '.join(t.__name__ for t in types)}, got "
                         f"{value!r}", name, code="invalid_type")
    if check and not check(value):
        raise BadRequest(f"'{name}' is out of range: {hint}, got {value!r}", name)
    return value


def parse_common(body: dict, gen: Generator, chat: bool) -> tuple[GenRequest, dict]:
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required (a string); GET /v1/models lists it.", "model",
                         code="missing_required_parameter")
    if model != gen.model_name:
        raise BadRequest(f"The model '{model}' does not exist here; this engine serves "
                         f"'{gen.model_name}'.", "model", status=404, code="model_not_found")
    ctx = gen.context_length
    max_tokens = _get(body, "max_completion_tokens", int, None) if chat else None
    max_tokens = _get(body, "max_tokens", int, max_tokens or (256 if chat else 16),
                      lambda v: 1 <= v <= ctx, f"an integer from 1 to {ctx}")
    temperature = float(_get(body, "temperature", (int, float), 1.0,
                             lambda v: 0 <= v <= 2, "a number from 0 to 2"))
    top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    seed = _get(body, "seed", int, None)
    _get(body, "n", int, 1, lambda v: v == 1, "only n = 1 is supported")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings.", "stop")
    stream = _get(body, "stream", bool, False, hint="a boolean")
    opts = _get(body, "stream_options", dict, {}, hint="an object")
    if chat:
        want = _get(body, "logprobs", bool, False, hint="a boolean")
        top = _get(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS, "0 to 20")
        logprobs = (top or 1) if want else None
        if top and not want:
            raise BadRequest("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    else:
        logprobs = _get(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS,
                        "an integer from 0 to 20")
    req = GenRequest(segments=[], max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, stop=stop, logprobs=logprobs)
    return req, {"stream": stream, "include_usage": bool(opts.get("include_usage")),
                 "want_logprobs": logprobs is not None}


def prompt_text(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise BadRequest("'prompt' is required.", "prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (one prompt per request; token ids are not "
                         "accepted by the embedded engine).", "prompt", code="invalid_type")
    if not prompt.strip():
        raise BadRequest("'prompt' is empty.", "prompt")
    return prompt


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("'messages' is required.", "messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list.", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object.", f"messages[{i}]", code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}.",
                             f"messages[{i}].role")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content parts must be text parts.",
                                 f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string.", f"messages[{i}].content",
                             code="invalid_type")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise BadRequest("All messages are empty.", "messages")
    return out


# ------------------------------------------------------------------ the app
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

    @app.get("/health")
    async def health():
        return {"status": "ok", "mode": gen.mode, "model": gen.model_name, **state}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": gen.model_name, "object": "model", "created": 0,
                                            "owned_by": "kvblend", "max_model_len": gen.context_length}]}

    @app.get("/v1/kv/stats")
    async def kv_stats():
        return {"mode": gen.mode, **gen.engine.store.stats()}

    @app.post("/v1/kv/clear")
    async def kv_clear():
        gen.engine.store.clear()
        return {"cleared": True}

    @app.post("/v1/kv/precompute")
    async def kv_precompute(request: Request):
        body = await read_json(request)
        texts = body.get("texts") if isinstance(body, dict) else None
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            raise BadRequest("'texts' must be a list of strings (chunk texts).", "texts")

        def work():
            with model_lock:
                return [gen.precompute(t) for t in texts]
        return {"results": await asyncio.to_thread(work), **gen.engine.store.stats()}

    async def read_json(request: Request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None

    async def complete(request: Request, chat: bool):
        body = await read_json(request)
        req, opts = parse_common(body, gen, chat)
        text = gen.chat_text(chat_messages(body)) if chat else prompt_text(body)
        req.segments = gen.segments(text, chat)
        n_prompt = sum(len(s) for s in req.segments)
        if n_prompt == 0:
            raise BadRequest("The prompt has no tokens.", "prompt")
        if n_prompt + req.max_tokens > gen.context_length:
            raise BadRequest(str(ContextTooLong(n_prompt + req.max_tokens, gen.context_length))
                             + f" (prompt: {n_prompt} tokens, max_tokens: {req.max_tokens})",
                             "messages" if chat else "prompt", code="context_length_exceeded")
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
                if opts["want_logprobs"]:
                    c["logprobs"] = chat_logprobs(steps)
            else:
                c = {"index": 0, "text": text,
                     "logprobs": completion_logprobs(steps) if opts["want_logprobs"] else None}
            c["finish_reason"] = finish
            return c

        if opts["stream"]:
            async def events():
                n_out, first = 0, True
                try:
                    while True:
                        step = await queue.get()
                        if step is None:
                            break
                        if isinstance(step, Exception):
                            err = {"error": {"message": f"The engine failed: {step}",
                                             "type": "server_error", "code": "engine_error"}}
                            yield f"data: {json.dumps(err)}\n\n"
                            break
                        n_out += step.token is not None
                        if not step.text and not step.finish_reason and not first:
                            continue
                        chunk = {"id": rid, "object": kind + ("" if not chat else ".chunk"),
                                 "created": created, "model": gen.model_name,
                                 "choices": [choice(step.text, step.finish_reason, [step], True, first)]}
                        first = False
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if opts["include_usage"]:
                        tail = {"id": rid, "object": kind + ("" if not chat else ".chunk"),
                                "created": created, "model": gen.model_name, "choices": [],
                                "usage": usage(n_out), "x_blend": public_info(req)}
                        yield f"data: {json.dumps(tail)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    req.cancelled.set()  # client gone (or done): free the model at the next token

            return StreamingResponse(events(), media_type="text/event-stream")

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
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

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
    ap.add_argument("--ratio", type=float, default=0.15, help="recompute ratio")
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--deviation", choices=["v", "k"], default="v")
    ap.add_argument("--cache-bytes", type=float, default=4e9, help="in-memory chunk KV budget")
    ap.add_argument("--cache-dir", default=None, help="directory that keeps chunk KV across restarts")
    args = ap.parse_args(argv)
    gen = Generator(args.model, args.mode, BlendConfig(args.ratio, args.check_layer, args.deviation),
                    int(args.cache_bytes), args.cache_dir)
    uvicorn.run(create_app(gen), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
