"""README claims, first half (Start here, Using it, Config, Models, PEFT, Data): each test names
the README sentence it checks. Expectations come from the README's own words, plain torch /
peft arithmetic written out here, or an uninterrupted run -- not from posttrain's helpers.

Claims already pinned elsewhere in tests/ are not repeated here (see the report)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FIRST_HALF = README[: README.index("### Reward models and preference optimisation")]
PRESET = "tiny-2l"
HIDDEN, LAYERS, FFN = 64, 2, 172  # tiny-2l


# --------------------------------------------------------------------------- helpers


def _adapter_cfg(method, **sections):
    from posttrain.config import AdapterConfig

    cfg = AdapterConfig(method=list(method) if isinstance(method, (list, tuple)) else [method])
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _saved_nudged_adapter(path: Path, method: str, seed: int, **sections) -> Path:
    """An adapter on tiny-2l with every trained tensor moved off its init, saved to `path`."""
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    model = apply_adapters(load_model(PRESET), _adapter_cfg(method, **sections))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return save_model(model.eval(), load_tokenizer(PRESET), path)


def _layer0_q_delta(adapter_dir: Path, r: int, alpha: float, rslora: bool) -> torch.Tensor:
    """ΔW of layer 0's q_proj from the saved A and B, in float64: scale · B @ A with scale
    alpha / r (alpha / sqrt(r) under rsLoRA), as the README's config reference states."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    A = next(v for k, v in tensors.items() if "layers.0." in k and "q_proj" in k and "lora_A" in k).double()
    B = next(v for k, v in tensors.items() if "layers.0." in k and "q_proj" in k and "lora_B" in k).double()
    scale = alpha / (r ** 0.5) if rslora else alpha / r
    return scale * B @ A


def _mixed_q_delta(dirs: dict[str, Path], weights: dict[str, float]) -> torch.Tensor:
    from posttrain.models.adapters import combine_adapters, load_adapted

    model = load_adapted(dirs)
    combine_adapters(model, weights, "mix")
    layer = model.lm.model.layers[0].self_attn.q_proj
    x = torch.eye(HIDDEN)
    with torch.no_grad():
        return (layer(x) - layer.get_base_layer()(x)).T.double()


def _sft(tmp: Path, **sections):
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    base = {"output_dir": str(tmp), "model": {"path": PRESET},
            "data": {"synthetic_size": 48, "max_length": 32, "eval_fraction": 0.0},
            "train": {"batch_size": 4, "lr": 1e-2, "schedule": "constant", "progress_bar": False,
                      "max_grad_norm": 0.0}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return run_sft(SFTConfig.from_dict(base))


# --------------------------------------------------------------------------- several adapters: --mix


def test_mix_of_plain_loras_with_different_ranks_and_alphas_is_the_weighted_sum(tmp_path):
    """README (PEFT): "`--mix a=0.7 --mix b=0.3` adds their weighted combination ... for LoRA
    exactly 0.7·ΔW_a + 0.3·ΔW_b, any ranks". The existing test uses equal ranks and alphas."""
    specs = {"a": (2, 8.0), "b": (6, 4.0)}
    dirs = {name: _saved_nudged_adapter(tmp_path / name, "lora", 10 + i,
                                        lora={"r": r, "alpha": alpha, "target_modules": ["q_proj"]})
            for i, (name, (r, alpha)) in enumerate(specs.items())}
    expected = sum(w * _layer0_q_delta(dirs[n], *specs[n], rslora=False) for n, w in (("a", 0.7), ("b", 0.3)))
    torch.testing.assert_close(_mixed_q_delta(dirs, {"a": 0.7, "b": 0.3}), expected, rtol=0, atol=1e-5)


def test_mix_of_rslora_adapters_is_the_weighted_sum(tmp_path):
    """README (PEFT): "for LoRA exactly 0.7·ΔW_a + 0.3·ΔW_b, any ranks"; rsLoRA is one of the
    LoRA settings of the same table (`rslora`). Observed: the mix is 2.83× = sqrt(2 + 6) too large."""
    specs = {"a": (2, 8.0), "b": (6, 4.0)}
    dirs = {name: _saved_nudged_adapter(tmp_path / name, "lora", 10 + i,
                                        lora={"r": r, "alpha": alpha, "rslora": True, "target_modules": ["q_proj"]})
            for i, (name, (r, alpha)) in enumerate(specs.items())}
    expected = sum(w * _layer0_q_delta(dirs[n], *specs[n], rslora=True) for n, w in (("a", 0.7), ("b", 0.3)))
    torch.testing.assert_close(_mixed_q_delta(dirs, {"a": 0.7, "b": 0.3}), expected, rtol=0, atol=1e-5)


def _logits_of(model, tokenizer):
    batch = tokenizer(["Copy: a b c", "Smallest letter: q m t"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", ["ia3"])
def test_mix_with_all_weight_on_one_adapter_is_that_adapter(method, tmp_path):
    """README (PEFT): `--mix` "adds their weighted combination (... LoRA and IA3 ...)": the
    combination a·1 + b·0 is adapter a itself."""
    from posttrain.models.adapters import combine_adapters, load_adapted
    from posttrain.models.loading import load_tokenizer

    dirs = {name: _saved_nudged_adapter(tmp_path / name, method, 20 + i) for i, name in enumerate("ab")}
    tokenizer = load_tokenizer(PRESET)
    alone = _logits_of(load_adapted({"a": dirs["a"]}).eval(), tokenizer)
    model = load_adapted(dirs).eval()
    combine_adapters(model, {"a": 1.0, "b": 0.0}, "mix")
    torch.testing.assert_close(_logits_of(model, tokenizer), alone, rtol=0, atol=1e-5)


def test_mix_of_dora_adapters_is_refused_or_exact(tmp_path):
    """README (PEFT): weighted combinations are for "LoRA and IA3". A DoRA pair is either refused
    with a one-line error, or a·1 + b·0 must be adapter a."""
    from posttrain.errors import UserError
    from posttrain.models.adapters import combine_adapters, load_adapted
    from posttrain.models.loading import load_tokenizer

    dirs = {name: _saved_nudged_adapter(tmp_path / name, "dora", 30 + i) for i, name in enumerate("ab")}
    tokenizer = load_tokenizer(PRESET)
    alone = _logits_of(load_adapted({"a": dirs["a"]}).eval(), tokenizer)
    model = load_adapted(dirs).eval()
    try:
        combine_adapters(model, {"a": 1.0, "b": 0.0}, "mix")
    except UserError:
        return  # refused: fine
    torch.testing.assert_close(_logits_of(model, tokenizer), alone, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- layer-wise lr decay


def _first_step_update_size(tmp_path, method, marker_of_layer):
    """One AdamW step from an all-zero B / up projection: each entry with a real gradient moves
    by lr_group · g/(|g| + eps) ≈ lr_group (first step: m̂ = g, v̂ = g²), so the largest move of
    a zero-initialised matrix is its group's learning rate."""
    sections = {"lora": {"target_modules": ["q_proj"]}, "bottleneck": {"where": ["attention"], "size": 8}}
    run_dir = _sft(tmp_path, adapter={"method": method, **{m: sections[m] for m in method if m in sections}},
                   train={"max_steps": 1, "layer_lr_decay": 0.5, "lr": 1e-2})
    final = run_dir / "final"
    tensors = {}
    for path in final.rglob("*.safetensors"):
        tensors.update(load_file(str(path)))
    sizes = {}
    for layer in range(LAYERS):
        moved = [t for k, t in tensors.items() if marker_of_layer(k, layer)]
        assert moved, (layer, sorted(tensors)[:6])
        sizes[layer] = max(float(t.abs().max()) for t in moved)
    return sizes


def test_layer_lr_decay_on_lora_follows_the_documented_exponent(tmp_path):
    """Config reference: `train.layer_lr_decay` "layer i of L trains at lr * decay^(L - i)".
    tiny-2l (L = 2), decay 0.5, lr 1e-2: LoRA B of layer 0 moves by 2.5e-3, of layer 1 by 5e-3."""
    sizes = _first_step_update_size(tmp_path, ["lora"], lambda k, i: f"layers.{i}." in k and "lora_B" in k)
    assert sizes[0] == pytest.approx(1e-2 * 0.5 ** (LAYERS - 0), rel=1e-3)
    assert sizes[1] == pytest.approx(1e-2 * 0.5 ** (LAYERS - 1), rel=1e-3)


def test_layer_lr_decay_applies_to_bottleneck_adapters_by_layer(tmp_path):
    """Config reference: `train.layer_lr_decay` "layer i of L trains at lr * decay^(L - i)"; the
    PEFT table puts bottleneck adapters "after attention and/or the FFN" of each layer. Observed:
    both layers' up projections move by 1e-2 (the undecayed lr) where LoRA in the same run decays."""
    sizes = _first_step_update_size(tmp_path, ["bottleneck"],
                                    lambda k, i: f"layers.{i}." in k and ".up.weight" in k)
    assert sizes[0] == pytest.approx(1e-2 * 0.5 ** (LAYERS - 0), rel=1e-3)
    assert sizes[1] == pytest.approx(1e-2 * 0.5 ** (LAYERS - 1), rel=1e-3)


# --------------------------------------------------------------------------- staged schedule and params.json


def test_staged_schedule_resume_across_a_boundary_is_bitwise_and_params_json_counts(tmp_path):
    """README (PEFT): a staged schedule "keeps every adapter in the optimizer but drops the gradients
    of methods not yet trained, so they stay exactly as initialised (tested) and resume needs no
    extra state" + "At start the run prints (and writes to `params.json`) trainable / total
    parameters per method and per module type, and an estimate of weights + gradients + optimizer
    memory". A run killed after step 2 and resumed across the 0:prompt → 3:all boundary must end
    bitwise equal to an uninterrupted one."""
    sections = dict(adapter={"method": ["lora", "prompt"], "schedule": ["0:prompt", "3:all"],
                             "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                             "virtual_tokens": {"num_virtual_tokens": 3}},
                    train={"max_steps": 6, "save_every": 2, "keep_last": 5, "lr": 1e-2})
    whole = _sft(tmp_path / "whole", **sections)
    interrupted = _sft(tmp_path / "cut", **sections)
    for ckpt in (interrupted / "checkpoints").iterdir():  # as if killed right after step 2's checkpoint
        if ckpt.name != "step-0000002":
            shutil.rmtree(ckpt)
    shutil.rmtree(interrupted / "final")
    resumed = _sft(tmp_path / "cut", **sections)

    def weights(run):
        out = {}
        for path in sorted((run / "final").rglob("*.safetensors")):
            out.update({f"{path.parent.name}/{k}": v for k, v in load_file(str(path)).items()})
        return out

    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any("lora_B" in k and a[k].abs().max() > 0 for k in a)  # LoRA did train after step 3

    params = json.loads((whole / "params.json").read_text())
    lora = LAYERS * 2 * 4 * (HIDDEN + HIDDEN)  # q, v: A (r×in) + B (out×r)
    prompt = 3 * HIDDEN
    assert params["by_method"]["lora"]["trainable"] == lora
    assert params["by_method"]["prompt"]["trainable"] == prompt
    assert params["by_module"]["q_proj"]["trainable"] == params["by_module"]["v_proj"]["trainable"] == lora // 2
    trainable = lora + prompt
    mib = 2 ** 20
    assert params["memory_mib"]["gradients"] == pytest.approx(4 * trainable / mib)
    assert params["memory_mib"]["optimizer"] == pytest.approx(8 * trainable / mib)


def test_prefix_projection_hidden_sets_the_mlp_width():
    """Config reference: `adapter.virtual_tokens.projection_hidden` "hidden size of that MLP"
    (prefix tuning's reparameterisation, Li & Liang 2021): n·h embedding + h→H→2·L·h MLP."""
    from posttrain.models.adapters import apply_adapters, parameter_report
    from posttrain.models.loading import load_model

    n, width = 3, 16
    model = apply_adapters(load_model(PRESET), _adapter_cfg(
        "prefix", virtual_tokens={"num_virtual_tokens": n, "projection": True, "projection_hidden": width}))
    expected = n * HIDDEN + (HIDDEN * width + width) + (width * 2 * LAYERS * HIDDEN + 2 * LAYERS * HIDDEN)
    assert parameter_report(model)["by_method"]["prefix"]["trainable"] == expected


def test_merge_refuses_virtual_tokens_with_the_reason(tmp_path):
    """README (PEFT): "`posttrain merge` ... bottleneck adapters and virtual tokens are refused with
    the reason" (the bottleneck case is tested in test_cli; here prompt tuning)."""
    from posttrain import cli

    adapter = _saved_nudged_adapter(tmp_path / "p", "prompt", 5, virtual_tokens={"num_virtual_tokens": 2})
    code = cli.main(["merge", str(adapter), str(tmp_path / "out")])
    assert code == 2
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --------------------------------------------------------------------------- data


def test_bad_rows_help_names_the_rejects_file_the_run_writes(tmp_path):
    """Config reference (`data.bad_rows`): "skip them into rejects.jsonl"; the Data section says
    `run_dir/rejects-train.jsonl`. The file --help names must be the one a user finds."""
    from posttrain.config import DataConfig, SFTConfig
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.models.loading import load_tokenizer

    help_text = next(f.metadata["help"] for f in dataclasses.fields(DataConfig) if f.name == "bad_rows")
    named = re.search(r"[\w-]+\.jsonl", help_text).group(0)
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(20)] + [{"instruction": "no output"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig.from_dict({"data": {"train_files": [str(data)], "bad_rows": "skip", "max_bad_fraction": 0.5,
                                        "eval_fraction": 0.0, "max_length": 64}})
    prepare_sft_data(cfg.data, load_tokenizer(PRESET), tmp_path / "run", 0, lambda *_: None)
    written = sorted(p.name for p in (tmp_path / "run").glob("*.jsonl"))
    assert (tmp_path / "run" / named).is_file(), (named, written)


def test_held_out_prompts_of_every_stage_never_appear_in_any_training_split():
    """README (Start here): "held-out prompts that never appear in training (one prompt in eight,
    by a hash of its text, is reserved for evaluation: no stage trains on any stage's held-out
    prompts)". Checked with the demo's own settings, across stages and seeds, by set intersection."""
    from posttrain.config import DPOConfig, SFTConfig
    from posttrain.data import pipeline, preferences

    def sft_prompts(seed, size):
        cfg = SFTConfig.from_dict({"data": {"synthetic_size": size, "eval_fraction": 0.05}})
        train, held = pipeline._synthetic(cfg.data, seed)
        user = lambda r: next(m["content"] for m in r.messages if m["role"] == "user")  # noqa: E731
        return {user(r) for r in train}, {user(r) for r in held}

    def pref_prompts(seed):
        cfg = DPOConfig.load(None, ["data.synthetic_tasks=[smallest]", "data.synthetic_size=3200",
                                    "data.eval_fraction=0.0625"])
        train, held = preferences._synthetic(cfg.data, seed)
        user = lambda r: next(m["content"] for m in r.prompt if m["role"] == "user")  # noqa: E731
        return {user(r) for r in train}, {user(r) for r in held}

    sft_train, sft_held = sft_prompts(0, 6000)
    sft1_train, _ = sft_prompts(1, 6000)
    dpo_train, dpo_held = pref_prompts(0)
    assert len(dpo_held) == 200  # "200 held-out prompts" of the demo's RM / DPO figures
    for train in (sft_train, sft1_train, dpo_train):
        assert not train & dpo_held and not train & sft_held
    everything = sft_train | sft_held | dpo_train | dpo_held
    share = len(sft_held | dpo_held) / len(everything)
    assert 0.0 < share < 0.25  # a minority reserved (about one in eight of the distinct prompts seen)


# --------------------------------------------------------------------------- the demo's settings


def test_demo_runs_the_documented_stages_and_settings(tmp_path, monkeypatch):
    """README (Start here): "SFT runs 1600 steps of batch 64, lr 3e-3, cosine", scored on "300
    held-out prompts"; then "a reward model (150 steps ...) and DPO with the NLL term (150 steps ...)"
    on "the SFT model", for the smallest-letter task, "200 held-out prompts";
    `posttrain demo train.seed=1` changes the seed. Stages are replaced by recorders: no training."""
    import posttrain.train.preference as preference
    import posttrain.train.reward as reward
    import posttrain.train.sft as sft
    from posttrain.demo import run_demo

    seen = {}

    def recorder(name, summary):
        def run(cfg):
            seen[name] = cfg
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps(summary))
            return out
        return run

    monkeypatch.setattr(sft, "run_sft", recorder("sft", {"steps": 1600}))
    monkeypatch.setattr(reward, "run_rm", recorder("rm", {"steps": 150, "eval_items": 200,
                                                          "eval_before": {"accuracy": 0.5},
                                                          "eval_after": {"accuracy": 0.9}}))
    monkeypatch.setattr(preference, "run_dpo", recorder("dpo", {"steps": 150, "eval_items": 200,
                                                                "eval_before": {"rewards/accuracy": 0.5},
                                                                "eval_after": {"rewards/accuracy": 0.9}}))
    import posttrain.eval.alignment as alignment

    red = {"attack_success": {"rate": 1.0, "n": 30}, "over_refusal": {"rate": 0.0, "n": 10}}
    side = {"exact_match": {"rate": 0.99, "n": 200, "successes": 198, "ci95": [0.96, 1.0]}, "answer_nll": 0.02, "redteam": red}

    def evaluate(cfg, log):
        seen["evaluate"] = cfg
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"prompts": 200, "kl_to_reference": 0.03,
                                                     "models": {"policy": side, "reference": side}}))
        return out

    monkeypatch.setattr(alignment, "run_evaluate", evaluate)
    assert run_demo(str(tmp_path / "demo"), ["train.seed=1"]) == 0
    report = seen["evaluate"]  # the DPO model beside the SFT model, with a red-team run of both
    assert (report.policy, report.reference) == (str(tmp_path / "demo" / "dpo" / "final"), str(tmp_path / "demo" / "final"))
    assert report.prompts.synthetic_tasks == ["smallest"] and report.safety.redteam
    s, rm, dpo = seen["sft"], seen["rm"], seen["dpo"]
    assert (s.train.max_steps, s.train.batch_size, s.train.lr, s.train.schedule) == (1600, 64, 3e-3, "cosine")
    assert s.model.path == "tiny" and s.data.train_files == ["synthetic"]
    assert set(s.data.synthetic_tasks) == {"smallest", "copy", "reverse"}
    assert s.eval.exact_match_prompts == 300
    assert round(s.data.eval_fraction * s.data.synthetic_size) >= 300  # enough held-out prompts to score 300
    for stage in (rm, dpo):
        assert stage.train.max_steps == 150
        assert stage.model.path == str(tmp_path / "demo" / "final")
        assert stage.data.synthetic_tasks == ["smallest"]
        assert round(stage.data.eval_fraction * stage.data.synthetic_size) == 200
        assert stage.train.seed == s.train.seed == 1
    assert dpo.dpo.nll_weight > 0 and dpo.eval.exact_match_prompts == 200


# --------------------------------------------------------------------------- examples as described


def _example(stage: str, name: str):
    from posttrain.config import DPOConfig, RMConfig, SFTConfig

    cls = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig}[stage]
    return cls.load(ROOT / "examples" / f"{name}.yaml")


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / path).read_text().splitlines() if line.strip()]


def test_examples_hold_what_the_readme_says_they_hold():
    """README (Using it): the parenthesis after each example in "Every YAML in `examples/` runs in
    the test suite on the tiny preset: ..." describes its settings; each is checked here."""
    cfg = _example("sft", "sft_full")  # full fine-tune, synthetic tasks, exact match
    assert cfg.adapter.method == ["full"] and cfg.data.train_files == ["synthetic"] and cfg.eval.exact_match_prompts > 0
    cfg = _example("sft", "sft_lora")  # LoRA on an alpaca file
    assert cfg.adapter.method == ["lora"] and cfg.data.format == "alpaca" and cfg.data.train_files[0].endswith(".jsonl")
    cfg = _example("sft", "sft_mixed_peft")  # LoRA on attention + bottleneck on the FFN + text soft prompt, staged, LoRA+
    assert set(cfg.adapter.method) == {"lora", "bottleneck", "prompt"}
    assert set(cfg.adapter.lora.target_modules) <= {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg.adapter.bottleneck.where == ["ffn"] and cfg.adapter.virtual_tokens.init == "text"
    assert cfg.adapter.virtual_tokens.init_text and len(cfg.adapter.schedule) >= 2 and cfg.adapter.lora.lr_ratio_b > 1
    cfg = _example("sft", "sft_chat_packed")  # messages + ShareGPT, packing, layer decay, frozen embeddings, skip
    rows = _rows(cfg.data.train_files[0])
    assert any("messages" in r and sum(t["role"] == "assistant" for t in r["messages"]) > 1 for r in rows)
    assert any("conversations" in r for r in rows)
    assert cfg.data.packing and cfg.train.layer_lr_decay < 1 and cfg.data.bad_rows == "skip"
    assert any("embed_tokens" in p for p in cfg.train.freeze)
    cfg = _example("sft", "sft_text")  # plain text, streamed from disk
    assert cfg.data.format == "text" and cfg.data.streaming and cfg.train.max_steps > 0
    cfg = _example("rm", "rm_pairs")  # text and chat pairs with margins
    rows = _rows(cfg.data.train_files[0])
    assert any(isinstance(r["prompt"], str) for r in rows) and any(isinstance(r["prompt"], list) for r in rows)
    assert any("margin" in r for r in rows) and cfg.reward.use_margins
    cfg = _example("rm", "rm_ranking_lora")  # LoRA reward model on 4-way rankings
    assert cfg.adapter.method == ["lora"] and cfg.data.synthetic_kind == "ranking" and cfg.data.synthetic_responses == 4
    cfg = _example("dpo", "dpo")  # DPO on synthetic pairs, exact match before/after
    assert cfg.dpo.loss == "dpo" and cfg.data.train_files == ["synthetic"] and cfg.eval.exact_match_prompts > 0
    cfg = _example("dpo", "dpo_lora_chat")  # IPO with LoRA, adapters off as the reference
    assert cfg.dpo.loss == "ipo" and cfg.adapter.method == ["lora"]
    rows = _rows(cfg.data.train_files[0])
    assert any(isinstance(r["prompt"], list) for r in rows)  # chat rows
    cfg = _example("dpo", "kto")  # unpaired feedback
    rows = _rows(cfg.data.train_files[0])
    assert cfg.dpo.loss == "kto" and all("chosen" not in r and "rejected" not in r for r in rows)


# --------------------------------------------------------------------------- stale text


def _sft_leaf_and_sections() -> tuple[set[str], set[str]]:
    from posttrain.config import SFTConfig

    leaves, sections = set(), set()

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                sections.add(prefix + f.name)
                walk(hints[f.name], prefix + f.name + ".")
            else:
                leaves.add(prefix + f.name)

    walk(SFTConfig, "")
    return leaves, sections


def test_every_config_key_and_value_the_first_half_names_exists():
    """Every `section.key` (with `: value` or `=value` when given) in backticks from the top of the
    README to the reward-model section is a real SFT setting and accepts the value shown."""
    from posttrain.config import SFTConfig

    leaves, sections = _sft_leaf_and_sections()
    checked = 0
    for token in set(re.findall(r"`([^`\n]+)`", FIRST_HALF)):
        match = re.fullmatch(r"((?:model|adapter|data|train|eval|lora|bottleneck)\.[\w.*]+)(?:\s*[:=]\s*(.+))?", token)
        if not match:
            continue
        key, value = match.groups()
        if key.split(".")[0] in ("lora", "bottleneck"):  # spelled inside the adapter section
            key = "adapter." + key
        if key.endswith(".*"):
            assert key[:-2] in sections, token
        else:
            assert key in leaves, token
            if value is not None:
                SFTConfig.load(None, [f"{key}={value}"])  # the value shown is a valid one
        checked += 1
    assert checked >= 20


def test_every_file_function_extra_and_pin_the_first_half_names_exists():
    """Paths, functions, pip extras and version pins named from the top of the README to the
    reward-model section: `scripts/demo.sh`, `models/lean.py`, `tests/test_lean.py`,
    `data/synthetic.py:is_held_out`, `posttrain[qlora]`, "torch pinned to 2.13.0",
    "Python ≥ 3.10", the examples listed, and the tracker extras the report_to error names."""
    import tomllib

    assert (ROOT / "scripts" / "demo.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()
    for token in re.findall(r"`((?:tests|models|data|rollout)/[\w/]+\.py)(?::(\w+))?`", FIRST_HALF):
        path, function = token
        where = ROOT / path if path.startswith("tests/") else ROOT / "src" / "posttrain" / path
        assert where.is_file(), path
        if function:
            assert re.search(rf"^def {function}\(", where.read_text(), re.M), token
    for name in re.findall(r"`(\w+\.yaml)`", FIRST_HALF):
        assert (ROOT / "examples" / name).is_file(), name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in re.findall(r"posttrain\[(\w+)\]", FIRST_HALF):
        assert extra in extras, extra
    runs_source = (ROOT / "src" / "posttrain" / "train" / "runs.py").read_text()
    assert "posttrain[{tracker}]" in runs_source and {"tensorboard", "wandb"} <= set(extras)
    assert project["requires-python"] == ">=3.10"
    assert "2.13.0" in (ROOT / "scripts" / "setup.sh").read_text()
