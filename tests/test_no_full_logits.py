"""The memory claim: training never materialises [rows, sequence, vocabulary] logits.

README (*Loss*, `train.loss`, `train.loss_chunk_size`, DPO's "Per-sequence log-probs come from
the final hidden states in checkpointed chunks", online RL's "The logits are formed a chunk of
tokens at a time") promises that every path computing log-probs over the vocabulary holds at most
one (chunk, V) block, and that generation holds one (rows, V) logit per step.

Each stage runs end to end on a test-only Llama whose vocabulary (32,000) dwarfs everything else
(hidden 8, so no weight-gradient or activation has a last dimension of V by accident), under a
`TorchDispatchMode` that records every tensor *allocated* (views and in-place results excluded)
whose last dimension is V, with the posttrain frames that allocated it. The bound for a chunked
path is `train.loss_chunk_size` rows; the batches are sized so that the [B, T, V] logits would be
several times that. The chunked functions themselves are checked against a plain float64
log_softmax gather (values and gradients) for a chunk size that does not divide the token count,
also under bf16 autocast on CPU.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB = 32000
HIDDEN = 8  # < CHUNK: a (H, V) weight-gradient block can never pass for a chunk of logits
CHUNK = 16  # train.loss_chunk_size everywhere below
GEN_BATCH = 8  # rollout.batch_size: the most rows one generation step may hold
_SRC = "/src/posttrain/"


# --------------------------------------------------------------------------- the recorder


class VocabAllocations(TorchDispatchMode):
    """Every freshly allocated tensor whose last dimension is the vocabulary, with its shape, the
    aten op and the posttrain frames (innermost first) that produced it."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.vocab = vocab
        self.seen: collections.Counter = collections.Counter()  # (shape, op, frames) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for t in results:
            if not (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dim() >= 2
                    and t.shape[-1] == self.vocab):
                continue
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor) and a.layout == torch.strided}
            if t.untyped_storage().data_ptr() in inputs:
                continue  # a view or an in-place op: no new memory
            frames, f = [], sys._getframe(1)
            while f is not None:
                if _SRC in f.f_code.co_filename:
                    frames.append(f"{f.f_code.co_filename.split(_SRC)[1]}:{f.f_lineno}({f.f_code.co_name})")
                f = f.f_back
            self.seen[(tuple(t.shape), str(func), tuple(frames))] += 1
        return out

    def select(self, inside: str | None = None, outside: tuple[str, ...] = ()) -> list[tuple]:
        """(rows, shape, op, frames) of the allocations with a frame containing `inside` (all if
        None) and none containing any of `outside`."""
        picked = []
        for (shape, op, frames), _ in self.seen.items():
            if inside is not None and not any(inside in fr for fr in frames):
                continue
            if any(o in fr for o in outside for fr in frames):
                continue
            rows = 1
            for n in shape[:-1]:
                rows *= n
            picked.append((rows, shape, op, frames))
        return sorted(picked, key=lambda r: -r[0])


def largest(rec: VocabAllocations, inside: str | None = None, outside: tuple[str, ...] = ()) -> tuple:
    picked = rec.select(inside, outside)
    return picked[0] if picked else (0, None, None, ())


def describe(entry: tuple) -> str:
    rows, shape, op, frames = entry
    return f"{rows} rows, shape {shape} from {op} at {' <- '.join(frames[:5])}"


def assert_chunked(rec: VocabAllocations, phase: str, outside: tuple[str, ...] = (), expect_full_chunk=True):
    """Every V-wide allocation of `phase` (frames containing it) holds at most CHUNK rows, and the
    phase ran (over more tokens than one chunk when `expect_full_chunk`)."""
    top = largest(rec, phase, outside)
    assert top[0] > 0, f"no vocabulary-sized tensor under {phase}: the path did not run"
    assert top[0] <= CHUNK, f"{phase}: {describe(top)}; bound {CHUNK} rows (train.loss_chunk_size)"
    if expect_full_chunk:
        assert top[0] == CHUNK, f"{phase}: only {top[0]} rows: fewer tokens than one chunk, the check proves nothing"
    return top


def assert_generation_steps(rec: VocabAllocations, phase: str, max_rows: int):
    """Generation under `phase` holds one (rows, V) logit per step, never (rows, seq, V)."""
    picked = [e for e in rec.select(phase) if any("rollout/generate.py" in fr for fr in e[3])]
    assert picked, f"no generation step recorded under {phase}"
    for rows, shape, op, frames in picked:
        assert len(shape) == 2 or all(n == 1 for n in shape[1:-1]), describe((rows, shape, op, frames))
        assert rows <= max_rows, describe((rows, shape, op, frames))


# --------------------------------------------------------------------------- the model and runs


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="nofull-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def big_vocab_model(workdir) -> str:
    """A 2-layer Llama, hidden 8, vocabulary 32,000 (tied head), with the preset tokenizer (whose
    ids all lie below 32,000)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from posttrain.models.presets import preset_path

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    assert len(tokenizer) < VOCAB
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out = workdir / "v32k"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def recorded(fn) -> VocabAllocations:
    rec = VocabAllocations()
    with rec:
        fn()
    return rec


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict):
            base[key] = _merge(base.get(key, {}), value)
        else:
            base[key] = value
    return base


def sft_run(model_path: str, workdir: Path, **extra) -> VocabAllocations:
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    cfg = _merge({"output_dir": tempfile.mkdtemp(dir=workdir), "model": {"path": model_path},
                  "data": {"train_files": ["synthetic"], "synthetic_tasks": ["copy"], "synthetic_size": 40,
                           "eval_fraction": 0.2, "max_length": 64},
                  "train": {"max_steps": 1, "batch_size": 8, "progress_bar": False, "eval_every": 1,
                            "loss_chunk_size": CHUNK},
                  "eval": {"exact_match_prompts": 3, "max_new_tokens": 3}}, extra)
    return recorded(lambda: run_sft(SFTConfig.from_dict(cfg)))


def dpo_run(model_path: str, workdir: Path, loss: str, reference: str = "precompute") -> VocabAllocations:
    from posttrain.config import DPOConfig
    from posttrain.train.preference import run_dpo

    cfg = {"output_dir": tempfile.mkdtemp(dir=workdir), "model": {"path": model_path},
           "data": {"train_files": ["synthetic"], "synthetic_tasks": ["copy"], "synthetic_size": 24,
                    "eval_fraction": 0.25, "max_length": 64},
           "dpo": {"loss": loss, "reference": reference},
           "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False, "loss_chunk_size": CHUNK},
           "eval": {"exact_match_prompts": 3, "max_new_tokens": 3}}
    if loss == "kto":
        cfg["data"]["synthetic_kind"] = "unpaired"
    return recorded(lambda: run_dpo(DPOConfig.from_dict(cfg)))


def rl_run(model_path: str, workdir: Path, kind: str, **extra) -> VocabAllocations:
    from posttrain.config import GRPOConfig, PPOConfig
    from posttrain.train.grpo import run_grpo
    from posttrain.train.ppo import run_ppo

    cfg = _merge({"output_dir": tempfile.mkdtemp(dir=workdir), "model": {"path": model_path},
                  "data": {"train_files": ["synthetic"], "synthetic_tasks": ["copy"], "synthetic_size": 40},
                  "rollout": {"num_generations": 4 if kind == "grpo" else 1, "max_new_tokens": 12,
                              "batch_size": GEN_BATCH},
                  "train": {"max_steps": 1, "batch_size": 8, "progress_bar": False, "loss_chunk_size": CHUNK},
                  "eval": {"prompts": 2, "samples": 2}}, extra)
    if kind == "grpo":
        return recorded(lambda: run_grpo(GRPOConfig.from_dict(cfg)))
    return recorded(lambda: run_ppo(PPOConfig.from_dict(cfg)))


# --------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_allocations(big_vocab_model, workdir):
    return sft_run(big_vocab_model, workdir)


def test_sft_train_step_and_evaluation_hold_one_chunk(sft_allocations):
    rec = sft_allocations
    assert_chunked(rec, "(_train_step)")  # forward + backward of the chunked linear cross-entropy
    assert_chunked(rec, "loop.py", outside=("(_train_step)", "(exact_match)"))  # held-out loss
    assert_generation_steps(rec, "(exact_match)", max_rows=3)
    # nothing else in the run allocates a vocabulary-wide tensor
    rest = rec.select(None, outside=("(_train_step)", "loop.py", "(exact_match)"))
    assert not rest, describe(rest[0])


def test_sft_lora_on_the_output_head_keeps_the_chunked_loss(big_vocab_model, workdir):
    # peft accepts lm_head as a LoRA target; the effective head is still a linear map W + s·B·A,
    # and the README's train.loss says auto picks `plain` only for heads that scale or soft-cap
    rec = sft_run(big_vocab_model, workdir,
                  adapter={"method": "lora", "lora": {"target_modules": ["q_proj", "lm_head"]}},
                  eval={"exact_match_prompts": 0})
    assert_chunked(rec, "(_train_step)")
    assert_chunked(rec, "loop.py", outside=("(_train_step)",))


# --------------------------------------------------------------------------- DPO family


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_preference_losses_hold_one_chunk(big_vocab_model, workdir, loss):
    rec = dpo_run(big_vocab_model, workdir, loss)
    assert_chunked(rec, "(_train_step)")  # policy forward + backward (checkpointed chunks)
    assert_chunked(rec, "(evaluate)")  # held-out implicit-reward evaluation, before and after
    if loss in ("simpo", "orpo"):
        assert not rec.select("(precompute_reference)")  # reference-free: no reference pass at all
    else:
        assert_chunked(rec, "(precompute_reference)")
    assert_generation_steps(rec, "(exact_match)", max_rows=3)
    rest = rec.select(None, outside=("(_train_step)", "(evaluate)", "(precompute_reference)", "(exact_match)"))
    assert not rest, describe(rest[0])


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_live_reference_holds_one_chunk(big_vocab_model, workdir, loss):
    rec = dpo_run(big_vocab_model, workdir, loss, reference="live")
    assert_chunked(rec, "(precompute_reference)")  # the held-out set's reference, once before training
    reference = "(_reference)" if loss == "dpo" else "(_row_reference)"
    top = largest(rec, reference)
    assert 0 < top[0] <= CHUNK, describe(top)
    assert_chunked(rec, "(_train_step)")
    assert_chunked(rec, "(evaluate)")


# --------------------------------------------------------------------------- reward model and scoring


def test_reward_model_training_and_scoring_run_no_lm_head(big_vocab_model, workdir):
    from posttrain.cli import main
    from posttrain.config import RMConfig
    from posttrain.train.reward import run_rm

    run_dir = workdir / "rm"
    cfg = {"output_dir": str(run_dir), "model": {"path": big_vocab_model},
           "data": {"train_files": ["synthetic"], "synthetic_tasks": ["copy"], "synthetic_size": 24,
                    "eval_fraction": 0.25, "max_length": 64},
           "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False}}
    rec = recorded(lambda: run_rm(RMConfig.from_dict(cfg)))
    assert not rec.seen, describe(largest(rec))
    rows = workdir / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Copy: a b {c}", "response": f"a b {c}"}) + "\n" for c in "cdefgh"))
    out = workdir / "scored.jsonl"
    codes = []
    rec = recorded(lambda: codes.append(main(["score", "--model", str(run_dir / "final"), "--input", str(rows),
                                              "--output", str(out)])))
    assert codes == [0] and len(out.read_text().splitlines()) == 6
    assert not rec.seen, describe(largest(rec))


# --------------------------------------------------------------------------- GRPO and PPO


@pytest.fixture(scope="module")
def grpo_allocations(big_vocab_model, workdir):
    # beta > 0: a reference (frozen copy) and the held-out KL; μ = 2: old log-probs of the rollout
    return rl_run(big_vocab_model, workdir, "grpo", grpo={"beta": 0.04, "updates_per_rollout": 2})


def test_grpo_rollout_reference_and_policy_step_hold_one_chunk(grpo_allocations):
    rec = grpo_allocations
    assert_generation_steps(rec, "(sample_and_score)", max_rows=GEN_BATCH)
    assert_chunked(rec, "(_logps)")  # old and reference log-probs of the rollout
    assert_chunked(rec, "(_train_step)")  # policy loss forward + backward
    assert_generation_steps(rec, "(held_out_reward)", max_rows=GEN_BATCH)
    rest = rec.select(None, outside=("(sample_and_score)", "(_logps)", "(_train_step)", "(held_out_reward)"))
    assert not rest, describe(rest[0])


def test_grpo_held_out_kl_respects_the_chunk_size(grpo_allocations):
    # 2 held-out prompts x 2 samples x up to 12 tokens: up to 48 rows, chunk size 16
    assert_chunked(grpo_allocations, "(_sequence_kl)", expect_full_chunk=False)


@pytest.mark.parametrize("extra", [{}, {"ppo": {"value_model": "separate"}}, {"ppo": {"entropy_coef": 0.01}}],
                         ids=["value-head", "separate-critic", "entropy-bonus"])
def test_ppo_paths_hold_one_chunk(big_vocab_model, workdir, extra):
    rec = rl_run(big_vocab_model, workdir, "ppo", **extra)
    assert_generation_steps(rec, "(sample_and_score)", max_rows=GEN_BATCH)
    assert_chunked(rec, "(_logps)", expect_full_chunk=False)  # reference log-probs of the rollout
    # the old policy's log-probs and values of the rollout (PPOLoss.evaluate, no gradients)
    assert_chunked(rec, "(evaluate)", outside=("(_train_step)",), expect_full_chunk=False)
    assert_chunked(rec, "(_train_step)", expect_full_chunk=False)
    # the critic (value head or separate model) never reaches a vocabulary-wide tensor by itself:
    # everything else is generation or the held-out KL (see the GRPO xfail above)
    assert_generation_steps(rec, "(held_out_reward)", max_rows=GEN_BATCH)
    rest = rec.select(None, outside=("(sample_and_score)", "(_logps)", "(evaluate)", "(_train_step)",
                                     "(held_out_reward)"))
    assert not rest, describe(rest[0])


# --------------------------------------------------------------------------- the chunked functions


def _reference(hidden, weight, bias, targets):
    """Plain float64 log_softmax gather and entropy: (N,) each."""
    logits = hidden.double() @ weight.double().T + bias.double()
    logp = logits.log_softmax(-1)
    return logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _close(got, want, rel):
    scale = want.abs().max().clamp(min=1.0)
    err = float((got.double() - want).abs().max())
    assert err <= rel * float(scale), f"max error {err:.3g} > {rel:g} x {float(scale):.3g}"


# float64: to rounding; float32 (with or without bf16 autocast, which the functions switch off):
# 1e-5 of the largest value; bf16 weights: computed in float32 from the bf16 values, but the
# gradients are returned in bf16, so 1e-2 of the largest (bf16 has an 8-bit mantissa).
CASES = [(torch.float64, False, 1e-10, 1e-10), (torch.float32, False, 1e-5, 1e-5),
         (torch.float32, True, 1e-5, 1e-5), (torch.bfloat16, True, 1e-5, 1e-2)]


@pytest.mark.parametrize("dtype,autocast,value_tol,grad_tol", CASES,
                         ids=["f64", "f32", "f32-bf16-autocast", "bf16-bf16-autocast"])
def test_chunked_log_probs_equal_a_float64_log_softmax(dtype, autocast, value_tol, grad_tol):
    from posttrain.losses.language_modeling import (chunked_linear_cross_entropy, sequence_logps,
                                                    token_logps, token_logps_and_entropy,
                                                    token_logps_with_entropy_value)

    gen = torch.Generator().manual_seed(0)
    n, h, v, chunk = 37, 12, 301, 8  # 37 = 4 x 8 + 5: the last chunk is partial
    hidden0 = (2 * torch.randn(n, h, generator=gen)).to(dtype)
    weight0 = torch.randn(v, h, generator=gen).to(dtype)
    bias0 = torch.randn(v, generator=gen).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    ignored = targets.clone()
    ignored[[3, 10, 11, 36]] = -100
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (hidden0, weight0, bias0)]

    ref_leaves = [t.detach().double().requires_grad_() for t in (hidden0, weight0, bias0)]
    ref_logp, ref_entropy = _reference(*ref_leaves, targets)
    ref_grads = torch.autograd.grad((ref_logp * upstream).sum(), ref_leaves)
    ref_logp_i, _ = _reference(*ref_leaves, ignored)
    ref_ce = -(ref_logp_i * (ignored != -100)).sum()
    ref_ce_grads = torch.autograd.grad(ref_ce, ref_leaves)

    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
    # forwards under autocast, backwards outside it (as the loop and torch's AMP recipe do)
    # summed cross-entropy with ignored targets (SFT)
    x = leaves()
    with amp():
        ce = chunked_linear_cross_entropy(x[0], x[1], ignored, bias=x[2], chunk_size=chunk)
    _close(ce.detach().reshape(1), ref_ce.detach().reshape(1), value_tol)
    for got, want in zip(torch.autograd.grad(ce, x), ref_ce_grads):
        _close(got, want, grad_tol)
    # per-token log-probs (DPO, RL), checkpointed or with a custom backward
    for fn in (token_logps, token_logps_and_entropy, token_logps_with_entropy_value):
        x = leaves()
        with amp():
            out = fn(x[0], x[1], targets, x[2], chunk_size=chunk)
        logp, entropy = out if isinstance(out, tuple) else (out, None)
        _close(logp.detach(), ref_logp.detach(), value_tol)
        if entropy is not None:
            _close(entropy.detach(), ref_entropy.detach(), value_tol)
        for got, want in zip(torch.autograd.grad((logp.double() * upstream).sum(), x), ref_grads):
            _close(got, want, grad_tol)
    # per-sequence sums from (B, T, H) hidden states with the causal shift (DPO)
    rows, width = 3, 13
    labels = torch.full((rows, width), -100)
    labels[0, 4:] = torch.randint(0, v, (9,), generator=gen)
    labels[1, 1:7] = torch.randint(0, v, (6,), generator=gen)
    labels[2, 10:] = torch.randint(0, v, (3,), generator=gen)
    grid = (2 * torch.randn(rows, width, h, generator=gen)).to(dtype)
    with amp():
        logps, counts = sequence_logps(grid, weight0, labels, bias0, chunk_size=5)
    per_token, _ = _reference(grid[:, :-1].reshape(-1, h), weight0, bias0, labels[:, 1:].reshape(-1))
    mask = (labels[:, 1:] != -100).reshape(rows, -1)
    _close(logps, (per_token.view(rows, -1) * mask).sum(1), value_tol)
    assert counts.tolist() == mask.sum(1).tolist() == [9, 6, 3]


@pytest.mark.parametrize("disabled", [False, True])
def test_lora_on_the_output_head_chunked_equals_the_models_own_logits(disabled):
    """The chunked loss forms W + s·B·A for a LoRA lm_head: loss and every gradient equal the
    plain loss on the model's own logits (float64), with the adapters on and switched off."""
    import contextlib

    from peft import LoraConfig, get_peft_model

    from posttrain.models.loading import load_model
    from posttrain.train.sft import CausalLMLoss

    torch.manual_seed(0)
    model = get_peft_model(load_model("tiny-2l").double(),
                           LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(3, 500, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    figures = []
    for kind in ("chunked", "plain"):
        module = CausalLMLoss(model, kind, chunk_size=5)
        assert module.loss_kind == kind
        model.zero_grad()
        with model.disable_adapter() if disabled else contextlib.nullcontext():
            loss = module(ids, labels)
            if not disabled:  # switched off, nothing trainable is reached (the base is frozen)
                loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        figures.append((loss.detach(), grads))
    (chunked, chunked_grads), (plain, plain_grads) = figures
    assert torch.allclose(chunked, plain, rtol=1e-10)
    assert chunked_grads.keys() == plain_grads.keys() and (disabled or chunked_grads)
    for name in plain_grads:
        assert torch.allclose(chunked_grads[name], plain_grads[name], rtol=1e-8, atol=1e-12), name
