"""Decontamination: training rows that contain an evaluation prompt.

A benchmark question seen in training makes its score a memory test. The check follows
GPT-3's (Brown et al. 2020, Appendix C): a training row is contaminated when it shares an
n-word sequence with an evaluation text (n = 13 there); an evaluation text shorter than n
words counts when it appears whole. Words are `text.words` (normalised: case, punctuation
and Unicode forms do not hide a copy). In an evaluation text made mostly of character words
(Chinese, Japanese, Thai, ...: each character a word) n is lengthened by `text.ngram_scale`
(2 x 13 = 26 characters, about 13 words of those languages), the rule the repetition filter
uses: 13 characters are some 6 words, a phrase two texts share by chance.

Short evaluation prompts with a small n flag common phrases too; the report names the
evaluation row each drop matched, so a reader can judge.
"""

from __future__ import annotations

from collections.abc import Sequence

from posttrain.data.quality.text import ngram_scale, ngrams, words


class ContaminationIndex:
    """The n-grams of a set of evaluation texts (n x `ngram_scale` words each), each mapped to the
    first text's source."""

    def __init__(self, texts: Sequence[str], sources: Sequence[str], n: int):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self._grams: dict[tuple[str, ...], str] = {}
        for text, source in zip(texts, sources):
            tokens = words(text)
            for gram in ngrams(tokens, n * ngram_scale(tokens)):
                self._grams.setdefault(gram, source)
        # an evaluation text shorter than n words is one shorter gram: look for grams of those lengths too
        self._lengths = sorted({len(gram) for gram in self._grams})

    def __len__(self) -> int:
        return len(self._grams)

    def find(self, text: str) -> tuple[str, str] | None:
        """(source of the evaluation text matched, the shared words) for the first match in `text`,
        or None."""
        tokens = words(text)
        for length in self._lengths:
            for i in range(len(tokens) - length + 1):
                source = self._grams.get(tuple(tokens[i:i + length]))
                if source is not None:
                    return source, " ".join(tokens[i:i + length])
        return None
