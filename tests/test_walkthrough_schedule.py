"""A schedule walk: the optimizer and learning-rate schedule a user sets, against transformers' Trainer.

Walked: `lr_factor` against transformers' own schedule functions (`get_linear_schedule_with_warmup`,
`get_cosine_schedule_with_warmup`, `get_cosine_with_min_lr_schedule_with_warmup`, `get_constant_schedule_with_warmup`):
the rate at the first step, through warmup, after it and at the last step; warmup given as a ratio (rounded up, as
transformers does) or as steps; a run planned from `train.epochs` over a data set whose length is not a multiple of
the step, and resumed with another `train.grad_accum` (which README allows: "the data position is counted in
micro-batches, so a run may resume with another number of processes or train.grad_accum"); PPO planned from
`train.epochs` while `ppo.early_stop_kl` cuts rollouts short; a resume with another `train.max_steps`; the
weight-decay groups (biases, norms, embeddings, LoRA); AdamW's defaults; a resume under a changed weight decay and
betas; clipping on the whole step's gradient; the 8-bit optimizers' refusal without CUDA; LoRA+.

What was right: after warmup the decay is transformers' to the last bit (the last step at lr > 0, 1/(T − W) of the
peak under linear), min_lr_ratio is transformers' `min_lr_rate`; the warmup is transformers' shifted one step
earlier (its first step at peak/W rather than 0, its last at the peak: a stated convention, tested elsewhere);
AdamW's betas / eps / weight decay defaults are torch's and transformers'; weight decay goes where transformers'
Trainer puts it; a resumed run steps with its own config's weight decay and betas, as README says; clipping, grad
norm, LoRA+ and the 8-bit refusal already had tests.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 34: each
asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.train.checkpoint import load_optimizer_state
from posttrain.train.loop import train
from posttrain.train.runs import make_accelerator
from posttrain.train.optim import lr_factor, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a toy stage (rows in file order)


class _Net(torch.nn.Module):
    """A linear regression whose forward records the row ids it trains on; `crash_at` (1-based forward
    count) raises, as a killed job would stop."""

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.norm = torch.nn.LayerNorm(4)
        self.calls, self.crash_at, self.seen = 0, crash_at, []

    def forward(self, x, y, rid):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        self.seen += rid.tolist()
        return ((self.lin(self.norm(x)).squeeze(-1) - y) ** 2).sum()


class _Stage:
    def __init__(self, n: int, batch_size: int, crash_at: int | None = None):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1)
        self.bs = batch_size
        self.module = _Net(crash_at)

    def micro_batches(self, epoch):
        for start in range(0, len(self.x), self.bs):
            idx = torch.arange(start, min(start + self.bs, len(self.x)))
            yield {"x": self.x[idx], "y": self.y[idx], "rid": idx}

    def micro_batches_per_epoch(self):
        return math.ceil(len(self.x) / self.bs)

    def weight(self, batch):
        return float(len(batch["y"]))

    def tokens(self, batch):
        return len(batch["y"])

    def eval_micro_batches(self):
        return []


def _train_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=0, epochs=1.0, batch_size=2, lr=0.05, schedule="linear", progress_bar=False,
                max_grad_norm=0.0)
    return TrainConfig(**(base | kw))


def _records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --------------------------------------------------------------------------- defects


@pytest.mark.parametrize("first, then, checkpoint_step", [(1, 2, 4), (2, 1, 2)], ids=["accum_1_to_2", "accum_2_to_1"])
def test_an_epochs_run_resumed_with_another_grad_accum_reads_the_rest_of_the_epoch_once(tmp_path, first, then,
                                                                                        checkpoint_step):
    """16 rows, micro-batches of 2 in file order, train.epochs=1: 8 micro-batches. A checkpoint half-way
    (8 rows read), a crash in the next step, then the same command with train.grad_accum changed, which
    README allows (the position counts micro-batches). The resumed run must read rows 8..15, each once, and
    end at epoch 1.0. Measured: from grad_accum 1 to 2 it reads nothing and ends at step 4 (0.5 epoch, stop
    reason "epochs", no line said); from 2 to 1 it reads rows 8..15 and then rows 0..3 of a second pass."""
    stage = _Stage(16, 2, crash_at=checkpoint_step * first + 1)
    cfg = _train_cfg(grad_accum=first, save_every=checkpoint_step, resume="never")
    with pytest.raises(RuntimeError, match="killed"):
        train(stage, cfg, tmp_path, make_accelerator(cfg, tmp_path))
    resumed = _Stage(16, 2)
    cfg = _train_cfg(grad_accum=then, save_every=checkpoint_step, resume="auto")
    result = train(resumed, cfg, tmp_path, make_accelerator(cfg, tmp_path))
    records = _records(tmp_path)
    assert sorted(resumed.module.seen) == list(range(8, 16)), (
        f"rows read after the resume: {resumed.module.seen} (ended at step {result.step}, "
        f"epoch {records[-1]['epoch']})")
    assert records[-1]["epoch"] == 1.0


def test_ppo_under_train_epochs_with_kl_early_stopping_makes_one_pass_over_the_prompts(tmp_path, monkeypatch):
    """train.epochs=1 ("passes over the training data"), 11 training prompts, rollouts of 4: 2 rollouts a pass,
    each planned at ppo.epochs=4 updates; early_stop_kl=1e-9 stops every rollout after its 2nd update (its
    first sees approx KL 0). One pass is 2 rollouts = 4 optimizer steps, and README's logged `epoch` is "1.0 once
    the first epoch is read". Measured: 8 steps, 4 rollouts, the logged epoch 0.125 .. 0.5 then 1.125 .. 1.5
    (two passes, and the first epoch never reaches 1.0)."""
    from posttrain.config import PPOConfig
    from posttrain.train.ppo import run_ppo

    monkeypatch.chdir(ROOT)  # tests.rewards_fixture is imported from the repository root
    run = run_ppo(PPOConfig.load(None, [
        f"output_dir={tmp_path / 'ppo'}", "data.synthetic_size=12", "rollout.max_new_tokens=3", "train.batch_size=4",
        "ppo.minibatches=1", "ppo.epochs=4", "ppo.early_stop_kl=1e-9", "ppo.kl_coef=0.05", "train.lr=1e-3",
        "train.max_steps=0", "train.epochs=1", "train.schedule=constant", "train.progress_bar=false",
        "eval.prompts=0", "reward.functions=[short=tests.rewards_fixture:short]"]))
    records = _records(run)
    epochs = [r["epoch"] for r in records]
    assert max(epochs) <= 1.0 and epochs[-1] == 1.0, (
        f"{len(records)} steps, ppo_update {[r['ppo_update'] for r in records]}, logged epochs {epochs}")


# --------------------------------------------------------------------------- right, untested so far


def _hf_factors(kind: str, total: int, warmup: int, floor: float) -> list[float]:
    """transformers' schedule multipliers for optimizer steps 0..total-1 (the scheduler is stepped after each
    optimizer step, so step s runs at lr_lambda(s))."""
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "constant":
        sched = get_constant_schedule_with_warmup(opt, warmup)
    elif kind == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
    elif floor:
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=floor)
    else:
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    return [sched.lr_lambdas[0](s) for s in range(total + 1)]


@pytest.mark.parametrize("kind, total, warmup, floor", [
    ("linear", 10, 0, 0.0), ("linear", 10, 3, 0.0), ("cosine", 10, 0, 0.0), ("cosine", 17, 4, 0.0),
    ("cosine", 17, 4, 0.1), ("cosine", 9, 0, 0.25), ("constant", 8, 3, 0.0), ("linear", 7, 2, 0.0),
])
def test_the_schedule_is_transformers_after_warmup_and_its_warmup_one_step_earlier(kind, total, warmup, floor):
    """From the end of warmup on, lr_factor is transformers' multiplier at the same optimizer step, to rounding:
    the last step runs at lr > 0 (linear: 1 / (T − W) of the peak), as transformers' does; min_lr_ratio is its
    cosine `min_lr_rate`. During warmup step s runs at transformers' multiplier of step s + 1: (s + 1) / W, so
    the first step is not spent at lr 0 and the last warmup step is at the peak."""
    hf = _hf_factors(kind, total, warmup, floor)
    ours = [lr_factor(s, total, kind, warmup, floor) for s in range(total)]
    assert ours[warmup:] == pytest.approx(hf[warmup:total], rel=1e-12, abs=1e-15)
    assert ours[:warmup] == pytest.approx(hf[1 : warmup + 1], rel=1e-12)
    assert ours[-1] > 0


def test_adamw_defaults_are_torchs_and_transformers(tmp_path):
    """train.adam_betas / adam_eps / weight_decay default to torch's AdamW betas and eps and to transformers'
    TrainingArguments (betas 0.9 / 0.999, eps 1e-8, weight decay 0.0), and every group takes them."""
    from transformers import TrainingArguments

    hf = TrainingArguments(output_dir=str(tmp_path))
    t = TrainConfig()
    assert (list(t.adam_betas), t.adam_eps, t.weight_decay) == ([hf.adam_beta1, hf.adam_beta2], hf.adam_epsilon,
                                                                hf.weight_decay)
    torch_defaults = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert (tuple(t.adam_betas), t.adam_eps) == (torch_defaults["betas"], torch_defaults["eps"])
    opt = make_optimizer(_Net(), t)
    assert {(g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups} == {((0.9, 0.999), 1e-8, 0.0)}


def test_a_resume_steps_with_its_own_configs_weight_decay_and_betas():
    """README: "A resumed run takes the checkpoint's moments and step counts and its own config's hyperparameters
    (train.lr, weight decay, betas)". torch's load_state_dict alone would bring the checkpoint's back. The
    no-decay groups (the LayerNorm, the bias) stay at 0 under the new weight decay."""
    old_model = _Net()
    old = make_optimizer(old_model, TrainConfig(lr=0.1, weight_decay=0.1, adam_betas=[0.9, 0.999], adam_eps=1e-8))
    old_model(torch.randn(2, 4), torch.zeros(2), torch.arange(2)).backward()
    old.step()
    model = _Net()
    new = make_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.3, adam_betas=[0.8, 0.95], adam_eps=1e-6))
    load_optimizer_state(new, old.state_dict())
    decay_of = {id(p): g["weight_decay"] for g in new.param_groups for p in g["params"]}
    assert decay_of[id(model.lin.weight)] == 0.3
    assert decay_of[id(model.lin.bias)] == decay_of[id(model.norm.weight)] == decay_of[id(model.norm.bias)] == 0.0
    assert {(g["betas"], g["eps"]) for g in new.param_groups} == {((0.8, 0.95), 1e-6)}
    assert all(new.state[p]["step"] == 1 for g in new.param_groups for p in g["params"])  # the moments came back
