"""Attaching adapters to a model's parameters, training them alone, merging, removing, saving.

    attach(params, cfg, key=)  each targeted matrix W becomes a LoraWeight(W, A, B)
    split(params, cfg)         (trainable, frozen): the adapters (+ chosen biases / modules) vs the rest
    tie(params)                fill in the A that q, k, v share (fuse_qkv) after split's halves are combined
    merge(params)              every LoraWeight -> the plain matrix W' it stands for
    unmerge(merged, adapted)   W' - s·A B: the base weights back from a merged model and its adapter
    disable(params)            the model with adapters removed
    save_adapter / load_adapter  adapter_config.json + adapter_model.safetensors

Initialisations (A random and B zero make the adapter start as exactly no change):
    standard  A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's Kaiming-uniform default), B = 0
    gaussian  A ~ N(0, 1/R²), B = 0
    pissa     W = U S Vᵀ; A = U_R sqrt(S_R) / sqrt(s), B = sqrt(S_R) V_Rᵀ / sqrt(s), so s·A B is W's top-R
              part and the frozen base becomes the residual W - s·A B (Meng et al. 2024, arXiv 2404.02948)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lora.config import BLOCK_MATRICES, LoraConfig, matches
from lora.weight import LoraWeight, column_norm
from minilm.checkpoint import write_text_atomic
from minilm.config import ModelConfig, from_dict, to_dict
from minilm.errors import MinilmError
from minilm.model import forward
from minilm.tokenizer import Tokenizer
from minilm.train import cross_entropy
from minilm.tree import combine, fill, named_leaves, partition, path_name

ADAPTER_LEAVES = ("lora_a", "lora_b", "magnitude")


def is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def sites(params) -> dict[str, tuple[str, ...]]:
    """Every matrix an adapter can attach to: {target name: path in the tree}, e.g. 'blocks.0.attn.q'."""
    out = {"embed": ("embed", "tok")}
    for i, block in enumerate(params["blocks"]):
        for short in BLOCK_MATRICES:
            group, name = short.split(".")
            if group in block and name in block[group]:
                out[f"blocks.{i}.{short}"] = ("blocks", i, group, name, "w")
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    """A copy of the nested dict/list `tree` with `value` at `path` (only the spine is copied)."""
    head, *rest = path
    copy = list(tree) if isinstance(tree, list) else dict(tree)
    copy[head] = _set(tree[head], rest, value) if rest else value
    return copy


def chosen_sites(params, cfg: LoraConfig) -> dict[str, tuple[str, ...]]:
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
        rank, (d_in, d_out) = _override(cfg.rank_pattern, name, cfg.rank), _get(params, chosen[name]).shape
        if rank > min(d_in, d_out):
            raise MinilmError(f"LoRA rank {rank} for {name} is larger than min(d_in, d_out) = {min(d_in, d_out)} "
                              f"of its {d_in}x{d_out} matrix; choose rank <= {min(d_in, d_out)}")
    if cfg.fuse_qkv:
        sharing = shared_a(chosen)
        if not sharing:
            raise MinilmError(f"fuse_qkv shares one A among a block's q, k, v, but the targets {list(cfg.targets)} "
                              f"adapt fewer than two of them; add attn.q, attn.k, attn.v or drop fuse_qkv")
        for name, owner in sharing.items():
            rank, owner_rank = (_override(cfg.rank_pattern, n, cfg.rank) for n in (name, owner))
            if rank != owner_rank:
                raise MinilmError(f"fuse_qkv: {name} has rank {rank} but {owner} has {owner_rank}; "
                                  f"one shared A needs one rank (check rank_pattern)")
    return chosen


def site_ranks(params, cfg: LoraConfig) -> dict[str, int]:
    """{site: its rank} for every site `cfg` picks, rank_pattern applied."""
    return {name: _override(cfg.rank_pattern, name, cfg.rank) for name in chosen_sites(params, cfg)}


def _override(table, name, default):
    for pattern, value in table.items():  # the first matching pattern wins
        if matches(pattern, name):
            return value
    return default


def _init_adapter(w: jax.Array, rank: int, scale: float, cfg: LoraConfig, key, name: str) -> LoraWeight:
    d_in, d_out = w.shape  # chosen_sites checked that rank <= min(d_in, d_out)
    if cfg.use_dora and name == "embed":
        raise MinilmError("DoRA is undefined on the tied embedding: its rows are token vectors on input and "
                          "output units on output; drop embed from the targets or use_dora")
    if cfg.init == "pissa":
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)  # w = u diag(s) vt, s descending
        root = jnp.sqrt(s[:rank] / scale)
        a, b = u[:, :rank] * root, root[:, None] * vt[:rank]  # (d_in, R), (R, d_out)
        return LoraWeight(w - scale * (a @ b), a, b, scale=scale, dropout=cfg.dropout, name=cfg.name)
    if cfg.init == "gaussian":
        a = jax.random.normal(key, (d_in, rank)) / rank
    else:
        bound = 1 / np.sqrt(d_in)
        a = jax.random.uniform(key, (d_in, rank), minval=-bound, maxval=bound)
    b = jnp.zeros((rank, d_out))
    magnitude = column_norm(w) if cfg.use_dora else None
    return LoraWeight(w, a, b, magnitude, scale=scale, dropout=cfg.dropout, name=cfg.name)


def attach(params, cfg: LoraConfig, *, key: jax.Array):
    """The params with an adapter on every matrix `cfg` targets. Attaching to a model that already has
    adapters stacks a second one (with another `name`) on top."""
    if cfg.name in adapter_names(params):
        raise MinilmError(f"an adapter named {cfg.name!r} is already attached; give the new one another name")
    params = tie(params)  # a tree from combine(trainable, frozen) may still have holes
    chosen = chosen_sites(params, cfg)
    for i, (name, path) in enumerate(sorted(chosen.items())):
        w = _get(params, path)
        if cfg.use_dora and is_lora(w):
            raise MinilmError(f"DoRA cannot stack on another adapter ({name} already has one)")
        rank = _override(cfg.rank_pattern, name, cfg.rank)
        scale = cfg.scale_for(rank, _override(cfg.alpha_pattern, name, cfg.alpha))
        base = w if not (cfg.init == "pissa" and is_lora(w)) else w.merged()
        params = _set(params, path, _init_adapter(base, rank, scale, cfg, jax.random.fold_in(key, i), name))
    for name, owner in (shared_a(chosen) if cfg.fuse_qkv else {}).items():  # chosen_sites checked the ranks
        w, a = _get(params, chosen[name]), _get(params, chosen[owner]).lora_a
        params = _set(params, chosen[name], replace(w, lora_a=a, a_from=owner.rsplit(".", 1)[1]))
    return params


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


def tie(params):
    """Every adapter that shares another's A (fuse_qkv) gets that A filled in.

    `split` trains a shared A once, in the matrix that owns it, and leaves a hole in the others, so
    `combine(trainable, frozen)` gives them no A of their own: this puts it back. Autodiff through
    `tie` is what sums the three matrices' gradients into the one shared A. Idempotent."""
    return _from_owner(params, "lora_a")


def _from_owner(params, field: str):
    """Every adapter with a_from takes `field` from the adapter (of the same name) that owns its A."""
    if not any(is_lora(w) and w.a_from for w in _all_levels(params)):
        return params

    def filled(w, attn):
        if not is_lora(w):
            return w
        w = replace(w, base=filled(w.base, attn))
        if w.a_from is None:
            return w
        owner = attn[w.a_from]["w"]
        while owner.name != w.name:
            owner = owner.base
        return replace(w, **{field: getattr(owner, field)})

    blocks = [{**b, "attn": {m: {**p, "w": filled(p["w"], b["attn"])} for m, p in b["attn"].items()}}
              for b in params["blocks"]]
    return {**params, "blocks": blocks}


def _all_levels(params):
    for leaf in jax.tree.leaves(params, is_leaf=is_lora):
        while is_lora(leaf):
            yield leaf
            leaf = leaf.base


def lora_weights(params) -> dict[str, LoraWeight]:
    """{name of the matrix, e.g. 'blocks.0.attn.q.w': its (outermost) LoraWeight}."""
    flat = jax.tree_util.tree_flatten_with_path(tie(params), is_leaf=is_lora)[0]
    return {path_name(p): w for p, w in flat if is_lora(w)}


def adapter_names(params) -> list[str]:
    return sorted({w.name for w in _all_levels(params)})


def trainable_names(params, cfg: LoraConfig) -> set[str]:
    """Leaf names that train: the named adapter's A, B (and m), plus the biases and modules cfg asks for."""
    names = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]:
        prefix = path_name(path)
        while is_lora(leaf):
            if leaf.name == cfg.name:  # a shared A (fuse_qkv) trains once, in the matrix that owns it
                names |= {f"{prefix}.{k}" for k in ADAPTER_LEAVES
                          if getattr(leaf, k) is not None and not (k == "lora_a" and leaf.a_from)}
            leaf, prefix = leaf.base, prefix + ".base"
    adapted_modules = {n.split(".w.")[0] for n in names}
    adapted = {path_name(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
               if is_lora(leaf)}  # 'blocks.0.attn.q.w', 'embed.tok': matrices that carry an adapter
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

    A shared A (fuse_qkv) is in neither half except in its owner; `tie` fills it in again."""
    names = trainable_names(params, cfg)
    trainable, frozen = partition(tie(params), lambda name: name in names)

    def hole(w):
        if not is_lora(w):
            return w
        w = replace(w, base=hole(w.base))
        return replace(w, lora_a=None) if w.a_from and w.name == cfg.name else w

    return trainable, _map_lora(hole, frozen)


def _map_lora(fn, params):
    return jax.tree.map(lambda x: fn(x) if is_lora(x) else x, params, is_leaf=is_lora)


def merge(params, weights: dict[str, float] | None = None):
    """Every LoraWeight -> W + Σ weight_i · s_i A_i B_i as a plain matrix (weights default to 1).

    Weights other than 1 combine adapters linearly; DoRA's rescaling is not linear and refuses them.
    """
    weights = weights or {}
    params = tie(params)

    def fold(w):
        if not is_lora(w):
            return w
        base = fold(w.base)
        factor = weights.get(w.name, 1.0)
        if w.magnitude is not None:
            if factor != 1.0:
                raise MinilmError(f"adapter {w.name!r} is DoRA: it cannot be weighted ({factor}); merge it alone")
            return replace(w, base=base).merged()
        return base + factor * w.delta()

    return _map_lora(fold, params)


def unmerge(merged, adapted):
    """The base weights recovered from a merged model: W = W' - s·A B for every adapter in `adapted`."""
    def subtract(w_merged, w):
        while is_lora(w):
            if w.magnitude is not None:
                raise MinilmError("a DoRA merge cannot be undone from the merged weights alone "
                                  "(the column norms of W + s·A B are lost); keep the base checkpoint")
            w_merged, w = w_merged - w.delta(), w.base
        return w_merged

    return jax.tree.map(subtract, merged, tie(adapted), is_leaf=is_lora)


def disable(params, name: str | None = None):
    """The model without its adapters (or without the one called `name`). For PiSSA the base that
    remains is the residual W - s·A₀B₀, not the original W."""
    def strip(w):
        if not is_lora(w):
            return w
        inner = strip(w.base)
        return inner if name is None or w.name == name else replace(w, base=inner)

    return _map_lora(strip, tie(params))


def with_dropout(params, key: jax.Array):
    """Give every adapter with dropout its own key (done inside the loss, one key per micro-batch).

    Adapters that share an A (fuse_qkv) share its owner's key too: one dropout mask on their common
    input, as on the stacked matrix."""
    counter = iter(range(1 << 30))

    def arm(w):
        if not is_lora(w):
            return w
        return replace(w, base=arm(w.base), dropout_key=jax.random.fold_in(key, next(counter)))

    return _from_owner(_map_lora(arm, params), "dropout_key")


def loss_fn(trainable, frozen, windows, cfg: ModelConfig, key=None):
    """The language-model loss with adapter dropout active (a drop-in for `minilm.train.loss_fn`)."""
    params = tie(combine(trainable, frozen))
    if key is not None:
        params = with_dropout(params, key)
    return cross_entropy(forward(params, windows[:, :-1], cfg), windows[:, 1:])


# ---------------------------------------------------------------- what trains, per matrix


def summary(params, trainable) -> list[dict]:
    """One row per adapted matrix and per other trainable tensor: shapes, rank, scale, counts."""
    rows = []
    leaves = named_leaves(trainable)
    for path, w in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]:
        prefix = path_name(path)
        while is_lora(w):
            own = sum(leaves[f"{prefix}.{k}"].size for k in ADAPTER_LEAVES if f"{prefix}.{k}" in leaves)
            if own:
                rows.append({"tensor": prefix, "shape": tuple(w.shape), "kind": "DoRA" if w.magnitude is not None
                             else "LoRA", "rank": w.rank, "scale": w.scale, "trainable": own, "a_from": w.a_from})
            w, prefix = w.base, prefix + ".base"
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


# ---------------------------------------------------------------- adapter files


def save_adapter(path: Path, params, cfg: LoraConfig, model_cfg: ModelConfig,
                 tokenizer: Tokenizer | None = None) -> None:
    """adapter_config.json (the LoRA config, the base's shape and vocabulary) + adapter_model.safetensors
    (what trains)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    trainable, _ = split(params, cfg)
    tmp = path / "adapter_model.safetensors.tmp"
    save_file({n: np.asarray(x) for n, x in named_leaves(trainable).items()}, tmp)
    tmp.replace(path / "adapter_model.safetensors")
    write_text_atomic(path / "adapter_config.json",
                      json.dumps({"lora": cfg.to_json(), "base_model": to_dict(model_cfg),
                                  "base_vocabulary": None if tokenizer is None else tokenizer.to_json()},
                                 indent=1, ensure_ascii=False))


def load_adapter(path: Path, base_params, base_cfg: ModelConfig, name: str | None = None,
                 tokenizer: Tokenizer | None = None):
    """Attach the adapter saved in `path` to `base_params` -> (params, LoraConfig). `name` renames it,
    so that several adapters can be stacked on one base. With `tokenizer`, the base's vocabulary must be
    the one the adapter was trained with."""
    path = Path(path)
    config_path, arrays_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config_path, arrays_path):
        if not f.is_file():
            raise MinilmError(f"{f} is missing; give a folder written by `minilm finetune --lora`")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinilmError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "lora" not in data or "base_model" not in data:
        raise MinilmError(f"{config_path} must hold {{'lora': {{...}}, 'base_model': {{...}}}}")
    cfg = LoraConfig.from_json(data["lora"], str(config_path))
    if name is not None:
        cfg = replace(cfg, name=name)
    trained_on = from_dict(ModelConfig, data["base_model"], f"{config_path} [base_model]")
    if trained_on != base_cfg:
        diff = "; ".join(f"{k}: adapter {v} vs base {getattr(base_cfg, k)}"
                         for k, v in to_dict(trained_on).items() if getattr(base_cfg, k) != v)
        raise MinilmError(f"the adapter in {path} was trained on a different base model ({diff})")
    saved_vocab = data.get("base_vocabulary")
    if tokenizer is not None and saved_vocab is not None and Tokenizer.from_json(saved_vocab) != tokenizer:
        theirs = Tokenizer.from_json(saved_vocab).vocab
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(theirs, tokenizer.vocab)) if a != b][:3]
        raise MinilmError(f"the adapter in {path} was trained with another vocabulary of the same size "
                          f"(token id adapter vs base: {', '.join(diff)}); use the base it was trained on")
    try:
        arrays = load_file(arrays_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise MinilmError(f"{arrays_path} is not a readable safetensors file ({e})") from None
    params = attach(base_params, cfg, key=jax.random.key(0))
    trainable, frozen = split(params, cfg)
    trainable = fill(trainable, arrays, str(arrays_path))
    return tie(combine(jax.tree.map(jnp.asarray, trainable), frozen)), cfg
