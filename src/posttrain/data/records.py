"""The two shapes data takes between modules.

A `Record` is one training example after format detection, before tokenisation.
An `Example` is the same example as token ids with its label mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label value that carries no loss (prompt, padding, system text)


@dataclass
class Record:
    """One example. Exactly one of `messages` / `text` is set.

    messages:     OpenAI-style turns, [{"role": "system"|"user"|"assistant", "content": str}, ...];
                  loss goes on every assistant turn after the first `prompt_turns`.
    text:         plain text for continued pre-training; loss on every token.
    source:       where it came from, "file:line", for error messages.
    prompt_turns: how many leading messages are the prompt (a prompt-completion row): context,
                  their assistant turns never trained on.
    """

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str = "<memory>"
    prompt_turns: int = 0


@dataclass
class Example:
    """A tokenised record, Hugging Face label convention.

    labels[i] == input_ids[i] where that token is trained on, IGNORE_INDEX elsewhere; the
    loss shifts by one (hidden state i predicts labels[i + 1]).
    """

    input_ids: list[int]
    labels: list[int]
    source: str = "<memory>"
    position_ids: list[int] | None = field(default=None)  # set only for packed rows

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss trains on. The first never is (no position before it predicts it), so a
        one-token text example has none."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)
