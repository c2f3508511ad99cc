"""Rewards for (prompt, response) pairs: trained reward models, Python functions, and weighted mixes.

A reward is any callable `reward(prompts, responses) -> list[float]`, prompts being chat
turn lists; one that also takes `rows=` gets each prompt's row (its reference `answer` and
other fields) for verification. `RewardModelScorer` wraps a trained reward model
(`posttrain rm`); `function_reward("pkg.module:fn")` imports a plain function
`fn(prompt, response) -> float` or `fn(prompt, response, row) -> float` (a format check, an
exact-match verifier), or a static or class method, "pkg.module:Class.method". Built in:
`exact_match` (against the row's answer, surrounding whitespace trimmed, case-sensitive; a worked
answer, GSM8K's "... #### 72" or MATH's \\boxed{...}, by its final answer), `math_answer` (the
response's final answer, numbers compared as numbers) and `format_reward`.

A reward function is called with Python's `random`, numpy's global RNG (when numpy is imported)
and torch's CPU generator seeded from its spec, the (prompt, response) it scores and the seed a
caller may set with `reward_seed` (0 unless set), and the caller's RNG states are put back after
the batch. A function that draws random numbers so gives the same value for the same response
whatever batch, process or resumed run scores it, and its draws move no other random stream.

Several objectives (helpfulness, harmlessness, length, ...) combine into one score the RL
stage can maximise, the weighted-sum scalarisation of the multi-objective problem
min_θ [L₁(θ), ..., L_k(θ)]:

    total = Σ_i w_i · (r_i − shift_i) / scale_i − penalty · Σ_i max(0, floor_i − r_i) / scale_i

`calibrate` sets shift/scale to each component's mean/std (the sample std, n − 1) on sample
data so weights compare objectives on one scale; a `floor` turns an objective into a soft
constraint (maximise the rest subject to r_i ≥ floor_i) by a penalty: the floor is read in the
component's raw units and its shortfall divided by the component's scale, as the weighted terms
are, so `penalty` (default 10, `posttrain score --floor-penalty`) is the cost of each std below
the floor under calibration, of each raw unit without it. `pareto_front` finds the candidates no
other candidate dominates (≥ on every objective, > on one), to see the trade-off before choosing
weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import inspect
import math
import os
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from posttrain.config.rl import DEFAULT_FLOOR_PENALTY, check_floor_penalty, check_max_length
from posttrain.errors import ConfigError, DataError, UserError

Reward = Callable[[Sequence[list[dict]], Sequence[str]], list[float]]
_FLOAT32_MAX = torch.finfo(torch.float32).max  # 3.4028235e38: a run's rewards are float32
class RewardModelScorer:
    """Scores with a reward model directory (full model or LoRA adapter, or a run directory: its
    final/) and its tokenizer. A model without a trained reward head (a policy, a preset) is
    refused: its head would be a fresh random draw.

    A row longer than the model's positions (`loading.position_limit`; for a model whose config
    names no table, ALiBi's, its tokenizer's `model_max_length`, else 1024), or than `max_length`
    when one is given, is cut to fit: a decoder keeps its end (the scored token is the last), an
    encoder its start (it pools at [CLS]) and its closing special tokens ([SEP], as its tokenizer's
    own truncation keeps them), losing content only. `rows_cut` of `rows_scored` counts them over the
    scorer's life (`cut_note`). Loaded in bfloat16 or float16 (`dtype`), the body runs in that dtype
    and the head in float32, as saved (`reward_model.heads_in_float32`)."""

    def __init__(self, path: str, template: str = "auto", batch_size: int = 32, dtype: str = "float32",
                 trust_remote_code: bool = False, max_length: int | None = None, device=None, log=None):
        from posttrain.data.preferences import special_tokens_around
        from posttrain.data.templates import resolve_template
        from posttrain.inference import resolve_model_dir
        from posttrain.models.attention import padding_free
        from posttrain.models.loading import load_tokenizer
        from posttrain.models.reward_model import (_classifier, check_trained_head, heads_in_float32,
                                                   is_decoder_scorer, load_reward_model)

        if max_length is not None:
            check_max_length(max_length)
        path = self.path = resolve_model_dir(str(path))  # a run directory: its final/, as generate and merge take it
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        # every row is cut to fit here (`_cut`, said by `cut_note`): transformers' warning that a long row
        # "will result in indexing errors" would say the opposite (the flag its tokenizers check to warn once)
        warned = getattr(self.tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True
        self.model = load_reward_model(path, dtype, trust_remote_code, pad_token_id=self.tokenizer.pad_token_id).eval()
        check_trained_head(self.model, path)  # a policy's fresh head would score at random, silently
        heads_in_float32(self.model, path)  # a bf16 body, a float32 head: rewards not rounded to bf16
        if device is not None:
            self.model.to(device)
        self.template = resolve_template(self.tokenizer, template, "--template")  # set by score's flag only
        self.decoder = is_decoder_scorer(self.model)
        self.closing = 0 if self.decoder else len(special_tokens_around(self.tokenizer)[1])  # [SEP]: kept on a cut
        limit = _tokens_read(self.model, self.tokenizer)  # no model reads past its position table
        self.batch_size, self.max_length = batch_size, limit if max_length is None else min(max_length, limit)
        self.rows_cut = self.rows_scored = 0
        if self.decoder:  # the real tokens only, the last layer at the last one (exact); `log` hears why not
            padding_free(_classifier(self.model), log=log, longest=self.max_length,
                         option=f"padding-free scoring with the reward model {path}")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[list[dict]], responses: Sequence[str], rows=None) -> list[float]:
        from posttrain.data.batching import collate
        from posttrain.data.preferences import encode_response
        from posttrain.models.reward_model import score

        tools = [None] * len(responses) if rows is None else [row.get("tools") or None for row in rows]
        examples = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:  # a row's tools rendered as `posttrain rm` trained on them
                examples.append(encode_response(prompt, response, self.tokenizer, self.template, self.path,
                                                special_tokens=not self.decoder, tools=tools[i]))
            except DataError as exc:  # a row the template cannot render: named by its caller (`rows_named`)
                raise RewardFunctionError(self.path, exc, i, len(responses)) from exc
        self.rows_scored += len(examples)
        self.rows_cut += sum(len(e) > self.max_length for e in examples)
        for e in examples:
            if len(e) > self.max_length:  # assigned: Example reads as copies
                e.input_ids, e.labels = self._cut(e.input_ids), self._cut(e.labels)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(examples), self.batch_size):
            batch = collate(examples[start : start + self.batch_size], self.tokenizer.pad_token_id)
            out += score(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        return out

    def _cut(self, values: list[int]) -> list[int]:
        """A row's ids (or labels) cut to `max_length`: a decoder's last ones (the scored position
        is the last token); an encoder's first ones ([CLS], where it pools) and its `closing`
        special tokens ([SEP]), while the cut leaves it some content — training's cut
        (`preferences.cut`)."""
        from posttrain.data.preferences import cut

        if self.decoder:
            return values[len(values) - self.max_length :]
        return cut(values, self.max_length, self.closing)

    def cut_note(self) -> str | None:
        """'cut N of M rows longer than L tokens (kept their end)', or None when none was cut."""
        if not self.rows_cut:
            return None
        kept = "end" if self.decoder else "start"
        return (f"cut {self.rows_cut} of {self.rows_scored} rows longer than {self.max_length} tokens "
                f"(kept their {kept})")


_NO_TABLE_LIMIT = 1024  # the tokens a reward model reads when neither its config nor its tokenizer says


def _tokens_read(model, tokenizer) -> int:
    """How many tokens a reward model reads by default: its positions (`loading.position_limit`),
    or for a model whose config names no table (ALiBi: Bloom, MPT) its tokenizer's
    `model_max_length` when the tokenizer sets one (transformers' unset value is 1e30), else 1024."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    from posttrain.models.loading import position_limit

    limit = position_limit(model)
    if limit is not None:
        return limit
    told = getattr(tokenizer, "model_max_length", None)
    if isinstance(told, int) and not isinstance(told, bool) and 0 < told < VERY_LARGE_INTEGER:
        return told
    return _NO_TABLE_LIMIT


def function_reward(spec: str) -> Reward:
    """'package.module:function' → a batch reward from `function(prompt_turns, response) -> float`
    or, when the function takes a third argument, `function(prompt_turns, response, row)`. After
    the colon a dotted path names an attribute of an attribute ('module:Class.method': a
    staticmethod or classmethod; a plain method would need an instance). The module is looked
    for in the working directory too (last), as `python -m posttrain` looks first: the
    `posttrain` command's own path holds its bin directory instead. Each call draws from seeded
    RNGs (`_seeded_rngs`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward function {spec!r} must look like package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        owner, fn = None, importlib.import_module(module_name)
        for part in attr.split("."):
            owner, fn = fn, getattr(fn, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward function {spec!r} cannot be imported: {exc}") from None
    except Exception as exc:  # a syntax error in the module, or one it raises as it runs
        raise ConfigError(f"reward function {spec!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    if not callable(fn):  # a constant or a module: inspect cannot read it, and the first rollout would fail
        raise ConfigError(f"reward function {spec!r} names {_shown(fn)} ({type(fn).__name__}), not a function")
    if inspect.isclass(owner) and inspect.isfunction(inspect.getattr_static(owner, part, None)):
        raise ConfigError(f"reward function {spec!r} is a method of {owner.__name__} that needs an instance "
                          "(its first argument, self, would be the prompt): make it a staticmethod or a "
                          "classmethod, or name a module-level function")
    _check_signature(fn, spec)

    def each(args: list[tuple]) -> list:  # values checked, with the component's name, by `_checked`
        out = []
        with _seeded_rngs() as seed:
            for i, arg in enumerate(args):
                seed(spec, arg[0], arg[1])
                try:
                    out.append(fn(*arg))
                except Exception as exc:  # noqa: BLE001 (the user's code: said as a one-line error naming it)
                    raise RewardFunctionError(spec, exc, i, len(args)) from exc
        return out

    if _positional_arity(fn) >= 3:
        def reward(prompts, responses, rows=None):
            rows = rows if rows is not None else [{}] * len(responses)
            return each(list(zip(prompts, responses, rows)))
    else:
        def reward(prompts, responses, rows=None):
            return each(list(zip(prompts, responses)))
    reward.row_keys = tuple(getattr(fn, "row_keys", ()))  # what it reads of every row: checked once they are read
    return reward


_REWARD_SEED: contextvars.ContextVar[int] = contextvars.ContextVar("posttrain_reward_seed", default=0)


@contextlib.contextmanager
def reward_seed(seed: int) -> Iterator[None]:
    """Around a batch's scoring: `seed` (an RL rollout's, from the run seed, epoch and rollout)
    enters the seeds reward functions draw with, so one response draws apart in another rollout
    or run, and alike when a resumed run scores it again."""
    token = _REWARD_SEED.set(int(seed))
    try:
        yield
    finally:
        _REWARD_SEED.reset(token)


@contextlib.contextmanager
def _seeded_rngs() -> Iterator[Callable[..., None]]:
    """Yields `seed(*key)`, which seeds Python's `random`, numpy's global RNG (when numpy is
    imported) and torch's CPU generator from a 64-bit hash of `key` (its repr) and the seed
    `reward_seed` set; the caller's states are put back on leaving. Determined by `key`, not by
    what was drawn before, so a value does not depend on the batch, the process or a resume."""
    numpy = sys.modules.get("numpy")
    saved = random.getstate(), numpy.random.get_state() if numpy else None, torch.get_rng_state()

    def seed(*key) -> None:
        value = int.from_bytes(hashlib.blake2b(repr((_REWARD_SEED.get(), key)).encode(), digest_size=8).digest(),
                               "little")
        random.seed(value)
        if numpy:
            numpy.random.seed(value % 2**32)
        torch.default_generator.manual_seed(value)

    try:
        yield seed
    finally:
        random.setstate(saved[0])
        if numpy:
            numpy.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class RewardFunctionError(DataError):
    """A reward failed on one response: it raised `error`, or (`error` None) returned `value`, not
    a finite number within float32's range. Said in one line with the reward's name (the spec, or
    the component's name once `_checked` knows it) and the response: its row's file:line
    (`where`) once the caller knows it (`rows_named`), else its place in the batch (`index`,
    0-based, of `count`)."""

    def __init__(self, name: str, error: Exception | None, index: int, count: int, where: str | None = None,
                 value: float | None = None):
        self.name, self.error, self.index, self.count, self.where = name, error, index, count, where
        self.value = value
        if error is None:
            said, at = f" returned {value}", f" for response {index + 1} (of {count})"
            rule = f"; rewards must be finite numbers within float32's range (|r| <= {_FLOAT32_MAX:.7g})"
        else:
            said = f": {error}" if isinstance(error, UserError) else f" raised {type(error).__name__}: {error}"
            at, rule = f" (on response {index + 1} of {count})", ""
        message = f"reward {name!r}{said}"
        super().__init__(f"{where}: {message}{rule}" if where else f"{message}{at}{rule}")

    def named(self, name: str | None = None, where: str | None = None) -> RewardFunctionError:
        return RewardFunctionError(name or self.name, self.error, self.index, self.count, where or self.where,
                                   self.value)


@contextlib.contextmanager
def rows_named(locations: Sequence[str]) -> Iterator[None]:
    """Around a reward's call on a batch of responses: one it fails on (a `RewardFunctionError`)
    is said with its row's file:line, `locations[i]` for response i, not its place in the batch."""
    try:
        yield
    except RewardFunctionError as exc:
        if exc.count != len(locations):  # raised over some other batch (a reward calling another): as it is
            raise
        raise exc.named(where=locations[exc.index]) from exc.error


def _check_signature(fn, spec: str) -> None:
    """Refuse, before any model loads, a function posttrain cannot call per sample: one that
    cannot take (prompt_turns, response), or a batch function in TRL's style, fn(completions,
    **kwargs) or fn(prompts, completions, **kwargs), whose lists a per-sample call would feed
    one string at a time."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to read, called as it is
        return
    trl = "completions" in signature.parameters  # TRL's name for the batch of responses
    try:  # the call `function_reward` makes: with the row when the function takes a third argument
        signature.bind(*[None] * (3 if _positional_arity(fn) >= 3 else 2))
        fits = True
    except TypeError:
        fits = False
    if trl or not fits:
        raise ConfigError(f"reward function {spec!r} takes {signature}: posttrain calls it once per sample as "
                          "fn(prompt_turns, response) -> float, or fn(prompt_turns, response, row) -> float to "
                          "read the prompt row's 'answer' and other fields"
                          + (" (a TRL-style batch function fn(completions, **kwargs) needs a per-sample wrapper)"
                             if trl else ""))


def _positional_arity(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in params) + (3 if any(p.kind is p.VAR_POSITIONAL for p in params) else 0)


def _checked(component: RewardComponent, prompts, responses, rows) -> list[float]:
    """A component's values: one finite number per response, or an error naming it (a NaN would
    turn a total, a calibration mean and every row's score into NaN; a short or long list would
    shift every row's score). Finite means within float32's range: a run's rewards are float32,
    where 1e39 is inf and a group's advantages inf − inf = NaN."""
    try:
        returned = _call(component.reward, prompts, responses, rows)
    except RewardFunctionError as exc:  # say the component's name, not its module path
        raise exc.named(component.name) from exc.error
    try:
        if isinstance(returned, (str, bytes)) or any(isinstance(v, (str, bytes)) for v in returned):
            raise TypeError("text is not a reward")
        values = [float(v) for v in returned]
    except (TypeError, ValueError):
        raise DataError(f"reward {component.name!r} returned {_shown(returned)}; a reward returns one number per "
                        "response") from None
    if len(values) != len(responses):
        raise DataError(f"reward {component.name!r} returned {len(values)} values for {len(responses)} responses")
    bad = next((i for i, v in enumerate(values) if not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX)), None)
    if bad is not None:
        raise RewardFunctionError(component.name, None, bad, len(responses), value=values[bad])
    return values


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _call(reward: Reward, prompts, responses, rows) -> list[float]:
    """Call a reward, passing the prompt rows only to rewards that take them."""
    if rows is not None and "rows" in inspect.signature(reward).parameters:
        return reward(prompts, responses, rows=rows)
    return reward(prompts, responses)


# --------------------------------------------------------------------------- verifiable rewards


def _reference(row: dict, reward: str) -> str:
    """The row's reference answer, read as a prompt row's is (`data.prompts.reference_answer`): a
    number as the file writes it (2.50, 1e3), a boolean as JSON spells it (true), MATH's
    `solution` where the row gives no `answer`; a DataError naming `reward` when it has none."""
    from posttrain.data.formats import BadRowError
    from posttrain.data.prompts import reference_answer

    try:
        answer = reference_answer(row)
    except BadRowError as exc:
        raise DataError(exc.reason) from None
    if answer is None:
        raise DataError(f"the {reward} reward needs an 'answer' in every prompt row")
    return answer


def exact_match(prompt: list[dict], response: str, row: dict) -> float:
    """1.0 when the response equals the row's reference 'answer' (surrounding whitespace trimmed,
    otherwise as written: case-sensitive), else 0.0. A reference that marks a final answer, GSM8K's
    "... #### 72" or MATH's \\boxed{...} (`data.synthetic.final_answer`), is compared by it, with
    the response's own marked answer when it marks one, else the whole response: the rule of
    `data.synthetic.answer_matches`, as `posttrain evaluate`'s exact match. The answer is read as a
    prompt row's is (`_reference`), so `posttrain score`'s rows compare as RL's prompt rows do."""
    from posttrain.data.synthetic import answer_matches

    return float(answer_matches(response, _reference(row, "exact_match")))


exact_match.row_keys = ("answer",)  # a row without one is named by file:line before training (`missing_row_key`)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"(?:(?<![\w)])[-+])?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")  # a sign not after 5 or x: 5-3 is 5, 3
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _response_answer(response: str, numeric: bool) -> str:
    """The answer a response gives, trimmed: in the content of its last <answer>...</answer>
    (R1-Zero's tags) when it has one, else in all of it, the marked final answer
    (`data.synthetic.final_answer`: the last \\boxed{...}, or the text after "####"), else, when
    the reference is a number (`numeric`), the last number ("The answer is 72." gives 72), else
    all of it."""
    from posttrain.data.synthetic import final_answer

    tagged = _ANSWER_TAG.findall(response)
    text = tagged[-1] if tagged else response
    marked = final_answer(text)
    if marked is not None:
        return marked
    if numeric and (numbers := _NUMBER.findall(text)):
        return numbers[-1].rstrip(",")
    return text.strip()


def _as_number(text: str):
    """`text` as an exact number (a Fraction) when it is a plain decimal, thousands separators
    removed (1,000 → 1000; 72.0 = 72); else None (a run of digits past Python's int conversion
    limit, 4,300, too: compared as text)."""
    from fractions import Fraction

    text = text.strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except ValueError:
        return None


def math_answer(prompt: list[dict], response: str, row: dict) -> float:
    """1.0 when the response's final answer equals the row's reference answer, else 0.0. The
    reference's: its marked final answer (GSM8K's "#### 72", MATH's \\boxed{...};
    `data.synthetic.final_answer`), else all of it. The response's (`_response_answer`): in its
    last <answer>...</answer>, else in all of it, the last \\boxed{...}, else the text after
    "####", else (a number asked for) the last number, else all of it. Two numbers compare as
    numbers, thousands separators and trailing zeros aside (72.0 = 72, 1,000 = 1000); anything
    else as text, surrounding whitespace trimmed (\\frac{3}{4} is neither 0.75 nor \\dfrac{3}{4})."""
    from posttrain.data.synthetic import final_answer

    reference = _reference(row, "math_answer")
    expected = final_answer(reference)
    expected = reference.strip() if expected is None else expected
    number = _as_number(expected)
    given = _response_answer(response, numeric=number is not None)
    if number is not None and (other := _as_number(given)) is not None:
        return float(other == number)
    return float(given == expected)


math_answer.row_keys = ("answer",)


def missing_row_key(rewards: dict[str, Reward], records) -> str | None:
    """The first record (a `data.prompts.PromptRecord`) lacking a key that one of `rewards`
    reads (their `row_keys`), said in one line with its file:line; None when every row has them."""
    for name, reward in rewards.items():
        for key in getattr(reward, "row_keys", ()):
            for record in records:
                if record.reward_row().get(key) is None:
                    other = ", ".join(map(str, record.fields)) or "none"
                    article = "an" if key[:1].lower() in "aeiou" else "a"
                    return (f"{record.source}: the reward {name!r} needs {article} {key!r} in every prompt row, and "
                            f"this row has none (its fields besides the prompt: {other}); add {key!r} to every row "
                            f"(a reference answer under another name, e.g. 'target', renamed), or use a reward "
                            "that does not read it")
    return None


def format_reward(pattern: str) -> Reward:
    """1.0 for responses that match `pattern` in full (Python regex), else 0.0."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"format regex {pattern!r} is not valid: {exc}") from None
    return lambda prompts, responses, rows=None: [float(compiled.fullmatch(r.strip()) is not None) for r in responses]


@dataclass
class RewardComponent:
    name: str
    reward: Reward
    weight: float = 1.0
    shift: float = 0.0  # subtracted before weighting (set by calibrate: the mean)
    scale: float = 1.0  # divided by before weighting (set by calibrate: the std)
    floor: float | None = None  # soft constraint on the raw reward: r >= floor


class CombinedReward:
    """One score from several rewards; returns the total and every component's raw score.
    `penalty`: what a floor's shortfall costs, per unit of its component's scale (the module's
    formula)."""

    def __init__(self, components: list[RewardComponent], penalty: float = DEFAULT_FLOOR_PENALTY):
        check_floor_penalty(penalty)
        names = [c.name for c in components]
        if not components:
            raise ConfigError("no reward components: give at least one reward")
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            also = " (reward.format_regex's component is named 'format')" if twice == "format" else ""
            raise ConfigError(f"reward components need distinct names: {twice!r} names two of {names}{also}")
        self.components, self.penalty = components, penalty

    def raw(self, prompts: Sequence[list[dict]], responses: Sequence[str], rows=None) -> dict[str, list[float]]:
        """Every component's raw values, each component run once over the responses."""
        return {c.name: _checked(c, prompts, responses, rows) for c in self.components}

    def calibrate(self, prompts: Sequence[list[dict]], responses: Sequence[str],
                  rows=None) -> dict[str, tuple[float, float]]:
        """Set each component's shift/scale to its mean/std (the sample std, n − 1) on these
        samples (std 0, or a single sample → 1)."""
        return self.calibrate_on(self.raw(prompts, responses, rows))

    def calibrate_on(self, raw: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
        """`calibrate` from raw values already computed (`raw`): scoring a file with --calibrate
        needs each component's values once, for both the mean/std and the totals."""
        stats = {}
        for c in self.components:
            std = sample_std(raw[c.name])
            c.shift, c.scale = float(torch.tensor(raw[c.name], dtype=torch.float64).mean()), std if std else 1.0
            stats[c.name] = (c.shift, c.scale)
        return stats

    def score(self, prompts: Sequence[list[dict]], responses: Sequence[str],
              rows=None) -> tuple[list[float], dict[str, list[float]]]:
        raw = self.raw(prompts, responses, rows)
        return self.totals(raw), raw

    def totals(self, raw: dict[str, list[float]]) -> list[float]:
        """The weighted, floored total of each row's raw component values:
        Σ_i w_i · (r_i − shift_i) / scale_i − penalty · Σ_i max(0, floor_i − r_i) / scale_i."""
        count = len(raw[self.components[0].name])
        totals = []
        for i in range(count):
            total = 0.0
            for c in self.components:
                r = raw[c.name][i]
                total += c.weight * (r - c.shift) / c.scale
                if c.floor is not None:
                    total -= self.penalty * max(0.0, c.floor - r) / c.scale
            totals.append(total)
        return totals

    def __call__(self, prompts, responses, rows=None) -> list[float]:
        return self.score(prompts, responses, rows)[0]


def sample_std(values: Sequence[float]) -> float | None:
    """The sample standard deviation (n − 1) of `values`, in float64; None for fewer than two,
    where it is undefined. `calibrate`'s scale, which falls back to 1 where this is 0 or None."""
    if len(values) < 2:
        return None
    return float(torch.tensor(values, dtype=torch.float64).std())


def pareto_front(points: torch.Tensor) -> list[int]:
    """Indices of the rows of `points` (N, k), higher = better on every column, that no other
    row dominates (≥ on all objectives and > on one)."""
    n = points.shape[0]
    ge = (points[:, None, :] >= points[None, :, :]).all(-1)  # (N, N): j ≥ i everywhere, read as ge[j, i]
    gt = (points[:, None, :] > points[None, :, :]).any(-1)
    dominated = (ge & gt).any(0)  # some j dominates i
    return [i for i in range(n) if not bool(dominated[i])]


# --------------------------------------------------------------------------- posttrain score


def _pairs_option(values: list[str], what: str, repeat: bool = True) -> dict[str, str]:
    """NAME=VALUE options; a repeated NAME keeps its last value, or with repeat=False is refused."""
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{what} {item!r} must look like NAME=VALUE")
        if not repeat and name in out:
            raise ConfigError(f"{what}: two components named {name!r}; give each its own name")
        out[name] = value
    return out


def model_component(i: int, item: str, count: int) -> tuple[str, str]:
    """(name, directory) of reward model `item`, the i-th of `count`: 'NAME=DIR', or a plain DIR
    named reward_model (rm0, rm1, ... when there are several)."""
    name, sep, path = item.partition("=")
    if not sep or os.sep in name or os.path.exists(item):  # a directory whose path holds '=' is a path
        name, path = f"rm{i}" if count > 1 else "reward_model", item
    return name, path


def build_combined(models: list[str], functions: list[str], weights: list[str], floors: list[str],
                   template: str = "auto", batch_size: int = 32, device=None, log=None,
                   functions_option: str = "--function", extra: Sequence[RewardComponent] = (),
                   max_length: int | None = None, floor_penalty: float = DEFAULT_FLOOR_PENALTY,
                   dtype: str = "float32", trust_remote_code: bool = False) -> CombinedReward:
    """The reward of `posttrain score`: models 'DIR' or 'NAME=DIR', functions 'NAME=module:fn'.
    template: how reward models render a conversation ("auto": each one's own saved template);
    dtype, trust_remote_code: how reward models are loaded (`RewardModelScorer`);
    max_length: the most tokens a reward model reads (None: its position table);
    floor_penalty: `CombinedReward`'s penalty;
    log: hears a reward model's notes (one that cannot score padding-free says why);
    functions_option: what errors call `functions` (a config's reward.functions, score's --function);
    extra: components after those (RL's format check)."""
    components = []
    for i, item in enumerate(models):
        name, path = model_component(i, item, len(models))
        components.append(RewardComponent(name, RewardModelScorer(path, template, batch_size, dtype=dtype,
                                                                  trust_remote_code=trust_remote_code,
                                                                  max_length=max_length, device=device, log=log)))
    for name, spec in _pairs_option(functions, functions_option, repeat=False).items():
        components.append(RewardComponent(name, function_reward(spec)))
    components += extra
    set_by_name(components, weights, "--weight", "weight")
    set_by_name(components, floors, "--floor", "floor")
    return CombinedReward(components, floor_penalty)


def set_by_name(components: list[RewardComponent], items: list[str], option: str, field: str) -> None:
    """Apply 'NAME=number' items to the named components' `field` (weight or floor); an unknown
    name or a value that is not a finite number is a ConfigError naming `option`."""
    by_name = {c.name: c for c in components}
    for name, value in _pairs_option(items, option).items():
        if name not in by_name:
            raise ConfigError(f"{option} {name}=...: no reward named {name} (have {', '.join(by_name)})")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{option} {name}={value}: not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{option} {name}={value}: must be a finite number")
        setattr(by_name[name], field, number)


def _read_scoring_rows(path: str) -> tuple[list[dict], list[list[dict]], list[str], list[str], list[dict]]:
    """(rows as given, their prompts, responses, file:line places, the rows rewards get): a row is a
    prompt row read as generate and RL read one (`inference.prompt_record`: 'prompt' text or turns
    and a 'system', a 'messages' conversation asked after its last answer, a question under
    'question' / 'problem', alpaca's 'instruction'; its 'tools') and its 'response' (or 'completion':
    generate's output rows score as they are). A reward gets the row as RL hands it a prompt row's
    (`PromptRecord.reward_row`, over the row as given): its reference answer as text and its tools
    read. file:line on a bad row."""
    from posttrain.data.formats import BadRowError
    from posttrain.data.preferences import to_preference_record
    from posttrain.data.readers import strict_rows
    from posttrain.errors import DataError
    from posttrain.inference import prompt_record

    rows, prompts, responses, locations, handed = [], [], [], [], []
    for location, row in strict_rows(path):
        if not isinstance(row, dict) or ("response" not in row and "completion" not in row):
            raise DataError(f"{location}: needs 'prompt' and 'response' (or 'completion'; the prompt also as a "
                            "prompt row generate reads: 'messages', 'question', 'problem', 'instruction')")
        field = "response" if "response" in row else "completion"
        record = prompt_record(row, location)
        try:
            response = to_preference_record({"prompt": record.prompt, "completion": row[field], "label": True},
                                            "unpaired", location).responses[0]
        except BadRowError as exc:  # the reader calls the response 'completion': say the row's own name
            raise DataError(f"{location}: {exc.reason.replace(repr('completion'), repr(field))}") from None
        rows.append(row)
        handed.append({**row, **{key: value for key, value in record.reward_row().items() if value is not None}})
        prompts.append(record.prompt)
        responses.append(response)
        locations.append(location)
    return rows, prompts, responses, locations, handed


def score_main(args) -> int:
    """`posttrain score`: add a reward column (and one per component when several) to a file of rows."""
    import json
    from pathlib import Path

    from posttrain.inference import Progress, RowWriter, check_output_path

    if not args.model and not args.function:
        raise ConfigError("give at least one --model reward model or --function reward")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_length is not None:
        check_max_length(args.max_length, "--max-length")
        if not args.model:
            raise ConfigError("--max-length is the most tokens a reward model reads; give a --model, or drop it")
    penalty = DEFAULT_FLOOR_PENALTY if args.floor_penalty is None else args.floor_penalty
    check_floor_penalty(penalty, "--floor-penalty")
    check_output_path(args.output)  # before any model loads or row is scored
    if Path(args.output).suffix.lower() in (".csv", ".tsv", ".parquet"):  # read back as that format: no rows
        raise ConfigError(f"--output {args.output}: score writes JSON Lines: give a .jsonl name")
    rows, prompts, responses, locations, handed = _read_scoring_rows(args.input)  # a bad row too
    if not rows:
        raise DataError(f"{args.input}: no rows to score (an empty file, or only blank lines)")
    quiet = contextlib.redirect_stdout(sys.stderr)  # stdout may be the output: a reward's print() goes to stderr
    with quiet:
        combined = build_combined(args.model, args.function, args.weight, args.floor, args.template,
                                  args.batch_size, log=lambda line: print(line, file=sys.stderr),
                                  max_length=args.max_length, floor_penalty=penalty, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    written = [args.column] + ([f"{args.column}_{c.name}" for c in combined.components]
                               if len(combined.components) > 1 else [])
    for row, location in zip(rows, locations):
        taken = [column for column in written if column in row]
        if taken:
            raise ConfigError(f"{location}: the row already has a {taken[0]!r} column, which scoring would overwrite; "
                              "name the new column with --column")
    several = len(combined.components) > 1

    def line(i: int, raw: dict[str, list[float]], totals: list[float], at: int) -> str:
        """Row `i`'s output line from the values of the rows from `at` (raw, totals)."""
        extra = {f"{args.column}_{name}": values[i - at] for name, values in raw.items()} if several else {}
        return json.dumps(rows[i] | extra | {args.column: totals[i - at]}, ensure_ascii=False) + "\n"

    # Scored a batch at a time, each batch's rows written as it is done (RowWriter); --calibrate
    # needs every row's values before any total, so its rows are written at the end.
    progress = Progress(len(rows), "score") if args.calibrate else None
    with RowWriter(args.output, len(rows), None if args.calibrate else "score") as out:
        raw: dict[str, list[float]] = {c.name: [] for c in combined.components}
        for start in range(0, len(rows), args.batch_size):
            end = min(start + args.batch_size, len(rows))
            with rows_named(locations[start:end]), quiet:  # the row a reward failed on, by file:line
                done = combined.raw(prompts[start:end], responses[start:end], handed[start:end])
            if progress is not None:
                for name, values in done.items():
                    raw[name] += values
                progress.advance(end - start)
                continue
            totals = combined.totals(done)
            for i in range(start, end):
                out.put(i, line(i, done, totals, start))
        for component in combined.components:  # a row cut to fit a reward model loses content: say how many
            note = component.reward.cut_note() if isinstance(component.reward, RewardModelScorer) else None
            if note is not None:
                print(f"{component.name}: {note}", file=sys.stderr)
        if progress is not None:  # on the values just computed: each component runs once per row
            for name, (mean, _) in combined.calibrate_on(raw).items():
                std = sample_std(raw[name])  # as measured; the scale falls back to 1 where it is 0 or undefined
                said = f"std {std:.4g}" if std else ("std 0 (every value equal)" if std == 0 else
                                                     "std undefined (one row)")
                fell = "" if std else "; scale 1 (nothing to divide by: the values only shifted by their mean)"
                print(f"calibrated {name}: mean {mean:.4g}, {said}{fell}", file=sys.stderr)
            totals = combined.totals(raw)
            for i in range(len(rows)):
                out.put(i, line(i, raw, totals, 0))
    if args.output != "-":
        print(f"scored {len(rows)} rows into {args.output} (column {args.column!r})", file=sys.stderr)
    return 0
