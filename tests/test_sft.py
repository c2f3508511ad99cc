"""Supervised fine-tuning end to end on the tiny preset, through the Python API."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import SFTConfig
from posttrain.errors import ConfigError, DataError
from posttrain.train.sft import run_sft


def _cfg(tmp_path, **sections) -> SFTConfig:
    data = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_size": 64, "max_length": 64, "eval_fraction": 0.0},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "progress_bar": False, "resume": "never"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return SFTConfig.from_dict(data)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_full_sft_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = run_sft(_cfg(tmp_path))
    records = [m for m in _metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_mem_mb", "skipped_steps"):
        assert key in records[0]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data_report.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.chat_template
    assert not list((run_dir / "final").glob("*.bin"))  # safetensors only
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_lora_sft_saves_a_peft_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.models.presets import preset_path

    run_dir = run_sft(_cfg(tmp_path, adapter={"method": "lora", "lora": {"r": 4}}, train={"lr": 1e-2}))
    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(preset_path("tiny"))
    ids = torch.tensor([[5, 6, 7, 8]])
    base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, final)
    assert not torch.allclose(model(ids).logits, base_logits)  # the adapter trained and loaded
    # `posttrain generate/chat --model RUN_DIR` finds the adapter and its base by itself.
    from posttrain.inference import load_for_inference

    loaded, _ = load_for_inference(str(run_dir))
    assert loaded.methods == ("lora",)
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_chunked_and_plain_losses_agree_on_the_tiny_model(tmp_path):
    """The first step's loss (same weights, same batch) is the same with either loss path."""
    first = {}
    for kind in ("chunked", "plain"):
        run_dir = run_sft(_cfg(tmp_path / kind, train={"loss": kind, "max_steps": 1}))
        first[kind] = _metrics(run_dir)[0]
    assert first["chunked"]["loss"] == pytest.approx(first["plain"]["loss"], rel=1e-5)
    assert first["chunked"]["grad_norm"] == pytest.approx(first["plain"]["grad_norm"], rel=1e-4)


def test_packing_gives_the_same_first_loss_as_padding(tmp_path):
    """Step 1 sees the whole (tiny) dataset in one batch either way: same tokens, same loss."""
    common = {"data": {"synthetic_size": 16, "max_length": 64, "eval_fraction": 0.0},
              "train": {"batch_size": 16, "max_steps": 1}}
    padded = run_sft(_cfg(tmp_path / "padded", **common))
    packed = run_sft(_cfg(tmp_path / "packed", data={**common["data"], "packing": True, "max_length": 256},
                          train={"batch_size": 16, "max_steps": 1}))
    assert _metrics(packed)[0]["loss"] == pytest.approx(_metrics(padded)[0]["loss"], abs=1e-5)


def test_eval_loss_is_logged(tmp_path):
    run_dir = run_sft(_cfg(tmp_path, data={"synthetic_size": 80, "max_length": 64, "eval_fraction": 0.2},
                           train={"max_steps": 4, "eval_every": 2}))
    evals = [m for m in _metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\nnot json\n'
                    + '{"instruction": "d", "output": "e"}\n' * 5)
    cfg = _cfg(tmp_path, data={"train_files": [str(data)], "eval_fraction": 0.0})
    with pytest.raises(DataError) as info:
        run_sft(cfg)
    assert f"{data}:2" in str(info.value) and f"{data}:3" in str(info.value)
    cfg = _cfg(tmp_path, data={"train_files": [str(data)], "bad_rows": "skip", "max_bad_fraction": 0.5})
    run_dir = run_sft(cfg)
    rejects = (run_dir / "rejects-train.jsonl").read_text().splitlines()
    assert len(rejects) == 2


def test_config_is_validated_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        SFTConfig.from_dict({"train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="batch_size"):
        run_sft(_cfg(tmp_path, train={"batch_size": 0}))
    assert not (tmp_path / "run").exists()


def test_streaming_sft_runs(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line number {i} of the file"}) + "\n" for i in range(10)))
    run_dir = run_sft(_cfg(tmp_path, data={"train_files": [str(data)], "streaming": True, "format": "text"},
                           train={"batch_size": 4, "max_steps": 4}))
    assert len([m for m in _metrics(run_dir) if "loss" in m]) == 4  # wraps around the 10 rows


@pytest.mark.slow
def test_sft_raises_exact_match(tmp_path):
    """Outcome: a short SFT run on one synthetic task lifts held-out exact match from ~0."""
    cfg = _cfg(tmp_path,
               data={"synthetic_tasks": ["smallest"], "synthetic_size": 3000, "eval_fraction": 0.05, "max_length": 64},
               train={"max_steps": 150, "batch_size": 32, "lr": 3e-3, "warmup_steps": 15, "schedule": "cosine"},
               eval={"exact_match_prompts": 100, "max_new_tokens": 8})
    summary = json.loads((run_sft(cfg) / "summary.json").read_text())
    assert summary["exact_match_before"] <= 0.1
    assert summary["exact_match_after"] >= 0.6


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path):
    run_dir = run_sft(_cfg(tmp_path, model={"path": "tiny", "gradient_checkpointing": True},
                           train={"mixed_precision": "bf16", "max_steps": 2}))
    losses = [m["loss"] for m in _metrics(run_dir) if "loss" in m]
    assert len(losses) == 2 and all(l == l and l < 20 for l in losses)  # finite, sane


def test_missing_tracker_package_is_a_config_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ConfigError, match="pip install 'posttrain\\[tensorboard\\]'"):
        run_sft(_cfg(tmp_path, train={"report_to": ["tensorboard"]}))


def test_padded_batch_loss_equals_sum_of_single_example_losses():
    """Right padding (mask dropped for the causal kernel) and left padding both give each
    example exactly the loss it has alone."""
    from posttrain.data.batching import collate
    from posttrain.data.records import IGNORE_INDEX, Example
    from posttrain.models.loading import load_model
    from posttrain.train.sft import CausalLMLoss

    torch.manual_seed(0)
    module = CausalLMLoss(load_model("tiny").eval()).requires_grad_(False)
    examples = []
    for n in (5, 11, 8):
        ids = torch.randint(4, 1000, (n,)).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    alone = sum(float(module(**collate([e], pad_id=3))) for e in examples)
    batch = collate(examples, pad_id=3)
    assert float(module(**batch)) == pytest.approx(alone, rel=1e-5)
    width = batch["input_ids"].shape[1]
    ids = torch.full((3, width), 3)
    labels = torch.full((3, width), IGNORE_INDEX)
    mask = torch.zeros((3, width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, width - n:] = torch.tensor(e.input_ids)
        labels[row, width - n:] = torch.tensor(e.labels)
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    left_loss = module(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions)
    assert float(left_loss) == pytest.approx(alone, rel=1e-5)
