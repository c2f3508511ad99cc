"""A data engineer's walk: cleaning a real, multilingual corpus with `posttrain quality`.

Walked: the README's data-quality section, src/posttrain/data/quality/ and config/quality.py, with text
that is not ASCII English: Chinese and Japanese (no spaces), Arabic and Hebrew (right to left), Hindi,
Russian, German compounds and soft hyphens, emoji-heavy chat, code, LaTeX, markdown tables and URLs.
The filters (word counts on unspaced scripts, Gopher's repetition limits, the character-run rule); PII
on international formats in native-script sentences (+44 / +81 / +91 / +7 / +49 / +972 numbers,
plus-addressed and non-ASCII e-mail addresses, IPv4 / IPv6 with ports and zones, cards with and without
a valid Luhn, IBANs) and on what is not PII (dates, ISBNs, versions, order ids, UUIDs, hashes,
timestamps, coordinates); exact and near dedup under Unicode variants (full-width, NFC / NFD, zero-width
characters, soft hyphens, trailing whitespace, case, combining marks); decontamination against a
benchmark item copied with other whitespace, case, punctuation and digit widths; and the report (rows
in = kept + dropped, every drop with its reason, order kept, a second pass over kept.jsonl).

What was right: CJK characters count as words, so Chinese and Japanese prose is neither "too short" nor
one giant word; NFKC folds full-width forms and NFD accents; case, trailing whitespace, NBSP and CJK
punctuation do not hide an exact duplicate or a benchmark copy; PII finds +CC numbers, Japanese and
Chinese national numbers and plus-addressed e-mails inside unspaced Chinese / Japanese and RTL text and
redacts them to <KIND> without touching the script around them; dates, ISBNs, versions, UUIDs, hashes
and checksum near-misses stay; the counts add up; the kept rows keep their order and their characters
(written as UTF-8, not escaped); and a second pass over the kept rows drops nothing and rewrites them
byte for byte.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 31:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from posttrain.config.quality import FilterConfig, QualityConfig
from posttrain.data.quality import filters
from posttrain.data.quality.contamination import ContaminationIndex
from posttrain.data.quality.dedup import exact_duplicates
from posttrain.data.quality.pii import find_pii, redact
from posttrain.data.quality.run import run_quality
from posttrain.data.quality.text import words

QUIET = {"log": lambda _: None}


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _run(tmp_path: Path, rows: list[dict], name: str = "out", **overrides) -> Path:
    data = _write(tmp_path / f"{name}.jsonl", rows)
    items = [f"output_dir={tmp_path / name}", f"data.files={json.dumps([data])}"]
    items += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return run_quality(QualityConfig.load(None, items), **QUIET)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _found(text: str) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in find_pii(text)]


def _qa(instruction: str, output: str) -> dict:
    return {"instruction": instruction, "output": output}


# --------------------------------------------------------------------------- the whole pass

CORPUS = [
    _qa("光合作用是什么？", "光合作用是植物利用光能把二氧化碳和水转化为葡萄糖和氧气的过程。"),
    _qa("光合作用是什么？", "光合作用是植物利用光能把二氧化碳和水转化为葡萄糖和氧气的过程。 "),  # trailing space
    _qa("東京について教えて", "東京は日本の首都です。人口は約千四百万人です。"),
    _qa("ＡＢＣ とは？", "ＡＢＣは略語です。"),
    _qa("ABC とは？", "ABCは略語です。"),  # the full-width row above, half-width
    _qa("Was ist ein Café?", "Ein Café ist ein Lokal für Kaffee und Kuchen."),
    _qa("Was ist ein Café?", unicodedata.normalize("NFD", "Ein Café ist ein Lokal für Kaffee und Kuchen.")),
    _qa("Contact?", "Write to anna+work@example.de or call +44 7700 900123."),
    _qa("連絡先は？", "メールはtaro.yamada@example.co.jpまで、電話は+81 90-1234-5678です。"),
    _qa("مرحبا", "أهلاً وسهلاً! كيف يمكنني مساعدتك اليوم؟ راسلني على ahmed.ali@example.com"),
    _qa("Привет", "Здравствуйте! Телефон: +7 (916) 123-45-67, почта ivan@mail.ru"),
    _qa("React to the news", "Haha that's amazing 😂😂 congrats on the new job!!! 🎉 let's celebrate ❤️"),
    _qa("Show me a link", "See https://en.wikipedia.org/wiki/Photosynthesis for the details."),
]


def test_a_multilingual_pass_accounts_for_every_row_keeps_order_and_a_second_pass_is_a_no_op(tmp_path):
    out = _run(tmp_path, CORPUS)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    kept, dropped = _jsonl(out / "kept.jsonl"), _jsonl(out / "dropped.jsonl")
    s = report["summary"]
    assert (s["rows"], s["kept"], s["dropped"], s["malformed"]) == (13, 10, 3, 0)
    assert {(d["location"].rsplit(":", 1)[1], d["reason"]) for d in dropped} == \
        {("2", "exact_duplicate"), ("5", "exact_duplicate"), ("7", "exact_duplicate")}
    assert all(d["detail"] for d in dropped)
    # order kept, the script around a redaction untouched, the text written as UTF-8
    assert [r["instruction"] for r in kept] == [CORPUS[i]["instruction"] for i in (0, 2, 3, 5, 7, 8, 9, 10, 11, 12)]
    assert kept[4]["output"] == "Write to <EMAIL> or call <PHONE>."
    assert kept[5]["output"] == "メールは<EMAIL>まで、電話は<PHONE>です。"
    assert kept[6]["output"] == "أهلاً وسهلاً! كيف يمكنني مساعدتك اليوم؟ راسلني على <EMAIL>"
    assert kept[7]["output"] == "Здравствуйте! Телефон: <PHONE>, почта <EMAIL>"
    assert kept[8] == CORPUS[11] and kept[9] == CORPUS[12]
    assert "光合作用" in (out / "kept.jsonl").read_text(encoding="utf-8")
    assert report["pii"]["matches"] == {"email": 4, "phone": 3}
    # the kept rows, checked again: nothing is dropped and the file comes back byte for byte
    again = _run(tmp_path, kept, name="again")
    assert json.loads((again / "report.json").read_text(encoding="utf-8"))["summary"]["dropped"] == 0
    assert (again / "kept.jsonl").read_bytes() == (out / "kept.jsonl").read_bytes()


def test_unicode_variants_a_reader_cannot_see_are_exact_duplicates():
    base = ["Ein Café ist ein Lokal.", "東京は日本の首都です。", "Москва — столица России.", "שלום עולם", "مرحبا بالعالم"]
    variants = [unicodedata.normalize("NFD", base[0]), "東京は日本の首都です.", "МОСКВА — СТОЛИЦА РОССИИ.",
                "שלום עולם  \n", "مرحبا\u00a0بالعالم"]
    found = exact_duplicates(base + variants)
    assert found[:5] == [None] * 5
    assert [d.of if d else None for d in found[5:]] == [0, 1, 2, 3, 4]


def test_a_benchmark_item_copied_with_other_spacing_case_punctuation_and_digit_widths_is_caught():
    gsm = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")
    index = ContaminationIndex([gsm, "小明有5个苹果，他给了小红2个，又买了3个。请问小明现在有几个苹果？"],
                               ["gsm8k.jsonl:1", "cmath.jsonl:1"], 13)
    copies = [
        "NATALIA  sold clips to 48 of her friends in april and then she sold half as many clips in may -- how",
        "Natalia\u00a0sold clips to ４８ of her\nfriends in April，\n\nand then she sold half as many clips in May．",
    ]
    for copy in copies:
        assert index.find("Solve: " + copy)[0] == "gsm8k.jsonl:1", copy
    # a mostly-CJK evaluation text is matched on 2 x 13 = 26 characters (text.ngram_scale)
    assert index.find("题目：小明有５个苹果，他给了小红２个，又买了３个。请问小明现在有几个？答案：6")[0] == "cmath.jsonl:1"


# --------------------------------------------------------------------------- PII in native-script text

NATIVE = [
    ("Call me on +44 7700 900123 tomorrow", "Call me on <PHONE> tomorrow"),
    ("電話は+81 3-1234-5678、携帯は090-1234-5678です", "電話は<PHONE>、携帯は<PHONE>です"),
    ("कॉल करें +91 98765 43210 पर", "कॉल करें <PHONE> पर"),
    ("Телефон: +7 (495) 123-45-67", "Телефон: <PHONE>"),
    ("اتصل على \u2066+966 50 123 4567\u2069 الآن", "اتصل على \u2066<PHONE>\u2069 الآن"),
    ("Mobil +49 151 12345678, Büro 030 12345678", "Mobil <PHONE>, Büro <PHONE>"),
    ("请发邮件到alice+newsletter@gmail.com谢谢", "请发邮件到<EMAIL>谢谢"),
    ("서버 [2001:db8::1]:8080 또는 fe80::1ff:fe23:4567:890a%eth0", "서버 [<IP_ADDRESS>]:8080 또는 <IP_ADDRESS>%eth0"),
    ("Karte 4111 1111 1111 1111, nicht 4111 1111 1111 1112", "Karte <CREDIT_CARD>, nicht 4111 1111 1111 1112"),
    ("IBAN: DE89 3704 0044 0532 0130 00 (Sparkasse)", "IBAN: <IBAN> (Sparkasse)"),
]
NOT_PII = ["2024年1月15日", "15.01.2024", "Python 3.12.1", "ISBN 978-3-16-148410-0", "ISBN 9783161484100",
           "Bestellnummer 4500012345", "order 2024-000123", "UUID 550e8400-e29b-41d4-a716-446655440000",
           "sha 3f786850e387550fdab836ed7e6dc881de23001b", "Date: 2024-03-15 14:22:07 +0100", "TZ +05:30",
           "version 2.14.0+cu121", "e = 2.718281828459045", "profit +12.5% (+1,234,567 USD)",
           "Population 1.234.567.890", "arXiv:2106.09685", "ISSN 0317-8471", "1.000.000.000 €"]


@pytest.mark.parametrize("text,redacted", NATIVE)
def test_international_pii_inside_native_script_is_redacted_and_the_script_around_it_kept(text, redacted):
    assert redact(text, find_pii(text)) == redacted


@pytest.mark.parametrize("text", NOT_PII)
def test_common_numbers_that_are_not_pii_are_left_alone(text):
    assert _found(f"参考：{text}。") == []


# --------------------------------------------------------------------------- defects: normalisation


def test_combining_marks_stay_inside_their_word(tmp_path):
    boy, girl = _qa("बच्चे के बारे में बताओ", "वह लड़का अच्छा है"), _qa("बच्चे के बारे में बताओ", "वह लड़की अच्छी है")
    out = _run(tmp_path, [boy, girl])  # "the boy is good" / "the girl is good"
    dropped = _jsonl(out / "dropped.jsonl")
    assert dropped == [], f"the girl row dropped as {[(d['reason'], d['detail']) for d in dropped]}"
    counts = {text: len(words(text)) for text in ("हिन्दी भाषा", "مُحَمَّدٌ رَسُولُ", "שָׁלוֹם עוֹלָם")}
    assert counts == dict.fromkeys(counts, 2), f"two-word texts counted as {counts}"


def test_invisible_format_characters_do_not_hide_an_exact_duplicate(tmp_path):
    rows = [_qa("What is the capital of France?", "The capital of France is Paris."),
            _qa("What is the capital of France?", "The capital of France is Pa\u200bris."),
            _qa("Wie lautet die Hauptstadt?", "Die Hauptstadt ist Berlin."),
            _qa("Wie lautet die Hauptstadt?", "Die Haupt\u00adstadt ist Berlin."),
            _qa("Name the tool", "It is called helloworld."),
            _qa("Name the tool", "It is called hello\u2060world.")]
    out = _run(tmp_path, rows)
    dropped = {d["location"].rsplit(":", 1)[1]: d["reason"] for d in _jsonl(out / "dropped.jsonl")}
    assert dropped == {"2": "exact_duplicate", "4": "exact_duplicate", "6": "exact_duplicate"}, \
        f"dropped {dropped}, the invisible-character copies kept"


@pytest.mark.parametrize("mark", ["\u200b", "\u00ad"])
def test_invisible_format_characters_do_not_hide_a_benchmark_copy(mark):
    gsm = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")
    index = ContaminationIndex([gsm], ["gsm8k.jsonl:1"], 13)
    # a scraped copy: a mark inside words 9, 19 and 28, so every 13-word window holds one
    copy = gsm.replace("friends", f"fri{mark}ends").replace("many clips in", f"ma{mark}ny clips in") \
        .replace("altogether", f"al{mark}to{mark}gether")
    assert index.find(copy) is not None, "the copy was not found"


def test_prompts_that_differ_in_an_operator_are_different_prompts(tmp_path):
    rows = [_qa("Compute 12 + 7.", "19"), _qa("Compute 12 − 7.", "5"), _qa("Compute 12 × 7.", "84"),
            _qa("Is 3 < 5?", "Yes."), _qa("Is 3 > 5?", "No."),
            _qa("Customer feedback: 👍", "Thank you, glad it helped!"),
            _qa("Customer feedback: 👎", "Sorry to hear that.")]
    out = _run(tmp_path, rows, **{"dedup.on": "prompt"})
    dropped = [(d["row"]["instruction"], d["detail"].rsplit(":", 1)[1]) for d in _jsonl(out / "dropped.jsonl")]
    assert dropped == [], f"dropped as duplicates (prompt, of line): {dropped}"


# --------------------------------------------------------------------------- defects: filters

# Each passes in its English translation (asserted below); Gopher's limits are for word n-grams, and a
# CJK "word" here is one character, so a 4-character term repeated three times trips the 2-gram limit.
CJK_PROSE = {
    "zh": ("机器学习是人工智能的一个分支。机器学习的目标是让计算机从数据中学习规律，而不需要明确的编程。"
           "常见的机器学习方法包括监督学习、无监督学习和强化学习。",
           "Machine learning is a branch of artificial intelligence. The goal of machine learning is to let "
           "computers learn patterns from data without explicit programming. Common machine learning methods "
           "include supervised learning, unsupervised learning and reinforcement learning."),
    "ja": ("申し訳ございませんが、その件については現在確認しております。確認が取れ次第、改めてご連絡いたします。"
           "ご不便をおかけしておりますが、今しばらくお待ちくださいますようお願い申し上げます。",
           "I am very sorry, but we are currently checking that matter. As soon as we have confirmed it, we "
           "will contact you again. We apologise for the inconvenience and kindly ask you to wait a little longer."),
}


@pytest.mark.parametrize("lang", sorted(CJK_PROSE))
def test_cjk_prose_is_not_dropped_as_repetition(lang):
    text, english = CJK_PROSE[lang]
    cfg = FilterConfig()
    assert filters.check("Explain.", english, cfg) is None
    broken = filters.check("Explain.", text, cfg)
    assert broken is None, f"{len(words(text))} words: {broken}"


STRUCTURED = {
    "markdown table": """| Language | Typing | Compiled | Garbage collected |
|----------|--------|----------|-------------------|
| Python   | Dynamic | No      | Yes               |
| Java     | Static  | Yes     | Yes               |
| Go       | Static  | Yes     | Yes               |
| Rust     | Static  | Yes     | No                |
| C        | Static  | Yes     | No                |""",
    "json config": """The config file looks like this:
```json
{
  "servers": [
    {"name": "alpha", "port": 8080, "enabled": true},
    {"name": "beta", "port": 8081, "enabled": true},
    {"name": "gamma", "port": 8082, "enabled": false}
  ]
}
```""",
    "latex derivation": r"""We solve $x^2 - 5x + 6 = 0$ by factoring:
\begin{align}
x^2 - 5x + 6 &= (x - 2)(x - 3) = 0 \\
x - 2 &= 0 \quad \text{or} \quad x - 3 = 0 \\
x &= 2 \quad \text{or} \quad x = 3
\end{align}
So the roots are $x = 2$ and $x = 3$.""",
}


@pytest.mark.parametrize("kind", sorted(STRUCTURED))
def test_structured_answers_are_not_dropped_as_repetition(kind):
    broken = filters.check("Show me.", STRUCTURED[kind], FilterConfig())
    assert broken is None, f"{kind} dropped: {broken}"


RULES = {
    "markdown table": """| Option | Description |
|--------|--------------------------------------------------|
| `-v`   | Print every file as it is processed, with sizes  |
| `-q`   | Print nothing except errors                      |""",
    "code banner": """```python
# ----------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------
BATCH_SIZE = 32
LEARNING_RATE = 3e-4
```
These constants control training.""",
}


@pytest.mark.parametrize("kind", sorted(RULES))
def test_table_rules_and_comment_banners_are_not_character_runs(kind):
    broken = filters.check("Show me.", RULES[kind], FilterConfig())
    assert broken is None, f"{kind} dropped: {broken}"


# --------------------------------------------------------------------------- defects: PII


@pytest.mark.parametrize("text", ["Lat/long: +40.712776, -74.005974", "Sydney +33.868820, +151.209290",
                                  "Δ = +12.345678 after the fit"])
def test_signed_decimals_are_not_phone_numbers(text):
    assert _found(text) == [], f"redacted to {redact(text, find_pii(text))!r}"


@pytest.mark.parametrize("text,redacted", [
    ("電話は０９０－１２３４－５６７８です", "電話は<PHONE>です"),
    ("メール：ｉｎｆｏ＠ｅｘａｍｐｌｅ．ｃｏ．ｊｐ", "メール：<EMAIL>"),
    ("カード番号４１１１ １１１１ １１１１ １１１１", "カード番号<CREDIT_CARD>"),
])
def test_full_width_pii_is_redacted(text, redacted):
    assert redact(text, find_pii(text)) == redacted, f"found {_found(text)}"


@pytest.mark.parametrize("text,value", [
    ("שלחו מייל ל-david@example.co.il היום", "david@example.co.il"),  # send mail to david@...
    ("התקשרו ל-050-1234567", "050-1234567"),  # call 050-...
    ("התקשרו ל-+972-50-123-4567", "+972-50-123-4567"),
    ("שלמו ב-4111 1111 1111 1111", "4111 1111 1111 1111"),  # pay with 4111...
])
def test_a_hebrew_prefix_does_not_hide_pii(text, value):
    assert [m.text for m in find_pii(text)] == [value], f"found {_found(text)}"
