"""Adversarial checks of the CLI surface and the shipped example configs: every example and every
command line the README / the examples show parses and loads the way the CLI does it (no
training), dotted overrides and their types, and errors for people (one line, exit code 2).

Everything runs in-process through `posttrain.cli.main(argv)` or the config layer it calls; the
stage functions are replaced by stubs where a command would otherwise start work."""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

from posttrain import cli
from posttrain.config import DPOConfig, GRPOConfig, SFTConfig
from posttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
COMMAND_OF = {"sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "kto", "grpo": "grpo", "ppo": "ppo",
              "constitutional": "constitutional", "rlaif": "rlaif", "self": "self-instruct", "quality": "quality",
              "redteam": "redteam", "evaluate": "evaluate"}


class _Stop(Exception):
    """Raised by a stubbed stage: the command got as far as starting work."""


def _load_like_cli(argv: list[str]):
    """What cli._run does before it calls the stage: argv -> (config object, validator ran) or the
    pipeline's stages. Returns the parsed args and the loaded config(s)."""
    from posttrain.pipeline import _validator, load_pipeline

    args = cli.build_parser().parse_args(argv)
    registry = {**cli._STAGES, **cli._DATA_COMMANDS}
    if args.command in registry:
        config_cls, run = registry[args.command]()
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
            config, overrides = None, [config, *overrides]
        cli.check_alias(args.command, overrides)
        overrides += cli.ALIAS_OVERRIDES.get(args.command, [])
        cfg = config_cls.load(config, overrides)
        # the validator each run_X calls first (self-instruct's name has an underscore)
        import posttrain.config.synthesis as synthesis

        validate = _validator(config_cls, run) or getattr(synthesis, "validate_self_instruct")
        validate(cfg)
        return args, [cfg]
    if args.command == "pipeline":
        return args, [s.cfg for s in load_pipeline(args.pipeline, args.overrides)[1]]
    return args, []


def _run_main(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- shipped examples


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_loads_and_validates_through_the_cli_path(example):
    if example.stem.startswith("pipeline_"):
        _, cfgs = _load_like_cli(["pipeline", str(example)])
        assert len(cfgs) >= 2
    else:
        _, (cfg,) = _load_like_cli([COMMAND_OF[example.stem.split("_")[0]], str(example)])
        assert dataclasses.is_dataclass(cfg)


def _leaves(value, key=""):
    """(dotted key, value) of every input setting; output_dir is written, not read."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        for name, v in value.items():
            if name != "output_dir":
                yield from _leaves(v, f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v, key)
    else:
        yield key, value


def test_every_file_module_and_path_an_example_names_exists():
    """Data files must be in the repository; runs/... paths are produced by an earlier stage
    (each example's header comment says which); NAME=module:fn rewards must import."""
    checked = 0
    for example in EXAMPLES:
        if example.stem.startswith("pipeline_"):
            _, cfgs = _load_like_cli(["pipeline", str(example)])
        else:
            _, cfgs = _load_like_cli([COMMAND_OF[example.stem.split("_")[0]], str(example)])
        for key, value in (kv for cfg in cfgs for kv in _leaves(cfg)):
            if not isinstance(value, str) or value.startswith(("http://", "https://", "re:")):
                continue
            target = value.rpartition("=")[2]
            if key.endswith(".functions"):  # NAME=module:function
                module, fn = target.split(":")
                assert callable(getattr(importlib.import_module(module), fn)), (example.name, key, value)
                checked += 1
            elif "/" in target or target.endswith((".jsonl", ".json", ".csv", ".parquet", ".txt")):
                if target.startswith("runs/"):
                    produced = re.search(r"posttrain (sft|rm|serve|pipeline) \S+", example.read_text())
                    assert produced or example.stem.startswith("pipeline_"), (example.name, key, value)
                else:
                    assert (ROOT / target).exists(), (example.name, key, value)
                checked += 1
    assert checked >= 15


def _documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for each `posttrain ...` line in README code blocks and each
    command in an example's header comment."""
    found = []
    in_block = False
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        text = re.sub(r"^\$ ", "", line.strip())
        text = re.sub(r"^[A-Z_]+=\S+\s+", "", text)  # VAR=value posttrain ...
        if in_block and text.startswith("posttrain "):
            found.append((f"README.md:{number}", text))
    for example in sorted((ROOT / "examples").glob("**/*.yaml")):
        for number, line in enumerate(example.read_text().splitlines(), 1):
            match = re.match(r"#\s+((?:accelerate launch .*?)?posttrain \S.*)$", line)
            if match:
                found.append((f"{example.relative_to(ROOT)}:{number}", match.group(1)))
    cleaned = []
    for where, text in found:
        text = re.split(r"\s+#|\s{2,}\(", text)[0].strip().rstrip("&").strip()
        cleaned.append((where, text))
    return cleaned


def test_every_documented_command_line_parses_and_its_config_loads(monkeypatch):
    commands = _documented_commands()
    assert len(commands) >= 40
    seen = set()
    for where, text in commands:
        argv = shlex.split(text)
        argv = argv[argv.index("posttrain") + 1:]
        seen.add(argv[0])
        if argv[1:2] == ["--help"]:
            with pytest.raises(SystemExit) as info:
                cli.build_parser().parse_args(argv)
            assert info.value.code == 0, where
            continue
        if "train.learning_rate=1e-4" in argv:  # the README's example of an error
            with pytest.raises(ConfigError, match="did you mean train.lr"):
                _load_like_cli(argv)
            continue
        _load_like_cli(argv)  # raises on anything that no longer parses or loads
    # every stage / command of the README's command list is shown at least once
    assert {"sft", "rm", "dpo", "kto", "grpo", "rloo", "ppo", "pipeline", "score", "generate", "chat", "serve",
            "merge", "demo", "env", "rlaif", "constitutional", "self-instruct"} <= seen


def test_every_subcommand_help_exits_0_and_lists_its_options(capsys):
    names = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"sft", "pipeline", "serve", "score", "generate"} <= set(names)
    # the top-level help %-formats every subcommand's one-liner ("95% intervals" crashed it)
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "95% intervals" in out
    assert all(f"\n    {name} " in out for name in names)
    for name in names:
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert info.value.code == 0 and out.startswith(f"usage: posttrain {name}"), name
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    out = capsys.readouterr().out
    assert "ppo.kl_coef (float" in out and "rollout.num_generations (int" in out
    with pytest.raises(SystemExit):
        cli.main(["pipeline", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--only", "--from", "--restart", "--dry-run"))


def test_pipeline_dry_run_validates_and_trains_nothing(tmp_path, capsys):
    code, out, _ = _run_main(["pipeline", str(ROOT / "examples" / "pipeline_sft_dpo.yaml"),
                              f"output_dir={tmp_path / 'p'}", "dpo.dpo.beta=0.2", "--dry-run"], capsys)
    assert code == 0 and "1/2 sft (sft): running" in out and "planned:" in out
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- dotted overrides


@pytest.mark.parametrize("override, read, expected", [
    ("train.max_steps=7", lambda c: c.train.max_steps, 7),
    ("train.lr=1e-4", lambda c: c.train.lr, 1e-4),  # YAML reads 1e-4 as a string
    ("train.lr=3E-5", lambda c: c.train.lr, 3e-5),
    ("train.lr=.5", lambda c: c.train.lr, 0.5),
    ("train.epochs=2", lambda c: c.train.epochs, 2.0),
    ("data.packing=true", lambda c: c.data.packing, True),
    ("data.packing=yes", lambda c: c.data.packing, True),
    ("data.packing=False", lambda c: c.data.packing, False),
    ("data.synthetic_tasks=[copy,reverse]", lambda c: c.data.synthetic_tasks, ["copy", "reverse"]),
    ("data.synthetic_tasks=copy", lambda c: c.data.synthetic_tasks, ["copy"]),
    ("train.adam_betas=[0.9, 1e-1]", lambda c: c.train.adam_betas, [0.9, 0.1]),
    ("train.freeze=[]", lambda c: c.train.freeze, []),
    ("train.freeze=", lambda c: c.train.freeze, []),  # empty: nothing (was [''])
    ("train.freeze=*embed_tokens*", lambda c: c.train.freeze, ["*embed_tokens*"]),
    ("output_dir=runs/lr=1e-4", lambda c: c.output_dir, "runs/lr=1e-4"),  # '=' inside the value
    (" train.lr = 3e-4", lambda c: c.train.lr, 3e-4),
    ("adapter.lora.target_modules=[re:.*(q|v)_proj]", lambda c: c.adapter.lora.target_modules, ["re:.*(q|v)_proj"]),
    ("adapter.method=[lora, bottleneck]", lambda c: c.adapter.method, ["lora", "bottleneck"]),
])
def test_override_values_are_parsed_as_yaml_and_typed(override, read, expected):
    value = read(SFTConfig.load(None, [override]))
    assert value == expected and type(value) is type(expected)


def test_override_strings_with_equals_signs_in_reward_lists():
    cfg = GRPOConfig.load(ROOT / "examples" / "grpo.yaml",
                          ["reward.functions=[exact_match=posttrain.rewards:exact_match]", "reward.weights=[a=0.5]"])
    assert cfg.reward.functions == ["exact_match=posttrain.rewards:exact_match"] and cfg.reward.weights == ["a=0.5"]


def test_override_of_a_section_the_file_lacks_and_repeated_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: tiny\ntrain:\n  lr: 1.0e-3\n")
    cfg = SFTConfig.load(path, ["adapter.lora.r=4", "adapter.method=lora", "train.lr=2e-4", "train.lr=5e-4"])
    assert cfg.adapter.lora.r == 4 and cfg.adapter.lora.alpha == 16.0  # siblings keep their defaults
    assert cfg.adapter.method == ["lora"] and cfg.train.lr == 5e-4  # the same key twice: the last one wins
    assert cfg.model.path == "tiny"
    cfg = DPOConfig.load(ROOT / "examples" / "dpo.yaml", ["dpo={beta: 0.3}"])
    assert cfg.dpo.beta == 0.3 and cfg.dpo.loss == "dpo"  # a whole section: keys it omits take the defaults


@pytest.mark.parametrize("cls, override, message", [
    (SFTConfig, "train.learning_rate=1e-4", "unknown key train.learning_rate; did you mean train.lr?"),
    (SFTConfig, "lora.r=4", "did you mean adapter.lora.r?"),
    (SFTConfig, "data.max_seq_length=64", "did you mean data.max_length?"),
    (DPOConfig, "beta=0.2", "did you mean dpo.beta?"),
    (GRPOConfig, "grpo.num_generations=4", "did you mean rollout.num_generations?"),
    (SFTConfig, "dpo.beta=0.1", "unknown key dpo.beta; dpo.beta is a setting of posttrain dpo"),  # not a typo
    (SFTConfig, "train.lr=null", "train.lr must be a number, got None"),
    (SFTConfig, "train.lr=nan", "must be a finite number"),
    (SFTConfig, "train.lr.x=1", "train.lr is a setting, not a section"),
    (SFTConfig, "data.packing=1", "data.packing must be true or false"),
])
def test_bad_overrides_name_the_key(cls, override, message):
    with pytest.raises(ConfigError) as info:
        cls.load(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- exit codes and messages


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1.0e-4\n  batch_size: [2\n  epochs: 1\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    cases = [
        (["sft", str(tmp_path / "missing.yaml")], f"config file {tmp_path / 'missing.yaml'} does not exist"),
        (["sft", str(bad)], f"{bad}:4: not valid YAML"),
        (["sft", str(listed)], "the top level must be a mapping"),
        (["sft", str(ROOT / "examples" / "sft_full.yaml"), "train.lr"], "must look like section.key=value"),
        (["kto", str(ROOT / "examples" / "kto.yaml"), "dpo.loss=dpo"], "runs with dpo.loss=kto"),
        (["rloo", "grpo.advantage=grpo"], "runs with grpo.advantage=rloo"),
        (["sft", "train.epochs=0", "train.max_steps=0"], "set train.max_steps or train.epochs above 0"),
        (["pipeline", str(ROOT / "examples" / "pipeline_sft_dpo.yaml"), "dpo.dpo.betta=1", "--dry-run"],
         "did you mean dpo.beta?"),
    ]
    for argv, message in cases:
        code, out, err = _run_main(argv, capsys)
        assert code == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
        assert "Traceback" not in err


def test_unknown_subcommand_and_no_subcommand_exit_2(capsys):
    for argv in (["bogus"], [], ["sft", "--no-such-flag"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert "posttrain" in capsys.readouterr().err


# --------------------------------------------------------------------------- defects


def test_readme_error_example_is_what_the_cli_prints(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    expected = re.search(r"\$ posttrain sft examples/sft_full.yaml train.learning_rate=1e-4\n(error: .*)\n",
                         readme).group(1)
    code, _, err = _run_main(["sft", "examples/sft_full.yaml", "train.learning_rate=1e-4"], capsys)
    assert code == 2
    assert err.strip() == expected  # observed: "error: examples/sft_full.yaml: unknown key train.learning_rate; ..."


def test_mixed_precision_no_is_accepted(tmp_path):
    assert SFTConfig.load(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert SFTConfig.load(path).train.mixed_precision == "no"


@pytest.mark.parametrize("text", ["010", "0123", "2024.10", "1_000", "1:30"])
def test_string_overrides_keep_their_text(text):
    assert SFTConfig.load(None, [f"output_dir={text}"]).output_dir == text


def test_hash_in_a_text_override_is_kept():
    text = "Answer the question #exactly"
    cfg = SFTConfig.load(None, [f"adapter.virtual_tokens.init_text={text}"])
    assert cfg.adapter.virtual_tokens.init_text == text  # observed: 'Answer the question'


@pytest.mark.parametrize("raw, meant", [("0", False), ("1", True)])
def test_lean_activations_numbers_are_refused_or_mean_the_bool(raw, meant):
    try:
        value = SFTConfig.load(None, [f"model.lean_activations={raw}"]).model.lean_activations
    except ConfigError:
        return  # refusing it, like data.packing=1, is fine too
    assert value is meant  # observed: the int itself; `mode is False` / `mode is True` both fail downstream


def test_non_utf8_config_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\u00e9sum\u00e9 run\ntrain:\n  lr: 1.0e-4\n".encode("latin-1"))
    code, _, err = _run_main(["sft", str(path)], capsys)
    assert code == 2 and str(path) in err and err.count("\n") == 1


def test_first_override_with_a_yaml_value_is_an_override(monkeypatch, capsys):
    import posttrain.feedback.constitutional as constitutional

    seen = {}

    def stub(cfg):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(constitutional, "run_constitutional", stub)
    try:  # the documented setting: "principles file (YAML or JSONL ...)"
        code, _, err = _run_main(["cai", "constitutional.constitution=my_principles.yaml", "policy.kind=local"],
                                 capsys)
    except _Stop:
        err = ""
    assert "cfg" in seen, err  # observed: exit 2, "config file constitutional.constitution=... does not exist"
    assert seen["cfg"].constitutional.constitution == "my_principles.yaml"


def test_demo_with_output_dir_override_deletes_only_its_own_run(tmp_path, monkeypatch):
    import posttrain.train.sft as sft

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "keep.txt").write_text("an earlier demo run")
    seen = {}

    def stub(cfg):
        seen["output_dir"] = cfg.output_dir
        raise _Stop

    monkeypatch.setattr(sft, "run_sft", stub)
    with pytest.raises(_Stop):
        cli.main(["demo", "output_dir=runs/mine"])
    assert seen["output_dir"] == "runs/mine"
    assert (tmp_path / "runs" / "demo" / "keep.txt").is_file()  # observed: runs/demo was rmtree'd


def test_flags_are_never_abbreviated():
    """`posttrain serve --api-key SECRET` was read as --api-key-env SECRET (argparse's prefix
    matching): a flag must be spelt out."""
    from posttrain.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "tiny", "--api-key", "secret"])
    assert info.value.code == 2
    args = build_parser().parse_args(["serve", "tiny", "--api-key-env", "KEY"])
    assert args.api_key_env == "KEY"
