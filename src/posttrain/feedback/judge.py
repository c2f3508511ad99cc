"""Pairwise judging by a language model, with position-swap debiasing.

LLM judges favour whichever response they read first (or second) more often than its
quality warrants (Zheng et al. 2023, "Judging LLM-as-a-Judge", Sec. 3.3; Wang et al. 2023,
"Large Language Models are not Fair Evaluators"). So every pair is judged twice, once in
each order, and a verdict counts only when both orders name the same response:

    order "ab": the first response is shown as A     order "ba": the second is shown as A
    ab says A  and ba says B  -> first               both say tie          -> tie
    ab says B  and ba says A  -> second              any other combination -> inconsistent
    either reply has no verdict line                 -> unparsed

An inconsistent pair (e.g. "A" both times: the judge picked a slot, not a response) is
kept in the records and never becomes a preference. A reply must state its verdict
explicitly ("Verdict: A" on a line of its own, or MT-bench's "[[A]]"); the last such
statement counts, and a reply with none is unparsed, never guessed from where "A" first
appears. Optionally the judge is asked again, in the same conversation, for just the
verdict line.

    parse_verdict(text)          -> "A" | "B" | "tie" | None
    combine_orders(ab, ba)       -> "first" | "second" | "tie" | "inconsistent" | "unparsed"
    judge_messages(...)          the chat messages sent for one order (an agent's turns shown whole:
                                 reasoning, tool calls and results, `render_conversation`; the
                                 row's tool definitions when it has them, `render_tools`)
    PairwiseJudge(backend, ...)  .judge(prompt_turns, first, second, tools=None) -> PairJudgement
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from posttrain.feedback.client import ChatBackend

DEFAULT_RUBRIC = """\
- Helpful: it does what the user asked, completely and correctly, and stays on topic.
- Honest: it does not invent facts; when unsure it says so rather than guessing confidently.
- Harmless: it does not help with anything dangerous, hateful or illegal.
Length is not quality: prefer the shorter response when two are equally good."""

SYSTEM_PROMPT = ("You are a careful, impartial reviewer. You compare two responses to the same conversation "
                 "and decide which one better meets the principles you are given. The order in which the "
                 "responses are shown, their length and their style must not sway you.")

INSTRUCTION = ("Think briefly about how well each response meets the principles. Then end your reply with "
               "one final line that is exactly one of:\nVerdict: A\nVerdict: B\nVerdict: tie\n"
               "(tie only if neither response is better than the other).")

RETRY_PROMPT = ("Your reply did not end with a verdict line. Answer with a single line and nothing else: "
                "Verdict: A, Verdict: B or Verdict: tie.")

TOOLS_NOTE = ("(The conversation includes tool calls: an assistant turn may call a tool instead of answering, "
              "and a Tool turn is that tool's result.)")

TOOLS_HEADING = "Tools the assistant may call (their definitions, one per line):"

RESPONSE_START, RESPONSE_END = "[Response {slot}]", "[End of response {slot}]"
OUTCOMES = ("first", "second", "tie", "inconsistent", "unparsed")


# --------------------------------------------------------------------------- the prompt


def render_conversation(turns: list[dict]) -> str:
    """A single plain user turn as its text; a longer conversation as "Role: text" paragraphs.

    What a turn carries beside its text is shown too (`turn_text`), so a judge never reads an
    agent's turn as empty: its reasoning, its tool calls (name and arguments), and a turn's
    `name` beside its role ("Tool (get_weather, result of call_1): ...")."""
    if len(turns) == 1 and turns[0]["role"] == "user" and "name" not in turns[0]:
        return turns[0]["content"]
    return "\n\n".join(f"{_speaker(t)}: {turn_text(t)}" for t in turns)


def _speaker(turn: dict) -> str:
    notes = [turn[key] if key == "name" else f"result of {turn[key]}"
             for key in ("name", "tool_call_id") if turn.get(key)]
    return turn["role"].capitalize() + (f" ({', '.join(notes)})" if notes else "")


def turn_text(turn: dict) -> str:
    """A turn's content, after its reasoning in a [reasoning] block and before each tool call it
    makes as "[calls tool NAME with arguments JSON]"; the content alone for a plain turn."""
    parts = []
    if turn.get("reasoning_content"):
        parts.append(f"[reasoning]\n{turn['reasoning_content']}\n[end of reasoning]")
    if turn.get("content") or not (parts or turn.get("tool_calls")):
        parts.append(turn.get("content") or "")
    for call in turn.get("tool_calls") or ():
        function = call.get("function", call)
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        parts.append(f"[calls tool {function.get('name')} with arguments {arguments}]")
    return "\n".join(parts)


def render_tools(tools: list[dict]) -> str:
    """A row's tool definitions for a judge: TOOLS_HEADING, then each definition as one line of JSON."""
    return "\n".join([TOOLS_HEADING, *(json.dumps(tool, ensure_ascii=False) for tool in tools)])


def judge_messages(prompt_turns: list[dict], response_a: str, response_b: str,
                   rubric: str = DEFAULT_RUBRIC, tools: list[dict] | None = None) -> list[dict[str, str]]:
    """The chat messages asking for one verdict, with `response_a` shown first (as A). A
    conversation in which tools are called is said to be one (TOOLS_NOTE), before it is shown.
    The row's `tools` (its function definitions) are shown before the conversation
    (`render_tools`), so a judge can tell a right call from a wrong one; without them (None or
    empty) the messages are exactly those of a plain row."""
    def block(slot: str, text: str) -> str:
        return f"{RESPONSE_START.format(slot=slot)}\n{text}\n{RESPONSE_END.format(slot=slot)}"

    shown = render_conversation(prompt_turns)
    if any(t.get("tool_calls") or t["role"] == "tool" for t in prompt_turns):
        shown = f"{TOOLS_NOTE}\n{shown}"
    sections = [f"Principles:\n{rubric.strip()}", *([render_tools(tools)] if tools else []),
                f"Conversation:\n{shown}", block("A", response_a), block("B", response_b), INSTRUCTION]
    user = "\n\n".join(sections)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- parsing

_MARKDOWN = re.compile(r"[*_`]")
# "Verdict: A", "Final verdict - B.", "My verdict is a tie", "verdict: [[A]]", "Verdict: Response B"
_VERDICT_LINE = re.compile(
    r"^(?:(?:my|the|our)\s+)?(?:final\s+)?verdict\s*(?:is\s*)?[:=\-–—]?\s*(?:\[\[\s*)?"
    r"(?:(?:response|assistant|output)\s+)?(?P<value>a\s+tie|a\s+draw|tie|draw|a|b)\b(?:\s*\]\])?(?P<rest>.*)$",
    re.IGNORECASE)
# MT-bench's form: [[A]], [[B]], [[C]] (tie); also [[tie]]
_BRACKETS = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.IGNORECASE)
# options named after the verdict: a line naming two ("Verdict: A or B", "A, not B", "verdict: a is
# worse than b") is skipped; "Verdict: A (Response A is correct)" names one. A lowercase "b" alone is
# always the option; a lowercase "a" only after words that compare (elsewhere it is the article).
_CANDIDATES = re.compile(r"\b([AB])\b|(?i:\b(tie|draw)\b)|\b(b)\b"
                         r"|(?i:\b(?:or|and|vs\.?|versus|not|than|over|response)\s+(?:response\s+)?([ab])\b)")


def _value(raw: str) -> str:
    raw = raw.lower()
    if raw in ("a", "b"):
        return raw.upper()
    return "tie"  # tie, a tie, draw, [[C]]


def parse_verdict(text: str) -> str | None:
    """The last explicit verdict in a judge's reply: "A", "B", "tie", or None when there is none.

    Explicit means a line that starts with the word verdict ("Verdict: A", "**Final verdict:**
    B", "verdict: tie"; markdown and case do not matter) and names exactly one option, or a line
    holding MT-bench's "[[A]]" / "[[B]]" / "[[C]]" (tie) with no other bracketed option.
    Mentions of A or B anywhere else ("Response A is more detailed...") are not verdicts.
    """
    found: list[str] = []
    for line in text.splitlines():
        clean = _MARKDOWN.sub("", line).strip().lstrip("#>-• \t").strip()
        match = _VERDICT_LINE.match(clean)
        if match and len(re.findall(r"verdict", clean, re.IGNORECASE)) == 1:
            value = _value(match.group("value"))
            named = {_value(next(g for g in m.groups() if g)) for m in _CANDIDATES.finditer(match.group("rest"))}
            if named <= {value}:
                found.append(value)
                continue
        values = {_value(v) for v in _BRACKETS.findall(clean)}
        if len(values) == 1:
            found.append(values.pop())
    return found[-1] if found else None


# --------------------------------------------------------------------------- both orders


def to_original(verdict: str | None, order: str) -> str | None:
    """A slot verdict ("A"/"B"/"tie") as the response it names: "first", "second" or "tie"."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    shown_first = "first" if order == "ab" else "second"
    shown_second = "second" if order == "ab" else "first"
    return shown_first if verdict == "A" else shown_second


def combine_orders(verdict_ab: str | None, verdict_ba: str | None) -> str:
    """The outcome of a pair from its two slot verdicts (see the module docstring's table)."""
    ab, ba = to_original(verdict_ab, "ab"), to_original(verdict_ba, "ba")
    if ab is None or ba is None:
        return "unparsed"
    return ab if ab == ba else "inconsistent"


@dataclass
class OrderVerdict:
    """One order's judgement: the slot verdict and the judge's replies (one per attempt)."""

    verdict: str | None
    replies: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class PairJudgement:
    outcome: str  # first | second | tie | inconsistent | unparsed
    ab: OrderVerdict  # first response shown as A
    ba: OrderVerdict  # second response shown as A
    judge: str = ""  # the judge's model name

    @property
    def preferred(self) -> int | None:
        """0 (first) or 1 (second) when the pair is a preference, else None."""
        return {"first": 0, "second": 1}.get(self.outcome)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairwiseJudge:
    """Asks `backend` for a verdict on a pair in both orders and combines them.

    parse_retries: when a reply has no verdict line, ask again that many times (the reply
    stays in the conversation and a short follow-up asks for only the verdict line).
    max_tokens / temperature / seed: per-request settings; None = the backend's defaults.
    """

    backend: ChatBackend
    rubric: str = DEFAULT_RUBRIC
    parse_retries: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    _settings: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rubric = self.rubric.strip() or DEFAULT_RUBRIC
        self._settings = {"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed}

    def verdict(self, prompt_turns: list[dict[str, str]], response_a: str, response_b: str,
                tools: list[dict] | None = None) -> OrderVerdict:
        """One order: `response_a` shown first; `tools`: the row's tool definitions, if any."""
        messages = judge_messages(prompt_turns, response_a, response_b, self.rubric, tools)
        result = OrderVerdict(None, [])
        for attempt in range(self.parse_retries + 1):
            reply = self.backend.chat(messages, **self._settings)
            result.replies.append(reply.text)
            result.prompt_tokens += reply.prompt_tokens
            result.completion_tokens += reply.completion_tokens
            result.verdict = parse_verdict(reply.text)
            if result.verdict is not None:
                break
            messages = [*messages, {"role": "assistant", "content": reply.text},
                        {"role": "user", "content": RETRY_PROMPT}]
        return result

    def judge(self, prompt_turns: list[dict[str, str]], first: str, second: str,
              tools: list[dict] | None = None) -> PairJudgement:
        """Both orders, combined into an outcome about `first` versus `second`; `tools`: the
        row's tool definitions, shown to the judge (`judge_messages`)."""
        ab = self.verdict(prompt_turns, first, second, tools)
        ba = self.verdict(prompt_turns, second, first, tools)
        return PairJudgement(combine_orders(ab.verdict, ba.verdict), ab, ba, self.backend.model_name)


def cohen_kappa(xs: list[str], ys: list[str]) -> float | None:
    """Cohen's kappa between two raters' labels of the same items (here: the two orders' verdicts).

        κ = (p_o - p_e) / (1 - p_e),  p_o = share of items labelled alike,
        p_e = Σ_k p_x(k) · p_y(k)     (agreement expected by chance from each rater's label rates)

    1 = perfect agreement, 0 = no better than chance, < 0 = worse. None when undefined (no
    items, or p_e = 1: both raters always gave one and the same label).
    """
    if len(xs) != len(ys):
        raise ValueError(f"need labels for the same items, got {len(xs)} and {len(ys)}")
    n = len(xs)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(xs, ys)) / n
    expected = sum((xs.count(k) / n) * (ys.count(k) / n) for k in set(xs) | set(ys))
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)
