"""Command line: parse argv, build a config, call the stage. No logic of its own.

    posttrain sft CONFIG.yaml [section.key=value ...]
    posttrain rm CONFIG.yaml [...]            reward model
    posttrain dpo CONFIG.yaml [...]           DPO, cDPO, IPO, hinge, SimPO, ORPO, KTO (dpo.loss)
    posttrain kto | orpo CONFIG.yaml [...]    dpo with dpo.loss set
    posttrain grpo CONFIG.yaml [...]          GRPO / RLOO: sampled completions, verifiable or learned rewards
    posttrain rloo CONFIG.yaml [...]          grpo with grpo.advantage=rloo
    posttrain ppo CONFIG.yaml [...]           PPO: value model, GAE, KL penalty (fixed or adaptive), clipped losses
    posttrain constitutional | cai CONFIG.yaml [...]  Constitutional AI: critique -> revision -> SFT rows, pairs
    posttrain self-instruct CONFIG.yaml [...]  Self-Instruct: seed tasks -> new tasks, filtered -> SFT rows
    posttrain rlaif CONFIG.yaml [...]         RLAIF: N responses a prompt, pairs judged in both orders -> preferences
    posttrain quality CONFIG.yaml [...]       data quality: filters, PII, dedup, decontamination, balance -> kept rows, report
    posttrain redteam CONFIG.yaml [...]       attack success under jailbreaks and over-refusal of a chat model, with intervals
    posttrain evaluate CONFIG.yaml [...]      alignment report: exact match, answer NLL, reward, KL and win rates vs a reference, red team
    posttrain pipeline PIPELINE.yaml [NAME.key=value ...] [--only NAME | --from NAME] [--restart] [--dry-run]
    posttrain score --model RM_DIR --input rows.jsonl --output scored.jsonl
    posttrain generate --model DIR --prompts FILE [--output out.jsonl] [sampling flags]
    posttrain chat --model DIR
    posttrain serve MODEL|--model MODEL [--adapter NAME=DIR ...] [--port 8000] [--api-key-env VAR]   OpenAI-compatible server
    posttrain merge ADAPTER_DIR OUT_DIR
    posttrain demo
    posttrain env
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import functools
import signal
import sys

from posttrain.env import first_process, launched_processes
from posttrain.errors import ConfigError, NoRoom, UserError


# The example override a command's --help gives: one of its own settings (tests load each one);
# the training stages' is train.lr.
OVERRIDE_EXAMPLES = {"constitutional": "constitutional.rounds=2", "cai": "constitutional.rounds=2",
                     "self-instruct": "self_instruct.num_tasks=50", "rlaif": "rlaif.num_responses=3",
                     "quality": "max_drop_fraction=0.5", "redteam": "probes.limit=5", "evaluate": "prompts.limit=50"}


class _DefaultsShown(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A subcommand's help: its description as written, and each flag's default after its help,
    "(default: 128)"; a flag whose help says its default itself (%(default)s), or whose default is
    no value (None, an empty list, an on/off flag's False), gets none."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default == [] or default is argparse.SUPPRESS or isinstance(default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def _stage_parser(sub, name: str, config_cls, help_text: str):
    epilog = "config fields (YAML sections or dotted overrides):\n" + "\n".join(_help_lines(name, config_cls))
    # argparse %-formats an action's help (never its description): "95% intervals" must be "95%% ..."
    parser = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config file (optional)")
    parser.add_argument("overrides", nargs="*",
                        help=f"dotted overrides, e.g. {OVERRIDE_EXAMPLES.get(name, 'train.lr=2e-5')}")
    return parser


def _help_lines(command: str, config_cls) -> list[str]:
    """The config's help lines; an alias command's (kto, orpo, rloo) fixed setting is shown with
    the value the command runs with, not the dataclass default it never uses."""
    lines = config_cls.help_lines()
    for override in ALIAS_OVERRIDES.get(command, []):
        key, wanted = override.split("=", 1)
        default = functools.reduce(getattr, key.split("."), config_cls())
        stated = f", default {default!r}):"
        lines = [line.replace(stated, f", set to {wanted!r} by this command):", 1)
                 if line.startswith(f"  {key} (") else line for line in lines]
    return lines


def _dtypes() -> tuple[str, ...]:
    from posttrain.models.loading import _DTYPES  # no torch: --help stays fast

    return _DTYPES


def _sampling_args(parser) -> None:
    from posttrain.inference import add_template_argument

    parser.add_argument("--model", required=True, help="model dir, adapter dir, run dir (uses its final/) or preset")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="the most tokens generated for a prompt (a chat's reply)")
    # None = not given: the model's generation_config.json decides, else posttrain's default (inference.py)
    model_first = "default: the model's generation_config.json, else "
    parser.add_argument("--temperature", type=float, default=None, help=model_first + "0 (greedy; so is any below 1e-5)")
    parser.add_argument("--top-k", type=int, default=None, help=model_first + "0 (off)")
    parser.add_argument("--top-p", type=float, default=None, help=model_first + "1 (off)")
    parser.add_argument("--min-p", type=float, default=None,
                        help=model_first + "0 (off); keep tokens at least this fraction of the top one's probability")
    parser.add_argument("--repetition-penalty", type=float, default=None, help=model_first + "1 (off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="subtracted from a token's logit once per time it has been generated; 0: off")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="subtracted from the logit of every token generated at least once; 0: off")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed: prompt i (a chat's reply i) samples from (seed, i); the default %(default)s "
                             "makes a sampled run repeat, another seed draws other samples")
    add_template_argument(parser)
    parser.add_argument("--dtype", default="float32", choices=_dtypes(), help="dtype the weights are loaded in")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model's repository ships (its own architecture)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load a LoRA/IA3 adapter by name onto --model (repeatable); JSONL rows pick one with "
                             "\"adapter\": NAME, chat switches with /adapter NAME")
    parser.add_argument("--use", default=None, metavar="NAME", help="adapter active at start (default: the first)")
    parser.add_argument("--mix", action="append", default=[], metavar="NAME=WEIGHT",
                        help="add adapter 'mix' = weighted sum of loaded adapters (repeatable) and use it")


EXIT_CODES = """exit codes (every command):
  0    done
  2    a problem with the config, the data or the environment (a missing file, a full disk), said in
       one line "error: ..."; also a data command or pipeline stage whose items partly failed (its
       outputs hold the others; the same command retries them)
  3    training stopped on purpose: train.max_consecutive_nonfinite non-finite steps in a row, or a
       step with no label tokens
  130  interrupted (Ctrl-C, SIGINT); 143 terminated (SIGTERM): training saves a checkpoint first, and
       the same command resumes
  141  stdout was a pipe whose reader stopped (`posttrain score ... | head`)
  1    an unexpected error: a bug in posttrain, with its traceback"""


def build_parser() -> argparse.ArgumentParser:
    from posttrain.demo import OVERRIDES_HELP
    from posttrain.inference import add_template_argument
    from posttrain.config import DPOConfig, GRPOConfig, PPOConfig, RLAIFConfig, RMConfig, SFTConfig
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.config.quality import QualityConfig
    from posttrain.config.safety import RedTeamConfig
    from posttrain.config.synthesis import ConstitutionalConfig, SelfInstructConfig
    from posttrain import __version__
    from posttrain.pipeline import add_parser as add_pipeline_parser

    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    # no abbreviated flags: `serve --api-key X` would be read as --api-key-env X
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False,
                                                               formatter_class=_DefaultsShown))
    _stage_parser(sub, "sft", SFTConfig, "supervised / instruction fine-tuning (full, freeze or any PEFT method)")
    _stage_parser(sub, "rm", RMConfig, "reward model from pairs or K-way rankings (Bradley-Terry / ranking loss)")
    _stage_parser(sub, "dpo", DPOConfig, "direct preference optimisation: dpo, cdpo, ipo, hinge, simpo, orpo, kto")
    _stage_parser(sub, "kto", DPOConfig, "posttrain dpo with dpo.loss=kto (unpaired feedback)")
    _stage_parser(sub, "orpo", DPOConfig, "posttrain dpo with dpo.loss=orpo (SFT + odds ratio, no reference)")
    _stage_parser(sub, "grpo", GRPOConfig, "online RL with group-relative advantages (GRPO; RLOO with grpo.advantage)")
    _stage_parser(sub, "rloo", GRPOConfig, "posttrain grpo with grpo.advantage=rloo (leave-one-out baseline)")
    _stage_parser(sub, "ppo", PPOConfig, "online RL with PPO: a value model, GAE and a KL penalty to the reference")
    _stage_parser(sub, "constitutional", ConstitutionalConfig,
                  "Constitutional AI: answers critiqued and revised under principles -> SFT rows and pairs (RL-CAI)")
    _stage_parser(sub, "cai", ConstitutionalConfig, "= posttrain constitutional: answers critiqued and revised under "
                  "principles -> SFT rows and pairs (RL-CAI)")
    _stage_parser(sub, "self-instruct", SelfInstructConfig,
                  "Self-Instruct: new instructions, inputs and outputs grown from seed tasks, filtered -> SFT rows")
    _stage_parser(sub, "rlaif", RLAIFConfig,
                  "RLAIF: a policy's responses judged pairwise by a model, in both orders -> preferences for dpo/rm")
    _stage_parser(sub, "quality", QualityConfig,
                  "training-data quality: filters, PII, exact/near dedup, decontamination, balance -> kept rows, "
                  "every dropped row with its reason, a report")
    _stage_parser(sub, "redteam", RedTeamConfig,
                  "red-team evaluation: harmful requests under jailbreak attacks and safe prompts that look unsafe "
                  "-> attack success and over-refusal rates with 95% intervals")
    _stage_parser(sub, "evaluate", EvaluateConfig,
                  "alignment report of a policy beside its reference: exact match, reference-answer NLL, rewards, "
                  "KL to the reference, reward and judge win rates, red-team rates")
    add_pipeline_parser(sub)
    score = sub.add_parser("score", help="score prompt/response rows with reward models and functions")
    score.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                       help="reward model directory (repeatable; several are combined)")
    score.add_argument("--function", action="append", default=[], metavar="NAME=module:fn",
                       help="Python reward fn(prompt_turns, response) -> float (repeatable)")
    score.add_argument("--weight", action="append", default=[], metavar="NAME=W", help="weight of a component (default 1)")
    score.add_argument("--floor", action="append", default=[], metavar="NAME=X",
                       help="soft constraint: penalise a component's raw score below X (X in its raw units)")
    score.add_argument("--floor-penalty", type=float, default=None, metavar="P",
                       help="a floor's cost: P·max(0, X − r)/scale subtracted from the total, scale the "
                            "component's std under --calibrate, else 1 (default 10)")
    score.add_argument("--calibrate", action="store_true", help="z-normalise each component on the file before weighting")
    score.add_argument("--input", required=True,
                       help="rows with a prompt (as RL reads one: 'prompt' text or turns, 'question'/'problem', "
                            "'messages', alpaca's 'instruction'; a 'system' key) and a 'response' or 'completion' "
                            "(generate's output rows score as they are)")
    score.add_argument("--output", default="-", help="JSONL output (- = stdout)")
    score.add_argument("--column", default="reward", help="name of the new column")
    add_template_argument(score, none=False)
    score.add_argument("--batch-size", type=int, default=32, help="rows a reward model scores together")
    score.add_argument("--max-length", type=int, default=None, metavar="N",
                       help="the most tokens a reward model reads of a row (default: its position table); a longer "
                            "row is cut (a decoder keeps its end, an encoder its start and closing [SEP]) and "
                            "counted on stderr")
    score.add_argument("--dtype", default="float32", choices=_dtypes(), help="dtype the reward models are loaded in")
    score.add_argument("--trust-remote-code", action="store_true",
                       help="run the Python code a reward model's repository ships (its own architecture)")
    gen = sub.add_parser("generate", help="batched generation from a prompts file to JSONL")
    _sampling_args(gen)
    gen.add_argument("--prompts", required=True, help="text file (one prompt a line), or rows read as RL reads "
                     "prompts ('prompt', 'question'/'problem', 'messages'/'conversations' up to their last "
                     "answer, alpaca's 'instruction'; a 'system' key) in any file the training readers take "
                     "(JSONL, JSON, CSV, Parquet, a save_to_disk directory)")
    gen.add_argument("--output", default="-", help="JSONL output path (- = stdout); rows go to OUTPUT.partial as they "
                     "finish, renamed to OUTPUT when all are in")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    chat = sub.add_parser("chat", help="interactive multi-turn chat with the chat template")
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    from posttrain.serve import add_arguments as add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP server for a model and its adapters"))
    merge = sub.add_parser("merge", help="fold LoRA / DoRA / IA3 adapters into the base and save a plain HF model")
    merge.add_argument("adapter", help="adapter dir or run dir (uses its final/)")
    merge.add_argument("output", help="directory for the merged model")
    merge.add_argument("--dtype", default=None, choices=_dtypes(),
                       help="dtype of the merged model's weights (default: the base checkpoint's); the merge "
                            "itself is done in float32 and rounded once")
    merge.add_argument("--trust-remote-code", action="store_true",
                       help="run the Python code the base model's repository ships (its own architecture)")
    demo = sub.add_parser("demo", help="build the tiny model and run SFT, a reward model, DPO and an alignment "
                                       "report on synthetic tasks, before/after")
    demo.add_argument("--output-dir", default=None,
                      help="the demo's run directory (default: output_dir=... if given, else runs/demo)")
    demo.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    sub.add_parser("env", help="versions, device and threads")
    return parser


def _sft():
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    return SFTConfig, run_sft


def _rm():
    from posttrain.config import RMConfig
    from posttrain.train.reward import run_rm

    return RMConfig, run_rm


def _dpo():
    from posttrain.config import DPOConfig
    from posttrain.train.preference import run_dpo

    return DPOConfig, run_dpo


def _grpo():
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    return GRPOConfig, run_grpo


def _ppo():
    from posttrain.config import PPOConfig
    from posttrain.train.ppo import run_ppo

    return PPOConfig, run_ppo


# Commands that are another stage with a setting fixed (also used by `posttrain pipeline`).
ALIAS_OVERRIDES = {"kto": ["dpo.loss=kto"], "orpo": ["dpo.loss=orpo"], "rloo": ["grpo.advantage=rloo"]}

def check_alias(command: str, overrides: list[str]) -> None:
    """An alias command (kto, orpo, rloo) sets its option itself, over the config file's (so
    `posttrain orpo examples/dpo.yaml` runs ORPO); an override on the same command line that sets
    that option to something else contradicts the command, and is refused."""
    from posttrain.config.schema import apply_override, dotted_value

    given: dict = {}
    for item in overrides:
        apply_override(given, item)
    for override in ALIAS_OVERRIDES.get(command, []):
        key, wanted = override.split("=", 1)
        value = dotted_value(given, key, None)
        if value is not None and str(value) != wanted:
            raise ConfigError(f"`posttrain {command}` runs with {key}={wanted}, but an override sets {key}={value}; "
                              f"drop it, or run `posttrain {key.split('.')[0]}`")


def _note_replaced_by_alias(command: str, config: str | None) -> None:
    """`posttrain kto dpo_ipo.yaml` runs KTO: say that the file's own loss is not the one used."""
    if config is None or command not in ALIAS_OVERRIDES:
        return
    from posttrain.config.schema import dotted_value, read_yaml

    data = read_yaml(config)
    for override in ALIAS_OVERRIDES[command]:
        key, wanted = override.split("=", 1)
        value = dotted_value(data, key, None)
        if value is not None and str(value) != wanted and first_process():
            print(f"note: posttrain {command} runs {key}={wanted}; {config} sets {key}: {value}, which is not used")


_STAGES = {"sft": _sft, "rm": _rm, "dpo": _dpo, "kto": _dpo, "orpo": _dpo, "grpo": _grpo, "rloo": _grpo, "ppo": _ppo}


def _constitutional():
    from posttrain.config.synthesis import ConstitutionalConfig
    from posttrain.feedback.constitutional import run_constitutional

    return ConstitutionalConfig, run_constitutional


def _self_instruct():
    from posttrain.config.synthesis import SelfInstructConfig
    from posttrain.feedback.self_instruct import run_self_instruct

    return SelfInstructConfig, run_self_instruct


def _rlaif():
    from posttrain.config import RLAIFConfig
    from posttrain.feedback.rlaif import run_rlaif

    return RLAIFConfig, run_rlaif


def _quality():
    from posttrain.config.quality import QualityConfig
    from posttrain.data.quality.run import run_quality

    return QualityConfig, run_quality


def _redteam():
    from posttrain.config.safety import RedTeamConfig
    from posttrain.safety.run import run_redteam

    return RedTeamConfig, run_redteam


def _evaluate():
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.eval.alignment import run_evaluate

    return EvaluateConfig, run_evaluate


# Commands that write training data (from a model's outputs, or by cleaning rows) or evaluate a model (a config and overrides, like a stage,
# but no model to train, so not pipeline stages).
_DATA_COMMANDS = {"constitutional": _constitutional, "cai": _constitutional, "self-instruct": _self_instruct,
                  "rlaif": _rlaif, "quality": _quality, "redteam": _redteam,
                  "evaluate": _evaluate}


def _is_override(argument: str) -> bool:
    """`section.key=value` rather than a config file: the part before "=" is a dotted name and no
    such file exists (constitutional.constitution=mine.yaml is an override)."""
    import os
    import re

    key = argument.split("=", 1)[0]
    return "=" in argument and not os.path.isfile(argument) and re.fullmatch(r"[A-Za-z_][\w.]*", key) is not None


def _alike_everywhere(exc: UserError) -> UserError:
    """Mark an error every process meets alike (the command line, the config file): printed once."""
    exc.alike_everywhere = True
    return exc


_STAGE_LIKE = ("pipeline", "env")  # commands a torchrun may run (pipeline refuses its data stages itself)


def _run(args) -> int:
    if launched_processes() > 1 and args.command not in _STAGES and args.command not in _STAGE_LIKE:
        raise _alike_everywhere(UserError(
            f"posttrain {args.command} runs in one process, and {launched_processes()} were started (torchrun / "
            f"accelerate launch): each would do the whole job into the same files. Run it without the launcher; "
            f"the training commands ({', '.join(_STAGES)}) and pipeline take several processes"))
    if args.command not in ("env", "demo"):  # transformers' "Loading weights" bar at every load; ours show the work
        from transformers.utils import logging

        logging.disable_progress_bar()
    if args.command in _STAGES or args.command in _DATA_COMMANDS:
        config_cls, run = {**_STAGES, **_DATA_COMMANDS}[args.command]()
        config, overrides = args.config, list(args.overrides)
        if config is not None and _is_override(config):
            config, overrides = None, [config, *overrides]  # only overrides were given
        misplaced = next((item for item in overrides if "=" not in item and os.path.isfile(item)), None)
        if misplaced is not None and config is not None:
            raise _alike_everywhere(ConfigError(
                f"posttrain {args.command} reads one config file a run, and two were given: {config} and "
                f"{misplaced}; merge them into one, or give {misplaced}'s settings as key=value overrides"))
        if misplaced is not None:
            raise _alike_everywhere(ConfigError(f"{misplaced} is a file among the overrides; the config file goes "
                                                f"first: posttrain {args.command} {misplaced} key=value ..."))
        try:
            check_alias(args.command, overrides)
        except UserError as exc:
            raise _alike_everywhere(exc) from None
        _note_replaced_by_alias(args.command, config)
        overrides += ALIAS_OVERRIDES.get(args.command, [])  # last: over the file's setting
        try:
            cfg = config_cls.load(config, overrides)
        except UserError as exc:
            raise _alike_everywhere(exc) from None
        run_dir = run(cfg)
        if first_process():
            print(f"run directory: {run_dir}")
        from posttrain.pipeline import failed_items

        failed = failed_items(args.command, run_dir)
        if failed:  # outputs written from the others; a scheduler must not record the job as done
            raise UserError(f"{args.command}: {failed} item(s) failed this run (see {run_dir}); the outputs hold the "
                            "others; rerun the same command to retry them")
        return 0
    if args.command == "pipeline":
        from posttrain.pipeline import main as pipeline_main

        return pipeline_main(args)
    if args.command == "score":
        from posttrain.rewards import score_main

        return score_main(args)
    if args.command in ("generate", "chat"):
        from posttrain import inference

        return inference.main(args)
    if args.command == "serve":
        from posttrain.serve import main as serve_main

        return serve_main(args)
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


def _flags_as_overrides(command: str, extra: list[str]) -> str | None:
    """`posttrain sft cfg.yaml --learning_rate 1e-4` (TRL's command line) for a command that takes
    KEY=VALUE overrides: the error that names the override each --flag means (train.lr=1e-4)."""
    loader = {**_STAGES, **_DATA_COMMANDS}.get(command)
    if loader is None or not any(item.startswith("--") for item in extra):
        return None
    from posttrain.config.schema import suggest_setting

    config_cls, meant = loader()[0], []
    for i, item in enumerate(extra):
        if not item.startswith("--"):
            continue
        flag, given, value = item.partition("=")
        following = extra[i + 1] if i + 1 < len(extra) else None
        if not given and following is not None and not following.startswith("--") and not _is_override(following):
            given, value = " ", following  # --learning_rate 1e-4
        found = suggest_setting(flag[2:].replace("-", "_"), config_cls)
        if found is None:
            meant.append(f"{flag}{given}{value} has no counterpart (posttrain {command} --help lists the settings)")
            continue
        setting, note = found
        override = f"{setting}={value}" if given else setting
        meant.append(f"{flag}{given}{value} is {override}" + (f" {note}" if note else ""))
    return (f"posttrain {command} takes settings as KEY=VALUE overrides after the config file, not as flags: "
            + "; ".join(meant))


def _check_command(parser: argparse.ArgumentParser, words: list[str]) -> None:
    """`posttrain self_instruct`: an unknown command close to one is answered with the one meant
    (exit 2, as argparse's own list of the commands is)."""
    if not words or words[0].startswith("-"):
        return
    (commands,) = [action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    close = difflib.get_close_matches(words[0], list(commands), n=1)
    if words[0] not in commands and close:
        parser.error(f"unknown command {words[0]!r}; did you mean {close[0]}?")


@contextlib.contextmanager
def _terminated_as_interrupted():
    """SIGTERM (`kill`, `docker stop`, a scheduler's preemption) stops a command as Ctrl-C does:
    `Stopped(SIGTERM)` is raised where the command is, so it says what the same command does next
    and exits 143, its logs kept (a feedback job, quality, evaluate, the data preparation before a
    training run's first step). A training step installs its own handler, which finishes the step
    and saves a checkpoint first (`train.loop._interrupt_at_step_end`). Only the main thread of a
    single process sets it (launched processes keep Python's own handling, as training's steps
    do); the handler before is put back."""
    import threading

    from posttrain.errors import Stopped

    if threading.current_thread() is not threading.main_thread() or launched_processes() > 1:
        yield
        return

    def on_sigterm(signum, frame):
        raise Stopped(signum)

    before = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    from posttrain.console import line_buffered

    line_buffered(sys.stdout)  # a message said is in the log file as it is said (console.line_buffered)
    parser = build_parser()
    _check_command(parser, list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    # argparse ends a command's key=value list at its first flag: `pipeline P.yaml --dry-run k=v` leaves
    # k=v over; overrides after a flag are still overrides
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        words = list(sys.argv[1:] if argv is None else argv)
        config = getattr(args, "config", None)
        if config is not None and not os.path.exists(config) and config in words and \
                words.index(config) > 0 and words[words.index(config) - 1] in extra:
            # `posttrain dpo --beta 0.2` with no config file: argparse took the flag's value for the file
            at = extra.index(words[words.index(config) - 1])
            extra = [*extra[:at + 1], config, *extra[at + 1:]]
        as_overrides = _flags_as_overrides(args.command, extra)
        if as_overrides is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.exit(2, f"error: {as_overrides}\n")  # as argparse exits on its own errors
    try:
        with _terminated_as_interrupted():
            return _run(args)
    except Exception as caught:  # noqa: BLE001 - a UserError or a full disk is said in one line, the rest re-raised
        exc = caught if isinstance(caught, UserError) else NoRoom.of(caught)
        if exc is None:  # a bug in posttrain: its traceback
            raise
        # one process's own error is said by it; an error all meet alike, once a machine
        if not getattr(exc, "alike_everywhere", False) or first_process(of_machine=True):
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        hint = {**dict.fromkeys(_STAGES, "; the same command resumes from the run's newest checkpoint"),
                **dict.fromkeys(_DATA_COMMANDS, "; the same command resumes from what its log holds"),
                "pipeline": "; the same command resumes the stage it stopped in",
                "quality": "; the same command runs it again (quality keeps no log to resume from)",
                "demo": "; the same command with train.resume=auto resumes the stage it stopped in (without it, "
                        "the demo starts afresh)"}.get(args.command, "")
        signum = getattr(exc, "signum", signal.SIGINT)  # training's Stopped says which signal
        print(f"{'interrupted' if signum == signal.SIGINT else 'terminated'}{hint}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    raise SystemExit(main())
