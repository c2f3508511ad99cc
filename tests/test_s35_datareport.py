"""data_report.json over a mix of files (stop 35, backlog items from the data-mixing walk).

Pins: a streamed run's report counts the rows read per file and the malformed rows, as a running
count until a full pass ends (and says which); a DatasetDict directory's entry names the split read
and the log names the splits skipped; rows whose content is in more than one file are counted and
said (never dropped: `posttrain quality` removes duplicates); `data.max_bad_fraction` holds for
each file, so a small bad file beside a big clean one is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _quiet(*_args, **_kwargs):
    pass


def _alpaca_rows(tag: str, n: int) -> list[str]:
    return [json.dumps({"instruction": f"{tag} question {i}", "input": "", "output": f"{tag.lower()}{i}"})
            for i in range(n)]


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


def _files(entries: list[dict]) -> list[tuple]:
    return [(Path(f["path"]).name, f["total"], f["good"], f["bad"]) for f in entries]


# --------------------------------------------------------------------------- item 1: a streamed report


def test_a_streamed_report_counts_rows_per_file_and_bad_rows(tmp_path, tok):
    """Two files, one bad row under bad_rows=skip: after a full pass train_stream holds each file's
    rows (total, good, bad) and the bad rows; in the middle of a pass (what a checkpoint or the end
    of a run shorter than a pass writes) the same entries as a running count, marked as one."""
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import StreamCounts, prepare_streamed_eval, stream_sft_examples, write_stream_counts

    a = _write(tmp_path / "a.jsonl", _alpaca_rows("A", 6))
    b = _write(tmp_path / "b.jsonl", _alpaca_rows("B", 4)[:2] + ["not json"] + _alpaca_rows("B", 4)[2:])
    cfg = DataConfig(train_files=[a, b], streaming=True, bad_rows="skip", max_bad_fraction=0.25, eval_fraction=0.0,
                     max_length=64)
    run = tmp_path / "run"
    prepare_streamed_eval(cfg, tok, run, _quiet)
    partial = StreamCounts()
    stream = stream_sft_examples(cfg, tok, run, _quiet, partial)
    for _ in range(3):
        next(stream)
    write_stream_counts(run, partial, cfg)  # a checkpoint after 3 rows
    entry = json.loads((run / "data_report.json").read_text())["train_stream"]
    assert entry["complete_pass"] is False and "so far" in entry["counts"]
    assert _files(entry["files"]) == [("a.jsonl", 3, 3, 0)] and entry["bad_rows"] == 0
    stream.close()

    assert len(list(stream_sft_examples(cfg, tok, run, _quiet, StreamCounts()))) == 10
    entry = json.loads((run / "data_report.json").read_text())["train_stream"]
    assert entry["complete_pass"] is True and "full pass" in entry["counts"]
    assert _files(entry["files"]) == [("a.jsonl", 6, 6, 0), ("b.jsonl", 5, 4, 1)]
    assert entry["bad_rows"] == 1 and entry["rows_read"] == 10
    assert entry["first_bad"][0]["location"].endswith("b.jsonl:3")


# --------------------------------------------------------------------------- item 2: a DatasetDict's split


def test_a_datasetdict_entry_names_its_split_and_the_log_the_splits_skipped(tmp_path, tok):
    import datasets

    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data

    rows = datasets.Dataset.from_list([{"prompt": f"C prompt {i}", "completion": f"c{i}"} for i in range(6)])
    datasets.disable_progress_bars()
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": rows.select(range(3)), "validation": rows.select(range(3, 4)),
                          "test": rows.select(range(4, 6))}).save_to_disk(str(dd))
    plain = _write(tmp_path / "a.jsonl", _alpaca_rows("A", 2))
    lines: list[str] = []
    data = prepare_sft_data(DataConfig(train_files=[str(dd), plain], eval_fraction=0.0, max_length=64), tok,
                            tmp_path / "run", 0, lines.append)
    files = data.report["train_read"]["files"]
    assert files[0]["split"] == "train" and files[0]["total"] == 3 and "split" not in files[1]
    said = [line for line in lines if str(dd) in line and "split" in line]
    assert len(said) == 1 and "'train'" in said[0] and "'validation'" in said[0] and "'test'" in said[0], lines


# --------------------------------------------------------------------------- item 3: a row in two files


def test_rows_in_more_than_one_file_are_counted_and_said_never_dropped(tmp_path, tok):
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data

    a = _write(tmp_path / "a.jsonl", _alpaca_rows("A", 5))
    shared = _alpaca_rows("A", 5)[1:3]  # the same two rows, in b.jsonl too
    b = _write(tmp_path / "b.jsonl", _alpaca_rows("B", 3) + shared)
    lines: list[str] = []
    data = prepare_sft_data(DataConfig(train_files=[a, b], eval_fraction=0.0, max_length=64), tok, None, 0,
                            lines.append)
    read = data.report["train_read"]
    assert read["rows_in_several_files"] == 2 and len(data.train) == 10  # counted, all trained
    assert read["first_in_several_files"][0] == [f"{a}:2", f"{b}:4"]
    said = [line for line in lines if "more than one file" in line]
    assert len(said) == 1 and said[0].startswith("2 rows appear in more than one file"), lines
    assert "`posttrain quality` removes duplicates" in said[0]


def test_one_file_or_distinct_files_report_no_rows_in_several_files(tmp_path, tok):
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data

    a = _write(tmp_path / "a.jsonl", _alpaca_rows("A", 3) + _alpaca_rows("A", 1))  # a copy inside one file
    b = _write(tmp_path / "b.jsonl", _alpaca_rows("B", 3))
    lines: list[str] = []
    data = prepare_sft_data(DataConfig(train_files=[a, b], eval_fraction=0.0, max_length=64), tok, None, 0,
                            lines.append)
    assert data.report["train_read"]["rows_in_several_files"] == 0
    assert not [line for line in lines if "more than one file" in line]


# --------------------------------------------------------------------------- item 4: max_bad_fraction per file


@pytest.mark.parametrize("streaming", [False, True])
def test_max_bad_fraction_holds_for_each_file_of_a_mix(streaming, tmp_path, tok):
    """A 2-row file, 1 malformed (50%), beside 200 clean rows: 0.5% of the mix, under the default
    1%, but half of that file: refused, naming it."""
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data, stream_sft_examples
    from posttrain.errors import DataError

    big = _write(tmp_path / "big.jsonl", _alpaca_rows("Z", 200))
    small = _write(tmp_path / "small.jsonl", _alpaca_rows("S", 1) + ["broken"])
    cfg = DataConfig(train_files=[big, small], bad_rows="skip", eval_fraction=0.0, max_length=64,
                     streaming=streaming)
    with pytest.raises(DataError) as refused:
        if streaming:
            list(stream_sft_examples(cfg, tok, None, _quiet))
        else:
            prepare_sft_data(cfg, tok, None, 0, _quiet)
    message = str(refused.value)
    assert message.startswith(f"{small}: 1 of 2 rows (50.00%) are malformed") and "max_bad_fraction=0.01" in message
