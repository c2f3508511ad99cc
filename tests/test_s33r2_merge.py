"""`posttrain merge`: where it may write (new or empty), what it says of what is not an adapter, and
the method it names (stop 33)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run_cli


def _adapter(base, out: Path, **adapter) -> Path:
    """An adapter on `base`, its trainable weights moved off their start."""
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    model = apply_adapters(load_model(str(base)), AdapterConfig(**(adapter or {"method": ["lora"]})))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return save_model(model, load_tokenizer(str(base)), out)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    from posttrain.models.presets import preset_path

    return _adapter(preset_path("tiny"), tmp_path_factory.mktemp("lora") / "adapter")


def test_a_dora_merge_names_dora_and_an_empty_directory_is_written(tmp_path, capsys):
    from posttrain.models.presets import preset_path

    adapter = _adapter(preset_path("tiny"), tmp_path / "adapter", method=["dora"])
    (tmp_path / "merged").mkdir()
    rc, out = run_cli(capsys, "merge", adapter, tmp_path / "merged")
    assert rc == 0 and "merged dora into the base" in out, out
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_directory_holding_files_is_refused_and_left_as_it_was(lora, tmp_path, capsys):
    out_dir = tmp_path / "old"
    out_dir.mkdir()
    (out_dir / "model.safetensors.index.json").write_text("{}")
    rc, out = run_cli(capsys, "merge", lora, out_dir)
    assert rc == 2 and "is not empty" in out and "new or empty" in out, out
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors.index.json"]


def test_the_preset_base_named_by_name_is_refused_before_anything_is_written(lora, tmp_path, capsys, monkeypatch):
    """An adapter whose config names its base "tiny" (as plain peft may record it) merged into the
    preset's built directory: refused as its base, resolved as the loader resolves the name."""
    from posttrain.models import loading
    from posttrain.models.presets import preset_path

    adapter = tmp_path / "adapter"
    shutil.copytree(lora, adapter)
    (adapter / "posttrain_adapters.json").unlink(missing_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tiny"}))
    monkeypatch.setattr(loading, "save_model", lambda *a, **k: pytest.fail("merge wrote into the preset"))
    rc, out = run_cli(capsys, "merge", adapter, preset_path("tiny"))
    assert rc == 2 and "is the base model the adapter was trained on" in out, out


def test_a_run_stopped_before_its_first_checkpoint_is_told_a_rerun_trains_it_again(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("stage: sft\n")
    rc, out = run_cli(capsys, "merge", run, tmp_path / "merged")
    assert rc == 2 and "without final/" in out and "trains it again" in out and "needs no merging" not in out, out
    assert not (tmp_path / "merged").exists()


def test_a_directory_with_nothing_of_a_model_says_it_holds_no_adapter(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    rc, out = run_cli(capsys, "merge", tmp_path / "stuff", tmp_path / "merged")
    assert rc == 2 and "holds no adapter (no adapter_config.json" in out and "needs no merging" not in out, out
