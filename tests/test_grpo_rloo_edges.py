"""Adversarial review of group-relative RL (GRPO / RLOO): the loss module with importance ratios
and every KL estimator against float64 formulas from plain transformers forwards (padded and
padding-free), group advantages of groups split across micro-batches, float equality of "equal"
rewards, the reward pipeline's order (no-EOS penalty → z-normalise → clip), β = 0 without any
reference, an accumulated step against one big step in whole runs, and resume (across an epoch
boundary with grad_accum and μ > 1; from a final checkpoint that falls inside a rollout; the
run's own rollout counters)."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch

from posttrain.config import GRPOConfig, GRPOLossConfig
from posttrain.data.prompts import PromptRecord
from posttrain.losses import policy_gradient as pg
from tests.test_rl_edges import _FakeEngine

D = torch.float64
PROMPTS = [[1, 5, 9, 2], [1, 5, 9, 2], [1, 5, 9, 2], [1, 7], [1, 7], [1, 7]]
COMPLETIONS = [[11, 12, 2], [13], [30, 31, 32, 33, 34], [14, 15, 16, 17], [20, 21], [22]]


@pytest.fixture(scope="module")
def tiny():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_tokenizer("tiny"), load_model(ModelConfig(path="tiny"))


def _records(n):
    return [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"grpo-edges:{i}") for i in range(n)]


def _plain_logps(model, prompt, completion, grad=False):
    """float64 log π of each completion token from one unpadded transformers forward."""
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].to(D)
    at = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logits[at].log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def _grid(rows, like):
    out = torch.zeros_like(like)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.to(out.dtype)
    return out


# --------------------------------------------------------------------------- the loss module


@pytest.mark.parametrize("estimator, aggregation, layout", [
    ("k1", "token", "padded"), ("k2", "sequence", "padding_free"), ("k3", "sequence", "padded"),
    ("k3", "token", "padding_free")])
def test_loss_with_ratios_and_kl_against_float64_formula(tiny, estimator, aggregation, layout):
    """μ > 1: given rollout-time log-probs (some ratios far outside 1 ± ε) and reference log-probs,
    the summed loss / weight and its gradient equal

        l_t = −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A) + β k(log π_t, log π_ref,t)

    reduced as the README defines (token: Σ l / Σ T; sequence: mean over responses of the token
    mean), from one plain forward per row, only the completion tokens counted."""
    from posttrain.models.attention import padding_free
    from posttrain.train.grpo import GroupPolicyLoss
    from posttrain.train.rollouts import collate_completions

    _, model = tiny
    model = copy.deepcopy(model)
    if layout == "padding_free":
        padding_free(model, True, lambda *_: None, 64)
    beta, eps = 0.4, 0.2
    adv = torch.tensor([1.0, -1.5, 0.5, -0.25, 2.0, -0.75])
    gen = torch.Generator().manual_seed(3)
    plain = [_plain_logps(model, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    old_rows = [lp + 0.6 * torch.randn(len(lp), generator=gen, dtype=D) for lp in plain]
    ref_rows = [lp + 0.5 * torch.randn(len(lp), generator=gen, dtype=D) for lp in plain]
    old_rows = [r.float().to(D) for r in old_rows]  # what the float32 batch will hold
    ref_rows = [r.float().to(D) for r in ref_rows]
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=0)
    module = GroupPolicyLoss(model, GRPOLossConfig(beta=beta, kl_estimator=estimator, clip_eps=eps,
                                                   aggregation=aggregation))
    model.zero_grad()
    loss, metrics = module(advantages=adv, old_logps=_grid(old_rows, batch["response_mask"]),
                           ref_logps=_grid(ref_rows, batch["response_mask"]), **batch)
    weight = float(batch["response_mask"].sum()) if aggregation == "token" else float(len(PROMPTS))
    (loss / weight).backward()
    ours = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    per_row, kl_rows, entropy_rows, clipped, tokens = [], [], [], 0, 0
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        logp = _plain_logps(model, p, c, grad=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1].to(D)
        entropy_rows.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
        ratio = torch.exp(logp - old_rows[b])
        a = float(adv[b])
        surrogate = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        d = ref_rows[b] - logp  # log π_ref − log π
        kl = {"k1": -d.detach() * (1 + logp - logp.detach()),  # k1's value with KL's gradient (policy_gradient.kl_penalty)
              "k2": 0.5 * d ** 2, "k3": torch.exp(d) - 1 - d}[estimator]
        per_row.append(surrogate + beta * kl)
        kl_rows.append(kl.detach())
        r = ratio.detach()
        clipped += int(((r > 1 + eps) & (a > 0)).sum() + ((r < 1 - eps) & (a < 0)).sum())
        tokens += len(c)
    def reduce(rows):
        if aggregation == "token":
            return sum(x.sum() for x in rows) / sum(len(c) for c in COMPLETIONS)
        return sum(x.mean() for x in rows) / len(rows)

    formula = reduce(per_row)
    assert float(metrics["kl"]) / weight == pytest.approx(float(reduce(kl_rows)), rel=1e-5, abs=1e-6)
    assert float(metrics["entropy"]) / weight == pytest.approx(float(reduce(entropy_rows)), rel=1e-5)
    assert clipped > 0  # the clip really acts here
    assert float(loss.detach()) / weight == pytest.approx(float(formula.detach()), rel=1e-5, abs=1e-6)
    formula.backward()
    for mine, direct in zip(ours, (p.grad for p in model.parameters())):
        assert torch.allclose(mine, direct.float(), atol=2e-6, rtol=1e-4)
    if aggregation == "token":  # the clip fraction: the share of tokens whose term was clipped
        assert float(metrics["clip_fraction"]) / weight == pytest.approx(clipped / tokens, abs=1e-6)


def test_padding_id_and_the_rows_beside_do_not_change_a_rows_loss(tiny):
    """Padding and the prompt tokens are masked: the summed loss of a batch is the sum of its rows'
    losses computed alone, whatever the pad id."""
    from posttrain.train.grpo import GroupPolicyLoss
    from posttrain.train.rollouts import collate_completions

    _, model = tiny
    module = GroupPolicyLoss(model, GRPOLossConfig(beta=0.1, aggregation="token"))
    adv = torch.tensor([1.0, -1.5, 0.5, -0.25, 2.0, -0.75])
    with torch.no_grad():
        ref_rows = [_plain_logps(model, p, c).float() - 0.1 for p, c in zip(PROMPTS, COMPLETIONS)]
        alone = 0.0
        for b in range(len(PROMPTS)):
            one = collate_completions(PROMPTS[b:b + 1], COMPLETIONS[b:b + 1], pad_id=0)
            alone += float(module(advantages=adv[b:b + 1], ref_logps=ref_rows[b][None], **one)[0])
        for pad in (0, 17, 40):
            batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=pad)
            together = float(module(advantages=adv, ref_logps=_grid(ref_rows, batch["response_mask"]), **batch)[0])
            assert together == pytest.approx(alone, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- advantages


def _stage(model, tokenizer, overrides, frozen_reference=None):
    from posttrain.train.grpo import GroupPolicyLoss, GRPOStage

    cfg = GRPOConfig.load(None, ["eval.sample_every=0", *overrides])
    module = GroupPolicyLoss(model, cfg.grpo)
    return GRPOStage(module, PROMPTS, _records(len(PROMPTS)), cfg, tokenizer, score=None, run_dir=None,
                     frozen_reference=frozen_reference), module


def _rollout(rewards):
    from posttrain.train.rollouts import Rollout, RolloutStats

    return Rollout(PROMPTS, COMPLETIONS, ["a"] * len(PROMPTS), _records(len(PROMPTS)),
                   torch.tensor(rewards, dtype=torch.float32), RolloutStats(*[0.0] * 8))


def _grpo_adv(group, scale):
    m = sum(group) / len(group)
    s = math.sqrt(sum((x - m) ** 2 for x in group) / len(group))
    return [(x - m) / (s + 1e-4) if scale else x - m for x in group]


def _rloo_adv(group):
    return [x - (sum(group) - x) / (len(group) - 1) for x in group]


@pytest.mark.parametrize("advantage, scale", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_groups_split_across_micro_batches_keep_their_whole_group_advantage(tiny, advantage, scale):
    """G = 3 with train.batch_size = 2 (grad_accum 3 makes the rollout whole groups): each
    micro-batch straddles groups, and each row still carries its advantage from its whole group."""
    tokenizer, model = tiny
    stage, _ = _stage(model, tokenizer, ["rollout.num_generations=3", "train.batch_size=2", "train.grad_accum=3",
                                         f"grpo.advantage={advantage}", f"grpo.scale_rewards={scale}"])
    rewards = [1.0, 0.25, -0.5, 3.0, 3.0, 0.0]
    batches = stage._batches(_rollout(rewards))
    assert [len(b["advantages"]) for b in batches] == [2, 2, 2]
    got = [float(a) for b in batches for a in b["advantages"]]
    expected = []
    for g in (rewards[:3], rewards[3:]):
        expected += _rloo_adv(g) if advantage == "rloo" else _grpo_adv(g, scale)
    assert got == pytest.approx(expected, abs=1e-6)
    # each micro-batch's rows are its completions, in rollout order
    assert [t for b in batches for t in b["targets"].tolist()] == [t for c in COMPLETIONS for t in c]


def test_a_group_of_equal_rewards_gives_zero_advantage_at_reward_model_scale():
    """A group whose G rewards are the same number carries no signal: (r − mean) / (std + ε) is
    exactly 0 in float64 (and `rollout/flat_groups` counts such a prompt as giving none). At the
    scale of a reward model's or a length reward's score (≈ 95) the float32 mean and std are off by
    round-off of the same size, and their ratio is not small: every sample of the prompt gets the
    same spurious advantage of about ±0.13 instead of 0."""
    r = -94.72939393557256
    group = [r] * 12
    assert _grpo_adv(group, True) == [0.0] * 12  # the formula in float64
    ours = pg.group_advantages(torch.tensor(group), 12)
    assert float(ours.abs().max()) < 1e-3, ours.tolist()


def test_rewards_that_do_not_fill_whole_groups_are_refused_not_regrouped():
    with pytest.raises(RuntimeError):
        pg.group_advantages(torch.ones(5), 2)
    with pytest.raises(RuntimeError):
        pg.rloo_advantages(torch.ones(5), 2)


# --------------------------------------------------------------------------- rewards of a rollout


def test_penalty_then_normalise_then_clip_in_that_order(tiny):
    """README: "reward.normalize z-normalises each rollout's rewards ..., and reward.clip clips the
    total, in that order", after the no-EOS penalty. Written out with plain statistics."""
    from posttrain.train.rollouts import sample_and_score

    tokenizer, _ = tiny
    eos = tokenizer.eos_token_id
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    outs = [enc("ab")[:2] + [eos], enc("hello world")[:6], enc("cd")[:2] + [eos], enc("x y z w v u t")[:6]]
    raw = [0.0, 4.0, 1.0, 0.5]
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=6", "reward.no_eos_penalty=2.0",
                                 "reward.normalize=true", "reward.clip=1.0"])
    rollout = sample_and_score(_FakeEngine(outs), tokenizer, [[1, 5, 6], [1, 7]], _records(2), [0, 1], cfg,
                               lambda p, t, rows: raw, seed=0)
    penalised = [0.0, 4.0 - 2.0, 1.0, 0.5 - 2.0]
    mean = statistics.fmean(penalised)
    z = [(x - mean) / statistics.stdev(penalised) for x in penalised]  # torch.std's (ddof 1) scale
    assert max(abs(x) for x in z) > 1.0  # the clip acts after normalising
    assert rollout.rewards.tolist() == pytest.approx([max(-1.0, min(1.0, x)) for x in z], abs=1e-5)


# --------------------------------------------------------------------------- the reference


def test_beta_zero_computes_no_reference_log_probs_and_the_loss_needs_none(tiny, monkeypatch):
    """README: "With β = 0 no reference exists at all"."""
    import posttrain.train.preference as preference

    tokenizer, model = tiny

    def refuse(*a, **k):
        raise AssertionError("a reference was used with beta = 0")

    monkeypatch.setattr(preference, "reference_weights", refuse)
    stage, module = _stage(model, tokenizer, ["rollout.num_generations=3", "train.batch_size=6", "grpo.beta=0",
                                              "grpo.updates_per_rollout=2"])
    (batch,) = stage._batches(_rollout([1.0, 0.0, 0.5, 0.25, 0.0, 1.0]))
    assert "ref_logps" not in batch and "old_logps" in batch
    loss, metrics = module(**batch)
    assert torch.isfinite(loss) and "kl" not in metrics


def test_the_reference_is_the_starting_model_after_updates(tiny):
    """β > 0 with full fine-tuning: the reference log-probs are the frozen start's, not the
    updated policy's."""
    tokenizer, model = tiny
    start = copy.deepcopy(model)
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    frozen = copy.deepcopy(start).requires_grad_(False).eval()
    stage, _ = _stage(policy, tokenizer, ["rollout.num_generations=3", "train.batch_size=6", "grpo.beta=0.1"],
                      frozen_reference=frozen)
    (batch,) = stage._batches(_rollout([1.0, 0.0, 0.5, 0.25, 0.0, 1.0]))
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ref = _plain_logps(start, p, c)
        assert torch.allclose(batch["ref_logps"][b, : len(c)].to(D), ref, atol=1e-5)
        assert not torch.allclose(_plain_logps(policy, p, c), ref, atol=1e-3)  # the policy did move


def test_a_beta_zero_run_builds_no_reference_copy(tmp_path, monkeypatch):
    import posttrain.train.grpo as grpo
    import posttrain.train.preference as preference

    seen = {}
    real = grpo.start_rl_run

    def spy(cfg, needs_reference, *a, **k):
        run = real(cfg, needs_reference, *a, **k)
        seen["frozen"] = run.frozen_reference
        return run

    def refuse(*a, **k):
        raise AssertionError("a reference was used with beta = 0")

    monkeypatch.setattr(grpo, "start_rl_run", spy)
    monkeypatch.setattr(preference, "reference_weights", refuse)
    grpo.run_grpo(_cfg(tmp_path, "b0", "grpo.beta=0", "train.max_steps=1"))
    assert seen == {"frozen": None}


# --------------------------------------------------------------------------- whole runs


def _cfg(tmp_path, name, *extra):
    return GRPOConfig.load(None, [f"output_dir={tmp_path / name}", "data.synthetic_size=120", "rollout.max_new_tokens=3",
                                  "train.batch_size=8", "rollout.num_generations=4", "train.schedule=constant",
                                  "train.lr=1e-3", "train.progress_bar=false", "eval.prompts=0", "grpo.beta=0.05",
                                  "reward.functions=[short=tests.rewards_fixture:short]", *extra])


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_an_accumulated_step_equals_one_big_step_in_a_run(tmp_path, aggregation):
    """G = 3: batch_size 6 × grad_accum 1 and batch_size 2 × grad_accum 3 (groups straddle the
    micro-batches) sample the same rollouts and train to the same weights (to float round-off)."""
    from posttrain.train.grpo import run_grpo

    common = ["rollout.num_generations=3", "train.max_steps=2", f"grpo.aggregation={aggregation}",
              "grpo.kl_estimator=k2", "grpo.updates_per_rollout=1"]
    big = run_grpo(_cfg(tmp_path, "big", "train.batch_size=6", "train.grad_accum=1", *common))
    acc = run_grpo(_cfg(tmp_path, "acc", "train.batch_size=2", "train.grad_accum=3", *common))
    a, b = _weights(big), _weights(acc)
    start = _weights_of_start()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a if k in start)
    assert moved > 1e-4  # the runs did train
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=0), k  # Adam: round-off on a few near-zero gradients
    rewards = lambda d: [json.loads(l)["rollout/reward_mean"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert rewards(big) == rewards(acc)


def _weights_of_start():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    torch.manual_seed(0)
    model = load_model(ModelConfig(path="tiny"))
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_resume_across_an_epoch_boundary_with_accumulation_and_mu2_is_bitwise(tmp_path):
    """4 prompts, 2 a rollout (grad_accum 2): 2 rollouts, 4 steps an epoch with μ = 2. Stopped at
    the epoch's end and resumed into the next epoch (reshuffled prompts), with sequence
    aggregation and a k2 KL, the run ends bitwise equal to an uninterrupted one."""
    from posttrain.train.grpo import run_grpo

    extra = ["data.synthetic_size=4", "data.eval_fraction=0", "train.batch_size=4", "train.grad_accum=2",
             "grpo.updates_per_rollout=2", "grpo.aggregation=sequence", "grpo.kl_estimator=k2", "train.save_every=2"]
    whole = run_grpo(_cfg(tmp_path, "whole", "train.max_steps=6", *extra))
    run_grpo(_cfg(tmp_path, "parts", "train.max_steps=4", *extra))
    parts = run_grpo(_cfg(tmp_path, "parts", "train.max_steps=6", *extra))
    a, b = _weights(whole), _weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec(parts)] == list(range(1, 7))
    assert [r["loss"] for r in rec(parts)] == [r["loss"] for r in rec(whole)]


def test_resume_from_a_final_checkpoint_inside_a_rollout_equals_the_uninterrupted_run(tmp_path):
    """μ = 2, stopped at max_steps = 1 (the loop saves the final step whatever save_every says), then
    extended to 2: README says a run stopped and resumed ends bitwise equal to an uninterrupted one.
    The resumed step 2 belongs to rollout 1, which the uninterrupted run sampled (and took its
    rollout-time log-probs) from the starting weights; the resume re-samples it from the weights
    after step 1, so its ratio is 1 where the uninterrupted run's is not."""
    from posttrain.train.grpo import run_grpo

    extra = ["grpo.updates_per_rollout=2", "train.save_every=2", "train.lr=3e-3"]
    whole = run_grpo(_cfg(tmp_path, "whole", "train.max_steps=2", *extra))
    first = run_grpo(_cfg(tmp_path, "parts", "train.max_steps=1", *extra))
    assert (first / "checkpoints" / "step-0000001").is_dir()  # the final step is saved, inside rollout 1
    parts = run_grpo(_cfg(tmp_path, "parts", "train.max_steps=2", *extra))
    assert [json.loads(l)["step"] for l in (parts / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a, b = _weights(whole), _weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_reports_the_rollouts_and_samples_of_the_uninterrupted_one(tmp_path):
    """summary.json's `rollouts` and `eval.sample_every` ("every Nth rollout") count the run's
    rollouts; after a resume they should count the ones before it too (PPO's stage saves them)."""
    from posttrain.train.grpo import run_grpo

    extra = ["train.save_every=1", "eval.sample_every=2"]
    whole = run_grpo(_cfg(tmp_path, "whole", "train.max_steps=3", *extra))
    run_grpo(_cfg(tmp_path, "parts", "train.max_steps=1", *extra))
    parts = run_grpo(_cfg(tmp_path, "parts", "train.max_steps=3", *extra))
    summary = lambda d: json.loads((d / "summary.json").read_text())
    assert summary(whole)["rollouts"] == 3
    samples = lambda d: [(s["epoch"], s["rollout"]) for s in map(json.loads, (d / "samples.jsonl").read_text().splitlines())]
    assert sorted(set(samples(whole))) == [(0, 0), (0, 2)]
    assert summary(parts)["rollouts"] == 3 and samples(parts) == samples(whole)


def test_samples_of_a_rerun_and_of_a_resume_after_a_kill_are_not_written_twice(tmp_path):
    """samples.jsonl was opened for appending: a fresh rerun in the same directory doubled it, and a
    run killed after its last checkpoint wrote the rollouts it sampled after it twice once resumed."""
    import shutil

    from posttrain.train.grpo import run_grpo

    extra = ["train.max_steps=3", "train.save_every=1", "eval.sample_every=1"]
    whole = run_grpo(_cfg(tmp_path, "whole", *extra))
    expected = (whole / "samples.jsonl").read_text()
    assert len({(r["epoch"], r["rollout"]) for r in map(json.loads, expected.splitlines())}) == 3

    cut = run_grpo(_cfg(tmp_path, "cut", *extra))
    # as if killed after step 3's rollout was sampled and written, before its checkpoint
    shutil.rmtree(cut / "checkpoints" / "step-0000003")
    shutil.rmtree(cut / "final")
    run_grpo(_cfg(tmp_path, "cut", *extra, "train.resume=auto"))
    assert (cut / "samples.jsonl").read_text() == expected

    run_grpo(_cfg(tmp_path, "cut", *extra, "train.resume=never"))  # a fresh rerun in the same directory
    assert (cut / "samples.jsonl").read_text() == expected


def test_resuming_with_another_rollout_size_is_refused_with_the_sizes(tmp_path):
    """A checkpoint's position counts rollouts of its own size; train.grad_accum 1 -> 2 doubles the
    prompts a rollout holds, so the resume is refused (it re-drew prompts of the checkpoint's rollout)."""
    from posttrain.errors import ConfigError
    from posttrain.train.grpo import run_grpo

    run_grpo(_cfg(tmp_path, "run", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="rollouts hold 2 prompts, this run's 4"):
        run_grpo(_cfg(tmp_path, "run", "train.max_steps=2", "train.grad_accum=2", "train.resume=auto"))
