"""Small user-facing fixes of stop 29: a reward model taken for a policy, several files given as one
comma-joined override, scoring an empty file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """What `posttrain rm` leaves in final/: a *ForSequenceClassification with one output."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.loading import load_tokenizer, resolve_model_path

    out = tmp_path_factory.mktemp("rm") / "final"
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("tiny"), num_labels=1)
    model.save_pretrained(out)
    load_tokenizer("tiny").save_pretrained(out)
    return out


def test_a_reward_model_is_refused_as_a_policy(reward_model_dir, tmp_path, capsys):
    from posttrain.errors import UserError
    from posttrain.models.loading import load_model

    with pytest.raises(UserError, match=r"is a reward model \(LlamaForSequenceClassification.*usually the SFT model"):
        load_model(str(reward_model_dir))
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path / 'run'}", f"model.path={reward_model_dir}", "train.max_steps=1",
                     "data.synthetic_size=8")
    assert rc != 0 and "is a reward model" in out and "Traceback" not in out
    assert not (tmp_path / "run" / "final").exists()


def test_a_causal_lm_still_loads(tmp_path):
    from posttrain.models.loading import load_model

    assert type(load_model("tiny")).__name__.endswith("ForCausalLM")


def test_several_files_joined_by_a_comma_get_the_list_syntax(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path / 'run'}", f"data.train_files={a},{b}")
    assert rc != 0
    assert f"for several files write data.train_files=[{a},{b}]" in out
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path / 'run'}", f"data.train_files={a},{tmp_path / 'nope'}")
    assert rc != 0 and "no such file or directory" in out and "several files" not in out  # a part is missing too


def test_scoring_an_empty_file_is_an_error_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from posttrain import rewards

    def no_load(*args, **kwargs):
        raise AssertionError("a reward model was loaded")

    monkeypatch.setattr(rewards, "build_combined", no_load)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    rc, out = run_cli(capsys, "score", "--model", "tiny", "--input", empty, "--output", tmp_path / "out.jsonl")
    assert rc != 0 and "no rows to score" in out and not (tmp_path / "out.jsonl").exists()


def test_solved_groups_is_not_logged_with_one_sample_a_prompt():
    """rollout/flat_groups (named solved_groups then: prompts whose samples all scored the same) read 1.0 at every PPO step
    with its default of one sample a prompt: a group of one always agrees with itself."""
    from posttrain.config import PPOConfig
    from posttrain.data.prompts import PromptRecord
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.rollouts import build_reward, sample_and_score

    tokenizer = load_tokenizer("tiny-2l")

    class Engine:  # answers each prompt with "m" and an end
        is_policy = True

        def generate(self, prompts, settings, **kwargs):
            return [tokenizer("m", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _ in prompts]

    cfg = PPOConfig.load(None, ["rollout.max_new_tokens=4", "reward.functions=[em=posttrain.rewards:exact_match]"])
    assert cfg.rollout.num_generations == 1
    records = [PromptRecord([{"role": "user", "content": "Smallest letter: q m t"}], "m", source="r:0"),
               PromptRecord([{"role": "user", "content": "Smallest letter: b t"}], "b", source="r:1")]
    rollout = sample_and_score(Engine(), tokenizer, [[1, 5], [1, 6]], records, [0, 1], cfg, build_reward(cfg), seed=0)
    assert rollout.stats.flat_groups is None
    assert rollout.stats.reward_mean == pytest.approx(0.5)


def test_the_command_exits_130_past_a_worker_thread_still_inside_torch(tmp_path):
    """Ctrl-C in a data command with a local model ended in SIGABRT ("terminate called without an
    active exception": the interpreter's exit around a daemon worker inside torch), not exit 130.
    The console entry point leaves without that teardown while a posttrain-job worker lives."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, threading, torch\n"
        "from posttrain import cli, console\n"
        "def busy():\n"
        "    x = torch.randn(256, 256)\n"
        "    while True:\n"
        "        x = torch.tanh(x @ x)\n"
        "def main():\n"
        "    threading.Thread(target=busy, name='posttrain-job-0', daemon=True).start()\n"
        "    print('interrupted', file=sys.stderr)\n"
        "    return 130\n"
        "cli.main = main\n"
        "sys.exit(console.run())\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-500:]
    assert "interrupted" in done.stderr and "terminate called" not in done.stderr


def test_quality_reads_prompt_completion_rows_as_sft_rows_and_kto_rows_as_unpaired(tmp_path):
    """sft takes TRL's prompt-completion rows now; quality routed every row with a 'completion' to
    KTO's unpaired format, where each one was malformed for want of a label."""
    from posttrain.data.quality.rows import convert, detect_any_format

    rows = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "name a colour"}],
             "completion": [{"role": "assistant", "content": "red"}]},
            {"prompt": "Say yes", "completion": "yes"}]
    assert detect_any_format(rows) == "prompt_completion"
    first = convert(rows[0], "prompt_completion", "f.jsonl:1")
    assert first.response == "red"  # the prompt's assistant turn is context, not a trained response
    assert first.prompt == "hi\nname a colour" and first.instruction == "hi"
    assert detect_any_format([{"prompt": "Say yes", "completion": "yes", "label": True}]) == "unpaired"


STOP_ARGS = ["sft", "examples/sft_full.yaml", "train.max_steps=8", "train.save_every=0", "train.progress_bar=false",
             "data.synthetic_size=64", "train.batch_size=8", "eval.exact_match_prompts=0", "train.eval_every=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from posttrain import cli

    out = tmp_path_factory.mktemp("whole")
    assert cli.main([*STOP_ARGS, f"output_dir={out}"]) == 0
    return out


@pytest.mark.parametrize("signame, code, said", [("SIGINT", 130, "interrupt"), ("SIGTERM", 143, "SIGTERM")])
def test_a_signal_during_training_saves_a_checkpoint_there_and_the_rerun_continues_bit_for_bit(
        uninterrupted, tmp_path, monkeypatch, capsys, signame, code, said):
    """One signal at step 3 of 8 (train.save_every=0: no checkpoint would exist before the end):
    the step finishes, a checkpoint is written at it, the command exits 128 + the signal's number;
    the same command resumes there, and the final weights equal an uninterrupted run's. Ctrl-C
    (SIGINT) since stop 28; SIGTERM — `kill`, `docker stop`, Kubernetes, SLURM's scancel and
    preemption — ended the run at once before (Python's default), losing every step."""
    import os
    import signal

    import torch
    from safetensors.torch import load_file

    from posttrain import cli
    from posttrain.train.metrics import RunLogger

    signum = getattr(signal, signame)
    monkeypatch.chdir(ROOT)
    advance = RunLogger.advance

    def signal_at_step_3(self, record):
        advance(self, record)
        if record["step"] == 3:
            os.kill(os.getpid(), signum)  # the handler runs at once: mid-step from the loop's view

    monkeypatch.setattr(RunLogger, "advance", signal_at_step_3)
    handler = signal.getsignal(signum)
    capsys.readouterr()
    assert cli.main([*STOP_ARGS, f"output_dir={tmp_path / 'cut'}"]) == code
    err, out = capsys.readouterr()[::-1]
    assert f"{said}: finishing this step to save a checkpoint" in err
    assert "the same command resumes from the run's newest checkpoint" in err
    assert "interrupted: checkpoint saved at step 3 of 8; the same command resumes from it" in out
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000003"]
    assert signal.getsignal(signum) is handler  # put back
    monkeypatch.setattr(RunLogger, "advance", advance)
    assert cli.main([*STOP_ARGS, f"output_dir={tmp_path / 'cut'}"]) == 0
    assert "at step 3" in capsys.readouterr().out
    whole, cut = (load_file(str(run / "final" / "model.safetensors")) for run in (uninterrupted, tmp_path / "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_generate_takes_the_rl_prompt_rows_with_turns(tmp_path, capsys):
    """`posttrain generate --prompts examples/data/prompts.jsonl` (the repo's own RL prompts) failed at
    line 4: a 'prompt' given as turns (system + user) was "must be non-empty text"."""
    from posttrain import inference

    rows = [row for _, row in inference._json_prompts(str(ROOT / "examples" / "data" / "prompts.jsonl"))]
    assert isinstance(rows[3]["prompt"], list)
    tok = type("Tok", (), {"apply_chat_template": lambda self, m, **kw: "|".join(t["content"] for t in m)})()
    assert inference.render(rows[3], tok, "t") == "Answer with one letter.|Smallest letter: h c v"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl:1: 'prompt' turn 1 \(user\) has no 'content'"):  # training's reader
        inference._json_prompts(str(bad))
