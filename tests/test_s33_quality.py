"""Stop 33, quality and rewards backlog: a reward function drawing from Python's `random` or
numpy's global RNG gets seeded draws (a resumed run's rewards equal the uninterrupted run's, the
caller's RNG states are kept); `module:Class.method` reward specs; near dedup's shingles
lengthened for character-word text (Chinese, Japanese, Thai ...) by the rule the repetition
check uses; a looping display-maths block caught like a looping code fence; the perplexity
report showing the max_length actually used; exact match documented as strip-only and
case-sensitive."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.config.quality import FilterConfig, PerplexityConfig, QualityConfig
from posttrain.data.quality import filters, perplexity
from posttrain.data.quality.dedup import jaccard, near_duplicates, shingle_set
from posttrain.data.quality.rows import convert
from posttrain.errors import ConfigError
from posttrain.rewards import function_reward

ROOT = Path(__file__).resolve().parents[1]
TURNS = [{"role": "user", "content": "Smallest letter: q m"}]

REWARDS = '''
import random

import numpy as np


def noisy(prompt, response):
    return random.random()


def numpy_noisy(prompt, response):
    return float(np.random.rand())


class Scores:
    LIMIT = 3

    @staticmethod
    def short(prompt, response):
        return -float(len(response))

    @classmethod
    def matches(cls, prompt, response, row):
        return float(response == row["gold"])

    def needs_an_instance(self, prompt, response):
        return 0.0


Scores.matches.__func__.row_keys = ("gold",)
'''


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """A module of reward functions, importable as `s33_rewards`."""
    (tmp_path / "s33_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "s33_rewards"
    sys.modules.pop("s33_rewards", None)


# --------------------------------------------------------------------------- 1. seeded reward functions


@pytest.mark.parametrize("name", ["noisy", "numpy_noisy"])
def test_a_random_reward_is_seeded_per_response_and_leaves_the_callers_rng_alone(rewards_module, name):
    reward = function_reward(f"{rewards_module}:{name}")
    responses = ["m", "q", "mm", "m"]
    random.seed(123)
    np.random.seed(123)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = reward([TURNS] * 4, responses)
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    again = reward([TURNS] * 4, responses)
    assert first == again  # reproducible: the same draws for the same (prompt, response)
    assert first[0] == first[3] and len(set(first[:3])) == 3  # the same pair draws alike, others apart
    split = reward([TURNS] * 2, responses[:2]) + reward([TURNS] * 2, responses[2:])
    assert split == first  # whatever the batch it is scored in


def test_a_random_reward_gives_a_resumed_run_the_uninterrupted_runs_rewards(rewards_module, tmp_path):
    """A run stopped at step 1 evaluates the held-out prompts at its end (drawing from `random`
    through the reward), which the uninterrupted run does not do there: unseeded, the resumed
    steps drew other rewards (weights apart by 0.0107 after 3 steps)."""
    from safetensors.torch import load_file

    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    def cfg(name, steps):
        return GRPOConfig.load(None, [
            f"output_dir={tmp_path / name}", "data.synthetic_size=120", "rollout.max_new_tokens=3",
            "train.batch_size=8", "rollout.num_generations=4", "train.schedule=constant", "train.lr=1e-3",
            "train.progress_bar=false", "eval.prompts=4", "eval.samples=2", "train.save_every=1", "grpo.beta=0.05",
            f"reward.functions=[noisy={rewards_module}:noisy]", f"train.max_steps={steps}"])

    whole = run_grpo(cfg("whole", 3))
    run_grpo(cfg("parts", 1))
    parts = run_grpo(cfg("parts", 3))
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (whole, parts)]
    assert losses[0] == losses[1]
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, parts))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_rewards_docs_say_how_reward_functions_are_seeded():
    import posttrain.rewards

    assert "seeded" in posttrain.rewards.__doc__
    assert "`random`" in (ROOT / "README.md").read_text().split("**Rewards.**", 1)[1][:3000]


# --------------------------------------------------------------------------- 2. Class.method specs, row_keys


def test_a_class_attribute_names_a_reward_function(rewards_module):
    short = function_reward(f"{rewards_module}:Scores.short")
    assert short([TURNS, TURNS], ["m", "mmm"]) == [-1.0, -3.0]
    matches = function_reward(f"{rewards_module}:Scores.matches")
    assert matches([TURNS, TURNS], ["m", "q"], rows=[{"gold": "m"}, {"gold": "m"}]) == [1.0, 0.0]
    assert matches.row_keys == ("gold",)


@pytest.mark.parametrize("attr, message", [
    ("Scores.LIMIT", r"names 3 \(int\), not a function"),
    ("Scores.nope", "cannot be imported"),
    ("Scores.needs_an_instance", "staticmethod or a classmethod"),
    ("noisy.x", "cannot be imported"),
])
def test_a_class_attribute_that_is_no_reward_function_is_refused(rewards_module, attr, message):
    with pytest.raises(ConfigError, match=message):
        function_reward(f"{rewards_module}:{attr}")


def test_readme_documents_class_specs_and_row_keys():
    rewards = (ROOT / "README.md").read_text().split("**Rewards.**", 1)[1][:3000]
    assert "row_keys" in rewards and "Class.method" in rewards


# --------------------------------------------------------------------------- 3. dedup shingles for character words


def _parallel(words: list[str], changed: int, new: str, sep: str) -> tuple[str, str]:
    edited = list(words)
    edited[changed] = new
    return sep.join(words), sep.join(edited)


def test_near_dedup_judges_a_chinese_edit_as_it_judges_the_same_edit_in_english():
    """40 words, one replaced: in English (5-word shingles) Jaccard 0.756, under the 0.8
    threshold; the same text in two-character Chinese words measured 0.854 with 5-character
    shingles (2.5 words: a near duplicate where the English is none) and 0.732 with them doubled."""
    rng = random.Random(0)
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]
    english = [f"w{i}x" for i in rng.sample(range(1000), 41)]
    chinese = ["".join(rng.sample(hanzi, 2)) for _ in range(41)]
    en = _parallel(english[:40], 20, english[40], " ")
    zh = _parallel(chinese[:40], 20, chinese[40], "")
    j_en = jaccard(shingle_set(en[0], 5), shingle_set(en[1], 5))
    j_zh = jaccard(shingle_set(zh[0], 5), shingle_set(zh[1], 5))
    assert abs(j_zh - j_en) < 0.05, (j_zh, j_en)
    assert near_duplicates(list(en))[0] == near_duplicates(list(zh))[0] == [None, None]
    assert near_duplicates(list(zh), threshold=0.7)[0][1] is not None


def test_different_chinese_paragraphs_share_no_shingle_and_copies_still_match():
    a = ("机器学习是人工智能的一个分支，它研究计算机如何从数据中自动学习规律，并利用这些规律对未知数据进行预测。"
         "常见的方法包括监督学习、无监督学习和强化学习，其中监督学习需要带有标签的训练数据。")
    c = ("深度学习是机器学习的一个分支，它使用多层神经网络从数据中自动学习特征表示，并在图像识别和语音识别等任务上"
         "取得了很好的效果。常见的网络包括卷积神经网络和循环神经网络，它们都需要大量的训练数据。")
    assert jaccard(shingle_set(a, 5), shingle_set(c, 5)) == 0.0  # 0.043 with 5-character shingles
    assert near_duplicates([a, c, a + "。"])[0] == [None, None, near_duplicates([a, a])[0][1]]


# --------------------------------------------------------------------------- 4. looping display maths

PROSE = ("Here is the derivation you asked for, written out step by step so that each line can be "
         "checked against the one before it.\n\n")


@pytest.mark.parametrize("block", [
    "$$\n" + "x_{n+1} = x_n + 1 \\\\\n" * 12 + "$$\n",
    "\\begin{align}\n" + "a &= b + c \\\\\n" * 11 + "\\end{align}\n",
    "\\begin{align}\n" + "f(x) &= x^2 \\\\\ng(x) &= 2x \\\\\n" * 10 + "\\end{align}\n",
])
def test_a_looping_display_maths_block_fails_repetition(block):
    reason = filters.check("Derive it.", PROSE + block, FilterConfig())
    assert reason is not None and reason[0] == "repetition" and "maths block loops" in reason[1], reason


@pytest.mark.parametrize("block", [
    "\\begin{align}\n" + "".join(f"x_{i} &= x_{{{i - 1}}} + {i} \\\\\n" for i in range(1, 13)) + "\\end{align}\n",
    "$$\nE = mc^2\n$$\n" * 3,
    "\\begin{align}\n" + "a &= b \\\\\n" * 4 + "\\end{align}\n",
])
def test_ordinary_display_maths_passes(block):
    assert filters.check("Derive it.", PROSE + block, FilterConfig()) is None


# --------------------------------------------------------------------------- 5. perplexity max_length used


def test_the_perplexity_report_shows_the_max_length_used(tmp_path, monkeypatch):
    import posttrain.inference
    from posttrain.data.quality.run import run_quality
    from posttrain.inference import load_for_inference

    model, tokenizer = load_for_inference("tiny-2l")
    model.config.max_position_embeddings = 24
    monkeypatch.setattr(posttrain.inference, "load_for_inference", lambda *a, **k: (model, tokenizer))
    rows = [convert({"instruction": "Name a colour.", "output": "Blue and green " * 20}, "alpaca", "a:1")]
    _, _, used = perplexity.score_rows(rows, PerplexityConfig(model="tiny-2l", max_length=4096), log=lambda _: None)
    assert used == 24
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue and green " * 20}) + "\n")
    cfg = QualityConfig.load(None, [f"output_dir={tmp_path / 'out'}", f"data.files=[{path}]",
                                    "perplexity.model=tiny-2l", "perplexity.max_length=4096"])
    out = run_quality(cfg, log=lambda _: None)
    report = json.loads((out / "report.json").read_text())["perplexity"]
    assert report["max_length"] == 24 and report["max_length_configured"] == 4096
    text = (out / "report.md").read_text()
    assert "cut to 24 tokens" in text and "max_length=4096" in text, text


# --------------------------------------------------------------------------- 6. exact match's rule, documented


def test_exact_match_is_strip_only_and_case_sensitive_and_says_so():
    import posttrain.eval.exact_match as em
    from posttrain.rewards import exact_match

    assert exact_match(TURNS, " m\n", {"answer": "m"}) == 1.0
    assert exact_match(TURNS, "M", {"answer": "m"}) == 0.0 and exact_match(TURNS, "m.", {"answer": "m"}) == 0.0
    for doc in (em.exact_match.__doc__, exact_match.__doc__):
        assert "case-sensitive" in doc, doc
    assert "case-sensitive" in (ROOT / "README.md").read_text().split("**Rewards.**", 1)[1][:1000]
