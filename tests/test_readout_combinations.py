"""The trimmed last layer (`models.readout`) in the combinations `test_readout.py` leaves out.

Each test compares the layer computed only at the read positions with the same model's whole
last layer (float64, values to 1e-12, gradients to rtol 1e-10), or checks a property a user
relies on (generation, pickling, saving) after `padding_free` installed the trimmed forward."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from posttrain.models.attention import pack_rows, padding_free
from posttrain.models.readout import reading, trim_last_layer, trims_last_layer
from tests.test_readout import _rows, _same_as_the_whole_layer


def _lm(kind: str = "llama", layers: int = 2, vocab: int = 64, **config):
    """A float64 causal LM like test_readout's `_small_lm`, with config overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen3":
        settings["head_dim"] = 8
    settings.update(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **settings), attn_implementation="sdpa").double()


def _at(inputs):
    n = inputs["input_ids"].shape[1]
    return torch.tensor([n - 1, 0, 3, 3, 10, 12, 5])


def _read_trainable(model, core, inputs, at, weights):
    """Hidden states at `at` and the gradients of the trainable parameters (adapters included)."""
    model.zero_grad()
    sent, pick = reading(model, inputs, at)
    hidden = pick(core(**sent, use_cache=False).last_hidden_state)
    (hidden * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return sent, hidden.detach(), grads


def _trimmed_equals_whole(model, core, inputs, at):
    """`_same_as_the_whole_layer` for any wrapper (peft, hooks): only trainable parameters' grads."""
    weights = torch.randn(len(at), core.config.hidden_size, dtype=torch.float64)
    assert padding_free(model) and trims_last_layer(model)
    sent, got, got_grads = _read_trainable(model, core, inputs, at, weights)
    assert "read_at" in sent
    trim_last_layer(model, enabled=False)
    sent, expected, grads = _read_trainable(model, core, inputs, at, weights)
    assert "read_at" not in sent
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert got_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-10, atol=1e-13), name


# --------------------------------------------------------------------------- empty reads, pickling


def test_an_empty_read_gives_no_rows_as_the_whole_layer_does():
    """`reading` with no positions (e.g. a micro-batch without a trained token): the untrimmed
    model returns (0, H); the trimmed layer must too, and backward must run."""
    model = _lm()
    inputs = pack_rows(*_rows("right"))
    at = torch.zeros(0, dtype=torch.long)
    assert padding_free(model)
    trim_last_layer(model, enabled=False)
    sent, pick = reading(model, inputs, at)
    expected = pick(model.model(**sent, use_cache=False).last_hidden_state)
    assert expected.shape == (0, 32)
    assert trim_last_layer(model)
    sent, pick = reading(model, inputs, at)
    got = pick(model.model(**sent, use_cache=False).last_hidden_state)
    assert got.shape == (0, 32)
    got.sum().backward()


def test_a_trimmed_model_survives_a_pickle_round_trip():
    """torch.save(model) / pickle after `padding_free`: dumping succeeds, so loading must too, and
    the copy must still read at the given positions only, with the same result."""
    model = _lm()
    assert padding_free(model)
    twin = pickle.loads(pickle.dumps(model))
    assert trims_last_layer(twin) and twin.model.layers[-1].forward.args[0] is twin.model.layers[-1]
    inputs = pack_rows(*_rows("left"))
    sent, pick = reading(model, inputs, _at(inputs))
    with torch.no_grad():
        assert torch.equal(pick(model.model(**sent).last_hidden_state), pick(twin.model(**sent).last_hidden_state))


# --------------------------------------------------------------------------- configurations


@pytest.mark.parametrize("kind, config", [
    ("llama", {"num_key_value_heads": 1}),
    ("qwen3", {"num_key_value_heads": 1}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    ("mistral", {"sliding_window": 64}),
    ("qwen3", {"num_hidden_layers": 1}),
], ids=["llama-kv1", "qwen3-kv1", "biases", "rope-llama3", "rope-linear", "rope-dynamic", "mistral-window", "qwen3-1-layer"])
def test_configurations_read_as_the_whole_layer(kind, config):
    _same_as_the_whole_layer(_lm(kind, **config), pack_rows(*_rows("left")), _at(pack_rows(*_rows("left"))))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_one_read_per_row_with_grouped_queries_reads_as_the_whole_layer(kind, side):
    """One query per row (a reward model's last tokens): sdpa takes its single-query GQA path."""
    inputs = pack_rows(*_rows(side))
    _same_as_the_whole_layer(_lm(kind, num_key_value_heads=1), inputs, torch.tensor([10, 16, 18]))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", ["single_token_row", "empty_row", "first_token_only", "every_token"])
def test_edge_positions_read_as_the_whole_layer(side, case):
    ids, mask = _rows(side)
    if case == "single_token_row":
        mask[2] = 0
        mask[2, 0 if side == "right" else -1] = 1
    elif case == "empty_row":
        mask[1] = 0
    inputs = pack_rows(ids, mask)
    n = inputs["input_ids"].shape[1]
    at = {"single_token_row": torch.tensor([n - 1, 0, 4]), "empty_row": torch.tensor([0, 10, n - 1]),
          "first_token_only": torch.tensor([0]), "every_token": torch.arange(n)}[case]
    _same_as_the_whole_layer(_lm(), inputs, at)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_reads_as_the_whole_layer(reentrant):
    model = _lm()
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    inputs = pack_rows(*_rows("left"))
    _same_as_the_whole_layer(model, inputs, _at(inputs))
    # and the trimmed layer is checkpointed as the whole one is: its MLP is called as often in
    # forward + backward (twice with the reentrant checkpoint, which calls the module again)
    calls = []
    model.model.layers[-1].mlp.register_forward_hook(lambda *_: calls.append(1))
    assert padding_free(model)
    counts = []
    for trimmed in (False, True):
        assert trim_last_layer(model, trimmed) == trimmed
        calls.clear()
        sent, pick = reading(model, inputs, _at(inputs))
        assert ("read_at" in sent) == trimmed
        pick(model.model(**sent, use_cache=False).last_hidden_state).sum().backward()
        counts.append(len(calls))
    assert counts[1] == counts[0] and (counts[0] == 2 or not reentrant)


def test_attention_dropout_is_off_in_eval_and_on_in_training(monkeypatch):
    """Eval mode with attention_dropout > 0 reads as the whole layer; in training the trimmed
    layer hands sdpa the same dropout probability as the other layers."""
    model = _lm(attention_dropout=0.25)
    model.eval()
    inputs = pack_rows(*_rows("left"))
    _same_as_the_whole_layer(model, inputs, _at(inputs))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get("dropout_p"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    assert padding_free(model)
    sent, _ = reading(model, inputs, _at(inputs))
    assert "read_at" in sent
    for training, expected in ((True, 0.25), (False, 0.0)):
        model.train(training)
        seen.clear()
        model.model(**sent, use_cache=False)
        assert len(seen) >= 2 and set(seen) == {expected}  # on the CPU, a call per row (`attention.Blocks`)


# --------------------------------------------------------------------------- adapters


_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(config):
    from peft import get_peft_model

    model = get_peft_model(_lm(), config)
    torch.manual_seed(3)
    with torch.no_grad():  # adapters away from their identity start, so that skipping one would show
        for name, param in model.named_parameters():
            if any(key in name for key in ("lora_B", "ia3_l", "magnitude")):
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("method", ["lora_dropout_eval", "dora", "ia3"])
def test_peft_adapters_on_the_last_layer_read_as_the_whole_layer(method):
    from peft import IA3Config, LoraConfig

    config = {"lora_dropout_eval": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=_ALL_LINEAR),
              "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=_ALL_LINEAR),
              "ia3": IA3Config(target_modules=_ALL_LINEAR, feedforward_modules=["down_proj"])}[method]
    model = _peft(config)
    model.train(method != "lora_dropout_eval")
    inputs = pack_rows(*_rows("left"))
    _trimmed_equals_whole(model, model.get_base_model().model, inputs, _at(inputs))
    # the trimmed forward goes through the wrapped modules: switching the adapters off changes it
    assert padding_free(model)
    sent, pick = reading(model, inputs, _at(inputs))
    with torch.no_grad():
        on = pick(model.get_base_model().model(**sent).last_hidden_state)
        with model.disable_adapter():
            off = pick(model.get_base_model().model(**sent).last_hidden_state)
    assert (on - off).abs().max() > 1e-3


def test_bottleneck_hooks_on_the_last_layer_read_as_the_whole_layer():
    from posttrain.models.adapters.bottleneck import BottleneckSet, bottleneck_targets

    model = _lm()
    targets = bottleneck_targets(model, ["attention", "ffn"])
    assert "model.layers.1.self_attn.o_proj" in targets and "model.layers.1.mlp" in targets
    adapters = BottleneckSet(32, targets, 4, "relu", 0.1).double()
    torch.manual_seed(4)
    with torch.no_grad():
        for param in adapters.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    adapters.attach(model)
    model.requires_grad_(False)
    holder = torch.nn.ModuleDict({"lm": model, "adapters": adapters})  # the adapters' gradients are compared too
    holder.config = model.config
    inputs = pack_rows(*_rows("right"))
    _trimmed_equals_whole(holder, model.model, inputs, _at(inputs))


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_as_close_to_float64_as_the_whole_layer(dtype):
    model = _lm()
    exact_model = copy.deepcopy(model)
    assert padding_free(exact_model)
    trim_last_layer(exact_model, enabled=False)
    inputs = pack_rows(*_rows("left"))
    at = _at(inputs)
    with torch.no_grad():
        sent, pick = reading(exact_model, inputs, at)
        exact = pick(exact_model.model(**sent).last_hidden_state)
        model.to(dtype)
        assert padding_free(model)
        errors = []
        for trim in (True, False):
            trim_last_layer(model, enabled=trim)
            sent, pick = reading(model, inputs, at)
            assert ("read_at" in sent) == trim
            got = pick(model.model(**sent).last_hidden_state)
            assert got.dtype == dtype
            errors.append(((got.double() - exact).norm() / exact.norm()).item())
    trimmed, whole = errors
    assert trimmed < 0.05 and trimmed <= 1.5 * whole + 1e-3


# --------------------------------------------------------------------------- transparency


def test_output_hidden_states_keeps_the_layers_below_whole():
    model = _lm()
    assert padding_free(model)
    inputs = pack_rows(*_rows("left"))
    at = _at(inputs)
    outputs = []
    for trim in (True, False):
        trim_last_layer(model, enabled=trim)
        sent, pick = reading(model, inputs, at)
        with torch.no_grad():
            out = model.model(**sent, use_cache=False, output_hidden_states=True)
        outputs.append((out, pick))
    (trimmed, pick_trimmed), (whole, pick_whole) = outputs
    n, m = inputs["input_ids"].shape[1], len(set(at.tolist()))
    assert [h.shape[1] for h in trimmed.hidden_states] == [n, n, m]
    assert all(torch.equal(a, b) for a, b in zip(trimmed.hidden_states[:-1], whole.hidden_states[:-1]))
    assert torch.equal(trimmed.hidden_states[-1], trimmed.last_hidden_state)
    assert torch.allclose(pick_trimmed(trimmed.hidden_states[-1]), pick_whole(whole.hidden_states[-1]), rtol=0, atol=1e-12)


def test_generation_after_padding_free_and_a_trimmed_backward_is_unchanged():
    """Greedy generation with a KV cache (left-padded rows) after a trimmed training step equals
    generation by a never-switched copy of the same weights."""
    model = _lm()
    assert padding_free(model)
    inputs = pack_rows(*_rows("left"))
    sent, pick = reading(model, inputs, _at(inputs))
    pick(model.model(**sent, use_cache=False).last_hidden_state).sum().backward()
    plain = _lm()
    plain.load_state_dict(model.state_dict())
    assert list(model.state_dict()) == list(plain.state_dict())
    ids, mask = _rows("left")
    model.eval()
    plain.eval()
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs),
                       plain.generate(input_ids=ids, attention_mask=mask, **kwargs))


def test_a_deepcopy_switches_off_on_its_own():
    model = _lm()
    assert padding_free(model)
    twin = copy.deepcopy(model)
    assert not padding_free(twin, enabled=False) and not trims_last_layer(twin)
    assert trims_last_layer(model) and model.model.layers[-1].forward.args[0] is model.model.layers[-1]
