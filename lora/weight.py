"""A weight matrix with a low-rank adapter: the LoRA maths, in one small class.

    W' = W + s · A B          A (d_in, R), B (R, d_out), s = alpha / R   (Hu et al. 2021, eq. 3)
                                                       s = alpha / sqrt(R)  with rsLoRA (Kalajdzievski 2023)
    x @ W' = x @ W + s · (x @ A) @ B

The model spells every linear layer `x @ p["w"] + p["b"]`. When `p["w"]` is a `LoraWeight`, JAX's
array sees an operand it does not recognise and hands `@` over to `LoraWeight.__rmatmul__`. So the
model never mentions LoRA, and the gradient of the frozen W is never asked for.

In training, `__rmatmul__` runs `adapted_matmul`: the forward pass multiplies by the merged
W + s·A B (one GEMM, as fast as the base model's) and the backward pass is written out by hand:

    dx = dy (W + s·A B)ᵀ        dA = s · xᵀ (dy Bᵀ)        dB = s · (x A)ᵀ dy        no dW

which is exactly what autodiff of x @ W + s·(x @ A) @ B gives, in fewer passes over the activations.

DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5) splits the adapted weight into a magnitude and a
direction, with a trainable magnitude m per output unit (a column of our (d_in, d_out) W):

    W' = m · (W + s·A B) / ||W + s·A B||_c      ||·||_c: the norm of each column

The tied token embedding (V, D) is used twice: looked up as rows (`tok[ids]`) and as the output
projection (`x @ tok.T`). A `LoraWeight` supports both, so an adapter on `embed` changes the input
vectors *and* the output projection, exactly as merging W + s·A B into the one shared matrix would.
That is our choice (PEFT's embedding adapter leaves a tied output head unadapted until merged); it
keeps merged and unmerged models identical.

With `fuse_qkv` (lora/config.py) a block's q, k and v adapters share one A, which is LoRA on the
stacked [W_q W_k W_v]. The first adapted one of them owns the A; the others say whose it is
(`a_from="q"`): it is trained once, and `lora.stack.fill_shared_a` fills it in.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from minilm.precision import mixed_precision_matmul, transposed as row_major_transposed


def column_norm(w: jax.Array) -> jax.Array:
    """(d_in, d_out) -> (d_out,): the length of each output unit's weight vector."""
    return jnp.sqrt(jnp.sum(w * w, axis=0))


@dataclass(frozen=True)
class LoraWeight:
    """W (frozen) plus s·A B (trained), behaving like the (d_in, d_out) matrix W' under `@`, `[ids]`, `.T`."""

    base: jax.Array                     # (d_in, d_out) the frozen W; with PiSSA, its residual; or another LoraWeight
    lora_a: jax.Array | None            # (d_in, R); None while a shared A is not yet filled in (a_from)
    lora_b: jax.Array                   # (R, d_out)
    magnitude: jax.Array | None = None  # (d_out,) DoRA's m; None for plain LoRA
    dropout_key: jax.Array | None = None  # set only inside the training loss, for adapter dropout
    scale: float = 1.0                  # s: alpha / R, or alpha / sqrt(R)
    dropout: float = 0.0                # probability of zeroing an adapter input
    name: str = "default"               # which adapter this is, when several are stacked
    a_from: str | None = None           # with fuse_qkv: the matrix of this layer ("q") whose A this one uses

    @property
    def shape(self):
        return self.base.shape

    @property
    def ndim(self):
        return 2

    @property
    def dtype(self):
        return self.lora_b.dtype

    @property
    def rank(self) -> int:
        return self.lora_b.shape[0]

    def delta(self) -> jax.Array:
        """s · A B: (d_in, d_out), the change LoRA makes to W (before DoRA's rescaling)."""
        return self.scale * (self.lora_a @ self.lora_b)

    def merged(self) -> jax.Array:
        """W' as one plain (d_in, d_out) matrix."""
        base = self.base.merged() if isinstance(self.base, LoraWeight) else self.base
        adapted = base + self.delta()
        if self.magnitude is not None:
            adapted = adapted * (self.magnitude / column_norm(adapted))
        return adapted

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        """x (N, d_in) @ W' -> (N, d_out), as x @ W + s · (x @ A) @ B."""
        dropout = self.dropout_key is not None and self.dropout > 0
        if not dropout and self.magnitude is None and not isinstance(self.base, LoraWeight):
            return adapted_matmul(x, self.base, self.lora_a, self.lora_b, self.scale)
        x_adapter = x
        if dropout:
            keep = jax.random.bernoulli(self.dropout_key, 1 - self.dropout, x.shape)
            x_adapter = jnp.where(keep, x / (1 - self.dropout), 0)
        out = x @ self.base + self.scale * ((x_adapter @ self.lora_a) @ self.lora_b)  # (N, R) on the way
        if self.magnitude is not None:
            # The column norms need W + s·A B itself: DoRA cannot avoid forming it (Liu et al. §4.3).
            out = out * (self.magnitude / column_norm(self.base + self.delta()))
        return out

    def __getitem__(self, ids) -> jax.Array:
        """Rows of W' (an embedding lookup): W[ids] + s · A[ids] B."""
        return self.base[ids] + self.scale * (self.lora_a[ids] @ self.lora_b)

    @property
    def T(self) -> LoraWeight:
        """W'ᵀ = Wᵀ + s · Bᵀ Aᵀ: the same adapter, read the other way (the tied output projection)."""
        if self.magnitude is not None:
            raise ValueError("a DoRA weight has no transpose view")
        return dataclasses.replace(self, base=self.base.T, lora_a=self.lora_b.T, lora_b=self.lora_a.T)


# ---------------------------------------------------------------- the speed trick, in one place


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Needed:
    """Which input gradients the backward pass must produce (static: decided when tracing)."""

    dx: bool
    dw: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def adapted_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """x @ (W + s·A B), differentiated by the hand-written rule below instead of by autodiff.

    Why: autodiff of x @ W + s·(x @ A) @ B runs three products forward (x W, x A, (x A) B) and adds
    two (N, d_out) results; backward it adds dy Wᵀ and (dy Bᵀ) Aᵀ, two more passes over (N, d_in).
    On a CPU those passes over the activations, not the thin products' FLOPs, made LoRA's step about
    as slow as full fine-tuning's. Merging first costs one (d_in, R) @ (R, d_out) product per step,
    after which the layer is a single GEMM forward and backward, like the frozen model's.
    Numerically the same to float32 rounding (tests/test_lora.py checks the values and gradients
    against the plain formula and against finite differences).
    """
    return mixed_precision_matmul(x, w + scale * (a @ b))


def _adapted_matmul_fwd(x, w, a, b, scale):
    needed = _Needed(dx=x.perturbed, dw=w.perturbed)  # custom_vjp's symbolic zeros say what is trained
    x, w, a, b = x.value, w.value, a.value, b.value
    merged = w + scale * (a @ b)  # (d_in, d_out)
    return mixed_precision_matmul(x, merged), (x, merged, a, b, needed)


def _adapted_matmul_bwd(scale, residuals, dy):
    x, merged, a, b, needed = residuals
    dy_b = dy @ b.T                                     # (N, R)
    da = scale * _transposed(_transposed(dy_b) @ x)    # (d_in, R) = s · xᵀ (dy Bᵀ), as ((dy Bᵀ)ᵀ x)ᵀ
    db = scale * (_transposed(x @ a) @ dy)              # (R, d_out) = s · (x A)ᵀ dy
    dx = None
    if needed.dx:  # (N, d_in), only if something below trains; a bfloat16 product needs Wᵀ row-major
        dx = mixed_precision_matmul(dy, merged.T if merged.dtype == jnp.float32 else row_major_transposed(merged))
    dw = x.T @ dy if needed.dw else None                # only if W itself trains (never in LoRA)
    return dx, dw, da.astype(a.dtype), db.astype(b.dtype)  # in the adapters' own format (mixed precision: bfloat16)


def _transposed(y: jax.Array) -> jax.Array:
    """yᵀ, written out as an array of its own. A speed trick for dA and dB above; same numbers.

    Both contract the long axis N of x or dy with a thin (N, R) factor. Spelled xᵀ (dy Bᵀ), the
    product's left operand is a transposed view, and XLA's CPU backend gives such a product to Eigen,
    which runs these shapes at 10-50 GFLOP/s; YNNPACK, its fast kernel, takes only products whose
    operands are row-major with the contraction on the left operand's last axis. Writing the thin
    factor out transposed (R x N: 64 KiB) makes each product plain. The optimization barriers keep
    XLA from folding the transpose back into the product. Measured on 2 CPU cores, N 2048, R 8: the
    MLP projection's dA 5.0 -> 0.37 ms; the `small` LoRA r8 all-linear step ~5% faster.
    """
    barrier = jax.lax.optimization_barrier
    return barrier(barrier(y).T)


adapted_matmul.defvjp(_adapted_matmul_fwd, _adapted_matmul_bwd, symbolic_zeros=True)


jax.tree_util.register_dataclass(
    LoraWeight, data_fields=["base", "lora_a", "lora_b", "magnitude", "dropout_key"],
    meta_fields=["scale", "dropout", "name", "a_from"])
