"""An SFT-mechanics walk: the supervised fine-tuning loss read against TRL's `SFTTrainer` and the literature.

Walked: README's Data and The training loop sections, `train/sft.py`, `losses/language_modeling.py`,
`data/batching.py` and `data/templates.py`, on the tiny preset: which tokens an assistant-only loss
labels (system, user and tool turns, every assistant turn of a multi-turn row, the end-of-turn token
that teaches the model to stop); how the loss is normalised (the summed token loss divided by the
labelled tokens of the whole global step, so `train.grad_accum` x batch equals one batch: TRL's known
pitfall is a mean of per-micro-batch means); packing (position ids restarting per example, no
attention across examples); truncation (the first `data.max_length` tokens kept, a row whose answer
is cut away dropped and counted); BOS / EOS (one BOS from the template, the answer's end-of-turn
labelled even where the pad token is the EOS, which a collator that masks pad ids — the TRL pitfall —
would drop); `train.loss` auto / chunked / plain; data a TRL user brings (prompt-completion rows).
There is no NEFTune and no SFT label smoothing to check.

Right, and checked here in float64 against a plain transformers forward and masks written by hand:
the assistant-only mask of a multi-turn row with a system turn (both answers and both end-of-turn
tokens, nothing else) and its loss, chunked and plain, padded and packed, with the pad token set to
the EOS; the held-out loss under `data.packing` (the eval rows go through the packed collator)
equals the one without it. Normalisation over accumulated micro-batches, packed = unpacked losses,
truncation and the dropped no-label rows already have tests (`test_sft_data_edges.py`,
`test_accumulation_equivalence_edges.py`, `test_batching.py`, `test_template_masking_edges.py`).

Wrong: `data.streaming` with `data.packing` packs only `train.batch_size` examples into each
micro-batch (one short row where the in-memory run's micro-batch is `train.batch_size` full rows),
so the same config trains on several times fewer tokens a step when streamed; and sft's
prompt-completion rows whose prompt was already rendered with the chat template (TRL's
`apply_chat_template` preprocessing) are templated a second time, silently, where rm, dpo, kto,
grpo and ppo refuse them as bad rows.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 33:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.records import IGNORE_INDEX, Example, Record
from posttrain.errors import DataError


def _quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


@pytest.fixture(scope="module")
def tiny64():
    """The tiny preset in float64, eval mode: the reference forward and the product's module share it."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.presets import preset_path

    return AutoModelForCausalLM.from_pretrained(preset_path("tiny"), dtype=torch.float64).eval()


CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Copy: a b"},
    {"role": "assistant", "content": "a b"},
    {"role": "user", "content": "Reverse: x y z"},
    {"role": "assistant", "content": "z y x"},
]


def _hand_encoded(tok, messages):
    """ChatML written out by hand for the tiny tokenizer: (ids, labels), labels on each assistant
    turn's content and its <|im_end|> (the end of turn the model must learn to stop on), nothing else."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    ids, labels = [], []
    for m in messages:
        head = [start] + enc(m["role"] + "\n")
        body = enc(m["content"]) + [end]
        ids += head + body + enc("\n")
        trained = m["role"] == "assistant"
        labels += [IGNORE_INDEX] * len(head) + (body if trained else [IGNORE_INDEX] * len(body)) + [IGNORE_INDEX]
    return ids, labels


def _reference_sum(model, examples):
    """Σ −log p(y_t | y_<t) over every labelled position t ≥ 1, each example alone, float64."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t, label in enumerate(ex.labels):
                if t > 0 and label != IGNORE_INDEX:
                    total -= logp[t - 1, label]
    return total


# --------------------------------------------------------------------------- right, untested


def test_multi_turn_mask_and_loss_with_pad_as_eos_equal_a_hand_mask_in_float64(tok, tiny64):
    """System and user turns unlabelled; both answers and both <|im_end|> labelled. With the pad id
    set to the EOS (load_tokenizer's fallback for Llama 3, Mistral, GPT-2), a padded and a packed
    batch still count and train every answer's EOS: the loss, chunked and plain, is the float64
    sum over the hand mask."""
    from posttrain.data.batching import collate, collate_packed, pack
    from posttrain.data.templates import encode_record, resolve_template
    from posttrain.train.sft import CausalLMLoss

    template = resolve_template(tok, "auto")
    short = CONVERSATION[1:3]  # no system turn, one answer: a shorter row, so the batch pads
    examples = []
    for messages in (CONVERSATION, short):
        ex = encode_record(Record(messages=messages), tok, template)
        ids, labels = _hand_encoded(tok, messages)
        assert (ex.input_ids, ex.labels) == (ids, labels), tok.decode(ex.input_ids)
        examples.append(ex)
    eos = tok.eos_token_id
    n_eos = sum(1 for ex in examples for t, lab in zip(ex.input_ids, ex.labels) if lab == eos == t)
    assert n_eos == 3  # two answers in the long row, one in the short

    want = _reference_sum(tiny64, examples)
    labelled = sum(ex.num_label_tokens for ex in examples)
    padded = collate(examples, eos)  # pad = EOS
    packed = collate_packed(pack(examples, 256), eos)
    for batch in (padded, packed):
        assert int((batch["labels"][:, 1:] == eos).sum()) == n_eos
        assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == labelled
        for kind in ("chunked", "plain"):
            module = CausalLMLoss(tiny64, kind)
            with torch.no_grad():
                got = module(**batch)
            assert abs(float(got) - float(want)) < 1e-9, (kind, "position_ids" in batch, float(got), float(want))


def test_held_out_loss_under_packing_equals_the_padded_one(tok, tiny64):
    """With data.packing the held-out rows go through the packed collator (no attention mask,
    position ids, a pad tail of its own): the per-token held-out loss is the padded one."""
    from posttrain.config import SFTConfig
    from posttrain.data.templates import encode_record, resolve_template
    from posttrain.train.sft import CausalLMLoss, SFTStage

    template = resolve_template(tok, "auto")
    rows = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:5],
            [{"role": "user", "content": "Smallest letter: q m t"}, {"role": "assistant", "content": "m"}]]
    held = [encode_record(Record(messages=m), tok, template) for m in rows]
    module = CausalLMLoss(tiny64)
    losses = {}
    for packing in (False, True):
        cfg = SFTConfig.from_dict({"data": {"packing": packing, "max_length": 128}, "train": {"batch_size": 3}})
        stage = SFTStage(module, [], held, cfg, tok.pad_token_id)
        batches = stage.eval_micro_batches()
        assert ("position_ids" in batches[0]) is packing
        with torch.no_grad():
            total = sum(float(module(**b)) for b in batches)
        losses[packing] = total / sum(stage.weight(b) for b in batches)
    want = float(_reference_sum(tiny64, held)) / sum(ex.num_label_tokens for ex in held)
    assert abs(losses[False] - want) < 1e-10 and abs(losses[True] - want) < 1e-10, (losses, want)


# --------------------------------------------------------------------------- defects


def test_streamed_packing_fills_batch_size_rows_per_micro_batch_like_in_memory_packing():
    """`train.batch_size` counts packed rows in memory (README: a step is batch_size x grad_accum x
    processes rows); a streamed run of the same config and data must fill as many rows a micro-batch,
    else switching on data.streaming for a large file silently cuts the tokens of every step."""
    from posttrain.config import SFTConfig
    from posttrain.data.batching import pack
    from posttrain.train.sft import SFTStage

    examples = [Example(list(range(4, 14 + i % 5)), list(range(4, 14 + i % 5)), f"f.jsonl:{i + 1}") for i in range(64)]
    cfg = SFTConfig.from_dict({"data": {"packing": True, "max_length": 64}, "train": {"batch_size": 4}})
    in_memory = SFTStage(None, pack(examples, 64), [], cfg, 3)
    streamed = SFTStage(None, None, [], cfg, 3, stream=lambda: iter(examples))
    memory_batches = list(in_memory.micro_batches(0))
    stream_batches = list(streamed.micro_batches(0))
    mem_rows = [b["input_ids"].shape[0] for b in memory_batches]
    stream_rows = [b["input_ids"].shape[0] for b in stream_batches]
    mem_tokens = [in_memory.tokens(b) for b in memory_batches]
    stream_tokens = [streamed.tokens(b) for b in stream_batches]
    assert all(rows == 4 for rows in stream_rows[:-1]) and len(stream_batches) == len(memory_batches), (
        f"streamed: {len(stream_batches)} micro-batches of {stream_rows[:3]} row(s), {stream_tokens[:3]} tokens; "
        f"in memory: {len(memory_batches)} of {mem_rows[:3]} rows, {mem_tokens[:3]} tokens")


def test_sft_prompt_completion_row_with_an_already_rendered_prompt_is_a_bad_row(tok, tmp_path):
    """TRL's apply_chat_template preprocessing writes {"prompt": "<|im_start|>user\\n...<|im_start|>assistant\\n",
    "completion": "..."}. README: such a prompt "is a bad row ..., never templated twice" (said for the
    other stages); sft nests it in a second conversation and trains on it."""
    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import prepare_sft_data

    rendered = tok.apply_chat_template([{"role": "user", "content": "Copy: a b"}], tokenize=False,
                                       add_generation_prompt=True)
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": "Copy: c d", "completion": "c d"}, {"prompt": rendered, "completion": "a b"},
            {"prompt": "Copy: e f", "completion": "e f"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig.from_dict({"data": {"train_files": [str(path)], "eval_fraction": 0.0, "max_length": 128}})
    try:
        data = prepare_sft_data(cfg.data, tok, None, 0, _quiet)
    except DataError as err:
        assert f"{path}:2" in str(err), str(err)
        return
    nested = [tok.decode(ex.input_ids) for ex in data.train if ex.input_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) > 2]
    assert False, f"trained on {len(data.train)} rows, the rendered one templated twice: {nested!r}"
