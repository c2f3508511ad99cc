"""Interop with the ecosystem: an ML engineer trains with posttrain and uses the outputs with plain
transformers and peft, and brings things made with them into posttrain.

Walked, on the tiny preset with 1-step runs: OUT, a run's final/ (full, LoRA, DoRA, IA3, prompt, prefix,
bottleneck, a mix) loaded with AutoModelForCausalLM / peft's PeftModel and AutoPeftModel; a LoRA reward
model's final/ with AutoPeftModelForSequenceClassification against `posttrain score`; `posttrain merge`
against the adapter; the saved tokenizer's chat template against the tokens training used; the saved
generation_config and config.json against the base's and against where posttrain's generation stops.
IN, adapters made by plain peft (`get_peft_model` + `save_pretrained`) of every peft method, with a task
type or none, with `modules_to_save` on a tied head, with added tokens and resized embeddings, a
sequence-classification LoRA, and a tokenizer with its own template saved beside one; models saved by
plain transformers (sharded safetensors, a BOS-adding tokenizer without a template, named templates, a
Qwen-base-like eos of <|endoftext|> under a ChatML template); `datasets` output: `save_to_disk` directories
(as training, `score` and `generate` data) and the files of `to_json`, `to_parquet` and `to_csv`.

What was right: every posttrain final/ loads in plain transformers / peft with posttrain's logits
(bottleneck and mixes are refused by both loaders, loudly, as the README's "posttrain (bottleneck/)"
format says); a LoRA reward model scores in AutoPeftModelForSequenceClassification(num_labels=1) as
`posttrain score` does; plain-peft adapters of every peft method load in posttrain with peft's logits to
the last bit (a projected prefix within 2e-7: peft saves it in float32) and merge with them to 1e-5 (a LoRA with `modules_to_save: [lm_head]` on a tied head merges
into an untied pair); a plain-peft SEQ_CLS LoRA scores in `posttrain score` as in peft; an adapter's own
tokenizer and template are taken over its base's and kept by `merge`; an adapter directory as
`model.path` is refused with the merge command; sharded safetensors load and train; named chat templates
survive a run; the built-in templates saved into final/ render a conversation to exactly the training
tokens, BOS included, on a BOS-adding tokenizer; `datasets`' `to_json` (JSON Lines in a .json file) and
`to_parquet` read as the dataset.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 32:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run_cli

TEXTS = ["Reverse: q m t", "Hello there, how are you today?"]
TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Copy: a b"},
        {"role": "assistant", "content": "a b"}, {"role": "user", "content": "Reverse: x y"},
        {"role": "assistant", "content": "y x"}]


def _preset() -> str:
    from posttrain.models.presets import preset_path

    return str(preset_path("tiny"))


def _sft(out: Path, model_path: str, *overrides: str) -> Path:
    """A 1-step SFT run on the synthetic tasks, quiet; its final/."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    cfg = SFTConfig.load(None, [f"output_dir={out}", f"model.path={model_path}", "data.synthetic_size=64",
                                "data.max_length=48", "data.eval_fraction=0", "train.max_steps=1",
                                "train.batch_size=8", "train.progress_bar=false", "eval.exact_match_prompts=0",
                                *overrides])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_sft(cfg) / "final"


def _perturbed(peft_model, seed: int):
    """Trainable weights moved off their initialisation (a LoRA's B starts at zero), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return peft_model.eval()


def _logits64(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.double()(**batch).logits


# --------------------------------------------------------------------------- defects


def test_final_generation_config_stops_where_posttrains_generation_stops(tmp_path):
    """A Qwen2.5-base-like model saved by plain transformers: eos <|endoftext|>, a ChatML template whose turns
    end in <|im_end|>. SFT trains every answer to end in <|im_end|>, and posttrain's generate / chat / serve /
    rollouts stop there (`eos_token_ids`); `run_dir/final` "loads with AutoModelForCausalLM.from_pretrained",
    but its generation_config names <|endoftext|> only, so transformers' `generate` (and any server reading
    generation_config) runs each answer on to max_new_tokens. Qwen's own instruct models list both ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from posttrain.inference import load_for_inference
    from posttrain.rollout.generate import eos_token_ids

    tokenizer, model = AutoTokenizer.from_pretrained(_preset()), AutoModelForCausalLM.from_pretrained(_preset())
    text_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.eos_token = "<|endoftext|>"
    model.config.eos_token_id = text_end
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=text_end,
                                               pad_token_id=model.config.pad_token_id)
    assert "<|im_end|>" in tokenizer.chat_template
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    final = _sft(tmp_path / "run", str(tmp_path / "base"))
    posttrain_stops = eos_token_ids(*load_for_inference(str(final)))
    assert turn_end in posttrain_stops  # posttrain's own generation ends the turn there
    saved = GenerationConfig.from_pretrained(final).eos_token_id
    saved = set(saved if isinstance(saved, list) else [saved])
    assert posttrain_stops <= saved, f"generation_config eos_token_id {sorted(saved)}; posttrain stops at {sorted(posttrain_stops)}"


def test_a_plain_peft_adapter_with_added_tokens_loads_with_its_resized_embeddings(tmp_path, capsys):
    """peft's documented recipe for new special tokens: add them to the tokenizer, `resize_token_embeddings`,
    LoRA with `modules_to_save: [embed_tokens, lm_head]`, save the adapter and the tokenizer together; to load,
    resize the base to len(tokenizer) first. README: "adapters that plain peft saved load in posttrain
    (`posttrain generate --model ADAPTER_DIR`)". Measured: `load_for_inference` raises RuntimeError "size
    mismatch for ... embed_tokens ... [1026, 128] ... [1024, 128]", and `generate` / `merge` exit 1 with it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.inference import load_for_inference

    tokenizer = AutoTokenizer.from_pretrained(_preset())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|think|>"]})
    base = AutoModelForCausalLM.from_pretrained(_preset())
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft_model = _perturbed(get_peft_model(base, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")), 2)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    batch = tokenizer(["Reverse: q m t <|tool|>", "Hello <|think|> there"], return_tensors="pt", padding=True)
    expected = _logits64(peft_model, batch)
    try:
        model, loaded_tokenizer = load_for_inference(str(adapter))
    except RuntimeError as exc:
        pytest.fail(f"load_for_inference: {str(exc).splitlines()[1].strip()}")
    assert len(loaded_tokenizer) == len(tokenizer)
    torch.testing.assert_close(_logits64(model, batch), expected, rtol=0, atol=1e-9)
    (tmp_path / "p.txt").write_text("Copy: a b\n")
    rc, out = run_cli(capsys, "generate", "--model", adapter, "--prompts", tmp_path / "p.txt", "--output",
                      tmp_path / "o.jsonl", "--max-new-tokens", "3")
    assert rc == 0, out


def test_generate_reads_prompts_from_a_datasets_directory(tmp_path, capsys):
    """README: generate's prompts "come from a data file the training readers take", and the training readers
    (Data: "JSONL, JSON, Parquet, CSV and `datasets` `save_to_disk` directories") and `posttrain score --input`
    take a `save_to_disk` directory. Measured: exit 2, "error: prompts file DIR does not exist"."""
    import datasets

    directory = tmp_path / "prompts_ds"
    datasets.Dataset.from_list([{"prompt": "Copy: a b"}, {"prompt": "Reverse: x y"}]).save_to_disk(str(directory))
    capsys.readouterr()
    rc, out = run_cli(capsys, "generate", "--model", "tiny", "--prompts", directory, "--output", tmp_path / "o.jsonl",
                      "--max-new-tokens", "2")
    assert rc == 0, out
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("kind", ["messages", "ranking"])
def test_a_csv_written_by_datasets_to_csv_reads_as_the_dataset(kind, tmp_path):
    """README (Data): "a CSV cell holding a list is read as JSON or as Python's repr (what `datasets`' and
    pandas' `to_csv` write)". `datasets.Dataset.to_csv` writes a list column through pandas from numpy arrays:
    `[{'role': 'user', ...}\n {'role': 'assistant', ...}]` and `['m' 'q' 't']`, no commas. Measured: every
    messages row is "a string that is not a JSON list of turns (nor Python's repr of one)", and
    `ast.literal_eval` joins ['m' 'q' 't'] into ['mqt']: "'responses' has 1 response(s)"."""
    import datasets

    from posttrain.data.formats import load_records
    from posttrain.data.preferences import load_preference_records
    from posttrain.errors import DataError

    rows = {"messages": [{"messages": TALK[1:3]}, {"messages": TALK[1:5]}],
            "ranking": [{"prompt": "Smallest letter: q m t", "responses": ["m", "q", "t"], "ranks": [0, 1, 2]},
                        {"prompt": "Copy: a b", "responses": ["a b", "b a"], "ranks": [0, 1]}]}[kind]
    path = tmp_path / f"{kind}.csv"
    datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    load = load_records if kind == "messages" else load_preference_records
    try:
        records, _ = load([str(path)], log=lambda _: None)
    except DataError as exc:
        pytest.fail(f"{exc}")
    if kind == "messages":
        assert [r.messages for r in records] == [row["messages"] for row in rows]
    else:
        assert [r.responses for r in records] == [row["responses"] for row in rows]


# --------------------------------------------------------------------------- right, and now tested


def _plain_peft_configs():
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    return {
        "dora": LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, task_type="CAUSAL_LM"),
        "rslora-all-linear": LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                        task_type="CAUSAL_LM"),
        "lora-no-task-type": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "lora-saves-tied-head": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                           task_type="CAUSAL_LM"),
        "ia3": IA3Config(task_type="CAUSAL_LM"),
        "prefix-projection": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16,
                                                task_type="CAUSAL_LM"),
        "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    }


MERGEABLE = ["dora", "lora-saves-tied-head"]  # rsLoRA and IA3: test_adapter_edges merges posttrain-saved ones


@pytest.fixture(scope="module")
def plain_adapters(tmp_path_factory):
    """{name: (adapter dir, peft's own float64 logits on TEXTS)} for adapters saved by plain peft."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("plain-peft")
    tokenizer = AutoTokenizer.from_pretrained(_preset())
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    made = {}
    for seed, (name, config) in enumerate(_plain_peft_configs().items()):
        peft_model = _perturbed(get_peft_model(AutoModelForCausalLM.from_pretrained(_preset()), config), seed)
        peft_model.save_pretrained(root / name)
        made[name] = (root / name, _logits64(peft_model, batch)[:, -batch["input_ids"].shape[1]:])
    return made, batch


@pytest.mark.parametrize("name", list(_plain_peft_configs()))
def test_every_peft_method_saved_by_plain_peft_loads_in_posttrain_with_peft_logits(name, plain_adapters):
    """README: "adapters that plain peft saved load in posttrain ... both directions are tested for every peft
    method"; the plain-peft direction had tests for LoRA and prompt tuning only. DoRA, rsLoRA on all linears,
    a LoRA with no task type, one with `modules_to_save` on the tied lm_head, IA3, prefix tuning with its
    projection: posttrain's load gives peft's logits in float64 (equal to the last bit, 0.0; the prefix within
    2e-7, as peft saves its projected keys and values in float32 and recomputes the MLP in float64 itself)."""
    from posttrain.inference import load_for_inference

    made, batch = plain_adapters
    directory, expected = made[name]
    model, _ = load_for_inference(str(directory))
    tolerance = 1e-6 if name == "prefix-projection" else 1e-9
    torch.testing.assert_close(_logits64(model, batch), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", MERGEABLE)
def test_posttrain_merge_of_a_plain_peft_adapter_gives_peft_logits(name, plain_adapters, tmp_path, capsys):
    """`posttrain merge` takes a plain-peft adapter directory too (its base from adapter_config.json, its
    tokenizer from the base): the merged plain model's logits equal peft's unmerged ones within the README's
    1e-4 (measured ≤ 9e-6); `modules_to_save: [lm_head]` on a tied head merges into an untied pair."""
    from transformers import AutoModelForCausalLM

    made, batch = plain_adapters
    directory, expected = made[name]
    rc, out = run_cli(capsys, "merge", directory, tmp_path / "merged")
    assert rc == 0, out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits64(merged, batch), expected, rtol=0, atol=1e-4)
    if name == "lora-saves-tied-head":
        assert not merged.config.tie_word_embeddings


def test_a_plain_peft_sequence_classification_lora_scores_in_posttrain_as_in_peft(tmp_path, capsys):
    """A reward model made elsewhere: plain peft's LoRA on AutoModelForSequenceClassification(num_labels=1),
    task SEQ_CLS (peft saves the `score` head through modules_to_save). `posttrain score --model ADAPTER_DIR`
    gives each row the score peft's own forward gives its chat-rendered text."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_preset())
    classifier = AutoModelForSequenceClassification.from_pretrained(_preset(), num_labels=1)
    peft_model = _perturbed(get_peft_model(classifier, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  task_type="SEQ_CLS")), 1)
    peft_model.save_pretrained(tmp_path / "rm")
    rows = [{"prompt": "Smallest letter: q m t", "response": "m"},
            {"prompt": "Count: a a b", "response": "three letters, a longer reply"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out = run_cli(capsys, "score", "--model", tmp_path / "rm", "--input", tmp_path / "rows.jsonl",
                      "--output", tmp_path / "scored.jsonl")
    assert rc == 0, out
    got = [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    for row, score in zip(rows, got):
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                              {"role": "assistant", "content": row["response"]}], tokenize=False)
        with torch.no_grad():
            expected = float(peft_model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
        assert score == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def bos_adding_base(tmp_path_factory):
    """A model directory saved by plain transformers whose tokenizer puts BOS before every text (as Llama-2,
    Mistral and Gemma base models do) and has no chat template."""
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("bos-base") / "base"
    tokenizer = AutoTokenizer.from_pretrained(_preset())
    tokenizer.bos_token = "<|endoftext|>"
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tokenizer.chat_template = None
    AutoModelForCausalLM.from_pretrained(_preset()).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    reloaded = AutoTokenizer.from_pretrained(directory)
    assert reloaded("a")["input_ids"][0] == bos_id and reloaded.chat_template is None
    return directory


@pytest.mark.parametrize("template", ["auto", "alpaca"])
def test_the_template_saved_in_final_renders_the_training_tokens_with_one_bos(template, bos_adding_base, tmp_path):
    """A base with a BOS-adding tokenizer and no template trains under posttrain's ChatML fallback (or
    `data.template: alpaca`), BOS first, once. The template saved into final/ is what a user, vLLM or TGI will
    render with: `apply_chat_template(tokenize=True)` on final/'s tokenizer gives exactly the training ids of a
    multi-turn conversation with a system turn (one BOS), and the generation prompt of its first three turns is
    a prefix of them."""
    from transformers import AutoTokenizer

    from posttrain.data.records import Record
    from posttrain.data.templates import encode_record, resolve_template

    final = _sft(tmp_path / "run", str(bos_adding_base), f"data.template={template}")
    base_tokenizer = AutoTokenizer.from_pretrained(bos_adding_base)
    trained = encode_record(Record(messages=TALK), base_tokenizer, resolve_template(base_tokenizer, template)).input_ids
    saved = AutoTokenizer.from_pretrained(final)
    rendered = list(saved.apply_chat_template(TALK, tokenize=True, return_dict=True)["input_ids"])
    assert rendered == trained
    assert rendered[0] == saved.bos_token_id and rendered.count(saved.bos_token_id) == 1
    prompt = list(saved.apply_chat_template(TALK[:4], tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"])
    assert trained[:len(prompt)] == prompt
