"""Reruns (stop 34): a training run's output_dir over a model it reads, the run directory's lock,
quality's own outputs as its inputs and its sweep of them, and sft's held-out split by prompt."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import posttrain as P
from posttrain.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress_bar": False}


def _quiet(*_args, **_kwargs):
    pass


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------- output_dir over a model it reads


def _run_dir(at: Path) -> Path:
    """A run directory as a finished run leaves it: its model in final/."""
    (at / "final").mkdir(parents=True)
    (at / "final" / "config.json").write_text("{}")
    return at


def _cfg(path="tiny", models=(), value_model_path=""):
    return SimpleNamespace(model=SimpleNamespace(path=str(path)), reward=SimpleNamespace(models=list(models)),
                           ppo=SimpleNamespace(value_model_path=str(value_model_path)))


@pytest.mark.parametrize("out, said", [(".", "holds model.path"), ("final", "is the directory of model.path"),
                                       ("..", "holds model.path")])
def test_an_output_dir_that_is_or_holds_the_starting_model_is_refused(tmp_path, out, said):
    from posttrain.train.runs import _check_not_over_its_models

    run = _run_dir(tmp_path / "runs" / "sft")
    with pytest.raises(ConfigError, match=f"{said} .*write over the model it reads; give another output_dir"):
        _check_not_over_its_models(_cfg(run), (run / out))


@pytest.mark.parametrize("out", ["../dpo", "dpo", "final/runs/lora"])
def test_an_output_dir_beside_or_inside_the_starting_model_is_taken(tmp_path, out):
    """A sibling run (a pipeline's layout), a run nested in the starting run's directory, and one
    inside the model directory itself (test_walkthrough_paths: it resumes) write nothing over the
    model's own files."""
    from posttrain.train.runs import _check_not_over_its_models

    run = _run_dir(tmp_path / "runs" / "sft")
    _check_not_over_its_models(_cfg(run), run / out)
    _check_not_over_its_models(_cfg("tiny"), run)  # a preset lives in posttrain's cache
    _check_not_over_its_models(_cfg(tmp_path / "not-there"), tmp_path / "not-there")  # the loader's to refuse


def test_an_output_dir_over_a_reward_model_or_the_critics_start_is_refused(tmp_path):
    from posttrain.train.runs import _check_not_over_its_models

    rm, critic = _run_dir(tmp_path / "rm"), _run_dir(tmp_path / "critic")
    with pytest.raises(ConfigError, match=r"holds reward.models .*rm"):
        _check_not_over_its_models(_cfg(models=[f"helpful={rm}"]), rm)
    with pytest.raises(ConfigError, match=r"is the directory of ppo.value_model_path"):
        _check_not_over_its_models(_cfg(value_model_path=critic / "final"), critic / "final")


def test_an_sft_run_into_its_own_starting_run_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = _run_dir(tmp_path / "sft")
    (run / "config.yaml").write_text("the earlier run's\n")
    cfg = P.SFTConfig.from_dict({"output_dir": str(run), "model": {"path": str(run)},
                                 "data": {"train_files": ["synthetic"], "synthetic_size": 8, "max_length": 32},
                                 "train": {"max_steps": 1, "resume": "never", **QUIET}})
    with pytest.raises(ConfigError, match="holds model.path"):
        P.run_sft(cfg)
    assert (run / "config.yaml").read_text() == "the earlier run's\n" and not (run / ".lock").exists()


# --------------------------------------------------------------------------- the run directory's lock


def _held(run: Path) -> bool:
    from posttrain.train import runs

    return run.resolve() in runs._HELD


def test_the_run_directory_lock_refuses_another_thread_and_is_taken_again_by_its_own(tmp_path):
    from posttrain.train.runs import _lock_run_dir, release_run_dir

    run = tmp_path / "run"
    run.mkdir()
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        _lock_run_dir(run)
        taken.set()
        release.wait(30)
        release_run_dir(run)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(30)
        with pytest.raises(UserError, match=f"{run} is being written by another training run; wait for it"):
            _lock_run_dir(run)
    finally:
        release.set()
        thread.join(30)
    _lock_run_dir(run)  # released: taken
    _lock_run_dir(run)  # this thread's earlier run left it (failed before finish_run): taken again
    assert _held(run)
    release_run_dir(run)
    release_run_dir(run)  # twice: nothing held, nothing to do
    assert not _held(run)


def test_a_lock_left_by_a_finished_thread_is_taken(tmp_path):
    from posttrain.train.runs import _lock_run_dir, release_run_dir

    run = tmp_path / "run"
    run.mkdir()
    thread = threading.Thread(target=_lock_run_dir, args=(run,))  # ends holding it, as a failed run would
    thread.start()
    thread.join(30)
    _lock_run_dir(run)
    release_run_dir(run)


def _sft(out: Path, **train) -> P.SFTConfig:
    return P.SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_size": 16, "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 4, **QUIET, **train}})


def test_a_run_releases_its_lock_when_it_finishes_fails_or_is_refused(tmp_path, monkeypatch):
    """Every way out of a run releases run_dir/.lock: finished (finish_run), failed inside the loop
    (train), refused after the lock was taken (start_run: a bad train.resume); another thread can
    then take it."""
    import posttrain.train.loop as loop
    from posttrain.train.runs import _lock_run_dir, release_run_dir

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    P.run_sft(_sft(run))
    assert (run / ".lock").is_file() and not _held(run)

    def broken(*args, **kwargs):
        raise RuntimeError("a step failed")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_train_step", broken)
        with pytest.raises(RuntimeError, match="a step failed"):
            P.run_sft(_sft(run, resume="never"))
    assert not _held(run)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        P.run_sft(_sft(run, resume=str(tmp_path / "nowhere")))
    assert not _held(run)
    errors = []

    def other() -> None:
        try:
            _lock_run_dir(run)
            release_run_dir(run)
        except UserError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert not errors


# --------------------------------------------------------------------------- posttrain quality run again


ROWS = [{"instruction": f"Copy: {a} {b}", "output": f"{a} {b}"} for a, b in zip("abcdef", "qrstuv")]
PAIRS = [{"prompt": f"Pick {a}", "chosen": f"{a}", "rejected": f"{b}"} for a, b in zip("ghijkl", "wxyzmn")]


def _quality(out: Path, files: list[Path], **sections) -> Path:
    return P.run_quality(P.QualityConfig.from_dict({"output_dir": str(out), "data": {"files": [str(f) for f in files]},
                                                    **sections}), log=_quiet)


def test_quality_refuses_any_of_its_outputs_as_input_and_leaves_the_directory_whole(tmp_path):
    out = tmp_path / "q"
    _quality(out, [_jsonl(tmp_path / "rows.jsonl", ROWS), _jsonl(tmp_path / "pairs.jsonl", PAIRS)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"kept-alpaca.jsonl", "kept-pairs.jsonl"} <= before.keys()
    with pytest.raises(ConfigError, match=r"data.files: .*kept-pairs.jsonl is one of the outputs in output_dir"):
        _quality(out, [out / "kept-pairs.jsonl"])
    with pytest.raises(ConfigError, match="decontaminate.files: .*kept-alpaca.jsonl is one of the outputs"):
        _quality(out, [tmp_path / "rows.jsonl"], decontaminate={"files": [str(out / "kept-alpaca.jsonl")]})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_quality_reads_a_kept_copy_beside_its_outputs_and_removes_only_its_own(tmp_path):
    """A second pass over a copy of the first pass's rows in the same directory (kept-v1.jsonl): read,
    and kept; the first pass's kept-FORMAT.jsonl files, which this pass does not write, removed."""
    out = tmp_path / "q"
    _quality(out, [_jsonl(tmp_path / "rows.jsonl", ROWS), _jsonl(tmp_path / "pairs.jsonl", PAIRS)])
    copy = out / "kept-v1.jsonl"
    copy.write_bytes((out / "kept-alpaca.jsonl").read_bytes())
    _quality(out, [copy])
    assert copy.read_bytes() == (out / "kept.jsonl").read_bytes()
    assert not (out / "kept-alpaca.jsonl").exists() and not (out / "kept-pairs.jsonl").exists()


# --------------------------------------------------------------------------- sft's held-out split by prompt


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


def _data_cfg(**kw):
    from posttrain.config.sections import DataConfig

    return DataConfig(**{"train_files": [], "eval_fraction": 0.0, "max_length": 64} | kw)


def test_sfts_held_out_split_keeps_each_prompt_on_one_side(tok, tmp_path):
    """12 prompts asked 3 times each (other answers), 20% held out: before, a keyless split left
    prompts on both sides for every seed tried; now no held-out prompt is trained on."""
    from posttrain.data import formats
    from posttrain.data.pipeline import prepare_sft_data, split_eval

    rows = [{"instruction": f"Question {q}?", "output": f"answer {k}"} for q in range(12) for k in range(3)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    records, _ = formats.load_records([str(path)], log=_quiet)
    prompt_of = {r.source: r.messages[0]["content"] for r in records}
    for seed in range(5):
        train, held = split_eval(records, 0.2, seed)  # the split as it was
        assert {prompt_of[r.source] for r in train} & {prompt_of[r.source] for r in held}
        data = prepare_sft_data(_data_cfg(train_files=[str(path)], eval_fraction=0.2), tok, None, seed, _quiet)
        held_prompts = {prompt_of[r.source] for r in data.eval_records}
        trained = {prompt_of[e.source] for e in data.train}
        assert held_prompts and not held_prompts & trained
        assert data.report["eval_read"]["prompts"] == len(held_prompts)
        assert len(data.train) + len(data.eval) == len(rows)


def test_sft_rows_sharing_one_prompt_hold_nothing_out_and_say_so(tok, tmp_path):
    from posttrain.data.pipeline import prepare_sft_data

    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": f"hi {k}"} for k in range(5)])
    said = []
    data = prepare_sft_data(_data_cfg(train_files=[str(path)], eval_fraction=0.2), tok, None, 0, said.append)
    assert not data.eval and len(data.train) == 5
    assert any("all 5 training rows share one prompt, so none is held out" in line for line in said)


def test_the_prompt_key_is_the_turns_before_the_last_answer_and_the_tools():
    from posttrain.data.pipeline import retain_prompt_key
    from posttrain.data.records import Record
    from posttrain.eval.exact_match import last_answer

    def rec(messages, tools=None, text=None):
        return Record(messages=messages, text=text, source="x", tools=tools)

    ask = [{"role": "user", "content": "2+2?"}]
    a, b = rec(ask + [{"role": "assistant", "content": "4"}]), rec(ask + [{"role": "assistant", "content": "four"}])
    assert last_answer(a) == 1 and last_answer(rec(ask)) is None and last_answer(rec(None, text="t")) is None
    assert retain_prompt_key(a) == retain_prompt_key(b)
    assert retain_prompt_key(a) != retain_prompt_key(rec(a.messages, tools=[{"name": "calc"}]))
    assert retain_prompt_key(rec(None, text="t")) != retain_prompt_key(rec(None, text="u"))
