"""A scoring walk: `posttrain score` as a user with a reward model just trained by `posttrain rm` uses it.

Walked: a tiny-2l reward model trained one step by `run_rm` on the alpaca template (not the tokenizer's
own ChatML), scored with `posttrain score` on its own held-out pairs given as plain-text prompts, as chat
turns and with a system turn; JSONL, CSV, TSV, JSON-array and Parquet input; several reward models and
functions with --weight / --floor (totals checked by hand); --max-length and rows past the position table;
a LoRA reward model beside its merge; --output to a file, to stdout (`-`) and over its input; bad rows; an
end-of-turn marker the response already carries; --batch-size 1 against 16 and two runs of one command.

What was right: the scorer renders a row exactly as `posttrain rm` trained on it (the template the run
saved, the same ids from a text prompt and from its turns), so the rewards `score` writes reproduce the
held-out accuracy, margin and mean reward the run logged; a row scores alike in any batch and two runs write
the same bytes; other columns are kept in order; bad rows stop with file:line; stdout stays JSON Lines.

Not pinned here (other work in progress this round): messages-format rows, a row's `system` key, empty
responses, tools in score rows and `--template` choices.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 35:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [{"prompt": f"Smallest letter: {a} {b} {c}", "chosen": min(a, b, c), "rejected": max(a, b, c)}
         for a, b, c in ["qmt", "kdz", "pxe", "rwa", "bny", "hgu", "osl", "vcj"]]
HELD_OUT = [*({"prompt": f"Copy: {a} {b}", "chosen": f"{a} {b}", "rejected": f"{b} {a}"} for a, b in ["ab", "cd", "ef", "gh"]),
            {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Reverse: x y z"}],
             "chosen": "z y x", "rejected": "x y z"}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reward model trained one step on the alpaca template, with HELD_OUT as its eval file: (run dir, summary)."""
    from posttrain import RMConfig, run_rm

    base = tmp_path_factory.mktemp("scoring-walk")
    train, held = _jsonl(base / "train.jsonl", TRAIN), _jsonl(base / "held.jsonl", HELD_OUT)
    run_dir = run_rm(RMConfig.load(None, [f"output_dir={base / 'rm'}", "model.path=tiny-2l", f"data.train_files=[{train}]",
                                          f"data.eval_files=[{held}]", "data.max_length=64", "data.template=alpaca",
                                          "train.max_steps=1", "train.batch_size=4", "train.lr=0.05",
                                          "train.progress_bar=false"]))
    return Path(run_dir), json.loads((Path(run_dir) / "summary.json").read_text())


def _score(capsys, *args) -> tuple[int, str, str]:
    from posttrain.cli import main

    capsys.readouterr()
    rc = main(["score", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _sides(prompt_as_turns: bool) -> list[dict]:
    """Every held-out response as a score row, the prompt as the file gives it or as its user turn."""
    rows = []
    for pair in HELD_OUT:
        prompt = pair["prompt"]
        if prompt_as_turns and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        rows += [{"prompt": prompt, "response": pair[side], "side": side} for side in ("chosen", "rejected")]
    return rows


# --------------------------------------------------------------------------- the training rendering


@pytest.mark.parametrize("prompt_as_turns", [False, True])
def test_score_reproduces_the_held_out_figures_the_rm_run_logged(trained, tmp_path, capsys, prompt_as_turns):
    """A reward model trained on the alpaca template (the tokenizer's own is ChatML): `posttrain score` on the
    run directory, its default --template, renders each held-out response as training did, text prompt or
    turns, a system turn included, so its rewards give the run's own held-out accuracy, margin (chosen −
    rejected, per prompt) and mean reward."""
    run_dir, summary = trained
    after = summary["eval_after"]
    rows = _sides(prompt_as_turns)
    out = tmp_path / "scored.jsonl"
    rc, _, err = _score(capsys, "--model", run_dir, "--input", _jsonl(tmp_path / "rows.jsonl", rows), "--output", out)
    assert rc == 0, err
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in scored] == rows  # columns kept, in order
    chosen = [r["reward"] for r in scored if r["side"] == "chosen"]
    rejected = [r["reward"] for r in scored if r["side"] == "rejected"]
    assert statistics.mean(c - r for c, r in zip(chosen, rejected)) == pytest.approx(after["margin"], abs=1e-5)
    assert statistics.mean(chosen + rejected) == pytest.approx(after["reward_mean"], abs=1e-5)
    assert statistics.mean(c > r for c, r in zip(chosen, rejected)) == after["accuracy"]


def test_a_row_scores_alike_in_any_batch_and_two_runs_write_the_same_bytes(trained, tmp_path, capsys):
    """Short rows among rows cut at the position table: --batch-size 1 and 16 agree to float32 rounding
    (the cut said on stderr), and one command run twice writes the same file."""
    run_dir, _ = trained
    rows = _sides(False)
    rows.insert(3, {"prompt": "Copy: " + "a b " * 300, "response": "a b " * 300})
    rows.insert(7, {"prompt": "x", "response": "q " * 1500})
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    got = {}
    for name, size in (("one", 1), ("all", 16), ("again", 16)):
        out = tmp_path / f"{name}.jsonl"
        rc, _, err = _score(capsys, "--model", run_dir, "--input", path, "--output", out, "--batch-size", size)
        assert rc == 0, err
        assert "cut 2 of 12 rows longer than 1024 tokens (kept their end)" in err, err
        got[name] = out.read_bytes()
    assert got["all"] == got["again"]
    one, full = ([json.loads(line)["reward"] for line in got[k].splitlines()] for k in ("one", "all"))
    assert one == pytest.approx(full, abs=1e-6)


# --------------------------------------------------------------------------- output files


def test_scoring_a_csv_file_into_itself_leaves_a_file_posttrain_reads_back(trained, tmp_path, capsys):
    """`posttrain score --input rows.csv --output rows.csv` (as it may write over a JSONL input): the output
    is JSON Lines whatever the name, so rows.csv becomes one JSON object a line, which posttrain (and any CSV
    reader) reads as a CSV whose header is the first row's JSON: the next `score` of it says 'no rows to
    score'. Right: write the format the name says, or refuse a .csv / .tsv / .parquet --output up front,
    leaving the file as it was."""
    from posttrain.data.readers import strict_rows

    run_dir, _ = trained
    path = tmp_path / "rows.csv"
    text = 'prompt,response,id\n"Smallest letter: q m t",m,1\nCopy: a b,a b,2\n'
    path.write_text(text)
    rc, _, err = _score(capsys, "--model", run_dir, "--input", path, "--output", path)
    if rc != 0:  # refused: the file untouched
        assert rc == 2 and path.read_text() == text, err
        return
    read = [row for _, row in strict_rows(str(path))]
    assert [r.get("id") for r in read] == ["1", "2"] and all("reward" in r for r in read), \
        f"read back {len(read)} rows: {read!r} from {path.read_text()[:120]!r}"


# --------------------------------------------------------------------------- what a long row prints


def test_a_row_cut_to_fit_is_not_announced_as_an_indexing_error(trained, tmp_path, capsys, caplog):
    """A row of 1,500+ tokens to a reward model of 1,024 positions: posttrain cuts it (keeping its end) and
    says so ('cut 1 of 2 rows ...'), and nothing is indexed out of range; but the tokenizer's own warning,
    'Token indices sequence length is longer than the specified maximum sequence length for this model
    (N > 1024). Running this sequence through the model will result in indexing errors', reaches stderr
    first, telling the user the opposite of what happens. Right: the scorer (which cuts every row itself)
    keeps that warning quiet, as its cut note says what was done."""
    from transformers.utils import logging as hf_logging

    run_dir, _ = trained
    rows = [{"prompt": "x", "response": "q " * 1500}, {"prompt": "Copy: a b", "response": "a b"}]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # transformers' default, whatever an earlier test in this process set
    try:
        rc, _, err = _score(capsys, "--model", run_dir, "--input", _jsonl(tmp_path / "rows.jsonl", rows),
                            "--output", tmp_path / "out.jsonl")
    finally:
        hf_logging.set_verbosity(verbosity)
    assert rc == 0 and "cut 1 of 2 rows longer than 1024 tokens (kept their end)" in err, err
    said = [r.getMessage() for r in caplog.records if "indexing errors" in r.getMessage()] + \
        [line for line in err.splitlines() if "indexing errors" in line]
    assert not said, said
