"""Stop 32, interop fixes beyond the pinned walkthrough tests: numpy's array repr in a CSV cell
(`formats.decode_cell`), generation_config's stop ids in what `save_model` and `posttrain merge`
write, a `--prompts` directory that is not a save_to_disk one, an adapter that saved no
embedding weights leaving the base's vocabulary alone."""

from __future__ import annotations

import json

import pytest

from tests.cli_runner import run_cli

# --------------------------------------------------------------------------- numpy repr in a CSV cell


@pytest.mark.parametrize("text, expected", [
    ("['m' 'q' 't']", ["m", "q", "t"]),
    ("[-1  2  3]", [-1, 2, 3]),
    ("[1.5 2. ]", [1.5, 2.0]),
    ("[ True False]", [True, False]),
    ("[None 'a']", [None, "a"]),
    ("[[1 2] [3 4]]", [[1, 2], [3, 4]]),
    ("[array([1, 2]) array([3, 4])]", [[1, 2], [3, 4]]),
    ("[{'a': 1}\n {'a': 2}]", [{"a": 1}, {"a": 2}]),
    ("[{'calls': array([{'name': 'f'}],\n      dtype=object)}]", [{"calls": [{"name": "f"}]}]),
    ("['a b' '[c d]' \"it's\"]", ["a b", "[c d]", "it's"]),  # nothing inside a string is touched
    ("['a', 'b']", ["a", "b"]),  # Python's repr as before
    ('["a", "b"]', ["a", "b"]),  # JSON as before
    ("[1, -2]", [1, -2]),
])
def test_numpy_and_python_reprs_decode(text, expected):
    from posttrain.data.formats import decode_cell

    assert decode_cell(text) == expected


@pytest.mark.parametrize("text", ["'a' 'b'", "[{'role': 'user' 'content': 'q'}]", "[Note] hi", "(1 2)",
                                  "['unclosed]", "[1 2", "array"])
def test_values_side_by_side_outside_a_list_are_refused(text):
    """Python would join two strings into one ('m' 'q' → 'mq'); only a list's elements get a comma."""
    from posttrain.data.formats import decode_cell

    with pytest.raises(ValueError, match="neither JSON nor a Python literal"):
        decode_cell(text)


def test_tool_calls_written_by_datasets_to_csv_read_as_the_dataset(tmp_path):
    """A tool call list inside a turn comes out of datasets' to_csv as numpy's array(..., dtype=object)."""
    import datasets

    from posttrain.data.formats import load_records

    messages = [{"role": "user", "content": "Weather?", "tool_calls": None},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "content": "sunny", "tool_calls": None},
                {"role": "assistant", "content": "It is sunny.", "tool_calls": None}]
    path = tmp_path / "calls.csv"
    datasets.Dataset.from_list([{"messages": messages}]).to_csv(str(path), index=False)
    assert "dtype=object" in path.read_text()
    records, _ = load_records([str(path)], log=lambda _: None)
    assert records[0].messages[1]["tool_calls"][0]["function"]["name"] == "weather"
    assert [m["content"] for m in records[0].messages] == [m["content"] for m in messages]


# --------------------------------------------------------------------------- generation_config's stops


def _qwen_base_like():
    """The tiny preset with eos <|endoftext|> under its ChatML template (turns end in <|im_end|>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from posttrain.models.presets import preset_path

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny"))
    text_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.eos_token = "<|endoftext|>"
    model.config.eos_token_id = text_end
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=text_end,
                                               pad_token_id=model.config.pad_token_id)
    return model, tokenizer, text_end, tokenizer.convert_tokens_to_ids("<|im_end|>")


def _saved_eos(directory) -> list[int]:
    return json.loads((directory / "generation_config.json").read_text())["eos_token_id"]


def test_save_model_writes_every_stop_id_and_leaves_the_model_as_it_was(tmp_path):
    from posttrain.models.loading import save_model

    model, tokenizer, text_end, turn_end = _qwen_base_like()
    save_model(model, tokenizer, tmp_path / "out")
    assert _saved_eos(tmp_path / "out") == sorted({text_end, turn_end})
    assert model.generation_config.eos_token_id == text_end  # in memory: as before the save
    assert model.config.eos_token_id == text_end
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == text_end


def test_save_model_keeps_a_generation_config_that_already_stops_there(tmp_path):
    from posttrain.models.loading import load_tokenizer, save_model
    from posttrain.models.presets import preset_path
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(preset_path("tiny")), load_tokenizer("tiny")
    before = model.generation_config.eos_token_id
    save_model(model, tokenizer, tmp_path / "out")
    assert _saved_eos(tmp_path / "out") == before


def test_merge_writes_the_stop_ids_of_the_adapters_tokenizer(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    model, tokenizer, text_end, turn_end = _qwen_base_like()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    rc, out = run_cli(capsys, "merge", tmp_path / "adapter", tmp_path / "merged")
    assert rc == 0, out
    saved = GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert saved == sorted({text_end, turn_end})


# --------------------------------------------------------------------------- prompts, adapters


def test_generate_prompts_from_a_plain_directory_says_what_it_expects(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    rc, out = run_cli(capsys, "generate", "--model", "tiny", "--prompts", tmp_path / "notes", "--output",
                      tmp_path / "o.jsonl")
    assert rc != 0
    assert "not one written by datasets' save_to_disk" in out


def test_an_adapter_without_embedding_weights_keeps_the_bases_vocabulary(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models.adapters.io import load_adapted
    from posttrain.models.presets import preset_path

    base = AutoModelForCausalLM.from_pretrained(preset_path("tiny"))
    rows = base.get_input_embeddings().weight.shape[0]
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(
        tmp_path / "adapter")
    loaded = load_adapted(tmp_path / "adapter")
    assert loaded.lm.get_input_embeddings().weight.shape[0] == rows
