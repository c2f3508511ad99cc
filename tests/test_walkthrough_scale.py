"""A user with real-sized data: the data path and the commands that touch whole files, walked at
50k-500k rows (and a few very long rows) on a 2-core CPU, with time and peak RSS measured.

Measured on that walk (OMP_NUM_THREADS=1, the tiny preset's tokenizer and model, each figure
repeated): reading + validating + templating + tokenising is linear and about 2x a plain batched
`tokenizer(...)` call over the same texts (SFT messages, 50k rows: 22 s against 10 s; K=9 rankings,
10k rows / 90k sequences: 31 s against 9 s); a streamed plain-text file stays at 305 MiB whatever
its length (200k rows); bad rows at 10% of 200k are read in 1.3 s with a 7-line console report and
every one in the rejects file; `pack` and length-grouped plans are linear (400k examples: 5.4 s and
0.4 s); `posttrain quality` is linear in time (100k rows: 157 s) and `generate` / `score` batch by
length or without padding. What scaled badly, or did twice the work it needs, is pinned below.

Timings are never asserted: each defect is pinned by a deterministic count (calls of a reward,
elements a loop visits at n and 2n, sequences a pass computes, bytes tracemalloc sees held per row
or per token). The tests named for a failure assert the right behaviour (each a strict xfail until its fix, stop 30);
the others pin behaviour that was right at scale but had no test there.
"""

from __future__ import annotations

import json
import random
import re
import sys
import tracemalloc
from pathlib import Path

import pytest

from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress_bar=false"]
_VOCAB = sorted(set((ROOT / "src/posttrain/assets/corpus.txt").read_text().split()))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from posttrain.models import presets

    tokenizer = AutoTokenizer.from_pretrained(str(presets.preset_path("tiny")))
    tokenizer.model_max_length = 10**6  # long rows on purpose: no "longer than the maximum" warning
    return tokenizer


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_VOCAB) for _ in range(n))


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text_rows(n: int, seed: int = 0, words: int = 60) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": _sentence(rng, words)} for _ in range(n)]


# --------------------------------------------------------------------------- defects


@pytest.fixture
def counting_reward(tmp_path, monkeypatch):
    """A reward module on sys.path whose function records every response it is asked to score."""
    name = "scale_counting_reward"
    (tmp_path / f"{name}.py").write_text("CALLS = []\n\ndef length(prompt, response):\n"
                                         "    CALLS.append(response)\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_score_calibrate_scores_every_row_once(capsys, tmp_path, counting_reward):
    """`--calibrate` z-normalises each component on the file: the raw values it needs are the very
    values scoring computes, so one pass gives both. Measured with a tiny reward model on 20,000
    rows: 118 s without --calibrate, 229 s with it (two forward passes per row)."""
    rows = _write_jsonl(tmp_path / "rows.jsonl", ({"prompt": f"q{i}", "response": "a" * (i % 40 + 1)}
                                                  for i in range(300)))
    out = tmp_path / "scored.jsonl"
    rc, text = run_cli(capsys, "score", "--function", f"len={counting_reward}:length", "--calibrate",
                       "--input", rows, "--output", out)
    assert rc == 0, text
    assert len(out.read_text().splitlines()) == 300
    calls = sys.modules[counting_reward].CALLS
    assert len(calls) == 300, f"{len(calls)} reward calls for 300 rows"


def _near_dedup_peak(n: int) -> int:
    from posttrain.data.quality.dedup import near_duplicates

    rng = random.Random(n)
    texts = [_sentence(rng, 100) for _ in range(n)]  # ~0.64 KiB of text a row, no duplicates
    tracemalloc.start()
    try:
        near_duplicates(texts)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_near_dedup_memory_per_row_is_a_small_multiple_of_the_text():
    """`posttrain quality` on 100k alpaca rows (58 MiB of text, 65 MiB file) peaked at 2.3 GiB RSS,
    almost all of it in `near_duplicates`, whose `sets` keep a frozenset of 5-word tuples for every
    row until the end, though only rows in candidate pairs are ever re-checked. Measured peak RSS
    of near_duplicates alone: +567 MiB at 25k rows, +1.1 GiB at 50k, +2.2 GiB at 100k; a 1M-row
    file would need ~22 GiB for this step. The signatures themselves are 1 KiB a row (128 x uint64).
    Pinned as the growth of the traced peak per added row of 100 words (0.64 KiB of text)."""
    small, large = _near_dedup_peak(1000), _near_dedup_peak(2000)
    per_row = (large - small) / 1000
    assert per_row <= 8 * 1024, f"{per_row / 1024:.1f} KiB per row for 0.64 KiB of text"


def test_long_conversation_label_mask_work_is_linear_in_its_length(tokenizer, monkeypatch):
    """`tokenize_with_labels` looks for tokens straddling an answer start with one scan of all tokens
    per span, and `_labels_from_spans` tests every token against every span: both O(tokens x
    assistant turns), though tokens and spans are both in text order (one merge pass would do).
    Measured on one conversation (the preset tokenizer): 50 exchanges (5k tokens) 0.07 s,
    100: 0.23 s, 200: 0.91 s, 400 (39k tokens): 3.5 s, against 0.06 s for one tokenizer call on
    the rendered text; these two scans were 44% of it (the other half: one prefix render per
    assistant turn, also quadratic). Pinned by the elements those scans consume at n and 2n
    exchanges: 4x now (306,575 -> 1,238,215 for 60 -> 120), about 2x when linear."""
    from posttrain.data import templates
    from posttrain.data.records import Record

    visited = [0]

    def counting_any(iterable):  # the builtin, counting what it consumes
        for value in iterable:
            visited[0] += 1
            if value:
                return True
        return False

    monkeypatch.setattr(templates, "any", counting_any, raising=False)
    template = templates.resolve_template(tokenizer, "auto")

    def work(exchanges: int) -> int:
        messages = []
        for t in range(exchanges):
            messages += [{"role": "user", "content": f"question {t} about the river and the town"},
                         {"role": "assistant", "content": f"answer {t}: the river runs past the old town to the sea"}]
        visited[0] = 0
        example = templates.encode_record(Record(messages=messages, source="long:1"), tokenizer, template)
        assert example.num_label_tokens > 0
        return visited[0]

    small, large = work(60), work(120)
    assert large <= 2.5 * max(small, 1), f"{small} -> {large} elements visited for twice the conversation"


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _sentence(rng, 4), "chosen": _sentence(rng, 3), "rejected": _sentence(rng, 3)}
            for _ in range(n)]


def test_dpo_reference_pass_covers_only_the_steps_the_run_takes(capsys, tmp_path):
    """README: the reference log-probs are "computed once before training ... in the very batches the
    first epoch and the held-out evaluation use". With train.max_steps shorter than an epoch (how a
    large file is usually sampled) the rest of the epoch is never read, yet the pass runs over it
    first: on 20,000 pairs, `dpo train.max_steps=5` (batch 16) computed 29,102 sequences, 46 s of the
    run's 73 s, for 160 training sequences and 1,446 held-out ones; at 500k pairs it is the whole
    file's forward before step 1. The batches the run will take are known (the plan is a pure
    function of seed and epoch), so only those, and the held-out ones, need the reference. Here:
    400 pairs, 2 steps of 4, 8 held-out pairs: 816 sequences computed for the 32 the run reads."""
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(400, 0))
    held_out = _write_jsonl(tmp_path / "eval.jsonl", _pairs(8, 1))
    rc, text = run_cli(capsys, "dpo", "examples/dpo.yaml", f"data.train_files=[{train}]",
                       f"data.eval_files=[{held_out}]", "train.max_steps=2", "train.batch_size=4",
                       "eval.exact_match_prompts=0", "dpo.reference=precompute", f"output_dir={tmp_path / 'run'}",
                       *QUIET)
    assert rc == 0, text[-800:]
    computed = int(re.search(r"reference log-probs: computed for (\d+) sequences", text).group(1))
    needed = 2 * 4 * 2 + 8 * 2  # steps x batch x (chosen, rejected) + held-out pairs x 2
    assert computed <= needed, f"computed {computed} reference sequences; the run reads {needed}"


def test_prepared_sft_examples_hold_tokens_compactly(tokenizer, tmp_path):
    """Measured: `prepare_sft_data` on 200k plain-text rows (70 MB, 24.1M tokens) held 1,131 MiB
    after it returned (49 B a token; peak RSS 1.4 GiB) and `posttrain sft ... train.max_steps=1`
    peaked at 1.7 GiB; 50k message rows (6.4M tokens) held 322 MiB (52 B a token). Each id above
    256 is its own Python int (28 B) behind an 8-byte pointer, twice (ids and labels). A 1B-token
    SFT set (500k rows of 2k tokens, a 4 GB file) would need ~50 GB before step 1; the preference
    stages keep the same Example and have no streaming path. ids and labels as int32 arrays take
    8 B a token. Pinned with tracemalloc: bytes still held per token once the data is prepared
    (41 now on these 80-word rows; at most 24, so int64 arrays would pass too)."""
    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import prepare_sft_data

    path = _write_jsonl(tmp_path / "text.jsonl", _text_rows(1500, words=80))
    cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
                               "data": {"train_files": [str(path)], "max_length": 1024, "eval_fraction": 0.0}}).data
    prepare_sft_data(cfg, tokenizer, None, 0, log=lambda line: None)  # warm: the template and tokenizer caches
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data = prepare_sft_data(cfg, tokenizer, None, 0, log=lambda line: None)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tokens = sum(len(example) for example in data.train)
    assert tokens > 100_000
    assert held / tokens <= 24, f"{held / tokens:.0f} bytes held per token ({held / 2**20:.1f} MiB, {tokens} tokens)"


# --------------------------------------------------------------------------- right at scale, untested


def _stream_peak(tokenizer, path: Path, tmp_path: Path) -> tuple[int, int]:
    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import stream_sft_examples

    cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
                               "data": {"train_files": [str(path)], "max_length": 256, "streaming": True},
                               "train": {"max_steps": 1}}).data
    tracemalloc.start()
    try:
        count = sum(1 for _ in stream_sft_examples(cfg, tokenizer, None, log=lambda line: None))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streamed_sft_memory_does_not_grow_with_the_file(tokenizer, tmp_path):
    """README: `data.streaming: true` "reads lazily for files larger than memory". Measured: 200k
    plain-text rows streamed through read, template and tokenisation at a flat 305 MiB RSS (the
    same at row 0 and row 150,000), where the in-memory path peaked at 1.4 GiB. Here: the traced
    peak over a file 4x as long stays within a small margin of the shorter one's."""
    short = _write_jsonl(tmp_path / "short.jsonl", _text_rows(500, seed=1))
    long = _write_jsonl(tmp_path / "long.jsonl", _text_rows(2000, seed=2))
    _stream_peak(tokenizer, short, tmp_path)  # warm the caches a first pass fills
    n_short, peak_short = _stream_peak(tokenizer, short, tmp_path)
    n_long, peak_long = _stream_peak(tokenizer, long, tmp_path)
    assert (n_short, n_long) == (500, 2000)
    assert peak_long <= peak_short + 256 * 1024, (peak_short, peak_long)


def test_ten_percent_bad_rows_are_reported_in_a_few_lines_and_all_written_to_rejects(capsys, tmp_path):
    """20,000 rows, every tenth malformed (three kinds), under bad_rows=skip and a 5% limit: the run
    stops before training with exit 2; the console names the count and the first few rows only, and
    run_dir/rejects-train.jsonl holds all 2,000 with their file:line. (At 200k rows the read took
    1.3 s and the report was 7 lines.)"""
    rng = random.Random(0)
    bad = ['{"instruction": "x", "output": ', '{"instruction": "only"}', "[1, 2]"]
    lines = [bad[i // 10 % 3] if i % 10 == 3 else
             json.dumps({"instruction": _sentence(rng, 6), "output": _sentence(rng, 8)}) for i in range(20_000)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    rc, text = run_cli(capsys, "sft", "examples/sft_full.yaml", f"data.train_files=[{path}]", "data.bad_rows=skip",
                       "data.max_bad_fraction=0.05", f"output_dir={run}", "train.max_steps=1", *QUIET)
    assert rc == 2, text[-800:]
    assert "skipped 2000 of 20000 rows" in text and "... and 1995 more" in text
    assert text.count(f"{path}:") <= 12, text  # the first few, not 2,000 lines
    rejects = [json.loads(line) for line in (run / "rejects-train.jsonl").read_text().splitlines()]
    assert len(rejects) == 2000
    assert [r["location"] for r in rejects] == [f"{path}:{i + 1}" for i in range(20_000) if i % 10 == 3]
