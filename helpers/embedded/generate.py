"""Text in, tokens out: segmentation, prefill in `blend` or `full` mode, sampling, stop strings and
incremental detokenization. The server streams what `Generator.run` yields."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..prompts import escape_separator, split_segments
from ..settings import BLEND, BlendSettings
from .blend import ModelRunner
from .kvstore import ChunkKVStore
from .model import load_model
from .remote import RedisTier

LOGPROB_FLOOR = -9999.0  # what vLLM reports for an impossible token
SAMPLING_EPS = 1e-5  # a temperature below this is greedy decoding, as in vLLM (no overflow to inf)


@dataclass
class Request:
    segments: list[list[int]]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # how many top alternatives to report per token
    cancelled: threading.Event = field(default_factory=threading.Event)
    info: dict = field(default_factory=dict)  # the prefill's stage timings, filled in by run()


@dataclass
class Step:
    text: str  # new text since the last step (may be "" while a multi-byte char is incomplete)
    token: int | None = None
    token_str: str = ""  # the token alone, decoded (for logprobs)
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last step


class Generator:
    """One model, one mode. Not thread-safe by design: the server runs one request at a time."""

    def __init__(self, model: str | None = None, mode: str = "blend", blend: BlendSettings = BLEND,
                 store_bytes: int = 2 << 30, store_dir: str | Path | None = None, disk_bytes: int = 8 << 30,
                 remote_url: str | None = None):
        if mode not in ("blend", "full"):
            raise ValueError(f"mode must be 'blend' or 'full', not {mode!r}")
        mdl, tok, path = load_model(model)
        self.model_name = "smollm2" if model in (None, "smollm2") else Path(model).name
        self.mode, self.tok, self.blend = mode, tok, blend
        remote = RedisTier(remote_url, str(path)) if remote_url and mode == "blend" else None
        store = ChunkKVStore(store_bytes, store_dir, disk_bytes, model_id=str(path), remote=remote)
        self.runner = ModelRunner(mdl, tok, store, model_id=str(path))
        self.context_length = self.runner.max_len
        self.stop_ids = {i for i in [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
                         if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}

    # ------------------------------------------------------------- prompts
    def chat_text(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def segments(self, text: str, chat: bool) -> list[list[int]]:
        """Token ids per segment; a plain completion prompt gets the tokenizer's BOS, a chat template
        wrote its own."""
        return self.runner.tokenize(split_segments(text), add_bos=not chat)

    def cache_chunk(self, text: str) -> dict:
        """Compute (or find) the KV of one chunk, tokenized as it is inside a prompt."""
        t0 = time.perf_counter()
        text = escape_separator(text)  # as the prompt builders write it: one segment, never cut
        ids = self.runner.tokenize([text])[0] if text else []
        hit = True
        if ids:
            _, hit = self.runner.chunk_kv(ids)
        return {"tokens": len(ids), "cached": hit, "ms": (time.perf_counter() - t0) * 1e3}

    # ------------------------------------------------------------- generation
    def prefill(self, segments: list[list[int]], room: int, explain: bool = False):
        if self.mode == "blend":
            return self.runner.blend_prefill(segments, self.blend, room=room, explain=explain)
        return self.runner.full_prefill([t for s in segments for t in s], room=room)

    def run(self, req: Request):
        """Yield Steps: the first comes right after the prefill (that is the TTFT), the last has a
        finish_reason. Stops early, without a final step, when req.cancelled is set."""
        n_prompt = sum(len(s) for s in req.segments)
        self.runner.check_length(n_prompt + req.max_tokens)
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        state = self.prefill(req.segments, room=req.max_tokens)
        req.info = state.info
        ids: list[int] = []
        sent = ""  # text already yielded
        hold = max((len(s) for s in req.stop), default=1) - 1  # chars kept back: a stop may be starting
        for i in range(req.max_tokens):
            if req.cancelled.is_set():
                return
            logits = state.logits if i == 0 else self.runner.decode_step(state, ids[-1])
            token, lp, top = self.sample(logits, req, gen)
            if token in self.stop_ids:
                yield Step(self.tok.decode(ids, skip_special_tokens=True)[len(sent):], finish_reason="stop")
                return
            ids.append(token)
            text = self.tok.decode(ids, skip_special_tokens=True)
            step = Step("", token, self.tok.decode([token]), lp, top)
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            if cut >= 0 or i == req.max_tokens - 1:
                step.text = text[len(sent):cut] if cut >= 0 else text[len(sent):]
                step.finish_reason = "stop" if cut >= 0 else "length"
                yield step
                return
            ready = text[: len(text) - hold] if hold else text
            if not ready.endswith("\ufffd") and len(ready) > len(sent):  # no half multi-byte char
                step.text, sent = ready[len(sent):], ready
            yield step

    def sample(self, logits: torch.Tensor, req: Request, gen):
        if not torch.isfinite(logits).any() or torch.isnan(logits).any():
            raise RuntimeError("the model produced NaN scores (damaged weights or cached KV?); "
                               "restart the engine and clear .cache/chunk-kv if it persists")
        logp = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOGPROB_FLOOR)  # -inf is no JSON
        if req.temperature < SAMPLING_EPS:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits.float() / req.temperature, dim=-1)
            if req.top_p < 1.0:
                p_sorted, idx = torch.sort(probs, descending=True)
                keep = torch.cumsum(p_sorted, 0) - p_sorted < req.top_p
                keep[0] = True  # the top token always stays, however small top_p (1e-300 is 0 in float32)
                probs = torch.zeros_like(probs).scatter(0, idx[keep], p_sorted[keep])
            token = int(torch.multinomial(probs, 1, generator=gen))
        top = None
        if req.logprobs:
            vals, idx = torch.topk(logp, req.logprobs)
            top = {self.tok.decode([int(j)]): float(v) for v, j in zip(vals, idx, strict=True)}
        return token, float(logp[token]), top
