"""From a DataConfig to token examples: read, format, split, template, fit to length.

Every count that changes the data (bad rows, over-long examples, examples that lost
their labels) is reported here, in one place, and written to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from posttrain.data.formats import DataReport
from posttrain.data.records import Example, Record
from posttrain.data.templates import DoubledMarkers
from posttrain.errors import ConfigError, DataError

SYNTHETIC = "synthetic"
T = TypeVar("T")


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    eval_records: list[Record]  # held-out records (for generation-based metrics)
    report: dict = field(default_factory=dict)


def rejects_file(run_dir: Path | None, name: str) -> str | None:
    """Where the bad rows of split `name` go: run_dir/rejects-NAME.jsonl. `run_dir` None means this
    process writes nothing (with several processes every one reads the data, the main one writes)."""
    return str(run_dir / f"rejects-{name}.jsonl") if run_dir is not None else None


def write_report(run_dir: Path | None, report: dict) -> None:
    """run_dir/data_report.json, written beside and renamed (a reader never sees half of it); nothing
    when `run_dir` is None (a process other than the main one)."""
    if run_dir is None:
        return
    from posttrain.files import write_atomically

    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "data_report.json", json.dumps(report, indent=1, default=str))


def _read(files: list[str], cfg, run_dir: Path | None, log: Callable[[str], None], name: str):
    from posttrain.data import formats

    if SYNTHETIC in files:
        raise ConfigError(f"data.{name}_files: 'synthetic' cannot be mixed with files")
    records, report = formats.load_records(
        files, fmt=cfg.format, bad_rows=cfg.bad_rows, max_bad_fraction=cfg.max_bad_fraction,
        rejects_path=rejects_file(run_dir, name), log=log, train_on=cfg.train_on,
    )
    return records, report.to_dict()


def note_none_held_out(cfg, records: list, held_out: list, log, why: str = "") -> None:
    """One line when data.eval_fraction held nothing out because every training row shares one prompt
    (sft, preference and prompt data alike); `why` says what counts as one prompt there."""
    if cfg.eval_fraction > 0 and not held_out and len(records) > 1:
        log(f"data.eval_fraction={cfg.eval_fraction}: all {len(records)} training rows share one prompt, so none is "
            f"held out ({why}give data.eval_files)")


def synthetic_split_sizes(cfg) -> tuple[int, int]:
    """(training rows, held-out rows) the bundled generator makes for `train_files: [synthetic]`
    (sft, preference and prompt data alike): data.eval_fraction of data.synthetic_size held out,
    none when data.eval_files are given (they are the held-out set, so every row trains)."""
    n_eval = 0 if cfg.eval_files else round(cfg.eval_fraction * cfg.synthetic_size)
    return cfg.synthetic_size - n_eval, n_eval


def _synthetic(cfg, seed: int) -> tuple[list[Record], list[Record]]:
    """Bundled verifiable tasks; held-out prompts never appear in training."""
    from posttrain.data import synthetic

    train, held_out = synthetic.make_split(cfg.synthetic_tasks, *synthetic_split_sizes(cfg), seed=seed)
    return [e.to_record(i) for i, e in enumerate(train)], [e.to_record(i) for i, e in enumerate(held_out)]


def split_eval(records: list[T], fraction: float, seed: int, key: Callable[[T], Hashable] | None = None,
               keys: Callable[[T], Iterable[Hashable]] | None = None) -> tuple[list[T], list[T]]:
    """Hold out round(fraction * n) records chosen by seed (at least 1 when fraction > 0).

    key: records with the same key(record) — the same prompt, say — go to one side together, so
    no held-out record shares its key with a training one. keys: each record has several (a
    conversation, one per answer it trains, `trained_prompt_keys`), and records sharing any one
    go to one side together (the groups are joined: two rows can meet through a third). The
    groups are drawn in a seeded order (listed by their first record) and held out until they
    hold at least round(fraction * n) records (a large last group can take more); at least one
    group is left for training, so with a single group nothing is held out. Without a key each
    record is its own group."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    if key is not None:
        if keys is not None:
            raise ValueError("split_eval takes key or keys, not both")
        keys = lambda record: [key(record)]
    order = _groups(records, keys)
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(records)))
    held: set[int] = set()
    for group in order[:-1]:  # the last group drawn always trains
        if len(held) >= n_eval:
            break
        held.update(group)
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _groups(records: list[T], keys: Callable[[T], Iterable[Hashable]] | None) -> list[list[int]]:
    """The indices of `records` in groups: records sharing any of their keys are in one group (a
    union-find over the keys), each record alone without `keys`; groups listed in the order of
    their first record, each in record order."""
    if keys is None:
        return [[i] for i in range(len(records))]
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Hashable, int] = {}  # a key → the first record that has it
    for i, record in enumerate(records):
        for k in keys(record):
            j = first.setdefault(k, i)
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)  # the root is the group's first record
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def retain_prompt_key(record: Record) -> str:
    """What makes two rows' prompts the same, for rows in sft's formats: the turns before the last
    assistant turn and the tools (what exact match renders as the prompt,
    `eval.exact_match.prompts_and_answers`); a text row's text. The prompts a held-out report
    counts; one of `trained_prompt_keys`."""
    from posttrain.eval.exact_match import last_answer

    if record.messages is None:
        return json.dumps(record.text)
    return _context_key(record, last_answer(record))


def trained_prompt_keys(record: Record) -> list[str]:
    """`split_eval`'s keys for sft's own held-out split and for the retain rows'
    (`train.forgetting`): a row's `retain_prompt_key` (the prompt exact match asks) and the turns
    before each assistant turn it trains (`templates.trained_turns`) with the tools. sft trains
    every such turn, so a row [u1, a1] and a row [u1, a1, u2, a2] both train a1 after u1: they
    share a key and go to one side, and no held-out answer is trained from the same context."""
    from posttrain.data.templates import trained_turns

    keys = [retain_prompt_key(record)]
    if record.messages is not None:
        for i in trained_turns(record.messages, record.prompt_turns, record.untrained):
            if (k := _context_key(record, i)) not in keys:
                keys.append(k)
    return keys


def _context_key(record: Record, turn: int | None) -> str:
    """The turns before message `turn` (all of them for None) and the row's tools, as one string."""
    return json.dumps([record.messages[:turn], record.tools], sort_keys=True, default=str)


def encode_all(records: list[Record], tokenizer, template: str, cfg, log, name: str) -> tuple[list[Example], dict]:
    from posttrain.data.templates import fit_length

    examples, unrendered, doubled = [], [], DoubledMarkers()
    for record in records:
        example = _encoded(record, tokenizer, template, cfg, unrendered, doubled)
        if example is not None:
            examples.append(example)
    check_unrendered(unrendered, len(records), cfg, log, name)
    if doubled.rows:
        log(doubled.summary(name))
    examples, length_report = fit_length(examples, cfg.max_length, cfg.overlength)
    log(f"{name}: {length_report.summary()}")
    return examples, dataclasses.asdict(length_report) | {"unrendered": len(unrendered),
                                                          "unrendered_first": unrendered[:3]} | doubled.entry()


def _encoded(record: Record, tokenizer, template: str, cfg, unrendered: list[str],
             doubled: DoubledMarkers | None = None) -> Example | None:
    """`encode_record` under the bad-row policy (`encoded_or_skipped`); a row encoded whose answer
    already ended with the end-of-turn marker (stripped) is counted in `doubled`."""
    from posttrain.data.templates import encode_record

    example = encoded_or_skipped(lambda r: encode_record(r, tokenizer, template), record, cfg, unrendered)
    if example is not None and doubled is not None:
        doubled.count(record, tokenizer, template)
    return example


def encoded_or_skipped(encode: Callable, record, cfg, unrendered: list[str]):
    """`encode(record)`, or — under data.bad_rows=skip — None for a row the chat template cannot
    render (a system turn on a template without a system role, say), its error kept in
    `unrendered`: the bad-row policy of reading, applied to templating."""
    from posttrain.errors import DataError

    try:
        return encode(record)
    except DataError as exc:
        if cfg.bad_rows != "skip":
            raise
        unrendered.append(str(exc))
        return None


def check_unrendered(unrendered: list[str], total: int, cfg, log, name: str) -> None:
    from posttrain.errors import DataError

    if not unrendered:
        return
    log(f"{name}: skipped {len(unrendered)} of {total} rows the chat template cannot render (bad_rows=skip); "
        f"first: {unrendered[0]}")
    if len(unrendered) > cfg.max_bad_fraction * total:
        raise DataError(f"{len(unrendered)} of {total} {name} rows cannot be rendered by the chat template, more "
                        f"than max_bad_fraction={cfg.max_bad_fraction}; first: {unrendered[0]}")


def _length_summary(length_report: dict) -> str:
    from posttrain.data.templates import LengthReport

    fields = {f.name for f in dataclasses.fields(LengthReport)}
    return LengthReport(**{k: v for k, v in length_report.items() if k in fields}).summary()


def _labelled_only(examples: list[Example], log: Callable[[str], None], name: str) -> tuple[list[Example], int]:
    """Drop, count and name the examples with no token to train on (a template that renders an
    assistant turn as nothing), as streaming does: they would add nothing but padding."""
    kept = [e for e in examples if e.num_label_tokens > 0]
    dropped = [e.source for e in examples if e.num_label_tokens == 0]
    if dropped:
        log(f"{name}: {len(dropped)} examples dropped with no token to train on (first: {', '.join(dropped[:3])})")
    return kept, len(dropped)


def check_held_out(cfg, left: int, read: dict, length: dict, length_summary: str | None) -> None:
    """Held-out files (data.eval_files) of which no row is left (malformed, unrendered, too long,
    nothing to score) are refused, as an empty training set is: the run would report held-out
    figures of nothing. `read` / `length`: the held-out rows' reading and length reports."""
    if not cfg.eval_files or left:
        return
    reasons = [f"{read['bad_rows']} malformed"] if read.get("bad_rows") else []
    if length.get("unrendered"):
        reasons.append(f"{length['unrendered']} the chat template cannot render")
    if length_summary:
        reasons.append(length_summary)
    raise DataError(f"data.eval_files {', '.join(map(str, cfg.eval_files))}: none of the {read.get('rows', 0)} "
                    f"held-out rows is left ({'; '.join(reasons) or 'no rows'}); raise data.max_length, fix the rows, "
                    f"or leave data.eval_files empty to hold out data.eval_fraction of the training rows")


def prepare_sft_data(cfg, tokenizer, run_dir: Path | None, seed: int, log: Callable[[str], None] = print) -> PreparedData:
    """Load train (and eval) data per `cfg` (a DataConfig) into examples; write data_report.json."""
    from posttrain.data.templates import adopt_template, check_label_mask

    template = adopt_template(tokenizer, cfg.template)
    if cfg.train_files == [SYNTHETIC]:
        train_records, eval_records = _synthetic(cfg, seed)
        read_report = {"source": "synthetic", "rows": len(train_records) + len(eval_records), "bad": 0}
        eval_read = {"rows": len(eval_records), "held_out_prompts_unique": True}
        if cfg.eval_files:  # held-out files given: they, not the synthetic split, are the held-out set
            eval_records, eval_read = _read(cfg.eval_files, cfg, run_dir, log, "eval")
    elif cfg.eval_files:
        train_records, read_report = _read(cfg.train_files, cfg, run_dir, log, "train")
        eval_records, eval_read = _read(cfg.eval_files, cfg, run_dir, log, "eval")
    else:
        records, read_report = _read(cfg.train_files, cfg, run_dir, log, "train")
        # by prompt: rows asking the same thing (or training an answer from the same turns) are held
        # out together, so held-out figures are never taken on a prompt the run trained on
        train_records, eval_records = split_eval(records, cfg.eval_fraction, seed, keys=trained_prompt_keys)
        eval_read = {"rows": len(eval_records), "split_from_train": True,
                     "prompts": len({retain_prompt_key(r) for r in eval_records})}
        note_none_held_out(cfg, records, eval_records, log, "rows that train an answer from the same turns, a "
                           "shared opening exchange, count as one; ")
    train, train_len = encode_all(train_records, tokenizer, template, cfg, log, "train")
    if not train and train_len["num_too_long"] + train_len["num_lost_labels"]:
        raise DataError(f"none of the {train_len['num_examples']} training examples is left after the length policy "
                        f"(data.overlength={cfg.overlength}: "
                        f"{_length_summary(train_len)}); raise data.max_length or shorten the examples")
    check_label_mask(train)
    train, train_len["dropped_no_labels"] = _labelled_only(train, log, "train")
    evaluation, eval_len = encode_all(eval_records, tokenizer, template, cfg, log, "eval") if eval_records else ([], {})
    if evaluation:
        evaluation, eval_len["dropped_no_labels"] = _labelled_only(evaluation, log, "eval")
    report = {"train_read": read_report, "eval_read": eval_read, "train_length": train_len, "eval_length": eval_len,
              "train_examples": len(train), "eval_examples": len(evaluation),
              "train_label_tokens": sum(e.num_label_tokens for e in train)}
    write_report(run_dir, report)
    check_held_out(cfg, len(evaluation), eval_read, eval_len, _length_summary(eval_len) if eval_len else None)
    return PreparedData(train, evaluation, eval_records, report)


@dataclass
class StreamCounts:
    """What a streamed pass over the training files has read, cut and dropped so far, kept while
    it runs: a run that stops before a full pass (a file larger than memory, read for
    train.max_steps) still reports them (`write_stream_counts`). `read`: the reader's counts,
    per file (rows, good, malformed) as far as the pass has read."""

    rows: int = 0  # rows read in this pass (bad rows skipped by the reader aside)
    read: DataReport = field(default_factory=DataReport)
    too_long: int = 0  # longer than data.max_length: cut or dropped (data.overlength)
    dropped_no_labels: int = 0  # no label left after the cut
    unrendered: list[str] = field(default_factory=list)  # rows the chat template cannot render (bad_rows=skip)
    doubled: DoubledMarkers = field(default_factory=DoubledMarkers)  # answers ending in the end-of-turn marker
    complete_passes: int = 0
    said_too_long: bool = False  # the first over-long row is logged, once a run

    def new_pass(self) -> None:
        self.rows = self.too_long = self.dropped_no_labels = 0
        self.read, self.unrendered, self.doubled = DataReport(), [], DoubledMarkers()

    def entry(self, cfg, complete_pass: bool) -> dict:
        read = self.read.to_dict()
        counts = ("of a full pass" if complete_pass else
                  "running: the rows read so far in this pass (written at each checkpoint and at the end of the run)")
        return {"train_stream": {"complete_pass": complete_pass, "counts": counts, "rows_read": self.rows,
                                 "bad_rows": read["bad_rows"], "rejects_path": read["rejects_path"],
                                 "files": read["files"], "first_bad": read["first_bad"],
                                 "rows_in_several_files": "not counted when streaming",
                                 "too_long": self.too_long, "policy": cfg.overlength,
                                 "dropped_no_labels": self.dropped_no_labels,
                                 "unrendered": len(self.unrendered)} | self.doubled.entry()}


def write_stream_counts(run_dir: Path | None, counts: StreamCounts, cfg) -> None:
    """data_report.json's train_stream: the rows read so far (complete_pass false), while no full pass
    has ended; after one, that pass's counts stay (written at its end). Called at each checkpoint
    and at the end of the run."""
    if counts.complete_passes == 0:
        _update_report(run_dir, counts.entry(cfg, complete_pass=False))


def stream_sft_examples(cfg, tokenizer, run_dir: Path | None, log: Callable[[str], None] = print,
                        counts: StreamCounts | None = None) -> Iterator[Example]:
    """Lazily read, template and fit examples one by one (data.streaming=true), counting in
    `counts` (a fresh one by default) what the length policy cuts and drops; the first over-long
    row is logged when met, the counts written to data_report.json after each full pass."""
    from posttrain.data import formats
    from posttrain.data.templates import adopt_template

    template = adopt_template(tokenizer, cfg.template)
    counts = StreamCounts() if counts is None else counts
    counts.new_pass()
    for record in formats.iter_records(cfg.train_files, fmt=cfg.format, bad_rows=cfg.bad_rows,
                                       max_bad_fraction=cfg.max_bad_fraction,
                                       rejects_path=rejects_file(run_dir, "train"), log=log, report=counts.read,
                                       train_on=cfg.train_on):
        counts.rows += 1
        example = _encoded(record, tokenizer, template, cfg, counts.unrendered, counts.doubled)
        if example is None:
            continue
        if len(example) > cfg.max_length:
            counts.too_long += 1
            if not counts.said_too_long:
                counts.said_too_long = True
                log(f"train (streamed): {example.source} has {len(example)} tokens, longer than {cfg.max_length} "
                    f"(data.overlength={cfg.overlength}); such rows are counted in data_report.json")
            if cfg.overlength == "drop":
                continue
            example = Example(example.input_ids[: cfg.max_length], example.labels[: cfg.max_length], example.source)
        if example.num_label_tokens == 0:
            counts.dropped_no_labels += 1
            continue
        yield example
    if counts.too_long or counts.dropped_no_labels:
        log(f"train (streamed): {counts.too_long} examples longer than {cfg.max_length} tokens ({cfg.overlength}); "
            f"{counts.dropped_no_labels} dropped with no label tokens left")
    check_unrendered(counts.unrendered, counts.rows, cfg, log, "train (streamed)")
    if counts.doubled.rows and not counts.complete_passes:  # said once a run, as each pass reads the same rows
        log(counts.doubled.summary("train (streamed)"))
    counts.complete_passes += 1
    _update_report(run_dir, counts.entry(cfg, complete_pass=True))


def prepare_streamed_eval(cfg, tokenizer, run_dir: Path | None, log: Callable[[str], None] = print) -> list[Example]:
    """With data.streaming: the held-out examples of `data.eval_files` (read whole: held-out sets
    are small), and data_report.json begun (the streamed training counts join it after each full
    pass). A stream has no split to take `eval_fraction` from; without eval files, none."""
    from posttrain.data.templates import adopt_template

    report: dict = {"train_read": {"source": "streamed", "train_stream": "counts of the rows read so far, per file "
                                                                         "(complete_pass false), or of a full pass"}}
    evaluation: list[Example] = []
    if cfg.eval_files:
        eval_records, report["eval_read"] = _read(cfg.eval_files, cfg, run_dir, log, "eval")
        template = adopt_template(tokenizer, cfg.template)
        evaluation, report["eval_length"] = encode_all(eval_records, tokenizer, template, cfg, log, "eval")
    elif cfg.eval_fraction > 0:
        log("note: data.streaming takes no held-out split from the stream (data.eval_fraction); set data.eval_files")
    report["eval_examples"] = len(evaluation)
    _update_report(run_dir, report)
    return evaluation


def _update_report(run_dir: Path | None, entries: dict) -> None:
    if run_dir is None:
        return
    path = run_dir / "data_report.json"
    write_report(run_dir, (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}) | entries)
