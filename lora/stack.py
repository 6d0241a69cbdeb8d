"""Adapters stacked on one matrix, and the two ways this package walks them.

A matrix may carry several adapters: attaching a second one (with another name) wraps the first, so
the tree holds LoraWeight(LoraWeight(W, A₁, B₁), A₂, B₂), and `.base` leads from the outermost
adapter down to the plain W. Everything in lora/ that looks at every adapter goes through one of:

    levels(w)              read: each adapter of a stack, outermost first, with its tree name
    restack(params, fn)    rebuild: fn applied to every adapter of every stack, innermost first

With fuse_qkv (lora/config.py) the adapted ones of a block's q, k, v share one A. `lora.split`
trains it once, in the matrix that owns it, and leaves the others' A empty (None), so a tree made
from the trainable and frozen halves has holes; `fill_shared_a` fills them in. Autodiff through it is
what sums the three matrices' gradients into the one shared A.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import jax

from lora.weight import LoraWeight
from minilm.tree import path_name


def is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def levels(w, name: str = "") -> Iterator[tuple[str, LoraWeight]]:
    """(tree name, adapter) for each adapter stacked on one matrix, outermost first; the names follow
    `.base` as the tree does ('blocks.0.attn.q.w', 'blocks.0.attn.q.w.base', ...)."""
    while is_lora(w):
        yield name, w
        w, name = w.base, name + ".base"


def stacks(params) -> Iterator[tuple[str, LoraWeight]]:
    """(name of the matrix, e.g. 'blocks.0.attn.q.w', its outermost adapter) for every adapted matrix."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]:
        if is_lora(leaf):
            yield path_name(path), leaf


def restack(params, fn: Callable[[LoraWeight], object]):
    """Every stack rebuilt bottom-up: each adapter, its base already rebuilt, replaced by fn(adapter)
    (an adapter, or a plain matrix to end the stack there)."""
    def rebuild(w):
        return fn(replace(w, base=rebuild(w.base))) if is_lora(w) else w

    return jax.tree.map(rebuild, params, is_leaf=is_lora)


def adapter_names(params) -> list[str]:
    return sorted({w.name for _, stack in stacks(params) for _, w in levels(stack)})


def fill_shared_a(params, field: str = "lora_a"):
    """Every adapter that uses another's A (fuse_qkv: a_from) gets `field` from the adapter of the same
    name on the matrix that owns the A. Idempotent. `field="dropout_key"` shares the owner's dropout key."""
    if not any(w.a_from for _, stack in stacks(params) for _, w in levels(stack)):
        return params

    def from_owner(attn):
        def fill(w):
            if w.a_from is None:
                return w
            owner = next(o for _, o in levels(attn[w.a_from]["w"]) if o.name == w.name)
            return replace(w, **{field: getattr(owner, field)})
        return fill

    blocks = [{**b, "attn": {m: {**p, "w": restack(p["w"], from_owner(b["attn"]))} for m, p in b["attn"].items()}}
              for b in params["blocks"]]
    return {**params, "blocks": blocks}


def lora_weights(params) -> dict[str, LoraWeight]:
    """{name of the matrix, e.g. 'blocks.0.attn.q.w': its (outermost) LoraWeight}, shared A's filled in."""
    return dict(stacks(fill_shared_a(params)))
