"""What fine-tuning did to one weight matrix: how far it moved, in how many directions, and which.

Every matrix is in the model's `x @ W` layout, shape (d_in, d_out): an output unit is a column. In
W = U diag(σ) Vᵀ the left singular vectors (columns of U) live in the input space d_in and the right
ones (rows of Vᵀ) in the output space d_out. Q = min(d_in, d_out) is the number of singular values
(the axis letters are declared once, in minilm/__init__.py). ΔW = W − W0 is the change from the base
W0 to the tuned W (full fine-tuning, or LoRA merged).

Sources:
    Eckart & Young 1936: the best rank-k approximation keeps the top k singular values.
    Rudelson & Vershynin 2007, "Sampling from large matrices": stable rank ||W||_F² / ||W||_2².
    Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality": exp(entropy).
    Hu et al. 2021, "LoRA" (arXiv 2106.09685) §7.2 subspace similarity φ, §7.3 amplification factor.
    Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
        (arXiv 2410.21228): intruder dimensions.
    Liu et al. 2024, "DoRA" (arXiv 2402.09353) §4.1: magnitude and direction changes ΔM, ΔD.

Pure NumPy in float64: these are measurements, not training, and the smallest singular values of a
float32 matrix would otherwise drown in rounding. Any array-like (including a jax.Array) is accepted.

A report asks for the SVD of the same W0, W and ΔW several times; an `SvdCache` passed to the
functions that decompose (`svds=`) computes each once. Without one, each call decomposes afresh.
"""

from __future__ import annotations

import hashlib

import numpy as np

from minilm.errors import MinilmError

DEFAULT_EPSILONS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1, 0.2, ..., 0.9


def _matrix(w, name: str = "w") -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise MinilmError(f"{name} must be a 2-D matrix (d_in, d_out), got shape {w.shape}; "
                          "pass one weight matrix, not a bias or a stacked tree.")
    return w


def _pair(w0, w) -> tuple[np.ndarray, np.ndarray]:
    w0, w = _matrix(w0, "w0"), _matrix(w, "w")
    if w0.shape != w.shape:
        raise MinilmError(f"base and tuned matrices differ in shape: w0 {w0.shape} vs w {w.shape}; "
                          "compare the same parameter of the two models.")
    return w0, w


def _spectrum(s) -> np.ndarray:
    """Singular values as a descending float64 vector (sorting makes the helpers order-agnostic)."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or np.any(s < 0):
        raise MinilmError(f"expected a 1-D vector of non-negative singular values, got shape {s.shape}; "
                          "use singular_values(w).")
    return np.sort(s)[::-1]


class SvdCache:
    """Thin SVDs w = u diag(s) vt of the matrices of one comparison, each computed once.

    Keyed by shape and content, so an equal matrix is the same entry and a different one never is.
    It hands out read-only arrays: a caller that writes into a result gets an error instead of
    corrupting every later answer. It keeps all it computed, so make one per comparison (weight_report
    makes one for its W0, W and ΔW) and let it go with the comparison.
    """

    def __init__(self):
        self._svds: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._svds)

    def __call__(self, w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """w (d_in, d_out) -> u (d_in, Q), s (Q,) descending, vt (Q, d_out); float64, read-only."""
        w = _matrix(w)
        key = (w.shape, hashlib.blake2b(np.ascontiguousarray(w).view(np.uint8)).digest())
        if key not in self._svds:
            factors = tuple(np.linalg.svd(w, full_matrices=False))
            for factor in factors:
                factor.flags.writeable = False
            self._svds[key] = factors
        return self._svds[key]


def _svd(w, svds: SvdCache | None):
    """u, s, vt of w from `svds`, or from a cache of this call alone."""
    return (SvdCache() if svds is None else svds)(w)


def singular_values(w, *, svds: SvdCache | None = None) -> np.ndarray:
    """σ1 >= σ2 >= ... >= σQ >= 0 of W (d_in, d_out) -> (Q,), read-only."""
    return _svd(w, svds)[1]


def stable_rank(s) -> float:
    """Σσ² / σ1² = ||W||_F² / ||W||_2² (Rudelson & Vershynin 2007); in [1, Q], 0 for a zero matrix."""
    s = _spectrum(s)
    return float(np.sum(s**2) / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def effective_rank(s) -> float:
    """exp(H(p)), p = σ / Σσ, H(p) = −Σ p log p with 0·log 0 = 0 (Roy & Vetterli 2007); 0 for a zero matrix.

    k equal singular values give exactly k; a spread-out spectrum gives a non-integer in between.
    """
    s = _spectrum(s)
    total = np.sum(s)
    if total == 0:
        return 0.0
    p = s[s > 0] / total  # dropping p = 0 is the convention 0·log 0 = 0
    return float(np.exp(-np.sum(p * np.log(p))))


def energy_rank(s, energy: float = 0.9) -> int:
    """Smallest k with Σ_{i<=k} σi² >= energy · Σσ²: how many directions hold that share of ||W||_F²."""
    if not 0 < energy <= 1:
        raise MinilmError(f"energy must be in (0, 1], got {energy}; e.g. 0.9 for 90% of ||W||_F².")
    cumulative = np.cumsum(_spectrum(s) ** 2)
    if cumulative.size == 0 or cumulative[-1] == 0:
        return 0
    # The last cumulative sum is the total itself, so energy = 1 finds k <= Q despite rounding.
    return int(np.searchsorted(cumulative, energy * cumulative[-1], side="left")) + 1


def lowrank_capture(delta, *, svds: SvdCache | None = None) -> np.ndarray:
    """(Q,): entry k−1 = 1 − ||Δ − Δ_k||_F² / ||Δ||_F² = Σ_{i<=k} σi² / Σσ² (Eckart–Young 1936).

    Δ_k is the best rank-k approximation, so this is what a rank-k update (LoRA of rank k) could at best
    reproduce of Δ. Nondecreasing, ends at 1. A zero Δ is captured exactly at every rank: all ones.
    """
    cumulative = np.cumsum(singular_values(delta, svds=svds) ** 2)
    if cumulative.size == 0 or cumulative[-1] == 0:
        return np.ones_like(cumulative)
    return cumulative / cumulative[-1]


def change_stats(w0, w) -> dict:
    """{"fro": ||ΔW||_F, "relative": ||ΔW||_F / ||W0||_F, "max_abs": max |ΔW|} for arrays of any shape.

    "relative" is 0 when nothing changed and inf when a zero W0 changed.
    """
    w0, w = np.asarray(w0, dtype=np.float64), np.asarray(w, dtype=np.float64)
    if w0.shape != w.shape:
        raise MinilmError(f"base and tuned arrays differ in shape: {w0.shape} vs {w.shape}.")
    delta = w - w0
    fro, base = float(np.linalg.norm(delta)), float(np.linalg.norm(w0))
    relative = fro / base if base > 0 else (0.0 if fro == 0 else float("inf"))
    return {"fro": fro, "relative": relative, "max_abs": float(np.max(np.abs(delta), initial=0.0))}


def _singular_vectors(w: np.ndarray, side: str, svds: SvdCache | None) -> np.ndarray:
    """Unit singular vectors as rows, in descending σ order: (Q, d_out) for "output", (Q, d_in) for "input"."""
    u, _, vt = _svd(w, svds)  # u (d_in, Q), vt (Q, d_out)
    if side == "output":
        return vt
    if side == "input":
        return u.T
    raise MinilmError(f"side must be 'output' (rows of Vᵀ, d_out space) or 'input' (columns of U), got {side!r}.")


def _max_cosines(w0, w, k: int, side: str, svds: SvdCache | None) -> np.ndarray:
    """(min(k, Q),): each top-k singular vector of W, its largest |cos| with any singular vector of W0."""
    w0, w = _pair(w0, w)
    if k < 1:
        raise MinilmError(f"k must be a positive number of singular vectors, got {k}.")
    top = _singular_vectors(w, side, svds)[:k]  # (k, d) unit rows
    base = _singular_vectors(w0, side, svds)    # (Q, d) unit rows
    return np.max(np.abs(top @ base.T), axis=1)  # (k, Q) cosines -> (k,)


def intruder_dimensions(w0, w, *, k: int = 10, epsilon: float = 0.5, side: str = "output",
                        svds: SvdCache | None = None) -> dict:
    """Top-k singular vectors of W with max_j |cos(v_i(W), v_j(W0))| < ε (Shuttleworth et al. 2024, §3).

    An intruder is a high-ranking direction of the tuned matrix that resembles no direction of the base.
    side="output" compares rows of Vᵀ (d_out space): the paper's code takes the output-space (left)
    singular vectors of PyTorch's (out, in) matrix, which are our right ones. side="input": columns of U.
    All Q singular vectors of W0 take part, as in the paper; k is capped at Q.
    Returns {"count": int, "max_cosine": (k,) array, "indices": ranks (0-based) of the intruders}.
    """
    max_cosine = _max_cosines(w0, w, k, side, svds)
    indices = [int(i) for i in np.flatnonzero(max_cosine < epsilon)]
    return {"count": len(indices), "max_cosine": max_cosine, "indices": indices}


def intruder_sweep(w0, w, *, k: int = 10, epsilons=DEFAULT_EPSILONS, side: str = "output",
                   svds: SvdCache | None = None) -> dict[float, int]:
    """{ε: number of intruders among the top k} for each ε: the paper reports counts over a range of ε."""
    max_cosine = _max_cosines(w0, w, k, side, svds)
    return {float(e): int(np.sum(max_cosine < e)) for e in epsilons}


def spectral_gaps(s, k: int) -> np.ndarray:
    """σi / σ(i+1) for i = 1..min(k, Q−1).

    A singular vector is only stable when its σ stands apart from its neighbours (Wedin 1972: it can
    turn by ~ perturbation / gap). Ratios near 1 make intruder counts there noise. x/0 = inf, 0/0 = 1.
    """
    s = _spectrum(s)[: k + 1]
    above, below = s[:-1], s[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = above / below
    return np.where((above == 0) & (below == 0), 1.0, gaps)


def _orthonormal(rng: np.random.Generator, d: int, r: int) -> np.ndarray:
    """(d, r) with orthonormal columns, uniformly distributed (QR of a Gaussian, signs fixed by diag R)."""
    q, r_ = np.linalg.qr(rng.standard_normal((d, r)))
    return q * np.sign(np.diag(r_))


def amplification(w0, delta, rank: int, *, seed: int = 0, svds: SvdCache | None = None) -> dict:
    """How much ΔW amplifies directions W0 already had (Hu et al. 2021, §7.3, Table 7).

    U (d_in, r), V (d_out, r) = top-r left/right singular vectors of ΔW; ||Uᵀ W0 V||_F (r, r) measures
    how strongly W0 acts along ΔW's directions. Compared with W0's own top-r directions (the largest
    possible, sqrt(Σ_{i<=r} σi(W0)²)) and random orthonormal U, V (seeded with `seed`).
    factor = ||ΔW||_F / ||Uᵀ W0 V||_F (inf if W0 is blind to ΔW's directions, 0 if ΔW = 0).
    """
    w0, delta = _pair(w0, delta)
    d_in, d_out = w0.shape
    if not 1 <= rank <= min(d_in, d_out):
        raise MinilmError(f"rank must be in 1..{min(d_in, d_out)} for a {w0.shape} matrix, got {rank}.")

    def onto(u, v):  # u (d_in, r), v (d_out, r) -> ||Uᵀ W0 V||_F of the (r, r) matrix
        return float(np.linalg.norm(u.T @ w0 @ v))

    u, _, vt = _svd(delta, svds)
    u0, _, vt0 = _svd(w0, svds)
    rng = np.random.default_rng(seed)
    delta_fro = float(np.linalg.norm(delta))
    onto_delta = onto(u[:, :rank], vt[:rank].T)
    factor = 0.0 if delta_fro == 0 else (delta_fro / onto_delta if onto_delta > 0 else float("inf"))
    return {"delta_fro": delta_fro, "onto_delta": onto_delta, "onto_w0": onto(u0[:, :rank], vt0[:rank].T),
            "onto_random": onto(_orthonormal(rng, d_in, rank), _orthonormal(rng, d_out, rank)),
            "factor": factor}


def subspace_similarity(u1, u2) -> np.ndarray:
    """φ(i, j) = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j) for i = 1..n1, j = 1..n2 (Hu et al. 2021, §7.2).

    u1 (d, n1), u2 (d, n2) with orthonormal columns, most important first. φ in [0, 1]: 1 when the
    smaller subspace lies inside the larger, 0 when they are orthogonal. Returns (n1, n2); φ(i, j) is
    at [i−1, j−1].
    """
    u1, u2 = _matrix(u1, "u1"), _matrix(u2, "u2")
    if u1.shape[0] != u2.shape[0]:
        raise MinilmError(f"u1 {u1.shape} and u2 {u2.shape} must live in the same space (same row count).")
    overlap = (u1.T @ u2) ** 2                               # (n1, n2) squared cosines
    cumulative = np.cumsum(np.cumsum(overlap, axis=0), axis=1)  # [i-1, j-1] = ||U1_iᵀ U2_j||_F²
    i, j = np.arange(1, u1.shape[1] + 1), np.arange(1, u2.shape[1] + 1)
    return cumulative / np.minimum(i[:, None], j[None, :])


def adapter_directions(a) -> np.ndarray:
    """Orthonormal basis (d_in, min(d_in, R)) of a LoRA A (d_in, R): its left singular vectors.

    Hu et al. take the right-singular unitary of their (R, d) A; our A is its transpose, so the same
    directions are our left singular vectors, strongest first.
    """
    return np.linalg.svd(_matrix(a, "a"), full_matrices=False)[0]


def random_subspace_baseline(i: int, j: int, d: int) -> float:
    """E φ(i, j) for independent uniformly random subspaces of R^d: max(i, j) / d.

    E ||U_iᵀ U_j||_F² = i·j/d (each of the i·j squared cosines averages 1/d); dividing by min(i, j)
    leaves max(i, j)/d. φ of learned subspaces means something only well above this.
    """
    if not (1 <= i <= d and 1 <= j <= d):
        raise MinilmError(f"need 1 <= i, j <= d, got i={i}, j={j}, d={d}.")
    return max(i, j) / d


def magnitude_direction(w0, w) -> tuple[float, float]:
    """(ΔM, ΔD) of DoRA (Liu et al. 2024, §4.1), per output unit j (a column of W):

        ΔM = mean_j | ||W[:, j]|| − ||W0[:, j]|| |,   ΔD = mean_j (1 − cos(W[:, j], W0[:, j])).

    A zero column has no direction: cos is 1 if both columns are zero, else 0.
    """
    w0, w = _pair(w0, w)
    m0, m = np.linalg.norm(w0, axis=0), np.linalg.norm(w, axis=0)  # (d_out,) column norms
    dots = np.sum(w0 * w, axis=0)                                   # (d_out,)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(m0 * m > 0, dots / (m0 * m), np.where((m0 == 0) & (m == 0), 1.0, 0.0))
    # An unchanged column has cos exactly 1; rounding in dots / (m0·m) must not say otherwise.
    cos = np.where(np.all(w0 == w, axis=0), 1.0, np.clip(cos, -1.0, 1.0))
    return float(np.mean(np.abs(m - m0))), float(np.mean(1.0 - cos))


def weight_report(w0, w, *, k: int = 10, epsilon: float = 0.5, rank: int | None = None,
                  svds: SvdCache | None = None) -> dict:
    """All of the above for one (W0, W) pair, as plain floats, ints and lists (JSON-ready).

    rank (for amplification) defaults to the 90%-energy rank of ΔW, at least 1. W0, W and ΔW are each
    decomposed once, in `svds` or in a cache of this report alone.
    """
    w0, w = _pair(w0, w)
    delta = w - w0
    svds = SvdCache() if svds is None else svds
    s0, s, s_delta = (singular_values(x, svds=svds) for x in (w0, w, delta))
    rank = max(1, energy_rank(s_delta)) if rank is None else rank
    intruders = intruder_dimensions(w0, w, k=k, epsilon=epsilon, svds=svds)
    delta_m, delta_d = magnitude_direction(w0, w)
    report = {"shape": list(w0.shape), **change_stats(w0, w)}
    for name, spectrum in (("w0", s0), ("w", s), ("delta", s_delta)):
        report[f"singular_values_{name}"] = spectrum.tolist()
        report[f"stable_rank_{name}"] = stable_rank(spectrum)
        report[f"effective_rank_{name}"] = effective_rank(spectrum)
    report.update({
        "energy_rank_delta": energy_rank(s_delta),
        "lowrank_capture_delta": lowrank_capture(delta, svds=svds).tolist(),
        "intruder_count": intruders["count"],
        "intruder_max_cosine": intruders["max_cosine"].tolist(),
        "intruder_indices": intruders["indices"],
        "intruder_sweep": {str(e): n for e, n in intruder_sweep(w0, w, k=k, svds=svds).items()},
        "spectral_gaps_w0": spectral_gaps(s0, k).tolist(),
        "spectral_gaps_w": spectral_gaps(s, k).tolist(),
        "amplification_rank": rank,
        **{f"amplification_{key}": value for key, value in amplification(w0, delta, rank, svds=svds).items()},
        "delta_magnitude": delta_m,
        "delta_direction": delta_d,
    })
    return report
