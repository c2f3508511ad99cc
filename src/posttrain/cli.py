"""Command line: parse argv, build a config, call the stage. No logic of its own.

    posttrain sft CONFIG.yaml [section.key=value ...]
    posttrain generate --model DIR --prompts FILE [--output out.jsonl] [sampling flags]
    posttrain chat --model DIR
    posttrain merge ADAPTER_DIR OUT_DIR
    posttrain demo
    posttrain env
"""

from __future__ import annotations

import argparse
import sys

from posttrain.errors import UserError


def _stage_parser(sub, name: str, config_cls, help_text: str):
    epilog = "config fields (YAML sections or dotted overrides):\n" + "\n".join(config_cls.help_lines())
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config file (optional)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
    return parser


def _sampling_args(parser) -> None:
    parser.add_argument("--model", required=True, help="model dir, adapter dir, run dir (uses its final/) or preset")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default="auto", help="auto|tokenizer|chatml|alpaca|none (raw prompts)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load a LoRA/IA3 adapter by name onto --model (repeatable); JSONL rows pick one with "
                             "\"adapter\": NAME, chat switches with /adapter NAME")
    parser.add_argument("--use", default=None, metavar="NAME", help="adapter active at start (default: the first)")
    parser.add_argument("--mix", action="append", default=[], metavar="NAME=WEIGHT",
                        help="add adapter 'mix' = weighted sum of loaded adapters (repeatable) and use it")


def build_parser() -> argparse.ArgumentParser:
    from posttrain.config import SFTConfig

    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_parser(sub, "sft", SFTConfig, "supervised / instruction fine-tuning (full, freeze or any PEFT method)")
    gen = sub.add_parser("generate", help="batched generation from a prompts file to JSONL")
    _sampling_args(gen)
    gen.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL with prompt/messages")
    gen.add_argument("--output", default="-", help="JSONL output path (- = stdout)")
    gen.add_argument("--batch-size", type=int, default=16)
    chat = sub.add_parser("chat", help="interactive multi-turn chat with the chat template")
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    merge = sub.add_parser("merge", help="fold LoRA / DoRA / IA3 adapters into the base and save a plain HF model")
    merge.add_argument("adapter", help="adapter dir or run dir (uses its final/)")
    merge.add_argument("output", help="directory for the merged model")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    merge.add_argument("--trust-remote-code", action="store_true")
    demo = sub.add_parser("demo", help="build the tiny model and fine-tune it on synthetic tasks, before/after")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*", help="dotted overrides on the demo config")
    sub.add_parser("env", help="versions, device and threads")
    return parser


def _run(args) -> int:
    if args.command == "sft":
        from posttrain.config import SFTConfig
        from posttrain.train.sft import run_sft

        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
            config, overrides = None, [config, *overrides]  # only overrides were given
        run_dir = run_sft(SFTConfig.load(config, overrides))
        print(f"run directory: {run_dir}")
        return 0
    if args.command in ("generate", "chat"):
        from posttrain import inference

        return inference.main(args)
    if args.command == "merge":
        from posttrain.inference import merge_main

        return merge_main(args)
    if args.command == "demo":
        from posttrain.demo import run_demo

        return run_demo(args.output_dir, args.overrides)
    if args.command == "env":
        from posttrain.env import describe

        print(describe())
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
