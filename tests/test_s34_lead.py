"""Small fixes made by the lead in stop 34, each pinned here.

- A logged line over several steps keeps a figure that only earlier steps had (KTO's per-class
  figures, in a step without that class): its mean over the steps that had it.
"""

from __future__ import annotations

from posttrain.train.metrics import add_to_interval, close_interval


def test_a_line_keeps_a_figure_only_earlier_steps_had():
    interval: dict = {}
    add_to_interval(interval, {"step": 1, "loss": 1.0, "rewards/chosen": 0.5, "rewards/rejected": -0.5})
    add_to_interval(interval, {"step": 2, "loss": 3.0, "rewards/chosen": 1.5})
    add_to_interval(interval, {"step": 3, "loss": 2.0, "rewards/chosen": 1.0})
    line = close_interval(interval)
    assert line == {"step": 3, "loss": 2.0, "rewards/chosen": 1.0, "rewards/rejected": -0.5, "steps_averaged": 3}
    assert list(line)[:3] == ["step", "loss", "rewards/chosen"]  # the last step's order first


def test_a_constitutional_revision_in_typographic_quotes_is_unwrapped():
    """clean_revision and Self-Instruct's clean_instruction share one unwrapping rule
    (`constitutional.unquoted`): straight or typographic quotes around the whole text go, quotes
    inside as well keep it."""
    from posttrain.feedback.constitutional import clean_revision

    assert clean_revision("“A kinder answer.”") == "A kinder answer."
    assert clean_revision('"A kinder answer."') == "A kinder answer."
    assert clean_revision("«Réponse»") == "Réponse"
    assert clean_revision('"One" and "two"') == '"One" and "two"'


def test_a_table_flag_cell_is_read_one_way_for_kto_labels_and_seed_tasks():
    from posttrain.data.formats import flag_cell

    assert [flag_cell(v) for v in (True, " TRUE ", "0", 1, 0, False)] == [True, True, False, True, False, False]
    assert [flag_cell(v) for v in ("yes", 2, None, 1.0)] == [None, None, None, None]


def test_report_md_says_what_decontamination_did_not_search():
    from posttrain.data.quality.report import _contamination

    c = {"eval_rows": 40, "contaminated_rows": 1, "ngram": 13, "eval_rows_leaked": 1, "on": "prompt",
         "eval_rows_malformed": 2, "shared_ngrams_left_out": 7, "max_shared": 10}
    text = " ".join(_contamination(c))
    assert "2 evaluation rows could not be read (malformed): not searched for." in text
    assert "7 sequences found in more than 10 evaluation rows: taken for a shared template" in text
    assert "could not be read" not in " ".join(_contamination(c | {"eval_rows_malformed": 0}))
