"""A numerics walk: what a user meets when numbers go wrong or precision changes.

Walked: the pure losses (DPO / cDPO / IPO / hinge / SimPO / ORPO / KTO / Bradley-Terry / K-way ranking,
the clipped surrogate, group advantages, the KL estimators) at extreme inputs in float32 — log-prob
differences of ±1e4, β tiny and huge, a response of probability 0 — against float64 closed forms written
out here; values that are finite in Python's float64 but not in the float32 a run computes in (a reward,
a pair's margin); low-precision weights (bfloat16 weights and AdamW's moments, a LoRA merged into a
bfloat16 model); a run that diverges, a held-out loss that is NaN once, and the figures a step logs when
its micro-batches split a rollout differently (`train.grad_accum`).

Every expected figure comes from a formula written out here in float64, or from an invariant the README
states (the same step for batch 8 x accumulation 1 and batch 2 x accumulation 4).

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 30: each
asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHATS = [(f"Copy: {a} {b}", f"{a} {b}") for a, b in zip("abcdefgh", "qrstuvwx")]
PAIRS = [("Smallest letter: q m t", "m", "t"), ("Copy: a b", "a b", "b a b a"),
         ("Reverse: x y z", "z y x", "x y z"), ("Smallest letter: k d", "d", "k")]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # `tests.rewards_fixture:short` is imported from the repository root


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                     {"role": "assistant", "content": a}]}) + "\n" for u, a in CHATS))
    return path


def _f64_log_sigmoid(x: float) -> float:
    """log σ(x) in float64 without overflow: −softplus(−x)."""
    return -(max(-x, 0.0) + math.log1p(math.exp(-abs(x))))


def _f64_sigmoid(x: float) -> float:
    return math.exp(_f64_log_sigmoid(x))


# --------------------------------------------------------------------------- the pure losses at extremes


# (name, call on float32 tensors (pc, pr, rc, rr), float64 closed form of the loss)
def _pair_losses(beta):
    from posttrain.losses import preference as P

    def dpo(pc, pr, rc, rr):
        return -_f64_log_sigmoid(beta * ((pc - rc) - (pr - rr)))

    def cdpo(pc, pr, rc, rr):  # ε = 0.25
        z = beta * ((pc - rc) - (pr - rr))
        return -0.75 * _f64_log_sigmoid(z) - 0.25 * _f64_log_sigmoid(-z)

    def ipo(pc, pr, rc, rr):
        return (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2

    def hinge(pc, pr, rc, rr):
        return max(0.0, 1 - beta * ((pc - rc) - (pr - rr)))

    def simpo(pc, pr, rc, rr):  # average log-probs pc, pr; γ = 0.5
        return -_f64_log_sigmoid(beta * pc - beta * pr - 0.5)

    def kto(pc, pr, rc, rr):  # desirable, z0 = 0.3
        return 1.0 - _f64_sigmoid(beta * ((pc - rc) - 0.3))

    def bt(pc, pr, rc, rr):  # rewards pc, pr; margin 0.5
        return -_f64_log_sigmoid(pc - pr - 0.5)

    return [
        ("dpo", lambda a, b, c, d: P.dpo_loss(a, b, c, d, beta)[0], dpo),
        ("cdpo", lambda a, b, c, d: P.dpo_loss(a, b, c, d, beta, 0.25)[0], cdpo),
        ("ipo", lambda a, b, c, d: P.ipo_loss(a, b, c, d, beta)[0], ipo),
        ("hinge", lambda a, b, c, d: P.hinge_loss(a, b, c, d, beta)[0], hinge),
        ("simpo", lambda a, b, c, d: P.simpo_loss(a, b, beta, 0.5)[0], simpo),
        ("kto", lambda a, b, c, d: P.kto_loss(a, c, torch.tensor([True]), torch.tensor(0.3), beta)[0], kto),
        ("bt", lambda a, b, c, d: P.bradley_terry_loss(a, b, 0.5), bt),
    ]


def _f64_gradient(formula, point: list[float], i: int) -> float:
    """∂formula/∂point[i] by a central difference in float64, the step scaled to the point."""
    step = 1e-6 * max(1.0, abs(point[i]))
    up, down = list(point), list(point)
    up[i] += step
    down[i] -= step
    return (formula(*up) - formula(*down)) / (2 * step)


@pytest.mark.parametrize("beta", [1e-3, 10.0])
@pytest.mark.parametrize("difference", [1e4, -1e4])
def test_pair_losses_in_float32_at_log_prob_differences_of_ten_thousand_equal_float64(beta, difference):
    """A run computes these in float32 (sums of response log-probs can differ by thousands between a
    long chosen and a short rejected response). Each loss and its gradients stay finite and equal the
    float64 closed form: log σ through softplus, never log(σ(x)), which is −inf past x ≈ −104."""
    point = [-20.0, -20.0 - difference, -30.0, -30.0]  # policy chosen, policy rejected, ref chosen, ref rejected
    for name, loss_fn, formula in _pair_losses(beta):
        inputs = [torch.tensor([v], dtype=torch.float32, requires_grad=True) for v in point]
        loss = loss_fn(*inputs)
        loss.sum().backward()
        value = loss.detach().item()
        assert math.isfinite(value), name
        assert value == pytest.approx(formula(*point), rel=1e-5, abs=1e-5), name
        for i, tensor in enumerate(inputs):  # (no point here sits on hinge's kink at βh = 1)
            got = 0.0 if tensor.grad is None else tensor.grad.item()
            assert math.isfinite(got), (name, i)
            assert got == pytest.approx(_f64_gradient(formula, point, i), rel=1e-3, abs=1e-6), (name, i)


def test_ranking_loss_in_float32_at_reward_gaps_of_ten_thousand_equals_float64():
    """K-way ranking (InstructGPT Eq. 1), three responses ranked 0, 1, 2 with rewards 1e4 apart in the
    wrong order: each of the 3 pairs' −log σ(r_i − r_j) is |gap|, their mean 4e4/3; finite gradients."""
    from posttrain.losses.preference import ranking_loss

    rewards = torch.tensor([[-1e4, 0.0, 1e4]], requires_grad=True)
    loss = ranking_loss(rewards, torch.tensor([[0, 1, 2]]))
    loss.sum().backward()
    pairs = [(-1e4, 0.0), (-1e4, 1e4), (0.0, 1e4)]  # (better, worse) by rank
    expected = sum(-_f64_log_sigmoid(b - w) for b, w in pairs) / 3
    assert loss.detach().item() == pytest.approx(expected, rel=1e-6)
    assert rewards.grad.tolist()[0] == pytest.approx([-2 / 3, 0.0, 2 / 3], abs=1e-6)


def test_dpo_loss_of_a_rejected_response_with_probability_zero_is_zero_not_nan():
    """losses.preference.dpo_loss, a pure function a library user calls with log-probs from their own
    model (one with -inf logits on banned tokens gives −inf log-probs): with the rejected response's
    policy log-prob −inf and the others finite, βh = +inf and DPO's −log σ(βh) is 0 (hinge's max(0, 1 − βh)
    already is). The cDPO term ε · log σ(−βh) with ε = 0 is 0 · −inf = NaN, so the pair's loss is NaN,
    and in a batch the step is skipped as non-finite."""
    from posttrain.losses.preference import dpo_loss, hinge_loss

    inf = float("inf")
    args = [torch.tensor([v]) for v in (-3.0, -inf, -4.0, -4.0)]
    assert float(hinge_loss(*args, 0.1)[0]) == 0.0
    assert float(dpo_loss(*args, 0.1)[0]) == 0.0


def test_group_advantages_and_kl_estimators_are_exactly_zero_where_nothing_differs():
    """README: group statistics in float64, so a group of equal rewards has advantage exactly 0 — with
    rewards float32 cannot hold exactly (0.1) and any group size; GRPO's group of one sample is 0 too
    (no comparison, no signal), RLOO refuses it. k1, k2, k3 of a policy against itself are exactly 0."""
    from posttrain.losses.policy_gradient import group_advantages, kl_k1, kl_k2, kl_k3, rloo_advantages

    equal = torch.full((3 * 7,), 0.1)
    for scale in (True, False):
        assert torch.equal(group_advantages(equal, 7, scale_by_std=scale), torch.zeros(21))
        assert torch.equal(group_advantages(torch.tensor([0.3, -2.0, 1e6]), 1, scale_by_std=scale), torch.zeros(3))
    assert torch.equal(rloo_advantages(equal, 7), torch.zeros(21))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(equal, 1)
    logps = torch.randn(4, 9, generator=torch.Generator().manual_seed(0)) * 30 - 10
    for estimator in (kl_k1, kl_k2, kl_k3):
        assert torch.equal(estimator(logps, logps.clone()), torch.zeros(4, 9))


# --------------------------------------------------------------------------- finite in float64, not in float32


def _grpo_cfg(out: Path, *extra: str):
    from posttrain.config import GRPOConfig

    return GRPOConfig.load(None, [
        f"output_dir={out}", "model.path=tiny-2l", "data.synthetic_size=40", "rollout.max_new_tokens=4",
        "train.batch_size=8", "rollout.num_generations=4", "train.max_steps=2", "train.resume=never",
        "train.lr=1e-3", "train.progress_bar=false", "eval.prompts=0", *extra])


def test_a_reward_beyond_float32_range_is_refused_by_name_or_trained(tmp_path, monkeypatch):
    """rewards.py: "a component that returns a non-finite value ... stops ... with its name". A reward of
    1e39 (an exp() of a score, say) is finite where it is checked and becomes inf in
    `rollouts.sample_and_score`'s `rewards.float()`; the group's advantages are then inf − inf = NaN and
    every step is "non-finite loss or gradient norm; the update was skipped" — after 5, exit 3 with
    "lower train.lr". Either refuse it naming the reward (as for NaN) or keep the rewards float64 until
    the advantages (which are computed in float64 anyway) and train."""
    from posttrain.errors import DataError
    from posttrain.train.grpo import run_grpo

    (tmp_path / "numerics_big_reward.py").write_text(
        "def big(prompt, response):\n    return 1e39 if len(response) % 2 else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run_dir = run_grpo(_grpo_cfg(tmp_path / "run", "reward.functions=[big=numerics_big_reward:big]"))
    except DataError as exc:
        assert "'big'" in str(exc)
        return
    records = _records(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0]
    assert all(math.isfinite(r["loss"]) for r in records)


def test_a_margin_beyond_float32_range_is_a_bad_row(tmp_path):
    """A margin that is a whole number too large for a float is a bad row named by file:line
    (test_walkthrough_fuzz); 1e39, a float, passes `_number`'s isfinite and becomes inf in the batch's
    float32 margins: −log σ(r_w − r_l − inf) = inf, every step that holds the row is skipped, and the
    run ends with "check the data for extreme rows" without saying which."""
    from posttrain.config import RMConfig
    from posttrain.errors import DataError
    from posttrain.train.reward import run_rm

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r, "margin": 1e39 if i == 1 else 1.0})
                             + "\n" for i, (p, c, r) in enumerate(PAIRS)))
    with pytest.raises(DataError) as exc:
        run_rm(RMConfig.load(None, [f"output_dir={tmp_path / 'run'}", "model.path=tiny-2l", f"data.train_files=[{pairs}]",
                                    "data.eval_fraction=0", "train.batch_size=4", "train.max_steps=2",
                                    "train.progress_bar=false", "train.resume=never"]))
    assert f"{pairs}:2" in str(exc.value) and "margin" in str(exc.value)


# --------------------------------------------------------------------------- low-precision weights


def test_adamw_second_moment_of_a_bfloat16_weight_follows_its_formula():
    """README, Models: "Weights trained in bfloat16 have no float32 master copy: an update below ~1/256
    of a weight rounds away, and the run says so". The optimizer's moments are bfloat16 too (torch's
    state follows the parameter), and there v ← 0.999·v + 0.001·g² can never go down: 0.999·v rounds
    back to v (a 0.1% change, under bfloat16's half-ulp of 0.2%). After one large gradient (a spike at
    the start), every later step of that weight stays too small, silently, for the rest of the run.
    Here: g = 1 once, then g = 0.01 for 299 steps; AdamW's v is 0.001·0.999^299 + 1e-4·(1 − 0.999^299)."""
    from posttrain.config import TrainConfig
    from posttrain.train.optim import make_optimizer

    model = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-6, weight_decay=0.0))
    for step in range(300):
        model.weight.grad = torch.full_like(model.weight, 1.0 if step == 0 else 0.01)
        optimizer.step()
    expected = 0.001 * 0.999**299 + 1e-4 * (1 - 0.999**299)  # 0.000767
    v = optimizer.state[model.weight]["exp_avg_sq"].double()
    assert v.tolist()[0] == pytest.approx([expected] * 4, rel=0.01)


def _lora_run(tmp_path: Path) -> Path:
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    return run_sft(SFTConfig.from_dict({
        "output_dir": str(tmp_path / "lora"), "model": {"path": "tiny-2l"}, "adapter": {"method": ["lora"]},
        "data": {"train_files": [str(_chat_file(tmp_path))], "max_length": 48, "eval_fraction": 0.0},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "progress_bar": False, "resume": "never"}}))


def test_merge_into_bfloat16_rounds_each_weight_once(tmp_path, capsys):
    """`posttrain merge RUN OUT --dtype bfloat16` of a LoRA trained on a float32 base: the merged weight
    should be W + s·B·A rounded once to bfloat16 (float32 arithmetic on the way may move a rare
    element by an ulp). The base is loaded in bfloat16 first, so W is rounded, then W_bf16 + ΔW is
    rounded again: ~28% of the adapted layers' elements differ, the error to the exact merge is ~1.4x
    a single rounding's, and an update under half a bfloat16 ulp of its weight is dropped entirely.
    Fix: load the base in float32 (or the checkpoint's dtype), merge, then cast once."""
    from safetensors.torch import load_file

    from posttrain.models.presets import preset_path
    from tests.cli_runner import run_cli

    run = _lora_run(tmp_path)
    out = tmp_path / "merged"
    rc, text = run_cli(capsys, "merge", run, out, "--dtype", "bfloat16")
    assert rc == 0, text
    base = load_file(str(preset_path("tiny-2l") / "model.safetensors"))
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    merged = load_file(str(out / "model.safetensors"))
    differing = total = 0
    for name, weight in base.items():
        stem = name.removesuffix(".weight")
        a = [v for k, v in adapter.items() if f"{stem}.lora_A" in k]
        b = [v for k, v in adapter.items() if f"{stem}.lora_B" in k]
        if not a:
            continue
        exact = weight.double() + scale * (b[0].double() @ a[0].double())
        assert merged[name].dtype == torch.bfloat16
        differing += int((merged[name] != exact.to(torch.bfloat16)).sum())
        total += weight.numel()
    assert total > 0
    assert differing <= 1e-3 * total, f"{differing} of {total} merged elements are not W + ΔW rounded once"


# --------------------------------------------------------------------------- divergence and NaN in a run


def test_a_diverging_run_names_each_skipped_step_and_saves_finite_weights(tmp_path, capsys):
    """README, The training loop: a NaN/inf loss or gradient norm skips the update and is counted.
    An SFT run at lr 1e20: step 1 is finite and throws the weights to ~1e20, after which the
    gradients are NaN. Each later step is named on the console, logged with `nonfinite`, counted in
    summary.json; the final weights are the last finite ones (no NaN saved)."""
    from safetensors.torch import load_file

    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    run = run_sft(SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny-2l"},
        "data": {"train_files": [str(_chat_file(tmp_path))], "max_length": 48, "eval_fraction": 0.0},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e20, "schedule": "constant", "progress_bar": False,
                  "resume": "never"}}))
    text = capsys.readouterr()
    text = text.err + text.out
    records = [r for r in _records(run) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2]
    assert "nonfinite" not in records[0] and records[1]["nonfinite"] and records[2]["nonfinite"]
    for step in (2, 3):
        assert f"step {step}: non-finite loss or gradient norm; the update was skipped" in text
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 2
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


class _Regression(torch.nn.Module):
    """A linear regression whose first held-out loss is NaN (as an fp16 overflow on one eval would be)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)
        self.evaluations = 0

    def forward(self, x, y, held_out=None):
        loss = ((self.linear(x).squeeze(-1) - y) ** 2).sum()
        if held_out is not None:
            self.evaluations += 1
            if self.evaluations == 1:
                loss = loss * float("nan")
        return loss


class _RegressionStage:
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.eval_x = torch.randn(32, 4, generator=g), torch.randn(16, 4, generator=g)
        self.module = _Regression()

    def micro_batches(self, epoch):
        for i in range(0, 32, 8):
            yield {"x": self.x[i:i + 8], "y": self.x[i:i + 8].sum(-1)}

    def micro_batches_per_epoch(self):
        return 4

    def weight(self, batch):
        return float(len(batch["y"]))

    def tokens(self, batch):
        return len(batch["y"])

    def eval_micro_batches(self):
        return [{"x": self.eval_x, "y": self.eval_x.sum(-1), "held_out": torch.ones(1)}]


def test_a_nan_eval_loss_is_not_the_best_that_early_stopping_compares_to(tmp_path):
    """loop._early_stop: `if best is None or eval_loss < best` stores a first NaN as the best, and every
    finite loss after it compares False: "early stop at step 4: no eval improvement in 3 evals" while
    the held-out loss went 5.93, 5.49, 5.06. (The NaN is also written into the checkpoint's
    loop_state.json as the bare token NaN.) A non-finite eval loss should not count as the best."""
    from posttrain.config import TrainConfig
    from posttrain.train.loop import train
    from posttrain.train.runs import make_accelerator

    cfg = TrainConfig(max_steps=12, batch_size=8, lr=0.05, schedule="constant", warmup_steps=0, progress_bar=False,
                      resume="never", eval_every=1, early_stopping_patience=3)
    result = train(_RegressionStage(), cfg, tmp_path, make_accelerator(cfg, tmp_path))
    evals = [r["eval_loss"] for r in _records(tmp_path) if "eval_loss" in r]
    assert evals[0] is None and all(later < earlier for earlier, later in zip(evals[1:], evals[2:]))
    assert not result.stopped_early and result.step == 12


# --------------------------------------------------------------------------- accumulation: figures of a step


def _split_runs(tmp_path: Path, stage: str, aggregation: str):
    """The same rollout of 8 completions trained as batch 8 x accumulation 1 and batch 2 x accumulation 4;
    completions end at a stop string, so their lengths differ."""
    from posttrain.config import GRPOConfig, PPOConfig
    from posttrain.train.grpo import run_grpo
    from posttrain.train.ppo import run_ppo

    runs = []
    for batch, accum in ((8, 1), (2, 4)):
        common = [f"output_dir={tmp_path / f'{stage}{batch}'}", "model.path=tiny-2l", "data.synthetic_size=24",
                  "rollout.max_new_tokens=6", "rollout.stop=[e]", f"train.batch_size={batch}",
                  f"train.grad_accum={accum}", "train.max_steps=2", "train.resume=never", "train.lr=3e-2",
                  "train.schedule=constant", "train.progress_bar=false", "eval.prompts=0",
                  "reward.functions=[short=tests.rewards_fixture:short]"]
        if stage == "ppo":
            runs.append(_records(run_ppo(PPOConfig.load(None, common + ["ppo.epochs=2",
                                                                        f"ppo.aggregation={aggregation}"]))))
        else:
            runs.append(_records(run_grpo(GRPOConfig.load(None, common + [
                "rollout.num_generations=4", "grpo.updates_per_rollout=2", "grpo.beta=0.1",
                f"grpo.aggregation={aggregation}"]))))
    return runs


_FIGURES = {"ppo": ("approx_kl", "clip_fraction", "value_clip_fraction"), "grpo": ("clip_fraction",)}


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_sequence_aggregation_figures_do_not_depend_on_the_micro_batch_split(tmp_path, stage):
    """README: batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same update — and the
    second step's loss is the same here. Its `approx_kl` (which `ppo.early_stop_kl` compares to, so it
    decides the updates), `clip_fraction` and `value_clip_fraction` are not: PPOLoss / GroupPolicyLoss
    multiply each micro-batch's token mean by its response count, a mean of micro-batch means that
    changes with the split (clip_fraction 0.514 against 0.633 for PPO, 0.371 against 0.5 for GRPO).
    Under sequence aggregation the figure should be Σ over responses of each one's token mean, / responses
    (`rollouts.summed`), as the loss, entropy and kl already are."""
    whole, split = _split_runs(tmp_path, stage, "sequence")
    assert whole[1]["loss"] == pytest.approx(split[1]["loss"], rel=1e-5)  # the same update
    assert whole[1]["clip_fraction"] > 0  # the ratios moved: the figures are in play
    for name in _FIGURES[stage]:
        assert whole[1][name] == pytest.approx(split[1][name], rel=1e-5, abs=1e-7), name


def test_token_aggregation_figures_do_not_depend_on_the_micro_batch_split(tmp_path):
    """The same two PPO runs under token aggregation: loss, approx_kl and the clip fractions of the
    second step agree whatever the split (the figure is Σ over tokens / tokens)."""
    whole, split = _split_runs(tmp_path, "ppo", "token")
    assert whole[1]["clip_fraction"] > 0
    for name in ("loss", "entropy") + _FIGURES["ppo"]:
        assert whole[1][name] == pytest.approx(split[1][name], rel=1e-5, abs=1e-7), name
