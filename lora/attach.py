"""Attaching adapters: each targeted matrix W becomes a LoraWeight(W, A, B), initialised so that the
adapted model starts exactly where the base is (s·A B = 0), except PiSSA, which moves W's top part
into the adapter and leaves the residual frozen.

    standard  A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's Kaiming-uniform default), B = 0
    gaussian  A ~ N(0, 1/R²), B = 0
    pissa     W = U S Vᵀ; A = U_R sqrt(S_R) / sqrt(s), B = sqrt(S_R) V_Rᵀ / sqrt(s), so s·A B is W's top-R
              part and the frozen base becomes the residual W - s·A B (Meng et al. 2024, arXiv 2404.02948)

DoRA (use_dora) also starts a trainable magnitude at the column norms of W, which again leaves the
model unchanged. Attaching to a matrix that already has an adapter stacks a second one (lora/stack.py).
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from lora.config import LoraConfig
from lora.stack import adapter_names, fill_shared_a, is_lora
from lora.targets import at, chosen_sites, pattern_value, replaced_at, shared_a
from lora.weight import LoraWeight, column_norm
from minilm.errors import MinilmError


def init_adapter(w: jax.Array, rank: int, scale: float, cfg: LoraConfig, key: jax.Array, site: str) -> LoraWeight:
    """W (d_in, d_out) with a fresh adapter of rank R and scale s, initialised as cfg.init says."""
    d_in, d_out = w.shape  # chosen_sites checked that rank <= min(d_in, d_out)
    if cfg.use_dora and site == "embed":
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
    params = fill_shared_a(params)  # a tree from combine(trainable, frozen) may still have holes
    chosen = chosen_sites(params, cfg)
    for i, (site, path) in enumerate(sorted(chosen.items())):
        w = at(params, path)
        if cfg.use_dora and is_lora(w):
            raise MinilmError(f"DoRA cannot stack on another adapter ({site} already has one)")
        rank = pattern_value(cfg.rank_pattern, site, cfg.rank)
        scale = cfg.scale_for(rank, pattern_value(cfg.alpha_pattern, site, cfg.alpha))
        base = w if not (cfg.init == "pissa" and is_lora(w)) else w.merged()
        params = replaced_at(params, path, init_adapter(base, rank, scale, cfg, jax.random.fold_in(key, i), site))
    for site, owner in (shared_a(chosen) if cfg.fuse_qkv else {}).items():  # chosen_sites checked the ranks
        w, a = at(params, chosen[site]), at(params, chosen[owner]).lora_a
        params = replaced_at(params, chosen[site], replace(w, lora_a=a, a_from=owner.rsplit(".", 1)[1]))
    return params
