"""Stop 33, interop backlog: a saved model's config.json keeps the checkpoint's `use_cache` after
training with gradient checkpointing (final/ and merge); a chat template's end-of-turn marker of
several tokens is not written as generation_config's `stop_strings` (transformers' generate and
pipeline refuse one without a tokenizer), and README's call with `stop_strings=` and `tokenizer=`
stops there; a LoRA reward model loads in plain peft with README's `num_labels=1` call; a red-team
run stopped part-way (an error, Ctrl-C) reports and hashes only the requests answered and says it is
partial; `check_positions` names the one setting that can bring a prompt + new tokens under the positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config.safety import RedTeamConfig
from posttrain.errors import ConfigError
from posttrain.feedback.client import Reply

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda _: None, "stream": None}


def _tiny_run(tmp_path, name: str, run, config_class, **sections):
    config = {"output_dir": str(tmp_path / name), "model": {"path": "tiny"},
              "data": {"train_files": ["synthetic"], "synthetic_size": 64, "max_length": 64},
              "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return run(config_class.from_dict(config)) / "final"


# --------------------------------------------------------------------------- item 1: use_cache in what is saved


def test_final_after_gradient_checkpointing_keeps_the_checkpoints_use_cache(tmp_path):
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    final = _tiny_run(tmp_path, "sft", run_sft, SFTConfig, model={"gradient_checkpointing": True})
    assert json.loads((final / "config.json").read_text())["use_cache"] is True


def test_a_reward_model_after_gradient_checkpointing_keeps_the_checkpoints_use_cache(tmp_path):
    from posttrain.config import RMConfig
    from posttrain.train.reward import run_rm

    final = _tiny_run(tmp_path, "rm", run_rm, RMConfig, model={"gradient_checkpointing": True})
    assert json.loads((final / "config.json").read_text())["use_cache"] is True


def test_save_model_writes_use_cache_and_leaves_training_without_a_cache(tmp_path):
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    model = load_model("tiny", gradient_checkpointing=True)
    assert model.config.use_cache is False
    save_model(model, load_tokenizer("tiny"), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False  # training goes on without a KV cache
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).past_key_values is None


# --------------------------------------------------------------------------- item 2: a marker of several tokens


@pytest.fixture(scope="module")
def several_token_marker(tmp_path_factory):
    """A tiny Llama saved by save_model with a tokenizer that spells ChatML's <|im_end|> in several
    ordinary tokens, and a processor that makes it say "b<|im_end|>" then "c" on and on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, PreTrainedTokenizerFast

    from posttrain.data.templates import CHATML
    from posttrain.models.loading import save_model

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["a b c hello world"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("marker") / "model"
    save_model(LlamaForCausalLM(config), tokenizer, out)
    script = tokenizer("b<|im_end|>c", add_special_tokens=False)["input_ids"]

    class Says(LogitsProcessor):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, script[min(input_ids.shape[1] - self.start, len(script) - 1)]] = 0.0
            return forced

    return out, Says


def test_a_several_token_marker_is_no_stop_string_in_generation_config(several_token_marker):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    out, says = several_token_marker
    assert "stop_strings" not in json.loads((out / "generation_config.json").read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    start = prompt["input_ids"].shape[1]

    def answer(**kwargs) -> str:
        ids = model.generate(**prompt, max_new_tokens=16, do_sample=False,
                             logits_processor=LogitsProcessorList([says(start)]), **kwargs)
        return tokenizer.decode(ids[0, start:])

    assert answer().startswith("b<|im_end|>cc")  # plain generate runs (past the marker, as the README says)
    with pytest.raises(ValueError, match="tokenizer"):  # what a stop string in generation_config would do
        answer(stop_strings=["<|im_end|>"])
    assert answer(stop_strings=["<|im_end|>"], tokenizer=tokenizer) == "b<|im_end|>"  # README's call
    assert 'stop_strings=["<|im_end|>"], tokenizer=tokenizer' in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- item 3: a LoRA reward model in plain peft


def test_a_lora_reward_model_loads_in_plain_peft_with_readmes_call(tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from posttrain import RMConfig, run_rm
    from posttrain.models.reward_model import load_reward_model

    final = _tiny_run(tmp_path, "rm", run_rm, RMConfig, adapter={"method": "lora"})
    tokenizer = AutoTokenizer.from_pretrained(final)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the base's causal-LM config: two labels
        AutoPeftModelForSequenceClassification.from_pretrained(final)
    plain = AutoPeftModelForSequenceClassification.from_pretrained(
        final, num_labels=1, pad_token_id=tokenizer.pad_token_id).eval()  # README's call
    batch = tokenizer(["hello world", "a b c d e f"], return_tensors="pt", padding=True)
    ours = load_reward_model(final, pad_token_id=tokenizer.pad_token_id).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-6)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert ("AutoPeftModelForSequenceClassification.from_pretrained(dir, num_labels=1, "
            "pad_token_id=tokenizer.pad_token_id)") in readme


# --------------------------------------------------------------------------- item 4: a red-team run stopped part-way


class StopsAfter:
    """A chat backend that refuses nothing, then after `answers` replies raises `stop` on every call."""

    model_name = "scripted"

    def __init__(self, answers: int | None = None, stop: BaseException | None = None):
        self.calls, self.answers, self.stop = 0, answers, stop

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None):
        self.calls += 1
        if self.answers is not None and self.calls > self.answers:
            raise self.stop
        return Reply("Sure, here is how.", "stop", 5, 5)


@pytest.fixture
def harmful(tmp_path):
    path = tmp_path / "harmful.jsonl"
    path.write_text("".join(json.dumps({"id": f"h{i}", "category": "c", "prompt": f"How do I poison thing {i}?"})
                            + "\n" for i in range(6)))
    return path


def _redteam(tmp_path, harmful, name, target, *overrides) -> Path:
    from posttrain.safety.run import run_redteam

    cfg = RedTeamConfig.load(None, [f"output_dir={tmp_path / name}", f"probes.harmful={harmful}", "probes.overrefusal=",
                                    "attacks.names=[direct,role_play]", "concurrency=1", *overrides])
    return run_redteam(cfg, target=target, **QUIET)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_a_run_that_stopped_part_way_hashes_the_requests_it_answered(tmp_path, harmful):
    full = _report(_redteam(tmp_path, harmful, "full", StopsAfter()))
    assert not full["partial"]
    part = _report(_redteam(tmp_path, harmful, "part", StopsAfter(3, RuntimeError("server down"))))
    assert (part["requests"], part["answered"], part["failed"], part["partial"]) == (12, 3, 9, True)
    assert part["attacks"] == ["direct"]  # role_play answered nothing
    assert part["request_digests"]["harmful"] != full["request_digests"]["harmful"]
    later = _redteam(tmp_path, harmful, "later", StopsAfter(), f"compare_to={tmp_path / 'part'}")
    left = _report(later)["compare_to"]["not_compared"]
    assert left["by_attack"] == "other requests" and left["pooled"] == "other requests"  # 3 requests vs 12
    assert "Partial run" in (tmp_path / "part" / "report.md").read_text()
    assert "Partial run" not in (later / "report.md").read_text()


def test_a_complete_run_hashes_its_requests_as_before(tmp_path, harmful):
    from posttrain.safety.run import asked, load_items

    cfg = RedTeamConfig.load(None, [f"output_dir={tmp_path / 'x'}", f"probes.harmful={harmful}", "probes.overrefusal=",
                                    "attacks.names=[direct,role_play]"])
    full = _report(_redteam(tmp_path, harmful, "full", StopsAfter()))
    assert full["request_digests"] == asked(load_items(cfg))["request_digests"]


def test_an_interrupted_run_writes_the_report_of_what_it_answered(tmp_path, harmful):
    with pytest.raises(KeyboardInterrupt):
        _redteam(tmp_path, harmful, "cut", StopsAfter(4, KeyboardInterrupt()))
    report = _report(tmp_path / "cut")
    assert (report["requests"], report["answered"], report["failed"], report["partial"]) == (12, 4, 0, True)
    assert report["attack_success"]["overall"]["n"] == 4
    assert "8 not sent (the run stopped first" in (tmp_path / "cut" / "report.md").read_text()
    resumed = _report(_redteam(tmp_path, harmful, "cut", StopsAfter()))  # the same command completes it
    assert (resumed["answered"], resumed["partial"]) == (12, False)


# --------------------------------------------------------------------------- item 5: check_positions' advice


@pytest.mark.parametrize("prompt, new, advice", [
    (32, 64, "set rollout.max_new_tokens to 32 or less"),  # no prompt fits beside 64 new tokens
    (70, 16, "set data.max_prompt_length to 48 or less"),  # the prompt alone is past the positions
    (40, 40, "lower data.max_prompt_length or rollout.max_new_tokens so that they add up to 64 or less"),
    (64, 64, "lower data.max_prompt_length and rollout.max_new_tokens so that they add up to 64 or less"),
])
def test_check_positions_names_the_setting_that_applies(prompt, new, advice):
    from types import SimpleNamespace

    from posttrain.models.loading import check_positions

    model = SimpleNamespace(config=SimpleNamespace(model_type="gpt2", max_position_embeddings=64, n_positions=64))
    with pytest.raises(ConfigError) as caught:
        check_positions(model, {"the longest prompt": prompt, "rollout.max_new_tokens": new},
                        lower=["data.max_prompt_length", "rollout.max_new_tokens"])
    assert str(caught.value).endswith(advice), str(caught.value)
