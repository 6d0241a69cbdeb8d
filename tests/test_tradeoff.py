"""tradeoff.py on constructed curves whose answers are worked by hand."""

import math

import pytest

from minilm.analysis import tradeoff
from minilm.errors import MinilmError

# (fine-tuning loss, forgetting), in training order
STRAIGHT = [(3.0, 0.0), (2.0, 0.1), (1.0, 0.5)]


def test_exact_interpolation_between_two_points():
    # 2.5 lies halfway from 3.0 to 2.0: forgetting halfway from 0.0 to 0.1
    assert tradeoff.forgetting_at(STRAIGHT, 2.5) == pytest.approx(0.05, abs=1e-15)
    # 1.2 lies 4/5 of the way from 2.0 to 1.0: 0.1 + 0.8 · 0.4 = 0.42
    assert tradeoff.forgetting_at(STRAIGHT, 1.2) == pytest.approx(0.42, abs=1e-15)


def test_a_point_exactly_at_the_target_gives_its_own_forgetting():
    assert tradeoff.forgetting_at(STRAIGHT, 2.0) == 0.1
    assert tradeoff.forgetting_at(STRAIGHT, 1.0) == 0.5
    assert tradeoff.forgetting_at(STRAIGHT, 3.0) == 0.0


def test_a_curve_that_starts_below_the_target_gives_its_first_point():
    assert tradeoff.forgetting_at(STRAIGHT, 7.0) == 0.0


def test_a_curve_that_never_reaches_the_target_is_not_counted():
    assert tradeoff.forgetting_at(STRAIGHT, 0.999) is None
    assert tradeoff.forgetting_at([(2.0, 0.3)], 1.5) is None


def test_a_non_monotone_curve_is_read_at_its_first_crossing():
    # loss 3 -> 2 -> 2.5 -> 1.5: 2.2 is first reached between the first two points (0 + 0.1 · 0.8 = 0.08),
    # not where the loss comes down through 2.2 again (0.15 + 0.15 · 0.3 = 0.195)
    bumpy = [(3.0, 0.0), (2.0, 0.1), (2.5, 0.15), (1.5, 0.3)]
    assert tradeoff.forgetting_at(bumpy, 2.2) == pytest.approx(0.08, abs=1e-15)
    # 1.8 is first reached between 2.5 and 1.5 (the rise to 2.5 does not count): 0.15 + 0.15 · 0.7 = 0.255
    assert tradeoff.forgetting_at(bumpy, 1.8) == pytest.approx(0.255, abs=1e-15)


def test_the_second_column_can_be_the_step():
    assert tradeoff.forgetting_at([(3.0, 0), (2.0, 10), (1.0, 20)], 1.25) == pytest.approx(17.5)


def test_the_envelope_over_learning_rates_takes_the_lowest_forgetting_among_curves_that_reach():
    curves = {1e-3: [(3.0, 0.0), (2.0, 0.4)],              # at 2.5: 0.2
              3e-3: [(3.0, 0.0), (2.0, 0.1), (1.0, 0.2)],  # at 2.5: 0.05; lowest loss 1.0
              1e-2: [(3.0, 0.0), (2.8, 0.0)]}              # never reaches 2.5: not counted
    assert tradeoff.best_at(curves, 2.5) == (pytest.approx(0.05), 3e-3)
    assert tradeoff.best_at(curves, 1.5) == (pytest.approx(0.15), 3e-3)  # only 3e-3 gets there
    assert tradeoff.best_at(curves, 0.5) is None                        # none gets there
    assert tradeoff.lowest_loss(curves) == (1.0, 3e-3)
    # a curve with lower forgetting but which never reaches the loss does not win
    curves[1e-2] = [(3.0, -1.0), (2.6, -1.0)]
    assert tradeoff.best_at(curves, 2.5) == (pytest.approx(0.05), 3e-3)


def test_the_lowest_loss_counts_every_point_not_only_the_last():
    assert tradeoff.lowest_loss({"a": [(3.0, 0.0), (1.4, 0.2), (1.6, 0.3)], "b": [(3.0, 0.0), (1.5, 0.1)]}) == \
        (1.4, "a")


def test_the_matched_loss_is_the_highest_lowest_loss_and_every_method_reaches_it():
    methods = {"full": {1: [(3.0, 0.0), (1.0, 0.6)], 2: [(3.0, 0.0), (1.5, 0.2)]},
               "lora": {1: [(3.0, 0.0), (2.0, 0.1)], 2: [(3.0, 0.0), (2.5, 0.0)]}}
    lowest = {m: tradeoff.lowest_loss(c)[0] for m, c in methods.items()}
    assert lowest == {"full": 1.0, "lora": 2.0}
    target = tradeoff.matched_loss(lowest)
    assert target == 2.0
    # full: 1 -> 0.6 · 0.5 = 0.3, 2 -> 0.2 · 2/3 = 0.1333...; lora: 1 -> 0.1, 2 never gets there
    assert tradeoff.best_at(methods["full"], target) == (pytest.approx(0.2 / 1.5), 2)
    assert tradeoff.best_at(methods["lora"], target) == (pytest.approx(0.1), 1)


@pytest.mark.parametrize("curve", [[], [1.0, 2.0], [(1.0, 2.0, 3.0)], [(math.nan, 0.1)], [(2.0, math.inf)]])
def test_bad_curves_are_refused_with_a_message(curve):
    with pytest.raises(MinilmError, match="curve"):
        tradeoff.forgetting_at(curve, 1.0)


def test_bad_targets_and_empty_sweeps_are_refused():
    with pytest.raises(MinilmError, match="finite"):
        tradeoff.forgetting_at(STRAIGHT, math.nan)
    with pytest.raises(MinilmError, match="at least one curve"):
        tradeoff.best_at({}, 1.0)
    with pytest.raises(MinilmError, match="at least one curve"):
        tradeoff.lowest_loss({})
    with pytest.raises(MinilmError, match="finite"):
        tradeoff.matched_loss({"full": math.nan})
