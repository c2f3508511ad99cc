"""AI feedback, stop 33 (second round): text without spaces in ROUGE-L and Self-Instruct's filters,
a repeated RLAIF prompt's seeds, and the prefaces models put before a revision or a new task."""

from __future__ import annotations

import random

import pytest

from posttrain.config.synthesis import SelfInstructFilterConfig
from posttrain.feedback.constitutional import clean_revision
from posttrain.feedback.rlaif import occurrence_of, rlaif_record
from posttrain.feedback.rouge import RougePool, rouge_l, tokenize
from posttrain.feedback.self_instruct import clean_instruction, instruction_cut_off, instruction_rejection, \
    parse_instance


def _candidate(text: str) -> dict:
    return {"instruction": text, "raw_instruction": text, "instruction_finish_reason": "stop"}


# --------------------------------------------------------------------------- unspaced scripts


def test_each_character_of_an_unspaced_script_is_a_token_and_spaced_words_stay_whole():
    assert tokenize("请写一首诗") == ["请", "写", "一", "首", "诗"]
    assert tokenize("用Python写代码") == ["用", "python", "写", "代", "码"]
    assert tokenize("ภาษา") == ["ภ", "า", "ษ", "า"]
    assert tokenize("हिंदी में लिखें") == ["हिंदी", "में", "लिखें"]  # vowel signs stay in their word
    assert rouge_l("日本語で詩を書いて", "日本語で歌を書いて") == pytest.approx(2 * 8 / 18)


def test_pool_is_exact_on_chinese_text():
    rng = random.Random(3)
    chars = "请写一首关于春秋天的诗列出三个事实解释"
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 20))) for _ in range(200)]
    pool = RougePool(texts)
    for _ in range(40):
        query = "".join(rng.choice(chars) for _ in range(rng.randint(1, 20)))
        best, index = pool.most_similar(query)
        assert best == pytest.approx(max(rouge_l(query, t) for t in texts))
        assert index == -1 if best == 0 else rouge_l(query, texts[index]) == pytest.approx(best)


def test_length_filter_counts_two_characters_a_word_in_unspaced_text():
    filters = SelfInstructFilterConfig(min_words=3, max_words=5)
    assert instruction_rejection(_candidate("写一首诗"), filters) == "too_short"  # 4 characters: 2 words
    assert instruction_rejection(_candidate("写一首秋诗"), filters) == "too_short"  # 5: 2.5 words
    assert instruction_rejection(_candidate("写一首秋天诗"), filters) is None  # 6: 3 words
    assert instruction_rejection(_candidate("请写一首关于秋天的诗"), filters) is None  # 10: 5 words
    assert instruction_rejection(_candidate("请写一首关于秋天的短诗"), filters) == "too_long"  # 11: 5.5 words
    assert instruction_rejection(_candidate("Write a poem"), filters) is None  # English unchanged
    assert instruction_rejection(_candidate("Write poems"), filters) == "too_short"


def test_banned_words_match_in_unspaced_text():
    filters = SelfInstructFilterConfig(min_words=1, banned_words=["图片", "draw"])
    assert instruction_rejection(_candidate("请描述这张图片的内容"), filters) == "banned_word"
    assert instruction_rejection(_candidate("请描述这首诗的内容"), filters) is None


# --------------------------------------------------------------------------- RLAIF: a repeated prompt


def test_occurrence_of_reads_load_prompts_ids():
    assert occurrence_of("0123456789abcdef") == 1 and occurrence_of("0123456789abcdef-3") == 3
    assert occurrence_of("0") == 1 and occurrence_of("a-b") == 1 and occurrence_of("x-") == 1


class _Seeds:
    model_name = "policy"

    def __init__(self):
        from posttrain.feedback.client import Usage

        self.usage, self.seeds = Usage(), []

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None):
        from posttrain.feedback.client import Reply

        self.seeds.append(seed)
        return Reply("same", "stop", 1, 1)


def test_each_occurrence_of_a_prompt_samples_with_its_own_seeds():
    from posttrain.data.prompts import PromptRecord

    policy = _Seeds()

    class _NoJudge:
        backend = policy

    record = PromptRecord([{"role": "user", "content": "hi"}])
    for k in (1, 2, 3):
        out = rlaif_record("p", record, policy=policy, judge=_NoJudge(), num_responses=3, seed=10, occurrence=k)
        assert [r["seed"] for r in out["responses"]] == [10 + 3 * (k - 1) + i for i in range(3)]
    assert policy.seeds == list(range(10, 19))


# --------------------------------------------------------------------------- prefaces


def test_clean_revision_drops_a_first_line_announcing_the_revision():
    assert clean_revision("Here is a revised version of the response:\n\nBe kind.") == "Be kind."
    assert clean_revision("Here's the revised response that addresses the critique:\nBe kind.") == "Be kind."
    assert clean_revision("Sure, here is my revision:\r\nHi there.") == "Hi there."
    assert clean_revision("**Revised answer:**\nHi") == "Hi"
    assert clean_revision("Here is a revised version of the response:") == ""  # a preface alone: no revision
    for content in ("The revision process has three steps:\n1. Read.",  # names no response
                    "Here's how to revise your answer:\n1. Read.",  # "revise", not a revision
                    "Here is the answer:\nBe kind.",  # no revision named
                    "Revised rules apply to the response: be kind."):  # does not end in ":"
        assert clean_revision(content) == content


def test_clean_instruction_skips_a_preamble_line():
    assert clean_instruction("Sure! Here is a new task:\nWrite a poem about tea.") == "Write a poem about tea."
    assert clean_instruction("Here you go:\n\n1. Name three rivers.") == "Name three rivers."
    assert clean_instruction("**New task:**\nSort the list.") == "Sort the list."
    assert clean_instruction("Task 9:\nSort the list.") == "Sort the list."
    # an instruction that ends in ":" is kept; a preamble with nothing after it leaves no instruction
    # (empty_instruction), not the preamble as a task
    assert clean_instruction("Complete the sentence:\nThe cat sat") == "Complete the sentence:"
    assert clean_instruction("Sure! Here is a new task:") == ""
    # cut off: judged on the instruction line, after the preamble
    assert instruction_cut_off("Sure! Here is a new task:\nWrite a poem ab", "length")
    assert not instruction_cut_off("Write a poem.\nAnother", "length")


@pytest.mark.parametrize("said", ["No input required.", "(No input needed)", "None.", "N/A", "not applicable",
                                  "[none]", "No input is required"])
def test_inputs_saying_there_is_none_are_empty(said):
    assert parse_instance(f"Input: {said}\nOutput: A poem.", False) == ("", "A poem.", None)


def test_an_input_mentioning_none_is_kept():
    assert parse_instance("Input: None of the above\nOutput: B", False) == ("None of the above", "B", None)
