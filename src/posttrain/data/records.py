"""The shapes data takes between modules.

A `Record` is one training example after format detection, before tokenisation.
An `Example` is the same example as token ids with its label mask.
A `WrittenFloat` is a number read from a JSON file, still knowing how the file wrote it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # label value that carries no loss (prompt, padding, system text)


class WrittenFloat(float):
    """A JSON number with a fraction or an exponent, read as a float that keeps the text the
    file wrote: `json.loads(text, parse_float=WrittenFloat)`. It is a float everywhere (a margin,
    a score: arithmetic and `float()` give plain floats); `written` is the text ("2.50", "1e3"),
    for a reference answer compared as text."""

    __slots__ = ("written",)

    def __new__(cls, text: str) -> "WrittenFloat":
        number = super().__new__(cls, text)
        number.written = text
        return number

    def __reduce__(self):  # pickle and copy keep the text
        return self.__class__, (self.written,)


@dataclass
class Record:
    """One example. Exactly one of `messages` / `text` is set.

    messages:     OpenAI-style turns, [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...];
                  an assistant turn may also carry `tool_calls` (then its content may be "") and
                  `reasoning_content`, a tool turn `tool_call_id`, and any turn a `name` (formats.py
                  reads them; a key the chat template does not render makes the row a bad row);
                  loss goes on every assistant turn after the first `prompt_turns`, but those in
                  `untrained`.
    text:         plain text for continued pre-training; loss on every token.
    source:       where it came from, "file:line", for error messages.
    prompt_turns: how many leading messages are the prompt (a prompt-completion row): context,
                  their assistant turns never trained on.
    tools:        the row's function definitions (JSON schemas), given to every render of the
                  conversation as the chat template's `tools`; None when it has none.
    untrained:    indices of assistant turns the row keeps out of the loss (`weight: 0`,
                  `train: false`, or every answer but the last under data.train_on=last):
                  context, like the prompt's.
    """

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    source: str = "<memory>"
    prompt_turns: int = 0
    tools: list[dict[str, Any]] | None = None
    untrained: tuple[int, ...] = ()


class Example:
    """A tokenised record, Hugging Face label convention.

    labels[i] == input_ids[i] where that token is trained on, IGNORE_INDEX elsewhere; the
    loss shifts by one (hidden state i predicts labels[i + 1]).

    The ids are held as int32 arrays (4 bytes a token, where a list of Python ints takes 20-40),
    since a whole training set stays in memory. `input_ids`, `labels` and `position_ids` read as
    new lists, so changing one in place changes nothing: assign instead
    (`example.labels = labels`). Hot paths read the arrays themselves through `compact()`.
    """

    __slots__ = ("_input_ids", "_labels", "source", "_position_ids")

    def __init__(self, input_ids: Iterable[int], labels: Iterable[int], source: str = "<memory>",
                 position_ids: Iterable[int] | None = None):  # position_ids: set only for packed rows
        self.input_ids = input_ids
        self.labels = labels
        self.source = source
        self.position_ids = position_ids

    @property
    def input_ids(self) -> list[int]:
        return self._input_ids.tolist()

    @input_ids.setter
    def input_ids(self, values: Iterable[int]) -> None:
        self._input_ids = array("i", values)

    @property
    def labels(self) -> list[int]:
        return self._labels.tolist()

    @labels.setter
    def labels(self, values: Iterable[int]) -> None:
        self._labels = array("i", values)

    @property
    def position_ids(self) -> list[int] | None:
        return None if self._position_ids is None else self._position_ids.tolist()

    @position_ids.setter
    def position_ids(self, values: Iterable[int] | None) -> None:
        self._position_ids = None if values is None else array("i", values)

    def compact(self) -> tuple[array, array, array | None]:
        """(input_ids, labels, position_ids) as the int32 arrays held, not copies: read them, never
        change them."""
        return self._input_ids, self._labels, self._position_ids

    def __len__(self) -> int:
        return len(self._input_ids)

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss trains on. The first never is (no position before it predicts it), so a
        one-token text example has none."""
        labels = self._labels
        if not labels:
            return 0
        return len(labels) - 1 - labels.count(IGNORE_INDEX) + (labels[0] == IGNORE_INDEX)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return (f"Example(input_ids={self.input_ids!r}, labels={self.labels!r}, source={self.source!r}, "
                f"position_ids={self.position_ids!r})")

    def __reduce__(self):  # pickle and copy: the arrays, not lists
        return self.__class__, self._fields()

    def _fields(self) -> tuple:
        return self._input_ids, self._labels, self.source, self._position_ids
