"""Review: config validation of the reward-model and DPO-family stages, and `posttrain score`.

The project's rule: every invalid or contradictory setting is refused before any model loads,
with a message naming the option, and no option is silently ignored. Written as an adversarial
review; the defects it found are fixed and its tests stay as regression coverage.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import DPOConfig, RMConfig, validate_dpo, validate_rm
from posttrain.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
# the smallest runs that still train: tiny preset, one or two steps, a few synthetic rows
TINY_RUN = ["train.max_steps=1", "train.batch_size=2", "data.synthetic_size=16", "train.progress_bar=false"]


def _dpo(*overrides: str) -> DPOConfig:
    return DPOConfig.load(None, list(overrides))


def _rm(*overrides: str) -> RMConfig:
    return RMConfig.load(None, list(overrides))


def _refused(validate, cfg_cls, overrides, option_name: str) -> str:
    """Loading + validating must raise ConfigError whose one-line message names the option."""
    with pytest.raises(ConfigError) as info:
        validate(cfg_cls.load(None, list(overrides)))
    message = str(info.value)
    assert option_name in message, message
    assert "\n" not in message
    return message


def _cli(*args: str, cwd: Path, extra_path: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(extra_path) if extra_path else "", str(ROOT / "src"),
                                                    env.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# =========================================================================== config: regression coverage


@pytest.mark.parametrize("overrides, option_name", [
    (["dpo.beta=0"], "dpo.beta"),
    (["dpo.beta=-1"], "dpo.beta"),
    (["dpo.beta=.nan"], "dpo.beta"),
    (["dpo.label_smoothing=0.5", "dpo.loss=cdpo"], "dpo.label_smoothing"),
    (["dpo.label_smoothing=-0.1", "dpo.loss=cdpo"], "dpo.label_smoothing"),
    (["dpo.label_smoothing=.nan", "dpo.loss=cdpo"], "dpo.label_smoothing"),
    (["dpo.orpo_lambda=-0.1", "dpo.loss=orpo"], "dpo.orpo_lambda"),
    (["dpo.nll_weight=-1"], "dpo.nll_weight"),
    (["dpo.kto_desirable_weight=0", "dpo.loss=kto"], "dpo.kto_"),
    (["dpo.kto_undesirable_weight=-2", "dpo.loss=kto"], "dpo.kto_"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1e-5"], "train.lr"),
    (["train.lr=.nan"], "train.lr"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["data.max_length=4"], "data.max_length"),
    (["data.eval_fraction=1"], "data.eval_fraction"),
    (["data.eval_fraction=-0.1"], "data.eval_fraction"),
    (["data.eval_fraction=.nan"], "data.eval_fraction"),
    (["data.synthetic_size=1"], "data.synthetic_size"),
    (["adapter.method=[lora]", "adapter.lora.r=0"], "adapter.lora.r"),
    (["adapter.method=[lora]", "adapter.lora.dropout=1.5"], "adapter.lora.dropout"),
])
def test_dpo_bad_numbers_are_refused_naming_the_option(overrides, option_name):
    _refused(validate_dpo, DPOConfig, overrides, option_name)


@pytest.mark.parametrize("overrides, option_name", [
    (["reward.centering=-0.5"], "reward.centering"),
    (["reward.centering=.nan"], "reward.centering"),
    (["data.format=unpaired"], "unpaired"),
    (["data.synthetic_kind=unpaired"], "unpaired"),
    (["adapter.method=[qlora]"], "adapter.method"),  # dora is lora with adapter.lora.dora (stop 33)
    (["train.batch_size=0"], "train.batch_size"),
    (["data.eval_fraction=1.0"], "data.eval_fraction"),
])
def test_rm_bad_settings_are_refused_naming_the_option(overrides, option_name):
    _refused(validate_rm, RMConfig, overrides, option_name)


@pytest.mark.parametrize("cls, override, expected", [
    (DPOConfig, "dpo.simpo_gama=1", "unknown key dpo.simpo_gama; did you mean dpo.simpo_gamma?"),
    (DPOConfig, "dpo.loss=simpoo", "did you mean simpo?"),
    (DPOConfig, "dpoo.beta=0.2", "unknown key dpoo.beta; did you mean dpo.beta?"),
    (DPOConfig, "adapter.lora.rr=4", "unknown key adapter.lora.rr; did you mean adapter.lora.r?"),
    (DPOConfig, "reward.centering=1", "unknown key reward.centering"),  # an RM option in a DPO config
    (RMConfig, "dpo.beta=0.1", "unknown key dpo.beta"),  # a DPO option in an RM config
    (RMConfig, "eval.exact_match_prompts=5", "unknown key eval.exact_match_prompts"),
    (RMConfig, "reward.centring=0.1", "did you mean reward.centering?"),
    (RMConfig, "reward.use_margins=yes please", "reward.use_margins must be true or false"),
    (DPOConfig, "dpo.share_prompt='true'", "dpo.share_prompt must be true or false, got 'true'"),
    (DPOConfig, "dpo.beta=true", "dpo.beta must be a number, got True"),
    (DPOConfig, "dpo.beta=abc", "dpo.beta must be a number, got 'abc'"),
    (DPOConfig, "dpo.beta=[0.1]", "dpo.beta must be a number"),
    (DPOConfig, "dpo.orpo_lambda=null", "dpo.orpo_lambda must be a number, got None"),  # dpo.beta=null: unset (stop 33)
    (DPOConfig, "train.batch_size=2.5", "train.batch_size must be an integer, got 2.5"),
    (DPOConfig, "train.max_steps='3.5'", "train.max_steps must be an integer"),  # '3' is 3 (stop 33)
    (DPOConfig, "dpo=simpo", "dpo must be a mapping"),
])
def test_unknown_keys_and_wrong_types_are_refused_at_load(cls, override, expected):
    with pytest.raises(ConfigError) as info:
        cls.load(None, [override])
    assert expected in str(info.value)


def test_unknown_nested_key_in_a_yaml_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("dpo:\n  loss: ipo\n  beta: 0.2\n  label_smothing: 0.1\ntrain:\n  lr: 1e-5\n")
    with pytest.raises(ConfigError) as info:
        DPOConfig.load(path)
    assert str(info.value) == f"{path}: unknown key dpo.label_smothing; did you mean dpo.label_smoothing?"


def test_yaml_file_json_file_overrides_and_the_saved_config_agree(tmp_path):
    """A YAML file and the same settings as compact JSON load to the same config; dotted overrides
    win over the file; YAML's `1e-5` (a string to YAML) becomes the float; the dump reloads equal."""
    import yaml

    settings = {"dpo": {"loss": "ipo", "beta": 0.25}, "train": {"lr": "1e-5", "max_steps": 3},
                "data": {"eval_fraction": 0.1}}
    yaml_path, json_path = tmp_path / "c.yaml", tmp_path / "c.json"
    yaml_path.write_text("dpo:\n  loss: ipo\n  beta: 0.25\ntrain:\n  lr: 1e-5\n  max_steps: 3\ndata:\n  eval_fraction: 0.1\n")
    json_path.write_text(json.dumps(settings))
    a, b = DPOConfig.load(yaml_path), DPOConfig.load(json_path)
    assert a == b
    assert (a.dpo.loss, a.dpo.beta, a.train.lr, a.train.max_steps) == ("ipo", 0.25, 1e-5, 3)
    assert isinstance(a.train.lr, float)
    c = DPOConfig.load(yaml_path, ["dpo.beta=0.5", "train.lr=2e-4"])
    assert (c.dpo.beta, c.train.lr, c.dpo.loss) == (0.5, 2e-4, "ipo")
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))  # what a run writes to config.yaml
    assert DPOConfig.load(dumped) == c


def test_cli_refuses_a_bad_dpo_config_before_making_the_run_directory(tmp_path):
    """`posttrain dpo` with an invalid β: exit 2, one `error:` line naming dpo.beta, and no run
    directory (nothing was written or loaded)."""
    out = tmp_path / "run"
    proc = _cli("dpo", f"output_dir={out}", "dpo.beta=0", *TINY_RUN, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: dpo.beta must be positive"
    assert not out.exists()


def test_cli_refuses_an_unknown_key_in_an_rm_yaml_file(tmp_path):
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nreward:\n  centerng: 0.1\n")
    proc = _cli("rm", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"error: {cfg}: unknown key reward.centerng; did you mean reward.centering?" in proc.stderr
    assert not (tmp_path / "run").exists()


# =========================================================================== config: defects


@pytest.mark.parametrize("overrides, option_name", [
    (["dpo.beta=.inf"], "dpo.beta"),
    (["train.lr=.inf"], "train.lr"),
    (["dpo.orpo_lambda=.inf", "dpo.loss=orpo"], "dpo.orpo_lambda"),
    (["dpo.kto_desirable_weight=.inf", "dpo.loss=kto"], "dpo.kto_"),
    (["dpo.nll_weight=.inf"], "dpo.nll_weight"),
])
def test_dpo_refuses_infinite_values(overrides, option_name):
    _refused(validate_dpo, DPOConfig, overrides, option_name)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_simpo_gamma_must_be_finite(value):
    """SimPO's γ is a target margin inside a log-sigmoid: NaN makes every loss NaN (the run skips
    every update and still exits 0), ±inf a constant loss. validate_dpo has no check on it."""
    _refused(validate_dpo, DPOConfig, ["dpo.loss=simpo", f"dpo.simpo_gamma={value}"], "dpo.simpo_gamma")


def test_rm_refuses_infinite_centering():
    _refused(validate_rm, RMConfig, ["reward.centering=.inf"], "reward.centering")


@pytest.mark.parametrize("override, option_name", [
    ("train.log_every=0", "train.log_every"),  # ZeroDivisionError in loop.py at the first step
    ("train.adam_betas=[1.5, 0.999]", "train.adam_betas"),  # torch ValueError when the optimizer is built
    ("train.adam_eps=-1", "train.adam_eps"),  # torch ValueError
    ("train.weight_decay=-0.1", "train.weight_decay"),  # torch ValueError
    ("train.warmup_steps=-3", "train.warmup_steps"),  # silently: no warmup and a longer decay
    ("train.max_grad_norm=-1", "train.max_grad_norm"),  # silently: no clipping (0 is the documented off)
    ("train.max_grad_norm=.nan", "train.max_grad_norm"),  # silently: no clipping
    ("train.epochs=.inf", "train.epochs"),  # OverflowError in total_steps after the model loaded
])
def test_train_section_values_that_fail_later_are_refused_up_front(override, option_name):
    overrides = [override] + (["train.max_steps=0"] if "epochs" in override else [])
    _refused(validate_dpo, DPOConfig, overrides, option_name)
    _refused(validate_rm, RMConfig, overrides, option_name)


def test_log_every_zero_is_refused_by_the_cli_before_the_run_starts(tmp_path):
    proc = _cli("rm", f"output_dir={tmp_path / 'run'}", "train.log_every=0", *TINY_RUN, cwd=tmp_path)
    assert proc.returncode == 2 and "train.log_every" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [["data.format=unpaired"], ["data.synthetic_kind=unpaired"]])
def test_pair_loss_with_unpaired_data_is_refused_before_loading(overrides):
    # independent expectation: the reward-model stage refuses the same data settings up front
    # (test_rm_bad_settings_are_refused_naming_the_option)
    _refused(validate_dpo, DPOConfig, ["dpo.loss=dpo", *overrides], "unpaired")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_dpo_refuses_an_8bit_optimizer_without_cuda_up_front():
    _refused(validate_dpo, DPOConfig, ["train.optimizer=adamw_8bit"], "train.optimizer")


def test_kto_accepts_pair_data_as_documented():
    """README: 'pairs and rankings also work for KTO (best = desirable)' — not a contradiction."""
    validate_dpo(_dpo("dpo.loss=kto", "data.format=pairs"))
    validate_dpo(_dpo("dpo.loss=kto", "data.synthetic_kind=ranking"))


@pytest.mark.parametrize("overrides, option_name", [
    (["dpo.loss=simpo", "dpo.reference=live"], "dpo.reference"),  # simpo is reference-free
    (["dpo.loss=orpo", "dpo.reference=live"], "dpo.reference"),  # orpo is reference-free
    (["dpo.loss=orpo", "dpo.nll_weight=1"], "dpo.nll_weight"),  # orpo skips nll_weight (preference.py:228)
    (["dpo.loss=dpo", "dpo.kto_desirable_weight=3"], "dpo.kto_desirable_weight"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.3"], "dpo.label_smoothing"),
    (["dpo.loss=dpo", "dpo.simpo_gamma=2"], "dpo.simpo_gamma"),
])
def test_options_that_do_nothing_for_the_chosen_loss_are_refused(overrides, option_name):
    _refused(validate_dpo, DPOConfig, overrides, option_name)


def test_live_reference_with_simpo_is_at_least_reported_by_a_run(tmp_path):
    proc = _cli("dpo", f"output_dir={tmp_path / 'run'}", "dpo.loss=simpo", "dpo.reference=live", *TINY_RUN,
                cwd=tmp_path)
    said = proc.stdout + proc.stderr
    assert "dpo.reference" in said, said[-2000:]


def test_alias_command_refuses_a_contradicting_loss_override(tmp_path):
    run = tmp_path / "run"
    proc = _cli("kto", f"output_dir={run}", "dpo.loss=dpo", *TINY_RUN, cwd=tmp_path)
    assert proc.returncode == 2 and "dpo.loss" in proc.stderr, (proc.returncode, proc.stderr[-1500:])


@pytest.mark.parametrize("overrides, option_name", [
    (["adapter.method=[lora]", "adapter.lora.r=0"], "adapter.lora.r"),  # peft ValueError after loading
    (["adapter.method=[lora]", "adapter.lora.dropout=2"], "adapter.lora.dropout"),
    (["adapter.method=[lora]", "adapter.lora.target_modules=[]"], "adapter.lora.target_modules"),
    (["adapter.method=[lora]", "adapter.schedule=[0:lora]"], "adapter.schedule"),  # never read by rm
])
def test_rm_checks_its_adapter_options_like_dpo_does(overrides, option_name):
    _refused(validate_rm, RMConfig, overrides, option_name)


@pytest.mark.parametrize("overrides, option_name", [
    (["adapter.method=[lora]", "adapter.lora.r=0"], "adapter.lora.r"),
    (["adapter.method=[lora]", "adapter.lora.dropout=2"], "adapter.lora.dropout"),
    (["adapter.method=[lora]", "adapter.lora.target_modules=[]"], "adapter.lora.target_modules"),
    (["adapter.method=[full]", "adapter.schedule=[0:full]"], "adapter.schedule"),
])
def test_dpo_checks_adapter_options_up_front(overrides, option_name):
    """The reference behaviour the RM test above expects: validate_dpo runs validate_adapter."""
    _refused(validate_dpo, DPOConfig, overrides, option_name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_rm_refuses_an_8bit_optimizer_without_cuda_up_front():
    _refused(validate_rm, RMConfig, ["train.optimizer=adamw_8bit"], "train.optimizer")


def test_rm_lora_accepts_a_regex_target_as_documented(tmp_path):
    proc = _cli("rm", f"output_dir={tmp_path / 'run'}", "adapter.method=[lora]",
                "adapter.lora.target_modules=['re:.*q_proj']", *TINY_RUN, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_rm_lora_plus_ratio_is_applied_or_refused(tmp_path):
    from safetensors.torch import load_file

    def lora_b(ratio: str):
        run = tmp_path / f"run{ratio}"
        proc = _cli("rm", f"output_dir={run}", "adapter.method=[lora]", f"adapter.lora.lr_ratio_b={ratio}",
                    "train.lr=1e-3", *TINY_RUN, cwd=tmp_path)
        return proc, run

    proc16, run16 = lora_b("16")
    if proc16.returncode != 0:  # refused: fine, if it names the option before any work
        assert "adapter.lora.lr_ratio_b" in proc16.stderr
        return
    proc1, run1 = lora_b("1")
    assert proc1.returncode == 0, proc1.stderr[-1500:]
    w16 = load_file(str(run16 / "final" / "adapter_model.safetensors"))
    w1 = load_file(str(run1 / "final" / "adapter_model.safetensors"))
    b_keys = [k for k in w1 if "lora_B" in k]
    assert b_keys
    # one AdamW step moves each B entry by about lr × ratio: with ratio 16 the B matrices must differ
    assert any(not torch.equal(w16[k], w1[k]) for k in b_keys)


# =========================================================================== posttrain score


REWARD_MODULE = '''
import math

def length(prompt, response):
    return float(len(response))

def vowels(prompt, response):
    return float(sum(ch in "aeiou" for ch in response))

def has_answer(prompt, response, row):
    return float(response == row.get("answer"))

def nothing(prompt, response):
    return None
'''


@pytest.fixture
def scoring(tmp_path):
    (tmp_path / "review_rewards.py").write_text(REWARD_MODULE)
    return tmp_path


def _write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _score(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`posttrain score ARGS` run in-process through the CLI's own `main` (a subprocess costs ~2 s):
    the working directory and import path a user's shell would give, stdout / stderr captured."""
    import contextlib
    import io

    from posttrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_path = Path.cwd(), list(sys.path)
    os.chdir(tmp)
    sys.path.insert(0, str(tmp))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(["score", *args])
            except SystemExit as exc:  # argparse's own errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
        sys.modules.pop("review_rewards", None)
    return subprocess.CompletedProcess(["posttrain", "score", *args], code, out.getvalue(), err.getvalue())


def _read_jsonl_strict(path: Path) -> list[dict]:
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name}")
    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


ROWS = [
    {"id": "r1", "prompt": "Smallest letter: q m t", "response": "m", "meta": {"k": [1, 2]}, "answer": "m"},
    {"id": "r2", "prompt": [{"role": "user", "content": "Copy: a b"}], "completion": "a b", "answer": "a b"},
    {"id": "r3", "prompt": "Reverse: x y z", "response": "zyx aeiou", "answer": "z y x"},
    {"id": "r4", "prompt": "q", "response": "oo", "answer": "x"},
]


def _raw(response: str) -> tuple[float, float]:
    return float(len(response)), float(sum(ch in "aeiou" for ch in response))


def test_score_weights_calibration_and_floor_match_a_hand_computation(scoring):
    """total = Σ w·(r − mean)/std − 10·Σ max(0, floor − r)/std, with mean/sample-std per component
    over the file (std 0 → 1), the floor read on the raw score; columns: every input field in order,
    then reward_<name> per component in the order given, then the total; rows in input order."""
    src = _write_rows(scoring / "rows.jsonl", ROWS)
    out = scoring / "out.jsonl"
    proc = _score(scoring, "--function", "len=review_rewards:length", "--function", "vow=review_rewards:vowels",
                  "--weight", "len=-0.5", "--weight", "vow=2", "--floor", "len=2", "--calibrate",
                  "--input", str(src), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    got = _read_jsonl_strict(out)
    responses = [r.get("response", r.get("completion")) for r in ROWS]
    lens, vows = zip(*map(_raw, responses))
    lm, ls, vm, vs = statistics.mean(lens), statistics.stdev(lens), statistics.mean(vows), statistics.stdev(vows)
    assert len(got) == len(ROWS)
    for row_in, row_out, n, v in zip(ROWS, got, lens, vows):
        assert list(row_out) == list(row_in) + ["reward_len", "reward_vow", "reward"]
        assert {k: row_out[k] for k in row_in} == row_in
        assert (row_out["reward_len"], row_out["reward_vow"]) == (n, v)
        expected = -0.5 * (n - lm) / ls + 2 * (v - vm) / vs - 10 * max(0.0, 2 - n) / ls
        assert row_out["reward"] == pytest.approx(expected, abs=1e-9)
    assert f"calibrated len: mean {lm:.4g}, std {ls:.4g}" in proc.stderr


def test_score_zero_and_negative_weights_without_calibration(scoring):
    src = _write_rows(scoring / "rows.jsonl", ROWS[:3])
    proc = _score(scoring, "--function", "len=review_rewards:length", "--function", "vow=review_rewards:vowels",
                  "--weight", "len=0", "--weight", "vow=-3", "--column", "score", "--input", str(src))
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    for row_in, row_out in zip(ROWS, got):
        n, v = _raw(row_in.get("response", row_in.get("completion")))
        assert row_out["score"] == -3 * v and row_out["score_len"] == n and row_out["score_vow"] == v


def test_score_single_component_writes_only_the_total(scoring):
    src = _write_rows(scoring / "rows.jsonl", ROWS[:2])
    proc = _score(scoring, "--function", "len=review_rewards:length", "--weight", "len=2", "--input", str(src))
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [list(r) for r in got] == [list(ROWS[0]) + ["reward"], list(ROWS[1]) + ["reward"]]
    assert [r["reward"] for r in got] == [2.0, 6.0]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "q", "response": "a"}', '{"prompt": "q"}'], "rows.jsonl:2: needs 'prompt' and 'response'"),
    (['{"prompt": "q", "response": "a"}', '{not json'], "rows.jsonl:2: invalid JSON"),
    (['{"prompt": "q", "response": "a"}', '[1, 2]'], "rows.jsonl:2: expected a JSON object"),
    (['{"prompt": "q", "response": "a"}', '{"prompt": "", "response": "x"}'], "rows.jsonl:2: 'prompt' is empty"),
    (['{"prompt": "q", "response": "a"}', '{"prompt": "q", "response": "a"}', '{"response": "b"}'],
     "rows.jsonl:3: expected an object with 'prompt'"),
    (['{"prompt": "q", "response": "a", "reward": 1}'], "rows.jsonl:1: the row already has a 'reward' column"),
])
def test_score_bad_input_rows_are_named_by_file_and_line(scoring, lines, message):
    src = _write_rows(scoring / "rows.jsonl", lines)
    out = scoring / "out.jsonl"
    proc = _score(scoring, "--function", "len=review_rewards:length", "--input", str(src), "--output", str(out))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--weight", "nope=1"], "--weight nope=...: no reward named nope"),
    (["--weight", "len=heavy"], "--weight len=heavy: not a number"),
    (["--weight", "len"], "must look like NAME=VALUE"),
    (["--floor", "len=low"], "--floor len=low: not a number"),
])
def test_score_bad_weight_and_floor_options_are_refused(scoring, args, message):
    src = _write_rows(scoring / "rows.jsonl", ROWS[:1])
    proc = _score(scoring, "--function", "len=review_rewards:length", *args, "--input", str(src))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("option, value", [("--weight", "nan"), ("--weight", "inf"), ("--floor", "nan"),
                                           ("--floor", "inf")])
def test_score_refuses_non_finite_weights_and_floors(scoring, option, value):
    src = _write_rows(scoring / "rows.jsonl", ROWS[:2])
    proc = _score(scoring, "--function", "len=review_rewards:length", option, f"len={value}", "--input", str(src))
    assert proc.returncode == 2 and option in proc.stderr, (proc.returncode, proc.stdout, proc.stderr)


def test_score_refuses_two_functions_with_one_name(scoring):
    src = _write_rows(scoring / "rows.jsonl", ROWS[:2])
    proc = _score(scoring, "--function", "x=review_rewards:length", "--function", "x=review_rewards:vowels",
                  "--input", str(src))
    assert proc.returncode == 2 and "x" in proc.stderr, (proc.stdout, proc.stderr)


def test_score_gives_a_three_argument_function_its_row(scoring):
    src = _write_rows(scoring / "rows.jsonl", ROWS)
    proc = _score(scoring, "--function", "em=review_rewards:has_answer", "--input", str(src))
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line)["reward"] for line in proc.stdout.splitlines()]
    expected = [float(r.get("response", r.get("completion")) == r["answer"]) for r in ROWS]
    assert expected == [1.0, 1.0, 0.0, 0.0]
    assert got == expected


def test_score_with_the_builtin_exact_match_reward(scoring):
    src = _write_rows(scoring / "rows.jsonl", ROWS)
    proc = _score(scoring, "--function", "em=posttrain.rewards:exact_match", "--input", str(src))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["reward"] for line in proc.stdout.splitlines()] == [1.0, 1.0, 0.0, 0.0]


def test_a_component_returning_none_is_named():
    from posttrain.rewards import CombinedReward, RewardComponent

    combined = CombinedReward([RewardComponent("ok", lambda p, r: [1.0] * len(r)),
                               RewardComponent("silent", lambda p, r: [None] * len(r))])
    with pytest.raises(UserError, match="silent"):
        combined.score([[{"role": "user", "content": "q"}]] * 2, ["a", "b"])


def test_score_names_the_response_field_the_row_actually_has(scoring):
    src = _write_rows(scoring / "rows.jsonl", ['{"prompt": "q", "response": 5}'])
    proc = _score(scoring, "--function", "len=review_rewards:length", "--input", str(src))
    assert proc.returncode != 0
    assert "rows.jsonl:1: 'response'" in proc.stderr, proc.stderr


def test_combined_reward_with_floor_and_calibration_in_process_matches_hand_values():
    """Library path: calibrate on one set, score another; shift/scale stay from calibration."""
    from posttrain.rewards import CombinedReward, RewardComponent

    def length(prompts, responses):
        return [float(len(r)) for r in responses]

    combined = CombinedReward([RewardComponent("len", length, weight=3.0, floor=2.0)], penalty=4.0)
    combined.calibrate([[{"role": "user", "content": "q"}]] * 3, ["a", "bb", "cccc"])
    mean, std = statistics.mean([1, 2, 4]), statistics.stdev([1, 2, 4])
    totals, raw = combined.score([[{"role": "user", "content": "q"}]] * 2, ["x", "yyyyyy"])
    assert raw == {"len": [1.0, 6.0]}
    assert totals == pytest.approx([3 * (1 - mean) / std - 4 * 1 / std, 3 * (6 - mean) / std])
    assert all(math.isfinite(t) for t in totals)
