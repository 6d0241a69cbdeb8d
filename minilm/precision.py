"""Products in a narrower number format, forward and backward: the arithmetic of mixed precision.

    train.mixed_precision   casts the block matrices to bfloat16, once per step (the one cast of weights)
    mixed_precision_matmul  x @ w in w's format, float32 accumulation and result; gradients likewise

With float32 weights everything here is plain float32 `x @ w`, bit for bit what it always was. With
bfloat16 weights every product with a block matrix (q, k, v, o, the MLP's two) takes bfloat16 operands
and accumulates in float32, forward and backward (Micikevicius et al. 2018; bfloat16 has float32's
exponent range, so no loss scaling), while LayerNorm, softmax, GELU, the residual stream and the loss
stay float32. So do attention's two products (activation by activation, 1/6 of the FLOPs on `small`):
run through `mixed_precision_matmul` too, with heads and keys written out row-major, they made the
`small` step 5-10% slower, not faster (alternated in one process: the copies, casts and bfloat16
gradient sums over query blocks cost more than the products saved); the tied unembedding (V = 65
columns) is too thin to matter.

Speed trick, the reason this file exists. XLA's CPU backend runs a bfloat16 product in YNNPACK, at
twice float32's rate on a CPU with avx512_bf16 (measured here, (2048, 384) x (384, 1536): 406 vs 209
GFLOP/s), only when both operands are row-major with the contraction on the left operand's last axis
and the right one's first (`IsDotSupportedByYnn` in XLA); any other bfloat16 product it converts to
float32 first (its FloatNormalization pass). Autodiff of y = x w gives dx = dy wᵀ and dw = xᵀ dy, each
with a transposed operand, and dy in float32: so before this file the backward products, 2/3 of the
block products' FLOPs, ran in float32 plus conversions, and the `small` bfloat16 step took 0.90 of
float32's time (LoRA 0.83). Here the gradients are written by hand with every operand in bfloat16 and
row-major (`transposed`): 0.68 (LoRA 0.70), alternated in one process (benchmarks/README.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def mixed_precision_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., M, K) @ w (..., K, N) in w's number format, accumulated and returned in float32 (or in x's
    type, if wider). Leading axes, if any, are batch axes of the same sizes on both.

    In float32 this is plain x @ w. With mixed precision w arrives as bfloat16: x is rounded to bfloat16
    too and the product accumulates in float32. Asking for the float32 result matters: XLA's CPU backend
    turns a bfloat16 x bfloat16 -> bfloat16 product back into float32 work, while bfloat16 x bfloat16 ->
    float32 runs as a real bfloat16 product. Its gradients are bfloat16 products too (`_low_precision_matmul`).
    """
    out = jnp.promote_types(x.dtype, jnp.float32)
    if jnp.finfo(w.dtype).bits >= 32:
        return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=out)
    return _low_precision_matmul(x, w, x.dtype)


def row_major(y: jax.Array) -> jax.Array:
    """y written out row-major, as an array of its own. Same numbers; a speed trick for bfloat16 products.

    A transpose (`y.T`) reaches XLA as a permuted layout, and a
    bfloat16 product that reads it falls back to float32 (the module docstring); an optimization barrier
    keeps that layout. Flattening the array and reshaping it back, with the barrier between so that the
    two reshapes cannot cancel, forces a real row-major copy: for a (384, 1536) weight 0.1 ms, against
    the 6 ms its product saves.
    """
    return jax.lax.optimization_barrier(y.reshape(-1)).reshape(y.shape)


def transposed(y: jax.Array) -> jax.Array:
    """y with its last two axes swapped, written out row-major (`row_major`)."""
    return row_major(jnp.swapaxes(y, -1, -2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x: jax.Array, w: jax.Array, x_dtype) -> jax.Array:
    """x (..., M, K) @ w (..., K, N; bfloat16) -> (..., M, N) in float32, differentiated by hand:

        dx = dy wᵀ    dw = xᵀ dy    both with bfloat16 operands, row-major, accumulated in float32

    dy is rounded to bfloat16 once and used for both. dw is returned in w's format (then the cast in
    train.mixed_precision turns it back into float32: one rounding, as PyTorch's autocast has); dx in
    x's (float32 for a block's input: the residual stream's gradient is never rounded).
    """
    return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.promote_types(x_dtype, jnp.float32))


def _low_precision_matmul_fwd(x, w, x_dtype):
    x_low = x.astype(w.dtype)
    y = jnp.matmul(x_low, w, preferred_element_type=jnp.promote_types(x_dtype, jnp.float32))
    return y, (transposed(x_low), w)  # xᵀ kept for dw, at half float32's bytes


def _low_precision_matmul_bwd(x_dtype, residuals, dy):
    x_t, w = residuals
    dy = row_major(dy.astype(w.dtype))  # a no-op where dy already is row-major, as a block product's is
    dx = jnp.matmul(dy, transposed(w), preferred_element_type=jnp.float32)  # (..., M, K)
    dw = jnp.matmul(x_t, dy, preferred_element_type=jnp.float32)            # (..., K, N)
    return dx.astype(x_dtype), dw.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)
