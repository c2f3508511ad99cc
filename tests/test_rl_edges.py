"""Adversarial review of online RL (GRPO / RLOO / PPO): the pure losses against float64 formulas
written out here, the rollout's rewards / masks / stop handling, sampling against its
distribution, and the stages' log-probs against a plain transformers forward.

The defects this review found are fixed; its tests stay as regression coverage."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.config import GRPOConfig, GRPOLossConfig, PPOConfig
from posttrain.data.prompts import PromptRecord
from posttrain.losses import policy_gradient as pg

D = torch.float64


@pytest.fixture(scope="module")
def tiny():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_tokenizer("tiny"), load_model(ModelConfig(path="tiny"))


def _records(n):
    return [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"review:{i}") for i in range(n)]


def _plain_logps(model, prompt, completion, temperature=1.0):
    """log softmax(z / T) of each completion token from one unpadded transformers forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].to(D)
    at = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return (logits[at] / temperature).log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


# --------------------------------------------------------------------------- group advantages


def test_group_advantages_identical_rewards_give_zero_and_group_of_two_by_formula():
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 3.0, 3.0], dtype=D)
    ours = pg.group_advantages(rewards, 2)
    eps = 1e-4
    expected = []
    for i in range(0, 8, 2):
        a, b = float(rewards[i]), float(rewards[i + 1])
        mean = (a + b) / 2
        std = math.sqrt(((a - mean) ** 2 + (b - mean) ** 2) / 2)  # population std, as documented
        expected += [(a - mean) / (std + eps), (b - mean) / (std + eps)]
    assert ours.tolist() == pytest.approx(expected, abs=1e-12)
    assert ours[:4].tolist() == [0.0] * 4 and ours[6:].tolist() == [0.0, 0.0]  # std 0: no signal, no NaN
    unscaled = pg.group_advantages(rewards, 4, scale_by_std=False)  # Dr. GRPO
    means = [sum(rewards[:4].tolist()) / 4, sum(rewards[4:].tolist()) / 4]
    assert unscaled.tolist() == pytest.approx([r - means[i // 4] for i, r in enumerate(rewards.tolist())], abs=1e-12)


def test_rloo_group_of_two_and_of_three_by_loop():
    rewards = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5], dtype=D)
    assert pg.rloo_advantages(rewards[:2], 2).tolist() == pytest.approx([1.0, -1.0])
    r = [2.0, -1.0, 0.5]
    expected = [r[i] - sum(r[j] for j in range(3) if j != i) / 2 for i in range(3)]
    assert pg.rloo_advantages(rewards[2:], 3).tolist() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        pg.rloo_advantages(rewards[:1], 1)


# --------------------------------------------------------------------------- clipped surrogate, value loss


def test_clipped_surrogate_with_negative_advantages_value_and_gradient():
    eps = 0.2
    old = torch.zeros(1, 4, dtype=D)
    ratios = [0.5, 0.9, 1.1, 1.6]  # below the clip, inside, inside, above
    logps = torch.tensor([[math.log(r) for r in ratios]], dtype=D, requires_grad=True)
    adv = torch.full((1, 1), -2.0, dtype=D)
    mask = torch.ones(1, 4, dtype=D)
    loss, metrics = pg.clipped_policy_loss(logps, old, adv, mask, eps)
    loss.sum().backward()
    # l = -min(ρA, clip(ρ)A); with A<0 the clip binds only for ρ < 1-ε (where the gradient is 0)
    exp_loss, exp_grad = [], []
    for r in ratios:
        a = -2.0
        un, cl = r * a, min(max(r, 1 - eps), 1 + eps) * a
        exp_loss.append(-min(un, cl))
        exp_grad.append(0.0 if cl < un else -a * r)  # d(-ρA)/dlogπ = -Aρ
    assert loss[0].tolist() == pytest.approx(exp_loss, abs=1e-12)
    assert logps.grad[0].tolist() == pytest.approx(exp_grad, abs=1e-12)
    assert float(metrics["clip_fraction"]) == pytest.approx(0.25)


def test_clipped_surrogate_masks_padding_and_ratio_one_gives_minus_advantage():
    logps = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, 9.0, 9.0]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=D)
    adv = torch.tensor([[0.3], [-1.5]], dtype=D)
    loss, metrics = pg.clipped_policy_loss(logps, logps.detach(), adv, mask, 0.2)
    assert loss.tolist() == [[-0.3, -0.3, 0.0], [1.5, 0.0, 0.0]]
    loss.sum().backward()
    assert logps.grad.tolist() == [[-0.3, -0.3, 0.0], [1.5, 0.0, 0.0]]
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["approx_kl"]) == 0.0


def test_clipped_value_loss_by_formula_both_sides():
    c = 0.2
    values = torch.tensor([[1.0, 0.0, 0.5, 3.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.45, 0.0]], dtype=D)
    returns = torch.tensor([[0.0, 1.0, 2.0, 9.0]], dtype=D)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=D)
    loss, metrics = pg.clipped_value_loss(values, old, returns, mask, c)
    expected, clipped_count = [], 0
    for v, o, r, m in zip(values[0].tolist(), old[0].tolist(), returns[0].tolist(), mask[0].tolist()):
        vc = o + min(max(v - o, -c), c)
        plain, clipped = (v - r) ** 2, (vc - r) ** 2
        expected.append(0.5 * max(plain, clipped) * m)
        clipped_count += (clipped > plain) * m
    assert loss[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert float(metrics["value_clip_fraction"]) == pytest.approx(clipped_count / 3)


# --------------------------------------------------------------------------- KL estimators


def _weighted_tokens(probs, copies):
    """Token ids repeated in proportion to `probs`: a plain mean over them is E_{a~probs}."""
    return torch.tensor([i for i, n in enumerate(copies) for _ in range(n)])


def test_kl_estimators_direction_is_kl_policy_to_reference_under_policy_samples():
    pi = torch.tensor([0.5, 0.25, 0.25], dtype=D)
    ref = torch.tensor([0.2, 0.5, 0.3], dtype=D)
    toks = _weighted_tokens(pi, [2, 1, 1])  # exact E_{a~π}
    logp, logref = pi.log()[toks], ref.log()[toks]
    kl_pi_ref = float((pi * (pi / ref).log()).sum())
    assert float(pg.kl_k1(logp, logref).mean()) == pytest.approx(kl_pi_ref, abs=1e-12)
    assert float(pg.kl_k3(logp, logref).mean()) == pytest.approx(kl_pi_ref, abs=1e-12)
    k2 = [0.5 * (math.log(float(ref[a])) - math.log(float(pi[a]))) ** 2 for a in toks.tolist()]
    assert pg.kl_k2(logp, logref).tolist() == pytest.approx(k2, abs=1e-12)
    # the gradient of k3 w.r.t. log π is 1 − π_ref/π (pulls π towards π_ref)
    leaf = logp.clone().requires_grad_(True)
    pg.kl_k3(leaf, logref).sum().backward()
    assert leaf.grad.tolist() == pytest.approx([1 - float(ref[a] / pi[a]) for a in toks.tolist()], abs=1e-12)


def test_approx_kl_metric_estimates_kl_old_to_new_under_rollout_samples():
    """PPO's early-stopping signal is documented as approx KL(old||new) (config ppo.early_stop_kl).
    The tokens were sampled by π_old, so Schulman's k3 for it is (π/π_old − 1) − log(π/π_old)."""
    old = torch.tensor([0.5, 0.25, 0.25], dtype=D)
    new = torch.tensor([0.2, 0.4, 0.4], dtype=D)
    toks = _weighted_tokens(old, [2, 1, 1])  # exact expectation under π_old
    lo, ln = old.log()[toks][None], new.log()[toks][None]
    _, metrics = pg.clipped_policy_loss(ln, lo, torch.zeros(1, 1, dtype=D), torch.ones_like(lo), 0.2)
    kl_old_new = float((old * (old / new).log()).sum())  # 0.2231
    assert float(metrics["approx_kl"]) == pytest.approx(kl_old_new, abs=1e-9)  # the product gives 0.3394


# --------------------------------------------------------------------------- shaped rewards and GAE


def _gae_by_hand(rewards, values, length, gamma, lam):
    adv = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0  # the episode ends at the last token
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values[:length])]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.5, 1.0)])
def test_gae_against_a_hand_loop_with_garbage_on_padding(gamma, lam):
    torch.manual_seed(4)
    lengths = [5, 1, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths], dtype=D)
    rewards = torch.randn(3, 5, dtype=D)
    values = torch.randn(3, 5, dtype=D) * 10  # large garbage on padding must not leak
    adv, ret = pg.gae(rewards * mask, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        a, r = _gae_by_hand(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(a, abs=1e-10)
        assert ret[b, :n].tolist() == pytest.approx(r, abs=1e-10)
        assert adv[b, n:].tolist() == [0.0] * (5 - n) and ret[b, n:].tolist() == [0.0] * (5 - n)


def test_shaped_rewards_score_on_last_token_and_kl_penalty_direction():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=D)
    kl = torch.tensor([[0.1, -0.2, 0.3, 5.0], [0.4, 7.0, 7.0, 7.0], [0.0, 0.1, 0.2, 0.3]], dtype=D)
    scores = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    beta = 0.25
    ours = pg.shaped_rewards(scores, kl, mask, beta)
    for b in range(3):
        n = int(mask[b].sum())
        expected = [-beta * kl[b, t].item() * (t < n) for t in range(4)]
        expected[n - 1] += scores[b].item()
        assert ours[b].tolist() == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- the GRPO loss and its stage


PROMPTS = [[1, 5, 9, 2], [1, 5, 9, 2], [1, 7], [1, 7]]
COMPLETIONS = [[11, 12, 2], [13], [14, 15, 16, 17], [20, 21]]


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_grpo_micro_batches_accumulate_to_the_whole_batch_formula(tiny, aggregation):
    """Two micro-batches of 2, summed and divided by the step's weight (as the loop does), equal
    the documented aggregation over the 4 completions at once, with β·k3 — value and gradient."""
    from posttrain.train.grpo import GroupPolicyLoss
    from posttrain.train.rollouts import collate_completions

    _, model = tiny
    model = copy.deepcopy(model)
    beta = 0.3
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    torch.manual_seed(5)
    ref_rows = [_plain_logps(model, p, c) + 0.2 * torch.randn(len(c), dtype=D) for p, c in zip(PROMPTS, COMPLETIONS)]
    module = GroupPolicyLoss(model, GRPOLossConfig(beta=beta, aggregation=aggregation))
    total_loss, total_weight = 0.0, 0.0
    model.zero_grad()
    for s in (0, 2):
        batch = collate_completions(PROMPTS[s:s + 2], COMPLETIONS[s:s + 2], 0)
        ref = torch.zeros_like(batch["response_mask"])
        for i, r in enumerate(ref_rows[s:s + 2]):
            ref[i, : len(r)] = r.float()
        loss, _ = module(advantages=adv[s:s + 2], ref_logps=ref, **batch)
        weight = float(batch["response_mask"].sum()) if aggregation == "token" else 2.0
        total_weight += weight
        total_loss = total_loss + loss
    (total_loss / total_weight).backward()
    ours = [p.grad.clone() for p in model.parameters()]

    # the formula, from plain per-row forwards (float32 model, float64 arithmetic)
    model.zero_grad()
    per_seq = []
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        logits = model(input_ids=torch.tensor([p + c])).logits[0]
        at = slice(len(p) - 1, len(p) + len(c) - 1)
        logp = logits[at].log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0].to(D)
        ratio = torch.exp(logp - logp.detach())
        log_r = ref_rows[b] - logp
        k3 = torch.exp(log_r) - 1 - log_r
        per_seq.append(-ratio * float(adv[b]) + beta * k3)
    if aggregation == "token":
        formula = sum(x.sum() for x in per_seq) / sum(len(c) for c in COMPLETIONS)
    else:
        formula = sum(x.mean() for x in per_seq) / len(per_seq)
    assert float(total_loss.detach()) / total_weight == pytest.approx(float(formula.detach()), rel=1e-5, abs=1e-6)
    formula.backward()
    for mine, direct in zip(ours, (p.grad for p in model.parameters())):
        assert torch.allclose(mine, direct.float(), atol=2e-6, rtol=1e-4)


def _grpo_stage(model, tokenizer, overrides):
    from posttrain.train.grpo import GroupPolicyLoss, GRPOStage

    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "train.batch_size=4", "eval.sample_every=0", *overrides])
    module = GroupPolicyLoss(model, cfg.grpo)
    return GRPOStage(module, PROMPTS, _records(4), cfg, tokenizer, score=None, run_dir=None), module


def test_grpo_ratio_at_the_first_of_mu_updates_is_exactly_one(tiny):
    """μ = 2: the stored rollout-time log-probs equal the first update's log-probs bitwise
    (padding-free rows, as a run uses them), so nothing is clipped and the loss is −Σ A·T / ΣT."""
    from posttrain.models.attention import padding_free
    from posttrain.train.rollouts import Rollout, RolloutStats

    tokenizer, model = tiny
    model = copy.deepcopy(model)
    padding_free(model, True, lambda *_: None, 64)
    stage, module = _grpo_stage(model, tokenizer, ["grpo.updates_per_rollout=2"])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    rollout = Rollout(PROMPTS, COMPLETIONS, ["a"] * 4, _records(4), rewards, RolloutStats(*[0.0] * 8))
    (batch,) = stage._batches(rollout)
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):  # old log-probs are the policy's, per token
        assert torch.allclose(batch["old_logps"][b, : len(c)].to(D), _plain_logps(model, p, c), atol=1e-5)
    model.train()
    loss, metrics = module(**batch)
    lengths = [len(c) for c in COMPLETIONS]
    adv = []
    for a, b in ((1.0, 0.0), (0.5, 0.25)):
        m, s = (a + b) / 2, abs(a - b) / 2
        adv += [(a - m) / (s + 1e-4), (b - m) / (s + 1e-4)]
    assert float(loss.detach()) == pytest.approx(-sum(x * n for x, n in zip(adv, lengths)), rel=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0


def test_grpo_log_probs_are_those_of_the_sampling_distribution_at_temperature(tiny):
    from posttrain.train.rollouts import Rollout, RolloutStats

    tokenizer, model = tiny
    T = 0.5
    stage, _ = _grpo_stage(model, tokenizer, ["grpo.updates_per_rollout=2", f"rollout.temperature={T}"])
    rollout = Rollout(PROMPTS, COMPLETIONS, ["a"] * 4, _records(4), torch.tensor([1.0, 0.0, 0.5, 0.25]),
                      RolloutStats(*[0.0] * 8))
    (batch,) = stage._batches(rollout)
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        assert torch.allclose(batch["old_logps"][b, : len(c)].to(D), _plain_logps(model, p, c, T), atol=1e-4)


# --------------------------------------------------------------------------- rewards of a rollout


class _FakeEngine:
    """Returns fixed completions (what a rollout engine hands back: ids, EOS kept, no padding)."""

    is_policy = True
    generation_config = None

    def __init__(self, outs):
        self.outs = outs

    def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
        assert len(prompt_ids) == len(self.outs)
        return [list(o) for o in self.outs]


def test_truncated_completions_are_penalised_and_eos_ended_ones_are_not(tiny):
    from posttrain.train.rollouts import sample_and_score

    tokenizer, _ = tiny
    eos = tokenizer.eos_token_id
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    outs = [enc("abcd")[:4] + [eos], enc("hello world")[:6]]  # ended; truncated at max_new_tokens = 6
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=6",
                                 "reward.no_eos_penalty=0.75"])
    raw = [0.5, 0.5]
    rollout = sample_and_score(_FakeEngine(outs), tokenizer, [[1, 5, 6]], _records(1), [0], cfg,
                               lambda p, t, rows: raw, seed=0)
    assert rollout.rewards.tolist() == pytest.approx([0.5, 0.5 - 0.75])
    assert rollout.texts == [tokenizer.decode(outs[0], skip_special_tokens=True),
                             tokenizer.decode(outs[1], skip_special_tokens=True)]
    assert rollout.completions[0][-1] == eos  # the EOS token is trained on (it is the decision to end)


def test_a_completion_ended_by_a_stop_string_is_not_penalised_as_never_ending(tiny):
    """reward.no_eos_penalty: 'subtracted from the reward of a response that never ends (hits
    max_new_tokens)'; rollout.stop: 'a completion ends at the first one'."""
    from posttrain.train.rollouts import sample_and_score

    tokenizer, _ = tiny
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    stopped = enc("ab STOP")  # 5 tokens, well under max_new_tokens, ended by the stop string
    assert "STOP" in tokenizer.decode(stopped) and len(stopped) < 16
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=16",
                                 "rollout.stop=[STOP]", "reward.no_eos_penalty=1.0"])
    outs = [stopped, enc("abcd") + [tokenizer.eos_token_id]]
    rollout = sample_and_score(_FakeEngine(outs), tokenizer, [[1, 5, 6]], _records(1), [0], cfg,
                               lambda p, t, rows: [0.0, 0.0], seed=0)
    assert rollout.texts[0] == "ab "  # cut before the stop string
    assert rollout.rewards.tolist() == [0.0, 0.0]  # the product gives [-1.0, 0.0]


def test_a_reward_returning_nan_stops_the_rollout_with_a_named_error(tiny):
    from posttrain.errors import DataError
    from posttrain.rewards import CombinedReward, RewardComponent
    from posttrain.train.rollouts import sample_and_score

    tokenizer, _ = tiny
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=8"])
    score = CombinedReward([RewardComponent("ok", lambda p, r: [1.0] * len(r)),
                            RewardComponent("bad", lambda p, r: [0.0, float("nan")])])
    with pytest.raises(DataError, match="bad"):
        sample_and_score(_FakeEngine([enc("a"), enc("b")]), tokenizer, [[1, 5]], _records(1), [0], cfg, score, 0)


def test_each_rewards_raw_mean_is_reported_beside_the_total(tiny):
    """README: with several rewards, each one's raw mean is logged as rollout/reward/<name>,
    before weights and the no-EOS penalty; the total is the weighted sum."""
    from posttrain.rewards import CombinedReward, RewardComponent
    from posttrain.train.rollouts import sample_and_score

    tokenizer, _ = tiny
    eos = tokenizer.eos_token_id
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=8"])
    score = CombinedReward([RewardComponent("length", lambda p, r: [float(len(x)) for x in r], weight=0.5),
                            RewardComponent("has_b", lambda p, r: [float("b" in x) for x in r], weight=2.0)])
    rollout = sample_and_score(_FakeEngine([enc("a") + [eos], enc("bbb") + [eos]]), tokenizer, [[1, 5]],
                               _records(1), [0], cfg, score, 0)
    assert rollout.components == pytest.approx({"length": 2.0, "has_b": 0.5})
    assert rollout.rewards.tolist() == pytest.approx([0.5 * 1, 0.5 * 3 + 2.0])


def test_reward_models_in_rl_read_with_their_own_saved_template(tmp_path, monkeypatch):
    """An RL run whose policy renders alpaca scores with a reward model trained on (and saved
    with) ChatML in ChatML: the RM reads conversations as it learned them."""
    from posttrain import rewards
    from posttrain.train.rollouts import build_reward

    seen = {}

    class Scorer:
        def __init__(self, path, template="auto", batch_size=32, device=None, **_):
            seen.update(template=template, device=device)

        def __call__(self, prompts, responses, rows=None):
            return [0.0] * len(responses)

    monkeypatch.setattr(rewards, "RewardModelScorer", Scorer)
    cfg = GRPOConfig.load(None, ["reward.models=[rm_dir]", "data.template=alpaca"])
    build_reward(cfg, device="cpu")
    assert seen == {"template": "auto", "device": "cpu"}


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("T, k, p", [(0.7, 4, 0.8), (0.7, 3, 0.97), (1.3, 0, 0.6), (2.0, 0, 1.0)])
def test_sample_next_draws_from_temperature_top_k_top_p_distribution(T, k, p):
    from posttrain.rollout.sampling import sample_next

    z = [2.0, 1.5, 1.0, 0.2, -0.5, -3.0]
    # float64 by hand: z/T, keep the k largest, softmax, keep the smallest prefix of mass >= p
    scaled = [x / T for x in z]
    top = sorted(range(6), key=lambda i: -scaled[i])[: k or 6]
    w = {i: math.exp(scaled[i]) for i in top}
    total = sum(w.values())
    kept, mass = [], 0.0
    for i in top:
        if mass >= p:
            break
        kept.append(i)
        mass += w[i] / total
    norm = sum(w[i] for i in kept)
    expected = [w[i] / norm if i in kept else 0.0 for i in range(6)]
    n = 40000
    gen = torch.Generator().manual_seed(11)
    draws = sample_next(torch.tensor([z] * n), T, top_k=k, top_p=p, generator=gen)
    freq = torch.bincount(draws, minlength=6).double() / n
    for f, e in zip(freq.tolist(), expected):
        assert f == pytest.approx(e, abs=4 * math.sqrt(max(e * (1 - e), 1e-12) / n) + 1e-12)
    assert freq[[i for i in range(6) if i not in kept]].sum() == 0.0
    assert len(kept) == {(0.7, 4, 0.8): 2, (0.7, 3, 0.97): 3, (1.3, 0, 0.6): 2, (2.0, 0, 1.0): 6}[(T, k, p)]


def test_generation_ends_rows_at_eos_and_runs_the_others_to_the_budget():
    """A scripted model: row 0 emits EOS at its 3rd token, row 1 never does; nothing after the
    EOS, no pads in the completions, at most max_new_tokens tokens."""
    from posttrain.rollout.generate import generate_token_ids
    from posttrain.rollout.sampling import SamplingSettings

    V, EOS = 10, 2

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
            step = 0 if past_key_values is None else past_key_values + 1
            logits = torch.full((input_ids.shape[0], input_ids.shape[1], V), -1e9)
            logits[:, -1, (5 + step) % V] = 0.0  # every row: token 5, 6, 7, ...
            if step == 2:  # batch row 0 ends instead
                logits[0, -1] = -1e9
                logits[0, -1, EOS] = 0.0
            out = type("Out", (), {})()
            out.logits, out.past_key_values = logits, step
            return out

    settings = SamplingSettings(max_new_tokens=5, temperature=0.0)
    outs = generate_token_ids(Scripted(), [[1, 4], [1, 3, 3]], settings, pad_token_id=0, eos_token_ids={EOS},
                              batch_size=2)
    # rows are ordered longest first inside the batch: prompt 1 is batch row 0
    assert outs[1] == [5, 6, EOS]
    assert outs[0] == [5, 6, 7, 8, 9]


# --------------------------------------------------------------------------- held-out figures


def test_held_out_greedy_answer_is_cut_at_the_stop_string_like_the_rollouts(tiny):
    """held_out_reward: 'reward ... sampled as in the rollouts'; a rollout's completion ends at
    the first stop string and its text is cut before it. Greedy computed by hand here."""
    from posttrain.train.rollouts import held_out_reward

    tokenizer, model = tiny
    prompt = [1, 100, 200, 300]
    ids = list(prompt)
    greedy = []
    with torch.no_grad():
        for _ in range(6):  # plain greedy: full forward, argmax, no cache
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(token)
            ids.append(token)
    assert tokenizer.eos_token_id not in greedy
    texts = [tokenizer.decode([t], skip_special_tokens=True) for t in greedy]
    stop = next(t for t in texts[1:] if t.strip() and t != texts[0])  # a later token's text, e.g. ' z'
    for i in range(len(greedy)):  # the first prefix whose text holds the stop string ends the answer
        text = tokenizer.decode(greedy[: i + 1], skip_special_tokens=True)
        if stop in text:
            expected = text[: text.find(stop)]
            break
    assert expected  # the answer has text before the stop string
    cfg = GRPOConfig.load(None, ["eval.prompts=1", "eval.samples=1", "rollout.max_new_tokens=6"])
    cfg.rollout.stop = [stop]
    seen = []

    def score(prompts, texts, rows):
        seen.append(list(texts))
        return [0.0] * len(texts)

    held_out_reward(model, tokenizer, [prompt], _records(1), score, cfg)
    greedy_texts = seen[-1]  # the sampled answers are scored first, then the greedy one
    assert greedy_texts == [expected]


# --------------------------------------------------------------------------- the PPO stage


def test_ppo_rollout_k3_shaped_rewards_and_gae_against_plain_forwards(tiny):
    """Unwhitened advantages and returns of a rollout: per-token −β·k3(π_old, π_ref) plus the
    score on the last token, GAE(γ, λ) with V from the head on a plain forward's hidden
    states; then the first update sees ratio 1 exactly (no clipping, approx KL 0)."""
    from posttrain.train.ppo import PPOLoss, PPOStage, ValueHead
    from posttrain.train.rollouts import Rollout, RolloutStats

    tokenizer, model = tiny
    model = copy.deepcopy(model)
    torch.manual_seed(6)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.03 * torch.randn_like(param))
    gamma, lam, beta = 0.9, 0.7, 0.3
    cfg = PPOConfig.load(None, ["train.batch_size=4", "eval.sample_every=0", "ppo.kl_estimator=k3",
                                f"ppo.kl_coef={beta}", f"ppo.gamma={gamma}", f"ppo.lam={lam}",
                                "ppo.whiten_advantages=false"])
    head = ValueHead(model.config.hidden_size)
    module = PPOLoss(model, cfg.ppo, value_head=head)
    stage = PPOStage(module, PROMPTS, _records(4), cfg, tokenizer, score=None, run_dir=None,
                     frozen_reference=reference)
    scores = [1.0, -0.5, 2.0, 0.0]
    rollout = Rollout(PROMPTS, COMPLETIONS, ["a"] * 4, _records(4), torch.tensor(scores), RolloutStats(*[0.0] * 8))
    (batch,) = stage._batches(rollout)
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
            values = head(out.hidden_states[-1][0, len(p) - 1 : len(p) + len(c) - 1]).squeeze(-1).to(D).tolist()
        logp, ref = _plain_logps(model, p, c), _plain_logps(reference, p, c)
        log_r = (ref - logp).tolist()
        rewards = [-beta * (math.exp(x) - 1 - x) for x in log_r]
        rewards[-1] += scores[b]
        adv, ret = _gae_by_hand(rewards, values, len(c), gamma, lam)
        assert batch["advantages"][b, : len(c)].tolist() == pytest.approx(adv, abs=2e-5)
        assert batch["returns"][b, : len(c)].tolist() == pytest.approx(ret, abs=2e-5)
        assert batch["old_values"][b, : len(c)].tolist() == pytest.approx(values, abs=1e-5)
    model.train()
    _, metrics = module(**batch)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["approx_kl"]) == 0.0


def test_an_empty_stop_string_is_refused():
    """'' is in every text: as a stop string it would end every rollout completion at its first
    token (the rollouts' stop check, unlike `generate()` and the vLLM engine, does not drop it):
    refused up front."""
    from posttrain.config import validate_grpo
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout.stop"):
        validate_grpo(GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.stop=['']"]))
    validate_grpo(GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.stop=['###']"]))