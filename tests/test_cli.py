"""The CLI end to end: every example YAML, errors for people, generate/chat/env,
kill -9 and resume (bitwise), and two processes versus one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DATA_COMMANDS = {"rlaif", "constitutional", "self_instruct", "quality", "redteam", "evaluate"}  # own tests (a model server; no training)
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml")
                  if not p.name.startswith("pipeline_") and p.stem not in DATA_COMMANDS)  # pipelines: test_pipeline


def posttrain(*args, check=True, **kwargs):
    result = subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_runs(example, tmp_path):
    stage = example.stem.split("_")[0]  # sft_*, rm_*, dpo_*, kto, grpo_*, ppo
    rl = ["eval.prompts=4", "train.batch_size=16"]
    extra = {"rm": [], "grpo": rl, "ppo": rl}.get(stage, ["eval.exact_match_prompts=4"])
    posttrain(stage, example, f"output_dir={tmp_path}", "train.max_steps=2", "train.epochs=1",
              "train.progress_bar=false", "data.synthetic_size=64", *extra)
    assert (tmp_path / "final").is_dir() and (tmp_path / "metrics.jsonl").is_file()


def test_kto_alias_sets_the_loss_and_score_adds_columns(tmp_path):
    posttrain("orpo", "examples/dpo.yaml", f"output_dir={tmp_path / 'orpo'}", "train.max_steps=1",
              "train.progress_bar=false", "data.synthetic_size=16", "eval.exact_match_prompts=0")
    assert json.loads((tmp_path / "orpo" / "summary.json").read_text())["loss"] == "orpo"
    posttrain("rm", "examples/rm_pairs.yaml", f"output_dir={tmp_path / 'rm'}", "train.max_steps=1",
              "train.progress_bar=false")
    rows = [{"prompt": "Smallest letter: q m t", "response": "m"},
            {"prompt": [{"role": "user", "content": "Copy: a b"}], "response": "a b", "id": 7}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    posttrain("score", "--model", f"helpful={tmp_path / 'rm' / 'final'}", "--function", "short=tests.rewards_fixture:short",
              "--weight", "short=0.5", "--input", tmp_path / "rows.jsonl", "--output", tmp_path / "scored.jsonl")
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["reward_short"] for r in scored] == [-1.0, -3.0] and scored[1]["id"] == 7
    for r in scored:
        assert r["reward"] == pytest.approx(r["reward_helpful"] + 0.5 * r["reward_short"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    result = posttrain("score", "--model", tmp_path / "rm" / "final", "--input", bad, check=False)
    assert result.returncode == 2 and f"{bad}:2:" in result.stderr


def test_unknown_key_exits_2_with_one_line(tmp_path):
    result = posttrain("sft", ROOT / "examples" / "sft_full.yaml", "train.learning_rate=1", check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "did you mean train.lr?" in result.stderr
    assert "Traceback" not in result.stderr


def test_yaml_typo_names_the_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  path: tiny\ntrain:\n  bach_size: 4\n")
    result = posttrain("sft", config, check=False)
    assert result.returncode == 2 and str(config) in result.stderr and "train.batch_size" in result.stderr


def test_help_lists_fields_with_descriptions():
    out = posttrain("sft", "--help").stdout
    assert "train.lr (float, default 2e-05): peak learning rate" in out
    assert "data.packing" in out and "adapter.lora.r" in out and "adapter.method" in out


def test_env():
    out = posttrain("env").stdout
    assert "torch" in out and "transformers" in out and "threads" in out


def test_generate_and_chat(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Copy: a b c\nSmallest letter: q m t\n")
    out = tmp_path / "out.jsonl"
    posttrain("generate", "--model", "tiny", "--prompts", prompts, "--output", out, "--max-new-tokens", 5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Copy: a b c", "Smallest letter: q m t"]
    assert all(isinstance(r["completion"], str) for r in rows)
    result = posttrain("chat", "--model", "tiny", "--max-new-tokens", 4, input="hello\nhow are you\n/exit\n")
    assert result.returncode == 0


def _saved_adapter(directory: Path, method: str, seed: int) -> Path:
    """A tiny-2l adapter with nudged weights (fresh adapters equal the base)."""
    import torch

    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    model = apply_adapters(load_model("tiny-2l"), AdapterConfig(method=[method]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_model(model, load_tokenizer("tiny-2l"), directory)


def test_adapters_by_name_per_request_mix_and_merge(tmp_path):
    a, b = _saved_adapter(tmp_path / "a", "lora", 1), _saved_adapter(tmp_path / "b", "lora", 2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Copy: a b c"}) + "\n" + json.dumps({"prompt": "Copy: a b c", "adapter": "b"}) + "\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("Copy: a b c\n")
    out = tmp_path / "out.jsonl"

    def completions(*args, file=prompts):
        posttrain("generate", *args, "--prompts", file, "--output", out, "--max-new-tokens", 6)
        return [json.loads(line)["completion"] for line in out.read_text().splitlines()]

    first, second = completions("--model", "tiny-2l", "--adapter", f"a={a}", "--adapter", f"b={b}")
    only_a = completions("--model", a, file=plain)[0]
    only_b = completions("--model", b, file=plain)[0]
    assert only_a != only_b  # the two adapters really differ
    assert (first, second) == (only_a, only_b)  # row 2 asked for adapter b
    mixed = completions("--model", "tiny-2l", "--adapter", f"a={a}", "--adapter", f"b={b}", "--mix", "a=0.5",
                        "--mix", "b=0.5")
    assert len(mixed) == 2
    result = posttrain("chat", "--model", "tiny-2l", "--adapter", f"a={a}", "--adapter", f"b={b}",
                       "--max-new-tokens", 3, input="hi\n/adapter b\nhi\n/adapter zzz\n/exit\n")
    assert "[adapter b]" in result.stdout and "no adapter named 'zzz'" in result.stdout

    posttrain("merge", a, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert completions("--model", tmp_path / "merged", file=plain)[0] == only_a
    bottleneck = _saved_adapter(tmp_path / "bn", "bottleneck", 3)
    refused = posttrain("merge", bottleneck, tmp_path / "nope", check=False)
    assert refused.returncode == 2 and "bottleneck adapters cannot be merged" in refused.stderr
    assert "Traceback" not in refused.stderr


def _sft_args(run_dir, *extra):
    return ["sft", f"output_dir={run_dir}", "model.path=tiny", "data.synthetic_size=400", "data.max_length=64",
            "data.eval_fraction=0", "train.max_steps=14", "train.batch_size=8", "train.lr=2e-3",
            "train.save_every=2", "train.keep_last=2", "train.progress_bar=false", *extra]


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(l).get("step", 0) for l in path.read_text().splitlines() if l.strip()), default=0)


@pytest.mark.slow
def test_kill_9_and_resume_is_bitwise_equal(tmp_path):
    """A run SIGKILLed twice at random steps and resumed ends with the same weights, bit for bit."""
    posttrain(*_sft_args(tmp_path / "straight"))
    seed = int(os.environ.get("POSTTRAIN_KILL_SEED", time.time()))
    print(f"kill points drawn with POSTTRAIN_KILL_SEED={seed}")  # shown by pytest on failure
    rng = random.Random(seed)
    cut = tmp_path / "cut"
    for kill_after in sorted(rng.sample(range(2, 13), 2)):
        proc = subprocess.Popen([sys.executable, "-m", "posttrain", *_sft_args(cut)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while _steps_logged(cut) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    posttrain(*_sft_args(cut))
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    steps = [json.loads(l)["step"] for l in (cut / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, 15))


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [[], ["adapter.method=[lora, prefix]", "adapter.schedule=[0:prefix, 2:all]"],
                                     ["data.eval_fraction=0.05", "train.eval_every=2"]],
                         ids=["full", "staged-adapters", "one-eval-batch"])
def test_two_processes_match_one(adapter, tmp_path):
    """Two CPU processes (gloo) give the same losses as 1 process at the same global batch,
    with full fine-tuning and with a staged adapter mix (gradients dropped after DDP's sum);
    and held-out figures from an eval set smaller than one batch per process (one process
    has nothing to evaluate: it used to wait forever in DDP's forward).

    Launched with torchrun: `accelerate launch --cpu --num_processes 2` starts ONE process
    unless given an MPI hostfile (accelerate 1.x), so it cannot be what this test uses.
    """
    common = ["data.synthetic_size=64", "train.max_steps=4", "train.batch_size=4", "train.save_every=0", *adapter]
    one = tmp_path / "one"
    posttrain(*_sft_args(one, *common, "train.grad_accum=2"))
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "posttrain", *_sft_args(two, *common, "train.grad_accum=1")]
    result = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert loss(two) == pytest.approx(loss(one), rel=1e-4)
    evals = lambda d: [json.loads(l)["eval_loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert evals(two) == pytest.approx(evals(one), rel=1e-4)
    assert len(evals(one)) == (2 if "train.eval_every=2" in adapter else 0)  # steps 2 and 4
    assert json.loads((two / "metrics.jsonl").read_text().splitlines()[0])["world_size"] == 2


def test_rloo_alias_sets_the_advantage(tmp_path):
    posttrain("rloo", "examples/grpo.yaml", f"output_dir={tmp_path}", "train.max_steps=1", "train.batch_size=16",
              "train.progress_bar=false", "data.synthetic_size=64", "eval.prompts=0")
    assert json.loads((tmp_path / "summary.json").read_text())["advantage"] == "rloo"


@pytest.mark.parametrize("launch_config", sorted((ROOT / "examples" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_accelerate_configs_load_and_leave_precision_to_posttrain(launch_config):
    """What `accelerate launch --config_file` reads (DDP across GPUs / machines); the GPU runs
    themselves are not exercised here. Precision must come from train.mixed_precision."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(launch_config))
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "no"
    assert config.num_processes % config.num_machines == 0
