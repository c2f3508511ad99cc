"""PPO: the value model's and the policy's per-token outputs against direct computations,
the loss against its formula written out, the rollout's shaped rewards / GAE / whitening
against a hand computation, the adaptive KL controller, early stopping, config checks,
bitwise resume part-way through a rollout, and the outcome on a verifiable task."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from posttrain.config import PPOConfig, PPOLossConfig
from posttrain.errors import ConfigError
from posttrain.losses import policy_gradient as pg
from posttrain.train.ppo import PPOLoss, ValueHead
from posttrain.train.rollouts import collate_completions

PROMPTS = [[1, 5, 9, 2], [1, 7], [1, 4, 4, 4, 3]]
COMPLETIONS = [[11, 12, 2], [13], [14, 15, 16, 17]]


@pytest.fixture(scope="module")
def tiny():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_tokenizer("tiny"), load_model(ModelConfig(path="tiny"))


def _direct(model, head):
    """Per completion: log-probs, entropies and values from one unpadded forward each."""
    rows = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        out = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
        at = slice(len(p) - 1, len(p) + len(c) - 1)  # positions that predict the completion tokens
        log_probs = out.logits[0, at].float().log_softmax(-1)
        rows.append((log_probs.gather(1, torch.tensor(c)[:, None])[:, 0], -(log_probs.exp() * log_probs).sum(-1),
                     head(out.hidden_states[-1][0, at]).squeeze(-1)))
    return rows


def test_one_forward_gives_log_probs_entropies_and_values_of_every_completion_token(tiny):
    _, model = tiny
    torch.manual_seed(1)
    head = ValueHead(model.config.hidden_size)
    module = PPOLoss(model, PPOLossConfig(), value_head=head)
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        out = module.evaluate(batch)
        direct = _direct(model, head)
    for b, (logps, entropy, values) in enumerate(direct):
        n = len(COMPLETIONS[b])
        assert torch.allclose(out["logps"][b, :n], logps, atol=1e-5)
        assert torch.allclose(out["entropy"][b, :n], entropy, atol=1e-4)
        assert torch.allclose(out["values"][b, :n], values, atol=1e-5)
        assert bool((out["logps"][b, n:] == 0).all() and (out["values"][b, n:] == 0).all())


def test_the_value_head_runs_in_float32_under_bf16_autocast():
    """Values are the float32 dot product of the (bf16) hidden state with the head; a bf16 matmul
    (autocast's choice for a Linear) kept ~3 significant digits of them."""
    torch.manual_seed(3)
    head = ValueHead(64)
    torch.nn.init.normal_(head.linear.weight)
    hidden = torch.randn(5, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden)
    expected = hidden.double() @ head.linear.weight.double().T + head.linear.bias.double()
    assert values.dtype == torch.float32
    assert torch.allclose(values.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_the_loss_is_the_clipped_surrogate_plus_value_loss_minus_entropy_bonus(tiny, aggregation):
    """Against the PPO formulas written out element by element, value and gradient."""
    _, model = tiny
    torch.manual_seed(2)
    head = ValueHead(model.config.hidden_size)
    cfg = PPOLossConfig(clip_eps=0.1, value_clip=0.05, vf_coef=0.5, entropy_coef=0.01, aggregation=aggregation)
    module = PPOLoss(model, cfg, value_head=head)
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=0)
    mask = batch["response_mask"]
    with torch.no_grad():
        current = module.evaluate(batch)
    old_logps = (current["logps"] + 0.2 * torch.randn_like(mask)) * mask  # ratios on both sides of the clip
    old_values = (current["values"] + 0.1 * torch.randn_like(mask)) * mask
    advantages, returns = torch.randn_like(mask) * mask, torch.randn_like(mask) * mask
    loss, metrics = module(advantages=advantages, returns=returns, old_logps=old_logps, old_values=old_values, **batch)
    model.zero_grad()
    head.zero_grad()
    loss.backward()
    ours = [p.grad.clone() for p in list(model.parameters()) + list(head.parameters())]

    model.zero_grad()
    head.zero_grad()
    total = 0.0
    for b, (logps, entropy, values) in enumerate(_direct(model, head)):
        terms = []
        for t in range(len(COMPLETIONS[b])):
            ratio = torch.exp(logps[t] - old_logps[b, t])
            a, r, v_old = advantages[b, t], returns[b, t], old_values[b, t]
            policy = -torch.min(ratio * a, torch.clamp(ratio, 1 - 0.1, 1 + 0.1) * a)
            v_clipped = v_old + torch.clamp(values[t] - v_old, -0.05, 0.05)
            value = 0.5 * torch.max((values[t] - r) ** 2, (v_clipped - r) ** 2)
            terms.append(policy + 0.5 * value - 0.01 * entropy[t])
        total = total + (sum(terms) if aggregation == "token" else sum(terms) / len(terms))
    assert float(loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5, abs=1e-6)
    total.backward()
    for mine, direct in zip(ours, (p.grad for p in list(model.parameters()) + list(head.parameters()))):
        assert torch.allclose(mine, direct, atol=1e-5)
    assert 0 < float(metrics["clip_fraction"]) and float(metrics["entropy"]) > 0


def _stage(tiny, tmp_path, **ppo):
    from posttrain.data.prompts import PromptRecord
    from posttrain.train.ppo import PPOStage

    tokenizer, model = tiny
    model = copy.deepcopy(model)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad():  # a reference that differs, so the KL penalty is not zero
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))
    torch.manual_seed(3)
    cfg = PPOConfig.load(None, ["train.batch_size=2", "eval.sample_every=0",
                                *[f"ppo.{key}={value}" for key, value in ppo.items()]])
    module = PPOLoss(model, cfg.ppo, value_head=ValueHead(model.config.hidden_size))
    records = [PromptRecord([{"role": "user", "content": "x"}], "y", source="test:1")] * 3
    stage = PPOStage(module, PROMPTS, records, cfg, tokenizer, score=None, run_dir=None, frozen_reference=reference)
    return stage, model, reference, module


def test_rollout_advantages_are_whitened_gae_over_kl_shaped_rewards(tiny, tmp_path):
    from posttrain.train.rollouts import Rollout, RolloutStats

    gamma, lam, beta = 0.9, 0.8, 0.3
    stage, model, reference, module = _stage(tiny, tmp_path, gamma=gamma, lam=lam, kl_coef=beta)
    scores = torch.tensor([1.0, -0.5, 2.0])
    rollout = Rollout(PROMPTS, COMPLETIONS, ["a", "b", "c"], stage.records, scores, RolloutStats(*[0.0] * 8))
    batches = stage._batches(rollout)
    assert [b["response_mask"].shape[0] for b in batches] == [2, 1]  # train.batch_size = 2

    raw = []  # by hand: per-token k1 penalty, score on the last token, GAE backwards, then whitening
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        with torch.no_grad():
            ids = torch.tensor([p + c])
            at = slice(len(p) - 1, len(p) + len(c) - 1)
            logps = model(input_ids=ids).logits[0, at].log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0]
            ref = reference(input_ids=ids).logits[0, at].log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0]
            values = module.value_head(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, at])[:, 0]
        rewards = [-beta * float(logps[t] - ref[t]) for t in range(len(c))]
        rewards[-1] += float(scores[b])
        advantage, row = 0.0, []
        for t in reversed(range(len(c))):
            next_value = float(values[t + 1]) if t + 1 < len(c) else 0.0
            advantage = rewards[t] + gamma * next_value - float(values[t]) + gamma * lam * advantage
            row.insert(0, advantage)
        raw.append(row)
    flat = torch.tensor([a for row in raw for a in row], dtype=torch.float64)
    mean, std = flat.mean(), flat.std(unbiased=False)
    got = [batches[0]["advantages"][0], batches[0]["advantages"][1], batches[1]["advantages"][0]]
    for b, row in enumerate(raw):
        expected = (torch.tensor(row, dtype=torch.float64) - mean) / std
        assert torch.allclose(got[b][: len(row)].double(), expected, atol=1e-4)
        assert bool((got[b][len(row):] == 0).all())
    # returns = un-whitened advantages + the rollout-time values
    with torch.no_grad():
        old = module.evaluate(collate_completions(PROMPTS[:2], COMPLETIONS[:2], 0))
    first = torch.tensor(raw[0]) + old["values"][0, :3]
    assert torch.allclose(batches[0]["returns"][0, :3], first, atol=1e-4)


def test_the_adaptive_kl_coefficient_moves_with_the_observed_kl(tiny, tmp_path):
    from posttrain.train.rollouts import Rollout, RolloutStats

    stage, *_ = _stage(tiny, tmp_path, kl_coef=0.2, kl_control="adaptive", kl_target=1e-6, kl_horizon=30)
    rollout = Rollout(PROMPTS, COMPLETIONS, ["a", "b", "c"], stage.records, torch.zeros(3), RolloutStats(*[0.0] * 8))
    stage._batches(rollout)
    observed = stage.rollout_metrics["kl"]
    assert stage.rollout_metrics["kl_coef"] == 0.2  # the β this rollout was shaped with
    assert stage.kl_coef == pytest.approx(pg.adaptive_kl_coef(0.2, observed, 1e-6, 30, 3))
    assert stage.kl_coef == pytest.approx(0.2 * (1 + 0.2) ** (3 / 30))  # far above target: the +20% clip
    fixed, *_ = _stage(tiny, tmp_path, kl_coef=0.2)
    fixed._batches(rollout)
    assert fixed.kl_coef == 0.2


@pytest.mark.parametrize("override, message", [
    (["ppo.epochs=0"], "ppo.epochs"),
    (["ppo.kl_control=adaptive", "ppo.kl_coef=0"], "needs ppo.kl_coef > 0"),
    (["rollout.num_generations=3"], "multiple of rollout.num_generations"),
    (["ppo.gamma=1.5"], "ppo.gamma"),
    (["rollout.engine=vllm"], "vllm"),
    (["ppo.value_clip=0"], "ppo.clip_eps and ppo.value_clip"),
])
def test_configs_are_checked_before_any_work(override, message, tmp_path):
    from posttrain.train.ppo import run_ppo

    with pytest.raises(ConfigError, match=message):
        run_ppo(PPOConfig.load(None, [f"output_dir={tmp_path}", *override]))
    assert not (tmp_path / "config.yaml").exists()


def _cfg(tmp_path, name, *extra):
    return PPOConfig.load(None, [f"output_dir={tmp_path / name}", "data.synthetic_size=120", "rollout.max_new_tokens=3",
                                 "train.batch_size=4", "ppo.minibatches=2", "ppo.epochs=2", "train.lr=1e-3",
                                 "train.progress_bar=false", "eval.prompts=0", "ppo.kl_coef=0.05", "train.schedule=constant",
                                 "reward.functions=[short=tests.rewards_fixture:short]", *extra])


def _weights(run_dir):
    from safetensors.torch import load_file

    latest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(latest / "trainable.safetensors"))


@pytest.mark.parametrize("extra", [
    pytest.param(["ppo.kl_control=adaptive", "ppo.kl_target=0.01", "ppo.kl_horizon=50"], id="head-adaptive"),
    pytest.param(["ppo.value_model=separate", "ppo.early_stop_kl=0.02"], id="critic-early-stop"),
])
def test_a_run_resumed_part_way_through_a_rollout_equals_an_uninterrupted_one_bitwise(tmp_path, extra):
    """Checkpoint at step 3: the middle of the second rollout (4 updates each). The resumed
    run must carry β, the rollout and the position in it, and end bitwise equal."""
    from posttrain.train.ppo import run_ppo

    whole = run_ppo(_cfg(tmp_path, "whole", "train.max_steps=6", "train.save_every=3", *extra))
    run_ppo(_cfg(tmp_path, "parts", "train.max_steps=3", "train.save_every=3", *extra))
    parts = run_ppo(_cfg(tmp_path, "parts", "train.max_steps=6", "train.save_every=3", *extra))
    a, b = _weights(whole), _weights(parts)
    assert any(k.startswith("value_head.") or k.startswith("critic.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (parts / "metrics.jsonl").read_text().splitlines()]
    whole_records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    keep = ("loss", "approx_kl", "value_loss", "ppo_update", "rollout/kl_coef", "rollout/reward_mean")
    assert [{k: r[k] for k in keep} for r in records] == [{k: r[k] for k in keep} for r in whole_records]
    assert (whole / "value_model.safetensors").is_file()


def test_early_stopping_on_approximate_kl_cuts_a_rollouts_updates_short(tmp_path):
    """The first update of a rollout sees π = π_old (approx KL 0); after it the policy has
    moved, so a tiny limit stops every rollout after its second update instead of its fourth."""
    from posttrain.train.ppo import run_ppo

    run = run_ppo(_cfg(tmp_path, "stop", "train.max_steps=6", "ppo.early_stop_kl=1e-9", "ppo.minibatches=1",
                       "ppo.epochs=4"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["ppo_update"] for r in records] == [1, 2, 1, 2, 1, 2]
    assert records[0]["approx_kl"] == 0.0 and all(r["approx_kl"] > 1e-9 for r in records[1::2])
    no_stop = run_ppo(_cfg(tmp_path, "no-stop", "train.max_steps=6", "ppo.minibatches=1", "ppo.epochs=4"))
    records = [json.loads(line) for line in (no_stop / "metrics.jsonl").read_text().splitlines()]
    assert [r["ppo_update"] for r in records] == [1, 2, 3, 4, 1, 2]


def test_lora_ppo_uses_the_base_as_reference_without_a_copy(tmp_path):
    from posttrain.train.ppo import run_ppo

    run = run_ppo(_cfg(tmp_path, "lora", "train.max_steps=2", "adapter.method=[lora]", "eval.prompts=4",
                       "eval.samples=2"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["held_out_before"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert summary["held_out_after"]["kl_to_reference"] is not None
    assert (run / "final" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_ppo_raises_held_out_reward_with_kl_under_the_target(tmp_path, weak_sft_model):
    """From the weak SFT model of the GRPO outcome test (33 steps on "smallest letter"), PPO
    with the exact-match reward, a value head and the adaptive KL controller raises the
    held-out reward, sampled and greedy, while the KL to the starting model stays under the
    controller's target. Measured (train.seed 0 / 1, 2026-12-01, the controller's step compounded):
    sampled 0.280 → 0.611 / 0.268 → 0.611, greedy 0.66 → 0.715 / 0.55 → 0.755, KL 0.71 / 0.61 nats
    per response (target 1.0)."""
    from posttrain.train.ppo import run_ppo

    target = 1.0
    cfg = PPOConfig.load(None, [f"output_dir={tmp_path / 'ppo'}", f"model.path={weak_sft_model}",
                                "data.synthetic_size=3000", "data.eval_fraction=0.0667", "eval.prompts=200",
                                "rollout.max_new_tokens=4", "train.batch_size=64", "train.max_steps=200",
                                "train.lr=3e-4", "ppo.epochs=2", "ppo.value_lr_ratio=10", "ppo.kl_control=adaptive",
                                "ppo.kl_coef=0.05", f"ppo.kl_target={target}", "ppo.kl_horizon=2000",
                                "train.progress_bar=false", "train.log_every=10"])
    summary = json.loads((run_ppo(cfg) / "summary.json").read_text())
    before, after = summary["held_out_before"], summary["held_out_after"]
    print(f"ppo: sampled reward {before['reward']:.3f} -> {after['reward']:.3f}, greedy {before['greedy_reward']:.3f} "
          f"-> {after['greedy_reward']:.3f}, KL {after['kl_to_reference']:.3f}, final beta {summary['final_kl_coef']:.4f}")
    assert before["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert after["reward"] >= before["reward"] + 0.10  # measured +0.331, +0.343
    assert after["greedy_reward"] >= before["greedy_reward"] + 0.04  # measured +0.055, +0.205
    assert 0 < after["kl_to_reference"] < target


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [
    ("grpo", ["rollout.num_generations=4", "grpo.beta=0.05"]),
    ("ppo", ["ppo.minibatches=2", "ppo.kl_coef=0.05", "ppo.early_stop_kl=0.5"]),
])
def test_two_processes_match_one(stage, extra, tmp_path):
    """Two CPU processes (gloo, torchrun) train like one process at the same global batch:
    each samples the same rollout (seeded per rollout) and trains on its half of every step."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    common = ["model.path=tiny", "data.synthetic_size=80", "rollout.max_new_tokens=3", "train.batch_size=4",
              "train.max_steps=4", "train.save_every=0", "train.lr=1e-3", "train.progress_bar=false", "eval.prompts=0",
              "reward.functions=[short=tests.rewards_fixture:short]", *extra]
    runs = {}
    for name, launcher, accum in (("one", [], 2), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], 1)):
        runs[name] = tmp_path / name
        command = [sys.executable, *launcher, "-m", "posttrain", stage, f"output_dir={runs[name]}", *common,
                   f"train.grad_accum={accum}"]
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    records = {n: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for n, d in runs.items()}
    assert [r["loss"] for r in records["two"]] == pytest.approx([r["loss"] for r in records["one"]], rel=1e-4, abs=1e-6)
    assert [r["rollout/reward_mean"] for r in records["two"]] == [r["rollout/reward_mean"] for r in records["one"]]
    assert records["two"][0]["world_size"] == 2


def test_rewards_are_penalised_normalised_and_clipped_per_rollout(tiny):
    """sample_and_score: −no_eos_penalty for completions that never end, then z-normalised
    over the rollout, then clipped, in that order."""
    from posttrain.data.prompts import PromptRecord
    from posttrain.rollout.engines import TransformersEngine
    from posttrain.train.rollouts import sample_and_score

    tokenizer, model = tiny
    cfg = PPOConfig.load(None, ["rollout.max_new_tokens=2", "reward.no_eos_penalty=1.0", "reward.normalize=true",
                                "reward.clip=1.0"])
    records = [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"test:{i}") for i in range(3)]
    raw = [3.0, 0.0, -1.0]
    engine = TransformersEngine(model, cfg.rollout.batch_size)
    rollout = sample_and_score(engine, tokenizer, PROMPTS, records, [0, 1, 2], cfg, lambda prompts, texts, rows: raw,
                               seed=0)
    ended = torch.tensor([bool(c) and c[-1] == tokenizer.eos_token_id for c in rollout.completions])
    penalised = torch.tensor(raw) - 1.0 * (~ended).float()
    expected = ((penalised - penalised.mean()) / (penalised.std() + 1e-6)).clamp(-1.0, 1.0)
    assert torch.allclose(rollout.rewards, expected, atol=1e-6)
    assert float(rollout.rewards.max()) == 1.0  # the largest z-score (1.12) is clipped
