"""The last decoder layer computed only where its output is read (`models.readout`): checked
against the same model with the layer whole, in float64, for every family it serves."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.models.attention import pack_rows, padding_free
from posttrain.models.readout import reading, trim_last_layer, trims_last_layer


def _small_lm(kind: str, layers: int = 2, vocab: int = 64):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 8} if kind == "qwen3" else {}
    config = AutoConfig.for_model(kind, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()


def _rows(side: str):
    """Three rows of 11 slots: one full, two shorter, padded on `side`."""
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    lengths = (11, 6, 2)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : 11 - length] = 0
    return ids, mask


def _shared_prompt_batch():
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.data.templates import CHATML
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.grouped import collate_shared_prompt, items_from_examples

    tokenizer = load_tokenizer("tiny")
    rows = [("Copy: a b", ("a b", "b a b a")), ("Reverse: x y z w", ("w z y x", "x y z w", "z"))]
    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(range(len(r))),
                                source=f"t:{i}") for i, (p, r) in enumerate(rows)]
    items = items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])
    batch = collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "packed_slots")}
    return inputs, batch["predictor"], len(tokenizer)


def _read(model, inputs, at, weights):
    """The hidden states at `at` and the gradients of Σ weights · hidden."""
    model.zero_grad()
    inputs, pick = reading(model, inputs, at)
    hidden = pick(model.model(**inputs, use_cache=False).last_hidden_state)
    (hidden * weights).sum().backward()
    return inputs, hidden.detach(), {n: p.grad.clone() for n, p in model.model.named_parameters()}


def _same_as_the_whole_layer(model, inputs, at):
    weights = torch.randn(len(at), model.config.hidden_size, dtype=torch.float64)
    assert padding_free(model) and trims_last_layer(model)
    sent, got, got_grads = _read(model, inputs, at, weights)
    assert sent["read_at"].tolist() == sorted(set(at.tolist()))  # asked for those positions, once each
    assert trim_last_layer(model, enabled=False) is False and not trims_last_layer(model)
    sent, expected, grads = _read(model, inputs, at, weights)
    assert "read_at" not in sent
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert got_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_plain_rows_read_at_some_tokens_equal_the_whole_last_layer(kind, side):
    """Right-padded rows (causal attention on the grid) and left-padded ones (their (B, 1, T, T)
    mask); positions out of order and repeated, rows with none read, a row with one."""
    model = _small_lm(kind)
    inputs = pack_rows(*_rows(side))
    n = inputs["input_ids"].shape[1]
    assert n == 11 + 6 + 2
    at = torch.tensor([n - 1, 0, 3, 3, 10, 12, 5])  # row 0 read at 5 tokens, row 1 at 2, row 2 at 1
    _same_as_the_whole_layer(model, inputs, at)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_shared_prompt_rows_read_at_their_predictors_equal_the_whole_last_layer(kind):
    """A shared-prompt batch (a block's prompt once, its responses behind the 4-D mask) read where
    DPO reads it: the positions that predict a response token, the prompt's last one repeated."""
    inputs, predictor, vocab = _shared_prompt_batch()
    assert len(set(predictor.tolist())) < len(predictor)
    _same_as_the_whole_layer(_small_lm(kind, vocab=vocab), inputs, predictor)


def test_a_single_layer_model_reads_at_its_only_layer():
    model = _small_lm("llama", layers=1)
    _same_as_the_whole_layer(model, pack_rows(*_rows("right")), torch.tensor([2, 7, 15]))


def test_the_trimmed_layer_follows_deepcopy_and_leaves_weights_and_other_batches_alone(tmp_path):
    model = _small_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert padding_free(model)
    twin = copy.deepcopy(model)  # the frozen reference copy of DPO and RL is made this way
    assert trims_last_layer(twin) and twin.model.layers[-1].forward.args[0] is twin.model.layers[-1]
    ids, mask = _rows("right")
    with torch.no_grad():  # a padded batch, and generation, go through the layer's own forward
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, twin(input_ids=ids, attention_mask=mask).logits)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) <= set(before) and all(torch.equal(saved[k], before[k]) for k in saved)
    assert not padding_free(model, enabled=False) and not trims_last_layer(model)
    assert "forward" not in model.model.layers[-1].__dict__


def test_layers_it_does_not_know_and_replaced_forwards_are_left_whole():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert not trim_last_layer(gpt2)
    hooked = _small_lm("llama")
    layer = hooked.model.layers[-1]
    layer.forward = lambda *a, **k: type(layer).forward(layer, *a, **k)  # e.g. an accelerate hook
    assert not trim_last_layer(hooked) and not trims_last_layer(hooked)
    inputs = pack_rows(*_rows("right"))
    same, pick = reading(hooked, inputs, torch.tensor([1, 2]))
    assert same is inputs  # the full output is read instead


def test_stages_ask_the_last_layer_for_the_positions_they_read(tmp_path, monkeypatch):
    """DPO (with its reference pass), the reward model and GRPO, on the tiny preset: each
    forward with a padding-free batch computes the last layer at fewer tokens than it holds."""
    from posttrain.config import DPOConfig, GRPOConfig, RMConfig
    from posttrain.models import readout
    from posttrain.train.grpo import run_grpo
    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    seen = []
    original = readout._layer_at

    def recording(layer, hidden_states, read_at, **kwargs):
        seen.append((len(read_at), hidden_states.shape[1]))
        return original(layer, hidden_states, read_at, **kwargs)

    monkeypatch.setattr(readout, "_layer_at", recording)
    common = ["train.max_steps=1", "train.batch_size=4", "train.progress_bar=false"]
    for name, run in (("dpo", lambda d: run_dpo(DPOConfig.load(None, d + ["data.synthetic_size=16"]))),
                      ("rm", lambda d: run_rm(RMConfig.load(None, d + ["data.synthetic_size=16"]))),
                      ("grpo", lambda d: run_grpo(GRPOConfig.load(None, d + [
                          "data.synthetic_size=16", "rollout.num_generations=4", "rollout.max_new_tokens=4",
                          "eval.prompts=0", "reward.functions=[short=tests.rewards_fixture:short]"])))):
        seen.clear()
        run([f"output_dir={tmp_path / name}"] + common)
        assert seen and all(0 < read < held for read, held in seen), name
