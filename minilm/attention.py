"""Causal multi-head scaled dot-product attention, written out by hand.

    probs = softmax(q kᵀ / sqrt(K) + mask)        (Vaswani et al. 2017, "Attention Is All You Need", eq. 1)
    out   = probs v

Two small pure functions, so the attention pattern itself is an ordinary value the analysis can read:
`attention_probs` (who looks at whom) and `attend` (what they bring back).

Axes, used in every comment and einsum string of the project:
    B batch, T query positions, S key positions, D model width, H heads, K head size,
    F MLP width, V vocabulary, L layers, R LoRA rank.

Positions are absolute, so the same mask serves a whole sequence (queries 0..T-1 against keys
0..T-1) and one step of cached generation (query t against the cache's slots 0..S-1, of which
those after t are not yet written and must be hidden).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """(T,), (S,) -> (T, S) bool: query t may look at key s iff s <= t."""
    return key_positions[None, :] <= query_positions[:, None]


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """q (B, T, H, K), k (B, S, H, K), mask (T, S) -> probs (B, H, T, S); each row sums to 1."""
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)  # (B, H, T, S)
    # -inf, not a large negative number: a masked key then gets a weight of exactly 0, so no later token
    # can leak into an earlier position even by rounding. Every row keeps key 0 (s = 0 <= t), so no row
    # is all -inf.
    scores = jnp.where(mask, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def attend(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs (B, H, T, S), v (B, S, H, K) -> (B, T, H, K): each query's probability-weighted values."""
    return jnp.einsum("bhts,bshk->bthk", probs, v)
