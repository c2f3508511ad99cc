"""The one training loop, on a toy regression stage (no language model needed).

Checks: accumulation equivalence, resume == uninterrupted (bitwise), non-finite guard,
schedules, per-layer learning rates, freezing, early stopping, checkpoint atomicity.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError, TrainingAborted
from posttrain.train import checkpoint
from posttrain.train.loop import train
from posttrain.train.runs import make_accelerator
from posttrain.train.optim import freeze_by_pattern, lr_factor, param_groups


class ToyModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)])
        self.nan_at_calls: set[int] = set()
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        out = self.layers[1](torch.tanh(self.layers[0](x))).squeeze(-1)
        loss = ((out - y) ** 2).sum()  # summed; the loop divides by the step's weight
        if self.calls in self.nan_at_calls:
            loss = loss * float("nan")
        return loss


class ToyStage:
    """32 fixed rows; the row order of an epoch depends only on the epoch number."""

    def __init__(self, batch_size: int, n: int = 32, n_eval: int = 0, eval_shift: float = 0.0):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1).sin()
        self.batch_size = batch_size
        self.module = ToyModule()
        self.eval_x = torch.randn(n_eval, 4, generator=g)
        self.eval_y = self.eval_x.sum(-1).sin() + eval_shift

    def micro_batches(self, epoch):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + epoch))
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield {"x": self.x[idx], "y": self.y[idx]}

    def micro_batches_per_epoch(self):
        return math.ceil(len(self.x) / self.batch_size)

    def weight(self, batch):
        return float(len(batch["y"]))

    def tokens(self, batch):
        return len(batch["y"])

    def eval_micro_batches(self):
        if not len(self.eval_x):
            return []
        return [{"x": self.eval_x, "y": self.eval_y}]


def _cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=8, batch_size=8, lr=0.05, schedule="cosine", warmup_steps=2, progress_bar=False,
                resume="never", max_grad_norm=1.0)
    base.update(overrides)
    return TrainConfig(**base)


def _run(stage, cfg, run_dir):
    return train(stage, cfg, run_dir, make_accelerator(cfg, run_dir))


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_accumulation_equivalence(tmp_path):
    """batch 8 × accumulation 1 == batch 1 × accumulation 8 (same rows per step)."""
    a = ToyStage(batch_size=8)
    b = ToyStage(batch_size=1)
    ra = _run(a, _cfg(batch_size=8, grad_accum=1), tmp_path / "a")
    rb = _run(b, _cfg(batch_size=1, grad_accum=8), tmp_path / "b")
    for (name, pa), pb in zip(_params(ra.module).items(), _params(rb.module).values()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    la = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)


class Crash(Exception):
    pass


def test_resume_is_bitwise_equal(tmp_path):
    cfg = _cfg(batch_size=4, max_steps=13, save_every=5, keep_last=5)
    full = _run(ToyStage(4), cfg, tmp_path / "full")
    # Interrupted run: dies inside step 8 (after the checkpoint at step 5), crosses an epoch (8 batches).
    crashing = ToyStage(4)
    crashing.module.forward = _crash_on_call(crashing.module.forward, 8)
    with pytest.raises(Crash):
        _run(crashing, cfg, tmp_path / "cut")
    cfg.resume = "auto"
    resumed = _run(ToyStage(4), cfg, tmp_path / "cut")
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in l]
    assert steps == list(range(1, 14))  # the resumed log neither repeats nor skips a step
    for (name, pa), pb in zip(_params(full.module).items(), _params(resumed.module).values()):
        assert torch.equal(pa, pb), name


def _crash_on_call(forward, n):
    calls = [0]

    def wrapped(**batch):
        calls[0] += 1
        if calls[0] == n:
            raise Crash()
        return forward(**batch)

    return wrapped


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    stage = ToyStage(8)
    before = _params(stage.module)
    stage.module.nan_at_calls = {1}  # first micro-batch of step 1
    result = _run(stage, _cfg(max_steps=3, lr=0.05, warmup_steps=0), tmp_path)
    assert result.skipped_steps == 1
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    # strict JSON: the NaN is written as null, and "nonfinite" says which figures were not finite
    assert records[0]["skipped_steps"] == 1 and records[0]["loss"] is None and records[0]["grad_norm"] is None
    assert records[0]["nonfinite"] == {"loss": "nan", "grad_norm": "nan"}
    assert all("nonfinite" not in r and math.isfinite(r["loss"]) for r in records[1:])
    assert all(math.isfinite(v.sum().item()) for v in _params(result.module).values())
    assert any(not torch.equal(before[k], v) for k, v in _params(result.module).items())  # later steps trained


def test_too_many_nonfinite_steps_abort(tmp_path):
    stage = ToyStage(8)
    stage.module.nan_at_calls = set(range(1, 100))
    with pytest.raises(TrainingAborted, match="non-finite steps in a row"):
        _run(stage, _cfg(max_steps=10, max_consecutive_nonfinite=3), tmp_path)


def test_empty_label_mask_is_a_hard_error(tmp_path):
    stage = ToyStage(8)
    stage.weight = lambda batch: 0.0
    with pytest.raises(TrainingAborted, match="no label tokens"):
        _run(stage, _cfg(max_steps=1), tmp_path)


def test_epochs_cover_partial_last_step(tmp_path):
    """32 rows, micro-batch 8, accumulation 3: 2 steps per epoch, the second topped up."""
    result = _run(ToyStage(8), _cfg(max_steps=0, epochs=2, grad_accum=3), tmp_path)
    assert result.step == 4


def test_schedules():
    assert lr_factor(0, 10, "constant", 2, 0.0) == 0.5  # warmup (step+1)/warmup
    assert lr_factor(1, 10, "constant", 2, 0.0) == 1.0
    assert lr_factor(2, 10, "linear", 2, 0.0) == 1.0
    assert lr_factor(10, 10, "linear", 2, 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, "cosine", 2, 0.0) == pytest.approx(0.5)  # halfway through decay
    assert lr_factor(6, 10, "cosine", 2, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_layer_lr_decay_and_freezing():
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(10, 4)
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    model.norm = torch.nn.LayerNorm(4)
    wrapper = torch.nn.Module()
    wrapper.model = model
    groups = param_groups(wrapper, lr=1.0, weight_decay=0.1, layer_lr_decay=0.5)
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    assert lr_of["model.norm.weight"] == 1.0  # top: final norm / head
    assert lr_of["model.layers.2.weight"] == 0.5
    assert lr_of["model.layers.0.weight"] == 0.125
    assert lr_of["model.embed_tokens.weight"] == 0.0625
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert wd_of["model.layers.1.weight"] == 0.1 and wd_of["model.layers.1.bias"] == 0.0
    assert wd_of["model.norm.weight"] == 0.0
    frozen = freeze_by_pattern(wrapper, ["*embed_tokens*", "model.layers.0.*"])
    assert frozen == 40 + 20
    names = {n for g in param_groups(wrapper, 1.0, 0.0, 1.0) for n in g["names"]}
    assert "model.embed_tokens.weight" not in names and "model.layers.1.weight" in names
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze_by_pattern(wrapper, ["*embed_tokenz*"])


def test_early_stopping(tmp_path):
    # Eval targets far off the train targets: eval loss rises once training fits train data.
    stage = ToyStage(8, n_eval=16, eval_shift=5.0)
    result = _run(stage, _cfg(max_steps=200, lr=0.05, eval_every=1, early_stopping_patience=3, warmup_steps=0),
                  tmp_path)
    assert result.stopped_early and result.step < 200
    evals = [json.loads(l)["eval_loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in l]
    best = min(evals)
    assert evals.index(best) == len(evals) - 4  # three evaluations without improvement, then stop


def test_incomplete_checkpoints_are_ignored(tmp_path):
    _run(ToyStage(8), _cfg(max_steps=4, save_every=2, keep_last=3), tmp_path)
    root = tmp_path / "checkpoints"
    assert [p.name for p in sorted(root.iterdir())] == ["step-0000002", "step-0000004"]
    assert checkpoint.latest_complete(root).name == "step-0000004"
    # A half-written newer checkpoint (manifest missing, or a truncated file) is skipped.
    (root / "step-0000006").mkdir()
    (root / "step-0000006" / "trainable.safetensors").write_bytes(b"partial")
    assert checkpoint.latest_complete(root).name == "step-0000004"
    victim = root / "step-0000004" / "optimizer.safetensors"
    victim.write_bytes(victim.read_bytes()[:10])
    assert checkpoint.latest_complete(root).name == "step-0000002"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        _run(ToyStage(8), _cfg(max_steps=6, resume=str(root / "step-0000004")), tmp_path)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    _run(ToyStage(8), _cfg(max_steps=6, save_every=1, keep_last=2), tmp_path)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000005", "step-0000006"]


def test_a_fresh_start_replaces_an_earlier_runs_checkpoints(tmp_path):
    _run(ToyStage(8), _cfg(max_steps=6, save_every=2, keep_last=3), tmp_path)
    # resume=never over a finished run: same final step, fewer steps; neither crashes nor mixes runs
    _run(ToyStage(8), _cfg(max_steps=6, save_every=3, keep_last=3), tmp_path)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000003", "step-0000006"]
    _run(ToyStage(8), _cfg(max_steps=2, keep_last=3), tmp_path)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000002"]


def test_nested_optimizer_state_round_trips_through_a_checkpoint():
    """bitsandbytes' 8-bit optimizers nest their quantisation tensors in a sub-dict of each
    parameter's state; a checkpoint must keep that nesting (found on a GPU: json.dumps failed)."""
    state = {"state": {0: {"step": 3, "state1": torch.randn(2, 3),
                           "quant": {"absmax1": torch.rand(4), "qmap1": torch.arange(5.0), "blocksize": 256}},
                       1: {"step": 3, "state1": torch.randn(6)}},
             "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    tensors, plain = checkpoint._split_optimizer_state(state)
    json.dumps(plain)  # everything that is not a tensor is plain JSON
    back = checkpoint._join_optimizer_state(tensors, json.loads(json.dumps(plain)))
    assert back["param_groups"] == state["param_groups"]
    assert back["state"][0]["quant"]["blocksize"] == 256 and back["state"][1]["step"] == 3
    assert torch.equal(back["state"][0]["quant"]["absmax1"], state["state"][0]["quant"]["absmax1"])
    assert torch.equal(back["state"][0]["state1"], state["state"][0]["state1"])


def test_fused_adamw_is_the_same_update_up_to_rounding(tmp_path):
    """train.optimizer=adamw_fused runs torch's fused kernel: the same AdamW as the per-tensor
    loop (the default), equal up to float rounding, with resume working the same way."""
    from posttrain.train.optim import make_optimizer

    loop, fused = ToyStage(8), ToyStage(8)
    _run(loop, _cfg(), tmp_path / "loop")
    _run(fused, _cfg(optimizer="adamw_fused"), tmp_path / "fused")
    a, b = _params(loop.module), _params(fused.module)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert make_optimizer(ToyModule(), _cfg(optimizer="adamw_fused")).defaults["fused"] is True
    assert not make_optimizer(ToyModule(), _cfg()).defaults["fused"]
    # a fused run that dies after its step-4 checkpoint resumes to the uninterrupted fused run's weights
    crashing = ToyStage(8)
    crashing.module.forward = _crash_on_call(crashing.module.forward, 6)
    with pytest.raises(Crash):
        _run(crashing, _cfg(optimizer="adamw_fused", save_every=4), tmp_path / "cut")
    resumed = _run(ToyStage(8), _cfg(optimizer="adamw_fused", save_every=4, resume="auto"), tmp_path / "cut")
    c = _params(resumed.module)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_resuming_a_finished_run_still_reports_its_final_evaluation(tmp_path):
    finished = _run(ToyStage(8, n_eval=8), _cfg(), tmp_path)
    again = _run(ToyStage(8, n_eval=8), _cfg(resume="auto"), tmp_path)
    assert again.step == finished.step == 8
    assert finished.eval_loss is not None and again.eval_loss == pytest.approx(finished.eval_loss, rel=1e-6)


class EmbeddingToyModule(torch.nn.Module):
    """An untied embedding (most rows never used) under a linear read-out: the loop gives it a
    sparse gradient on one process."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(512, 8)
        self.out = torch.nn.Linear(8, 1)
        self.sparse_seen: list[bool] = []

    def forward(self, x, y):
        self.sparse_seen.append(self.embed.sparse)
        ids = (x.abs() * 20).long()  # 4 ids per row, from the first ~60 rows of 512
        return ((self.out(self.embed(ids).mean(1)).squeeze(-1) - y) ** 2).sum()


def _embedding_stage(batch_size: int) -> ToyStage:
    stage = ToyStage(batch_size)
    stage.module = EmbeddingToyModule()
    return stage


def test_untied_embeddings_train_on_sparse_gradients_as_on_dense_ones(tmp_path, monkeypatch):
    """On one process the loop switches untied embeddings to sparse gradients (clipped by
    clip_grad_norm, stepped by AdamW's reached rows) and back afterwards: the same training as
    the dense gradient, up to the order of float sums, with accumulation and a resume intact."""
    import posttrain.train.loop as loop

    cfg = _cfg(weight_decay=0.1, max_grad_norm=0.05)  # a tight clip, so the clipping counts
    sparse = _run(_embedding_stage(8), cfg, tmp_path / "sparse")
    assert all(sparse.module.sparse_seen) and not sparse.module.embed.sparse
    accumulated = _run(_embedding_stage(2), _cfg(weight_decay=0.1, max_grad_norm=0.05, batch_size=2, grad_accum=4),
                       tmp_path / "accumulated")
    real = loop.sparse_embedding_gradients
    monkeypatch.setattr(loop, "sparse_embedding_gradients", lambda module, enabled: real(module, enabled=False))
    dense = _run(_embedding_stage(8), cfg, tmp_path / "dense")
    assert not any(dense.module.sparse_seen)
    monkeypatch.setattr(loop, "sparse_embedding_gradients", real)
    norms = {run: [json.loads(l)["grad_norm"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                   if '"grad_norm"' in l] for run in ("sparse", "dense", "accumulated")}
    assert max(norms["dense"]) > 0.05 and norms["sparse"] == pytest.approx(norms["dense"], rel=1e-5)
    assert norms["accumulated"] == pytest.approx(norms["dense"], rel=1e-5)
    for other in (dense, accumulated):
        for (name, pa), pb in zip(_params(sparse.module).items(), _params(other.module).values()):
            assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), name
    # a run that dies after its step-4 checkpoint resumes to the uninterrupted run's weights, bit for bit
    crashing = _embedding_stage(8)
    crashing.module.forward = _crash_on_call(crashing.module.forward, 6)
    with pytest.raises(Crash):
        _run(crashing, _cfg(weight_decay=0.1, max_grad_norm=0.05, save_every=4), tmp_path / "cut")
    resumed = _run(_embedding_stage(8), _cfg(weight_decay=0.1, max_grad_norm=0.05, save_every=4, resume="auto"),
                   tmp_path / "cut")
    for (name, pa), pb in zip(_params(sparse.module).items(), _params(resumed.module).values()):
        assert torch.equal(pa, pb), name


def test_bfloat16_trained_weights_are_named_in_the_log(tmp_path, capsys):
    """Without a float32 master copy, AdamW's small updates round away in bfloat16 weights: the run says so."""
    stage = ToyStage(8)
    stage.module.to(torch.bfloat16)
    stage.x, stage.y = stage.x.bfloat16(), stage.y.bfloat16()
    _run(stage, _cfg(max_steps=1), tmp_path / "bf16")
    assert "49 trained parameters are bfloat16" in capsys.readouterr().out
    _run(ToyStage(8), _cfg(max_steps=1), tmp_path / "fp32")
    assert "bfloat16" not in capsys.readouterr().out
