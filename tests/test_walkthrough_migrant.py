"""An ML engineer migrating from Hugging Face TRL walks the README's Config, Data, preference and
online-RL sections with the data and the habits TRL gave them: TRL's dataset formats (language
modeling, prompt-completion, preference with an explicit and an implicit prompt, unpaired
preference, conversational rows with system turns and content parts), files as `datasets` and
pandas write them, TRL's argument names as config keys, and one malformed row per file type.

The tests named for a failure pin a defect found on that walk: each is a strict xfail until its
fix. The others pin behaviour a migrant relies on that was right but had no test. Most work on
the data layer directly (rows → records → token labels); the few CLI runs stop before training."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, DataError
from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}




@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


@pytest.fixture(scope="module")
def tok():
    from posttrain.data.templates import adopt_template
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    return tokenizer, adopt_template(tokenizer, "auto")


@pytest.fixture
def no_model_load(monkeypatch):
    """A stage that reaches the model loader fails with this marker: what it said before is what a
    user with a 7B model hears before minutes of loading, not after."""
    from posttrain.models import loading

    def refuse(*args, **kwargs):
        raise DataError("MODEL LOADED before the data was checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def _labelled(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != -100])


def _context(example, tokenizer) -> str:
    return tokenizer.decode([i for i, t in zip(example.input_ids, example.labels) if t == -100])


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _repr_csv(path: Path, rows: list[dict]) -> Path:
    """A CSV as `datasets.Dataset.to_csv` and pandas' `DataFrame.to_csv` write it: a cell holding a
    list is written as its Python repr (single quotes), not as JSON."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]))
        writer.writerows([[v if isinstance(v, str) else str(v) for v in row.values()] for row in rows])
    return path


def _quiet(_):
    return None


# --------------------------------------------------------------------------- defects: data


@pytest.mark.parametrize("kind", ["pairs", "unpaired", "prompts"])
def test_csv_list_cells_written_as_python_repr_are_not_trained_on_as_text(tmp_path, kind):
    from posttrain.data.preferences import load_preference_records
    from posttrain.data.prompts import load_prompt_records

    rows = {"pairs": [{"prompt": [U(f"What color {i}?")], "chosen": [A("blue")], "rejected": [A("green")]}
                      for i in range(3)],
            "unpaired": [{"prompt": [U(f"What color {i}?")], "completion": [A("blue")], "label": "True"}
                         for i in range(3)],
            "prompts": [{"prompt": [U(f"What color {i}?")], "answer": "blue"} for i in range(3)]}[kind]
    path = _repr_csv(tmp_path / f"{kind}.csv", rows)
    assert "[{'role': 'user'" in path.read_text()  # what datasets' to_csv writes for a list of turns
    load = load_prompt_records if kind == "prompts" else load_preference_records
    try:
        records, _ = load([str(path)], log=_quiet)
    except DataError as exc:  # refused is right too, if it says what is wrong with the cells
        assert "JSON" in str(exc) and f"{kind}.csv:2" in str(exc), exc
        return
    assert records[0].prompt == [U("What color 0?")]  # not a user turn holding "[{'role': 'user', ..."
    if kind != "prompts":
        assert records[0].responses[0] == "blue"


@pytest.mark.parametrize("kind", ["pairs", "prompts"])
def test_a_prompt_already_rendered_with_the_chat_template_is_not_templated_twice(tmp_path, tok, kind):
    from posttrain.data.preferences import encode_preference, load_preference_records
    from posttrain.data.prompts import encode_prompts, load_prompt_records

    tokenizer, template = tok
    rendered = tokenizer.apply_chat_template([U("What color is the sky?")], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>user\n")
    try:
        if kind == "pairs":
            row = {"prompt": rendered, "chosen": "Blue.<|im_end|>\n", "rejected": "Green.<|im_end|>\n"}
            records, _ = load_preference_records([str(_jsonl(tmp_path / "p.jsonl", [row]))], log=_quiet)
            ids = encode_preference(records[0], tokenizer, template).sequences[0].input_ids
        else:
            row = {"prompt": rendered, "answer": "Blue."}
            records, _ = load_prompt_records([str(_jsonl(tmp_path / "p.jsonl", [row]))], log=_quiet)
            ids = encode_prompts(records, tokenizer, template, 256, _quiet)[0][0]
    except DataError as exc:  # refused is right too, if it names the row and says why
        assert "p.jsonl:1" in str(exc) and "template" in str(exc), exc
        return
    assert tokenizer.decode(ids).count("<|im_start|>user") == 1, tokenizer.decode(ids)


@pytest.mark.parametrize("row", [
    {"prompt": "What color is the sky?", "completion": "It is blue."},
    {"prompt": [S("Be brief."), U("What color is the sky?")], "completion": [A("It is blue.")]},
], ids=["standard", "conversational"])
def test_sft_takes_trl_prompt_completion_rows_with_loss_on_the_completion(tmp_path, tok, row):
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record

    tokenizer, template = tok
    records, report = load_records([str(_jsonl(tmp_path / "pc.jsonl", [row, row]))], log=_quiet)
    assert report.good == 2
    example = encode_record(records[0], tokenizer, template)
    assert "It is blue." in _labelled(example, tokenizer)
    assert "sky" in _context(example, tokenizer) and "sky" not in _labelled(example, tokenizer)


def test_content_as_a_list_of_text_parts_is_read_as_serve_reads_it(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.data.preferences import load_preference_records

    parts = [{"type": "text", "text": "What color "}, {"type": "text", "text": "is the sky?"}]
    sft = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": parts},
                                                         {"role": "assistant", "content": [{"type": "text",
                                                                                            "text": "Blue."}]}]}])
    records, _ = load_records([str(sft)], log=_quiet)
    assert records[0].messages == [U("What color is the sky?"), A("Blue.")]
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": [{"role": "user", "content": parts}],
                                               "chosen": [A("Blue.")], "rejected": [A("Green.")]}])
    prefs, _ = load_preference_records([str(pairs)], log=_quiet)
    assert prefs[0].prompt == [U("What color is the sky?")]


def test_a_one_row_json_file_from_to_json_is_one_row(tmp_path):
    from posttrain.data.formats import load_records

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"messages": [U("What color is the sky?"), A("Blue.")]}) + "\n")
    records, report = load_records([str(path)], log=_quiet)
    assert report.total == 1 and records[0].messages == [U("What color is the sky?"), A("Blue.")]


# --------------------------------------------------------------------------- defects: config


@pytest.mark.parametrize("command, override, meant", [
    ("sft", "lr_scheduler_type=cosine", "train.schedule"),  # said: adapter.schedule
    ("sft", "dataset_name=trl-lib/Capybara", "data.train_files"),  # said: data.streaming
    ("sft", "eval_strategy=steps", "train.eval_every"),  # said: data.eval_fraction
    ("grpo", "max_completion_length=64", "rollout.max_new_tokens"),  # said: data.max_prompt_length
    ("grpo", "num_iterations=2", "grpo.updates_per_rollout"),  # said: rollout.num_generations (G, not μ)
    ("grpo", "loss_type=dr_grpo", "grpo.aggregation"),  # said: rollout.vllm_dtype
    ("dpo", "rpo_alpha=1.0", "dpo.nll_weight"),  # said: adapter.lora.alpha
    ("ppo", "cliprange=0.2", "ppo.clip_eps"),  # said: reward.clip
])
def test_trl_argument_names_are_pointed_at_the_setting_they_mean(command, override, meant):
    from posttrain.config import DPOConfig, GRPOConfig, PPOConfig, SFTConfig

    cls = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "ppo": PPOConfig}[command]
    with pytest.raises(ConfigError) as exc:
        cls.load(None, [override])
    assert meant in str(exc.value), str(exc.value)


@pytest.mark.parametrize("command, override, meant", [
    ("grpo", "epsilon=0.2", "grpo.clip_eps"),
    ("grpo", "use_vllm=true", "rollout.engine"),
    ("rm", "center_rewards_coefficient=0.01", "reward.centering"),
    ("dpo", "precompute_ref_log_probs=true", "dpo.reference"),
])
def test_trl_argument_names_with_a_counterpart_get_a_hint(command, override, meant):
    from posttrain.config import DPOConfig, GRPOConfig, RMConfig

    cls = {"dpo": DPOConfig, "grpo": GRPOConfig, "rm": RMConfig}[command]
    with pytest.raises(ConfigError) as exc:
        cls.load(None, [override])
    assert meant in str(exc.value), str(exc.value)


@pytest.mark.parametrize("command, override, meant, not_meant", [
    ("dpo", "dpo.loss=sigmoid", "dpo", "simpo"),
    ("sft", "train.optimizer=adamw_torch", "adamw", "8bit"),
])
def test_trl_value_names_are_pointed_at_the_value_they_mean(command, override, meant, not_meant):
    from posttrain.config import DPOConfig, SFTConfig

    with pytest.raises(ConfigError) as exc:
        {"dpo": DPOConfig, "sft": SFTConfig}[command].load(None, [override])
    hint = str(exc.value).split("is not one of", 1)[1].split(";", 1)[-1]  # what follows the list of choices
    assert re.search(rf"\b{meant}\b", hint) and not_meant not in hint, str(exc.value)


def test_label_smoothing_with_plain_dpo_is_not_silently_ignored():
    from posttrain.config import DPOConfig
    from posttrain.config.preference import validate_dpo

    with pytest.raises(ConfigError, match="cdpo"):  # refused today: 0.2 is not the default
        validate_dpo(DPOConfig.load(None, ["dpo.label_smoothing=0.2"]))
    with pytest.raises(ConfigError, match="cdpo"):
        validate_dpo(DPOConfig.load(None, ["dpo.label_smoothing=0.1"]))


def test_orpo_beta_is_not_silently_ignored():
    from posttrain.config import DPOConfig
    from posttrain.config.preference import validate_dpo

    with pytest.raises(ConfigError, match="orpo_lambda"):
        validate_dpo(DPOConfig.load(None, ["dpo.loss=orpo", "dpo.beta=0.25"]))


def test_trl_style_flags_are_answered_with_the_override_they_mean(capsys):
    rc, out = run_cli(capsys, "sft", "examples/sft_full.yaml", "--learning_rate", "1e-4")
    assert rc == 2
    assert "train.lr" in out, out


# --------------------------------------------------------------------------- defects: when and how errors come


@pytest.mark.parametrize("what", ["txt", "shards_dir", "unknown_rows"])
def test_unreadable_data_is_refused_before_the_model_loads(capsys, tmp_path, no_model_load, what):
    if what == "txt":
        path = tmp_path / "train.txt"
        path.write_text("What color is the sky? It is blue.\n")
    elif what == "shards_dir":  # a Hub snapshot: data/train-00000-of-00001.parquet, not save_to_disk
        path = tmp_path / "snapshot"
        (path / "data").mkdir(parents=True)
        (path / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    else:  # TRL's stepwise supervision: no posttrain format takes it
        path = _jsonl(tmp_path / "steps.jsonl", [{"prompt": "9.8 or 9.11?", "completions": ["a", "b"],
                                                  "labels": [True, False]}])
    rc, out = run_cli(capsys, "sft", "examples/sft_full.yaml", "train.max_steps=1", "train.progress_bar=false",
                      f"output_dir={tmp_path / 'run'}", f"data.train_files=[{path}]")
    assert rc == 2 and "MODEL LOADED" not in out, out
    assert str(path) in out, out


def test_a_hub_dataset_name_is_told_how_to_bring_it_local(capsys, tmp_path, no_model_load):
    rc, out = run_cli(capsys, "dpo", "examples/dpo.yaml", "train.max_steps=1", f"output_dir={tmp_path / 'run'}",
                      "data.train_files=[trl-lib/ultrafeedback_binarized]")
    assert rc == 2 and "MODEL LOADED" not in out, out
    assert "save_to_disk" in out, out


def test_prompt_rows_without_an_answer_are_named_by_file_and_line(capsys, tmp_path):
    rows = [{"prompt": f"Smallest letter: {s}", "target": min(s.split())} for s in ("q m t", "z d k", "w p x", "c b")]
    path = _jsonl(tmp_path / "sol.jsonl", rows)
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", "train.max_steps=1", "train.batch_size=8",
                      "eval.prompts=0", "train.progress_bar=false", "data.eval_fraction=0",
                      f"output_dir={tmp_path / 'run'}", f"data.train_files=[{path}]")
    assert rc == 2 and "needs an 'answer'" in out, out
    assert f"{path}:1" in out, out


def test_a_trl_style_reward_function_is_told_the_signature_posttrain_calls(tmp_path, monkeypatch):
    import sys

    from posttrain.rewards import function_reward

    (tmp_path / "migrant_rewards.py").write_text(
        "def reward_len(completions, **kwargs):\n    return [-abs(20 - len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("migrant_rewards", None)
    with pytest.raises((ConfigError, DataError)) as exc:
        function_reward("migrant_rewards:reward_len")([[U("q")]], ["an answer"])
    assert "prompt_turns, response" in str(exc.value), str(exc.value)


# --------------------------------------------------------------------------- right, now pinned


def test_trl_implicit_prompt_conversations_from_parquet_train_only_the_last_reply(tmp_path, tok):
    """TRL's conversational implicit-prompt preference (chosen / rejected are whole conversations,
    the Hub's parquet layout): the shared turns are the prompt, never trained on; each side is
    labelled on its last assistant reply and its end-of-turn marker only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.preferences import encode_preference, load_preference_records

    tokenizer, template = tok
    context = [S("Be brief."), U("Hi"), A("Hello."), U("What color is the sky?")]
    rows = [{"chosen": [*context, A("Blue.")], "rejected": [*context, A("Green.")]}] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    records, report = load_preference_records([str(tmp_path / "train-00000-of-00001.parquet")], log=_quiet)
    assert report.good == 2 and records[0].prompt == context and records[0].responses == ["Blue.", "Green."]
    chosen, rejected = encode_preference(records[0], tokenizer, template).sequences
    assert _labelled(chosen, tokenizer) == "Blue.<|im_end|>" and _labelled(rejected, tokenizer) == "Green.<|im_end|>"
    assert _context(chosen, tokenizer) == _context(rejected, tokenizer)  # the same prompt tokens
    assert "Hello." in _context(chosen, tokenizer)  # the earlier reply is context


def test_kto_label_reaches_the_loss_as_desirable(tmp_path, tok):
    """TRL's unpaired preference rows ({"prompt", "completion", "label"}), JSON booleans and CSV cells:
    each row's label is the flag KTO's loss reads."""
    from posttrain.data.preferences import encode_preference, load_preference_records
    from posttrain.train.grouped import items_from_examples
    from posttrain.train.preference import kto_extras, kto_items

    tokenizer, template = tok
    labels = [True, False, False, True]
    jsonl = _jsonl(tmp_path / "kto.jsonl", [{"prompt": [U(f"Q{i}?")], "completion": [A(f"A{i}.")], "label": lab}
                                            for i, lab in enumerate(labels)])
    table = tmp_path / "kto.csv"
    table.write_text("prompt,completion,label\n" + "".join(f"Q{i}?,A{i}.,{lab}\n" for i, lab in enumerate(labels)))
    for path in (jsonl, table):
        records, _ = load_preference_records([str(path)], log=_quiet)
        items = kto_items(items_from_examples([encode_preference(r, tokenizer, template) for r in records]), 64, _quiet)
        assert kto_extras(items)["desirable"].tolist() == labels, path


_UNPAIRED = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0} for i in range(5)]
_BAD = {"prompt": "Q?", "completion": "A.", "label": "maybe"}  # not a boolean: a bad row in every file type


def _write(kind: str, path: Path) -> tuple[str, str]:
    """The five good rows with the bad one third; (the path given, the bad row's location)."""
    rows = _UNPAIRED[:2] + [_BAD] + _UNPAIRED[2:]
    if kind == "jsonl":
        _jsonl(path / "d.jsonl", rows)
        return str(path / "d.jsonl"), f"{path / 'd.jsonl'}:3"
    if kind == "jsonl.gz":
        with gzip.open(path / "d.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        return str(path / "d.jsonl.gz"), f"{path / 'd.jsonl.gz'}:3"
    if kind == "json array":
        (path / "d.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
        return str(path / "d.json"), f"{path / 'd.json'}:4"
    if kind == "json data key":
        (path / "d.json").write_text('{"version": 1,\n "data": [\n' + ",\n".join(json.dumps(r) for r in rows) + "]}\n")
        return str(path / "d.json"), f"{path / 'd.json'}:5"
    if kind == "csv":
        with open(path / "d.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["prompt", "completion", "label"])
            writer.writeheader()
            writer.writerows(rows)
        return str(path / "d.csv"), f"{path / 'd.csv'}:4"
    table = [{**r, "label": str(r["label"]).lower()} for r in rows]  # one column type: strings
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(table), path / "d.parquet")
        return str(path / "d.parquet"), f"{path / 'd.parquet'}:row 3"
    import datasets

    datasets.Dataset.from_list(table).save_to_disk(str(path / "ds"))
    return str(path / "ds"), f"{path / 'ds'}:row 3"


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json array", "json data key", "csv", "parquet", "datasets dir"])
def test_one_bad_row_in_each_file_type_is_counted_located_and_kept_in_rejects(tmp_path, kind):
    from posttrain.data.preferences import load_preference_records

    path, location = _write(kind, tmp_path)
    with pytest.raises(DataError) as exc:
        load_preference_records([path], log=_quiet)
    assert f"{location}: 'label' is 'maybe', expected true or false" in str(exc.value), str(exc.value)
    rejects = tmp_path / "rejects.jsonl"
    records, report = load_preference_records([path], bad_rows="skip", max_bad_fraction=0.5,
                                              rejects_path=str(rejects), log=_quiet)
    assert (len(records), report.total, report.bad) == (5, 6, 1)
    assert [r.desirable for r in records] == [r["label"] for r in _UNPAIRED]
    assert [json.loads(line)["location"] for line in rejects.read_text().splitlines()] == [location]


@pytest.mark.parametrize("command, override, meant", [
    ("sft", "learning_rate=1e-4", "train.lr"),
    ("sft", "per_device_train_batch_size=4", "train.batch_size"),
    ("sft", "gradient_accumulation_steps=4", "train.grad_accum"),
    ("sft", "num_train_epochs=3", "train.epochs"),
    ("sft", "bf16=true", "train.mixed_precision"),
    ("sft", "lora_r=16", "adapter.lora.r"),
    ("sft", "max_seq_length=1024", "data.max_length"),
    ("dpo", "beta=0.1", "dpo.beta"),
    ("dpo", "loss_type=ipo", "dpo.loss"),
    ("dpo", "max_prompt_length=128", "data.max_length"),  # the one length posttrain has: prompt + response
    ("grpo", "beta=0.04", "grpo.beta"),
    ("grpo", "num_generations=8", "rollout.num_generations"),
    ("grpo", "max_prompt_length=128", "data.max_prompt_length"),
])
def test_trl_argument_names_that_get_the_right_hint(command, override, meant):
    from posttrain.config import DPOConfig, GRPOConfig, SFTConfig

    with pytest.raises(ConfigError) as exc:
        {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}[command].load(None, [override])
    assert str(exc.value).endswith(f"did you mean {meant}?"), str(exc.value)
