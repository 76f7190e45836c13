"""How close a blended answer is to a full prefill's: KL of next-token distributions and token F1."""

from __future__ import annotations

import re
import string
from collections import Counter


def kl(p_logits, q_logits) -> float:
    """KL(p || q) of next-token distributions given as logits (torch tensors)."""
    import torch

    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum())


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
