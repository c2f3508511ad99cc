"""Review: the DPO-family reference policy π_ref across adapter methods, precisions and layouts.

The promise (train/preference.py docstring, README): π_ref is the starting model; with adapters
it is the base with every adapter switched off (no second copy), with full / freeze tuning a
frozen copy or precomputed log-probs; "either way ... at step 0 every implicit reward is 0".

Every reference value here is checked against an INDEPENDENT computation: the base model's
weights loaded separately with plain `transformers` (float64), one sequence at a time, with the
log-softmax and the gather written out in this file.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from posttrain.config import DPOConfig
from posttrain.data.preferences import PreferenceRecord, encode_preference
from posttrain.data.templates import CHATML
from posttrain.errors import ConfigError
from posttrain.models.loading import load_tokenizer, resolve_model_path
from posttrain.train import preference as pref
from posttrain.train.grouped import GroupedStage, collate_items, items_from_examples
from posttrain.train.preference import PreferenceLoss, pair_extras, precompute_reference

LOG2 = math.log(2)
PAIRS = [("Smallest letter: q m t", ("m", "t"), (0, 1)), ("Copy: a b", ("a b", "b a b a"), (0, 1)),
         ("Reverse: x y z w", ("w z y x", "x y z w"), (0, 1))]

# adapter.method settings under test (qlora needs CUDA: not here)
METHODS = {
    "full": ["adapter.method=full"],
    "freeze": ["adapter.method=freeze", "adapter.freeze.top_layers=1"],
    "lora": ["adapter.method=lora", "adapter.lora.dropout=0.3"],
    "dora": ["adapter.method=dora"],
    "ia3": ["adapter.method=ia3"],
    "prompt": ["adapter.method=prompt", "adapter.virtual_tokens.num_virtual_tokens=4"],
    "prefix": ["adapter.method=prefix", "adapter.virtual_tokens.num_virtual_tokens=4",
               "adapter.virtual_tokens.projection=true", "adapter.virtual_tokens.projection_hidden=16"],
    "bottleneck": ["adapter.method=bottleneck", "adapter.bottleneck.size=8"],
    "mix": ["adapter.method=[lora,bottleneck,prompt]", "adapter.virtual_tokens.num_virtual_tokens=4",
            "adapter.bottleneck.size=8"],
}
ADAPTERS = [m for m in METHODS if m not in ("full", "freeze")]
VIRTUAL = ("prompt", "prefix", "mix")  # methods that put random virtual tokens in front at init
# the others start as the base itself, so the base (adapters off) is the starting model
AT_BASE = [m for m in METHODS if m not in VIRTUAL]
WEIGHT_MIX = ["adapter.method=[lora,bottleneck]", "adapter.bottleneck.size=8"]


# --------------------------------------------------------------------------- the independent side


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A private copy of the tiny preset's files: model.path for every run, and what the
    independent model loads from."""
    out = tmp_path_factory.mktemp("base") / "tiny"
    shutil.copytree(resolve_model_path("tiny"), out)
    return out


@pytest.fixture(scope="module")
def base64(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return load_tokenizer(str(base_dir))


def independent_logps(hf, sequences) -> list[float]:
    """Σ_t log softmax(logits[t-1])[label_t] over each sequence's labelled tokens, one sequence
    at a time, no padding, float64."""
    out = []
    for seq in sequences:
        ids = torch.tensor([seq.input_ids])
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0].double()
        logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        total = 0.0
        for t, label in enumerate(seq.labels):
            if label != -100 and t > 0:
                total += float(logprobs[t - 1, label])
        out.append(total)
    return out


def _items(tokenizer, rows=PAIRS):
    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k),
                                source=f"t:{i}") for i, (p, r, k) in enumerate(rows)]
    return items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])


def _sequences(items):
    return [seq for item in items for seq in item.sequences]


def _cfg(tmp_path, base_dir, *extra):
    return DPOConfig.load(None, [f"output_dir={tmp_path}", f"model.path={base_dir}", *extra])


def _build(cfg):
    from posttrain.train.sft import build_model

    torch.manual_seed(0)
    _, model, _ = build_model(cfg, lambda *_: None)
    return model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturb_trainable(model, scale=0.3, seed=1):
    """Stand-in for trained adapters: every trainable tensor moved well away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def _policy_logps(model, batch):
    from posttrain.train.preference import batch_logps

    with torch.no_grad():
        return batch_logps(model, batch)[0]


# --------------------------------------------------------------------------- unit level: step 0


def _step0(method, mode, tokenizer, base_dir, tmp_path):
    """(items, the loss module, its batch) of a fresh model, reference precomputed or live."""
    cfg = _cfg(tmp_path, base_dir, *METHODS[method], f"dpo.reference={mode}")
    model = _build(cfg)
    items = _items(tokenizer)
    if mode == "precompute":
        precompute_reference(model, items, cfg, tokenizer.pad_token_id, None, lambda *_: None)
    batch = collate_items(items, tokenizer.pad_token_id) | pair_extras(items)
    if mode == "live":
        batch.pop("reference_logps", None)
    model.train()
    return items, PreferenceLoss(model, cfg.dpo, live_reference=mode == "live"), batch


@pytest.mark.parametrize("mode", ["live", "precompute"])
@pytest.mark.parametrize("method", AT_BASE)
def test_step0_reference_equals_independent_base_forward(method, mode, tokenizer, base_dir, base64, tmp_path):
    items, module, batch = _step0(method, mode, tokenizer, base_dir, tmp_path)
    expected = independent_logps(base64, _sequences(items))
    assert bool(module._frozen) == (mode == "live" and method in ("full", "freeze"))
    ref = module._reference(batch)
    assert ref.tolist() == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("method,mode", [(m, "live") for m in AT_BASE] + [(m, "precompute") for m in METHODS])
def test_step0_policy_equals_reference_loss_is_log2(method, mode, tokenizer, base_dir, tmp_path):
    _, module, batch = _step0(method, mode, tokenizer, base_dir, tmp_path)
    with torch.no_grad():
        loss, metrics = module(**batch)
    assert float(metrics["rewards/chosen"]) == 0.0 and float(metrics["rewards/rejected"]) == 0.0
    assert float(loss) == pytest.approx(3 * LOG2, abs=1e-6)


@pytest.mark.parametrize("method", [m for m in VIRTUAL])
def test_live_reference_with_virtual_tokens_is_refused(method, base_dir, tmp_path):
    """The live reference switches adapters off; with prompt / prefix tuning that is the base
    without the randomly drawn virtual tokens, not the starting policy: refused up front."""
    from posttrain.config import validate_dpo

    with pytest.raises(ConfigError, match="dpo.reference=precompute"):
        validate_dpo(_cfg(tmp_path, base_dir, *METHODS[method], "dpo.reference=live"))
    validate_dpo(_cfg(tmp_path, base_dir, *METHODS[method], "dpo.reference=precompute"))


def test_precomputed_reference_of_a_prompt_tuned_policy_is_its_starting_model(tokenizer, base_dir, base64, tmp_path):
    """The step-0 prompt-tuned policy (soft prompt in front, recomputed here with plain
    transformers from the base weights + the product's initial prompt embeddings) is what the
    precomputed reference holds — not the base, from which it differs."""
    cfg = _cfg(tmp_path, base_dir, *METHODS["prompt"])
    model = _build(cfg)
    prompt = model.virtual_peft.get_prompt(batch_size=1).detach().double()  # the (1, n, H) soft prompt
    seq = _sequences(_items(tokenizer))[0]
    ids = torch.tensor([seq.input_ids])
    with torch.no_grad():
        embeds = torch.cat([prompt, base64.get_input_embeddings()(ids)], dim=1)
        logits = base64(inputs_embeds=embeds).logits[0, prompt.shape[1]:]
    logprobs = logits - torch.logsumexp(logits, -1, keepdim=True)
    with_prompt = sum(float(logprobs[t - 1, y]) for t, y in enumerate(seq.labels) if y != -100 and t > 0)
    base = independent_logps(base64, [seq])[0]
    items = _items(tokenizer)[:1]
    batch = collate_items(items, tokenizer.pad_token_id)
    policy = float(_policy_logps(model.eval(), batch)[0])
    assert policy == pytest.approx(with_prompt, abs=2e-4)  # the product's step-0 policy is base + soft prompt
    assert abs(with_prompt - base) > 1e-3  # ... which is not the base
    precompute_reference(model.train(), items, cfg, tokenizer.pad_token_id, None, lambda *_: None)
    assert items[0].reference_logps[0] == pytest.approx(with_prompt, abs=2e-4)


# --------------------------------------------------------------------------- unit level: trained adapters


# precompute reads the model as it is, before training: perturbing it first would change the start itself
@pytest.mark.parametrize("method,mode", [(m, "live") for m in AT_BASE])
def test_reference_of_a_trained_policy_is_still_the_base(method, mode, tokenizer, base_dir, base64, tmp_path):
    """Every trainable tensor perturbed (LoRA B, DoRA magnitudes, IA3 vectors, soft prompt /
    prefix MLP, bottleneck up-projections, the trained layers of full / freeze tuning): the
    policy moves away from the base, the reference does not; the reference pass leaves weights
    and train/eval mode as it found them."""
    cfg = _cfg(tmp_path, base_dir, *METHODS[method], f"dpo.reference={mode}")
    model = _build(cfg)
    items = _items(tokenizer)
    expected = independent_logps(base64, _sequences(items))
    module = PreferenceLoss(model, cfg.dpo, live_reference=mode == "live")  # full/freeze: copy taken now
    _perturb_trainable(model)
    batch = collate_items(items, tokenizer.pad_token_id) | pair_extras(items)
    batch.pop("reference_logps", None)
    model.train()
    before = _snapshot(model)
    policy_before = _policy_logps(model.eval(), batch)
    model.train()
    assert (policy_before - torch.tensor(expected)).abs().max() > 1e-3  # the perturbation matters
    if mode == "precompute":
        precompute_reference(model, items, cfg, tokenizer.pad_token_id, None, lambda *_: None)
        ref = torch.tensor([v for item in items for v in item.reference_logps])
    else:
        ref = module._reference(batch)
    assert ref.tolist() == pytest.approx(expected, abs=2e-4)
    assert model.training and all(m.training for m in model.modules())
    after = _snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # adapters back on: the policy is the perturbed one again, bit for bit
    assert torch.equal(_policy_logps(model.eval(), batch), policy_before)


def test_reference_pass_restores_eval_mode_too(tokenizer, base_dir, tmp_path):
    cfg = _cfg(tmp_path, base_dir, *METHODS["lora"], "dpo.reference=live")
    model = _build(cfg).eval()
    module = PreferenceLoss(model, cfg.dpo, live_reference=True)
    batch = collate_items(_items(tokenizer), tokenizer.pad_token_id)
    module._reference(batch)
    assert not any(m.training for m in model.modules())


def test_frozen_copy_reference_is_in_eval_mode_even_with_dropout(tokenizer, base_dir, tmp_path):
    """A base with attention dropout 0.5: the live reference (frozen copy) must be the
    deterministic eval-mode model, equal to an independent eval-mode forward, although the
    policy trains in train mode."""
    from transformers import AutoModelForCausalLM

    noisy = tmp_path / "dropout"
    shutil.copytree(base_dir, noisy)
    config = json.loads((noisy / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (noisy / "config.json").write_text(json.dumps(config))
    cfg = _cfg(tmp_path / "run", noisy, "dpo.reference=live", "model.padding_free=false")
    model = _build(cfg)
    model.train()
    module = PreferenceLoss(model, cfg.dpo, live_reference=True)
    module._frozen[0].train()  # even if someone leaves the copy in train mode
    items = _items(tokenizer)
    batch = collate_items(items, tokenizer.pad_token_id)
    hf = AutoModelForCausalLM.from_pretrained(noisy, dtype=torch.float64).eval()
    expected = independent_logps(hf, _sequences(items))
    first, second = module._reference(batch), module._reference(batch)
    assert torch.equal(first, second)
    assert first.tolist() == pytest.approx(expected, abs=2e-4)
    assert module._frozen[0].training  # restored


# --------------------------------------------------------------------------- end to end: run_dpo


RUN = ["data.synthetic_size=16", "data.eval_fraction=0.25", "data.max_length=48", "train.batch_size=4",
       "train.lr=1e-2", "train.progress_bar=false", "train.resume=never", "train.max_steps=3",
       "train.schedule=constant", "train.log_every=1"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, base_dir, *extra):
    from posttrain.train.preference import run_dpo

    cfg = _cfg(tmp_path, base_dir, *RUN, *extra)
    return run_dpo(cfg)


@pytest.fixture
def reference_spy(monkeypatch):
    """Records what every PreferenceLoss._reference call of run_dpo returned (a live pass, or the
    precomputed values the batch carries): (values, the batch's sequences, training flags
    before/after), the sequences found from the items GroupedStage.collate was given."""
    seen, calls = {}, []
    collate = GroupedStage.collate

    def recording_collate(self, items):
        batch = collate(self, items)
        seen[id(batch["input_ids"])] = (batch["input_ids"], [s for item in items for s in item.sequences])
        return batch

    reference = PreferenceLoss._reference

    def recording_reference(self, batch):
        was = self.model.training
        out = reference(self, batch)
        if out is not None:
            calls.append((out.detach().double().clone(), seen[id(batch["input_ids"])][1], was, self.model.training))
        return out

    monkeypatch.setattr(GroupedStage, "collate", recording_collate)
    monkeypatch.setattr(PreferenceLoss, "_reference", recording_reference)
    return calls


@pytest.mark.parametrize("method", AT_BASE)
def test_live_reference_after_training_steps_is_the_independent_base(method, base_dir, base64, tmp_path,
                                                                     reference_spy):
    run_dir = _run(tmp_path, base_dir, *METHODS[method], "dpo.reference=live")
    records = [r for r in _records(run_dir) if "loss" in r]
    assert len(records) == 3
    # the policy did move away from the reference (so the check below could fail)
    assert max(abs(r["rewards/chosen"]) + abs(r["rewards/rejected"]) for r in records[1:]) > 1e-4
    assert len(reference_spy) >= 3 + 2  # 3 train steps + eval before and after
    for values, sequences, before, after in reference_spy:
        assert before == after  # train/eval mode restored
        assert values.tolist() == pytest.approx(independent_logps(base64, sequences), abs=2e-4)


@pytest.mark.parametrize("method", AT_BASE)
def test_precompute_and_live_give_the_same_trajectory(method, base_dir, tmp_path):
    live = _records(_run(tmp_path / "live", base_dir, *METHODS[method], "dpo.reference=live"))
    cached = _records(_run(tmp_path / "pre", base_dir, *METHODS[method], "dpo.reference=precompute"))
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        for key in ("loss", "rewards/margins", "rewards/chosen", "eval_loss", "eval_rewards/margins"):
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], abs=2e-5), (key, a["step"])


def test_precomputed_cache_holds_the_independent_base_values(base_dir, base64, tmp_path, monkeypatch):
    """The values written to reference_logps.safetensors for an adapter run are the base's (those
    it holds: the sequences of the micro-batches this 1-step run reads, and the held-out ones)."""
    from safetensors.torch import load_file

    captured = []
    real = pref.precompute_reference

    def spy(model, items, *args, **kwargs):
        real(model, items, *args, **kwargs)
        captured.append(items)

    monkeypatch.setattr(pref, "precompute_reference", spy)
    run_dir = _run(tmp_path, base_dir, *WEIGHT_MIX, "dpo.reference=precompute", "train.max_steps=1")
    stored = load_file(str(run_dir / "reference_logps.safetensors"))
    covered = stored["covered"].bool()
    sequences = [seq for seq, held in zip(_sequences(captured[0]), covered.tolist()) if held]
    assert 0 < len(sequences) < len(covered)
    assert stored["logps"][covered].double().tolist() == pytest.approx(independent_logps(base64, sequences), abs=2e-4)


# --------------------------------------------------------------------------- precision


PRECISIONS = {"bf16-weights": ["model.dtype=bfloat16"], "fp16-weights": ["model.dtype=float16"],
              "bf16-autocast": ["train.mixed_precision=bf16"]}


LOW_PRECISION_RUNS = [(p, m, mode) for p in PRECISIONS for m in ("full", "lora", "bottleneck", "ia3")
                      for mode in ("live", "precompute") if (p, m) != ("fp16-weights", "full")]


def test_float16_weights_are_not_trained_in_full(base_dir, tmp_path):
    """float16 weights trained by AdamW: the second moment underflows and eps (1e-8) rounds to 0,
    so the first update is 0/0 (every weight NaN after one step): refused up front; adapters
    (float32 parameters on a float16 base) are fine."""
    from posttrain.config import validate_dpo

    for method in ("full", "freeze"):
        with pytest.raises(ConfigError, match="model.dtype=float16"):
            validate_dpo(_cfg(tmp_path, base_dir, *METHODS[method], "model.dtype=float16"))
    validate_dpo(_cfg(tmp_path, base_dir, *METHODS["lora"], "model.dtype=float16"))


@pytest.mark.parametrize("precision,method,mode", LOW_PRECISION_RUNS)
def test_low_precision_step0_is_exactly_log2_and_finite(precision, method, mode, base_dir, base64, tmp_path,
                                                        reference_spy):
    run_dir = _run(tmp_path, base_dir, *METHODS[method], *PRECISIONS[precision], f"dpo.reference={mode}",
                   "train.max_steps=2", "train.lr=1e-3")
    records = _records(run_dir)
    steps = [r for r in records if "loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert steps[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert steps[0]["rewards/margins"] == 0.0
    assert summary["eval_before"]["rewards/accuracy"] == 0.5
    assert all(math.isfinite(r.get("loss", 0.0)) and math.isfinite(r.get("eval_loss", 0.0)) for r in records)
    assert reference_spy
    for values, sequences, *_ in reference_spy:  # live or precomputed; low precision: loose, but the base's
        expected = independent_logps(base64, sequences)
        assert values.tolist() == pytest.approx(expected, rel=3e-2, abs=0.3)


# --------------------------------------------------------------------------- layouts / memory options


VARIANTS = {"gradient_checkpointing": ["model.gradient_checkpointing=true"],
            "lean": ["model.lean_activations=true"],
            "no_padding_free": ["model.padding_free=false"],
            "no_share_prompt": ["dpo.share_prompt=false"],
            "lean_gc_no_share": ["model.lean_activations=true", "model.gradient_checkpointing=true",
                                 "dpo.share_prompt=false"]}
_baselines: dict = {}


# LoRA without dropout here: dropout masks draw from the RNG per tensor shape, so a different
# layout gives a different (equally valid) dropout sample and the steps after the first differ.
LAYOUT_RUNS = {"full-live": ["adapter.method=full", "dpo.reference=live"],
               "lora-live": ["adapter.method=lora", "dpo.reference=live"],
               "lora-precompute": ["adapter.method=lora", "dpo.reference=precompute"]}


@pytest.mark.parametrize("run", list(LAYOUT_RUNS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_memory_and_layout_options_do_not_change_the_first_steps(variant, run, base_dir, base64,
                                                                 tmp_path_factory, reference_spy):
    if run not in _baselines:
        base_run = _run(tmp_path_factory.mktemp("baseline"), base_dir, *LAYOUT_RUNS[run], "train.max_steps=2")
        _baselines[run] = [r for r in _records(base_run) if "loss" in r]
    reference_spy.clear()
    run_dir = _run(tmp_path_factory.mktemp(variant), base_dir, *LAYOUT_RUNS[run], "train.max_steps=2",
                   *VARIANTS[variant])
    steps = [r for r in _records(run_dir) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    for a, b in zip(steps, _baselines[run]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert reference_spy  # live passes, or the precomputed values a batch carries: both checked
    for values, sequences, before, after in reference_spy:
        assert before == after
        assert values.tolist() == pytest.approx(independent_logps(base64, sequences), abs=2e-4)


# --------------------------------------------------------------------------- KTO, SimPO, ORPO


def _count_forwards(monkeypatch):
    """Per PreferenceLoss.forward, how many times the first decoder layer ran (any model:
    policy, adapters-off pass or frozen copy), training's and evaluation's apart; plus
    reference_weights / precompute calls."""
    from posttrain.train import sft

    counts = {"per_forward": [], "per_eval_forward": [], "reference_weights": 0, "precompute": 0, "_layer_calls": 0,
              "frozen": []}
    real_build = sft.build_model

    def build(*args, **kwargs):
        tokenizer, model, training = real_build(*args, **kwargs)
        layers = next(m.layers for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList))
        layers[0].register_forward_pre_hook(lambda *_: counts.__setitem__("_layer_calls", counts["_layer_calls"] + 1))
        return tokenizer, model, training

    forward = PreferenceLoss.forward

    def counted_forward(self, *args, **kwargs):
        if self._frozen:
            counts["frozen"].append(True)
        start = counts["_layer_calls"]
        out = forward(self, *args, **kwargs)
        counts["per_forward" if torch.is_grad_enabled() else "per_eval_forward"].append(counts["_layer_calls"] - start)
        return out

    real_ref, real_pre = pref.reference_weights, pref.precompute_reference

    def ref(*args, **kwargs):
        counts["reference_weights"] += 1
        return real_ref(*args, **kwargs)

    def pre(*args, **kwargs):
        counts["precompute"] += 1
        return real_pre(*args, **kwargs)

    monkeypatch.setattr(sft, "build_model", build)
    monkeypatch.setattr(PreferenceLoss, "forward", counted_forward)
    monkeypatch.setattr(pref, "reference_weights", ref)
    monkeypatch.setattr(pref, "precompute_reference", pre)
    return counts


REFERENCE_FREE_RUNS = [("simpo", m) for m in METHODS] + [("orpo", m) for m in ("full", "freeze", "lora", "prompt", "mix")]


@pytest.mark.parametrize("loss,method", REFERENCE_FREE_RUNS)
def test_reference_free_losses_run_no_reference_pass(loss, method, base_dir, tmp_path, monkeypatch):
    """The decoder's first layer is counted per loss forward; a frozen copy (full/freeze) would
    carry the counting hook with it (deepcopy), so any reference pass would show."""
    counts = _count_forwards(monkeypatch)
    # dpo.reference left at its default: setting it with simpo/orpo is refused at config time (by design)
    strength = "dpo.beta=2" if loss == "simpo" else "dpo.orpo_lambda=2"  # ORPO's weight (its beta only scales logs)
    run_dir = _run(tmp_path, base_dir, *METHODS[method], f"dpo.loss={loss}", "train.max_steps=2", strength)
    assert counts["reference_weights"] == 0 and counts["precompute"] == 0
    assert not counts["frozen"]  # no frozen copy of the weights either
    assert counts["per_forward"] and set(counts["per_forward"]) == {1}  # one policy forward, nothing else
    assert set(counts["per_eval_forward"]) == {1}
    assert not (run_dir / "reference_logps.safetensors").exists()
    assert json.loads((run_dir / "summary.json").read_text())["reference"] == "none"


@pytest.mark.parametrize("mode,method", [("live", m) for m in AT_BASE] + [("precompute", "full"), ("precompute", "mix")])
def test_kto_reference_is_the_starting_model_and_runs_once_per_row(mode, method, base_dir, base64, tmp_path,
                                                                   monkeypatch):
    """Per training loss forward: the policy on the completions, and the live reference on them;
    the mismatched rows go through both once per step, before the forwards (z₀ of the whole step).
    Every reference value equals the independent base forward (the precomputed mix with a soft
    prompt: the starting policy, i.e. the policy's own step-0 values)."""
    counts = _count_forwards(monkeypatch)
    seen, calls = {}, []
    collate, row_reference = GroupedStage.collate, PreferenceLoss._row_reference

    def recording_collate(self, items):
        batch = collate(self, items)
        seen[id(batch["input_ids"])] = [s for item in items for s in item.sequences]
        return batch

    def recording_row_reference(self, batch, index):
        out = row_reference(self, batch, index)
        sequences = seen.get(id(batch["input_ids"]))
        if sequences is not None:  # the batch as collated (not a device copy)
            calls.append((out.detach().double().clone(), [sequences[i] for i in index.tolist()]))
        return out

    monkeypatch.setattr(GroupedStage, "collate", recording_collate)
    monkeypatch.setattr(PreferenceLoss, "_row_reference", recording_row_reference)
    run_dir = _run(tmp_path, base_dir, *METHODS[method], "dpo.loss=kto", "data.synthetic_kind=unpaired",
                   f"dpo.reference={mode}", "train.max_steps=2")
    assert set(counts["per_forward"]) == {2 if mode == "live" else 1}
    # the held-out reference is computed once either way: the policy alone after training, and
    # nothing before it (π = π_ref: the held-out figures are read from the reference's)
    assert set(counts["per_eval_forward"]) == {0, 1}
    assert counts["precompute"] == 1
    records = _records(run_dir)
    assert all(math.isfinite(r.get("loss", 0.0)) for r in records)
    assert len(calls) >= 4  # completions and mismatched rows, train and eval
    for values, sequences in calls:
        if method in VIRTUAL:  # precomputed from the starting policy, soft prompt included
            continue
        assert values.tolist() == pytest.approx(independent_logps(base64, sequences), abs=2e-4)
    if method in VIRTUAL:
        first = [r for r in records if "loss" in r][0]
        assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # π = π_ref at step 0: z₀ = 0
