"""Every adapter method's saved output, reloaded, merged and generated from, behaves as the
model that was trained (an SFT run of 2 steps on the tiny preset, kept in memory).

Expectations come from the in-memory trained model (its own forward, a hand-written greedy
loop without a KV cache), plain transformers / peft loads, and uninterrupted runs. Each run
uses the alpaca template (not the preset's ChatML), so a final/ that carried the preset's
template instead of the trained one would show.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

METHODS = {
    "lora": {"method": ["lora"]},
    "dora": {"method": ["dora"], "lora": {"r": 4, "dropout": 0.1}},
    "rslora-loraplus": {"method": ["lora"], "lora": {"r": 4, "alpha": 8.0, "rslora": True, "lr_ratio_b": 16.0}},
    "ia3": {"method": ["ia3"]},
    "prompt-text": {"method": ["prompt"], "virtual_tokens": {"num_virtual_tokens": 4, "init": "text",
                                                             "init_text": "Answer the task now"}},
    "prefix-projection": {"method": ["prefix"], "virtual_tokens": {"num_virtual_tokens": 4, "projection": True,
                                                                   "projection_hidden": 16}},
    "bottleneck": {"method": ["bottleneck"], "bottleneck": {"size": 8, "activation": "gelu"}},
    "freeze": {"method": ["freeze"], "freeze": {"top_layers": 1}},
    "full": {"method": ["full"]},
    "lora+prompt": {"method": ["lora", "prompt"], "lora": {"target_modules": ["q_proj", "v_proj"]},
                    "virtual_tokens": {"num_virtual_tokens": 3}},
    "ia3+prefix+bottleneck": {"method": ["ia3", "prefix", "bottleneck"], "bottleneck": {"where": ["ffn"]}},
}
PEFT_SINGLE = {"lora", "dora", "rslora-loraplus", "ia3", "prompt-text", "prefix-projection"}
MERGEABLE = {"lora", "dora", "rslora-loraplus", "ia3"}
FULL_MODELS = {"freeze", "full"}
# methods whose SFT resume no other test covers (grep: test_adapters mixes lora+bottleneck+prefix,
# test_readme_claims_a lora+prompt, test_resume_and_outputs lora for DPO / RM, test_cli full but slow)
RESUME = ["dora", "rslora-loraplus", "ia3", "prompt-text", "prefix-projection", "bottleneck", "freeze", "full",
          "ia3+prefix+bottleneck"]
TEXTS = ["Reverse: q m t", "Hello there, how are you today?"]


def _cfg(out: Path, adapter: dict, model_path: str = "tiny"):
    from posttrain.config import SFTConfig

    return SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": model_path}, "adapter": adapter,
        "data": {"synthetic_size": 48, "max_length": 48, "template": "alpaca", "eval_fraction": 0.0},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 3e-3, "progress_bar": False, "save_every": 1,
                  "keep_last": 5},
        "eval": {"exact_match_prompts": 0}})


def _quiet_sft(cfg) -> Path:
    from posttrain.train.sft import run_sft

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_sft(cfg)


def _train(out: Path, adapter: dict, model_path: str = "tiny"):
    """(run dir, in-memory trained model in eval mode, in-memory tokenizer)."""
    import posttrain.train.runs as runs

    real = runs.finish_run
    box = {}

    def keep(run_dir, accelerator, main, model, tokenizer, summary):
        box.update(model=model, tokenizer=tokenizer)
        return real(run_dir, accelerator, main, model, tokenizer, summary)

    runs.finish_run = keep
    try:
        run_dir = _quiet_sft(_cfg(out, adapter, model_path))
    finally:
        runs.finish_run = real
    return run_dir, box["model"].eval(), box["tokenizer"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrips")
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = _train(root / name, METHODS[name])
        return cache[name]

    return get


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def _base_dir(final: Path) -> str:
    manifest = json.loads((final / "posttrain_adapters.json").read_text())
    return manifest["base_model_name_or_path"]


def _cli(*argv) -> tuple[int, str]:
    from posttrain.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


# --------------------------------------------------------------------------- reload


@pytest.mark.parametrize("name", list(METHODS))
def test_final_reloads_with_the_trained_logits(name, trained):
    from transformers import AutoModelForCausalLM

    from posttrain.inference import load_for_inference

    run_dir, model, tokenizer = trained(name)
    batch = _batch(tokenizer)
    expected = _logits(model, batch)
    reloaded, _ = load_for_inference(str(run_dir))
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-5)
    final = run_dir / "final"
    if name in FULL_MODELS:
        plain = AutoModelForCausalLM.from_pretrained(final).eval()
        torch.testing.assert_close(_logits(plain, batch), expected, rtol=0, atol=1e-5)
        return
    base = AutoModelForCausalLM.from_pretrained(_base_dir(final)).eval()
    assert (_logits(base, batch) - expected).abs().max() > 1e-3  # the 2 steps moved the model
    if name in PEFT_SINGLE:  # README: one peft method is a plain peft directory
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, str(final)).eval()
        length = batch["input_ids"].shape[1]
        torch.testing.assert_close(_logits(peft_model, batch)[:, -length:], expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("name", list(METHODS))
def test_posttrain_merge_gives_the_trained_logits_or_one_line_why_not(name, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, model, tokenizer = trained(name)
    rc, stderr = _cli("merge", str(run_dir), str(tmp_path / "merged"))
    if name in MERGEABLE:
        assert rc == 0, stderr
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        keys = load_file(str(tmp_path / "merged" / "model.safetensors")).keys()
        assert not any("lora" in k or "ia3" in k or "base_layer" in k for k in keys)
        batch = _batch(tokenizer)
        torch.testing.assert_close(_logits(merged, batch), _logits(model, batch), rtol=0, atol=1e-4)  # README: 1e-4
        saved = AutoTokenizer.from_pretrained(tmp_path / "merged")
        assert saved.chat_template == tokenizer.chat_template and "### Response" in saved.chat_template
        return
    assert rc == 2 and not (tmp_path / "merged" / "model.safetensors").exists()
    errors = _errors(stderr)
    assert len(errors) == 1, stderr
    if name in FULL_MODELS:
        assert "no adapter" in errors[0]
        return
    blocking = [m for m in METHODS[name]["method"] if m not in ("lora", "ia3")]
    assert "cannot be merged" in errors[0] and all(m in errors[0] for m in blocking)


# --------------------------------------------------------------------------- generation


def _greedy_by_hand(model, tokenizer, text: str, max_new: int) -> str:
    """Greedy decoding with full forwards (no KV cache), stopping at an EOS id of the tokenizer
    or the model's generation_config."""
    eos = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    new: list[int] = []
    for _ in range(max_new):
        with torch.no_grad():
            token = int(model(input_ids=ids).logits[0, -1].argmax())
        new.append(token)
        if token in eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("name", list(METHODS))
def test_generate_from_final_equals_greedy_decoding_of_the_trained_model(name, trained, tmp_path):
    run_dir, model, tokenizer = trained(name)
    raw = ["the cat sat on the mat and then", "x"]  # unequal lengths: the batch is left-padded
    chat = ["Copy: a b"]
    got = {}
    for template, prompts in (("none", raw), ("auto", chat)):
        (tmp_path / f"{template}.txt").write_text("\n".join(prompts) + "\n")
        out = tmp_path / f"{template}.jsonl"
        rc, stderr = _cli("generate", "--model", str(run_dir), "--prompts", str(tmp_path / f"{template}.txt"),
                          "--output", str(out), "--max-new-tokens", "8", "--template", template)
        assert rc == 0, stderr
        got[template] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    expected_raw = [_greedy_by_hand(model, tokenizer, p, 8) for p in raw]
    expected_chat = [_greedy_by_hand(model, tokenizer, tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True), 8) for p in chat]
    assert any(expected_raw)  # something to compare
    assert got["none"] == expected_raw
    assert got["auto"] == expected_chat


# --------------------------------------------------------------------------- resume


def _weights(final: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(final.rglob("*.safetensors")):
        out.update({f"{path.relative_to(final)}/{k}": v for k, v in load_file(str(path)).items()})
    return out


@pytest.mark.parametrize("name", RESUME)
def test_a_run_stopped_after_step_1_and_resumed_ends_bitwise_equal(name, trained, tmp_path):
    run_dir, _, _ = trained(name)
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)  # as if killed right after step 1's checkpoint
    shutil.rmtree(cut / "checkpoints" / "step-0000002")
    shutil.rmtree(cut / "final")
    _quiet_sft(_cfg(cut, METHODS[name]))
    a, b = _weights(run_dir / "final"), _weights(cut / "final")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line).get("step") for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == [1, 2]


# --------------------------------------------------------------------------- what the directory records


@pytest.mark.parametrize("name", list(METHODS))
def test_final_records_absolute_base_tokenizer_template_and_nothing_pickled(name, trained):
    from transformers import AutoTokenizer

    run_dir, _, tokenizer = trained(name)
    final = run_dir / "final"
    files = [p for p in final.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors", ".jinja", ".md") for p in files), files
    saved = AutoTokenizer.from_pretrained(final)
    assert saved.chat_template == tokenizer.chat_template and "### Response" in saved.chat_template
    assert saved("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]
    if name in FULL_MODELS:
        return
    bases = set()
    for path in final.rglob("*.json"):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "base_model_name_or_path" in record:
            bases.add(record["base_model_name_or_path"])
    assert len(bases) == 1, bases
    base = Path(bases.pop())
    assert base.is_absolute() and (base / "config.json").is_file()


def test_a_relative_model_path_is_recorded_absolute_and_loads_from_elsewhere(tmp_path, trained, monkeypatch):
    from posttrain.inference import load_for_inference

    run_dir, _, _ = trained("lora")
    shutil.copytree(_base_dir(run_dir / "final"), tmp_path / "work" / "mybase")
    monkeypatch.chdir(tmp_path / "work")
    run, model, tokenizer = _train(Path("runs") / "rel", {"method": ["lora", "bottleneck"]}, model_path="mybase")
    recorded = {json.loads(p.read_text()).get("base_model_name_or_path")
                for p in (tmp_path / "work" / run / "final").rglob("*.json")} - {None}
    assert recorded == {str(tmp_path / "work" / "mybase")}
    monkeypatch.chdir(tmp_path)
    batch = _batch(tokenizer)
    reloaded, _ = load_for_inference(str(tmp_path / "work" / run))
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- defects


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens", "v_proj"]], ids=["lm_head", "embed_tokens"])
def test_merge_of_lora_on_a_tied_embedding_gives_the_trained_logits(targets, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, model, tokenizer = _train(tmp_path / "run", {"method": ["lora"], "lora": {"target_modules": targets}})
    base = AutoModelForCausalLM.from_pretrained(_base_dir(run_dir / "final"))
    assert base.config.tie_word_embeddings  # the tiny preset ties its input and output embeddings
    rc, stderr = _cli("merge", str(run_dir), str(tmp_path / "merged"))
    assert rc == 0, stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = _batch(tokenizer)
    torch.testing.assert_close(_logits(merged, batch), _logits(model, batch), rtol=0, atol=1e-4)


def test_generate_from_an_adapter_plain_peft_saved(tmp_path, trained):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _, _ = trained("lora")
    base_dir = _base_dir(run_dir / "final")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    peft_model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "tokenizer.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    (tmp_path / "p.txt").write_text("Reverse: q m t\n")
    rc, stderr = _cli("generate", "--model", str(tmp_path / "plain"), "--prompts", str(tmp_path / "p.txt"),
                      "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "8", "--template", "none")
    assert rc == 0, _errors(stderr)
    got = json.loads((tmp_path / "o.jsonl").read_text())["completion"]
    assert got == _greedy_by_hand(peft_model.eval(), tokenizer, "Reverse: q m t", 8)
