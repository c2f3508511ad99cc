"""Stop 34, PPO backlog items:
- every PPO epoch after the first regroups the rollout's completions into new minibatches (a
  seeded draw from train.seed and the position in the run, so a resumed run draws the same), each
  row keeping its own rollout-time numbers; the first keeps the rollout's micro-batches (ratio 1);
- rollout/reward_mean and reward_std are the rewards before reward.normalize (and reward.clip), the
  figure that shows learning; the rewards trained on are still normalised;
- benchmarks/rl/report.py, as dpo/report.py (one rule in benchmarks/common.py): a case whose parity
  fails (prompts, completions, step-1 KL, the fixed-batch loss and gradient) reads "parity failed"
  in the verdict and the driver exits non-zero after writing its page."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import PPOConfig

# --------------------------------------------------------------------------- PPO minibatches


def _stage(*overrides, prompts=8):
    """A PPOStage whose rollouts are made up: prompt i's completion carries i in every per-token tensor."""
    from posttrain.data.prompts import PromptRecord
    from posttrain.train.ppo import PPOStage
    from posttrain.train.rollouts import collate_completions

    cfg = PPOConfig.load(None, ["train.batch_size=2", "ppo.minibatches=4", "ppo.epochs=3", "eval.sample_every=0",
                                *overrides])
    ids = [[1, 5 + i] for i in range(prompts)]
    records = [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"t:{i}") for i in range(prompts)]
    stage = PPOStage(None, ids, records, cfg, SimpleNamespace(pad_token_id=0), None, None,
                     engine=SimpleNamespace(is_policy=True))

    def batches(chosen):
        stage.rollouts.append(list(chosen))
        out = []
        for start in range(0, len(chosen), cfg.train.batch_size):
            rows = chosen[start : start + cfg.train.batch_size]
            batch = collate_completions([ids[i] for i in rows], [[20 + i] * (1 + i % 3) for i in rows], 0)
            tag = torch.tensor(rows, dtype=torch.float32)[:, None] * batch["response_mask"]
            batch.update(advantages=tag, returns=(tag + 0.5) * batch["response_mask"], old_logps=-tag, old_values=tag * 2)
            out.append(batch)
        return out

    stage.rollouts = []
    stage._sample = lambda chosen, epoch, index: chosen
    stage._batches = batches
    return stage


def _prompt_of(batch, row):
    return int(batch["input_ids"][row, 1]) - 5


def _updates(stage, epoch=0, skip=0):
    """[(ppo update, [prompt indices of its micro-batches' rows])] for the first rollout."""
    out = []
    for batch in stage.micro_batches_after(epoch, skip):
        if stage.position[1] != 0:
            break
        rows = [_prompt_of(batch, r) for r in range(batch["input_ids"].shape[0])]
        if out and out[-1][0] == stage.position[2]:
            out[-1][1].extend(rows)
        else:
            out.append((stage.position[2], rows))
    return out


def _partitions(updates, minibatches):
    """Per PPO epoch, its minibatches as a set of frozensets of prompt indices."""
    return [{frozenset(rows) for _, rows in updates[e : e + minibatches]} for e in range(0, len(updates), minibatches)]


def test_each_ppo_epoch_regroups_the_rollouts_samples_into_new_minibatches():
    stage = _stage()
    updates = _updates(stage)
    assert [u for u, _ in updates] == list(range(1, 13))  # 3 epochs x 4 minibatches
    epochs = _partitions(updates, 4)
    chosen = stage.rollouts[0]
    rollout = sorted(chosen)
    assert len(rollout) == 8
    for part in epochs:  # every completion once per PPO epoch, two to a minibatch
        assert sorted(i for mb in part for i in mb) == rollout and all(len(mb) == 2 for mb in part)
    # the first epoch keeps the rollout's micro-batches (their old log-probs were taken on them)
    assert epochs[0] == {frozenset(chosen[i : i + 2]) for i in range(0, 8, 2)}
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1]  # new minibatches every epoch


def test_regrouped_rows_keep_their_own_rollout_numbers():
    stage = _stage("ppo.epochs=2")
    for batch in stage.micro_batches_after(0, 0):
        mask = batch["response_mask"]
        for r in range(mask.shape[0]):
            i, width = _prompt_of(batch, r), int(mask[r].sum())
            assert width == 1 + i % 3
            assert batch["input_ids"][r, 2 : 2 + width].tolist() == [20 + i] * width
            assert int(batch["attention_mask"][r].sum()) == 2 + width
            for key, scale, shift in (("advantages", 1, 0), ("returns", 1, 0.5), ("old_logps", -1, 0),
                                      ("old_values", 2, 0)):
                assert batch[key][r].tolist() == [scale * i + shift] * width + [0.0] * (mask.shape[1] - width)
            tokens = (batch["token_row"] == r).nonzero()[:, 0]
            assert batch["targets"][tokens].tolist() == [20 + i] * width
            assert batch["token_col"][tokens].tolist() == list(range(width))
            length = batch["input_ids"].shape[1]
            assert batch["predictor"][tokens].tolist() == [r * length + 1 + j for j in range(width)]


def test_the_regrouping_is_seeded_and_a_resume_mid_rollout_draws_the_same():
    whole = _updates(_stage())
    assert _updates(_stage()) == whole  # the same seed, the same minibatches
    assert _updates(_stage("train.seed=1")) != whole
    first = _stage()
    batches = first.micro_batches_after(0, 0)
    for _ in range(6):  # stop after 6 updates (inside the second PPO epoch): a checkpoint
        next(batches)
    plain, tensors = first.state_dict()
    resumed = _stage()
    resumed.load_state_dict(plain, tensors)
    assert _updates(resumed, 0, 6) == whole[6:]


# --------------------------------------------------------------------------- the logged reward


class _Engine:
    generation_config = None
    is_policy = True

    def __init__(self, outs):
        self.outs = outs

    def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
        return [list(o) for o in self.outs]


@pytest.mark.parametrize("normalize", ["true", "false"])
def test_rollout_reward_mean_is_the_reward_before_normalising_and_clipping(normalize):
    from posttrain.data.prompts import PromptRecord
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.rollouts import sample_and_score

    tokenizer = load_tokenizer("tiny-2l")
    eos = tokenizer.eos_token_id
    outs = [[30, eos], [31, 32], [33, eos], [34, eos]]  # the second never ends
    raw = [3.0, 1.0, 0.0, 2.5]
    cfg = PPOConfig.load(None, ["rollout.max_new_tokens=2", "reward.no_eos_penalty=0.5",
                                f"reward.normalize={normalize}", "reward.clip=1.0"])
    records = [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"t:{i}") for i in range(4)]
    rollout = sample_and_score(_Engine(outs), tokenizer, [[1, 5]] * 4, records, [0, 1, 2, 3], cfg,
                               lambda p, t, rows: list(raw), seed=0)
    penalised = [3.0, 0.5, 0.0, 2.5]
    assert rollout.stats.reward_mean == pytest.approx(statistics.fmean(penalised), abs=1e-6)  # 1.5, not ~0
    assert rollout.stats.reward_std == pytest.approx(statistics.stdev(penalised), abs=1e-6)
    if normalize == "true":  # what trains is still normalised, then clipped
        assert abs(float(rollout.rewards.mean())) < 0.2 and float(rollout.rewards.max()) == 1.0
    else:
        assert rollout.rewards.tolist() == [1.0, 0.5, 0.0, 1.0]


# --------------------------------------------------------------------------- the RL benchmark's parity rule


def _rl_report(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.setattr(sys, "path", [str(bench), str(bench / "rl"), *sys.path])
    spec = importlib.util.spec_from_file_location("s34_bench_rl_report", bench / "rl" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, json.loads((bench / "results" / "rl_cpu.json").read_text())


def _replay(monkeypatch, report, stored, tmp_path, name):
    """report.main on results/rl_cpu.json's own runs, each child answered from the stored file."""
    import copy as copying
    import sys

    runs = {(r["case"], r["tool"], r["variant"]): list(r["runs"]) for r in stored["rows"]}

    def child(case, tool, variant, args, out, log):
        if tool == "same_batch":
            return copying.deepcopy(stored["rloo_loss_parity" if case == "rloo" else "loss_parity"])
        return copying.deepcopy(runs[(case, tool, variant)].pop(0))

    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    (cache / "assets.json").write_text(json.dumps(stored["assets"]))
    monkeypatch.setattr(report, "child", child)
    monkeypatch.setattr(sys, "argv", ["report.py", "--cache", str(cache), "--results", str(tmp_path / "results"),
                                      "--name", name, "--runs", stored["settings"]["order"], "--rounds", "2"])
    report.main()


def _met_column(page: str) -> dict[str, str]:
    verdicts = page.split("## Verdict")[1]
    return {line.split("|")[1].strip(): line.rstrip("|").split("|")[-1].strip()
            for line in verdicts.splitlines() if line.startswith("| grpo") or line.startswith("| rloo")}


def test_rl_report_claims_no_target_and_exits_nonzero_when_a_case_fails_its_parity(monkeypatch, tmp_path, capsys):
    report, stored = _rl_report(monkeypatch)
    _replay(monkeypatch, report, stored, tmp_path, "good")  # parity holds: the page, no exit
    good = (tmp_path / "results" / "good.md").read_text()
    assert set(_met_column(good).values()) == {"no"}  # the stored verdicts: no target met, parity fine
    bad = json.loads(json.dumps(stored))
    for row in bad["rows"]:
        if row["case"] == "grpo_kl" and row["tool"] == "posttrain":
            row["runs"][1]["kl"][0] = 0.3  # the second repeat's step-1 KL is not 0
    with pytest.raises(SystemExit) as exc:
        _replay(monkeypatch, report, bad, tmp_path, "bad")
    assert exc.value.code not in (0, None) and "grpo_kl" in str(exc.value)
    page = (tmp_path / "results" / "bad.md").read_text()  # written first: it keeps the evidence
    assert _met_column(page) == {"grpo": "no", "grpo_kl": "parity failed", "rloo": "no"}
    assert "MISMATCH" in page
    written = json.loads((tmp_path / "results" / "bad.json").read_text())
    assert [v.get("parity_ok") for v in written["verdicts"]] == [True, False, True]


def test_rl_report_a_failed_fixed_batch_check_fails_its_cases(monkeypatch):
    report, stored = _rl_report(monkeypatch)
    parities = [dict(p) for p in stored["parity"]]
    assert all(report.parity_ok(p) for p in parities)  # stored files lack the fixed-batch key: not a failure
    report.add_fixed_batch(parities, {"agree": False}, {"agree": True})
    assert [report.parity_ok(p) for p in parities] == [False, False, True]
    report.add_fixed_batch(parities, {"agree": True}, None)  # no RLOO child: not checked
    assert [report.parity_ok(p) for p in parities] == [True, True, True]
