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
