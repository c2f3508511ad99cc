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


def load_for_inference(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from a preset, a full model dir or a LoRA adapter dir (base read from its config)."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, load_tokenizer

    path = resolve_model_dir(path)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
        model = load_model(ModelConfig(path=base, dtype=dtype, trust_remote_code=trust_remote_code))
        model = PeftModel.from_pretrained(model, path)
    else:
        model = load_model(ModelConfig(path=path, dtype=dtype, trust_remote_code=trust_remote_code))
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def read_prompts(path: str) -> list[dict]:
    """Lines of text, or JSONL objects with `prompt` (str) or `messages` (list)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts file {path} does not exist")
    items = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise DataError(f"{path}:{number}: expected an object with 'prompt' or 'messages'")
            items.append(row)
        else:
            items.append({"prompt": line})
    return items


def render(item: dict, tokenizer, template: str | None) -> str:
    if template is None:
        if "messages" in item:
            raise DataError("--template none needs plain prompts, not messages")
        return item["prompt"]
    messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _settings(args):
    from posttrain.rollout.sampling import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                            stop=list(args.stop), seed=args.seed)


def main(args) -> int:
    from posttrain.data.templates import resolve_template
    from posttrain.rollout.generate import chat_session, generate

    model, tokenizer = load_for_inference(args.model, args.dtype, args.trust_remote_code)
    template = None if args.template == "none" else resolve_template(tokenizer, args.template)
    settings = _settings(args)
    if args.command == "chat":
        if template is None:
            raise UserError("chat needs a chat template (--template auto|chatml|alpaca)")
        chat_session(model, tokenizer, template, settings, system=args.system)
        return 0
    items = read_prompts(args.prompts)
    completions = generate(model, tokenizer, [render(i, tokenizer, template) for i in items], settings,
                           batch_size=args.batch_size)
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    try:
        for item, completion in zip(items, completions):
            out.write(json.dumps({**item, "completion": completion}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output != "-":
        print(f"wrote {len(completions)} completions to {args.output}", file=sys.stderr)
    return 0
