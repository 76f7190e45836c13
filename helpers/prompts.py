"""The chunking contract, for both backends and every client.

A RAG prompt is `system prefix # # chunk 1 # # chunk 2 # # ... # # question`, with `SEP = " # # "`
(LMCache's default `blend_special_str`). Everything between two separators is one *segment*: the
engines tokenize each segment on its own, so a chunk has the same token ids wherever it stands and
its cached KV is found by those ids, in any position.

- embedded backend: clients send chat messages with SEP in the text (`build_messages`); the server
  splits the templated text on SEP (`split_segments`) and never feeds SEP to the model
  (`chat_segments` is the same cut, in process).
- GPU backend: clients send the same chat conversation as token ids (`chat_prompt_ids`), to both
  engines; LMCache finds segment boundaries by the separator's ids (`separator_ids`), which stay in
  the prompt.
"""

from __future__ import annotations

SEP = " # # "
SEP_IN_TEXT = " ## "  # what SEP inside a chunk or a question becomes (`escape_separator`)

DEFAULT_SYSTEM = (
    "You are a helpful assistant. Answer the question briefly, using only the documents provided."
)


def escape_separator(text: str) -> str:
    """`text` with every SEP written as SEP_IN_TEXT, so that it cannot cut a chunk into segments.
    The library applies it to your documents when it loads them and the prompt builders to every
    chunk and question, so a chunk is precomputed and prompted as the same single segment."""
    while SEP in text:  # " # # # " would leave a SEP behind after a single pass
        text = text.replace(SEP, SEP_IN_TEXT)
    if text.endswith(" #"):  # "a #" + SEP reads as "a" + SEP + "# ": the cut would move left
        text = text[:-1] + "##"
    return text


# ------------------------------------------------------------------ text prompts (embedded backend)
def build_user_message(chunks: list[str], question: str) -> str:
    """User content for the chat API: a leading separator cuts the chat template's prefix (system
    prompt and the `user` header) into a segment of its own, so that prefix is cached once and every
    chunk is a clean segment."""
    return SEP + SEP.join(escape_separator(t) for t in [*chunks, question])


def build_messages(chunks: list[str], question: str, system: str = DEFAULT_SYSTEM) -> list[dict]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": build_user_message(chunks, question)},
    ]


def split_segments(text: str) -> list[str]:
    """Split prompt text on SEP and drop empty pieces (a leading or doubled separator)."""
    return [s for s in text.split(SEP) if s]


def chat_segments(runner, chunks: list[str], question: str, system: str = DEFAULT_SYSTEM) -> list[list[int]]:
    """Token ids per segment of a RAG chat prompt, exactly as the embedded server's chat endpoint
    builds them (`runner` is a ModelRunner: its tokenizer and per-segment tokenization)."""
    text = runner.tok.apply_chat_template(build_messages(chunks, question, system), tokenize=False,
                                          add_generation_prompt=True)
    return runner.tokenize(split_segments(text))


# ------------------------------------------------------------------ token-id prompts (GPU backend)
def separator_ids(tokenizer, sep: str = SEP) -> list[int]:
    """The separator ids LMCache's SegmentTokenDatabase searches for: `encode(sep)[1:]`.

    LMCache drops the first id assuming it is BOS; for a tokenizer without BOS (SmolLM2) that drops
    the first real token, so we must do exactly the same to match."""
    return list(tokenizer.encode(sep))[1:]


def chat_segment_ids(tokenizer, chunks: list[str], question: str | None, system: str = DEFAULT_SYSTEM
                     ) -> list[list[int]]:
    """Token ids per segment of the chat-templated RAG prompt, cut exactly as the embedded chat path
    cuts it: the template's prefix (system prompt and user header), one segment per chunk, and the
    question with the template's end of turn and generation header (`question=None`: none, what
    precompute sends)."""
    text = tokenizer.apply_chat_template(build_messages(chunks, question or "", system), tokenize=False,
                                         add_generation_prompt=True)
    segments = split_segments(text)
    if question is None:
        segments = segments[:-1]
    return [list(tokenizer.encode(s, add_special_tokens=False)) for s in segments]


def chat_prompt_ids(tokenizer, chunks: list[str], question: str | None, system: str = DEFAULT_SYSTEM
                    ) -> list[int]:
    """The chat prompt's segments joined by LMCache's separator ids. *Both* GPU engines get these
    ids, so the side-by-side differs in blending only (the separator tokens are seen by both)."""
    sep, ids = separator_ids(tokenizer), []
    for i, seg in enumerate(chat_segment_ids(tokenizer, chunks, question, system)):
        ids += (sep if i else []) + seg
    return ids
