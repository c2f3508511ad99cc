"""Reward scoring, stop 34 (backlog items): `posttrain score --max-length` (validated before any model
loads, passed to every reward model); the combined reward's floor penalty settable (`--floor-penalty`)
and on the weighted terms' scale under calibration, max(0, floor − r)/scale; an encoder reward
model's row cut to fit keeps its closing special token ([SEP]) and cuts content instead."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from posttrain.errors import ConfigError

WORDS = "red green blue gold pink grey teal navy".split()
POSITIONS = 32


def _words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def encoder_rm(tmp_path_factory):
    """A BERT reward model of 32 positions and its word-level tokenizer, saved as `posttrain rm` saves one."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "copy", ":", "user", "assistant"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32,
                                                         max_position_embeddings=POSITIONS, num_labels=1,
                                                         pad_token_id=0))
    out = tmp_path_factory.mktemp("s34rm") / "rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(tmp_path, monkeypatch, capsys, *args):
    """`posttrain score ARGS` in-process (working directory tmp_path, importable): (exit code, stdout, stderr)."""
    from posttrain.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code = main(["score", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- score --max-length


def test_score_max_length_cuts_rows_for_every_reward_model_and_says_so(encoder_rm, tmp_path, monkeypatch, capsys):
    from posttrain.rewards import RewardModelScorer

    rows = _rows(tmp_path / "rows.jsonl", [{"prompt": f"copy: {_words(10)}", "response": "red"},
                                           {"prompt": "copy: red", "response": "red"}])
    code, _, err = _score(tmp_path, monkeypatch, capsys, "--model", str(encoder_rm), "--max-length", "12",
                          "--input", str(rows), "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    assert "reward_model: cut 1 of 2 rows longer than 12 tokens (kept their start)" in err
    got = [json.loads(line)["reward"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    turns = [[{"role": "user", "content": f"copy: {_words(10)}"}], [{"role": "user", "content": "copy: red"}]]
    assert got == pytest.approx(RewardModelScorer(str(encoder_rm), max_length=12)(turns, ["red", "red"]), abs=1e-6)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_score_refuses_a_max_length_below_one_before_any_model_loads(tmp_path, monkeypatch, capsys, value):
    rows = _rows(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}])
    code, _, err = _score(tmp_path, monkeypatch, capsys, "--model", "/nonexistent/rm", "--max-length", value,
                          "--input", str(rows))
    assert code == 2 and f"--max-length must be a whole number of tokens, at least 1, got {value}" in err, err


def test_score_refuses_a_max_length_without_a_reward_model(tmp_path, monkeypatch, capsys):
    rows = _rows(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}])
    code, _, err = _score(tmp_path, monkeypatch, capsys, "--function", "em=posttrain.rewards:exact_match",
                          "--max-length", "8", "--input", str(rows))
    assert code == 2 and "--max-length" in err and "--model" in err, err


def test_score_help_names_max_length_and_floor_penalty():
    from posttrain.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["score"]
    text = sub.format_help()
    assert "--max-length" in text and "--floor-penalty" in text


# --------------------------------------------------------------------------- the floor penalty


def _length(prompts, responses):
    return [float(len(r)) for r in responses]


def _vowels(prompts, responses):
    return [float(sum(ch in "aeiou" for ch in r)) for r in responses]


def test_under_calibration_the_floor_penalty_is_on_the_weighted_terms_scale():
    """total = Σ w·(r − shift)/scale − penalty·Σ max(0, floor − r)/scale, the floor in raw units."""
    from posttrain.rewards import CombinedReward, RewardComponent

    combined = CombinedReward([RewardComponent("len", _length, weight=3.0, floor=5.0),
                               RewardComponent("vow", _vowels, weight=-1.0, floor=1.0)], penalty=2.5)
    sample = ["a", "bbbbbbbbbb", "cccc", "aeiouxyz"]
    combined.calibrate([[{"role": "user", "content": "q"}]] * 4, sample)
    lm, ls = statistics.mean([1, 10, 4, 8]), statistics.stdev([1, 10, 4, 8])
    vm, vs = statistics.mean([1, 0, 0, 5]), statistics.stdev([1, 0, 0, 5])
    totals, raw = combined.score([[{"role": "user", "content": "q"}]] * 3, ["xy", "aeiouaeiou", "z"])
    expected = [3 * (n - lm) / ls - 1 * (v - vm) / vs - 2.5 * (max(0.0, 5 - n) / ls + max(0.0, 1 - v) / vs)
                for n, v in zip(raw["len"], raw["vow"])]
    assert raw == {"len": [2.0, 10.0, 1.0], "vow": [0.0, 10.0, 0.0]}
    assert totals == pytest.approx(expected, abs=1e-12)
    # by hand, the first row: len 2 (3 below its floor), no vowel (1 below)
    assert totals[0] == pytest.approx(3 * (2 - 5.75) / ls - (0 - 1.5) / vs - 2.5 * (3 / ls + 1 / vs), abs=1e-12)


def test_score_floor_penalty_option_sets_the_penalty(tmp_path, monkeypatch, capsys):
    (tmp_path / "s34_rewards.py").write_text("def length(prompt, response):\n    return float(len(response))\n")
    rows = _rows(tmp_path / "rows.jsonl", [{"prompt": "q", "response": r} for r in ("a", "abcd", "abcdefgh")])
    code, out, err = _score(tmp_path, monkeypatch, capsys, "--function", "len=s34_rewards:length",
                            "--floor", "len=3", "--floor-penalty", "0.5", "--input", str(rows))
    assert code == 0, err
    assert [json.loads(line)["reward"] for line in out.splitlines()] == [1 - 0.5 * 2, 4.0, 8.0]


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_score_refuses_a_negative_or_non_finite_floor_penalty(tmp_path, monkeypatch, capsys, value):
    rows = _rows(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}])
    code, _, err = _score(tmp_path, monkeypatch, capsys, "--model", "/nonexistent/rm", "--floor-penalty", value,
                          "--input", str(rows))
    assert code == 2 and "--floor-penalty must be a finite number, at least 0" in err, err


def test_a_combined_reward_refuses_a_negative_penalty():
    from posttrain.rewards import CombinedReward, RewardComponent

    with pytest.raises(ConfigError, match="floor penalty must be a finite number, at least 0"):
        CombinedReward([RewardComponent("len", _length, floor=1.0)], penalty=-2.0)
    assert math.isclose(CombinedReward([RewardComponent("len", _length)]).penalty, 10.0)


# --------------------------------------------------------------------------- an encoder's cut keeps [SEP]


def test_an_encoder_row_cut_to_fit_keeps_its_cls_and_sep_and_loses_content(encoder_rm):
    """A row longer than the 32 positions: [CLS], its first 30 tokens, [SEP] — as HF's own
    truncation, and as the rows an encoder sees in pretraining and most rows in training."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards import RewardModelScorer

    scorer = RewardModelScorer(str(encoder_rm))
    tok = scorer.tokenizer
    cls, sep = tok.cls_token_id, tok.sep_token_id
    long_turns = [{"role": "user", "content": f"copy: {_words(40)}"}]
    fed = []
    hook = scorer.model.bert.embeddings.register_forward_pre_hook(
        lambda m, args, kwargs: fed.append(kwargs["input_ids"].tolist()), with_kwargs=True)
    got = scorer([long_turns], ["red"])
    hook.remove()
    text = tok.apply_chat_template([*long_turns, {"role": "assistant", "content": "red"}], tokenize=False)
    content = tok(text, add_special_tokens=False)["input_ids"]
    assert len(content) > POSITIONS
    assert fed == [[[cls, *content[: POSITIONS - 2], sep]]]
    model = AutoModelForSequenceClassification.from_pretrained(encoder_rm).eval()
    with torch.no_grad():
        plain = float(model(input_ids=torch.tensor([[cls, *content[: POSITIONS - 2], sep]])).logits[0, 0])
    assert got == pytest.approx([plain], abs=1e-6)
    assert scorer.cut_note() == "cut 1 of 1 rows longer than 32 tokens (kept their start)"


def test_training_cuts_an_encoder_row_as_scoring_does(encoder_rm, tmp_path):
    from posttrain.data.preferences import encode_preference, fit_preference_length, to_preference_record
    from posttrain.data.templates import resolve_template
    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(str(encoder_rm))
    record = to_preference_record({"prompt": "copy: red", "chosen": _words(40), "rejected": f"blue {_words(40)}"},
                                  "pairs")
    example = encode_preference(record, tok, resolve_template(tok, "auto"), special_tokens=True)
    assert all(len(s) > POSITIONS for s in example.sequences)
    (cut,), _ = fit_preference_length([example], POSITIONS)
    assert [s.input_ids[-1] for s in cut.sequences] == [tok.sep_token_id] * 2  # today: content tokens
