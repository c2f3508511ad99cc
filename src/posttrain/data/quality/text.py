"""Text views every quality check shares: one normalisation and one notion of "word".

Deduplication and decontamination compare rows after `normalize` (Unicode NFKC, case folded,
invisible characters deleted, punctuation and whitespace collapsed to one space), so "Hello, World!"
and "hello world" are the same text, and so are "Paris" and "Pa<zero-width space>ris". What each
character does follows its Unicode general category:

    letters L, numbers N, combining marks M   word characters: a Devanagari vowel sign or an
                                              Arabic or Hebrew vowel point is part of its word
    symbols S (+ − × < = > € © 👍 ...)        kept, each one word with a space either side: "12 + 7"
                                              and "12 − 7" differ, "12+7" and "12 + 7" do not
    punctuation P, separators Z, controls Cc  one space (and lone surrogates Cs, which are no text)
    format characters Cf, variation selectors deleted: zero-width space, soft hyphen, word joiner,
                                              zero-width (non-)joiners, bidi controls and emoji
                                              selectors are invisible and must not split a word or
                                              tell two rows apart

`words` splits normalised text into words: a run of word characters, or one symbol, or one
character of a script written without spaces between words (Chinese, Japanese, Thai, Lao, Khmer,
Burmese: a "character word", so word counts and word n-grams work for them too), each with the
combining marks that follow it ("ที่" and "မြ" are one word each). A word of those languages is
a few such characters: Chinese / Japanese one or two, mostly two; Thai and its neighbours more.
`ngram_scale` gives the factor (2) by which checks that count n-word sequences (Gopher's
repetition limits, decontamination) lengthen n for a text made mostly of character words, so an
n-gram spans about as much language there as n words of English.

The classes come from this Python's Unicode database, read once at import (~0.05 s). A character
class compiles to a bitmap up to U+FFFF and to a list of ranges above it, each tried in turn, so
characters beyond U+FFFF (emoji, rare CJK ideographs, historic scripts) are looked up apart:
normalize gives each its role by `unicodedata.category`, and `words` tries the long list for them
only. A word does not run across U+FFFF: "𐌲𐌿𐍄𐌰" (Gothic) is one word, "a𐌲" two.
"""

from __future__ import annotations

import itertools
import re
import sys
import unicodedata

_CJK = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
# Thai, Lao, Myanmar (with Extended-A/B), Khmer (with Khmer Symbols): written without spaces between words.
_UNSPACED = ((0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F),
             (0x1780, 0x17FF), (0x19E0, 0x19FF))
_CHARACTER_WORDS = _CJK + _UNSPACED
NGRAM_SCALE = 2  # n-gram length in character words per word elsewhere (see the module docstring)
_VARIATION_SELECTORS = ((0xFE00, 0xFE0F), (0xE0100, 0xE01EF))
_ROLE = {"Cc": "separator", "Cs": "separator", "Cf": "invisible", **{f"Z{c}": "separator" for c in "slp"},
         **{f"P{c}": "separator" for c in "cdsefio"}, **{f"S{c}": "symbol" for c in "mcko"},
         **{f"M{c}": "mark" for c in "nce"}}  # other categories (letters, numbers, Co, Cn): word characters
_ASTRAL = "\U00010000-\U0010ffff"
# Planes 4-13 hold no character yet and 15-16 only private use (no role): not read.
_ASSIGNED_PLANES = ((0, 0x3FFFF), (0xE0000, 0xEFFFF))


def _class(spans, first: int = 0, last: int = sys.maxunicode) -> str:
    """The inside of a regex character class holding the code point ranges `spans`, cut to [first, last]."""
    return "".join(f"\\U{max(a, first):08x}-\\U{min(b, last):08x}" for a, b in spans if a <= last and b >= first)


def _ranges_by_role() -> dict[str, list[tuple[int, int]]]:
    """Code point ranges (first, last) of each role in _ROLE, plus the variation selectors."""
    out: dict[str, list[tuple[int, int]]] = {"separator": [], "invisible": [], "symbol": [], "mark": []}
    for first, last in _ASSIGNED_PLANES:
        roles = map(_ROLE.get, map(unicodedata.category, map(chr, range(first, last + 1))))
        start = first
        for role, group in itertools.groupby(roles):
            length = len(list(group))
            if role is not None:
                out[role].append((start, start + length - 1))
            start += length
    out["invisible"] += _VARIATION_SELECTORS
    return out


def _role(char: str) -> str | None:
    code = ord(char)
    if any(a <= code <= b for a, b in _VARIATION_SELECTORS):
        return "invisible"
    return _ROLE.get(unicodedata.category(char))


def _astral(m: re.Match[str]) -> str:
    """A character beyond U+FFFF, normalised as the BMP patterns do the others."""
    role = _role(m.group())
    return "" if role == "invisible" else " " if role == "separator" else f" {m.group()} " if role == "symbol" \
        else m.group()


_RANGES = _ranges_by_role()
_OWN_SPANS = _CHARACTER_WORDS + tuple(_RANGES["symbol"])  # characters that are a word each
_OWN, _OWN_ASTRAL = _class(_OWN_SPANS, last=0xFFFF), _class(_OWN_SPANS, first=0x10000)
_INVISIBLE = re.compile(f"[{_class(_RANGES['invisible'], last=0xFFFF)}]+")
_SEPARATOR = re.compile(f"[{_class(_RANGES['separator'], last=0xFFFF)}]+")
_ASTRAL_CHAR = re.compile(f"[{_ASTRAL}]")
_WORD = re.compile(
    f"[^ {_OWN}{_ASTRAL}]+"  # letters, marks, numbers
    f"|[{_OWN}][{_class(_RANGES['mark'], last=0xFFFF)}]*"  # a character word or a symbol, with its marks
    f"|[{_ASTRAL}](?<=[{_OWN_ASTRAL}])"  # the same beyond U+FFFF (the long class tried only there)
    f"|(?:[{_ASTRAL}](?<![{_OWN_ASTRAL}]))+")  # other characters beyond U+FFFF
_CHARACTER_WORD = re.compile(f"[{_class(_CHARACTER_WORDS)}]")
_CHARACTER_WORD_START = re.compile(f"(?<![^ ])[{_class(_CHARACTER_WORDS)}]")  # a word's first character
_SYMBOL = re.compile(f"([{_class(_RANGES['symbol'], last=0xFFFF)}])")  # split keeps each, joined with spaces
del _RANGES, _OWN_SPANS


def normalize(text: str) -> str:
    """NFKC, case folded, format characters and variation selectors deleted, every run of
    punctuation / whitespace / underscores one space, trimmed; letters, marks, numbers and
    symbols kept."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if not text.isascii():  # ASCII has neither an invisible character nor one beyond U+FFFF
        text = _INVISIBLE.sub("", _ASTRAL_CHAR.sub(_astral, text))
    return _SEPARATOR.sub(" ", " ".join(_SYMBOL.split(text))).strip()  # a symbol stands apart: 12+7 = 12 + 7


def words(text: str) -> list[str]:
    """The words of `text` after `normalize`: runs of letters, marks and numbers; each symbol and
    each character of a script written without spaces (with its marks) one word."""
    return _WORD.findall(normalize(text))


def is_character_word(word: str) -> bool:
    """Whether `word` (one of `words`) is a character of a script written without spaces: Chinese,
    Japanese, Thai, Lao, Khmer, Burmese."""
    return _CHARACTER_WORD.match(word) is not None


def ngram_scale(tokens: list[str]) -> int:
    """NGRAM_SCALE where most of `tokens` (from `words`) are character words, else 1: the factor by
    which an n-word check lengthens n for this text."""
    joined = " ".join(tokens)
    if joined.isascii():
        return 1
    return NGRAM_SCALE if len(_CHARACTER_WORD_START.findall(joined)) * 2 > len(tokens) else 1


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """Consecutive n-word tuples; a text shorter than n words gives one tuple of all its words
    (and an empty text none), so short rows still have something to compare."""
    if not tokens:
        return []
    if len(tokens) <= n:
        return [tuple(tokens)]
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
