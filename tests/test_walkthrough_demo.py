"""A demo walk: what a newcomer meets running `posttrain demo` (scripts/demo.sh, README "Start here").

Walked: `posttrain demo --help` and its flags (`--output-dir`, dotted overrides, `train.seed=1`); the
demo run end to end with its stages shrunk (SFT 1 step on 400 rows, the reward model, DPO and the
alignment report at a few steps and prompts, by appending overrides to their configs), then run a
second time into the same directory; a Ctrl-C in the SFT stage and in the reward-model stage, and
what the same command, and the same command with `train.resume=auto`, do next; an output dir that
cannot be created; whether each figure the demo prints is measured, names its n, and is the one its
run directories hold on disk; whether the README's demo figures name the commit and date they come
from; and the follow-on commands the README names on the demo's run directories (`generate --model`
the demo's run dir, `score --model` its reward model, `evaluate policy=.../dpo/final
reference=.../final`).

What was right: the printed SFT, reward-model, DPO and report figures are the ones in summary.json,
rm/summary.json, dpo/summary.json and report/report.json, each with its held-out n (the DPO line
apart); an output dir under a regular file is one line `error: ...` and exit 2, before any model
builds; a foreign directory is refused (pinned elsewhere); after a Ctrl-C, `train.resume=auto`
resumes the SFT run from its checkpoint and the later stages start afresh coherently; the demo's SFT
run dir, reward model and DPO model load in generate, score and evaluate as the README says; the
README's demo tables name their date and commit.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 34: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_SFT = ["train.max_steps=1", "data.synthetic_size=400", "eval.exact_match_prompts=4", "train.eval_every=0"]
# appended to each later stage's own overrides (later ones win): a few steps and prompts each
SMALL_STAGES = {"RMConfig": ["train.max_steps=2", "data.synthetic_size=160", "data.eval_fraction=0.05"],
                "DPOConfig": ["train.max_steps=1", "data.synthetic_size=160", "data.eval_fraction=0.05",
                              "eval.exact_match_prompts=4"],
                "EvaluateConfig": ["prompts.limit=4", "safety.limit=2"]}


def _shrink_stages(monkeypatch) -> None:
    import posttrain.config as config
    import posttrain.config.evaluate as evaluate

    for cls in (config.RMConfig, config.DPOConfig, evaluate.EvaluateConfig):
        load = cls.load.__func__

        def small(klass, path, overrides=(), _load=load, _extra=SMALL_STAGES[cls.__name__]):
            return _load(klass, path, [*overrides, *_extra])

        monkeypatch.setattr(cls, "load", classmethod(small))


def _skip_later_stages(monkeypatch) -> None:
    import posttrain.demo as demo

    monkeypatch.setattr(demo, "_preference_stages", lambda rm_cfg, dpo_cfg: "(preference stages skipped)")
    monkeypatch.setattr(demo, "_report_stage", lambda cfg: "(report skipped)")


def _ctrl_c_at_sft_step(monkeypatch, step: int) -> None:
    """SIGINT once, as SFT's step `step` is logged (the loop sees it at the step's end, as a Ctrl-C)."""
    from posttrain.train.metrics import RunLogger

    advance, fired = RunLogger.advance, []

    def advance_then_signal(self, record):
        advance(self, record)
        if record["step"] == step and not fired and self.path.parent.name == "demo":
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunLogger, "advance", advance_then_signal)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One real demo run, every stage shrunk: (run dir, what it printed)."""
    from posttrain.demo import run_demo

    out = tmp_path_factory.mktemp("walk-demo") / "demo"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(printed):
        _shrink_stages(monkeypatch)
        assert run_demo(str(out), SMALL_SFT) == 0
    return out, printed.getvalue()


# --------------------------------------------------------------------------- defects


def test_a_second_demo_into_its_own_run_directory_starts_afresh(demo_run, tmp_path, monkeypatch):
    """README: "Each run starts afresh in runs/demo ...: it deletes an earlier demo run there". Run
    `bash scripts/demo.sh` twice and the second stops at once: `error: demo output dir runs/demo holds
    files no demo wrote (.lock)` (exit 2) -- the lock file the SFT, rm/ and dpo/ runs leave behind."""
    import posttrain.train.sft as sft
    from posttrain.demo import run_demo
    from posttrain.errors import UserError

    earlier = tmp_path / "demo"
    shutil.copytree(demo_run[0], earlier)  # a whole earlier demo run, as the demo left it
    seen = {}

    class Started(Exception):
        pass

    def started(cfg):
        seen["left"] = sorted(p.name for p in Path(cfg.output_dir).iterdir()) if Path(cfg.output_dir).exists() else []
        raise Started

    monkeypatch.setattr(sft, "run_sft", started)
    try:
        run_demo(str(earlier), SMALL_SFT)
    except Started:
        pass
    except UserError as refused:
        seen["refused"] = str(refused)
    assert seen.get("left") == [], seen  # observed: refused, "holds files no demo wrote (.lock)"


def test_a_ctrl_c_in_the_demo_promises_only_what_the_same_command_does(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the demo's SFT stage prints "interrupted: checkpoint saved at step 1 of 2; the same
    command resumes from it". The demo runs SFT with train.resume=never and clears its directory
    first, so the same command cannot resume: today it refuses the directory (the .lock above), and
    with that fixed it would delete the checkpoint it just promised to resume from. Either the same
    command resumes, or the message names the command that does (`train.resume=auto`)."""
    from posttrain import cli

    _shrink_stages(monkeypatch)
    _skip_later_stages(monkeypatch)
    command = ["demo", "--output-dir", str(tmp_path / "demo"), *SMALL_SFT, "train.max_steps=2"]
    _ctrl_c_at_sft_step(monkeypatch, 1)
    assert cli.main(command) == 130
    first = capsys.readouterr()
    promised = "the same command resumes" in first.out + first.err
    rc = cli.main(command)
    again = capsys.readouterr()
    resumed = rc == 0 and "resumed from" in again.out + again.err
    assert resumed or not promised, (f"promised a resume; the same command gave exit {rc}: "
                                     f"{(again.err.strip().splitlines() or [''])[-1]}")


def test_the_demo_says_when_it_deletes_an_earlier_run(tmp_path, monkeypatch, capsys):
    """A fresh training run says "fresh start: removed 1 checkpoint(s), metrics.jsonl of an earlier run
    from DIR"; the demo removes a whole earlier demo run, its trained models with it, and prints nothing
    about it (a user who ran it for three minutes and kept no copy learns it from `ls`)."""
    import posttrain.train.sft as sft
    from posttrain.demo import run_demo

    earlier = tmp_path / "demo"
    (earlier / "final").mkdir(parents=True)
    (earlier / "final" / "model.safetensors").write_bytes(b"weights")
    (earlier / "config.yaml").write_text("output_dir: demo\n")

    class Started(Exception):
        pass

    def started(cfg):
        raise Started

    monkeypatch.setattr(sft, "run_sft", started)
    with pytest.raises(Started):
        run_demo(str(earlier), SMALL_SFT)
    assert not earlier.exists()  # it was deleted
    said = capsys.readouterr()
    told = [line for line in (said.out + said.err).splitlines() if str(earlier) in line
            and re.search(r"remov|delet|clear|replac", line)]
    assert told, f"nothing said about deleting {earlier}; printed: {(said.out + said.err)!r}"


def test_an_exact_match_never_measured_is_not_printed_as_a_figure(tmp_path, monkeypatch, capsys):
    """The demo reads exact_match_before/after with a default of 0.0: a run that measured none (the
    natural override for a faster demo) prints 0.0% → 0.0%, which summary.json does not hold."""
    from posttrain.demo import run_demo

    _skip_later_stages(monkeypatch)
    run_dir = tmp_path / "demo"
    assert run_demo(str(run_dir), [*SMALL_SFT, "eval.exact_match_prompts=0"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "exact_match_after" not in summary  # nothing was measured
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("posttrain demo:"))
    assert "%" not in line, line


# --------------------------------------------------------------------------- right, and now tested


def test_every_figure_the_demo_prints_is_the_one_its_run_directories_hold(demo_run):
    """Each printed figure is read from the stage's own file, with its held-out n: SFT from
    summary.json, the reward model from rm/summary.json, DPO from dpo/summary.json, the report from
    report/report.json (whose report.md the line names)."""
    run_dir, printed = demo_run
    sft = json.loads((run_dir / "summary.json").read_text())
    rm = json.loads((run_dir / "rm" / "summary.json").read_text())
    dpo = json.loads((run_dir / "dpo" / "summary.json").read_text())
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert sft["steps"] == 1 and sft["exact_match_prompts"] == 4  # the overrides reached SFT
    assert (f"exact match on {sft['exact_match_prompts']} held-out prompts {sft['exact_match_before']:.1%} → "
            f"{sft['exact_match_after']:.1%} after {sft['steps']} SFT steps") in printed
    assert (f"held-out pairwise accuracy {rm['eval_before']['accuracy']:.1%} → {rm['eval_after']['accuracy']:.1%} "
            f"after {rm['steps']} steps ({rm['eval_items']} prompts)") in printed
    assert rm["steps"] == 2 and rm["eval_items"] == 8
    assert (f"implicit-reward accuracy {dpo['eval_before']['rewards/accuracy']:.1%} → "
            f"{dpo['eval_after']['rewards/accuracy']:.1%} ({dpo['eval_items']} pairs); exact match on "
            f"{dpo['exact_match_prompts']} held-out prompts {dpo['exact_match_before']:.1%} → "
            f"{dpo['exact_match_after']:.1%} after {dpo['steps']} steps") in printed
    policy, reference = report["models"]["policy"], report["models"]["reference"]
    assert (f"({report['prompts']} held-out prompts; {run_dir / 'report' / 'report.md'}): exact match "
            f"{policy['exact_match']['rate']:.1%} vs {reference['exact_match']['rate']:.1%}, answer NLL "
            f"{policy['answer_nll']:.3f} vs {reference['answer_nll']:.3f} per token, "
            f"KL {report['kl_to_reference']:.3f} ± {report['kl_se']:.3f} nats per response (a sampled estimate over "
            f"{report['kl_responses']} responses") in printed
    assert (run_dir / "report" / "report.md").is_file()


def test_the_follow_on_commands_the_readme_names_run_on_the_demos_models(demo_run, tmp_path, monkeypatch):
    """The demo ends with `posttrain chat --model RUN_DIR`; the README names generate --model on a run
    dir, score --model on a reward model's final/, and `posttrain evaluate examples/evaluate.yaml
    policy=runs/demo/dpo/final reference=runs/demo/final`. Each runs on a demo's directories."""
    from posttrain import cli

    run_dir = demo_run[0]
    monkeypatch.chdir(ROOT)
    (tmp_path / "prompts.txt").write_text("Smallest letter: q m t\n")
    assert cli.main(["generate", "--model", str(run_dir), "--prompts", str(tmp_path / "prompts.txt"),
                     "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1
    rows = [{"prompt": "Smallest letter: q m t", "response": answer} for answer in ("m", "t")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli.main(["score", "--model", str(run_dir / "rm" / "final"), "--input", str(tmp_path / "rows.jsonl"),
                     "--output", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 2 and all(isinstance(row["reward"], float) for row in scored)
    assert cli.main(["evaluate", "examples/evaluate.yaml", f"policy={run_dir / 'dpo' / 'final'}",
                     f"reference={run_dir / 'final'}", f"output_dir={tmp_path / 'report'}", "prompts.limit=4",
                     "generation.max_new_tokens=4", "safety.redteam=false"]) == 0
    assert (tmp_path / "report" / "report.json").is_file()


def test_after_a_ctrl_c_resume_auto_continues_the_sft_run(tmp_path, monkeypatch, capsys):
    """The way back after a Ctrl-C in the demo: the same command with train.resume=auto (the demo
    then clears nothing) resumes SFT from the checkpoint the interrupt saved, and finishes."""
    from posttrain import cli

    _skip_later_stages(monkeypatch)
    command = ["demo", "--output-dir", str(tmp_path / "demo"), *SMALL_SFT, "train.max_steps=2"]
    _ctrl_c_at_sft_step(monkeypatch, 1)
    assert cli.main(command) == 130
    assert (tmp_path / "demo" / "checkpoints" / "step-0000001").is_dir()
    capsys.readouterr()
    assert cli.main([*command, "train.resume=auto"]) == 0
    said = capsys.readouterr()
    assert "resumed from" in said.out + said.err and "at step 1" in said.out + said.err
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["steps"] == 2


def test_an_output_dir_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, capsys):
    """`posttrain demo --output-dir FILE/sub` (a path under a regular file): one line naming the
    directory, exit 2, no traceback."""
    from posttrain import cli

    (tmp_path / "afile").write_text("not a directory")
    assert cli.main(["demo", "--output-dir", str(tmp_path / "afile" / "sub"), *SMALL_SFT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and str(tmp_path / "afile" / "sub") in err[-1], err
    assert "Traceback" not in "\n".join(err)
