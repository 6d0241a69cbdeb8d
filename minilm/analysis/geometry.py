"""How a set of vectors is arranged: angles, distances, neighbours, clusters, and layer-to-layer similarity.

The inputs are rows of a matrix x (M, D): token embeddings, or hidden states read from a trace. Three
families of measures answer "did fine-tuning rearrange the vectors?":

* pairwise  cosine similarity and Euclidean distance, each row's nearest neighbours, named pairs;
* clusters  the silhouette (Rousseeuw 1987, "Silhouettes: a graphical aid to the interpretation and
            validation of cluster analysis") and the ratio of within- to between-cluster distance;
* CKA       centred kernel alignment between two representations of the same M inputs (Kornblith et al.
            2019, "Similarity of Neural Network Representations Revisited"), linear and debiased
            (the unbiased HSIC estimator of Song et al. 2012, "Feature Selection via Dependence
            Maximization", as used by Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn
            the Same Things?"). CKA is invariant to rotations and isotropic scaling of either
            representation, so it compares what two layers encode, not the basis they encode it in.

Everything is plain NumPy in float64: the analysis runs once per report, and float32 cancellation in
`|a|² + |b|² - 2a·b` or in a centred Gram matrix would show up as noise in the figures. Inputs may be
jax arrays. Shapes use the axis letters of minilm/__init__.py: M points (rows), D features (D1, D2 for
two representations of the same points), C clusters.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from minilm.errors import MinilmError

METRICS = ("cosine", "euclidean")


def _rows(x, name: str = "x") -> np.ndarray:
    """x as a float64 (M, D) array, or a MinilmError saying what shape it has."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise MinilmError(f"{name} has shape {x.shape}; expected a matrix (M, D) with one vector per row")
    return x


def _check_labels(x: np.ndarray, labels: Sequence) -> list:
    labels = list(labels)
    if len(labels) != x.shape[0]:
        raise MinilmError(f"{len(labels)} labels for {x.shape[0]} rows; give exactly one label per row")
    return labels


# ---------------------------------------------------------------- pairwise


def cosine_matrix(x) -> np.ndarray:
    """Cosine similarity of every pair of rows: C[i, j] = x_i·x_j / (|x_i| |x_j|).

    Args: x (M, D). Returns: (M, M) in [-1, 1]. A zero vector has no direction: its row and column are 0.
    """
    x = _rows(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (M, 1)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)  # zero rows stay zero, no 0/0
    return np.clip(unit @ unit.T, -1.0, 1.0)  # rounding can step just past ±1


def distance_matrix(x) -> np.ndarray:
    """Euclidean distance of every pair of rows: D[i, j] = |x_i - x_j|.

    Computed as sqrt(|x_i|² + |x_j|² - 2 x_i·x_j), which needs (M, M) memory rather than the (M, M, D)
    of explicit differences, after moving the origin to the points' mean. Distances do not change, but
    the squared norms do: far from the origin they are huge next to a tight cluster's squared distances
    and the subtraction cancels every digit (points 1e-4 apart at 1e4 lose all of them in float64).
    Args: x (M, D). Returns: (M, M), symmetric, zero diagonal.
    """
    x = _rows(x)
    x = x - x.mean(axis=0)  # (M, D) centred: norms now as small as the spread, so nothing cancels
    sq = (x * x).sum(axis=1)  # (M,)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)  # (M, M)
    d = np.sqrt(np.maximum(d2, 0.0))  # cancellation can leave tiny negatives for (near-)equal rows
    np.fill_diagonal(d, 0.0)
    return (d + d.T) / 2  # exactly symmetric


def nearest_neighbours(x, labels: Sequence[str], k: int = 5, metric: str = "cosine"
                       ) -> dict[str, list[tuple[str, float]]]:
    """Each row's k nearest other rows: {label: [(neighbour label, similarity or distance), ...]}.

    metric "cosine" ranks by cosine similarity, highest first; "euclidean" by distance, lowest first.
    Ties keep row order. Args: x (M, D), labels M distinct names. Returns: a JSON-ready dict.
    """
    x = _rows(x)
    labels = _check_labels(x, labels)
    if len(set(labels)) != len(labels):
        raise MinilmError("nearest_neighbours needs distinct labels (they become dict keys); got duplicates")
    if metric not in METRICS:
        raise MinilmError(f"metric {metric!r} is unknown; expected one of {METRICS}")
    if k < 1:
        raise MinilmError(f"k = {k}; ask for at least one neighbour")
    if metric == "cosine":
        score, order = cosine_matrix(x), -1  # larger is nearer
    else:
        score, order = distance_matrix(x), 1  # smaller is nearer
    out = {}
    for i, label in enumerate(labels):
        ranked = np.argsort(order * score[i], kind="stable")  # stable: ties keep row order
        ranked = [j for j in ranked if j != i][:k]  # a row is not its own neighbour
        out[label] = [(labels[j], float(score[i, j])) for j in ranked]
    return out


def pair_report(x, labels: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """Cosine similarity and distance of named pairs of rows: [{"a", "b", "cosine", "distance"}, ...].

    Pairs naming a label not in `labels` are skipped (a probe word may be missing from a vocabulary).
    Args: x (M, D), labels M names, pairs [(a, b), ...]. Returns: one dict per pair present, in order.
    """
    x = _rows(x)
    index = {label: i for i, label in enumerate(_check_labels(x, labels))}
    out = []
    for a, b in pairs:
        if a not in index or b not in index:
            continue
        u, v = x[index[a]], x[index[b]]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        cosine = float(u @ v / (nu * nv)) if nu > 0 and nv > 0 else 0.0  # as cosine_matrix: 0 for zero vectors
        out.append({"a": a, "b": b, "cosine": cosine, "distance": float(np.linalg.norm(u - v))})
    return out


# ---------------------------------------------------------------- CKA


def _same_rows(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _rows(x, "x"), _rows(y, "y")
    if x.shape[0] != y.shape[0]:
        raise MinilmError(f"x has {x.shape[0]} rows and y has {y.shape[0]}; CKA compares two representations "
                          f"of the same inputs, so row i of both must describe input i")
    return x, y


def _cka_ratio(num: float, den: float) -> float:
    if not den > 0:
        raise MinilmError("CKA is undefined here: one representation is constant across all inputs "
                          "(its centred kernel is zero); give inputs whose vectors differ")
    return float(num / den)


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019): ||Yᵀ X||_F² / (||Xᵀ X||_F ||Yᵀ Y||_F), columns centred.

    Equal to HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear kernels K = XXᵀ, L = YYᵀ, computed
    in feature space: (D1, D2) products, no (M, M) Gram matrix. Args: x (M, D1), y (M, D2).
    Returns: a number in [0, 1]; 1 when y is a rotation and scaling of x.
    """
    x, y = _same_rows(x, y)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)  # centring is what makes the kernel alignment "centred"
    num = np.linalg.norm(y.T @ x) ** 2  # (D2, M) @ (M, D1)
    return _cka_ratio(num, np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012): [tr(K̃L̃) + 1ᵀK̃1 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3)).

    K̃, L̃ are K, L with zeroed diagonals. Every term is O(n²): K̃, L̃ are symmetric, so tr(K̃L̃) is the
    sum of their elementwise product and 1ᵀK̃L̃1 = (K̃1)·(L̃1).
    """
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    k_rows, l_rows = k.sum(axis=1), l.sum(axis=1)  # K̃1, L̃1: (n,)
    trace = (k * l).sum()
    return float((trace + k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k_rows @ l_rows))
                 / (n * (n - 3)))


def debiased_cka(x, y) -> float:
    """CKA with the unbiased HSIC estimator: HSIC₁(K, L) / sqrt(HSIC₁(K, K) HSIC₁(L, L)), K = XXᵀ, L = YYᵀ.

    The plain (biased) estimator pulls CKA towards 1 when M is small next to the width, so unrelated
    representations look alike; the unbiased one removes that bias (Nguyen et al. 2021; Kornblith's
    reference code, `cka(..., debiased=True)`). It can be slightly negative. Builds two (M, M) Gram
    matrices. Args: x (M, D1), y (M, D2), M >= 4. Returns: a number, about 0 for unrelated x and y.
    """
    x, y = _same_rows(x, y)
    n = x.shape[0]
    if n < 4:
        raise MinilmError(f"debiased CKA needs at least 4 inputs (its normaliser is n(n-3)); got {n}")
    # The estimator is invariant to centring; centring first keeps the Gram entries small.
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    k, l = x @ x.T, y @ y.T  # (M, M) linear kernels
    hsic_kk, hsic_ll = _hsic_unbiased(k, k), _hsic_unbiased(l, l)
    return _cka_ratio(_hsic_unbiased(k, l), np.sqrt(max(hsic_kk, 0.0) * max(hsic_ll, 0.0)))


def cka_matrix(xs: Sequence, ys: Sequence, debiased: bool = False) -> np.ndarray:
    """CKA of every pair of representations: M[i, j] = CKA(xs[i], ys[j]), e.g. base layer i vs tuned layer j.

    Args: xs, ys lists of (M, D_i) arrays over the same M inputs. Returns: (len(xs), len(ys)).
    """
    cka = debiased_cka if debiased else linear_cka
    return np.array([[cka(x, y) for y in ys] for x in xs]).reshape(len(xs), len(ys))


# ---------------------------------------------------------------- clusters


def _cluster_ids(x: np.ndarray, labels: Sequence[Hashable]) -> np.ndarray:
    """Labels as integer cluster ids 0..C-1; at least two clusters."""
    labels = _check_labels(x, labels)
    names = list(dict.fromkeys(labels))
    if len(names) < 2:
        raise MinilmError(f"cluster scores need at least 2 distinct labels; got {len(names)} ({names!r})")
    index = {name: c for c, name in enumerate(names)}
    return np.array([index[label] for label in labels])


def silhouette(x, labels: Sequence[Hashable]) -> float:
    """Mean silhouette (Rousseeuw 1987): s_i = (b_i - a_i) / max(a_i, b_i), Euclidean distances.

    a_i is the mean distance from point i to the other points of its cluster, b_i the smallest mean
    distance from i to the points of another cluster. s_i near 1: i sits well inside its cluster; near
    -1: it is closer to another one. A point alone in its cluster has s_i = 0 (Rousseeuw's convention,
    and scikit-learn's). Args: x (M, D), labels M cluster names, >= 2 distinct. Returns: mean s_i.
    """
    x = _rows(x)
    ids = _cluster_ids(x, labels)
    dist = distance_matrix(x)  # (M, M)
    onehot = np.eye(ids.max() + 1)[ids]  # (M, C)
    sums = dist @ onehot  # (M, C): summed distance from each point to each cluster
    sizes = onehot.sum(axis=0)  # (C,)
    rows = np.arange(len(ids))
    own = sizes[ids] - 1  # other members of i's cluster
    a = np.divide(sums[rows, ids], own, out=np.zeros(len(ids)), where=own > 0)
    means = sums / sizes  # (M, C)
    means[rows, ids] = np.inf  # b_i looks only at the other clusters
    b = means.min(axis=1)
    top = np.maximum(a, b)
    s = np.divide(b - a, top, out=np.zeros(len(ids)), where=(own > 0) & (top > 0))  # singletons, a = b = 0 -> 0
    return float(s.mean())


def within_between_ratio(x, labels: Sequence[Hashable]) -> float:
    """Mean distance within clusters over mean distance between them, over all pairs i < j.

    Below 1, the clusters are tighter than the space between them; near 0, points collapse onto their
    cluster's centre. Args: x (M, D), labels M cluster names, >= 2 distinct, some cluster >= 2 points.
    """
    x = _rows(x)
    ids = _cluster_ids(x, labels)
    dist = distance_matrix(x)
    upper = np.triu(np.ones_like(dist, dtype=bool), k=1)  # each unordered pair once
    same = ids[:, None] == ids[None, :]  # (M, M)
    within, between = dist[upper & same], dist[upper & ~same]
    if within.size == 0:
        raise MinilmError("within_between_ratio needs a cluster with at least 2 points; every label is unique")
    if not between.mean() > 0:
        raise MinilmError("within_between_ratio is undefined: all points coincide (no distance between clusters)")
    return float(within.mean() / between.mean())
