"""posttrain quality: the filters, decontamination, statistics and the whole pass (rows in =
kept + dropped + malformed, each drop with its file:line and reason)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from posttrain.config.quality import FilterConfig, QualityConfig
from posttrain.data.quality import filters, stats
from posttrain.data.quality.contamination import ContaminationIndex
from posttrain.data.quality.rows import convert, texts
from posttrain.data.quality.run import run_quality
from posttrain.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path: Path, files: list[str], **overrides) -> QualityConfig:
    items = [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps(files)}"]
    items += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return QualityConfig.load(None, items)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- filters


def test_each_filter_rule_names_its_reason():
    cfg = FilterConfig(max_response_words=50, blocklist=["As an AI language model"])
    assert filters.check("Say hi.", "Hi there.", cfg) is None
    assert filters.check("Say hi.", "", cfg)[0] == "too_short"
    assert filters.check("Say hi.", "word " * 51, cfg)[0] == "too_long"
    assert filters.check("Repeat: hello", "repeat -- HELLO!", cfg)[0] == "echo"
    assert filters.check("Describe a café.", "The cafÃ© is small.", cfg)[0] == "encoding"
    assert filters.check("x", "a\ufffdb", cfg)[0] == "encoding"
    assert filters.check("x", "bell \x07 here", cfg)[0] == "encoding"
    assert filters.check("x", "tabs\tand\nnewlines\r\n are fine", cfg) is None
    assert filters.check("x", "Wow" + "!" * 40, cfg)[0] == "char_run"
    assert filters.check("x", "Wow" + "!" * 39, cfg) is None
    assert filters.check("x", "as an ai LANGUAGE model, I cannot", cfg)[0] == "blocklist"
    assert filters.check("x", " ".join(["ha"] * 30), cfg)[0] == "repetition"
    assert filters.check("x", " ".join(["ha"] * 19), cfg) is None  # under repetition_min_words


def test_rules_switch_off():
    cfg = FilterConfig(min_response_words=0, echo=False, encoding=False, repetition=False, max_char_run=0)
    for response in ("", "Repeat: hello", "cafÃ©", "!" * 100, " ".join(["ha"] * 30)):
        assert filters.check("Repeat: hello", response, cfg) is None


def test_repetition_shares_by_hand():
    # "a b a b a b": the 2-gram (a, b) occurs 3 times, 2 characters each, of 6 characters: share 1.0
    tokens = "a b a b a b".split()
    assert filters.top_ngram_share(tokens, 2, 6) == pytest.approx(1.0)
    assert filters.top_ngram_share("a b c d".split(), 2, 4) == 0.0  # nothing occurs twice
    assert filters.top_ngram_share(["ha"] * 30, 2, 60) == 1.0  # overlapping occurrences count a word once
    # "x y z q x y z r": (x y z) occurs twice, covering 6 of 8 one-character words
    tokens = "x y z q x y z r".split()
    assert filters.duplicate_ngram_share(tokens, 3, 8) == pytest.approx(6 / 8)
    assert filters.duplicate_ngram_share(tokens, 4, 8) == 0.0
    text = "\n".join(["same line here"] * 3 + ["other one"])
    assert "lines repeat" in filters.repetition_problem(text)  # 2 of 4 lines repeat: over 30%


def test_a_normal_long_answer_passes_repetition():
    answer = ("Sunlight scatters off the molecules of the air, and the shorter blue wavelengths scatter much more "
              "than the red ones, which is called Rayleigh scattering; so light reaches the eye from every part "
              "of the sky, and the sky looks blue. At sunset the light crosses more air and the reds remain.")
    assert filters.repetition_problem(answer) is None


def test_longest_char_run_ignores_spaces():
    assert filters.longest_char_run("ab" + " " * 50 + "ccc") == ("c", 3)


# --------------------------------------------------------------------------- decontamination


def test_contamination_long_and_short_prompts():
    index = ContaminationIndex(["one two three four five six", "tiny prompt"], ["eval:1", "eval:2"], n=4)
    assert index.find("... TWO three, four five! and more") == ("eval:1", "two three four five")
    assert index.find("two three four only") is None  # three shared words: below n
    assert index.find("a Tiny   Prompt appears") == ("eval:2", "tiny prompt")  # shorter than n: whole
    assert index.find("tiny") is None
    assert len(index) == 4  # three 4-grams and one 2-gram


def test_contamination_rejects_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        ContaminationIndex(["a"], ["x"], 0)


# --------------------------------------------------------------------------- statistics


def test_percentiles_entropy_and_distinct_by_hand():
    p = stats.percentiles([5, 1, 3, 2, 4])
    assert (p["min"], p["p50"], p["p90"], p["max"], p["mean"]) == (1, 3, 5, 5, 3.0)
    # H of (1/2, 1/4, 1/4) = 0.5·1 + 2·0.25·2 = 1.5 bits; evenness 1.5 / log2(3)
    e = stats.entropy(Counter({"a": 2, "b": 1, "c": 1}))
    assert e["entropy_bits"] == pytest.approx(1.5)
    assert e["evenness"] == pytest.approx(1.5 / math.log2(3), abs=1e-4)
    assert stats.entropy(Counter({"a": 5}))["evenness"] == 1.0
    # responses "a b a" and "a c": unigrams a b a a c -> 3 unique of 5; bigrams ab ba ac -> 3 of 3
    assert stats.distinct_n(["a b a", "a c"], 1) == pytest.approx(0.6)
    assert stats.distinct_n(["a b a", "a c"], 2) == 1.0


def test_cap_per_value_is_seeded_and_exact():
    values = ["a"] * 10 + ["b"] * 3 + [None] * 4
    dropped = stats.cap_per_value(values, 4, seed=0)
    assert len(dropped) == 6 and all(values[i] == "a" for i in dropped)
    assert dropped == stats.cap_per_value(values, 4, seed=0)
    assert dropped != stats.cap_per_value(values, 4, seed=1)


# --------------------------------------------------------------------------- row texts


def test_texts_of_each_format():
    alpaca = convert({"instruction": "Q", "input": "ctx", "output": "A", "system": "S"}, "alpaca")
    assert (alpaca.prompt, alpaca.response, alpaca.full, alpaca.turns) == ("S\nQ\n\nctx", "A", "S\nQ\n\nctx\nA", 3)
    text = convert({"text": "plain"}, "text")
    assert (text.prompt, text.response, text.full) == ("", "plain", "plain")
    pair = convert({"prompt": "P", "chosen": "good", "rejected": "bad"}, "pairs")
    assert (pair.prompt, pair.response, pair.full) == ("P", "good", "P\ngood\nbad")
    ranking = convert({"prompt": "P", "responses": ["r1", "r2", "r3"], "ranks": [1, 0, 0]}, "ranking")
    assert ranking.response == "r2\nr3"
    assert texts(convert({"prompt": "P", "completion": "c", "label": False}, "unpaired").record)[1] == ""
    assert texts(convert({"prompt": "P", "completion": "c", "label": True}, "unpaired").record)[1] == "c"


# --------------------------------------------------------------------------- the whole pass


def test_example_config_drops_each_planted_problem(tmp_path):
    cfg = QualityConfig.load(ROOT / "examples/quality.yaml", [f"output_dir={tmp_path / 'q'}"])
    cfg.data.files = [str(ROOT / f) for f in cfg.data.files]
    cfg.decontaminate.files = [str(ROOT / f) for f in cfg.decontaminate.files]
    out = run_quality(cfg, log=lambda _: None)
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert (s["rows"], s["malformed"]) == (35, 1)
    assert s["dropped_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 1, "contaminated": 1, "repetition": 1,
                                      "encoding": 1, "echo": 1, "char_run": 1, "balance": 2}
    kept, dropped = _jsonl(out / "kept.jsonl"), _jsonl(out / "dropped.jsonl")
    assert len(kept) == s["kept"] == 35 - 1 - 9 and len(dropped) == 9
    by_reason = {d["reason"]: d for d in dropped}
    assert by_reason["exact_duplicate"]["detail"].startswith("of ")
    assert "quality_dirty.jsonl:4" in by_reason["exact_duplicate"]["detail"]
    assert "Jaccard" in by_reason["near_duplicate"]["detail"]
    assert "quality_eval.jsonl:1" in by_reason["contaminated"]["detail"]
    assert all(":" in d["location"] for d in dropped)
    rejects = _jsonl(out / "rejects.jsonl")
    assert len(rejects) == 1 and rejects[0]["location"].endswith("quality_dirty.jsonl:29")
    # PII redacted in the kept rows, never copied into the report
    kept_text = json.dumps(kept)
    assert "dana.ortiz@example.com" not in kept_text and "<EMAIL>" in kept_text
    assert "4111 1111 1111 1111" not in kept_text and "<CREDIT_CARD>" in kept_text
    assert "AKIAIOSFODNN7EXAMPLE" not in kept_text and "<SECRET>" in kept_text
    assert "dana.ortiz" not in (out / "report.json").read_text() + (out / "report.md").read_text()
    assert report["pii"]["rows_with_pii"] == 3
    assert Counter(r["category"] for r in kept)["math"] == 8
    assert report["tokens"]["over_max_length"] >= 1 and report["tokens"]["unrenderable"] == 0
    assert "# Data quality report" in (out / "report.md").read_text()


def test_no_row_is_lost_and_order_is_kept(tmp_path):
    rows = [{"instruction": f"Question number {i} about topic {i % 7}?", "output": f"Answer {i}."} for i in range(40)]
    rows[5] = rows[3] | {}  # exact duplicate of row 4 (line 4)
    path = _write(tmp_path / "d.jsonl", rows + ["{not json"])
    out = run_quality(_cfg(tmp_path, [path]), log=lambda _: None)
    kept, dropped = _jsonl(out / "kept.jsonl"), _jsonl(out / "dropped.jsonl")
    assert len(kept) + len(dropped) + 1 == 41
    assert kept == [r for i, r in enumerate(rows) if i != 5]  # as read, in order
    assert dropped == [{"location": f"{path}:6", "reason": "exact_duplicate", "detail": f"of {path}:4", "row": rows[5]}]


def test_prompt_dedup_keeps_one_row_per_prompt(tmp_path):
    rows = [{"prompt": "Same prompt", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    path = _write(tmp_path / "p.jsonl", rows)
    out = run_quality(_cfg(tmp_path, [path], **{"dedup.on": "prompt"}), log=lambda _: None)
    assert len(_jsonl(out / "kept.jsonl")) == 1
    out = run_quality(_cfg(tmp_path, [path]), log=lambda _: None)
    assert len(_jsonl(out / "kept.jsonl")) == 3  # whole rows differ


def test_rejected_responses_are_not_filtered(tmp_path):
    junk = "!" * 80
    rows = [{"prompt": "Say hi", "chosen": "Hello there.", "rejected": junk},
            {"prompt": "Say bye", "chosen": junk, "rejected": "Bye."},
            {"prompt": "Be rude", "completion": junk, "label": False}]
    out = run_quality(_cfg(tmp_path, [_write(tmp_path / "p.jsonl", rows)]), log=lambda _: None)
    dropped = _jsonl(out / "dropped.jsonl")
    assert [d["location"].rsplit(":", 1)[1] for d in dropped] == ["2"]  # only the chosen junk


def test_pii_actions(tmp_path):
    rows = [{"instruction": "Contact?", "output": "Mail jo@example.org please."},
            {"instruction": "Other?", "output": "Nothing personal here."}]
    path = _write(tmp_path / "d.jsonl", rows)
    out = run_quality(_cfg(tmp_path, [path], **{"pii.action": "drop"}), log=lambda _: None)
    assert [d["reason"] for d in _jsonl(out / "dropped.jsonl")] == ["pii"]
    out = run_quality(_cfg(tmp_path, [path], **{"pii.action": "report"}), log=lambda _: None)
    assert _jsonl(out / "kept.jsonl") == rows
    assert json.loads((out / "report.json").read_text())["pii"]["matches"] == {"email": 1}
    out = run_quality(_cfg(tmp_path, [path], **{"pii.action": "redact"}), log=lambda _: None)
    assert _jsonl(out / "kept.jsonl")[0]["output"] == "Mail <EMAIL> please."


def test_redaction_reaches_turn_lists_and_keeps_roles(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "my ip is 10.0.0.7"}, {"role": "assistant", "content": "ok"}]}]
    out = run_quality(_cfg(tmp_path, [_write(tmp_path / "m.jsonl", rows)]), log=lambda _: None)
    assert _jsonl(out / "kept.jsonl")[0]["messages"] == [{"role": "user", "content": "my ip is <IP_ADDRESS>"},
                                                         {"role": "assistant", "content": "ok"}]


def test_gate_and_error_policy(tmp_path):
    rows = [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": "A"}, {"instruction": "Q"}]
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match="max_drop_fraction"):
        run_quality(_cfg(tmp_path, [path], max_drop_fraction=0.5), log=lambda _: None)
    assert (tmp_path / "out" / "report.md").is_file()  # written before failing
    with pytest.raises(DataError, match="d.jsonl:3"):
        run_quality(_cfg(tmp_path, [path], **{"data.bad_rows": "error"}), log=lambda _: None)


@pytest.mark.parametrize("override, message", [
    ({"data.files": []}, "data.files is empty"),
    ({"dedup.threshold": 0}, "dedup.threshold"),
    ({"balance.max_per_value": 3}, "needs balance.field"),
    ({"pii.kinds": ["email", "passport"]}, "unknown"),
    ({"filters.blocklist": [" "]}, "empty phrase"),
    ({"filters.min_response_words": 5, "filters.max_response_words": 2}, "below"),
])
def test_config_refusals(tmp_path, override, message):
    files = override.pop("data.files", ["x.jsonl"])
    with pytest.raises(ConfigError, match=message):
        run_quality(_cfg(tmp_path, files, **override), log=lambda _: None)


def test_cli_runs_the_example(tmp_path, capsys):
    from posttrain.cli import main

    data = str(ROOT / "examples/data/quality_dirty.jsonl")
    code = main(["quality", f"output_dir={tmp_path / 'q'}", f"data.files=[{data}]", "tokens.tokenizer="])
    assert code == 0
    assert "35 rows:" in capsys.readouterr().out
    code = main(["quality", f"output_dir={tmp_path / 'q'}", f"data.files=[{data}]", "max_drop_fraction=0.01"])
    assert code == 2 and "max_drop_fraction" in capsys.readouterr().err
