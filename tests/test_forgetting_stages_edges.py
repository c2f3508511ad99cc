"""Forgetting control in the later stages, at their edges: the pipeline command (a dpo stage with
a `forgetting:` section, validated, interrupted and resumed, then skipped), the command line
(`posttrain dpo|grpo|rloo|ppo` with forgetting.* overrides, exit 2 on a refused resume), every
dpo.loss and the adapters that change what "the starting policy" is (a live reference with
LoRA, prompt tuning's virtual tokens), PPO's value model beside L2-SP and gradual unfreezing,
and retain rows the stage cannot read whole (text rows, rows past the stage's length).

Every run is the tiny-2l preset for 2–4 steps. Expected values come from a second run, from
the preset's own weights, or from a plain full-logits computation written out here."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.config.preference import DPOConfig
from posttrain.data.records import IGNORE_INDEX
from posttrain.errors import ConfigError
from posttrain.train import forgetting as fg
from posttrain.train.retain_terms import RetainTerms
from tests.test_forgetting_edges import _final, _lines, _rows, _summary, _write

ROOT = Path(__file__).resolve().parents[1]
TERMS = {"lm_coef": 0.5, "distill": 1.0, "distill_top_k": 8}
LAYER_0_OR_EMBEDDING = ("model.layers.0.", "model.embed_tokens")
# examples/grpo.yaml on tiny-2l, 3 steps; a length reward, so that a group's rewards differ (exact match is 0 for all)
RL_FAST = ("data.synthetic_size=64", "rollout.num_generations=4", "reward.functions=[short=tests.rewards_fixture:short]",
           "train.batch_size=8", "train.max_steps=3", "train.lr=1e-2", "train.progress_bar=false", "eval.prompts=0")


# --------------------------------------------------------------------------- helpers


def _retain(tmp_path: Path, n: int = 24) -> Path:
    path = tmp_path / "retain.jsonl"
    return path if path.exists() else _write(path, _rows(n))


def _steps(run_dir) -> list[dict]:
    return [line for line in _lines(run_dir) if "loss" in line]


def _dpo(tmp_path, name="dpo", *, dpo=None, adapter=None, train=None, data=None, retain=None, **forgetting) -> DPOConfig:
    files = [str(retain or _retain(tmp_path))] if retain is not False else []
    return DPOConfig.from_dict({
        "output_dir": str(tmp_path / name), "model": {"path": "tiny-2l"}, "adapter": adapter or {},
        "data": {"synthetic_size": 32, "max_length": 64} | (data or {}), "dpo": dpo or {},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "schedule": "constant", "progress_bar": False,
                  "resume": "never", "seed": 0} | (train or {}),
        "forgetting": {"retain_files": files} | forgetting})


def _cli(capsys, *args) -> tuple[int, str]:
    """`posttrain ARGS` in this process: (exit code, stderr)."""
    from posttrain.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _preset(name="tiny-2l") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from posttrain.models.presets import preset_path

    return load_file(str(preset_path(name) / "model.safetensors"))


def _moved(start: dict, end: dict) -> set[str]:
    return {name for name in start if not torch.equal(start[name], end[name])}


@pytest.fixture
def begun(monkeypatch):
    """The ForgettingControl whose begin() ran, the unwrapped module, and its parameters' values
    as the run started (snapshotted before begin)."""
    seen = {}
    begin = fg.ForgettingControl.begin

    def spy(self, module, accelerator):
        inner = accelerator.unwrap_model(module)
        seen.update(control=self, inner=inner, start={n: p.detach().clone() for n, p in inner.named_parameters()})
        return begin(self, module, accelerator)

    monkeypatch.setattr(fg.ForgettingControl, "begin", spy)
    return seen


# --------------------------------------------------------------------------- the pipeline command


SFT_STAGE = {"name": "sft", "kind": "sft", "overrides": {
    "model.path": "tiny-2l", "data.synthetic_size": 32, "data.synthetic_tasks": ["smallest"], "data.max_length": 64,
    "train.max_steps": 2, "train.batch_size": 8, "train.lr": 3e-3}}


def _pipeline(tmp_path: Path, out: str, retain: Path) -> Path:
    dpo_stage = {"name": "dpo", "kind": "dpo", "overrides": {
        "data.synthetic_size": 32, "data.max_length": 64, "train.max_steps": 4, "train.batch_size": 4, "train.lr": 1e-2,
        "train.save_every": 2, "forgetting.retain_files": [str(retain)], "forgetting.l2sp": 0.1,
        "forgetting.project": True, **{f"forgetting.{k}": v for k, v in TERMS.items()}}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / out), "stages": [SFT_STAGE, dpo_stage],
                                    "overrides": {"train.progress_bar": False, "train.schedule": "constant"}}))
    return path


def test_a_pipeline_dpo_stage_with_forgetting_resumes_bitwise_then_skips_then_reruns_alone(tmp_path, capsys,
                                                                                       monkeypatch):
    """sft -> dpo (lm_coef, distill, project, l2sp): the dpo stage gets its forgetting section and
    the sft model; killed after its step-2 checkpoint, the next invocation resumes it (θ₀, the
    teacher and the start loss from the checkpoint) to the weights and retain figures of an
    uninterrupted pipeline; a third skips both; a changed forgetting key reruns dpo alone."""
    from posttrain import cli
    from posttrain.pipeline import load_pipeline, plan, read_state, run_pipeline
    from posttrain.train.preference import run_dpo

    retain = _retain(tmp_path)
    straight = run_pipeline(_pipeline(tmp_path, "straight", retain))

    def dies_after_two_steps(cfg):
        short = copy.deepcopy(cfg)
        short.train.max_steps = 2
        run_dpo(short)
        raise KeyboardInterrupt

    path = _pipeline(tmp_path, "cut", retain)
    monkeypatch.setitem(cli._STAGES, "dpo", lambda: (DPOConfig, dies_after_two_steps))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path)
    monkeypatch.undo()
    capsys.readouterr()
    cut = run_pipeline(path)
    printed = capsys.readouterr().out
    assert "dpo (dpo): resuming: it was interrupted" in printed and "at step 2" in printed
    assert "step 0:" not in printed  # begin() is not run again on resume: the checkpoint's θ₀ and teacher

    resolved = yaml.safe_load((cut / "dpo" / "config.yaml").read_text())
    assert resolved["forgetting"]["retain_files"] == [str(retain)] and resolved["forgetting"]["distill"] == 1.0
    assert resolved["model"]["path"] == str(cut / "sft" / "final")
    a, b = _final(straight / "dpo"), _final(cut / "dpo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    figures = ("step", "retain_lm_loss", "distill_kl", "agem_projected", "l2sp_penalty")
    assert [[x[k] for k in figures] for x in _steps(cut / "dpo")] == [[x[k] for k in figures]
                                                                     for x in _steps(straight / "dpo")]
    assert _summary(cut / "dpo")["retain_loss_before"] == _summary(straight / "dpo")["retain_loss_before"]

    _, stages = load_pipeline(path)
    assert [action for action, _ in plan(stages, read_state(cut))] == ["skip", "skip"]
    _, changed = load_pipeline(path, ["dpo.forgetting.lm_coef=0.25"])
    (sft_action, _), (dpo_action, reason) = plan(changed, read_state(cut))
    assert sft_action == "skip" and dpo_action == "fresh" and "forgetting.lm_coef" in reason


@pytest.mark.parametrize("kind, setting, rows, message", [
    ("dpo", {"forgetting.replay_ratio": 0.2}, True, r"stage 'pref': forgetting\.replay_ratio .*forgetting\.lm_coef"),
    ("rloo", {"forgetting.distill": 1.0}, False, r"stage 'pref': forgetting\.distill needs forgetting\.retain_files"),
], ids=["dpo-replay", "rloo-distill-without-rows"])
def test_a_pipelines_forgetting_sections_are_validated_before_anything_trains(tmp_path, kind, setting, rows, message):
    from posttrain.pipeline import run_pipeline

    files = [str(_retain(tmp_path))] if rows else []
    stage = {"name": "pref", "kind": kind, "overrides": {"forgetting.retain_files": files, **setting}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [SFT_STAGE, stage]}))
    with pytest.raises(ConfigError, match=message):
        run_pipeline(path)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the command line


def test_cli_dpo_example_with_project_and_retain_files_overrides(tmp_path, capsys):
    """`posttrain dpo examples/dpo_forgetting.yaml forgetting.project=true forgetting.retain_files=[...]`:
    the list override replaces the example's file, A-GEM alone logs its figures every step."""
    retain = _retain(tmp_path)
    out = tmp_path / "run"
    code, err = _cli(capsys, "dpo", ROOT / "examples" / "dpo_forgetting.yaml", f"output_dir={out}",
                     "model.path=tiny-2l", "forgetting.project=true", f"forgetting.retain_files=[{retain}]",
                     "forgetting.lm_coef=0", "forgetting.retain_exact_match=2", "data.synthetic_size=32",
                     "train.max_steps=2", "train.batch_size=4", "train.progress_bar=false",
                     "eval.exact_match_prompts=0")
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["forgetting"]["retain_files"] == [str(retain)]
    steps = _steps(out)
    assert len(steps) == 2 and all(x["agem_projected"] in (0.0, 1.0) and x["retain_lm_loss"] > 0 for x in steps)
    assert not any("distill_kl" in x for x in steps)
    summary = _summary(out)
    assert summary["retain_exact_match_prompts"] == 2 and "retain_exact_match_after" in summary
    assert summary["retain_loss_before"] > 0 and "retain_loss_increase" in summary


def test_cli_grpo_with_unfreeze_every_alone_trains_the_top_groups_only(tmp_path, capsys):
    """tiny-2l's groups from the top: the final norm (its head is tied to the embeddings), layer 1,
    layer 0, the embeddings; every 2 steps for 3 steps: the norm, then layer 1 too. No retain rows."""
    out = tmp_path / "run"
    code, err = _cli(capsys, "grpo", ROOT / "examples" / "grpo.yaml", f"output_dir={out}", "model.path=tiny-2l",
                     "forgetting.unfreeze_every=2", *RL_FAST)
    assert code == 0, err
    moved = _moved(_preset(), _final(out))
    assert "model.norm.weight" in moved and any(n.startswith("model.layers.1.") for n in moved)
    assert not any(n.startswith(LAYER_0_OR_EMBEDDING) for n in moved), moved
    assert not (out / "rejects-retain.jsonl").exists() and "retain_loss_before" not in _summary(out)


def test_cli_rloo_alias_with_lm_coef_l2sp_and_unfreezing(tmp_path, capsys):
    """The rloo alias keeps the forgetting section; the retain LM gradient and L2-SP's pull are
    not given to the parameters gradual unfreezing holds (layer 0 and the embeddings never move)."""
    out = tmp_path / "run"
    code, err = _cli(capsys, "rloo", ROOT / "examples" / "grpo.yaml", f"output_dir={out}", "model.path=tiny-2l",
                     f"forgetting.retain_files=[{_retain(tmp_path)}]", "forgetting.lm_coef=1.0", "forgetting.l2sp=0.1",
                     "forgetting.unfreeze_every=2", *RL_FAST)
    assert code == 0, err
    summary = _summary(out)
    assert summary["advantage"] == "rloo" and summary["retain_loss_before"] > 0
    assert all("retain_lm_loss" in x and "l2sp_penalty" in x for x in _steps(out))
    moved = _moved(_preset(), _final(out))
    assert "model.norm.weight" in moved and not any(n.startswith(LAYER_0_OR_EMBEDDING) for n in moved), moved


@pytest.mark.parametrize("value_model", ["head", "separate"])
def test_cli_ppo_value_model_is_not_anchored_nor_unfrozen_by_schedule(tmp_path, capsys, begun, value_model):
    """`posttrain ppo ... ppo.value_model=V forgetting.l2sp=1 forgetting.unfreeze_every=100`: θ₀ is
    the policy's trained parameters only; gradual unfreezing holds the policy's layers and
    embeddings, but the value model (a fresh head, or a whole separate critic) trains from step 0,
    every one of its parameters moving: it has no old skill to keep, and a value function it may
    not fit would only make the advantages worse."""
    out = tmp_path / "run"
    code, err = _cli(capsys, "ppo", ROOT / "examples" / "ppo.yaml", f"output_dir={out}", "model.path=tiny-2l",
                     f"ppo.value_model={value_model}", f"forgetting.retain_files=[{_retain(tmp_path)}]",
                     "forgetting.l2sp=1.0", "forgetting.lm_coef=0.5", "forgetting.unfreeze_every=100",
                     "reward.functions=[short=tests.rewards_fixture:short]", "data.synthetic_size=32",
                     "train.batch_size=4", "train.max_steps=3", "train.lr=1e-3", "train.progress_bar=false",
                     "eval.prompts=0")
    assert code == 0, err
    control, inner = begun["control"], begun["inner"]
    names = {id(p): n for n, p in inner.named_parameters()}
    anchored = {names[id(p)] for p in control.params}
    policy = {n for n, p in inner.named_parameters() if n.startswith("model.") and p.requires_grad}
    assert anchored == policy and len(control.anchors) == len(policy)
    value = {n for n in names.values() if n.startswith(("value_head.", "critic."))}
    assert value and not value & anchored
    moved = _moved(begun["start"], dict(inner.named_parameters()))
    assert value <= moved, value - moved  # the whole value model trained
    assert moved & policy == {"model.model.norm.weight"}  # the policy: the top group only
    if value_model == "separate":
        assert any(n.startswith("critic.classifier.model.layers.0.") for n in moved)
        assert any(n.startswith("critic.classifier.model.embed_tokens") for n in moved)
    steps = _steps(out)
    assert all("retain_lm_loss" in x for x in steps) and steps[-1]["l2sp_penalty"] > 0


# --------------------------------------------------------------------------- every dpo.loss, adapters


@pytest.mark.parametrize("loss", ["kto", "orpo", "simpo", "ipo"])
def test_every_dpo_loss_takes_lm_coef_and_distill_from_a_kl_of_zero(tmp_path, loss):
    from posttrain.train.preference import run_dpo

    run_dir = run_dpo(_dpo(tmp_path, loss, dpo={"loss": loss}, **TERMS))
    steps = _steps(run_dir)
    assert len(steps) == 2 and abs(steps[0]["distill_kl"]) < 1e-6 and steps[1]["distill_kl"] > 1e-7
    assert all(x["retain_lm_loss"] > 0 for x in steps)
    summary = _summary(run_dir)
    assert summary["loss"] == loss and summary["retain_loss_before"] > 0 and "retain_loss_after" in summary


def _teacher_spy(monkeypatch) -> list[RetainTerms]:
    seen = []
    compute = RetainTerms.compute_teacher

    def spy(self, accelerator):
        compute(self, accelerator)
        seen.append(self)

    monkeypatch.setattr(RetainTerms, "compute_teacher", spy)
    return seen


def test_a_live_reference_with_lora_distils_toward_the_starting_policy(tmp_path, monkeypatch):
    """dpo.reference=live switches the adapters off for π_ref; the distillation teacher is taken
    with them on, as the run starts (B = 0: the base model). Its stored top-k log-probs are the
    base model's log-softmax at those tokens, computed here with full logits one row at a time."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model
    from posttrain.train.preference import run_dpo

    seen = _teacher_spy(monkeypatch)
    run_dir = run_dpo(_dpo(tmp_path, dpo={"reference": "live"}, adapter={"method": ["lora"]},
                           train={"lr": 3e-2}, **TERMS))
    steps = _steps(run_dir)
    assert abs(steps[0]["distill_kl"]) < 1e-6 and steps[1]["distill_kl"] > 0
    terms = seen[0]
    base = load_model(ModelConfig(path="tiny-2l")).eval()
    with torch.no_grad():
        for example, (logps, ids) in zip(terms.pool, terms.teacher):
            labels = torch.tensor(example.labels[1:])
            full = base(input_ids=torch.tensor([example.input_ids])).logits[0, :-1][labels != IGNORE_INDEX]
            full = full.float().log_softmax(-1)
            torch.testing.assert_close(logps, full.gather(1, ids.long()), rtol=0, atol=2e-5)
            torch.testing.assert_close(logps, full.topk(logps.shape[1], dim=-1).values, rtol=0, atol=2e-5)


def test_prompt_tuning_distils_toward_the_policy_with_its_virtual_tokens(tmp_path):
    """The starting policy of prompt tuning holds randomly drawn virtual tokens, so it is not the
    base model (its retain LM loss differs from a full run's at step 1); the teacher is that
    policy: the KL at step 1 is 0."""
    from posttrain.train.preference import run_dpo

    prompt = _steps(run_dpo(_dpo(tmp_path, "prompt", adapter={"method": ["prompt"]}, **TERMS)))
    full = _steps(run_dpo(_dpo(tmp_path, "full", **TERMS)))
    assert abs(prompt[0]["distill_kl"]) < 1e-6
    assert abs(prompt[0]["retain_lm_loss"] - full[0]["retain_lm_loss"]) > 1e-4  # the virtual tokens are in play


# --------------------------------------------------------------------------- resume


def _config_file(tmp_path: Path, cfg: DPOConfig) -> Path:
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("first, then", [
    ({}, {"lm_coef": 0.5}),
    ({"lm_coef": 0.5}, {}),
], ids=["switched-on", "switched-off"])
def test_cli_resuming_dpo_with_forgetting_switched_on_or_off_exits_2(tmp_path, capsys, first, then):
    from posttrain.train.preference import run_dpo

    run_dpo(_dpo(tmp_path, "run", retain=None if first else False, train={"save_every": 1}, **first))
    files = f"[{_retain(tmp_path)}]" if then else "[]"
    config = _config_file(tmp_path, _dpo(tmp_path, "run"))
    code, err = _cli(capsys, "dpo", config, "train.resume=auto", "train.max_steps=4", f"forgetting.retain_files={files}",
                     f"forgetting.lm_coef={then.get('lm_coef', 0.0)}")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and "Traceback" not in err
    assert "forgetting" in lines[-1] and "train.resume=never" in lines[-1]
    assert len(_steps(tmp_path / "run")) == 2  # nothing trained past the checkpoint


def test_a_dpo_resume_keeps_its_start_loss_and_may_change_the_stop_and_the_exact_match_count(tmp_path):
    """dpo has no checkpoint state of its own: forgetting's is the stage's whole state."""
    from posttrain.train.preference import run_dpo

    first = run_dpo(_dpo(tmp_path, "run", **TERMS))
    before = _summary(first)["retain_loss_before"]
    resumed = run_dpo(_dpo(tmp_path, "run", train={"max_steps": 3, "resume": "auto", "eval_every": 1},
                           max_retain_increase=50.0, retain_exact_match=2, **TERMS))
    summary = _summary(resumed)
    assert summary["steps"] == 3 and summary["retain_loss_before"] == before
    assert summary["retain_exact_match_prompts"] == 2 and "retain_exact_match_after" in summary
    assert [x["step"] for x in _steps(resumed)] == [1, 2, 3]


def test_a_resume_with_another_train_seed_is_refused_clearly_when_distilling(tmp_path):
    from posttrain.train.preference import run_dpo

    run_dpo(_dpo(tmp_path, "run", **TERMS))
    with pytest.raises(ConfigError):
        run_dpo(_dpo(tmp_path, "run", train={"max_steps": 4, "resume": "auto", "seed": 1}, **TERMS))


def test_the_fingerprint_holds_every_setting_at_its_value_defaults_included():
    """Deliberate: a run's fingerprint hashes every setting, defaults included, so a checkpoint
    written before a section existed (forgetting in dpo, this session) is refused rather than
    resumed under settings it never had; a default that changes later cannot pass unnoticed."""
    from posttrain.train.runs import run_fingerprint

    plain = DPOConfig.from_dict({"output_dir": "x", "model": {"path": "tiny"}})
    stated = DPOConfig.from_dict({"output_dir": "x", "model": {"path": "tiny"}, "forgetting": {"lm_coef": 0.0}})
    assert run_fingerprint(plain) == run_fingerprint(stated)  # a default written out is the same run
    changed = DPOConfig.from_dict({"output_dir": "x", "model": {"path": "tiny"}, "forgetting": {"distill_top_k": 16}})
    assert run_fingerprint(changed) != run_fingerprint(plain)


# --------------------------------------------------------------------------- retain rows the stage cannot read whole


def test_dpo_text_retain_rows_refuse_exact_match_at_the_cli_and_serve_lm_coef(tmp_path, capsys):
    from posttrain.train.preference import run_dpo

    text = _write(tmp_path / "text.jsonl", [{"text": f"the quick brown fox {i}"} for i in range(8)])
    config = _config_file(tmp_path, _dpo(tmp_path, "em", retain=text, lm_coef=0.5))
    code, err = _cli(capsys, "dpo", config, "forgetting.retain_exact_match=2")
    assert code == 2 and "Traceback" not in err
    assert "retain_exact_match" in err.strip().splitlines()[-1] and "text rows" in err
    run_dir = run_dpo(_dpo(tmp_path, "lm", retain=text, lm_coef=0.5))
    assert all(x["retain_lm_loss"] > 0 for x in _steps(run_dir)) and _summary(run_dir)["retain_loss_before"] > 0


def _long_and_short(tmp_path: Path) -> Path:
    """6 rows of ~14 tokens and 6 whose 30-letter prompt pushes the answer past 40 tokens (every
    prompt different: rows with the same prompt go to one side of the retain split together)."""
    short = [{"instruction": f"Copy: {'abcdef'[i]} b", "output": f"{'abcdef'[i]} b"} for i in range(6)]
    long = [{"instruction": "Copy: " + " ".join("abcdefghijklmnopqrstuvwxyz"[(i + j) % 26] for j in range(30)),
             "output": "z y"} for i in range(6)]
    return _write(tmp_path / "mixed.jsonl", short + long)


@pytest.mark.parametrize("overlength, word", [("truncate", "truncated"), ("drop", "dropped")])
def test_dpo_retain_rows_past_data_max_length_are_cut_and_counted(tmp_path, capsys, begun, overlength, word):
    from posttrain.train.preference import run_dpo

    run_dpo(_dpo(tmp_path, retain=_long_and_short(tmp_path), data={"max_length": 40, "overlength": overlength},
                 lm_coef=0.5))
    out = capsys.readouterr().out
    pool = next(line for line in out.splitlines() if line.startswith("retain pool:"))
    held = next(line for line in out.splitlines() if line.startswith("retain held-out:"))
    assert "longer than 40 tokens" in pool and word in pool and "longer than 40 tokens" in held
    retain = begun["control"].retain
    assert all(len(e.input_ids) <= 40 and e.num_label_tokens > 0 for e in retain.pool + retain.held_out)
    too_long = int(pool.split(":")[1].split(" of ")[0]) + int(held.split(":")[1].split(" of ")[0])
    assert too_long == 6 and len(retain.pool) + len(retain.held_out) == 6  # the long rows' answers are past 40


def _grpo(tmp_path, retain: Path, **forgetting):
    from posttrain.config.rl import GRPOConfig

    return GRPOConfig.from_dict({
        "output_dir": str(tmp_path / "grpo"), "model": {"path": "tiny-2l"},
        "data": {"synthetic_size": 64, "max_prompt_length": 24},
        "rollout": {"num_generations": 4, "max_new_tokens": 3}, "grpo": {"beta": 0.0},
        "reward": {"functions": ["short=tests.rewards_fixture:short"]},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "schedule": "constant", "progress_bar": False,
                  "resume": "never", "seed": 0},
        "eval": {"prompts": 0}, "forgetting": {"retain_files": [str(retain)]} | forgetting})


def test_rl_retain_rows_are_cut_at_the_longest_prompt_plus_the_longest_completion(tmp_path, capsys, begun):
    from posttrain.train.grpo import run_grpo

    run_grpo(_grpo(tmp_path, _long_and_short(tmp_path), lm_coef=0.5))
    out = capsys.readouterr().out
    assert "retain pool:" in out and "longer than 27 tokens: truncated" in out  # 24 + 3
    retain = begun["control"].retain
    assert all(len(e.input_ids) <= 27 for e in retain.pool + retain.held_out)
    assert len(retain.pool) + len(retain.held_out) == 6


def test_rl_retain_rows_all_past_the_budget_name_the_rl_settings(tmp_path):
    from posttrain.train.grpo import run_grpo

    long = [{"instruction": "Copy: " + " ".join("abcdefghijklmnopqrstuvwxyz"[(i + j) % 26] for j in range(30)),
             "output": "z y"} for i in range(6)]
    with pytest.raises(ConfigError) as error:
        run_grpo(_grpo(tmp_path, _write(tmp_path / "long.jsonl", long), lm_coef=0.5))
    message = str(error.value)
    assert "no retain example" in message  # the refusal itself is right
    assert "data.max_prompt_length" in message and "rollout.max_new_tokens" in message
    assert "data.max_length" not in message and "overlength" not in message
