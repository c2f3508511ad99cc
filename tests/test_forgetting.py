"""Catastrophic-forgetting control (train/forgetting.py, losses/regularization.py): the penalties
against autograd, the Fisher against a plain per-example computation, replay's mix, the loop's
once-per-step penalty, resume with the original anchor, the stop on a rising retain loss."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import SFTConfig, validate_sft
from posttrain.errors import ConfigError, DataError
from posttrain.losses.regularization import anchored_penalty
from posttrain.train.forgetting import fisher_diagonal, mix_replay
from posttrain.train.sft import run_sft


def _retain_file(tmp_path, n=40, task="copy", seed=5):
    from posttrain.data.synthetic import make_rows

    path = tmp_path / f"retain_{task}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_rows([task], n, seed=seed, side="train", unique=True)))
    return path


def _cfg(tmp_path, name="run", **forgetting) -> SFTConfig:
    return SFTConfig.from_dict({
        "output_dir": str(tmp_path / name),
        "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["reverse"], "synthetic_size": 64, "max_length": 64,
                 "eval_fraction": 0.0},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "schedule": "constant", "progress_bar": False,
                  "resume": "never", "seed": 0},
        "forgetting": {"retain_files": [str(_retain_file(tmp_path))]} | forgetting,
    })


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


# --------------------------------------------------------------------------- the penalty


def test_penalty_by_hand():
    """θ = [1, 3], θ₀ = [0, 1], F = [2, 0.5], strength 0.1:
    L2-SP: 0.1/2 · (1 + 4) = 0.25, gradient 0.1 · [1, 2] = [0.1, 0.2];
    EWC:   0.1/2 · (2·1 + 0.5·4) = 0.2, gradient 0.1 · [2·1, 0.5·2] = [0.2, 0.1]."""
    theta, theta0 = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    value, (grad,) = anchored_penalty([theta], [theta0], 0.1)
    assert float(value) == pytest.approx(0.25) and grad.tolist() == pytest.approx([0.1, 0.2])
    value, (grad,) = anchored_penalty([theta], [theta0], 0.1, [torch.tensor([2.0, 0.5])])
    assert float(value) == pytest.approx(0.2) and grad.tolist() == pytest.approx([0.2, 0.1])


@pytest.mark.parametrize("weighted", [False, True], ids=["l2sp", "ewc"])
def test_penalty_against_autograd_in_float64(weighted):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    params = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    anchors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    weights = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes] if weighted else None
    strength = 0.37
    # the formula written out plainly
    plain = sum(0.5 * strength * ((w if weighted else 1.0) * (p - a) ** 2).sum()
                for p, a, w in zip(params, anchors, weights or [None] * 3))
    expected = torch.autograd.grad(plain, params)
    value, grads = anchored_penalty(params, anchors, strength, weights)
    assert float(value) == pytest.approx(float(plain.detach()), rel=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_penalty_is_zero_at_the_anchor():
    theta = [torch.randn(4, 4)]
    value, grads = anchored_penalty(theta, [theta[0].clone()], 5.0, [torch.rand(4, 4)])
    assert float(value) == 0.0 and not grads[0].any()


# --------------------------------------------------------------------------- the Fisher


class _Acc:
    """What fisher_diagonal reads of an accelerator, for one process."""
    process_index, num_processes, device = 0, 1, torch.device("cpu")

    @staticmethod
    def reduce(tensor, op):
        return tensor


def test_fisher_is_the_mean_squared_per_example_gradient_scaled_to_mean_one():
    from posttrain.data.batching import collate
    from posttrain.data.records import IGNORE_INDEX, Example
    from posttrain.models.loading import load_model
    from posttrain.config import ModelConfig
    from posttrain.train.sft import CausalLMLoss

    torch.manual_seed(0)
    module = CausalLMLoss(load_model(ModelConfig(path="tiny")), "plain")
    params = [p for p in module.parameters() if p.requires_grad]
    examples = [Example([5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]),
                Example([5, 10, 11], [IGNORE_INDEX, 10, 11]),
                Example([12, 13, 14, 15], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 15])]
    fisher = fisher_diagonal(module, examples, params, pad_id=0, accelerator=_Acc())
    # independently: each example's summed token loss (−log p(y|x)) through .backward(), gradients squared, averaged
    squares = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    module.eval()
    for example in examples:
        module.zero_grad(set_to_none=True)
        batch = collate([example], 0)
        logits = module.model(input_ids=batch["input_ids"]).logits[0, :-1].double()
        targets = batch["labels"][0, 1:]
        kept = targets != IGNORE_INDEX
        torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="sum").backward()
        for s, p in zip(squares, params):
            if p.grad is not None:
                s += p.grad.double() ** 2
    raw = [s / len(examples) for s in squares]
    mean = sum(r.sum() for r in raw) / sum(r.numel() for r in raw)
    total = sum(f.double().sum() for f in fisher) / sum(f.numel() for f in fisher)
    assert float(total) == pytest.approx(1.0, rel=1e-6)
    for got, want in zip(fisher, raw):
        torch.testing.assert_close(got.double(), want / mean, rtol=2e-4, atol=1e-6)


# --------------------------------------------------------------------------- replay


def test_replay_mixes_the_ratio_in_a_seeded_order_going_round_the_pool():
    train, pool = list(range(90)), [f"r{i}" for i in range(7)]
    said = []
    mixed = mix_replay(train, pool, 0.25, seed=3, log=said.append)
    assert mixed[:90] == train and len(mixed) == 120  # 30 = round(90 · 0.25 / 0.75): a quarter of the mix
    replayed = mixed[90:]
    assert set(replayed) == set(pool)  # every pool example used before any repeats a third time
    assert max(replayed.count(r) for r in pool) - min(replayed.count(r) for r in pool) <= 1
    assert mix_replay(train, pool, 0.25, seed=3, log=said.append) == mixed
    assert mix_replay(train, pool, 0.25, seed=4, log=said.append) != mixed
    assert "30 retain examples" in said[0] and "repeated" in said[0]
    assert mix_replay(train, pool, 0.0, seed=3, log=said.append) is train


def test_replayed_examples_come_from_the_pool_never_from_the_held_out_rows(tmp_path, monkeypatch):
    from posttrain.train import sft

    seen = {}
    original = sft.SFTStage.__init__

    def spy(self, module, train, eval_examples, cfg, pad_id, stream=None, adapter_training=None, forgetting=None):
        seen.update(train=train, retain=forgetting.retain)
        original(self, module, train, eval_examples, cfg, pad_id, stream, adapter_training, forgetting)

    monkeypatch.setattr(sft.SFTStage, "__init__", spy)
    run_sft(_cfg(tmp_path, replay_ratio=0.5))
    retain = seen["retain"]
    held = {tuple(e.input_ids) for e in retain.held_out}
    pool = {tuple(e.input_ids) for e in retain.pool}
    replayed = [e for e in seen["train"] if tuple(e.input_ids) in pool]
    assert len(retain.held_out) == 8 and len(retain.pool) == 32  # 40 rows, retain_eval_fraction 0.2
    assert len(replayed) == 64  # as many as the 64 training examples: half the mix
    assert not held & {tuple(e.input_ids) for e in seen["train"]}


# --------------------------------------------------------------------------- through the loop


def test_the_loop_adds_the_penalty_gradient_once_per_step(tmp_path, monkeypatch):
    """The gradient the optimizer steps on is the data gradient plus α(θ − θ₀) + λF(θ − θ₀), once a
    step whatever the accumulation: batch 8 × 1 and batch 2 × 4 take the same steps."""
    runs = []
    for batch, accum in ((8, 1), (2, 4)):
        cfg = _cfg(tmp_path, f"b{batch}", l2sp=0.5, ewc=2.0, fisher_examples=4)
        cfg.train.batch_size, cfg.train.grad_accum = batch, accum
        runs.append(run_sft(cfg))
    a, b = (_final(r) for r in runs)
    for name in a:  # Adam divides by √v: a near-zero gradient's float32 rounding moves its weight by ~1e-5
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)
    penalties = [[(line["l2sp_penalty"], line["ewc_penalty"]) for line in _lines(r) if "loss" in line] for r in runs]
    for pa, pb in zip(*penalties):
        assert pa == pytest.approx(pb, rel=1e-3, abs=1e-9)
    lines = [line for line in _lines(runs[0]) if "loss" in line]
    assert all(line["l2sp_penalty"] >= 0 and line["ewc_penalty"] >= 0 for line in lines)
    assert lines[0]["l2sp_penalty"] == 0.0  # step 1 starts at the anchor
    assert lines[-1]["l2sp_penalty"] > 0


def test_regularize_adds_the_scaled_pull_to_each_gradient_and_skips_parameters_without_one():
    """grad += grad_scale · (α(θ − θ₀) + λF(θ − θ₀)); a parameter whose gradient was dropped
    (staged unfreezing) stays without one."""
    from posttrain.config import ForgettingConfig
    from posttrain.train.forgetting import ForgettingControl, RetainData

    module = torch.nn.Linear(3, 2)
    control = ForgettingControl(ForgettingConfig(l2sp=0.5, ewc=2.0), RetainData([], []), module, pad_id=0,
                                batch_size=1, seed=0)
    theta0 = [p.detach().clone() for p in module.parameters()]
    fisher = [torch.rand_like(p) for p in module.parameters()]
    control.load_state_dict({"start_loss": 1.0, "anchors": 2, "fisher": 2},
                            {"anchor.0": theta0[0], "anchor.1": theta0[1], "fisher.0": fisher[0], "fisher.1": fisher[1]})
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    data_grad = torch.randn_like(module.weight)
    module.weight.grad = data_grad.clone()
    figures = control.regularize(module, 4.0, None, 0)
    delta = module.weight.detach() - theta0[0]
    torch.testing.assert_close(module.weight.grad, data_grad + 4.0 * (0.5 * delta + 2.0 * fisher[0] * delta))
    assert module.bias.grad is None
    assert figures["l2sp_penalty"] == pytest.approx(0.25 * float((delta ** 2).sum()), rel=1e-6)
    assert figures["ewc_penalty"] == pytest.approx(float((fisher[0] * delta ** 2).sum()), rel=1e-6)


def test_the_loop_regularizes_once_per_optimizer_step(tmp_path, monkeypatch):
    from posttrain.train.forgetting import ForgettingControl

    calls = []
    original = ForgettingControl.regularize

    def spy(self, module, grad_scale, accelerator, step):
        calls.append((grad_scale, step))
        return original(self, module, grad_scale, accelerator, step)

    monkeypatch.setattr(ForgettingControl, "regularize", spy)
    cfg = _cfg(tmp_path, l2sp=0.1)
    cfg.train.grad_accum = 3
    run_sft(cfg)
    assert calls == [(1.0, step) for step in range(4)]


def test_resumed_run_keeps_the_first_anchor_and_equals_an_uninterrupted_one(tmp_path):
    straight = _cfg(tmp_path, "straight", l2sp=0.3, ewc=1.0, fisher_examples=4)
    straight.train.max_steps, straight.train.save_every = 6, 3
    a = run_sft(straight)
    cut = _cfg(tmp_path, "cut", l2sp=0.3, ewc=1.0, fisher_examples=4)
    cut.train.max_steps = 3
    run_sft(cut)
    resumed = _cfg(tmp_path, "cut", l2sp=0.3, ewc=1.0, fisher_examples=4)
    resumed.train.max_steps, resumed.train.resume = 6, "auto"
    b = run_sft(resumed)
    fa, fb = _final(a), _final(b)
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name
    pa = {line["step"]: line["ewc_penalty"] for line in _lines(a) if "loss" in line}
    pb = {line["step"]: line["ewc_penalty"] for line in _lines(b) if "loss" in line}
    assert pb == pa and pa[6] > 0  # measured against θ₀ of step 0, not the weights at the resume
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert summary_b["retain_loss_before"] == summary_a["retain_loss_before"]
    assert summary_b["retain_loss_after"] == pytest.approx(summary_a["retain_loss_after"], abs=0)


def test_retain_loss_is_logged_at_step_zero_and_each_evaluation(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.train.eval_every = 2
    run_dir = run_sft(cfg)
    retain = [line for line in _lines(run_dir) if "retain_loss" in line]
    assert [line["step"] for line in retain] == [0, 2, 4]
    assert retain[0]["retain_loss"] > 0 and "retain_loss_increase" not in retain[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["retain_loss_before"] == retain[0]["retain_loss"]
    assert summary["retain_loss_after"] == retain[-1]["retain_loss"]
    assert summary["retain_loss_increase"] == pytest.approx(retain[-1]["retain_loss"] - retain[0]["retain_loss"])
    # no penalty asked for: no anchor kept (the checkpoint holds the start loss only), no penalty logged
    assert not any("l2sp_penalty" in line for line in _lines(run_dir))
    (saved,) = (run_dir / "checkpoints").glob("*/stage_state.json")
    saved = json.loads(saved.read_text())
    assert len(saved.pop("retain_rows")) == 16  # a digest of the retain rows and their split
    assert saved == {"start_loss": retain[0]["retain_loss"], "anchors": 0, "fisher": 0}


def test_a_resumed_measuring_run_keeps_its_start_loss(tmp_path):
    cut = _cfg(tmp_path, "cut")
    cut.train.max_steps = 2
    before = json.loads((run_sft(cut) / "summary.json").read_text())["retain_loss_before"]
    resumed = _cfg(tmp_path, "cut")
    resumed.train.max_steps, resumed.train.resume = 4, "auto"
    summary = json.loads((run_sft(resumed) / "summary.json").read_text())
    assert summary["retain_loss_before"] == before
    assert summary["retain_loss_after"] != before
    assert summary["retain_loss_increase"] == pytest.approx(summary["retain_loss_after"] - before)


def test_a_rising_retain_loss_stops_the_run(tmp_path, capsys):
    """A learning rate high enough to wreck the model at once: the retain loss jumps and the run
    stops at the first evaluation, saying why."""
    cfg = _cfg(tmp_path, max_retain_increase=0.05)
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.lr = 20, 2, 0.3
    run_dir = run_sft(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 2
    assert summary["retain_loss_increase"] > 0.05
    assert "forgetting.max_retain_increase" in capsys.readouterr().out


def test_retain_exact_match_before_and_after(tmp_path, capsys):
    run_dir = run_sft(_cfg(tmp_path, retain_exact_match=5))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["retain_exact_match_before"] <= 1.0 and 0.0 <= summary["retain_exact_match_after"] <= 1.0
    assert "on 5 held-out retain prompts" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("setting, message", [
    ({"replay_ratio": 1.0}, "replay_ratio must be in [0, 1)"),
    ({"retain_eval_fraction": 0.0}, "retain_eval_fraction must be in (0, 1)"),
    ({"l2sp": -1.0}, "must be >= 0"),
    ({"fisher_examples": 0}, "fisher_examples must be at least 1"),
    ({"retain_files": ["synthetic"]}, "takes files"),
])
def test_bad_settings_are_refused_up_front(tmp_path, setting, message):
    cfg = _cfg(tmp_path, **setting)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate_sft(cfg)


@pytest.mark.parametrize("name", ["replay_ratio", "ewc", "max_retain_increase", "retain_exact_match"])
def test_settings_that_read_retain_data_need_retain_files(tmp_path, name):
    cfg = _cfg(tmp_path, **{name: 0.5 if name != "retain_exact_match" else 4})
    cfg.forgetting.retain_files = []
    with pytest.raises(ConfigError, match=f"forgetting.{name} needs forgetting.retain_files"):
        validate_sft(cfg)


def test_replay_is_refused_for_streamed_data(tmp_path):
    cfg = _cfg(tmp_path, replay_ratio=0.2)
    cfg.data.streaming = True
    with pytest.raises(ConfigError, match="data.streaming=false"):
        validate_sft(cfg)


def test_a_bad_retain_row_is_named_by_file_and_line(tmp_path):
    cfg = _cfg(tmp_path)
    path = tmp_path / "retain_copy.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = '{"instruction": "Copy: a b"'  # truncated JSON on line 7
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"retain_copy\.jsonl:7"):
        run_sft(cfg)
    cfg = _cfg(tmp_path, "skip")
    path.write_text("\n".join(lines) + "\n")  # _cfg rewrote the file
    cfg.data.bad_rows, cfg.data.max_bad_fraction = "skip", 0.1
    run_dir = run_sft(cfg)
    rejects = (run_dir / "rejects-retain.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and "retain_copy.jsonl:7" in rejects[0]


def test_a_retain_file_of_one_row_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    path = tmp_path / "retain_copy.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(ConfigError, match="at least 2 are needed"):
        run_sft(cfg)


def test_a_checkpoint_of_other_forgetting_settings_is_refused_on_resume(tmp_path):
    plain = _cfg(tmp_path)
    plain.train.save_every = 2
    run_sft(plain)
    anchored = _cfg(tmp_path, l2sp=0.1)
    anchored.train.max_steps, anchored.train.resume = 6, "auto"
    with pytest.raises(ConfigError, match="other settings"):  # forgetting.* is part of the run's fingerprint
        run_sft(anchored)


def test_forgetting_settings_are_part_of_the_run_fingerprint(tmp_path):
    from posttrain.train.runs import run_fingerprint

    assert run_fingerprint(_cfg(tmp_path)) != run_fingerprint(_cfg(tmp_path, l2sp=0.1))


def test_the_stop_and_the_exact_match_count_may_change_on_resume(tmp_path):
    """How a run is watched, not what it trains: like train.* cadences, they may change on resume."""
    from posttrain.train.runs import run_fingerprint

    plain = run_fingerprint(_cfg(tmp_path, l2sp=0.1))
    assert run_fingerprint(_cfg(tmp_path, l2sp=0.1, max_retain_increase=0.5, retain_exact_match=7)) == plain
    assert run_fingerprint(_cfg(tmp_path, l2sp=0.1, replay_ratio=0.1)) != plain


@pytest.mark.parametrize("kind, refused", [("NO", False), ("MULTI_GPU", False), ("MULTI_CPU", False), ("FSDP", True),
                                           ("DEEPSPEED", True)])
def test_anchors_are_refused_for_sharded_parameters(kind, refused):
    from posttrain.config import ForgettingConfig
    from posttrain.train.forgetting import check_anchoring

    class Accelerator:
        distributed_type = kind

    check_anchoring(ForgettingConfig(), Accelerator())  # measuring alone works anywhere
    if refused:
        with pytest.raises(ConfigError, match=kind):
            check_anchoring(ForgettingConfig(ewc=1.0), Accelerator())
    else:
        check_anchoring(ForgettingConfig(l2sp=1.0), Accelerator())
