"""Data mixes, stop 35 (round 2): one rule for a file listed twice in every list of data files
(training, held-out, quality's files, RLAIF's and Constitutional AI's prompts), a DatasetDict
directory the same rows as its train split's directory, 'synthetic' alone or not at all (checked
up front), and `train_files: [synthetic]` with held-out files giving every synthetic row to training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from tests.test_walkthrough_datamix import _quiet, _write_jsonl


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))




def _prompts(path: Path) -> Path:
    return _write_jsonl(path, [{"prompt": f"question {i}"} for i in range(3)])


# --------------------------------------------------------------------------- a file listed twice


def test_quality_refuses_a_file_listed_twice_by_any_spelling(tmp_path, monkeypatch):
    from posttrain.config.quality import QualityConfig, validate_quality

    rows = _write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "q", "output": "a"}])
    monkeypatch.chdir(tmp_path)
    cfg = QualityConfig.from_dict({"data": {"files": [str(rows), "./rows.jsonl"]}})
    with pytest.raises(ConfigError, match=r"data.files lists ./rows.jsonl twice"):
        validate_quality(cfg)
    validate_quality(QualityConfig.from_dict({"data": {"files": [str(rows)]}}))


def test_rlaif_refuses_a_prompt_file_listed_twice(tmp_path):
    from posttrain.config import RLAIFConfig, validate_rlaif

    prompts = _prompts(tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="data.prompt_files lists .* twice"):
        validate_rlaif(RLAIFConfig.from_dict({"data": {"prompt_files": [str(prompts), str(prompts)]}}))
    validate_rlaif(RLAIFConfig.from_dict({"data": {"prompt_files": [str(prompts)]}}))


def test_constitutional_refuses_a_prompt_file_listed_twice(tmp_path):
    from posttrain.config.synthesis import ConstitutionalConfig, validate_constitutional

    prompts = _prompts(tmp_path / "p.jsonl")
    link = tmp_path / "link.jsonl"
    link.symlink_to(prompts)
    with pytest.raises(ConfigError, match="data.prompt_files lists .*link.jsonl twice"):
        validate_constitutional(ConstitutionalConfig.from_dict({"data": {"prompt_files": [str(prompts), str(link)]}}))


# --------------------------------------------------------------------------- a DatasetDict and its train split


def _dataset_dict(path: Path) -> Path:
    import datasets

    datasets.disable_progress_bars()
    rows = [{"prompt": f"p {i}", "completion": f"c{i}"} for i in range(6)]
    whole = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": whole.select(range(4)), "test": whole.select(range(4, 6))}).save_to_disk(str(path))
    return path


def test_a_datasetdict_directory_is_its_train_split_to_the_file_checks(tmp_path):
    from posttrain.config import SFTConfig, validate_sft
    from posttrain.data.readers import files_in_both, files_listed_twice

    dd = _dataset_dict(tmp_path / "dd")
    assert files_listed_twice([str(dd), str(dd / "train")]) == [str(dd / "train")]
    assert files_in_both([str(dd)], [str(dd / "train")]) == [str(dd)]
    assert files_in_both([str(dd / "test")], [str(dd)]) == []  # the test split is other rows

    def sft(train, held_out):
        return SFTConfig.from_dict({"output_dir": str(tmp_path / "run"),
                                    "data": {"train_files": train, "eval_files": held_out}})

    with pytest.raises(ConfigError, match="data.train_files lists .* twice"):
        validate_sft(sft([str(dd), str(dd / "train")], []))
    with pytest.raises(ConfigError, match="data.eval_files and data.train_files both list"):
        validate_sft(sft([str(dd)], [str(dd / "train")]))
    validate_sft(sft([str(dd)], [str(dd / "test")]))


# --------------------------------------------------------------------------- synthetic alone


@pytest.mark.parametrize("files", [["synthetic", "synthetic"], ["rows.jsonl", "synthetic"]])
def test_synthetic_beside_anything_is_refused_up_front_in_every_training_stage(files):
    from posttrain.config import DPOConfig, GRPOConfig, RMConfig, SFTConfig, validate_dpo, validate_grpo, validate_rm, \
        validate_sft

    for config, validate in ((SFTConfig, validate_sft), (DPOConfig, validate_dpo), (RMConfig, validate_rm),
                             (GRPOConfig, validate_grpo)):
        with pytest.raises(ConfigError, match=r"data.train_files: 'synthetic' .* cannot be mixed"):
            validate(config.from_dict({"data": {"train_files": files}}))


def test_synthetic_as_held_out_files_is_refused_up_front():
    from posttrain.config import SFTConfig, validate_sft

    with pytest.raises(ConfigError, match="data.eval_files takes files, not 'synthetic'"):
        validate_sft(SFTConfig.from_dict({"data": {"eval_files": ["synthetic"]}}))


def test_the_data_layer_names_the_key_it_refuses(tok):
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data

    cfg = DataConfig(train_files=["synthetic", "rows.jsonl"])
    with pytest.raises(ConfigError, match=r"^data.train_files: 'synthetic' cannot be mixed"):
        prepare_sft_data(cfg, tok, None, 0, log=_quiet)


# --------------------------------------------------------------------------- synthetic rows with held-out files


def test_synthetic_split_sizes_hold_out_nothing_when_held_out_files_are_given():
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import synthetic_split_sizes

    assert synthetic_split_sizes(DataConfig(synthetic_size=40, eval_fraction=0.25)) == (30, 10)
    assert synthetic_split_sizes(DataConfig(synthetic_size=40, eval_fraction=0.25, eval_files=["h.jsonl"])) == (40, 0)


def test_sft_report_counts_every_synthetic_row_trained_with_held_out_files(tmp_path, tok):
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data

    held = _write_jsonl(tmp_path / "held.jsonl", [{"instruction": f"H {i}", "output": f"h{i}"} for i in range(3)])
    cfg = DataConfig(train_files=["synthetic"], eval_files=[str(held)], synthetic_size=40, eval_fraction=0.25,
                     max_length=64)
    data = prepare_sft_data(cfg, tok, tmp_path / "run", 0, log=_quiet)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_read"]["rows"] == report["train_examples"] == len(data.train) == 40
    assert report["eval_examples"] == 3
