"""ROUGE-L: hand-computed scores, the bit-parallel LCS against the textbook table, and the
pool's pruned search against a brute-force maximum."""

from __future__ import annotations

import random

import pytest

from posttrain.feedback.rouge import RougePool, lcs_length, rouge_l, rouge_l_tokens, tokenize


def _lcs_table(a: list[str], b: list[str]) -> int:
    """The O(len(a)·len(b)) dynamic programme, written out plainly."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_tokenize_lowercases_and_splits_on_punctuation():
    assert tokenize("Don't PANIC, it's 42_km!") == ["don", "t", "panic", "it", "s", "42", "km"]
    assert tokenize("  ...  ") == []
    assert tokenize("Café über") == ["café", "über"]


def test_hand_computed_scores():
    # the cat sat on the mat / the cat lay on a mat: LCS = the cat on mat = 4; F = 2·4 / (6 + 6)
    assert rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(8 / 12)
    # Lin's example: word order matters. LCS(police killed the gunman, the gunman kill police) = the gunman
    assert rouge_l("police killed the gunman", "the gunman kill police") == pytest.approx(4 / 8)
    # P = 2/2, R = 2/4: F = 2PR/(P+R) = 2·1·0.5/1.5 = 2/3 = 2·2/(2+4)
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("a c", "a b c d") == rouge_l("a b c d", "a c")  # symmetric
    assert rouge_l("Same words here", "same, words; HERE") == 1.0
    assert rouge_l("x y z", "p q") == 0.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("", "") == 0.0


def test_bit_parallel_lcs_equals_the_table():
    rng = random.Random(0)
    for _ in range(500):
        alphabet = "abcdefg"[: rng.randint(1, 7)]
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 90))]  # > 64 words: several machine words
        assert lcs_length(a, b) == _lcs_table(a, b) == lcs_length(b, a)


def test_pool_finds_the_exact_maximum():
    rng = random.Random(1)
    words = "write a short poem about the sea list three facts on cats explain how tax works in simple terms".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 15))) for _ in range(300)]
    pool = RougePool(texts)
    assert len(pool) == 300
    for _ in range(100):
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 15)))
        scores = [rouge_l(query, text) for text in texts]
        best, index = pool.most_similar(query)
        assert best == pytest.approx(max(scores))
        assert scores[index] == pytest.approx(best)


def test_pool_edge_cases():
    pool = RougePool()
    assert pool.most_similar("anything") == (0.0, -1)
    pool.add("Classify the sentiment of this review.")
    pool.add("Write a haiku about autumn.")
    assert pool.most_similar("write a haiku about AUTUMN!") == (1.0, 1)
    assert pool.most_similar("nothing shared") == (0.0, -1)
    assert pool.most_similar("") == (0.0, -1)
    assert rouge_l_tokens(["a"], []) == 0.0
