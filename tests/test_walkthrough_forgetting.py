"""A forgetting walk: catastrophic-forgetting control read against its papers.

Walked, as an ML engineer who knows the methods: README's "### Catastrophic forgetting",
`train/forgetting.py`, `train/retain_terms.py`, `losses/regularization.py` and the `forgetting:` section
of the config. EWC (Kirkpatrick et al. 2017): λ/2·Σ F_i (θ_i − θ₀_i)², F the diagonal of the empirical
Fisher (squared per-row gradients under the rows' own labels, which README says), at θ₀ on the retain
pool, scaled to mean 1; L2-SP (Li et al. 2018): α/2·Σ(θ − θ₀)² toward the starting weights; replay
(a share of training rows, the same every epoch); lm_coef (PPO-ptx); distillation (LwF, KL(p_θ₀ ‖ p_θ)
per label token, top-k plus a bucket, chunked); A-GEM; the monitor (held-out retain loss at step 0 and
every evaluation, exact match before and after, the max_retain_increase stop); and how they compose
with LoRA.

Right, and checked here against independent float64 computations on the tiny preset: the step-0
retain loss is the token-mean NLL of the held-out rows only (a share disjoint from the pool), and
under EWC with LoRA the A matrices get F = 0 exactly while B is held, as README says. The penalty
formulas, the Fisher's per-row definition, the KL's direction and bucket, A-GEM, the once-per-step
gradient under accumulation and resume already had tests (tests/test_forgetting*.py,
tests/test_retain_terms.py) and are not repeated.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 33: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import SFTConfig
from posttrain.data.records import IGNORE_INDEX
from posttrain.errors import DataError
from posttrain.train import forgetting as fg
from posttrain.train.sft import run_sft


def _rows(task: str, n: int, seed: int) -> list[dict]:
    from posttrain.data.synthetic import make_rows

    return make_rows([task], n, seed=seed, side="train", unique=True)  # alpaca rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, retain: Path, *, data=None, adapter=None, train=None, **forgetting) -> SFTConfig:
    return SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"path": "tiny"},
        "adapter": adapter or {},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["smallest"], "synthetic_size": 16,
                 "max_length": 64, "eval_fraction": 0.0} | (data or {}),
        "train": {"max_steps": 1, "batch_size": 4, "lr": 3e-3, "schedule": "constant", "progress_bar": False,
                  "resume": "never", "seed": 0} | (train or {}),
        "forgetting": {"retain_files": [str(retain)]} | forgetting,
    })


@pytest.fixture
def begun(monkeypatch):
    """Each ForgettingControl whose begin() runs, with the policy's parameters as the run started
    (snapshotted before begin, so before any step) and their names."""
    seen = []
    original = fg.ForgettingControl.begin

    def spy(self, module, accelerator):
        seen.append({"control": self, "names": {id(p): n for n, p in self.policy.named_parameters()},
                     "start": {n: p.detach().clone() for n, p in self.policy.state_dict().items()}})
        return original(self, module, accelerator)

    monkeypatch.setattr(fg.ForgettingControl, "begin", spy)
    return seen


# --------------------------------------------------------------------------- the monitor


def test_step_zero_retain_loss_is_the_float64_token_mean_nll_of_the_held_out_rows_only(tmp_path, begun):
    """retain_loss_before = Σ −log p(label) / Σ label tokens over the held-out share (round(0.2·n)
    rows, none of them in the pool), computed here in float64 from the weights the run starts with."""
    retain = _write(tmp_path / "retain.jsonl", _rows("copy", 20, 5) + _rows("reverse", 20, 6))
    run_dir = run_sft(_cfg(tmp_path, retain))
    (seen,) = begun
    control = seen["control"]
    held, pool = control.retain.held_out, control.retain.pool
    assert (len(held), len(pool)) == (8, 32)
    assert not {tuple(e.input_ids) for e in held} & {tuple(e.input_ids) for e in pool}

    model = control.policy.__class__(control.policy.config)
    model.load_state_dict(seen["start"])
    model = model.double().eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in held:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            targets = torch.tensor(example.labels[1:])
            kept = targets != IGNORE_INDEX
            nll -= float(logits[kept].log_softmax(-1).gather(1, targets[kept][:, None]).sum())
            tokens += int(kept.sum())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["retain_loss_before"] == pytest.approx(nll / tokens, rel=1e-5)


# --------------------------------------------------------------------------- EWC with adapters


def test_ewc_with_lora_gives_the_a_matrices_a_fisher_of_zero_and_holds_b(tmp_path, begun):
    """README: under EWC a LoRA's A matrices get F = 0 (B = 0 at initialisation, so the loss has no
    gradient in A) and only B is held; the Fisher covers the trained adapter only, mean 1 over it."""
    retain = _write(tmp_path / "retain.jsonl", _rows("copy", 20, 5))
    run_sft(_cfg(tmp_path, retain, adapter={"method": ["lora"]}, ewc=1.0, fisher_examples=4))
    (seen,) = begun
    control = seen["control"]
    names = [seen["names"][id(p)] for p in control.params]
    fisher = dict(zip(names, control.fisher))
    a = [n for n in names if "lora_A" in n]
    b = [n for n in names if "lora_B" in n]
    assert a and b and len(a) + len(b) == len(names)  # the base is frozen: no Fisher for it
    assert all(not fisher[n].any() for n in a), [n for n in a if fisher[n].any()]
    assert all(bool((fisher[n] > 0).any()) for n in b)
    mean = sum(float(f.double().sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert mean == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------- defects


def test_the_fisher_is_estimated_on_a_sample_of_the_whole_pool_not_the_head_of_the_file(tmp_path, begun, monkeypatch):
    """A retain file made the usual way, two old tasks concatenated (30 copy rows, then 30 reverse
    rows; 26 and 22 of them in the pool). fisher_examples=16 must sample the pool (as replay,
    lm_coef's batches and the held-out split all draw seeded samples): a Fisher from the head of
    the file holds one old task and leaves every weight the other needs unanchored."""
    from posttrain.models.loading import load_tokenizer

    used = []
    original = fg.fisher_diagonal

    def spy(model, examples, params, pad_id, accelerator):
        used.extend(examples)
        return original(model, examples, params, pad_id, accelerator)

    monkeypatch.setattr(fg, "fisher_diagonal", spy)
    retain = _write(tmp_path / "retain.jsonl", _rows("copy", 30, 5) + _rows("reverse", 30, 6))
    run_sft(_cfg(tmp_path, retain, ewc=1.0, fisher_examples=16))
    tokenizer = load_tokenizer("tiny")

    def tasks(examples):
        texts = [tokenizer.decode(e.input_ids) for e in examples]
        return sum("Copy:" in t for t in texts), sum("Reverse:" in t for t in texts)

    pool = tasks(begun[0]["control"].retain.pool)
    assert min(pool) >= 20  # both old tasks are in the pool
    n, (copy, reverse) = len(used), tasks(used)
    assert n == 16 and copy > 0 and reverse > 0, (
        f"the Fisher's {n} rows: {copy} copy, {reverse} reverse, from a pool of {pool[0]} copy + {pool[1]} reverse")


def test_sft_retain_rows_in_another_sft_format_than_data_format_are_read(tmp_path):
    """The new task's rows are alpaca and data.format says so; the old task's rows are messages.
    README: `forgetting.retain_files` holds rows "in any format sft's data.train_files takes,
    whatever the stage trains on" (dpo and the RL stages auto-detect them): sft must read them too,
    not refuse every retain row as a malformed alpaca row."""
    _write(tmp_path / "train.jsonl", _rows("reverse", 16, 7))
    retain = _write(tmp_path / "retain.jsonl", [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in _rows("copy", 20, 5)])
    cfg = _cfg(tmp_path, retain, data={"train_files": [str(tmp_path / "train.jsonl")], "format": "alpaca"})
    try:
        run_dir = run_sft(cfg)
    except DataError as error:
        raise AssertionError(f"the messages retain rows were refused: {str(error).splitlines()[0]}") from None
    assert json.loads((run_dir / "summary.json").read_text())["retain_loss_before"] > 0
