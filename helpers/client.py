"""Ask both engines the same RAG question through the official `openai` client and time them.

TTFT is measured from just before the request is sent to the arrival of the first *content* token
(a role-only first chunk does not count). `ask_both` runs the two engines at the same time, in
threads, and calls `on_update` as text streams in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import openai

from . import engines as eng
from .prompts import DEFAULT_SYSTEM
from .runtime import Engine, api_key


@dataclass
class Answer:
    engine: str
    text: str = ""
    first_token: str | None = None  # the first content piece: compared across engines
    ttft_s: float | None = None
    total_s: float | None = None
    n_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)  # the engine's own stage timings, if it reports them
    done: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        if not self.total_s or self.ttft_s is None or self.n_tokens < 2:
            return None
        return (self.n_tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)


def openai_client(e: Engine, timeout: float = 600) -> openai.OpenAI:
    # max_retries=0: a dead engine must surface as an error at once, never as a silent retry
    # the key the engines were started with (KVBLEND_API_KEY); any word when they need none
    return openai.OpenAI(base_url=e.url + "/v1", api_key=api_key() or "local", timeout=timeout,
                         max_retries=0)


def model_id(e: Engine) -> str:
    return openai_client(e, timeout=10).models.list().data[0].id


def stream_answer(e: Engine, chunks: list[str], question: str, max_tokens: int = 64,
                  system: str = DEFAULT_SYSTEM, on_update: Callable[[Answer], None] | None = None,
                  model: str | None = None) -> Answer:
    """Stream one answer (greedy) from engine `e`; never raises: errors land in Answer.error."""
    ans = Answer(e.name)
    try:
        client = openai_client(e)
        model = model or model_id(e)
        t0 = time.perf_counter()
        # each backend builds its own request: chat messages (embedded) or token ids (GPU)
        api, body = eng.backend(e.backend).request(e, model, chunks, question, system)
        create = client.chat.completions.create if api == "chat" else client.completions.create
        stream = create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                        stream_options={"include_usage": True}, **body)
        for event in stream:
            if event.usage:
                ans.prompt_tokens = event.usage.prompt_tokens
                ans.info = (event.model_extra or {}).get("x_blend") or {}
            if not event.choices:
                continue
            c = event.choices[0]
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            if piece:
                if ans.ttft_s is None:
                    ans.ttft_s = time.perf_counter() - t0
                    ans.first_token = piece
                ans.text += piece
                ans.n_tokens += 1
                if on_update:
                    on_update(ans)
        ans.total_s = time.perf_counter() - t0
        if ans.ttft_s is None:  # the answer was empty: the first (only) event still timed the prefill
            ans.ttft_s = ans.total_s
    except openai.APIConnectionError:
        ans.error = (f"The {e.name} engine at {e.url} is not reachable (down or restarting). "
                     "Start it with `./launch_engines.sh` or helpers.engines.start().")
    except openai.APIStatusError as err:
        ans.error = f"The {e.name} engine answered {err.status_code}: {_message(err)}"
    except (openai.APIError, httpx.HTTPError) as err:  # e.g. the engine died while streaming
        ans.error = (f"The {e.name} engine failed mid-answer ({type(err).__name__}: {err}). "
                     f"Its log: {e.log}")
    ans.done = True
    if on_update:
        on_update(ans)
    return ans


def _message(err: openai.APIStatusError) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    return (body.get("error") or body).get("message", str(err)) if isinstance(body, dict) else str(err)


def ask_both(chunks: list[str], question: str, max_tokens: int = 64, system: str = DEFAULT_SYSTEM,
             on_update: Callable[[Answer], None] | None = None,
             engines: tuple[Engine, Engine] | None = None) -> dict[str, Answer]:
    """Ask the blend and the full engine at the same time; return {"blend": Answer, "full": Answer}.

    On the embedded backend the two engines share the CPU cores, so running them at once slows both;
    `ask_one_by_one` gives clean numbers for benchmarks."""
    engines = engines or (eng.find("blend"), eng.find("full"))
    out: dict[str, Answer] = {}

    def run(e):
        out[e.name] = stream_answer(e, chunks, question, max_tokens, system, on_update)

    threads = [threading.Thread(target=run, args=(e,), daemon=True) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def ask_one_by_one(chunks: list[str], question: str, max_tokens: int = 1, system: str = DEFAULT_SYSTEM,
                   engines: tuple[Engine, Engine] | None = None) -> dict[str, Answer]:
    """Same as ask_both, one engine after the other, so neither steals the other's cores."""
    engines = engines or (eng.find("blend"), eng.find("full"))
    return {e.name: stream_answer(e, chunks, question, max_tokens, system) for e in engines}
