"""Stop 31, data quality on multilingual text: behaviour added beside the walkthrough's pinned cases
(tests/test_walkthrough_quality.py): characters beyond U+FFFF, variation selectors, lone surrogates,
what the repetition and character-run rules still catch, and PII boundaries kept."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from posttrain.config.quality import FilterConfig
from posttrain.data.quality import filters, text
from posttrain.data.quality.dedup import exact_duplicates, near_duplicates
from posttrain.data.quality.pii import find_pii
from posttrain.data.quality.text import normalize, words


def _found(s: str) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in find_pii(s)]


# --------------------------------------------------------------------------- text


def test_the_planes_not_read_at_import_hold_no_character_with_a_role():
    # text.py reads the categories of planes 0-3 and 14 only; a Unicode version that assigns a
    # symbol, mark or punctuation elsewhere must be read too.
    skipped = [c for c in range(sys.maxunicode + 1)
               if not any(a <= c <= b for a, b in text._ASSIGNED_PLANES)
               and text._ROLE.get(unicodedata.category(chr(c)))]
    assert skipped == []


@pytest.mark.parametrize("s,normal,split", [
    ("Haha 😂😂 congrats🎉!", "haha 😂 😂 congrats 🎉", ["haha", "😂", "😂", "congrats", "🎉"]),
    ("I ❤️ it", "i ❤ it", ["i", "❤", "it"]),  # the emoji selector is invisible
    ("𠮶𠮶係乜嘢", "𠮶𠮶係乜嘢", ["𠮶", "𠮶", "係", "乜", "嘢"]),  # CJK Extension B: one character a word
    ("𐌲𐌿𐍄𐌰 word", "𐌲𐌿𐍄𐌰 word", ["𐌲𐌿𐍄𐌰", "word"]),  # Gothic letters beyond U+FFFF make one word
    ("a\U0001144bb", "a b", ["a", "b"]),  # a punctuation mark beyond U+FFFF (Newa danda) separates
    ("x\U000e0041y", "xy", ["xy"]),  # a tag character (Cf) is deleted
    ("x = y + 1", "x = y + 1", ["x", "=", "y", "+", "1"]),
    ("x=y+1", "x = y + 1", ["x", "=", "y", "+", "1"]),  # a symbol stands apart whatever the spacing
    ("snake_case, ok?", "snake case ok", ["snake", "case", "ok"]),  # the underscore is punctuation
])
def test_normalize_and_words_beyond_the_pinned_cases(s, normal, split):
    assert (normalize(s), words(s)) == (normal, split)


def test_an_emoji_with_and_without_its_presentation_selector_is_one_row():
    found = exact_duplicates(["Thanks ❤️", "Thanks ❤", "Thanks 💔"])
    assert [d.of if d else None for d in found] == [None, 0, None]


def test_a_lone_surrogate_is_a_separator_and_near_dedup_survives_it():
    # json.loads accepts "\ud800"; a surrogate inside a word would fail the UTF-8 encoding of shingles
    rows = ["one two three four five six \ud800 seven", "one two three four five six seven"]
    assert words(rows[0]) == words(rows[1])
    assert near_duplicates(rows)[0][1] is not None


def test_ascii_prose_normalises_as_before():
    s = "Hello, World! It's 3.5% -- (maybe) [ok]; \"quoted\" text_with_underscores\tand\nlines."
    assert normalize(s) == "hello world it s 3 5 maybe ok quoted text with underscores and lines"


# --------------------------------------------------------------------------- filters

CFG = FilterConfig()


@pytest.mark.parametrize("response", ["这个问题很好。" * 8, "ありがとうございます。" * 6,
                                      "我爱你，" * 20 + "我爱你。"])
def test_repeated_cjk_text_is_still_dropped(response):
    reason, detail = filters.check("问题", response, CFG)
    assert reason == "repetition" and "n doubled" in detail


def test_repeated_prose_around_a_code_block_is_still_dropped():
    response = "I can help with that. " * 12 + "\n```python\nprint(1)\n```"
    reason, detail = filters.check("Help?", response, CFG)
    assert reason == "repetition" and detail.endswith("in the prose outside code, maths and tables")


def test_prose_sets_aside_code_maths_and_tables():
    s = ("Intro.\n```py\nx = 1\n```\nMiddle $$a = b$$ and \\[c\\] end.\n"
         "\\begin{equation*}\ny = 2\n\\end{equation*}\n"
         "a | b\n--|:-:\n1 | 2\n3 | 4\n\nAfter | the table.\n~~~\nunclosed fence")
    assert filters.prose(s).split() == ["Intro.", "Middle", "and", "end.", "After", "|", "the", "table."]
    assert filters.prose("No | table here\nat all") == "No | table here\nat all"


@pytest.mark.parametrize("response", ["Wow" + "!" * 40, "Wait " + "-" * 45 + " what?", "# Config " + "-" * 45])
def test_a_run_on_a_line_with_other_text_is_still_a_char_run(response):
    assert filters.check("x", response, CFG)[0] == "char_run"


def test_rule_lines_are_not_char_runs():
    assert filters.longest_char_run("title\n" + "=" * 60 + "\n┌" + "─" * 50 + "┐\n" + "*" * 45) == ("t", 1)


# --------------------------------------------------------------------------- PII


@pytest.mark.parametrize("s,found", [
    ("AB-050-1234567", []),  # a hyphen after an ASCII letter still joins: a code
    ("ID-4111 1111 1111 1111", []),
    ("2024-050-1234567", []),
    ("call +1.415.555.0132 now", [("phone", "+1.415.555.0132")]),  # several dots: a phone
    ("ＴＥＬ：（０３）１２３４－５６７８", [("phone", "（０３）１２３４－５６７８")]),  # offsets into the text itself
    ("ip １９２．１６８．１．２０", [("ip_address", "１９２．１６８．１．２０")]),
    ("a\u3000info@example.com\u3000b", [("email", "info@example.com")]),
    ("２０２４年１月１５日", []),
])
def test_pii_boundaries_kept_and_full_width_offsets(s, found):
    assert _found(s) == found
