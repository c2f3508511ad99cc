"""A merge walk: `posttrain merge` and what a trained run exports.

Walked: README's *Models* (outputs), *Parameter-efficient fine-tuning* (the merge column, the
`posttrain merge` paragraph) and `posttrain merge --help`, against `models/adapters/io.py`
(merge_adapted, the untying of a tied embedding, merged_weights), `models/loading.py` (save_model) and
`inference.py` (merge_main, _check_merge_output, _merge_reward_model): LoRA, DoRA, IA3 and LoRA on
`lm_head` of the tiny preset (whose embeddings are tied), merged by default and with `--dtype bfloat16`,
the size and tensor names of what is written; a LoRA reward model merged into bfloat16 and loaded by
plain `AutoModelForSequenceClassification`; peft's added-tokens recipe (resized vocabulary, embedding
and head in `modules_to_save`) merged; a LoRA trained on a bfloat16 base merged into bfloat16 against
its adapted bfloat16 forward; a full fine-tune's `final/`; and where merge may write: into the base it
read, into another adapter directory, into a directory that held a sharded model; what merge says of a
training checkpoint.

Right: every merged file holds each tensor once (a tied head stays tied and unwritten, 38 tensors and
the base's bytes; a LoRA on the tied head unties it and adds exactly `lm_head.weight`), `--dtype
bfloat16` halves it and sets the config's dtype; the reward model merges with its head and scores as
the adapter within bfloat16's rounding; the added-tokens adapter merges to peft's logits with 1026
rows, untied; a LoRA trained on a bfloat16 base (10 steps) merged into bfloat16 stays 0.008 from the
adapted bfloat16 forward in logits while training moved them 0.041 (README's "rounded once" holds,
and the rounding it implies is no more than the adapted forward's own); `final/` of a full bfloat16
fine-tune is safetensors, config, generation config and tokenizer, bfloat16 only, with the optimizer
state kept under `checkpoints/`.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 33:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run_cli

IDS = torch.tensor([[5, 17, 33, 80, 200, 11, 9], [7, 8, 9, 10, 11, 12, 13]])


def _copied_base(tmp_path: Path) -> Path:
    """The tiny preset copied (merge may write into it: the shared preset must never be touched)."""
    from posttrain.models.presets import preset_path

    base = tmp_path / "base"
    shutil.copytree(preset_path("tiny"), base)
    return base


def _adapter(base: Path, out: Path, seed: int = 0, **adapter) -> Path:
    """An adapter on `base` (recorded as its base), its trainable weights moved off their start."""
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    model = apply_adapters(load_model(str(base)), AdapterConfig(**(adapter or {"method": ["lora"]})))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return save_model(model, load_tokenizer(str(base)), out)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.float().eval()(input_ids=IDS).logits


def _adapted_logits(adapter: Path) -> torch.Tensor:
    from posttrain.inference import load_for_inference

    return _logits(load_for_inference(str(adapter))[0])


def _tensors(directory: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import safe_open

    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():
                found[key] = (weights.get_slice(key).get_dtype(), weights.get_slice(key).get_shape())
    return found


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


# --------------------------------------------------------------------------- defects


def test_merge_into_the_adapters_own_base_is_refused_and_the_base_kept(tmp_path, capsys):
    """`posttrain merge ADAPTER BASE_DIR`, BASE_DIR being the base the adapter records (a run's final/, a
    downloaded model, the preset's built directory): merge overwrites its model.safetensors with W + ΔW and
    exits 0. The base is gone, and the adapter, still naming it, now applies ΔW twice (measured: its logits
    move 0.73 from what they were); every other adapter on that base is broken too. _check_merge_output
    refuses the adapter's directory and the run directory, not the base read from the adapter's files."""
    base = _copied_base(tmp_path)
    adapter = _adapter(base, tmp_path / "adapter")
    weights = (base / "model.safetensors").read_bytes()
    before = _adapted_logits(adapter)
    rc, out = run_cli(capsys, "merge", adapter, base)
    kept = (base / "model.safetensors").read_bytes() == weights
    drift = 0.0 if kept else float((_adapted_logits(adapter) - before).abs().max())
    assert rc == 2 and kept, (f"rc {rc}, base overwritten: {not kept}; the adapter's logits moved {drift:.3f}: "
                              f"{out.strip()[-200:]}")


def test_merge_into_another_adapter_directory_is_refused(tmp_path, capsys):
    """_check_merge_output's own reason for refusing the adapter's directory: "a directory that held both
    would be read as an adapter again". Merging into a *different* adapter directory (another run's final/)
    makes exactly that directory and exits 0: posttrain's load_for_inference of it gives the other adapter,
    1.09 from the merged model in logits, and transformers' AutoModelForCausalLM.from_pretrained, finding
    adapter_config.json, loads the other adapter too (0.91 off). The other adapter's tokenizer and
    chat template are overwritten by the merged model's as well."""
    base = _copied_base(tmp_path)
    merged_from = _adapter(base, tmp_path / "a", seed=0)
    other = _adapter(base, tmp_path / "b", seed=1)
    rc, out = run_cli(capsys, "merge", merged_from, other)
    wrote = sorted(p.name for p in other.iterdir() if p.name in ("model.safetensors", "config.json"))
    assert rc == 2 and not wrote, f"rc {rc}; {other} now holds the adapter and {wrote}: {out.strip()[-200:]}"


@pytest.mark.parametrize("given", ["checkpoint", "run-without-final"])
def test_merge_of_a_training_checkpoint_says_it_is_one(given, tmp_path, capsys):
    """A DoRA run's `checkpoints/step-N` (trainable.safetensors, optimizer state, loop state), or the run
    directory of a run stopped before it wrote final/: merge says "... holds no adapter (a full model needs
    no merging)", which is false on both counts (it holds the adapter's trained weights, and no model). README:
    a training checkpoint "is refused, naming RUN/final to start from"; resolve_model_path has that
    message (_checkpoint_message) but merge_main decides on is_adapter_dir first."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    run = _quiet(run_sft, SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny"}, "adapter": {"method": ["dora"]},
        "data": {"synthetic_size": 16, "max_length": 32, "eval_fraction": 0.0},
        "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False, "save_every": 1},
        "eval": {"exact_match_prompts": 0}}))
    checkpoint = next((run / "checkpoints").iterdir())
    if given == "checkpoint":
        target = checkpoint
    else:
        shutil.rmtree(run / "final")
        target = run
    rc, out = run_cli(capsys, "merge", target, tmp_path / "merged")
    assert rc == 2, out
    assert "needs no merging" not in out, out.strip()
    if given == "checkpoint":
        assert "checkpoint" in out and str(run / "final") in out, out.strip()
    else:
        assert "final" in out, out.strip()


# --------------------------------------------------------------------------- right behaviour, untested so far


@pytest.mark.parametrize("name, adapter", [
    ("lora", {"method": ["lora"]}),
    ("dora", {"method": ["dora"]}),
    ("ia3", {"method": ["ia3"]}),
])
def test_a_merged_model_holds_each_tensor_once_in_the_dtype_asked(name, adapter, tmp_path, capsys):
    """The tied tiny preset: a merge that touches no embedding writes the base's 38 tensors, no
    `lm_head.weight` (tied: transformers ties it back on load), no adapter key, at the base's size in
    float32 and half of it with --dtype bfloat16, the config saying which; logits as the adapter's."""
    from posttrain.models.presets import preset_path
    from transformers import AutoModelForCausalLM

    base = preset_path("tiny")
    directory = _adapter(base, tmp_path / "adapter", **adapter)
    expected = _adapted_logits(directory)
    stored = _tensors(base)
    for dtype, width, label in [(None, 4, "F32"), ("bfloat16", 2, "BF16")]:
        out = tmp_path / f"merged-{dtype}"
        rc, said = run_cli(capsys, "merge", directory, out, *(["--dtype", dtype] if dtype else []))
        assert rc == 0, said
        written = _tensors(out)
        assert {k: shape for k, (_, shape) in written.items()} == {k: shape for k, (_, shape) in stored.items()}
        assert {kind for kind, _ in written.values()} == {label}
        numel = sum(torch.Size(shape).numel() for _, shape in written.values())
        assert numel * width <= (out / "model.safetensors").stat().st_size < numel * width + 16_384
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] is True and config["dtype"] == (dtype or "float32")
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
        tolerance = 1e-4 if dtype is None else 0.05
        torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=tolerance)


def test_a_lora_on_the_tied_head_writes_exactly_one_more_tensor_and_keeps_the_embedding(tmp_path, capsys):
    """LoRA on `lm_head` of the tied preset: the merge unties (README), writing `lm_head.weight` once beside
    the embedding, which stays the base's bit for bit; logits as the adapter's."""
    from posttrain.config import LoraConfig
    from posttrain.models.presets import preset_path
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = preset_path("tiny")
    directory = _adapter(base, tmp_path / "adapter", method=["lora"],
                         lora=LoraConfig(target_modules=["q_proj", "lm_head"]))
    expected = _adapted_logits(directory)
    rc, said = run_cli(capsys, "merge", directory, tmp_path / "merged")
    assert rc == 0, said
    written, stored = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert set(written) - set(stored) == {"lm_head.weight"} and set(stored) <= set(written)
    assert torch.equal(written["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])
    assert not torch.equal(written["lm_head.weight"], stored["model.embed_tokens.weight"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-4)


def test_a_plain_peft_adapter_with_added_tokens_merges_to_peft_logits(tmp_path, capsys):
    """peft's recipe for new tokens (resize, LoRA, embedding and head in modules_to_save) on the tied preset:
    the merged model has the 1026 rows, untied embedding and head, and peft's logits (measured 8e-7)."""
    from peft import LoraConfig, get_peft_model
    from posttrain.models.presets import preset_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    lm = AutoModelForCausalLM.from_pretrained(preset_path("tiny"))
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft_model = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                               modules_to_save=["embed_tokens", "lm_head"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    batch = tokenizer(["hello <tool> x </tool> world"], return_tensors="pt")
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
    rc, said = run_cli(capsys, "merge", tmp_path / "adapter", tmp_path / "merged")
    assert rc == 0, said
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.tie_word_embeddings is False and merged.config.vocab_size == len(tokenizer) == 1026
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == 1026
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_a_lora_reward_model_merged_into_bfloat16_loads_and_scores_in_plain_transformers(tmp_path, capsys):
    """`posttrain rm adapter.method=lora` (LoRA also on the tied embedding), merged with --dtype bfloat16:
    a bfloat16 LlamaForSequenceClassification with one label and a pad id, that plain transformers loads
    with no arguments and that scores as the adapter within bfloat16 rounding; its tokenizer keeps the pad
    token and chat template."""
    import posttrain as P
    from posttrain.models.reward_model import load_reward_model, score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = _quiet(P.run_rm, P.RMConfig.from_dict({
        "output_dir": str(tmp_path / "rm"), "model": {"path": "tiny"},
        "adapter": {"method": "lora", "lora": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}},
        "data": {"train_files": ["synthetic"], "synthetic_size": 24, "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress_bar": False}}))
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        expected = score(load_reward_model(run / "final").eval(), IDS, mask)
    rc, said = run_cli(capsys, "merge", run, tmp_path / "merged", "--dtype", "bfloat16")
    assert rc == 0 and "(bfloat16)" in said, said
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["LlamaForSequenceClassification"]
    assert _tensors(tmp_path / "merged") and {k for k, _ in _tensors(tmp_path / "merged").values()} == {"BF16"}
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id is not None
    with torch.no_grad():
        got = merged(input_ids=IDS, attention_mask=mask).logits.squeeze(-1).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.pad_token is not None and tokenizer.chat_template


def test_a_full_bfloat16_fine_tunes_final_is_the_model_only(tmp_path):
    """`final/` of `model.dtype=bfloat16` full SFT: config, generation config, tokenizer, chat template and
    one safetensors file of the preset's 38 tensors, all bfloat16 (the tied head not written twice); the
    optimizer state lives under checkpoints/ only."""
    from posttrain.config import SFTConfig
    from posttrain.models.presets import preset_path
    from posttrain.train.sft import run_sft

    run = _quiet(run_sft, SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny", "dtype": "bfloat16"},
        "data": {"synthetic_size": 16, "max_length": 32, "eval_fraction": 0.0},
        "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False, "save_every": 1},
        "eval": {"exact_match_prompts": 0}}))
    final = run / "final"
    assert sorted(p.name for p in final.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    written, stored = _tensors(final), _tensors(preset_path("tiny"))
    assert {k: s for k, (_, s) in written.items()} == {k: s for k, (_, s) in stored.items()}
    assert {kind for kind, _ in written.values()} == {"BF16"}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    optimizer = [p.relative_to(run).parts[0] for p in run.rglob("optimizer*")]
    assert optimizer and set(optimizer) == {"checkpoints"}, optimizer
