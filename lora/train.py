"""Training only the adapters: which leaves train, the (trainable, frozen) halves, dropout, the loss.

minilm.train's step takes (trainable, frozen) and differentiates only the first, so LoRA is a choice
of halves: the named adapter's A and B (and DoRA's magnitude) train, with whatever biases and
modules the config asks for; the base weights sit in the frozen half, so XLA never computes their
gradient. `summary` says, per matrix, what that choice trains.
"""

from __future__ import annotations

from dataclasses import replace

import jax

from lora.config import LoraConfig, matches
from lora.stack import fill_shared_a, levels, restack, stacks
from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import forward
from minilm.train import cross_entropy
from minilm.tree import combine, named_leaves, partition

ADAPTER_LEAVES = ("lora_a", "lora_b", "magnitude")


def trainable_names(params, cfg: LoraConfig) -> set[str]:
    """Leaf names that train: the named adapter's A, B (and m), plus the biases and modules cfg asks for."""
    names = set()
    for matrix, stack in stacks(params):
        for prefix, w in levels(stack, matrix):
            if w.name == cfg.name:  # a shared A (fuse_qkv) trains once, in the matrix that owns it
                names |= {f"{prefix}.{k}" for k in ADAPTER_LEAVES
                          if getattr(w, k) is not None and not (k == "lora_a" and w.a_from)}
    adapted_modules = {n.split(".w.")[0] for n in names}
    adapted = {matrix for matrix, _ in stacks(params)}  # 'blocks.0.attn.q.w', 'embed.tok': matrices with an adapter
    saved = set()
    for name in named_leaves(params):
        # an adapted matrix's leaves (…q.w.base, …q.w.lora_a) answer to the matrix's own name (…q.w)
        tensor = next((a for a in adapted if name.startswith(a + ".")), name)
        module = tensor.rsplit(".", 1)[0]
        if name.endswith(".b") and (cfg.bias == "all" or (cfg.bias == "lora_only" and module in adapted_modules)):
            names.add(name)
        hits = {p for p in cfg.modules_to_save
                if matches(p, module) or matches(p, tensor) or tensor.startswith(p + ".")}
        if hits:
            if tensor in adapted:
                raise MinilmError(f"modules_to_save names {tensor}, which has an adapter; train one or the other")
            names.add(name)
            saved |= hits
    unmatched = [p for p in cfg.modules_to_save if p not in saved]
    if unmatched:
        raise MinilmError(f"modules_to_save {unmatched} match no parameter; name modules such as ln_f, embed.pos, "
                          f"blocks.*.ln1 or blocks.0.mlp.fc")
    return names


def split(params, cfg: LoraConfig):
    """(trainable, frozen): only what `cfg` trains is trainable; everything else is frozen.

    A shared A (fuse_qkv) is in neither half except in its owner; `fill_shared_a` fills it in again."""
    names = trainable_names(params, cfg)
    trainable, frozen = partition(fill_shared_a(params), lambda name: name in names)
    return trainable, restack(frozen, lambda w: replace(w, lora_a=None) if w.a_from and w.name == cfg.name else w)


def with_dropout(params, key: jax.Array):
    """Give every adapter with dropout its own key (done inside the loss, one key per micro-batch).

    Adapters that share an A (fuse_qkv) share its owner's key too: one dropout mask on their common
    input, as on the stacked matrix."""
    counter = iter(range(1 << 30))
    keyed = restack(params, lambda w: replace(w, dropout_key=jax.random.fold_in(key, next(counter))))
    return fill_shared_a(keyed, "dropout_key")


def loss_fn(trainable, frozen, windows, cfg: ModelConfig, key=None):
    """The language-model loss with adapter dropout active (a drop-in for `minilm.train.loss_fn`)."""
    params = fill_shared_a(combine(trainable, frozen))
    if key is not None:
        params = with_dropout(params, key)
    return cross_entropy(forward(params, windows[:, :-1], cfg), windows[:, 1:])


# ---------------------------------------------------------------- what trains, per matrix


def summary(params, trainable) -> list[dict]:
    """One row per adapted matrix and per other trainable tensor: shapes, rank, scale, counts."""
    rows = []
    leaves = named_leaves(trainable)
    for matrix, stack in stacks(params):
        for prefix, w in levels(stack, matrix):
            own = sum(leaves[f"{prefix}.{k}"].size for k in ADAPTER_LEAVES if f"{prefix}.{k}" in leaves)
            if own:
                rows.append({"tensor": prefix, "shape": tuple(w.shape), "kind": "DoRA" if w.magnitude is not None
                             else "LoRA", "rank": w.rank, "scale": w.scale, "trainable": own, "a_from": w.a_from})
    for name, leaf in leaves.items():
        if not name.endswith(ADAPTER_LEAVES):
            rows.append({"tensor": name, "shape": tuple(leaf.shape), "kind": "full", "rank": None, "scale": None,
                         "trainable": leaf.size, "a_from": None})
    return rows


def format_summary(rows, total_params: int, optimizer_bytes: int) -> str:
    lines = [f"{'tensor':<28} {'shape':>12} {'kind':>5} {'rank':>5} {'scale':>7} {'trainable':>10}"]
    for r in rows:
        rank = "" if r["rank"] is None else r["rank"]
        scale = "" if r["scale"] is None else f"{r['scale']:.3g}"
        lines.append(f"{r['tensor']:<28} {'x'.join(map(str, r['shape'])):>12} {r['kind']:>5} {rank:>5} "
                     f"{scale:>7} {r['trainable']:>10,}")
    n = sum(r["trainable"] for r in rows)
    shared = sorted({r["a_from"] for r in rows if r["a_from"]})
    if shared:
        lines.append(f"(fuse_qkv: a block's adapted q, k, v share one A, counted in the row of attn.{shared[0]})")
    lines.append(f"trainable {n:,} of {total_params:,} parameters ({100 * n / total_params:.3f}%); "
                 f"optimizer state {optimizer_bytes:,} bytes")
    return "\n".join(lines)
