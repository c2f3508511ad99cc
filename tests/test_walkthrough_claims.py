"""A claims walk: what the tool says about itself, checked against what it does.

Walked: the help text of every config field (the dataclasses under `posttrain/config/`, as
`posttrain <cmd> --help`, `python -m posttrain.config` and `help(XConfig)` show them) -- stated
defaults, ranges, "ignored when ...", "empty = ..." -- probed through the validators and the data
layer (`prepare_sft_data`, `prepare_prompts`, `prepare_preference_data`, `stream_sft_examples`);
the `--help` of every command (the alias commands kto / orpo / rloo, the data commands, score,
generate, chat, serve, merge, demo); the docstrings of the public API in `posttrain/__init__.py`
and of the losses in `posttrain/losses/` (each formula typed out here in float64: all agree with
the code, and nearly all were already tested); the comments of the example configs under
`examples/` (counts of bundled probes, seed tasks and attacks, replay shares, batch arithmetic);
and the modules the README's Architecture section names.

Right, and mostly tested already: the loss formulas and their papers, range checks of the
training, forgetting, RL, feedback, quality and red-team sections, the numbers the examples'
comments state (60 harmful requests in 10 categories, 61 safe prompts, nine attacks, 25 seed tasks,
8 principles, a fifth of the examples replayed), cdpo's unset ε = 0.1, the evaluate example's
tie and zero KL.

Wrong: `data.eval_files` is read by the preference stages when `data.train_files` is
[synthetic] (the help says so, and that was fixed once) but SFT and the RL stages drop it without
a word; `data.streaming` with the bundled synthetic data, or without `train.max_steps`, passes
the config checks and is refused only once the model is loaded (the first with a message naming a
file "synthetic" that does not exist); `posttrain kto|orpo|rloo --help` states the default of the
setting the command fixes as the plain command's ('dpo', 'grpo'); and every data command's
`--help` gives `train.lr=2e-5` as its example override, a key none of them has.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 31: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PRESET = "tiny-2l"


@pytest.fixture(scope="module")
def tok():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer(PRESET)


def _help(capsys, *argv) -> str:
    from posttrain import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- data.eval_files with synthetic data


def test_sft_eval_files_are_the_held_out_set_with_synthetic_training_data(tmp_path, tok):
    """SFT help: `data.eval_files` 'held-out files; empty = split eval_fraction off the training
    data' (and the preference stages' help: 'also with train_files: [synthetic], in place of its
    held-out split', which prepare_preference_data does). Given files, they are the held-out set,
    or the config is refused; never silently replaced by the synthetic split."""
    from posttrain.config import SFTConfig, validate_sft
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.errors import ConfigError

    held = _write_jsonl(tmp_path / "held.jsonl", [{"instruction": f"Say {w}.", "input": "", "output": w}
                                                  for w in ("alpha", "beta", "gamma")])
    cfg = SFTConfig.load(None, ["data.synthetic_size=40", "data.max_length=64", f"data.eval_files=[{held}]"])
    try:
        validate_sft(cfg)
    except ConfigError as exc:
        assert "eval_files" in str(exc)
        return
    data = prepare_sft_data(cfg.data, tok, None, 0, log=lambda *_: None)
    sources = [r.source for r in data.eval_records]
    assert len(sources) == 3 and all("held.jsonl" in s for s in sources), (
        f"the held-out set is {sources} (the synthetic split), not the 3 rows of {held.name}")


def test_rl_eval_files_are_the_held_out_prompts_with_synthetic_training_prompts(tmp_path):
    """GRPO / PPO help: `data.eval_files` 'held-out prompt files; empty = split eval_fraction off the
    training prompts'. With train_files [synthetic] they must still be the held-out prompts (as
    the preference stages do), or the config is refused."""
    from posttrain.config import GRPOConfig, validate_grpo
    from posttrain.data.prompts import prepare_prompts
    from posttrain.errors import ConfigError

    held = _write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say {w}.", "answer": w}
                                                  for w in ("alpha", "beta", "gamma")])
    cfg = GRPOConfig.load(None, ["data.synthetic_size=40", f"data.eval_files=[{held}]"])
    try:
        validate_grpo(cfg)
    except ConfigError as exc:
        assert "eval_files" in str(exc)
        return
    _, held_out, _ = prepare_prompts(cfg.data, None, 0, log=lambda *_: None)
    sources = [r.source for r in held_out]
    assert len(sources) == 3 and all("held.jsonl" in s for s in sources), (
        f"the held-out prompts are {sources} (the synthetic split), not the 3 rows of {held.name}")


def test_preference_eval_files_replace_the_synthetic_held_out_split(tmp_path, tok):
    """rm / dpo help: eval_files 'also with `train_files: [synthetic]`, in place of its held-out
    split' -- the behaviour the SFT and RL data sections should share (above)."""
    from posttrain.config import DPOConfig, validate_dpo
    from posttrain.data.preferences import prepare_preference_data

    held = _write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say {w}.", "chosen": w, "rejected": "no"}
                                                  for w in ("alpha", "beta", "gamma")])
    cfg = DPOConfig.load(None, ["data.synthetic_size=40", f"data.eval_files=[{held}]"])
    validate_dpo(cfg)
    data = prepare_preference_data(cfg.data, tok, None, 0, log=lambda *_: None)
    assert data.report["eval_read"]["rows"] == 3 and data.report["eval_records"] == 3
    assert data.report["train_read"]["source"] == "synthetic"


# --------------------------------------------------------------------------- data.streaming, checked up front


def test_streaming_synthetic_data_is_streamed_or_refused_up_front(tok):
    """`data.train_files` takes 'synthetic'; `data.streaming` 'read training files lazily'. Together
    they must either stream the synthetic examples or be refused by the config checks (the brief:
    configs validated up front), not pass them and then fail, after the model has loaded, with a
    message about a file named 'synthetic'."""
    from posttrain.config import SFTConfig, validate_sft
    from posttrain.data.pipeline import stream_sft_examples
    from posttrain.errors import ConfigError, UserError

    cfg = SFTConfig.load(None, ["data.streaming=true", "train.max_steps=1", "data.max_length=64"])
    try:
        validate_sft(cfg)
    except ConfigError as exc:
        assert "streaming" in str(exc)
        return
    try:
        first = next(iter(stream_sft_examples(cfg.data, tok, None, log=lambda *_: None)))
    except UserError as exc:
        pytest.fail(f"validate_sft accepted the config; the stream then failed: {exc}")
    assert first.num_label_tokens > 0


def test_streaming_without_max_steps_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """run_sft says 'data.streaming=true needs train.max_steps (the data length is unknown)': a check
    of two settings alone, which belongs with the config checks (README: mistakes 'stop the run
    before any work'); measured: the model is built first."""
    import posttrain.train.sft as sft
    from posttrain.config import SFTConfig
    from posttrain.errors import ConfigError

    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "a b c d e f g"}] * 4)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was refused")

    monkeypatch.setattr(sft, "build_model", no_model)
    cfg = SFTConfig.load(None, [f"output_dir={tmp_path / 'run'}", f"model.path={PRESET}", f"data.train_files=[{text}]",
                                "data.format=text", "data.streaming=true", "train.progress_bar=false"])
    with pytest.raises(ConfigError, match="max_steps"):
        sft.run_sft(cfg)


# --------------------------------------------------------------------------- --help of the commands


def _alias_setting_line(capsys, command: str) -> tuple[str, str]:
    from posttrain.cli import ALIAS_OVERRIDES

    key, fixed = ALIAS_OVERRIDES[command][0].split("=", 1)
    text = _help(capsys, command, "--help")
    line = re.search(rf"{re.escape(key)} \([^)]*\)", text)  # the key, its type and its stated default
    assert line, f"{key} is not listed by posttrain {command} --help"
    return line.group(0), fixed


@pytest.mark.parametrize("command", ["kto", "orpo", "rloo"])
def test_alias_help_states_the_value_the_alias_runs_with(capsys, command):
    """`posttrain kto` is 'posttrain dpo with dpo.loss=kto' and runs KTO whatever the file says
    (cli.check_alias); its --help then lists `dpo.loss (..., default 'dpo')`, a stated default the
    command never uses. The line must state the alias's value."""
    line, fixed = _alias_setting_line(capsys, command)
    stated = re.search(r"default '([^']*)'", line)
    assert stated is None or stated.group(1) == fixed, (
        f"posttrain {command} --help: {line!r}; the command runs with {fixed}")


def test_plain_command_help_states_the_dataclass_default(capsys):
    """The non-alias commands' help shows the dataclass's default (the source the README table
    and help(DPOConfig) share)."""
    from posttrain.config import DPOConfig, GRPOConfig

    text = _help(capsys, "dpo", "--help")
    assert f"dpo.loss (dpo|cdpo|ipo|hinge|simpo|orpo|kto, default {DPOConfig().dpo.loss!r})" in text
    text = _help(capsys, "grpo", "--help")
    assert f"grpo.advantage (grpo|rloo, default {GRPOConfig().grpo.advantage!r})" in text


def _override_example(capsys, command: str) -> str:
    text = _help(capsys, command, "--help")
    found = re.search(r"dotted overrides, e\.g\. (\S+=\S+)", text)
    assert found, f"posttrain {command} --help gives no example override"
    return found.group(1)


def _config_class(command: str):
    from posttrain.cli import _DATA_COMMANDS, _STAGES

    return {**_STAGES, **_DATA_COMMANDS}[command]()[0]


@pytest.mark.parametrize("command", ["quality", "redteam", "evaluate", "rlaif", "constitutional", "self-instruct"])
def test_data_command_help_example_override_is_one_of_its_settings(capsys, command):
    """`posttrain quality --help`: 'overrides  dotted overrides, e.g. train.lr=2e-5'. Typed as shown,
    the command refuses it (`unknown key train.lr`). The example must be a key the command has."""
    from posttrain.config.schema import check_override_key
    from posttrain.errors import ConfigError

    example = _override_example(capsys, command)
    try:
        check_override_key(_config_class(command), example)
    except ConfigError as exc:
        pytest.fail(f"posttrain {command} --help suggests {example}: {exc}")


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "grpo", "ppo"])
def test_training_command_help_example_override_is_one_of_its_settings(capsys, command):
    from posttrain.config.schema import check_override_key

    check_override_key(_config_class(command), _override_example(capsys, command))


# --------------------------------------------------------------------------- docstring formulas, README architecture


def test_ranking_loss_margins_apply_to_pairs_only_as_the_docstring_writes():
    """losses.preference.ranking_loss: 'margins (P,): a pair's margin m, as in Bradley-Terry
    (−log σ(r_w − r_l − m)), for prompts with K' = 2 (ignored for rankings)'; a prompt's loss is the
    mean over its ordered pairs. Typed out in float64 for a batch holding a pair (padded to K = 3)
    and a 3-way ranking, both with margins."""
    from posttrain.losses.preference import ranking_loss

    rewards = torch.tensor([[0.3, -0.4, 9.0], [1.2, 0.1, -0.5]], dtype=torch.float64)
    ranks = torch.tensor([[0, 1, 0], [0, 2, 1]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    margins = torch.tensor([0.7, 5.0], dtype=torch.float64)

    def nls(x):  # −log σ(x)
        return math.log1p(math.exp(-x))

    pair = nls(0.3 - (-0.4) - 0.7)
    r = rewards[1].tolist()
    ranking = (nls(r[0] - r[2]) + nls(r[0] - r[1]) + nls(r[2] - r[1])) / 3  # 0 > 2 > 1, no margin
    got = ranking_loss(rewards, ranks, valid, margins=margins)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([pair, ranking], rel=1e-13)


def _architecture_paths() -> list[str]:
    """Every module or folder the README's Architecture tree names: each entry's first word (a
    folder at the left margin is the repository's, one indented under src/posttrain/ is the
    package's), the file names listed in a folder's description (schema.py, ...) and the package
    paths a description cites (eval/report.py)."""
    section = README[README.index("## Architecture"):README.index("## Tests")]
    tree = section.split("```")[3]
    paths, folder = [], ""
    for line in tree.splitlines():
        entry = re.match(r"^(  )?(\S+)\s*(.*)$", line) if line[:4].strip() else None
        rest = line
        if entry:
            indented, name, rest = entry.groups()
            if not indented:
                paths.append(name)  # src/posttrain/, examples/, tests/, benchmarks/
                continue
            name = "src/posttrain/" + name
            folder = name if name.endswith("/") else name.rsplit("/", 1)[0] + "/"
            paths.append(name)
        paths += ["src/posttrain/" + f for f in re.findall(r"(?<![\w./])([a-z_]+/[a-z_]+\.py)\b", rest)]
        paths += [folder + f for f in re.findall(r"(?<![\w./])([a-z_]+\.py)\b", rest)
                  if folder != "src/posttrain/" or not entry]
    return sorted(set(paths))


def test_every_module_the_architecture_section_names_exists():
    """README Architecture: 'src/posttrain/ cli.py ... data/readers.py ... config/ ... schema.py
    (the machinery), sections.py ...'. Each file and folder it names is there (the second half's
    test only checks paths written with their src/posttrain/ prefix)."""
    paths = _architecture_paths()
    assert len(paths) > 60, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing
