"""Induction circuits: is a head a previous-token head, an induction head, and does the model learn in context?

An induction circuit (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et
al. 2022, "In-context Learning and Induction Heads") is two heads in two layers. A previous-token head
copies each token's identity into the next position; an induction head in a later layer then looks, from
a token A, for the position whose previous token was A — the token that followed A last time — and
copies it: [A][B] … [A] -> [B]. Both are defined by where they attend, so they are scored from the
attention probabilities against an ideal pattern:

* pattern score     of a head against an ideal pattern I (rows one-hot or zero): the attention mass the
                    head puts where I does, averaged over the rows where I is defined,
                        score = mean over rows t with Σ_s I[t, s] > 0 of  Σ_s P[t, s] I[t, s] / Σ_s I[t, s].
                    1 for P = I; 0 for a head that never looks where I does; for uniform causal attention
                    P[t, s] = 1 / (t + 1), the mean of 1 / (t + 1) over the scored rows.
* previous-token    the pattern score against I[t, t-1] = 1 (rows t >= 1).
* induction         the pattern score against the corpus's ideal induction pattern
                    (`corpora.induction_attention`, restricted by the caller to the rows it can predict):
                    row t looks at j + 1, where j < t is the earlier occurrence of token t. Olsson et al.'s
                    "prefix matching" score is this, on sequences of repeated random tokens.
* in-context        Olsson et al.'s in-context learning score: the loss late in a context minus the loss
  learning score    early in it (their tokens 500 and 50). Here, on lines that are a span and its repeat,
                    the mean loss of predicting the repeated half minus that of the first half: < 0 when
                    the model uses its context, about -ln(symbols) for a perfect copier.

Evidence of composition is causal: remove a head (`without_head`) and score again. A head's output
enters the residual stream only through its K rows of the output matrix W_O (the stream is x + Σ_h
z_h W_O[h]), so zeroing those rows removes exactly that head's contribution and nothing else.

Shapes use the axis letters of minilm/__init__.py: L layers, B batch, H heads, T query positions,
S key positions, K head size.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from minilm.errors import MinilmError


def previous_token_pattern(T: int) -> np.ndarray:
    """(T, T) ideal previous-token pattern: row t one-hot at t - 1; row 0 (no previous token) all zero."""
    return np.eye(T, k=-1, dtype=np.float32)


def pattern_score(probs, ideal) -> np.ndarray:
    """Per head, the attention mass on the ideal pattern's keys, averaged over the rows it defines.

    Args: probs (L, B, H, T, S) attention probabilities (a trace's "attn_probs"); ideal (B, T, S) or
    (T, S), rows one-hot (or zero where undefined), one per sequence of the batch.
    Returns: (L, H) float64, in [0, 1]; all rows of all sequences count alike.
    """
    probs = np.asarray(probs, dtype=np.float64)
    ideal = np.asarray(ideal, dtype=np.float64)
    if probs.ndim != 5:
        raise MinilmError(f"pattern_score needs attention probabilities (L, B, H, T, S), got shape {probs.shape}")
    L, B, H, T, S = probs.shape
    if ideal.ndim == 2:
        ideal = np.broadcast_to(ideal, (B, T, S))
    if ideal.shape != (B, T, S):
        raise MinilmError(f"pattern_score: the ideal pattern has shape {ideal.shape}; expected (B, T, S) = "
                          f"{(B, T, S)} or (T, S) to match the attention probabilities {probs.shape}")
    weight = ideal.sum(-1)  # (B, T): 1 on scored rows, 0 elsewhere
    rows = weight > 0
    if not rows.any():
        raise MinilmError("pattern_score: the ideal pattern defines no row (all zero): nothing to score")
    hit = np.einsum("lbhts,bts->lhbt", probs, ideal) / np.where(rows, weight, 1.0)  # (L, H, B, T)
    return hit[:, :, rows].mean(-1)


def previous_token_score(probs) -> np.ndarray:
    """(L, B, H, T, S) -> (L, H): the pattern score against the previous-token pattern."""
    probs = np.asarray(probs)
    return pattern_score(probs, previous_token_pattern(probs.shape[-2])[:, : probs.shape[-1]])


def induction_ideal(ideal, halves) -> np.ndarray:
    """The ideal induction pattern (B, T, S) kept only on the rows of repeated tokens (halves == 2, the
    corpus's `induction_halves`), where the earlier occurrence is the copy to read from."""
    ideal, halves = np.asarray(ideal), np.asarray(halves)
    return ideal * (halves == 2)[..., None]


def in_context_score(token_losses, target_halves) -> float:
    """Olsson et al.'s in-context learning score on span-and-repeat lines.

    Args: token_losses (B, T) the loss of predicting each target; target_halves (B, T), each target's half
    (1 first, 2 repeat, 0 neither). Returns: mean loss on the repeat minus mean loss on the first half.
    """
    losses, halves = np.asarray(token_losses, dtype=np.float64), np.asarray(target_halves)
    if losses.shape != halves.shape:
        raise MinilmError(f"in_context_score: losses {losses.shape} and halves {halves.shape} differ in shape")
    if not ((halves == 1).any() and (halves == 2).any()):
        raise MinilmError("in_context_score needs targets in both halves; the windows hold no whole line")
    return float(losses[halves == 2].mean() - losses[halves == 1].mean())


def without_head(params: dict, layer: int, head: int, head_size: int) -> dict:
    """A copy of `params` with head `head` of block `layer` removed: its K rows of attn.o's W set to 0.

    Only that block's attn.o is copied; the rest of the tree is shared with `params`.
    """
    blocks = list(params["blocks"])
    if not 0 <= layer < len(blocks):
        raise MinilmError(f"without_head: layer {layer} does not exist; the model has {len(blocks)} blocks")
    o = blocks[layer]["attn"]["o"]
    w = jnp.asarray(o["w"])  # (H·K, D): the rows of head h are h·K .. (h+1)·K - 1
    if not 0 <= head < w.shape[0] // head_size:
        raise MinilmError(f"without_head: head {head} does not exist; the block has {w.shape[0] // head_size} heads")
    w = w.at[head * head_size:(head + 1) * head_size].set(0.0)
    blocks[layer] = {**blocks[layer], "attn": {**blocks[layer]["attn"], "o": {**o, "w": w}}}
    return {**params, "blocks": blocks}
