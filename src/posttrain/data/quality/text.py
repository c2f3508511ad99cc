"""Text views every quality check shares: one normalisation and one notion of "word".

Deduplication and decontamination compare rows after `normalize` (Unicode NFKC, case folded,
punctuation dropped, whitespace collapsed), so "Hello, World!" and "hello world" are the same
text. `words` splits normalised text into words; Chinese and Japanese characters are one word
each (those scripts put no spaces between words), so word n-grams work for them too.
"""

from __future__ import annotations

import re
import unicodedata

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")  # one CJK character, or a run of other word characters
_NOT_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """NFKC, case folded, every run of punctuation / whitespace / underscores one space, trimmed."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def words(text: str) -> list[str]:
    """The words of `text` after `normalize` (CJK characters one word each)."""
    return _WORD.findall(normalize(text))


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """Consecutive n-word tuples; a text shorter than n words gives one tuple of all its words
    (and an empty text none), so short rows still have something to compare."""
    if not tokens:
        return []
    if len(tokens) <= n:
        return [tuple(tokens)]
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
