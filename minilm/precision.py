"""Products in a narrower number format, forward and backward: the arithmetic of mixed precision.

    train.mixed_precision      casts the block matrices to bfloat16, once per step (the one cast of weights)
    mixed_precision_matmul     x @ w in w's format, float32 accumulation and result; gradients likewise
    mixed_precision_attention  causal attention with its products likewise; its backward pass by hand

With float32 weights everything here is plain float32 `x @ w`, bit for bit what it always was. With
bfloat16 weights every product with a block matrix (q, k, v, o, the MLP's two) takes bfloat16 operands
and accumulates in float32, forward and backward (Micikevicius et al. 2018; bfloat16 has float32's
exponent range, so no loss scaling), and so do attention's products (`mixed_precision_attention`,
the scores q kᵀ and the weighted values p v, and their gradients), while LayerNorm, softmax, GELU,
the residual stream and the loss stay float32. The tied unembedding (V = 65 columns) is too thin to
matter and stays float32.

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

from minilm.attention import QUERY_BLOCK, causal_mask, causal_self_attention


def mixed_precision_matmul(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x (..., M, K) @ w (..., K, N) in w's number format, accumulated and returned in float32 (or in x's
    type, if wider), plus the float32 bias b (N,) if given. Leading axes, if any, are batch axes of the
    same sizes on both (with a bias: none).

    In float32 this is plain x @ w. With mixed precision w arrives as bfloat16: x is rounded to bfloat16
    too and the product accumulates in float32. Asking for the float32 result matters: XLA's CPU backend
    turns a bfloat16 x bfloat16 -> bfloat16 product back into float32 work, while bfloat16 x bfloat16 ->
    float32 runs as a real bfloat16 product. Its gradients are bfloat16 products too (`_low_precision_matmul`).
    """
    out = jnp.promote_types(x.dtype, jnp.float32)
    if jnp.finfo(w.dtype).bits >= 32:
        y = jnp.matmul(x.astype(w.dtype), w, preferred_element_type=out)
        return y if b is None else y + b
    return _low_precision_matmul(x, w, x.dtype) if b is None else _low_precision_linear(x, w, b, x.dtype)


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
    return _rounded_dy_products(x_dtype, residuals, _rounded(dy, residuals[1].dtype))


def _rounded(dy, dtype):
    """dy in the weight's format, row-major: a no-op copy where dy already is, as a block product's is."""
    return row_major(dy.astype(dtype))


def _rounded_dy_products(x_dtype, residuals, dy):
    """(dx, dw) from dy already rounded (`_rounded`)."""
    x_t, w = residuals
    dx = jnp.matmul(dy, transposed(w), preferred_element_type=jnp.float32)  # (..., M, K)
    dw = jnp.matmul(x_t, dy, preferred_element_type=jnp.float32)            # (..., K, N)
    return dx.astype(x_dtype), dw.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_precision_linear(x: jax.Array, w: jax.Array, b: jax.Array, x_dtype) -> jax.Array:
    """x (M, K) @ w (K, N; bfloat16) + b (N,) -> (M, N) float32: `_low_precision_matmul` and the bias.

    The bias's gradient is summed from the rounded dy, as the weight's is (and as PyTorch's autocast
    does). A speed trick: summed from float32 dy, the bias's gradient made XLA write dy out twice, in
    float32 for the sum and in bfloat16 for the products; now only the bfloat16 copy exists, and the
    float32 dy (attention's dq, dk, dv; GELU's gradient) is never written out. Measured on 2 cores,
    alternated in one process: the `small` bfloat16 step 0.97 of the time.
    """
    return _low_precision_matmul(x, w, x_dtype) + b


def _low_precision_linear_fwd(x, w, b, x_dtype):
    y, residuals = _low_precision_matmul_fwd(x, w, x_dtype)
    return y + b, residuals


def _low_precision_linear_bwd(x_dtype, residuals, dy):
    dy = _rounded(dy, residuals[1].dtype)  # rounded once, for the products and the bias
    return (*_rounded_dy_products(x_dtype, residuals, dy), dy.sum(0, dtype=jnp.float32))


_low_precision_linear.defvjp(_low_precision_linear_fwd, _low_precision_linear_bwd)


# ---------------------------------------------------------------- attention, the same way

def mixed_precision_attention(q: jax.Array, k: jax.Array, v: jax.Array, dtype, queries_per_block: int = QUERY_BLOCK):
    """attention.causal_self_attention with its four kinds of products in `dtype` (bfloat16), float32
    accumulation: q, k, v (B, T, H, K) float32 -> out (B, T, H, K) float32, probs (B, H, T, T). With a
    float32 `dtype`, causal_self_attention itself, as `mixed_precision_matmul` is then plain x @ w.

    The same blocks of queries, each seeing only the keys up to its block's end, and the same softmax
    in float32; the probabilities are rounded to `dtype` once, for `probs v` and the backward pass.
    The backward pass is written by hand (`_attention_bwd`) so that every product reads row-major
    `dtype` operands, the big ones (p, ds) as they are. Attention's products are small and batched
    ((B·H) of (64 x 64) @ (64 x S)): here they ran at ~150 GFLOP/s in bfloat16 against ~90 in float32.
    Measured on 2 cores, alternated in one process against float32 attention: the `small` bfloat16
    step 0.91 of the time, LoRA 0.92. (Routed through `mixed_precision_matmul` as autodiff gives it,
    the products had transposed operands and the step was 5-10% slower, not faster.)
    """
    if jnp.finfo(dtype).bits >= 32:
        return causal_self_attention(q, k, v, queries_per_block)
    out, probs = _attention(q, k, v, dtype, queries_per_block)
    T = q.shape[1]
    probs = jnp.concatenate([jnp.pad(p.astype(jnp.float32), ((0, 0), (0, 0), (0, 0), (0, T - p.shape[-1])))
                             for p in probs], axis=2)
    return out, probs


def _query_blocks(T: int, n: int) -> list[tuple[int, int]]:
    return [(start, min(start + n, T)) for start in range(0, T, n)]


def _heads_first(y: jax.Array, dtype, transpose_last: bool = False) -> jax.Array:
    """(B, T, H, K) -> (B, H, T, K), or (B, H, K, T) with transpose_last; in `dtype`, row-major."""
    return row_major(y.astype(dtype).transpose((0, 2, 3, 1) if transpose_last else (0, 2, 1, 3)))


def _product(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, dtype, queries_per_block):
    return _attention_fwd(q, k, v, dtype, queries_per_block)[0]


def _attention_fwd(q, k, v, dtype, queries_per_block):
    T, K = q.shape[1], q.shape[3]
    qh = _heads_first(q * (1 / K ** 0.5), dtype)   # (B, H, T, K), scaled before rounding (exactly, for K = 64)
    k_t = _heads_first(k, dtype, transpose_last=True)  # (B, H, K, T)
    vh = _heads_first(v, dtype)                     # (B, H, T, K)
    outs, probs = [], []
    for start, stop in _query_blocks(T, queries_per_block):
        scores = _product(qh[:, :, start:stop], k_t[..., :stop])  # (B, H, n, stop)
        mask = causal_mask(jnp.arange(start, stop), jnp.arange(stop))
        p = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(dtype)
        outs.append(_product(p, vh[:, :, :stop]))  # (B, H, n, K)
        probs.append(p)
    out = jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)  # (B, T, H, K)
    return (out, probs), (qh, k_t, vh, probs)


def _attention_bwd(dtype, queries_per_block, residuals, cotangents):
    """With s = q kᵀ / sqrt(K), p = softmax(s), out = p v, per query block:

        dp = dout vᵀ    ds = p (dp - Σ_s p dp)    dq = ds k / sqrt(K)
        dkᵀ += (q / sqrt(K))ᵀ ds                  dvᵀ += doutᵀ p

    dk and dv are computed transposed, so that the big operands (p, ds) are read as they are and only
    (K, T)-sized ones are written out transposed. The probabilities' own cotangent is ignored: training
    never reads them (the trace is for analysis, outside any gradient)."""
    qh, k_t, vh, probs = residuals
    dout = cotangents[0]
    T, K = dout.shape[1], dout.shape[3]
    d_out = _heads_first(dout, dtype)                        # (B, H, T, K)
    d_out_t = _heads_first(dout, dtype, transpose_last=True)  # (B, H, K, T)
    v_t, kh, q_t = transposed(vh), transposed(k_t), transposed(qh)
    dqs, dk_t, dv_t = [], [], []
    for (start, stop), p in zip(_query_blocks(T, queries_per_block), probs):
        dp = _product(d_out[:, :, start:stop], v_t[..., :stop])  # (B, H, n, stop)
        p32 = p.astype(jnp.float32)
        ds = (p32 * (dp - (p32 * dp).sum(-1, keepdims=True))).astype(dtype)
        dqs.append(_product(ds, kh[:, :, :stop]))  # (B, H, n, K)
        pad = ((0, 0), (0, 0), (0, 0), (0, T - stop))
        dk_t.append(jnp.pad(_product(q_t[..., start:stop], ds), pad))  # (B, H, K, T)
        dv_t.append(jnp.pad(_product(d_out_t[..., start:stop], p), pad))
    dq = jnp.concatenate(dqs, axis=2).transpose(0, 2, 1, 3) * (1 / K ** 0.5)  # (B, T, H, K)
    dk, dv = (sum(parts).transpose(0, 3, 1, 2) for parts in (dk_t, dv_t))    # (B, H, K, T) -> (B, T, H, K)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)
