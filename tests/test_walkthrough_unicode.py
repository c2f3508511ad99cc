"""A Unicode walk: non-ASCII text through posttrain as a multilingual user sends it.

Walked: JSON Lines rows with a lone surrogate ("\\ud800", which Python's json accepts and UTF-8 cannot
encode), bytes that are not UTF-8, a UTF-8 BOM at the start of a later line (two files concatenated),
NFC and NFD forms of one word, zero-width spaces and joiners, a BOM inside a response, emoji ZWJ
sequences, flags and right-to-left text, through `posttrain quality` (rejects, dropped, kept, report),
`posttrain score`, the preference and SFT readers, `posttrain redteam`'s attack files, YAML configs
holding JSON-style escapes ("\\ud83d\\ude00", an emoji as JSON writes it), the refusal a resumed run
gives when its settings changed, and the places text is cut by characters (error messages, filter
details, the resume refusal).

What was right: every data reader names a lone surrogate, a NUL, bytes that are not UTF-8 and a BOM in
mid-file as bad rows with file:line (rejects written with the surrogate as its escape, a bad byte as
U+FFFD); exact and near dedup and decontamination compare NFKC-folded text with invisible characters
deleted, so NFC / NFD and zero-width variants are duplicates; exact match (rewards, evaluation) compares
as written, as the README says; chosen == rejected is decided on tokens, so an NFC / NFD pair is kept as
given (pinned in tests/test_preference_data_edges.py); `score` writes its rows back as UTF-8, unescaped
and unnormalised (pinned here). Text is cut by characters only in messages, never in data.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 34:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config.quality import QualityConfig
from posttrain.data.quality.run import run_quality
from posttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda _: None}

# One text in several of the shapes a multilingual file holds: NFD accents, an emoji ZWJ sequence, a
# flag, Hebrew (right to left) with a right-to-left mark, a zero-width space and a BOM inside the text.
MIXED = ("Le cafe\u0301 est bon. \U0001F468\u200d\U0001F469\u200d\U0001F467 \U0001F1EB\U0001F1F7 "
         "\u05e9\u05dc\u05d5\u05dd\u200f \u05e2\u05d5\u05dc\u05dd. Pa\u200bris \ufeffend")


def _jsonl(path: Path, rows: list[dict]) -> str:
    """Rows as json.dumps writes them by default: ASCII, a lone surrogate as its escape "\\ud800"."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- posttrain quality


def test_quality_reports_a_lone_surrogate_row_and_finishes(tmp_path):
    """README: "A row holding a lone surrogate (JSON's "\\ud800" escape ...) is [a bad row], in any file
    type"; quality's default is bad_rows=skip, into rejects.jsonl. Measured: the row is named
    (q.jsonl:2, rejects.jsonl written with its escape), then `report.json` is written with
    ensure_ascii=False and the row as read (report["read"]["first_bad"]) and the write fails:
    UnicodeEncodeError "surrogates not allowed", a traceback and exit 1 from `posttrain quality` on the
    command line, report.json.partial left behind and no report.md; a pipeline's quality gate alike."""
    data = _jsonl(tmp_path / "q.jsonl", [{"instruction": "Say hi", "output": "Hello there, my friend."},
                                         {"instruction": "Say bye", "output": "bad \ud800 row"}])
    cfg = QualityConfig.load(None, [f"output_dir={tmp_path / 'out'}", f"data.files=[{data}]"])
    try:
        out = run_quality(cfg, **QUIET)
    except UnicodeEncodeError as exc:
        left = sorted(p.name for p in (tmp_path / "out").iterdir())
        raise AssertionError(f"run_quality raised UnicodeEncodeError ({exc.reason}: {exc.object[exc.start]!r}); "
                             f"the output dir holds {left}") from None
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["malformed"] == 1 and report["summary"]["kept"] == 1
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rejects[0]["location"].endswith("q.jsonl:2")
    assert (out / "report.md").is_file()


# --------------------------------------------------------------------------- YAML: JSON-style escapes


def test_a_json_escaped_emoji_in_a_yaml_config_is_the_emoji_or_refused_up_front(tmp_path):
    """JSON (and YAML 1.2, which is its superset) reads the escape pair "\\ud83d\\ude00" as one character,
    U+1F600; PyYAML reads it as two lone surrogates. A user who pastes a JSON-escaped string into a
    config (`adapter.virtual_tokens.init_text`, a constitution's critique, an attack's template: every
    YAML file is read by `config.schema.load_yaml`) gets text no tokenizer takes. Measured: SFTConfig.load
    returns 'Smile \\ud83d\\ude00 please', and `posttrain sft` on it (prompt tuning, init=text) ends in
    a traceback from tokenizers, "TypeError: TextEncodeInput must be Union[...]", exit 1, after the model
    loads: configs are validated up front. Right: the pair joined into the emoji (as json.loads joins
    it), and a lone surrogate left over refused as a ConfigError naming the file and line."""
    from posttrain import SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_text("model: {path: tiny}\ndata: {train_files: [synthetic]}\n"
                    "adapter:\n  method: prompt\n"
                    '  virtual_tokens: {num_virtual_tokens: 4, init: text, init_text: "Smile \\ud83d\\ude00 please"}\n'
                    f"output_dir: {tmp_path / 'run'}\n", encoding="utf-8")
    try:
        cfg = SFTConfig.load(str(path), [])
    except ConfigError as exc:  # refused up front is right too, named by file:line
        assert f"{path}:" in str(exc), str(exc)
        return
    text = cfg.adapter.virtual_tokens.init_text
    assert text == "Smile \U0001F600 please", f"init_text read as {text!r}"


# --------------------------------------------------------------------------- red-team attack files


@pytest.mark.parametrize("name,text", [
    ("attacks.jsonl", json.dumps({"name": "lone", "template": "bad \ud800 {prompt}"}) + "\n"),
    ("attacks.yaml", '- name: pair\n  template: "Smile \\ud83d\\ude00 {prompt}"\n'),
])
def test_an_attack_template_with_a_lone_surrogate_is_refused_with_its_line(tmp_path, name, text):
    """`load_attacks` says it raises ConfigError "for a bad row in `file` (with file:line)", and the
    README makes a lone surrogate a bad row in any file. Measured: both files load (templates
    'bad \\ud800 {prompt}' and 'Smile \\ud83d\\ude00 {prompt}'); `posttrain redteam` with a local
    target then fails every item of that attack with "TypeError: TextEncodeInput must be
    Union[TextInputSequence, ...]" (the tokenizer), and a run of only that attack aborts ("every
    item failed"), naming neither the file nor the line. Right: a ConfigError naming file:line
    before any model is called (for the YAML file, the escape pair read as the emoji instead)."""
    from posttrain.safety.attacks import load_attacks

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    try:
        attacks = load_attacks([], str(path))
    except ConfigError as exc:
        assert f"{path}:" in str(exc), str(exc)  # file:line
        return
    template = attacks[0].template
    assert template == "Smile \U0001F600 {prompt}", f"{name}: template read as {template!r}"


def test_an_attack_jsonl_line_holding_a_line_separator_is_one_attack(tmp_path):
    """JSON strings may hold U+2028 / U+2029 / U+0085 unescaped, and json.dumps(ensure_ascii=False)
    writes them so (text pasted from a web page or a Word document carries them). The data readers,
    `generate`'s prompt files and the synthesis logs split JSON Lines at "\\n" only; the attack file's
    reader uses str.splitlines, which also splits at those. Measured: ConfigError "attacks.jsonl:1:
    invalid JSON (Unterminated string starting at at column 32)" for a valid file."""
    from posttrain.safety.attacks import load_attacks

    rows = [{"name": "pasted", "template": "Line one\u2028line two: {prompt}"},
            {"name": "second", "template": "Answer: {prompt}"}]
    path = tmp_path / "attacks.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    try:
        attacks = load_attacks([], str(path))
    except ConfigError as exc:
        raise AssertionError(f"refused: {exc}") from None
    assert [(a.name, a.template) for a in attacks] == [(r["name"], r["template"]) for r in rows]


# --------------------------------------------------------------------------- messages


def test_the_resume_refusal_shows_a_changed_setting_as_written():
    """A resumed run whose settings differ from its checkpoint's is refused naming what changed
    (`train.runs._change`: "so two long values show where they differ"). It writes the values with
    json.dumps, which escapes every non-ASCII character, then cuts the text by characters. Measured:
    a data file renamed from 数据/训练集.jsonl reads 'data.train_files: -"\\u6570\\u636e/\\u8bad\\u7ec3\\u96c6.jsonl"
    +"\\u6570\\u636e/...'; a Chinese system-like text cut at its common part reads
    '…ee\\u9898\\u3002" → …ee\\u9898\\uff0c...', starting inside an escape. Everywhere else posttrain
    quotes values with repr, which keeps them readable."""
    from posttrain.train.runs import _change

    files = _change("data.train_files", {"data.train_files": ["数据/训练集.jsonl"]},
                    {"data.train_files": ["数据/训练集_清洗后.jsonl"]})
    assert "训练集_清洗后.jsonl" in files and "\\u" not in files, files
    before, after = "你是一个乐于助人的助手。请用中文回答所有问题。", "你是一个乐于助人的助手。请用中文回答所有问题，简洁一些。"
    text = _change("adapter.virtual_tokens.init_text", {"adapter.virtual_tokens.init_text": before},
                   {"adapter.virtual_tokens.init_text": after})
    assert "简洁一些" in text and "\\u" not in text, text


# --------------------------------------------------------------------------- what was right


def test_score_writes_non_ascii_rows_back_as_written(tmp_path):
    """`posttrain score` adds its column and leaves every other character as the file had it: written
    as UTF-8 (not \\u escapes), not normalised (NFD stays NFD), with zero-width characters, a BOM inside
    the text, right-to-left marks, ZWJ sequences and a JSON-escaped emoji pair (read as the emoji)."""
    rows = [{"prompt": "Dis café", "response": MIXED, "note": "\u05e9\u05dc\u05d5\u05dd"},
            {"prompt": "Smile", "response": "\U0001F600"}]
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n"
                    + '{"prompt": "Smile", "response": "\\ud83d\\ude00"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "posttrain", "score", "--function", "short=tests.rewards_fixture:short",
                             "--input", str(data), "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    written = out.read_text(encoding="utf-8")
    assert "\\u" not in written and MIXED in written
    got = [json.loads(line) for line in written.splitlines()]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in got] == rows
    assert [r["reward"] for r in got] == [-float(len(MIXED)), -1.0]  # code points as given: no normalisation
