"""Degenerate text: an answer that repeats itself. Used by the loop's evaluation (datagen/evaluate.py) and by
curation's scores (pipelines/score.py), so both call the same answers degenerate."""

from __future__ import annotations

import re
from collections import Counter

REPEAT_NGRAM = 3
REPEAT_COUNT = 4
"""An answer in which one word 3-gram occurs 4 or more times is degenerate ("long, long, long, ..."): a fluent
96-token answer rarely says the same three words four times."""

_WORD = re.compile(r"\w+")


def repeats(answer: str, n: int = REPEAT_NGRAM, count: int = REPEAT_COUNT) -> bool:
    """Numbers do not count as words, so a numbered list of one phrase ("1. Music theory 2. Music theory ...") repeats."""
    words = [w for w in _WORD.findall(answer.lower()) if not w.isdigit()]
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= count
