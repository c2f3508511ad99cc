"""Review tests: SFT, GRPO and PPO in two CPU processes (torchrun, gloo) against one process at
the same global batch (README, "Scaling out": a step is batch_size x grad_accum x processes
rows; "The data position is counted in micro-batches, so a run may resume with another number
of processes or train.grad_accum"; "Each process samples the whole rollout ... and trains on
its share of every step").

Three launches in all (the launch pattern of test_distributed_preference.py): two processes
train every stage (checkpointing each step), then resume copies cut at an earlier checkpoint;
one process trains the same stages at grad_accum 2 and resumes two-process checkpoints. A
patched forward records, per process, every micro-batch it trains on (what each rank saw).

Expectations come from: the one-process run (the README's contract), the uninterrupted
two-process run, float64 cross-entropy from a plain transformers forward of the starting model,
and the data files themselves (each streamed row trained once per pass).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Runs several `posttrain` command lines in one process (see test_distributed_preference.py), and
# records every TRAINING forward of the SFT / GRPO / PPO loss modules per process (rank) into
# <output_dir>/fwd-rank<R>.jsonl: the micro-batches each process trained on, in order.
DRIVER = """
import json, os, sys
import accelerate.state
import torch.distributed as dist

accelerate.state.PartialState.destroy_process_group = lambda self, group=None: None
sys.path.insert(0, os.getcwd())  # tests.rewards_fixture, as `python -m posttrain` finds it
from posttrain.cli import main
from posttrain.train import grpo, ppo, sft

CURRENT = {"dir": None}
RANK = os.environ.get("RANK", "0")

def recording(cls):
    original = cls.forward
    def forward(self, *args, **kwargs):
        if self.training and CURRENT["dir"] is not None:
            row = {k: v.tolist() for k, v in kwargs.items()
                   if k in ("input_ids", "labels", "attention_mask", "position_ids", "response_mask")}
            with open(os.path.join(CURRENT["dir"], f"fwd-rank{RANK}.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\\n")
        return original(self, *args, **kwargs)
    cls.forward = forward

for cls in (sft.CausalLMLoss, grpo.GroupPolicyLoss, ppo.PPOLoss):
    recording(cls)

runs, report = json.loads(open(sys.argv[1]).read()), sys.argv[2]
codes = {}
for argv in runs:
    out = [a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")][0]
    os.makedirs(out, exist_ok=True)
    CURRENT["dir"] = out
    try:
        codes[out] = main(argv)
    except SystemExit as exc:
        codes[out] = exc.code
    except Exception as exc:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise  # the other process waits in a collective: end the launch, not hang it
        codes[out] = f"{type(exc).__name__}: {exc}"
    CURRENT["dir"] = None
if dist.is_initialized():
    dist.barrier()
    if dist.get_rank() == 0:
        open(report, "w").write(json.dumps(codes))
    dist.destroy_process_group()
else:
    open(report, "w").write(json.dumps(codes))
"""

COMMON = ["train.lr=1e-3", "train.progress_bar=false", "train.log_every=1",
          "train.resume=never", "train.save_every=1", "train.keep_last=10"]
RESUME = ["train.resume=auto"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]
N_TRAIN = 19  # at batch 3: 7 micro-batches (6 x 3 + 1), not a multiple of the 2 a step takes


def _write_data(folder: Path) -> dict[str, Path]:
    import random

    rng = random.Random(11)
    folder.mkdir(parents=True, exist_ok=True)

    def row(i):
        user = f"row{i} " + " ".join(rng.sample(WORDS, rng.randint(1, 6)))
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": " ".join(rng.sample(WORDS, rng.randint(1, 8)))}]}

    files = {}
    for name, n, offset in (("train", N_TRAIN, 0), ("eval", 5, 100)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row(offset + i)) + "\n" for i in range(n)))
    return files


def _untied_tiny(folder: Path) -> Path:
    """The tiny preset with its output layer untied from the input embedding (a copy of it), so
    one process takes the sparse-embedding path and two processes do not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.presets import preset_path

    source = preset_path("tiny")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(model.config)
    state["lm_head.weight"] = model.get_input_embeddings().weight.detach().clone()
    untied.load_state_dict(state, strict=False)
    untied.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def _stages(files, untied: Path) -> dict[str, list[str]]:
    sft_data = ["data.max_length=64", f"data.train_files=[{files['train']}]", f"data.eval_files=[{files['eval']}]", "train.batch_size=3"]
    rl = ["model.path=tiny", "data.synthetic_size=48", "rollout.max_new_tokens=3", "train.batch_size=4",
          "eval.prompts=0", "reward.functions=[short=tests.rewards_fixture:short]"]
    return {
        # 7 micro-batches an epoch: steps [0,1] [2,3] [4,5] [6, refill 0], then epoch 1; untied
        # embeddings with weight decay (the sparse reached-rows path on one process only)
        "sft-padded": ["sft", f"model.path={untied}", *sft_data, "train.max_steps=5", "train.weight_decay=0.1"],
        "sft-packed": ["sft", "model.path=tiny", *sft_data, "data.packing=true", "train.batch_size=2",
                       "train.max_steps=3"],
        "sft-stream": ["sft", "model.path=tiny", "data.max_length=64", f"data.train_files=[{files['train']}]", "data.streaming=true",
                       "train.batch_size=3", "train.max_steps=5"],
        # a rollout (2 prompts x 4 samples) feeds 2 steps; the KL term needs a reference copy
        "grpo": ["grpo", *rl, "rollout.num_generations=4", "grpo.beta=0.05", "grpo.updates_per_rollout=2",
                 "train.max_steps=4"],
        # a rollout (16 prompts) feeds 2 PPO epochs x 2 minibatches; adaptive beta between rollouts
        "ppo": ["ppo", *rl, "ppo.epochs=2", "ppo.minibatches=2", "ppo.kl_coef=0.05", "ppo.kl_control=adaptive",
                "train.max_steps=6"],
    }


CUT_AT = {"sft-padded": 2, "grpo": 3, "ppo": 5}  # GRPO and PPO: part-way through a rollout


def _argv(stage: list[str], out: Path, *extra: str) -> list[str]:
    return [stage[0], f"output_dir={out}", *COMMON, *stage[1:], *extra]


def _launch(runs: list[list[str]], workdir: Path, processes: int) -> dict:
    plan, report, driver = workdir / "runs.json", workdir / "codes.json", workdir / "driver.py"
    workdir.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps(runs))
    driver.write_text(DRIVER)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    result = subprocess.run([sys.executable, *launcher, str(driver), str(plan), str(report)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0 and report.is_file(), result.stderr[-4000:]
    return json.loads(report.read_text())


def _cut(src: Path, dst: Path, step: int) -> None:
    """A copy of a finished run as if killed right after its step-`step` checkpoint."""
    shutil.copytree(src, dst)
    for checkpoint in (dst / "checkpoints").glob("step-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(dst / "final")
    (dst / "summary.json").unlink()
    for record in dst.glob("fwd-rank*.jsonl"):
        record.unlink()
    (dst / "value_model.safetensors").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-sft-rl")
    files = _write_data(root / "data")
    stages = _stages(files, _untied_tiny(root / "untied"))
    codes = _launch([_argv(s, root / "two" / n, "train.grad_accum=1") for n, s in stages.items()],
                    root / "launch-two", processes=2)
    assert set(codes.values()) == {0}, codes
    for name, step in CUT_AT.items():
        _cut(root / "two" / name, root / "cut" / name, step)
        _cut(root / "two" / name, root / "cut-one" / name, step)  # resumed by ONE process, grad_accum 2
    _cut(root / "two" / "sft-padded", root / "world-changed", 2)  # ONE process, grad_accum 1
    _cut(root / "two" / "ppo", root / "ppo-world-changed", 5)  # ONE process, grad_accum 1
    resumed = [_argv(stages[n], root / "cut" / n, "train.grad_accum=1", *RESUME) for n in CUT_AT]
    codes = _launch(resumed, root / "launch-resume", processes=2)
    assert set(codes.values()) == {0}, codes
    one = [_argv(s, root / "one" / n, "train.grad_accum=2") for n, s in stages.items()]
    one += [_argv(stages[n], root / "cut-one" / n, "train.grad_accum=2", *RESUME) for n in CUT_AT]
    one.append(_argv(stages["sft-padded"], root / "world-changed", "train.grad_accum=1", *RESUME,
                     "train.max_steps=7"))
    # the rest of rollout 1 (updates 2-4: steps 6-8), then the first fresh rollout (steps 9-12)
    one.append(_argv(stages["ppo"], root / "ppo-world-changed", "train.grad_accum=1", *RESUME,
                     "train.max_steps=12"))
    codes = _launch(one, root / "launch-one", processes=1)
    return {"root": root, "files": files, "codes": codes}


# --------------------------------------------------------------------------- helpers


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if "loss" in r]


def _forwards(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / f"fwd-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _per_step(run_dir: Path, processes: int, accum: int) -> list[list[dict]]:
    """The micro-batches of each optimizer step, every process's share (rank order, then accumulation)."""
    ranks = [_forwards(run_dir, r) for r in range(processes)]
    assert len({len(f) for f in ranks}) == 1, [len(f) for f in ranks]
    n = len(ranks[0]) // accum
    return [[f for rank in ranks for f in rank[s * accum : (s + 1) * accum]] for s in range(n)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors |= {f"{file.name}:{k}": v.double() for k, v in load_file(str(file)).items()}
    return tensors


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


NOT_COMPARED = {"tokens_per_s", "step_time_s", "peak_mem_mb", "world_size", "rollout/rollout_s", "rollout/reward_s",
                "rollout/rollout_tokens_per_s"}


def _rows(forward: dict) -> list[tuple[int, ...]]:
    """The real tokens of each row of a padded micro-batch."""
    return [tuple(t for t, m in zip(ids, mask) if m) for ids, mask in zip(forward["input_ids"], forward["attention_mask"])]


def _real_tokens(forward: dict, pad_id: int = 3) -> int:
    if "attention_mask" in forward and forward["attention_mask"] is not None:
        return sum(map(sum, forward["attention_mask"]))
    return sum(t != pad_id for row in forward["input_ids"] for t in row)  # the tiny pad (3) is not its EOS (2)


# --------------------------------------------------------------------------- two processes = one


STAGES = ["sft-padded", "sft-packed", "sft-stream", "grpo", "ppo"]


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_log_and_train_like_one_at_the_same_global_batch(runs, stage):
    """Every logged figure (loss, grad norm, tokens, lr, epoch, the stage's own metrics and the
    rollout's) and the final weights of 2 processes x grad_accum 1 equal 1 process x grad_accum 2."""
    one, two = runs["root"] / "one" / stage, runs["root"] / "two" / stage
    a, b = _records(one), _records(two)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    assert {r["world_size"] for r in b if "loss" in r} == {2}
    for ra, rb in zip(a, b):
        for key in ra.keys() - NOT_COMPARED:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra.get("step"), key)
    assert _max_diff(_weights(one / "final"), _weights(two / "final")) <= 3e-5
    if stage.startswith("sft"):
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
        assert (sb["steps"], sb["skipped_steps"]) == (sa["steps"], sa["skipped_steps"]) == (len(_steps(one)), 0)
        if sa["eval_loss"] is not None or stage != "sft-stream":
            assert sb["eval_loss"] == pytest.approx(sa["eval_loss"], rel=1e-4)
    if stage == "ppo":
        assert _max_diff(_weights(one), _weights(two)) <= 3e-5  # value_model.safetensors
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
        assert sb["final_kl_coef"] == pytest.approx(sa["final_kl_coef"], rel=1e-5)
        assert sb["rollouts"] == sa["rollouts"] == 2


@pytest.mark.parametrize("stage", STAGES)
def test_each_process_trains_on_its_own_share_and_the_step_sees_them_all(runs, stage):
    """Per step, the two processes' micro-batches are those one process accumulates (same rows,
    same order), and rank 0 never trains rank 1's share."""
    one = _per_step(runs["root"] / "one" / stage, 1, 2)
    two = _per_step(runs["root"] / "two" / stage, 2, 1)
    steps = len(_steps(runs["root"] / "two" / stage))
    assert len(one) == len(two) == steps
    for s, (ma, mb) in enumerate(zip(one, two)):
        assert ma == mb, s
        assert len(mb) == 2


@pytest.mark.parametrize("stage", STAGES)
def test_logged_tokens_are_the_whole_steps(runs, stage):
    """`tokens` counts the real tokens of every process's micro-batches of the step (counted from
    what each rank's forward received), not rank 0's alone."""
    for name, processes, accum in (("two", 2, 1), ("one", 1, 2)):
        run_dir = runs["root"] / name / stage
        expected = [sum(_real_tokens(f) for f in step) for step in _per_step(run_dir, processes, accum)]
        assert [r["tokens"] for r in _steps(run_dir)] == expected, name
        if name == "two":
            assert all(_real_tokens(step[1]) > 0 for step in _per_step(run_dir, 2, 1))


def _float64_loss(steps: list[dict]) -> float:
    """Σ −log p(label) over every labelled token of the step's micro-batches ÷ their count, from
    the starting tiny preset in float64, each packed segment run on its own."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.presets import preset_path

    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny"), dtype=torch.float64).eval()
    total, count = 0.0, 0
    for forward in steps:
        for r, (ids, labels) in enumerate(zip(forward["input_ids"], forward["labels"])):
            if "position_ids" in forward and forward.get("attention_mask") is None:
                starts = [i for i, p in enumerate(forward["position_ids"][r]) if p == 0] + [len(ids)]
                segments = list(itertools.pairwise(starts))
            else:
                segments = [(0, sum(forward["attention_mask"][r]))]
            for lo, hi in segments:
                seg_ids, seg_labels = ids[lo:hi], labels[lo:hi]
                with torch.no_grad():
                    logp = model(torch.tensor([seg_ids])).logits[0].log_softmax(-1)
                for t in range(1, len(seg_ids)):
                    if seg_labels[t] != -100:
                        total -= float(logp[t - 1, seg_labels[t]])
                        count += 1
    return total / count


@pytest.mark.parametrize("stage", ["sft-packed", "sft-stream"])
def test_the_first_logged_loss_is_the_global_token_mean_from_an_independent_forward(runs, stage):
    """Step 1's logged SFT loss (2 processes) = float64 cross-entropy summed over BOTH processes'
    labelled tokens ÷ their number (the README's token-normalised global step)."""
    run_dir = runs["root"] / "two" / stage
    first = _per_step(run_dir, 2, 1)[0]
    assert _steps(run_dir)[0]["loss"] == pytest.approx(_float64_loss(first), rel=2e-5)


# --------------------------------------------------------------------------- streaming


def test_streamed_rows_are_trained_once_per_pass_across_the_two_processes(runs):
    """19 streamed rows at batch 3 in 2 processes: steps 1-3 and rank 0's share of step 4 are the
    file's 19 rows, each once and in file order; rank 1's share of step 4 tops the step up from
    the start of the stream (the loop's documented refill); step 5 starts the next pass."""
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    steps = _per_step(runs["root"] / "two" / "sft-stream", 2, 1)
    assert len(steps) == 5
    passes = [f for step in steps[:3] for f in step] + [steps[3][0]]
    rows = [row for f in passes for row in _rows(f)]
    markers = [tokenizer.decode(list(row)).split("row", 1)[1].split()[0] for row in rows]
    assert markers == [str(i) for i in range(N_TRAIN)]
    assert _rows(steps[3][1]) == _rows(passes[0])  # refill from the stream's start
    assert [_rows(f) for f in steps[4]] == [_rows(f) for f in passes[:2]]  # next pass, same order
    epochs = [r["epoch"] for r in _steps(runs["root"] / "two" / "sft-stream")]
    assert epochs[:3] == [0, 0, 0] and epochs[4] == 1


def test_streaming_sft_in_two_processes_survives_the_end_of_a_pass(runs, tmp_path):
    """The plain command line, 2 processes, streaming, 12 steps (several ends of the 19-row stream)."""
    out = tmp_path / "stream"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "posttrain", "sft",
              f"output_dir={out}", "model.path=tiny", f"data.train_files=[{runs['files']['train']}]",
              "data.streaming=true", "data.max_length=64", "train.batch_size=3", "train.max_steps=12",
              "train.save_every=0", "train.progress_bar=false"]
    result = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, [line for line in result.stderr.splitlines() if "Error" in line][:6]
    assert len(_steps(out)) == 12
    assert json.loads((out / "data_report.json").read_text())["train_stream"]["complete_pass"] is True


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stage", list(CUT_AT))
def test_two_process_resume_equals_the_uninterrupted_run_bitwise(runs, stage):
    """Cut after a two-process checkpoint (GRPO and PPO part-way through a rollout), resumed by two
    processes: the same records and bitwise the same final weights."""
    straight, cut = runs["root"] / "two" / stage, runs["root"] / "cut" / stage
    a, b = _records(straight), _records(cut)
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in NOT_COMPARED} == \
               {k: v for k, v in rb.items() if k not in NOT_COMPARED}
    wa, wb = _weights(straight / "final"), _weights(cut / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # only the steps after the checkpoint were trained again
    assert len(_forwards(cut, 0)) == len(_forwards(cut, 1)) == len(_steps(straight)) - CUT_AT[stage]


def test_two_process_checkpoints_hold_every_ranks_rng(runs):
    checkpoint = runs["root"] / "two" / "sft-padded" / "checkpoints" / "step-0000002"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors", "rng-rank0.json", "rng-rank1.json"} <= names
    assert json.loads((checkpoint / "manifest.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("stage", list(CUT_AT))
def test_a_two_process_checkpoint_resumed_by_one_process_at_the_same_global_batch_continues_the_run(runs, stage):
    """The README: a run may resume with another number of processes. One process x grad_accum 2
    from the two-process checkpoint trains what the two processes would have: the same records
    (to float tolerance) and final weights."""
    straight, resumed = runs["root"] / "two" / stage, runs["root"] / "cut-one" / stage
    assert runs["codes"][str(resumed)] == 0, runs["codes"][str(resumed)]
    a, b = _records(straight), _records(resumed)
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    for ra, rb in zip(a, b):
        for key in ra.keys() - NOT_COMPARED:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra.get("step"), key)
    assert _max_diff(_weights(straight / "final"), _weights(resumed / "final")) <= 3e-5
    after = _per_step(resumed, 1, 2)
    assert after == _per_step(straight, 2, 1)[CUT_AT[stage]:]


def test_a_two_process_sft_checkpoint_resumed_by_one_process_goes_on_at_the_next_micro_batch(runs):
    """Step 2 of 2 processes x batch 3 = micro-batches 0-3 of epoch 0's 7. One process at
    grad_accum 1 then trains micro-batches 4, 5, 6 (steps 3-5, epoch 0), and epoch 1's 0 and 1
    (steps 6-7): the micro-batches the uninterrupted run trains there, none repeated or skipped."""
    run_dir = runs["root"] / "world-changed"
    assert runs["codes"][str(run_dir)] == 0, runs["codes"][str(run_dir)]
    straight = _per_step(runs["root"] / "two" / "sft-padded", 2, 1)  # [mb0 mb1] [mb2 mb3] [mb4 mb5] [mb6 mb0] [e1 mb0 mb1]
    expected = [straight[2][0], straight[2][1], straight[3][0], straight[4][0], straight[4][1]]
    trained = [step[0] for step in _per_step(run_dir, 1, 1)]
    assert trained == expected
    resumed = _steps(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 8))
    assert [r["epoch"] for r in resumed[2:]] == [0.7143, 0.8571, 1.0, 1.1429, 1.2857]  # epochs read, in sevenths
    assert [r["world_size"] for r in resumed] == [2, 2, 1, 1, 1, 1, 1]


def _prompts(forward: dict) -> set[tuple[int, ...]]:
    """The prompt part of each (prompt + completion) row of a rollout micro-batch."""
    out = set()
    for ids, mask, response in zip(forward["input_ids"], forward["attention_mask"], forward["response_mask"]):
        out.add(tuple(ids[: int(sum(mask) - sum(response))]))
    return out


def test_a_two_process_ppo_checkpoint_resumed_with_another_rollout_size_is_refused(runs):
    """Two processes at grad_accum 1 wrote rollouts of 16 prompts; one process at grad_accum 1 would
    make them 8. The checkpoint's position counts rollouts of its own size (before, the resumed
    run finished rollout 1 and then drew 8 of its 16 prompts again as a "fresh" rollout): the
    resume is refused with the sizes named, before any step."""
    run_dir = runs["root"] / "ppo-world-changed"
    assert runs["codes"][str(run_dir)] == 2  # the CLI's exit code for a refused config, its one line on stderr
    assert not _per_step(run_dir, 1, 1) and not (run_dir / "final").exists()  # nothing trained after the checkpoint
