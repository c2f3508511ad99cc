"""posttrain quality, perplexity step: the per-row value against an independent full-logits
computation, the thresholds (with their tie rule), off by default, config checks, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config.quality import PerplexityConfig, QualityConfig
from posttrain.data.quality import perplexity
from posttrain.data.quality.perplexity import RowScore, fraction_count, threshold_drops
from posttrain.data.quality.rows import convert
from posttrain.data.quality.run import run_quality
from posttrain.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cfg(tmp_path: Path, files: list[str], **overrides) -> QualityConfig:
    items = [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps(files)}"]
    items += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return QualityConfig.load(None, items)


@pytest.fixture(scope="module")
def tiny():
    from posttrain.inference import load_for_inference

    return load_for_inference("tiny")


# --------------------------------------------------------------------------- the value


_ROWS = [
    ({"instruction": "Name a colour.", "output": "Blue."}, "alpaca"),
    ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "Their sum is 5, which is odd."}, "alpaca"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And goodbye?"},
                   {"role": "assistant", "content": "Goodbye, and take care."}]}, "messages"),
    ({"instruction": "Write one long sentence about rivers.",
      "output": "Rivers carry water from the hills to the sea, shaping valleys as they go along."}, "alpaca"),
    ({"messages": [{"role": "user", "content": "What is 4 times 4?"},
                   {"role": "assistant", "content": "4 times 4 is 16."}]}, "messages"),
    ({"text": "Plain text trains on every token, the first excepted."}, "text"),
    ({"prompt": "Say hi", "chosen": "Hello there, friend.", "rejected": "Go away."}, "pairs"),
    ({"prompt": "Pick a fruit", "responses": ["Apple.", "A ripe pear.", "Rocks."], "ranks": [0, 0, 1]}, "ranking"),
]


def _reference_perplexity(model, tokenizer, row) -> float:
    """exp(mean NLL) of the trained tokens from the full [T, V] logits in float64, the sequences
    rendered by the training stages' own encoders (SFT: encode_record; preferences: encode_preference)."""
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.data.templates import encode_record, resolve_template

    template = resolve_template(tokenizer, "auto")
    if isinstance(row.record, PreferenceRecord):
        best = min(row.record.ranks)
        sequences = [s for s, rank in zip(encode_preference(row.record, tokenizer, template).sequences,
                                          row.record.ranks) if rank == best]
    else:
        sequences = [encode_record(row.record, tokenizer, template)]
    total, count = 0.0, 0
    for example in sequences:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
        for t in range(1, len(example.labels)):
            if example.labels[t] != -100:
                total -= float(logps[t - 1, example.labels[t]])
                count += 1
    return math.exp(total / count)


def test_perplexity_matches_a_full_logits_computation_at_any_batch_size(tiny, monkeypatch):
    import posttrain.inference

    model, tokenizer = tiny
    monkeypatch.setattr(posttrain.inference, "load_for_inference", lambda *a, **k: tiny)
    rows = [convert(raw, fmt, f"d.jsonl:{i + 1}") for i, (raw, fmt) in enumerate(_ROWS)]
    expected = [_reference_perplexity(model, tokenizer, row) for row in rows]
    by_batch = {}
    for batch_size in (1, 3):
        scores, template, _ = perplexity.score_rows(rows, PerplexityConfig(model="tiny", batch_size=batch_size),
                                                 log=lambda _: None)
        assert template == "auto (the model's own)"
        assert all(s.not_scored == "" and s.tokens > 0 for s in scores)
        by_batch[batch_size] = [s.perplexity for s in scores]
        assert by_batch[batch_size] == pytest.approx(expected, rel=1e-4)
    assert by_batch[1] == pytest.approx(by_batch[3], rel=1e-5)  # 9 sequences: batches of 3 cut between rows


def test_rows_without_a_trained_token_are_not_scored(tiny, monkeypatch):
    import posttrain.inference

    monkeypatch.setattr(posttrain.inference, "load_for_inference", lambda *a, **k: tiny)
    rows = [convert({"prompt": "Be rude", "completion": "No.", "label": False}, "unpaired", "u:1"),
            convert({"prompt": "Be kind", "completion": "Of course, gladly.", "label": True}, "unpaired", "u:2"),
            convert({"instruction": "word " * 80, "output": "Short answer."}, "alpaca", "a:1"),
            convert({"instruction": "Name a colour.", "output": "Blue " * 60}, "alpaca", "a:2")]
    scores, _, _ = perplexity.score_rows(rows, PerplexityConfig(model="tiny", max_length=40), log=lambda _: None)
    assert [s.not_scored for s in scores] == ["no_trained_tokens", "", "labels_past_max_length", ""]
    assert scores[1].perplexity > 0 and not scores[1].truncated
    assert scores[3].truncated and scores[3].tokens < 60  # cut to max_length, scored on what is left


# --------------------------------------------------------------------------- thresholds


def test_threshold_rule_and_ties_by_hand():
    values = [5.0, 50.0, 20.0, 20.0, 7.0, 100.0, 20.0, 3.0, 3.0, 9.0]
    drops, cutoffs = threshold_drops(values, max_perplexity=60, top=0.25, bottom=0.12)
    # 100 > 60 goes first; of the 9 left, floor(0.25 * 9) = 2 highest: 50 and, of the three 20s, the
    # last (ties rank by input order, an earlier row counting lower); floor(0.12 * 9) = 1 lowest: the first 3
    assert {i: reason for i, (reason, _) in drops.items()} == {5: "perplexity_high", 1: "perplexity_high",
                                                               6: "perplexity_high", 7: "perplexity_low"}
    assert cutoffs == {"top_cutoff": 20.0, "bottom_cutoff": 3.0}
    assert drops[5][1] == "perplexity 100.00 > max_perplexity=60"
    assert "perplexity 20.00 >= 20.00" in drops[6][1] and "drop_top_fraction=0.25" in drops[6][1]
    assert "perplexity 3.00 <= 3.00" in drops[7][1] and "drop_bottom_fraction=0.12" in drops[7][1]
    assert threshold_drops(values, 0, 0, 0) == ({}, {"top_cutoff": None, "bottom_cutoff": None})
    assert [fraction_count(f, n) for f, n in ((0.29, 100), (0.1, 9), (0.1, 10), (0.05, 39), (0.5, 3))] == [29, 0, 1, 1, 1]


def test_thresholds_drop_exactly_the_expected_rows(tmp_path, monkeypatch):
    values = [5, 50, 20, 20, 7, 100, 20, 3, 3, 9]
    topics = ["rivers", "mountains", "deserts", "forests", "oceans", "glaciers", "volcanoes", "islands", "caves",
              "lakes", "meadows"]
    rows = [{"instruction": f"Describe {t} in a few words.", "output": f"{t.title()} are a part of the world number {i}.",
             "ppl": v} for i, (t, v) in enumerate(zip(topics, values))]
    rows.insert(3, {"instruction": "Repeat: hello", "output": "repeat hello", "ppl": 1})  # echo: gone before scoring
    path = _write(tmp_path / "d.jsonl", rows + ["{broken"])
    seen = []

    def fake(rows, cfg, log):
        seen.extend(r.source for r in rows)
        return [RowScore(float(r.raw["ppl"]), 4) for r in rows], "chatml", cfg.max_length

    monkeypatch.setattr(perplexity, "score_rows", fake)
    cfg = _cfg(tmp_path, [path], **{"perplexity.model": "tiny", "perplexity.max_perplexity": 60,
                                    "perplexity.drop_top_fraction": 0.25, "perplexity.drop_bottom_fraction": 0.12})
    out = run_quality(cfg, log=lambda _: None)
    assert f"{path}:4" not in seen and len(seen) == 10
    dropped = {d["location"].rsplit(":", 1)[1]: (d["reason"], d["detail"]) for d in _jsonl(out / "dropped.jsonl")}
    line = {i: str(i + 1 + (i >= 3)) for i in range(10)}  # line of values[i] (the echo row is line 4)
    assert dropped[line[5]] == ("perplexity_high", "perplexity 100.00 > max_perplexity=60")
    assert dropped[line[1]][0] == dropped[line[6]][0] == "perplexity_high"
    assert dropped[line[7]][0] == "perplexity_low" and "<= 3.00" in dropped[line[7]][1]
    assert set(dropped) == {"4", line[5], line[1], line[6], line[7]}
    report = json.loads((out / "report.json").read_text())
    s, p = report["summary"], report["perplexity"]
    assert s["rows"] == s["kept"] + s["dropped"] + s["malformed"] == 12 and s["malformed"] == 1
    assert p["dropped"] == {"perplexity_high": 3, "perplexity_low": 1}
    assert p["perplexity"] == {"count": 10, "min": 3.0, "p10": 3.0, "p50": 9.0, "p90": 50.0, "p99": 100.0,
                               "max": 100.0, "mean": 23.7}
    assert p["thresholds"] == {"max_perplexity": 60.0, "drop_top_fraction": 0.25, "drop_bottom_fraction": 0.12,
                               "top_cutoff": 20.0, "bottom_cutoff": 3.0}
    assert len(_jsonl(out / "perplexity.jsonl")) == 10
    assert "## Perplexity" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- off by default


def test_off_by_default_changes_nothing_and_loads_no_model(tmp_path, monkeypatch):
    import posttrain.inference

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(posttrain.inference, "load_for_inference", refuse)
    monkeypatch.setattr(perplexity, "score_rows", refuse)
    monkeypatch.chdir(ROOT)
    outputs = {}
    for name, extra in (("a", []), ("b", ["perplexity.batch_size=3", "perplexity.max_length=64",
                                          "perplexity.template=chatml"])):
        cfg = QualityConfig.load(ROOT / "examples/quality.yaml", [f"output_dir={tmp_path / name}", *extra])
        out = run_quality(cfg, log=lambda _: None)
        assert not (out / "perplexity.jsonl").exists()
        outputs[name] = {f: (out / f).read_text().replace(str(out), "OUT") for f in
                         ("kept.jsonl", "dropped.jsonl", "report.json", "report.md")}
    assert outputs["a"] == outputs["b"]
    assert "perplexity" not in json.loads(outputs["a"]["report.json"]) and "Perplexity" not in outputs["a"]["report.md"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ({"perplexity.drop_top_fraction": 1.0}, "drop_top_fraction must be in"),
    ({"perplexity.drop_top_fraction": -0.1}, "drop_top_fraction must be in"),
    ({"perplexity.drop_bottom_fraction": 1.5}, "drop_bottom_fraction must be in"),
    ({"perplexity.drop_top_fraction": 0.6, "perplexity.drop_bottom_fraction": 0.4}, "must be below 1"),
    ({"perplexity.max_perplexity": -1}, "max_perplexity must be >= 0"),
    ({"perplexity.batch_size": 0}, "batch_size must be >= 1"),
    ({"perplexity.max_length": 1}, "max_length must be >= 2"),
    ({"perplexity.model": "", "perplexity.drop_top_fraction": 0.1}, "drop_top_fraction needs perplexity.model"),
    ({"perplexity.modle": "tiny"}, "perplexity.model"),
])
def test_config_refusals(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_quality(_cfg(tmp_path, ["x.jsonl"], **{"perplexity.model": "tiny", **override}), log=lambda _: None)


def test_a_missing_model_is_said_before_any_row_is_read(tmp_path):
    with pytest.raises(UserError, match="perplexity.model: model path /no/such/model does not exist"):
        run_quality(_cfg(tmp_path, ["x.jsonl"], **{"perplexity.model": "/no/such/model"}), log=lambda _: None)


# --------------------------------------------------------------------------- the CLI


def test_cli_drops_the_top_fraction_of_the_example(tmp_path, monkeypatch, capsys):
    from posttrain.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "q"
    code = main(["quality", "examples/quality.yaml", f"output_dir={out}", "perplexity.model=tiny",
                 "perplexity.drop_top_fraction=0.1"])
    assert code == 0 and "perplexity_high" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    p = report["perplexity"]
    assert p["scored"] == p["perplexity"]["count"] == 29 and p["not_scored"] == {}
    assert p["dropped"] == {"perplexity_high": math.floor(0.1 * 29), "perplexity_low": 0}  # rounded down: 2
    assert report["summary"]["dropped_by_reason"]["perplexity_high"] == 2
    assert {"p10", "p50", "p90", "p99", "mean"} <= set(p["perplexity"]) and p["thresholds"]["top_cutoff"] > 0
    high = [d for d in _jsonl(out / "dropped.jsonl") if d["reason"] == "perplexity_high"]
    assert all("drop_top_fraction=0.1" in d["detail"] for d in high)
    scores = {s["location"]: s["perplexity"] for s in _jsonl(out / "perplexity.jsonl")}
    assert len(scores) == 29 and min(scores[d["location"]] for d in high) == pytest.approx(p["thresholds"]["top_cutoff"])
    assert sorted(scores.values())[-2:] == sorted(scores[d["location"]] for d in high)
    md = (out / "report.md").read_text()
    assert "## Perplexity" in md and "| count | mean | p10 | p50 | p90 | p99 |" in md
