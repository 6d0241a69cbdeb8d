"""Merging adapters into plain matrices, undoing a merge, and removing adapters.

    merge(params)              every adapter folded in: W' = W + Σ weight_i · s_i A_i B_i, a plain matrix
    unmerge(merged, adapted)   W = W' - s·A B: the base weights back from a merged model and its adapter
    disable(params)            the model with its adapters (or one of them) taken off

A merged model runs at the base model's speed and is what `minilm merge` saves; merged and unmerged
models compute the same function (tests/test_lora.py checks it to float32 rounding).
"""

from __future__ import annotations

import jax

from lora.stack import fill_shared_a, is_lora, levels, restack
from minilm.errors import MinilmError


def merge(params, weights: dict[str, float] | None = None):
    """Every LoraWeight -> W + Σ weight_i · s_i A_i B_i as a plain matrix (weights default to 1).

    Weights other than 1 combine adapters linearly; DoRA's rescaling is not linear and refuses them.
    """
    weights = weights or {}

    def fold(w):  # w.base is already folded into a plain matrix
        factor = weights.get(w.name, 1.0)
        if w.magnitude is not None:
            if factor != 1.0:
                raise MinilmError(f"adapter {w.name!r} is DoRA: it cannot be weighted ({factor}); merge it alone")
            return w.merged()
        return w.base + factor * w.delta()

    return restack(fill_shared_a(params), fold)


def unmerge(merged, adapted):
    """The base weights recovered from a merged model: W = W' - s·A B for every adapter in `adapted`."""
    def subtract(w_merged, stack):
        for _, w in levels(stack):
            if w.magnitude is not None:
                raise MinilmError("a DoRA merge cannot be undone from the merged weights alone "
                                  "(the column norms of W + s·A B are lost); keep the base checkpoint")
            w_merged = w_merged - w.delta()
        return w_merged

    return jax.tree.map(subtract, merged, fill_shared_a(adapted), is_leaf=is_lora)


def disable(params, name: str | None = None):
    """The model without its adapters (or without the one called `name`). For PiSSA the base that
    remains is the residual W - s·A₀B₀, not the original W."""
    return restack(fill_shared_a(params), lambda w: w.base if name is None or w.name == name else w)
