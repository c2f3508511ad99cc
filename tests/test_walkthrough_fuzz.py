"""A fuzzing walk over posttrain's inputs, where the earlier walks tried hand-picked bad rows. The brief's
rule: "malformed data rows reported with file:line and never crash a run silently or lose rows unannounced;
configs validated up front".

A small mutation harness takes one valid row of each format posttrain reads (SFT text, messages with a
system turn and content parts, ShareGPT, alpaca, prompt/completion; preference pairs as text, as turns and
with an implicit prompt; rankings with ties and with scores; KTO rows; RL prompt rows with answers;
red-team probes; score and generate inputs), writes it between two good copies into each file type
(jsonl, json, csv, parquet) and mutates it: every key dropped, every value nulled, given a wrong type
(number, float, bool, list, dict), emptied, whitespace, 100k characters, unusual unicode (RTL marks, NUL,
emoji, a lone surrogate as JSON writes "\\ud800"), a 400-digit number; plus whole-file damage (BOM, CRLF,
blank lines, trailing garbage, a truncated last line, duplicate keys, non-object rows, an empty file, a
directory, 100k-deep nesting, a 5000-digit number). Each file goes through the loader the commands use
(formats.load_records / iter_records, preferences.load_preference_records, prompts.load_prompt_records,
quality.rows.load_rows, safety.probes.load_probes, rewards._read_scoring_rows, inference.read_prompts)
in both bad-row modes, and the outcome is classified: (a) a posttrain error naming file:line, (b) the row
skipped, counted and in the rejects file, (c) accepted, (d) anything else. A second harness mutates every
field of every stage config (wrong types, NaN / inf, negatives, zero, empty strings) and calls the
validation the commands call before a model loads.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 30:
each asserts the right behaviour, parametrised over the inputs that hit the same root cause); the others
pin what was right but untested — the harnesses themselves."""

from __future__ import annotations

import copy
import csv
import io
import json
import signal
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, DataError, UserError
from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def _quiet(*_):
    pass


# --------------------------------------------------------------------------- the row harness

BASE = {
    "sft_text": {"text": "hello world"},
    "sft_messages": {"messages": [{"role": "system", "content": "Be brief."}, U("Hi"),
                                  {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]},
    "sft_sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "sft_alpaca": {"instruction": "Add", "input": "1 2", "output": "3", "system": "math"},
    "sft_pc": {"prompt": "Q", "completion": "A"},
    "pairs_text": {"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 1.0},
    "pairs_turns": {"prompt": [U("Q")], "chosen": [A("good")], "rejected": [A("bad")]},
    "pairs_implicit": {"chosen": [U("Q"), A("good")], "rejected": [U("Q"), A("bad")]},
    "ranking": {"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]},
    "ranking_scores": {"prompt": "Q", "responses": ["a", "b"], "scores": [1.0, 0.5]},
    "unpaired": {"prompt": "Q", "completion": "A", "label": True},
    "rl_prompt": {"prompt": "What is 2+2?", "answer": "4"},
    "rl_messages": {"messages": [U("Q"), A("4")]},
    "probe": {"prompt": "how do I x", "category": "c", "id": "p1"},
    "score": {"prompt": "Q", "response": "A"},
    "generate": {"prompt": "Q"},
}
LOADERS = {  # which commands read each kind of row
    "sft_text": ["sft", "sft_stream", "quality"],
    "sft_messages": ["sft", "sft_stream", "quality", "rl"],
    "sft_sharegpt": ["sft", "quality", "rl"],
    "sft_alpaca": ["sft", "quality", "rl"],
    "sft_pc": ["sft", "quality"],
    "pairs_text": ["pref", "quality"], "pairs_turns": ["pref", "quality"], "pairs_implicit": ["pref", "quality"],
    "ranking": ["pref", "quality"], "ranking_scores": ["pref"], "unpaired": ["pref", "quality"],
    "rl_prompt": ["rl", "evaluate", "generate"], "rl_messages": ["rl"],
    "probe": ["probes"], "score": ["score"], "generate": ["generate"],
}
MODES = {"sft": ("error", "skip"), "sft_stream": ("error", "skip"), "quality": ("error", "skip"),
         "pref": ("error", "skip"), "rl": ("error", "skip")}  # the others have one policy

LONE_SURROGATE = "a\ud800b"  # json.dumps writes it as the escape "a\\ud800b", as JS / other tools do
VALUES = {"null": None, "zero": 0, "float": 1.5, "true": True, "list": ["x"], "emptylist": [], "dict": {"a": 1},
          "empty": "", "ws": "  \t ", "long": "x" * 100_000, "nul": "a\x00b", "rtl": "\u202eabc\u200f",
          "emoji": "😀👍🏽", "surrogate": LONE_SURROGATE, "bignum": 10 ** 400}


def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _set(row, path, value=None, drop=False):
    row = copy.deepcopy(row)
    node = row
    for part in path[:-1]:
        node = node[part]
    if drop:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return row


def mutations(row, values=VALUES):
    for path in _paths(row):
        yield f"drop {path}", _set(row, path, drop=True)
        for name, value in values.items():
            yield f"{name} {path}", _set(row, path, value)
    yield "unknown key", {**row, "zzz_unknown": 1}


def write_rows(path: Path, rows: list[dict]) -> Path:
    kind = path.suffix
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == ".json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    elif kind in (".csv", ".tsv"):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="," if kind == ".csv" else "\t")
        writer.writerow(keys)
        for r in rows:  # a list cell as JSON, as datasets' to_csv writes one
            writer.writerow(["" if r.get(k) is None else r[k] if isinstance(r[k], str) else json.dumps(r[k])
                             for k in keys])
        path.write_text(buf.getvalue(), encoding="utf-8", errors="surrogatepass", newline="")
    elif kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def load(loader: str, path: Path, mode: str, rejects: Path | None):
    """(records, DataReport or None) as the command reading this kind of file reads it."""
    from posttrain import inference, rewards
    from posttrain.data import formats, preferences, prompts
    from posttrain.data.quality import rows as quality_rows
    from posttrain.safety import probes

    common = dict(bad_rows=mode, max_bad_fraction=1.0, rejects_path=str(rejects) if rejects else None, log=_quiet)
    if loader == "sft":
        return formats.load_records([str(path)], **common)
    if loader == "sft_stream":
        report = formats.DataReport()
        return list(formats.iter_records([str(path)], report=report, **common)), report
    if loader == "pref":
        return preferences.load_preference_records([str(path)], **common)
    if loader == "rl":
        return prompts.load_prompt_records([str(path)], **common)
    if loader == "evaluate":  # posttrain evaluate: skip, with its own fraction
        return prompts.load_prompt_records([str(path)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)
    if loader == "quality":
        return quality_rows.load_rows([str(path)], fmt="auto", **common)
    if loader == "probes":
        return probes.load_probes(str(path), bundled="unused"), None
    if loader == "score":
        return rewards._read_scoring_rows(str(path))[0], None
    if loader == "generate":
        return inference.read_prompts(str(path)), None
    raise AssertionError(loader)


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang


def outcome(loader: str, path: Path, mode: str, n_rows: int | None, tmp: Path) -> tuple[str, str]:
    """('a' | 'b' | 'c', detail), or ('d', what went wrong)."""
    rejects = tmp / "rejects.jsonl"
    rejects.unlink(missing_ok=True)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        records, report = load(loader, path, mode, rejects)
    except UserError as exc:
        message = str(exc)
        if f"{path}:" not in message and f"{path}" not in message:
            return "d", f"error without the file: {message[:200]}"
        return "a", message
    except _Hang:
        return "d", "hang"
    except Exception as exc:  # noqa: BLE001 - a raw exception is what the harness looks for
        return "d", f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if report is None:
        if n_rows is not None and len(records) != n_rows:
            return "d", f"{len(records)} rows read of {n_rows}"
        return "c", ""
    if report.good + report.bad != report.total or len(records) != report.good:
        return "d", f"counts disagree: {report.good} good + {report.bad} bad != {report.total}, {len(records)} kept"
    if n_rows is not None and report.total != n_rows:
        return "d", f"{report.total} rows counted of {n_rows}"
    if report.bad:
        if mode == "skip" and loader != "evaluate":
            written = rejects.read_text(encoding="utf-8").splitlines()
            if len(written) != report.bad:
                return "d", f"{report.bad} bad rows, {len(written)} in the rejects file"
        return "b", "; ".join(f"{r.location}: {r.reason}" for r in report.first_bad)[:300]
    return "c", ""


# What an accepted mutation may be: an optional key dropped / blanked / retyped within its meaning, a
# column the format ignores, or a text value that is still text. Anything else accepted is a defect.
_OPTIONAL = {"sft_alpaca": {"input", "system"}, "pairs_text": {"margin"}, "ranking": {"ranks"},
             "ranking_scores": {"scores"}, "rl_prompt": {"answer"}, "probe": {"category", "id"}}
_ABSENT_KINDS = {"drop", "null", "empty", "ws"}
_TEXT_KINDS = {"long", "nul", "rtl", "emoji"}


def acceptable(base: str, kind: str, path: tuple, loader: str, suffix: str) -> bool:
    top, leaf = path[0] if path else None, path[-1] if path else None
    if kind == "unknown key":
        return True
    if suffix == ".csv" and kind in ("zero", "float", "true", "dict", "list", "emptylist"):
        return True  # a CSV cell is text: "0", "true", '{"a": 1}' are text values there
    if suffix == ".parquet" and kind in ("zero", "float", "true", "dict", "list", "emptylist"):
        return True  # a Parquet column has one type: the writer converted the value to it
    if suffix == ".csv" and base == "pairs_turns" and kind in ("empty", "ws") and len(path) == 2:
        return True  # a '[""]' cell: a list of text, so text (a CSV cell can't tell turns from text there)
    if kind in _TEXT_KINDS:  # still text: fine wherever text is read as text
        return leaf not in ("role", "from", "type", "label") and not (base == "ranking" and top == "ranks") \
            and not (base == "ranking_scores" and top == "scores") and not (top == "margin")
    if base == "rl_prompt" and top == "answer" and loader == "generate":
        return True  # generate reads only the prompt
    if top in _OPTIONAL.get(base, ()) and len(path) == 1:
        return kind in _ABSENT_KINDS or (kind in ("zero", "float") and top in ("margin", "answer")) \
            or (kind in ("true", "bignum") and top == "answer")  # an answer as its exact digits / "true"
    if base in ("ranking", "ranking_scores") and top in ("ranks", "scores") and kind in ("zero", "float"):
        return len(path) == 2  # an entry as another number: still a ranking (unless all tied)
    if base == "unpaired" and top == "label" and kind in ("zero", "true"):
        return True  # 0 / 1 / true are labels
    if loader in ("rl", "evaluate") and base == "sft_alpaca" and top == "output" and kind in _ABSENT_KINDS:
        return True  # a prompt set's alpaca row needs no output
    if kind == "drop" and len(path) == 2 and top in ("messages", "conversations"):
        # a conversation losing a turn can still be a conversation: the system turn (any loader), the
        # assistant's (a prompt set: then it is all prompt), the user's after a system turn (sft takes
        # system + assistant, as TRL does)
        return path[1] == 0 and base == "sft_messages" or loader == "rl" or (base == "sft_messages" and path[1] == 1)
    if base == "generate" and kind == "drop":
        return False
    return False


def _cases(base_names, kinds, suffixes):
    for base in base_names:
        row = BASE[base]
        values = {k: v for k, v in VALUES.items() if k in kinds}
        for name, mutated in mutations(row, values):
            for suffix in suffixes:
                yield base, name, mutated, suffix


def _run_harness(tmp_path, suffixes, kinds, bases=tuple(BASE)) -> list[str]:
    problems = []
    for base, name, mutated, suffix in _cases(bases, kinds, suffixes):
        path = tmp_path / f"{base}{suffix}"
        try:
            write_rows(path, [BASE[base], mutated, copy.deepcopy(BASE[base])])
        except Exception:  # noqa: BLE001 - the file type cannot hold this mutation (parquet: mixed types)
            continue
        kind = name.split(" ", 1)[0] if name != "unknown key" else name
        where = eval(name.split(" ", 1)[1]) if name != "unknown key" else ()  # noqa: S307 - our own tuples
        line = {".jsonl": "2", ".json": "3", ".csv": "3", ".parquet": "row 2"}[suffix]  # the mutated row
        for loader in LOADERS[base]:
            for mode in MODES.get(loader, ("error",)):
                got, detail = outcome(loader, path, mode, 3, tmp_path)
                if got == "d":
                    problems.append(f"{base} {name} {suffix} {loader} {mode}: {detail}")
                elif got == "c" and not acceptable(base, kind, where, loader, suffix):
                    problems.append(f"{base} {name} {suffix} {loader} {mode}: accepted")
                elif got == "a" and mode == "error" and loader not in ("probes", "score", "generate") \
                        and f"{path}:{line}:" not in detail:
                    problems.append(f"{base} {name} {suffix} {loader}: error does not name {path.name}:{line}: "
                                    f"{detail}")
    return problems


def test_every_mutated_jsonl_row_is_located_skipped_or_rightly_accepted(tmp_path):
    kinds = set(VALUES)
    problems = _run_harness(tmp_path, [".jsonl"], kinds)
    assert not problems, f"{len(problems)} defects:\n" + "\n".join(problems[:400])


def test_every_mutated_json_csv_and_parquet_row_is_located_skipped_or_rightly_accepted(tmp_path):
    kinds = {"null", "zero", "true", "dict", "empty", "ws", "emoji", "nul"}
    problems = _run_harness(tmp_path, [".json", ".csv", ".parquet"], kinds)
    assert not problems, f"{len(problems)} defects:\n" + "\n".join(problems[:400])


# --------------------------------------------------------------------------- whole-file damage

def _damaged(kind: str, suffix: str) -> tuple[bytes, int]:
    """(file bytes, rows a reader should count) for a file of three good SFT text rows, damaged."""
    rows = [{"text": "hello world"}, {"text": "second row"}, {"text": "third row"}]
    lines = [json.dumps(r) for r in rows]
    body = {".jsonl": "\n".join(lines) + "\n", ".json": "[\n" + ",\n".join(lines) + "\n]\n",
            ".csv": "text\nhello world\nsecond row\nthird row\n"}[suffix]
    if kind == "bom":
        return b"\xef\xbb\xbf" + body.encode(), 3
    if kind == "crlf":
        return body.replace("\n", "\r\n").encode(), 3
    if kind == "blank lines":  # (a CSV line of spaces is a row: only empty lines are blank there)
        return body.replace("\n", "\n\n \n" if suffix == ".jsonl" else "\n\n").encode(), 3
    if kind == "duplicate keys":  # json keeps the last value, as every JSON reader does
        return body.replace('{"text": "second row"}', '{"text": "x", "text": "second row"}').encode(), 3
    if kind == "non-object rows":
        extra = ['"just text"', "42", "null", "[1, 2]"]
        lines2 = [lines[0], *extra, lines[1], lines[2]]
        return ("\n".join(lines2) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(lines2) + "]").encode(), 7
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, suffix", [
    (kind, suffix) for kind in ("bom", "crlf", "blank lines", "duplicate keys", "non-object rows")
    for suffix in (".jsonl", ".json", ".csv") if suffix != ".csv" or kind in ("bom", "crlf", "blank lines")])
def test_whole_file_damage_is_harmless_or_each_bad_row_is_located(tmp_path, kind, suffix):
    from posttrain.data.formats import load_records

    data, n = _damaged(kind, suffix)
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(data)
    records, report = load_records([str(path)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)
    assert report.total == n and report.good == 3
    assert [r.text for r in records] == ["hello world", "second row", "third row"]
    if kind == "non-object rows":
        assert [r.location for r in report.first_bad] == [f"{path}:{i}" for i in (2, 3, 4, 5)]


@pytest.mark.parametrize("what", ["empty", "blank", "directory", "truncated last line", "trailing garbage",
                                  "not parquet"])
def test_empty_truncated_or_wrong_files_are_named_before_any_row_trains(tmp_path, what):
    from posttrain.data.formats import load_records

    path = tmp_path / ("rows.parquet" if what == "not parquet" else "rows.jsonl")
    good = '{"text": "hello world"}\n{"text": "second row"}\n'
    if what == "directory":
        path = tmp_path / "rows"
        path.mkdir()
    else:
        path.write_text({"empty": "", "blank": "\n  \n", "truncated last line": good + '{"text": "thi',
                         "trailing garbage": good + "}{garbage\n", "not parquet": "PAR1 not parquet"}[what])
    with pytest.raises(DataError) as exc:
        load_records([str(path)], log=_quiet)
    message = str(exc.value)
    assert str(path) in message
    if what in ("truncated last line", "trailing garbage"):
        assert f"{path}:3: invalid JSON" in message


# --------------------------------------------------------------------------- defects: rows

def _row_file(tmp_path: Path, suffix: str, rows: list) -> Path:
    return write_rows(tmp_path / f"rows{suffix}", rows)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("loader, good, bad", [
    ("sft", {"text": "hello"}, {"text": LONE_SURROGATE}),
    ("sft", {"instruction": "Say hi", "output": "hi"}, {"instruction": "Say hi", "output": LONE_SURROGATE}),
    ("pref", {"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": LONE_SURROGATE,
                                                                 "rejected": "b"}),
    ("rl", {"prompt": "What is 2+2?", "answer": "4"}, {"prompt": LONE_SURROGATE, "answer": "4"}),
])
def test_a_lone_surrogate_is_a_bad_row_not_a_tokenizer_crash(tmp_path, suffix, loader, good, bad):
    path = _row_file(tmp_path, suffix, [good, bad, good])
    assert "\\ud800" in path.read_text()  # the file is valid JSON, ASCII only
    with pytest.raises(DataError) as exc:  # bad_rows=error: named before any model loads
        load(loader, path, "error", None)
    line = 3 if suffix == ".json" else 2  # a .json file's first line is its "["
    assert f"{path}:{line}" in str(exc.value)
    records, report = load(loader, path, "skip", tmp_path / "rejects.jsonl")
    assert (report.good, report.bad) == (2, 1)


@pytest.mark.parametrize("case", ["csv short row with a non-UTF-8 byte", "json row without 'rejected'",
                                  "jsonl turn with an unknown role"])
def test_skipping_a_bad_row_with_a_lone_surrogate_writes_it_to_rejects(tmp_path, case):
    if case.startswith("csv"):
        path = tmp_path / "rows.csv"
        path.write_bytes(b"prompt,chosen,rejected\nQ,a,b\n\xffQ only one field\nQ,c,d\n")
        loader = "pref"
    elif case.startswith("json row"):
        path = _row_file(tmp_path, ".json", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                             {"prompt": "Q", "chosen": LONE_SURROGATE},
                                             {"prompt": "Q", "chosen": "c", "rejected": "d"}])
        loader = "pref"
    else:
        path = _row_file(tmp_path, ".jsonl", [{"messages": [U("Hi"), A("Hello")]},
                                              {"messages": [{"role": LONE_SURROGATE, "content": "Hi"}, A("x")]},
                                              {"messages": [U("Hi"), A("Hey")]}])
        loader = "sft"
    rejects = tmp_path / "rejects.jsonl"
    records, report = load(loader, path, "skip", rejects)
    assert (report.good, report.bad) == (2, 1)
    written = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [w["location"] for w in written] == [f"{path}:2" if case.startswith("jsonl") else f"{path}:3"]


@pytest.mark.parametrize("value", [["human"], [], {"a": 1}])
@pytest.mark.parametrize("loader", ["sft", "rl", "quality"])
def test_a_sharegpt_from_that_is_not_text_is_a_bad_row(tmp_path, loader, value):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    bad = {"conversations": [{"from": value, "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = _row_file(tmp_path, ".jsonl", [good, bad, good])
    with pytest.raises(DataError) as exc:
        load(loader, path, "error", None)
    assert f"{path}:2: 'conversations'" in str(exc.value) or f"{path}:2: turn 1" in str(exc.value)


@pytest.mark.parametrize("column, cell", [
    ("prompt", [{"content": "Q"}]), ("chosen", [{"content": "good"}]), ("rejected", []),
], ids=["prompt turn without role", "chosen turn without role", "empty rejected"])
def test_a_csv_list_cell_that_is_not_turns_is_not_trained_on_as_text(tmp_path, column, cell):
    good = {"prompt": [U("Q")], "chosen": [A("good")], "rejected": [A("bad")]}
    bad = {**good, column: cell}
    jsonl = _row_file(tmp_path, ".jsonl", [good, bad, good])
    with pytest.raises(DataError, match=f"{jsonl}:2: '{column}'"):  # the same row as JSON Lines: a bad row
        load("pref", jsonl, "error", None)
    path = _row_file(tmp_path, ".csv", [good, bad, good])  # the cell as datasets' to_csv writes it: JSON
    assert list(csv.DictReader(path.open()))[1][column] == json.dumps(cell)
    with pytest.raises(DataError, match=f"{path}:3: '{column}'"):
        load("pref", path, "error", None)


@pytest.mark.parametrize("suffix, row", [
    (".jsonl", {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 10 ** 400}),
    (".jsonl", {"prompt": "Q", "responses": ["a", "b"], "ranks": [10 ** 400, 0]}),
    (".jsonl", {"prompt": "Q", "responses": ["a", "b"], "scores": [10 ** 400, 0]}),
    (".csv", {"prompt": "Q", "responses": ["a", "b"], "ranks": [10 ** 400, 0]}),  # (a CSV margin reads as inf: refused)
    (".csv", {"prompt": "Q", "responses": ["a", "b"], "scores": [10 ** 400, 0]}),
], ids=["margin", "ranks", "scores", "csv ranks", "csv scores"])
def test_a_huge_integer_in_a_numeric_field_is_a_bad_row(tmp_path, suffix, row):
    good = {**row, **{key: [1, 0] for key in ("ranks", "scores") if key in row}}
    good = {**good, "margin": 1.0} if "margin" in row else good
    path = _row_file(tmp_path, suffix, [good, row, good])
    with pytest.raises(DataError) as exc:
        load("pref", path, "error", None)
    line = 2 if suffix == ".jsonl" else 3
    assert f"{path}:{line}" in str(exc.value) and "finite number" in str(exc.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, "9" * 5000], ids=["deep", "digits"])
def test_json_the_parser_refuses_is_reported_as_bad_json(tmp_path, suffix, value):
    from posttrain.data.formats import load_records

    lines = ['{"text": "one"}', '{"text": "two", "x": ' + value + "}", '{"text": "three"}']
    path = tmp_path / f"rows{suffix}"
    path.write_text("\n".join(lines) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]")
    if suffix == ".jsonl":  # a line is a row: that row is bad, the others read
        records, report = load_records([str(path)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)
        assert (report.good, report.bad) == (2, 1) and report.first_bad[0].location == f"{path}:2"
    else:  # a .json file is parsed whole: the file is refused, by name
        with pytest.raises(DataError, match=str(path)):
            load_records([str(path)], log=_quiet)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_generate_reads_table_prompt_files_by_their_columns(tmp_path, suffix):
    from posttrain.inference import read_prompts

    path = write_rows(tmp_path / f"prompts{suffix}", [{"prompt": "What is 1+1?", "answer": "2"},
                                                      {"prompt": "What is 2+2?", "answer": "4"}])
    assert [row["prompt"] for row in read_prompts(str(path))] == ["What is 1+1?", "What is 2+2?"]


@pytest.mark.parametrize("blank", ["csv empty cell", "", "   "])
def test_a_blank_reference_answer_counts_as_no_answer(tmp_path, blank):
    from posttrain.data.prompts import load_prompt_records
    from posttrain.rewards import exact_match, missing_row_key

    rows = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+2?", "answer": blank}]
    if blank == "csv empty cell":
        path = write_rows(tmp_path / "prompts.csv", [rows[0], {"prompt": "What is 2+2?"}])
    else:
        path = write_rows(tmp_path / "prompts.jsonl", rows)
    records, _ = load_prompt_records([str(path)], log=_quiet)
    assert records[1].answer is None  # today "": exact_match gives an empty completion 1.0
    problem = missing_row_key({"exact_match": exact_match}, records)
    line = 3 if blank == "csv empty cell" else 2  # a CSV's header is line 1
    assert problem is not None and problem.startswith(f"{path}:{line}:")


@pytest.mark.parametrize("value, text", [(True, "true"), (False, "false")])
def test_a_boolean_answer_keeps_the_files_spelling(tmp_path, value, text):
    from posttrain.data.prompts import load_prompt_records

    path = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "Is the sky blue?", "answer": value}])
    records, _ = load_prompt_records([str(path)], log=_quiet)
    assert records[0].answer == text


def test_the_rejects_file_quotes_every_skipped_row_with_its_line(tmp_path):
    """Not a defect: bad rows of several kinds, each written to rejects with file:line and reason."""
    from posttrain.data.formats import load_records

    rows = [{"text": "ok"}, {"text": None}, {"text": ["x"]}, {"text": "  "}, {"text": "ok again"}, {"nope": 1}]
    path = _row_file(tmp_path, ".jsonl", rows)
    rejects = tmp_path / "rejects.jsonl"
    records, report = load_records([str(path)], bad_rows="skip", max_bad_fraction=1.0, rejects_path=str(rejects),
                                   log=_quiet)
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [w["location"] for w in written] == [f"{path}:{i}" for i in (2, 3, 4, 6)]
    assert [w["row"] for w in written] == [rows[i - 1] for i in (2, 3, 4, 6)]
    assert (report.good, report.bad, len(records)) == (2, 4, 2)


# --------------------------------------------------------------------------- the config harness

def _configs():
    from posttrain import config as C

    return [(C.SFTConfig, C.validate_sft), (C.RMConfig, C.validate_rm), (C.DPOConfig, C.validate_dpo),
            (C.GRPOConfig, C.validate_grpo), (C.PPOConfig, C.validate_ppo), (C.QualityConfig, C.validate_quality),
            (C.RedTeamConfig, C.validate_redteam), (C.EvaluateConfig, C.validate_evaluate)]


def _leaves(cls):
    from posttrain.config.schema import _walk

    return [(key, hint) for key, hint, _, _ in _walk(cls) if hint is not None]


def test_every_config_field_refuses_a_value_of_the_wrong_type_naming_the_field():
    """Every leaf of every stage config: a value of the wrong type, NaN or inf, or an unknown key is a
    ConfigError that names the field, from the same loading the command line uses."""
    import typing

    bad_for = {int: ["abc", "1.5", "[1, 2]", "{a: 1}", "true"], float: ["abc", "nan", "inf", "-inf", "[1, 2]", "true"],
               bool: ["abc", "2", "[]"], str: ["[1, 2]", "{a: 1}"]}
    problems = []
    for cls, validate in _configs():
        for key, hint in _leaves(cls):
            base = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union,) else hint
            values = bad_for.get(base, ["{a: 1}"] if typing.get_origin(hint) is list else ["not-a-choice"])
            for value in values:
                try:
                    validate(cls.load(None, [f"{key}={value}"]))
                except ConfigError as exc:
                    if key not in str(exc):
                        problems.append(f"{cls.__name__} {key}={value}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{cls.__name__} {key}={value}: raw {type(exc).__name__}: {exc}")
                    continue
                problems.append(f"{cls.__name__} {key}={value}: accepted")
        try:
            cls.load(None, ["zzz_section.unknown=1"])
            problems.append(f"{cls.__name__}: unknown key accepted")
        except ConfigError as exc:
            assert "zzz_section" in str(exc)
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("stage, override, key", [
    ("sft", "train.seed=-1", "train.seed"),
    ("grpo", "train.seed=4294967296", "train.seed"),
    ("quality", "dedup.seed=-1", "dedup.seed"),
    ("grpo", "rollout.top_p=0", "rollout.top_p"),
    ("ppo", "rollout.top_p=1.5", "rollout.top_p"),
    ("grpo", "data.max_bad_fraction=2", "data.max_bad_fraction"),
    ("ppo", "data.max_bad_fraction=-1", "data.max_bad_fraction"),
    ("sft", "eval.max_new_tokens=-1", "eval.max_new_tokens"),
])
def test_out_of_range_settings_are_refused_up_front(stage, override, key):
    from posttrain import config as C

    cls, validate = {"sft": (C.SFTConfig, C.validate_sft), "grpo": (C.GRPOConfig, C.validate_grpo),
                     "ppo": (C.PPOConfig, C.validate_ppo), "quality": (C.QualityConfig, C.validate_quality)}[stage]
    extra = ["eval.exact_match_prompts=2"] if key == "eval.max_new_tokens" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cls.load(None, [override, *extra]))


def test_a_negative_seed_on_the_command_line_is_a_one_line_error(tmp_path, capsys):
    rc, out = run_cli(capsys, "sft", "train.seed=-1", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                      "data.synthetic_size=16", "train.progress_bar=false")
    assert rc == 2 and "train.seed" in out


@pytest.mark.parametrize("stage, override, key", [
    ("sft", "data.synthetic_tasks=[smalest]", "data.synthetic_tasks"),
    ("sft", "data.synthetic_tasks=[]", "data.synthetic_tasks"),
    ("sft", "data.synthetic_size=0", "data.synthetic_size"),
    ("dpo", "data.synthetic_tasks=[smalest]", "data.synthetic_tasks"),
    ("grpo", "data.synthetic_size=0", "data.synthetic_size"),
    ("ppo", "data.synthetic_tasks=[]", "data.synthetic_tasks"),
])
def test_synthetic_data_settings_are_checked_before_the_model_loads(stage, override, key):
    from posttrain import config as C

    cls, validate = {"sft": (C.SFTConfig, C.validate_sft), "dpo": (C.DPOConfig, C.validate_dpo),
                     "grpo": (C.GRPOConfig, C.validate_grpo), "ppo": (C.PPOConfig, C.validate_ppo)}[stage]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cls.load(None, [override]))


def test_evaluate_checks_its_synthetic_tasks_up_front():
    """Not a defect: evaluate already does what the xfail above asks of the training stages."""
    from posttrain import config as C

    with pytest.raises(ConfigError, match=r"prompts\.synthetic_tasks"):
        C.validate_evaluate(C.EvaluateConfig.load(None, ["prompts.synthetic_tasks=[smalest]"]))


def test_a_bad_row_on_the_command_line_is_one_error_naming_file_and_line(tmp_path, capsys):
    """The CLI end of the row harness: a wrong-typed value in row 2 of a file, under bad_rows=error."""
    path = _row_file(tmp_path, ".jsonl", [{"instruction": "Say hi", "output": "hi"},
                                          {"instruction": "Say hi", "output": {"a": 1}},
                                          {"instruction": "Say hi", "output": "hello"}])
    rc, out = run_cli(capsys, "sft", f"data.train_files=[{path}]", f"output_dir={tmp_path / 'run'}",
                      "train.max_steps=1", "train.progress_bar=false")
    assert rc == 2 and f"{path}:2: 'output' is an object, expected a string" in out
