"""Review: checkpoint / resume and saved outputs of the reward-model and DPO-family stages.

Every check compares the product with an independent run (an uninterrupted run versus one
interrupted by an exception after a checkpoint and resumed with train.resume=auto) or with an
independent computation (a plain forward of the saved weights loaded by plain transformers /
peft). Written as an adversarial review; the defects it found are fixed, its tests stay as regression coverage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import DPOConfig, RMConfig

TURNS = [{"role": "user", "content": "Smallest letter: q m t"}]


class Crash(Exception):
    pass


# --------------------------------------------------------------------------- helpers


def _record_steps(monkeypatch, crash_after: int | None = None):
    """Wrap the loop's step: record a hash of each step's micro-batches (the data order) and
    raise Crash when step `crash_after + 1` starts (steps 1..crash_after complete)."""
    import posttrain.train.loop as loop

    real = getattr(loop._train_step, "original", loop._train_step)  # never wrap a wrapper
    seen: list[str] = []

    def wrapped(module, stage, micro, *args, **kwargs):
        if crash_after is not None and len(seen) == crash_after:
            raise Crash()
        digest = hashlib.sha256()
        for batch in micro:
            digest.update(batch["input_ids"].numpy().tobytes())
        seen.append(digest.hexdigest())
        return real(module, stage, micro, *args, **kwargs)

    wrapped.original = real
    monkeypatch.setattr(loop, "_train_step", wrapped)
    return seen


def _capture_result(monkeypatch):
    """Keep the LoopResult (the in-memory trained module) of the next run."""
    import posttrain.train.loop as loop

    real = getattr(loop.train, "original", loop.train)
    box = {}

    def wrapped(*args, **kwargs):
        box["result"] = real(*args, **kwargs)
        return box["result"]

    wrapped.original = real
    monkeypatch.setattr(loop, "train", wrapped)
    return box


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    tensors = {}
    for f in sorted(final.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            tensors[f"{f.relative_to(final)}:{k}"] = v
    assert tensors, f"no weights in {final}"
    return tensors


def _assert_same_tensors(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, (a[name] - b[name]).abs().max())


DPO_BASE = ["data.synthetic_size=40", "data.eval_fraction=0.2", "data.max_length=48", "train.batch_size=8",
            "train.lr=1e-3", "train.warmup_steps=1", "train.progress_bar=false", "train.keep_last=5"]
RM_BASE = ["data.synthetic_size=40", "data.eval_fraction=0.2", "data.max_length=48", "train.batch_size=8",
           "train.lr=1e-3", "train.warmup_steps=1", "train.progress_bar=false", "train.keep_last=5"]


def _dpo_cfg(out: Path, *extra: str) -> DPOConfig:
    return DPOConfig.load(None, [f"output_dir={out}", *DPO_BASE, *extra])


def _rm_cfg(out: Path, *extra: str) -> RMConfig:
    return RMConfig.load(None, [f"output_dir={out}", *RM_BASE, *extra])


def _straight_and_resumed(monkeypatch, tmp_path, run, make_cfg, steps: int, save_every: int, crash_after: int,
                          *extra: str):
    """(straight run dir, its step hashes, resumed run dir, its step hashes before and after the crash)."""
    settings = [f"train.max_steps={steps}", f"train.save_every={save_every}", *extra]
    seen_straight = _record_steps(monkeypatch)
    straight = run(make_cfg(tmp_path / "straight", *settings))
    seen_cut = _record_steps(monkeypatch, crash_after=crash_after)
    with pytest.raises(Crash):
        run(make_cfg(tmp_path / "cut", *settings))
    seen_resumed = _record_steps(monkeypatch)
    resumed = run(make_cfg(tmp_path / "cut", *settings, "train.resume=auto"))
    return straight, list(seen_straight), resumed, list(seen_cut), list(seen_resumed)


def _check_resume(straight, seen_straight, resumed, seen_cut, seen_resumed, steps, checkpoint_step, atol=0.0):
    # the data order: the steps after the checkpoint see exactly the straight run's batches
    assert seen_cut == seen_straight[: len(seen_cut)]
    assert seen_resumed == seen_straight[checkpoint_step:]
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, steps + 1))  # no step repeated or skipped in the log
    for step in range(1, steps + 1):
        assert b[step] == pytest.approx(a[step], abs=atol), step
    _assert_same_tensors(_final_tensors(straight), _final_tensors(resumed), atol)


# --------------------------------------------------------------------------- DPO resume


def _dpo(cfg):
    from posttrain.train.preference import run_dpo

    return run_dpo(cfg)


def _rm(cfg):
    from posttrain.train.reward import run_rm

    return run_rm(cfg)


@pytest.mark.parametrize("extra", [
    ["dpo.reference=precompute"],
    ["dpo.reference=live"],
    ["adapter.method=lora", "dpo.reference=live"],
    ["adapter.method=lora", "dpo.reference=precompute"],
    ["dpo.loss=kto"],
    ["data.synthetic_kind=ranking", "data.synthetic_responses=3"],
    ["dpo.loss=simpo"],
    ["dpo.loss=ipo", "adapter.method=lora", "dpo.reference=live", "data.synthetic_kind=ranking", "dpo.nll_weight=0.5"],
    ["dpo.loss=kto", "adapter.method=lora", "dpo.reference=live"],
], ids=["precompute", "live-full", "live-lora", "precompute-lora", "kto", "ranking", "simpo", "ipo-lora-ranking-nll",
        "kto-lora-live"])
def test_dpo_resume_across_an_epoch_equals_uninterrupted(monkeypatch, tmp_path, extra):
    """32 training items, batch 8: 4 steps an epoch. Checkpoint at step 3, crash in step 5,
    resume to 6: steps 4..6 (crossing into epoch 2) see the same batches, losses and weights."""
    out = _straight_and_resumed(monkeypatch, tmp_path, _dpo, _dpo_cfg, 6, 3, 4, *extra)
    _check_resume(*out, steps=6, checkpoint_step=3)


def test_dpo_resume_from_a_checkpoint_at_the_end_of_an_epoch(monkeypatch, tmp_path):
    """Checkpoint at step 4 = the last step of epoch 1 (its data position is 'epoch 0, 4 of 4')."""
    out = _straight_and_resumed(monkeypatch, tmp_path, _dpo, _dpo_cfg, 6, 4, 5)
    _check_resume(*out, steps=6, checkpoint_step=4)


@pytest.mark.parametrize("run, make_cfg", [(_dpo, _dpo_cfg), (_rm, _rm_cfg)], ids=["dpo", "rm"])
@pytest.mark.parametrize("checkpoint_step", [1, 2, 3])
def test_resume_with_gradient_accumulation_and_a_topped_up_step(monkeypatch, tmp_path, run, make_cfg, checkpoint_step):
    """batch 8 x accumulation 3 over 4 micro-batches an epoch: step 2 is topped up from the start
    of epoch 1's order. A crash right after each checkpoint, then resume to step 5."""
    out = _straight_and_resumed(monkeypatch, tmp_path, run, make_cfg, 5, checkpoint_step, checkpoint_step,
                                "train.grad_accum=3")
    _check_resume(*out, steps=5, checkpoint_step=checkpoint_step)


def test_dpo_resume_under_bf16_autocast(monkeypatch, tmp_path):
    out = _straight_and_resumed(monkeypatch, tmp_path, _dpo, _dpo_cfg, 5, 2, 3, "train.mixed_precision=bf16")
    _check_resume(*out, steps=5, checkpoint_step=2)


# --------------------------------------------------------------------------- RM resume


@pytest.mark.parametrize("extra", [
    [],
    ["adapter.method=lora"],
    ["data.synthetic_kind=ranking", "data.synthetic_responses=3"],
    ["adapter.method=lora", "data.synthetic_kind=ranking", "data.synthetic_responses=3", "reward.centering=0.01"],
    ["reward.share_prompt=false"],
], ids=["full", "lora", "ranking", "lora-ranking-centering", "separate-rows"])
def test_rm_resume_across_an_epoch_equals_uninterrupted(monkeypatch, tmp_path, extra):
    out = _straight_and_resumed(monkeypatch, tmp_path, _rm, _rm_cfg, 6, 3, 4, *extra)
    _check_resume(*out, steps=6, checkpoint_step=3)
    straight, resumed = out[0], out[2]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, resumed))
    assert b.pop("wall_seconds") > 0 and a.pop("wall_seconds") > 0  # timings: a resumed run's differ
    assert b == a  # eval before (the fresh head) and after: the same figures


# --------------------------------------------------------------------------- rerun of a finished run


@pytest.mark.parametrize("run, make_cfg, extra", [
    (_rm, _rm_cfg, []), (_rm, _rm_cfg, ["adapter.method=lora"]),
    (_dpo, _dpo_cfg, []), (_dpo, _dpo_cfg, ["adapter.method=lora"]),
], ids=["rm-full", "rm-lora", "dpo-full", "dpo-lora"])
def test_rerunning_a_finished_run_resumes_from_its_final_checkpoint_unchanged(tmp_path, run, make_cfg, extra):
    """The newest checkpoint is the final step: the rerun trains nothing, and its final model,
    summary and log are the first run's."""
    cfg = lambda: make_cfg(tmp_path / "run", "train.max_steps=3", "train.save_every=0", *extra)  # noqa: E731
    first = run(cfg())
    weights, summary, log = _final_tensors(first), (first / "summary.json").read_text(), _records(first)
    again = run(cfg())
    _assert_same_tensors(weights, _final_tensors(again))
    a, b = json.loads(summary), json.loads((again / "summary.json").read_text())
    assert b["eval_after"] == a["eval_after"]
    assert b["steps"] == a["steps"] == 3
    assert _records(again) == log


# --------------------------------------------------------------------------- saved outputs


SCORED = [(TURNS, "m"), (TURNS, "q"), ([{"role": "user", "content": "Smallest letter: z b k w"}], "b"),
          ([{"role": "user", "content": "Smallest letter: z b k w"}], "a much longer wrong answer z")]


def _encoded(tokenizer) -> list[list[int]]:
    from posttrain.data.preferences import encode_response
    from posttrain.data.templates import resolve_template

    template = resolve_template(tokenizer, "auto")
    return [encode_response(p, r, tokenizer, template).input_ids for p, r in SCORED]


@torch.no_grad()
def _hf_scores(model, ids_list) -> list[float]:
    """transformers' own forward, one unpadded sequence at a time (its pooling: the last token)."""
    model.eval()
    return [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in ids_list]


@pytest.mark.parametrize("extra", [[], ["adapter.method=lora"], ["adapter.method=lora", "data.synthetic_kind=ranking"]],
                         ids=["full", "lora", "lora-ranking"])
def test_saved_reward_model_scores_like_the_trained_one(monkeypatch, tmp_path, extra):
    """run_dir/final reloaded (posttrain's loader, plain transformers / peft, `posttrain score`)
    scores texts as the in-memory model did at the end of training."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.cli import main
    from posttrain.models.loading import load_tokenizer
    from posttrain.models.reward_model import load_reward_model

    box = _capture_result(monkeypatch)
    run_dir = _rm(_rm_cfg(tmp_path / "rm", "train.max_steps=4", "train.lr=3e-3", *extra))
    final = run_dir / "final"
    trained = box["result"].module.model
    ids = _encoded(load_tokenizer(str(final)))
    expected = _hf_scores(trained, ids)
    assert len(set(round(x, 4) for x in expected)) > 1  # distinct scores: the comparison can tell heads apart

    assert _hf_scores(load_reward_model(str(final)), ids) == pytest.approx(expected, abs=1e-5)
    if "adapter.method=lora" in extra:
        from peft import PeftModel

        base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
        plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), final)
    else:
        plain = AutoModelForSequenceClassification.from_pretrained(final)
    assert _hf_scores(plain, ids) == pytest.approx(expected, abs=1e-5)

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in SCORED))
    assert main(["score", "--model", str(final), "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                 "--batch-size", "3"]) == 0
    scored = [json.loads(line)["reward"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert scored == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def _logps(model, ids_list, tokenizer) -> list[float]:
    """Σ log p(response tokens | prefix) from the model's own full logits, one sequence at a time."""
    from posttrain.data.preferences import encode_response
    from posttrain.data.templates import resolve_template

    template = resolve_template(tokenizer, "auto")
    model.eval()
    out = []
    for p, r in SCORED:
        example = encode_response(p, r, tokenizer, template)
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].double().log_softmax(-1)
        out.append(sum(float(logits[t - 1, tok]) for t, tok in enumerate(example.labels) if tok != -100))
    return out


@pytest.mark.parametrize("extra", [[], ["adapter.method=lora"], ["adapter.method=dora"], ["adapter.method=ia3"]],
                         ids=["full", "lora", "dora", "ia3"])
def test_saved_dpo_policy_gives_the_trained_policys_logps(monkeypatch, tmp_path, extra):
    """The saved policy (full model, or adapter + `posttrain merge`) reloaded with plain
    transformers / peft gives the in-memory policy's log-probs at the end of training."""
    from transformers import AutoModelForCausalLM

    from posttrain.cli import main
    from posttrain.models.loading import load_tokenizer

    box = _capture_result(monkeypatch)
    run_dir = _dpo(_dpo_cfg(tmp_path / "dpo", "train.max_steps=4", "train.lr=3e-3", *extra))
    final = run_dir / "final"
    tokenizer = load_tokenizer(str(final))
    trained = box["result"].module.model
    expected = _logps(trained, None, tokenizer)
    if not extra:
        assert _logps(AutoModelForCausalLM.from_pretrained(final), None, tokenizer) == pytest.approx(expected, abs=1e-4)
        return
    from peft import PeftModel

    from posttrain.models.adapters.io import load_adapted

    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_logps = _logps(AutoModelForCausalLM.from_pretrained(base_path), None, tokenizer)
    assert max(abs(a - b) for a, b in zip(base_logps, expected)) > 1e-3  # training moved the policy
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final)
    assert _logps(plain, None, tokenizer) == pytest.approx(expected, abs=1e-4)
    assert _logps(load_adapted(final), None, tokenizer) == pytest.approx(expected, abs=1e-4)
    assert main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert _logps(merged, None, tokenizer) == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- SFT -> RM -> DPO


def _pipeline_file(tmp_path: Path, out: Path, sft_extra: dict | None = None) -> Path:
    small = {"data.max_length": 48, "train.batch_size": 8, "train.lr": 3e-3, "train.keep_last": 5}
    pref = small | {"data.synthetic_size": 40, "data.eval_fraction": 0.2, "train.max_steps": 4, "train.save_every": 2}
    spec = {"output_dir": str(out), "overrides": ["train.progress_bar=false"], "stages": [
        {"name": "sft", "kind": "sft", "overrides": small | {"adapter.method": "lora", "data.train_files": ["synthetic"],
                                                            "data.synthetic_size": 64, "data.eval_fraction": 0.1,
                                                            "train.max_steps": 3} | (sft_extra or {})},
        {"name": "rm", "kind": "rm", "overrides": pref},
        {"name": "dpo", "kind": "dpo", "overrides": pref}]}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_pipeline_sft_lora_rm_dpo_chain_and_a_resumed_dpo_stage(monkeypatch, tmp_path):
    """SFT with LoRA -> merged -> RM and DPO from it. Checks: the merged model is the SFT adapter
    applied (plain peft), later stages start from it and save its tokenizer and chat template
    unchanged, and a DPO stage interrupted after its step-2 checkpoint and rerun with the same
    command ends as the uninterrupted pipeline's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.loading import load_tokenizer
    from posttrain.pipeline import run_pipeline

    straight = tmp_path / "straight"
    seen_straight = _record_steps(monkeypatch)
    run_pipeline(_pipeline_file(tmp_path, straight))
    assert len(seen_straight) == 3 + 4 + 4
    for stage in ("rm", "dpo"):
        cfg = json.loads(json.dumps(__import__("yaml").safe_load((straight / stage / "config.yaml").read_text())))
        assert Path(cfg["model"]["path"]) == straight / "sft" / "merged"

    # the merged model == base + the SFT adapter, applied by plain peft
    sft_final = straight / "sft" / "final"
    base = json.loads((sft_final / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = load_tokenizer(str(sft_final))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), sft_final)
    expected = _logps(adapted, None, tokenizer)
    assert _logps(AutoModelForCausalLM.from_pretrained(base), None, tokenizer) != pytest.approx(expected, abs=1e-3)
    assert _logps(AutoModelForCausalLM.from_pretrained(straight / "sft" / "merged"), None, tokenizer) == \
        pytest.approx(expected, abs=1e-4)

    # every stage's tokenizer: the preset's, chat template and special tokens included
    original = AutoTokenizer.from_pretrained(base)
    messages = [*TURNS, {"role": "assistant", "content": "m"}]
    for stage in ("sft/final", "sft/merged", "rm/final", "dpo/final"):
        saved = AutoTokenizer.from_pretrained(straight / stage)
        assert saved.chat_template == original.chat_template, stage
        assert saved.get_vocab() == original.get_vocab(), stage
        assert saved.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(messages, tokenize=False)
        assert (saved.eos_token, saved.pad_token) == (original.eos_token, load_tokenizer(base).pad_token), stage

    # interrupted in DPO's step 3 (after its step-2 checkpoint), then the same command again
    cut = tmp_path / "cut"
    _record_steps(monkeypatch, crash_after=3 + 4 + 2)
    with pytest.raises(Crash):
        run_pipeline(_pipeline_file(tmp_path, cut))
    seen_resumed = _record_steps(monkeypatch)
    run_pipeline(_pipeline_file(tmp_path, cut))
    assert seen_resumed == seen_straight[-2:]  # only DPO's steps 3 and 4 ran again, on the same batches
    for stage in ("sft", "rm", "dpo"):
        a, b = _losses(straight / stage), _losses(cut / stage)
        assert b == pytest.approx(a, abs=0), stage
        _assert_same_tensors(_final_tensors(straight / stage), _final_tensors(cut / stage))


_TIMING = ("tokens_per_s", "step_time_s", "peak_mem_mb")


@pytest.mark.parametrize("run, make_cfg", [(_dpo, _dpo_cfg), (_rm, _rm_cfg)], ids=["dpo", "rm"])
def test_resume_keeps_every_logged_figure_and_the_early_stopping_state(monkeypatch, tmp_path, run, make_cfg):
    """Evaluation every step with early-stopping patience: the resumed run logs the same train and
    held-out records (timings aside) and stops (or not) at the same step."""
    out = _straight_and_resumed(monkeypatch, tmp_path, run, make_cfg, 7, 3, 3, "train.eval_every=1",
                                "train.early_stopping_patience=2", "train.lr=3e-2")
    straight, resumed = out[0], out[2]
    strip = lambda records: [{k: v for k, v in r.items() if k not in _TIMING} for r in records]  # noqa: E731
    assert strip(_records(resumed)) == strip(_records(straight))
    _assert_same_tensors(_final_tensors(straight), _final_tensors(resumed))


# --------------------------------------------------------------------------- where outputs point


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_a_lora_output_trained_from_a_relative_model_path_loads_from_another_directory(monkeypatch, tmp_path, stage):
    """model.path given relative to the working directory (as the pipeline's default runs/NAME
    outputs are): the adapter directory must still find its base from elsewhere."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.loading import resolve_model_path
    from posttrain.models.reward_model import load_reward_model
    from posttrain.models.adapters.io import load_adapted

    work = tmp_path / "work"
    work.mkdir()
    AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny")).save_pretrained(work / "base")
    from posttrain.models.loading import load_tokenizer

    load_tokenizer("tiny").save_pretrained(work / "base")
    monkeypatch.chdir(work)
    overrides = ["model.path=base", "train.max_steps=1", "adapter.method=lora"]
    run_dir = (_rm(_rm_cfg(Path("out"), *overrides)) if stage == "rm" else _dpo(_dpo_cfg(Path("out"), *overrides)))
    final = (work / run_dir / "final").resolve()
    monkeypatch.chdir(tmp_path)  # a user scoring / generating from another directory
    load_reward_model(str(final)) if stage == "rm" else load_adapted(final)


def test_the_saved_chat_template_is_the_one_sft_trained_with(tmp_path):
    """SFT with data.template=alpaca: the model learned '### Instruction: ... ### Response:'. A later
    stage on run_dir/final with the default data.template=auto (RM, DPO, `posttrain chat`) takes the
    saved tokenizer's chat template; it should render the prompt the way SFT trained."""
    from transformers import AutoTokenizer

    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    run_dir = run_sft(SFTConfig.load(None, [f"output_dir={tmp_path / 'sft'}", "data.template=alpaca",
                                            "data.train_files=[synthetic]", "data.synthetic_size=32",
                                            "data.max_length=48", "train.max_steps=1", "train.batch_size=8",
                                            "train.progress_bar=false"]))
    saved = AutoTokenizer.from_pretrained(run_dir / "final")
    rendered = saved.apply_chat_template(TURNS, add_generation_prompt=True, tokenize=False)
    assert rendered == "### Instruction:\nSmallest letter: q m t\n\n### Response:\n"


def test_merging_a_lora_reward_model_keeps_its_head_or_refuses(monkeypatch, tmp_path):
    """`posttrain merge` takes any LoRA adapter dir; on a LoRA reward model (run_dir/final of
    `posttrain rm adapter.method=lora`) it must either refuse or write a model that scores
    as the trained reward model does."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.cli import main
    from posttrain.errors import UserError
    from posttrain.models.loading import load_tokenizer

    box = _capture_result(monkeypatch)
    run_dir = _rm(_rm_cfg(tmp_path / "rm", "train.max_steps=3", "train.lr=3e-3", "adapter.method=lora"))
    ids = _encoded(load_tokenizer(str(run_dir / "final")))
    expected = _hf_scores(box["result"].module.model, ids)
    try:
        code = main(["merge", str(run_dir), str(tmp_path / "merged")])
    except (UserError, SystemExit):
        return  # refused: fine
    if code != 0:
        return
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", num_labels=1)
    assert _hf_scores(merged, ids) == pytest.approx(expected, abs=1e-4)
