"""Stop 34 (GRPO backlog): `grpo.kl_estimator` refused where nothing reads it (β = 0, and RLOO,
whose KL is always k1 in the reward); RLOO's β as the paper's KL-penalised sequence reward
r − β·Σ_t (log π_old − log π_ref) before the leave-one-out baseline (Ahmadian et al. 2024, TRL's
RLOOTrainer), not a per-token loss term; and `grpo.aggregation=constant`, Dr. GRPO's normaliser
(Σ over tokens / (responses × rollout.max_new_tokens), Liu et al. 2025). Each against float64
hand computations."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import GRPOConfig, GRPOLossConfig, validate_grpo
from posttrain.errors import ConfigError
from posttrain.losses import policy_gradient as pg
from tests.test_grpo_rloo_edges import COMPLETIONS, PROMPTS, tiny  # noqa: F401  (tiny: a fixture)

D = torch.float64


# --------------------------------------------------------------------------- 1. kl_estimator unread


@pytest.mark.parametrize("overrides, message", [
    (["grpo.kl_estimator=k1"], r"grpo.kl_estimator=k1 is read only when grpo.beta > 0"),
    (["grpo.kl_estimator=k2", "grpo.beta=0"], r"grpo.kl_estimator=k2 is read only when grpo.beta > 0"),
    (["grpo.advantage=rloo", "grpo.beta=0.05", "grpo.kl_estimator=k2"],
     r"grpo.kl_estimator=k2 does nothing with grpo.advantage=rloo"),
])
def test_an_unread_kl_estimator_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_grpo(GRPOConfig.load(None, overrides))


@pytest.mark.parametrize("overrides", [
    [], ["grpo.kl_estimator=k3"],  # the default, explicit or not
    ["grpo.beta=0.04", "grpo.kl_estimator=k1"], ["grpo.beta=0.04", "grpo.kl_estimator=k2"],
    ["grpo.advantage=rloo", "grpo.beta=0.05"],
])
def test_a_read_kl_estimator_is_accepted(overrides):
    validate_grpo(GRPOConfig.load(None, overrides))


# --------------------------------------------------------------------------- 2. RLOO's KL in the reward


def test_kl_penalised_rewards_by_hand():
    """r_i − β Σ_t (log π_it − log π_ref,it) over the response tokens only, in float64."""
    scores = torch.tensor([1.0, 0.0, 0.5], dtype=D)
    logps = torch.tensor([[-0.5, -1.0, -9.0], [-2.0, -0.1, -0.3], [-0.7, -9.0, -9.0]], dtype=D)
    ref = torch.tensor([[-0.75, -0.5, 0.0], [-1.0, -0.4, -0.2], [-1.2, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    beta = 0.3
    want = [1.0 - beta * ((-0.5 + 0.75) + (-1.0 + 0.5)),
            0.0 - beta * ((-2.0 + 1.0) + (-0.1 + 0.4) + (-0.3 + 0.2)),
            0.5 - beta * (-0.7 + 1.2)]
    got = pg.kl_penalised_rewards(scores, logps, ref, mask, beta)
    assert got.dtype == D
    assert got.tolist() == pytest.approx(want, rel=0, abs=1e-15)


def test_rloo_rollout_advantages_are_leave_one_out_of_kl_penalised_rewards(tmp_path, monkeypatch):
    """`grpo.advantage=rloo`, β = 0.5, μ = 2, 3 steps: in the second rollout (sampled after the
    policy moved away from the reference) each completion's advantage is the leave-one-out
    baseline of r − β Σ_t (log π_old − log π_ref), computed by hand in float64 from the rollout's
    rewards and the batches' rollout-time and reference log-probs."""
    from posttrain.train import grpo

    seen = []
    original = grpo.GRPOStage._batches

    def recording(self, rollout):
        batches = original(self, rollout)
        seen.append((rollout.rewards.clone(), batches))
        return batches

    monkeypatch.setattr(grpo.GRPOStage, "_batches", recording)
    beta, group = 0.5, 4
    grpo.run_grpo(GRPOConfig.load(None, [
        f"output_dir={tmp_path / 'rloo'}", "data.synthetic_size=40", "rollout.max_new_tokens=4",
        "train.batch_size=8", f"rollout.num_generations={group}", "train.max_steps=3", "train.lr=1e-2",
        "train.progress_bar=false", "eval.prompts=0", "grpo.advantage=rloo", f"grpo.beta={beta}", "grpo.updates_per_rollout=2",
        "reward.functions=[short=tests.rewards_fixture:short]"]))
    assert len(seen) == 2
    rewards, batches = seen[1]
    kl = []
    for b in batches:
        for old, ref, m in zip(b["old_logps"].to(D), b["ref_logps"].to(D), b["response_mask"]):
            kl.append(sum(float(old[t]) - float(ref[t]) for t in range(len(m)) if m[t]))
    penalised = [float(r) - beta * k for r, k in zip(rewards.tolist(), kl)]
    want = []
    for g in range(0, len(penalised), group):
        chunk = penalised[g : g + group]
        want += [chunk[i] - (sum(chunk) - chunk[i]) / (group - 1) for i in range(group)]
    got = torch.cat([b["advantages"] for b in batches]).tolist()
    assert max(abs(k) for k in kl) > 1e-2  # the policy has moved: the KL term is not nothing
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_rloo_loss_has_no_per_token_kl_term_and_logs_k1(tiny):  # noqa: F811
    """Under rloo, β acts only through the rewards: the loss with β > 0 is the β = 0 loss bit for
    bit, and the logged kl is k1 = log π − log π_ref per token (the reward's estimator)."""
    from posttrain.train.grpo import GroupPolicyLoss
    from posttrain.train.rollouts import collate_completions, completion_forward, summed

    _, model = tiny
    model = copy.deepcopy(model)
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=0)
    mask = batch["response_mask"]
    adv = torch.tensor([1.0, -1.5, 0.5, -0.25, 2.0, -0.75])
    gen = torch.Generator().manual_seed(5)
    ref = -torch.rand(mask.shape, generator=gen) * 4
    with_kl = GroupPolicyLoss(model, GRPOLossConfig(advantage="rloo", beta=0.4))
    without = GroupPolicyLoss(model, GRPOLossConfig(advantage="rloo", beta=0.0))
    loss, metrics = with_kl(advantages=adv, ref_logps=ref, **batch)
    plain, _ = without(advantages=adv, **batch)
    assert torch.equal(loss, plain)
    with torch.no_grad():
        lp = completion_forward(model, batch, 256, entropy_grad=False)["logps"]
    assert float(metrics["kl"]) == pytest.approx(float(summed(lp - ref, mask, "token")), rel=1e-5)


# --------------------------------------------------------------------------- 3. Dr. GRPO's constant normaliser


def test_constant_aggregation_by_hand():
    """Σ_b Σ_t l_bt / (B · L): every token weighs 1/(B·L) whatever its response's length."""
    losses = torch.tensor([[1.0, 2.0, 7.0], [3.0, 5.0, 4.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = pg.aggregate(losses, mask, "constant", max_tokens=8)
    assert float(got) == pytest.approx((1 + 2 + 3 + 5 + 4) / (2 * 8), rel=0, abs=1e-15)
    with pytest.raises(ValueError, match="max_tokens"):
        pg.aggregate(losses, mask, "constant")


def test_constant_aggregation_in_the_loss_and_the_step_weight(tiny):  # noqa: F811
    """The loop divides the loss's numerator by the step's weight: under constant that is
    Σ tokens l / (responses × rollout.max_new_tokens) exactly, and the figures (entropy) are
    per-response means, as under sequence."""
    from posttrain.train.grpo import GroupPolicyLoss, GRPOStage
    from posttrain.train.rollouts import collate_completions

    _, model = tiny
    model = copy.deepcopy(model)
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=0)
    adv = torch.tensor([1.0, -1.5, 0.5, -0.25, 2.0, -0.75])
    max_new = 9
    with torch.no_grad():
        loss, metrics = GroupPolicyLoss(model, GRPOLossConfig(aggregation="constant"), max_new_tokens=max_new)(
            advantages=adv, **batch)
        token, _ = GroupPolicyLoss(model, GRPOLossConfig(aggregation="token"))(advantages=adv, **batch)
        _, seq_metrics = GroupPolicyLoss(model, GRPOLossConfig(aggregation="sequence"))(advantages=adv, **batch)
    stage = SimpleNamespace(aggregation="constant", cfg=GRPOConfig.load(None, [f"rollout.max_new_tokens={max_new}"]))
    weight = GRPOStage.weight(stage, batch)
    assert weight == len(PROMPTS) * max_new
    assert float(loss) == pytest.approx(float(token), rel=1e-6)  # numerator Σ over tokens, as token's
    # by hand, in float64: l_t = −ρA with ρ = 1 at μ = 1, so Σ l = −Σ_b A_b T_b
    want = -sum(float(a) * len(c) for a, c in zip(adv, COMPLETIONS)) / (len(PROMPTS) * max_new)
    assert float(loss) / weight == pytest.approx(want, rel=1e-6)
    assert float(metrics["entropy"]) / weight == pytest.approx(float(seq_metrics["entropy"]) / len(PROMPTS),
                                                                rel=1e-6)


def test_constant_aggregation_runs_a_step(tmp_path):
    from posttrain.train.grpo import run_grpo

    cfg = GRPOConfig.load(None, [f"output_dir={tmp_path / 'c'}", "data.synthetic_size=40", "rollout.max_new_tokens=4",
                                 "train.batch_size=8", "train.max_steps=1", "train.progress_bar=false", "eval.prompts=0",
                                 "grpo.aggregation=constant", "grpo.scale_rewards=false", "grpo.beta=0.05",
                                 "reward.functions=[short=tests.rewards_fixture:short]"])
    run_dir = run_grpo(cfg)
    assert (run_dir / "final").is_dir()
