"""A user brings a model of a family the tiny preset is not (GPT-2, GPT-NeoX, Phi-3, Gemma 2 / 3, Falcon,
OPT, Cohere, OLMo 2, Granite, a sliding-window Gemma 2) and runs every command on it through the CLI: sft
(full and each PEFT method), merge, generate, rm, score, dpo, grpo, ppo.

Each family is a tiny random-init model (hidden 32, 2 layers) built here offline from its transformers
config, with the preset's tokenizer (`presets.build_tokenizer`) saved beside it: with its ChatML template,
or, GPT-2-style, with no template, no pad token and <|endoftext|> as eos. Every command runs one step.

The tests named for a failure pin a defect found on that walk (strict xfails until fixed: they assert the
right behaviour); the others pin behaviour that was right but had no test at the command level:
posttrain's log-probs, losses and rewards equal a plain transformers forward of each row alone, merged
LoRA equals the adapter, and a fallback family is told its padding-free batches do not apply."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]

_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256}
# name -> (model_type, config, has a chat template)
FAMILIES = {
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}, False),  # Conv1D, no pad token
    "gpt_neox": ("gpt_neox", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "max_position_embeddings": 256}, True),  # Pythia
    "phi3": ("phi3", _LLAMA_LIKE, True),  # fused qkv_proj / gate_up_proj
    "gemma2": ("gemma2", {**_LLAMA_LIKE, "head_dim": 8}, True),  # soft-capping, eager attention
    "gemma3_w4": ("gemma3_text", {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4}, True),
    "gemma2_w4": ("gemma2", {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4}, True),
    "falcon": ("falcon", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}, True),  # 7B: multi-query
    "falcon_alibi": ("falcon", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "alibi": True}, True),  # Falcon-RW
    "opt": ("opt", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "word_embed_proj_dim": 32, "max_position_embeddings": 256}, False),  # dropout 0.1 as shipped
    "cohere": ("cohere", _LLAMA_LIKE, True),  # logit_scale
    "olmo2": ("olmo2", _LLAMA_LIKE, True),
    "granite": ("granite", {**_LLAMA_LIKE, "logits_scaling": 4.0, "embedding_multiplier": 12.0,
                            "residual_multiplier": 0.2, "attention_multiplier": 0.05}, True),
}

SFT = ["data.train_files=[synthetic]", "data.synthetic_size=32", "data.max_length=48", "data.eval_fraction=0.1",
       "train.max_steps=1", "train.batch_size=4", "train.progress_bar=false"]
PAIRS = ["data.train_files=[examples/data/preferences.jsonl]", "data.eval_fraction=0.2", "data.max_length=64",
         "train.max_steps=1", "train.batch_size=4", "train.progress_bar=false", "train.lr=1e-3"]
QUICK = ["train.max_steps=1", "train.batch_size=8", "eval.prompts=0", "train.progress_bar=false",
         "data.synthetic_size=64", "rollout.max_new_tokens=4"]




@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # PAIRS and the examples name examples/... relative to the root


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(name) -> the directory of that family's tiny model, built once per module."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = _build(name, root / name)
        return built[name]

    return get


def _build(name: str, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging

    from posttrain.models.presets import ENDOFTEXT, build_tokenizer

    kind, settings, chat = FAMILIES[name]
    tokenizer = build_tokenizer()
    if not chat:  # GPT-2 style: no chat template, no pad token, eos = <|endoftext|>
        tokenizer.chat_template = None
        tokenizer.pad_token = None
        tokenizer.eos_token = ENDOFTEXT
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **settings, **ids))
    model.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                                               pad_token_id=ids["pad_token_id"])
    logging.disable_progress_bar()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"  # different lengths, so batched rows are padded
    path.write_text("Smallest letter: c b d e f g h i j k\nCopy: a\nReverse: x y z w\nSmallest letter: q\n")
    return path


def _completions(path: Path) -> list[str]:
    return [json.loads(line)["completion"] for line in path.read_text().splitlines()]


def _plain_logps(model, input_ids: list[int], labels: list[int]) -> float:
    """Σ log p(label) of one unpadded row under the model's own forward, full log-softmax."""
    logps = model(input_ids=torch.tensor([input_ids])).logits[0].double().log_softmax(-1)
    return sum(float(logps[t - 1, labels[t]]) for t in range(1, len(labels)) if labels[t] != -100)


# --------------------------------------------------------------------------- defects


def test_opt_dpo_starts_with_the_policy_equal_to_its_reference(capsys, tmp_path, family):
    """OPT ships dropout=0.1. DPO compares the policy (train mode) with its reference (eval mode), so
    `disable_dropout` must switch it off, as it does for GPT-2's nn.Dropout modules; OPT's decoder
    applies `nn.functional.dropout(p=self.dropout)` with a float attribute it does not touch. Seen:
    step-1 loss 0.6956 and accuracy 0.0 (0.69286 / 0.75 with full fine-tuning) where every other
    family logs log 2 and 0.5; KTO's kl 0.012, GRPO's kl and PPO's approx_kl 2e-4 at their first step."""
    rc, out = run_cli(capsys, "dpo", f"output_dir={tmp_path}", f"model.path={family('opt')}", *PAIRS,
                      "adapter.method=lora")
    assert rc == 0
    step = _metrics(tmp_path)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-6) and step["rewards/accuracy"] == 0.5


def test_opt_grpo_first_step_has_zero_kl_to_the_reference(capsys, tmp_path, family):
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", f"output_dir={tmp_path}", f"model.path={family('opt')}",
                      *QUICK, "grpo.beta=0.04")
    assert rc == 0
    assert _metrics(tmp_path)["kl"] == 0.0


def test_falcon_multi_query_prefix_tuning_trains_or_is_refused_in_one_line(capsys, tmp_path, family):
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path}", f"model.path={family('falcon')}", *SFT,
                      "adapter.method=prefix")
    assert rc == 0 or (rc == 2 and "error:" in out)


@pytest.mark.parametrize("command", ["dpo", "rm"])
def test_falcon_alibi_preference_stages_run(capsys, tmp_path, family, command):
    rc, out = run_cli(capsys, command, f"output_dir={tmp_path}", f"model.path={family('falcon_alibi')}", *PAIRS)
    assert rc == 0


def test_ia3_default_targets_on_olmo2_train_or_say_there_is_no_default(capsys, tmp_path, family):
    """README: IA3 scales 'k, v, FFN down by default', and an empty adapter.ia3.target_modules means
    'peft's default for the model type'. OLMo 2 has k_proj / v_proj / down_proj, but peft knows no
    default for it, and the user, who set nothing, reads that their target 'None' matched nothing."""
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path}", f"model.path={family('olmo2')}", *SFT,
                      "adapter.method=ia3")
    assert rc == 0 or (rc == 2 and "None" not in out and "olmo2" in out and "adapter.ia3.target_modules" in out)


def test_bottleneck_adapters_with_defaults_train_on_falcon(capsys, tmp_path, family):
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path}", f"model.path={family('falcon')}", *SFT,
                      "adapter.method=bottleneck")
    assert rc == 0, out


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_generation_does_not_depend_on_the_batch_under_a_sliding_window(capsys, tmp_path, family,
                                                                                      method):
    """Gemma 2 with a 4-token window (Gemma 2 / 3 and Mistral have windows of 512-4096): a padded row's
    early tokens see pad slots where, alone, they see the virtual tokens. The same model's plain
    generation (no virtual tokens) agrees batched and alone."""
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "sft", f"output_dir={run}", f"model.path={family('gemma2_w4')}", *SFT,
                      f"adapter.method={method}", "train.lr=1e-1" if method == "prompt" else "train.lr=1e-2")
    assert rc == 0, out
    texts = []
    for batch in ("16", "1"):
        target = tmp_path / f"batch{batch}.jsonl"
        rc, out = run_cli(capsys, "generate", "--model", run, "--prompts", _prompts(tmp_path), "--max-new-tokens", "8",
                          "--batch-size", batch, "--output", target)
        assert rc == 0, out
        texts.append(_completions(target))
    assert texts[0] == texts[1]


def test_chatml_fallback_model_stops_at_the_end_of_its_turn(capsys, tmp_path, family):
    """SFT adopts ChatML into the saved tokenizer and trains every assistant turn to end in <|im_end|>
    (after 60 steps the model answers 'b<|im_end|><|im_end|>...' up to the token limit). Here the SFT
    model's head is set to say <|im_end|> at once: the turn is over, yet GRPO's rollouts count no
    completion as ended, run each to max_new_tokens and take the no-EOS penalty on all of them."""
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft"
    rc, out = run_cli(capsys, "sft", f"output_dir={sft}", f"model.path={family('gpt2')}", *SFT)
    assert rc == 0, out
    final = sft / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    end = json.loads((final / "tokenizer.json").read_text())["model"]["vocab"]["<|im_end|>"]
    with torch.no_grad():  # the final norm's output is a constant whose logits peak at <|im_end|>
        embedding = model.transformer.wte.weight
        embedding[end] *= 5
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(embedding[end] * 30 / embedding[end].norm() ** 2)
        assert int((embedding @ model.transformer.ln_f.bias).argmax()) == end
    model.save_pretrained(final)
    rl = tmp_path / "grpo"
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", f"output_dir={rl}", f"model.path={final}", *QUICK)
    assert rc == 0, out
    step = _metrics(rl)
    assert step["rollout/ended_fraction"] == 1.0 and step["rollout/response_tokens_mean"] == 1.0


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_rl_reference_with_virtual_tokens_is_the_starting_policy_or_refused(capsys, tmp_path, family, method):
    """README (DPO): π_ref is the starting model, 'a soft prompt or prefix at its initial draw
    included'; `dpo.reference=live` is refused for virtual tokens because switched off they would
    be missing. GRPO and PPO switch them off for their reference and say nothing: GRPO's kl at the
    first step is 1.2e-4 (prompt) / 2.4e-3 (prefix) here, 2.6e-4 / 3.6e-3 on a Llama of the same size,
    PPO's rollout/kl 0.011 there. Not specific to a family."""
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", f"output_dir={tmp_path}", f"model.path={family('gpt_neox')}",
                      *QUICK, f"adapter.method={method}", "grpo.beta=0.04")
    assert (rc == 2 and "error:" in out) or (rc == 0 and _metrics(tmp_path)["kl"] == 0.0)


# --------------------------------------------------------------------------- right, and now tested


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "gemma2", "falcon", "cohere", "olmo2"])
def test_lora_with_default_targets_merges_and_generates_like_the_adapter(capsys, tmp_path, family, name):
    """sft with LoRA on the default all-linear targets (Conv1D, fused qkv / gate_up, query_key_value),
    merge, then generate from the adapter run and from the merged model: merged logits equal the
    adapter's (and differ from the base's), and greedy completions agree."""
    from posttrain.models.adapters.io import load_adapted
    from posttrain.models.loading import load_model

    run, merged = tmp_path / "run", tmp_path / "merged"
    rc, out = run_cli(capsys, "sft", f"output_dir={run}", f"model.path={family(name)}", *SFT, "adapter.method=lora",
                      "train.lr=1e-2")
    assert rc == 0, out
    assert math.isfinite(_metrics(run)["loss"])
    rc, out = run_cli(capsys, "merge", run, merged)
    assert rc == 0, out
    ids = torch.tensor([[5, 17, 33, 80, 200, 11, 9]])
    with torch.no_grad():
        adapted = load_adapted(run / "final")(input_ids=ids).logits
        plain = load_model(str(merged))(input_ids=ids).logits
        base = load_model(str(family(name)))(input_ids=ids).logits
    assert (adapted - plain).abs().max() < 1e-4
    assert (adapted - base).abs().max() > 1e-5  # the step moved the adapter
    texts = []
    for model in (run, merged):
        target = tmp_path / f"{model.name}.jsonl"
        rc, out = run_cli(capsys, "generate", "--model", model, "--prompts", _prompts(tmp_path),
                          "--max-new-tokens", "6", "--output", target)
        assert rc == 0, out
        texts.append(_completions(target))
    assert texts[0] == texts[1]


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "gemma2", "gemma3_w4", "falcon", "cohere", "granite"])
def test_dpo_reference_log_probs_equal_each_row_alone_and_step_zero_is_log_two(capsys, tmp_path, family, name):
    """dpo (full, precomputed reference): every cached reference log-prob equals a plain forward of its
    row alone (shared-prompt 4-D masks on GPT-2's absolute positions, GPT-NeoX, Phi-3, Falcon; the plain
    path for Gemma 2's soft-capping, Cohere's and Granite's logit scaling; a sliding window narrower than
    the rows), the first step's loss is log 2, and the log says padding-free batches do not apply."""
    from safetensors.torch import load_file

    from posttrain.config import DPOConfig
    from posttrain.data.preferences import prepare_preference_data
    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.train.grouped import items_from_examples

    path = family(name)
    rc, out = run_cli(capsys, "dpo", f"output_dir={tmp_path}", f"model.path={path}", *PAIRS)
    assert rc == 0, out
    assert "padding_free does not apply" in out or "padding_free is off" in out
    if name in ("gemma2", "gemma3_w4"):
        assert "dpo.share_prompt is off" in out
    step = _metrics(tmp_path)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-6) and step["rewards/accuracy"] == 0.5
    cfg = DPOConfig.load(None, [f"model.path={path}", *PAIRS])
    data = prepare_preference_data(cfg.data, load_tokenizer(str(path)), None, cfg.train.seed, lambda _: None)
    sequences = [s for item in items_from_examples(data.train) + items_from_examples(data.eval) for s in item.sequences]
    stored = load_file(str(tmp_path / "reference_logps.safetensors"))  # the sequences the 1-step run reads
    covered = stored["covered"].bool()
    assert len(covered) == len(sequences) and bool(covered.any())
    cached = stored["logps"][covered].double()
    model = load_model(str(path)).eval()
    with torch.no_grad():
        plain = torch.tensor([_plain_logps(model, s.input_ids, s.labels) for s, held in zip(sequences, covered) if held],
                             dtype=torch.float64)
    assert cached.shape == plain.shape
    assert (cached - plain).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "gemma2", "falcon"])
def test_reward_model_scores_equal_the_classifiers_own_forward(capsys, tmp_path, family, name):
    """rm (one step), then `posttrain score`: each score equals transformers' sequence-classification
    forward on the row alone (GPT-2 without a pad token included)."""
    from posttrain.data.templates import resolve_template
    from posttrain.models.loading import load_tokenizer
    from posttrain.models.reward_model import load_reward_model

    run = tmp_path / "rm"
    rc, out = run_cli(capsys, "rm", f"output_dir={run}", f"model.path={family(name)}", *PAIRS, "train.lr=1e-2")
    assert rc == 0, out
    assert math.isfinite(_metrics(run)["loss"])
    rows = [{"prompt": "Smallest letter: c b d", "response": "b"},
            {"prompt": "Copy: a b c d e f g h", "response": "a b c d e f g h"},
            {"prompt": [{"role": "user", "content": "Reverse: x y"}], "response": "y x"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out = run_cli(capsys, "score", "--model", run, "--input", tmp_path / "rows.jsonl",
                      "--output", tmp_path / "scored.jsonl")
    assert rc == 0, out
    got = [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(run / "final"))
    model = load_reward_model(str(run / "final"), pad_token_id=tokenizer.pad_token_id).eval()
    template = resolve_template(tokenizer)
    want = []
    for row in rows:
        turns = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": row["response"]}],
                                             chat_template=template, tokenize=False)
        with torch.no_grad():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            want.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "phi3", "gpt_neox", "cohere"])
def test_grpo_and_ppo_take_a_step_with_the_policy_equal_to_its_reference(capsys, tmp_path, family, name):
    """grpo (LoRA, β > 0) and ppo (full, value head), one step each: finite losses, and at the first
    update the policy equals both the rollout policy and the reference (kl 0, approx_kl 0)."""
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", f"output_dir={tmp_path / 'grpo'}",
                      f"model.path={family(name)}", *QUICK, "adapter.method=lora", "grpo.beta=0.04")
    assert rc == 0, out
    step = _metrics(tmp_path / "grpo")
    assert math.isfinite(step["loss"]) and step["kl"] == 0.0
    rc, out = run_cli(capsys, "ppo", "examples/ppo.yaml", f"output_dir={tmp_path / 'ppo'}",
                      f"model.path={family(name)}", *QUICK)
    assert rc == 0, out
    step = _metrics(tmp_path / "ppo")
    assert math.isfinite(step["loss"]) and math.isfinite(step["value_loss"]) and step["approx_kl"] == 0.0


@pytest.mark.parametrize("name", ["granite", "cohere"])
def test_reward_model_on_a_family_without_a_classification_class_is_a_one_line_error(capsys, tmp_path, family,
                                                                                     name):
    rc, out = run_cli(capsys, "rm", f"output_dir={tmp_path}", f"model.path={family(name)}", *PAIRS)
    assert rc == 2 and "error: could not load a reward model (sequence classification)" in out


def test_packing_is_refused_for_opt_in_one_line(capsys, tmp_path, family):
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path}", f"model.path={family('opt')}", *SFT, "data.packing=true")
    assert rc == 2 and "data.packing" in out and "(opt)" in out

