"""A docs-truth walk: the statements of fact a user relies on in the README's prose and in `--help`,
checked against what the code does.

Walked: the README's prose (not the generated config reference) for stated defaults ("default
on", "(default 10)", "`--seed` defaults to 0", "the default `--host 127.0.0.1`", `safety.limit`
(10), PAIR's `rounds` (3) / `streams` (1) / `keep_last` (4), `distill_top_k` (32), the quality
pass's 13-word n-grams, 10 shared prompts, Jaccard 0.8 of word 5-grams, 1-8 line loops written 10+
times, runs of 40 characters, rule lines up to 120; `BLOCK_MIN_TOKENS` 64, generate's runs of 8
batches, progress lines every 5 s and every 10 s, 64 MiB / 64 blocks of a data file's digest, the
tiny presets' 0.92M parameters), units ("nats per token", "nats per response", percent), the
files and keys a run writes (1-step SFT, DPO, KTO and `sft` by epochs: metrics.jsonl's and
summary.json's keys, `reference_logps.safetensors`, evaluate's report.json `kl_se` /
`kl_responses` / `{n, successes, rate, ci95}`, redteam's `probe_sample`), the exit codes (the
README paragraph against `posttrain --help`'s epilogue, 141 on a closed pipe), every command line
and flag the README shows (`posttrain <cmd> --help` for each), every module, function and path
the README and the Architecture tree name, the TRL names and values answered with posttrain's,
and the examples' one-line descriptions (ShareGPT rows, margins, 4-way rankings, IPO with LoRA).

Right, and nearly all tested already: every default, limit and unit above; the key names of
metrics.jsonl, summary.json and report.json; the exit codes; every flag; every module and path.

Wrong: a fresh start (`train.resume=never`) writes its own `config.yaml` when the run starts but
removes the earlier run's checkpoints, `final/`, `summary.json` and `metrics.jsonl` only at its
first step, so a fresh run stopped by a check made once the model loads (a `data.max_length` past
the model's positions, exit 2) leaves the earlier run's model and summary beside a config of
another run; and the fresh start never removes the earlier run's `rejects-train.jsonl`, so a run
under `data.bad_rows: error` with no bad row keeps a rejects file of rows it never read (`posttrain
quality` had the same fault and removes its own).

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 35: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import posttrain as P

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PROSE = README[: README.index("## Config reference (SFT)")]  # the generated tables left out
PAIRS = [(f"Copy: {a} {b}", f"{a} {b}") for a, b in zip("abcdefghij", "qrstuvwxyz")]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _alpaca(path: Path, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"instruction": u, "output": a}) + "\n" for u, a in PAIRS) + extra,
                    encoding="utf-8")
    return path


def _cfg(out: Path, data_file: Path, **data) -> P.SFTConfig:
    return P.SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny-2l"},
        "data": {"train_files": [str(data_file)], "format": "alpaca", "eval_fraction": 0.0, "max_length": 64, **data},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "progress_bar": False}})


def _help(capsys, *argv) -> str:
    from posttrain import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# --------------------------------------------------------------------------- failures


def test_a_fresh_run_stopped_before_its_first_step_leaves_no_earlier_result_beside_its_config(tmp_path):
    """README, The training loop: "A fresh start removes the earlier run's checkpoints, `final/`,
    `summary.json` and `metrics.jsonl` before its first step (one line says which), so a fresh run that
    stops leaves no earlier result beside its own `config.yaml`." A finished 1-step run, then a fresh
    start into its directory with `data.max_length=5000`, past the 1024 positions of the model: refused
    once the model loads (exit 2, as the README says), after `start_run` has written the new config.yaml
    and before the loop's `_clear_earlier_run`. The directory then holds a config of max_length 5000
    beside the earlier run's final/, summary.json ("finished: 1 step") and checkpoints, trained at 64."""
    from posttrain.errors import UserError

    data, run = _alpaca(tmp_path / "rows.jsonl"), tmp_path / "run"
    P.run_sft(_cfg(run, data))
    again = _cfg(run, data, max_length=5000)
    again.train.resume = "never"
    with pytest.raises(UserError, match="max_length"):
        P.run_sft(again)
    recorded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["data"]["max_length"]
    left = sorted(name for name in ("final", "summary.json", "metrics.jsonl", "checkpoints")
                  if (run / name).exists() and not ((run / name).is_dir() and not any((run / name).iterdir())))
    assert recorded == 64 or not left, (
        f"config.yaml records data.max_length={recorded} (the stopped fresh run's), beside the earlier "
        f"run's {left} (trained at max_length 64)")


def test_a_fresh_run_without_bad_rows_keeps_no_earlier_runs_rejects_file(tmp_path):
    """README, Data: "`skip` ... writes every rejected row to `run_dir/rejects-train.jsonl`", and The
    training loop: a fresh start leaves "no earlier result beside its own `config.yaml`". A run under
    `bad_rows: skip` with one malformed row writes it there; a fresh run into the same directory
    (`train.resume=never`) on a clean file under the default `bad_rows: error` finishes, its
    data_report.json saying 0 bad rows and no rejects file, yet the earlier rejects-train.jsonl, a row
    of a file this run never read, stays in its directory. (`posttrain quality` removes its own stale
    rejects.jsonl: tests/test_quality_edges.py::test_bad_rows_error_leaves_no_stale_rejects.)"""
    run = tmp_path / "run"
    dirty = _alpaca(tmp_path / "dirty.jsonl", extra='{"instruction": "cut short"\n')
    P.run_sft(_cfg(run, dirty, bad_rows="skip", max_bad_fraction=0.5))
    assert (run / "rejects-train.jsonl").read_text(encoding="utf-8").count("\n") == 1
    again = _cfg(run, _alpaca(tmp_path / "clean.jsonl"))
    again.train.resume = "never"
    P.run_sft(again)
    report = json.loads((run / "data_report.json").read_text(encoding="utf-8"))["train_read"]
    assert (report["bad_rows"], report["rejects_path"]) == (0, None)
    rejects = run / "rejects-train.jsonl"
    stale = rejects.read_text(encoding="utf-8") if rejects.exists() else ""
    assert stale == "", f"rejects-train.jsonl of the earlier run left in the fresh run's directory: {stale!r}"


# --------------------------------------------------------------------------- right, untested


# (command, flag) for every flag the README's prose names with its command outside the code blocks
# (`posttrain score`'s are left to the scoring walk: its flags are being changed).
PROSE_FLAGS = [
    ("merge", "--dtype"), ("generate", "--max-new-tokens"), ("generate", "--stop"), ("generate", "--template"),
    ("generate", "--seed"), ("generate", "--adapter"), ("generate", "--mix"), ("generate", "--batch-size"),
    ("chat", "--system"), ("serve", "--model"), ("serve", "--adapter"), ("serve", "--template"),
    ("serve", "--host"), ("serve", "--port"), ("serve", "--api-key-env"), ("serve", "--allowed-host"),
    ("pipeline", "--only"), ("pipeline", "--from"), ("pipeline", "--restart"), ("pipeline", "--dry-run"),
    ("demo", "--output-dir"),
]


def test_every_flag_the_readme_prose_names_is_in_its_commands_help(capsys):
    """Each `--flag` the README's prose attributes to a command (`--mix a=0.7`, `--template none`,
    `--allowed-host NAME`, `--from NAME`, `--output-dir DIR`, ...) is named in the README and
    listed by `posttrain <command> --help`."""
    for command, flag in PROSE_FLAGS:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", PROSE), (command, flag)
        shown = _help(capsys, command)
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown), f"posttrain {command} --help lacks {flag}"


def test_the_readme_names_only_functions_and_modules_that_exist():
    """The README's prose sends the reader to code by name (`data/synthetic.py:is_held_out`,
    `pipeline.trained_prompt_keys`, `data/formats.py:read_turn`, `sampling.request_seed`,
    `posttrain.inference.load_for_inference`, `train/forgetting.attach`, `apply_adapters`,
    `Producer.resumable`, `rollout/generate.py`'s `eos_token_ids` / `stop_strings` /
    `stop_token_ids`, `BLOCK_MIN_TOKENS`); each is there, and so is each number the README gives
    for a module constant."""
    import importlib

    named = [("posttrain.data.synthetic", "is_held_out"), ("posttrain.data.pipeline", "trained_prompt_keys"),
             ("posttrain.data.formats", "read_turn"), ("posttrain.data.quality.rows", "message_text"),
             ("posttrain.rollout.sampling", "request_seed"), ("posttrain.inference", "load_for_inference"),
             ("posttrain.rollout.generate", "eos_token_ids"), ("posttrain.rollout.generate", "stop_strings"),
             ("posttrain.rollout.generate", "stop_token_ids"), ("posttrain.train.forgetting", "attach"),
             ("posttrain.models.adapters", "apply_adapters"), ("posttrain.pipeline", "Producer")]
    for module, name in named:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
    from posttrain.inference import PROGRESS_EVERY, WINDOW_BATCHES
    from posttrain.models.attention import BLOCK_MIN_TOKENS
    from posttrain.pipeline import Producer
    from posttrain.rollout.sampling import SAMPLE_BLOCK

    assert hasattr(Producer, "resumable")
    assert "(`BLOCK_MIN_TOKENS`)" in PROSE and "average under 64 tokens" in PROSE and BLOCK_MIN_TOKENS == 64
    assert "within runs of 8 batches" in PROSE and WINDOW_BATCHES == 8
    assert "`N/M rows` on stderr\nevery 5 seconds" in PROSE and PROGRESS_EVERY == 5.0
    assert "(blocks of 256 tokens" in PROSE and SAMPLE_BLOCK == 256
