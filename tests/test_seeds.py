"""minilm.analysis.seeds on constructed numbers: intervals, tests, Holm, verdicts.

The references are independent of scipy's t: a table value of t(0.975, 4), the closed-form CDF of
Student's t with 2 degrees of freedom, the normal limit at large N, and Holm's procedure worked by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minilm.analysis import seeds
from minilm.errors import MinilmError

T_975_DF4 = 2.776  # printed t tables, 4 degrees of freedom, two-sided 95%


def test_interval_against_a_table_value():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, s = √2.5
    f = seeds.finding("x", values, 0.0)
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    assert f.mean == 3.0 and f.n == 5
    np.testing.assert_allclose([3 - f.low, f.high - 3], [half, half], rtol=2e-4)  # the table's 4 digits


def test_p_value_against_the_closed_form_cdf_of_two_degrees_of_freedom():
    values = [1.0, 2.0, 4.0]  # N 3: df 2, where P(T <= t) = 1/2 + t / (2 √(2 + t²))
    x = np.asarray(values)
    t = (x.mean() - 0.5) / (x.std(ddof=1) / math.sqrt(3))
    want = 1 - t / math.sqrt(2 + t * t)  # 2 · (1 - cdf(t))
    assert seeds.finding("x", values, 0.5).p == pytest.approx(want, rel=1e-10)


def test_interval_approaches_the_normal_one_at_large_n():
    x = np.random.default_rng(0).normal(1.0, 2.0, size=20_000)
    f = seeds.finding("x", x, 0.0)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    np.testing.assert_allclose([f.low, f.high], [x.mean() - half, x.mean() + half], rtol=1e-5)


def test_rejected_at_alpha_is_the_interval_excluding_the_threshold():
    rng = np.random.default_rng(1)
    for _ in range(200):
        values, threshold = rng.normal(0.0, 1.0, size=5) + rng.normal(0, 1.5), rng.normal()
        f = seeds.finding("x", values, threshold)
        assert (f.p < seeds.ALPHA) == (f.low > threshold or f.high < threshold)


def test_straddling_interval_is_not_settled():
    f = seeds.finding("x", [-0.02, 0.03, 0.01, -0.01, 0.02], 0.0)
    assert f.low < 0 < f.high
    assert seeds.settle([f]) == ["not settled by 5 seeds"]


def test_clear_effect_is_true_and_its_mirror_false():
    values = [1.0, 1.1, 0.9, 1.05, 0.95]
    assert seeds.settle([seeds.finding("x", values, 0.0)]) == ["true"]
    assert seeds.settle([seeds.finding("x", [-v for v in values], 0.0)]) == ["false"]
    # the same numbers against a claim of the other direction ("mean < 0")
    assert seeds.settle([seeds.finding("x", values, 0.0, above=False)]) == ["false"]


def test_flipping_one_seed_flips_what_it_should():
    values = [0.10, 0.11, 0.09, 0.10, 0.105]
    assert seeds.settle([seeds.finding("x", values, 0.0)]) == ["true"]
    flipped = [-0.10, *values[1:]]  # one seed now says the opposite: the spread swallows the effect
    assert seeds.settle([seeds.finding("x", flipped, 0.0)]) == ["not settled by 5 seeds"]
    below = [0.01, 0.011, 0.009, 0.01, 0.0105]  # just under a threshold of 0.0104 ...
    assert seeds.settle([seeds.finding("x", below, 0.0104)]) == ["not settled by 5 seeds"]
    assert seeds.settle([seeds.finding("x", [0.02, *below[1:]], 0.0104)]) == ["not settled by 5 seeds"]


def test_no_spread_falls_back_to_the_sign_test():
    f = seeds.finding("x", [0.0] * 5, 0.01)  # five equal values below: 2 · 2^-5 = 0.0625
    assert (f.low, f.high, f.p) == (0.0, 0.0, 0.0625) and seeds.settle([f]) == ["not settled by 5 seeds"]
    assert seeds.settle([seeds.finding("x", [0.0] * 6, 0.01)]) == ["false"]  # 2 · 2^-6 = 0.03125
    f = seeds.finding("x", [0.0] * 9, 0.0)  # on the threshold: no evidence either way
    assert (f.low, f.high, f.p) == (0.0, 0.0, 1.0) and seeds.settle([f]) == ["not settled by 9 seeds"]


def test_one_seed_settles_nothing():
    f = seeds.finding("x", [5.0], 0.0)
    assert math.isnan(f.low) and seeds.settle([f]) == ["not settled by 1 seed"]


def test_holm_against_a_worked_example():
    # p sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> stays 0.06).
    # Step-down at 0.05: 0.005 <= 0.05/4 yes, 0.01 <= 0.05/3 yes, 0.03 <= 0.05/2 no: stop, so 0.04 is
    # not rejected although it is below 0.05 on its own.
    adjusted = seeds.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    assert list(adjusted <= 0.05) == [True, False, False, True]


def test_settle_corrects_over_the_family():
    alone = seeds.finding("x", [0.3, 0.9, 0.5, 1.3, 0.2], 0.0)  # p 0.035: true on its own
    assert 0.01 < alone.p < 0.05 and seeds.settle([alone]) == ["true"]
    noise = seeds.finding("y", [-1.0, 1.0, 0.5, -0.5, 0.1], 0.0)
    assert seeds.settle([alone, noise]) == ["not settled by 5 seeds"] * 2  # 0.035 > 0.05 / 2


def test_combine_names_what_each_verdict_holds_for():
    assert seeds.combine([("a", "true"), ("b", "true")]) == "true"
    assert seeds.combine([("a", "true"), ("b", "false"), ("c", "true"), ("d", "not settled by 5 seeds")]) == \
        "true for a, c; false for b; not settled by 5 seeds for d"


def test_bad_values_are_refused():
    with pytest.raises(MinilmError, match="one finite number per seed"):
        seeds.finding("x", [1.0, float("nan")], 0.0)
    with pytest.raises(MinilmError, match="one finite number per seed"):
        seeds.finding("x", [], 0.0)


def test_judge_corrects_over_every_claim_of_a_report():
    clear = seeds.finding("clear", [1.0, 1.1, 0.9, 1.05, 0.95], 0.0)  # p ≈ 1.4e-5
    weak = seeds.finding("weak", [0.1, 0.3, 0.2, 0.25, 0.15], 0.0)   # p ≈ 0.0039: alone it would be settled
    noise = [seeds.finding(f"noise {i}", [-1.0, 1.0, -0.5, 0.5, 0.01 * i], 0.0) for i in range(12)]
    alone = seeds.judge([{"claim": "b", "findings": [weak]}])
    assert alone[0]["verdict"] == "true" and alone[0]["findings"][0]["p_holm"] == weak.p
    claims = seeds.judge([{"claim": "a", "findings": [clear]}, {"claim": "b", "findings": [weak]},
                          {"claim": "c", "findings": noise, "note": "why"}])
    # 14 findings: weak's p is the second smallest, so Holm compares it with α/13, which it misses
    assert claims[0]["verdict"] == "true" and claims[1]["verdict"] == "not settled by 5 seeds"
    assert claims[1]["findings"][0]["p_holm"] == pytest.approx(13 * weak.p)
    assert claims[2]["note"] == "why" and claims[0]["note"] == ""
    assert claims[0]["evidence"].startswith("clear: +1 [")


def test_detectable_effect_has_the_power_it_claims():
    # Monte Carlo oracle: draw N normal seeds with the detectable mean; the t-test rejects at the stated rate
    n, spread, alpha = 5, 0.05, 0.01
    effect = seeds.detectable_effect(spread, n, alpha, power=0.8)
    rng = np.random.default_rng(0)
    draws = rng.normal(effect, spread, size=(40_000, n))
    t = draws.mean(1) / (draws.std(1, ddof=1) / math.sqrt(n))
    critical = 4.604  # t(0.995, 4), printed tables
    assert np.mean(np.abs(t) > critical) == pytest.approx(0.8, abs=0.01)
    # the normal limit at large N: (z_{1-α/2} + z_power) σ/√N
    assert seeds.detectable_effect(1.0, 10_000, 0.05, 0.8) == pytest.approx((1.959964 + 0.841621) / 100, rel=1e-3)
    # more seeds or a looser level detect less; no spread detects anything
    assert seeds.detectable_effect(spread, 10, alpha) < effect < seeds.detectable_effect(spread, 5, alpha / 10)
    assert seeds.detectable_effect(0.0, 5) == 0.0
    with pytest.raises(MinilmError, match="n >= 2"):
        seeds.detectable_effect(1.0, 1)
