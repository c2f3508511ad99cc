"""Five small fixes: logged figures are means over train.log_every steps; a micro-batch with no
label does not stop a step whose other micro-batches have labels (and an example with no label
after the causal shift is dropped, named, at read time); train.freeze on a tied lm_head says what
it is tied to; a pipeline's `inputs` typo is named as an inputs key; a reward model scorer says
when it cannot score padding-free."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import Crash, ToyStage, _cfg, _crash_on_call, _run  # noqa: E402

from posttrain.errors import ConfigError  # noqa: E402

TIMINGS = {"tokens_per_s", "step_time_s", "peak_mem_mb"}


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


# --------------------------------------------------------------------------- 1. means over log_every


def test_a_logged_line_holds_the_mean_of_the_steps_since_the_previous_one(tmp_path):
    """log_every=3 over 7 steps: lines at 3, 6 and 7 (the last step), each the mean of its steps'
    loss, grad norm and tokens as a log_every=1 run of the same training logs them; lr, epoch and
    the counters are the line's own step's."""
    _run(ToyStage(4), _cfg(max_steps=7), tmp_path / "each")
    _run(ToyStage(4), _cfg(max_steps=7, log_every=3), tmp_path / "mean")
    each, mean = _lines(tmp_path / "each"), _lines(tmp_path / "mean")
    assert [r["step"] for r in mean] == [3, 6, 7]
    assert [r["steps_averaged"] for r in mean] == [3, 3, 1] and {r["steps_averaged"] for r in each} == {1}
    for line, steps in zip(mean, ([1, 2, 3], [4, 5, 6], [7])):
        covered = [each[s - 1] for s in steps]
        for key in ("loss", "grad_norm", "tokens"):
            assert line[key] == pytest.approx(sum(r[key] for r in covered) / len(steps), rel=1e-12), key
        for key in ("lr", "epoch", "skipped_steps", "world_size"):
            assert line[key] == covered[-1][key], key


def test_a_non_finite_step_is_logged_alone_and_kept_out_of_the_means(tmp_path):
    """A NaN in step 2 (log_every=4): the line for step 1 comes first, then step 2's own line with
    its NaN loss (written as null and named under "nonfinite": metrics.jsonl stays strict JSON),
    then lines at 4 (steps 3-4) and 8; no mean is NaN."""
    stages = []
    for name, every in (("each", 1), ("mean", 4)):
        stage = ToyStage(4)
        stage.module.nan_at_calls = {2}  # step 2's micro-batch (batch 4, accumulation 1)
        _run(stage, _cfg(max_steps=8, log_every=every, warmup_steps=0), tmp_path / name)
        stages.append(stage)
    each, mean = _lines(tmp_path / "each"), _lines(tmp_path / "mean")
    assert [r["step"] for r in mean] == [1, 2, 4, 8]
    assert [r["steps_averaged"] for r in mean] == [1, 1, 2, 4]
    assert mean[1]["loss"] is None and mean[1]["nonfinite"]["loss"] == "nan" and mean[1]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) and "nonfinite" not in r for i, r in enumerate(mean) if i != 1)
    assert mean[2]["loss"] == pytest.approx((each[2]["loss"] + each[3]["loss"]) / 2, rel=1e-12)
    assert mean[3]["loss"] == pytest.approx(sum(r["loss"] for r in each[4:8]) / 4, rel=1e-12)


def test_a_resumed_run_logs_the_lines_an_uninterrupted_run_logs(tmp_path):
    """The interval's sums are part of the checkpoint: a run killed in step 7 (checkpoint at 4,
    log_every=3, so step 4 was half-way through the interval 4-6) resumes to the same lines."""
    cfg = _cfg(max_steps=9, log_every=3, save_every=4, keep_last=5)
    _run(ToyStage(4), cfg, tmp_path / "whole")
    crashing = ToyStage(4)
    crashing.module.forward = _crash_on_call(crashing.module.forward, 7)
    with pytest.raises(Crash):
        _run(crashing, cfg, tmp_path / "cut")
    cfg.resume = "auto"
    _run(ToyStage(4), cfg, tmp_path / "cut")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]  # noqa: E731
    assert strip(_lines(tmp_path / "cut")) == strip(_lines(tmp_path / "whole"))
    assert [r["step"] for r in _lines(tmp_path / "cut")] == [3, 6, 9]


# --------------------------------------------------------------------------- 2. unlabelled micro-batches


class _MaskedToy(torch.nn.Module):
    """The toy regression with a per-row weight `w`: rows of weight 0 carry no loss (SFT's masked
    labels); a batch of only such rows is a micro-batch with no label."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)])

    def forward(self, x, y, w):
        out = self.layers[1](torch.tanh(self.layers[0](x))).squeeze(-1)
        return (((out - y) ** 2) * w).sum()


class _MaskedStage(ToyStage):
    def __init__(self, unlabelled: set[int]):
        super().__init__(4, n=16)
        self.module = _MaskedToy()
        self.unlabelled = unlabelled  # indices of the epoch's micro-batches without a label

    def micro_batches(self, epoch):
        for i, batch in enumerate(super().micro_batches(epoch)):
            yield batch | {"w": torch.full_like(batch["y"], 0.0 if i in self.unlabelled else 1.0)}

    def weight(self, batch):
        return float(batch["w"].sum())


def test_a_step_trains_on_its_labelled_micro_batches_when_one_has_no_label(tmp_path):
    """Accumulation 2, the first micro-batch unlabelled: the step is the second micro-batch's,
    exactly (its loss and the weights it leads to), not an abort."""
    stage = _MaskedStage(unlabelled={0})
    result = _run(stage, _cfg(max_steps=1, batch_size=4, grad_accum=2, warmup_steps=0, max_grad_norm=0.0),
                  tmp_path / "masked")
    assert result.skipped_steps == 0
    alone = _MaskedStage(unlabelled=set())
    second = list(alone.micro_batches(0))[1]
    alone.micro_batches = lambda epoch: iter([second])
    _run(alone, _cfg(max_steps=1, batch_size=4, warmup_steps=0, max_grad_norm=0.0), tmp_path / "alone")
    assert _lines(tmp_path / "masked")[0]["loss"] == pytest.approx(_lines(tmp_path / "alone")[0]["loss"], rel=1e-12)
    for a, b in zip(result.module.parameters(), alone.module.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)


def test_a_text_example_with_no_token_after_the_shift_is_dropped_and_named(tmp_path):
    """A text row whose tokens are one (here the end-of-text token itself: EOS is appended only
    when missing) has nothing to predict — position t predicts token t+1. It is dropped at read
    time, named by file:line, and the report counts only tokens the loss trains on."""
    from transformers import AutoTokenizer

    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.models.presets import preset_path

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the cat", tokenizer.eos_token, "a dog")))
    heard = []
    data = prepare_sft_data(DataConfig(train_files=[str(path)], eval_fraction=0.0, format="text"), tokenizer,
                            tmp_path / "run", 0, heard.append)
    assert [e.source for e in data.train] == [f"{path}:1", f"{path}:3"]
    assert any(f"{path}:2" in line and "no token to train on" in line for line in heard), heard
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_length"]["dropped_no_labels"] == 1
    assert report["train_label_tokens"] == sum(len(e.input_ids) - 1 for e in data.train)


# --------------------------------------------------------------------------- 3. freeze on a tied head


def test_freezing_a_tied_lm_head_names_the_embedding_it_is_tied_to():
    from posttrain.config import SFTConfig
    from posttrain.train.sft import build_model

    cfg = SFTConfig.load(None, ["model.path=tiny", "train.freeze=[lm_head*]"])
    with pytest.raises(ConfigError) as caught:
        build_model(cfg, lambda *_: None)
    message = str(caught.value)
    assert "lm_head.weight is tied to the input embedding model.embed_tokens.weight" in message, message
    assert "matches no parameter" not in message


# --------------------------------------------------------------------------- 4. pipeline inputs typo


def test_a_misspelt_inputs_key_is_reported_as_an_inputs_key_of_its_stage(tmp_path):
    from posttrain.pipeline import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "sft", "kind": "sft"}, {"name": "pref", "kind": "dpo", "inputs": {"modle.path": "sft"}}]}))
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert "stage 'pref'" in message and "inputs: unknown key modle.path" in message, message
    assert "did you mean model.path?" in message and "overrides" not in message, message


# --------------------------------------------------------------------------- 5. reward model, padding-free off


def test_a_reward_model_scorer_says_why_it_does_not_score_padding_free(tmp_path):
    """A sliding-window reward model narrower than the scored sequences keeps its padded batches
    (its own masks); RL's reward (`build_reward`) says so once, at the start."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.config import GRPOConfig
    from posttrain.models.attention import takes_padding_free
    from posttrain.models.presets import preset_path
    from posttrain.train.rollouts import build_reward

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    config = AutoConfig.for_model("mistral", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=2048, sliding_window=16, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")  # its head saved
    tokenizer.save_pretrained(tmp_path / "rm")
    heard = []
    score = build_reward(GRPOConfig.load(None, [f"reward.models=[{tmp_path / 'rm'}]"]), "cpu", log=heard.append)
    assert not takes_padding_free(score.components[0].reward.model)
    assert len(heard) == 1 and "padding-free" in heard[0] and "16-token window" in heard[0], heard
    assert str(tmp_path / "rm") in heard[0], heard
