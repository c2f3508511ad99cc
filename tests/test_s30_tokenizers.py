"""Tokenizer families, the parts behind the walkthrough's fixes: the pad fallback, Phi-3's end-only eos,
the built-in templates' BOS, the system turn under a template without a system role, and evaluate's
answer tokens. The families are built as in tests/test_walkthrough_tokenizers.py."""

from __future__ import annotations

import copy
import json

import pytest

from tests.test_walkthrough_tokenizers import GEMMA, PHI3, TALK, build_tokenizer, family_tokenizers


@pytest.fixture(scope="module")
def loaded():
    """name -> the family's tokenizer as load_tokenizer gives it."""
    return family_tokenizers()


def _without_pad(tok, tmp_path, **config):
    from posttrain.models.loading import load_tokenizer

    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    saved.pop("pad_token", None)
    saved.update(config)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(saved))
    return load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, pad", [("llama2", "<unk>"), ("mistral", "<unk>"),  # unk first
                                        ("llama3", "<|end_of_text|>"),  # a special no template writes
                                        ("llama3_base", "<|end_of_text|>")])  # none left: eos
def test_pad_fallback_takes_a_token_the_data_never_carries_before_eos(loaded, name, pad):
    tok = loaded(name)
    assert tok.pad_token == pad
    if name == "llama3":  # <|eot_id|> (eos, the end of every turn) and the template's markers are never pad
        assert tok.pad_token not in (tok.eos_token, "<|eot_id|>", "<|start_header_id|>", "<|begin_of_text|>")


def test_pad_fallback_prefers_a_token_named_pad_and_skips_an_unk_that_is_eos(tmp_path):
    """GPT-2's unk is its eos, so it is no better than eos; a free special named like a pad comes first."""
    tok = build_tokenizer("llama3")
    tok.add_special_tokens({"additional_special_tokens": ["<|reserved_0|>", "<|finetune_right_pad_id|>"]})
    assert _without_pad(copy.deepcopy(tok), tmp_path / "a").pad_token == "<|finetune_right_pad_id|>"
    assert _without_pad(tok, tmp_path / "b", unk_token="<|eot_id|>").pad_token == "<|finetune_right_pad_id|>"


def test_reward_model_with_pad_equal_to_eos_says_what_transformers_will_score(loaded):
    from posttrain.models.reward_model import note_pad_is_eos

    lines = []
    note_pad_is_eos(loaded("llama3"), lines.append)
    assert lines == []
    note_pad_is_eos(loaded("llama3_base"), lines.append)
    (line,) = lines
    assert "'<|end_of_text|>'" in line and "token before" in line and "tokenizer_config.json" in line


def test_phi3_earlier_turn_ends_at_its_marker_and_a_rewritten_turn_is_still_refused(loaded):
    from posttrain.data.templates import assistant_spans
    from posttrain.errors import DataError

    tok = loaded("phi3")
    text, spans = assistant_spans(TALK, tok, PHI3)
    assert [text[lo:hi] for lo, hi in spans] == ["The baker is awake.<|end|>",
                                                "She bakes bread.<|end|>\n<|endoftext|>"]
    # earlier answers shortened once a later turn exists: the earlier render is not the conversation's
    rewriting = PHI3.replace("{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}",
                                  "{{'<|assistant|>\\n' + (message['content'] if loop.last else "
                                  "message['content'][:3]) + '<|end|>\\n'}}")
    assert rewriting != PHI3
    with pytest.raises(DataError, match="not prefix-stable at message 1"):
        assistant_spans(TALK, tok, rewriting)


def test_builtin_templates_put_bos_first_only_for_a_bos_adding_tokenizer(loaded):
    from posttrain.data.templates import ALPACA, CHATML, resolve_template, role_markers
    from posttrain.models.loading import load_tokenizer

    tok = copy.deepcopy(loaded("mistral"))
    tok.chat_template = None
    for name, plain in (("chatml", CHATML), ("alpaca", ALPACA)):
        template = resolve_template(tok, name)
        assert template != plain and template.endswith(plain)
        text = tok.apply_chat_template(TALK[:1], chat_template=template, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<s>") and text.count("<s>") == 1
    assert "<|im_start|>" in role_markers(tok, resolve_template(tok, "chatml"))
    assert resolve_template(load_tokenizer("tiny"), "chatml") == CHATML  # adds no BOS: unchanged


def test_system_turn_is_folded_into_the_first_user_turn_only_when_the_template_has_no_system_role(loaded):
    from posttrain.data.templates import fold_system, has_system_role

    assert not has_system_role(loaded("gemma"), GEMMA)
    assert has_system_role(loaded("phi3"), PHI3)
    turns = [{"role": "system", "content": "Be brief."}, *TALK[:3]]
    assert fold_system(turns) == [{"role": "user", "content": "Be brief.\n\nName the baker."}, *TALK[1:3]]
    assert fold_system(TALK) == TALK


def test_local_model_folds_the_system_turn_under_a_template_without_one(loaded):
    """The judge's and the red-team target's requests go through LocalModel.chat: the system text reaches
    the model at the head of the user turn, exactly as if the user had written it there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.feedback.client import LocalModel

    tok = loaded("gemma")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    local = LocalModel(model, tok, name="gemma", max_tokens=3, temperature=0.0)
    system = local.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    folded = local.chat([{"role": "user", "content": "Be brief.\n\nhi"}])
    assert (system.text, system.prompt_tokens) == (folded.text, folded.prompt_tokens)


def test_evaluate_answer_tokens_are_the_content_after_the_prompt_without_the_marker(loaded):
    from posttrain.data.prompts import PromptRecord
    from posttrain.eval.alignment import Side, _answer_tokens

    for name in ("mistral", "llama3", "phi3", "llama2"):
        tok = loaded(name)
        side = Side(name, "", None, tok, tok.chat_template)
        context, answer = _answer_tokens(side, PromptRecord([{"role": "user", "content": "Reverse: m b h"}], "h b m"))
        prompt = tok.apply_chat_template([{"role": "user", "content": "Reverse: m b h"}], tokenize=True,
                                         return_dict=True, add_generation_prompt=True)["input_ids"]
        assert context == list(prompt), name
        assert tok.decode(answer, skip_special_tokens=False).strip() == "h b m", name
