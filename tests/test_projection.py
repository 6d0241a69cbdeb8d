"""The map's geometry (analysis/projection.py, analysis/vector_map.py) against NumPy references and planted moves.

Oracles: a word whose vector does not change does not move on the map (bit for bit); a planted move of one word
moves that word alone, by exactly its projection; the share of variance kept equals the top two eigenvalues of
the union's covariance over their sum; cosines and neighbours equal a direct computation.
"""

import numpy as np
import pytest

from map_fixture import LEVELS, MOVED, STEPS, WORDS, planted_map, planted_states
from minilm.analysis import projection, vector_map


def union(n_states=3, m=7, d=11, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(m, d)) * np.linspace(3, 0.5, d) for _ in range(n_states)]


def test_variance_share_matches_the_covariance_eigenvalues():
    states = union()
    fitted = projection.fit(states)
    rows = np.concatenate(states)
    eigen = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False)))[::-1]
    assert fitted.variance_share == pytest.approx(eigen[:2].sum() / eigen.sum(), rel=1e-10)
    np.testing.assert_allclose(fitted.axes.T @ fitted.axes, np.eye(2), atol=1e-12)  # orthonormal
    np.testing.assert_allclose(fitted.mean, rows.mean(axis=0), atol=1e-12)


def test_unchanged_vectors_do_not_move_and_a_planted_move_moves_only_that_word():
    before = union(1)[0]
    after = before.copy()
    delta = np.arange(11) / 10.0
    after[4] += delta
    fitted = projection.fit([before, after, before])
    p_before, p_after = projection.project(fitted, before), projection.project(fitted, after)
    np.testing.assert_array_equal(np.delete(p_after, 4, axis=0), np.delete(p_before, 4, axis=0))
    np.testing.assert_allclose(p_after[4] - p_before[4], delta @ fitted.axes, atol=1e-12)
    assert np.linalg.norm(p_after[4] - p_before[4]) > 0
    np.testing.assert_array_equal(projection.project(fitted, before.copy()), p_before)


def test_a_word_absent_from_a_state_is_left_out_and_stays_nan():
    states = union(2)
    states[1][2] = np.nan
    fitted = projection.fit(states)
    reference = projection.fit([states[0], np.delete(states[1], 2, axis=0)])
    np.testing.assert_allclose(fitted.axes, reference.axes)
    assert np.isnan(projection.project(fitted, states[1])[2]).all()


def test_the_map_moves_only_the_planted_words_and_its_numbers_match_a_direct_computation():
    data, (base, states) = planted_map(), planted_states()
    assert data["steps"] == [0, *STEPS] and data["levels"] == LEVELS and data["dimensions"] == 16
    still = [k for k in range(len(WORDS)) if k not in MOVED]
    for level in LEVELS:
        for variant in ("full", "lora"):
            xy = np.array(data["xy"][level][variant], dtype=float)  # (steps, M, 2)
            assert (xy[:, still] == xy[0, still]).all(), (level, variant)
            moves = np.linalg.norm(xy[-1, list(MOVED)] - xy[0, list(MOVED)], axis=-1)
            assert (moves > 0).all() == (not (variant == "lora" and level == "static"))
        # one projection for every state: the base is the same point in every variant
        assert data["xy"][level]["full"][0] == data["xy"][level]["lora"][0]
    x = states["full"][STEPS[-1]]["layer 1"]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert data["partner_cos"]["layer 1"]["full"][-1][0] == pytest.approx(cos[0, 1], abs=1e-4)
    assert data["partner_cos"]["layer 1"]["full"][-1][12] is None  # w12 has no partner
    b = base["layer 1"] / np.linalg.norm(base["layer 1"], axis=1, keepdims=True)
    assert data["self_cos"]["layer 1"]["full"][-1][1] == pytest.approx(b[1] @ unit[1], abs=1e-4)
    np.fill_diagonal(cos, -np.inf)
    assert data["neighbours"]["layer 1"]["full"][-1] == np.argsort(-cos, axis=1)[:, :3].tolist()
    assert data["partner"][:2] == [1, 0] and data["role"][2] == "control" and data["group"][12] == ""


def test_the_map_refuses_variants_with_different_steps():
    base, states = planted_states()
    del states["lora"][STEPS[0]]
    with pytest.raises(ValueError, match="same steps"):
        vector_map.build(WORDS, {}, [], [], base, states)
