"""The adapter-method x stage x operation matrix: every `adapter.method` (full, freeze, lora, dora, ia3,
prefix, prompt, bottleneck; qlora only as refused on CPU) through every training stage (sft, dpo / kto /
orpo, rm, grpo, ppo) and what a user then does with the run: train one step, continue it from its
checkpoint, the reference model (adapters switched off, a frozen copy, or the virtual tokens' starting
draw), save final/, load it for generate / chat / serve / evaluate / score, `posttrain merge`, and carry a
trained adapter into a later stage (by hand, and in a pipeline).

Walked with the tiny preset and 1-2 step runs: one step of every method in dpo, kto, orpo, grpo and ppo
(each adapter tensor moved: LoRA's B, IA3's vectors, the bottlenecks' up projections); a finished run
continued by one more step against a fresh two-step run (grpo with prompt tuning, ppo with prefix and
bottleneck, kto with prefix, dpo with DoRA, orpo with IA3, grpo with freeze tuning); the step-1 figures
(KTO's kl and every implicit reward 0, PPO's rollout/kl 0 with prefix and bottleneck adapters); qlora in
every stage on CPU; a changed lora.r / num_virtual_tokens / bottleneck.size / ia3 target on resume; a
DoRA reward model merged; every run's final/ given to the next stage's model.path, to `posttrain merge`,
`generate` (with several `--adapter`s), `score`, `reward.models` and `ppo.value_model_path`; a pipeline
chaining a prompt-tuned SFT into DPO.

What was right: every method trains in every stage it is offered in, and resumes bit for bit; the RL
reference with prompt or prefix tuning is the starting draw, not the bare base; qlora stops at config
validation with one line in every policy stage; a changed adapter setting on resume is refused naming it;
the pipeline refuses an unmergeable SFT feeding a training stage before anything runs.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 32:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posttrain as P
from posttrain.errors import UserError
from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress_bar": False}


def length(prompt, response):
    """A reward that differs between samples of one prompt (the RL runs below must move the policy)."""
    return float(len(response))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # `tests.test_walkthrough_matrix:length` is imported from the repository root


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def _sft(out: Path, method: str, steps: int = 1) -> Path:
    return _quiet(P.run_sft, P.SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"}, "adapter": {"method": method},
        "data": {"train_files": ["synthetic"], "synthetic_size": 42, "max_length": 64},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-2, **QUIET}}))


def _pref_dict(out: Path, adapter: dict, steps: int, model: str = "tiny") -> dict:
    return {"output_dir": str(out), "model": {"path": model}, "adapter": adapter,
            "data": {"train_files": ["synthetic"], "synthetic_size": 42, "max_length": 64},
            "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-2, **QUIET}}


def _rm(out: Path, adapter: dict, steps: int = 1, model: str = "tiny") -> Path:
    return _quiet(P.run_rm, P.RMConfig.from_dict(_pref_dict(out, adapter, steps, model)))


def _rl_dict(out: Path, method: str, steps: int, generations: int) -> dict:
    return {"output_dir": str(out), "model": {"path": "tiny"}, "adapter": {"method": method},
            "data": {"train_files": ["synthetic"], "synthetic_size": 32},
            "rollout": {"num_generations": generations, "max_new_tokens": 4, "temperature": 1.0},
            "reward": {"functions": ["length=tests.test_walkthrough_matrix:length"]},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, **QUIET}, "eval": {"prompts": 0}}


def _stage(stage: str, out: Path, method: str, steps: int) -> Path:
    if stage == "grpo":
        return _quiet(P.run_grpo, P.GRPOConfig.from_dict(_rl_dict(out, method, steps, 4)))
    if stage == "ppo":
        return _quiet(P.run_ppo, P.PPOConfig.from_dict(_rl_dict(out, method, steps, 1)))
    cfg = _pref_dict(out, {"method": method}, steps)
    return _quiet(P.run_dpo, P.DPOConfig.from_dict({**cfg, "dpo": {"loss": stage}}))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted((run / "final").rglob("*.safetensors")):
        out.update({f"{file.parent.name}/{k}": v for k, v in load_file(str(file)).items()})
    return out


def _loss_lines(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-step runs, trained once: SFT with lora / ia3 / prompt, a LoRA reward model."""
    root = tmp_path_factory.mktemp("matrix")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            kind, method = name.split("_")
            cache[name] = _sft(root / name, method) if kind == "sft" else _rm(root / name, {"method": method})
        return cache[name]

    return get


# --------------------------------------------------------------------------- defects


def test_a_lora_reward_model_is_refused_as_a_policy_like_a_full_one(capsys, runs, tmp_path):
    """generate / chat / serve / evaluate's policy load a model through `load_for_inference`. A full reward
    model's final/ is refused there ("is a reward model ... a policy starts from a causal LM"); a LoRA
    reward model's final/ (peft task SEQ_CLS, its score head in modules_to_save) is put on the base as a
    causal LM, its trained head dropped, and answers prompts without a word."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    out = tmp_path / "out.jsonl"
    rc, text = run_cli(capsys, "generate", "--model", runs("rm_lora"), "--prompts", prompts, "--output", out,
                       "--max-new-tokens", "3")
    assert rc == 2 and "reward model" in text, (
        f"exit {rc}; {out.name} written: {out.is_file()} ({out.read_text().strip() if out.is_file() else ''}); "
        f"output: {text.strip()[-300:]}")


def test_an_unmergeable_adapter_as_model_path_is_not_sent_to_merge(capsys, runs, tmp_path):
    """DPO (any stage) from a prompt-tuned SFT run: the one-line error says to fold the adapter into its
    base with `posttrain merge RUN OUT_DIR`; following it, merge answers that prompt adapters cannot be
    merged. The pipeline says the true thing for the same wiring ("cannot be merged into a model to start
    from; train it with lora, ia3 or full")."""
    from posttrain.models.loading import resolve_model_path

    run = runs("sft_prompt")
    with pytest.raises(UserError) as refused:
        resolve_model_path(run)
    advice = str(refused.value)
    rc, merge_says = run_cli(capsys, "merge", run, tmp_path / "merged")
    followed = f"model.path says: {advice!r}; following it, posttrain merge exits {rc}: {merge_says.strip()!r}"
    assert "posttrain merge" not in advice and "prompt" in advice, followed


def test_a_lora_and_an_ia3_adapter_on_one_base_are_one_line(capsys, runs, tmp_path):
    """README: several adapters on one base, `--adapter a=DIR --adapter b=DIR`, LoRA and IA3. peft keeps one
    adapter type per model, so a LoRA next to an IA3 cannot load together; it should be said in one
    line (exit 2), not a traceback from peft's add_adapter (exit 1, "a bug in posttrain")."""
    base = json.loads((runs("sft_lora") / "final" / "posttrain_adapters.json").read_text())["base_model_name_or_path"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    rc, text = run_cli(capsys, "generate", "--model", base, "--adapter", f"a={runs('sft_lora')}",
                       "--adapter", f"b={runs('sft_ia3')}", "--prompts", prompts, "--output", tmp_path / "o.jsonl",
                       "--max-new-tokens", "2")
    assert rc == 2 and "error:" in text, f"exit {rc}: {text.strip()[-300:]}"


def test_rm_from_a_lora_policy_final_names_model_path_not_the_ppo_critic(runs, tmp_path):
    """`posttrain rm model.path=runs/sft_lora/final` (the SFT model to start the reward model from, as
    InstructGPT does): the error is the PPO critic's ("to start a PPO critic from this policy, merge it
    ... and set ppo.value_model_path=OUT_DIR"), in a run with no PPO. Given as the run directory
    (runs/sft_lora) the same mistake gets the right answer (merge, then set model.path)."""
    with pytest.raises(UserError) as refused:
        _rm(tmp_path / "rm", {"method": "full"}, model=str(runs("sft_lora") / "final"))
    message = str(refused.value)
    assert "ppo.value_model_path" not in message and "model.path" in message, message


# --------------------------------------------------------------------------- right, and untested until now


@pytest.mark.parametrize("stage, method", [("grpo", "prompt"), ("ppo", "prefix"), ("kto", "prefix")])
def test_a_finished_run_continued_one_step_equals_a_fresh_two_step_run(stage, method, tmp_path):
    """Virtual tokens in the stages that keep a reference: the continued run rebuilds the starting draw
    (RL's StartingVirtualTokens, KTO's precomputed reference) as the first run had it; weights and the
    per-step losses equal a fresh run's bit for bit, and the tokens did move."""
    _stage(stage, tmp_path / "a", method, 1)
    first = _final_weights(tmp_path / "a")
    continued = _stage(stage, tmp_path / "a", method, 2)
    fresh = _stage(stage, tmp_path / "b", method, 2)
    a, b = _final_weights(continued), _final_weights(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _loss_lines(continued) == _loss_lines(fresh)
    assert any(not torch.equal(first[k], a[k]) for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "grpo", "rloo", "ppo"])
def test_qlora_stops_in_one_line_in_every_policy_stage_on_cpu(capsys, stage, tmp_path):
    rc, text = run_cli(capsys, stage, "adapter.method=qlora", f"output_dir={tmp_path / 'run'}", "train.max_steps=1")
    assert rc == 2 and "needs a CUDA GPU" in text and "adapter.method=lora" in text, text
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_pipeline_refuses_prompt_tuned_sft_feeding_dpo_before_any_stage(tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.pipeline import load_pipeline

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"output_dir: {tmp_path / 'out'}\nstages:\n"
        "  - {name: sft, kind: sft, overrides: {adapter.method: prompt, model.path: tiny, "
        "data.train_files: [synthetic], train.max_steps: 1}}\n"
        "  - {name: dpo, kind: dpo, overrides: {data.train_files: [synthetic], train.max_steps: 1}}\n")
    with pytest.raises(ConfigError, match=r"stage 'dpo'.*stage 'sft' trains prompt adapters.*lora, ia3 or full"):
        load_pipeline(pipeline)
    assert not (tmp_path / "out").exists()


def test_a_dora_reward_model_merges_with_its_head_to_the_same_scores(capsys, tmp_path):
    """rm with adapter.method=lora and adapter.lora.dora: the merged sequence-classification model scores
    as the adapter on its base (the LoRA case is tested; DoRA's magnitude vector goes through the same
    merge)."""
    from posttrain.models.reward_model import load_reward_model, score

    run = _rm(tmp_path / "rm", {"method": "lora", "lora": {"dora": True}}, steps=2)
    assert json.loads((run / "final" / "adapter_config.json").read_text())["use_dora"] is True
    rc, text = run_cli(capsys, "merge", run, tmp_path / "merged")
    assert rc == 0, text
    ids = torch.tensor([[5, 17, 33, 80, 200, 11, 9], [7, 8, 9, 10, 11, 12, 13]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        adapter = score(load_reward_model(run / "final").eval(), ids, mask)
        merged = score(load_reward_model(tmp_path / "merged").eval(), ids, mask)
    assert torch.allclose(adapter, merged, atol=1e-4), (adapter, merged)
