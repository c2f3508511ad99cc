"""Readers: data files → rows, each with the place it came from.

`iter_rows(path)` yields `(location, row)` pairs, lazily where the file type allows:

    JSON Lines  .jsonl .ndjson (+ .gz)   "file:LINE"   streamed line by line
    JSON        .json (+ .gz)            "file:LINE"   loaded whole (JSON cannot stream cheaply)
    CSV / TSV   .csv .tsv (+ .gz)        "file:LINE"   streamed; header row required
    Parquet     .parquet                 "file:row N"  streamed by record batch
    datasets    a save_to_disk directory "file:row N"  memory-mapped, iterated in batches

Line numbers are 1-based physical lines (for CSV, the line where the record starts;
the header is line 1; a JSON Lines or JSON file whose first line ends in a lone CR, as old
Mac OS wrote them, has its lines ended by CR). A row that cannot be parsed does not stop iteration:
it comes out as a `Malformed(reason, raw)` in place of the dict, so the caller can apply its
bad-row policy; a CSV record whose quoting does not parse is one (a TSV line is read as
written). So does a row holding a lone surrogate (JSON's "\\ud800" escape), which no
tokenizer or UTF-8 writer takes, or a NUL, in any file type. A problem with the file as a
whole (missing, unknown type, not valid JSON at all, unreadable, UTF-16 or UTF-32 by its
byte-order mark) raises `DataError`. A path may start with `~` (expanded here as in the
up-front check).
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

from posttrain.data.records import WrittenFloat
from posttrain.errors import DataError

ACCEPTED = ".jsonl, .ndjson, .json (each optionally .gz), .parquet, .csv, .tsv, or a datasets save_to_disk directory"

_JSON_WS = " \t\n\r"
_BATCH_SIZE = 1024


@dataclass(frozen=True)
class Malformed:
    """A row that could not be parsed: why, and its raw source text (or value) as found."""

    reason: str
    raw: Any = None


Row = Union[dict, Malformed]


def iter_rows(path: str) -> Iterator[tuple[str, Row]]:
    """Yield `(location, row)` for every row of `path`; see the module docstring.

    Raises DataError up front for a missing path or an unknown file type, and during
    iteration for a file that is unreadable as a whole.
    """
    path = os.path.expanduser(os.fspath(path))
    kind = check_path(path)
    if kind == "datasets":
        rows = _dataset_dir_rows(path)
    elif kind == "jsonl":
        rows = _jsonl_rows(path)
    elif kind == "json":
        rows = _json_rows(path)
    elif kind == "parquet":
        rows = _parquet_rows(path)
    else:
        rows = _csv_rows(path, delimiter="\t" if kind == "tsv" else ",")
    return _usable_text(rows)


def _usable_text(rows: Iterator[tuple[str, Row]]) -> Iterator[tuple[str, Row]]:
    """Every row, with one whose text (a key or a value, at any depth) holds a lone surrogate or a
    NUL made Malformed here, once for every file type and format."""
    for location, row in rows:
        if isinstance(row, dict):
            problem = unusable_text_at(row)
            if problem is not None:
                row = Malformed(problem, row)
        yield location, row


def unusable_text_at(value: Any) -> str | None:
    """Why a value read from a file (a row, or a cell's parsed list) cannot be training text, and
    where, as "<what> at 'messages'[1]['content']"; None when every string in it can be."""
    found = _text_path(value, _text_problem)
    return None if found is None else f"{found[1]} at {_where(found[0])}"


def _text_problem(text: str) -> str | None:
    """What makes `text` unusable as training text: a lone surrogate (no tokenizer or UTF-8 writer
    takes one), or a NUL (never text: the mark of a file cut by a crash or of UTF-16 read as UTF-8,
    and an end of string to C code)."""
    if "\x00" in text:
        return NUL_REASON
    if _unencodable(text):
        return "not valid Unicode: a lone surrogate"
    return None


NUL_REASON = "a NUL character (U+0000), which is no text"


def lone_surrogate_at(value: Any) -> str | None:
    """Where in `value` a string (a key or a value) holds a lone surrogate, as a path like
    "'messages'[1]['role']" ("its text" for a string itself); None when none does."""
    found = _text_path(value, _unencodable)
    return None if found is None else _where(found[0])


def _where(path: tuple) -> str:
    if not path:
        return "its text"
    head = repr(path[0]) if isinstance(path[0], str) else f"[{path[0]!r}]"
    return head + "".join(f"[{key!r}]" for key in path[1:])


def _text_path(value: Any, problem) -> tuple[tuple, Any] | None:
    """(the path to the first string in `value`, a key or a value, for which `problem` is truthy,
    what it returned); None when there is none. Checked on every row: the path is built only for
    a row that has one."""
    if isinstance(value, str):
        found = problem(value)
        return ((), found) if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str):
            found = problem(key)
            if found:
                return (key,), found
        inner = _text_path(item, problem)
        if inner is not None:
            return (key, *inner[0]), inner[1]
    return None


def _unencodable(text: str) -> bool:
    """A lone surrogate in `text`: the one thing UTF-8 cannot encode (4x faster than a regex)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def strict_rows(path: str) -> Iterator[tuple[str, Any]]:
    """`iter_rows` for files where every row must parse (constitutions, seed tasks, files to
    score): a malformed row raises DataError with its file:line instead of being yielded."""
    for location, row in iter_rows(path):
        if isinstance(row, Malformed):
            raise DataError(f"{location}: {row.reason}")
        yield location, row


def check_path(path: str) -> str:
    """The kind of data at `path` (jsonl, json, csv, tsv, parquet, datasets), without reading
    it; DataError if it is missing, of a type no reader takes, or not a regular file (a named
    pipe, a device). `~` is expanded."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        _check_dataset_dir(path)
        return "datasets"
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (expected {ACCEPTED}){missing_hint(path)}")
    kind = _file_kind(path)
    if kind == "unknown":
        plain = os.path.splitext(path)[1].lower() in (".txt", ".md")
        hint = '; for plain text, write JSON Lines rows {"text": ...}' if plain else ""
        raise DataError(f"{path}: unknown file type (expected {ACCEPTED}){hint}")
    mode = os.stat(path).st_mode  # never opened here: a named pipe with no writer blocks the open
    if not stat.S_ISREG(mode):  # a pipe or device streams once, and the readers seek and read again
        what = "a named pipe" if stat.S_ISFIFO(mode) else "not a regular file"
        raise DataError(f"{path}: {what}; posttrain reads a file more than once: write it to a file first")
    return kind


def files_in_both(paths: list[str], others: list[str]) -> list[str]:
    """The entries of `paths` (as given) that name a file also in `others`, by any spelling (`~`, a
    relative path, a link); 'synthetic', the bundled generator, is no file."""
    files = {_same_file(p) for p in _file_entries(others)}
    return [p for p in _file_entries(paths) if _same_file(p) in files]


def files_listed_twice(paths: list[str]) -> list[str]:
    """The entries of `paths` (as given) that name a file an earlier entry names, by any spelling;
    read twice, its rows would count twice (and a held-out split would put copies on both sides)."""
    seen: set[str] = set()
    twice = []
    for path in _file_entries(paths):
        file = _same_file(path)
        if file in seen:
            twice.append(path)
        seen.add(file)
    return twice


def _file_entries(paths: list[str]) -> list[str]:
    """The entries that name files: not 'synthetic' (the bundled generator), nor a value of another type
    (refused by the config's own checks)."""
    return [p for p in paths if isinstance(p, (str, os.PathLike)) and p != "synthetic"]


def _same_file(path: str) -> str:
    """One spelling for every path to a set of rows: `~` expanded, made absolute, links resolved;
    a DatasetDict directory is its train split's directory (what `_dataset_dir_rows` reads)."""
    path = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return os.path.realpath(os.path.join(path, DICT_SPLIT))
    return path


DICT_SPLIT = "train"  # the split of a DatasetDict directory that is read


def dataset_dict_splits(path: str) -> list[str] | None:
    """The splits a DatasetDict directory holds, as its dataset_dict.json lists them (read without
    loading the data); None for any other path. Only `DICT_SPLIT` is read of them."""
    listing = os.path.join(os.path.expanduser(os.fspath(path)), "dataset_dict.json")
    if not os.path.isfile(listing):
        return None
    try:
        with open(listing, encoding="utf-8") as f:
            splits = json.load(f).get("splits")
    except (OSError, ValueError, AttributeError):
        return None  # the load itself says what is wrong with the directory
    return [str(s) for s in splits] if isinstance(splits, list) else None


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def missing_hint(path: str) -> str:
    """What a path that does not exist was probably meant as: a wildcard (never expanded), or a
    Hugging Face Hub dataset name (read from the Hub by TRL, never by posttrain); else ""."""
    import glob

    if any(c in path for c in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(path)))
        found = f" (it matches {len(matches)}: {', '.join(matches[:3])}{', ...' if len(matches) > 3 else ''})"
        return f"; wildcards are not expanded: list the files{found if matches else ''}"
    head = path.split("/", 1)[0]
    if _HUB_NAME.fullmatch(path) and _file_kind(path) == "unknown" and not os.path.exists(head):
        return (f"; posttrain reads local files only — if {path} is a Hugging Face Hub dataset, bring it local "
                f"first: python -c \"import datasets; datasets.load_dataset('{path}', split='train')"
                f".save_to_disk('DIR')\" (or .to_json('FILE.jsonl')), then give DIR (or FILE.jsonl)")
    return ""


def _file_kind(path: str) -> str:
    name = os.path.basename(path).lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[: -len(".gz")]
    ext = os.path.splitext(name)[1]
    kinds = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
    if ext in kinds:
        return kinds[ext]
    if ext == ".parquet" and not compressed:
        return "parquet"
    return "unknown"


def _open_binary(path: str):
    """The file's bytes (decompressed for .gz); DataError for one that cannot be opened or
    that its byte-order mark says is UTF-16 or UTF-32 text (every reader here reads UTF-8)."""
    try:
        f = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        head = f.peek(4)[:4]
    except (OSError, EOFError):  # a corrupt .gz: reported by the read, at its line
        head = b""
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            f.close()
            raise DataError(f"{path}: {encoding} text (byte-order mark {bom.hex(' ').upper()}); save it as UTF-8")
    return f


# UTF-32 LE before UTF-16 LE: its mark begins with UTF-16 LE's. (pandas' to_csv(encoding="utf-16"),
# Excel's "Unicode Text" and PowerShell's `>` write UTF-16 with a mark.)
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


# --------------------------------------------------------------------------- JSON Lines


def _jsonl_rows(path: str) -> Iterator[tuple[str, Row]]:
    with _open_binary(path) as f:
        line_no = 0
        try:
            for raw in _physical_lines(f):
                line_no += 1
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # UTF-8 byte-order mark
                if not raw.strip():
                    continue  # blank lines are not rows
                yield f"{path}:{line_no}", _parse_json_line(raw)
        except (OSError, EOFError) as e:  # truncated or corrupt .gz, disk errors
            raise DataError(f"{path}:{line_no + 1}: cannot read past this line ({e})") from None


_CHUNK = 1 << 20
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _physical_lines(f) -> Iterator[bytes]:
    """The lines of a binary file, ended by "\n" (a "\r" before it stays on the line); in a file
    whose first line ends with a lone "\r" (old Mac OS), ended by "\r", "\r\n" or "\n", as text
    editors and Python's universal newlines read it. A lone "\r" elsewhere is no line end: it
    cannot be JSON whitespace between rows, and editors number such files by "\n"."""
    try:
        head = f.read(_CHUNK)
    except (OSError, EOFError):  # a corrupt .gz: the read below meets it at its line
        head = b""
    f.seek(0)
    if not _cr_ended(head):
        yield from f
        return
    rest = b""
    while chunk := f.read(_CHUNK):
        data = rest + chunk
        held = data[-1:] == b"\r"  # "\r" and a "\n" in the next chunk are one line end
        lines = _LINE_END.split(data[:-1] if held else data)
        rest = lines.pop() + (b"\r" if held else b"")
        yield from lines
    if rest:
        yield rest.rstrip(b"\r")


def _cr_ended(head: bytes | str) -> bool:
    """Whether the file starting with `head` has its lines ended by "\r" (see `_physical_lines`):
    its first line ends with a lone "\r"."""
    cr, lf = ("\r", "\n") if isinstance(head, str) else (b"\r", b"\n")
    first_cr, first_lf = head.find(cr), head.find(lf)
    return first_cr >= 0 and not 0 <= first_lf <= first_cr + 1


def text_lines(text: str) -> list[str]:
    """The lines of JSON Lines `text` as `iter_rows` numbers them (`_physical_lines`), without their
    ends: split at "\n" (in a CR-ended file, also at "\r"), never at U+2028, U+2029 or U+0085 as
    str.splitlines splits (a JSON string may hold those as written)."""
    return [line.decode("utf-8").rstrip("\r\n") for line in _physical_lines(io.BytesIO(text.encode("utf-8")))]


def _parse_json_line(raw: bytes) -> Row:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Malformed(f"not valid UTF-8 (byte {e.start} of the line)", raw.decode("utf-8", "replace").rstrip("\r\n"))
    text = text.rstrip("\r\n")
    if "\x00" in text:  # raw, it is also not JSON; said as in every other file type
        return Malformed(f"{NUL_REASON} at column {text.index(chr(0)) + 1}", text)
    try:
        value = json.loads(text, parse_float=WrittenFloat)  # 2.50 keeps its text
    except json.JSONDecodeError as e:
        return Malformed(f"invalid JSON: {e.msg} at column {e.colno}", text)
    except (RecursionError, ValueError) as e:
        return Malformed(f"invalid JSON: {_refused(e)}", text)
    if not isinstance(value, dict):
        return Malformed(f"expected a JSON object, got {_json_type(value)}", text)
    return value


def _refused(error: Exception) -> str:
    """Why Python's json refused text that is JSON: nesting too deep for it, or an integer
    longer than Python converts (sys.get_int_max_str_digits)."""
    if isinstance(error, RecursionError):
        return "nested too deeply for Python's json reader"
    return f"a number Python will not read ({error})"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# --------------------------------------------------------------------------- JSON


def _json_rows(path: str) -> Iterator[tuple[str, Row]]:
    """A top-level array of objects; an object with exactly one list-valued key holding the
    rows (`{"data": [...]}`); or a single object that is itself one row (a one-row file as
    `Dataset.to_json` writes it). A .json file that holds one object per line is read as JSON Lines.
    Lines are numbered as the JSON Lines reader numbers them (a file whose first line ends with a
    lone "\r" has its lines ended by "\r", "\r\n" or "\n"; JSON holds a raw "\r" nowhere else)."""
    text = _read_text(path)
    if _cr_ended(text):
        text = _ANY_LINE_END.sub("\n", text)
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return
    try:
        if text[pos] == "[":
            items, end = _scan_array(text, pos)
        elif text[pos] == "{":
            if _is_json_lines(text, pos):
                yield from _jsonl_rows(path)
                return
            items, end = _object_rows(path, text, pos)
        else:
            raise DataError(f"{path}: expected a JSON array of objects or an object like {{\"data\": [...]}}")
        if _skip_ws(text, end) != len(text):
            raise json.JSONDecodeError("Extra data", text, _skip_ws(text, end))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    except (RecursionError, ValueError) as e:  # a .json file is parsed whole: no row to blame alone
        raise DataError(f"{path}: cannot read the JSON: {_refused(e)}") from None
    line, last = 1, 0
    for offset, value in items:
        line += text.count("\n", last, offset)
        last = offset
        row = value if isinstance(value, dict) else Malformed(f"expected a JSON object, got {_json_type(value)}", value)
        yield f"{path}:{line}", row


_ANY_LINE_END = re.compile(r"\r\n?")


def _read_text(path: str) -> str:
    with _open_binary(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read the file ({e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WS:
        pos += 1
    return pos


_DECODER = json.JSONDecoder(parse_float=WrittenFloat)


def _scan_array(text: str, pos: int) -> tuple[list[tuple[int, Any]], int]:
    """Parse the array starting at text[pos] == "[", keeping each element's offset."""
    items: list[tuple[int, Any]] = []
    pos = _skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        value, end = _DECODER.raw_decode(text, pos)
        items.append((pos, value))
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            return items, pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


_JSON_LINES_LOOK = 5  # lines after a first line that does not parse, looked at for a whole object


def _is_json_lines(text: str, pos: int) -> bool:
    """True when more follows the first line and either the first line is a whole JSON object, or
    it is a bad row (a line that closes its braces, as a row does and a pretty-printed document's
    `{` does not), one of the next few non-blank lines is a whole object, and the whole text is not
    one JSON document (a pretty-printed object has such lines too)."""
    newline = text.find("\n", pos)
    if newline < 0 or _skip_ws(text, newline) == len(text):
        return False
    first = text[pos:newline]
    if _is_object(first):
        return True
    if not first.rstrip().endswith("}"):
        return False
    if not any(_is_object(line) for line in itertools.islice(_lines_after(text, newline), _JSON_LINES_LOOK)):
        return False
    try:
        json.loads(text)
    except ValueError:  # (JSONDecodeError is one)
        return True
    except RecursionError:  # one document too deep to read: refused as such
        return False
    return False


def _lines_after(text: str, newline: int) -> Iterator[str]:
    """The non-blank lines after the one ending at `newline`, without copying the rest of the text."""
    while newline >= 0:
        start, newline = newline + 1, text.find("\n", newline + 1)
        line = text[start:newline] if newline >= 0 else text[start:]
        if line.strip():
            yield line


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # (JSONDecodeError is a ValueError)
        return False


def _object_rows(path: str, text: str, pos: int) -> tuple[list[tuple[int, Any]], int]:
    """The rows of a top-level object: the elements of its one list-valued key when they are
    rows (`{"data": [...], "version": 1}`), else the object itself as one row — unless it is
    empty or an object of columns (every value a list, none a list of chat turns)."""
    keys, lists, end = _scan_object(text, pos)
    if len(lists) == 1:
        (items,) = lists.values()
        values = [value for _, value in items]
        if (not values or any(isinstance(v, dict) for v in values)) and not any(map(_is_turn, values)):
            return items, end
    holds_turns = any(any(_is_turn(value) for _, value in items) for items in lists.values())
    if not keys or (len(lists) == len(set(keys)) and not holds_turns):
        raise DataError(
            f"{path}: a top-level JSON object must be one row, or hold the rows under exactly one list-valued key "
            f"(like {{\"data\": [...]}}); found keys: {', '.join(repr(k) for k in keys[:10]) or 'none'}"
        )
    return [(pos, _DECODER.raw_decode(text, pos)[0])], end


def _is_turn(value: Any) -> bool:
    """A chat turn ({"role", "content"} or ShareGPT's {"from", "value"}): never a row of any format."""
    return isinstance(value, dict) and ("role" in value or "from" in value)


def _scan_object(text: str, pos: int) -> tuple[list[str], dict[str, list[tuple[int, Any]]], int]:
    """The object at text[pos] == "{": its keys in order, the elements (with offsets) of each
    list-valued key, and where it ends."""
    keys: list[str] = []
    lists: dict[str, list[tuple[int, Any]]] = {}
    pos = _skip_ws(text, pos + 1)
    while not text.startswith("}", pos) or keys:
        if not text.startswith('"', pos):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _skip_ws(text, pos + 1)
        keys.append(key)
        if text.startswith("[", pos):
            lists[key], pos = _scan_array(text, pos)
        else:
            lists.pop(key, None)  # a duplicate key: the last value wins, as in json
            _, pos = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text.startswith("}", pos):
            break
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _skip_ws(text, pos + 1)
    return keys, lists, pos + 1


# --------------------------------------------------------------------------- CSV


def _csv_rows(path: str, delimiter: str) -> Iterator[tuple[str, Row]]:
    """CSV, or TSV as pandas and Excel write it (a cell holding a tab, a quote or a line end is
    quoted). A record whose quoting does not parse costs its first line at most, never the file: a
    TSV line is then read as written (IANA's TSV has no quoting: `"Hello," she said`), a CSV line is
    a bad row; the lines after it are read again as records."""
    # Long text fields are normal in training data; the csv default caps a field at 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in its own row's text
    # (a strict decoder fails a whole chunk ahead of the row being parsed, at no useful line)
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        lines = _Replay(f)
        # strict: a quote left open is an error at its record, not a cell swallowing the rest of the file
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        header, line = None, 1
        try:
            while True:
                lines.taken.clear()
                try:
                    fields, used = next(reader), len(lines.taken)
                except StopIteration:
                    return
                except csv.Error as e:
                    if header is None:
                        raise
                    first, used = lines.taken[0].rstrip("\r\n"), 1
                    lines.push_back(lines.taken[1:])
                    if delimiter != "\t":
                        yield f"{path}:{line}", Malformed(f"cannot parse it as CSV ({e})", first)
                        line += 1
                        continue
                    fields = first.split("\t")
                location, line = f"{path}:{line}", line + used
                if not fields:
                    continue  # blank line
                if header is None:
                    _check_header(location, fields)
                    header = fields
                else:
                    yield location, _csv_row(fields, header)
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
            raise DataError(f"{path}:{line}: cannot parse CSV here ({e})") from None


class _Replay:
    """An iterator over lines that keeps the lines handed out (`taken`) and hands back again the
    lines pushed back, first to last."""

    def __init__(self, lines: Iterator[str]):
        self._lines = iter(lines)
        self._again: list[str] = []
        self.taken: list[str] = []

    def __iter__(self) -> _Replay:
        return self

    def __next__(self) -> str:
        line = self._again.pop() if self._again else next(self._lines)
        self.taken.append(line)
        return line

    def push_back(self, lines: list[str]) -> None:
        self._again.extend(reversed(lines))


def _csv_row(fields: list[str], header: list[str]) -> Row:
    undecoded = any(_UNDECODED.search(field) for field in fields)
    if undecoded:  # shown (and written to rejects) with U+FFFD for each byte
        fields = [_UNDECODED.sub("\ufffd", f) for f in fields]
    if len(fields) != len(header):
        reason = f"has {len(fields)} field(s) but the header has {len(header)}"
        return Malformed(reason + ("; not valid UTF-8" if undecoded else ""), fields)
    if undecoded:
        return Malformed("not valid UTF-8", fields)
    return dict(zip(header, fields))


_UNDECODED = re.compile("[\udc80-\udcff]")  # the bytes surrogateescape could not decode


def _check_header(location: str, header: list[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{location}: the header names column {name!r} twice; column names must be unique")
        seen.add(name)


# --------------------------------------------------------------------------- Parquet


def _parquet_rows(path: str) -> Iterator[tuple[str, Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row_no = 0
    try:
        for batch in parquet.iter_batches(batch_size=_BATCH_SIZE):
            for row in batch.to_pylist():
                row_no += 1
                yield f"{path}:row {row_no}", row
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}:row {row_no + 1}: cannot read the Parquet data ({e})") from None
    finally:
        parquet.close()


# --------------------------------------------------------------------------- datasets directory


def _dataset_dir_rows(path: str) -> Iterator[tuple[str, Row]]:
    """A directory written by `datasets`' `save_to_disk`.

    A `DatasetDict` directory is read through its "train" split (`DICT_SPLIT`); any other split is
    not read (pass the split's own subdirectory to read it instead); the data layer says which
    (`formats`, from `dataset_dict_splits`).
    """
    dataset = _load_dataset_dir(path)
    row_no = 0
    for batch in dataset.iter(batch_size=_BATCH_SIZE):
        columns = list(batch)
        size = len(batch[columns[0]]) if columns else 0
        for i in range(size):
            row_no += 1
            yield f"{path}:row {row_no}", {name: batch[name][i] for name in columns}


def _check_dataset_dir(path: str) -> None:
    markers = ("state.json", "dataset_dict.json")
    if not any(os.path.exists(os.path.join(path, m)) for m in markers):
        raise DataError(
            f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json or "
            f"dataset_dict.json); expected {ACCEPTED}{_files_inside(path)}"
        )


def _files_inside(path: str) -> str:
    """A hint for a directory of data files (a Hub snapshot's data/train-00000-of-00002.parquet):
    the files to list instead."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += sorted(os.path.join(root, f) for f in files if _file_kind(f) != "unknown")
        if len(found) > 3:
            break
    if not found:
        return ""
    return f"; it holds data files: list those instead ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"


def _load_dataset_dir(path: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DataError(f"{path}: cannot load the datasets directory ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if DICT_SPLIT not in loaded:
            splits = ", ".join(loaded) or "none"
            raise DataError(f"{path}: a DatasetDict without a '{DICT_SPLIT}' split (has: {splits}); "
                            "pass a split's directory")
        loaded = loaded[DICT_SPLIT]
    return loaded.with_format(None)  # plain Python values, whatever format it was saved with
