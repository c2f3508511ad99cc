"""Review tests: `posttrain generate` / `posttrain chat` against plain transformers (+ peft), and
`posttrain pipeline` wiring, reruns, failures, relative paths and overrides. Tiny preset, 1-2 steps."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from posttrain import cli

PROMPTS = ["Pick the smallest letter: q m t", "Copy: a b", "Hello there, how are you today? Tell me"]


# ---------------------------------------------------------------- helpers: an independent reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset with its matrices redrawn at a larger scale (seeded), saved as a plain HF model dir:
    random-init tiny only emits newlines, which would make every comparison below trivially equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.presets import preset_path

    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    path = tmp_path_factory.mktemp("noisy-tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model, tok


def chatml(user: str, system: str | None = None) -> str:
    """The tiny preset's template, written out by hand."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return head + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def hf_greedy_ids(model, tokenizer, text: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    eos = {tokenizer.eos_token_id}
    cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


def hf_greedy(model, tokenizer, text: str, max_new_tokens: int) -> str:
    return tokenizer.decode(hf_greedy_ids(model, tokenizer, text, max_new_tokens), skip_special_tokens=True)


def run_generate(tmp_path: Path, prompts_name: str, lines: list[str], *flags: str) -> tuple[int, list[dict]]:
    prompts = tmp_path / prompts_name
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    if out.exists():
        out.unlink()
    code = cli.main(["generate", "--prompts", str(prompts), "--output", str(out), *flags])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, rows


# ---------------------------------------------------------------- generate


def test_generate_text_file_is_chat_templated_and_greedy_equals_transformers(tiny, tmp_path):
    path, model, tok = tiny
    code, rows = run_generate(tmp_path, "p.txt", PROMPTS, "--model", path, "--max-new-tokens", "7")
    assert code == 0
    assert [r["prompt"] for r in rows] == PROMPTS and all(set(r) == {"prompt", "completion"} for r in rows)
    expected = [hf_greedy(model, tok, chatml(p), 7) for p in PROMPTS]
    assert [r["completion"] for r in rows] == expected
    # max_new_tokens: exactly 7 tokens came out (the random tiny model does not emit EOS this early)
    assert all(len(hf_greedy_ids(model, tok, chatml(p), 7)) == 7 for p in PROMPTS)


def test_generate_template_none_uses_the_raw_prompt(tiny, tmp_path):
    path, model, tok = tiny
    code, rows = run_generate(tmp_path, "p.txt", PROMPTS, "--model", path, "--max-new-tokens", "6",
                              "--template", "none")
    assert code == 0
    assert [r["completion"] for r in rows] == [hf_greedy(model, tok, p, 6) for p in PROMPTS]
    # and it differs from the templated one (the flag does something)
    assert [r["completion"] for r in rows] != [hf_greedy(model, tok, chatml(p), 6) for p in PROMPTS]


def test_generate_batch_size_one_equals_batched_left_padding(tiny, tmp_path):
    path, model, tok = tiny
    lines = PROMPTS + ["x", "a much longer prompt than the others, with many more tokens in it than any other row"]
    _, one = run_generate(tmp_path, "p.txt", lines, "--model", path, "--max-new-tokens", "8", "--batch-size", "1")
    _, all_ = run_generate(tmp_path, "p.txt", lines, "--model", path, "--max-new-tokens", "8", "--batch-size", "5")
    _, two = run_generate(tmp_path, "p.txt", lines, "--model", path, "--max-new-tokens", "8", "--batch-size", "2")
    assert one == all_ == two
    assert [r["completion"] for r in all_] == [hf_greedy(model, tok, chatml(p), 8) for p in lines]


def test_generate_jsonl_keeps_fields_and_order_and_renders_messages(tiny, tmp_path):
    path, model, tok = tiny
    rows_in = [
        {"id": 3, "prompt": PROMPTS[0], "meta": {"k": [1, 2]}},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Copy: z y"}],
         "id": 1},
        {"zeta": None, "prompt": PROMPTS[2], "alpha": "x"},
    ]
    code, rows = run_generate(tmp_path, "p.jsonl", [json.dumps(r) for r in rows_in],
                              "--model", path, "--max-new-tokens", "5")
    assert code == 0
    assert [{k: v for k, v in r.items() if k != "completion"} for r in rows] == rows_in
    assert [list(r) for r in rows] == [list(r) + ["completion"] for r in rows_in]  # key order kept
    expected = [hf_greedy(model, tok, chatml(PROMPTS[0]), 5),
                hf_greedy(model, tok, chatml("Copy: z y", system="Be brief."), 5),
                hf_greedy(model, tok, chatml(PROMPTS[2]), 5)]
    assert [r["completion"] for r in rows] == expected


def test_generate_stop_string_cuts_like_transformers_text(tiny, tmp_path):
    path, model, tok = tiny
    full = hf_greedy(model, tok, chatml(PROMPTS[0]), 16)
    # a two-letter stop string from the middle of the greedy text
    at = next(i for i in range(len(full) // 3, len(full) - 1) if full[i:i + 2].isalpha())
    stop = full[at:at + 2]
    assert 0 < full.find(stop) < len(full) - 2, (full, stop)
    code, rows = run_generate(tmp_path, "p.txt", [PROMPTS[0]], "--model", path, "--max-new-tokens", "16",
                              "--stop", stop)
    assert code == 0
    assert rows[0]["completion"] == full[: full.find(stop)]


@pytest.mark.parametrize("bad, line", [
    ('{"prompt": "ok"}\n{"prompt": "ok", \n', 2),   # not JSON
    ('{"prompt": "ok"}\n\n["a list"]\n', 3),         # not an object (blank line still counted)
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', 2),  # neither prompt nor messages
])
def test_generate_bad_rows_named_by_file_and_line(tmp_path, capsys, bad, line):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(bad)
    code = cli.main(["generate", "--model", "tiny", "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code != 0 and f"{prompts}:{line}:" in err, err


@pytest.mark.parametrize("row", [
    pytest.param('{"messages": []}', id="empty-messages"),
    pytest.param('{"prompt": 5}', id="int-prompt"),
    pytest.param('{"messages": [{"role": "user"}]}', id="message-without-content"),
    pytest.param('{"messages": "hello"}', id="messages-not-a-list"),
])
def test_generate_malformed_row_named_by_file_and_line(tmp_path, capsys, row):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "ok"}\n' + row + "\n")
    try:
        code = cli.main(["generate", "--model", "tiny", "--prompts", str(prompts), "--max-new-tokens", "2",
                         "--output", str(tmp_path / "o.jsonl")])
    except Exception as exc:  # noqa: BLE001 - a traceback is not the one-line file:line error wanted
        pytest.fail(f"uncaught {type(exc).__name__}: {exc}")
    err = capsys.readouterr().err
    assert code != 0 and f"{prompts}:2:" in err, err


@pytest.fixture(scope="module")
def two_adapters(tiny, tmp_path_factory):
    """Two LoRA adapters on the tiny preset (one SFT step, then lora_B set to distinct random values so
    each visibly changes the model)."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    root = tmp_path_factory.mktemp("adapters")
    run = run_sft(SFTConfig.from_dict({
        "output_dir": str(root / "run"), "model": {"path": tiny[0]}, "adapter": {"method": ["lora"]},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["smallest"], "synthetic_size": 16,
                 "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False}}))
    dirs = {}
    for seed, name in ((1, "a"), (2, "b")):
        target = root / name
        shutil.copytree(run / "final", target)
        weights = load_file(str(target / "adapter_model.safetensors"))
        gen = torch.Generator().manual_seed(seed)
        weights = {k: (torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v) for k, v in weights.items()}
        save_file(weights, str(target / "adapter_model.safetensors"))
        dirs[name] = target
    return dirs


def peft_reference(base_path, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_generate_per_row_adapter_equals_peft_model(tiny, two_adapters, tmp_path):
    path, model, tok = tiny
    rows_in = [{"prompt": PROMPTS[0], "adapter": "b"}, {"prompt": PROMPTS[1]}, {"prompt": PROMPTS[2], "adapter": "a"},
               {"prompt": PROMPTS[1], "adapter": "b"}]
    code, rows = run_generate(tmp_path, "p.jsonl", [json.dumps(r) for r in rows_in], "--model", path,
                              "--adapter", f"a={two_adapters['a']}", "--adapter", f"b={two_adapters['b']}",
                              "--max-new-tokens", "6", "--batch-size", "3")
    assert code == 0
    ref = {n: peft_reference(path, two_adapters[n]) for n in ("a", "b")}
    expected = [hf_greedy(ref["b"], tok, chatml(PROMPTS[0]), 6),
                hf_greedy(ref["a"], tok, chatml(PROMPTS[1]), 6),  # no "adapter": the first (active) one
                hf_greedy(ref["a"], tok, chatml(PROMPTS[2]), 6),
                hf_greedy(ref["b"], tok, chatml(PROMPTS[1]), 6)]
    assert [r["completion"] for r in rows] == expected
    assert expected[1] != expected[3]  # the adapters differ, so the routing is observable
    assert expected[1] != hf_greedy(model, tok, chatml(PROMPTS[1]), 6)


def test_generate_adapter_dir_as_model_equals_peft_model(tiny, two_adapters, tmp_path):
    path, model, tok = tiny
    code, rows = run_generate(tmp_path, "p.txt", PROMPTS, "--model", str(two_adapters["b"]), "--max-new-tokens", "6")
    assert code == 0
    ref = peft_reference(path, two_adapters["b"])
    assert [r["completion"] for r in rows] == [hf_greedy(ref, tok, chatml(p), 6) for p in PROMPTS]


def test_generate_unknown_row_adapter_is_one_line_error(two_adapters, tmp_path, capsys):
    code, _ = run_generate(tmp_path, "p.jsonl", [json.dumps({"prompt": "x", "adapter": "nope"})], "--model", "tiny",
                           "--adapter", f"a={two_adapters['a']}", "--max-new-tokens", "2")
    err = capsys.readouterr().err
    assert code != 0 and "nope" in err


# ---------------------------------------------------------------- chat


def test_chat_multi_turn_equals_transformers_on_the_growing_history(tiny, monkeypatch, capsys):
    path, model, tok = tiny
    monkeypatch.setattr(sys, "stdin", io.StringIO("Copy: a b\n\nReverse: c d\n/exit\n"))
    code = cli.main(["chat", "--model", path, "--max-new-tokens", "5", "--system", "Be brief."])
    assert code == 0
    out = capsys.readouterr().out
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Copy: a b"}]
    first = hf_greedy(model, tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), 5)
    assert first == hf_greedy(model, tok, chatml("Copy: a b", system="Be brief."), 5)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Reverse: c d"}]
    second = hf_greedy(model, tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), 5)
    # input("> ") writes its prompt to stdout; each reply is printed on its own line after it
    replies = [re.sub(r"^(> )+", "", line) for line in out.split("\n")[:-1]]
    assert replies == [first, second], (out, first, second)
    assert second != hf_greedy(model, tok, chatml("Reverse: c d", system="Be brief."), 5)  # history matters


def test_chat_template_none_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code = cli.main(["chat", "--model", "tiny", "--template", "none"])
    assert code != 0 and "template" in capsys.readouterr().err


# ---------------------------------------------------------------- pipeline

from posttrain.pipeline import STATE_FILE, load_pipeline, plan  # noqa: E402

SFT_FAST = {"data.synthetic_size": 16, "data.synthetic_tasks": ["smallest"], "data.max_length": 64,
            "train.max_steps": 1, "train.batch_size": 4, "train.progress_bar": False}
RM_FAST = {"data.train_files": ["synthetic"], "data.synthetic_tasks": ["smallest"], "data.synthetic_size": 16,
           "data.max_length": 64, "train.max_steps": 1, "train.batch_size": 4}
DPO_FAST = {"data.synthetic_size": 16, "data.max_length": 64, "train.max_steps": 1, "train.batch_size": 4}


def four_stage(out: Path) -> dict:
    return {"output_dir": str(out), "stages": [
        {"name": "sft", "kind": "sft", "overrides": SFT_FAST},
        {"name": "rm", "kind": "rm", "overrides": RM_FAST},
        {"name": "pref", "kind": "dpo", "overrides": DPO_FAST},
        {"name": "rl", "kind": "grpo", "inputs": {"reward.models": ["judge=rm"]},
         "overrides": {"train.max_steps": 1}},
    ]}


def test_pipeline_wiring_policy_chain_and_reward_models(tmp_path):
    path = tmp_path / "p.yaml"
    out = tmp_path / "out"
    path.write_text(yaml.safe_dump(four_stage(out)))
    output_dir, stages = load_pipeline(path)
    assert output_dir == out
    by = {s.name: s for s in stages}
    assert by["rm"].cfg.model.path == str(out / "sft" / "final")      # the RM starts from the SFT model
    assert by["pref"].cfg.model.path == str(out / "sft" / "final")    # an rm stage is not a policy
    assert by["rl"].cfg.model.path == str(out / "pref" / "final")     # the latest policy
    assert by["rl"].cfg.reward.models == [f"judge={out / 'rm' / 'final'}"]
    assert sorted(by["rl"].deps) == ["pref", "rm"] and by["pref"].deps == ["sft"] and by["rm"].deps == ["sft"]
    assert [s.cfg.output_dir for s in stages] == [str(out / n) for n in ("sft", "rm", "pref", "rl")]


def fake_done(stages) -> dict:
    """A state file as if every stage had finished with these configs, and their outputs on disk."""
    state = {}
    for i, stage in enumerate(stages):
        (stage.run_dir / "final").mkdir(parents=True, exist_ok=True)
        (stage.run_dir / "final" / "model.safetensors").write_text("x")
        (stage.run_dir / "summary.json").write_text("{}")
        state[stage.name] = {"status": "done", "fingerprint": stage.fingerprint, "run_id": f"id{i}",
                             "config": stage.flat, "inputs": {d: f"id{[s.name for s in stages].index(d)}"
                                                               for d in stage.deps}}
    return state


def test_pipeline_rerun_plan_follows_the_real_wiring(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(four_stage(tmp_path / "out")))
    _, stages = load_pipeline(path)
    state = fake_done(stages)
    assert [a for a, _ in plan(stages, state)] == ["skip"] * 4
    # the reward model changed: it and the RL stage reading it rerun; sft and the dpo stage are left alone
    _, changed = load_pipeline(path, ["rm.train.lr=0.5"])
    assert [a for a, _ in plan(changed, state)] == ["skip", "fresh", "skip", "fresh"]
    # sft changed: everything reads it, directly or through another stage
    _, changed = load_pipeline(path, ["sft.train.lr=0.5"])
    assert [a for a, _ in plan(changed, state)] == ["fresh"] * 4
    # the dpo stage changed: the RL stage starts from it
    _, changed = load_pipeline(path, ["pref.dpo.beta=0.3"])
    assert [a for a, _ in plan(changed, state)] == ["skip", "skip", "fresh", "fresh"]
    # settings that change no result do not rerun anything
    _, same = load_pipeline(path, ["train.progress_bar=true"])
    assert [a for a, _ in plan(same, state)] == ["skip"] * 4


def test_pipeline_relative_paths_config_next_to_file_output_under_cwd(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "first.yaml").write_text(yaml.safe_dump({"model": {"path": "tiny"}, "train": {"lr": 0.0123}}))
    (conf / "p.yaml").write_text(yaml.safe_dump({"output_dir": "rel/out", "stages": [
        {"name": "s1", "kind": "sft", "config": "first.yaml"}, {"name": "s2", "kind": "dpo"}]}))
    monkeypatch.chdir(tmp_path)
    output_dir, stages = load_pipeline("conf/p.yaml")
    assert stages[0].cfg.train.lr == 0.0123                           # config: relative to the pipeline file
    assert Path(stages[0].cfg.output_dir).resolve() == (tmp_path / "rel" / "out" / "s1").resolve()  # cwd
    assert Path(stages[1].cfg.model.path).resolve() == (tmp_path / "rel" / "out" / "s1" / "final").resolve()
    assert stages[1].deps == ["s1"]


def test_pipeline_dependency_seen_through_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"output_dir": "out", "stages": [
        {"name": "sft", "kind": "sft", "overrides": SFT_FAST},
        {"name": "rm", "kind": "rm", "overrides": RM_FAST},
        {"name": "pref", "kind": "dpo", "overrides": {**DPO_FAST, "model.path": str(tmp_path / "out" / "rm" / "final")}}]}))
    _, stages = load_pipeline("p.yaml")
    assert "rm" in stages[2].deps
    state = fake_done(stages)
    _, changed = load_pipeline("p.yaml", ["rm.train.lr=0.5"])
    assert [a for a, _ in plan(changed, state)] == ["skip", "fresh", "fresh"]


def test_pipeline_file_overrides_read_like_yaml_config_values(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "output_dir: out\n"
        "overrides: {train.progress_bar: false}\n"
        "stages:\n"
        "  - name: s\n"
        "    kind: sft\n"
        "    overrides:\n"
        "      train: {lr: 1e-3, max_steps: 4}\n"      # 1e-3 is a string to a YAML 1.1 reader
        "      data.synthetic_tasks: [copy]\n")
    _, stages = load_pipeline(tmp_path / "p.yaml", ["s.train.max_steps=5", "train.warmup_steps=2"])
    cfg = stages[0].cfg
    assert cfg.train.lr == pytest.approx(0.001) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 5 and cfg.train.warmup_steps == 2 and cfg.data.synthetic_tasks == ["copy"]


@pytest.mark.parametrize("doc, words", [
    ({"output_dir": "o", "stages": [{"name": "a", "kind": "sft", "overide": {}}]}, ["'overide'", "overrides"]),
    ({"output_dir": "o", "stage": [{"name": "a", "kind": "sft"}]}, ["'stage'", "stages"]),
    ({"output_dir": "o", "stages": [{"name": "a", "kind": "stf"}]}, ["'stf'", "sft"]),
    ({"output_dir": "o", "stages": [{"name": "a", "kind": "sft", "overrides": {"train.lrr": 1}}]},
     ["train.lrr", "train.lr"]),
    ({"output_dir": "o", "stages": [{"name": "a", "kind": "sft"}, {"name": "b", "kind": "grpo",
                                                                    "inputs": {"reward.models": ["c"]}}]},
     ["'c'"]),
    ({"output_dir": "o", "stages": [{"name": "a", "kind": "sft"}, {"name": "b", "kind": "rm",
                                                                    "inputs": {"reward.models": ["a"]}}]},
     ["inputs", "reward.models"]),  # not a reward model's setting
])
def test_pipeline_unknown_keys_stop_with_exit_code_2_naming_them(tmp_path, capsys, doc, words):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    code = cli.main(["pipeline", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_pipeline_failing_stage_stops_later_stages_and_reruns_skip_the_finished(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"  # every row malformed: the stage fails when it reads them, not in the up-front
    bad.write_text('{"nothing": 1\n{"nothing": 2\n')  # file check (rows of an unknown format would be refused there)
    out = tmp_path / "out"
    doc = {"output_dir": str(out), "stages": [
        {"name": "sft", "kind": "sft", "overrides": SFT_FAST},
        {"name": "pref", "kind": "dpo", "overrides": {**DPO_FAST, "data.train_files": [str(bad)]}},
        {"name": "sft2", "kind": "sft", "overrides": SFT_FAST}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    code = cli.main(["pipeline", str(tmp_path / "p.yaml")])
    captured = capsys.readouterr()
    assert code != 0, captured
    assert (out / "sft" / "final").is_dir() and not (out / "pref" / "final").exists()
    assert not (out / "sft2").exists()                       # nothing after the failing stage ran
    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert state["sft"]["status"] == "done" and state["pref"]["status"] != "done" and "sft2" not in state
    stamp = (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    # fixed: the finished stage is skipped, the rest run, the last stage starts from the dpo stage
    code = cli.main(["pipeline", str(tmp_path / "p.yaml"), "pref.data.train_files=[synthetic]"])
    printed = capsys.readouterr().out
    assert code == 0 and "sft (sft): skipped" in printed
    assert (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "sft2" / "final").is_dir()
    assert yaml.safe_load((out / "sft2" / "config.yaml").read_text())["model"]["path"] == str(out / "pref" / "final")


def test_pipeline_stage_output_generates_like_transformers(tmp_path, capsys):
    """The end of a pipeline is a model `posttrain generate` and plain transformers agree on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"output_dir": str(out), "stages": [
        {"name": "sft", "kind": "sft", "overrides": {**SFT_FAST, "train.lr": 0.05}}]}))
    assert cli.main(["pipeline", str(tmp_path / "p.yaml")]) == 0
    capsys.readouterr()
    code, rows = run_generate(tmp_path, "p.txt", PROMPTS, "--model", str(out / "sft"), "--max-new-tokens", "6")
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out / "sft" / "final", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "sft" / "final")
    assert [r["completion"] for r in rows] == [hf_greedy(model, tok, chatml(p), 6) for p in PROMPTS]
