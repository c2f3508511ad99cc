"""`posttrain generate` and `posttrain chat`: load a trained model, render prompts, sample."""

from __future__ import annotations

import json
import sys
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


def write_output(path: str, lines) -> None:
    """`lines` (each ending in a newline) to the file `path`, or to stdout for '-', flushed before
    returning: an OSError (a full disk: ENOSPC, met at a write or at the close) then names the
    path, and the CLI says it in one line. A closed stdout pipe (`| head`) is the caller's to end
    quietly (console.run)."""
    try:
        if path == "-":
            sys.stdout.writelines(lines)
            sys.stdout.flush()
            return
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(lines)
    except OSError as exc:
        exc.filename = exc.filename or ("stdout" if path == "-" else path)
        raise


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
    """Rows with `prompt` (text, or a list of turns) or `messages` (a list of turns) from any
    file the data readers take (JSON Lines, JSON, CSV / TSV, Parquet; a table read by its
    columns, as training and score read it); any other file is one prompt a line."""
    from posttrain.data.readers import _file_kind

    file = Path(path)
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
            items.append({"prompt": line})
    return items


def _json_prompts(path: str) -> list[dict]:
    """Prompt rows from a data file (`data.readers`); file:line on a bad one."""
    from posttrain.data.readers import Malformed, iter_rows

    items = []
    for location, row in iter_rows(path):
        if isinstance(row, Malformed):
            if row.reason == "expected a JSON object, got a string":  # a prompt string: ["...", ...] or a line "..."
                row = {"prompt": _string_row(row.raw)}
            elif row.reason.startswith("invalid JSON"):
                raise DataError(f"{location}: not valid JSON ({row.reason.removeprefix('invalid JSON: ')})")
            elif row.reason.startswith("expected a JSON object"):
                raise DataError(f"{location}: expected an object with 'prompt' or 'messages'")
            else:
                raise DataError(f"{location}: {row.reason}")
        if not ("prompt" in row or "messages" in row):
            raise DataError(f"{location}: expected an object with 'prompt' or 'messages'")
        if row.get("messages") in (None, "") and "prompt" in row:  # a table with both columns, this one blank
            row = {key: value for key, value in row.items() if key != "messages"}
        row = _decoded_cells(row, location)
        turns = row.get("prompt") if "messages" not in row else None
        problem = _prompt_problem({"messages": turns} if isinstance(turns, list) else row)  # RL's prompt rows: turns
        if problem:
            raise DataError(f"{location}: {problem}")
        items.append(row)
    return items


def _decoded_cells(row: dict, location: str) -> dict:
    """A CSV cell holding the turns of 'messages' (or of 'prompt', when it starts like turns)
    as the list it writes (JSON or Python's repr), as training reads the cell."""
    from posttrain.data.formats import BadRowError, decode_cell
    from posttrain.data.preferences import _TURNS_TEXT

    decoded = {}
    for key in ("messages", "prompt"):
        value = row.get(key)
        if isinstance(value, str) and (key == "messages" or _TURNS_TEXT.match(value)):
            try:
                decoded[key] = decode_cell(value, repr(key))
            except ValueError:
                pass  # said by _prompt_problem: not a list of turns
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


def _prompt_problem(row: dict) -> str | None:
    """What is wrong with a prompt row's `messages` (non-empty list of turns with a text role and
    content) or `prompt` (non-empty text), or None."""
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            return "'messages' must be a non-empty list of turns"
        for i, turn in enumerate(turns, 1):
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
                return f"turn {i} of 'messages' needs a text 'role' and a text 'content'"
        return None
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        return "'prompt' must be non-empty text"
    return None


def render(item: dict, tokenizer, template: str | None) -> str:
    if template is None:
        if "messages" in item or isinstance(item.get("prompt"), list):
            raise DataError("--template none needs plain prompts, not messages")
        return item["prompt"]
    turns = item.get("prompt")
    messages = item.get("messages") or (turns if isinstance(turns, list) else [{"role": "user", "content": turns}])
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _settings(args):
    """The sampling flags, checked (a UserError, before any model loads)."""
    from posttrain.rollout.sampling import SamplingSettings

    if getattr(args, "batch_size", 1) < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if any(not stop for stop in args.stop):
        raise UserError("--stop '' would end every completion at its first token")
    try:
        return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                                stop=list(args.stop), seed=args.seed)
    except ValueError as exc:
        raise UserError(f"{exc} (a sampling flag)") from None


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


def _generate_per_adapter(model, tokenizer, items, texts, settings, batch_size, template=None,
                          raw=False) -> list[str]:
    """Requests that name an adapter ("adapter": NAME) run with it; the rest with the active one.
    `template`: the chat template the texts were rendered with (its end-of-turn marker ends them);
    `raw`: no template was applied (the tokenizer adds its BOS, `generate.prompt_token_ids`)."""
    from posttrain.rollout.generate import generate

    wanted = [item.get("adapter") for item in items]
    if not any(wanted):
        return generate(model, tokenizer, texts, settings, batch_size=batch_size, template=template, raw=raw)
    if not getattr(model, "adapter_names", list)():
        raise UserError("a prompt names an adapter but no LoRA / IA3 adapter is loaded; pass --adapter NAME=DIR")
    active = model.active_adapter
    completions: list[str] = [""] * len(items)
    for name in dict.fromkeys(w or active for w in wanted):
        rows = [i for i, w in enumerate(wanted) if (w or active) == name]
        model.use_adapter(name)
        for i, text in zip(rows, generate(model, tokenizer, [texts[i] for i in rows], settings, batch_size=batch_size,
                                          template=template, raw=raw)):
            completions[i] = text
    model.use_adapter(active)
    return completions


def main(args) -> int:
    from posttrain.data.templates import resolve_template
    from posttrain.rollout.generate import chat_session

    settings = _settings(args)  # flags, prompts and the output's place checked before the model loads
    if args.command == "chat" and args.template == "none":
        raise UserError("chat needs a chat template (--template auto|chatml|alpaca)")
    if args.command != "chat":
        check_output_path(args.output)
    items = read_prompts(args.prompts) if args.command != "chat" else []
    if args.command != "chat" and not items:
        raise DataError(f"{args.prompts}: no prompts (an empty file, or only blank lines)")
    model, tokenizer = _load(args)
    template = None if args.template == "none" else resolve_template(tokenizer, args.template)
    if args.command == "chat":
        switch = getattr(model, "use_adapter", None)
        chat_session(model, tokenizer, template, settings, system=args.system, switch_adapter=switch)
        return 0
    completions = _generate_per_adapter(model, tokenizer, items, [render(i, tokenizer, template) for i in items],
                                        settings, args.batch_size, template, raw=template is None)
    write_output(args.output, (json.dumps({**item, "completion": completion}) + "\n"
                               for item, completion in zip(items, completions)))
    if args.output != "-":
        print(f"wrote {len(completions)} completions to {args.output}", file=sys.stderr)
    return 0


def merge_main(args) -> int:
    """`posttrain merge`: adapters folded into the base, saved as a plain transformers model.

    The base is loaded in float32 (a float64 checkpoint too: posttrain loads no wider), the
    adapter merged there, and the result cast once to `--dtype`, or to the base checkpoint's
    dtype when none is given: loading a bfloat16 base in bfloat16 would round W, and W + ΔW
    would be rounded again (or ΔW dropped, when under half an ulp of W)."""
    import torch

    from posttrain.models.adapters import is_adapter_dir, merge_adapted, read_layout
    from posttrain.models.loading import resolve_model_path
    from posttrain.models.presets import is_preset

    if not Path(args.adapter).exists() and not is_preset(args.adapter):
        raise UserError(f"{args.adapter} does not exist; give a run directory (its final/) or an adapter directory")
    path = resolve_model_dir(args.adapter)
    if not is_adapter_dir(path):
        raise UserError(f"{path} holds no adapter (a full model needs no merging)")
    _check_merge_output(Path(args.output), Path(path), Path(args.adapter))
    dtype = args.dtype or _checkpoint_dtype(resolve_model_path(read_layout(path)[0]))
    if _is_reward_adapter(path):  # LoRA on a reward model: its trained score head comes along
        return _merge_reward_model(Path(path), Path(args.output), dtype, args.trust_remote_code)
    model, tokenizer = load_for_inference(path, "float32", args.trust_remote_code)
    merged = merge_adapted(model).to(getattr(torch, dtype))
    out = Path(args.output)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged {'+'.join(model.methods)} into the base: {out} ({dtype})")
    return 0


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


def _check_merge_output(out: Path, adapter: Path, given: Path) -> None:
    """The merged model's directory: not a file, not the adapter's directory (a directory that
    held both would be read as an adapter again), nor inside it, nor the run directory named."""
    if out.is_file():
        raise UserError(f"{out} is a file; give a directory (new or empty) to save the merged model into")
    target, home = out.resolve(), adapter.resolve()
    if target == home:
        where = "is the adapter directory itself"
    elif home in target.parents:
        where = f"is inside the adapter directory {adapter}"
    elif target == given.resolve():
        where = "is the run directory being merged"
    else:
        return
    raise UserError(f"output {out} {where}; merge into a new directory (posttrain merge {given} NEW_DIR)")


def _is_reward_adapter(path: Path) -> bool:
    import json

    config = Path(path) / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("task_type") == "SEQ_CLS"


def _merge_reward_model(path: Path, out: Path, dtype: str, trust_remote_code: bool) -> int:
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
    print(f"merged lora into the reward model's base: {out} ({dtype})")
    return 0
