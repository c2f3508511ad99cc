"""Stop 32, data quality backlog: rule lines exempt only at ordinary length, looping code in a fence
caught, emoji-only replies kept, Thai / Lao / Khmer / Burmese counted by character like CJK, the
decontamination n for CJK text, PII shapes found (non-ASCII e-mail addresses, national phone
formats) and section numbers not taken for IP addresses, and the perplexity filter's max_length
held to its model's position table."""

from __future__ import annotations

import pytest

from posttrain.config.quality import FilterConfig, PerplexityConfig
from posttrain.data.quality import filters, perplexity
from posttrain.data.quality.contamination import ContaminationIndex
from posttrain.data.quality.pii import find_pii
from posttrain.data.quality.rows import convert
from posttrain.data.quality.text import words

CFG = FilterConfig()
BODY = "Here is the summary of the results you asked for, in short.\n"


def _found(s: str) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in find_pii(s)]


# --------------------------------------------------------------------------- rule lines


@pytest.mark.parametrize("line", ["-" * 5000, "=" * 2000, "#" * 300, "| " + "-" * 3000 + " |"])
def test_an_overlong_rule_line_is_a_char_run(line):
    reason, detail = filters.check("q", BODY + line + "\nThat is all.", CFG)
    assert reason == "char_run", (reason, detail)


@pytest.mark.parametrize("line", ["-" * 80, "=" * 120, "# " + "=" * 100, "|" + "-" * 60 + "|" + "-" * 50 + "|",
                                  "┌" + "─" * 100 + "┐"])
def test_a_rule_line_of_ordinary_length_passes_both_checks(line):
    assert filters.check("q", BODY + line + "\nThat is all.", CFG) is None


# --------------------------------------------------------------------------- looping code


@pytest.mark.parametrize("code", ["print('hello world again')\n" * 60, "x = x + 1\ny = y * 2\n" * 40,
                                  "def f():\n    return f()\n\n" * 25])
def test_a_fence_looping_one_line_or_block_is_repetition(code):
    response = "Here is the code you asked for, it does the job:\n```python\n" + code + "```\nDone."
    reason, detail = filters.check("q", response, CFG)
    assert reason == "repetition" and "code block" in detail, (reason, detail)
    unclosed = "Sure, here is the script that you wanted to see:\n```\n" + code  # generation cut off mid-loop
    assert filters.check("q", unclosed, CFG)[0] == "repetition"


def test_ordinary_code_json_and_matrices_in_fences_pass():
    code = ("```python\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
            "    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n"
            "        return self.items.pop()\n\n    def empty(self):\n        return not self.items\n```\n")
    config = "```json\n" + "".join('  {"name": "w%d", "enabled": true, "retries": 3},\n' % i for i in range(30)) + "```\n"
    matrix = "```python\nm = [\n" + "    [0, 0, 0, 0, 0, 0],\n" * 6 + "]\n```\n"
    closing = "```c\nint main() {\n  if (a) {\n    if (b) {\n      if (c) {\n        go();\n      }\n    }\n  }\n}\n```\n"
    for block in (code, config, matrix, closing):
        assert filters.check("q", "Here is an example that shows the idea clearly:\n" + block + "Hope it helps.",
                             CFG) is None, block


# --------------------------------------------------------------------------- emoji-only replies


@pytest.mark.parametrize("reply,n", [("👍", 1), ("🎉🎉", 2), ("✅ ❤️", 2)])
def test_an_emoji_only_reply_is_one_word_per_symbol_and_kept(reply, n):
    assert len(words(reply)) == n
    assert filters.check("Thanks!", reply, CFG) is None
    assert filters.check("Thanks!", reply, FilterConfig(min_response_words=3))[0] == "too_short"


# --------------------------------------------------------------------------- scripts without spaces

THAI = ("ประเทศไทยตั้งอยู่ในภูมิภาคเอเชียตะวันออกเฉียงใต้ มีพรมแดนติดกับประเทศพม่า ลาว กัมพูชา และมาเลเซีย "
        "กรุงเทพมหานครเป็นเมืองหลวงและเป็นศูนย์กลางทางเศรษฐกิจของประเทศ อาหารไทยมีชื่อเสียงไปทั่วโลก"
        "เพราะมีรสชาติที่หลากหลาย ทั้งเปรี้ยว หวาน เค็ม และเผ็ด นักท่องเที่ยวจำนวนมากเดินทางมาเที่ยวชม"
        "วัดวาอารามและชายหาดที่สวยงามทุกปี")


@pytest.mark.parametrize("s,n", [("ภาษาไทย", 7), ("ພາສາລາວ", 7), ("ភាសាខ្មែរ", 5), ("မြန်မာစာ", 4),
                                 ("ที่นี่ ok", 3)])
def test_thai_lao_khmer_burmese_count_by_character_like_cjk(s, n):
    # each letter (a vowel letter too: า, ไ) with the marks after it is one word, as each Chinese /
    # Japanese character is
    assert len(words(s)) == n, words(s)


def test_a_thai_paragraph_is_not_too_short_and_its_prose_passes_repetition():
    assert len(words(THAI)) > 150
    assert filters.check("q", THAI, FilterConfig(min_response_words=20)) is None
    reason, detail = filters.check("q", "สวัสดีครับยินดีต้อนรับ" * 12, CFG)
    assert reason == "repetition" and "n doubled" in detail


# --------------------------------------------------------------------------- decontamination

BENCH = "在一个小镇上住着一位老人他每天早上都会去河边钓鱼并且从不空手而归这让镇上的人们都感到非常惊讶"


def test_cjk_decontamination_n_spans_as_many_words_as_the_word_n():
    index = ContaminationIndex([BENCH, "What is the capital city of France and why is it famous today"],
                               ["eval:1", "eval:2"], 13)
    assert index.find("训练数据：" + BENCH[5:40] + "。")[0] == "eval:1"  # 35 characters of the benchmark
    assert index.find("他说" + BENCH[:13] + "，然后走了。") is None  # 13 shared characters: ~6 words
    assert index.find("我们都感到非常惊讶的是这个结果") is None
    assert index.find("so: what is the capital city of France and why is it famous today?")[0] == "eval:2"
    assert ContaminationIndex(["小镇上的老人"], ["eval:3"], 13).find("在小镇上的老人家里") == ("eval:3", "小 镇 上 的 老 人")


# --------------------------------------------------------------------------- PII


@pytest.mark.parametrize("s,found", [
    ("mail jürgen.müller@beispiel.de now", [("email", "jürgen.müller@beispiel.de")]),
    ("mail jürgen.mu\u0308ller@beispiel.de", [("email", "jürgen.mu\u0308ller@beispiel.de")]),  # NFD
    ("info@例え.jp", [("email", "info@例え.jp")]),
    ("请发邮件到info@例え.jp谢谢", [("email", "info@例え.jp")]),
    ("mail: a@münchen.de", [("email", "a@münchen.de")]),
    ("ΣΤΟ andreas@παράδειγμα.gr", [("email", "andreas@παράδειγμα.gr")]),
    ("звоните 8 (495) 123-45-67", [("phone", "8 (495) 123-45-67")]),
    ("Tel. 030/1234567", [("phone", "030/1234567")]),
    ("call 1 (800) 555-0199", [("phone", "1 (800) 555-0199")]),
    ("call 1-(800) 555-0199", [("phone", "1-(800) 555-0199")]),
    ("Section 1.2.10.4 says", []), ("§ 1.2.10.4", []), ("see §1.2.10.4", []), ("Chapter 1.2.3.4", []),
    ("server 10.2.10.4 is down", [("ip_address", "10.2.10.4")]),
])
def test_pii_non_ascii_emails_national_phones_and_section_numbers(s, found):
    assert _found(s) == found


@pytest.mark.parametrize("s", ["03/12/2024", "1/2/3", "2023/2024", "a.b@c", "10 (20) 30-40-50",
                               "8 (495) 123", "050/12", "room 1 (800) seats"])
def test_no_new_pii_false_positives(s):
    assert _found(s) == []


# --------------------------------------------------------------------------- perplexity


def test_perplexity_max_length_is_held_to_the_model_position_table(monkeypatch):
    import posttrain.inference
    from posttrain.inference import load_for_inference

    model, tokenizer = load_for_inference("tiny-2l")
    model.config.max_position_embeddings = 24
    monkeypatch.setattr(posttrain.inference, "load_for_inference", lambda *a, **k: (model, tokenizer))
    rows = [convert({"instruction": "Name a colour.", "output": "Blue and green " * 20}, "alpaca", "a:1"),
            convert({"instruction": "Hi", "output": "Hello."}, "alpaca", "a:2")]
    said: list[str] = []
    scores, _, _ = perplexity.score_rows(rows, PerplexityConfig(model="tiny-2l", max_length=4096), log=said.append)
    at_table, _, _ = perplexity.score_rows(rows, PerplexityConfig(model="tiny-2l", max_length=24), log=lambda _: None)
    assert [s.perplexity for s in scores] == [s.perplexity for s in at_table]
    assert scores[0].truncated and scores[0].tokens < 24 and not scores[1].truncated
    assert any("24" in line and "max_length" in line for line in said), said
