"""A data-mix walk: how a user combines training data for a real instruction-tuning run.

Walked: several `data.train_files` of different formats and sizes in one SFT, DPO, reward-model and
GRPO run (alpaca JSON Lines, chat messages in Parquet, prompt-completion rows in a `datasets`
`save_to_disk` DatasetDict with train and test splits, plain text in CSV; preference pairs beside
4-way rankings; prompt rows beside chat rows); the rows read per file in `data_report.json`; a
per-file weight or sampling ratio (there is none, and nothing promises one); `data.eval_files`
against `data.eval_fraction`; one row in two files and one file listed twice; wildcards and
directories of files; `synthetic` mixed with a file and with held-out files; the order of rows
across files in memory and streamed; epochs over a mix; and `data.limit` (AI feedback's only).

Right: each file's format is detected on its own and its rows counted on their own in
`data_report.json` (`train_read.files`: path, format, total, good, bad), which add up to the rows
read; a DatasetDict directory is read through its train split and its test split's directory is a
held-out file; in memory the batch plan shuffles all rows of all files together, seeded by
(train.seed, epoch), so a run shorter than an epoch sees every file and a resumed run the same
order; a streamed mix is read file after file, as the README says; a file listed twice by any
spelling, wildcards and directories of data files are refused up front with the files to list;
GRPO refuses `synthetic` beside a file before its model loads.

Wrong: SFT, DPO and the reward model pass `train_files: [synthetic, FILE]` through the config
checks and refuse it only after the model has loaded (SFT's line names a key `data.train` that
does not exist); with `train_files: [synthetic]` and `eval_files` given, `eval_fraction` still
takes its share out of the synthetic training rows (a held-out split that is then thrown away,
while `data_report.json` counts those rows as read); and a DatasetDict directory and its own
`train` split's directory are two files to the check that keeps held-out files out of training,
so the same rows are trained on and held out.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 35: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _quiet(*_args, **_kwargs):
    pass


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


def _alpaca(path: Path, n: int, tag: str = "A") -> Path:
    return _write_jsonl(path, [{"instruction": f"{tag} question {i}", "input": "", "output": f"{tag.lower()}{i}"}
                               for i in range(n)])


def _dataset_dict(path: Path, n_train: int, n_test: int) -> Path:
    """A DatasetDict as `load_dataset(NAME).save_to_disk(DIR)` writes it: train and test splits."""
    import datasets

    rows = [{"prompt": f"C prompt {i}", "completion": f"c{i}"} for i in range(n_train + n_test)]
    whole = datasets.Dataset.from_list(rows)
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": whole.select(range(n_train)),
                          "test": whole.select(range(n_train, n_train + n_test))}).save_to_disk(str(path))
    return path


# --------------------------------------------------------------------------- the rows of a mix, per file


def test_a_four_format_sft_mix_is_read_and_counted_per_file(tmp_path, tok):
    """alpaca JSON Lines (6), messages Parquet (4), a DatasetDict's train split (3 of 5) and text CSV
    (2) in one SFT run: each file's format detected on its own, each counted in data_report.json, the
    counts adding up to the training examples; the DatasetDict's test split given as the held-out
    file is the held-out set."""
    import pandas as pd

    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data

    a = _alpaca(tmp_path / "a.jsonl", 6)
    b = tmp_path / "b.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": f"B q {i}"}, {"role": "assistant", "content": f"b{i}"}]
                               for i in range(4)]}).to_parquet(b)
    c = _dataset_dict(tmp_path / "c_dd", n_train=3, n_test=2)
    e = tmp_path / "e.csv"
    pd.DataFrame({"text": ["E text one here", "E text two here"]}).to_csv(e, index=False)
    cfg = DataConfig(train_files=[str(a), str(b), str(c), str(e)], eval_files=[str(c / "test")], max_length=64)
    data = prepare_sft_data(cfg, tok, tmp_path / "run", seed=0, log=_quiet)

    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    files = [(Path(f["path"]).name, f["format"], f["total"], f["good"]) for f in report["train_read"]["files"]]
    assert files == [("a.jsonl", "alpaca", 6, 6), ("b.parquet", "messages", 4, 4),
                     ("c_dd", "prompt_completion", 3, 3), ("e.csv", "text", 2, 2)]
    assert report["train_read"]["rows"] == 15 and report["train_examples"] == len(data.train) == 15
    assert sorted(r.messages[-1]["content"] for r in data.eval_records) == ["c3", "c4"]  # the test split


def test_a_preference_mix_of_pairs_and_rankings_keeps_both_and_counts_each_file(tmp_path, tok):
    """DPO / reward-model data: pairs in JSON Lines beside 3-way rankings in Parquet, read together,
    each file counted, every record kept with its own number of responses."""
    import pandas as pd

    from posttrain.config.preference import PreferenceDataConfig
    from posttrain.data.preferences import prepare_preference_data

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"pair q {i}", "chosen": "yes", "rejected": "no"}
                                                     for i in range(5)])
    ranks = tmp_path / "rank.parquet"
    pd.DataFrame({"prompt": [f"rank q {i}" for i in range(3)], "responses": [["a", "b", "c"]] * 3}).to_parquet(ranks)
    cfg = PreferenceDataConfig(train_files=[str(pairs), str(ranks)], eval_fraction=0.0, max_length=64)
    data = prepare_preference_data(cfg, tok, tmp_path / "run", 0, log=_quiet)
    files = [(Path(f["path"]).name, f["format"], f["total"]) for f in data.report["train_read"]["files"]]
    assert files == [("pairs.jsonl", "pairs", 5), ("rank.parquet", "ranking", 3)]
    assert sorted(len(e.sequences) for e in data.train) == [2] * 5 + [3] * 3


# --------------------------------------------------------------------------- the order of a mix


def test_in_memory_order_interleaves_the_files_seeded_per_epoch(tmp_path, tok):
    """A big file listed first and a small one after it: the first quarter of an epoch (a run with
    train.max_steps under one epoch) already holds rows of both; the order is a function of
    (train.seed, epoch), so a resumed run replays it, and the next epoch is another order."""
    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.train.sft import SFTStage

    big, small = _alpaca(tmp_path / "big.jsonl", 24, "A"), _alpaca(tmp_path / "small.jsonl", 8, "B")
    cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
                               "data": {"train_files": [str(big), str(small)], "eval_fraction": 0.0,
                                        "max_length": 64},
                               "train": {"batch_size": 4, "seed": 3}})
    data = prepare_sft_data(cfg.data, tok, None, seed=3, log=_quiet)
    by_ids = {tuple(e.input_ids): Path(e.source).name.split(":")[0] for e in data.train}

    def order(epoch: int) -> list[str]:
        stage = SFTStage(None, data.train, [], cfg, tok.pad_token_id)
        names = []
        for batch in stage.micro_batches(epoch):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                names.append(by_ids[tuple(ids[mask.bool()].tolist())])
        return names

    first = order(0)
    assert sorted(first) == ["big.jsonl"] * 24 + ["small.jsonl"] * 8  # every row once an epoch
    assert set(first[:8]) == {"big.jsonl", "small.jsonl"}, first[:8]
    assert order(0) == first  # seeded: a resume replays it
    stage = SFTStage(None, data.train, [], cfg, tok.pad_token_id)
    again = [b["input_ids"].tolist() for b in stage.micro_batches(0)]
    other = [b["input_ids"].tolist() for b in stage.micro_batches(1)]
    assert again != other  # epoch 1 is shuffled anew


# --------------------------------------------------------------------------- synthetic beside a file


class _ModelLoading(Exception):
    """Raised in place of loading a tokenizer or model: the run got past its config checks."""


def _no_model_loads(monkeypatch):
    import posttrain.models.loading as loading

    def refuse(*_args, **_kwargs):
        raise _ModelLoading("the model began loading")

    monkeypatch.setattr(loading, "load_tokenizer", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)


def _mixed_synthetic(stage: str, tmp_path: Path):
    """(config class, run function, a file of the stage's rows) for `stage`."""
    import posttrain

    if stage == "sft":
        return posttrain.SFTConfig, posttrain.run_sft, _alpaca(tmp_path / "rows.jsonl", 4)
    pairs = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"q {i}", "chosen": "yes", "rejected": "no"}
                                                    for i in range(4)])
    if stage == "dpo":
        return posttrain.DPOConfig, posttrain.run_dpo, pairs
    if stage == "rm":
        return posttrain.RMConfig, posttrain.run_rm, pairs
    prompts = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"q {i}", "answer": "a"} for i in range(4)])
    return posttrain.GRPOConfig, posttrain.run_grpo, prompts


def _outcome_with_synthetic_and_a_file(stage: str, tmp_path: Path, monkeypatch) -> tuple[str | None, str]:
    """What `train_files: [synthetic, FILE]` meets: (None, the refusal) when refused before the model
    loads, else (what happened instead, "")."""
    from posttrain.errors import ConfigError, DataError

    _no_model_loads(monkeypatch)
    config, run, rows = _mixed_synthetic(stage, tmp_path)
    cfg = config.from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
                            "data": {"train_files": ["synthetic", str(rows)]}, "train": {"max_steps": 1}})
    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        return None, str(exc)
    except _ModelLoading as exc:
        return str(exc), ""
    return "the run finished", ""


def test_grpo_refuses_synthetic_beside_a_file_before_its_model_loads(tmp_path, monkeypatch):
    """The bundled generator is the whole of a stage's data or none of it; GRPO reads its prompts
    before the model and says so naming the setting."""
    happened, refusal = _outcome_with_synthetic_and_a_file("grpo", tmp_path, monkeypatch)
    assert happened is None and "data.train_files" in refusal and "synthetic" in refusal, happened


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_synthetic_beside_a_file_is_refused_before_the_model_loads(stage, tmp_path, monkeypatch):
    """The brief: configs validated up front; the README: each file checked before the model loads.
    `synthetic` beside a file is refused in all three (`'synthetic' cannot be mixed with files`), but
    by the data layer, after the model (minutes for a 7B one); SFT's line names `data.train`."""
    happened, refusal = _outcome_with_synthetic_and_a_file(stage, tmp_path, monkeypatch)
    assert happened is None, f"{stage}: train_files [synthetic, FILE] passed the config checks: {happened}"
    assert "data.train_files" in refusal and "synthetic" in refusal, refusal


def _synthetic_train_count(stage: str, tmp_path: Path, tok) -> tuple[int, int]:
    """(training rows, held-out rows) of `train_files: [synthetic]`, synthetic_size 40,
    eval_fraction 0.25 and three held-out rows in `eval_files`."""
    if stage == "sft":
        from posttrain.config.sections import DataConfig
        from posttrain.data.pipeline import prepare_sft_data

        held = _alpaca(tmp_path / "held.jsonl", 3, "H")
        cfg = DataConfig(train_files=["synthetic"], eval_files=[str(held)], synthetic_size=40, eval_fraction=0.25,
                         max_length=64)
        data = prepare_sft_data(cfg, tok, None, 0, log=_quiet)
        return len(data.train), len(data.eval)
    if stage == "dpo":
        from posttrain.config.preference import PreferenceDataConfig
        from posttrain.data.preferences import prepare_preference_data

        held = _write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say {w}.", "chosen": w, "rejected": "no"}
                                                      for w in ("alpha", "beta", "gamma")])
        cfg = PreferenceDataConfig(train_files=["synthetic"], eval_files=[str(held)], synthetic_size=40,
                                   eval_fraction=0.25, max_length=64)
        data = prepare_preference_data(cfg, tok, None, 0, log=_quiet)
        return len(data.train), len(data.eval)
    from posttrain.config.rl import PromptDataConfig
    from posttrain.data.prompts import prepare_prompts

    held = _write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say {w}.", "answer": w}
                                                  for w in ("alpha", "beta", "gamma")])
    cfg = PromptDataConfig(train_files=["synthetic"], eval_files=[str(held)], synthetic_size=40, eval_fraction=0.25)
    train, held_out, _ = prepare_prompts(cfg, None, 0, log=_quiet)
    return len(train), len(held_out)


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_eval_fraction_takes_no_synthetic_training_rows_when_eval_files_are_given(stage, tmp_path, tok):
    """Help: `data.eval_fraction` is the 'fraction of training rows held out when eval_files is empty';
    `data.eval_files` is used 'also with train_files: [synthetic], in place of its held-out split'.
    With held-out files there is no split to take, so all `synthetic_size` rows train; instead a
    quarter is generated as a held-out split and dropped unused (data_report.json still counts 40
    rows read)."""
    trained, held_out = _synthetic_train_count(stage, tmp_path, tok)
    assert held_out == 3  # the held-out file, as test_walkthrough_claims pins
    assert trained == 40, f"{stage}: {trained} of synthetic_size=40 rows train with eval_files given (fraction 0.25)"


# --------------------------------------------------------------------------- a DatasetDict and its splits


def test_a_datasetdict_held_out_is_not_its_train_split_already_trained_on(tmp_path, tok):
    """README: a file in both `data.eval_files` and `data.train_files` is 'refused up front' 'by any
    spelling'. `train_files: [DD/train]` with `eval_files: [DD]` names one set of rows twice (a
    DatasetDict directory is read through its train split) but passes the check: every held-out
    figure is then taken on training rows. Right: refused up front (or DD's held-out rows are not
    its train split)."""
    from posttrain.config import SFTConfig, validate_sft
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.errors import ConfigError

    dd = _dataset_dict(tmp_path / "dd", n_train=4, n_test=2)
    cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
                               "data": {"train_files": [str(dd / "train")], "eval_files": [str(dd)],
                                        "max_length": 64}})
    try:
        validate_sft(cfg)
    except ConfigError:
        return
    data = prepare_sft_data(cfg.data, tok, None, seed=0, log=_quiet)
    trained = {json.dumps(e.input_ids) for e in data.train}
    shared = sum(json.dumps(e.input_ids) in trained for e in data.eval)
    assert shared == 0, f"{shared} of {len(data.eval)} held-out rows are training rows"
