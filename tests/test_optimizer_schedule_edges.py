"""Optimizer groups, the reached-rows AdamW and the schedule, against independent computations.

An adversarial review of src/posttrain/train/optim.py and of how loop.py / checkpoint.py use it.
Every expectation comes from plain torch (torch.optim.AdamW, clip_grad_norm_), transformers' own
weight-decay rule, hand-built models with Llama / GPT-2 / GPT-NeoX names, or README's words written
out here. Tests marked xfail(strict) describe defects; they flip when fixed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError
from posttrain.train import checkpoint
from posttrain.train import loop as loop_mod
from posttrain.train.loop import train
from posttrain.train.runs import make_accelerator
from posttrain.train.optim import (
    AdamW,
    clip_grad_norm,
    freeze_by_pattern,
    lr_factor,
    make_optimizer,
    param_groups,
    sparse_embedding_gradients,
)

DECAY = 0.5


# --------------------------------------------------------------------------- tiny HF models


def _llama(layers: int = 3, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    return LlamaForCausalLM(cfg)


def _gpt2(layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=layers, n_head=2, n_positions=32,
                                      bos_token_id=1, eos_token_id=2))


def _gpt_neox(layers: int = 3):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers,
                                            num_attention_heads=2, intermediate_size=32, bos_token_id=1,
                                            eos_token_id=2))


def _lr_and_wd(model, lr=1.0, wd=0.1, decay=DECAY, lr_scale=None):
    groups = param_groups(model, lr, wd, decay, lr_scale)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    return lr_of, wd_of


def _readme_exponent(name: str, num_layers: int, layer_prefix: str, embeddings: tuple[str, ...]) -> int:
    """README: "layer i of L trains at lr * decay^(L - i); embeddings at decay^(L+1)"; the rest (final
    norm, head) at lr (param_groups' docstring: decay^(depth below the top))."""
    if name.startswith(layer_prefix):
        return num_layers - int(name[len(layer_prefix):].split(".")[0])
    if any(name.startswith(e) for e in embeddings):
        return num_layers + 1
    return 0


# --------------------------------------------------------------------------- layer-wise decay


def test_layer_decay_exponents_with_llama_names_and_a_frozen_top_layer():
    model = _llama(layers=3)
    lr_of, _ = _lr_and_wd(model)
    assert len(lr_of) == len(list(model.parameters()))
    for name, lr in lr_of.items():
        expected = DECAY ** _readme_exponent(name, 3, "model.layers.", ("model.embed_tokens",))
        assert lr == pytest.approx(expected, rel=1e-15), name
    assert lr_of["model.embed_tokens.weight"] == pytest.approx(DECAY ** 4)
    assert lr_of["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(DECAY ** 3)
    assert lr_of["lm_head.weight"] == lr_of["model.norm.weight"] == 1.0

    # Freezing the top layer must not renumber the others: L stays the model's depth.
    frozen = freeze_by_pattern(model, ["model.layers.2.*"])
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.2."))
    after, _ = _lr_and_wd(model)
    assert not any(n.startswith("model.layers.2.") for n in after)
    assert all(after[n] == lr_of[n] for n in after)


def test_layer_decay_exponents_with_gpt2_names():
    """transformer.h.i, wte / wpe (embeddings), ln_f (top); the head is tied to wte."""
    model = _gpt2(layers=3)
    lr_of, _ = _lr_and_wd(model)
    assert "transformer.wpe.weight" in lr_of and "transformer.ln_f.weight" in lr_of
    for name, lr in lr_of.items():
        expected = DECAY ** _readme_exponent(name, 3, "transformer.h.", ("transformer.wte", "transformer.wpe"))
        assert lr == pytest.approx(expected, rel=1e-15), name


def test_layer_decay_puts_any_input_embedding_at_the_bottom():
    """README: any AutoModelForCausalLM model loads; "embeddings at decay^(L+1)". GPT-NeoX (Pythia)
    names its input embedding embed_in (Bloom / Falcon: word_embeddings)."""
    model = _gpt_neox(layers=3)
    lr_of, _ = _lr_and_wd(model)
    embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    assert lr_of["gpt_neox.layers.0.attention.dense.weight"] == pytest.approx(DECAY ** 3)  # layers are found
    assert lr_of[embedding] == pytest.approx(DECAY ** 4)


# --------------------------------------------------------------------------- weight decay groups


def _hf_decay_names(model) -> set[str]:
    """transformers' Trainer rule (Trainer.get_decay_parameter_names, copied patterns): no decay in
    nn.LayerNorm modules, nor on names with bias / layernorm / rmsnorm / norm."""
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [torch.nn.LayerNorm], patterns))


@pytest.mark.parametrize("build", [
    lambda: _llama(layers=2, attention_bias=True, mlp_bias=True),  # biases on every linear
    lambda: _gpt2(layers=2),  # ln_1 / ln_2 / ln_f: LayerNorms whose names lack "norm"
], ids=["llama_biases", "gpt2"])
def test_weight_decay_goes_where_transformers_puts_it(build):
    """README: no decay on biases and norms; weights and embeddings decay (as transformers' Trainer)."""
    model = build()
    _, wd_of = _lr_and_wd(model, wd=0.1)
    decayed = {n for n, wd in wd_of.items() if wd > 0}
    assert decayed == _hf_decay_names(model) & set(wd_of)
    assert all(wd in (0.0, 0.1) for wd in wd_of.values())
    assert any(n.endswith(".bias") for n in wd_of) and not any(n.endswith(".bias") for n in decayed)


# --------------------------------------------------------------------------- LoRA+


def _lora_model(targets: list[str]):
    from posttrain.config import SFTConfig
    from posttrain.models.adapters import apply_adapters, plan_adapters
    from posttrain.models.adapters.schedule import AdapterTraining

    cfg = SFTConfig.from_dict({"model": {"path": "tiny"}, "adapter": {
        "method": ["lora"], "lora": {"r": 2, "target_modules": targets, "lr_ratio_b": 16}}})
    plan = plan_adapters(cfg.adapter)
    model = apply_adapters(_llama(layers=3), cfg.adapter, plan=plan)
    return model, AdapterTraining(model, plan, 16.0, log=lambda *_: None)


def test_lora_plus_times_layer_decay():
    """LoRA+ (Hayou et al. 2024): B at lr x lr_ratio_b, A at lr; times decay^(L - i) at layer i."""
    model, training = _lora_model(["q_proj", "v_proj"])
    lr_of, _ = _lr_and_wd(model, lr=1.0, lr_scale=training.lr_scale)
    assert len(lr_of) == 3 * 2 * 2
    for name, lr in lr_of.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        ratio = 16.0 if ".lora_B." in name else 1.0
        assert lr == pytest.approx(ratio * DECAY ** (3 - layer), rel=1e-15), name


def test_lora_plus_scales_the_b_matrix_of_an_embedding_lora():
    """README: `lr_ratio_b`: the B matrices learn at lr x this. target_modules may name the embedding."""
    model, training = _lora_model(["q_proj", "embed_tokens"])
    lr_of, _ = _lr_and_wd(model, lr=1.0, decay=1.0, lr_scale=training.lr_scale)
    b_names = [n for n in lr_of if "lora_embedding_B" in n]
    assert b_names  # the premise: peft put a LoRA on the embedding
    assert all(lr_of[n] == 16.0 for n in b_names)


# --------------------------------------------------------------------------- freeze patterns


def test_a_freeze_pattern_that_matches_nothing_is_refused_before_anything_is_frozen():
    model = _llama(layers=2)
    with pytest.raises(ConfigError, match=r"\*embed_tokenz\*"):
        freeze_by_pattern(model, ["model.layers.0.*", "*embed_tokenz*"])
    assert all(p.requires_grad for p in model.parameters())  # the good pattern was not half-applied


def test_freeze_patterns_that_match_everything_leave_no_optimizer():
    model = _llama(layers=2)
    total = sum(p.numel() for p in model.parameters())
    assert freeze_by_pattern(model, ["*", "model.*"]) == total  # each parameter counted once
    assert freeze_by_pattern(model, ["*"]) == 0  # already frozen: nothing more
    with pytest.raises(ConfigError, match="no trainable parameters"):
        make_optimizer(model, TrainConfig(lr=1e-3))


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("schedule, total, warmup, floor, expected", [
    ("linear", 5, 0, 0.0, [1.0, 0.8, 0.6, 0.4, 0.2]),        # (T - s) / T
    ("linear", 5, 0, 0.5, [1.0, 0.9, 0.8, 0.7, 0.6]),
    ("cosine", 3, 1, 0.5, [1.0, 1.0, 0.75]),                 # boundary: warmup ends at the peak
    ("cosine", 5, 1, 0.0, [1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("constant", 4, 2, 0.3, [0.5, 1.0, 1.0, 1.0]),           # min_lr_ratio: linear / cosine only
    ("cosine", 1, 0, 0.2, [1.0]),                            # total 1
    ("linear", 3, 5, 0.0, [0.2, 0.4, 0.6]),                  # warmup longer than the run
    ("linear", 4, 4, 0.0, [0.25, 0.5, 0.75, 1.0]),           # warmup = the whole run
], ids=["linear", "linear_floor", "cosine_boundary", "cosine", "constant_warmup", "total_1", "warmup_gt_total",
        "warmup_eq_total"])
def test_lr_factor_at_hand_computed_points(schedule, total, warmup, floor, expected):
    assert [lr_factor(s, total, schedule, warmup, floor) for s in range(total)] == pytest.approx(expected, abs=1e-15)


class _Stop(Exception):
    pass


def test_warmup_ratio_of_a_round_product_is_that_many_steps(tmp_path, monkeypatch):
    """README: warmup_ratio is "warmup as a fraction of max steps": 7% of 100 steps is 7 steps."""
    seen = []

    def spy(step, total_steps, schedule, warmup_steps, min_lr_ratio):
        seen.append((total_steps, warmup_steps))
        raise _Stop

    monkeypatch.setattr(loop_mod, "lr_factor", spy)
    cfg = _cfg(max_steps=100, warmup_steps=0, warmup_ratio=0.07)
    with pytest.raises(_Stop):
        train(_LMStage(_batches(2)), cfg, tmp_path, make_accelerator(cfg, tmp_path))
    assert seen == [(100, 7)]


# --------------------------------------------------------------------------- a Llama-named float64 LM


V, H = 48, 5  # an odd width


class _LM(torch.nn.Module):
    """model.embed_tokens (untied) / model.layers.{0,1} / model.norm / lm_head, in float64; the
    forward returns the summed cross-entropy (the loop's contract). `nan_at` / `crash_at`: forward
    call numbers (1-based) that give a NaN loss / raise."""

    def __init__(self, nan_at=(), crash_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(V, H)
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(H, H) for _ in range(2)])
        self.model.norm = torch.nn.LayerNorm(H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.double()
        self.nan_at, self.crash_at, self.calls = set(nan_at), crash_at, 0

    def forward(self, ids, labels):
        self.calls += 1
        if self.calls == self.crash_at:
            raise _Stop
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = torch.tanh(layer(x))
        logits = self.lm_head(self.model.norm(x))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return loss * float("nan") if self.calls in self.nan_at else loss

    @property
    def emb(self):
        return self.model.embed_tokens.weight


def _batches(n: int) -> list[dict]:
    """Micro-batches over a vocabulary prefix that widens: rows reached late, rows never reached."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(0, 6 + 2 * i, (2, 4), generator=g)
        out.append({"ids": ids, "labels": ids.roll(1, dims=1)})
    return out


class _LMStage:
    def __init__(self, batches, module=None):
        self.batches = batches
        self.module = module if module is not None else _LM()

    def micro_batches(self, epoch):
        yield from self.batches

    def micro_batches_per_epoch(self):
        return len(self.batches)

    def weight(self, batch):
        return float(batch["labels"].numel())

    def tokens(self, batch):
        return int(batch["ids"].numel())

    def eval_micro_batches(self):
        return []


def _cfg(**kw) -> TrainConfig:
    base = {"max_steps": 7, "batch_size": 2, "grad_accum": 2, "lr": 0.05, "schedule": "cosine", "warmup_steps": 2,
            "min_lr_ratio": 0.1, "weight_decay": 0.1, "layer_lr_decay": DECAY, "max_grad_norm": 0.5,
            "progress_bar": False, "resume": "never"}
    base.update(kw)
    return TrainConfig(**base)


def _readme_factor(s: int, total: int, warmup: int, floor: float) -> float:
    """(s + 1) / W during warmup, then min + (1 - min) · ½(1 + cos(π (s - W) / (T - W)))."""
    if s < warmup:
        return (s + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))


def _reference_run(batches, cfg, nan_steps=()):
    """The loop's run written with plain torch in float64: one AdamW group per parameter at the
    README's rate (lr · decay^(L - i) at layer i, decay^(L+1) for the embedding, lr for the norm and
    head) and decay (weights and embeddings, not biases or norms), dense gradients of Σ loss / step
    weight, torch's clip_grad_norm_, a NaN step skipped. Returns (model, [(lr, pre-clip norm)])."""
    model = _LM()
    exponent = {"model.embed_tokens.weight": 3, "model.layers.0.weight": 2, "model.layers.0.bias": 2,
                "model.layers.1.weight": 1, "model.layers.1.bias": 1}
    wd = {"model.embed_tokens.weight", "model.layers.0.weight", "model.layers.1.weight", "lm_head.weight"}
    named = dict(model.named_parameters())
    base = {n: cfg.lr * DECAY ** exponent.get(n, 0) for n in named}
    opt = torch.optim.AdamW([{"params": [p], "lr": base[n], "weight_decay": cfg.weight_decay if n in wd else 0.0}
                             for n, p in named.items()], betas=(0.9, 0.999), eps=1e-8)
    names = list(named)
    figures = []
    for s in range(cfg.max_steps):
        factor = _readme_factor(s, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group, n in zip(opt.param_groups, names):
            group["lr"] = base[n] * factor
        micro = batches[s * cfg.grad_accum:(s + 1) * cfg.grad_accum]
        weight = sum(b["labels"].numel() for b in micro)
        for b in micro:
            (model(**b) / weight).backward()
        if s in nan_steps:
            figures.append((cfg.lr * factor, math.nan))
            opt.zero_grad()
            continue
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.max_grad_norm)
        figures.append((cfg.lr * factor, float(norm)))
        opt.step()
        opt.zero_grad()
    return model, figures


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_the_loop_equals_plain_torch_adamw_with_readme_groups_schedule_clipping_and_a_skipped_step(tmp_path):
    """7 steps x 2 micro-batches, cosine after 2 warmup steps, layer decay 0.5, weight decay, a tight
    clip, the untied embedding on its sparse gradient and reached rows, step 3 NaN (skipped, the
    schedule still advances). Then the same run killed in step 5 and resumed from its step-4
    checkpoint (float64 moments through safetensors) must end bitwise equal to the straight run."""
    batches = _batches(14)
    cfg = _cfg()
    nan_call = 3 * cfg.grad_accum + 1  # the first forward of step 3
    straight = train(_LMStage(batches, _LM(nan_at={nan_call})), cfg, tmp_path / "a",
                     make_accelerator(cfg, tmp_path / "a"))
    assert straight.step == 7 and straight.skipped_steps == 1
    reference, figures = _reference_run(batches, cfg, nan_steps={3})
    records = _records(tmp_path / "a")
    assert [r["lr"] for r in records] == pytest.approx([lr for lr, _ in figures], rel=1e-12)
    logged_norms = [r["grad_norm"] for r in records]
    assert logged_norms[3] is None and records[3]["nonfinite"]["grad_norm"] == "nan" and all(norm > cfg.max_grad_norm for _, norm in figures if not math.isnan(norm))
    assert [n for i, n in enumerate(logged_norms) if i != 3] == pytest.approx(
        [n for i, (_, n) in enumerate(figures) if i != 3], rel=1e-12)
    for (name, ours), theirs in zip(straight.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=name)
    never = sorted(set(range(V)) - set(torch.cat([b["ids"].flatten() for b in batches]).tolist()))
    assert never  # the premise: some rows were never reached, and decayed as AdamW decays them
    assert not torch.equal(straight.module.emb[never], _LM().emb[never])

    cut = _cfg(save_every=4)
    with pytest.raises(_Stop):
        train(_LMStage(batches, _LM(nan_at={nan_call}, crash_at=5 * cfg.grad_accum + 1)), cut, tmp_path / "b",
              make_accelerator(cut, tmp_path / "b"))
    again = _cfg(save_every=4, resume="auto")
    resumed = train(_LMStage(batches), again, tmp_path / "b", make_accelerator(again, tmp_path / "b"))
    assert resumed.step == 7 and resumed.skipped_steps == 1
    for (name, a), b in zip(straight.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- the reached-rows AdamW, float64


def _groups(model, wd):
    return param_groups(model, 1e-2, wd, DECAY)


def _strip(groups):
    for group in groups:
        group.pop("names", None)
    return groups


def _copy_grads(src, dst):
    for p, q in zip(src.parameters(), dst.parameters()):
        q.grad = None if p.grad is None else (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
def test_reached_rows_adamw_equals_torch_step_by_step_in_float64(tmp_path, wd, sparse):
    """Every step, bitwise: rows reached late (a widening vocabulary), rows never reached, a step
    without an embedding gradient, a save / load through the checkpoint files mid-run into a fresh
    optimizer, then a batch past half the rows (handed back to torch's step), then more steps."""
    plan = [torch.randint(0, 4 + 3 * s, (2, 3), generator=torch.Generator().manual_seed(s)) for s in range(5)]
    plan += [None, torch.arange(0, 30).view(5, 6), torch.tensor([[1, 40, 41]]), torch.tensor([[47, 2, 2]])]
    ours, theirs = _LM(), _LM()
    opt = AdamW(_strip(_groups(ours, wd)), row_sparse=[ours.emb])
    ref = torch.optim.AdamW(_strip(_groups(theirs, wd)))
    reached_late = False
    for s, ids in enumerate(plan):
        if s == 4:  # save mid-run (checkpoint files), resume into a fresh model and optimizer of ours
            saved = checkpoint.save(tmp_path, s, model=ours, optimizer=opt, loop_state={"step": s}, rank=0,
                                    world_size=1, barrier=lambda: None, keep_last=1)
            ours = _LM()
            opt = AdamW(_strip(_groups(ours, wd)), row_sparse=[ours.emb])
            checkpoint.load(saved, model=ours, optimizer=opt, rank=0)
            assert all(set(state) == {"step", "exp_avg", "exp_avg_sq"} for state in opt.state_dict()["state"].values())
            assert opt.state[ours.emb]["exp_avg_reached"].dtype == torch.float64
        with sparse_embedding_gradients(ours, enabled=sparse):
            if ids is None:  # the embedding unused: its gradient stays None
                ours.lm_head(ours.model.norm(torch.ones(2, H, dtype=torch.float64))).pow(2).sum().backward()
            else:
                ours(ids, ids.roll(1, dims=1)).backward()
        if sparse and ids is not None:
            assert ours.emb.grad.is_sparse
        _copy_grads(ours, theirs)
        before = ours.emb.detach().clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b), (s, name)
        if s == 3:
            reached_late = bool(opt._row_sparse)
        if wd == 0.0 and s < 6:  # rows never reached do not move at all without weight decay
            assert torch.equal(ours.emb[40:], before[40:])
    assert reached_late and opt._row_sparse == []  # the row path ran, then the matrix was handed back


def test_amsgrad_in_a_param_group_is_refused_or_equals_torch():
    ours, theirs = _LM(), _LM()
    try:
        opt = AdamW([{"params": list(ours.parameters()), "amsgrad": True}], row_sparse=[ours.emb], lr=1e-2)
    except (ConfigError, ValueError) as refused:
        assert "amsgrad" in str(refused)
        return
    ref = torch.optim.AdamW([{"params": list(theirs.parameters()), "amsgrad": True}], lr=1e-2)
    for s in range(4):
        ids = torch.tensor([[s, s + 1, 3]])
        for model, optimizer in ((ours, opt), (theirs, ref)):
            (model(ids, ids) * (6.0 if s == 1 else 1.0)).backward()  # a large step: v̂ max matters after it
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name


def test_clip_grad_norm_over_a_float64_sparse_and_a_float32_dense_gradient_equals_torch():
    """Mixed dtypes with a sparse, uncoalesced (duplicate rows) float64 gradient: the norm and the
    clipped gradients are torch's clip_grad_norm_ on the densified gradients."""
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([[0, 3, 3, 1, 0]])
    values = torch.randn(5, 3, generator=g, dtype=torch.float64)
    other = torch.randn(7, generator=g)
    ours = [torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(7))]
    theirs = [torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(7))]
    ours[0].grad = torch.sparse_coo_tensor(index, values, (5, 3))
    ours[1].grad = other.clone()
    theirs[0].grad = torch.zeros(5, 3, dtype=torch.float64).index_add_(0, index[0], values)
    theirs[1].grad = other.clone()
    norm = clip_grad_norm(ours, 0.3)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.3)
    assert expected > 0.3
    torch.testing.assert_close(norm, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(ours[0].grad.to_dense(), theirs[0].grad, rtol=1e-15, atol=0)
    assert torch.equal(ours[1].grad, theirs[1].grad)
