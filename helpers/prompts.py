"""The chunking contract shared by both engines and every client.

A RAG prompt is `system prefix # # chunk 1 # # chunk 2 # # ... # # question`, with `SEP = " # # "`
(LMCache's default `blend_special_str`). Everything between two separators is one *segment*: the
engines tokenize each segment on its own and never feed the separator to the model, so the blending
engine can look each chunk's KV up by its token ids, whatever its position in the prompt.
"""

from __future__ import annotations

SEP = " # # "

DEFAULT_SYSTEM = (
    "You are a helpful assistant. Answer the question briefly, using only the documents provided."
)


def build_user_message(chunks: list[str], question: str) -> str:
    """User content for the chat API: a leading separator cuts the chat template's prefix (system
    prompt and the `user` header) into a segment of its own, so that prefix is cached once and every
    chunk is a clean segment."""
    return SEP + SEP.join([*chunks, question])


def build_messages(chunks: list[str], question: str, system: str = DEFAULT_SYSTEM) -> list[dict]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": build_user_message(chunks, question)},
    ]


def split_segments(text: str) -> list[str]:
    """Split prompt text on SEP and drop empty pieces (a leading or doubled separator)."""
    return [s for s in text.split(SEP) if s]


def strip_separators(text: str) -> str:
    """The same prompt as one plain text, for engines that know nothing of segments."""
    return " ".join(split_segments(text))


def chat_segments(engine, chunks: list[str], question: str, system: str = DEFAULT_SYSTEM) -> list[list[int]]:
    """Token ids per segment of a RAG chat prompt, exactly as the embedded server's chat endpoint
    builds them (`engine` is a BlendEngine: its tokenizer and per-segment tokenization)."""
    text = engine.tok.apply_chat_template(build_messages(chunks, question, system), tokenize=False,
                                          add_generation_prompt=True)
    return engine.tokenize(split_segments(text))
