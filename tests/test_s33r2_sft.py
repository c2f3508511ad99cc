"""Stop 33 (sft fixes): streamed packing fills `train.batch_size` packed rows a micro-batch
(`batching.pack_stream`, the in-memory packing rule on a rolling buffer); sft refuses a row whose
prompt or user / system text is already rendered with the chat template, as the other stages do;
a trained answer that already ends with the template's end-of-turn marker ("a b<|im_end|>", a TRL
habit) has it stripped, so the model learns to say it once, counted and said once."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.data.records import IGNORE_INDEX, Example, Record
from posttrain.errors import DataError


def _quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


def _fresh_tok(extra: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    if extra:
        tok.add_tokens(list(extra), special_tokens=True)
    return tok


def _examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(4, 4 + n)), list(range(4, 4 + n)), f"f.jsonl:{i + 1}") for i, n in enumerate(lengths)]


# --------------------------------------------------------------------------- streamed packing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_stream_gives_every_example_once_in_full_micro_batches_of_rows(seed):
    from posttrain.data.batching import pack, pack_stream

    rng = random.Random(seed)
    max_length, rows = 64, 3
    examples = _examples([rng.randint(2, 64) for _ in range(200)])
    batches = list(pack_stream(iter(examples), rows, max_length))
    seen = [tuple(e.input_ids) for b in batches for row in b for e in _segments(row)]
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in examples)
    assert all(len(row) <= max_length for b in batches for row in b)
    assert all(len(b) == rows for b in batches[:-1]) and 1 <= len(batches[-1]) <= rows  # only the last is short
    # about as many micro-batches as packing the whole set in memory and cutting it into `rows` rows
    in_memory = -(-len(pack(examples, max_length)) // rows)
    assert len(batches) <= in_memory + 2, (len(batches), in_memory)
    # deterministic: a resume that skips k micro-batches of a fresh pass lands on the same ones
    again = list(pack_stream(iter(examples), rows, max_length))
    assert [[r.input_ids for r in b] for b in again] == [[r.input_ids for r in b] for b in batches]


def _segments(row: Example) -> list[Example]:
    ids, positions = row.input_ids, row.position_ids
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    return [Example(ids[a:b], ids[a:b]) for a, b in zip(starts, starts[1:])]


def test_pack_stream_keeps_a_bounded_buffer_and_yields_before_the_stream_ends():
    """A stream far longer than memory: the first micro-batch comes once the window (4 micro-batches
    of tokens) is read, never the whole stream."""
    from posttrain.data.batching import pack_stream

    read = []

    def stream():
        for i in range(10_000):
            read.append(i)
            yield Example([5] * 20, [5] * 20, f"s:{i}")

    first = next(pack_stream(stream(), 4, 64))
    assert len(first) == 4 and len(read) <= 4 * 4 * 64 // 20 + 1, len(read)


def test_streamed_sft_micro_batches_without_packing_stay_batch_size_examples():
    from posttrain.config import SFTConfig
    from posttrain.train.sft import SFTStage

    examples = _examples([5 + i % 7 for i in range(10)])
    cfg = SFTConfig.from_dict({"data": {"packing": False, "max_length": 64}, "train": {"batch_size": 4}})
    stage = SFTStage(None, None, [], cfg, 3, stream=lambda: iter(examples))
    assert [b["input_ids"].shape[0] for b in stage.micro_batches(0)] == [4, 4, 2]


# --------------------------------------------------------------------------- rendered text in sft rows


def test_sft_messages_row_with_rendered_user_text_is_a_bad_row_and_skip_counts_it(tok, tmp_path):
    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import prepare_sft_data

    rendered = tok.apply_chat_template([{"role": "user", "content": "Copy: a b"}], tokenize=False,
                                       add_generation_prompt=True)
    rows = [{"messages": [{"role": "user", "content": f"Copy: {c} {c}"}, {"role": "assistant", "content": f"{c} {c}"}]}
            for c in "cdefghijklmnopqrstuvwxyz"]
    rows.insert(1, {"messages": [{"role": "user", "content": rendered}, {"role": "assistant", "content": "a b"}]})
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig.from_dict({"data": {"train_files": [str(path)], "eval_fraction": 0.0, "max_length": 128}})
    with pytest.raises(DataError, match=f"{path}:2"):
        prepare_sft_data(cfg.data, tok, None, 0, _quiet)
    skip = SFTConfig.from_dict({"data": {"train_files": [str(path)], "eval_fraction": 0.0, "max_length": 128,
                                         "bad_rows": "skip", "max_bad_fraction": 0.1}})
    data = prepare_sft_data(skip.data, tok, tmp_path / "run", 0, _quiet)
    assert len(data.train) == len(rows) - 1
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_length"]["unrendered"] == 1 and f"{path}:2" in report["train_length"]["unrendered_first"][0]


def test_sft_plain_rows_pass_the_rendered_check(tok):
    """Angle brackets and a marker's look-alikes in a user turn, a marker in an answer: no rendered prompt."""
    from posttrain.data.templates import encode_record, resolve_template

    template = resolve_template(tok, "auto")
    row = Record(messages=[{"role": "system", "content": "Use <b>tags</b>."},
                           {"role": "user", "content": "What does <|im> or ### Instruction mean?"},
                           {"role": "assistant", "content": "The <|im_start|> token opens a turn."}])
    assert encode_record(row, tok, template).num_label_tokens > 0


# --------------------------------------------------------------------------- end-of-turn marker twice


LLAMA3_LIKE = (
    "{%- for m in messages -%}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim "
    "+ '<|eot_id|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)
PHI3_LIKE = (  # an eos after the last turn only: no part of an earlier turn's end
    "{%- for m in messages -%}{{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)


def test_end_of_turn_is_what_the_template_writes_after_an_answer(tok):
    from posttrain.data.templates import end_of_turn, resolve_template

    assert end_of_turn(tok, resolve_template(tok, "chatml")) == "<|im_end|>"
    assert end_of_turn(tok, resolve_template(tok, "alpaca")) == tok.eos_token
    llama = _fresh_tok(("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert end_of_turn(llama, LLAMA3_LIKE) == "<|eot_id|>"
    phi = _fresh_tok(("<|user|>", "<|assistant|>", "<|end|>"))
    assert end_of_turn(phi, PHI3_LIKE) == "<|end|>"


@pytest.mark.parametrize("name", ["chatml", "alpaca", "llama3", "phi3"])
def test_a_trained_answer_ending_in_the_marker_trains_it_once(tok, name):
    from posttrain.data.templates import DoubledMarkers, encode_record, end_of_turn, resolve_template, role_markers

    tokenizer, template = {
        "chatml": (tok, resolve_template(tok, "chatml")),
        "alpaca": (tok, resolve_template(tok, "alpaca")),
        "llama3": (_fresh_tok(("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")), LLAMA3_LIKE),
        "phi3": (_fresh_tok(("<|user|>", "<|assistant|>", "<|end|>")), PHI3_LIKE),
    }[name]
    marker = end_of_turn(tokenizer, template)

    def conv(first: str, second: str) -> list[dict]:
        return [{"role": "user", "content": "Copy: a b"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "Reverse: x y"}, {"role": "assistant", "content": second}]

    doubled = DoubledMarkers()
    row = Record(messages=conv("a b" + marker, "y x" + marker + "\n"), source="d:3")
    got = encode_record(row, tokenizer, template)
    doubled.count(row, tokenizer, template)
    want = encode_record(Record(messages=conv("a b", "y x")), tokenizer, template)
    assert (got.input_ids, got.labels) == (want.input_ids, want.labels)
    assert (doubled.rows, doubled.first, doubled.marker) == (1, "d:3", marker)
    # an untrained turn is context, left as written; so is a prompt-completion row's prompt, refused
    # when the marker is one the template writes around a prompt (a prompt rendered already)
    context = conv("a b" + marker, "y x")
    kept = encode_record(Record(messages=context, untrained=(1,)), tokenizer, template)
    doubled.count(Record(messages=context, untrained=(1,)), tokenizer, template)
    assert kept.input_ids != want.input_ids and doubled.rows == 1
    if marker in role_markers(tokenizer, template):
        with pytest.raises(DataError, match="already rendered"):
            encode_record(Record(messages=context, prompt_turns=2), tokenizer, template)
    else:  # Alpaca's eos closes answers only
        prompt = encode_record(Record(messages=context, prompt_turns=2), tokenizer, template)
        assert prompt.input_ids == kept.input_ids


def test_sft_data_counts_and_says_doubled_markers_once_in_memory_and_streamed(tok, tmp_path):
    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import StreamCounts, prepare_sft_data, stream_sft_examples

    rows = [{"prompt": f"Copy: {c} {c}", "completion": f"{c} {c}" + ("<|im_end|>" if i % 2 else "")}
            for i, c in enumerate("abcdef")]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig.from_dict({"data": {"train_files": [str(path)], "eval_fraction": 0.0, "max_length": 128}})
    lines: list[str] = []
    data = prepare_sft_data(cfg.data, tok, tmp_path / "run", 0, lines.append)
    said = [line for line in lines if "end-of-turn marker" in line]
    assert len(said) == 1 and "3 rows" in said[0] and f"{path}:2" in said[0], lines
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX].count(end) == 1 for e in data.train)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_length"]["end_of_turn_stripped"] == 3

    counts, streamed_lines = StreamCounts(), []
    for _ in range(2):  # two passes: said once
        streamed = list(stream_sft_examples(cfg.data, tok, tmp_path / "s", streamed_lines.append, counts))
    assert [e.input_ids for e in streamed] == [e.input_ids for e in data.train]
    assert sum("end-of-turn marker" in line for line in streamed_lines) == 1
    report = json.loads((tmp_path / "s" / "data_report.json").read_text())
    assert report["train_stream"]["end_of_turn_stripped"] == 3


def test_a_streamed_packed_run_crashed_and_rerun_logs_as_the_uninterrupted_one(tmp_path, monkeypatch):
    """data.streaming + data.packing across a pass boundary: a step that dies after the step-3
    checkpoint, rerun, resumes at the same data position (micro-batches counted), so metrics.jsonl
    (the loss and the tokens of every step) equals the uninterrupted run's."""
    from pathlib import Path

    import posttrain as P
    from posttrain.train import loop

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Copy: {a} {b} {a}"},
                                                     {"role": "assistant", "content": f"{a} {b} {a}"}]}) + "\n"
                            for a in "abcdefghij" for b in "xyz"))

    def cfg(out: Path) -> P.SFTConfig:
        return P.SFTConfig.from_dict({
            "output_dir": str(out), "model": {"path": "tiny"},
            "data": {"train_files": [str(path)], "max_length": 64, "streaming": True, "packing": True},
            "train": {"max_steps": 10, "batch_size": 2, "lr": 1e-3, "progress_bar": False, "save_every": 1,
                      "keep_last": 1}})

    P.run_sft(cfg(tmp_path / "straight"))

    class Crash(Exception):
        pass

    real, calls = loop._train_step, [0]

    def dies_at_step_4(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise Crash()
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_train_step", dies_at_step_4)
        with pytest.raises(Crash):
            P.run_sft(cfg(tmp_path / "cut"))
    P.run_sft(cfg(tmp_path / "cut"))

    def read(run: Path) -> list[dict]:
        timings = {"tokens_per_s", "step_time_s", "peak_mem_mb", "wall_seconds"}
        return [{k: v for k, v in json.loads(line).items() if k not in timings}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    straight = read(tmp_path / "straight")
    assert read(tmp_path / "cut") == straight
    steps = [r for r in straight if "loss" in r]
    assert len(steps) == 10 and max(r["epoch"] for r in steps) >= 1, steps  # crossed a pass (8 micro-batches)
