"""Combining rewards: weights, calibration, floors, the Pareto front, function specs."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rewards import CombinedReward, RewardComponent, function_reward, pareto_front

PROMPTS = [[{"role": "user", "content": "q"}]] * 3
RESPONSES = ["a", "bbb", "cc"]


def _length(prompts, responses):
    return [float(len(r)) for r in responses]


def _has_b(prompts, responses):
    return [1.0 if "b" in r else 0.0 for r in responses]


def test_weighted_sum_by_hand():
    combined = CombinedReward([RewardComponent("len", _length, weight=2.0), RewardComponent("b", _has_b, weight=-1.0)])
    totals, raw = combined.score(PROMPTS, RESPONSES)
    assert totals == [2.0, 6.0 - 1.0, 4.0]
    assert raw == {"len": [1.0, 3.0, 2.0], "b": [0.0, 1.0, 0.0]}


def test_calibrate_puts_components_on_one_scale_and_floors_penalise_below():
    combined = CombinedReward([RewardComponent("len", _length), RewardComponent("b", _has_b, floor=0.5)], penalty=10.0)
    stats = combined.calibrate(PROMPTS, RESPONSES)
    assert stats["len"] == pytest.approx((2.0, 1.0))  # mean 2, sample std 1
    totals, _ = combined.score(PROMPTS, RESPONSES)
    b_mean, b_std = 1 / 3, float(torch.tensor([0.0, 1.0, 0.0]).std())
    expected = [(1 - 2) + (0 - b_mean) / b_std - 10 * 0.5 / b_std, (3 - 2) + (1 - b_mean) / b_std,
                (2 - 2) + (0 - b_mean) / b_std - 10 * 0.5 / b_std]  # the shortfall on the calibrated scale
    assert totals == pytest.approx(expected)


def test_pareto_front_keeps_only_undominated_points():
    points = torch.tensor([[1.0, 5.0], [2.0, 4.0], [1.5, 3.0], [2.0, 4.0], [0.5, 5.0], [3.0, 1.0]])
    # [1.5, 3] is beaten by [2, 4]; [0.5, 5] by [1, 5]; the two equal [2, 4] do not dominate each other
    assert pareto_front(points) == [0, 1, 3, 5]


def test_function_specs_and_names_are_checked():
    assert function_reward("tests.rewards_fixture:short")(PROMPTS[:1], ["abcd"]) == [-4.0]
    with pytest.raises(ConfigError, match="package.module:function"):
        function_reward("no_colon")
    with pytest.raises(ConfigError, match="cannot be imported"):
        function_reward("tests.rewards_fixture:missing")
    with pytest.raises(ConfigError, match="distinct names"):
        CombinedReward([RewardComponent("x", _length), RewardComponent("x", _has_b)])
