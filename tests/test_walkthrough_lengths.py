"""A lengths-and-truncation walk: rows near, at and past `data.max_length`, and inputs past a model's positions.

Walked: SFT (plain text, messages, multi-turn rows whose last assistant turn is cut, packing on and off, in memory
and streamed) with rows under, at and over `data.max_length`; preference data (a chosen side far longer than its
rejected one, a K-way ranking with one long response, a prompt that alone is longer than `max_length`) through
`rm` / `dpo`; GRPO prompts over `data.max_prompt_length`, and a prompt plus `rollout.max_new_tokens` past the
model's positions; `generate`, `score`, `serve`, `evaluate` and the local judge / red-team backend with inputs
past `max_position_embeddings`; quality's word-count filters beside its token checks. Two models: the tiny preset
(Llama-style, rotary positions, 1,024 of them) and a tiny GPT-2 built here (a learned table of 64 positions, so
a position past it is an index error, not a quiet extrapolation).

What was right: in-memory SFT keeps the first `max_length` tokens and counts every cut row in
`data_report.json`; a row whose labels all fall past the cut is dropped and counted, never trained as 0/0 (a
multi-turn row cut inside its last assistant turn keeps its earlier turns' labels); packing packs the fitted
rows; preference records cut each over-long side at its end, drop and count a record with a side left without
response tokens (a prompt longer than `max_length`) and one whose sides the cut made identical; GRPO drops and
never cuts an over-long prompt; quality counts words (CJK one a character) for its filters and tokens for its
token checks, and says which; `serve` and the local backend (judges, red team) refuse a prompt past the model's
context with a one-line reason and cap the tokens they generate at what the context leaves.

What was wrong: nothing but `serve` and that backend compares a length with the model's position table. A
training stage with `data.max_length` past it, `generate` with a long prompt or a large `--max-new-tokens`, GRPO
with a prompt plus `rollout.max_new_tokens` past it, `evaluate`, and `score` with a decoder reward model all end
in an `IndexError` traceback on a learned-position model (exit 1, "a bug in posttrain") and run on silently past
the positions a rotary model was trained for. `score` cuts a decoder's rows at 1,024 tokens from the left without
a word; a streamed SFT run that stops before a full pass reports none of the rows it cut or dropped.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 31: each
asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain import cli

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = 64  # the GPT-2's learned position table
WORDS = "red green blue gold pink grey teal navy".split()


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # examples/... and posttrain.rewards are named from the repository root


def _words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(capsys, *argv) -> tuple[int | None, str, BaseException | None]:
    """posttrain ARGV in this process: (exit code, stderr + stdout, the exception that escaped or None)."""
    try:
        rc, exc = cli.main([str(a) for a in argv]), None
    except SystemExit as e:
        rc, exc = e.code, None
    except Exception as e:  # noqa: BLE001 (a traceback the user would see: the measured defect)
        rc, exc = None, e
    captured = capsys.readouterr()
    return rc, captured.err + captured.out, exc


def _escaped(rc, exc) -> str:
    return f"rc={rc}, escaped {type(exc).__name__}: {exc}" if exc is not None else f"rc={rc}"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, tokenizer) -> Path:
    """A GPT-2 causal LM with 64 learned positions and the preset's tokenizer (ChatML template, pad)."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS,
                        bos_token_id=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _reward_model(out: Path, tokenizer, config) -> Path:
    """A sequence-classification model saved with its head (so `score` takes it as trained)."""
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _length(tokenizer, messages: list[dict], generation_prompt: bool = False) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- training stages vs the position table


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_training_with_max_length_past_the_models_positions_fails_with_a_one_line_error(
        stage, gpt2, tokenizer, tmp_path, capsys):
    """README: exit 2 is 'a problem with the config, the data or the environment, said in one line', 1 is a bug.
    data.max_length=128 on a model of 64 positions, rows of ~100 tokens: the run must refuse the setting up
    front (exit 2, naming it), or cut the rows at the position table and say so, as `rm` does for an encoder."""
    long_ = _words(45)
    if stage == "sft":
        rows = [{"messages": [{"role": "user", "content": f"Copy {i}: {long_}"},
                              {"role": "assistant", "content": long_}]} for i in range(4)]
    else:
        rows = [{"prompt": f"Copy {i}: {_words(10, i)}", "chosen": long_, "rejected": _words(3, i)} for i in range(4)]
    data = _jsonl(tmp_path / "rows.jsonl", rows)
    longest = _length(tokenizer, [{"role": "user", "content": f"Copy 0: {long_}"},
                                  {"role": "assistant", "content": long_}])
    assert longest > 128  # every row is past the table and past max_length
    rc, out, exc = _cli(capsys, stage, f"output_dir={tmp_path / 'run'}", f"model.path={gpt2}",
                        f"data.train_files=[{data}]", "data.eval_fraction=0", "data.max_length=128",
                        "train.max_steps=1", "train.batch_size=2", "train.progress_bar=false")
    assert exc is None and rc in (0, 2), f"{stage} with data.max_length=128 on {POSITIONS} positions: {_escaped(rc, exc)}"
    if rc == 2:
        assert "max_length" in out and str(POSITIONS) in out, out[-400:]
    else:
        report = json.loads((tmp_path / "run" / "data_report.json").read_text())
        assert report["train_length"]["max_length"] <= POSITIONS, report["train_length"]


# --------------------------------------------------------------------------- generation past the positions


@pytest.mark.parametrize("case", ["prompt past the positions", "prompt + max-new-tokens past the positions"])
def test_generate_past_the_models_positions_is_refused_or_capped(case, gpt2, tokenizer, tmp_path, capsys):
    """`serve` answers a prompt past the context with 400 context_length_exceeded and caps max_tokens at what
    the context leaves (tests below); `generate` on the same model must not crash: exit 2 in one line, or
    completions that stop at the context."""
    prompt = f"Copy: {_words(40)}" if case.startswith("prompt past") else "Copy: red"
    prompt_tokens = _length(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    assert (prompt_tokens > POSITIONS) == case.startswith("prompt past")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt + "\n")
    out_file = tmp_path / "out.jsonl"
    rc, out, exc = _cli(capsys, "generate", "--model", gpt2, "--prompts", prompts, "--output", out_file,
                        "--max-new-tokens", 100, "--temperature", 0)
    assert exc is None and rc in (0, 2), f"{case} ({prompt_tokens} prompt tokens, 100 new, {POSITIONS} " \
                                         f"positions): {_escaped(rc, exc)}"
    if rc == 0:
        completion = json.loads(out_file.read_text().splitlines()[0])["completion"]
        assert prompt_tokens + len(tokenizer(completion)["input_ids"]) <= POSITIONS + 8  # re-encoded text: slack


def test_grpo_prompt_plus_new_tokens_past_the_positions_is_refused_before_training(gpt2, tmp_path, capsys):
    """32 prompt tokens + 64 new ones on a model of 64 positions: config validated up front (exit 2, naming
    both settings), not a traceback after the model has loaded and sampling has begun."""
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Smallest letter: {c} q z", "answer": c}
                                                 for c in "abcdefgh"])
    rc, out, exc = _cli(capsys, "grpo", "examples/grpo.yaml", f"output_dir={tmp_path / 'run'}", f"model.path={gpt2}",
                        f"data.train_files=[{prompts}]", "data.eval_fraction=0", "data.max_prompt_length=32",
                        "rollout.max_new_tokens=64", "rollout.num_generations=2", "train.max_steps=1",
                        "train.batch_size=4", "eval.prompts=0", "train.progress_bar=false")
    assert exc is None and rc == 2, f"max_prompt_length 32 + max_new_tokens 64 on {POSITIONS} positions: " \
                                    f"{_escaped(rc, exc)}"
    assert "max_new_tokens" in out, out[-400:]


def test_evaluate_past_the_models_positions_ends_without_a_traceback(gpt2, tokenizer, tmp_path, capsys):
    """A 40-token prompt (under prompts.max_prompt_length=256) and generation.max_new_tokens=64 on 64 positions:
    refused in one line (exit 2) or answered within the context (exit 0)."""
    prompt = f"Smallest letter: {_words(12)}"
    assert 30 < _length(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True) < POSITIONS
    prompts = _jsonl(tmp_path / "eval.jsonl", [{"prompt": prompt, "answer": "blue"}])
    rc, out, exc = _cli(capsys, "evaluate", f"output_dir={tmp_path / 'ev'}", f"policy={gpt2}",
                        f"prompts.files=[{prompts}]", "generation.samples=0", "generation.max_new_tokens=64")
    assert exc is None and rc in (0, 2), f"evaluate: {_escaped(rc, exc)}"


# --------------------------------------------------------------------------- score


def test_score_with_a_decoder_reward_model_respects_its_position_table(gpt2, tokenizer, tmp_path, capsys):
    from transformers import GPT2Config

    config = GPT2Config.from_pretrained(gpt2, num_labels=1)
    rm = _reward_model(tmp_path / "rm", tokenizer, config)
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": f"Copy: {_words(40)}", "response": _words(40)},
                                            {"prompt": "Copy: red", "response": "red"}])
    rc, out, exc = _cli(capsys, "score", "--model", rm, "--input", rows, "--output", tmp_path / "scored.jsonl")
    assert exc is None and rc in (0, 2), f"score, a 90-token row, {POSITIONS} positions: {_escaped(rc, exc)}"


def test_score_says_how_many_rows_it_cut(tokenizer, tmp_path, capsys):
    """Two rows past the tiny preset's 1024 positions that differ only in their first words: `score` keeps the
    end (the scored token is the last), so both read the same tokens and get the same reward. Every row that
    loses content is to be counted: the command must say it cut 2 rows (stderr), as training reports its cuts."""
    from transformers import AutoConfig

    from posttrain.models.presets import preset_path

    config = AutoConfig.from_pretrained(preset_path("tiny"), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    rm = _reward_model(tmp_path / "rm", tokenizer, config)
    body = _words(700)
    rows = [{"prompt": f"Copy: {start} {body}", "response": "red"} for start in ("teal", "navy gold")]
    assert all(_length(tokenizer, [{"role": "user", "content": r["prompt"]},
                                   {"role": "assistant", "content": "red"}]) > 1024 for r in rows)
    scored = tmp_path / "scored.jsonl"
    rc, out, exc = _cli(capsys, "score", "--model", rm, "--input", _jsonl(tmp_path / "rows.jsonl", rows),
                        "--output", scored)
    assert exc is None and rc == 0, _escaped(rc, exc)
    rewards = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    said = [line for line in out.splitlines()
            if not line.startswith("[transformers]") and any(w in line.lower() for w in ("cut", "truncat"))]
    assert any("2" in line for line in said), (
        f"rewards {rewards} (the rows differ only before the cut); nothing on stderr says rows were cut: "
        f"{out.strip().splitlines()}")


# --------------------------------------------------------------------------- streamed SFT


def test_streamed_sft_that_stops_before_a_full_pass_reports_the_rows_it_dropped(tmp_path, capsys):
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    rows = [{"messages": [{"role": "user", "content": f"Copy {i}: " + (_words(60) if i % 2 else "red")},
                          {"role": "assistant", "content": "red"}]} for i in range(40)]
    data = _jsonl(tmp_path / "s.jsonl", rows)
    run = run_sft(SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
        "data": {"train_files": [str(data)], "streaming": True, "overlength": "drop", "max_length": 40},
        "train": {"max_steps": 2, "batch_size": 4, "progress_bar": False}}))
    log = capsys.readouterr()
    report = (run / "data_report.json").read_text()
    said = [line for line in (log.out + log.err).splitlines() if "longer than 40" in line]
    assert '"too_long"' in report or said, (
        f"2 steps x 4 rows trained from the first ~16 rows, half of them over 40 tokens and dropped; "
        f"data_report.json: {report}; log lines about them: {said}")


# --------------------------------------------------------------------------- right, and untested


def test_serve_refuses_a_prompt_past_the_context_and_caps_max_tokens_at_what_is_left(gpt2, tokenizer):
    """The serving engine compares every prompt with the model's positions: past them a 400
    context_length_exceeded; prompt + an explicit max_tokens past them, the same; no max_tokens, the room left."""
    from posttrain.inference import load_for_inference
    from posttrain.serve import Limits
    from posttrain.serve.engine import AS_LOADED, Engine
    from posttrain.serve.protocol import APIError, Request

    model, tok = load_for_inference(str(gpt2))
    engine = Engine(model, tok, {"m": AS_LOADED}, tok.chat_template, Limits(max_prompt_tokens=2048, max_tokens=512))
    try:
        long_, short = [{"role": "user", "content": f"Copy: {_words(40)}"}], [{"role": "user", "content": "Copy: red"}]
        with pytest.raises(APIError) as refused:
            engine.submit(Request(kind="chat", model="m", messages=long_, max_tokens=1))
        assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
        with pytest.raises(APIError) as refused:
            engine.submit(Request(kind="chat", model="m", messages=short, max_tokens=100))
        assert refused.value.code == "context_length_exceeded" and str(POSITIONS) in refused.value.message
        job = engine.submit(Request(kind="chat", model="m", messages=short, temperature=0.0))
        prompt_tokens = _length(tokenizer, short, generation_prompt=True)
        assert job.prompt_tokens == prompt_tokens and job.choices[0].max_tokens == POSITIONS - prompt_tokens
    finally:
        engine.close()


def test_local_backend_refuses_a_prompt_past_the_context_and_stays_inside_it(gpt2, tokenizer):
    """Judges and the red team's targets go through `LocalModel`: a prompt at the context is a BackendError
    (counted as a failure), and a shorter one generates no further than the context, whatever max_tokens says."""
    from posttrain.feedback.client import BackendError, LocalModel

    backend = LocalModel.load(str(gpt2), max_tokens=500, temperature=0.0)
    with pytest.raises(BackendError, match=f"context is {POSITIONS}"):
        backend.chat([{"role": "user", "content": f"Copy: {_words(60)}"}])
    messages = [{"role": "user", "content": f"Copy: {_words(20)}"}]
    reply = backend.chat(messages)
    assert reply.prompt_tokens == _length(tokenizer, messages, generation_prompt=True)
    assert reply.prompt_tokens + reply.completion_tokens <= POSITIONS
    assert backend.usage.failures == 1


def test_sft_keeps_earlier_turns_when_the_last_assistant_turn_is_cut_packed_or_not(tokenizer, tmp_path):
    """A multi-turn row cut inside its last assistant turn keeps the first turn's labels and the part of the
    last one before the cut; packed or not, the same rows are kept, the same cut is counted, and no packed row
    is longer than max_length."""
    from posttrain.config import SFTConfig
    from posttrain.data.batching import pack
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.data.records import IGNORE_INDEX

    turns = [{"role": "user", "content": "Copy: red"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": f"Copy: {_words(12)}"}, {"role": "assistant", "content": _words(30)}]
    first = _length(tokenizer, turns[:2])
    second_starts = _length(tokenizer, turns[:3], generation_prompt=True)
    max_length = second_starts + 5  # five tokens of the last answer survive
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": turns}, {"messages": turns[:2]}])
    reports = []
    for packing in (False, True):
        cfg = SFTConfig.from_dict({"data": {"train_files": [str(data)], "eval_fraction": 0, "max_length": max_length,
                                            "packing": packing}})
        prepared = prepare_sft_data(cfg.data, tokenizer, tmp_path / f"run-{packing}", seed=0, log=lambda _: None)
        cut = next(e for e in prepared.train if len(e) == max_length)
        labelled = [i for i, x in enumerate(cut.labels) if x != IGNORE_INDEX]
        assert labelled[0] < first <= second_starts < labelled[-1] == max_length - 1
        assert sum(i >= second_starts for i in labelled) == 5
        if packing:
            assert all(len(row) <= max_length for row in pack(prepared.train, max_length))
        reports.append(prepared.report["train_length"])
    assert reports[0] == reports[1] and reports[0]["num_too_long"] == 1 and reports[0]["num_lost_labels"] == 0
