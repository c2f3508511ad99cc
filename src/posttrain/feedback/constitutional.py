"""Constitutional AI (Bai et al. 2022): a model improves its own answers under written principles.

For each prompt:

    initial response ──▶ for round 1..n: sample a principle (seeded per prompt)
                                         ──▶ critique the current response against it
                                         ──▶ revise the response to address the critique
                     ──▶ final revision

    chains.jsonl        one record per prompt, every step with its principle (the resumable log)
    sft.jsonl           prompt + final revision, `messages` rows (posttrain sft)       SL-CAI
    preferences.jsonl   chosen = final revision, rejected = original, `pairs` rows (posttrain dpo / rm)

RL-CAI (`constitutional.rl_cai`): instead of assuming the revision is better, a judge compares
original and revision under the constitution's principles, in both orders (position swap);
only a consistent verdict becomes a pair, its preferred side chosen, and the verdicts are kept.

A critique or revision that comes back empty (or cut off by max_tokens, with drop_truncated)
is dropped and counted by reason; the round leaves the response as it was. A prompt whose
every round was dropped gives no SFT row and no pair, and is counted too. An original cut off
by max_tokens (with drop_truncated) gives no pair, counted as "truncated_original": as the
rejected side it would teach "finish the answer", not the principle; its complete revision
is still an SFT row. The RL-CAI judge reads the conversation as the policy did, the system
message included.
"""

from __future__ import annotations

import json
import random
import re
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from posttrain.config.schema import load_yaml, user_path
from posttrain.errors import DataError, UserError
from posttrain.feedback.jobs import STDERR, resolve_stream

ASSETS = Path(__file__).resolve().parents[1] / "assets"
_PRINCIPLE_KEYS = ("name", "critique", "revision")
_REVISION_SUFFIX = "\n\nReply with the rewritten response only."
# "Revised response:", "Here is the rewritten reply:", "Revision:" ... at the start of a revision.
_REVISION_LABEL = re.compile(
    r"^\s*(?:(?:here is|here's)\s+)?(?:(?:the|a|my)\s+)?(?:revision|(?:revised|rewritten|improved)"
    r"(?:\s+(?:response|reply|answer|version))?)\s*:\s*", re.IGNORECASE)
# A first line that announces the revision: it ends in ":" (closing bold marks allowed), says
# "revised", "revision" or "rewritten", and names the response (or opens "Here", "Sure", ...):
# "Here is a revised version of the response:", "Here's the revised response that addresses the
# critique:". Content such as "The revision process has three steps:" or "Here's how to revise
# your answer:" is kept.
ENDS_WITH_COLON = re.compile(r":\s*(?:\*\*|__)?\s*$")  # a line that announces what follows ("**Task:**" too)
_REVISION_WORD = re.compile(r"\b(?:revised|revision|rewritten)\b", re.IGNORECASE)
_RESPONSE_WORD = re.compile(r"\b(?:response|reply|answer|version)\b|^\W*(?:here|sure|certainly|okay|ok|below)\b",
                            re.IGNORECASE)


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # what to look for in the assistant's last reply
    revision: str  # how to rewrite it


# --------------------------------------------------------------------------- the constitution file


def constitution_path(name: str) -> Path:
    """'default' -> the bundled constitution; anything else is a path."""
    return ASSETS / "constitution.yaml" if name == "default" else user_path(name)


def load_constitution(name: str) -> list[Principle]:
    """Principles from a YAML file (a list, or a mapping with `principles:`) or a JSONL file
    (one principle a line). Each needs a unique `name`, a `critique` and a `revision` request."""
    path = constitution_path(name)
    if not path.is_file():
        raise DataError(f"constitution file {path} does not exist (constitutional.constitution; 'default' = bundled)")
    if path.suffix in (".yaml", ".yml"):
        entries = _yaml_entries(path)
    elif path.suffix == ".jsonl":
        entries = _jsonl_entries(path)
    else:
        raise DataError(f"{path}: a constitution must be a .yaml, .yml or .jsonl file")
    principles, seen = [], {}
    for where, entry in entries:
        principle = _principle(entry, where)
        if principle.name in seen:
            raise DataError(f"{where}: principle name {principle.name!r} is already used by {seen[principle.name]}")
        seen[principle.name] = where
        principles.append(principle)
    if not principles:
        raise DataError(f"{path}: the constitution has no principles")
    return principles


def _yaml_entries(path: Path) -> list[tuple[str, Any]]:
    data = load_yaml(path.read_text(encoding="utf-8"), path, DataError)  # a key given twice: a `-` forgotten
    if isinstance(data, dict):
        if set(data) != {"principles"}:
            raise DataError(f"{path}: expected a list of principles or one key 'principles:', got keys "
                            f"{', '.join(map(str, data))}")
        data = data["principles"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of principles, got {type(data).__name__}")
    return [(f"{path}: principle {i}", entry) for i, entry in enumerate(data, 1)]


def _jsonl_entries(path: Path) -> list[tuple[str, Any]]:
    from posttrain.data.readers import strict_rows

    return list(strict_rows(str(path)))


def _principle(entry: Any, where: str) -> Principle:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with {', '.join(_PRINCIPLE_KEYS)}, got {type(entry).__name__}")
    unknown = [str(k) for k in entry if k not in _PRINCIPLE_KEYS]
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}; a principle has {', '.join(_PRINCIPLE_KEYS)}")
    for key in _PRINCIPLE_KEYS:
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            name = f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else ""
            raise DataError(f"{where}{name}: {key!r} must be a non-empty string, got {value!r}")
    return Principle(entry["name"].strip(), entry["critique"].strip(), entry["revision"].strip())


def constitution_rubric(principles: list[Principle]) -> str:
    """The principles as a judge's rubric: each one's revision request says what a better response does."""
    return "\n".join(f"- {p.name}: {p.revision}" for p in principles)


# --------------------------------------------------------------------------- one prompt's chain


def sample_principles(principles: list[Principle], rounds: int, seed: int, prompt_id: str) -> list[Principle]:
    """The principle of each round, drawn with replacement from an RNG seeded by (seed, prompt id):
    the same prompt gets the same principles in every run, whatever order prompts finish in."""
    rng = random.Random(f"{seed}/{prompt_id}")
    return [rng.choice(principles) for _ in range(rounds)]


def request_seed(seed: int, prompt_id: str, step: str) -> int:
    """A sampling seed per request, stable across runs and resumes."""
    return zlib.crc32(f"{seed}/{prompt_id}/{step}".encode())


def critique_messages(turns: list[dict[str, str]], response: str, principle: Principle) -> list[dict[str, str]]:
    return [*turns, {"role": "assistant", "content": response}, {"role": "user", "content": principle.critique}]


def revision_messages(turns: list[dict[str, str]], response: str, principle: Principle,
                      critique: str) -> list[dict[str, str]]:
    return [*critique_messages(turns, response, principle), {"role": "assistant", "content": critique},
            {"role": "user", "content": principle.revision + _REVISION_SUFFIX}]


_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "\u300c": "\u300d",
           "\u300e": "\u300f"}


def unquoted(text: str) -> str:
    """`text` without a pair of quotes wrapped around the whole of it (straight or typographic, see
    _QUOTES); text with the same quote marks inside as well is kept as it is."""
    close = _QUOTES.get(text[:1])
    if close is None or len(text) < 2 or text[-1] != close:
        return text
    inner = text[1:-1]
    return text if text[0] in inner or close in inner else inner.strip()


def clean_revision(text: str) -> str:
    """The revision without surrounding space, a first line announcing it ("Here is a revised
    version of the response:"), a leading "Revised response:"-style label, or quotes wrapped
    around the whole of it (`unquoted`)."""
    text = text.strip()
    first, _, rest = text.partition("\n")
    if ENDS_WITH_COLON.search(first) and _REVISION_WORD.search(first) and _RESPONSE_WORD.search(first.strip()):
        text = rest.strip()
    text = _REVISION_LABEL.sub("", text, count=1).strip()
    return unquoted(text)


def _drop_reason(text: str, finish_reason: str, what: str, drop_truncated: bool) -> str | None:
    if not text:
        return f"empty_{what}"
    if drop_truncated and finish_reason == "length":
        return f"truncated_{what}"
    return None


@dataclass(frozen=True)
class ChainSettings:
    rounds: int = 1
    seed: int = 0
    system: str = ""  # used when generating; not written to the outputs
    drop_truncated: bool = True


def run_chain(backend, prompt_id: str, prompt: list[dict[str, str]], principles: list[Principle],
              settings: ChainSettings) -> dict[str, Any]:
    """Initial response, then `rounds` x (critique, revision), each under a sampled principle.

    Returns the record logged for this prompt: every step, the principle it used, why a
    step was dropped, the final response and a status (revised, unchanged, no_revision,
    empty_response). A failed request raises (the prompt is retried on the next run).
    """
    own_system = settings.system and prompt[0]["role"] != "system"
    turns = [{"role": "system", "content": settings.system}, *prompt] if own_system else prompt
    first = backend.chat(turns, seed=request_seed(settings.seed, prompt_id, "initial"))
    initial = first.text.strip()
    # the system message sent, if any: a prompt's own system turn wins over settings.system
    record: dict[str, Any] = {"id": prompt_id, "prompt": prompt, "model": backend.model_name,
                              "system": settings.system if own_system else None, "initial": initial,
                              "initial_finish_reason": first.finish_reason, "rounds": []}
    if not initial:
        return {**record, "final": initial, "status": "empty_response", "revisions": 0}
    current, kept = initial, 0
    for number, principle in enumerate(sample_principles(principles, settings.rounds, settings.seed, prompt_id), 1):
        step: dict[str, Any] = {"round": number, "principle": principle.name}
        reply = backend.chat(critique_messages(turns, current, principle),
                             seed=request_seed(settings.seed, prompt_id, f"critique{number}"))
        step.update(critique=reply.text.strip(), critique_finish_reason=reply.finish_reason)
        dropped = _drop_reason(step["critique"], reply.finish_reason, "critique", settings.drop_truncated)
        if dropped is None:
            reply = backend.chat(revision_messages(turns, current, principle, step["critique"]),
                                 seed=request_seed(settings.seed, prompt_id, f"revision{number}"))
            step.update(revision=clean_revision(reply.text), revision_finish_reason=reply.finish_reason)
            dropped = _drop_reason(step["revision"], reply.finish_reason, "revision", settings.drop_truncated)
        step["dropped"] = dropped
        if dropped is None:
            current, kept = step["revision"], kept + 1
        record["rounds"].append(step)
    status = "no_revision" if kept == 0 else "unchanged" if current == initial else "revised"
    # why a revised prompt gives no pair, if it gives none: its original was cut off
    pair_dropped = ("truncated_original" if status == "revised" and settings.drop_truncated
                    and first.finish_reason == "length" else None)
    return {**record, "final": current, "status": status, "revisions": kept, "pair_dropped": pair_dropped}


def pairable(record: dict[str, Any]) -> bool:
    """Whether a chain can give a pair: revised, and not dropped from the pairs (`pair_dropped`)."""
    return record["status"] == "revised" and not record.get("pair_dropped")


def judge_chain(judge, record: dict[str, Any]) -> dict[str, Any]:
    """RL-CAI: the judge's verdicts on original vs final revision, in both orders, added to the
    record. `preferred` is "revision" or "original" when both orders name it, else None. The judge
    is shown the system message the policy answered under (`record["system"]`), if any."""
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    judgement = judge.judge([*system, *record["prompt"]], record["initial"], record["final"])
    preferred = {"first": "original", "second": "revision"}.get(judgement.outcome)
    return {**record, "judge": {"preferred": preferred, **judgement.to_dict()}}


# --------------------------------------------------------------------------- outputs


def sft_row(record: dict[str, Any]) -> dict[str, Any] | None:
    """prompt + final revision as a `messages` row, when a revision survived."""
    if record["status"] not in ("revised", "unchanged"):
        return None
    return {"id": record["id"], "messages": [*record["prompt"], {"role": "assistant", "content": record["final"]}]}


def preference_row(record: dict[str, Any]) -> dict[str, Any] | None:
    """A `pairs` row: chosen = final revision, rejected = original; with RL-CAI, the side the judge
    preferred in both orders is chosen, and inconsistent verdicts give no row. A chain that is
    not `pairable` gives none."""
    if not pairable(record):
        return None
    chosen, rejected = record["final"], record["initial"]
    if "judge" in record:
        preferred = record["judge"]["preferred"]
        if preferred is None:
            return None
        if preferred == "original":
            chosen, rejected = rejected, chosen
    return {"id": record["id"], "prompt": record["prompt"], "chosen": chosen, "rejected": rejected}


def count_outcomes(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Statuses, rounds dropped by reason, pairs dropped by reason, principles used and RL-CAI
    verdicts, over all records."""
    rounds = [step for record in records for step in record["rounds"]]
    judged = Counter(record["judge"]["preferred"] or record["judge"]["outcome"] for record in records
                     if "judge" in record)
    return {
        "prompts": len(records),
        "status": dict(sorted(Counter(record["status"] for record in records).items())),
        "rounds": len(rounds),
        "rounds_kept": sum(step["dropped"] is None for step in rounds),
        "rounds_dropped": dict(sorted(Counter(step["dropped"] for step in rounds if step["dropped"]).items())),
        "pairs_dropped": dict(sorted(Counter(r["pair_dropped"] for r in records if r.get("pair_dropped")).items())),
        "principles": dict(sorted(Counter(step["principle"] for step in rounds).items())),
        **({"judge": {name: judged[name] for name in ("revision", "original", "tie", "inconsistent", "unparsed")}}
           if judged else {}),
    }


# --------------------------------------------------------------------------- the command


def load_prompts(cfg, rejects_path: str | None = None,
                 log: Callable[[str], Any] = lambda _: None) -> list[tuple[str, list[dict[str, str]]]]:
    """(id, prompt turns) per prompt row; the id is the row's "id" or its position among the rows
    read (a skipped malformed row, with cfg.bad_rows="skip", goes to rejects_path)."""
    from posttrain.data.prompts import load_prompt_records

    records, _ = load_prompt_records(cfg.prompt_files, fmt=cfg.format, bad_rows=cfg.bad_rows,
                                     max_bad_fraction=cfg.max_bad_fraction, rejects_path=rejects_path, log=log)
    if cfg.limit:
        records = records[:cfg.limit]
    prompts, seen = [], {}
    for i, record in enumerate(records):
        prompt_id = str(record.fields["id"]) if record.fields.get("id") is not None else f"p{i}"
        if prompt_id in seen:
            raise DataError(f"{record.source}: prompt id {prompt_id!r} is also used at {seen[prompt_id]}; ids must "
                            "be unique")
        seen[prompt_id] = record.source
        prompts.append((prompt_id, record.prompt))
    if not prompts:
        raise DataError(f"no prompts in {', '.join(cfg.prompt_files)}")
    return prompts


def run_constitutional(cfg, *, policy=None, judge_backend=None, stream: TextIO | None = STDERR) -> Path:
    """`posttrain constitutional`: chains for every prompt (resumable), then sft.jsonl,
    preferences.jsonl and summary.json from all chains logged so far. `policy` / `judge_backend`
    replace the backends the config describes (tests, notebooks)."""
    from posttrain.config.synthesis import ConstitutionalConfig, validate_constitutional
    from posttrain.feedback.client import close_local, make_backend, shared_or_new
    from posttrain.feedback.jobs import (JsonlLog, RunAborted, check_resume_settings, file_digest, model_identity,
                                         run_items, write_jsonl)
    from posttrain.feedback.rlaif import backend_settings

    cfg = ConstitutionalConfig.for_run(cfg, "run_constitutional")
    validate_constitutional(cfg)
    c = cfg.constitutional
    principles = load_constitution(c.constitution)
    out = user_path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.data, str(out / "rejects.jsonl"),
                           log=lambda line: print(line, file=resolve_stream(stream) or sys.stderr))
    policy = policy or make_backend(cfg.policy)
    settings = ChainSettings(rounds=c.rounds, seed=c.seed, system=c.system, drop_truncated=c.drop_truncated)
    rubric = _judge_rubric(cfg, principles) if c.rl_cai else ""
    # Everything that decides the chains (policy.seed is not: each request's seed comes from
    # constitutional.seed), a local model's files included; a resume with other values is refused,
    # a run with no chains yet is not.
    chains = out / "chains.jsonl"
    judge_settings = {"judge": {**backend_settings(cfg.judge), **model_identity(cfg.judge), "rubric": rubric,
                                "parse_retries": cfg.judge.parse_retries}} if c.rl_cai else {}
    check_resume_settings(out, {
        "policy": {**{k: v for k, v in backend_settings(cfg.policy).items() if k != "seed"},
                   "model": policy.model_name, **model_identity(cfg.policy)},
        "constitution": file_digest(constitution_path(c.constitution)),
        "rounds": c.rounds, "seed": c.seed, "system": c.system, "drop_truncated": c.drop_truncated,
        "rl_cai": c.rl_cai, **judge_settings},
        chains.is_file() and chains.stat().st_size > 0)
    judge = _make_judge(cfg, rubric, judge_backend or shared_or_new(policy, cfg.policy, cfg.judge)) \
        if c.rl_cai else None

    def work(prompt_id: str, prompt: list[dict[str, str]]) -> dict[str, Any]:
        record = run_chain(policy, prompt_id, prompt, principles, settings)
        return judge_chain(judge, record) if judge is not None and pairable(record) else record

    failure = None
    try:
        with JsonlLog(chains) as log:
            _check_logged_prompts(log, prompts)
            try:
                summary = run_items(prompts, work, log, concurrency=c.concurrency, desc="constitutional",
                                    stream=stream)
            except RunAborted as exc:  # every prompt tried failed: the chains logged earlier still give the outputs
                summary, failure = exc.summary, exc
            by_id = {record["id"]: record for record in log.records}
    finally:
        close_local(policy, *([judge.backend] if judge is not None else []))
    records = [by_id[prompt_id] for prompt_id, _ in prompts if prompt_id in by_id]  # input order, however resumed
    sft = [row for row in map(sft_row, records) if row is not None]
    pairs = [row for row in map(preference_row, records) if row is not None]
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "preferences.jsonl", pairs)
    usage = {"policy": policy.usage.snapshot(), **({"judge": judge.backend.usage.snapshot()} if judge else {})}
    outcome = {**count_outcomes(records), "sft_rows": len(sft), "preference_rows": len(pairs),
               "failed": summary.failed, "errors": summary.errors, "usage": usage, "config": cfg.to_dict()}
    (out / "summary.json").write_text(json.dumps(outcome, indent=2) + "\n", encoding="utf-8")
    for line in summary.lines() + summary_lines(outcome):
        print(line, file=resolve_stream(stream) or sys.stderr)
    if failure is not None:
        raise failure
    if summary.failed:
        raise UserError(f"constitutional: {summary.failed} of {len(prompts)} prompts failed (first: "
                        f"{summary.errors[0]}); the outputs hold the others; rerun the same command to retry them")
    return out


def summary_lines(outcome: dict[str, Any]) -> list[str]:
    status = ", ".join(f"{n} {name}" for name, n in outcome["status"].items()) or "none"
    dropped = ", ".join(f"{n} {name}" for name, n in outcome["rounds_dropped"].items()) or "none"
    lines = [f"constitutional: {outcome['prompts']} prompts: {status}",
             f"constitutional: {outcome['rounds_kept']}/{outcome['rounds']} rounds kept; dropped: {dropped}"]
    if "judge" in outcome:
        j = outcome["judge"]
        lines.append(f"constitutional: the judge preferred the revision {j['revision']} times, the original "
                     f"{j['original']}; {j['tie']} ties, {j['inconsistent']} inconsistent across orders, "
                     f"{j['unparsed']} unparsed (no pair from these)")
    lines.append(f"constitutional: wrote {outcome['sft_rows']} SFT rows and {outcome['preference_rows']} pairs")
    no_pair = ", ".join(f"{n} {name}" for name, n in outcome.get("pairs_dropped", {}).items())
    if no_pair:
        lines.append(f"constitutional: revised prompts given no pair: {no_pair} (the original was cut off by "
                     "max_tokens)")
    return lines


def _check_logged_prompts(log, prompts: list[tuple[str, list[dict[str, str]]]]) -> None:
    """A logged chain must belong to the same prompt it has the id of (the prompt file may have changed)."""
    given = dict(prompts)
    for record in log.records:
        if record["id"] in given and record["prompt"] != given[record["id"]]:
            raise DataError(f"{log.path}: the chain logged for prompt {record['id']!r} was made for a different prompt "
                            "text; the prompt files changed since; use a new output_dir")


def _judge_rubric(cfg, principles: list[Principle]) -> str:
    """The RL-CAI judge's rubric: judge.rubric, the text of judge.rubric_file, or the constitution's."""
    rubric = cfg.judge.rubric
    if cfg.judge.rubric_file:
        if not user_path(cfg.judge.rubric_file).is_file():
            raise DataError(f"judge.rubric_file {cfg.judge.rubric_file} does not exist")
        rubric = user_path(cfg.judge.rubric_file).read_text(encoding="utf-8")
    return rubric or constitution_rubric(principles)


def _make_judge(cfg, rubric: str, backend):
    """The RL-CAI judge on `backend`, each request with the judge's own sampling settings (a local
    model shared with the policy has the policy's as its defaults: `shared_or_new`)."""
    from posttrain.feedback.judge import PairwiseJudge

    j = cfg.judge
    return PairwiseJudge(backend, rubric, parse_retries=j.parse_retries, max_tokens=j.max_tokens,
                         temperature=j.temperature, seed=j.seed)
