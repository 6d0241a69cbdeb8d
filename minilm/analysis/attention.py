"""Where attention looks, and how far fine-tuning moved it.

Each row of an attention pattern is a probability distribution over key positions, so two information
measures describe it:

* entropy        H(p) = -Σ_s p_s ln p_s (Shannon 1948): 0 when a query looks at a single key, ln n when
                 it spreads evenly over n keys;
* Jensen–Shannon JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2 (Lin 1991, "Divergence measures
                 based on the Shannon entropy"): how differently two rows look at the same keys.
                 Symmetric, always finite (m > 0 wherever p or q is), 0 only for equal rows, at most ln 2,
                 reached when p and q share no key.

Both are in nats. 0·ln 0 = 0, so the zeros of a causal mask (key s > query t) contribute nothing.

Shapes use the axis letters of minilm/__init__.py: L layers, B batch, H heads, T query positions,
S key positions.
"""

from __future__ import annotations

import numpy as np

from minilm.errors import MinilmError


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x·ln y, and 0 where x = 0 (whatever y is): the 0·ln 0 = 0 convention, without warnings."""
    positive = x > 0
    return np.where(positive, x * np.log(np.where(positive, y, 1.0)), 0.0)


def entropy(p, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats: H(p) = -Σ p ln p along `axis`, with 0·ln 0 = 0.

    Args: p, probabilities along `axis` (each row sums to 1). Returns: p's shape without `axis`, float64.
    """
    p = np.asarray(p, dtype=np.float64)
    return -_xlogy(p, p).sum(axis=axis)


def js_divergence(p, q, axis: int = -1) -> np.ndarray:
    """Jensen–Shannon divergence in nats (Lin 1991): ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2.

    Written as two KL terms rather than H(m) - (H(p) + H(q)) / 2 so that equal rows give exactly 0
    ((p + p) / 2 == p in floating point, and ln 1 = 0) instead of a rounding residue.
    Args: p, q same shape, probabilities along `axis`. Returns: p's shape without `axis`, in [0, ln 2].
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise MinilmError(f"js_divergence needs two distributions of one shape; got {p.shape} and {q.shape}")
    m = (p + q) / 2
    kl_pm = _xlogy(p, p / np.where(m > 0, m, 1.0)).sum(axis=axis)  # where p > 0, m > 0 too
    kl_qm = _xlogy(q, q / np.where(m > 0, m, 1.0)).sum(axis=axis)
    return np.clip((kl_pm + kl_qm) / 2, 0.0, np.log(2.0))  # rounding can step just outside [0, ln 2]


def attention_change(base_probs, tuned_probs) -> dict[str, np.ndarray]:
    """Per layer and head, how far attention moved between two models on the same tokens.

    Args: base_probs, tuned_probs (L, B, H, T, S), e.g. two traces' "attn_probs". Returns a dict of
    (L, H) float64 arrays, each a mean over the batch and all T query rows:
      "js"             mean JS(base row, tuned row), in [0, ln 2];
      "entropy_base"   mean entropy of the base rows; "entropy_tuned" likewise;
      "entropy_change" entropy_tuned - entropy_base: < 0, attention became more focused.
    Under a causal mask query t sees only t + 1 keys, so row 0 always has entropy 0 and JS 0 and pulls
    the means down by 1/T alike for every model: compare values, don't read them as per-row figures.
    """
    base, tuned = np.asarray(base_probs, dtype=np.float64), np.asarray(tuned_probs, dtype=np.float64)
    if base.shape != tuned.shape or base.ndim != 5:
        raise MinilmError(f"attention_change needs two (L, B, H, T, S) arrays of one shape, from traces of the "
                          f"same tokens; got {base.shape} and {tuned.shape}")
    rows = (1, 3)  # average over B and T, keep L and H
    entropy_base, entropy_tuned = entropy(base).mean(axis=rows), entropy(tuned).mean(axis=rows)  # (L, H)
    return {
        "js": js_divergence(base, tuned).mean(axis=rows),
        "entropy_base": entropy_base,
        "entropy_tuned": entropy_tuned,
        "entropy_change": entropy_tuned - entropy_base,
    }
