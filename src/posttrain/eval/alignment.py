"""`posttrain evaluate`: one alignment report for a policy, side by side with its reference.

For every held-out prompt both models answer greedily; the report then gives, per model:

    exact_match      the greedy answer equals the prompt's reference answer (a worked reference, GSM8K's
                     "... #### 72" or MATH's \\boxed{...}, by its final answer: `synthetic.answer_matches`,
                     as the exact_match reward): a rate over the prompts with one, {n, successes, rate,
                     ci95} with its Wilson interval
    answer_nll       mean negative log-likelihood per token of the reference answers, and its
                     perplexity exp(nll): how well the model predicts the known-good answer
    reward           the configured rewards of the greedy answers: mean and standard error
    response_tokens  mean greedy response length (length is the usual way a reward is gamed)
    redteam          attack success and over-refusal (safety.redteam, posttrain redteam's figures) on
                     safety.limit probes of each bundled suite, a fixed sample spread over its
                     categories, with the requests sent and those that failed (left out of n; the
                     command then exits 2, as redteam does: report.json's "failed" sums both models')

and, between them:

    kl_to_reference  E_{y~π}[Σ_t log π(y_t) − log π_ref(y_t)] over `samples` sampled responses per
                     prompt: a sampled estimate of KL(π‖π_ref) per response, at the sampling
                     temperature (the KL that RLHF's penalty bounds); needs one shared tokenizer.
                     Beside it: kl_se, its standard error, and kl_responses, the responses
    reward_win_rate  share of prompts where the policy's reward beats the reference's (ties half),
                     with the Wilson interval of wins / (wins + losses)
    judge_win_rate   the same from a pairwise LLM judge asked in both orders; a pair whose two
                     verdicts disagree is "inconsistent" (feedback/judge.py): left out of win_rate
                     and counted, and a tie in win_rate_inconsistent_as_ties (MT-bench's rule)

Prompts are asked, and reference answers scored, as the chat template renders them with the row's
`tools` (`templates.render`). A messages row whose last assistant turn carries more than text (tool
calls, reasoning) has no text reference answer (`formats.text_answer`, as for sft's exact match):
it is left out of exact match and the answer NLL, whose n says over how many prompts they are.

A policy that is an adapter directory, beside a reference that is its own recorded base (same
dtype, template and vocabulary), is loaded once: the reference is the policy model run with its
adapters switched off (`adapters_disabled()`), as dpo, grpo and ppo use it, not a second copy.

A combined report of this kind is built into none of the peer tools (ANCHORS.md).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config.schema import user_path
from posttrain.files import write_config
from posttrain.safety.metrics import proportion, wilson_interval


@dataclass
class Side:
    """One model and what it did on the prompts."""

    name: str
    path: str
    model: Any
    tokenizer: Any
    template: str
    prompt_ids: list[list[int]] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    # what every use of `model` runs inside: the adapters switched off for a reference that is the
    # policy's own base (`model` is then the policy's), else nothing
    switch: Callable[[], AbstractContextManager] = nullcontext


def mean_and_se(values: list[float]) -> dict:
    """Mean and its standard error s / sqrt(n) (s with n − 1); se is None below two values."""
    n = len(values)
    if not n:
        return {"mean": None, "se": None, "n": 0}
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"mean": mean, "se": se, "n": n}


def win_rate(outcomes: list[str]) -> dict:
    """From per-prompt outcomes "win" / "loss" / "tie" (others counted apart): the win rate with
    ties as half, (wins + ties / 2) / (wins + losses + ties), and the Wilson interval of
    wins / (wins + losses).

    A judge's "inconsistent" pairs (the two orders disagree: feedback/judge.py) are left out of
    that rate and counted ("inconsistent"); "win_rate_inconsistent_as_ties" counts them as ties
    instead, as MT-bench does (Zheng et al. 2023, Sec. 3.3): (wins + (ties + inconsistent) / 2) /
    (wins + losses + ties + inconsistent). A judge that only ever names one slot gets no win rate
    and 50% there. Other outcomes (no verdict: "unparsed") are in neither rate."""
    counts = Counter(outcomes)
    wins, losses, ties, inconsistent = counts["win"], counts["loss"], counts["tie"], counts["inconsistent"]
    decided = wins + losses + ties
    low, high = wilson_interval(wins, wins + losses)
    other = {name: n for name, n in sorted(counts.items()) if name not in ("win", "loss", "tie")}
    with_inconsistent = decided + inconsistent
    return {"win_rate": (wins + 0.5 * ties) / decided if decided else None, "wins": wins, "losses": losses,
            "ties": ties, "other": sum(other.values()), "other_by_kind": other, "ci95_decisive": [low, high],
            "inconsistent": inconsistent,
            "win_rate_inconsistent_as_ties": (wins + 0.5 * (ties + inconsistent)) / with_inconsistent
            if with_inconsistent else None}


def _load_side(name: str, path: str, cfg, records, log, policy: Side | None = None) -> tuple[Side, list]:
    """Load one side and encode the prompts for it. The reference (`policy` given) that is the
    policy's own base reuses the policy model with its adapters off; only its tokenizer loads."""
    from posttrain.data.prompts import encode_prompts
    from posttrain.data.templates import resolve_template
    from posttrain.errors import DataError
    from posttrain.inference import load_for_inference

    shared = _base_tokenizer(policy, path) if policy is not None else None
    if shared is not None:
        model, tokenizer, switch = policy.model, shared, policy.model.adapters_disabled
        log(f"evaluate: the reference {path} is the policy's own base: the policy model with its adapters "
            "switched off, not a second copy")
    else:
        (model, tokenizer), switch = load_for_inference(path, cfg.dtype), nullcontext
    side = Side(name, path, model, tokenizer, resolve_template(tokenizer, cfg.template), switch=switch)
    try:
        side.prompt_ids, kept = encode_prompts(records, tokenizer, side.template, cfg.prompts.max_prompt_length,
                                               log, name)
    except DataError:  # every prompt too long: say it with this command's option
        if name == "reference":
            _refuse_prompt_mismatch(len(records), 0)
        raise DataError(f"every prompt is longer than prompts.max_prompt_length={cfg.prompts.max_prompt_length} "
                        f"tokens with the {name}'s chat template; raise it") from None
    return side, kept


def _base_tokenizer(policy: Side, reference: str):
    """The reference's tokenizer when the reference is the base the policy's adapters were saved
    on (the same directory once resolved; dtype and template are evaluate's own, the same for
    both) and the policy model can switch its adapters off; None otherwise, and when the adapter's
    vocabulary differs from the base's (added tokens: the base's embeddings were resized)."""
    from posttrain.errors import UserError
    from posttrain.inference import resolve_model_dir
    from posttrain.models.adapters import is_adapter_dir
    from posttrain.models.adapters.io import read_layout
    from posttrain.models.loading import load_tokenizer, resolve_model_path

    adapter = resolve_model_dir(policy.path)
    if not hasattr(policy.model, "adapters_disabled") or not is_adapter_dir(adapter):
        return None
    try:
        base = resolve_model_path(read_layout(adapter)[0]).resolve()
        if base != resolve_model_path(resolve_model_dir(reference), "reference").resolve():
            return None
    except UserError:  # an adapter as the reference, a base that moved: loaded as given
        return None
    tokenizer = load_tokenizer(base)
    return tokenizer if tokenizer.get_vocab() == policy.tokenizer.get_vocab() else None


def _generate(side: Side, prompt_ids: list[list[int]], settings, batch_size: int) -> list[list[int]]:
    from posttrain.rollout.generate import eos_token_ids, generate_token_ids, pad_token_id

    eos = eos_token_ids(side.model, side.tokenizer, side.template)
    with side.switch():
        return generate_token_ids(side.model, prompt_ids, settings, pad_token_id=pad_token_id(side.tokenizer, eos),
                                  eos_token_ids=eos, batch_size=batch_size)


def _answer(side: Side, cfg) -> None:
    from posttrain.rollout.sampling import SamplingSettings

    ids = _generate(side, side.prompt_ids, SamplingSettings(max_new_tokens=cfg.generation.max_new_tokens,
                                                            temperature=0.0), cfg.generation.batch_size)
    side.responses = [side.tokenizer.decode(c, skip_special_tokens=True) for c in ids]
    side.figures["response_tokens"] = sum(map(len, ids)) / len(ids) if ids else 0.0


def _answer_figures(side: Side, records) -> None:
    """Exact match of the greedy answers (a rate over the prompts with an answer, with its Wilson
    interval; a worked reference compared by its final answer, `answer_matches`), and the NLL per
    token of the reference answers (the whole reference, its working included)."""
    import torch

    from posttrain.data.synthetic import answer_matches
    from posttrain.train.rollouts import collate_completions, completion_logps

    with_answer = [i for i, r in enumerate(records) if r.answer is not None]
    if not with_answer:
        return
    hits = [answer_matches(side.responses[i], str(records[i].answer)) for i in with_answer]
    side.figures["exact_match"] = proportion(sum(hits), len(hits))
    total, tokens = 0.0, 0
    for start in range(0, len(with_answer), 32):
        chunk = with_answer[start:start + 32]
        prompts, answers = zip(*(_answer_tokens(side, records[i]) for i in chunk))
        batch = collate_completions(list(prompts), list(answers), side.tokenizer.pad_token_id)
        with torch.no_grad(), side.switch():
            logps = completion_logps(side.model, batch)
        total -= float((logps * batch["response_mask"]).sum())
        tokens += int(batch["response_mask"].sum())
    side.figures["answer_nll"] = total / tokens
    side.figures["answer_perplexity"] = math.exp(total / tokens)


def _answer_tokens(side: Side, record) -> tuple[list[int], list[int]]:
    """(context, answer) token ids of the record's prompt answered with its reference answer, as
    the template renders and SFT tokenises them (`encode_response`): the answer's tokens are
    those after the prompt, as its turn writes them (after "[/INST]", SentencePiece's "h" not
    the "▁h" of the answer alone), its content only, not the end-of-turn marker. An empty
    answer, or one the template rewrites (not found in its turn), is scored on its whole turn,
    marker included. The row's tools are rendered as the prompt was asked with them; the prompt's
    own assistant turns are context (only the answer's span is computed)."""
    from posttrain.data.records import IGNORE_INDEX
    from posttrain.data.templates import assistant_spans, tokenize_with_labels

    answer = str(record.answer)
    messages = [*record.prompt, {"role": "assistant", "content": answer}]
    text, spans = assistant_spans(messages, side.tokenizer, side.template, record.source, len(record.prompt),
                                  tools=record.tools)
    lo, hi = spans[-1]
    at = text.find(answer.strip(), lo, hi) if answer.strip() else -1
    content = (lo, at + len(answer.strip())) if at != -1 else (lo, hi)
    ids, labels = tokenize_with_labels(side.tokenizer, text, [content])
    labelled = [k for k, label in enumerate(labels) if label != IGNORE_INDEX] or [len(ids) - 1]
    first, last = labelled[0], labelled[-1]
    return ids[:first], ids[first:last + 1]


def _reward_scorer(cfg, log):
    """The configured reward, built before any policy loads (a wrong name fails first), or None."""
    from posttrain.rewards import CombinedReward, build_combined, set_by_name

    r = cfg.reward
    if not (r.functions or r.models):
        return None
    combined = build_combined(r.models, r.functions, [], [], log=log, functions_option="reward.functions")
    set_by_name(combined.components, r.weights, "reward.weights", "weight")
    return CombinedReward(combined.components)


def _rewards(sides: list[Side], records, score) -> list[list[float]] | None:
    """Each side's rewards; a reward failing on an answer is said with its prompt row's file:line."""
    from posttrain.rewards import rows_named

    if score is None:
        return None
    totals = []
    for side in sides:
        with rows_named([x.source for x in records]):
            values = score([x.prompt for x in records], side.responses, [x.reward_row() for x in records])
        side.figures["reward"] = mean_and_se(values)
        totals.append(values)
    return totals


def _kl(policy: Side, reference: Side, cfg) -> dict:
    """report.json's KL figures: kl_to_reference, the mean of the sampled responses' Σ_t log π −
    log π_ref (None: no samples, or two tokenizers), its standard error kl_se and kl_responses."""
    from posttrain.rollout.sampling import SamplingSettings
    from posttrain.train import rollouts

    g = cfg.generation
    if not g.samples or policy.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        return {"kl_to_reference": None}
    prompt_ids = [p for p in policy.prompt_ids for _ in range(g.samples)]
    settings = SamplingSettings(max_new_tokens=g.max_new_tokens, temperature=g.temperature, seed=g.seed)
    completions = [c or [policy.tokenizer.eos_token_id] for c in _generate(policy, prompt_ids, settings,
                                                                           g.batch_size)]
    # a reference that is the policy's own model: _sequence_kl switches its adapters off (reference_weights)
    frozen = None if reference.model is policy.model else reference.model
    kl = mean_and_se(rollouts._sequence_kl(policy.model, policy.tokenizer, prompt_ids, completions, nullcontext,
                                           frozen, g.temperature))
    return {"kl_to_reference": kl["mean"], "kl_se": kl["se"], "kl_responses": kl["n"]}


def _judge(policy: Side, reference: Side, records, cfg, judge_backend, rubric: str = "") -> list[str]:
    from posttrain.feedback.client import close_local, make_backend
    from posttrain.feedback.judge import PairwiseJudge

    j = cfg.judge
    judge = PairwiseJudge(judge_backend or make_backend(j), rubric, parse_retries=j.parse_retries,
                          max_tokens=j.max_tokens, temperature=j.temperature, seed=j.seed)
    names = {"first": "win", "second": "loss", "tie": "tie"}  # inconsistent, unparsed: kept by name
    try:
        return [names.get(outcome := judge.judge(r.prompt, a, b).outcome, outcome)
                for r, a, b in zip(records, policy.responses, reference.responses)]
    finally:
        close_local(judge.backend)


def _redteam(side: Side, cfg, out: Path, log) -> dict:
    from posttrain.config.safety import RedTeamConfig
    from posttrain.feedback.client import LocalModel
    from posttrain.safety.run import run_redteam

    import shutil

    s = cfg.safety
    directory = out / ("redteam_" + side.name)
    shutil.rmtree(directory, ignore_errors=True)  # evaluate answers afresh each run, red team included
    # the bundled suites; with safety.limit, redteam's fixed sample of each spread over its categories
    # (`probes.sample_probes`), so both models answer the same probes
    rt = RedTeamConfig.load(None, [f"output_dir={directory}", f"target.model={side.path}", "target.kind=local",
                                   f"target.max_tokens={s.max_tokens}", f"target.template={cfg.template}",
                                   f"target.dtype={cfg.dtype}", "probes.harmful=default",
                                   "probes.overrefusal=default", f"probes.limit={s.limit}",
                                   f"attacks.names=[{','.join(s.attacks)}]"])
    target = LocalModel(side.model, side.tokenizer, name=side.path, template=cfg.template, max_tokens=s.max_tokens,
                        temperature=0.0)
    with side.switch():
        report_file = run_redteam(rt, target=target, log=log, stream=None) / "report.json"
        report = json.loads(report_file.read_text(encoding="utf-8"))
    return {"attack_success": report["attack_success"]["overall"],
            "over_refusal": report["over_refusal"]["overall"], "classifier": report["classifier"],
            "requests": report["requests"], "failed": report["failed"]}


def run_evaluate(cfg, *, judge=None, log: Callable[[str], Any] = print) -> Path:
    """Answer, score and compare; write responses.jsonl, report.json and report.md. `judge`
    replaces the judge backend the config describes (tests)."""
    from posttrain.config.evaluate import EvaluateConfig, validate_evaluate
    from posttrain.eval.report import markdown

    cfg = EvaluateConfig.for_run(cfg, "run_evaluate")
    validate_evaluate(cfg)
    score, rubric = _checked_inputs(cfg, log)
    out = user_path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)  # generation.seed among it: the sampled KL depends on it
    records = _prompts(cfg, log)
    if score is not None:  # a row lacking what a reward reads (exact_match: 'answer'), by file:line
        from posttrain.train.rollouts import check_prompt_rows

        check_prompt_rows({c.name: c.reward for c in score.components}, records)
    from posttrain.inference import check_model_dir

    for what, path in (("policy", cfg.policy), ("reference", cfg.reference.strip())):
        if path:
            check_model_dir(path, what)
    policy, records = _load_side("policy", cfg.policy, cfg, records, log)
    sides = [policy]
    if cfg.reference.strip():
        reference, kept = _load_side("reference", cfg.reference, cfg, records, log, policy)
        if len(kept) != len(records):
            _refuse_prompt_mismatch(len(records), len(kept))
        sides.append(reference)
    for side in sides:
        _answer(side, cfg)
        _answer_figures(side, records)
    rewards = _rewards(sides, records, score)
    report: dict[str, Any] = {"policy": cfg.policy, "reference": cfg.reference or None, "prompts": len(records)}
    if len(sides) == 2:
        policy, reference = sides
        report.update(_kl(policy, reference, cfg))
        if rewards is not None:
            report["reward_win_rate"] = win_rate(["win" if a > b else "loss" if a < b else "tie"
                                                  for a, b in zip(*rewards)])
        if cfg.judge.enabled:
            report["judge_win_rate"] = win_rate(_judge(policy, reference, records, cfg, judge, rubric))
    if cfg.safety.redteam:
        for side in sides:
            side.figures["redteam"] = _redteam(side, cfg, out, log)
        report["failed"] = sum(side.figures["redteam"]["failed"] for side in sides)  # pipeline.failed_items
    report["models"] = {side.name: side.figures for side in sides}
    _write(out, report, sides, records, rewards)
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    log(f"evaluate: report in {out / 'report.md'}")
    return out


def _refuse_prompt_mismatch(policy_count: int, reference_count: int) -> None:
    from posttrain.errors import DataError

    raise DataError(f"the reference's tokenizer leaves {reference_count} of the policy's {policy_count} prompts "
                    "within prompts.max_prompt_length; raise it so both models answer the same prompts")


def _checked_inputs(cfg, log):
    """What can be wrong besides the models, found before they load: the reward (functions import,
    reward models load, weight names), the judge's rubric file, the red team's attack names."""
    from posttrain.errors import ConfigError

    score = _reward_scorer(cfg, log)
    rubric = ""
    if cfg.judge.enabled:
        from posttrain.feedback.rlaif import read_rubric

        rubric = read_rubric(cfg.judge)
    if cfg.safety.redteam:
        from posttrain.safety.attacks import load_attacks

        try:
            load_attacks(cfg.safety.attacks)
        except ConfigError as exc:
            raise ConfigError(f"safety.attacks: {exc}") from None
    return score, rubric


def _prompts(cfg, log) -> list:
    from posttrain.data.prompts import load_prompt_records, synthetic_record
    from posttrain.data.synthetic import make_split

    p = cfg.prompts
    if p.files == ["synthetic"]:
        _, held_out = make_split(p.synthetic_tasks, 0, p.limit or 300, seed=0)
        records = [synthetic_record(e, i) for i, e in enumerate(held_out)]
    else:
        records, _ = load_prompt_records(p.files, bad_rows="skip", max_bad_fraction=p.max_bad_fraction, log=log)
    return records[: p.limit or None]


def _write(out: Path, report: dict, sides: list[Side], records, rewards) -> None:
    from posttrain.train.metrics import strict_json

    rows = []
    for i, record in enumerate(records):
        row = {"source": record.source, "prompt": record.prompt, "answer": record.answer}
        if record.tools is not None:  # the prompt was asked with them
            row["tools"] = record.tools
        for k, side in enumerate(sides):
            row[side.name] = side.responses[i]
            if rewards is not None:
                row[f"{side.name}_reward"] = rewards[k][i]
        rows.append(row)
    (out / "responses.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    (out / "report.json").write_text(json.dumps(strict_json(report), indent=1, allow_nan=False) + "\n",
                                     encoding="utf-8")
