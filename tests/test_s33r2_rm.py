"""Reward models, stop 33 (round 2): how many tokens `RewardModelScorer` reads by default, and an
encoder's pooler and classifier in their weights' precision under autocast, across encoder families."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError


# --------------------------------------------------------------------------- how many tokens a scorer reads


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """tiny-2l as a Llama reward model with a trained-looking head, its tokenizer saved beside it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from posttrain.models.loading import load_tokenizer
    from posttrain.models.presets import preset_path

    tokenizer = load_tokenizer("tiny-2l")
    config = AutoConfig.from_pretrained(preset_path("tiny-2l"), num_labels=1, pad_token_id=tokenizer.pad_token_id,
                                        max_position_embeddings=1536)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        torch.nn.init.normal_(model.score.weight)
    out = tmp_path_factory.mktemp("s33r2rm") / "rm"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_scorer_reads_up_to_the_models_table_by_default_and_to_a_max_length_given_within_it(tiny_rm):
    from posttrain.rewards import RewardModelScorer

    assert RewardModelScorer(str(tiny_rm)).max_length == 1536  # its table, not a fixed 1024
    assert RewardModelScorer(str(tiny_rm), max_length=64).max_length == 64
    assert RewardModelScorer(str(tiny_rm), max_length=4096).max_length == 1536  # never past the table


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "64"])
def test_a_max_length_that_is_not_a_positive_whole_number_is_refused_before_the_model_loads(bad):
    from posttrain.rewards import RewardModelScorer

    with pytest.raises(ConfigError, match="max_length must be a whole number of tokens"):
        RewardModelScorer("/nonexistent/reward/model", max_length=bad)


def test_a_model_without_a_position_table_reads_its_tokenizers_model_max_length_else_1024():
    """ALiBi models (Bloom, MPT) name no table: the tokenizer's `model_max_length` when it sets one,
    else 1024 (transformers' unset value, 1e30, is no limit)."""
    from types import SimpleNamespace

    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    from posttrain.rewards import _tokens_read

    no_table = SimpleNamespace(config=SimpleNamespace())
    assert _tokens_read(no_table, SimpleNamespace(model_max_length=2048)) == 2048
    for unset in (VERY_LARGE_INTEGER, None, 0, True):
        assert _tokens_read(no_table, SimpleNamespace(model_max_length=unset)) == 1024
    assert _tokens_read(no_table, SimpleNamespace()) == 1024
    table = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=300))
    assert _tokens_read(table, SimpleNamespace(model_max_length=2048)) == 300  # the table wins


# --------------------------------------------------------------------------- an encoder's head under bf16 autocast


def _encoder(kind: str):
    import transformers

    common = dict(vocab_size=64, num_labels=1, pad_token_id=0)
    configs = {
        "Roberta": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=40, pad_token_id=1),
        "DistilBert": dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=40),
        "DebertaV2": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=40),
        "Electra": dict(hidden_size=32, embedding_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40),
        "Albert": dict(hidden_size=32, embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=40),
        "ModernBert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=40, bos_token_id=2, cls_token_id=2, eos_token_id=3,
                           sep_token_id=3),
    }
    config = getattr(transformers, f"{kind}Config")(**(common | configs[kind]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, f"{kind}ForSequenceClassification")(config).eval()
    return model


def _output_linear(model) -> torch.nn.Linear:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1][-1]


@pytest.mark.parametrize("kind", ["Roberta", "DistilBert", "DebertaV2", "Electra", "Albert", "ModernBert"])
def test_every_encoder_familys_head_runs_in_float32_under_bf16_autocast_and_its_forwards_are_put_back(kind):
    from posttrain.models.reward_model import _encoder_heads, score

    model = _encoder(kind)
    heads = _encoder_heads(model)
    assert heads and all("forward" not in head.__dict__ for head in heads)
    output = _output_linear(model)
    seen = []
    hook = output.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]])
    mask = (torch.arange(5)[None] < torch.tensor([[5], [3]])).long()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = score(model, ids, mask)
    hook.remove()
    assert seen[0].dtype == torch.float32, f"{kind}: the output layer read {seen[0].dtype}"
    expected = (seen[0].double() @ output.weight.double().T + output.bias.double())[:, 0]
    assert rewards.dtype == torch.float32 and rewards.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert all("forward" not in head.__dict__ for head in heads)  # the class's forward again


def test_an_encoders_instance_forward_is_kept_and_an_error_inside_puts_the_forwards_back():
    """A module whose forward is an instance attribute (accelerate's hooks set one) keeps it, and a
    forward that raises leaves no wrapper behind."""
    from posttrain.models.reward_model import _encoder_heads, score

    model = _encoder("Roberta")
    classifier = model.classifier
    own = classifier.forward
    calls = []

    def hooked(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    classifier.forward = hooked
    ids, mask = torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert score(model, ids, mask).dtype == torch.float32
    assert calls == [1] and classifier.__dict__["forward"] is hooked
    with pytest.raises(IndexError), torch.no_grad():
        score(model, torch.tensor([[2, 500, 3]]), mask)  # past the vocabulary: the body raises
    assert classifier.__dict__["forward"] is hooked
    assert all("forward" not in head.__dict__ for head in _encoder_heads(model) if head is not classifier)


def test_a_lora_encoder_reward_model_trains_its_head_in_float32_under_bf16_autocast():
    """peft's SEQ_CLS LoRA (the head a modules_to_save copy): rewards float32, and the gradient
    reaches the trained copy of the classifier."""
    from posttrain.config import LoraConfig
    from posttrain.models.reward_model import add_lora, score

    model = add_lora(_encoder("Roberta"), LoraConfig(r=2, alpha=4, target_modules=["query", "value"]))
    model.train()
    ids, mask = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    outputs = []
    hooks = [m.register_forward_hook(lambda module, args, out: outputs.append(out.dtype)) for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = score(model, ids, mask)
    for hook in hooks:
        hook.remove()
    assert outputs and set(outputs) == {torch.float32} and rewards.dtype == torch.float32
    rewards.sum().backward()
    trained = [p for name, p in model.named_parameters() if p.requires_grad and "classifier" in name]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
