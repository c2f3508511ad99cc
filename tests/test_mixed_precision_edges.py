"""Mixed precision (`train.mixed_precision`) and low-precision weights (`model.dtype`) across the
stages, on CPU: bf16 autocast for SFT, reward models, the DPO family and GRPO; what stays exact
under it (π = π_ref at step 0); bf16 / fp16 weights with full fine-tuning and adapters; the lean
layers under bf16 autocast on the tiny preset; fp16 as far as a CPU allows.

Every expected figure comes from plain transformers / torch in float32 or float64, or from a
formula written out here, never from posttrain's own helpers.

Tolerances, stated once: under bf16 autocast the decoder's matmuls round to 8 mantissa bits, but
posttrain reads log-probs and losses through a float32 head; on these tiny models a step-0 loss
moves by < 1e-4 from float32, so 2e-3 (absolute) is the bound used, and each test also checks the
bf16 figure is not bitwise the float32 one (so bf16 is really in play).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

BF16_LOSS_TOL = 2e-3

PAIRS = [("Smallest letter: q m t", "m", "t"), ("Copy: a b", "a b", "b a b a"),
         ("Reverse: x y z", "z y x", "x y z"), ("Smallest letter: k d", "d", "k")]
CHATS = [(f"Copy: {a} {b}", f"{a} {b}") for a, b in zip("abcdefgh", "qrstuvwx")]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-data")
    paths = {"pairs": root / "pairs.jsonl", "pairs_eval": root / "pairs_eval.jsonl", "chat": root / "chat.jsonl"}
    paths["pairs"].write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    paths["pairs_eval"].write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                           for p, c, r in PAIRS[:2]))
    paths["chat"].write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                              {"role": "assistant", "content": a}]}) + "\n"
                                     for u, a in CHATS))
    return paths


@pytest.fixture(scope="module")
def tiny2l():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    path = preset_path("tiny-2l")
    return path, AutoTokenizer.from_pretrained(path)


def _encode(tokenizer, user: str, assistant: str):
    """Token ids and the assistant-token mask, by the tokenizer's own chat template."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                                        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def _token_logps(model, tokenizer, user, assistant) -> list[float]:
    """float64 log p of each assistant token of one unpadded conversation (plain transformers)."""
    ids, mask = _encode(tokenizer, user, assistant)
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]


def _first(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sft(files, out, *, train=None, model=None, adapter=None):
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    t = {"max_steps": 1, "batch_size": 8, "lr": 1e-3, "progress_bar": False, "resume": "never"}
    t.update(train or {})
    cfg = {"output_dir": str(out), "model": {"path": "tiny-2l", **(model or {})},
           "data": {"train_files": [str(files["chat"])], "max_length": 48, "eval_fraction": 0.0}, "train": t}
    if adapter:
        cfg["adapter"] = adapter
    return run_sft(SFTConfig.from_dict(cfg))


def _pair_cfg(cls, files, out, *extra):
    return cls.load(None, [f"output_dir={out}", "model.path=tiny-2l", f"data.train_files=[{files['pairs']}]",
                           f"data.eval_files=[{files['pairs_eval']}]", "data.max_length=64", "train.batch_size=4",
                           "train.max_steps=1", "train.progress_bar=false", "train.resume=never", *extra])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_fp32_step0(tiny2l):
    """The float32 step-0 SFT loss, plain transformers: Σ −log p over assistant tokens / their count
    (all 8 conversations are one batch, so the step's order does not matter)."""
    from transformers import AutoModelForCausalLM

    path, tokenizer = tiny2l
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logps = [lp for user, answer in CHATS for lp in _token_logps(model, tokenizer, user, answer)]
    return -sum(logps) / len(logps)


def test_sft_bf16_step0_loss_close_to_independent_fp32(tmp_path, files, sft_fp32_step0):
    fp32 = _first(_sft(files, tmp_path / "fp32"))["loss"]
    bf16 = _first(_sft(files, tmp_path / "bf16", train={"mixed_precision": "bf16"}))["loss"]
    assert fp32 == pytest.approx(sft_fp32_step0, abs=1e-5)  # the independent figure is the right one
    assert math.isfinite(bf16) and bf16 != fp32
    assert abs(bf16 - sft_fp32_step0) < BF16_LOSS_TOL


def test_fp16_on_cpu_is_refused_or_actually_used(tmp_path, files, sft_fp32_step0):
    """accelerate 1.x no longer raises for fp16 on a CPU: it turns native AMP off, so the run is
    float32 while config.yaml and the reference cache's fingerprint say fp16. runs.make_accelerator
    expects a ValueError for exactly this case ("e.g. fp16 on a CPU") to turn into a ConfigError."""
    from posttrain.errors import ConfigError

    try:
        run_dir = _sft(files, tmp_path / "fp16", train={"mixed_precision": "fp16"})
    except ConfigError:
        return  # refused with a message: fine
    logged = _first(run_dir)["loss"]
    assert logged != pytest.approx(sft_fp32_step0, abs=1e-6), "fp16 run is bit-for-bit the float32 computation"


# --------------------------------------------------------------------------- reward model


def test_reward_model_bf16_step0_loss_close_to_independent_fp32(tmp_path, files, tiny2l):
    """Bradley-Terry at step 0 from plain transformers: the same fresh head (drawn after
    set_seed(train.seed), as any from_pretrained would), scored at each sequence's last token."""
    from transformers import AutoModelForSequenceClassification, set_seed

    from posttrain.config import RMConfig
    from posttrain.train.reward import run_rm

    path, tokenizer = tiny2l
    set_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).eval()

    def score(user, answer):
        ids, _ = _encode(tokenizer, user, answer)
        with torch.no_grad():
            hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
        return float(hidden @ rm.score.weight[0].double())

    expected = sum(-math.log(_sigmoid(score(p, c) - score(p, r))) for p, c, r in PAIRS) / len(PAIRS)
    fp32 = _first(run_rm(_pair_cfg(RMConfig, files, tmp_path / "fp32")))["loss"]
    bf16 = _first(run_rm(_pair_cfg(RMConfig, files, tmp_path / "bf16", "train.mixed_precision=bf16")))["loss"]
    assert fp32 == pytest.approx(expected, abs=1e-5)
    assert math.isfinite(bf16) and bf16 != fp32
    assert abs(bf16 - expected) < BF16_LOSS_TOL


# --------------------------------------------------------------------------- DPO family


BETA = 0.1
# step-0 loss when π = π_ref (every implicit reward h = 0), from each paper's formula:
STEP0 = {
    "dpo": math.log(2),                       # −log σ(0)
    "cdpo": math.log(2),                      # −(1−ε) log σ(0) − ε log σ(0)
    "ipo": (0 - 1 / (2 * BETA)) ** 2,         # (h − 1/(2β))²
    "hinge": 1.0,                             # max(0, 1 − β h)
    "kto": 0.5,                               # λ − λ σ(β (0 − z₀)), z₀ = 0
}


@pytest.mark.parametrize("loss, extra", [
    ("dpo", ()), ("ipo", ()), ("hinge", ()),
    ("kto", ("data.synthetic_kind=unpaired",)),
    ("dpo", ("dpo.reference=live",)),
    ("dpo", ("adapter.method=lora", "model.lean_activations=true")),
    ("dpo", ("model.dtype=bfloat16", "model.lean_activations=true")),
    ("dpo", ("model.dtype=float16", "adapter.method=lora")),
])
def test_dpo_family_step0_is_exact_under_bf16_autocast(tmp_path, loss, extra):
    """README: with the precomputed reference π = π_ref holds to the bit at step 0 (and a live
    reference is the same weights): under bf16 autocast too, the step-0 loss is the formula's value
    at h = 0, every margin is 0 and accuracy is exactly one half, in training and held out."""
    from posttrain.config import DPOConfig
    from posttrain.train.preference import run_dpo

    run_dir = run_dpo(DPOConfig.load(None, [
        f"output_dir={tmp_path}", "model.path=tiny-2l", "data.synthetic_size=24", "data.eval_fraction=0.25",
        "data.max_length=48", "train.batch_size=4", "train.lr=1e-3", "train.max_steps=1", "train.progress_bar=false",
        "train.resume=never", "train.mixed_precision=bf16", f"dpo.loss={loss}", f"dpo.beta={BETA}", *extra]))
    first = _first(run_dir)
    before = json.loads((run_dir / "summary.json").read_text())["eval_before"]
    assert first["loss"] == pytest.approx(STEP0[loss], abs=1e-6)
    if loss == "kto":
        assert first["kl"] == 0.0 and first["rewards/signed"] == 0.0
        assert before["kl"] == 0.0 and before["rewards/signed"] == 0.0
    else:
        assert first["rewards/margins"] == 0.0 and first["rewards/accuracy"] == 0.5
        assert before["rewards/margins"] == 0.0 and before["rewards/accuracy"] == 0.5


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_bf16_step0_close_to_independent_fp32(tmp_path, files, tiny2l, loss):
    """SimPO (Meng et al. Eq. 6) and ORPO (Hong et al. Eqs. 6–7) from float64 average log-probs of
    plain transformers; the run's step-0 loss under bf16 autocast within BF16_LOSS_TOL of them."""
    from transformers import AutoModelForCausalLM

    from posttrain.config import DPOConfig
    from posttrain.train.preference import run_dpo

    path, tokenizer = tiny2l
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def log_odds(x):
        return x - math.log(-math.expm1(x))

    losses = []
    for prompt, chosen, rejected in PAIRS:
        lc, lr = _token_logps(lm, tokenizer, prompt, chosen), _token_logps(lm, tokenizer, prompt, rejected)
        ac, ar = sum(lc) / len(lc), sum(lr) / len(lr)
        if loss == "simpo":  # β = 0.1, γ = 0.5, given (unset, simpo's are SimPO's 2.0 and 1.0)
            losses.append(-math.log(_sigmoid(0.1 * ac - 0.1 * ar - 0.5)))
        else:  # λ = 0.1
            losses.append(-ac - 0.1 * math.log(_sigmoid(log_odds(ac) - log_odds(ar))))
    expected = sum(losses) / len(losses)
    knobs = ("dpo.beta=0.1", "dpo.simpo_gamma=0.5") if loss == "simpo" else ()
    fp32 = _first(run_dpo(_pair_cfg(DPOConfig, files, tmp_path / "fp32", f"dpo.loss={loss}", *knobs)))["loss"]
    bf16 = _first(run_dpo(_pair_cfg(DPOConfig, files, tmp_path / "bf16", f"dpo.loss={loss}", *knobs,
                                    "train.mixed_precision=bf16")))["loss"]
    assert fp32 == pytest.approx(expected, abs=1e-5)
    assert math.isfinite(bf16) and bf16 != fp32
    assert abs(bf16 - expected) < BF16_LOSS_TOL


# --------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("extra", [(), ("grpo.updates_per_rollout=2",)])
def test_grpo_under_bf16_starts_at_the_reference_exactly(tmp_path, extra):
    """β > 0: the policy's and the reference's log-probs of the first rollout, both read under
    autocast, are the same numbers, so the step-0 KL is exactly 0; with μ = 2 the rollout-time
    log-probs equal the first update's, so the ratio is exactly 1 and nothing is clipped."""
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    run_dir = run_grpo(GRPOConfig.load(None, [
        f"output_dir={tmp_path}", "model.path=tiny-2l", "data.synthetic_size=40", "rollout.max_new_tokens=4",
        "train.batch_size=8", "rollout.num_generations=4", "train.schedule=constant", "train.max_steps=2",
        "train.resume=never", "train.lr=1e-3", "train.progress_bar=false", "eval.prompts=0", "grpo.beta=0.05",
        "train.mixed_precision=bf16", "reward.functions=[short=tests.rewards_fixture:short]", *extra]))
    records = _records(run_dir)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert records[0]["kl"] == 0.0 and records[0]["clip_fraction"] == 0.0
    assert records[1]["kl"] > 0.0  # the first update moved the policy away from the reference


# --------------------------------------------------------------------------- low-precision weights


def test_bf16_weights_full_fine_tuning_saves_bf16_and_lora_keeps_float32_adapters(tmp_path, files):
    """model.dtype=bfloat16: full fine-tuning trains and saves bfloat16 weights (what was loaded);
    LoRA on a bfloat16 base trains float32 adapters and saves them in float32 (peft's default)."""
    from safetensors import safe_open

    full = _sft(files, tmp_path / "full", model={"dtype": "bfloat16"}, train={"max_steps": 2})
    with safe_open(str(full / "final" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert all(math.isfinite(r["loss"]) for r in _records(full))

    lora = _sft(files, tmp_path / "lora", model={"dtype": "bfloat16"}, adapter={"method": ["lora"]},
                train={"max_steps": 2, "lr": 1e-2, "mixed_precision": "bf16"})
    with safe_open(str(lora / "final" / "adapter_model.safetensors"), "pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
    assert dtypes == {torch.float32}
    losses = [r["loss"] for r in _records(lora)]
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0]


def _all_finite_safetensors(directory: Path) -> dict[str, bool]:
    from safetensors import safe_open

    out = {}
    for file in directory.glob("**/*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            out.update({k: bool(torch.isfinite(handle.get_tensor(k).float()).all()) for k in handle.keys()})
    return out


def test_float16_lora_reward_model_head_is_refused_or_trained_finite(tmp_path, files):
    """sections._weight_checks refuses float16 weights that AdamW trains in full (its second moment
    underflows and eps rounds to 0: 0/0 = NaN on the first update). A LoRA reward model trains its
    fresh score head in full too (peft's modules_to_save keeps the base's float16); the check only
    looks at adapter.method full / freeze. Either refuse it, or train the head in float32."""
    from posttrain.config import RMConfig
    from posttrain.errors import ConfigError
    from posttrain.train.reward import run_rm

    try:
        run_dir = run_rm(_pair_cfg(RMConfig, files, tmp_path, "model.dtype=float16", "adapter.method=lora",
                                   "train.max_steps=2", "train.lr=1e-3", "train.batch_size=2"))
    except ConfigError:
        return
    records = _records(run_dir)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(_all_finite_safetensors(run_dir / "final").values())


def test_float16_ppo_separate_critic_is_refused_or_trained_finite(tmp_path):
    from posttrain.config import PPOConfig
    from posttrain.errors import ConfigError
    from posttrain.train.ppo import run_ppo

    try:
        run_dir = run_ppo(PPOConfig.load(None, [
            f"output_dir={tmp_path}", "model.path=tiny-2l", "model.dtype=float16", "adapter.method=lora",
            "ppo.value_model=separate", "data.synthetic_size=24", "rollout.max_new_tokens=3", "train.batch_size=8",
            "train.max_steps=2", "train.resume=never", "train.progress_bar=false", "eval.prompts=0",
            "reward.functions=[short=tests.rewards_fixture:short]"]))
    except ConfigError:
        return
    records = _records(run_dir)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["value_loss"]) for r in records)


# --------------------------------------------------------------------------- lean layers under bf16


def _error_to_float64(grads: dict, exact: dict) -> float:
    """Mean over parameters of ‖g − g64‖ / ‖g64‖."""
    return sum(float((grads[n].double() - exact[n]).norm() / exact[n].norm()) for n in exact) / len(exact)


@pytest.mark.parametrize("lora", [False, True])
def test_lean_layers_on_the_tiny_preset_under_bf16_autocast(lora):
    """README: forward values unchanged bit for bit; under bf16 autocast the gradients stay as
    close to a float64 computation as autograd's own. On the tiny preset, a right-padded batch,
    a loss read through a float32 head: logits equal bitwise; the lean gradients' mean relative
    error to float64 is at most 1.1 × the stock layers' (and both are bf16-sized, > 1e-3)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models.lean import lean_activations
    from posttrain.models.presets import preset_path

    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_pretrained(preset_path("tiny"), dtype=torch.float32)
    if lora:
        stock = get_peft_model(stock, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():  # B away from 0 so the LoRA path carries a signal both ways
            for name, p in stock.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    lean = copy.deepcopy(stock)
    assert lean_activations(lean, True) > 0
    ids = torch.randint(4, 1024, (3, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 9:] = 0

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logps = logits.double().log_softmax(-1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
        (-(logps * mask[:, 1:]).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    (l_stock, g_stock), (l_lean, g_lean) = run(stock, True), run(lean, True)
    _, exact = run(copy.deepcopy(stock).double(), False)
    assert torch.equal(l_stock, l_lean)
    assert set(g_lean) == set(g_stock) == set(exact)
    err_stock, err_lean = _error_to_float64(g_stock, exact), _error_to_float64(g_lean, exact)
    assert err_stock > 1e-3
    assert err_lean <= 1.1 * err_stock
