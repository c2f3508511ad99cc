"""Resumable work over many items: an append-only JSONL log and a thread pool that fills it.

    JsonlLog    one JSON object per line, each with a unique id; every append is flushed and
                fsynced, so a kill loses at most the line being written. Reopening reads what is
                there, cuts off a torn last line (with a warning) and knows which ids are done.
    run_items   skips the items whose id is already in the log, works on the rest with a thread
                pool, appends each result the moment it is ready, shows a progress line, and
                returns a RunSummary. Rerunning the same command after a kill therefore gives
                every id exactly once: no duplicates, no gaps.
    write_jsonl  a finished output file, written whole (a kill leaves the old one or the new one)
    check_resume_settings, file_digest, model_identity   refuse to resume a run with settings, inputs
                or a local model's files that changed

Item ids must be deterministic functions of the input (an index or a hash of the item),
never of time or chance, or a resumed run could not recognise what it already did.

A work function returns a dict (one record, whose id is the item's), a list of dicts
(several records for the item, written together; each gets "item" and "parts" fields and
an id "<item>/<j>" when it has none, and a group cut short by a kill is dropped on reopen as
a torn line is), or None (nothing to write; the item is tried again on the next run).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from posttrain.console import Progress, duration
from posttrain.errors import ConfigError, DataError, UserError

MAX_ERRORS_KEPT = 5
# A `stream` default meaning "sys.stderr when the call runs". A default of sys.stderr itself is the
# stream current at import: under a capture (pytest, a notebook's redirect) a file closed later.
STDERR: Any = "<stderr>"


def resolve_stream(stream: TextIO | None) -> TextIO | None:
    return sys.stderr if stream is STDERR else stream

JOIN_TIMEOUT_S = 30.0  # after an error, how long the items in flight may take to end


class JsonlLog:
    """An append-only JSONL file of records keyed by `key`, safe to append to from several threads.

    The file is created (with its directory) and, where the OS has flock, locked for as long as
    the log is open, so a second run writing to the same file is refused instead of mixing in.
    """

    def __init__(self, path: str | Path, key: str = "id", *, warn: TextIO | None = None):
        self.path, self.key = Path(path), key
        self.records: list[dict] = []
        self.done: set[str] = set()
        self.items: set[str] = set()  # items whose records are all here (list results included)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")
        _lock_exclusively(self._file, self.path)
        self._read(warn if warn is not None else sys.stderr)

    def _read(self, warn: TextIO) -> None:
        data = self.path.read_bytes()
        lines, offsets, position = [], [], 0
        for raw in data.splitlines(keepends=True):
            lines.append(raw)
            offsets.append(position)
            position += len(raw)
        keep = len(lines)
        if lines and not lines[-1].endswith(b"\n"):
            keep -= 1  # killed while writing the last line
            print(f"warning: {self.path}:{keep + 1}: an unfinished last line (the run was stopped while writing "
                  "it) is removed; that item will be redone", file=warn)
        records = []
        for number, raw in enumerate(lines[:keep], start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{self.path}:{number}: not valid JSON; this log is damaged (fix or delete that "
                                "line to resume)") from None
            if not isinstance(record, dict) or not isinstance(record.get(self.key), str):
                raise DataError(f"{self.path}:{number}: a record without a string {self.key!r}; is this file "
                                "a log written by posttrain?")
            if record[self.key] in self.done:
                raise DataError(f"{self.path}:{number}: {self.key} {record[self.key]!r} appears twice; the log "
                                "was edited or written by two runs at once")
            records.append((number, record))
            self.done.add(record[self.key])
        keep_records = _drop_unfinished_group(records)
        if len(keep_records) < len(records):
            number = records[len(keep_records)][0]
            print(f"warning: {self.path}:{number}: the last item's records are incomplete (the run was stopped "
                  "while writing them); they are removed and that item will be redone", file=warn)
            keep = number - 1
            self.done -= {record[self.key] for _, record in records[len(keep_records):]}
        if keep < len(lines):  # appends go to the (new) end: the file is open with O_APPEND
            os.truncate(self.path, offsets[keep])
            os.fsync(self._file.fileno())
        self.records = [record for _, record in keep_records]
        self.items = {record.get("item", record[self.key]) for record in self.records}

    def append(self, record: dict) -> None:
        """Write one record as one line, flushed and fsynced. Refuses an id already in the log."""
        self.append_group([record])

    def append_group(self, records: list[dict]) -> None:
        """Write several records with one write call and one fsync. A lone surrogate in their text
        (a server's JSON "\\ud83d", half an emoji) cannot be written as UTF-8: it becomes U+FFFD,
        in the file and in `records` alike, so a resumed run reads what an uninterrupted one kept."""
        ids = [record.get(self.key) for record in records]
        if not all(isinstance(i, str) for i in ids):
            raise ValueError(f"every record needs a string {self.key!r}, got {ids}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate {self.key} within one group: {ids}")
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            records = _without_lone_surrogates(records)
            text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        with self._lock:
            repeated = [i for i in ids if i in self.done]
            if repeated:
                raise ValueError(f"{self.path}: {self.key} {repeated[0]!r} is already in the log")
            if self._file is None:
                raise ValueError(f"{self.path}: the log is closed")
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.done.update(ids)
            self.records.extend(records)
            self.items.update(record.get("item", record[self.key]) for record in records)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, always lone: json.loads joins the pairs


def _without_lone_surrogates(value: Any) -> Any:
    """`value` (JSON-like) with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_lone_surrogates(v) for v in value]
    return value


def _lock_exclusively(file: TextIO, path: Path) -> None:
    from posttrain.files import lock_exclusively

    lock_exclusively(file, f"{path} is being written by another run (or another log object in this process); "
                     "wait for it to finish, or use another output_dir")


def _drop_unfinished_group(records: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Records without the trailing group whose "parts" were not all written (only the last
    group can be unfinished: groups are written whole, one after another)."""
    if not records or "parts" not in records[-1][1]:
        return records
    item = records[-1][1].get("item")
    start = len(records)
    while start > 0 and records[start - 1][1].get("item") == item and "parts" in records[start - 1][1]:
        start -= 1
    complete = len(records) - start == records[-1][1]["parts"]
    return records if complete else records[:start]


@dataclass
class RunSummary:
    total: int  # items given
    skipped: int  # already in the log (resumed)
    written: int  # finished now and written
    failed: int  # raised an error
    seconds: float
    errors: list[str] = field(default_factory=list)  # the first few, "id: message"
    empty: int = 0  # returned None: nothing written, tried again next time
    desc: str = ""

    def lines(self) -> list[str]:
        name = f"{self.desc}: " if self.desc else ""
        parts = [f"{self.written} written", f"{self.skipped} already done"]
        if self.empty:
            parts.append(f"{self.empty} gave nothing")
        parts.append(f"{self.failed} failed")
        out = [f"{name}{self.total} items: " + ", ".join(parts) + f" in {duration(self.seconds)}"]
        if self.failed:
            out.append(f"{name}first errors: " + "; ".join(self.errors))
            out.append(f"{name}rerun the same command to retry the failed items (finished ones are kept)")
        return out


class RunAborted(UserError):
    """run_items stopped because the items all failed; `summary` counts what was done before."""

    def __init__(self, message: str, summary: RunSummary):
        super().__init__(message)
        self.summary = summary


def run_items(items: list[tuple[str, Any]], work: Callable[[str, Any], dict | list[dict] | None], log: JsonlLog,
              *, concurrency: int = 4, desc: str = "", stream: TextIO | None = STDERR,
              abort_after: int | None = None) -> RunSummary:
    """Run `work(id, item)` for every item not yet in `log`, `concurrency` at a time.

    Each result is appended (by this thread) as soon as it is ready, so a kill loses at most
    the items in flight. A failing item is counted and reported (the first few errors are
    kept) and the run goes on; but if the first `abort_after` items to finish (default
    max(5, 2 x concurrency)) all fail, or every item fails, the run stops with a UserError
    naming the first error: the cause (a wrong URL, model or key) is almost surely shared.
    That error is a RunAborted, which carries the summary (callers write what the log holds).
    After an error the items in flight may end (up to JOIN_TIMEOUT_S; their results are not
    written): a worker thread still inside torch when the interpreter exits aborts the process.
    On Ctrl-C nothing waits; the workers are daemon threads. `stream=None` shows no progress.
    """
    ids = [item_id for item_id, _ in items]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        repeated = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"item ids must be unique; {repeated!r} appears more than once")
    todo = [(i, x) for i, x in items if i not in log.items and i not in log.done]
    summary = RunSummary(total=len(items), skipped=len(items) - len(todo), written=0, failed=0, seconds=0.0,
                         desc=desc)
    abort_after = abort_after or max(5, 2 * concurrency)
    progress = Progress(len(todo), desc, resolve_stream(stream))
    start = time.monotonic()
    results: queue.Queue = queue.Queue()
    slots = threading.Semaphore(concurrency)  # items started but not yet recorded here
    stop, workers = _start_workers(todo, work, concurrency, results, slots)
    interrupted = False
    try:
        for _ in range(len(todo)):
            item_id, result, error = _next_result(results)
            slots.release()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit raised inside a work function
            _record(item_id, result, error, log, summary)
            progress.update(summary.written + summary.failed + summary.empty, summary.failed)
            if summary.failed >= abort_after and summary.written == 0:
                raise RunAborted(f"{desc or 'run'}: the first {summary.failed} items all failed; stopping. "
                                 f"First error: {summary.errors[0]}", summary)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        stop.set()  # on an error or Ctrl-C: no new items start
        if not interrupted:  # let the items in flight end: a thread inside torch at exit aborts the process
            _join(workers, JOIN_TIMEOUT_S)
        progress.close()
        summary.seconds = time.monotonic() - start
    if todo and summary.failed == len(todo):
        raise RunAborted(f"{desc or 'run'}: every item failed. First error: {summary.errors[0]}", summary)
    return summary


def _start_workers(todo: list[tuple[str, Any]], work: Callable, concurrency: int, results: queue.Queue,
                   slots: threading.Semaphore) -> tuple[threading.Event, list[threading.Thread]]:
    """Daemon threads taking items in order and putting (id, result, error) on `results`. A
    worker starts an item only with a free slot (the main thread frees one per result it
    records), so a stop leaves at most `concurrency` items started and unrecorded."""
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    for entry in todo:
        tasks.put(entry)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if not slots.acquire(timeout=0.1):
                continue
            try:
                item_id, item = tasks.get_nowait()
            except queue.Empty:
                slots.release()
                return
            try:
                results.put((item_id, work(item_id, item), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which decides
                results.put((item_id, None, exc))

    workers = [threading.Thread(target=loop, name=f"posttrain-job-{number}", daemon=True)
               for number in range(min(concurrency, len(todo)))]
    for worker in workers:
        worker.start()
    return stop, workers


def _join(workers: list[threading.Thread], timeout_s: float) -> None:
    """Wait up to `timeout_s` in all for the workers to finish their current items."""
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


def _next_result(results: queue.Queue) -> tuple[str, Any, BaseException | None]:
    while True:  # short waits keep Ctrl-C responsive
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            continue


def _record(item_id: str, result: Any, error: BaseException | None, log: JsonlLog, summary: RunSummary) -> None:
    """Write one finished item's result to the log and count it."""
    if error is not None:
        summary.failed += 1
        if len(summary.errors) < MAX_ERRORS_KEPT:
            text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            summary.errors.append(f"{item_id}: {text}")
        return
    if result is None:
        summary.empty += 1
        return
    log.append_group(_as_records(result, item_id, log.key))
    summary.written += 1


def _as_records(result: dict | list[dict], item_id: str, key: str) -> list[dict]:
    if isinstance(result, dict):
        if result.get(key, item_id) != item_id:
            raise ValueError(f"work returned {key}={result[key]!r} for item {item_id!r}; a single record's {key} "
                             "must be its item's (or left out)")
        return [{key: item_id, **result}]
    if not isinstance(result, list) or not all(isinstance(r, dict) for r in result) or not result:
        raise TypeError(f"work must return a dict, a non-empty list of dicts or None; got {type(result).__name__}")
    return [{key: f"{item_id}/{j}", **r, "item": item_id, "parts": len(result)} for j, r in enumerate(result)]


# --------------------------------------------------------------------------- finished outputs and settings


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace `path` with `rows` all at once (a kill leaves the old file or the new one)."""
    from posttrain.files import write_atomically

    write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_resume_settings(out_dir: Path, settings: dict[str, Any], resuming: bool = True,
                          name: str = "settings.json", *, unrecorded: dict[str, str | None] | None = None) -> None:
    """Refuse to resume into a run directory whose records were made with other settings (kept in
    out_dir/`name` by the first run; nested dicts compared key by key, "policy.model"). A run that
    is not `resuming` (no records yet) saves its settings there, replacing any earlier ones.

    A key the recorded settings lack (kept only since a later version) is a change unless
    `unrecorded` says otherwise: its value is the refusal's words, or None for no refusal. A local
    model's identity (MODEL_FILES, see `model_identity`) that an earlier run did not keep, or kept
    under an earlier rule for the same files, is no change; another model is refused, naming it
    (`model_changed`)."""
    path = out_dir / name
    unrecorded = unrecorded or {}
    if resuming and path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        for key, old, new in _differences(recorded, settings):
            section, _, field_name = key.rpartition(".")
            if old is None and not _has_key(recorded, key):
                if field_name == MODEL_FILES or (key in unrecorded and unrecorded[key] is None):
                    continue
                if unrecorded.get(key):
                    raise ConfigError(f"{out_dir}: {unrecorded[key]}")
            if field_name == MODEL_FILES:
                said = model_changed(out_dir, f"{section}.model", _lookup(settings, f"{section}.model"), old, new)
                if said is None:
                    continue
                raise ConfigError(said)
            raise ConfigError(f"{out_dir} holds records made with {key}={old!r}, now {new!r}; resume with the "
                              "same setting, or use a new output_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _lookup(settings: dict, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _has_key(settings: dict, key: str) -> bool:
    head, _, last = key.rpartition(".")
    holder = _lookup(settings, head) if head else settings
    return isinstance(holder, dict) and last in holder


def _differences(old: dict, new: dict, prefix: str = ""):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b


def file_digest(path: Path) -> str:
    """A short content hash, to notice an input file that changed between a run and its resume."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


MODEL_FILES = "model_files"  # a local backend's key for `model_identity` in a run's recorded settings


def model_identity(backend_cfg) -> dict[str, Any]:
    """{MODEL_FILES: identity} of a local backend's model (kind "local"; `models.loading.model_identity`,
    the rule training's resume fingerprint keeps too: a copy of the same model is the same, one
    retrained in place is not, an adapter's includes its local base's), {} of a served one (its
    name is all a client knows). Recorded with a run's settings, so that `check_resume_settings`
    refuses a resume whose model changed."""
    if getattr(backend_cfg, "kind", None) != "local":
        return {}
    from posttrain.models.loading import model_identity as identity

    return {MODEL_FILES: identity(backend_cfg.model)}


def model_changed(out_dir: Path, setting: str, model: Any, recorded: Any, now: Any, records: str = "records") -> \
        str | None:
    """The refusal's words when the local model `setting`=`model` whose identity (MODEL_FILES) the
    `records` in out_dir were made with (`recorded`) is `now` another; None when it is the same, or
    an earlier rule recorded it for the model as it is (`models.loading.identified_earlier`)."""
    from posttrain.models.loading import identified_earlier

    if recorded == now or (isinstance(model, str) and identified_earlier(recorded, model)):
        return None
    how = "it is not there now" if now is None else "retrained or replaced in place"
    return (f"{out_dir} holds {records} made by the local model {setting}={model!r}, whose files have changed since "
            f"({how}); resuming would mix two models' outputs. Restore that model, or use a new output_dir")
