"""`posttrain generate` and `posttrain chat`: load a trained model, render prompts, sample."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from posttrain.errors import DataError, UserError


def resolve_model_dir(path: str) -> str:
    """A run directory means its final model; anything else is used as given."""
    candidate = Path(path) / "final"
    return str(candidate) if candidate.is_dir() else path


def check_output_path(path: str, flag: str = "--output") -> None:
    """An output file's place, checked before any work: its directory must exist ('-' is stdout),
    and the path must not be a directory; a UserError names the flag."""
    if path == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file to write")
    parent = target.parent
    if not parent.exists():
        raise UserError(f"{flag} {path}: the directory {parent} does not exist; create it first (mkdir -p {parent})")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")


PROGRESS_EVERY = 5.0  # seconds between progress lines on stderr


class Progress:
    """'what: N/M rows' on stderr as rows are done (`advance`): every PROGRESS_EVERY seconds, and
    at the last row when an earlier line was said (a job done within the interval says nothing)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done = total, what, 0
        self._said, self._spoken = time.monotonic(), False

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._said >= PROGRESS_EVERY or (self.done >= self.total and self._spoken):
            self._said, self._spoken = now, True
            print(f"{self.what}: {self.done}/{self.total} rows", file=sys.stderr, flush=True)


class RowWriter:
    """An output file's rows, written in input order as they are done: `put(i, line)` (each line
    ending in a newline) writes row i once rows 0 .. i-1 are out, flushed, so a job stopped
    part-way keeps every row before its first undone one.

    A file is written as PATH.partial and renamed over PATH when the last row is in (used as a
    context manager, at its end): PATH is never half of a file, and an earlier PATH stays until
    then. When the job fails, the rows written stay in PATH.partial and one stderr line says so
    (nothing written: it is removed). '-' (stdout) and a path that is not a plain file (a device,
    a pipe) are written in place. An OSError (a full disk: ENOSPC) names the path, and the CLI
    says it in one line; a closed stdout pipe (`| head`) is the caller's to end quietly
    (console.run). `what` ("generate", "score"): the rows done are said as `Progress` says them."""

    def __init__(self, path: str, total: int, what: str | None = None):
        self.path, self.total, self.written = path, total, 0
        self.progress = None if what is None else Progress(total, what)
        self._waiting: dict[int, str] = {}
        in_place = path == "-" or (Path(path).exists() and not Path(path).is_file())
        self.partial = None if in_place else f"{path}.partial"
        self._file = None
        if path != "-":
            self._file = self._io(lambda: open(self.partial or path, "w", encoding="utf-8"))

    def _io(self, action):
        try:
            return action()
        except OSError as exc:
            exc.filename = exc.filename or ("stdout" if self.path == "-" else self.path)
            raise

    def put(self, index: int, line: str) -> None:
        self._waiting[index] = line
        ready = []
        while self.written + len(ready) in self._waiting:
            ready.append(self._waiting.pop(self.written + len(ready)))
        if ready:
            out = sys.stdout if self._file is None else self._file
            self._io(lambda: (out.writelines(ready), out.flush()))
            self.written += len(ready)
        if self.progress is not None:
            self.progress.advance()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._file is not None:
            self._io(self._file.close)
        if self.partial is None:
            return
        if kind is None and self.written == self.total:
            self._io(lambda: os.replace(self.partial, self.path))
        elif self.written == 0:
            Path(self.partial).unlink(missing_ok=True)
        else:
            print(f"{self.written} of {self.total} rows written to {self.partial} before the error",
                  file=sys.stderr)


def check_model_dir(path: str, what: str = "model") -> None:
    """The path checks load_for_inference makes first, without loading anything: a missing
    reference is said before the policy's minutes of loading, not after."""
    from posttrain.models.adapters import is_adapter_dir
    from posttrain.models.loading import resolve_model_path

    resolved = resolve_model_dir(path)
    if not is_adapter_dir(resolved):
        try:
            resolve_model_path(resolved)
        except UserError as exc:
            raise UserError(f"{what}: {exc}") from None


def _warn_other_base(adapters: dict[str, str], base: str) -> None:
    """An adapter loaded onto a base other than the one it was trained on still runs, and answers
    badly: say so (the shapes match across fine-tunes of one model, so nothing else will)."""
    import sys

    from posttrain.models.adapters.io import read_layout
    from posttrain.models.loading import resolve_model_path

    def where(path: str) -> str:
        try:
            return str(resolve_model_path(path))
        except UserError:
            return str(path)

    for name, path in adapters.items():
        trained_on = read_layout(path)[0]
        if where(trained_on) != where(base):
            print(f"warning: adapter {name} was trained on {trained_on}; it is loaded onto {base}", file=sys.stderr)


def load_for_inference(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                       adapters: dict[str, str] | None = None):
    """(model, tokenizer) from a preset, a full model dir, a run dir or an adapter dir (base read from it).

    `adapters` ({name: adapter dir}) loads several LoRA / IA3 adapters onto the base `path`;
    the first is active, `model.use_adapter(name)` switches.
    """
    from posttrain.config import ModelConfig
    from posttrain.models.adapters import is_adapter_dir, load_adapted
    from posttrain.models.loading import load_model, load_tokenizer

    path = resolve_model_dir(path)
    if adapters:
        base = None if is_adapter_dir(path) else path
        named = {name: resolve_model_dir(p) for name, p in adapters.items()}
        if base is not None:
            _warn_other_base(named, base)
        if base is None:
            named = {"default": path, **named}
        model = load_adapted(named, dtype=dtype, trust_remote_code=trust_remote_code, base=base)
    elif is_adapter_dir(path):
        model = load_adapted(path, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        model = load_model(ModelConfig(path=path, dtype=dtype, trust_remote_code=trust_remote_code))
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def read_prompts(path: str) -> list[dict]:
    """The rows of `read_prompt_rows`, without their places."""
    return [row for _, row in read_prompt_rows(path)]


def read_prompt_rows(path: str) -> list[tuple[str, dict]]:
    """(file:line, row) pairs: prompt rows (each checked by `prompt_record`: read as RL reads a
    prompt row) from any file the data readers take (JSON Lines, JSON, CSV / TSV, Parquet, a
    `datasets` `save_to_disk` directory; a table read by its columns, as training and score read
    it), each as the file gives it and placed as the readers place it; any other file is one
    prompt a line (blank lines skipped, so a prompt's place is its line, not its index)."""
    from posttrain.data.readers import _file_kind

    file = Path(path)
    if file.is_dir():  # the readers take a save_to_disk directory, and say what is wrong with another
        return _json_prompts(path)
    if not file.is_file():
        raise UserError(f"prompts file {path} does not exist")
    if _file_kind(path) != "unknown":
        return _json_prompts(path)
    data = file.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # UTF-8 byte-order mark
    items = []
    # one prompt per "\n"-ended line: str.splitlines would also split at form feeds, U+2028, ...
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: not UTF-8 text") from None
        if line.strip():
            items.append((f"{path}:{number}", {"prompt": line}))
    return items


_TURN_KEYS = ("messages", "conversations")  # a conversation's column: OpenAI's, or ShareGPT's
_WANTED = ("expected an object with 'prompt' or 'messages' (or ShareGPT's 'conversations'), a question under "
           "'question' or 'problem', or alpaca's 'instruction'")


def _json_prompts(path: str) -> list[tuple[str, dict]]:
    """(location, prompt row) pairs from a data file (`data.readers`); file:line on a bad one."""
    from posttrain.data.readers import Malformed, iter_rows

    items = []
    for location, row in iter_rows(path):
        if isinstance(row, Malformed):
            if row.reason == "expected a JSON object, got a string":  # a prompt string: ["...", ...] or a line "..."
                row = {"prompt": _string_row(row.raw)}
            elif row.reason.startswith("invalid JSON"):
                raise DataError(f"{location}: not valid JSON ({row.reason.removeprefix('invalid JSON: ')})")
            elif row.reason.startswith("expected a JSON object"):
                raise DataError(f"{location}: {_WANTED}")
            else:
                raise DataError(f"{location}: {row.reason}")
        blank = [key for key in _TURN_KEYS if key in row and row[key] in (None, "")]
        if blank and any(key in row and key not in blank for key in ("prompt", *_TURN_KEYS)):
            row = {key: value for key, value in row.items() if key not in blank}  # a table's other column
        row = _decoded_cells(row, location)
        prompt_record(row, location)  # a bad row, or a bad 'tools', is said before the model loads
        items.append((location, row))
    return items


def prompt_record(row: dict, source: str = "<prompt>"):
    """A prompt row read as RL reads one (`data.prompts.to_prompt_record`, its format told from its
    keys as `detect_prompt_format` tells a file's, a table's blank cell being no key where another
    column is read): a `PromptRecord` of its prompt turns (a `system` key's turn first; a
    conversation's turns before its last answer, that answer its reference), its tools, reference
    answer and other fields. A row it cannot read is a DataError naming `source` (its file:line).
    generate asks, and score scores, the prompt RL would ask of the same row."""
    from posttrain.data.formats import BadRowError
    from posttrain.data.preferences import absent
    from posttrain.data.prompts import PROMPT_FORMATS, detect_prompt_format, to_prompt_record

    def told(keys: dict) -> str | None:
        try:
            fmt = detect_prompt_format([keys], where=source)
        except DataError:
            return None
        return fmt if fmt in PROMPT_FORMATS else None

    if not isinstance(row, dict):
        raise DataError(f"{source}: {_WANTED}")
    fmt = told({key: value for key, value in row.items() if not absent(row, key)}) or told(row)
    if fmt is None:
        raise DataError(f"{source}: {_WANTED}")
    try:
        return to_prompt_record(row, fmt, source)
    except BadRowError as exc:
        raise DataError(f"{source}: {exc.reason}") from None


def _decoded_cells(row: dict, location: str) -> dict:
    """A CSV cell holding the turns of 'messages' / 'conversations' (or of 'prompt', when it
    starts like turns) as the list it writes (JSON or Python's repr), as training reads the cell."""
    from posttrain.data.formats import BadRowError, decode_cell
    from posttrain.data.preferences import _TURNS_TEXT

    decoded = {}
    for key in (*_TURN_KEYS, "prompt"):
        value = row.get(key)
        if isinstance(value, str) and (key != "prompt" or _TURNS_TEXT.match(value)):
            try:
                decoded[key] = decode_cell(value, repr(key))
            except ValueError:
                pass  # said by prompt_record: not a list of turns
            except BadRowError as exc:
                raise DataError(f"{location}: {exc.reason}") from None
    return {**row, **decoded}


def _string_row(raw: str) -> str:
    """The prompt a JSON string row holds: a JSON array's item comes as its value, a JSON line
    as its text."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, str) else raw


def render(item: dict, tokenizer, template: str | None, source: str = "<prompt>") -> str:
    """A prompt row as the model's input text: its prompt turns and tools, read as RL reads them
    (`prompt_record`), through the chat template with the assistant's generation prompt, as RL
    renders its prompts (`data.templates.render`: a row the template refuses, or whose tools it
    does not show, is a DataError naming `source`, the row's file:line); with no template (None),
    the text of a prompt that is one user turn and no tools."""
    from posttrain.data.templates import render as render_chat

    record = prompt_record(item, source)
    if template is None:
        turn = record.prompt[0]
        if len(record.prompt) > 1 or turn["role"] != "user" or record.tools is not None \
                or not isinstance(turn.get("content"), str):
            raise DataError(f"{source}: --template none needs plain prompts (one text), not a conversation, a "
                            "system turn or tools")
        return turn["content"]
    return render_chat(tokenizer, template, record.prompt, True, source, record.tools)


def add_template_argument(parser, none: bool = True) -> None:
    """`--template`: a chat template's name (`data.templates.TEMPLATE_NAMES`), and with `none`
    (generate, chat, serve) `none`: raw prompts (`chat_template`). score's reward models render
    every row with a template: none=False."""
    from posttrain.data.templates import TEMPLATE_NAMES  # no torch: --help stays fast

    told = ("chat template (auto: the tokenizer's own, else chatml; tokenizer: its own, an error when it has none; "
            "chatml, alpaca: the built-in ones)")
    if none:
        told += "; none: raw prompts with the tokenizer's special tokens, and no end-of-turn marker ends a completion"
    parser.add_argument("--template", default="auto", choices=(*TEMPLATE_NAMES, "none") if none else TEMPLATE_NAMES,
                        help=told)


def chat_template(tokenizer, name: str, flag: str = "--template") -> str | None:
    """The chat template `flag NAME` means (`data.templates.resolve_template`); None for `none`:
    prompts go in raw, with the tokenizer's special tokens, and no template's end-of-turn marker
    ends a completion (`raw=True` in `rollout.generate`). An error about NAME names `flag`."""
    from posttrain.data.templates import resolve_template

    if name == "none":
        return None
    return resolve_template(tokenizer, name, flag)


SAMPLING_DEFAULTS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
"""generate's and chat's settings where neither a flag nor the model's generation_config sets one
(temperature 0: greedy). The CLI leaves a flag not given as None (`_settings`)."""


def _settings(args):
    """(the sampling flags as settings, the names of those given), checked (a UserError, before any
    model loads). A flag left None is not given: SAMPLING_DEFAULTS holds it until the model's
    generation_config is read (`with_model_defaults`)."""
    from posttrain.rollout.sampling import SamplingSettings

    if getattr(args, "batch_size", 1) < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if any(not stop for stop in args.stop):
        raise UserError("--stop '' would end every completion at its first token")
    given = {name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name, None) is not None}
    try:
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, **{**SAMPLING_DEFAULTS, **given},
                                    frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                                    stop=list(args.stop), seed=args.seed)
        settings.check_penalty_range()
        return settings, set(given)
    except ValueError as exc:
        raise UserError(f"{exc} (a sampling flag)") from None


def with_model_defaults(settings, given: set[str], model):
    """`settings` with what the user did not give (`given`: the flags set) taken from the model's
    generation_config (`sampling.generation_config_settings`: as transformers' generate reads it),
    so the precedence is flag > the model's generation_config > SAMPLING_DEFAULTS. What is taken is
    said in one stderr line; a value there that posttrain refuses is a UserError naming the file."""
    from dataclasses import replace

    from posttrain.rollout.sampling import generation_config_settings

    taken = {name: value for name, value in
             generation_config_settings(getattr(model, "generation_config", None)).items() if name not in given}
    if not taken:
        return settings
    try:
        settings = replace(settings, **taken)
    except (ValueError, TypeError) as exc:
        raise UserError(f"the model's generation_config.json: {exc}; set the flag to override it") from None
    said = ", ".join(f"{name} {value:g}" for name, value in taken.items())
    print(f"sampling from the model's generation_config.json: {said} (a flag overrides each)", file=sys.stderr)
    return settings


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UserError(f"{flag} {item!r} must look like NAME=VALUE")
        pairs[name] = value
    return pairs


def _load(args):
    """Model and tokenizer for generate/chat, with named adapters, a mix and the active one set."""
    from posttrain.models.adapters import combine_adapters

    adapters = _pairs(args.adapter, "--adapter")
    model, tokenizer = load_for_inference(args.model, args.dtype, args.trust_remote_code, adapters=adapters)
    if args.mix:
        try:
            weights = {name: float(w) for name, w in _pairs(args.mix, "--mix").items()}
        except ValueError:
            raise UserError(f"--mix weights must be numbers: {args.mix}") from None
        if not hasattr(model, "adapter_names"):
            raise UserError("--mix needs adapters (--adapter NAME=DIR)")
        combine_adapters(model, weights, "mix")
    if args.use:
        if not hasattr(model, "use_adapter"):
            raise UserError("--use needs adapters (--adapter NAME=DIR)")
        model.use_adapter(args.use)
    return model, tokenizer


WINDOW_BATCHES = 8  # generate sorts prompts by length within runs of this many batches (`generate_token_ids`)


def _generate_per_adapter(model, tokenizer, items, texts, settings, batch_size, template=None,
                          raw=False, on_done=None, names=None) -> list[str]:
    """Requests that name an adapter ("adapter": NAME) run with it; the rest with the active one.
    `template`: the chat template the texts were rendered with (its end-of-turn marker ends them);
    `raw`: no template was applied (the tokenizer adds its BOS, `generate.prompt_token_ids`);
    `on_done(i, completion)`: hears each item's completion when it is done, the first items
    first (prompts are sorted by length within runs of WINDOW_BATCHES batches only); `names`:
    each item's file:line, for an error about it. Every item keeps its index i among the items,
    so a seeded one samples from (seed, i) whichever adapter runs it."""
    from posttrain.rollout.generate import generate

    window = WINDOW_BATCHES * batch_size
    wanted = [item.get("adapter") for item in items]
    if not any(wanted):
        return generate(model, tokenizer, texts, settings, batch_size=batch_size, template=template, raw=raw,
                        window=window, on_done=on_done, names=names)
    if not getattr(model, "adapter_names", list)():
        raise UserError("a prompt names an adapter but no LoRA / IA3 adapter is loaded; pass --adapter NAME=DIR")
    active = model.active_adapter
    completions: list[str] = [""] * len(items)
    for name in dict.fromkeys(w or active for w in wanted):
        rows = [i for i, w in enumerate(wanted) if (w or active) == name]
        model.use_adapter(name)
        done = None if on_done is None else (lambda j, text, rows=rows: on_done(rows[j], text))
        for i, text in zip(rows, generate(model, tokenizer, [texts[i] for i in rows], settings, batch_size=batch_size,
                                          template=template, raw=raw, window=window, on_done=done, indices=rows,
                                          names=None if names is None else [names[i] for i in rows])):
            completions[i] = text
    model.use_adapter(active)
    return completions


def main(args) -> int:
    from posttrain.rollout.generate import chat_session

    settings, given = _settings(args)  # flags, prompts and the output's place checked before the model loads
    if args.command == "chat" and args.template == "none":
        from posttrain.data.templates import TEMPLATE_NAMES

        raise UserError(f"chat needs a chat template: --template {'|'.join(TEMPLATE_NAMES)} (none, raw text, is "
                        "for generate and serve's completions)")
    if args.command != "chat":
        check_output_path(args.output)
    placed = read_prompt_rows(args.prompts) if args.command != "chat" else []
    names, items = [name for name, _ in placed], [item for _, item in placed]
    if args.command != "chat" and not items:
        raise DataError(f"{args.prompts}: no prompts (an empty file, or only blank lines)")
    answered = sum("completion" in item for item in items)
    if answered:
        print(f"note: {answered} of {len(items)} prompt rows have a 'completion' field; the output row's "
              "'completion' is the generated one, in its place", file=sys.stderr)
    model, tokenizer = _load(args)
    settings = with_model_defaults(settings, given, model)
    template = chat_template(tokenizer, args.template)
    if args.command == "chat":
        switch = getattr(model, "use_adapter", None)
        chat_session(model, tokenizer, template, settings, system=args.system, switch_adapter=switch)
        return 0
    texts = [render(item, tokenizer, template, name) for name, item in placed]
    with RowWriter(args.output, len(items), "generate") as out:  # each row as soon as the rows before it are done
        _generate_per_adapter(model, tokenizer, items, texts, settings, args.batch_size, template,
                              raw=template is None, names=names,
                              on_done=lambda i, text: out.put(i, json.dumps({**items[i], "completion": text},
                                                                       ensure_ascii=False) + "\n"))
    if args.output != "-":
        print(f"wrote {len(items)} completions to {args.output}", file=sys.stderr)
    return 0


def merge_main(args) -> int:
    """`posttrain merge`: adapters folded into the base, saved as a plain transformers model.

    The base is loaded in float32 (a float64 checkpoint too: posttrain loads no wider), the
    adapter merged there, and the result cast once to `--dtype`, or to the base checkpoint's
    dtype when none is given: loading a bfloat16 base in bfloat16 would round W, and W + ΔW
    would be rounded again. Cast to bfloat16, an update under half a bfloat16 step of its weight
    is still lost; `--dtype float32` keeps it."""
    import torch

    from posttrain.models.adapters.io import (check_mergeable, is_adapter_dir, merge_adapted, method_names, peft_task,
                                              read_layout)
    from posttrain.models.loading import resolve_model_path, save_model
    from posttrain.models.presets import is_preset

    if not Path(args.adapter).exists() and not is_preset(args.adapter):
        raise UserError(f"{args.adapter} does not exist; give a run directory (its final/) or an adapter directory")
    path = resolve_model_dir(args.adapter)
    if not is_adapter_dir(path):
        raise UserError(_no_adapter_message(path))
    base, parts = read_layout(path)
    check_mergeable(parts)  # from the files, before the base loads
    base_dir = resolve_model_path(base)  # as the loader reads it: a preset's built directory, a run's final/
    out = Path(args.output)
    _check_merge_output(out, Path(path), Path(args.adapter), base_dir)
    dtype = args.dtype or _checkpoint_dtype(base_dir)
    methods = "+".join(method_names(parts))
    if peft_task(path) == "SEQ_CLS":  # LoRA on a reward model: its trained score head comes along
        return _merge_reward_model(Path(path), out, dtype, args.trust_remote_code, methods)
    model, tokenizer = load_for_inference(path, "float32", args.trust_remote_code)
    merged = merge_adapted(model).to(getattr(torch, dtype))
    save_model(merged, tokenizer, out)  # as a run's final/: generation_config stops where posttrain does
    print(f"merged {methods} into the base: {out} ({dtype})")
    return 0


def _no_adapter_message(path: str) -> str:
    """Why `path` (no adapter files) is not merged: a training checkpoint or a run stopped before
    final/ is named as one, with what to merge instead; a model needs no merging."""
    from posttrain.models.loading import checkpoint_message, unfinished_run_message
    from posttrain.models.presets import is_preset
    from posttrain.train.checkpoint import is_checkpoint

    directory = Path(path)
    if is_checkpoint(directory):
        return checkpoint_message(directory)
    unfinished = unfinished_run_message(directory)
    if unfinished:
        return f"{unfinished}; merge {directory} then"
    if is_preset(path) or (directory / "config.json").is_file():
        return f"{path} holds no adapter (a full model needs no merging)"
    return (f"{path} holds no adapter (no adapter_config.json or posttrain_adapters.json); give a run directory "
            "(its final/) or an adapter directory")


def _checkpoint_dtype(directory: Path) -> str:
    """The dtype a model directory's safetensors weights are stored in: bfloat16 or float16 when
    every floating-point weight is, else float32 (float32, float64, or the two half types mixed)."""
    from safetensors import safe_open

    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}
    found = set()
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            found |= {names.get(weights.get_slice(key).get_dtype()) for key in weights.keys()}
    found.discard(None)  # integer and 8-bit tensors say nothing of the floating-point weights
    return found.pop() if len(found) == 1 else "float32"


def _check_merge_output(out: Path, adapter: Path, given: Path, base: Path) -> None:
    """The merged model's directory: new or empty. Refused: a file; the adapter's directory (a
    directory that held both would be read as an adapter again), inside it, or the run directory
    named; the base the adapter was trained on (`base`, resolved as the loader reads it: W + ΔW
    would replace W, and the adapter, still naming it, would add ΔW twice, as would every other
    adapter on that base); another adapter's directory; any other directory holding files (a
    model's stale shards, index or tokenizer files would be read beside the merged ones)."""
    from posttrain.models.adapters.io import is_adapter_dir

    if out.is_file():
        raise UserError(f"{out} is a file; give a directory (new or empty) to save the merged model into")
    target, home = out.resolve(), adapter.resolve()
    if target == home:
        where = "is the adapter directory itself"
    elif home in target.parents:
        where = f"is inside the adapter directory {adapter}"
    elif target == given.resolve():
        where = "is the run directory being merged"
    elif target == base.resolve():
        where = ("is the base model the adapter was trained on: the merge would overwrite it, and the adapter, "
                 "which still names it, would then add its update twice")
    elif is_adapter_dir(out):
        where = "is another adapter directory (a directory holding a model and an adapter loads as the adapter)"
    elif out.is_dir() and any(out.iterdir()):
        where = "is not empty (remove it first to replace what it holds)"
    else:
        return
    raise UserError(f"output {out} {where}; merge into a new or empty directory (posttrain merge {given} NEW_DIR)")


def _merge_reward_model(path: Path, out: Path, dtype: str, trust_remote_code: bool, methods: str) -> int:
    """A LoRA reward model (`posttrain rm adapter.method=lora`) merged into its base: a plain
    sequence-classification model with the trained head, scoring as the adapter did (merged in
    float32, cast once to `dtype`, as `merge_main` says)."""
    import torch

    from posttrain.models.loading import load_tokenizer
    from posttrain.models.reward_model import load_reward_model

    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    model = load_reward_model(path, "float32", trust_remote_code, pad_token_id=tokenizer.pad_token_id)
    merged = model.merge_and_unload().to(getattr(torch, dtype))
    merged.save_pretrained(out)  # with a pad id: transformers refuses batches of more than one without it
    tokenizer.save_pretrained(out)
    print(f"merged {methods} into the reward model's base: {out} ({dtype})")
    return 0
