"""Parameter trees with readable names, and splitting them into a trainable and a frozen part.

Params are plain nested dicts and lists of arrays. Every leaf has a dotted name, its path through the
tree (`blocks.0.attn.q.w`): the names in checkpoint files, in LoRA target patterns and in analysis
tables are all this one spelling.

`partition` and `combine` are how one train step serves full fine-tuning and LoRA alike: both halves
keep the full tree structure, with `None` where a leaf belongs to the other half. JAX treats `None` as
an empty subtree, so gradients and optimizer state exist only for the leaves actually present.
"""

from __future__ import annotations

from typing import Callable

import jax

from minilm.errors import MinilmError


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path) -> str:
    """A jax key path as a dotted name: (DictKey('blocks'), SequenceKey(0), ...) -> 'blocks.0...'."""
    return ".".join(_key_name(k) for k in path)


def named_leaves(tree) -> dict[str, jax.Array]:
    """{dotted name: leaf} in the tree's own (deterministic) order."""
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def fill(template, named: dict, what: str = "parameters"):
    """The tree shaped like `template` whose leaves are `named[name]`; names and shapes must match.

    Raises a MinilmError naming the first missing, unexpected or mis-shaped tensor.
    """
    expected = named_leaves(template)
    missing = [n for n in expected if n not in named]
    unexpected = [n for n in named if n not in expected]
    if missing or unexpected:
        raise MinilmError(
            f"{what}: tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, want in expected.items():
        got = named[name]
        if tuple(got.shape) != tuple(want.shape):
            raise MinilmError(
                f"{what}: tensor {name!r} has shape {tuple(got.shape)} but the config expects "
                f"{tuple(want.shape)}"
            )
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [named[n] for n in expected])


def partition(tree, is_trainable: Callable[[str], bool]):
    """Split into (trainable, frozen) by leaf name; each keeps the structure, None for the other's leaves."""
    trainable = jax.tree_util.tree_map_with_path(lambda p, x: x if is_trainable(path_name(p)) else None, tree)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if is_trainable(path_name(p)) else x, tree)
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of `partition`: take each leaf from whichever half holds it."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def size(tree) -> int:
    """Number of scalars in the tree."""
    return sum(x.size for x in jax.tree.leaves(tree))
