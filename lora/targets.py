"""Which matrices an adapter attaches to, and with what rank: reading a LoraConfig against a model.

A site is a matrix an adapter can sit on, named as in target patterns: `blocks.0.attn.q` (the matrix
at params["blocks"][0]["attn"]["q"]["w"]) or `embed` (the tied token embedding). A config picks sites
by its targets and layers; its rank and alpha patterns override the rank and alpha of the sites they
match (the first matching pattern wins). Everything here is checked before any array is made, so a
config that cannot work fails with a message that says why.

With fuse_qkv a block's adapted q, k and v share one A, owned by the first of them (`shared_a`).
"""

from __future__ import annotations

from lora.config import BLOCK_MATRICES, LoraConfig, matches
from minilm.errors import MinilmError


def sites(params) -> dict[str, tuple]:
    """Every matrix an adapter can attach to: {site: its path in the tree}, e.g. 'blocks.0.attn.q'."""
    out = {"embed": ("embed", "tok")}
    for i, block in enumerate(params["blocks"]):
        for short in BLOCK_MATRICES:
            group, name = short.split(".")
            if group in block and name in block[group]:
                out[f"blocks.{i}.{short}"] = ("blocks", i, group, name, "w")
    return out


def at(tree, path):
    """The subtree of nested dicts and lists at `path`."""
    for k in path:
        tree = tree[k]
    return tree


def replaced_at(tree, path, value):
    """A copy of the nested dict/list `tree` with `value` at `path` (only the spine is copied)."""
    head, *rest = path
    copy = list(tree) if isinstance(tree, list) else dict(tree)
    copy[head] = replaced_at(tree[head], rest, value) if rest else value
    return copy


def pattern_value(table: dict, site: str, default):
    """The value of the first pattern in `table` (rank_pattern, alpha_pattern) that matches `site`."""
    for pattern, value in table.items():
        if matches(pattern, site):
            return value
    return default


def chosen_sites(params, cfg: LoraConfig) -> dict[str, tuple]:
    """The sites the config's targets and layer selection pick. Errors, before any array is made: a target
    or pattern matching nothing, a missing layer, a rank above a matrix's, q, k, v that cannot share an A."""
    all_sites = sites(params)
    chosen = {}
    for target in cfg.targets:
        hits = {n: p for n, p in all_sites.items() if matches(target, n)}
        if not hits:
            valid = ", ".join(["all-linear", "embed", *BLOCK_MATRICES])
            raise MinilmError(f"LoRA target {target!r} matches no matrix; valid targets: {valid} "
                              f"(glob patterns such as attn.* and full names such as blocks.0.attn.q work too)")
        chosen.update(hits)
    if cfg.layers is not None:
        n_layers = len(params["blocks"])
        bad = [i for i in cfg.layers if i >= n_layers]
        if bad:
            raise MinilmError(f"LoRA layers {bad} do not exist: the model has blocks 0..{n_layers - 1}")
        chosen = {n: p for n, p in chosen.items() if n == "embed" or p[1] in cfg.layers}
    for pattern in (*cfg.rank_pattern, *cfg.alpha_pattern):
        if not any(matches(pattern, n) for n in chosen):
            raise MinilmError(f"LoRA rank/alpha pattern {pattern!r} matches none of the targets {sorted(chosen)}")
    for name in sorted(chosen):
        rank, (d_in, d_out) = pattern_value(cfg.rank_pattern, name, cfg.rank), at(params, chosen[name]).shape
        if rank > min(d_in, d_out):
            raise MinilmError(f"LoRA rank {rank} for {name} is larger than min(d_in, d_out) = {min(d_in, d_out)} "
                              f"of its {d_in}x{d_out} matrix; choose rank <= {min(d_in, d_out)}")
    if cfg.fuse_qkv:
        sharing = shared_a(chosen)
        if not sharing:
            raise MinilmError(f"fuse_qkv shares one A among a block's q, k, v, but the targets {list(cfg.targets)} "
                              f"adapt fewer than two of them; add attn.q, attn.k, attn.v or drop fuse_qkv")
        for name, owner in sharing.items():
            rank, owner_rank = (pattern_value(cfg.rank_pattern, n, cfg.rank) for n in (name, owner))
            if rank != owner_rank:
                raise MinilmError(f"fuse_qkv: {name} has rank {rank} but {owner} has {owner_rank}; "
                                  f"one shared A needs one rank (check rank_pattern)")
    return chosen


def site_ranks(params, cfg: LoraConfig) -> dict[str, int]:
    """{site: its rank} for every site `cfg` picks, rank_pattern applied."""
    return {name: pattern_value(cfg.rank_pattern, name, cfg.rank) for name in chosen_sites(params, cfg)}


def shared_a(names) -> dict[str, str]:
    """With fuse_qkv: {adapted matrix: the matrix whose A it uses}, from the adapted matrices' names. In
    each block the first adapted one of q, k, v owns the A: {'blocks.0.attn.k': 'blocks.0.attn.q', ...}."""
    out = {}
    for name in names:
        parts = name.split(".")  # blocks, i, attn, k
        if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn" and parts[3] in ("k", "v"):
            layer = name.rsplit(".", 1)[0]
            owner = next(f"{layer}.{m}" for m in ("q", "k", "v") if f"{layer}.{m}" in names)
            if owner != name:
                out[name] = owner
    return out
