"""Lengths against a model's positions (stop 31, beyond the pinned walkthrough tests): `position_limit`
on learned, adapted and encoder tables; per-row completion budgets in one batch; chat, exact match and
`score` near the limit; streamed SFT counts written before a full pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

POSITIONS = 64
WORDS = "red green blue gold pink grey teal navy".split()


def _words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    """A GPT-2 causal LM with 64 learned positions (an index past them is an IndexError)."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS,
                        bos_token_id=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


# --------------------------------------------------------------------------- position_limit


def test_position_limit_reads_the_table_less_virtual_tokens_and_robertas_offset(gpt2):
    from transformers import BloomConfig, BloomForCausalLM, RobertaConfig, RobertaForSequenceClassification

    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import load_model, position_limit

    assert position_limit(gpt2) == POSITIONS  # n_positions, under its max_position_embeddings name
    assert position_limit(load_model("tiny")) == 1024  # rotary: the table it was trained within
    cfg = AdapterConfig(method=["prefix"])
    cfg.virtual_tokens.num_virtual_tokens = 8
    assert position_limit(apply_adapters(load_model("tiny"), cfg)) == 1024 - 8
    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=130, pad_token_id=1, num_labels=1))
    assert position_limit(roberta) == 128  # positions start past the padding index
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2))
    assert position_limit(bloom) is None  # ALiBi: no table


def test_check_positions_names_the_settings_the_limit_and_the_virtual_tokens():
    from posttrain.config import AdapterConfig
    from posttrain.errors import ConfigError
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import check_positions, load_model

    cfg = AdapterConfig(method=["prompt"])
    cfg.virtual_tokens.num_virtual_tokens = 16
    model = apply_adapters(load_model("tiny"), cfg)
    check_positions(model, {"data.max_length": 1008})  # exactly what is left: fine
    with pytest.raises(ConfigError, match=r"data\.max_length 1009 .* 1008 positions .* less 16 virtual tokens"):
        check_positions(model, {"data.max_length": 1009})
    with pytest.raises(ConfigError, match=r"= 1024 tokens.*lower data\.max_prompt_length or rollout\.max_new_tokens"):
        check_positions(model, {"data.max_prompt_length": 1000, "rollout.max_new_tokens": 24})


# --------------------------------------------------------------------------- generation


def test_each_row_stops_at_the_positions_and_equals_itself_generated_alone(gpt2, tokenizer):
    """A long and a short prompt in one batch: the long one's completion ends where the positions
    do, the short one goes on to max_new_tokens (its masked, finished neighbour never indexes past
    the table), and each equals the row generated alone."""
    from posttrain.rollout.generate import generate_token_ids
    from posttrain.rollout.sampling import SamplingSettings

    long_, short = list(range(10, 70))[:60], [11, 12, 13, 14, 15]
    settings = SamplingSettings(max_new_tokens=40, temperature=0.0)
    eos = {10**6}  # never sampled: every row runs to its budget
    together = generate_token_ids(gpt2, [long_, short], settings, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_ids=eos, batch_size=2)
    assert [len(ids) for ids in together] == [POSITIONS - 60, 40]
    alone = [generate_token_ids(gpt2, [p], settings, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos)[0]
             for p in (long_, short)]
    assert together == alone


def test_a_prompt_that_fills_the_positions_is_refused_before_any_generation(gpt2, tokenizer):
    from posttrain.errors import DataError
    from posttrain.rollout.generate import generate_token_ids
    from posttrain.rollout.sampling import SamplingSettings

    calls = []
    gpt2.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(DataError, match=r"prompt 1 \(counting from 0\) has 64 tokens; the model reads at most 64"):
        generate_token_ids(gpt2, [[5, 6], list(range(10, 74))], SamplingSettings(max_new_tokens=1),
                           pad_token_id=tokenizer.pad_token_id, eos_token_ids={tokenizer.eos_token_id})
    assert not calls


def test_chat_says_when_the_history_outgrows_the_positions_and_goes_on(gpt2, tokenizer):
    from posttrain.data.templates import resolve_template
    from posttrain.rollout.generate import chat_session
    from posttrain.rollout.sampling import SamplingSettings

    lines = iter([f"Copy: {_words(60)}", "/reset", "hi"])

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written: list[str] = []
    history = chat_session(gpt2, tokenizer, resolve_template(tokenizer, "auto"),
                           SamplingSettings(max_new_tokens=4, temperature=0.0), read=read, write=written.append)
    assert "the model reads at most 64" in written[0] and "send a shorter one" in written[0]
    assert [m["content"] for m in history if m["role"] == "user"] == ["hi"] and len(written) == 2


def test_exact_match_leaves_out_prompts_past_the_positions_and_counts_them(gpt2, tokenizer, capsys):
    from posttrain.data.records import Record
    from posttrain.train.sft import exact_match_report

    def record(i, prompt):
        return Record(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": "red"}],
                      source=f"held:{i}")

    records = [record(0, "Copy: red"), record(1, f"Copy: {_words(80)}")]
    figures = exact_match_report(gpt2, tokenizer, records, 5, "auto", 4, "after")
    out = capsys.readouterr().out
    assert figures["exact_match_prompts"] == 1 and "on 1 held-out prompts; 1 left out" in out, out
    figures = exact_match_report(gpt2, tokenizer, records[1:], 5, "auto", 4, "after")
    assert figures == {"exact_match_prompts": 0} and "past the model's positions" in capsys.readouterr().out


# --------------------------------------------------------------------------- score


def test_an_encoder_reward_model_says_it_kept_the_start_of_the_rows_it_cut(tmp_path, capsys):
    """`score` with a BERT reward model of 32 positions: the long row is cut at 32 from its end (the
    [CLS] it pools at stays), and stderr says so."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from posttrain import cli

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "copy", ":", "user", "assistant", "<", ">", "|"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32,
                                                         max_position_embeddings=32, num_labels=1, pad_token_id=0))
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": f"copy: {_words(40)}", "response": "red"}) + "\n"
                    + json.dumps({"prompt": "copy: red", "response": "red"}) + "\n")
    assert cli.main(["score", "--model", str(tmp_path / "rm"), "--input", str(rows), "--output",
                     str(tmp_path / "out.jsonl")]) == 0
    assert "reward_model: cut 1 of 2 rows longer than 32 tokens (kept their start)" in capsys.readouterr().err


# --------------------------------------------------------------------------- streamed SFT


def test_streamed_counts_are_written_at_checkpoints_and_a_full_pass_is_not_overwritten(tmp_path, monkeypatch):
    import posttrain.data.pipeline as pipeline
    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import StreamCounts, write_stream_counts
    from posttrain.train.sft import run_sft

    rows = [{"messages": [{"role": "user", "content": f"Copy {i}: " + (_words(60) if i % 2 else "red")},
                          {"role": "assistant", "content": "red"}]} for i in range(40)]
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = []

    def spy(run_dir, counts, cfg):
        written.append((counts.rows, counts.too_long))
        write_stream_counts(run_dir, counts, cfg)

    monkeypatch.setattr(pipeline, "write_stream_counts", spy)  # run_sft imports it when it runs
    run = run_sft(SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
        "data": {"train_files": [str(data)], "streaming": True, "overlength": "drop", "max_length": 40},
        "train": {"max_steps": 2, "batch_size": 4, "save_every": 1, "progress_bar": False}}))
    assert len(written) == 3 and written[0][1] >= 1  # after steps 1 and 2, and at the end
    stream = json.loads((Path(run) / "data_report.json").read_text())["train_stream"]
    assert stream["complete_pass"] is False and stream["too_long"] == written[-1][1] > 0
    assert stream["rows_read"] < len(rows) and stream["policy"] == "drop"

    class Data:
        overlength = "drop"

    done = StreamCounts(rows=40, too_long=20, complete_passes=1)
    pipeline._update_report(tmp_path / "r", done.entry(Data, complete_pass=True))
    write_stream_counts(tmp_path / "r", StreamCounts(rows=3, complete_passes=1), Data)  # a later, partial pass
    assert json.loads((tmp_path / "r" / "data_report.json").read_text())["train_stream"]["rows_read"] == 40


def test_rl_says_when_a_reward_model_reads_fewer_tokens_than_a_rollout_row_holds():
    from posttrain.rewards import CombinedReward, RewardComponent, RewardModelScorer
    from posttrain.train.rollouts import note_reward_model_cuts

    scorer = RewardModelScorer.__new__(RewardModelScorer)  # its length and kind only: no model needed
    scorer.max_length, scorer.decoder = 64, True
    reward = CombinedReward([RewardComponent("rm", scorer), RewardComponent("f", lambda p, r: [0.0] * len(r))])
    lines: list[str] = []
    note_reward_model_cuts(reward, 64, lines.append)
    assert lines == []
    note_reward_model_cuts(reward, 96, lines.append)
    assert len(lines) == 1 and "rm reads at most 64 tokens" in lines[0] and "96" in lines[0]
    assert lines[0].endswith("scored by its last ones")
    scorer.decoder = False  # an encoder pools at its first token and keeps a row's start
    note_reward_model_cuts(reward, 96, lines.append)
    assert lines[1].endswith("scored by its first ones")
