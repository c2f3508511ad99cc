"""Preference data rules pinned at stop 33 (backlog items):

- a pair's own scores (UltraFeedback's `score_chosen` / `score_rejected`, SHP's `score_ratio`):
  equal scores are a tie, and scores that put the rejected side first contradict the row; both are
  bad rows named by file:line, never trained as a preference;
- a response repeated in a K-way ranking: under the same rank it is one answer, kept once; under
  two ranks only that answer is removed (the rest of the ranking trains); both counted in the log
  and data_report.json; the row is bad only when nothing ranked apart is left;
- KTO from rankings: a ranking gives its ends, the best desirable and the worst undesirable, as a
  pair gives its two sides, so a K-way prompt weighs as a pair's (2 items, not K); the middle
  responses left out are counted in the log.
"""

from __future__ import annotations

import json
import types

import pytest

from posttrain.data.formats import BadRowError
from posttrain.data.preferences import load_preference_records, prepare_preference_data, to_preference_record
from posttrain.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.presets import build_tokenizer

    return build_tokenizer()


def _cfg(files, **changes):
    cfg = dict(train_files=files, eval_files=[], eval_fraction=0.0, format="auto", template="auto",
               max_length=256, overlength="truncate", bad_rows="error", max_bad_fraction=0.0,
               synthetic_tasks=[], synthetic_size=0, synthetic_kind="pairs", synthetic_responses=2)
    return types.SimpleNamespace(**(cfg | changes))


def _reason(row, fmt):
    with pytest.raises(BadRowError) as info:
        to_preference_record(row, fmt)
    return info.value.reason


# --------------------------------------------------------------------------- item 1: a pair's scores


PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("scores", [{"score_chosen": 7.0, "score_rejected": 7.0}, {"score_chosen": "5", "score_rejected": 5},
                                    {"score_ratio": 1.0}])
def test_a_pair_with_tied_scores_is_a_bad_row(scores):
    assert "tied scores, so no preference" in _reason(PAIR | scores, "pairs")


@pytest.mark.parametrize("scores", [{"score_chosen": 3, "score_rejected": 8}, {"score_ratio": 0.5}])
def test_a_pair_whose_scores_favour_the_rejected_side_is_a_bad_row(scores):
    assert "favour 'rejected'" in _reason(PAIR | scores, "pairs")


@pytest.mark.parametrize("scores", [{"score_chosen": 8, "score_rejected": 3.5}, {"score_ratio": 2.5}, {},
                                    {"score_chosen": None, "score_rejected": ""}])
def test_a_pair_whose_scores_agree_or_are_absent_reads_as_before(scores):
    assert to_preference_record(PAIR | scores, "pairs").ranks == [0, 1]


@pytest.mark.parametrize("scores, reason", [({"score_chosen": 8}, "'score_chosen' without 'score_rejected'"),
                                            ({"score_ratio": 0}, "'score_ratio' is 0"),
                                            ({"score_chosen": "x", "score_rejected": 1}, "'score_chosen' is 'x'")])
def test_half_given_or_malformed_scores_are_bad_rows(scores, reason):
    assert reason in _reason(PAIR | scores, "pairs")


def test_tied_and_contradicted_pairs_are_named_by_file_line_or_skipped_and_counted(tmp_path):
    path = tmp_path / "uf.jsonl"
    rows = [PAIR | {"score_chosen": 9, "score_rejected": 4}, PAIR | {"score_chosen": 6, "score_rejected": 6},
            PAIR | {"score_chosen": 2, "score_rejected": 8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        load_preference_records([str(path)], log=lambda *_: None)
    assert f"{path}:2" in str(info.value) and "tied scores, so no preference" in str(info.value)
    assert f"{path}:3" in str(info.value)
    records, report = load_preference_records([str(path)], bad_rows="skip", max_bad_fraction=1.0,
                                              rejects_path=str(tmp_path / "rejects.jsonl"), log=lambda *_: None)
    assert [r.source for r in records] == [f"{path}:1"] and report.bad == 2
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------------------------- item 2: repeated responses in a ranking


def test_the_same_answer_under_the_same_rank_is_kept_once_and_counted():
    record = to_preference_record({"prompt": "q", "responses": ["a", "b", "a", "c"], "ranks": [0, 1, 0, 2]},
                                  "ranking")
    assert (record.responses, record.ranks) == (["a", "b", "c"], [0, 1, 2])
    assert (record.merged_responses, record.contradicted_responses) == (1, 0)


def test_the_same_answer_under_two_ranks_is_removed_and_the_rest_of_the_ranking_kept():
    record = to_preference_record({"prompt": "q", "responses": ["a", "b", "c", "a", "d"], "ranks": [0, 1, 2, 3, 4]},
                                  "ranking")
    assert (record.responses, record.ranks) == (["b", "c", "d"], [0, 1, 2])  # dense again
    assert (record.merged_responses, record.contradicted_responses) == (0, 2)


def test_a_ranking_with_nothing_ranked_apart_left_is_a_bad_row():
    reason = _reason({"prompt": "q", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]}, "ranking")
    assert reason.startswith("responses 1 and 3 are the same text but ranked differently")
    assert "nothing ranked apart is left" in reason
    both = _reason({"prompt": "q", "responses": ["a", "b", "a", "b"], "ranks": [0, 1, 1, 0]}, "ranking")
    assert both.startswith("responses 1 and 3 are the same text but ranked differently")
    assert "nothing ranked apart is left" in both


def test_repeated_responses_are_counted_in_the_log_and_data_report(tmp_path, tokenizer):
    path = tmp_path / "r.jsonl"
    rows = [{"prompt": "Pick", "responses": ["x", "y", "x"], "ranks": [0, 1, 0]},
            {"prompt": "Pick again", "responses": ["x", "y", "z", "x"], "ranks": [0, 1, 2, 3]},
            {"prompt": "Plain", "responses": ["x", "y"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    data = prepare_preference_data(_cfg([str(path)]), tokenizer, tmp_path / "run", 0, log=logged.append)
    assert [len(e.sequences) for e in data.train] == [2, 2, 2]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train_length"]["repeated_responses"]
    assert report == {"merged": 1, "removed_contradicted": 2, "records": 2, "sources": [f"{path}:1", f"{path}:2"]}
    said = [line for line in logged if "repeated" in line]
    assert said and f"{path}:2" in said[0] and "1 merged" in said[0] and "2 removed" in said[0]


# --------------------------------------------------------------------------- item 4: KTO from rankings


def test_kto_takes_a_rankings_best_and_worst_so_every_prompt_weighs_as_a_pair(tokenizer):
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.data.templates import CHATML
    from posttrain.train.grouped import items_from_examples
    from posttrain.train.preference import kto_items

    def record(prompt, responses, ranks, source):
        return PreferenceRecord([{"role": "user", "content": prompt}], responses, ranks=ranks, source=source)

    records = [record("Pair", ["a", "b"], [0, 1], "p:1"),
               record("Four", ["w", "x", "y", "z"], [0, 1, 2, 3], "r:1"),
               record("Tied", ["a", "b", "c", "d"], [0, 0, 1, 2], "r:2")]  # both best answers are desirable
    items = items_from_examples([encode_preference(r, tokenizer, CHATML) for r in records])
    logged = []
    single = kto_items(items, 512, logged.append)
    per_prompt = {s: [i.desirable for i in single if i.source == s] for s in ("p:1", "r:1", "r:2")}
    assert per_prompt == {"p:1": [True, False], "r:1": [True, False], "r:2": [True, True, False]}
    said = [line for line in logged if "middle" in line]
    assert said and "3 middle-ranked responses of 2 rankings" in said[0]
