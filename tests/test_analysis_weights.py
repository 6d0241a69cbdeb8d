"""Oracles for minilm.analysis.weights.

Each metric is checked against an independent plain-NumPy computation (eigendecompositions of WᵀW and
WWᵀ instead of the SVD, explicit loops, reconstructions) on random matrices of pairwise-distinct shapes,
and on constructed matrices whose answer is known in closed form.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from minilm.analysis import weights as W
from minilm.errors import MinilmError

SHAPES = [(7, 11), (13, 5), (6, 6)]


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def orthonormal(d, r, seed):
    q, _ = np.linalg.qr(rand((d, r), seed))
    return q


def eig_vectors(m, n):
    """Top-n eigenvectors (as rows, descending eigenvalue) of the symmetric PSD matrix m."""
    _, vectors = np.linalg.eigh(m)
    return vectors[:, ::-1][:, :n].T


def eig_singular_values(w):
    n = min(w.shape)
    return np.sqrt(np.clip(np.linalg.eigvalsh(w.T @ w)[::-1][:n], 0, None))


def svd_form(s, d_in, d_out, seed):
    """W0 = U diag(s) Vᵀ with known U (d_in, n), V (d_out, n)."""
    u, v = orthonormal(d_in, len(s), seed), orthonormal(d_out, len(s), seed + 1)
    return u, v, u @ np.diag(s) @ v.T


# --- against independent references on random matrices -------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_metrics_match_references(shape):
    w = rand(shape, 1)
    s = W.singular_values(w)
    np.testing.assert_allclose(s, eig_singular_values(w), rtol=1e-10)
    assert np.all(np.diff(s) <= 0)
    assert W.stable_rank(s) == pytest.approx(np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2, rel=1e-12)
    p = [x / sum(s) for x in s]
    assert W.effective_rank(s) == pytest.approx(np.exp(-sum(x * np.log(x) for x in p)), rel=1e-12)

    # Capture from reconstructions: 1 - ||Δ - Δ_k||² / ||Δ||², Δ_k the truncated SVD.
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    residual = [np.linalg.norm(w - u[:, :k] @ np.diag(sv[:k]) @ vt[:k]) ** 2 for k in range(1, len(sv) + 1)]
    capture = 1 - np.array(residual) / np.linalg.norm(w) ** 2
    np.testing.assert_allclose(W.lowrank_capture(w), capture, atol=1e-12)
    for energy in (0.3, 0.9, 0.99, 1.0):
        expected = next(k for k in range(1, len(sv) + 1) if capture[k - 1] >= energy - 1e-12)
        assert W.energy_rank(s, energy) == expected


def test_change_stats_and_jax_input():
    w0, w = rand((7, 11), 2), rand((7, 11), 3)
    stats = W.change_stats(jnp.asarray(w0, dtype=jnp.float32), w)
    w0_32 = np.asarray(jnp.asarray(w0, dtype=jnp.float32), dtype=np.float64)
    d = (w - w0_32).ravel()
    assert stats["fro"] == pytest.approx(np.sqrt(sum(x * x for x in d)), rel=1e-12)
    assert stats["relative"] == pytest.approx(stats["fro"] / np.sqrt(np.sum(w0_32**2)), rel=1e-12)
    assert stats["max_abs"] == max(abs(x) for x in d)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["output", "input"])
def test_intruders_match_eigenvector_reference(shape, side):
    w0 = rand(shape, 4)
    w = w0 + 0.8 * rand(shape, 5)
    gram = (lambda m: m.T @ m) if side == "output" else (lambda m: m @ m.T)
    n, k = min(shape), 4
    top, base = eig_vectors(gram(w), n)[:k], eig_vectors(gram(w0), n)
    expected = [max(abs(float(t @ b)) for b in base) for t in top]
    out = W.intruder_dimensions(w0, w, k=k, epsilon=0.6, side=side)
    np.testing.assert_allclose(out["max_cosine"], expected, atol=1e-9)
    assert out["indices"] == [i for i, c in enumerate(expected) if c < 0.6]
    assert out["count"] == len(out["indices"])
    sweep = W.intruder_sweep(w0, w, k=k, epsilons=(0.2, 0.6, 1.01), side=side)
    assert sweep == {0.2: sum(c < 0.2 for c in expected), 0.6: out["count"], 1.01: k}


@pytest.mark.parametrize("shape", SHAPES)
def test_amplification_matches_reference(shape):
    w0, delta, r = rand(shape, 6), rand(shape, 7), 2
    u, v = eig_vectors(delta @ delta.T, r).T, eig_vectors(delta.T @ delta, r).T  # (d_in, r), (d_out, r)
    out = W.amplification(w0, delta, r, seed=3)
    assert out["onto_delta"] == pytest.approx(np.linalg.norm(u.T @ w0 @ v), rel=1e-9)
    assert out["onto_w0"] == pytest.approx(np.sqrt(np.sum(eig_singular_values(w0)[:r] ** 2)), rel=1e-9)
    assert out["factor"] == pytest.approx(np.linalg.norm(delta) / out["onto_delta"], rel=1e-12)
    assert out["onto_random"] <= out["onto_w0"] + 1e-12  # W0's own directions are the best possible
    assert out == W.amplification(w0, delta, r, seed=3)  # seeded


def test_subspace_similarity_matches_loops():
    u1, u2 = orthonormal(11, 3, 8), orthonormal(11, 5, 9)
    phi = W.subspace_similarity(u1, u2)
    assert phi.shape == (3, 5)
    for i in range(1, 4):
        for j in range(1, 6):
            expected = np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
            assert phi[i - 1, j - 1] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_magnitude_direction_matches_loop(shape):
    w0, w = rand(shape, 10), rand(shape, 11)
    cols = range(shape[1])

    def norm(x):
        return np.sqrt(sum(v * v for v in x))

    dm = np.mean([abs(norm(w[:, j]) - norm(w0[:, j])) for j in cols])
    dd = np.mean([1 - (w[:, j] @ w0[:, j]) / (norm(w[:, j]) * norm(w0[:, j])) for j in cols])
    assert W.magnitude_direction(w0, w) == pytest.approx((dm, dd), rel=1e-12)


# --- constructed cases with known answers ---------------------------------------------------------

def test_rank3_delta():
    delta = rand((13, 3), 12) @ rand((3, 11), 13)
    s = W.singular_values(delta)
    capture = W.lowrank_capture(delta)
    assert W.energy_rank(s) <= 3 and W.energy_rank(s, 1.0) == 3
    assert 1 < W.effective_rank(s) <= 3 + 1e-9
    assert capture[2] == pytest.approx(1, abs=1e-12) and capture[-1] == 1.0
    assert np.all(np.diff(capture) >= 0)


def test_known_ranks_and_zero_matrix():
    assert W.effective_rank(np.full(5, 2.5)) == pytest.approx(5, abs=1e-12)
    assert W.stable_rank(W.singular_values(np.outer(rand(7, 14), rand(11, 15)))) == pytest.approx(1, abs=1e-12)
    zero = np.zeros((7, 11))
    s = W.singular_values(zero)
    assert (W.stable_rank(s), W.effective_rank(s), W.energy_rank(s)) == (0.0, 0.0, 0)
    assert not np.any(np.isnan(W.lowrank_capture(zero))) and not np.any(np.isnan(W.spectral_gaps(s, 3)))


def test_spectral_gaps():
    np.testing.assert_allclose(W.spectral_gaps([8.0, 4.0, 2.0, 2.0, 1.0], 3), [2.0, 2.0, 1.0])
    np.testing.assert_allclose(W.spectral_gaps([3.0, 0.0, 0.0], 5), [np.inf, 1.0])


def test_rotation_inside_top_subspace_has_no_intruders():
    s = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.0])
    u, v, w0 = svd_form(s, 7, 11, 16)
    theta = np.pi / 6
    rot = np.eye(7)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    w = (u @ rot) @ np.diag(s) @ (v @ rot).T  # top-2 singular pairs turned by 30° within their span
    for side in ("output", "input"):
        out = W.intruder_dimensions(w0, w, k=5, epsilon=0.5, side=side)
        assert out["count"] == 0
        np.testing.assert_allclose(out["max_cosine"], [np.cos(theta)] * 2 + [1.0] * 3, atol=1e-9)


def test_new_orthogonal_direction_is_one_intruder_ranked_first():
    s = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.0])
    u, v, w0 = svd_form(s, 7, 11, 17)  # rank 7 < d_out = 11: room for a new output direction
    z = rand(11, 18)
    z -= v @ (v.T @ z)
    z /= np.linalg.norm(z)  # orthogonal to every output singular vector of W0
    big = 2 * s[0]
    w = w0 + big * np.outer(u[:, -1], z)  # the weakest input direction now writes strongly into z
    out = W.intruder_dimensions(w0, w, k=7, epsilon=0.5)
    assert out["count"] == 1 and out["indices"] == [0]
    # W's top output vector is (σ7 v7 + big z)/norm: its best cosine with W0 is σ7 / sqrt(σ7² + big²).
    np.testing.assert_allclose(out["max_cosine"], [s[-1] / np.hypot(s[-1], big)] + [1.0] * 6, atol=1e-9)
    # In input space nothing new appeared: u7 merely moved to the top.
    assert W.intruder_dimensions(w0, w, k=7, epsilon=0.5, side="input")["count"] == 0


def test_amplification_of_scaled_w0():
    s = np.array([9.0, 7.0, 5.0, 3.0, 2.0])
    u, v, w0 = svd_form(s, 13, 5, 19)
    c, r = 0.3, 2
    w0_r = u[:, :r] @ np.diag(s[:r]) @ v[:, :r].T
    out = W.amplification(w0, c * w0_r, r)  # ΔW = c · (best rank-r W0): ΔW's directions are W0's
    assert out["onto_delta"] == pytest.approx(out["onto_w0"], rel=1e-9)
    assert out["onto_w0"] == pytest.approx(np.hypot(9.0, 7.0), rel=1e-12)
    assert out["factor"] == pytest.approx(c, rel=1e-9)
    # Full-rank ΔW = c·W0: the factor is c · ||W0||_F / sqrt(Σ_{i<=r} σi²), and exactly c at full rank.
    assert W.amplification(w0, c * w0, r)["factor"] == pytest.approx(c * np.linalg.norm(s) / np.hypot(9, 7), rel=1e-9)
    assert W.amplification(w0, c * w0, 5)["factor"] == pytest.approx(c, rel=1e-9)


def test_subspace_similarity_known_values():
    u = orthonormal(11, 5, 20)
    np.testing.assert_allclose(W.subspace_similarity(u, u), np.ones((5, 5)), atol=1e-12)
    np.testing.assert_allclose(W.subspace_similarity(u[:, :2], u[:, 2:]), np.zeros((2, 3)), atol=1e-12)
    a = rand((11, 4), 21)
    dirs = W.adapter_directions(a)
    assert dirs.shape == (11, 4)
    np.testing.assert_allclose(dirs.T @ dirs, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(dirs @ dirs.T, a @ np.linalg.inv(a.T @ a) @ a.T, atol=1e-10)  # same column space


def test_random_subspace_baseline_by_monte_carlo():
    d, n1, n2, trials = 11, 3, 5, 2000
    rng = np.random.default_rng(22)  # fixed seed: the check is deterministic, the tolerance is ~7 standard errors
    phis = [W.subspace_similarity(np.linalg.qr(rng.standard_normal((d, n1)))[0],
                                  np.linalg.qr(rng.standard_normal((d, n2)))[0]) for _ in range(trials)]
    mean = np.mean(phis, axis=0)
    expected = np.array([[W.random_subspace_baseline(i, j, d) for j in range(1, n2 + 1)] for i in range(1, n1 + 1)])
    np.testing.assert_allclose(mean, expected, atol=0.03)
    assert W.random_subspace_baseline(3, 5, 11) == 5 / 11


def test_magnitude_direction_known_values():
    w0 = rand((7, 11), 23)
    dm, dd = W.magnitude_direction(w0, 2 * w0)
    assert dm == pytest.approx(np.mean(np.linalg.norm(w0, axis=0)), rel=1e-12) and dd == pytest.approx(0, abs=1e-12)
    q, _ = np.linalg.qr(rand((7, 7), 24))
    w = q @ w0  # rotates every column, keeps its norm
    dm, dd = W.magnitude_direction(w0, w)
    cos = [w[:, j] @ w0[:, j] / (w[:, j] @ w[:, j]) for j in range(11)]  # |w_j| = |w0_j|
    assert dm == pytest.approx(0, abs=1e-12) and dd == pytest.approx(np.mean([1 - c for c in cos]), rel=1e-12)


def test_weight_report_of_identical_matrices():
    w0 = rand((7, 11), 25)
    report = W.weight_report(w0, w0.copy(), k=5)
    assert (report["fro"], report["relative"], report["max_abs"]) == (0.0, 0.0, 0.0)
    assert report["intruder_count"] == 0 and report["amplification_factor"] == 0.0
    assert (report["delta_magnitude"], report["delta_direction"]) == pytest.approx((0, 0), abs=1e-12)
    text = json.dumps(report, allow_nan=False)  # fails on NaN or inf
    assert json.loads(text)["shape"] == [7, 11]


def test_weight_report_agrees_with_parts():
    w0, w = rand((13, 5), 26), rand((13, 5), 27)
    report = W.weight_report(w0, w, k=3, epsilon=0.4)
    s_delta = W.singular_values(w - w0)
    assert report["stable_rank_delta"] == W.stable_rank(s_delta)
    assert report["amplification_rank"] == W.energy_rank(s_delta)
    assert report["intruder_count"] == W.intruder_dimensions(w0, w, k=3, epsilon=0.4)["count"]
    assert len(report["spectral_gaps_w"]) == 3
    json.dumps(report, allow_nan=False)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(MinilmError, match="differ in shape"):
        W.weight_report(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(MinilmError, match="2-D"):
        W.singular_values(np.zeros(5))
    with pytest.raises(MinilmError, match="rank must be"):
        W.amplification(np.eye(3), np.eye(3), 4)
    with pytest.raises(MinilmError, match="side"):
        W.intruder_dimensions(np.eye(3), np.eye(3), side="left")
    with pytest.raises(MinilmError, match="energy"):
        W.energy_rank([1.0], 0)


# --- the SVD cache: explicit, and what it hands out cannot be changed --------------------------------

def test_a_mutated_result_cannot_corrupt_a_later_answer():
    w = rand((7, 11), 28)
    expected = eig_singular_values(w)
    s = W.singular_values(w)
    with pytest.raises(ValueError, match="read-only"):
        s[0] = 0.0  # a caller that scribbles on a result must not change what the next caller is told
    np.testing.assert_allclose(W.singular_values(w), expected, rtol=1e-10)
    np.testing.assert_allclose(W.singular_values(w.copy()), expected, rtol=1e-10)


def test_svd_cache_decomposes_each_matrix_once_and_hands_out_read_only_arrays():
    w0, w = rand((13, 5), 29), rand((13, 5), 30)
    svds = W.SvdCache()
    u, s, vt = svds(w0)
    assert all(not x.flags.writeable for x in (u, s, vt))
    np.testing.assert_allclose(u @ np.diag(s) @ vt, w0, atol=1e-12)
    assert svds(w0.copy())[1] is s  # keyed by content: an equal matrix is the same entry
    assert svds(w0.T)[1] is not s and svds(w)[1] is not s  # a transposed or other matrix is not
    assert len(svds) == 3
    report = W.weight_report(w0, w, k=3, svds=svds)  # W0, W and ΔW: W0 and W already there, ΔW new
    assert len(svds) == 4
    assert report == W.weight_report(w0, w, k=3)  # a fresh cache per call gives the same numbers
    assert W.intruder_dimensions(w0, w, k=3, svds=svds)["count"] == report["intruder_count"]
    assert len(svds) == 4
