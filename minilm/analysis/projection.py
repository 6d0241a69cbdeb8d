"""One 2-D projection of many states of the same word vectors, so that a move on screen is a move of a vector.

The map (minilm/report_map.py) draws, per level (static embedding or a layer boundary), the probe words of
the base and of every tuned model at every kept training step. All of those states share ONE projection,
fitted on their union: principal component analysis (Pearson 1901; Jolliffe, "Principal Component
Analysis", 2002, §1) of the stacked rows

    X = [x_state, word]  (N, D),  N = states · M words,   P = top-2 right singular vectors of X − mean  (D, 2)

and every state is drawn as (x − mean) @ P. Why the union and not Procrustes per state: the map is then one
fixed linear map, so a word's on-screen move is exactly the projection of its high-dimensional move,
(x' − x) @ P; a word whose vector did not change does not move (a test checks it bit for bit), and a
planted move of one word moves only that word. Procrustes (Schönemann 1966) aligns each state to the base
with its own rotation, fitted on all words together: when some words move, the rotation changes and carries
the unmoved ones along, so the picture would show moves the vectors never made. The price of the union: its
two axes keep only part of the variance, and that share (`variance_share`) is printed beside the map,
with the true cosines, so that the picture never claims more than the numbers.

Pure NumPy; M words, D width, N stacked rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Projection:
    mean: np.ndarray        # (D,) the union's mean
    axes: np.ndarray        # (D, 2) the union's top two principal directions, orthonormal
    variance_share: float   # share of the union's total variance the two axes keep, in [0, 1]


def fit(states: list[np.ndarray]) -> Projection:
    """PCA on the union of `states`, each (M, D); rows with a NaN (a word absent from a state) are left out.

    Each axis's sign is fixed (its largest loading positive), so that the same data always gives the same
    picture, whatever sign the SVD returns."""
    rows = np.concatenate([np.asarray(s, dtype=np.float64) for s in states])  # (N, D)
    rows = rows[~np.isnan(rows).any(axis=1)]
    if len(rows) < 2:
        raise ValueError(f"a projection needs two rows without NaN; got {len(rows)}")
    mean = rows.mean(axis=0)  # (D,)
    centred = rows - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)  # s (min(N, D),), vt (min(N, D), D)
    axes = vt[:2].T  # (D, 2)
    if axes.shape[1] < 2:  # D = 1: a second axis of zeros keeps the picture 2-D
        axes = np.concatenate([axes, np.zeros_like(axes)], axis=1)
    signs = np.sign(axes[np.argmax(np.abs(axes), axis=0), [0, 1]])
    axes = axes * np.where(signs == 0, 1.0, signs)
    total = float(np.sum(s ** 2))
    share = float(np.sum(s[:2] ** 2) / total) if total > 0 else 1.0
    return Projection(mean, axes, share)


def project(projection: Projection, x: np.ndarray) -> np.ndarray:
    """Word vectors x (M, D) -> their places on the map (M, 2); a NaN row stays NaN."""
    return (np.asarray(x, dtype=np.float64) - projection.mean) @ projection.axes  # (M, D) @ (D, 2) -> (M, 2)
