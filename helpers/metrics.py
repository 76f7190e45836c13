"""How close a blended answer is to a full prefill's: KL of next-token distributions and token F1."""

from __future__ import annotations

import math
import re
import string
from collections import Counter


def kl(p_logits, q_logits) -> float:
    """KL(p || q) of next-token distributions given as logits (torch tensors)."""
    import torch

    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def topk_kl(ref: dict[int, float], other: dict[int, float]) -> float:
    """KL(ref || other) over the union of two top-k logprob lists (what OpenAI-style servers return),
    each renormalized on the union.

    A token missing from one list gets that list's smallest logprob (it ranks below all of them, so
    this is an upper bound on its probability): the score can only overstate a difference."""
    floor_r, floor_o = min(ref.values()), min(other.values())
    union = set(ref) | set(other)
    lr = [ref.get(t, floor_r) for t in union]
    lo = [other.get(t, floor_o) for t in union]
    zr = math.log(sum(math.exp(x) for x in lr))
    zo = math.log(sum(math.exp(x) for x in lo))
    return sum(math.exp(a - zr) * ((a - zr) - (b - zo)) for a, b in zip(lr, lo, strict=True))


def _norm(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in string.punctuation or c == "-")
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 (lower case, no punctuation or articles)."""
    p, g = _norm(pred), _norm(gold)
    same = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not same:
        return float(p == g)
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)
