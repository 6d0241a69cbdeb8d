"""The analytic cost model (minilm/cost.py) against JAX's own trace of the gradient computation.

Oracle: every dot_general in the jaxpr of value_and_grad(loss) -- forward and backward, walked into
every sub-jaxpr -- counted at 2 · (product of the output's dimensions) · (product of the contracted
dimensions). The cost model's forward + input-gradient + weight-gradient + LoRA-extra FLOPs must equal
that sum exactly, for full fine-tuning and for adapters in several places (including ones where an
operand's gradient is not needed, which JAX then does not compute).

The context, 150, is not a multiple of the attention's query block (64), so the uneven last block
is counted too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from lora import cost as lora_cost
from minilm import cost, train
from minilm.config import ModelConfig
from minilm.model import init
from minilm.tree import partition, size

CFG = ModelConfig(vocab_size=11, context=150, width=24, heads=2, layers=2, mlp_ratio=4)
BATCH = 2


def dot_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += dot_flops(inner)  # (no scan here: one micro-batch)
    return total


def traced_flops(lora_cfg) -> tuple[int, int]:
    """(dot FLOPs of value_and_grad(loss) in JAX's trace, trainable scalars)."""
    params = init(CFG, key=jax.random.key(0))
    if lora_cfg is None:
        trainable, frozen = partition(params, lambda name: True)
        loss = train.loss_fn
    else:
        trainable, frozen = lora.split(lora.attach(params, lora_cfg, key=jax.random.key(1)), lora_cfg)
        loss = lora.loss_fn
    windows = jnp.zeros((BATCH, CFG.context + 1), jnp.int32)
    grad = jax.value_and_grad(lambda t, f, w, k: loss(t, f, w, CFG, k))
    jaxpr = jax.make_jaxpr(grad)(trainable, frozen, windows, jax.random.key(2))
    return dot_flops(jaxpr.jaxpr), size(trainable)


CASES = {
    "full": None,
    "q,v": lora.LoraConfig(rank=4, targets=("attn.q", "attn.v")),
    "k only": lora.LoraConfig(rank=2, targets=("attn.k",)),        # queries' gradient not needed in block 0
    "all-linear": lora.LoraConfig(rank=8, targets=("all-linear",)),
    "all-linear, one A for q, k, v": lora.LoraConfig(rank=8, targets=("all-linear",), fuse_qkv=True),
    "k, v with one A": lora.LoraConfig(rank=2, targets=("attn.k", "attn.v"), fuse_qkv=True),
    "q, v, mlp.fc, one A, one layer": lora.LoraConfig(rank=3, targets=("attn.q", "attn.v", "mlp.fc"), fuse_qkv=True,
                                                      layers=(1,)),
    "embed + mlp, mixed ranks": lora.LoraConfig(rank=3, targets=("embed", "mlp.*"), rank_pattern={"mlp.proj": 5}),
    "one late layer": lora.LoraConfig(rank=1, targets=("attn.o",), layers=(1,)),
}


@pytest.mark.parametrize("name", CASES)
def test_flops_equal_the_matrix_products_jax_traces(name):
    lora_cfg = CASES[name]
    predicted = lora_cost.lora_step_cost(CFG, BATCH, lora_cfg)  # its sites, ranks and shared A's, from the config
    traced, trainable = traced_flops(lora_cfg)
    assert predicted.flops == traced
    assert predicted.trainable_params == trainable


def test_full_step_costs_three_forwards_and_lora_removes_the_weight_gradients():
    full = cost.step_cost(CFG, BATCH)
    adapters = lora_cost.adapter_ranks(CFG, CASES["all-linear"])
    low = lora_cost.adapters_step_cost(CFG, BATCH, adapters)
    N, D, F, V, L = BATCH * CFG.context, CFG.width, CFG.mlp_width, CFG.vocab_size, CFG.layers
    # every linear layer's dW by hand: q, k, v, o (D, D), fc (D, F), proj (F, D), and the tied unembedding
    assert full.weight_grad == 2 * N * (L * (4 * D * D + 2 * D * F) + D * V)
    assert full.input_grad < full.forward * 2         # the embedding lookup passes no dX further down
    assert low.weight_grad == 0 and low.forward == full.forward
    # the adapters' own products, per (d_in, d_out) matrix: the merge A B, 2 d_in R d_out, and four thin
    # products of the backward pass (x A, (x A)ᵀ dY, dY Bᵀ, xᵀ (dY Bᵀ)), 4 N R (d_in + d_out)
    R = 8
    extra = lambda d_in, d_out: 2 * d_in * R * d_out + 4 * N * R * (d_in + d_out)
    assert low.lora_extra == CFG.layers * (4 * extra(D, D) + extra(D, F) + extra(F, D))


def test_attention_blocks_cover_the_causal_triangle_once():
    for T in (1, 63, 64, 65, 150, 256):
        blocks = cost.attention_blocks(T)
        assert sum(q for q, _ in blocks) == T
        seen = np.zeros((T, T), bool)
        start = 0
        for queries, keys in blocks:
            seen[start:start + queries, :keys] = True
            start += queries
        assert (seen | ~np.tril(np.ones((T, T), bool))).all() and seen[np.tril(np.ones((T, T), bool))].all()


def test_state_bytes_match_the_pytrees():
    params = init(CFG, key=jax.random.key(0))
    full = cost.step_cost(CFG, BATCH)
    assert full.params_bytes == 4 * size(params) and full.trainable_params == size(params)
    lora_cfg = CASES["embed + mlp, mixed ranks"]
    adapted = lora.attach(params, lora_cfg, key=jax.random.key(1))
    trainable, _ = lora.split(adapted, lora_cfg)
    low = lora_cost.adapters_step_cost(CFG, BATCH, lora_cost.adapter_ranks(CFG, lora_cfg))
    assert low.trainable_params == size(trainable)
    assert low.optimizer_bytes == 2 * 4 * size(trainable)
    assert low.params_bytes == 4 * size(adapted)
