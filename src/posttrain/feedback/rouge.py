"""ROUGE-L (Lin 2004): similarity of two texts by their longest common subsequence of words.

    tokens      the words of posttrain.data.quality.text (`words`): after NFKC and case folding, runs of
                letters, marks and digits ("Don't panic!" -> don, t, panic), each symbol ("+", "€"), and
                each character of a script written without spaces (Chinese, Japanese, Thai, Lao, Khmer,
                Burmese: "请写一首诗" -> 请, 写, 一, 首, 诗), so a one-character edit of a Chinese
                instruction keeps 9 of its 10 tokens instead of changing its only one
    P = LCS / len(candidate),  R = LCS / len(reference),  F = 2PR / (P + R) = 2 LCS / (len(c) + len(r))

F is the balanced F-measure (β = 1), the score Self-Instruct thresholds at 0.7. It is symmetric,
so "candidate" and "reference" only name the two sides.

`RougePool` answers "how close is this text to anything already in the pool?" for pools of
thousands: an inverted index gives each pool text's shared-word count, which bounds its LCS
(a common subsequence uses each shared word at most as often as both texts contain it), and
the exact LCS is computed only while a bound could still beat the best score found so far.
"""

from __future__ import annotations

from collections import Counter

from posttrain.data.quality.text import words


def tokenize(text: str) -> list[str]:
    """The words quality's checks use (`posttrain.data.quality.text.words`): runs of letters, marks and
    digits (punctuation and underscores split), each symbol, and each character of a script written
    without spaces, after NFKC and case folding."""
    return words(text)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Hyyrö 2004): bit j of V is 0 where the LCS grows at b[j]; one big-integer
    step per token of `a`, so O(len(a) · len(b) / word size).
    """
    if not a or not b:
        return 0
    positions: dict[str, int] = {}
    for j, token in enumerate(b):
        positions[token] = positions.get(token, 0) | (1 << j)
    mask = (1 << len(b)) - 1
    v = mask
    for token in a:
        u = v & positions.get(token, 0)
        v = ((v + u) | (v - u)) & mask
    return len(b) - v.bit_count()


def rouge_l_tokens(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F-measure of two token lists: 2·LCS / (len(candidate) + len(reference)); 0 if either is empty."""
    if not candidate or not reference:
        return 0.0
    return 2.0 * lcs_length(candidate, reference) / (len(candidate) + len(reference))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure of two texts (see `tokenize`)."""
    return rouge_l_tokens(tokenize(candidate), tokenize(reference))


class RougePool:
    """Texts to compare new candidates against; `most_similar` is exact, and fast on large pools."""

    def __init__(self, texts: list[str] = ()):
        self._tokens: list[list[str]] = []
        self._index: dict[str, list[tuple[int, int]]] = {}  # word -> [(text index, count in that text)]
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._tokens)

    def add(self, text: str) -> int:
        """Add a text; returns its index."""
        i = len(self._tokens)
        tokens = tokenize(text)
        self._tokens.append(tokens)
        for word, count in Counter(tokens).items():
            self._index.setdefault(word, []).append((i, count))
        return i

    def most_similar(self, text: str) -> tuple[float, int]:
        """(highest ROUGE-L F of `text` against the pool, index of that text); (0.0, -1) when
        nothing in the pool shares a word with it."""
        tokens = tokenize(text)
        shared: dict[int, int] = {}
        for word, count in Counter(tokens).items():
            for i, pool_count in self._index.get(word, ()):
                shared[i] = shared.get(i, 0) + min(count, pool_count)
        # LCS <= shared words, so F <= 2·shared / (len + len): try the best bounds first.
        bounds = sorted(((2.0 * n / (len(tokens) + len(self._tokens[i])), i) for i, n in shared.items()),
                        key=lambda item: (-item[0], item[1]))
        best, best_index = 0.0, -1
        for bound, i in bounds:
            if bound <= best:
                break
            score = rouge_l_tokens(tokens, self._tokens[i])
            if score > best:
                best, best_index = score, i
        return best, best_index
