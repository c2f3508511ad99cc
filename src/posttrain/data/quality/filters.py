"""Heuristic filters: cheap, explainable rules that catch rows no model should learn from.

Each rule returns a reason name and a detail string, so a dropped row says exactly why.
Rules run on the text the model is trained to produce (the response; the chosen or
best-ranked responses of preference rows; the desirable completions of KTO rows): a
rejected response is meant to be bad and is left alone.

    too_short / too_long   the response's word count outside [min, max]
    echo                   the response repeats the prompt (normalised)
    encoding               U+FFFD, control characters, or mojibake (UTF-8 bytes decoded as
                           Latin-1 / cp1252: "Ã©" for "é", "â€™" for "’")
    repetition             Gopher's repetition limits (Rae et al. 2021, "Scaling Language
                           Models", Appendix A.1.1, Table A1): duplicate lines, the most
                           frequent 2-4-gram's share of characters, and the share of characters
                           inside duplicated 5-10-grams. Those limits were set for web
                           documents; an answer shorter than `repetition_min_words` is not
                           checked (three words can repeat a bigram by chance).
    char_run               one character repeated many times in a row ("!!!!!!!!...")
    blocklist              a listed phrase in the response (any case)

The thresholds of `repetition` are Gopher's published ones, fixed here.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from posttrain.data.quality.text import normalize, words

# Gopher Table A1: the most frequent n-gram may cover at most this share of the characters ...
TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}
# ... and duplicated n-grams (every occurrence of an n-gram seen twice or more) at most this share.
DUPLICATE_NGRAM_LIMITS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
DUPLICATE_LINE_LIMIT = 0.30  # share of lines that repeat an earlier line
DUPLICATE_LINE_CHAR_LIMIT = 0.20  # share of characters in such lines

_MOJIBAKE = re.compile("Ã[\u0080-\u00bf]|Â[\u00a0-\u00bf]|â€")
_ALLOWED_CONTROL = "\t\n\r"


def check(prompt: str, response: str, cfg) -> tuple[str, str] | None:
    """The first rule `response` (and `prompt`, for echo and encoding) breaks, as (reason, detail);
    None when it passes. `cfg` is a FilterConfig."""
    n_words = len(words(response))
    if cfg.min_response_words and n_words < cfg.min_response_words:
        return "too_short", f"{n_words} words, fewer than min_response_words={cfg.min_response_words}"
    if cfg.max_response_words and n_words > cfg.max_response_words:
        return "too_long", f"{n_words} words, more than max_response_words={cfg.max_response_words}"
    if cfg.echo and prompt and normalize(response) == normalize(prompt):
        return "echo", "the response repeats the prompt"
    if cfg.encoding:
        problem = encoding_problem(prompt) or encoding_problem(response)
        if problem:
            return "encoding", problem
    if cfg.max_char_run:
        run = longest_char_run(response)
        if run[1] >= cfg.max_char_run:
            return "char_run", f"{run[0]!r} repeated {run[1]} times in a row (max_char_run={cfg.max_char_run})"
    if cfg.repetition and n_words >= cfg.repetition_min_words:
        problem = repetition_problem(response)
        if problem:
            return "repetition", problem
    lowered = response.casefold()
    for phrase in cfg.blocklist:
        if phrase.casefold() in lowered:
            return "blocklist", f"contains {phrase!r}"
    return None


def encoding_problem(text: str) -> str | None:
    """What looks broken in the text's characters, or None."""
    if "\ufffd" in text:
        return "contains U+FFFD (a character lost in decoding)"
    for char in text:
        if char not in _ALLOWED_CONTROL and unicodedata.category(char) == "Cc":
            return f"contains the control character U+{ord(char):04X}"
    match = _MOJIBAKE.search(text)
    if match:
        return f"mojibake {match.group()!r} (UTF-8 decoded as Latin-1 / cp1252)"
    return None


def longest_char_run(text: str) -> tuple[str, int]:
    """(character, length) of the longest run of one non-space character."""
    best, length, previous = ("", 0), 0, None
    for char in text:
        length = length + 1 if char == previous else 1
        previous = char
        if length > best[1] and not char.isspace():
            best = (char, length)
    return best


def repetition_problem(text: str) -> str | None:
    """Which of Gopher's repetition limits `text` exceeds, or None."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        seen: set[str] = set()
        repeated = [line for line in lines if line in seen or seen.add(line)]
        if len(repeated) / len(lines) > DUPLICATE_LINE_LIMIT:
            return f"{len(repeated)} of {len(lines)} lines repeat an earlier line (limit {DUPLICATE_LINE_LIMIT:.0%})"
        share = sum(map(len, repeated)) / sum(map(len, lines))
        if share > DUPLICATE_LINE_CHAR_LIMIT:
            return f"repeated lines hold {share:.0%} of the characters (limit {DUPLICATE_LINE_CHAR_LIMIT:.0%})"
    tokens = words(text)
    total = sum(map(len, tokens))
    for n, limit in TOP_NGRAM_LIMITS.items():
        share = top_ngram_share(tokens, n, total)
        if share > limit:
            return f"the most frequent {n}-gram holds {share:.0%} of the characters (limit {limit:.0%})"
    for n, limit in DUPLICATE_NGRAM_LIMITS.items():
        share = duplicate_ngram_share(tokens, n, total)
        if share > limit:
            return f"duplicated {n}-grams hold {share:.0%} of the characters (limit {limit:.0%})"
    return None


def top_ngram_share(tokens: list[str], n: int, total_chars: int) -> float:
    """Characters of the words covered by the most frequent n-gram's occurrences / all word
    characters (a word inside two overlapping occurrences counts once, so the share is at most 1)."""
    if len(tokens) < n or not total_chars:
        return 0.0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    top, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    return _covered_share(tokens, [i for i, gram in enumerate(grams) if gram == top], n, total_chars)


def duplicate_ngram_share(tokens: list[str], n: int, total_chars: int) -> float:
    """Characters of the words covered by an n-gram that occurs twice or more / all word
    characters (a word covered by several such n-grams counts once)."""
    if len(tokens) < n or not total_chars:
        return 0.0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    counts = Counter(grams)
    return _covered_share(tokens, [i for i, gram in enumerate(grams) if counts[gram] > 1], n, total_chars)


def _covered_share(tokens: list[str], starts: list[int], n: int, total_chars: int) -> float:
    covered = [False] * len(tokens)
    for i in starts:
        covered[i:i + n] = [True] * n
    return sum(len(t) for t, c in zip(tokens, covered) if c) / total_chars
