"""Padding-free shared-prompt batches (`models.attention.padding_free`): the model sees only the
real tokens as one row; attention alone works on the padded (B, T) grid. Everything here is
checked against the padded batch of the same items, which `test_preference_stages.py` checks
against every sequence on its own."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import DPOConfig, LoraConfig, RMConfig
from posttrain.data.preferences import PreferenceRecord, encode_preference
from posttrain.data.templates import CHATML
from posttrain.models.attention import padding_free, takes_padding_free
from posttrain.models.loading import load_tokenizer
from posttrain.train.grouped import collate_shared_prompt, items_from_examples
from posttrain.train.preference import batch_logps
from posttrain.train.reward import RewardModelLoss, reward_extras

ROWS = [("Smallest letter: q m t", ("m", "t"), (0, 1)), ("Copy: a b", ("a b", "b a b a"), (0, 1)),
        ("Reverse: x y z w", ("w z y x", "x y z w"), (0, 1)), ("Count letters: a b c", ("3", "4", "2"), (0, 1, 2))]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def items(tokenizer):
    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k), source=f"t:{i}")
               for i, (p, r, k) in enumerate(ROWS)]
    return items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])


def _small_lm(kind: str, vocab: int):
    """A float64 two-layer causal LM of `kind` with grouped-query attention (2 KV heads for 4)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 8} if kind == "qwen3" else {}
    config = AutoConfig.for_model(kind, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()


def _logps_and_grads(model, batch):
    model.zero_grad()
    logps, counts = batch_logps(model, batch, chunk_size=7)
    (logps * torch.linspace(1, 2, len(logps), dtype=logps.dtype, device=logps.device)).sum().backward()
    return logps.detach(), counts, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_the_padding_free_batch_holds_the_real_tokens_of_the_padded_one(tokenizer, items):
    padded = collate_shared_prompt(items, tokenizer.pad_token_id)
    packed = collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=True)
    rows, width = padded["input_ids"].shape
    n = int(padded["real_tokens"])
    assert rows == 4 and n < rows * width  # items of 26-32 tokens: there is padding to drop
    assert packed["input_ids"].shape == packed["position_ids"].shape == (1, n)
    slots = packed["packed_slots"]
    assert slots.shape == (n,) and bool((slots[1:] > slots[:-1]).all())
    assert packed["input_ids"][0].tolist() == padded["input_ids"].flatten()[slots].tolist()
    assert packed["position_ids"][0].tolist() == padded["position_ids"].flatten()[slots].tolist()
    assert torch.equal(packed["attention_mask"], padded["attention_mask"])  # attention keeps the grid
    # the trained tokens and the scored tokens are the same tokens, indexed in N instead of B·T
    for key in ("predictor", "last_token"):
        assert packed["input_ids"][0][packed[key]].tolist() == padded["input_ids"].flatten()[padded[key]].tolist()
    dropped = torch.ones(rows * width, dtype=torch.bool).index_fill_(0, slots, False)
    assert set(padded["input_ids"].flatten()[dropped].tolist()) == {tokenizer.pad_token_id}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("row_width", [0, 1000], ids=["row_per_item", "one_row"])
def test_log_probs_and_gradients_equal_the_padded_batch_in_float64(tokenizer, items, kind, row_width):
    """Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), all with grouped-query attention."""
    model = _small_lm(kind, len(tokenizer))
    padded = collate_shared_prompt(items, tokenizer.pad_token_id, row_width)
    expected = _logps_and_grads(model, padded)
    assert padding_free(model) and takes_padding_free(model)
    packed = collate_shared_prompt(items, tokenizer.pad_token_id, row_width, padding_free=True)
    got = _logps_and_grads(model, packed)
    assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-12)
    assert got[1].tolist() == expected[1].tolist()
    for a, b in zip(got[2], expected[2]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert torch.allclose(batch_logps(model, padded, chunk_size=7)[0].detach(), expected[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["full", "lora", "bottleneck"])
def test_dpo_model_with_adapters_and_checkpointing_gives_the_padded_results(tokenizer, items, method):
    """The policy as DPO builds it (the tiny preset; LoRA through AdaptedModel; bottleneck
    adapters on forward hooks, which the last layer read at some tokens must still run), with
    gradient checkpointing: its recompute in the backward must take the padding-free path too."""
    from posttrain.train.sft import build_model

    cfg = DPOConfig.load(None, [f"adapter.method={method}", "model.gradient_checkpointing=true"])
    _, model, _ = build_model(cfg, lambda *_: None)
    model.train()
    padded = collate_shared_prompt(items, tokenizer.pad_token_id)
    expected = _logps_and_grads(model, padded)
    assert padding_free(model)
    got = _logps_and_grads(model, collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=True))
    assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-4)
    for a, b in zip(got[2], expected[2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_plain_padded_rows_give_the_padded_log_probs_and_gradients(tokenizer, items, kind, side):
    """A row per response (`collate_items`: KTO, dpo.share_prompt=false, the reference pass of
    such data), right- or left-padded: `policy_logps` sends the real tokens only."""
    from posttrain.models import attention
    from posttrain.train.grouped import collate_items
    from posttrain.train.preference import policy_logps

    model = _small_lm(kind, len(tokenizer))
    batch = collate_items(items, tokenizer.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if side == "left":  # the same rows, padding moved to the front
        shift = (mask == 0).sum(1)
        ids, mask, labels = (torch.stack([row.roll(int(k)) for row, k in zip(t, shift)]) for t in (ids, mask, labels))
    assert not bool(mask.all())

    def run():
        model.zero_grad()
        logps, counts = policy_logps(model, ids, labels, mask, chunk_size=7)
        (logps * torch.linspace(1, 2, len(logps), dtype=logps.dtype, device=logps.device)).sum().backward()
        return logps.detach(), counts, [p.grad.clone() for p in model.parameters()]

    expected = run()
    packed_calls = []
    original = attention.pack_rows
    attention.pack_rows = lambda *a: packed_calls.append(1) or original(*a)
    try:
        assert padding_free(model)
        got = run()
    finally:
        attention.pack_rows = original
    assert packed_calls == [1]
    assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-12) and torch.equal(got[1], expected[1])
    for a, b in zip(got[2], expected[2]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_reward_model_on_plain_rows_scores_the_same_last_tokens(tokenizer, items):
    from posttrain.models.reward_model import load_reward_model, score
    from posttrain.train.grouped import collate_items

    torch.manual_seed(0)
    model = load_reward_model("tiny", pad_token_id=tokenizer.pad_token_id).double()
    batch = collate_items(items, tokenizer.pad_token_id)
    padded = score(model, batch["input_ids"], batch["attention_mask"])
    assert padding_free(model)
    free = score(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(free, padded, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reward_model_loss_metrics_and_gradients_equal_the_padded_batch(tokenizer, items, method):
    from posttrain.models.reward_model import add_lora, load_reward_model

    torch.manual_seed(0)
    model = load_reward_model("tiny", pad_token_id=tokenizer.pad_token_id)
    if method == "lora":
        model = add_lora(model, LoraConfig())
    loss_module = RewardModelLoss(model, centering=0.01)
    results = []
    for unpadded in (False, True):
        assert padding_free(model, unpadded) == unpadded
        batch = collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=unpadded) | reward_extras(items)
        model.zero_grad()
        loss, metrics = loss_module(**batch)
        loss.backward()
        results.append((float(loss.detach()), {k: float(v) for k, v in metrics.items()},
                        [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], abs=1e-6)
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_the_switched_model_saves_plain_configs_and_generates_as_before(tokenizer, tmp_path):
    """Outside padding-free batches nothing changes: generation with its KV cache and 2-D masks
    gives the same tokens, and the saved config.json names no posttrain attention."""
    from transformers import AutoModelForCausalLM

    model = _small_lm("llama", len(tokenizer)).eval()
    prompts = tokenizer(["Copy: a b", "Smallest letter: q m t w"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    before = model.generate(**prompts, **kwargs)
    assert padding_free(model)
    assert torch.equal(model.generate(**prompts, **kwargs), before)
    model.save_pretrained(tmp_path / "saved")
    assert "posttrain" not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="sdpa")
    assert reloaded.config._attn_implementation == "sdpa"


def test_models_it_cannot_serve_keep_padded_batches_and_say_why(tokenizer, items):
    from transformers import AutoModelForCausalLM, GPT2Config

    heard = []
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    assert not padding_free(gpt2, log=heard.append) and not takes_padding_free(gpt2)
    eager = _small_lm("llama", len(tokenizer))
    eager.config._attn_implementation = "eager"
    assert not padding_free(eager, log=heard.append)
    switched = _small_lm("llama", len(tokenizer))
    assert padding_free(switched) and not padding_free(switched, enabled=False, log=heard.append)
    assert not takes_padding_free(switched) and switched.config._attn_implementation == "sdpa"
    assert heard == ["note: model.padding_free does not apply to this model (gpt2, sdpa attention); batches keep their padding",
                     "note: model.padding_free does not apply to this model (llama, eager attention); batches keep their padding"]
    # a padding-free batch given to a model that was not switched fails loudly, not silently wrong
    plain = _small_lm("llama", len(tokenizer))
    with pytest.raises(RuntimeError):
        batch_logps(plain, collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=True))


def test_prefix_tuning_keeps_padded_batches(tokenizer):
    from posttrain.train.sft import build_model

    _, model, _ = build_model(DPOConfig.load(None, ["adapter.method=[prefix]"]), lambda *_: None)
    heard = []
    assert not padding_free(model, log=heard.append)
    assert heard and "virtual tokens" in heard[0]


@pytest.mark.parametrize("stage", ["dpo", "rm", "kto", "dpo_rows", "rm_rows"])
def test_runs_alike_with_and_without_padding(stage, tmp_path, monkeypatch):
    """Three steps of DPO (reference precomputed, also padding-free), of a reward model, of KTO
    and of DPO and a reward model with a row per response: the same losses and held-out metrics
    either way; the padding-free runs did send packed batches."""
    from posttrain.models import attention
    from posttrain.train import grouped
    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    seen = []
    original, original_rows = grouped.collate_shared_prompt, attention.pack_rows

    def recording(items, pad_id, row_width=0, padding_free=False):
        batch = original(items, pad_id, row_width, padding_free)
        seen.append(("packed_slots" in batch, batch["input_ids"].shape[0]))
        return batch

    def recording_rows(input_ids, attention_mask):
        seen.append((True, 1))
        return original_rows(input_ids, attention_mask)

    monkeypatch.setattr(grouped, "collate_shared_prompt", recording)
    monkeypatch.setattr(attention, "pack_rows", recording_rows)
    extra = {"kto": ["dpo.loss=kto"], "dpo_rows": ["dpo.share_prompt=false"], "rm_rows": ["reward.share_prompt=false"]}
    runs = []
    for flag in ("true", "false"):
        overrides = [f"output_dir={tmp_path / flag}", "data.synthetic_size=40", "data.max_length=64", "train.max_steps=3",
                     "train.batch_size=4", "train.lr=1e-3", "train.progress_bar=false", f"model.padding_free={flag}"]
        overrides += extra.get(stage, [])
        seen.clear()
        if stage.startswith("rm"):
            run_dir = run_rm(RMConfig.load(None, overrides))
        else:
            run_dir = run_dpo(DPOConfig.load(None, overrides))
        assert seen if flag == "true" else True
        assert all(packed == (flag == "true") for packed, _ in seen)
        assert all(rows == 1 for packed, rows in seen if packed)
        runs.append([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
    losses = [[r["loss"] for r in run if "loss" in r] for run in runs]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    evals = [{k: v for k, v in run[-1].items() if k.startswith("eval_")} for run in runs]
    # float32 scores: after 3 steps the two layouts' rounding reaches ~1e-5 on a held-out mean
    assert evals[0] and evals[0] == pytest.approx(evals[1], abs=5e-5)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_under_bf16_autocast_padding_free_is_as_close_to_float64_as_the_padded_batch(tokenizer, items, device):
    """In bf16 the two layouts round differently (other matrix shapes); each is compared with a
    float64 run of the same weights, and padding-free must be no further from it than padded (on
    CUDA through the masked attention kernels of `masked_attention_kernels`)."""
    model = _small_lm("llama", len(tokenizer)).to(device)
    padded = {k: v.to(device) for k, v in collate_shared_prompt(items, tokenizer.pad_token_id).items()}
    packed = {k: v.to(device) for k, v in collate_shared_prompt(items, tokenizer.pad_token_id,
                                                                 padding_free=True).items()}
    exact = _logps_and_grads(model, padded)
    model.float()
    assert padding_free(model)  # a padded batch (no packed_slots) still takes sdpa as it is
    results = []
    for batch in (padded, packed):
        with torch.autocast(device, dtype=torch.bfloat16):
            results.append(_logps_and_grads(model, batch))
    (padded_logps, _, padded_grads), (free_logps, _, free_grads) = results
    errors = [(_relative_error(got.double(), want), _relative_error(ref.double(), want))
              for got, ref, want in zip([free_logps, *free_grads], [padded_logps, *padded_grads], [exact[0], *exact[2]])]
    for free, padded_error in errors:
        assert free < 0.05 and free <= 1.5 * padded_error + 1e-3


# --------------------------------------------------------------------------- online RL


PROMPTS = [[1, 5, 9, 2], [1, 7], [1, 4, 4, 4, 3]]
COMPLETIONS = [[11, 12, 2], [13], [14, 15, 16, 17]]


def test_rl_completion_forward_gives_the_padded_log_probs_entropies_values_and_gradients(tokenizer):
    """GRPO / RLOO / PPO score prompt + completion rows; padding-free, the same per-token log-probs,
    entropies and values (PPO's head on the final hidden state), and gradients, in float64."""
    from posttrain.train.ppo import ValueHead
    from posttrain.train.rollouts import collate_completions, completion_forward, completion_logps

    model = _small_lm("qwen2", len(tokenizer))
    torch.manual_seed(1)
    head = ValueHead(model.config.hidden_size).double()
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=tokenizer.pad_token_id)
    weights = torch.linspace(1, 2, batch["response_mask"].numel(), dtype=torch.float64).view_as(batch["response_mask"])

    def run():
        model.zero_grad()
        head.zero_grad()
        out = completion_forward(model, batch, chunk_size=3, value_head=head)
        (sum(out[k] * weights for k in ("logps", "entropy", "values")) * batch["response_mask"]).sum().backward()
        grads = [p.grad.clone() for p in [*model.parameters(), *head.parameters()]]
        return {k: v.detach() for k, v in out.items()}, grads, completion_logps(model, batch, chunk_size=3).detach()

    expected = run()
    assert padding_free(model)
    got = run()
    for key in ("logps", "entropy", "values"):
        assert torch.allclose(got[0][key], expected[0][key], rtol=0, atol=1e-12), key
    assert torch.allclose(got[2], expected[2], rtol=0, atol=1e-12)
    for a, b in zip(got[1], expected[1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_ppo_critic_gives_the_padded_values_and_gradients(tokenizer):
    """PPO's separate value model (`ppo.value_model=separate`): padding-free and read at the
    completion tokens only, the same values and gradients as the padded rows, in float64."""
    from posttrain.models import readout
    from posttrain.models.reward_model import load_reward_model
    from posttrain.train.ppo import Critic
    from posttrain.train.rollouts import collate_completions

    torch.manual_seed(0)
    critic = Critic(load_reward_model("tiny", pad_token_id=tokenizer.pad_token_id).double())
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=tokenizer.pad_token_id)
    weights = torch.linspace(1, 2, batch["response_mask"].numel(), dtype=torch.float64).view_as(batch["response_mask"])

    def run():
        critic.zero_grad()
        values = critic(batch)
        (values * weights * batch["response_mask"]).sum().backward()
        return values.detach(), [p.grad.clone() for p in critic.parameters()]

    expected = run()
    calls = []
    original = readout._layer_at
    readout._layer_at = lambda layer, hidden, at, **kw: calls.append(len(at)) or original(layer, hidden, at, **kw)
    try:
        assert padding_free(critic.classifier)
        got = run()
    finally:
        readout._layer_at = original
    assert calls == [len(batch["predictor"])]  # the last layer ran at the completion tokens only
    assert torch.allclose(got[0] * batch["response_mask"], expected[0] * batch["response_mask"], rtol=0, atol=1e-12)
    for a, b in zip(got[1], expected[1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_the_reward_model_scorer_scores_padding_free(tokenizer, tmp_path):
    """`posttrain score` and RL's reward-model reward: the real tokens only, the same scores."""
    from posttrain.models.reward_model import load_reward_model
    from posttrain.rewards import RewardModelScorer

    torch.manual_seed(0)
    load_reward_model("tiny", pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [[{"role": "user", "content": p}] for p in ("Copy: a b", "Reverse: x y z w", "Count letters: a b c")]
    responses = ["a b", "w z y x w z", "3"]
    scorer = RewardModelScorer(str(tmp_path), template="chatml")
    assert takes_padding_free(scorer.model)
    free = scorer(prompts, responses)
    padding_free(scorer.model, enabled=False)
    assert free == pytest.approx(scorer(prompts, responses), abs=1e-5)


@pytest.mark.parametrize("stage", ["grpo", "ppo", "ppo_critic"])
def test_rl_runs_alike_with_and_without_padding(stage, tmp_path, monkeypatch):
    """Two rollouts of GRPO (β > 0: the reference copy scores padding-free too), of PPO and of PPO
    with a separate critic: the same losses either way, and the padding-free run packed its
    batches."""
    from posttrain.config import GRPOConfig, PPOConfig
    from posttrain.models import attention
    from posttrain.train.grpo import run_grpo
    from posttrain.train.ppo import run_ppo

    calls = []
    original = attention.pack_rows
    monkeypatch.setattr(attention, "pack_rows", lambda *a: calls.append(1) or original(*a))
    losses = []
    for flag in ("true", "false"):
        calls.clear()
        common = [f"output_dir={tmp_path / flag}", "data.synthetic_size=60", "rollout.max_new_tokens=4",
                  "train.batch_size=8", "train.max_steps=2", "train.lr=1e-3", "train.progress_bar=false",
                  "eval.prompts=0", "reward.functions=[short=tests.rewards_fixture:short]", f"model.padding_free={flag}"]
        if stage == "grpo":
            run_dir = run_grpo(GRPOConfig.load(None, common + ["rollout.num_generations=4", "grpo.beta=0.05"]))
        else:
            critic = ["ppo.value_model=separate"] if stage == "ppo_critic" else []
            run_dir = run_ppo(PPOConfig.load(None, common + critic))
        assert bool(calls) == (flag == "true")
        losses.append([json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in line])
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)


def _windowed_lm(vocab: int, window: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, sliding_window=window)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()


def test_attention_window_reads_each_family_s_setting():
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models.attention import attention_window

    def window(kind, **settings):
        config = AutoConfig.for_model(kind, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **settings)
        return attention_window(AutoModelForCausalLM.from_config(config))

    assert window("mistral", sliding_window=16) == 16 and window("mistral", sliding_window=None) is None
    assert window("qwen2") is None and window("qwen2", sliding_window=16) is None  # use_sliding_window off
    assert window("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1) == 16
    assert window("llama") is None
    assert window("gemma2", sliding_window=16, head_dim=8) == 16


def test_a_window_shorter_than_the_sequences_turns_the_shared_and_padding_free_layouts_off(tokenizer, items):
    """Shared-prompt rows and padding-free attention attend over the whole sequence. Under a
    sliding window narrower than the sequences that differs from the model's own masked attention
    (shown on plain rows with the model's masks), so neither layout is used there."""
    from posttrain.models.attention import window_allows
    from posttrain.train.grouped import collate_items

    longest = max(len(seq.input_ids) for item in items for seq in item.sequences)
    for window, equal in ((longest, True), (8, False)):
        model = _windowed_lm(len(tokenizer), window)
        own = batch_logps(model, collate_items(items, tokenizer.pad_token_id))[0]
        shared = batch_logps(model, collate_shared_prompt(items, tokenizer.pad_token_id))[0]
        assert torch.allclose(own, shared, rtol=0, atol=1e-10) == equal
        heard = []
        assert window_allows(model, longest, "dpo.share_prompt", heard.append) == equal
        assert padding_free(model, log=heard.append, longest=longest) == equal
        if equal:
            packed = collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=True)
            assert torch.allclose(own, batch_logps(model, packed)[0], rtol=0, atol=1e-10)
            assert heard == []
        else:
            assert heard == [f"note: {option} is off: the model attends within a 8-token window and sequences may hold "
                             f"{longest} tokens; batches use the model's own masks"
                             for option in ("dpo.share_prompt", "model.padding_free")]
            assert not takes_padding_free(model)


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_runs_on_a_windowed_model_use_its_own_masks(tokenizer, stage, tmp_path, capsys, monkeypatch):
    from posttrain.models import attention
    from posttrain.train import grouped
    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    _windowed_lm(len(tokenizer), 16).float().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    used = []
    original, original_rows = grouped.collate_shared_prompt, attention.pack_rows
    monkeypatch.setattr(grouped, "collate_shared_prompt", lambda *a, **k: used.append("shared") or original(*a, **k))
    monkeypatch.setattr(attention, "pack_rows", lambda *a, **k: used.append("packed") or original_rows(*a, **k))
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}", "data.synthetic_size=16",
                 "data.max_length=64", "train.max_steps=1", "train.batch_size=4", "train.progress_bar=false"]
    if stage == "rm":
        run_rm(RMConfig.load(None, overrides))
    else:
        run_dpo(DPOConfig.load(None, overrides))
    out = capsys.readouterr().out
    assert f"note: {stage if stage == 'dpo' else 'reward'}.share_prompt is off: the model attends within a 16-token window" in out
    assert "note: model.padding_free is off: the model attends within a 16-token window" in out
    assert used == []
