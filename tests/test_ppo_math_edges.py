"""Adversarial review of PPO's pieces against their formulas, end to end through the stage:
the rollout's figures (KL per response, β, value / return means, explained variance, whitened
advantages) against float64 computations from plain transformers forwards; the separate
critic's values against a plain sequence-classification forward; the adaptive KL controller
(Ziegler et al. 2019) in its unclipped range and across rollouts of a real run; minibatching
and PPO epochs (every completion used `ppo.epochs` times per rollout, rollout-time log-probs
fixed, ratio 1 at each rollout's first update); the per-step clip fraction and approximate KL
against their definitions; the no-EOS penalty and the score's token for truncated
completions; and the first update of a policy with dropout."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from posttrain.config import PPOConfig
from posttrain.data.prompts import PromptRecord

D = torch.float64
PROMPTS = [[1, 5, 9, 2], [1, 5, 9, 2], [1, 7], [1, 4, 4, 4, 3]]
COMPLETIONS = [[11, 12, 2], [13], [14, 15, 16, 17], [20, 21]]


@pytest.fixture(scope="module")
def tiny():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_tokenizer("tiny"), load_model(ModelConfig(path="tiny"))


def _records(n):
    return [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"ppo-math:{i}") for i in range(n)]


def _rollout(scores, prompts=PROMPTS, completions=COMPLETIONS):
    from posttrain.train.rollouts import Rollout, RolloutStats

    return Rollout(prompts, completions, ["a"] * len(prompts), _records(len(prompts)),
                   torch.tensor(scores, dtype=torch.float32), RolloutStats(*[0.0] * 8))


def _plain(model, prompt, completion):
    """float64 log π of each completion token and the final hidden states that predict them,
    from one unpadded transformers forward."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + completion]), output_hidden_states=True)
    at = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
    logps = out.logits[0, at].to(D).log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
    return logps, out.hidden_states[-1][0, at].to(D)


def _gae(rewards, values, gamma, lam):
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def _perturbed(model, seed, scale):
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g))
    return reference


def _ppo_stage(model, tokenizer, overrides, reference=None, value_head=None, critic=None, n=4):
    from posttrain.train.ppo import PPOLoss, PPOStage

    cfg = PPOConfig.load(None, ["eval.sample_every=0", *overrides])
    module = PPOLoss(model, cfg.ppo, value_head=value_head, critic=critic)
    stage = PPOStage(module, PROMPTS[:n], _records(n), cfg, tokenizer, score=None, run_dir=None,
                     frozen_reference=reference)
    return stage, module, cfg


# --------------------------------------------------------------------------- the rollout's figures


def _variance(xs):
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / len(xs)


def test_rollout_figures_and_whitened_advantages_against_float64_from_plain_forwards(tiny):
    """Two micro-batches (3 + 1 completions), k2 in the reward, whitening on: every figure of
    the rollout recomputed in float64 over all response tokens of the whole rollout (never
    per micro-batch), and β after the adaptive controller's update in its *unclipped* range
    (target chosen so KL/target − 1 = 0.1), with n = 4 responses."""
    from posttrain.train.ppo import ValueHead

    tokenizer, model = tiny
    model = copy.deepcopy(model)
    reference = _perturbed(model, 1, 0.03)
    torch.manual_seed(7)
    head = ValueHead(model.config.hidden_size)
    gamma, lam, beta, horizon = 0.95, 0.9, 0.2, 40.0
    scores = [1.0, -0.5, 2.0, 0.25]

    # by hand, float64
    kl_rows, values_rows, adv_rows = [], [], []
    w, b = head.linear.weight[0].detach().to(D), float(head.linear.bias.detach())
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        logp, hidden = _plain(model, p, c)
        ref, _ = _plain(reference, p, c)
        k2 = (0.5 * (ref - logp) ** 2).tolist()
        values = (hidden @ w + b).tolist()
        rewards = [-beta * x for x in k2]
        rewards[-1] += scores[i]
        kl_rows.append(k2)
        values_rows.append(values)
        adv_rows.append(_gae(rewards, values, gamma, lam))
    kl = sum(sum(r) for r in kl_rows) / 4  # per response
    flat_adv = [a for r in adv_rows for a in r]
    flat_v = [v for r in values_rows for v in r]
    flat_r = [a + v for a, v in zip(flat_adv, flat_v)]
    mean_a, std_a = sum(flat_adv) / len(flat_adv), math.sqrt(_variance(flat_adv))
    explained = 1 - _variance([r - v for r, v in zip(flat_r, flat_v)]) / _variance(flat_r)
    target = kl / 1.1  # KL / target − 1 = 0.1: inside the ±0.2 clip

    stage, _, _ = _ppo_stage(model, tokenizer, ["train.batch_size=3", "ppo.minibatches=1", f"ppo.gamma={gamma}",
                                                 f"ppo.lam={lam}", f"ppo.kl_coef={beta}", "ppo.kl_estimator=k2",
                                                 "ppo.kl_control=adaptive", f"ppo.kl_target={target}",
                                                 f"ppo.kl_horizon={horizon}"],
                             reference=reference, value_head=head)
    batches = stage._batches(_rollout(scores))
    assert [x["response_mask"].shape[0] for x in batches] == [3, 1]
    got = stage.rollout_metrics
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    assert got["kl_coef"] == beta  # the β this rollout was shaped with
    assert got["value_mean"] == pytest.approx(sum(flat_v) / len(flat_v), abs=1e-5)
    assert got["return_mean"] == pytest.approx(sum(flat_r) / len(flat_r), abs=1e-5)
    assert got["explained_variance"] == pytest.approx(explained, abs=1e-4)
    assert stage.kl_coef == pytest.approx(beta * (1 + 0.1) ** (4 / horizon), rel=1e-5)
    rows = [(batches[0], 0), (batches[0], 1), (batches[0], 2), (batches[1], 0)]
    for (batch, r), adv, values in zip(rows, adv_rows, values_rows):
        n = len(adv)
        expected = [(a - mean_a) / std_a for a in adv]
        assert batch["advantages"][r, :n].tolist() == pytest.approx(expected, abs=1e-4)
        assert batch["returns"][r, :n].tolist() == pytest.approx([a + v for a, v in zip(adv, values)], abs=1e-4)
        assert batch["old_values"][r, :n].tolist() == pytest.approx(values, abs=1e-5)
        width = batch["advantages"].shape[1]
        assert batch["advantages"][r, n:].tolist() == [0.0] * (width - n)  # padding stays 0 after whitening


def test_adaptive_controller_lower_clip_and_fixed_mode(tiny):
    """KL far under the target (policy = reference: KL 0 exactly): the −20% clip, β·(1 − 0.2)^(n/H);
    fixed control never moves β whatever the KL."""
    from posttrain.train.ppo import ValueHead

    tokenizer, model = tiny
    model = copy.deepcopy(model)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    adaptive, _, _ = _ppo_stage(model, tokenizer, ["train.batch_size=4", "ppo.kl_coef=0.3", "ppo.kl_control=adaptive",
                                                    "ppo.kl_target=5", "ppo.kl_horizon=10"],
                                reference=reference, value_head=ValueHead(model.config.hidden_size))
    adaptive._batches(_rollout([0.0] * 4))
    assert adaptive.rollout_metrics["kl"] == 0.0
    assert adaptive.kl_coef == pytest.approx(0.3 * (1 - 0.2) ** (4 / 10), rel=1e-12)
    fixed, _, _ = _ppo_stage(model, tokenizer, ["train.batch_size=4", "ppo.kl_coef=0.3", "ppo.kl_target=1e-9"],
                             reference=_perturbed(model, 2, 0.05), value_head=ValueHead(model.config.hidden_size))
    fixed._batches(_rollout([0.0] * 4))
    assert fixed.rollout_metrics["kl"] > 0 and fixed.kl_coef == 0.3


# --------------------------------------------------------------------------- the separate critic


def test_separate_critic_values_and_gae_against_a_plain_classification_forward(tiny):
    """ppo.value_model=separate as a run builds it (padding-free rows): V(s_t) is the critic's
    score head on the hidden state before completion token t, as a plain, unpadded
    AutoModelForSequenceClassification forward gives it; GAE over them as for the head."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.presets import preset_path
    from posttrain.train.ppo import build_value_model

    tokenizer, model = tiny
    model = copy.deepcopy(model)
    gamma, lam = 0.9, 0.8
    overrides = ["model.path=tiny", "train.batch_size=4", "ppo.value_model=separate", "ppo.kl_coef=0",
                 "ppo.whiten_advantages=false", f"ppo.gamma={gamma}", f"ppo.lam={lam}"]
    cfg = PPOConfig.load(None, overrides)
    torch.manual_seed(8)
    _, critic = build_value_model(cfg, model, tokenizer, lambda *_: None)
    plain = AutoModelForSequenceClassification.from_pretrained(preset_path("tiny"), num_labels=1).eval()
    plain.load_state_dict(critic.classifier.state_dict())
    stage, _, _ = _ppo_stage(model, tokenizer, overrides, critic=critic)
    scores = [0.5, 1.0, -1.0, 2.0]
    (batch,) = stage._batches(_rollout(scores))
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        with torch.no_grad():
            hidden = plain.model(input_ids=torch.tensor([p + c])).last_hidden_state[0, len(p) - 1 : len(p) + len(c) - 1]
            values = (hidden.to(D) @ plain.score.weight[0].to(D)).tolist()  # the score head has no bias
        assert batch["old_values"][i, : len(c)].tolist() == pytest.approx(values, abs=1e-5)
        rewards = [0.0] * (len(c) - 1) + [scores[i]]
        assert batch["advantages"][i, : len(c)].tolist() == pytest.approx(_gae(rewards, values, gamma, lam), abs=1e-5)


# --------------------------------------------------------------------------- rewards of truncated completions


class _FixedEngine:
    is_policy = True

    def __init__(self, outs):
        self.outs = outs

    def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
        return [list(o) for o in self.outs]

    def sync(self, model):
        pass


def test_no_eos_penalty_and_score_on_the_last_token_of_ended_and_truncated_completions(tiny):
    """Through the stage's own sampling: a completion ending with EOS keeps the EOS as its last
    token (the score lands there, the EOS's KL counts); one cut by max_new_tokens gets the score
    minus reward.no_eos_penalty on its last generated token; advantages = GAE with V = 0 after."""
    from posttrain.train.ppo import PPOLoss, PPOStage, ValueHead

    tokenizer, model = tiny
    model = copy.deepcopy(model)
    eos = tokenizer.eos_token_id
    outs = [[40, 41, eos], [42, 43, 44, 45]]  # ended at its 3rd token; cut at max_new_tokens = 4
    prompts = PROMPTS[2:4]
    reference = _perturbed(model, 3, 0.03)
    cfg = PPOConfig.load(None, ["train.batch_size=2", "eval.sample_every=0", "rollout.max_new_tokens=4",
                                "reward.no_eos_penalty=0.75", "ppo.kl_coef=0.5", "ppo.whiten_advantages=false",
                                "ppo.gamma=1.0", "ppo.lam=1.0"])
    torch.manual_seed(9)
    head = ValueHead(model.config.hidden_size)
    module = PPOLoss(model, cfg.ppo, value_head=head)
    raw = [1.0, 2.0]
    stage = PPOStage(module, prompts, _records(2), cfg, tokenizer, score=lambda p, t, rows: list(raw), run_dir=None,
                     frozen_reference=reference, engine=_FixedEngine(outs))
    (batch,) = stage._batches(stage._sample([0, 1], 0, 0))
    w, b = head.linear.weight[0].detach().to(D), float(head.linear.bias.detach())
    for i, (p, c) in enumerate(zip(prompts, outs)):
        logp, hidden = _plain(model, p, c)
        ref, _ = _plain(reference, p, c)
        values = (hidden @ w + b).tolist()
        rewards = [-0.5 * x for x in (logp - ref).tolist()]
        rewards[-1] += raw[i] - (0.75 if i == 1 else 0.0)
        # γ = λ = 1: A_t = Σ_{s ≥ t} r_s − V_t
        expected = [sum(rewards[t:]) - values[t] for t in range(len(c))]
        assert int(batch["response_mask"][i].sum()) == len(c)
        assert batch["advantages"][i, : len(c)].tolist() == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- a run: epochs, minibatches, metrics


def test_a_run_uses_each_completion_epochs_times_with_fixed_old_logps_and_logs_figures_by_definition(
        tmp_path, monkeypatch):
    """batch_size 2 × grad_accum 2 × minibatches 2 = 8 completions per rollout, 2 PPO epochs:
    4 updates of 2 micro-batches each. Recorded from inside the run's forwards:
    - each PPO epoch's 4 micro-batch forwards hold the rollout's 8 completions, each once: the
      first epoch's are the rollout's micro-batches, the second's regrouped;
    - a rollout is built (rollout-time log-probs and values computed) once, and the stored
      old_logps / advantages are the same numbers at every use, each row's with it;
    - at each rollout's first update the log-probs equal old_logps bitwise (ratio 1);
    - each step's logged clip_fraction / approx_kl are the token fractions / means of their
      definitions over that step's tokens (float64 from the recorded log-probs);
    - rollout/value_mean, return_mean, explained_variance from the rollout's tensors;
    - β of each rollout = Ziegler's update of the previous one with n = 8 responses."""
    from posttrain.train.ppo import PPOLoss, PPOStage, run_ppo

    built, forwards = [], []
    original_batches, original_forward = PPOStage._batches, PPOLoss.forward

    def batches(self, rollout):
        out = original_batches(self, rollout)
        built.append([{k: v.clone() for k, v in b.items()} for b in out])
        return out

    def forward(self, advantages, returns, old_logps, old_values, **batch):
        seen = {}
        evaluate = self.evaluate

        def recording(b):
            out = evaluate(b)
            seen["logps"] = out["logps"].detach().clone()
            return out

        self.evaluate = recording
        try:
            result = original_forward(self, advantages, returns, old_logps, old_values, **batch)
        finally:
            del self.evaluate
        forwards.append({"input_ids": batch["input_ids"].clone(), "attention_mask": batch["attention_mask"].clone(),
                         "response_mask": batch["response_mask"].clone(), "old_logps": old_logps.clone(),
                         "advantages": advantages.clone(), "mask": batch["response_mask"].clone(),
                         "logps": seen["logps"]})
        return result

    monkeypatch.setattr(PPOStage, "_batches", batches)
    monkeypatch.setattr(PPOLoss, "forward", forward)
    target, horizon = 0.02, 30.0
    cfg = PPOConfig.load(None, [f"output_dir={tmp_path / 'run'}", "data.synthetic_size=60", "rollout.max_new_tokens=3",
                                "train.batch_size=2", "train.grad_accum=2", "ppo.minibatches=2", "ppo.epochs=2",
                                "train.lr=1e-2", "train.schedule=constant", "train.progress_bar=false",
                                "eval.prompts=0", "train.max_steps=8", "train.save_every=0",
                                "ppo.kl_coef=0.3", "ppo.kl_control=adaptive", f"ppo.kl_target={target}",
                                f"ppo.kl_horizon={horizon}", "ppo.clip_eps=0.1",
                                "reward.functions=[short=tests.rewards_fixture:short]"])
    run = run_ppo(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["ppo_update"] for r in records] == [1, 2, 3, 4] * 2
    assert len(built) == 2 and len(forwards) == 16  # one build per rollout; 8 steps × 2 micro-batches

    def key(f, i):  # a completion's row, without its padding
        return tuple(f["input_ids"][i][f["attention_mask"][i].bool()].tolist())

    def row(b, i):  # a completion: its real tokens, and its per-token rollout-time numbers
        width = int(b["response_mask"][i].sum())
        return key(b, i), b["old_logps"][i, :width].tolist(), b["advantages"][i, :width].tolist()

    for k, rollout in enumerate(built):
        rollout_rows = sorted(key(b, i) for b in rollout for i in range(b["input_ids"].shape[0]))
        assert len(rollout_rows) == 8
        mine = forwards[8 * k : 8 * (k + 1)]
        for epoch in range(2):
            rows = sorted(key(f, i) for f in mine[4 * epoch : 4 * epoch + 4] for i in range(f["input_ids"].shape[0]))
            assert rows == rollout_rows  # every completion once per PPO epoch
        for f in mine[:4]:  # the first PPO epoch trains the rollout's own micro-batches
            assert any(torch.equal(b["input_ids"], f["input_ids"]) for b in rollout)
        assert any(not any(torch.equal(b["input_ids"], f["input_ids"]) for b in rollout) for f in mine[4:])  # regrouped


        stored = sorted(row(b, i) for b in rollout for i in range(b["input_ids"].shape[0]))
        for epoch in range(2):  # the stored rollout-time numbers, unchanged at every use, with their row
            used = sorted(row(f, i) for f in mine[4 * epoch : 4 * epoch + 4] for i in range(f["input_ids"].shape[0]))
            assert used == stored
        for f in mine[:2]:  # the first update: π = π_old exactly
            assert torch.equal(f["logps"] * f["mask"], f["old_logps"] * f["mask"])

        masks = [b["response_mask"].bool() for b in rollout]
        v = torch.cat([b["old_values"][m] for b, m in zip(rollout, masks)]).to(D)
        ret = torch.cat([b["returns"][m] for b, m in zip(rollout, masks)]).to(D)
        first = records[4 * k]
        assert first["rollout/value_mean"] == pytest.approx(float(v.mean()), abs=1e-6)
        assert first["rollout/return_mean"] == pytest.approx(float(ret.mean()), abs=1e-6)
        explained = 1 - float(((ret - v) - (ret - v).mean()).pow(2).mean() / (ret - ret.mean()).pow(2).mean())
        assert first["rollout/explained_variance"] == pytest.approx(explained, abs=1e-5)

    for s, record in enumerate(records):
        step = forwards[2 * s : 2 * s + 2]
        clipped, kl, tokens = 0.0, 0.0, 0.0
        for f in step:
            m = f["mask"].bool()
            log_ratio = (f["logps"][m] - f["old_logps"][m]).to(D)
            ratio, a = log_ratio.exp(), f["advantages"][m].to(D)
            clipped += float((ratio.clamp(0.9, 1.1) * a < ratio * a).sum())
            kl += float((ratio - 1 - log_ratio).sum())
            tokens += float(m.sum())
        assert record["clip_fraction"] == pytest.approx(clipped / tokens, abs=1e-6)
        assert record["approx_kl"] == pytest.approx(kl / tokens, rel=1e-3, abs=1e-7)
        if record["ppo_update"] == 1:
            assert record["approx_kl"] == 0.0 and record["clip_fraction"] == 0.0

    betas = [records[4 * k]["rollout/kl_coef"] for k in range(2)]
    kls = [records[4 * k]["rollout/kl"] for k in range(2)]
    expected = [0.3]
    for kl in kls:
        error = min(max(kl / target - 1, -0.2), 0.2)
        expected.append(expected[-1] * (1 + error) ** (8 / horizon))
    assert betas == pytest.approx(expected[:2], rel=1e-12)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_kl_coef"] == pytest.approx(expected[2], rel=1e-12)


# --------------------------------------------------------------------------- dropout


def test_the_first_update_sees_ratio_one_with_dropout_in_the_policy(tmp_path):
    """README: the first update of a rollout sees π = π_old; `ppo.early_stop_kl` reads approx
    KL(π_old‖π). A policy with dropout (here adapter.lora.dropout=0.5) is sampled and scored in
    eval mode and updated in train mode: RL switches dropout off, so at each rollout's first
    update approx_kl and clip_fraction are exactly 0 (they were 6e-4 at rollouts 2 and 3)."""
    from posttrain.train.ppo import run_ppo

    cfg = PPOConfig.load(None, [f"output_dir={tmp_path / 'run'}", "data.synthetic_size=60", "rollout.max_new_tokens=4",
                                "train.batch_size=2", "ppo.minibatches=1", "ppo.epochs=2", "train.lr=3e-2",
                                "train.schedule=constant", "train.progress_bar=false", "eval.prompts=0",
                                "train.max_steps=6", "train.save_every=0", "ppo.kl_coef=0",
                                "adapter.method=[lora]", "adapter.lora.dropout=0.5",
                                "reward.functions=[short=tests.rewards_fixture:short]"])
    run = run_ppo(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    firsts = [r for r in records if r["ppo_update"] == 1]
    assert len(firsts) == 3 and any(r["ppo_update"] == 2 and r["approx_kl"] != 0 for r in records)
    assert [(r["approx_kl"], r["clip_fraction"]) for r in firsts] == [(0.0, 0.0)] * 3


def test_disable_dropout_makes_train_mode_deterministic_and_keeps_the_config(tmp_path):
    """Attention dropout (a module attribute and the config's rate, which Falcon reads in forward)
    and LoRA dropout are switched off; the config a full model is saved with keeps the checkpoint's
    rate."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models.loading import disable_dropout, save_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, attention_dropout=0.3))
    model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.5, target_modules=["q_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    model.train()
    ids = torch.randint(0, 100, (2, 8))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    notes = []
    disable_dropout(model, notes.append, "test")
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits) and len(notes) == 1
    assert model.config.attention_dropout == 0.0
    save_model(model.base_model.model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_dropout"] == 0.3
    assert model.config.attention_dropout == 0.0
