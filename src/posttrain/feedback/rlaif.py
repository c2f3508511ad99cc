"""RLAIF: preference data from AI feedback (Bai et al. 2022, "Constitutional AI", Sec. 4;
Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning from Human Feedback with AI Feedback").

    prompts ──policy: N samples each──▶ responses ──judge: every pair, both orders──▶ outcomes
            ──pairs both orders agree on──▶ preferences.jsonl ──▶ posttrain dpo / posttrain rm

Files in output_dir:

    raw.jsonl          the resumable log: one record per prompt with its N responses and every
                       pair's judgement (both orders' verdicts and the judge's replies)
    preferences.jsonl  pairs rows (prompt / chosen / rejected) plus a provenance object; written
                       from raw.jsonl at the end of every run, so resuming never duplicates a row
    summary.json       counts, agreement between the orders, position bias, tokens
    run.json           the settings that shape the results; a resumed run must use the same ones
    config.yaml        the full config of the latest run (the API key variable's name, never its value)

Pairs of identical or empty responses, and pairs repeating an earlier one's texts (a response
sampled twice), are not judged. Ties, inconsistent pairs (the verdict
changed when the order was swapped) and unparsed ones stay in raw.jsonl and are never emitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

from posttrain.config.schema import user_path
from posttrain.errors import ConfigError
from posttrain.feedback.client import ChatBackend, close_local, make_backend, shared_or_new
from posttrain.feedback.jobs import JsonlLog, check_resume_settings, model_identity, run_items, write_jsonl
from posttrain.feedback.judge import PairwiseJudge, cohen_kappa, to_original

SKIPPED = ("identical", "empty", "repeated")  # pair outcomes that were never sent to the judge


# --------------------------------------------------------------------------- prompts


def prompt_id(turns: list[dict[str, str]]) -> str:
    """A stable id from the prompt's content (the same prompt gets the same id in every run)."""
    return hashlib.sha256(json.dumps(turns, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def load_prompts(files: list[str], fmt: str = "auto", limit: int = 0, log: Callable[[str], Any] = print, *,
                 bad_rows: str = "error", max_bad_fraction: float = 0.01,
                 rejects_path: str | None = None) -> list[tuple[str, Any]]:
    """(id, PromptRecord) per prompt, read as data.prompts reads RL prompts (format detected per
    file: prompt, messages or alpaca); a malformed row stops the run with its file:line, or with
    bad_rows="skip" goes to rejects_path (up to max_bad_fraction).
    A prompt repeated in the data gets "<id>-2", "<id>-3", ... so every occurrence is kept (and
    sampled with its own seeds, see `rlaif_record`)."""
    from posttrain.data.prompts import load_prompt_records

    records, _ = load_prompt_records(files, fmt=fmt, bad_rows=bad_rows, max_bad_fraction=max_bad_fraction,
                                     rejects_path=rejects_path, log=log)
    if limit:
        records = records[:limit]
    seen: Counter[str] = Counter()
    items = []
    for record in records:
        base = prompt_id(record.prompt)
        seen[base] += 1
        items.append((base if seen[base] == 1 else f"{base}-{seen[base]}", record))
    return items


def occurrence_of(item_id: str) -> int:
    """Which occurrence of its prompt an id from `load_prompts` names: 1, or k for "<id>-k"."""
    _, dash, count = item_id.rpartition("-")
    return int(count) if dash and count.isdecimal() else 1


# --------------------------------------------------------------------------- one prompt


def sample_responses(policy: ChatBackend, turns: list[dict[str, str]], n: int, *, seed: int,
                     max_tokens: int | None = None, temperature: float | None = None,
                     tools: list[dict] | None = None) -> list[dict]:
    """N replies of the policy; response i is sampled with seed + i. `tools`: the row's tool
    definitions, given to the policy (and not passed at all for a row without them)."""
    responses = []
    given = {"tools": tools} if tools else {}
    for i in range(n):
        reply = policy.chat(turns, max_tokens=max_tokens, temperature=temperature, seed=seed + i, **given)
        responses.append({"text": reply.text, "finish_reason": reply.finish_reason, "seed": seed + i,
                          "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens})
    return responses


def judge_pairs(judge: PairwiseJudge, turns: list[dict[str, str]], texts: list[str],
                tools: list[dict] | None = None) -> list[dict]:
    """Every pair (i < j) judged in both orders; "ab" shows response i as A, "ba" shows j as A.
    `tools`: the row's tool definitions, shown to the judge.

    A response sampled twice is judged once: a pair holding a later copy ("repeated") would
    ask the judge the same question again and write the same row twice."""
    first = {}
    for k, text in enumerate(texts):
        first.setdefault(text, k)
    pairs = []
    for i, j in combinations(range(len(texts)), 2):
        if not texts[i].strip() or not texts[j].strip():
            pairs.append({"pair": [i, j], "outcome": "empty"})
        elif texts[i] == texts[j]:
            pairs.append({"pair": [i, j], "outcome": "identical"})
        elif first[texts[i]] != i or first[texts[j]] != j:
            pairs.append({"pair": [i, j], "outcome": "repeated"})
        else:
            judgement = judge.judge(turns, texts[i], texts[j], tools).to_dict()
            pairs.append({"pair": [i, j], "outcome": judgement["outcome"], "ab": judgement["ab"],
                          "ba": judgement["ba"]})
    return pairs


def rlaif_record(item_id: str, record, *, policy: ChatBackend, judge: PairwiseJudge, num_responses: int,
                 seed: int, max_tokens: int | None = None, temperature: float | None = None,
                 occurrence: int = 1) -> dict:
    """The raw-log record of one prompt: its responses and every pair's judgement (the row's tools,
    if any, given to the policy and shown to the judge). The k-th
    occurrence of a prompt in the data samples with seeds seed + (k-1)·num_responses + i, so a
    repeated prompt gets new answers instead of the same ones judged and written again."""
    responses = sample_responses(policy, record.prompt, num_responses, seed=seed + (occurrence - 1) * num_responses,
                                 max_tokens=max_tokens, temperature=temperature, tools=record.tools)
    pairs = judge_pairs(judge, record.prompt, [r["text"] for r in responses], record.tools)
    judged = [p for p in pairs if p["outcome"] not in SKIPPED]
    tokens = {
        "policy_prompt": sum(r["prompt_tokens"] for r in responses),
        "policy_completion": sum(r["completion_tokens"] for r in responses),
        "judge_prompt": sum(p[o]["prompt_tokens"] for p in judged for o in ("ab", "ba")),
        "judge_completion": sum(p[o]["completion_tokens"] for p in judged for o in ("ab", "ba")),
    }
    return {"id": item_id, "source": record.source, "prompt": record.prompt, "policy": policy.model_name,
            "judge": judge.backend.model_name, "responses": responses, "pairs": pairs, "tokens": tokens}


def preference_rows(record: dict) -> list[dict]:
    """The pairs rows of one raw record: one per pair both orders agree on, in pair order.

    The prompt is a string when it is a single user turn, else the list of turns; `posttrain
    dpo` and `posttrain rm` read both, and ignore `id` and `provenance`.
    """
    turns = record["prompt"]
    prompt = turns[0]["content"] if len(turns) == 1 and turns[0]["role"] == "user" else turns
    rows = []
    for pair in record["pairs"]:
        if pair["outcome"] not in ("first", "second"):
            continue
        i, j = pair["pair"]
        chosen, rejected = (i, j) if pair["outcome"] == "first" else (j, i)
        rows.append({
            "id": f"{record['id']}/{i}-{j}",
            "prompt": prompt,
            "chosen": record["responses"][chosen]["text"],
            "rejected": record["responses"][rejected]["text"],
            "provenance": {"prompt_id": record["id"], "source": record["source"], "policy": record["policy"],
                           "judge": record["judge"], "pair": [i, j], "chosen_index": chosen,
                           "outcome": pair["outcome"], "ab": pair["ab"], "ba": pair["ba"]},
        })
    return rows


# --------------------------------------------------------------------------- statistics


def summarize(records: list[dict]) -> dict:
    """Counts and agreement statistics over raw records (pure; the same numbers after a resume)."""
    pairs = [p for r in records for p in r["pairs"]]
    outcomes = Counter(p["outcome"] for p in pairs)
    judged = [p for p in pairs if p["outcome"] not in SKIPPED]
    parsed = [p for p in judged if p["outcome"] != "unparsed"]
    slots = [p[o]["verdict"] for p in judged for o in ("ab", "ba")]
    a_wins, b_wins = slots.count("A"), slots.count("B")
    inconsistent = [p for p in judged if p["outcome"] == "inconsistent"]
    consistent = outcomes["first"] + outcomes["second"] + outcomes["tie"]
    tokens = Counter()
    for r in records:
        tokens.update(r["tokens"])
    return {
        "prompts": len(records),
        "responses": sum(len(r["responses"]) for r in records),
        "pairs": len(pairs),
        "not_judged": {"identical": outcomes["identical"], "empty": outcomes["empty"],
                       "repeated": outcomes["repeated"]},
        "judged": len(judged),
        "outcomes": {name: outcomes[name] for name in ("first", "second", "tie", "inconsistent", "unparsed")},
        "preferences": outcomes["first"] + outcomes["second"],
        "consistent_rate": _ratio(consistent, len(parsed)),
        "inconsistent_rate": _ratio(len(inconsistent), len(parsed)),
        "same_slot_twice": {slot: sum(p["ab"]["verdict"] == p["ba"]["verdict"] == slot for p in inconsistent)
                            for slot in ("A", "B")},
        "first_slot_win_rate": _ratio(a_wins, a_wins + b_wins),
        "order_agreement_kappa": cohen_kappa([to_original(p["ab"]["verdict"], "ab") for p in parsed],
                                             [to_original(p["ba"]["verdict"], "ba") for p in parsed]),
        "unparsed_replies": slots.count(None),
        "judge_retries": sum(len(p[o]["replies"]) - 1 for p in judged for o in ("ab", "ba")),
        "tokens": dict(tokens),
    }


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def summary_lines(stats: dict) -> list[str]:
    o, skipped = stats["outcomes"], stats["not_judged"]
    kappa = stats["order_agreement_kappa"]
    t = stats["tokens"]
    lines = [
        f"rlaif: {stats['prompts']} prompts, {stats['responses']} responses, {stats['pairs']} pairs "
        f"({skipped['identical']} identical, {skipped['empty']} empty and {skipped.get('repeated', 0)} repeating "
        "an earlier response's pair, not judged)",
        f"judge: {stats['judged']} pairs asked in both orders: {o['first'] + o['second']} preferences, {o['tie']} "
        f"ties, {o['inconsistent']} inconsistent, {o['unparsed']} unparsed",
        f"judge: consistent {_rate(stats['consistent_rate'])}, inconsistent (position bias) "
        f"{_rate(stats['inconsistent_rate'])} (same slot both times: A {stats['same_slot_twice']['A']}, "
        f"B {stats['same_slot_twice']['B']}); first-slot win rate {_rate(stats['first_slot_win_rate'])}; "
        f"order agreement kappa {'n/a' if kappa is None else f'{kappa:.2f}'}",
        f"judge: {stats['unparsed_replies']} replies without a verdict line after {stats['judge_retries']} "
        "follow-up requests",
        f"tokens: policy {t.get('policy_prompt', 0)} prompt + {t.get('policy_completion', 0)} completion, "
        f"judge {t.get('judge_prompt', 0)} prompt + {t.get('judge_completion', 0)} completion",
    ]
    if stats["judged"] and o["unparsed"] > stats["judged"] / 2:
        lines.append("judge: most pairs have no verdict; can judge.model follow the format? Its replies are in "
                     "raw.jsonl (pairs[].ab.replies)")
    return lines


# --------------------------------------------------------------------------- the run


def read_rubric(cfg) -> str:
    """The judge's rubric: judge.rubric, the text of judge.rubric_file, or "" for the default."""
    if not cfg.rubric_file:
        return cfg.rubric
    path = user_path(cfg.rubric_file)
    if not path.is_file():
        raise ConfigError(f"judge.rubric_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"judge.rubric_file {path} is empty")
    return text


_RESULT_FIELDS = ("kind", "model", "max_tokens", "temperature", "seed", "template", "dtype")


def backend_settings(cfg) -> dict:
    """The fields of a BackendConfig that decide its replies (model, sampling, template, dtype);
    the pipelines record them so that a resume with other values is refused."""
    return {f: getattr(cfg, f) for f in _RESULT_FIELDS}


def result_settings(cfg, rubric: str) -> dict:
    """What decides the records' content: resuming with other values would mix two datasets.
    (Timeouts, retries, rate limits, concurrency, URLs and keys may change between runs.) A local
    model's files count (`jobs.model_identity`): a model retrained in place is another model.
    TOOLS_TO_POLICY says the policy is given a row's tools (runs of earlier versions lacked it)."""
    backend = {name: backend_settings(getattr(cfg, name)) | model_identity(getattr(cfg, name))
               for name in ("policy", "judge")}
    backend["judge"].update(rubric=rubric, parse_retries=cfg.judge.parse_retries)
    return {**backend, "num_responses": cfg.rlaif.num_responses, TOOLS_TO_POLICY: True}


TOOLS_TO_POLICY = "tools_given_to_policy"


def tools_unrecorded(items: list[tuple[str, Any]]) -> dict[str, str | None]:
    """`check_resume_settings`'s words for a run begun before the policy was given the rows'
    tools (its settings lack TOOLS_TO_POLICY): with rows that have tools, resuming would mix
    responses written without them and with them; with none, nothing differs."""
    with_tools = sum(bool(record.tools) for _, record in items)
    return {TOOLS_TO_POLICY: with_tools and (
        f"its records were sampled by a version that did not give the policy the rows' tools, and {with_tools} "
        "prompts here have tools; resuming would mix responses written without and with them. Use a new "
        "output_dir") or None}


def _backends(cfg) -> tuple[ChatBackend, ChatBackend]:
    """The policy and judge backends; one local model serves both when they name the same one."""
    policy = make_backend(cfg.policy)
    return policy, shared_or_new(policy, cfg.policy, cfg.judge)


def run_rlaif(cfg, log: Callable[[str], Any] = print) -> Path:
    """`posttrain rlaif`: sample, judge, write preferences; resumable. Returns the output dir."""
    from posttrain.files import write_config

    from posttrain.config.feedback import RLAIFConfig, validate_rlaif

    cfg = RLAIFConfig.for_run(cfg, "run_rlaif")
    validate_rlaif(cfg)
    out = user_path(cfg.output_dir)
    rubric = read_rubric(cfg.judge)
    out.mkdir(parents=True, exist_ok=True)
    items = load_prompts(cfg.data.prompt_files, cfg.data.format, cfg.data.limit, log, bad_rows=cfg.data.bad_rows,
                         max_bad_fraction=cfg.data.max_bad_fraction, rejects_path=str(out / "rejects.jsonl"))
    raw_path = out / "raw.jsonl"
    resuming = raw_path.exists() and raw_path.stat().st_size > 0
    check_resume_settings(out, result_settings(cfg, rubric), resuming, name="run.json",
                          unrecorded=tools_unrecorded(items))
    write_config(out, cfg)
    policy, judge_backend = _backends(cfg)
    j = cfg.judge
    judge = PairwiseJudge(judge_backend, rubric, parse_retries=j.parse_retries, max_tokens=j.max_tokens,
                          temperature=j.temperature, seed=j.seed)
    p = cfg.policy

    def work(item_id: str, record) -> dict:
        return rlaif_record(item_id, record, policy=policy, judge=judge, num_responses=cfg.rlaif.num_responses,
                            seed=p.seed, max_tokens=p.max_tokens, temperature=p.temperature,
                            occurrence=occurrence_of(item_id))

    try:
        with JsonlLog(raw_path) as raw:
            run = run_items(items, work, raw, concurrency=cfg.rlaif.concurrency, desc="rlaif")
            by_id = {r["id"]: r for r in raw.records}
    finally:
        close_local(policy, judge_backend)
    records = [by_id[item_id] for item_id, _ in items if item_id in by_id]
    rows = [row for record in records for row in preference_rows(record)]
    write_jsonl(out / "preferences.jsonl", rows)
    stats = summarize(records)
    stats["run"] = {**dataclasses.asdict(run), "other_prompts_in_log": len(by_id) - len(records)}
    stats["usage_this_run"] = {"policy": policy.usage.snapshot(), "judge": judge_backend.usage.snapshot()}
    (out / "summary.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    for line in run.lines() + summary_lines(stats):
        log(line)
    if stats["run"]["other_prompts_in_log"]:
        log(f"rlaif: {stats['run']['other_prompts_in_log']} records in raw.jsonl are for prompts not in the data "
            "now; they are left out of preferences.jsonl")
    log(f"rlaif: wrote {len(rows)} preference rows to {out / 'preferences.jsonl'} (ties, inconsistent and "
        "unparsed pairs stay in raw.jsonl only)")
    return out
