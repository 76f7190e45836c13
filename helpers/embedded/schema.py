"""What the embedded engine's OpenAI API accepts: the request models (strict, as OpenAI's), the
OpenAI-style error every refusal becomes, and the parameters it refuses rather than ignores.

Torch-free: the server, its guard and the tests import it without a model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_LOGPROBS = 20
MAX_TEXTS = 32  # chunk texts per precompute request
MAX_STOP_CHARS = 200  # per stop string (the decoder holds back that many characters)
ECHO = 80  # characters of a user's value that an error message repeats

# OpenAI parameters this engine does not implement -> their neutral values. A request that sets one to
# anything else gets a 400 naming it (as vLLM answers what it cannot do), never a silently different
# answer; the neutral values are accepted, since some clients always send them.
UNSUPPORTED = {
    "echo": [False], "best_of": [1], "suffix": ["", None], "logit_bias": [{}, None],
    "presence_penalty": [0], "frequency_penalty": [0], "repetition_penalty": [1],
    "response_format": [{"type": "text"}], "tools": [[]], "tool_choice": ["none", "auto"],
    "functions": [[]], "function_call": ["none", "auto"], "parallel_tool_calls": [False, True],
    "prediction": [None], "audio": [None], "modalities": [["text"]],
}

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



# ------------------------------------------------------------------ request models
# Strict: "5" is no integer and true is no number, as in OpenAI's API. A validator that knows better
# than pydantic's message raises PydanticCustomError with the OpenAI error code as its type.
CODES = ("invalid_value", "invalid_type", "invalid_json", "unsupported_parameter")


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
        """`"temperature": null` means the default, as for OpenAI; a parameter this engine does not
        implement, set to more than its neutral value, is refused by name (UNSUPPORTED)."""
        if not isinstance(data, dict):
            return data
        for name, neutral in UNSUPPORTED.items():
            if name in data and data[name] is not None and data[name] not in neutral:
                raise PydanticCustomError("unsupported_parameter", "'{name}' is not supported by this "
                                          "engine (only {neutral}); leave it out.",
                                          {"name": name, "neutral": " or ".join(map(repr, neutral))})
        return {k: v for k, v in data.items() if v is not None and k not in UNSUPPORTED}

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
    if kind == "unsupported_parameter":
        return BadRequest(err["msg"], err["ctx"]["name"], code=kind)
    if kind in CODES:
        return BadRequest(err["msg"], param, code=kind)
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return BadRequest(f"'{param}': {err['msg']}, got {clip(err.get('input'))}", param, code=code)

