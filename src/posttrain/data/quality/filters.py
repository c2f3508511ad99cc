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
                           inside duplicated 5-10-grams. Those limits were set for the prose of
                           web documents, so they read only the response's prose: fenced code
                           blocks, display maths (\\begin{..}...\\end{..}, $$...$$, \\[...\\]),
                           markdown tables and rule lines are set aside first (a table's rows, a
                           JSON config's keys and a derivation's lines repeat by design). Prose
                           shorter than `repetition_min_words` is not checked (three words can
                           repeat a bigram by chance). text.words makes each character of
                           Chinese, Japanese, Thai, Lao, Khmer and Burmese a word, while a word
                           of those languages is a few characters: where most words are such
                           characters every n is doubled (text.ngram_scale; undoubled, prose that
                           names a four-character term three times failed the 2-gram limit; a
                           line repeated over and over still fails doubled).
                           A fenced code block or a display-maths block fails when it loops, as
                           a model that degenerates writes: one block of 1-8 lines (with a
                           letter or digit) written LOOP_MIN_COPIES (10) or more times back to
                           back, the copies after the first holding more than Gopher's
                           duplicate-line share (30%) of the block's non-blank lines. Ordinary code, whose repeated lines ("}",
                           "return x") do not follow each other in long runs, passes, and so do
                           ordinary derivations (each line of an align a new step).
    char_run               one character repeated many times in a row ("!!!!!!!!..."), outside
                           rule lines of ordinary length: a line of at most RULE_LINE_MAX_CHARS
                           (120) characters, only - = _ * # ~ | : + / box-drawing characters and
                           spaces (a markdown table's separator row, a comment banner). A longer
                           one (a row of 5,000 dashes) is a run like any other.
    blocklist              a listed phrase in the response (any case)

The thresholds of `repetition` are Gopher's published ones, fixed here.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from posttrain.data.quality.text import ngram_scale, normalize, words

# Gopher Table A1: the most frequent n-gram may cover at most this share of the characters ...
TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}
# ... and duplicated n-grams (every occurrence of an n-gram seen twice or more) at most this share.
DUPLICATE_NGRAM_LIMITS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
DUPLICATE_LINE_LIMIT = 0.30  # share of lines that repeat an earlier line
DUPLICATE_LINE_CHAR_LIMIT = 0.20  # share of characters in such lines
LOOP_MIN_COPIES = 10  # back-to-back copies of a block of at most LOOP_MAX_LINES lines that make a code loop
LOOP_MAX_LINES = 8
RULE_LINE_MAX_CHARS = 120  # a longer line of rule characters is no rule line

_MOJIBAKE = re.compile("Ã[\u0080-\u00bf]|Â[\u00a0-\u00bf]|â€")
_ALLOWED_CONTROL = "\t\n\r"
_RULE_CHARS = r"\-=_*#~|:+/\u2500-\u257f"
# from the first to the last rule character at most RULE_LINE_MAX_CHARS characters
_RULE_LINE = re.compile(f"^[ \\t]*[{_RULE_CHARS}][ \\t{_RULE_CHARS}]{{0,{RULE_LINE_MAX_CHARS - 1}}}"
                        f"(?<![ \\t])[ \\t\\r]*$", re.M)
# Structured blocks the repetition limits skip. A fence runs to its closing fence or, unclosed, to the end.
_FENCED_CODE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?(?:^[ \t]*\1[`~]*[ \t]*$|\Z)", re.M | re.S)
_DISPLAY_MATH = re.compile(r"\\begin\{([A-Za-z]+\*?)\}.*?\\end\{\1\}|\$\$.+?\$\$|\\\[.+?\\\]", re.S)
_TABLE_DELIMITER = re.compile(r"[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)+\|?[ \t]*")


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
        text = prose(response)
        if text == response or len(words(text)) >= cfg.repetition_min_words:
            problem = repetition_problem(text)
            if problem:
                where = "" if text == response else ", in the prose outside code, maths and tables"
                return "repetition", problem + where
        problem = code_loop(response)
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


def is_rule_line(line: str) -> bool:
    """A line of only - = _ * # ~ | : + / box-drawing characters and spaces ("|------|---|",
    "# -----"), at most RULE_LINE_MAX_CHARS long once stripped."""
    return _RULE_LINE.fullmatch(line) is not None


def longest_char_run(text: str) -> tuple[str, int]:
    """(character, length) of the longest run of one non-space character, outside rule lines
    (`is_rule_line`)."""
    best = ("", 0)
    for line in text.splitlines():  # a run of non-space characters never crosses a line break
        if is_rule_line(line):
            continue
        length, previous = 0, None
        for char in line:
            length = length + 1 if char == previous else 1
            previous = char
            if length > best[1] and not char.isspace():
                best = (char, length)
    return best


def prose(text: str) -> str:
    """`text` without fenced code blocks, display maths, markdown tables (a GitHub table: a
    header row, a delimiter row "|---|:--:|" and the rows with a "|" after it) and rule lines
    (`is_rule_line`; each left an empty line)."""
    text = _DISPLAY_MATH.sub("\n", _FENCED_CODE.sub("\n", text))
    if "|" in text:
        lines = text.split("\n")
        table = [False] * len(lines)
        for i, line in enumerate(lines):
            if i and "|" in lines[i - 1] and _TABLE_DELIMITER.fullmatch(line):
                table[i - 1] = table[i] = True
                for j in range(i + 1, len(lines)):
                    if "|" not in lines[j]:
                        break
                    table[j] = True
        text = "\n".join(line for line, skip in zip(lines, table) if not skip)
    return _RULE_LINE.sub("", text)


def repetition_problem(text: str) -> str | None:
    """Which of Gopher's repetition limits `text` exceeds, or None (n-grams of text.ngram_scale x n
    words: doubled where most words are character words)."""
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
    scale = ngram_scale(tokens)
    unit = " (character words: n doubled)" if scale > 1 else ""
    for n, limit in TOP_NGRAM_LIMITS.items():
        share = top_ngram_share(tokens, n * scale, total)
        if share > limit:
            return f"the most frequent {n * scale}-gram{unit} holds {share:.0%} of the characters (limit {limit:.0%})"
    for n, limit in DUPLICATE_NGRAM_LIMITS.items():
        share = duplicate_ngram_share(tokens, n * scale, total)
        if share > limit:
            return f"duplicated {n * scale}-grams{unit} hold {share:.0%} of the characters (limit {limit:.0%})"
    return None


def code_loop(text: str) -> str | None:
    """The first fenced code block or display-maths block (the blocks `prose` sets aside) of `text`
    that loops (the module docstring: LOOP_MIN_COPIES or more back-to-back copies of one block of
    at most LOOP_MAX_LINES lines, with a letter or digit, the copies after the first more than
    DUPLICATE_LINE_LIMIT of the block's non-blank lines), said as a detail; or None."""
    blocks = [("code", fence.group().splitlines()[1:]) for fence in _FENCED_CODE.finditer(text)]
    outside_code = _FENCED_CODE.sub("\n", text)
    blocks += [("maths", maths.group().splitlines()) for maths in _DISPLAY_MATH.finditer(outside_code)]
    for kind, block in blocks:
        lines = [line.strip() for line in block if line.strip()]
        for size in range(1, LOOP_MAX_LINES + 1):
            repeated = 0  # lines so far equal to the line `size` before: a run of back-to-back copies
            for i in range(size, len(lines)):
                repeated = repeated + 1 if lines[i] == lines[i - size] else 0
                copies = 1 + repeated // size
                if (copies >= LOOP_MIN_COPIES and (copies - 1) * size > DUPLICATE_LINE_LIMIT * len(lines)
                        and any(c.isalnum() for line in lines[i - size + 1:i + 1] for c in line)):
                    end = i + 1  # the run's end, to count every copy
                    while end < len(lines) and lines[end] == lines[end - size]:
                        end += 1
                    copies = 1 + (repeated + end - i - 1) // size
                    return (f"a {kind} block loops: a {size}-line block written {copies} times in a row "
                            f"(from {lines[i - size + 1][:40]!r})")
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
