"""A work walk: what each command computes, counted against the least it needs (posttrain promises to
be faster than TRL by design).

Walked on 1-3 step runs of the tiny preset, with deterministic counters only (the decoder trunk's
forwards, split into training forwards, forwards without gradient and KV-cache decode forwards with
their widths; backward passes; `torch.autograd.grad` calls; model loads; reference passes): sft,
rm, dpo with a precomputed and a live reference (full and LoRA), simpo, orpo, kto (precomputed and
live), grpo (μ = 1 and 2, β = 0 and > 0), ppo (value head and separate critic, KL on and off),
evaluate (with a LoRA policy), constitutional with a local policy and judge, and the quality -> sft
-> dpo -> evaluate pipeline; rlaif's and redteam's model sharing and generate's decoding were read
in the code and their existing tests.

Measured and right: one forward and one backward per micro-batch in every stage; simpo and orpo run
no reference forward at all; a precomputed reference runs none during training, a live one one per
micro-batch (adapters off, or the frozen copy); KTO adds one forward without gradient of its
mismatched rows per micro-batch (z₀ over the whole step, not computed again in the loss); GRPO with
μ = 1 and β = 0 computes nothing but the rollout and the update (no old-log-prob or reference
forward), μ = 2 takes its rollout-time log-probs once per rollout; PPO takes the rollout-time
log-probs and values in one forward of the shared trunk, the reference in one more, then one
forward and backward per update; rollouts and evaluate decode through the KV cache (every decode
forward is one token wide) with the rows of a rollout in one batch; a step's held-out evaluation
and the final one are one pass when they fall on the same step; every training command and
pipeline stage loads its model once (a LoRA stage is merged once for the stages after it); final/
is written once, and the last checkpoint once.

What was wasted, each pinned below: a model loaded twice for two roles, a frozen reference's
held-out log-probs computed again at every evaluation, a starting policy evaluated against the
reference it equals, and a retain batch backpropagated twice for one gradient. Earlier walks pinned
score --calibrate scoring twice and the DPO reference precompute covering the whole epoch
(tests/test_walkthrough_scale.py); they are not repeated here.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 31: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import collections
import functools
import json
from pathlib import Path

import pytest
import torch

from posttrain import cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress_bar=false", "train.resume=never"]
# examples/dpo.yaml at 200 synthetic rows: 190 train and 10 held-out records; batch 4 -> 3 held-out batches
DPO = ["examples/dpo.yaml", "data.synthetic_size=200", "train.batch_size=4", "eval.exact_match_prompts=0", *QUIET]
HELD_OUT_BATCHES = 3


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


@pytest.fixture
def forwards(monkeypatch):
    """Every forward of the tiny preset's decoder trunk (LlamaModel): its kind ("grad", "nograd",
    or "decode" for a KV-cache step) and its (rows, width), in order."""
    from transformers.models.llama import modeling_llama

    seen: list[tuple[str, tuple[int, int]]] = []
    real = modeling_llama.LlamaModel.forward

    @functools.wraps(real)  # the signature stays readable: the callers inspect it for their cache argument
    def counted(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = tuple(ids.shape) if ids is not None else tuple(kwargs["inputs_embeds"].shape[:2])
        kind = "decode" if kwargs.get("use_cache") else "grad" if torch.is_grad_enabled() else "nograd"
        seen.append((kind, shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counted)
    return seen


@pytest.fixture
def backwards(monkeypatch):
    calls = []
    real = torch.autograd.backward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counted)
    return calls


@pytest.fixture
def loads(monkeypatch):
    """Every model directory read from disk (`from_pretrained` of any transformers model class)."""
    from transformers import modeling_utils

    paths: list[str] = []
    real = modeling_utils.PreTrainedModel.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        paths.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", classmethod(counted))
    return paths


def _main(*argv) -> None:
    rc = cli.main([str(a) for a in argv])
    assert rc == 0, f"posttrain {' '.join(map(str, argv[:2]))} exited {rc}"


def _kinds(seen) -> collections.Counter:
    return collections.Counter(kind for kind, _ in seen)


# --------------------------------------------------------------------------- defects


def test_constitutional_rl_cai_loads_one_local_model_for_policy_and_judge(tmp_path, monkeypatch):
    """`posttrain constitutional` with `constitutional.rl_cai: true` and policy and judge naming the
    same local model: rlaif (`rlaif._backends`) and redteam (`run._shared_or_new`, README: "the same
    local model as the target is loaded once, as is a judge classifier's") serve both roles from one
    copy, each call passing its own sampling settings; constitutional calls `make_backend` for each,
    so the weights are read from disk and held in memory twice. Measured: 2 loads of `tiny`."""
    from posttrain.feedback.client import LocalModel

    loaded = []
    real = LocalModel.load.__func__

    def counted(cls, path, **kwargs):
        loaded.append(path)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(LocalModel, "load", classmethod(counted))
    _main("constitutional", "examples/constitutional.yaml", f"output_dir={tmp_path / 'cai'}",
          "policy.kind=local", "policy.model=tiny", "policy.max_tokens=4", "judge.kind=local", "judge.model=tiny",
          "judge.max_tokens=4", "constitutional.rl_cai=true", "constitutional.rounds=1", "data.limit=1")
    assert loaded == ["tiny"], f"{len(loaded)} loads for one model in two roles: {loaded}"


@pytest.fixture(scope="module")
def lora_policy(tmp_path_factory) -> Path:
    """A LoRA adapter directory on the tiny preset, as `posttrain sft adapter.method=lora` saves it
    (its base recorded as the preset's built directory); untrained, which is all a load count needs."""
    from posttrain.config import SFTConfig
    from posttrain.models.loading import save_model
    from posttrain.train.sft import build_model

    out = tmp_path_factory.mktemp("lora-policy") / "final"
    cfg = SFTConfig.load(None, ["adapter.method=lora"])
    tokenizer, model, _ = build_model(cfg, log=lambda *_: None)
    save_model(model, tokenizer, out)
    assert (out / "adapter_config.json").is_file()
    return out


def test_evaluate_lora_policy_beside_its_base_loads_the_base_once(tmp_path, lora_policy, loads):
    """`posttrain evaluate policy=LORA_ADAPTER reference=BASE`: the reference is the policy with its
    adapters switched off, which README says later stages use "as the frozen reference model without
    a second copy" (dpo, grpo, ppo all do). evaluate loads the adapter's base for the policy, then the
    same base directory again for the reference: twice the load time and twice the memory (for a 7B
    base, 14 GB more) for weights it already holds. Measured: 2 loads of the preset's directory."""
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.eval.alignment import run_evaluate

    run_evaluate(EvaluateConfig.load(None, [
        f"output_dir={tmp_path / 'report'}", f"policy={lora_policy}", "reference=tiny", "prompts.limit=2",
        "generation.max_new_tokens=2", "generation.samples=1", "safety.redteam=false"]), log=lambda *_: None)
    assert len(loads) == 1, f"{len(loads)} loads of {sorted(set(loads))} for a policy and its own base"


def test_forgetting_project_with_lm_coef_backpropagates_the_retain_batch_once(tmp_path, monkeypatch):
    """examples/dpo_forgetting.yaml as shipped: `lm_coef: 0.5`, `distill: 0`, `project: true`.
    `RetainTerms.apply` takes ∇ of the retain batch's NLL for A-GEM's reference (retain_graph=True),
    then ∇ of lm_coef·NLL + distill·KL for the added gradient: with distill 0 that is exactly
    lm_coef × the gradient it has just computed. The retain batch holds as many rows as the step's
    global batch by default, so the extra backward costs about as much as the data's own. Measured: 2
    `torch.autograd.grad` calls per retain micro-batch (1 step, 1 micro-batch)."""
    grads = []
    real = torch.autograd.grad

    def counted(*args, **kwargs):
        grads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    _main("dpo", "examples/dpo_forgetting.yaml", f"output_dir={tmp_path / 'run'}", "data.synthetic_size=200",
          "train.batch_size=4", "train.max_steps=1", "eval.exact_match_prompts=0",
          "forgetting.retain_exact_match=0", *QUIET)
    assert len(grads) == 1, f"{len(grads)} backward passes of one retain micro-batch"


def test_live_reference_log_probs_of_the_held_out_set_are_computed_once(tmp_path, forwards):
    """`dpo.reference=live` (examples/dpo_lora_chat.yaml's choice): the reference is the starting
    model (adapters off, or a frozen copy) and the held-out set is fixed, so its reference
    log-probs are the same numbers at every evaluation; each `evaluate` (before training, every
    `train.eval_every` steps, at the end) computed them again. The precompute mode already caches
    exactly these. Measured with eval_every=1 over 2 steps: 9 reference passes over the 3
    held-out batches (3 evaluations x 3), where 3 give them all; 20 forwards without gradient in
    all. Needed: the live reference of each training step (2), the held-out reference once (3),
    the policy at each evaluation after a step (2 x 3); before training the policy is its
    reference, whose log-probs are already there."""
    _main("dpo", *DPO, f"output_dir={tmp_path / 'run'}", "adapter.method=lora", "dpo.reference=live",
          "train.max_steps=2", "train.eval_every=1")
    kinds = _kinds(forwards)
    needed = 2 + HELD_OUT_BATCHES + 2 * HELD_OUT_BATCHES
    assert kinds["nograd"] == needed, f"{kinds['nograd']} forwards without gradient, {needed} needed"


def test_dpo_before_evaluation_reuses_the_precomputed_held_out_log_probs(tmp_path, forwards):
    """With the default `dpo.reference=precompute`, the reference pass covers the held-out batches
    with the starting model, in the very batches evaluation uses, so that "π = π_ref exactly at step
    0" (precompute_reference's docstring; README: accuracy "starts at exactly 50% because the policy
    equals its reference"). `run_dpo` then evaluates that same starting model on those batches for
    `eval_before`: the same forwards again, to find implicit rewards of exactly 0. Measured, 1 step:
    10 forwards without gradient = 1 + 3 (precompute) + 3 (before) + 3 (after), where 7 suffice."""
    _main("dpo", *DPO, f"output_dir={tmp_path / 'run'}", "train.max_steps=1")
    kinds = _kinds(forwards)
    needed = 1 + HELD_OUT_BATCHES + HELD_OUT_BATCHES  # reference of step 1 and the held-out set, then after
    assert kinds["nograd"] == needed, f"{kinds['nograd']} forwards without gradient, {needed} needed"


# --------------------------------------------------------------------------- right, and now tested


@pytest.fixture
def step_work(monkeypatch, forwards, backwards):
    """(forwards, backwards) inside each optimizer step (`loop._train_step`), one entry a step."""
    import posttrain.train.loop as loop

    per_step = []
    real = loop._train_step

    def counted(*args, **kwargs):
        before_f, before_b = len(forwards), len(backwards)
        out = real(*args, **kwargs)
        per_step.append((dict(_kinds(forwards[before_f:])), len(backwards) - before_b))
        return out

    monkeypatch.setattr(loop, "_train_step", counted)
    return per_step


@pytest.mark.parametrize("extra,per_step", [
    ([], {"grad": 1}),  # precomputed reference: no reference forward while training
    (["adapter.method=lora", "dpo.reference=live"], {"grad": 1, "nograd": 1}),  # adapters off, once a step
    (["dpo.loss=simpo", "dpo.beta=2.0"], {"grad": 1}),  # reference-free
    (["dpo.loss=orpo"], {"grad": 1}),  # reference-free
    (["dpo.loss=kto"], {"grad": 1, "nograd": 1}),  # z0's mismatched rows, once a step
], ids=["dpo", "dpo-lora-live", "simpo", "orpo", "kto"])
def test_dpo_family_step_is_one_forward_and_one_backward_plus_what_its_loss_needs(tmp_path, step_work, extra,
                                                                               per_step):
    _main("dpo", *DPO, f"output_dir={tmp_path / 'run'}", "train.max_steps=2", *extra)
    assert step_work == [(per_step, 1)] * 2


@pytest.mark.parametrize("command,extra,per_run", [
    ("grpo", ["grpo.beta=0"], {"grad": 1}),  # μ = 1: the update's own forward is the rollout policy's
    ("grpo", ["grpo.beta=0.04"], {"grad": 1, "nograd": 1}),  # + the reference
    ("grpo", ["grpo.beta=0", "grpo.updates_per_rollout=2", "train.max_steps=2"], {"grad": 2, "nograd": 1}),
    ("ppo", ["ppo.epochs=2", "train.max_steps=2"], {"grad": 2, "nograd": 2}),  # old policy+values, reference
], ids=["grpo-mu1-beta0", "grpo-beta", "grpo-mu2", "ppo-2-epochs"])
def test_rl_rollout_and_updates_do_only_the_forwards_they_need(tmp_path, forwards, backwards, command, extra,
                                                               per_run):
    """One rollout of 8 completions (max_new_tokens 4), then its updates: the decoding is one batch
    of every row, a prefill and three one-token KV-cache steps; no held-out figures (eval.prompts=0).
    GRPO's prefill runs once for a prompt's G = 8 copies (`rollout.generate._prefill`)."""
    example = "examples/grpo.yaml" if command == "grpo" else "examples/ppo.yaml"
    _main(command, example, f"output_dir={tmp_path / 'run'}", "train.batch_size=8", "train.max_steps=1",
          "eval.prompts=0", "data.synthetic_size=200", *QUIET, *extra)
    kinds = _kinds(forwards)
    assert {k: v for k, v in kinds.items() if k != "decode"} == per_run
    assert len(backwards) == per_run["grad"]
    decode = [shape for kind, shape in forwards if kind == "decode"]
    prefilled = 1 if command == "grpo" else 8  # PPO's 8 rows are 8 prompts
    assert len(decode) == 4 and decode[0][0] == prefilled and all(shape == (8, 1) for shape in decode[1:])


def test_sft_last_step_evaluates_once_and_writes_final_and_one_checkpoint(tmp_path, forwards, monkeypatch):
    """eval_every and save_every both falling on the last step: one held-out pass (not a periodic
    one and a final one), one checkpoint, and final/ written once."""
    from transformers import modeling_utils

    saved = []
    real = modeling_utils.PreTrainedModel.save_pretrained

    def counted(self, path, *args, **kwargs):
        saved.append(Path(path).name)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "save_pretrained", counted)
    run = tmp_path / "run"
    _main("sft", "examples/sft_full.yaml", f"output_dir={run}", "data.synthetic_size=240", "train.batch_size=4",
          "train.max_steps=2", "train.eval_every=2", "train.save_every=2", "eval.exact_match_prompts=0", *QUIET)
    eval_examples = json.loads((run / "data_report.json").read_text())["eval_examples"]
    kinds = _kinds(forwards)
    assert kinds == {"grad": 2, "nograd": -(-eval_examples // 4)}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert saved == [".tmp-final"]


def test_pipeline_loads_each_stage_model_once_and_merges_lora_once(tmp_path, loads):
    """quality -> sft (LoRA) -> dpo (from sft/merged) -> evaluate (dpo beside sft), one step each:
    the preset for sft, its base once for the merge, sft/merged for dpo, then dpo/final and sft's
    base for the report: five loads, none repeated within a stage."""
    _main("pipeline", "examples/pipeline_full.yaml", f"output_dir={tmp_path / 'pipe'}", "train.max_steps=1",
          "train.progress_bar=false", "dpo.data.synthetic_size=100", "report.prompts.limit=2",
          "report.generation.max_new_tokens=2", "report.safety.redteam=false", "eval.exact_match_prompts=0")
    names = [Path(p).name if "pipe" in p else "preset" for p in loads]
    assert names == ["preset", "preset", "merged", "final", "preset"], loads
    sft = json.loads((tmp_path / "pipe" / "pipeline_state.json").read_text())["stages"]["sft"]
    assert sft["merged"] == sft["run_id"]
