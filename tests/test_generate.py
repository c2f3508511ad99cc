"""Tests for posttrain.rollout (sampling processors, batched generation, chat loop)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from posttrain.rollout import generate as generate_module  # noqa: E402
from posttrain.rollout.generate import (  # noqa: E402
    chat_session,
    eos_token_ids,
    generate,
    generate_token_ids,
    truncate_at_stop,
)
from posttrain.rollout.sampling import (  # noqa: E402
    SamplingSettings,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    inverse_cdf,
    sample_categorical,
    sample_next,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model learns to answer questions about numbers and colours.",
    "Post-training turns a base model into a helpful assistant.",
    "Reward models score answers; preference optimisation uses pairs of answers.",
    "What is two plus three? Two plus three is five.",
    "Please write a short poem about the sea and the sky at night.",
    "The cat sat on the mat, and the dog sat on the log.",
    "Sampling with temperature, top-k and top-p changes how diverse text is.",
]

PROMPTS = [
    "The quick brown fox",
    "What is two plus three? Two plus",
    "A",
    "Please write a short poem about the sea and",
    "Reward models score",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_start|>", "<|im_end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


# ---------------------------------------------------------------- pure processors


def test_repetition_penalty_hand_computed():
    """penalty 2: seen positive logit 4 -> 4 / 2 = 2; seen negative -1 -> -1 * 2 = -2;
    unseen 3 and -5 unchanged."""
    logits = torch.tensor([[4.0, -1.0, 3.0, -5.0]])
    seen = torch.tensor([[True, True, False, False]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[2.0, -2.0, 3.0, -5.0]]
    assert logits.tolist() == [[4.0, -1.0, 3.0, -5.0]]  # input untouched
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_frequency_presence_penalty_hand_computed():
    """freq 0.5, pres 1.0, counts (2, 1, 0):
    1.0 - 0.5*2 - 1 = -1.0;  2.0 - 0.5*1 - 1 = 0.5;  3.0 - 0 - 0 = 3.0."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    counts = torch.tensor([[2, 1, 0]])
    got = apply_frequency_presence_penalty(logits, counts, 0.5, 1.0)
    assert got.tolist() == [[-1.0, 0.5, 3.0]]


def test_top_k_hand_computed():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [2.0, 2.0, 1.0, 0.0]])
    got = apply_top_k(logits, 2)
    inf = -math.inf
    assert got.tolist() == [[inf, 5.0, inf, 4.0], [2.0, 2.0, inf, inf]]
    assert apply_top_k(logits, 0) is logits and apply_top_k(logits, 4) is logits


def test_top_p_hand_computed():
    """probs (0.5, 0.3, 0.15, 0.05) as log-probs.
    p = 0.75: mass before each = (0, 0.5, 0.8, 0.95) -> keep tokens with mass < 0.75: the first two
              (0.5 + 0.3 = 0.8 >= 0.75 is the smallest such set).
    p = 0.85: mass before < 0.85 -> first three.
    p = 0.3:  only the top token (mass before = 0); the top token is always kept.
    """
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # unsorted on purpose
    logits = probs.log()
    kept = lambda p: torch.isfinite(apply_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [True, True, False, True]
    assert kept(0.3) == [False, True, False, False]
    assert kept(1e-9) == [False, True, False, False]
    torch.testing.assert_close(apply_top_p(logits, 0.75)[0, 1], logits[0, 1])  # kept values unchanged


def test_sample_next_greedy_and_seeded():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]
    draws = lambda seed: sample_next(  # noqa: E731
        logits.repeat(50, 1), 1.0, generator=torch.Generator().manual_seed(seed)
    ).tolist()
    assert draws(7) == draws(7)
    assert sample_next(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]
    # top_p tiny keeps only the argmax, so sampling is greedy too.
    assert sample_next(logits, 5.0, top_p=1e-6).tolist() == [1, 0]


def test_sample_categorical_frequencies_match_probs():
    """40,000 draws over V = 517 (two full blocks of 256 plus a 5-token tail): tokens of
    probability 0 are never drawn; the named tokens' frequencies are within 5 standard errors."""
    vocab, draws = 517, 40_000
    probs = torch.zeros(vocab, dtype=torch.float64)
    probs[3], probs[300], probs[516] = 0.4, 0.25, 0.2  # 516 lies in the tail block
    spread = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:60]
    spread = spread[~torch.isin(spread, torch.tensor([3, 300, 516]))]
    probs[spread] = 0.15 / len(spread)
    tokens = sample_categorical(probs.float().expand(draws, vocab), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0
    for v in (3, 300, 516):
        p = float(probs[v])
        assert abs(counts[v] / draws - p) < 5 * math.sqrt(p * (1 - p) / draws), v
    assert abs(counts[spread].sum() / draws - 0.15) < 5 * math.sqrt(0.15 * 0.85 / draws)
    # Seeded: the same generator state gives the same draws.
    again = sample_categorical(probs.float().expand(draws, vocab), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


def test_inverse_cdf_against_numpy_and_at_the_edges():
    """The draw is the smallest v with cumsum(π)[v] > u·Σπ (numpy float64, written out), and the
    extreme uniforms land on the first and last tokens of positive probability."""
    import numpy as np

    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(64, 700, generator=g) * 3, dim=-1)
    probs[:, ::7] = 0.0  # unnormalised rows with holes
    uniforms = torch.rand(64, 1, dtype=torch.float64, generator=g)
    expected = [int(np.searchsorted(np.cumsum(row), u * row.sum(), side="right"))
                for row, u in zip(probs.double().numpy(), uniforms[:, 0].numpy())]
    assert inverse_cdf(probs, uniforms).tolist() == expected

    probs = torch.zeros(2, 600)
    probs[:, 10], probs[:, 255], probs[:, 256], probs[:, 590] = 0.1, 0.2, 0.3, 0.4  # 591.. are 0
    lowest, highest = 0.0, 1.0 - 2.0 ** -53
    picks = inverse_cdf(probs, torch.tensor([[lowest], [highest]], dtype=torch.float64))
    assert picks.tolist() == [10, 590]
    with pytest.raises(ValueError, match="nan"):
        inverse_cdf(torch.full((1, 5), float("nan")), torch.zeros(1, 1, dtype=torch.float64))


# ---------------------------------------------------------------- generation


def _hf_greedy(model, tokenizer, prompts, max_new_tokens):
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
    eos = eos_token_ids(model, tokenizer)
    rows = []
    for ids in out[:, enc["input_ids"].shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        rows.append(ids[:cut])
    return rows


def _ours_greedy(model, tokenizer, prompts, max_new_tokens, batch_size=8):
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate_token_ids(
        model, ids, settings, pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=eos_token_ids(model, tokenizer), batch_size=batch_size,
    )


def test_greedy_matches_transformers_generate(model, tokenizer):
    ours = _ours_greedy(model, tokenizer, PROMPTS, 12)
    assert ours == _hf_greedy(model, tokenizer, PROMPTS, 12)
    assert all(len(r) == 12 for r in ours)  # nothing hit EOS: full-length comparison

    # Now make a token row 0 emits mid-way the EOS, so rows finish at different steps
    # and finished rows must keep being masked while the others go on.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ours[0][4]]
    try:
        ours_eos = _ours_greedy(model, tokenizer, PROMPTS, 12, batch_size=3)
        assert ours_eos == _hf_greedy(model, tokenizer, PROMPTS, 12)
        assert len(ours_eos[0]) <= 5 and max(len(r) for r in ours_eos) == 12
    finally:
        model.generation_config.eos_token_id = saved


def test_greedy_matches_transformers_generate_absolute_positions(tokenizer):
    """GPT-2 has learned absolute positions. RoPE (Llama) is invariant to shifting all of a
    row's positions, so only a model like this catches wrong position ids under left padding."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    gpt2.generation_config.eos_token_id = tokenizer.eos_token_id
    gpt2.generation_config.pad_token_id = tokenizer.pad_token_id
    ours = _ours_greedy(gpt2, tokenizer, PROMPTS, 10)
    assert ours == _hf_greedy(gpt2, tokenizer, PROMPTS, 10)
    assert ours == [_ours_greedy(gpt2, tokenizer, [p], 10)[0] for p in PROMPTS]


def test_alone_equals_in_padded_batch(model, tokenizer):
    settings = SamplingSettings(max_new_tokens=10, temperature=0.0)
    alone = [generate(model, tokenizer, [p], settings)[0] for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, settings, batch_size=8)
    assert batched == alone
    assert generate(model, tokenizer, PROMPTS, settings, batch_size=2) == alone


def test_stop_strings_truncate(model, tokenizer):
    prompt = PROMPTS[0]
    full = generate(model, tokenizer, [prompt], SamplingSettings(max_new_tokens=20, temperature=0.0))[0]
    visible = [i for i, ch in enumerate(full) if i >= 3 and ch.isprintable() and ch != "\ufffd"]
    assert visible, f"greedy text too short to test stops: {full!r}"
    stop = full[visible[0]]
    want = full[: full.find(stop)]
    settings = SamplingSettings(max_new_tokens=20, temperature=0.0, stop=["never-appears", stop])
    assert generate(model, tokenizer, [prompt], settings)[0] == want
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    check = generate_module._make_stop_check(tokenizer, [stop])
    short = generate_token_ids(model, [ids], settings, pad_token_id=tokenizer.pad_token_id,
                               eos_token_ids=eos_token_ids(model, tokenizer), stop_check=check)[0]
    assert len(short) < 20  # generation itself ended early, not just the text
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == "abc "


def test_seeded_sampling_reproducible_and_topk1_is_greedy(model, tokenizer):
    sampled = lambda seed: generate(  # noqa: E731
        model, tokenizer, PROMPTS, SamplingSettings(max_new_tokens=8, temperature=1.0, seed=seed)
    )
    first = sampled(123)
    assert sampled(123) == first
    assert sampled(124) != first
    greedy = generate(model, tokenizer, PROMPTS, SamplingSettings(max_new_tokens=8, temperature=0.0))
    top1 = generate(model, tokenizer, PROMPTS, SamplingSettings(max_new_tokens=8, top_k=1, seed=5))
    assert top1 == greedy


def test_frequency_penalty_prevents_repeats_and_model_mode_restored(model, tokenizer):
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    settings = SamplingSettings(max_new_tokens=15, temperature=0.0, frequency_penalty=1e4)
    model.train()
    out = generate_token_ids(model, ids, settings, pad_token_id=tokenizer.pad_token_id, eos_token_ids=set())
    assert model.training  # restored
    model.eval()
    for row in out:
        assert len(row) == 15 and len(set(row)) == 15  # a repeat would cost 1e4 in logit
    plain = _ours_greedy(model, tokenizer, PROMPTS, 15)
    assert any(len(set(r)) < len(r) for r in plain) or out != plain


def test_eos_from_generation_config_ends_row(model, tokenizer):
    first = _ours_greedy(model, tokenizer, PROMPTS[:1], 1)[0][0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first]
    try:
        assert _ours_greedy(model, tokenizer, PROMPTS[:1], 10) == [[first]]
    finally:
        model.generation_config.eos_token_id = saved


# ---------------------------------------------------------------- chat


def test_chat_session_keeps_history(monkeypatch, tokenizer):
    seen_prompts = []

    def fake_generate(model, tok, prompts, settings, *, batch_size=8, template=None):
        assert template == CHATML  # the chat's template: its end-of-turn marker ends the reply
        seen_prompts.append(prompts[0])
        return [f"reply-{len(seen_prompts)}"]

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    lines = iter(["hello there", "", "and again", "/reset", "fresh start", "/exit", "never read"])
    written = []
    history = chat_session(None, tokenizer, CHATML, SamplingSettings(), read=lambda _: next(lines),
                           write=written.append, system="be brief")
    assert written == ["reply-1", "reply-2", "reply-3"]
    assert seen_prompts[0].endswith("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system\nbe brief<|im_end|>" in seen_prompts[0]
    assert "<|im_start|>assistant\nreply-1<|im_end|>" in seen_prompts[1]  # first reply is in turn two
    assert "hello there" not in seen_prompts[2] and "be brief" in seen_prompts[2]  # after /reset
    assert [m["content"] for m in history] == ["be brief", "fresh start", "reply-3"]


def test_chat_session_real_model_until_eof(model, tokenizer):
    lines = iter(["hi", "what is two plus three?"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written = []
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0)
    history = chat_session(model, tokenizer, CHATML, settings, read=read, write=written.append)
    assert len(written) == 2 and [m["role"] for m in history] == ["user", "assistant"] * 2
    assert history[1]["content"] == written[0]
