"""PEFT methods: parameter counts, identity at init, save/load, interop with peft itself,
merge, several adapters on one base, staged schedule, LoRA+, and config errors."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import AdapterConfig, SFTConfig, validate_sft
from posttrain.errors import ConfigError, UserError
from posttrain.models.adapters import (
    AdaptedModel,
    apply_adapters,
    combine_adapters,
    load_adapted,
    merge_adapted,
    parameter_report,
    plan_adapters,
    trainable_summary,
)
from posttrain.models.adapters.schedule import AdapterTraining
from posttrain.models.loading import final_hidden_and_head, load_model, load_tokenizer, save_model

HIDDEN, LAYERS, FFN = 64, 2, 172  # the tiny-2l preset
SINGLE = ["lora", "dora", "ia3", "prompt", "prefix", "bottleneck"]
MIXES = [["lora", "bottleneck", "prompt"], ["ia3", "prefix"], ["bottleneck", "prefix"]]


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer("tiny-2l")
    return tokenizer(["Reverse: q m t", "Hello there, how are you today?"], return_tensors="pt", padding=True)


def _adapter(method, **sections) -> AdapterConfig:
    cfg = AdapterConfig(method=list(method) if isinstance(method, (list, tuple)) else [method])
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _adapted(method, seed: int = 1, **sections):
    """Adapters on tiny-2l with every trained tensor nudged, so they change the output."""
    model = apply_adapters(load_model("tiny-2l"), _adapter(method, **sections))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- counts and report


def test_parameter_counts_match_each_method_formula():
    def trainable(method, **sections):
        return parameter_report(apply_adapters(load_model("tiny-2l"), _adapter(method, **sections)))["by_method"]

    r = 4
    # all-linear: q,k,v,o (64→64), gate,up (64→172), down (172→64); A is r×in, B is out×r
    lora_per_layer = 4 * r * (HIDDEN + HIDDEN) + 2 * r * (HIDDEN + FFN) + r * (FFN + HIDDEN)
    assert trainable("lora", lora={"r": r})["lora"]["trainable"] == LAYERS * lora_per_layer
    # DoRA adds one magnitude per output feature of each adapted layer
    magnitudes = LAYERS * (4 * HIDDEN + 2 * FFN + HIDDEN)
    assert trainable("dora", lora={"r": r})["lora"]["trainable"] == LAYERS * lora_per_layer + magnitudes
    # IA3 default for llama: k, v (output scaling, 64 each) and down_proj (input scaling, 172)
    assert trainable("ia3")["ia3"]["trainable"] == LAYERS * (HIDDEN + HIDDEN + FFN)
    assert trainable("prompt", virtual_tokens={"num_virtual_tokens": 5})["prompt"]["trainable"] == 5 * HIDDEN
    assert trainable("prefix", virtual_tokens={"num_virtual_tokens": 5})["prefix"]["trainable"] == 5 * LAYERS * 2 * HIDDEN
    m = 8  # bottleneck: down (m×h + m) and up (h×m + h), after attention and after the FFN of each layer
    bottleneck = trainable("bottleneck", bottleneck={"size": m})["bottleneck"]["trainable"]
    assert bottleneck == 2 * LAYERS * (2 * HIDDEN * m + m + HIDDEN)


def test_report_splits_by_method_and_module_and_estimates_memory():
    model = apply_adapters(load_model("tiny-2l"), _adapter(["lora", "bottleneck", "prompt"],
                                                           lora={"target_modules": ["q_proj", "v_proj"]},
                                                           bottleneck={"where": ["ffn"]}))
    report = parameter_report(model)
    assert set(report["by_method"]) == {"base", "lora", "bottleneck", "prompt"}
    assert report["by_method"]["base"]["trainable"] == 0
    assert {k for k, v in report["by_module"].items() if v["trainable"]} == {
        "q_proj", "v_proj", "bottleneck_after_mlp", "prompt_tokens"}
    trainable = report["trainable"]
    assert trainable == sum(v["trainable"] for v in report["by_method"].values())
    mib = 2**20
    assert report["memory_mib"]["gradients"] == pytest.approx(4 * trainable / mib)
    assert report["memory_mib"]["optimizer"] == pytest.approx(2 * 4 * trainable / mib)
    assert report["memory_mib"]["weights"] == pytest.approx(4 * report["total"] / mib)
    assert trainable_summary(model).startswith(f"trainable {trainable:,} / {report['total']:,}")


def test_freeze_tuning_trains_only_the_top_layers_and_named_modules():
    model = apply_adapters(load_model("tiny-2l"), _adapter("freeze", freeze={"top_layers": 1, "modules": ["model.norm.*"]}))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in trained)
    assert "model.norm.weight" in trained and not any(n.startswith("model.layers.0.") for n in trained)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bottleneck"])
def test_fresh_adapters_start_as_the_base_model(method, batch):
    base = _logits(load_model("tiny-2l"), batch)
    model = apply_adapters(load_model("tiny-2l"), _adapter(method)).eval()
    torch.testing.assert_close(_logits(model, batch), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", SINGLE + MIXES, ids=str)
def test_hidden_path_disable_and_reload_agree(method, batch, tmp_path):
    base = _logits(load_model("tiny-2l"), batch)
    model = _adapted(method)
    adapted = _logits(model, batch)
    assert adapted.shape == base.shape
    assert (adapted - base).abs().max() > 1e-3  # the adapters are on the path
    with torch.no_grad():
        hidden, weight, _ = final_hidden_and_head(model, **batch)
    torch.testing.assert_close(hidden @ weight.T, adapted, rtol=0, atol=1e-5)
    with model.adapters_disabled():
        torch.testing.assert_close(_logits(model, batch), base, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, batch), adapted, rtol=0, atol=0)  # switched back on
    save_model(model, load_tokenizer("tiny-2l"), tmp_path / "out")
    reloaded = load_adapted(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(reloaded, batch), adapted, rtol=0, atol=0)


@pytest.mark.parametrize("method, sections", [
    ("lora", {}), ("dora", {}), ("ia3", {}), ("prompt", {}), ("prefix", {}),
    ("prompt", {"virtual_tokens": {"init": "text", "init_text": "Answer exactly."}}),
    ("prefix", {"virtual_tokens": {"projection": True, "projection_hidden": 16}}),
], ids=["lora", "dora", "ia3", "prompt", "prefix", "prompt-text-init", "prefix-projection"])
def test_saved_adapters_load_in_peft_with_identical_outputs(method, sections, batch, tmp_path):
    from peft import PeftModel

    model = _adapted(method, **sections)
    out = save_model(model, load_tokenizer("tiny-2l"), tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    reloaded = PeftModel.from_pretrained(load_model(config["base_model_name_or_path"]), out).eval()
    length = batch["input_ids"].shape[1]
    peft_logits = _logits(reloaded, batch)[:, -length:]  # peft keeps the soft-prompt positions
    torch.testing.assert_close(peft_logits, _logits(model, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_adapters_written_by_plain_peft_load_in_posttrain(kind, batch, tmp_path):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    config = (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if kind == "lora"
              else PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    peft_model = get_peft_model(load_model("tiny-2l"), config)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapted(tmp_path).eval()
    length = batch["input_ids"].shape[1]
    torch.testing.assert_close(_logits(ours, batch), _logits(peft_model.eval(), batch)[:, -length:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_equals_unmerged(method, batch, tmp_path):
    model = _adapted(method)
    unmerged = _logits(model, batch)
    merged = merge_adapted(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), unmerged, rtol=0, atol=1e-4)
    assert merge_adapted(merged) is merged  # a plain model passes through


@pytest.mark.parametrize("method", ["bottleneck", "prompt", ["lora", "prefix"]], ids=str)
def test_unmergeable_methods_are_refused_by_name(method):
    with pytest.raises(UserError, match="cannot be merged"):
        merge_adapted(_adapted(method))


def test_generation_with_virtual_tokens_is_the_same_alone_or_in_a_padded_batch():
    from posttrain.rollout.generate import generate
    from posttrain.rollout.sampling import SamplingSettings

    tokenizer = load_tokenizer("tiny-2l")
    prompts = ["Copy: a b", "Reverse: q m t x y z w"]
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0)
    for method in ("prompt", "prefix"):
        model = _adapted(method)
        together = generate(model, tokenizer, prompts, settings, batch_size=2)
        alone = [generate(model, tokenizer, [p], settings, batch_size=1)[0] for p in prompts]
        assert together == alone


def test_several_lora_adapters_switch_by_name_and_combine(batch, tmp_path):
    first, second = _adapted("lora", seed=1), _adapted("lora", seed=2)
    expected = {"a": _logits(first, batch), "b": _logits(second, batch)}
    save_model(first, None, tmp_path / "a")
    save_model(second, None, tmp_path / "b")
    model = load_adapted({"a": tmp_path / "a", "b": tmp_path / "b"}).eval()
    assert model.adapter_names() == ["a", "b"]
    torch.testing.assert_close(_logits(model, batch), expected["a"], rtol=0, atol=1e-6)
    model.use_adapter("b")
    torch.testing.assert_close(_logits(model, batch), expected["b"], rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="no adapter named 'c'"):
        model.use_adapter("c")
    combine_adapters(model, {"a": 1.0}, "only_a")  # a weighted sum of one adapter at weight 1 is that adapter
    torch.testing.assert_close(_logits(model, batch), expected["a"], rtol=0, atol=1e-5)
    combine_adapters(model, {"a": 0.5, "b": 0.5}, "even_mix")
    mixed = _logits(model, batch)
    assert (mixed - expected["a"]).abs().max() > 1e-4 and (mixed - expected["b"]).abs().max() > 1e-4


def test_lora_targets_that_match_nothing_list_the_linear_layers():
    with pytest.raises(ConfigError, match="matches no layer.*linear layers are: down_proj, gate_proj, k_proj"):
        apply_adapters(load_model("tiny-2l"), _adapter("lora", lora={"target_modules": ["no_such_proj"]}))


def test_lora_regex_targets_and_rslora_scaling():
    model = apply_adapters(load_model("tiny-2l"), _adapter("lora", lora={
        "target_modules": [r"re:.*layers\.1\.self_attn\.(q|v)_proj"], "rslora": True, "r": 4, "alpha": 8.0}))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"base.base_model.model.model.layers.1.self_attn.q_proj",
                       "base.base_model.model.model.layers.1.self_attn.v_proj"}
    layer = model.lm.model.layers[1].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8.0 / 4**0.5)  # alpha / sqrt(r)


# --------------------------------------------------------------------------- schedule and LoRA+


def test_schedule_drops_gradients_of_methods_not_yet_trained():
    cfg = _adapter(["lora", "bottleneck", "prompt"])
    cfg.schedule = ["0:prompt", "10:prompt+lora", "20:all"]
    plan = plan_adapters(cfg)
    model = apply_adapters(load_model("tiny-2l"), cfg, plan=plan)
    messages: list[str] = []
    training = AdapterTraining(model, plan, log=messages.append)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    lora, bottleneck, prompt = (ids(model.parameters_of({m})) for m in ("lora", "bottleneck", "prompt"))
    assert ids(training.inactive_parameters(0)) == lora | bottleneck
    assert ids(training.inactive_parameters(9)) == lora | bottleneck
    assert ids(training.inactive_parameters(10)) == bottleneck
    assert training.inactive_parameters(25) == []
    assert messages[0].startswith("step 0: training prompt (") and len(messages) == 3


def test_staged_run_leaves_later_methods_untouched(tmp_path):
    from posttrain.train.sft import run_sft

    def final_lora_b(schedule, out):
        cfg = SFTConfig.from_dict({
            "output_dir": str(tmp_path / out), "model": {"path": "tiny-2l"},
            "adapter": {"method": ["lora", "prompt"], "schedule": schedule},
            "data": {"synthetic_size": 64, "max_length": 32},
            "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2, "progress_bar": False}})
        model = load_adapted(run_sft(cfg) / "final")
        return torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_B" in n])

    assert final_lora_b(["0:prompt", "100:all"], "staged").abs().max() == 0  # B starts at zero and never moved
    assert final_lora_b(["0:prompt", "1:all"], "unfrozen").abs().max() > 0


def test_mixed_adapter_run_resumes_bitwise(tmp_path):
    from safetensors.torch import load_file

    from posttrain.train.sft import run_sft

    def run(out, steps):
        cfg = SFTConfig.from_dict({
            "output_dir": str(tmp_path / out), "model": {"path": "tiny-2l"},
            "adapter": {"method": ["lora", "bottleneck", "prefix"], "schedule": ["0:prefix", "3:all"]},
            "data": {"synthetic_size": 96, "max_length": 32},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "schedule": "constant", "save_every": 2,
                      "progress_bar": False}})
        return run_sft(cfg) / "final"

    straight = run("straight", 5)
    run("resumed", 2)
    resumed = run("resumed", 5)  # picks up checkpoints/step-2
    for part, file in [("lora", "adapter_model.safetensors"), ("prefix", "adapter_model.safetensors"),
                       ("bottleneck", "bottleneck.safetensors")]:
        a, b = load_file(str(straight / part / file)), load_file(str(resumed / part / file))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_lora_plus_gives_b_matrices_a_higher_learning_rate():
    from posttrain.config import TrainConfig
    from posttrain.train.optim import make_optimizer

    cfg = _adapter("lora", lora={"lr_ratio_b": 16.0})
    plan = plan_adapters(cfg)
    model = apply_adapters(load_model("tiny-2l"), cfg, plan=plan)
    training = AdapterTraining(model, plan, cfg.lora.lr_ratio_b)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3), training.lr_scale)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        kinds = {"B" if "lora_B" in names[id(p)] else "A" for p in group["params"]}
        assert len(kinds) == 1
        assert group["lr"] == pytest.approx(1.6e-2 if kinds == {"B"} else 1e-3)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, message", [
    (["adapter.method=lorra"], "did you mean lora"),
    (["adapter.method=[full, lora]"], "full trains every weight"),
    (["adapter.method=[lora, ia3]"], "use one of them"),
    (["adapter.method=[prompt, prefix]"], "both add virtual tokens"),
    (["adapter.method=[lora, dora]"], "one method in three spellings"),
    (["adapter.method=freeze"], "needs adapter.freeze.top_layers"),
    (["adapter.method=[freeze, lora]"], "use it alone"),
    (["adapter.method=prompt", "data.packing=true"], "cannot be used with data.packing"),
    (["adapter.method=prefix", "model.gradient_checkpointing=true"], "gradient_checkpointing=false"),
    (["adapter.method=[lora, prompt]", "adapter.schedule=[5:prompt]"], "must start at step 0"),
    (["adapter.method=[lora, prompt]", "adapter.schedule=[0:prompt, 10:ia3]"], "ia3 is not in adapter.method"),
    (["adapter.method=lora", "adapter.schedule=[0:lora, x]"], "must look like STEP:method"),
    (["adapter.method=prompt", "adapter.virtual_tokens.init=text"], "needs init_text"),
    (["adapter.lora.r=0"], "adapter.lora.r must be at least 1"),
])
def test_bad_adapter_settings_fail_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_sft(SFTConfig.load(None, overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
@pytest.mark.parametrize("override", ["adapter.method=qlora", "train.optimizer=paged_adamw_8bit"])
def test_qlora_without_cuda_is_one_clear_line(override):
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as info:
        validate_sft(SFTConfig.load(None, [override]))
    assert "\n" not in str(info.value)


def test_old_lora_section_points_to_the_adapter_section():
    with pytest.raises(ConfigError, match="did you mean adapter.lora.r"):
        SFTConfig.load(None, ["lora.r=4"])
    with pytest.raises(ConfigError, match="did you mean adapter.method"):
        SFTConfig.load(None, ["lora.enabled=true"])


def test_adapted_model_is_what_apply_returns_for_peft_methods():
    assert isinstance(apply_adapters(load_model("tiny-2l"), _adapter("prompt")), AdaptedModel)
    assert type(apply_adapters(load_model("tiny-2l"), _adapter("full"))).__name__ == "LlamaForCausalLM"


def test_text_initialised_soft_prompt_starts_from_the_texts_token_embeddings():
    lm = load_model("tiny-2l")
    ids = load_tokenizer("tiny-2l")("Answer the instruction exactly.")["input_ids"][:4]
    model = apply_adapters(lm, _adapter("prompt", virtual_tokens={"num_virtual_tokens": 4, "init": "text",
                                                                   "init_text": "Answer the instruction exactly."}))
    prompt = model.virtual_peft.get_prompt(batch_size=1)[0]
    torch.testing.assert_close(prompt, lm.get_input_embeddings().weight[ids].detach(), rtol=0, atol=0)
