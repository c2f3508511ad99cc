"""Adversarial edges of the data-generation pipelines (Self-Instruct, Constitutional AI and the
job runner under them), each checked against an independent source: ROUGE-L against a plain LCS
table over a tokeniser written from the docstring; the filters' threshold and word-count
boundaries; classification vs generation handling seen from the requests a scripted generator
receives; constitution files that are wrong in new ways (errors before any request); rounds
counted from the requests a scripted policy receives; resume from EVERY kind of prefix of an
uninterrupted run's log (line boundaries and torn lines, concurrency 1 and several) giving
byte-identical outputs and only the missing requests; concurrency not reordering rows; the
summaries recounted from the files; and the outputs read by the sft / dpo readers as they are."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from posttrain.config.synthesis import ConstitutionalConfig, SelfInstructConfig
from posttrain.errors import ConfigError, DataError
from posttrain.feedback.client import Reply, Usage
from posttrain.feedback.constitutional import load_constitution, run_constitutional
from posttrain.feedback.jobs import JsonlLog, run_items
from posttrain.feedback.rouge import RougePool, rouge_l, tokenize
from posttrain.feedback.self_instruct import run_self_instruct


def read_jsonl(path: Path) -> list[dict]:
    # split on "\n" only: str.splitlines would also split on U+2028 / U+0085 inside a row
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# --------------------------------------------------------------------------- independent references


def plain_tokens(text: str) -> list[str]:
    """The docstring's tokenisation, written out: maximal runs of letters or digits
    (str.isalnum, so "_" and punctuation split), each lowercased."""
    words, current = [], []
    for ch in text:
        if ch.isalnum():
            current.append(ch)
        elif current:
            words.append("".join(current).lower())
            current = []
    if current:
        words.append("".join(current).lower())
    return words


def lcs_table(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_f(candidate: str, reference: str) -> float:
    """ROUGE-L F (beta = 1) from precision and recall, in float64."""
    c, r = plain_tokens(candidate), plain_tokens(reference)
    if not c or not r:
        return 0.0
    lcs = lcs_table(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


# --------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_equals_plain_lcs_f_measure_over_noisy_text():
    rng = random.Random(5)
    words = ["Tea", "tea", "TEA!", "don't", "x_y", "42", "4.2", "café", "Über", "naïve", "a", "the", "(cat)",
             "dog,", "3rd", "well-known", "e-mail", "—", "...", "ΣΟΦΙΑ", "σοφια"]
    pool_texts = []
    for _ in range(400):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        assert tokenize(a) == plain_tokens(a)
        assert rouge_l(a, b) == pytest.approx(rouge_f(a, b), abs=1e-12)
        assert rouge_l(a, b) == pytest.approx(rouge_l(b, a), abs=1e-12)
        pool_texts.append(b)
    pool = RougePool(pool_texts)
    for _ in range(50):
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))
        best, index = pool.most_similar(query)
        assert best == pytest.approx(max(rouge_f(query, t) for t in pool_texts), abs=1e-12)
        assert index == -1 if best == 0 else rouge_f(query, pool_texts[index]) == pytest.approx(best, abs=1e-12)


def test_tokenize_keeps_a_word_with_dotted_capital_i_whole():
    # "maximal runs of letters or digits", lowercased: İstanbul is one run of letters
    assert plain_tokens("İstanbul is big") == ["i̇stanbul", "is", "big"]
    assert len(tokenize("İstanbul is big")) == 3


# --------------------------------------------------------------------------- Self-Instruct: a scripted generator

SI_SEEDS = [
    {"id": "c0", "instruction": "Classify the review as positive or negative.", "input": "Great phone.",
     "output": "positive", "is_classification": True},
    {"id": "c1", "instruction": "Decide whether the email is spam.", "input": "Win cash now", "output": "spam",
     "is_classification": True},
    {"id": "c2", "instruction": "Label the animal as mammal or bird.", "input": "sparrow", "output": "bird",
     "is_classification": True},
    {"id": "g0", "instruction": "Write a limerick about a sleepy cat.", "output": "There once was a cat...",
     "is_classification": False},
    {"id": "g1", "instruction": "Summarize the paragraph in one sentence.", "input": "Rain fell all day.",
     "output": "It rained.", "is_classification": False},
    {"id": "g2", "instruction": "Translate the phrase into Spanish.", "input": "good morning",
     "output": "buenos dias", "is_classification": False},
]
WORDS = ["river", "lantern", "copper", "quiet", "harvest", "violin", "marble", "orbit", "pepper", "canyon", "meadow",
         "anchor", "ribbon", "glacier", "thimble", "saddle", "walnut", "prism", "comet", "tundra", "falcon", "ember",
         "pillow", "quartz", "banjo", "lagoon", "cobalt", "tulip", "sparrow", "granite", "velvet", "ladder", "maple",
         "puzzle", "kettle", "nectar", "harbor", "cactus", "summit", "oyster"]
LABEL_ASK = "first pick one of its possible labels"
INPUT_ASK = "write an input for it"


def listed_tasks(content: str) -> list[str]:
    block = content.split("existing tasks:\n\n", 1)[1].split("\n\nWrite one new", 1)[0]
    return [re.sub(r"^\d+\. ", "", line) for line in block.split("\n")]


class SIGen:
    """Replies decided by the request text and its seed only (never by timing or order).

    Instructions: copies of a listed example (duplicate), a listed example plus two words
    (near-duplicate), banned words, too short, and new ones: "Classify ..." (the type question
    answers yes), "Write ..." (no) and "Ponder ..." (an unclear answer). Instances: label first
    for the label-first ask, input first otherwise; some broken on purpose. A random small delay
    shuffles the order requests finish in."""

    model_name = "si-gen"

    def __init__(self, delay: float = 0.0, fail_when=None):
        self.usage, self.lock, self.delay, self.fail_when = Usage(), threading.Lock(), delay, fail_when
        self.requests: list[tuple[str, int | None]] = []

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None) -> Reply:
        content = messages[-1]["content"]
        with self.lock:
            self.requests.append((content, seed))
        if self.fail_when is not None and self.fail_when(content):
            raise RuntimeError("scripted outage")
        rng = random.Random(f"{seed}|{content}")
        if self.delay:
            time.sleep(random.Random(f"delay|{seed}|{content}").random() * self.delay)
        if content.startswith("Come up with"):
            text = self.instruction(rng, listed_tasks(content))
        elif content.startswith("Is the following"):
            task = content.split("Task: ", 1)[1]
            text = "Yes." if task.startswith("Classify") else "No, it is not." if task.startswith("Write") \
                else "It depends."
        elif LABEL_ASK in content:
            x = rng.random()
            text = ("Label: positive\nInput: None" if x < 0.15 else "Just some text" if x < 0.2 else
                    f"Label: {rng.choice(['positive', 'negative'])}\nInput: {' '.join(rng.sample(WORDS, 4))}")
        else:
            x = rng.random()
            text = ("no fields here" if x < 0.1 else "Input: something\nOutput:   " if x < 0.15 else
                    f"Input: None\nOutput: {' '.join(rng.sample(WORDS, 5))}" if x < 0.6 else
                    f"Input: {' '.join(rng.sample(WORDS, 3))}\nOutput: {' '.join(rng.sample(WORDS, 5))}")
        self.usage.add(requests=1)
        return Reply(text, "stop", 3, 3)

    @staticmethod
    def instruction(rng: random.Random, listed: list[str]) -> str:
        x = rng.random()
        if x < 0.1:
            return f"{len(listed) + 1}. {rng.choice(listed).upper()}"  # the same words: a duplicate
        if x < 0.2:
            return rng.choice(listed) + " quickly please"  # near-duplicate
        if x < 0.28:
            return f"Draw a map of the {rng.choice(WORDS)} valley"
        if x < 0.35:
            return "Hi there"
        verb = rng.choice(["Classify", "Classify", "Write", "Write", "Ponder"])
        return f"{verb} the {' '.join(rng.sample(WORDS, 6))}."


def si_config(out: Path, seeds: Path, **sections) -> SelfInstructConfig:
    data = {"output_dir": str(out), "data": {"seed_file": str(seeds)},
            "self_instruct": {"num_tasks": 16, "per_round": 6, "max_rounds": 30, "seed_examples": 3,
                              "generated_examples": 2, "instance_examples": 2, "concurrency": 3, "seed": 11}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return SelfInstructConfig.from_dict(data)


def write_seeds(path: Path, seeds: list[dict] = SI_SEEDS) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in seeds))
    return path


SI_OUTPUTS = ("tasks.jsonl", "rejected.jsonl", "sft.jsonl")


def si_files(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text(encoding="utf-8") for name in SI_OUTPUTS}


def summary_without_usage(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("usage"), summary.pop("config")
    return summary


def requests_for(candidate: dict) -> int:
    """What one logged candidate cost: the instruction, then (unless rejected early) the type
    question (only with task_type=model) and the instance."""
    if "skipped_after" in candidate:
        return 1
    return 2 if candidate["type_source"] == "examples" else 3


@pytest.fixture(scope="module")
def si_whole(tmp_path_factory):
    """An uninterrupted run (concurrency 3, jittered replies), kept for the tests below to compare with."""
    root = tmp_path_factory.mktemp("si")
    seeds = write_seeds(root / "seeds.jsonl")
    gen = SIGen(delay=0.002)
    out = run_self_instruct(si_config(root / "whole", seeds), generator=gen, stream=None)
    return root, seeds, out, gen


def test_self_instruct_classification_and_generation_handling(si_whole):
    _root, _seeds, out, gen = si_whole
    flags = {s["id"]: s["is_classification"] for s in SI_SEEDS}
    candidates = read_jsonl(out / "candidates.jsonl")
    instance_requests = {}
    for content, _ in gen.requests:
        if LABEL_ASK in content or INPUT_ASK in content:
            instance_requests.setdefault(content.rsplit("\n\nTask: ", 1)[1], []).append(content)
    made = [c for c in candidates if "skipped_after" not in c]
    assert made and {c["type_source"] for c in made} == {"model", "model_unclear"}
    for c in made:
        verb = c["instruction"].split()[0]
        want = verb == "Classify"  # yes -> classification; no and unclear answers -> generation
        assert c["is_classification"] is want, c
        assert c["type_source"] == ("model_unclear" if verb == "Ponder" else "model")
        asks = instance_requests[c["instruction"]]
        assert all((LABEL_ASK in a) is want and (INPUT_ASK in a) is (not want) for a in asks)
        # the instance examples are seed tasks of the same type, shown label-first for classification
        assert c["instance_examples"] and all(flags[i] is want for i in c["instance_examples"])
        for ask in asks:
            blocks = ask.split("\n\n")[1:-1]
            assert blocks and all(b.split("\n")[1].startswith("Label:" if want else "Input:") for b in blocks)
    tasks = read_jsonl(out / "tasks.jsonl")
    assert {t["is_classification"] for t in tasks} == {True, False}
    by_id = {c["id"]: c for c in candidates}
    for t in tasks:
        raw = by_id[t["id"]]["raw_instance"]
        if t["is_classification"]:  # the label is the output, the text written for it the input
            label, text = re.fullmatch(r"Label: (\w+)\nInput: (.+)", raw).groups()
            assert (t["output"], t["input"]) == (label, text)
        else:
            m = re.fullmatch(r"Input: (.+)\nOutput: (.+)", raw)
            assert t["output"] == m.group(2) and t["input"] == ("" if m.group(1) == "None" else m.group(1))
    reasons = Counter(r["reason"] for r in read_jsonl(out / "rejected.jsonl"))
    assert {"duplicate", "banned_word", "similar", "too_short", "empty_input"} <= set(reasons)
    # a classification instance whose input is None is rejected, not accepted with an empty input
    empty = [c for c in made if c["is_classification"] and c["raw_instance"] == "Label: positive\nInput: None"]
    rejected = {r["id"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert all(rejected[c["id"]] in ("empty_input", "similar", "duplicate") for c in empty)


def test_self_instruct_summary_counts_equal_the_files(si_whole):
    _root, _seeds, out, gen = si_whole
    summary = json.loads((out / "summary.json").read_text())
    tasks, rejected = read_jsonl(out / "tasks.jsonl"), read_jsonl(out / "rejected.jsonl")
    sft, candidates = read_jsonl(out / "sft.jsonl"), read_jsonl(out / "candidates.jsonl")
    assert summary["reached_target"] and summary["accepted"] == len(tasks) == len(sft) == 16
    assert summary["rejected"] == dict(sorted(Counter(r["reason"] for r in rejected).items()))
    assert summary["candidates"] == len(candidates) == 6 * summary["rounds"]
    assert summary["accepted_types"] == dict(sorted(Counter(
        "classification" if t["is_classification"] else "generation" for t in tasks).items()))
    # every logged candidate is in exactly one of: accepted, rejected, surplus
    assert len({t["id"] for t in tasks} | {r["id"] for r in rejected}) == len(tasks) + len(rejected)
    assert summary["surplus"] == len(candidates) - len(tasks) - len(rejected)
    assert [t["id"] for t in tasks] == sorted((t["id"] for t in tasks),
                                              key=lambda i: tuple(map(int, i[1:].split("-"))))  # round, k order
    assert gen.usage.requests == sum(map(requests_for, candidates)) == len(gen.requests)
    # nothing accepted is within the threshold of anything in the pool before it (ROUGE by the plain table)
    pool = [s["instruction"] for s in SI_SEEDS]
    for t in tasks:
        assert max(rouge_f(t["instruction"], p) for p in pool) < 0.7
        assert " ".join(plain_tokens(t["instruction"])) not in {" ".join(plain_tokens(p)) for p in pool}
        pool.append(t["instruction"])


def _truncation_points(data: bytes, rng: random.Random) -> list[int]:
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    points = {0, len(data), ends[0], ends[len(ends) // 2], ends[-2]}
    points |= {rng.randrange(1, len(data)) for _ in range(5)}  # torn lines
    return sorted(points)


def test_self_instruct_resume_from_any_prefix_of_the_log(si_whole, tmp_path):
    _root, seeds, whole, _whole_gen = si_whole
    data = (whole / "candidates.jsonl").read_bytes()
    full = {c["id"]: c for c in read_jsonl(whole / "candidates.jsonl")}
    for cut in _truncation_points(data, random.Random(3)):
        out = tmp_path / f"cut{cut}"
        out.mkdir()
        shutil.copy(whole / "settings.json", out / "settings.json")
        (out / "candidates.jsonl").write_bytes(data[:cut])
        kept_text = data[:cut].decode("utf-8", "replace")
        kept = [json.loads(line) for line in kept_text.split("\n")[:-1]]  # complete lines only
        gen = SIGen(delay=0.001)  # resumed with another concurrency: not a setting that changes results
        run_self_instruct(si_config(out, seeds, self_instruct={"concurrency": 1 + cut % 5}), generator=gen,
                          stream=None)
        assert si_files(out) == si_files(whole), cut
        assert summary_without_usage(out) == summary_without_usage(whole), cut
        ids = [c["id"] for c in read_jsonl(out / "candidates.jsonl")]
        assert len(ids) == len(set(ids)) and set(ids) == set(full), cut  # no duplicates, no gaps
        assert ids[:len(kept)] == [c["id"] for c in kept], cut  # appended to, never rewritten
        # only what the prefix did not hold was asked for again
        assert len(gen.requests) == sum(requests_for(c) for i, c in full.items()
                                        if i not in {k["id"] for k in kept}), cut


def test_self_instruct_rerun_of_a_finished_run_and_a_kill_while_writing_outputs(si_whole, tmp_path):
    _root, seeds, whole, _ = si_whole
    out = tmp_path / "again"
    shutil.copytree(whole, out)
    (out / "summary.json").unlink()
    (out / "tasks.jsonl").write_text('{"id": "stale"}\n')
    (out / "sft.jsonl.partial").write_text('{"instruction": "half')  # killed inside write_jsonl
    gen = SIGen()
    run_self_instruct(si_config(out, seeds), generator=gen, stream=None)
    assert gen.requests == [] and si_files(out) == si_files(whole)
    assert summary_without_usage(out) == summary_without_usage(whole)


def test_self_instruct_concurrency_does_not_change_or_reorder_the_outputs(si_whole, tmp_path):
    _root, seeds, whole, _ = si_whole
    serial = run_self_instruct(si_config(tmp_path / "serial", seeds, self_instruct={"concurrency": 1}),
                               generator=SIGen(), stream=None)
    wide = run_self_instruct(si_config(tmp_path / "wide", seeds, self_instruct={"concurrency": 5}),
                             generator=SIGen(delay=0.004), stream=None)
    assert si_files(serial) == si_files(whole) == si_files(wide)
    logged = {c["id"]: c for c in read_jsonl(serial / "candidates.jsonl")}
    assert logged == {c["id"]: c for c in read_jsonl(wide / "candidates.jsonl")}


def test_self_instruct_failed_round_then_resume(si_whole, tmp_path):
    """An outage partway through a round: the round's finished candidates are kept, the summary
    then counts only whole rounds and equals the files; a rerun completes as if never stopped."""
    _root, seeds, whole, _ = si_whole
    out = tmp_path / "outage"
    victims = {c["instruction"] for c in read_jsonl(whole / "candidates.jsonl")
               if c["round"] == 2 and "skipped_after" not in c}
    assert victims
    gen = SIGen(fail_when=lambda content: content.startswith("Is the following")
                and content.split("Task: ", 1)[1].split("\n\n")[0] in victims)
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="of round 2 failed"):
        run_self_instruct(si_config(out, seeds), generator=gen, stream=None)
    logged_round_2 = [c for c in read_jsonl(out / "candidates.jsonl") if c["round"] == 2]
    assert 0 < len(logged_round_2) < 6  # the finished candidates of the failed round are kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["candidates"] == 12
    tasks, rejected = read_jsonl(out / "tasks.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert summary["accepted"] == len(tasks) and sum(summary["rejected"].values()) == len(rejected)
    assert {t["id"][:3] for t in tasks} | {r["id"][:3] for r in rejected} <= {"r0-", "r1-"}
    run_self_instruct(si_config(out, seeds), generator=SIGen(), stream=None)
    assert si_files(out) == si_files(whole)


def test_self_instruct_sft_rows_read_by_the_sft_reader_as_alpaca(si_whole):
    from posttrain.data.formats import load_records

    _root, _seeds, out, _ = si_whole
    tasks = read_jsonl(out / "tasks.jsonl")
    records, _ = load_records([str(out / "sft.jsonl")], log=lambda _: None)
    assert len(records) == len(tasks) and any(t["input"] for t in tasks) and any(not t["input"] for t in tasks)
    for record, task in zip(records, tasks):
        user = task["instruction"] + ("\n\n" + task["input"] if task["input"] else "")
        assert record.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": task["output"]}]


# --------------------------------------------------------------------------- Constitutional AI: a scripted policy

CONSTITUTION = """\
principles:
  - name: kind
    critique: "CRIT-kind: is the reply unkind?"
    revision: "REV-kind: make it kind."
  - name: terse
    critique: "CRIT-terse: is it long?"
    revision: "REV-terse: shorten it."
  - name: cutter
    critique: "CRIT-cutter: anything cut?"
    revision: "REV-cutter: fix it."
  - name: blank
    critique: "CRIT-blank: anything blank?"
    revision: "REV-blank: fill it."
  - name: echo
    critique: "CRIT-echo: anything to repeat?"
    revision: "REV-echo: repeat it."
"""


class CAIPolicy:
    """Initial "answer<P>", then per principle (read from the critique request): kind revises to
    "better<current>", terse critiques with nothing (dropped), cutter's critique hits max_tokens
    (dropped when drop_truncated), blank revises to whitespace (dropped), echo revises to the
    current response unchanged. Prompts with EMPTY get a blank initial answer. Replies depend on
    the request only; a jittered delay shuffles completion order."""

    model_name = "cai-policy"

    def __init__(self, delay: float = 0.0):
        self.usage, self.lock, self.delay = Usage(), threading.Lock(), delay
        self.requests: list[list[dict]] = []

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None) -> Reply:
        with self.lock:
            self.requests.append(messages)
        if self.delay:
            time.sleep(random.Random(json.dumps(messages)).random() * self.delay)
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        self.usage.add(requests=1)
        if not assistant:
            return Reply("  " if "EMPTY" in prompt else f"answer<{prompt}>", "stop", 1, 1)
        principle = re.search(r"CRIT-(\w+)", messages[-1]["content"] if len(assistant) == 1
                              else messages[-3]["content"]).group(1)
        current = assistant[0]
        if len(assistant) == 1:
            text = "" if principle == "terse" else f"critique of {current}"
            return Reply(text, "length" if principle == "cutter" else "stop", 1, 1)
        assert messages[-1]["content"].startswith(f"REV-{principle}")
        text = {"blank": " \n ", "echo": current}.get(principle, f"Revised response: better<{current}>")
        return Reply(text, "stop", 1, 1)


def expected_chain(initial: str, principles: list[str], drop_truncated: bool = True) -> tuple[str, int, list]:
    """(final, revisions kept, dropped reasons) by the rules the README states, from the principles used."""
    current, kept, dropped = initial, 0, []
    for name in principles:
        if name == "terse":
            dropped.append("empty_critique")
        elif name == "cutter" and drop_truncated:
            dropped.append("truncated_critique")
        elif name == "blank":
            dropped.append("empty_revision")
        else:
            current = current if name == "echo" else f"better<{current}>"
            kept, dropped = kept + 1, dropped + [None]
    return current, kept, dropped


CAI_PROMPTS = [f"question {i}" for i in range(14)] + ["EMPTY one", "question with EMPTY"]


def cai_config(out: Path, prompts: Path, constitution: Path, **constitutional) -> ConstitutionalConfig:
    return ConstitutionalConfig.from_dict({
        "output_dir": str(out), "data": {"prompt_files": [str(prompts)]},
        "constitutional": {"constitution": str(constitution), "rounds": 3, "concurrency": 4, "seed": 3,
                           **constitutional}})


def write_cai_inputs(root: Path) -> tuple[Path, Path]:
    prompts, constitution = root / "prompts.jsonl", root / "constitution.yaml"
    prompts.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": p}) + "\n" for i, p in enumerate(CAI_PROMPTS)))
    constitution.write_text(CONSTITUTION)
    return prompts, constitution


@pytest.fixture(scope="module")
def cai_whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("cai")
    prompts, constitution = write_cai_inputs(root)
    policy = CAIPolicy(delay=0.003)
    out = run_constitutional(cai_config(root / "whole", prompts, constitution), policy=policy, stream=None)
    return root, prompts, constitution, out, policy


def test_cai_rounds_requests_and_finals_follow_the_principles_used(cai_whole):
    _root, _prompts, _constitution, out, policy = cai_whole
    chains = {c["id"]: c for c in read_jsonl(out / "chains.jsonl")}
    by_prompt: dict[str, list[list[dict]]] = {}
    for messages in policy.requests:  # each prompt's requests run one after another
        by_prompt.setdefault(messages[0]["content"], []).append(messages)
    used_anywhere = Counter()
    for i, text in enumerate(CAI_PROMPTS):
        chain, requests = chains[f"q{i:02d}"], by_prompt[text]
        if "EMPTY" in text:
            assert len(requests) == 1 and chain["status"] == "empty_response" and chain["rounds"] == []
            continue
        critiques = [r for r in requests if sum(m["role"] == "assistant" for m in r) == 1]
        assert len(critiques) == 3  # constitutional.rounds critiques, one per round
        names = [re.search(r"CRIT-(\w+)", r[-1]["content"]).group(1) for r in critiques]
        used_anywhere.update(names)
        final, kept, dropped = expected_chain(f"answer<{text}>", names)
        assert len(requests) == 1 + 3 + sum(d != "empty_critique" and d != "truncated_critique" for d in dropped)
        assert [s["round"] for s in chain["rounds"]] == [1, 2, 3]
        assert [s["principle"] for s in chain["rounds"]] == names
        assert [s["dropped"] for s in chain["rounds"]] == dropped
        assert (chain["initial"], chain["final"], chain["revisions"]) == (f"answer<{text}>", final, kept)
        assert chain["status"] == ("no_revision" if kept == 0 else "unchanged" if final == chain["initial"]
                                   else "revised")
        # each critique reads the response as it stood after the rounds before it
        current = chain["initial"]
        for step, request in zip(chain["rounds"], critiques):
            assert request[-2] == {"role": "assistant", "content": current}
            if step["dropped"] is None:
                current = step["revision"]
    assert len(used_anywhere) == 5  # 42 draws: every principle, every kind of drop, was exercised
    statuses = Counter(c["status"] for c in chains.values())
    assert {"revised", "no_revision", "empty_response"} <= set(statuses)


def test_cai_pairs_sft_rows_and_summary_equal_the_chains(cai_whole):
    _root, _prompts, _constitution, out, policy = cai_whole
    chains = [c for c in read_jsonl(out / "chains.jsonl")]
    order = {f"q{i:02d}": i for i in range(len(CAI_PROMPTS))}
    chains.sort(key=lambda c: order[c["id"]])
    pairs, sft = read_jsonl(out / "preferences.jsonl"), read_jsonl(out / "sft.jsonl")
    revised = [c for c in chains if c["status"] == "revised"]
    assert [p["id"] for p in pairs] == [c["id"] for c in revised]  # input order, whatever finished first
    for pair, chain in zip(pairs, revised):  # revision > original, linked by id to its chain
        assert pair == {"id": chain["id"], "prompt": [{"role": "user", "content": CAI_PROMPTS[order[chain["id"]]]}],
                        "chosen": chain["final"], "rejected": chain["initial"]}
        assert pair["chosen"].startswith("better<") and pair["rejected"].startswith("answer<")
    with_sft = [c for c in chains if c["status"] in ("revised", "unchanged")]
    assert [r["id"] for r in sft] == [c["id"] for c in with_sft]
    for row, chain in zip(sft, with_sft):
        assert row["messages"][-1] == {"role": "assistant", "content": chain["final"]}
    summary = json.loads((out / "summary.json").read_text())
    steps = [s for c in chains for s in c["rounds"]]
    assert summary["prompts"] == len(CAI_PROMPTS) and summary["status"] == dict(sorted(
        Counter(c["status"] for c in chains).items()))
    assert summary["rounds"] == 3 * (len(CAI_PROMPTS) - 2) == len(steps)
    assert summary["rounds_kept"] == sum(s["dropped"] is None for s in steps)
    assert summary["rounds_dropped"] == dict(sorted(Counter(s["dropped"] for s in steps if s["dropped"]).items()))
    assert summary["principles"] == dict(sorted(Counter(s["principle"] for s in steps).items()))
    assert (summary["sft_rows"], summary["preference_rows"]) == (len(sft), len(pairs))
    assert summary["usage"]["policy"]["requests"] == len(policy.requests) and summary["failed"] == 0

    from posttrain.data.formats import load_records
    from posttrain.data.preferences import load_preference_records

    records, _ = load_records([str(out / "sft.jsonl")], log=lambda _: None)
    assert [r.messages for r in records] == [row["messages"] for row in sft]
    prefs, _ = load_preference_records([str(out / "preferences.jsonl")], log=lambda _: None)
    assert [(p.prompt, p.responses, p.ranks) for p in prefs] == \
        [(row["prompt"], [row["chosen"], row["rejected"]], [0, 1]) for row in pairs]


CAI_OUTPUTS = ("sft.jsonl", "preferences.jsonl")


def cai_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for key in ("usage", "config", "errors"):
        summary.pop(key)
    return summary


def test_cai_resume_from_any_prefix_of_the_log(cai_whole, tmp_path):
    _root, prompts, constitution, whole, whole_policy = cai_whole
    data = (whole / "chains.jsonl").read_bytes()
    cost = Counter(messages[0]["content"] for messages in whole_policy.requests)  # requests per prompt
    text_of = {f"q{i:02d}": t for i, t in enumerate(CAI_PROMPTS)}
    for cut in _truncation_points(data, random.Random(4)):
        out = tmp_path / f"cut{cut}"
        out.mkdir()
        shutil.copy(whole / "settings.json", out / "settings.json")
        (out / "chains.jsonl").write_bytes(data[:cut])
        kept = [json.loads(line)["id"] for line in data[:cut].decode("utf-8", "replace").split("\n")[:-1]]
        policy = CAIPolicy(delay=0.001)
        run_constitutional(cai_config(out, prompts, constitution, concurrency=1 + cut % 6), policy=policy,
                           stream=None)
        for name in CAI_OUTPUTS:
            assert (out / name).read_bytes() == (whole / name).read_bytes(), (cut, name)
        assert cai_summary(out) == cai_summary(whole), cut
        ids = [c["id"] for c in read_jsonl(out / "chains.jsonl")]
        assert ids[:len(kept)] == kept and sorted(ids) == sorted(text_of), cut
        assert len(policy.requests) == sum(cost[text_of[i]] for i in text_of if i not in kept), cut


def test_cai_concurrency_does_not_change_or_reorder_the_outputs(cai_whole, tmp_path):
    _root, prompts, constitution, whole, _ = cai_whole
    for concurrency in (1, 7):
        out = run_constitutional(cai_config(tmp_path / f"c{concurrency}", prompts, constitution,
                                            concurrency=concurrency), policy=CAIPolicy(delay=0.004), stream=None)
        for name in CAI_OUTPUTS:
            assert (out / name).read_bytes() == (whole / name).read_bytes(), (concurrency, name)
        assert cai_summary(out) == cai_summary(whole)
        assert {c["id"]: c for c in read_jsonl(out / "chains.jsonl")} == \
            {c["id"]: c for c in read_jsonl(whole / "chains.jsonl")}


# --------------------------------------------------------------------------- constitution files: clear errors, early


@pytest.mark.parametrize("name, text, message", [
    ("empty.yaml", "", "expected a list of principles"),
    ("scalar.yaml", "- just a sentence\n", "principle 1: expected a mapping with name, critique, revision"),
    ("number.yaml", "- {name: 7, critique: c, revision: r}\n", "principle 1: 'name' must be a non-empty string"),
    ("blank.yml", "- {name: a, critique: '   ', revision: r}\n", "principle 1 ('a'): 'critique' must be a non-empty"),
    ("tabs.yaml", "principles:\n\t- name: a\n", "not valid YAML"),
    ("extra.yaml", "principles: []\nversion: 2\n", "one key 'principles:'"),
    ("c.jsonl", '{"name": "a", "critique": "c", "revision": "r"}\n{"name": "b", "critique": "c"}\n',
     ":2 ('b'): 'revision' must be a non-empty string"),
    ("list.jsonl", '["a", "c", "r"]\n', ":1: expected a JSON object"),
])
def test_bad_constitutions_fail_before_any_request_naming_file_and_place(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    policy = CAIPolicy()
    with pytest.raises(DataError, match=re.escape(message)) as info:
        run_constitutional(cai_config(tmp_path / "run", prompts, path), policy=policy, stream=None)
    assert str(path) in str(info.value)
    assert policy.requests == [] and not (tmp_path / "run" / "chains.jsonl").exists()


def test_constitution_yml_suffix_and_stripped_duplicate_names(tmp_path):
    (tmp_path / "c.yml").write_text("- {name: ' a ', critique: ' x ', revision: y}\n")
    principle = load_constitution(str(tmp_path / "c.yml"))[0]
    assert (principle.name, principle.critique, principle.revision) == ("a", "x", "y")
    (tmp_path / "d.yaml").write_text("- {name: 'a ', critique: x, revision: y}\n"
                                     "- {name: a, critique: z, revision: w}\n")
    with pytest.raises(DataError, match="principle name 'a' is already used"):
        load_constitution(str(tmp_path / "d.yaml"))


def test_cai_chain_records_the_system_message_that_was_actually_sent(tmp_path):
    prompts, constitution = write_cai_inputs(tmp_path)
    prompts.write_text(json.dumps({"id": "s", "prompt": [{"role": "system", "content": "Be terse."},
                                                         {"role": "user", "content": "question"}]}) + "\n")
    policy = CAIPolicy()
    out = run_constitutional(cai_config(tmp_path / "run", prompts, constitution, system="Be verbose."),
                             policy=policy, stream=None)
    sent = {m["content"] for r in policy.requests for m in r if m["role"] == "system"}
    assert sent == {"Be terse."}  # the prompt's own system turn wins; the setting is not sent
    chain = read_jsonl(out / "chains.jsonl")[0]
    assert chain["system"] in (None, "Be terse.")  # not a system message that was never sent


# --------------------------------------------------------------------------- Self-Instruct filters at their edges


class ListGen:
    """Hands out scripted instructions (and finish reasons) in order; concurrency 1 keeps the order."""

    model_name = "list-gen"

    def __init__(self, instructions):
        self.usage, self.items, self.calls = Usage(), list(instructions), Counter()

    def chat(self, messages, **_):
        content = messages[-1]["content"]
        if content.startswith("Come up with"):
            self.calls["instruction"] += 1
            item = self.items.pop(0)
            text, finish = item if isinstance(item, tuple) else (item, "stop")
            return Reply(text, finish, 1, 1)
        if content.startswith("Is the following"):
            self.calls["type"] += 1
            return Reply("no", "stop", 1, 1)
        self.calls["instance"] += 1
        return Reply("Input: None\nOutput: fine", "stop", 1, 1)


def run_list(tmp_path: Path, instructions, **filters):
    seeds = write_seeds(tmp_path / "seeds.jsonl", [
        {"id": "s0", "instruction": "alpha beta gamma delta", "output": "x"},
        {"id": "s1", "instruction": "Write a poem.", "output": "x"}])
    cfg = si_config(tmp_path / "run", seeds, filters=filters, self_instruct={
        "num_tasks": 100, "per_round": len(instructions), "max_rounds": 1, "concurrency": 1, "seed_examples": 2})
    gen = ListGen(instructions)
    out = run_self_instruct(cfg, generator=gen, stream=None)
    verdicts = {r["id"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    verdicts.update({t["id"]: None for t in read_jsonl(out / "tasks.jsonl")})
    return [verdicts[f"r0-{k}"] for k in range(len(instructions))], gen, out


def test_similarity_threshold_is_inclusive_and_the_early_skip_agrees(tmp_path):
    instructions = [
        "alpha beta omega sigma",  # LCS 2 of 4 + 4: F = 4/8 = 0.5 exactly -> similar at 0.5
        "alpha omega beta sigma psi",  # LCS 2 of 4 + 5: F = 4/9 < 0.5 -> kept
        "omega psi alpha beta gamma delta zeta",  # against s0: LCS 4, F = 8/11 -> similar
        "totally new words here",
    ]
    assert rouge_f(instructions[0], "alpha beta gamma delta") == 0.5
    assert rouge_f(instructions[1], "alpha beta gamma delta") == pytest.approx(4 / 9)
    verdicts, gen, out = run_list(tmp_path, instructions, rouge_threshold=0.5, min_words=1)
    assert verdicts == ["similar", None, "similar", None]
    # the similar ones were already similar to the round's starting pool: one request each, no instance
    assert gen.calls == {"instruction": 4, "type": 2, "instance": 2}
    skipped = [c["id"] for c in read_jsonl(out / "candidates.jsonl") if "skipped_after" in c]
    assert sorted(skipped) == ["r0-0", "r0-2"]
    rejected = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    assert rejected["r0-0"]["rouge_l"] == 0.5 and rejected["r0-0"]["most_similar"] == "s0"


def test_threshold_one_rejects_only_exact_word_matches(tmp_path):
    instructions = ["alpha beta gamma delta epsilon",  # F = 8/9 with s0: kept at threshold 1
                    "ALPHA, beta; gamma -- delta!",  # the same words as s0: a duplicate, not 'similar'
                    "alpha beta gamma delta epsilon."]  # the same words as the first, accepted just before
    verdicts, _gen, _ = run_list(tmp_path, instructions, rouge_threshold=1.0, min_words=1)
    assert verdicts == [None, "duplicate", "duplicate"]


def test_length_banned_words_and_truncation_filters_at_their_edges(tmp_path):
    instructions = [
        "one two",  # 2 < min 3
        "one two three",  # exactly min
        "a b c d e f",  # exactly max 6
        "a b c d e f g",  # max + 1
        "Summarise the attached PDF quickly",  # custom banned word, any case
        "Draw a picture of a horse",  # a default banned word, not banned once the list is replaced
        "Send an E-Mail today",  # a banned phrase matches across punctuation (5 words: send an e mail today)
        "Write an email to Bob",  # 'email' is not the phrase 'e mail'
        ("Write a long story about", "length"),  # one line cut by max_tokens
        ("Write a short story\nabout", "length"),  # the cut came after the instruction's line
        "   ",
    ]
    verdicts, gen, _ = run_list(tmp_path, instructions, min_words=3, max_words=6, banned_words=["pdf", "e-mail"],
                                rouge_threshold=0.99)
    assert verdicts == ["too_short", None, None, "too_long", "banned_word", None, "banned_word", None,
                        "truncated_instruction", None, "empty_instruction"]
    # an instruction rejected on its own costs one request; the others three
    assert gen.calls == {"instruction": 11, "type": 5, "instance": 5}


def test_seeding_with_an_earlier_runs_tasks_shows_the_seed_examples_it_planned(si_whole, tmp_path):
    """A natural way to go on growing a task set: the first run's tasks.jsonl (instruction, input,
    output, is_classification, id) is a valid seed file. Each candidate's prompt must then show
    seed_examples (3) seed instructions, plus generated_examples (2) generated ones once there are two
    (seed tasks fill in before that). The same check holds for the run with distinct seed ids."""
    _root, _seeds, first, first_gen = si_whole
    own_seeds = {s["instruction"] for s in SI_SEEDS}
    control = [sum(line in own_seeds for line in listed_tasks(content))
               for content, _ in first_gen.requests if content.startswith("Come up with")]
    assert set(control) <= {3, 4, 5} and 3 in control
    seed_instructions = {t["instruction"] for t in read_jsonl(first / "tasks.jsonl")}
    gen = SIGen()
    try:
        run_self_instruct(si_config(tmp_path / "second", first / "tasks.jsonl", self_instruct={"num_tasks": 10}),
                          generator=gen, stream=None)
    except (DataError, ConfigError):
        return  # refusing seed ids that generated ids could take is a fix too
    shown = [sum(line in seed_instructions for line in listed_tasks(content))
             for content, _ in gen.requests if content.startswith("Come up with")]
    assert set(shown) <= {3, 4, 5}, Counter(shown)  # 4: only one generated task to draw yet


def test_self_instruct_whole_round_outage_still_writes_the_finished_rounds(si_whole, tmp_path):
    """A partial outage in round 2 writes rounds 0-1's tasks, then raises (tested above); an outage of
    the whole of round 2 must do the same: the finished rounds are as good either way."""
    _root, seeds, whole, _ = si_whole
    gen = SIGen()
    calls = Counter()

    def fail_when(content: str) -> bool:
        if content.startswith("Come up with"):
            calls["instruction"] += 1
            return calls["instruction"] > 12  # rounds 0 and 1 (6 each) answer; then the server is down
        return False

    gen.fail_when = fail_when
    from posttrain.errors import UserError

    out = tmp_path / "down"
    with pytest.raises(UserError):
        run_self_instruct(si_config(out, seeds, self_instruct={"concurrency": 1}), generator=gen, stream=None)
    assert [c["round"] for c in read_jsonl(out / "candidates.jsonl")] == [0] * 6 + [1] * 6
    whole_tasks = [t for t in read_jsonl(whole / "tasks.jsonl") if t["round"] < 2]
    assert (out / "tasks.jsonl").is_file(), "no outputs written"
    assert read_jsonl(out / "tasks.jsonl") == whole_tasks


def test_cai_outage_on_resume_still_writes_outputs_from_the_logged_chains(cai_whole, tmp_path):
    from posttrain.errors import UserError

    _root, prompts, constitution, whole, _ = cai_whole
    lines = (whole / "chains.jsonl").read_text().split("\n")[:-1]
    missing = json.loads(lines[-1])["id"]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(whole / "settings.json", out / "settings.json")
    (out / "chains.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # killed before the last chain was written

    class Down(CAIPolicy):
        def chat(self, messages, **kwargs):
            raise RuntimeError("connection refused")

    with pytest.raises(UserError):
        run_constitutional(cai_config(out, prompts, constitution), policy=Down(), stream=None)
    assert (out / "sft.jsonl").is_file(), "no outputs written from the 15 chains logged"
    want = [r for r in read_jsonl(whole / "sft.jsonl") if r["id"] != missing]
    assert read_jsonl(out / "sft.jsonl") == want


class InstanceGen(ListGen):
    def __init__(self, instructions, instance: str):
        super().__init__(instructions)
        self.instance = instance

    def chat(self, messages, **kwargs):
        reply = super().chat(messages, **kwargs)
        if self.calls["instance"] and not messages[-1]["content"].startswith(("Come up with", "Is the following")):
            return Reply(self.instance, "stop", 1, 1)
        return reply


def run_instance(tmp_path: Path, instance: str) -> dict:
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    cfg = si_config(tmp_path / "run", seeds, self_instruct={"num_tasks": 1, "per_round": 1, "max_rounds": 1,
                                                            "concurrency": 1})
    out = run_self_instruct(cfg, generator=InstanceGen(["Explain why the sky looks blue at noon"], instance),
                            stream=None)
    tasks, rejected = read_jsonl(out / "tasks.jsonl"), read_jsonl(out / "rejected.jsonl")
    return tasks[0] if tasks else rejected[0]


def test_instance_fields_parsed_from_a_plain_reply(tmp_path):
    task = run_instance(tmp_path, "input: n/a\nOUTPUT :  Sunlight scatters.\n\nTask: next one")
    assert (task["input"], task["output"]) == ("", "Sunlight scatters.")


def test_instance_with_markdown_bold_labels_is_parsed(tmp_path):
    task = run_instance(tmp_path, "**Input:** None\n**Output:** Sunlight scatters.")
    assert task.get("reason") is None and task["output"] == "Sunlight scatters." and task["input"] == ""


def test_input_none_with_a_full_stop_means_no_input(tmp_path):
    task = run_instance(tmp_path, "Input: None.\nOutput: Sunlight scatters.")
    assert task["output"] == "Sunlight scatters." and task["input"] == ""


def test_resume_refuses_a_changed_seed_file_or_constitution(si_whole, cai_whole, tmp_path):
    _root, _seeds, whole, _ = si_whole
    out = tmp_path / "si"
    shutil.copytree(whole, out)
    changed = write_seeds(tmp_path / "seeds.jsonl", SI_SEEDS[:-1] + [{**SI_SEEDS[-1], "output": "hola"}])
    with pytest.raises(ConfigError, match="seed_file="):
        run_self_instruct(si_config(out, changed), generator=SIGen(), stream=None)
    _root, prompts, _constitution, whole, _ = cai_whole
    out = tmp_path / "cai"
    shutil.copytree(whole, out)
    edited = tmp_path / "constitution.yaml"
    edited.write_text(CONSTITUTION.replace("make it kind", "make it kinder"))
    policy = CAIPolicy()
    with pytest.raises(ConfigError, match="constitution="):
        run_constitutional(cai_config(out, prompts, edited), policy=policy, stream=None)
    assert policy.requests == []


def test_self_instruct_types_fixed_first_from_the_examples(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    flags = {s["id"]: s["is_classification"] for s in SI_SEEDS}
    runs = {}
    for concurrency in (1, 4):
        gen = SIGen(delay=0.002 * (concurrency > 1))
        out = run_self_instruct(si_config(tmp_path / f"c{concurrency}", seeds, self_instruct={
            "task_type": "examples", "classification_fraction": 0.5, "concurrency": concurrency}),
            generator=gen, stream=None)
        runs[concurrency] = si_files(out)
        candidates = read_jsonl(out / "candidates.jsonl")
        assert not any(c.startswith("Is the following") for c, _ in gen.requests)  # no type question asked
        assert {c["type"] for c in candidates} == {"classification", "generation"}
        for c in candidates:
            want = c["type"] == "classification"
            assert c["is_classification"] is want
            # the in-context examples are all of that type (seed tasks by their flag, generated by theirs)
            kinds = {flags[e] if e in flags else next(x["is_classification"] for x in candidates if x["id"] == e)
                     for e in c["examples"]}
            assert kinds == {want}
            if "skipped_after" not in c:
                assert c["type_source"] == "examples" and all(flags[i] is want for i in c["instance_examples"])
        assert len(gen.requests) == sum(map(requests_for, candidates))
    assert runs[1] == runs[4]
    for fraction, kind in ((0.0, False), (1.0, True)):
        out = run_self_instruct(si_config(tmp_path / f"f{fraction}", seeds, self_instruct={
            "task_type": "examples", "classification_fraction": fraction, "num_tasks": 4}),
            generator=SIGen(), stream=None)
        assert {c["is_classification"] for c in read_jsonl(out / "candidates.jsonl")} == {kind}


def test_run_items_under_concurrency_writes_every_group_whole_once(tmp_path):
    def work(item_id, n):
        time.sleep(random.Random(n).random() * 0.004)
        if n % 7 == 3:
            return None  # nothing this time
        return [{"n": n, "j": j} for j in range(1 + n % 4)]

    items = [(f"it{n}", n) for n in range(120)]
    with JsonlLog(tmp_path / "log.jsonl") as log:
        summary = run_items(items, work, log, concurrency=8, stream=None)
    rows = read_jsonl(tmp_path / "log.jsonl")
    expected = {f"it{n}": 1 + n % 4 for n in range(120) if n % 7 != 3}
    assert (summary.written, summary.empty, summary.failed) == (len(expected), 120 - len(expected), 0)
    assert len(rows) == sum(expected.values()) and len({r["id"] for r in rows}) == len(rows)
    position = 0
    while position < len(rows):  # each item's records are contiguous, in order, complete
        item = rows[position]["item"]
        group = rows[position:position + expected[item]]
        assert [(r["id"], r["item"], r["parts"], r["j"]) for r in group] == \
            [(f"{item}/{j}", item, expected[item], j) for j in range(expected[item])]
        assert all(r["n"] == int(item[2:]) for r in group)
        position += expected[item]
    order = [r["item"] for r in rows if r["j"] == 0]
    assert sorted(order) == sorted(expected) and order != sorted(expected, key=lambda i: int(i[2:]))  # jittered
