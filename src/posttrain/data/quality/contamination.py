"""Decontamination: training rows that contain an evaluation prompt.

A benchmark question seen in training makes its score a memory test. The check follows
GPT-3's (Brown et al. 2020, Appendix C): a training row is contaminated when it shares an
n-word sequence with an evaluation text (n = 13 there); an evaluation text shorter than n
words counts when it appears whole. Words are `text.words` (normalised: case, punctuation
and Unicode forms do not hide a copy). In an evaluation text made mostly of character words
(Chinese, Japanese, Thai, ...: each character a word) n is lengthened by `text.ngram_scale`
(2 x 13 = 26 characters, about 13 words of those languages), the rule the repetition filter
uses: 13 characters are some 6 words, a phrase two texts share by chance.

An n-gram found in more than `max_shared` evaluation texts is left out of the index: it is a
template the benchmark's items share (an instruction preamble, few-shot examples, a passage
several questions are asked about), not any one item's, and a training row that uses the same
template has not seen a test question (GPT-3 found its reading-comprehension "overlap" to be such
shared passages). A training row is laid to the item it shares the most n-grams with, so a copy
of item 7 is named as item 7, not as the first item sharing a few words with it.

Short evaluation prompts with a small n flag common phrases too; the report names the
evaluation row each drop matched, so a reader can judge.
"""

from __future__ import annotations

from collections.abc import Sequence

from posttrain.data.quality.text import ngram_scale, ngrams, words


class ContaminationIndex:
    """The n-grams (n x `ngram_scale` words) of a set of evaluation texts, each mapped to the texts
    that contain it; those in more than `max_shared` texts are left out (0: no limit)."""

    def __init__(self, texts: Sequence[str], sources: Sequence[str], n: int, max_shared: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_shared < 0:
            raise ValueError(f"max_shared must be >= 0 (0 = no limit), got {max_shared}")
        self.n = n
        self._sources = list(sources)
        self._first: dict[tuple[str, ...], int] = {}  # gram -> the first text holding it
        self._all: dict[tuple[str, ...], list[int]] = {}  # a gram in two texts or more -> every text holding it
        for item, text in enumerate(texts):
            tokens = words(text)
            for gram in ngrams(tokens, n * ngram_scale(tokens)):
                first = self._first.setdefault(gram, item)
                if first != item:
                    holders = self._all.setdefault(gram, [first])
                    if holders[-1] != item:  # each text counted once
                        holders.append(item)
        shared = [gram for gram, holders in self._all.items() if max_shared and len(holders) > max_shared]
        for gram in shared:
            del self._first[gram], self._all[gram]
        self.shared = len(shared)  # n-grams left out as a template
        # an evaluation text shorter than n words is one shorter gram: look for grams of those lengths too
        self._lengths = sorted({len(gram) for gram in self._first})

    def __len__(self) -> int:
        return len(self._first)

    def find(self, text: str) -> tuple[str, str] | None:
        """(source of the evaluation text `text` shares the most n-grams with, the first words shared
        with it), or None. Equal counts go to the earlier text."""
        tokens = words(text)
        counts: dict[int, int] = {}
        first: dict[int, str] = {}
        seen: set[tuple[str, ...]] = set()
        for length in self._lengths:
            for i in range(len(tokens) - length + 1):
                gram = tuple(tokens[i:i + length])
                holder = self._first.get(gram)
                if holder is None or gram in seen:
                    continue
                seen.add(gram)
                for item in self._all.get(gram, (holder,)):
                    counts[item] = counts.get(item, 0) + 1
                    first.setdefault(item, " ".join(gram))
        if not counts:
            return None
        best = min(counts, key=lambda item: (-counts[item], item))
        return self._sources[best], first[best]
