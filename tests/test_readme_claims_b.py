"""Does the README tell the truth? Its second half: reward models, `posttrain score`, the DPO
family, online RL (GRPO / RLOO / PPO), AI feedback, serving, pipelines, benchmarks and the
config reference.

Each test names the README line it checks. Expectations come from outside the product: a plain
transformers forward / `generate`, the tokenizer's own chat template, statistics written out
here, the files and git history the README cites. Claims already pinned elsewhere in `tests/`
are not repeated here."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECOND_HALF = README[README.index("### Reward models and preference optimisation"):]
MODULE = "tests.test_readme_claims_b"


def _train_lines(run_dir) -> list[dict]:
    """metrics.jsonl's training lines (the eval_* lines of an evaluation left out)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --------------------------------------------------------------------------- reward functions for the RL runs


def chars(prompt, response):
    """A reward with many distinct values: the response's length in characters."""
    return float(len(response))


def mod3(prompt, response):
    """A reward with ties, so some groups are flat (every sample scored the same)."""
    return float(len(response) % 3)


# --------------------------------------------------------------------------- stale text: files, commits, figures


CITED_PATHS = sorted(set(re.findall(
    r"(?<![\w/.])((?:benchmarks|examples|tests|src/posttrain|scripts|\.ci)/[\w./-]+\w|ANCHORS\.md)", SECOND_HALF)))


@pytest.mark.parametrize("path", CITED_PATHS)
def test_every_path_the_second_half_cites_exists(path):
    """README, e.g. 'benchmarks/results/dpo_padding_free.md', 'examples/pipeline_rlhf.yaml': every
    file or folder it names is in the repository (it once cited ANCHORS.md, which is not)."""
    assert (ROOT / path).exists(), path


def test_every_commit_the_second_half_cites_is_in_the_history():
    """README: measured figures name commits ('Measured 2026-11-29 at ea07aa4', '(166e3c8)', ...)."""
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True, check=False)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("no full git history here")
    hashes = sorted(set(re.findall(r"(?<![0-9a-f])([0-9a-f]{7})(?![0-9a-f])", SECOND_HALF)))
    hashes = [h for h in hashes if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert len(hashes) >= 15
    for short in hashes:
        proc = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{short}^{{commit}}"],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, (short, proc.stderr)


FIGURES = [  # (results file, text the README quotes from it)
    ("dpo_padding_free.md", "80 (77 / 75 / 82 / 85)"),   # DPO full 80 against 80 (second run)
    ("dpo_padding_free.md", "84 (78 / 83 / 87 / 90)"),   # LoRA padded 84
    ("dpo_padding_free.md", "113 (109 / 111 / 113 / 119)"),  # a row per response: 113 against 112
    ("dpo_padding_free.md", "111 (110 / 109 / 112 / 116)"),  # reward model, a row per response: 111 / 114
    ("dpo_readout.md", "121 (135 / 116 / 114)"),           # DPO full 121 against 136
    ("dpo_readout.md", "136 (144 / 137 / 127)"),
    ("rl_padding_free.md", "507 (507 / 503 / 512)"),       # 507 against 499 ms
    ("rl_padding_free.md", "499 (473 / 515 / 477)"),
    ("rl_cpu.md", "| 338.3 | 371.6 | 0.91× |"),             # generation 0.91× (338 vs 372 CPU-ms)
    ("rl_cpu.md", "| 14.5 | 5.4 | 2.69× |"),                 # optimizer step 2.69×
    ("sft_cpu.md", "| 3.98× |"), ("sft_cpu.md", "5,339"), ("sft_cpu.md", "1,818"),
    ("dpo_gpu.md", "| 12,769 | 184 | 1.72 | 327 | 10,559 |"),   # DPO full: 184 vs 921 ms, 10.3 vs 25.5 GiB
    ("dpo_gpu.md", "| 20,374 | 921 | 6.35 | 1,450 | 26,111 |"),
    ("dpo_gpu.md", "| 12,769 | 197 | 1.47 | 320 | 14,301 |"),    # the stock layers: 14.0 GiB
    ("dpo_gpu_gc.md", "| 12,769 | 196 | — | 196 | 3,691 |"),      # reward model, gc: 3.6 GiB
    ("dpo_gpu_gc.md", "| 12,769 | 236 | 1.55 | 365 | 4,197 |"),    # DPO full, gc: 4.1 GiB at 236 ms
    ("dpo_cpu32k.md", "| fused | default | 0.39×"),
    ("dpo_cpu32k.md", "| default | gc_off | 0.53×"),
    ("dpo_cpu32k.md", "| fused | gc_off | 0.51×"),  # the fused-AdamW reward model vs TRL without checkpointing
    ("reward_hacking.md", "umbumbumbb"), ("reward_hacking.md", "32.9"),
    ("peft_cpu.md", "922,752"), ("peft_cpu.md", "81.5%"),
]


@pytest.mark.parametrize("name, text", FIGURES)
def test_a_measured_figure_is_in_the_results_file_the_readme_cites(name, text):
    """README *Benchmark* and the padding-free / readout paragraphs: each figure is read off the
    results file named beside it (not re-measured here)."""
    assert text in (ROOT / "benchmarks" / "results" / name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- config reference


def _reference_default(key: str) -> str:
    """The default column of `key` in the 'Config reference (grpo, rloo and ppo ...)' table."""
    section = README[README.index("## Config reference (grpo, rloo and ppo"):]
    section = section[: section.index("\n## ", 5)]
    row = next(line for line in section.splitlines() if line.startswith(f"| `{key}` |"))
    return row.split("|")[3].strip().strip("`")


def test_ppo_samples_one_completion_per_prompt_by_default():
    """README (Online RL: PPO): '`rollout.num_generations` per prompt, 1 by default: the critic is
    the baseline'."""
    from posttrain.config import GRPOConfig, PPOConfig

    assert PPOConfig().rollout.num_generations == 1
    assert _reference_default("rollout.num_generations") == "4` (ppo `1`)"
    assert GRPOConfig().rollout.num_generations == 4


def test_the_rl_config_reference_states_ppos_own_num_generations_default():
    """README: '## Config reference (grpo, rloo and ppo: the sections that differ from SFT)' lists
    `rollout.num_generations` | int | `4`. A PPO user reading it is told 4."""
    from posttrain.config import PPOConfig

    section = README[README.index("## Config reference (grpo, rloo and ppo"):]
    row = next(line for line in section.splitlines() if line.startswith("| `rollout.num_generations` |"))
    assert str(PPOConfig().rollout.num_generations) in row.split("|")[3] or "ppo" in row.lower()


def test_nll_weight_is_refused_with_kto_as_with_orpo():
    """README config reference: '`dpo.nll_weight` ... not with orpo (it has its own) nor kto'."""
    from posttrain.config import DPOConfig
    from posttrain.config.preference import validate_dpo
    from posttrain.errors import ConfigError

    for loss in ("kto", "orpo"):
        with pytest.raises(ConfigError, match="nll_weight"):
            validate_dpo(DPOConfig.load(None, [f"dpo.loss={loss}", "dpo.nll_weight=0.5"]))
    validate_dpo(DPOConfig.load(None, ["dpo.loss=simpo", "dpo.nll_weight=0.5"]))  # RPO on a reference-free loss


def test_layer_lr_decay_and_no_weight_decay_on_norms_follow_the_reference():
    """README config reference: '`train.layer_lr_decay`: layer i of L trains at lr * decay^(L - i);
    embeddings at decay^(L+1)'; Architecture: 'AdamW groups (layer-wise LR decay, no decay on
    norms/biases)'."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model
    from posttrain.train.optim import param_groups

    model = load_model(ModelConfig(path="tiny-2l"))
    lr, decay, wd, L = 1e-3, 0.5, 0.1, model.config.num_hidden_layers
    by_name = {}
    for group in param_groups(model, lr, wd, decay):
        for name in group["names"]:
            by_name[name] = (group["lr"], group["weight_decay"])
    for name, param in model.named_parameters():
        found = re.search(r"layers\.(\d+)\.", name)
        if found:
            expected_lr = lr * decay ** (L - int(found.group(1)))
        elif "embed_tokens" in name:
            expected_lr = lr * decay ** (L + 1)
        else:  # final norm, untied head
            expected_lr = lr
        assert by_name[name][0] == pytest.approx(expected_lr, rel=1e-12), name
        is_norm_or_bias = "norm" in name or name.endswith(".bias")
        assert by_name[name][1] == (0.0 if is_norm_or_bias else wd), name


def test_serve_limits_default_to_the_readme_figures():
    """README (Serving): 'Limits (flags): body 1 MiB (413), prompt 2048 tokens and the model's
    context, max_tokens 512, 256 pending requests (then 503 with Retry-After)'; '--api-key-env VAR
    ... the key is never a command-line argument'."""
    from posttrain.cli import build_parser

    args = build_parser().parse_args(["serve", "tiny"])
    assert args.max_body_bytes == 1024 * 1024
    assert args.max_prompt_tokens == 2048 and args.max_tokens_limit == 512 and args.max_pending == 256
    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
                 if "--api-key-env" in a.option_strings)
    assert serve.metavar == "VAR"
    options = {o for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
               for o in a.option_strings}
    assert not {"--api-key", "--key", "--token"} & options


# --------------------------------------------------------------------------- GRPO runs on tiny-2l


SHORT = ["Smallest letter: b a", "Smallest letter: c d", "Smallest letter: q z", "Largest letter: a b",
         "Copy: a b", "Reverse: c d"]
LONG = ["Smallest letter: " + " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(40 + k)) for k in range(3)]
EVAL = ["Smallest letter: e f", "Copy: x y z", "Largest letter: m n"]


def _write(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "a"}) + "\n" for p in prompts))
    return path


def _prompt_length(tokenizer, text: str) -> int:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    from posttrain.config import GRPOConfig
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.grpo import run_grpo

    d = tmp_path_factory.mktemp("grpo")
    tokenizer = load_tokenizer("tiny-2l")
    short_max = max(_prompt_length(tokenizer, p) for p in SHORT)
    long_min = min(_prompt_length(tokenizer, p) for p in LONG)
    assert short_max < long_min
    limit = (short_max + long_min) // 2
    train = _write(d / "train.jsonl", [SHORT[0], LONG[0], SHORT[1], SHORT[2], LONG[1], SHORT[3], SHORT[4], LONG[2],
                                       SHORT[5]])
    cfg = GRPOConfig.load(None, [
        f"output_dir={d / 'run'}", "model.path=tiny-2l", f"data.train_files=[{train}]",
        f"data.eval_files=[{_write(d / 'eval.jsonl', EVAL)}]", f"data.max_prompt_length={limit}",
        "rollout.max_new_tokens=4", "train.batch_size=8", "rollout.num_generations=4", "train.max_steps=2",
        "train.lr=1e-2", "train.progress_bar=false", "eval.prompts=3", "eval.samples=2", "eval.sample_every=1",
        "grpo.beta=0.05", f"reward.functions=[p={MODULE}:mod3]"])
    out = run_grpo(cfg)
    return {"dir": out, "limit": limit, "tokenizer": tokenizer,
            "metrics": _train_lines(out),
            "summary": json.loads((out / "summary.json").read_text()),
            "samples": [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]}


def test_grpo_logs_every_metric_the_readme_names(grpo_run):
    """README (GRPO, 'Metrics per step'): 'the loss, clip_fraction, kl and the policy's entropy ...
    rollout/reward_mean and rollout/reward_std; rollout/flat_groups; response length and the
    fraction that ended; rollout/rollout_s and rollout/reward_s ... and rollout tokens/s'."""
    for record in grpo_run["metrics"]:
        for key in ("loss", "clip_fraction", "kl", "entropy", "rollout/reward_mean", "rollout/reward_std",
                    "rollout/flat_groups", "rollout/rollout_s", "rollout/reward_s"):
            assert key in record, key
        assert any("length" in k or "tokens_mean" in k for k in record)
        assert any("ended" in k for k in record)
        assert any(k.startswith("rollout/") and "tokens_per_s" in k for k in record)


def test_grpo_rollout_figures_equal_the_samples_they_describe(grpo_run):
    """README: '`rollout/flat_groups`: the fraction of prompts whose samples all got the same reward'; 'a few
    completions go to samples.jsonl every eval.sample_every rollouts' (here every rollout, and a
    rollout of 2 prompts x 4 is all written). The logged mean / std / flat fraction are
    recomputed from the written rewards."""
    samples, G = grpo_run["samples"], 4
    rollouts = sorted({s["rollout"] for s in samples})
    assert len(rollouts) == len(grpo_run["metrics"]) == 2
    for index, record in zip(rollouts, grpo_run["metrics"]):
        rewards = [s["reward"] for s in samples if s["rollout"] == index]
        assert len(rewards) == 8
        assert record["rollout/reward_mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-6)
        assert record["rollout/reward_std"] == pytest.approx(statistics.stdev(rewards), abs=1e-6)
        groups = [rewards[i : i + G] for i in range(0, 8, G)]
        assert record["rollout/flat_groups"] == pytest.approx(
            sum(len(set(g)) == 1 for g in groups) / len(groups))
        for s in samples:  # the reward is the configured function of the written completion
            assert s["reward"] == mod3(None, s["completion"])


def test_over_long_prompts_are_dropped_and_counted_never_cut(grpo_run):
    """README (GRPO, Prompts): 'Over-long prompts are dropped and counted, never cut';
    `data.max_prompt_length`: 'prompts longer than this many tokens are dropped (counted, never cut)'."""
    summary = grpo_run["summary"]
    assert summary["train_prompts"] == len(SHORT)
    assert summary["eval_prompts"] == len(EVAL)
    written = {s["prompt"] for s in grpo_run["samples"]}
    assert written <= set(SHORT), written - set(SHORT)  # whole prompts, and only the short ones
    tokenizer = grpo_run["tokenizer"]
    assert all(_prompt_length(tokenizer, p) <= grpo_run["limit"] for p in written)


def test_grpo_held_out_greedy_reward_equals_a_plain_transformers_greedy_decode(grpo_run):
    """README (GRPO): 'Held-out figures, before and after, in summary.json: reward sampled as in
    the rollouts, greedy reward, and the sampled KL to the reference per response.' The greedy
    figure is recomputed with `transformers` `generate` (greedy) from the preset (before) and
    from the saved final model (after); before training the policy is its reference: KL 0."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.presets import preset_path

    tokenizer = grpo_run["tokenizer"]
    summary = grpo_run["summary"]

    def greedy_reward(path) -> float:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
        eos = {tokenizer.eos_token_id} | set(
            [model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int)
            else (model.generation_config.eos_token_id or []))
        total = 0.0
        for prompt in EVAL:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=False)
            ids = torch.tensor([tokenizer(ids, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                     eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            cut = next((i for i, t in enumerate(new) if t in eos), len(new))
            total += mod3(None, tokenizer.decode(new[: cut + 1], skip_special_tokens=True))
        return total / len(EVAL)

    before, after = summary["held_out_before"], summary["held_out_after"]
    assert before["prompts"] == after["prompts"] == 3 and before["samples"] == 2
    assert before["greedy_reward"] == pytest.approx(greedy_reward(preset_path("tiny-2l")))
    assert after["greedy_reward"] == pytest.approx(greedy_reward(grpo_run["dir"] / "final"))
    assert before["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert after["kl_to_reference"] is not None


def test_grpo_with_beta_zero_keeps_no_reference(tmp_path):
    """README (GRPO): 'With β = 0 no reference exists at all'; `eval.sample_every` '(0 = never)'."""
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    out = run_grpo(GRPOConfig.load(None, [
        f"output_dir={tmp_path / 'run'}", "model.path=tiny-2l", "data.synthetic_size=40", "rollout.max_new_tokens=2",
        "train.batch_size=8", "rollout.num_generations=4", "train.max_steps=1", "train.progress_bar=false",
        "eval.prompts=2", "eval.samples=1", "eval.sample_every=0", "grpo.beta=0",
        f"reward.functions=[c={MODULE}:chars]"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_before"]["kl_to_reference"] is None
    assert not (out / "samples.jsonl").exists()


# --------------------------------------------------------------------------- PPO


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    from posttrain.config import PPOConfig
    from posttrain.train.ppo import run_ppo

    d = tmp_path_factory.mktemp("ppo")
    out = run_ppo(PPOConfig.load(None, [
        f"output_dir={d / 'run'}", "model.path=tiny-2l", "data.synthetic_size=60", "rollout.max_new_tokens=3",
        "train.batch_size=2", "train.grad_accum=2", "ppo.minibatches=2", "ppo.epochs=2", "train.max_steps=8",
        "ppo.kl_coef=0", "train.progress_bar=false", "eval.prompts=2", "eval.samples=1", "eval.sample_every=1",
        f"reward.functions=[c={MODULE}:chars]"]))
    return {"dir": out, "metrics": _train_lines(out),
            "summary": json.loads((out / "summary.json").read_text()),
            "samples": [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]}


def test_ppo_logs_every_metric_the_readme_names(ppo_run):
    """README (PPO, 'Metrics per step'): 'policy_loss, value_loss, entropy, clip_fraction, approx_kl,
    value_clip_fraction, ppo_update ... and per rollout rollout/kl (per response, to the reference;
    not logged when there is none, β = 0 with fixed control), rollout/kl_coef,
    rollout/explained_variance, rollout/value_mean, rollout/return_mean, with the reward, length and
    timing figures GRPO logs' (the timing on the step that generated the rollout only, its first
    update). This run has no reference (ppo.kl_coef=0): no rollout/kl."""
    for record in ppo_run["metrics"]:
        for key in ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl", "value_clip_fraction",
                    "ppo_update", "rollout/kl_coef", "rollout/explained_variance", "rollout/value_mean",
                    "rollout/return_mean", "rollout/reward_mean", "rollout/reward_std"):
            assert key in record, key
        timed = {"rollout/rollout_s", "rollout/reward_s"} & record.keys()
        assert timed == ({"rollout/rollout_s", "rollout/reward_s"} if record["ppo_update"] == 1 else set()), record
        assert "rollout/kl" not in record


def test_ppo_rollout_size_and_updates_per_rollout(ppo_run):
    """README (PPO): 'Sample and score train.batch_size × grad_accum × ppo.minibatches completions';
    'ppo.epochs passes over the rollout, each ppo.minibatches optimizer steps'; with β = 0 and fixed
    control 'there is none' (no reference). Here 2 × 2 × 2 = 8 completions a rollout, 2 × 2 = 4
    steps a rollout, 8 steps = 2 rollouts."""
    summary = ppo_run["summary"]
    assert summary["steps"] == 8 and summary["rollouts"] == 2
    per_rollout = {}
    for s in ppo_run["samples"]:
        per_rollout.setdefault(s["rollout"], []).append(s)
    assert len(per_rollout) == 2 and all(len(v) <= 8 for v in per_rollout.values())
    assert [r["ppo_update"] for r in ppo_run["metrics"]] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert summary["held_out_before"]["kl_to_reference"] is None
    assert all(r["rollout/kl_coef"] == 0 for r in ppo_run["metrics"])
    assert (ppo_run["dir"] / "value_model.safetensors").exists() and (ppo_run["dir"] / "final").is_dir()


# --------------------------------------------------------------------------- rewards


def test_format_regex_scores_one_exactly_when_the_whole_response_matches():
    """README (GRPO, Rewards): '`reward.format_regex`: 1 when the whole response (surrounding
    whitespace trimmed) matches the regex'. The expectation is Python's own `re.fullmatch` on the
    trimmed response (the README once said 'the whole response', while the code trimmed)."""
    from posttrain.rewards import format_reward

    cases = [(r".*\n", "answer\n"), (r"\d+", " 42 "), (r"\d+", "42"), (r"<a>.*</a>", "<a>x</a>\n"), (r"\d", "42")]
    for pattern, response in cases:
        expected = float(re.fullmatch(pattern, response.strip(), re.DOTALL) is not None)
        assert format_reward(pattern)([[]], [response]) == [expected], (pattern, response)
