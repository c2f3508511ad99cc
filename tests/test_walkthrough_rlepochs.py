"""An RL-epochs walk: how the online-RL stages (GRPO, RLOO, PPO) consume a prompt set, as a user with
a fixed prompt budget checks it.

Walked: `GRPOStage` / `PPOStage` built on a prompt list with their sampling stubbed out (each rollout
records the prompts it was given), read through `micro_batches(epoch)` and `micro_batches_after(epoch,
skip)` as the loop reads them: 95 prompts at 4 a rollout (an epoch of 23 rollouts = 92 prompts), the
order across epochs and seeds, a resume part-way through an epoch (with `grpo.updates_per_rollout` 2 and
`train.grad_accum` 2; with `ppo.epochs` 2), and how μ and PPO's epochs × minibatches count in an
epoch's micro-batches; the held-out split of a prompt file with a prompt given twice (under `prompt`
and under `question`, with different answers), through `data.prompts.prepare_prompts`; and, by hand,
one 1-step GRPO run of 7 prompts at 4 a rollout under `train.epochs=1` (log, `epoch`, `summary.json`).

Right: each epoch's order is a fresh seeded shuffle (the same for the same `train.seed`, another for
another epoch or seed); a resume part-way through an epoch reads exactly the rollouts the
uninterrupted epoch reads after that point, and samples none of those before it; μ and PPO's
epochs × minibatches multiply an epoch's micro-batches, not its prompts; a prompt given twice lands on
one side of the held-out split, so no held-out prompt is trained on.

Wrong: an epoch reads ⌊N / P⌋ whole rollouts and leaves the other N mod P prompts unread, a
different draw every epoch, with nothing said (the 7-prompt run trains on 4 of them, logs `epoch` 1.0
and `stop_reason: epochs`), where the loop's rule for every other stage is that an epoch's short end
is topped up so no example is skipped.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop
35: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import types

import pytest

from posttrain.config import GRPOConfig, PPOConfig

class _Engine:
    """A rollout engine the stages never call here (`_sample` is stubbed): the policy itself."""
    is_policy = True


def _stage(kind: str, n: int, overrides=()):
    """A GRPO or PPO stage on prompts 0..n-1 whose rollouts are stubbed: each rollout's micro-batches
    are {"chosen", "epoch", "index"} dicts, and `stage.sampled` lists the (epoch, index) sampled."""
    from posttrain.train.grpo import GRPOStage
    from posttrain.train.ppo import PPOStage

    if kind == "grpo":
        cfg = GRPOConfig.load(None, ["train.batch_size=8", "rollout.num_generations=2", *overrides])
        cls = GRPOStage
    else:
        cfg = PPOConfig.load(None, ["train.batch_size=4", "ppo.epochs=1", *overrides])
        cls = PPOStage
    stage = cls(types.SimpleNamespace(model=None), [[i] for i in range(n)], list(range(n)), cfg, None, None, None,
                engine=_Engine())
    stage.sampled = []

    def sample(chosen, epoch, index):
        stage.sampled.append((epoch, index))
        return (list(chosen), epoch, index)

    def batches(rollout):
        chosen, epoch, index = rollout
        count = stage.batches_per_update * (cfg.ppo.minibatches if kind == "ppo" else 1)  # the rollout's completions
        return [{"chosen": chosen, "epoch": epoch, "index": index} for _ in range(count)]

    stage._sample, stage._batches = sample, batches
    if kind == "ppo":  # every PPO epoch hands out the rollout's batches (no tensors to regroup here)
        stage._epoch_batches = lambda epoch, index, ppo_epoch: stage.batches
    return stage


def _prompts_read(stage, epoch: int) -> list[int]:
    """The prompts of every rollout one epoch samples, in order (a rollout's batches share its list)."""
    seen, last = [], None
    for batch in stage.micro_batches(epoch):
        if (batch["epoch"], batch["index"]) != last:
            last = (batch["epoch"], batch["index"])
            seen += batch["chosen"]
    return seen


# --------------------------------------------------------------------------- the prompts an epoch reads


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_failure_an_rl_epoch_reads_every_training_prompt(kind):
    """95 prompts at 4 a rollout: an epoch is 23 whole rollouts (92 prompts). The loop's rule for an
    epoch's short end (`loop._steps`: topped up "so no example is skipped") and README's "passes over
    the prompts" both say every prompt is read each epoch; the stage leaves 3 unread each epoch,
    a different 3 each time (so under train.epochs=1 three prompts are never trained, and nothing
    says so)."""
    stage = _stage(kind, 95)
    assert stage.prompts_per_rollout == 4
    for epoch in range(2):
        read = _prompts_read(stage, epoch)
        unread = sorted(set(range(95)) - set(read))
        assert not unread, (f"{kind} epoch {epoch}: {len(set(read))} of 95 prompts read in "
                            f"{stage.rollouts_per_epoch()} rollouts; never read: {unread}")


def test_each_epoch_is_a_fresh_seeded_shuffle_the_same_for_the_same_seed():
    """The order of an epoch is a shuffle drawn from (train.seed, epoch): another stage with the same
    seed reads it prompt for prompt, the next epoch and another seed read another order, and within an
    epoch no prompt is read twice."""
    first, again = _stage("grpo", 40), _stage("grpo", 40)
    other_seed = _stage("grpo", 40, ["train.seed=1"])
    epoch0 = _prompts_read(first, 0)
    assert epoch0 == _prompts_read(again, 0)
    assert len(epoch0) == len(set(epoch0)) == 40
    assert epoch0 != list(range(40))  # shuffled
    assert _prompts_read(first, 1) != epoch0
    assert _prompts_read(other_seed, 0) != epoch0
    ppo = _stage("ppo", 40)
    assert _prompts_read(ppo, 0) == _prompts_read(_stage("ppo", 40), 0)


@pytest.mark.parametrize("kind, overrides, per_rollout", [
    ("grpo", ["grpo.updates_per_rollout=2", "train.grad_accum=2"], 4),  # μ 2 × 2 micro-batches a step
    ("ppo", ["ppo.epochs=2", "ppo.minibatches=2", "train.grad_accum=2"], 8),  # 2 × 2 updates × 2 micro-batches
])
def test_mu_and_ppo_epochs_multiply_an_epochs_micro_batches_not_its_prompts(kind, overrides, per_rollout):
    """An epoch of 40 prompts: rollouts_per_epoch counts the rollouts that read its prompts (every
    prompt, the last rollout topped up), and micro_batches_per_epoch those rollouts × their updates × the micro-batches of a
    step: the length of the generator the loop reads."""
    stage = _stage(kind, 40, overrides)
    batches = list(stage.micro_batches(0))
    rollouts = stage.rollouts_per_epoch()
    assert (rollouts - 1) * stage.prompts_per_rollout < 40 <= rollouts * stage.prompts_per_rollout
    assert len(batches) == stage.micro_batches_per_epoch() == rollouts * per_rollout
    assert stage.sampled == [(0, i) for i in range(rollouts)]  # each rollout sampled once, reused by its updates


@pytest.mark.parametrize("kind, overrides", [
    ("grpo", ["grpo.updates_per_rollout=2", "train.grad_accum=2"]),
    ("ppo", ["ppo.epochs=2", "train.grad_accum=2"]),
])
def test_a_resume_part_way_through_an_epoch_reads_what_the_uninterrupted_epoch_reads(kind, overrides):
    """The loop resumes at a step's end, `skip` micro-batches into the epoch: the resumed generator
    hands out exactly the rest of the uninterrupted epoch's micro-batches (the same prompts, the same
    rollouts), and samples only the rollouts from the one it resumes in (those before are skipped
    without generating; with no checkpointed rollout the one it resumes inside is sampled anew, as
    the uninterrupted run sampled it, seeded by its position)."""
    whole = _stage(kind, 40, overrides)
    full = [(b["epoch"], b["index"], tuple(b["chosen"])) for b in whole.micro_batches(1)]
    group = whole.batches_per_update
    for steps in (1, 2, 3, 5):
        resumed = _stage(kind, 40, overrides)
        tail = [(b["epoch"], b["index"], tuple(b["chosen"])) for b in resumed.micro_batches_after(1, steps * group)]
        assert tail == full[steps * group :]
        assert resumed.sampled == sorted({(e, i) for e, i, _ in tail})


# --------------------------------------------------------------------------- held-out prompts


def test_a_prompt_given_twice_is_held_out_or_trained_never_both(tmp_path):
    """data.eval_fraction splits an RL prompt file by prompt: the same question under `prompt` and
    under `question` (GSM8K's key), with different answers, lands on one side, for every seed tried,
    and no held-out prompt's turns are among the training prompts'."""
    from posttrain.config import GRPOConfig as Config
    from posttrain.data.prompts import prepare_prompts

    rows = [{"prompt": f"Smallest letter: {a} {b}", "answer": min(a, b)} for a, b in zip("bdfhjlnprt", "acegikmoqs")]
    rows += [{"question": f"Smallest letter: {a} {b}", "answer": "?"} for a, b in zip("bdfhjlnprt", "acegikmoqs")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = Config.load(None, [f"data.train_files=[{path}]", "data.eval_fraction=0.3"]).data
    for seed in range(6):
        train, held_out, _ = prepare_prompts(cfg, None, seed, lambda _: None)
        assert len(train) + len(held_out) == 20 and held_out
        trained = {json.dumps(r.prompt) for r in train}
        assert not trained & {json.dumps(r.prompt) for r in held_out}
        assert len(held_out) % 2 == 0  # whole pairs
