"""Stop 32, inference backlog: `generate` and `score` write each row as soon as it and every row
before it are done (to OUTPUT.partial, renamed over OUTPUT at the end) and say their progress;
`generate` reads prompt turns as training reads them (text parts, ShareGPT); `chat` drops its
oldest exchanges when the history outgrows the model; `position_limit` reads RoPE scaling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import cli

ME = "tests.test_s32_inference"  # for --function specs (the repository root is on sys.path)


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def rows_written_so_far(prompt, response, row):
    """A reward: how many rows the output (row["out"]) holds when this row is scored."""
    if response == "boom":
        raise ValueError("boom")
    out = Path(row["out"])
    return float(len(_lines(out.with_name(out.name + ".partial"))))


@pytest.fixture()
def fast_progress(monkeypatch):
    from posttrain import inference

    monkeypatch.setattr(inference, "PROGRESS_EVERY", 0.0)


def _reader(lines):
    """A chat session's `read`: the next line, then EOFError (the user's ^D)."""
    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    return read


# --------------------------------------------------------------------------- item 1: rows as they are done


def test_score_writes_each_row_as_it_is_done_and_says_its_progress(tmp_path, capsys, fast_progress):
    out = tmp_path / "scored.jsonl"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "q", "response": "a" * i, "out": str(out)}) + "\n"
                            for i in range(1, 6)))
    rc, err = _cli(capsys, "score", "--function", f"n={ME}:rows_written_so_far", "--batch-size", 1,
                   "--input", rows, "--output", out)
    assert rc == 0, err
    assert [json.loads(line)["reward"] for line in _lines(out)] == [0, 1, 2, 3, 4]  # row k scored after 1..k-1 written
    assert not out.with_name("scored.jsonl.partial").exists()
    assert "1/5 rows" in err and "5/5 rows" in err, err


def test_score_that_fails_part_way_keeps_the_rows_done_and_the_old_output(tmp_path, capsys):
    out = tmp_path / "scored.jsonl"
    out.write_text("an earlier run's output\n")
    rows = tmp_path / "rows.jsonl"
    responses = ["a", "bb", "boom", "dddd"]
    rows.write_text("".join(json.dumps({"prompt": "q", "response": r, "out": str(out)}) + "\n" for r in responses))
    rc, err = _cli(capsys, "score", "--function", f"n={ME}:rows_written_so_far", "--batch-size", 1,
                   "--input", rows, "--output", out)
    assert rc == 2 and f"{rows}:3: reward 'n' raised ValueError: boom" in err, err
    assert out.read_text() == "an earlier run's output\n"  # never half of a file under the final name
    partial = out.with_name("scored.jsonl.partial")
    assert [json.loads(line)["response"] for line in _lines(partial)] == ["a", "bb"]
    assert f"2 of 4 rows written to {partial}" in err, err


def test_generate_writes_rows_in_input_order_as_they_are_done(tmp_path, capsys, monkeypatch, fast_progress):
    """12 prompts of different lengths, batch size 1: generation sorts by length only within a
    window of 8 batches, so the first 8 rows are on disk before the last 4 are generated, in input
    order, and the completions are those of one call over all prompts (seeded sampling)."""
    from posttrain.inference import load_for_inference
    from posttrain.rollout import generate as gen
    from posttrain.rollout.sampling import SamplingSettings

    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    prompts = [" ".join("abcdefghijkl"[: 1 + (i * 5) % 12]) for i in range(12)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    seen = []
    batch = gen._generate_batch

    def recording(model, prompt_ids, *args, **kwargs):
        seen.append(len(_lines(partial)))
        return batch(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(gen, "_generate_batch", recording)
    rc, err = _cli(capsys, "generate", "--model", "tiny", "--prompts", tmp_path / "p.txt", "--output", out,
                   "--batch-size", 1, "--max-new-tokens", 3, "--temperature", 1.0, "--seed", 7, "--template", "none")
    assert rc == 0, err
    assert len(seen) == 12 and min(seen[8:]) >= 8 and seen == sorted(seen), seen
    written = [json.loads(line) for line in _lines(out)]
    assert [row["prompt"] for row in written] == prompts and not partial.exists()
    assert "12/12 rows" in err, err
    monkeypatch.setattr(gen, "_generate_batch", batch)
    model, tokenizer = load_for_inference("tiny")
    settings = SamplingSettings(max_new_tokens=3, temperature=1.0, seed=7)
    assert [row["completion"] for row in written] == gen.generate(model, tokenizer, prompts, settings,
                                                                   batch_size=12, raw=True)


# --------------------------------------------------------------------------- item 2: prompt turns as training reads them


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Copy: "}, {"type": "text", "text": "a b"}]}]},
    {"conversations": [{"from": "human", "value": "Copy: a b"}]},
    {"prompt": [{"from": "human", "value": "Copy: a b"}]},
])
def test_generate_reads_text_parts_and_sharegpt_turns_as_training_does(tmp_path, row):
    from posttrain.inference import read_prompts, render
    from posttrain.models.loading import load_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    items = read_prompts(str(path))
    assert items == [row]  # the row as given: it is written back with its completion
    tokenizer = load_tokenizer("tiny")
    plain = {"messages": [{"role": "user", "content": "Copy: a b"}]}
    assert render(items[0], tokenizer, tokenizer.chat_template) == \
        render(plain, tokenizer, tokenizer.chat_template)


def test_a_bad_turn_is_still_named_by_file_and_line(tmp_path):
    from posttrain.errors import DataError
    from posttrain.inference import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"conversations": [{"from": "human", "value": [{"type": "image"}]}]}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: .*image"):
        read_prompts(str(path))


# --------------------------------------------------------------------------- item 3: chat past the model's positions


def test_chat_drops_the_oldest_exchanges_to_fit_and_says_so():
    from posttrain.data.templates import resolve_template
    from posttrain.inference import load_for_inference
    from posttrain.rollout.generate import chat_session
    from posttrain.rollout.sampling import SamplingSettings

    model, tokenizer = load_for_inference("tiny")
    model.config.max_position_embeddings = 60
    lines = iter(["a b c d e f g h i j"] * 4)

    read = _reader(lines)

    said = []
    messages = chat_session(model, tokenizer, resolve_template(tokenizer, "auto"),
                            SamplingSettings(max_new_tokens=8, temperature=0), read=read, write=said.append,
                            system="be brief")
    notes = [line for line in said if line.startswith("[dropped")]
    assert len(said) == 4 + len(notes) and notes, said  # every user line got a reply
    assert notes[0].startswith("[dropped 2 earlier turns"), notes
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[-1]["role"] == "assistant" and messages[-2]["content"] == "a b c d e f g h i j"


# --------------------------------------------------------------------------- item 4: RoPE scaling


def _llama(rope_scaling=None, table=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=table,
                         rope_scaling=rope_scaling)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("scaling, table, limit", [
    (None, 64, 64),
    ({"rope_type": "linear", "factor": 2.0}, 64, 128),
    ({"type": "dynamic", "factor": 4.0}, 64, 256),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 64, 256),
    ({"rope_type": "yarn", "factor": 4.0}, 64, 256),
    # the table already the extended length (DeepSeek-V3's and Llama 3.1's way of writing it)
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128, 128),
    ({"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}, 128, 128),
])
def test_position_limit_reads_rope_scaling(scaling, table, limit):
    from posttrain.models.loading import position_limit

    assert position_limit(_llama(scaling, table)) == limit


def test_a_yarn_model_generates_past_its_base_table():
    from posttrain.rollout.generate import completion_budgets

    model = _llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    assert completion_budgets(model, [100, 250], 8) == [8, 6]


def test_chat_refuses_a_message_too_long_alone_and_goes_on():
    from posttrain.data.templates import resolve_template
    from posttrain.inference import load_for_inference
    from posttrain.rollout.generate import chat_session
    from posttrain.rollout.sampling import SamplingSettings

    model, tokenizer = load_for_inference("tiny")
    model.config.max_position_embeddings = 40
    lines = iter([" ".join("abcdefghijklmnopqrstuvwxyz" * 3), "a b"])

    read = _reader(lines)

    said = []
    messages = chat_session(model, tokenizer, resolve_template(tokenizer, "auto"),
                            SamplingSettings(max_new_tokens=4, temperature=0), read=read, write=said.append)
    assert said[0].startswith("[this message takes") and "the model reads at most 40" in said[0], said
    assert len(said) == 2 and [m["content"] for m in messages if m["role"] == "user"] == ["a b"]


# --------------------------------------------------------------------------- item 5: one prefill per distinct prompt


def test_the_g_copies_of_a_prompt_are_prefilled_once_and_sample_as_before(monkeypatch):
    """RL's G samples of a prompt: the batch's prompt forward runs on its distinct prompts only
    (3 of 12 rows here), and every row samples what it samples in a batch of its own (seeded)."""
    from posttrain.inference import load_for_inference
    from posttrain.rollout.generate import generate_token_ids, prompt_token_ids
    from posttrain.rollout.sampling import SamplingSettings

    model, tokenizer = load_for_inference("tiny")
    prompts = [prompt_token_ids(tokenizer, text, raw=True) for text in ("a b c", "q m t x", "z")]
    rows = [ids for ids in prompts for _ in range(4)]
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, seed=3)
    widths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    together = generate_token_ids(model, rows, settings, pad_token_id=0, eos_token_ids=set(), batch_size=12)
    assert widths[0] == (3, 4), widths  # the prefill: 3 distinct prompts, padded to the longest
    alone = generate_token_ids(model, rows, settings, pad_token_id=0, eos_token_ids=set(), batch_size=1)
    assert together == alone and len({tuple(ids) for ids in together[:4]}) > 1  # G different samples
