"""A user brings a chat model of a real family: Llama-3 (instruct, and base with the instruct template),
Llama-2 and Mistral ([INST] ... [/INST] with a SentencePiece tokenizer), Gemma (<start_of_turn>, no system
role), Qwen2.5 (ChatML with a default system prompt), Phi-3 (<|end|>, then eos after the last turn, pad ==
eos, left padding) and Zephyr. Earlier walks used the preset's own tokenizer (ChatML) or a GPT-2-style one
with no template; these families differ in the ways that break post-training silently.

There is no model hub here, so each family is built offline as a user's model directory: a small BPE
trained with `tokenizers` on posttrain's bundled corpus, shaped like the family's tokenizer (byte-level
with Llama-3's split regex; SentencePiece-style "▁" with byte fallback, the legacy per-segment prefix of
Llama-2 / Zephyr, Metaspace "first" of Mistral / Phi-3, no prefix for Gemma; a post-processor that adds
BOS; Phi-3's rstrip added tokens), the family's special tokens and flags (pad missing, or pad == eos;
padding_side left), the family's public chat format written here as a Jinja template, and a tiny
random-init Llama (large weights, so outputs depend on every input token) with the family's
generation_config. Expectations are written out with transformers' own `apply_chat_template`,
tokenizer calls and forwards.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 30:
they assert the right behaviour); the others pin behaviour that was right but had no test with such tokenizers."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = "train.progress_bar=false"

# --------------------------------------------------------------------------- the families' chat formats
# Written from each format's public description; differences from the real templates are noted inline.

LLAMA3 = (  # bos emitted by the template; each message trimmed; <|eot_id|> ends every turn
    "{%- for message in messages %}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{%- if loop.index0 == 0 %}{%- set content = bos_token + content %}{%- endif %}"
    "{{- content }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA2 = (  # system folded into the first user turn; bos before every [INST], ' ' + answer + ' ' + eos
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set loop_messages = messages[1:] %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- set system_message = false %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if loop.index0 == 0 and system_message != false %}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{%- else %}{%- set content = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + content | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
MISTRAL = (  # v0.1: no system role, no generation prompt; the answer follows [/INST] with no space
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)
GEMMA = (  # raises on a system turn; assistant is "model"; bos from the template
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}"
    "{%- endif %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
QWEN = (  # ChatML with Qwen2.5's default system prompt when the conversation has none (no tools branch)
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PHI3 = (  # Phi-3-mini's: no bos, <|end|> ends each turn, eos_token after the last turn unless generating
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
ZEPHYR = (  # every turn ends with eos; the markers are plain text; the template's own newlines are kept
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

_L3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_SP = ["<unk>", "<s>", "</s>"]
# name -> how its tokenizer and model are built. kind: bytelevel (Llama-3 split regex) or a SentencePiece
# flavour; gen_eos: generation_config.eos_token_id; rstrip: Phi-3's added tokens that eat the whitespace after.
FAMILIES = {
    "llama3": dict(kind="bytelevel", specials=_L3, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   template=LLAMA3, gen_eos=["<|end_of_text|>", "<|eot_id|>"], add_bos=True),
    "llama3_base": dict(kind="bytelevel", specials=_L3, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                        template=LLAMA3, gen_eos=["<|end_of_text|>"], add_bos=True),
    "llama2": dict(kind="legacy", specials=_SP, bos="<s>", eos="</s>", pad=None, template=LLAMA2, gen_eos=["</s>"],
                   add_bos=True),
    "mistral": dict(kind="first", specials=_SP, bos="<s>", eos="</s>", pad=None, template=MISTRAL,
                    gen_eos=["</s>"], add_bos=True),
    "gemma": dict(kind="gemma", specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                  bos="<bos>", eos="<eos>", pad="<pad>", template=GEMMA, gen_eos=["<eos>"], add_bos=True,
                  padding_side="left"),
    "qwen": dict(kind="bytelevel", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                 eos="<|im_end|>", pad="<|endoftext|>", template=QWEN, gen_eos=["<|im_end|>", "<|endoftext|>"],
                 add_bos=False),
    "phi3": dict(kind="first", specials=_SP, bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", template=PHI3,
                 gen_eos=["<|endoftext|>", "<|end|>"], add_bos=True, padding_side="left",
                 rstrip=["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]),
    "zephyr": dict(kind="legacy", specials=_SP, bos="<s>", eos="</s>", pad="</s>", template=ZEPHYR,
                   gen_eos=["</s>"], add_bos=True),
}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus() -> list[str]:
    from posttrain.models.presets import corpus_path

    return corpus_path().read_text(encoding="utf-8").splitlines()


def _byte_level(specials: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=700, min_frequency=2, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _sentencepiece(specials: list[str], kind: str):
    """BPE with byte fallback over "▁"-words, as converted SentencePiece tokenizers are. kind: legacy (a
    normalizer prepends ▁ to every segment between added tokens: Llama-2, Zephyr), first (Metaspace with
    prepend_scheme "first": Mistral / Phi-3 with legacy=False), gemma (no dummy prefix)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trained.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=600, min_frequency=2, special_tokens=specials, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})  # byte fallback: ordinary tokens
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                               unk_token="<unk>" if "<unk>" in specials else None))
    tok.add_special_tokens(specials)
    if kind == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif kind == "gemma":
        tok.normalizer = normalizers.Replace(" ", "▁")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps if kind == "gemma" else [*steps, decoders.Strip(" ", 1, 0)])
    return tok


def build_tokenizer(name: str):
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[name]
    raw = _byte_level(spec["specials"]) if spec["kind"] == "bytelevel" else _sentencepiece(spec["specials"],
                                                                                            spec["kind"])
    if spec.get("rstrip"):
        raw.add_special_tokens([AddedToken(t, rstrip=True, special=True, normalized=False) for t in spec["rstrip"]])
    if spec["add_bos"]:  # as Llama's tokenizer.json does: a post-processor puts BOS before every text
        bos = spec["bos"]
        add = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                            special_tokens=[(bos, raw.token_to_id(bos))])
        raw.post_processor = add if raw.post_processor is None else processors.Sequence([raw.post_processor, add])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=spec["bos"], eos_token=spec["eos"],
                                  pad_token=spec["pad"], unk_token="<unk>" if "<unk>" in spec["specials"] else None,
                                  model_max_length=512, clean_up_tokenization_spaces=False,
                                  padding_side=spec.get("padding_side", "right"))
    tok.chat_template = spec["template"]
    return tok


def build_family(name: str, out: Path, stop_boost: float = 0.0) -> Path:
    """`name`'s tiny model directory. stop_boost: scale the end-of-turn token's (tied) embedding so greedy
    decoding picks it within a few tokens, as a trained chat model would."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    spec, tok = FAMILIES[name], build_tokenizer(name)
    ids = [tok.convert_tokens_to_ids(t) for t in spec["gen_eos"]]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=ids if len(ids) > 1 else ids[0], pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.5)
            if stop_boost:
                model.model.embed_tokens.weight[END_OF_TURN_ID(tok, name)] *= stop_boost
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    logging.disable_progress_bar()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


END_OF_TURN = {"llama3": "<|eot_id|>", "llama3_base": "<|eot_id|>", "llama2": "</s>", "mistral": "</s>",
               "gemma": "<end_of_turn>", "qwen": "<|im_end|>", "phi3": "<|end|>", "zephyr": "</s>"}

MARKER = {"llama2": " </s>"}  # what ends an answer in the rendered text, where it is not END_OF_TURN alone


def END_OF_TURN_ID(tok, name: str) -> int:  # noqa: N802
    return tok.convert_tokens_to_ids(END_OF_TURN[name])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(name, stop_boost=0) -> that family's model directory, built once per module."""
    root = tmp_path_factory.mktemp("families")
    built: dict[tuple, Path] = {}

    def get(name: str, stop_boost: float = 0.0) -> Path:
        key = (name, stop_boost)
        if key not in built:
            built[key] = build_family(name, root / f"{name}-{stop_boost:g}", stop_boost)
        return built[key]

    return get


@pytest.fixture(scope="module")
def tokenizers_():
    """name -> the family's tokenizer as posttrain loads it (pad filled in), built once per module."""
    return family_tokenizers()


def family_tokenizers():
    """A getter: name -> the family's tokenizer as posttrain loads it, each built once."""
    from posttrain.models.loading import load_tokenizer

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                build_tokenizer(name).save_pretrained(d)
                cache[name] = load_tokenizer(d)
        return cache[name]

    return get


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def _chat_ids(tok, messages, generation_prompt=False) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)["input_ids"])


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"prompt": "Smallest letter: z f w", "chosen": "f", "rejected": "z"},
         {"prompt": "Reverse: m b h", "chosen": "h b m", "rejected": "m b h"},
         {"prompt": "Copy: a b c", "chosen": "a b c", "rejected": "c b a"},
         {"prompt": "Smallest letter: q d r", "chosen": "d", "rejected": "r"}]
TALK = [{"role": "user", "content": "Name the baker."}, {"role": "assistant", "content": "The baker is awake."},
        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "She bakes bread."}]


# --------------------------------------------------------------------------- defects


def test_reward_model_on_a_tokenizer_without_pad_scores_like_plain_transformers(capsys, tmp_path, family):
    """Llama-3 instruct has no pad token and <|eot_id|> (its eos) ends every turn. `posttrain rm` saves "a plain
    HF directory"; transformers' sequence-classification forward of a row alone must read the score where
    posttrain trained and scores it (the last real token). It reads the token before <|eot_id|> instead:
    posttrain 0.217 / 0.267 vs transformers 0.328 / 0.087 on the two rows below."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "rm"
    rc, out = run_cli(capsys, "rm", f"output_dir={run}", f"model.path={family('llama3')}", "data.eval_fraction=0",
                      f"data.train_files=[{_write(tmp_path / 'pairs.jsonl', PAIRS)}]", "train.max_steps=1",
                      "train.batch_size=4", "train.lr=5e-2", QUIET)
    assert rc == 0, out
    rows = [{"prompt": "Copy: a b", "response": "a b"}, {"prompt": "Reverse: q r s", "response": "s r q"}]
    rc, out = run_cli(capsys, "score", "--model", run, "--input", _write(tmp_path / "rows.jsonl", rows),
                      "--output", tmp_path / "scored.jsonl")
    assert rc == 0, out
    got = [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    want = []
    for row in rows:
        ids = _chat_ids(tok, [{"role": "user", "content": row["prompt"]},
                              {"role": "assistant", "content": row["response"]}])
        assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
        with torch.no_grad():
            want.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_without_a_template_gives_the_model_its_bos(capsys, tmp_path, family):
    """A Llama-2 base user continues text: `posttrain generate --template none`. Text SFT trains on
    `tokenizer(text)` (BOS first), `serve`'s /v1/completions encodes a raw prompt with the tokenizer's special
    tokens, and transformers' generate on `tokenizer(prompt)` does too; generate feeds the prompt without <s>,
    so its greedy completions differ from transformers' ('edherumact 2V' vs 'x~s go conce'; given the
    ids with <s>, posttrain's generate_token_ids matches transformers exactly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = family("llama2")
    prompts = ["The baker is", "the milk van rattles past and"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    rc, out = run_cli(capsys, "generate", "--model", model_dir, "--prompts", tmp_path / "p.txt", "--template", "none",
                      "--max-new-tokens", "6", "--output", tmp_path / "out.jsonl")
    assert rc == 0, out
    got = [json.loads(line)["completion"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    want = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        assert enc["input_ids"][0, 0] == tok.bos_token_id
        new = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        want.append(tok.decode(new[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert got == want


def test_multi_turn_conversation_under_phi3_template_trains_every_assistant_turn(tokenizers_):
    """Phi-3-mini's own template ends a conversation with `{% else %}{{ eos_token }}`. A two-turn row is
    refused ("the chat template is not prefix-stable at message 1 ... set data.template: chatml"), and the
    advice would train a Phi-3 instruct model in a format it does not know. The earlier turn's span is still
    well defined: where rendering through it and the whole conversation agree."""
    from posttrain.data.records import Record
    from posttrain.data.templates import encode_record, resolve_template

    tok = tokenizers_("phi3")
    example = encode_record(Record(messages=TALK), tok, resolve_template(tok))
    assert example.input_ids == _chat_ids(tok, TALK)
    runs = [tok.decode(r, skip_special_tokens=False) for r in _runs(example.input_ids, example.labels)]
    assert runs[0] == "The baker is awake.<|end|>"
    assert runs[1] in ("She bakes bread.<|end|>", "She bakes bread.<|end|><|endoftext|>")
    assert len(runs) == 2


def test_builtin_chatml_on_a_bos_adding_tokenizer_keeps_one_bos(tokenizers_):
    """A Llama-2 / Mistral / Gemma base model has no chat template and its tokenizer puts <s> before every
    text (the model never saw a sequence without it). With `data.template: auto` posttrain falls back to its
    ChatML; a text row of the same run is `<s> text </s>`, but a chat row, a prompt-completion row and an RL
    prompt start with no <s> at all."""
    from posttrain.data.prompts import PromptRecord, encode_prompts
    from posttrain.data.records import Record
    from posttrain.data.templates import encode_record, resolve_template

    tok = copy.deepcopy(tokenizers_("llama2"))
    tok.chat_template = None
    template = resolve_template(tok)
    bos = tok.bos_token_id
    text = encode_record(Record(text="the baker"), tok, template).input_ids
    assert text[0] == bos and text.count(bos) == 1  # right already
    chat = encode_record(Record(messages=TALK[:2], prompt_turns=1), tok, template).input_ids
    (prompt,), _ = encode_prompts([PromptRecord(TALK[:1])], tok, template, 256, log=lambda _: None)
    assert (chat[0], chat.count(bos)) == (bos, 1)
    assert (prompt[0], prompt.count(bos)) == (bos, 1)


def test_evaluate_answer_nll_reads_the_answer_tokens_the_template_gives(capsys, tmp_path, family):
    """Mistral's template writes the answer right after "[/INST]"; its tokenizer (Metaspace, prepend "first")
    tokenizes "h b m" there as h ▁b ▁m, and alone as ▁h ▁b ▁m. SFT trains the first; the report's
    "reference-answer NLL / token" scores the second, a sequence the model never learns to write
    (11.105 nats against 12.705 for the template's tokens on this random model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = family("mistral")
    rows = [{"prompt": "Reverse: m b h", "answer": "h b m"}, {"prompt": "Copy: a b c", "answer": "a b c"},
            {"prompt": "Smallest letter: q d r", "answer": "d"}]
    rc, out = run_cli(capsys, "evaluate", "examples/evaluate.yaml", f"policy={model_dir}", f"reference={model_dir}",
                      f"prompts.files=[{_write(tmp_path / 'prompts.jsonl', rows)}]", "safety.redteam=false",
                      "generation.samples=1", "generation.max_new_tokens=2", f"output_dir={tmp_path / 'ev'}")
    assert rc == 0, out
    got = json.loads((tmp_path / "ev" / "report.json").read_text())["models"]["policy"]["answer_nll"]
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for row in rows:
        turns = [{"role": "user", "content": row["prompt"]}]
        prompt = _chat_ids(tok, turns, generation_prompt=True)
        full = _chat_ids(tok, turns + [{"role": "assistant", "content": row["answer"]}])
        assert full[: len(prompt)] == prompt and full[-1] == tok.eos_token_id
        answer = full[len(prompt):-1]  # the answer's tokens, as SFT trains them (less the end-of-turn eos)
        with torch.no_grad():
            logps = model(torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
        total -= sum(float(logps[len(prompt) + j - 1, t]) for j, t in enumerate(answer))
        count += len(answer)
    assert got == pytest.approx(total / count, abs=1e-4)


def test_a_judge_whose_template_has_no_system_role_judges(capsys, tmp_path, family):
    """`posttrain rlaif` with a local Gemma judge: every pair fails with "TemplateError: System role not
    supported" and the run stops ("every item failed", exit 2); with a Llama-3 judge the same run finishes.
    The judge's instructions belong in the user turn when the template cannot take a system turn."""
    gemma = family("gemma")
    rc, out = run_cli(capsys, "rlaif", "examples/rlaif.yaml", "policy.kind=local", f"policy.model={gemma}",
                      "judge.kind=local", f"judge.model={gemma}", "data.limit=1", "rlaif.num_responses=2",
                      "judge.max_tokens=4", "policy.max_tokens=4", f"output_dir={tmp_path / 'rlaif'}")
    assert "System role not supported" not in out
    assert rc == 0, out


def test_a_system_message_attack_on_a_target_without_system_role_is_not_a_transient_failure(capsys, tmp_path,
                                                                                             family):
    """`posttrain redteam` against a local Gemma target: the built-in role_play attack (a system message)
    ends as a failed item ("TemplateError: System role not supported ... rerun the same command to retry the
    failed items"); the rerun fails again, forever. It should reach the model (its system text folded into
    the user turn) or be reported as not applicable to this template."""
    rc, out = run_cli(capsys, "redteam", "examples/redteam.yaml", f"target.model={family('gemma')}",
                      "probes.limit=1", "target.max_tokens=4", "attacks.names=[direct,role_play]",
                      f"output_dir={tmp_path / 'red'}")
    assert rc == 0, out
    assert "rerun the same command" not in out and not re.search(r"\b[1-9]\d* failed", out), out


# --------------------------------------------------------------------------- right, and now tested


@pytest.mark.parametrize("name", ["llama3", "llama3_base", "llama2", "mistral", "gemma", "qwen", "zephyr"])
def test_sft_labels_are_each_answer_and_its_end_of_turn_marker_with_one_bos(tokenizers_, name):
    """A two-turn conversation: the ids equal transformers' `apply_chat_template(tokenize=True)` (the template's
    BOS once, none added again by a BOS-adding post-processor) and the labelled tokens are exactly each
    assistant answer plus the family's end-of-turn marker: never a header, the default system prompt, or a
    user turn that ends with eos too (Zephyr); with pad == eos (Llama-3, Zephyr) the marker is kept."""
    from posttrain.data.batching import collate
    from posttrain.data.records import Record
    from posttrain.data.templates import encode_record, resolve_template

    tok = tokenizers_(name)
    example = encode_record(Record(messages=TALK), tok, resolve_template(tok))
    assert example.input_ids == _chat_ids(tok, TALK)
    if tok.bos_token_id is not None:
        # Llama-2 writes <s> before each [INST]; Zephyr's template writes none (as transformers renders it)
        assert example.input_ids.count(tok.bos_token_id) == {"llama2": 2, "zephyr": 0}.get(name, 1)
    marker = MARKER.get(name, END_OF_TURN[name])
    runs = [tok.decode(r, skip_special_tokens=False) for r in _runs(example.input_ids, example.labels)]
    assert [r.lstrip(" ") for r in runs] == ["The baker is awake." + marker, "She bakes bread." + marker]
    batch = collate([example, encode_record(Record(messages=TALK[:2]), tok, resolve_template(tok))], tok.pad_token_id)
    assert int((batch["labels"][1] == END_OF_TURN_ID(tok, name)).sum()) == 1  # not lost among the padding


@pytest.mark.parametrize("name", ["llama3", "llama2", "mistral", "gemma", "qwen", "phi3", "zephyr"])
def test_preference_sides_share_the_generation_prompt_tokens_and_equal_the_whole_conversation(tokenizers_, name):
    """Each side is exactly the tokens of the whole rendered conversation (no merge across the prompt's end,
    no extra space, no second BOS); its first len(prompt) tokens are the prompt as generation tokenizes it
    (`add_generation_prompt=True`), the same for chosen and rejected; only the response's turn is labelled,
    from the first token after the prompt."""
    from posttrain.data.preferences import encode_preference, to_preference_record
    from posttrain.data.templates import resolve_template

    tok = tokenizers_(name)
    row = {"prompt": "Name the baker.", "chosen": " the baker is awake", "rejected": "\n42 loaves"}
    record = to_preference_record(row, "pairs")
    sides = encode_preference(record, tok, resolve_template(tok)).sequences
    prompt = _chat_ids(tok, record.prompt, generation_prompt=True)
    for side, text in zip(sides, (row["chosen"], row["rejected"])):
        assert side.input_ids == _chat_ids(tok, [*record.prompt, {"role": "assistant", "content": text}])
        assert side.input_ids[: len(prompt)] == prompt
        labelled = [i for i, label in enumerate(side.labels) if label != -100]
        assert labelled == list(range(len(prompt), labelled[-1] + 1))  # one run, from the prompt's end
        assert tok.decode(side.input_ids[labelled[-1] + 1:]).strip() == ""  # then the template's newline at most


@pytest.mark.parametrize("name", ["llama3_base", "gemma", "qwen", "phi3"])
def test_generation_stops_at_the_families_end_of_turn_and_equals_transformers(capsys, tmp_path, family, name):
    """`posttrain generate` with the family's template: completions equal transformers' greedy generate on
    `apply_chat_template(add_generation_prompt=True)` stopped at the end-of-turn token, decoded without
    special tokens. Llama-3 base's eos is <|end_of_text|> and Gemma's generation_config names only <eos>: the
    stop comes from the template (<|eot_id|>, <end_of_turn>). Gemma and Phi-3 ask for left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = family(name, stop_boost=6.0)
    prompts = ["Name the baker.", "Copy: a b c", "Reverse: x y z w", "hi"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    rc, out = run_cli(capsys, "generate", "--model", model_dir, "--prompts", tmp_path / "p.txt",
                      "--max-new-tokens", "12", "--output", tmp_path / "out.jsonl")
    assert rc == 0, out
    got = [json.loads(line)["completion"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop = END_OF_TURN_ID(tok, name)
    stopped = 0
    for prompt, completion in zip(prompts, got):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")
        new = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=[stop, tok.eos_token_id],
                             pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        stopped += new[-1] == stop and len(new) < 12
        assert completion == tok.decode(new, skip_special_tokens=True)
        assert END_OF_TURN[name] not in completion
    assert stopped >= 2  # the check means something: most rows ended at the marker


@pytest.mark.parametrize("name", ["llama3", "llama2", "gemma"])
def test_text_and_prompt_completion_rows_get_one_bos_and_one_eos(tokenizers_, name):
    """Plain text with a BOS-adding tokenizer: BOS once (the post-processor's), eos appended once, every
    token labelled. A prompt-completion row under the family's template: the template's BOS once, the
    completion and its marker labelled."""
    from posttrain.data.formats import to_record
    from posttrain.data.templates import encode_record, resolve_template

    tok = tokenizers_(name)
    template = resolve_template(tok)
    text = encode_record(to_record({"text": "the baker is awake"}, "text"), tok, template)
    assert text.input_ids == tok("the baker is awake")["input_ids"] + [tok.eos_token_id]
    assert (text.input_ids.count(tok.bos_token_id), text.input_ids.count(tok.eos_token_id)) == (1, 1)
    assert text.labels == text.input_ids
    row = to_record({"prompt": "Name the baker.", "completion": "The baker."}, "prompt_completion")
    pc = encode_record(row, tok, template)
    assert pc.input_ids == _chat_ids(tok, row.messages) and pc.input_ids.count(tok.bos_token_id) == 1
    (labelled,) = _runs(pc.input_ids, pc.labels)
    marker = MARKER.get(name, END_OF_TURN[name])
    assert tok.decode(labelled, skip_special_tokens=False).strip() == "The baker." + marker


def test_qwen_default_system_prompt_is_in_every_rendering_and_never_trained(capsys, tmp_path, family):
    """Qwen2.5's template adds its default system prompt when a conversation has none. SFT through the CLI
    with that model trains, the RL prompt equals transformers' rendering with the generation prompt (the
    default system turn included), and reward functions see the row's own turns only."""
    from posttrain.data.prompts import PromptRecord, encode_prompts
    from posttrain.data.records import Record
    from posttrain.data.templates import encode_record, resolve_template
    from posttrain.models.loading import load_tokenizer

    model_dir = family("qwen")
    rows = [{"messages": TALK[:2]}, {"messages": TALK}] * 4
    rc, out = run_cli(capsys, "sft", f"model.path={model_dir}", f"data.train_files=[{_write(tmp_path / 'c.jsonl', rows)}]",
                      "data.eval_fraction=0", "train.max_steps=1", "train.batch_size=4", f"output_dir={tmp_path / 'sft'}",
                      QUIET)
    assert rc == 0, out
    tok = load_tokenizer(str(tmp_path / "sft" / "final"))
    template = resolve_template(tok)
    example = encode_record(Record(messages=TALK[:2]), tok, template)
    labelled = "".join(tok.decode(r, skip_special_tokens=False) for r in _runs(example.input_ids, example.labels))
    assert labelled == "The baker is awake.<|im_end|>"
    record = PromptRecord(TALK[:1])
    (ids,), (kept,) = encode_prompts([record], tok, template, 256, log=lambda _: None)
    assert ids == _chat_ids(tok, TALK[:1], generation_prompt=True)
    assert "You are Qwen" in tok.decode(ids) and kept.prompt == TALK[:1]
