"""Generation fixes of stop 29: a chat template's end-of-turn marker ends completions when it is not EOS
(one token: a stop id; several: a stop string) in generate, chat, serve and the RL rollouts; a virtual-token
model's completion and scores do not depend on its batch under a sliding window."""

from __future__ import annotations

import types

import pytest
import torch

from posttrain.data.templates import ALPACA, CHATML
from posttrain.models.presets import ENDOFTEXT, IM_END, build_tokenizer
from posttrain.rollout.generate import (
    _batches,
    chat_session,
    end_of_turn,
    eos_token_ids,
    generate,
    generate_token_ids,
    stop_strings,
)
from posttrain.rollout.sampling import SamplingSettings

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def gpt2_style():
    """The preset tokenizer as GPT-2 has it: no chat template, eos <|endoftext|>; <|im_end|> stays one
    (special) token, so ChatML's end of turn is one id that is not eos."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.pad_token = None
    tokenizer.eos_token = ENDOFTEXT
    return tokenizer


@pytest.fixture(scope="module")
def plain():
    """A tokenizer with no ChatML tokens: '<|im_end|>' is several ordinary tokens, as in GPT-2's own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["a b c hello world"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    tokenizer.chat_template = CHATML
    return tokenizer


class Scripted(torch.nn.Module):
    """A causal-LM stand-in that says `script` token by token (then its last token on and on), whatever
    the prompt, through the same forward / KV-cache interface the generator drives."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.generation_config = script, vocab, None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        step = 0 if past_key_values is None else past_key_values
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return types.SimpleNamespace(logits=logits, past_key_values=step + 1)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the stop set


def test_a_one_token_end_of_turn_that_is_not_eos_ends_the_row(gpt2_style):
    end = gpt2_style.convert_tokens_to_ids(IM_END)
    assert end != gpt2_style.eos_token_id
    assert end_of_turn(gpt2_style, CHATML) == IM_END
    assert eos_token_ids(None, gpt2_style, CHATML) == {gpt2_style.eos_token_id, end}
    assert stop_strings(gpt2_style, ["x"], CHATML) == ["x"]  # a single id: no stop string needed
    gpt2_style.chat_template = CHATML  # as SFT saves it (chat_template.jinja): the default template
    try:
        assert end in eos_token_ids(None, gpt2_style)
    finally:
        gpt2_style.chat_template = None


def test_no_template_or_an_end_marker_that_is_eos_leaves_the_stop_set_as_it_was(gpt2_style):
    assert end_of_turn(gpt2_style) is None and eos_token_ids(None, gpt2_style) == {gpt2_style.eos_token_id}
    preset = build_tokenizer()  # its eos is <|im_end|>, its template ChatML
    assert eos_token_ids(None, preset) == {preset.eos_token_id} and stop_strings(preset, []) == []
    assert end_of_turn(gpt2_style, ALPACA) == ENDOFTEXT  # Alpaca ends a turn with the eos token
    assert eos_token_ids(None, gpt2_style, ALPACA) == {gpt2_style.eos_token_id}
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=[5, 7]))
    assert eos_token_ids(model, preset) == {preset.eos_token_id, 5, 7}


def test_a_several_token_end_of_turn_is_a_stop_string(plain):
    assert len(_ids(plain, IM_END)) > 1
    assert eos_token_ids(None, plain) == {plain.eos_token_id}
    assert stop_strings(plain, ["", "x"]) == ["x", IM_END]
    model = Scripted(_ids(plain, "b" + IM_END + "c c c c c c"), len(plain))
    prompt = plain.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True)
    assert generate(model, plain, [prompt], GREEDY) == ["b"]
    assert generate(model, plain, [prompt], GREEDY, template=ALPACA)[0].startswith("b" + IM_END)  # not its marker


def test_chat_stops_at_the_end_of_turn_of_the_template_it_renders_with(gpt2_style):
    end = gpt2_style.convert_tokens_to_ids(IM_END)
    model = Scripted([*_ids(gpt2_style, " b"), end, *_ids(gpt2_style, " c") * 20], len(gpt2_style))
    lines, written = ["hi"], []

    def read(_):
        if not lines:
            raise EOFError
        return lines.pop(0)

    history = chat_session(model, gpt2_style, CHATML, GREEDY, read=read, write=written.append)
    assert written == [" b"] and history[-1] == {"role": "assistant", "content": " b"}


def test_serve_chat_ends_at_the_end_of_turn_one_token_or_several(gpt2_style, plain):
    from posttrain.serve.engine import AS_LOADED, Engine
    from posttrain.serve.protocol import Limits, Request

    def answer(tokenizer, script):
        engine = Engine(Scripted(script, len(tokenizer)), tokenizer, {"m": AS_LOADED}, CHATML, Limits())
        try:
            job = engine.submit(Request(kind="chat", model="m", messages=[{"role": "user", "content": "a"}],
                                        max_tokens=12, temperature=0.0))
            while (event := job.events.get(timeout=30))[0] != "end":
                assert event[0] == "delta"
            return event[2], event[3], event[4]  # text, finish reason, completion tokens
        finally:
            engine.close()

    end = gpt2_style.convert_tokens_to_ids(IM_END)
    assert answer(gpt2_style, [*_ids(gpt2_style, " b"), end, *_ids(gpt2_style, " c") * 20]) == (" b", "stop", 2)
    text, reason, _ = answer(plain, _ids(plain, "b" + IM_END + "c c c c c c"))
    assert (text, reason) == ("b", "stop")


def test_rl_rollouts_count_a_several_token_end_of_turn_as_ended(plain):
    """GRPO / PPO's rollouts: the marker ends the sample (no no-EOS penalty) and is cut from the text."""
    from posttrain.data.prompts import PromptRecord
    from posttrain.train.rollouts import sample_and_score

    said = _ids(plain, "b" + IM_END + "c c c c")

    class Engine:
        generation_config = None

        def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
            assert IM_END in settings.stop and stop_check is not None
            return [said[:next(k for k in range(1, len(said) + 1) if stop_check(said[:k]))] for _ in prompt_ids]

    cfg = types.SimpleNamespace(
        rollout=types.SimpleNamespace(num_generations=2, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                                      stop=[]),
        reward=types.SimpleNamespace(no_eos_penalty=1.0, normalize=False, clip=0.0))
    record = PromptRecord(prompt=[{"role": "user", "content": "a"}])
    rollout = sample_and_score(Engine(), plain, [[1, 2]], [record], [0], cfg, lambda p, texts, rows: [1.0] * len(texts),
                               seed=0)
    assert rollout.texts == ["b", "b"] and rollout.stats.ended_fraction == 1.0
    assert rollout.rewards.tolist() == [1.0, 1.0]


# ---------------------------------------------------------------- virtual tokens under a sliding window


def _windowed(method: str):
    """A tiny Mistral attending within 4 tokens, with 3 randomly drawn virtual tokens of `method`."""
    from transformers import MistralConfig, MistralForCausalLM

    from posttrain.config.sections import AdapterConfig, VirtualTokensConfig
    from posttrain.models.adapters import apply_adapters

    torch.manual_seed(0)
    lm = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                          max_position_embeddings=128, eos_token_id=63, pad_token_id=0))
    model = apply_adapters(lm, AdapterConfig(method=[method], virtual_tokens=VirtualTokensConfig(num_virtual_tokens=3)))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 1)
    return model.eval()


PROMPT_IDS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_token_completions_alone_equal_batched_under_a_window(method, capsys):
    model = _windowed(method)
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0)

    def run(batch_size):
        return generate_token_ids(model, PROMPT_IDS, settings, pad_token_id=0, eos_token_ids={63},
                                  batch_size=batch_size)

    alone = run(1)
    assert run(4) == alone and run(2) == alone
    note = capsys.readouterr().err
    assert ("batches of equal length" in note) == (method == "prefix") and note.count("note:") <= 1


def test_prompt_tuning_scores_a_left_padded_row_as_alone_under_a_window():
    """The soft prompt goes after a row's padding in every forward, so log-probs read from a
    left-padded batch (the rollouts' scoring) equal the row's own."""
    from posttrain.data.batching import real_positions
    from posttrain.rollout.generate import left_pad

    model = _windowed("prompt")
    input_ids, mask = left_pad(PROMPT_IDS, 0, "cpu")
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=mask, position_ids=real_positions(mask)).logits
        for row, ids in enumerate(PROMPT_IDS):
            alone = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          position_ids=torch.arange(len(ids))[None]).logits
            torch.testing.assert_close(batched[row, -len(ids):], alone[0], rtol=1e-5, atol=1e-5)


def test_equal_length_batches_keep_order_and_size():
    prompts = [[1] * 3, [1] * 2, [1] * 3, [1] * 3, [1]]
    assert _batches(prompts, 2, False) == [[0, 2], [3, 1], [4]]
    assert _batches(prompts, 2, True) == [[0, 2], [3], [1], [4]]
