"""Edges of the one training loop and its schedule, against independent computations.

Toy stages (a float64 reference written out here) for the schedule, step counting, cadences and
grad norms; the tiny-2l preset through `run_sft` for determinism, weight-decay groups, grad norm
against plain transformers + torch, bf16 autocast on CPU and gradient checkpointing with LoRA.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import SFTConfig, TrainConfig
from posttrain.errors import ConfigError
from posttrain.train import loop as loop_mod
from posttrain.train.loop import train
from posttrain.train.runs import make_accelerator

IGNORE = -100


# --------------------------------------------------------------------------- toy stage


class Toy(torch.nn.Module):
    def __init__(self, embedding: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embedding = embedding
        if embedding:
            self.embed = torch.nn.Embedding(64, 4)
            with torch.no_grad():
                self.embed.weight.copy_(torch.randn(64, 4, generator=g))
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 6), torch.nn.Linear(6, 1)])
        with torch.no_grad():
            for p in self.layers.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.seen: list[torch.Tensor] = []  # row ids of every training forward

    def features(self, x):
        if self.embedding:
            return self.embed((x.abs() * 7).long() % 64).mean(1) + x
        return x

    def forward(self, x, y, rid):
        if self.training:
            self.seen.append(rid.clone())
        out = self.layers[1](torch.tanh(self.layers[0](self.features(x)))).squeeze(-1)
        return ((out - y) ** 2).sum()


class ToyStage:
    """n rows; epoch e's order is a permutation seeded by e (independent of the loop)."""

    def __init__(self, n: int, batch_size: int, n_eval: int = 0, eval_shift: float = 0.0, embedding=False):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1).sin()
        self.bs = batch_size
        self.module = Toy(embedding)
        self.eval_x = torch.randn(n_eval, 4, generator=g)
        self.eval_y = self.eval_x.sum(-1).sin() + eval_shift

    def order(self, epoch):
        return torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + epoch))

    def plan(self, epoch):
        order = self.order(epoch)
        return [order[i : i + self.bs] for i in range(0, len(order), self.bs)]

    def micro_batches(self, epoch):
        for idx in self.plan(epoch):
            yield {"x": self.x[idx], "y": self.y[idx], "rid": idx}

    def micro_batches_per_epoch(self):
        return math.ceil(len(self.x) / self.bs)

    def weight(self, batch):
        return float(len(batch["y"]))

    def tokens(self, batch):
        return len(batch["y"])

    def eval_micro_batches(self):
        if not len(self.eval_x):
            return []
        return [{"x": self.eval_x, "y": self.eval_y, "rid": torch.arange(len(self.eval_x))}]


def _tc(**kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, lr=0.05, schedule="constant", warmup_steps=0, progress_bar=False,
                resume="never", max_grad_norm=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _run(stage, cfg, run_dir):
    return train(stage, cfg, run_dir, make_accelerator(cfg, run_dir))


def _records(run_dir, key="loss"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def _spy_optimizer(monkeypatch):
    """Every optimizer step's group learning rates, read at the moment the step runs."""
    used: list[list[float]] = []
    real = loop_mod.make_optimizer

    def wrapped(*args, **kwargs):
        opt = real(*args, **kwargs)
        step = opt.step

        def spied(*a, **k):
            used.append([g["lr"] for g in opt.param_groups])
            return step(*a, **k)

        opt.step = spied
        return opt

    monkeypatch.setattr(loop_mod, "make_optimizer", wrapped)
    return used


def _factor(s: int, total: int, kind: str, warmup: int, floor: float) -> float:
    """The README's schedule: linear warmup (step+1)/W, then constant, or linear / cosine from the peak
    towards min_lr_ratio over the steps after warmup (progress (s - W) / (T - W))."""
    if warmup > 0 and s < warmup:
        return (s + 1) / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, (s - warmup) / max(1, total - warmup))
    shape = 1.0 - p if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return floor + (1.0 - floor) * shape


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind, max_steps, warmup_steps, warmup_ratio, floor, expected_warmup", [
    ("cosine", 9, 3, 0.0, 0.1, 3),
    ("linear", 8, 0, 0.25, 0.2, 2),   # warmup_ratio × max_steps
    ("linear", 5, 0, 0.1, 0.0, 1),    # 0.5 steps: rounded up (round() gave 0, the setting ignored)
    ("constant", 5, 2, 0.0, 0.0, 2),
    ("cosine", 4, 10, 0.0, 0.0, 10),  # warmup longer than the run: never reaches the peak, no crash
    ("linear", 6, 0, 0.0, 1.0, 0),    # min_lr_ratio 1: flat
])
def test_logged_lr_is_the_formula_and_the_rate_the_optimizer_used(tmp_path, monkeypatch, kind, max_steps,
                                                                   warmup_steps, warmup_ratio, floor, expected_warmup):
    used = _spy_optimizer(monkeypatch)
    cfg = _tc(max_steps=max_steps, schedule=kind, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio,
              min_lr_ratio=floor, lr=0.02)
    _run(ToyStage(12, 4), cfg, tmp_path)
    logged = [r["lr"] for r in _records(tmp_path)]
    expected = [0.02 * _factor(s, max_steps, kind, expected_warmup, floor) for s in range(max_steps)]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert [max(g) for g in used] == pytest.approx(logged, rel=1e-12)
    assert all(max(lr) <= 0.02 * (1 + 1e-12) for lr in used)


def test_layer_decayed_groups_follow_the_same_schedule(tmp_path, monkeypatch):
    """With layer_lr_decay the logged lr is the top group's; every group keeps its ratio to it."""

    class Wrapped(torch.nn.Module):  # names like a HF model's: net.layers.0.weight
        def __init__(self):
            super().__init__()
            self.net = Toy()
            self.head = torch.nn.Linear(1, 1)

        def forward(self, **batch):
            return self.net(**batch) + 0.0 * self.head.weight.sum()

    used = _spy_optimizer(monkeypatch)
    stage = ToyStage(12, 4)
    stage.module = Wrapped()
    _run(stage, _tc(max_steps=5, schedule="cosine", warmup_steps=1, layer_lr_decay=0.5, lr=0.01), tmp_path)
    logged = [r["lr"] for r in _records(tmp_path)]
    # README: layer i of L trains at lr · decay^(L − i) (i from 0), the rest (head) at lr
    assert len(used) == 5
    for lrs, top in zip(used, logged):
        assert sorted({round(lr / top, 12) for lr in lrs}) == [0.25, 0.5, 1.0]


# --------------------------------------------------------------------------- steps, epochs, accumulation


@pytest.mark.parametrize("n, bs, accum, epochs, expected_steps", [
    (10, 3, 3, 2.0, 4),   # 4 micro-batches per epoch (3,3,3,1) -> 2 steps, the second topped up
    (10, 3, 3, 1.5, 3),   # ceil(1.5 × 2)
    (8, 4, 1, 3.0, 6),    # exact epochs
    (4, 3, 3, 1.0, 1),    # an epoch shorter than one step
])
def test_steps_from_epochs_with_accumulation_and_every_row_seen(tmp_path, n, bs, accum, epochs, expected_steps):
    stage = ToyStage(n, bs)
    result = _run(stage, _tc(max_steps=0, epochs=epochs, batch_size=bs, grad_accum=accum), tmp_path)
    records = _records(tmp_path)
    assert result.step == expected_steps == len(records)
    assert [r["step"] for r in records] == list(range(1, expected_steps + 1))
    assert all(len(stage.module.seen[i * accum : (i + 1) * accum]) == accum for i in range(expected_steps))
    assert len(stage.module.seen) == expected_steps * accum  # every step full
    # the first epoch's micro-batches come in the stage's order; every row of epoch 0 is trained on
    plan0 = stage.plan(0)
    first = stage.module.seen[: len(plan0)]
    assert [t.tolist() for t in first] == [t.tolist() for t in plan0[: len(first)]]
    assert set(torch.cat(stage.module.seen).tolist()) == set(range(n))
    # logged tokens = rows of that step's micro-batches
    assert [r["tokens"] for r in records] == [
        sum(len(t) for t in stage.module.seen[i * accum : (i + 1) * accum]) for i in range(expected_steps)]


def test_a_topped_up_step_loss_is_the_mean_over_all_its_rows(tmp_path):
    """4 rows, micro-batch 3, accumulation 3: the one step is [b0 (3 rows), b1 (1 row), b0 again],
    7 rows; loss = Σ squared error / 7 at the initial weights (float64, written out here)."""
    stage = ToyStage(4, 3)
    ref = Toy().double()
    plan = stage.plan(0)
    rows = torch.cat([plan[0], plan[1], plan[0]])
    with torch.no_grad():
        out = ref.layers[1](torch.tanh(ref.layers[0](stage.x[rows].double()))).squeeze(-1)
        expected = float(((out - stage.y[rows].double()) ** 2).sum() / len(rows))
    _run(stage, _tc(max_steps=1, batch_size=3, grad_accum=3), tmp_path)
    assert [t.tolist() for t in stage.module.seen] == [t.tolist() for t in (plan[0], plan[1], plan[0])]
    assert _records(tmp_path)[0]["loss"] == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- cadences


def test_log_eval_and_save_cadence_and_retention(tmp_path):
    stage = ToyStage(12, 4, n_eval=4)
    _run(stage, _tc(max_steps=10, eval_every=3, save_every=4, keep_last=2, log_every=3), tmp_path)
    assert [r["step"] for r in _records(tmp_path, "loss")] == [3, 6, 9, 10]
    assert [r["step"] for r in _records(tmp_path, "eval_loss")] == [3, 6, 9, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000008", "step-0000010"]
    assert json.loads((tmp_path / "checkpoints" / "step-0000010" / "loop_state.json").read_text())["step"] == 10


def test_eval_loss_is_the_held_out_mean_at_the_evaluated_weights(tmp_path):
    """eval_every=1: the eval at step 1 is over the weights after step 1; written out in float64 from
    the weights of checkpoint 1."""
    from safetensors.torch import load_file

    stage = ToyStage(12, 4, n_eval=5)
    _run(stage, _tc(max_steps=2, eval_every=1, save_every=1, keep_last=5), tmp_path)
    weights = load_file(str(tmp_path / "checkpoints" / "step-0000001" / "trainable.safetensors"))
    ref = Toy().double()
    ref.load_state_dict({k: v.double() for k, v in weights.items()})
    with torch.no_grad():
        out = ref.layers[1](torch.tanh(ref.layers[0](stage.eval_x.double()))).squeeze(-1)
        expected = float(((out - stage.eval_y.double()) ** 2).mean())
    assert _records(tmp_path, "eval_loss")[0]["eval_loss"] == pytest.approx(expected, rel=1e-6)


def _early_cfg(**kw):
    return _tc(max_steps=60, lr=0.05, eval_every=2, early_stopping_patience=2, **kw)


def test_early_stopping_counts_evaluations_without_improvement(tmp_path):
    stage = ToyStage(16, 8, n_eval=8, eval_shift=5.0)
    result = _run(stage, _early_cfg(), tmp_path)
    evals = [r["eval_loss"] for r in _records(tmp_path, "eval_loss")]
    best = [i for i, v in enumerate(evals) if v < min(evals[:i], default=math.inf)]
    assert result.stopped_early and result.step == 2 * len(evals) < 60
    assert best[-1] == len(evals) - 3  # the two evaluations after the last improvement, then stop
    assert (tmp_path / "checkpoints" / f"step-{result.step:07d}").is_dir()  # the stopped state is saved


def test_rerunning_an_early_stopped_run_trains_nothing_more(tmp_path):
    first = _run(ToyStage(16, 8, n_eval=8, eval_shift=5.0), _early_cfg(), tmp_path)
    assert first.stopped_early
    again = _run(ToyStage(16, 8, n_eval=8, eval_shift=5.0), _early_cfg(resume="auto"), tmp_path)
    # a finished run rerun trains nothing (README: resume auto; loop.py's "already finished" branch)
    assert again.step == first.step
    assert max(r["step"] for r in _records(tmp_path)) == first.step


def test_a_run_that_completes_every_step_did_not_stop_early(tmp_path):
    """eval_every=10, patience 1, max_steps 20: the eval at step 20 (the last step) does not improve on
    step 10's; the run still trained every one of its 20 steps."""
    stage = ToyStage(16, 8, n_eval=8, eval_shift=5.0)
    result = _run(stage, _tc(max_steps=20, lr=0.05, eval_every=10, early_stopping_patience=1), tmp_path)
    evals = [r["eval_loss"] for r in _records(tmp_path, "eval_loss")]
    assert len(evals) == 2 and evals[1] >= evals[0] and result.step == 20  # the premise
    assert not result.stopped_early


# --------------------------------------------------------------------------- grad norm


@pytest.mark.parametrize("embedding, clip", [(False, 0.01), (True, 0.01), (False, 0.0)],
                         ids=["dense", "sparse_embedding", "no_clip"])
def test_logged_grad_norm_is_the_pre_clip_norm_of_the_whole_step(tmp_path, embedding, clip):
    """Accumulation 2 × batch 3 and a tight clip: the logged norm of step 1 is torch's
    clip_grad_norm_ pre-clip norm of ∇ (Σ squared error / 6), computed here in float64."""
    stage = ToyStage(6, 3, embedding=embedding)
    ref = Toy(embedding).double()
    plan = stage.plan(0)
    rows = torch.cat(plan[:2])
    loss = ((ref.layers[1](torch.tanh(ref.layers[0](ref.features(stage.x[rows].double())))).squeeze(-1)
             - stage.y[rows].double()) ** 2).sum() / len(rows)
    loss.backward()
    expected = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm=0.01))
    assert expected > 0.01
    _run(stage, _tc(max_steps=1, batch_size=3, grad_accum=2, max_grad_norm=clip), tmp_path)
    assert _records(tmp_path)[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- SFT on the tiny preset


ROWS = [{"instruction": f"Say the word number {i}.", "output": f"word {i} {'ab' * (i % 5)}"} for i in range(24)]


def _sft_cfg(tmp_path, name, *, train=None, model=None, adapter=None, data=None):
    path = tmp_path / "rows.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    t = {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "progress_bar": False, "resume": "never"}
    t.update(train or {})
    d = {"train_files": [str(path)], "max_length": 48, "eval_fraction": 0.0}
    d.update(data or {})
    cfg = {"output_dir": str(tmp_path / name), "model": {"path": "tiny-2l", **(model or {})}, "data": d, "train": t}
    if adapter:
        cfg["adapter"] = adapter
    return SFTConfig.from_dict(cfg)


@pytest.fixture
def sft_batches(monkeypatch):
    """The training micro-batches CausalLMLoss receives, in order (captured, not altered)."""
    from posttrain.train import sft

    seen: list[dict] = []
    real = sft.CausalLMLoss.forward

    def spy(self, *args, **batch):
        if self.training and torch.is_grad_enabled():
            seen.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
        return real(self, *args, **batch)

    monkeypatch.setattr(sft.CausalLMLoss, "forward", spy)
    return seen


def _row_keys(batches):
    """Each micro-batch's examples as tuples of their real tokens (padding stripped)."""
    out = []
    for b in batches:
        mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
        out.append([tuple(ids[m.bool()].tolist()) for ids, m in zip(b["input_ids"], mask)])
    return out


def test_same_seed_same_losses_other_seed_other_order(tmp_path, sft_batches):
    from posttrain.train.sft import run_sft

    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sft_batches.clear()
        run_dir = run_sft(_sft_cfg(tmp_path, name, train={"seed": seed}))
        runs[name] = ([r["loss"] for r in _records(run_dir)], _row_keys(sft_batches))
    assert runs["a"][0] == runs["b"][0] and runs["a"][1] == runs["b"][1]  # bitwise identical
    assert runs["a"][1] != runs["c"][1]  # another order ...
    flat = lambda keys: sorted(k for batch in keys for k in batch)  # noqa: E731
    assert flat(runs["a"][1]) == flat(runs["c"][1])  # ... of the same 24 examples (3 steps × 8 = one epoch)


def _plain_step_grad_norm(batches, dtype_ctx=None):
    """Σ_t −log p over label tokens of every micro-batch / their count, with a fresh copy of the
    preset through transformers; returns (loss, torch's pre-clip grad norm)."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from posttrain.models.presets import preset_path

    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny-2l"), dtype=torch.float32)
    model.train()
    count = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = 0.0
    for b in batches:
        with dtype_ctx() if dtype_ctx else contextlib.nullcontext():
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE, reduction="sum") / count
        loss.backward()
        total += float(loss.detach())
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"))
    return total, float(norm)


def test_sft_logged_loss_and_grad_norm_equal_plain_transformers(tmp_path, sft_batches):
    """Batch 4 × accumulation 2, clip 0.05: the logged loss and grad norm of step 1 equal those of the
    plain model's cross-entropy over the same two micro-batches normalised by their label tokens."""
    from posttrain.train.sft import run_sft

    run_dir = run_sft(_sft_cfg(tmp_path, "g", train={"max_steps": 1, "batch_size": 4, "grad_accum": 2,
                                                      "max_grad_norm": 0.05}))
    assert len(sft_batches) == 2
    loss, norm = _plain_step_grad_norm(sft_batches)
    record = _records(run_dir)[0]
    assert record["loss"] == pytest.approx(loss, rel=1e-5)
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 0.05  # the clip was active


@pytest.mark.parametrize("train, data", [
    ({"eval_every": 0}, {"eval_fraction": 0.25}),  # evaluations only at the end: patience can never stop
    ({"eval_every": 1}, {"eval_fraction": 0.0}),   # no held-out data: nothing is ever evaluated
], ids=["no_eval_every", "no_eval_data"])
def test_early_stopping_that_cannot_act_is_refused_or_reported(tmp_path, capsys, train, data):
    from posttrain.train.sft import run_sft

    try:
        run_sft(_sft_cfg(tmp_path, "p", train={"max_steps": 2, "early_stopping_patience": 2, **train}, data=data))
    except ConfigError:
        return
    out = capsys.readouterr()
    assert "patience" in out.out + out.err or "early" in out.out + out.err


def test_sft_batch_times_accumulation_gives_the_same_steps(tmp_path):
    """README: batch 8 × accumulation 1 and batch 4 × accumulation 2 take the same update."""
    from posttrain.train.sft import run_sft

    figures = {}
    for bs, accum in ((8, 1), (4, 2)):
        run_dir = run_sft(_sft_cfg(tmp_path, f"b{bs}", train={"batch_size": bs, "grad_accum": accum, "lr": 1e-2}))
        figures[bs] = [x for r in _records(run_dir) for x in (r["loss"], r["grad_norm"], r["tokens"])]
    assert figures[4] == pytest.approx(figures[8], rel=1e-5)


def test_weight_decay_groups_follow_the_stated_rule(tmp_path, monkeypatch):
    """README / param_groups docstring: AdamW weight decay on weights, none on biases and norms."""
    built = []
    real = loop_mod.make_optimizer
    monkeypatch.setattr(loop_mod, "make_optimizer", lambda *a, **k: built.append((a[0], real(*a, **k))) or built[-1][1])
    from posttrain.train.sft import run_sft

    run_sft(_sft_cfg(tmp_path, "wd", train={"max_steps": 1, "weight_decay": 0.1}))
    module, opt = built[0]
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert len(decay_of) == len(named)
    for name, param in named:
        excluded = name.endswith(".bias") or "norm" in name or param.ndim < 2
        assert decay_of[id(param)] == (0.0 if excluded else 0.1), name
    assert any(decay_of[id(p)] == 0.0 for n, p in named if "norm" in n)


def _body_bf16_head_fp32_loss(batches):
    """The chunked loss's precision under autocast: the layers in bf16, the head and cross-entropy on
    the float32 final hidden states."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.presets import preset_path

    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny-2l"), dtype=torch.float32)
    count = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = 0.0
    with torch.no_grad():
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = model.model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).last_hidden_state
            logits = hidden.float() @ model.lm_head.weight.float().T
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                             ignore_index=IGNORE, reduction="sum")) / count
    return total


@pytest.mark.parametrize("loss_impl", ["plain", "chunked"])
def test_bf16_autocast_on_cpu_computes_in_bf16(tmp_path, sft_batches, loss_impl):
    """mixed_precision=bf16 on CPU: the step's loss is computed under bf16 autocast (plain: the whole
    model; chunked: the layers, its head in float32), not in float32."""
    from posttrain.train.sft import run_sft

    run_dir = run_sft(_sft_cfg(tmp_path, "bf16", train={"max_steps": 1, "mixed_precision": "bf16",
                                                        "loss": loss_impl}))
    logged = _records(run_dir)[0]["loss"]
    fp32, _ = _plain_step_grad_norm(sft_batches)
    if loss_impl == "plain":
        bf16, _ = _plain_step_grad_norm(sft_batches, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    else:
        bf16 = _body_bf16_head_fp32_loss(sft_batches)
    assert abs(fp32 - bf16) > 10 * abs(logged - bf16)  # distinguishable, and the run is the bf16 one
    assert logged == pytest.approx(bf16, rel=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_with_lora_gives_the_same_training(tmp_path, dropout):
    from posttrain.train.sft import run_sft

    adapter = {"method": ["lora"], "lora": {"r": 4, "dropout": dropout}}
    figures = {}
    for ckpt in (False, True):
        run_dir = run_sft(_sft_cfg(tmp_path, f"ck{ckpt}", adapter=adapter, model={"gradient_checkpointing": ckpt},
                                   train={"max_steps": 3, "batch_size": 8, "lr": 1e-2}))
        figures[ckpt] = [(r["loss"], r["grad_norm"]) for r in _records(run_dir)]
        from safetensors.torch import load_file
        figures[ckpt, "w"] = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert all(n > 0 for _, n in figures[True])
    flat = lambda pairs: [x for pair in pairs for x in pair]  # noqa: E731
    assert flat(figures[True]) == pytest.approx(flat(figures[False]), rel=1e-5)
    for key, value in figures[False, "w"].items():
        torch.testing.assert_close(figures[True, "w"][key], value, rtol=1e-5, atol=1e-6)
