"""Rollout engines: the transformers engine gives the rollouts `generate_token_ids` gives; the vLLM
engine, against a fake `vllm` package (tests/fake_vllm: no GPU or vLLM here), maps the sampling
settings, sends token prompts, keeps the completion contract, pushes every weight (adapters
merged, the training model left as it was) and is synced before every rollout of a GRPO run;
config and start-up errors name the fix."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import GRPOConfig, validate_grpo
from posttrain.errors import ConfigError, UserError
from posttrain.rollout import engines
from posttrain.rollout.engines import TransformersEngine, VLLMEngine, request_seed
from posttrain.rollout.generate import _make_stop_check, generate_token_ids
from posttrain.rollout.sampling import SamplingSettings

PROMPTS = [[1, 5, 9, 2, 40], [1, 7], [1, 4, 4, 4, 3, 8]]


@pytest.fixture(scope="module")
def tiny():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, load_tokenizer, resolve_model_path

    torch.manual_seed(0)
    return load_tokenizer("tiny"), load_model(ModelConfig(path="tiny")), resolve_model_path("tiny")


@pytest.fixture
def fake_vllm(monkeypatch):
    """`import vllm` finds tests/fake_vllm, and the machine counts as having a CUDA GPU."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_vllm"))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine must set 0; restored afterwards
    import vllm

    vllm.LLM.created.clear()
    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # the fake, or a test's None; so no later test imports either


def _checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def _engine(tiny, policy=None, **kwargs) -> VLLMEngine:
    _, model, directory = tiny
    return VLLMEngine(str(directory), policy if policy is not None else model, **kwargs)


# --------------------------------------------------------------------------- transformers


def test_the_transformers_engine_samples_what_generate_token_ids_samples(tiny):
    """Bitwise the rollouts of before the engine refactor: the same call, batching and seed."""
    from posttrain.data.prompts import PromptRecord
    from posttrain.train.rollouts import sample_and_score

    tokenizer, model, _ = tiny
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, top_k=20, stop=["a"], seed=123)
    stop_check = _make_stop_check(tokenizer, ["a"])
    direct = generate_token_ids(model, PROMPTS, settings, pad_token_id=3, eos_token_ids={2}, batch_size=2,
                                stop_check=stop_check)
    engine = TransformersEngine(model, batch_size=2)
    assert engine.generate(PROMPTS, settings, eos_token_ids={2}, pad_token_id=3, stop_check=stop_check) == direct
    assert engine.is_policy and engine.generation_config is model.generation_config

    cfg = GRPOConfig.load(None, ["rollout.max_new_tokens=5", "rollout.num_generations=2", "rollout.batch_size=3"])
    records = [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"t:{i}") for i in range(3)]
    rollout = sample_and_score(TransformersEngine(model, 3), tokenizer, PROMPTS, records, [2, 0], cfg,
                               lambda prompts, texts, rows: [0.0] * len(texts), seed=77)
    prompt_ids = [PROMPTS[i] for i in (2, 0) for _ in range(2)]
    before = generate_token_ids(model, prompt_ids, SamplingSettings(max_new_tokens=5, temperature=1.0, seed=77),
                                pad_token_id=tokenizer.pad_token_id, eos_token_ids={tokenizer.eos_token_id},
                                batch_size=3)
    assert rollout.completions == [c if c else [tokenizer.eos_token_id] for c in before]


# --------------------------------------------------------------------------- vLLM: generation


def test_sampling_settings_map_onto_vllm_sampling_params_and_prompts_go_in_as_token_ids(tiny, fake_vllm):
    engine = _engine(tiny, gpu_memory_utilization=0.25, dtype="bfloat16", enforce_eager=True, max_model_len=99,
                     seed=5)
    llm = fake_vllm.LLM.created[-1]
    directory = str(tiny[2])
    assert llm.model_path == directory and llm.kwargs == {
        "tokenizer": directory, "dtype": "bfloat16", "gpu_memory_utilization": 0.25, "enforce_eager": True,
        "max_model_len": 99, "seed": 5, "trust_remote_code": False}
    assert engines.os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    settings = SamplingSettings(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1,
                                frequency_penalty=0.2, presence_penalty=0.3, stop=["", "zz"], seed=11)
    out = engine.generate(PROMPTS, settings, eos_token_ids={2, 0}, pad_token_id=3)
    assert len(out) == 3 and all(1 <= len(ids) <= 4 for ids in out)
    assert [prompt for prompt, _ in llm.requests] == [{"prompt_token_ids": ids} for ids in PROMPTS]
    for index, (_, p) in enumerate(llm.requests):
        assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k) == (1, 4, 0.7, 0.9, -1)
        assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.1, 0.2, 0.3)
        assert p.stop == ["zz"] and p.stop_token_ids == [0, 2] and p.skip_special_tokens
        assert p.seed == request_seed(11, index)
    assert len({p.seed for _, p in llm.requests}) == 3
    engine.generate(PROMPTS[:1], SamplingSettings(max_new_tokens=2, top_k=7), eos_token_ids={2}, pad_token_id=3)
    last = llm.requests[-1][1]
    assert (last.top_k, last.seed, last.stop) == (7, None, [])


def test_seeded_vllm_rollouts_repeat_and_the_copies_of_a_prompt_differ(tiny, fake_vllm):
    engine = _engine(tiny)
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, seed=3)
    copies = [PROMPTS[0]] * 4
    first = engine.generate(copies, settings, eos_token_ids={2}, pad_token_id=3)
    assert engine.generate(copies, settings, eos_token_ids={2}, pad_token_id=3) == first
    assert len({tuple(ids) for ids in first}) > 1  # one seed per request, not one per call


def test_vllm_completions_keep_the_transformers_engines_contract(tiny, fake_vllm):
    """EOS ends a completion and stays in it; without one it has max_new_tokens tokens; a stop
    string ends it at the first token where the transformers engine's stop check fires, even
    when vLLM returns tokens past it."""
    tokenizer = tiny[0]
    text_ids = tokenizer("the cat sat on the mat and then it ran away", add_special_tokens=False)["input_ids"]
    streams = {0: [50, 51, 2, 52, 53], 1: [60, 61, 62, 63, 64, 65, 66], 2: text_ids + [70, 71, 72]}
    fake_vllm.LLM.script = lambda prompt, params, index: iter(streams[index])
    fake_vllm.LLM.overshoot = 2
    engine = _engine(tiny)
    ended, capped = engine.generate(PROMPTS[:2], SamplingSettings(max_new_tokens=5, seed=0), eos_token_ids={2},
                                    pad_token_id=3)
    assert ended == [50, 51, 2]
    assert capped == [60, 61, 62, 63, 64]  # max_new_tokens, no EOS
    fake_vllm.LLM.script = lambda prompt, params, index: iter(streams[2])
    stop_check = _make_stop_check(tokenizer, ["mat"])
    settings = SamplingSettings(max_new_tokens=len(text_ids) + 3, stop=["mat"], seed=0)
    stopped = engine.generate(PROMPTS[:1], settings, eos_token_ids={2}, pad_token_id=3, stop_check=stop_check)[0]
    assert len(fake_vllm.LLM.created[-1].requests) == 3
    first_fire = next(k for k in range(1, len(text_ids) + 1) if stop_check(text_ids[:k]))
    assert first_fire < len(text_ids) and stopped == text_ids[:first_fire]
    assert engine.generate(PROMPTS, SamplingSettings(max_new_tokens=0), eos_token_ids={2}, pad_token_id=3) == [[]] * 3


# --------------------------------------------------------------------------- vLLM: weight sync


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(scale * torch.randn_like(param))
    return model


def test_sync_pushes_every_weight_under_the_checkpoints_names(tiny, fake_vllm):
    _, model, directory = tiny
    policy = _perturbed(copy.deepcopy(model))
    engine = _engine(tiny, policy)
    llm = fake_vllm.LLM.created[-1]
    engine.sync(policy)
    assert llm.events == ["apply_model", "load_weights", "reset_prefix_cache"]
    pushed = llm.model.loads[-1]
    assert set(pushed) == set(_checkpoint_weights(directory))  # the tied lm_head once, as the checkpoint has it
    state = policy.state_dict()
    assert all(torch.equal(pushed[name], state[name]) for name in pushed)
    assert all(torch.equal(v, state[k]) for k, v in llm.model.hf.state_dict().items())


def test_sync_unwraps_distributed_data_parallel(tiny, fake_vllm, tmp_path):
    import torch.distributed as dist

    _, model, _ = tiny
    policy = _perturbed(copy.deepcopy(model), 0.01)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(policy)
        engine = _engine(tiny, wrapped)
        engine.sync(wrapped)
    finally:
        dist.destroy_process_group()
    pushed = fake_vllm.LLM.created[-1].model.loads[-1]
    assert not any(name.startswith("module.") for name in pushed)
    assert all(torch.equal(pushed[k], v) for k, v in policy.state_dict().items() if k in pushed)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_an_adapter_policy_syncs_its_merged_weights_and_stays_unmerged(tiny, fake_vllm, method):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from posttrain.models.adapters import apply_adapters, merge_adapted

    _, model, directory = tiny
    adapter = GRPOConfig.load(None, [f"adapter.method={method}"]).adapter
    policy = apply_adapters(copy.deepcopy(model), adapter)
    with torch.no_grad():  # trained adapters: B != 0, IA3 scales != 1, so merging changes the weights
        for name, param in policy.named_parameters():
            if policy.method_of(name) != "base":
                param.add_(0.1 * torch.randn_like(param))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits
    engine = _engine(tiny, policy)
    engine.sync(policy)

    pushed = fake_vllm.LLM.created[-1].model.loads[-1]
    merged = merge_adapted(copy.deepcopy(policy)).state_dict()
    assert set(pushed) == set(_checkpoint_weights(directory))
    assert all(torch.equal(pushed[name], merged[name]) for name in pushed)
    assert any(not torch.equal(pushed[name], model.state_dict()[name]) for name in pushed)
    after = policy.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m.merged for m in policy.modules() if isinstance(m, BaseTunerLayer))
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, logits)


def test_prompt_tuning_cannot_be_pushed_into_vllm(tiny):
    from posttrain.models.adapters import apply_adapters, merged_weights

    policy = apply_adapters(copy.deepcopy(tiny[1]), GRPOConfig.load(None, ["adapter.method=prompt"]).adapter)
    with pytest.raises(UserError, match="prompt adapters cannot be merged"):
        next(merged_weights(policy))


# --------------------------------------------------------------------------- config and start-up errors


@pytest.mark.parametrize("override, setup, message", [
    ([], "no-vllm", "needs the vllm package: pip install 'posttrain\\[vllm\\]'"),
    ([], "no-cuda", "needs a CUDA GPU"),
    ([], "two-processes", "single training process"),
    (["rollout.vllm_gpu_memory_utilization=0"], "", "must be in \\(0, 1\\]"),
    (["adapter.method=prompt"], "", "prompt adapters do not merge"),
    (["adapter.method=qlora"], "", "does not support adapter.method=qlora"),
])
def test_engine_vllm_is_checked_before_any_work(fake_vllm, monkeypatch, override, setup, message):
    if setup == "no-vllm":
        sys.modules["vllm"] = None  # `import vllm` and find_spec then fail as without the package
    elif setup == "no-cuda":
        monkeypatch.setattr(engines, "cuda_available", lambda: False)
    elif setup == "two-processes":
        monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = GRPOConfig.load(None, ["rollout.engine=vllm", "train.batch_size=8", *override])
    with pytest.raises(ConfigError, match=message):
        validate_grpo(cfg)


def test_a_valid_vllm_config_passes_and_the_engine_fails_early_without_vllm_or_a_gpu(tiny, fake_vllm, monkeypatch):
    validate_grpo(GRPOConfig.load(None, ["rollout.engine=vllm", "train.batch_size=8", "adapter.method=dora"]))
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU") as no_gpu:
        _engine(tiny)
    sys.modules["vllm"] = None
    with pytest.raises(UserError, match="needs the vllm package") as no_vllm:
        _engine(tiny)
    assert "\n" not in str(no_gpu.value) and "\n" not in str(no_vllm.value)
    assert not fake_vllm.LLM.created


# --------------------------------------------------------------------------- GRPO with the vLLM engine


def _grpo(tmp_path, name, *extra):
    from posttrain.train.grpo import run_grpo

    cfg = GRPOConfig.load(None, [
        f"output_dir={tmp_path / name}", "rollout.engine=vllm", "data.synthetic_size=120", "rollout.max_new_tokens=3",
        "train.batch_size=8", "rollout.num_generations=4", "train.schedule=constant", "train.lr=1e-3",
        "train.progress_bar=false", "eval.prompts=0", "reward.functions=[short=tests.rewards_fixture:short]", *extra])
    return run_grpo(cfg)


def test_grpo_with_the_vllm_engine_syncs_before_every_rollout_and_trains(tiny, fake_vllm, tmp_path):
    run_dir = _grpo(tmp_path, "run", "train.max_steps=3")
    (llm,) = fake_vllm.LLM.created
    assert llm.model_path == str(tiny[2]) and llm.kwargs["max_model_len"] == 256 + 3
    # one push and prefix-cache reset before each rollout: the first with the starting weights,
    # then after each of the 3 - 1 optimizer steps that preceded a rollout
    assert llm.events == ["apply_model", "load_weights", "reset_prefix_cache", "generate"] * 3
    loads, generated_with = llm.model.loads, llm.weights_at_generate
    start = _checkpoint_weights(tiny[2])
    assert all(torch.equal(loads[0][k], start[k]) for k in start)
    for k in range(3):
        assert all(torch.equal(generated_with[k][name], tensor) for name, tensor in loads[k].items())
    for k in range(2):
        assert any(not torch.equal(loads[k][name], loads[k + 1][name]) for name in loads[k])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all("rollout/weight_sync_s" in r and r["loss"] == r["loss"] for r in records)
    final = _checkpoint_weights(run_dir / "final")
    assert any(not torch.equal(final[k], start[k]) for k in start)


def test_vllm_sync_is_once_per_rollout_and_a_resumed_run_pushes_its_restored_weights(fake_vllm, tmp_path):
    """μ = 2: two optimizer steps per rollout, one push. On resume the engine is built from the
    starting checkpoint again, and the first push carries the weights the checkpoint restored."""
    extra = ["grpo.updates_per_rollout=2", "train.save_every=2"]
    first = _grpo(tmp_path, "run", "train.max_steps=2", *extra)
    assert fake_vllm.LLM.created[0].events == ["apply_model", "load_weights", "reset_prefix_cache", "generate"]
    after_two = _checkpoint_weights(first / "final")  # the policy at step 2, the checkpoint's weights
    _grpo(tmp_path, "run", "train.max_steps=4", *extra)
    resumed = fake_vllm.LLM.created[1]
    assert resumed.events == ["apply_model", "load_weights", "reset_prefix_cache", "generate"]
    assert resumed.model.loads[0].keys() == after_two.keys()
    assert all(torch.equal(resumed.model.loads[0][k], after_two[k]) for k in after_two)
