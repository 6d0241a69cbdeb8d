"""Learning against forgetting: compare fine-tuning methods on their trade-off curves, not at one rate each.

Biderman et al. 2024, "LoRA Learns Less and Forgets Less" (arXiv 2405.09673), measure along training
how well a model learned the new task and how much it forgot of what it knew, for every method at
several learning rates, and compare methods on the resulting curves (their learning–forgetting
trade-off figures: forgetting against learning, one line per method and learning rate). One method at one hand-picked learning rate
each, stopped at "about the same" loss, would compare the learning rates as much as the methods.

A curve is one training run (one method at one learning rate): its points, in training order, are

    (fine-tuning loss, forgetting)      forgetting = rise of the pretraining corpus's held-out loss

measured at the same evaluations. On such curves:

* `forgetting_at(curve, loss)`   the forgetting when the run first reaches fine-tuning loss `loss`:
                                 at the first point whose loss is <= `loss`, interpolated linearly
                                 between it and the point before it (which lies above). Later points
                                 are ignored even if the loss rises and falls again (a non-monotone
                                 curve): this is what stopping the run as soon as it reached the loss
                                 would have given, without knowing the future. A curve that never
                                 gets there returns None: it is not counted.
* `best_at(curves, loss)`        over a method's learning rates, the lowest forgetting at `loss` and
                                 its learning rate (the method's envelope, as in Biderman et al.);
                                 None when no curve reaches `loss`.
* `lowest_loss(curves)`          the lowest fine-tuning loss any of a method's curves reaches within
                                 the budget, and at which learning rate: how much the method can learn.
* `matched_loss(lowest)`         the loss at which to compare forgetting, fixed before the run: the
                                 highest of the methods' lowest losses, the best loss every method
                                 reaches.

The second column may be any quantity measured along the run: passing (loss, step) points to
`forgetting_at` gives the (interpolated) step at which the loss was reached.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from minilm.errors import MinilmError

Curve = Sequence[tuple[float, float]]   # (fine-tuning loss, forgetting) per evaluation, in training order


def _points(curve: Curve) -> np.ndarray:
    """The curve as a finite (n, 2) float64 array, n >= 1, or a clear error."""
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] != 2:
        raise MinilmError(f"a curve is a list of (fine-tuning loss, forgetting) points, at least one; got an array "
                          f"of shape {c.shape}")
    if not np.isfinite(c).all():
        raise MinilmError("a curve holds a non-finite value: leave a diverged run out of the curves (its "
                          "points before the divergence say nothing about where it would have gone)")
    return c


def forgetting_at(curve: Curve, loss: float) -> float | None:
    """Forgetting when `curve` first reaches fine-tuning loss `loss` (linear interpolation), or None.

    With points (l_i, f_i) and j the first index with l_j <= loss: f_0 if j = 0, else
    f_{j-1} + (f_j - f_{j-1}) · (l_{j-1} - loss) / (l_{j-1} - l_j), which lies between f_{j-1} and f_j.
    """
    c = _points(curve)
    if not np.isfinite(loss):
        raise MinilmError(f"the target fine-tuning loss must be a finite number, got {loss}")
    below = np.flatnonzero(c[:, 0] <= loss)
    if below.size == 0:
        return None
    j = int(below[0])
    if j == 0:
        return float(c[0, 1])
    (l0, f0), (l1, f1) = c[j - 1], c[j]   # l0 > loss >= l1, so l0 - l1 > 0
    return float(f0 + (f1 - f0) * (l0 - loss) / (l0 - l1))


def best_at(curves: Mapping[Hashable, Curve], loss: float) -> tuple[float, Hashable] | None:
    """(lowest forgetting at fine-tuning loss `loss` over the curves that reach it, its key), or None.

    `curves` maps a learning rate (or any label) to one method's curve at that rate; ties go to the
    first key in order.
    """
    if not curves:
        raise MinilmError("best_at needs at least one curve (a method's curves by learning rate)")
    reached = [(f, key) for key, curve in curves.items() if (f := forgetting_at(curve, loss)) is not None]
    return min(reached, key=lambda fk: fk[0]) if reached else None


def lowest_loss(curves: Mapping[Hashable, Curve]) -> tuple[float, Hashable]:
    """(lowest fine-tuning loss over every point of every curve, its key): what a method can learn."""
    if not curves:
        raise MinilmError("lowest_loss needs at least one curve (a method's curves by learning rate)")
    return min(((float(_points(curve)[:, 0].min()), key) for key, curve in curves.items()), key=lambda lk: lk[0])


def matched_loss(lowest: Mapping[Hashable, float]) -> float:
    """The loss to compare methods at: the highest of their lowest losses, so every method reaches it."""
    if not lowest:
        raise MinilmError("matched_loss needs each method's lowest loss ({method: loss}); got none")
    values = np.asarray(list(lowest.values()), dtype=np.float64)
    if not np.isfinite(values).all():
        raise MinilmError(f"matched_loss needs finite losses, got {dict(lowest)}")
    return float(values.max())
