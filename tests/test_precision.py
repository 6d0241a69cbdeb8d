"""Mixed precision (minilm/precision.py): the products and their gradients against a float64 NumPy
reference of the same rounding, which products the compiled step really runs in bfloat16, and a short
training whose losses track float32's within a bound set by bfloat16's precision."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lora
from minilm import bench, train
from minilm.config import ModelConfig, TrainConfig, preset
from minilm.model import init
from minilm.attention import causal_self_attention
from minilm.precision import mixed_precision_attention, mixed_precision_matmul, transposed
from minilm.tree import partition

# bfloat16 keeps 8 significant bits (7 stored + the implicit one): rounding to nearest is off by at
# most half a unit in the last place, a relative 2^-8 ("unit roundoff" u, Higham 2002 §2.1).
U = 2.0 ** -8


def bf16(a) -> np.ndarray:
    """a rounded to bfloat16 (round to nearest even, ml_dtypes: the same type JAX uses), as float64."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["matrix", "batched"])
def test_products_and_gradients_are_bfloat16_operands_with_float32_accumulation(batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*batch, 24, 40)).astype(np.float32)                   # (..., M, K) float32
    w = rng.normal(size=(*batch, 40, 56)).astype(np.float32)                   # (..., K, N) float32 master
    dy = rng.normal(size=(*batch, 24, 56)).astype(np.float32)                  # (..., M, N)
    mT = lambda a: np.swapaxes(a, -1, -2)

    def f(x, w):  # as in a step: the master weight cast to bfloat16 (train.mixed_precision), then the product
        return mixed_precision_matmul(x, w.astype(jnp.bfloat16))

    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    # The reference: operands rounded to bfloat16, products exact in float64. float32 accumulation of
    # K <= 40 terms is within ~K·2^-24 of it, far inside 1e-5; a product left in float32 would be off by ~U.
    np.testing.assert_allclose(y, bf16(x) @ bf16(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, bf16(dy) @ mT(bf16(w)), rtol=1e-5, atol=1e-5)
    # dw is returned in the weight's own format, bfloat16: the float64 product rounded once more
    want = mT(bf16(x)) @ bf16(dy)
    np.testing.assert_allclose(dw, bf16(want), rtol=U, atol=1e-6)
    # control: the plain float32 gradient is measurably different (dy really was rounded)
    assert np.max(np.abs(np.asarray(dx) - dy @ mT(w))) > 1e-3


def test_a_bias_is_added_in_float32_and_its_gradient_summed_from_the_rounded_dy():
    """With a bias (a linear layer), the product is as above plus b in float32, and b's gradient is the
    sum over rows of dy rounded to bfloat16 (the same rounded dy the products use), accumulated in
    float32: within 1e-5 of the float64 reference; the control, float32 dy's sum, is off by more."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(24, 40)).astype(np.float32), rng.normal(size=(40, 56)).astype(np.float32)
    b, dy = rng.normal(size=56).astype(np.float32), rng.normal(size=(24, 56)).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w, b: mixed_precision_matmul(x, w.astype(jnp.bfloat16), b), x, w, b)
    dx, dw, db = vjp(jnp.asarray(dy))
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == jnp.float32
    np.testing.assert_allclose(y, bf16(x) @ bf16(w) + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, bf16(dy) @ bf16(w).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, bf16(dy).sum(0), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(db) - dy.astype(np.float64).sum(0))) > 1e-3


def test_transposed_is_the_transpose():
    y = jnp.arange(2 * 3 * 5, dtype=jnp.bfloat16).reshape(2, 3, 5)
    np.testing.assert_array_equal(jax.jit(transposed)(y), np.swapaxes(np.asarray(y), -1, -2))


def test_float32_products_are_plain_matmul_bit_for_bit():
    x, w = jax.random.normal(jax.random.key(0), (24, 40)), jax.random.normal(jax.random.key(1), (40, 56))
    np.testing.assert_array_equal(jax.jit(mixed_precision_matmul)(x, w), jax.jit(jnp.matmul)(x, w))


def test_attention_is_bfloat16_products_of_float32_softmax_forward_and_backward():
    """mixed_precision_attention and its hand-written backward against a float64 NumPy reference of
    the same roundings: q / sqrt(K), k, v and dout rounded to bfloat16, exact products, the softmax in
    float64 and its probabilities rounded to bfloat16 once (used by p v and the backward pass), ds
    rounded once. Tolerance U/16 of the largest value: float32 accumulation and softmax are ~1e-6 off,
    and where they land on the other side of a bfloat16 rounding boundary (rare: ~1e-4 of the
    elements) one term moves by one unit of a small probability. The control: float32 attention, which
    rounds nothing, is off by more than U/4 -- the test sees which one ran. T = 150 makes three query
    blocks of 64, the last one partial."""
    rng = np.random.default_rng(0)
    B, T, H, K = 2, 150, 3, 16
    q, k, v, dout = (rng.normal(size=(B, T, H, K)).astype(np.float32) for _ in range(4))
    (out, probs), vjp = jax.vjp(lambda *a: mixed_precision_attention(*a, jnp.bfloat16, 64), q, k, v)
    grads = vjp((jnp.asarray(dout), jnp.zeros_like(probs)))
    (out32, _), vjp32 = jax.vjp(causal_self_attention, q, k, v)
    grads32 = vjp32((jnp.asarray(dout), jnp.zeros((B, H, T, T), np.float32)))

    heads = lambda a: np.swapaxes(a, 1, 2)  # (B, T, H, K) <-> (B, H, T, K)
    mT = lambda a: np.swapaxes(a, -1, -2)
    qs, kl, vl, dl = bf16(heads(q) / np.sqrt(K)), bf16(heads(k)), bf16(heads(v)), bf16(heads(dout))
    scores = np.where(np.tril(np.ones((T, T), bool)), qs @ mT(kl), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = bf16(p / p.sum(-1, keepdims=True))
    dp = dl @ mT(vl)
    ds = bf16(p * (dp - (p * dp).sum(-1, keepdims=True)))
    want = {"out": p @ vl, "dq": ds @ kl / np.sqrt(K), "dk": mT(ds) @ qs, "dv": mT(p) @ dl}
    for name, got, plain in zip(want, (out, *grads), (out32, *grads32)):
        scale = np.abs(want[name]).max()
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, heads(want[name]), rtol=0, atol=U / 16 * scale, err_msg=name)
        assert np.abs(np.asarray(plain) - heads(want[name])).max() > U / 4 * scale, name
    np.testing.assert_allclose(probs, p, rtol=0, atol=U / 16)


# ---------------------------------------------------------------- what the compiled step runs


def dots(hlo: str) -> list[tuple[str, str]]:
    """Each dot of the optimized HLO text: its two operands' types, e.g. ("bf16[64,32]", "bf16[32,32]")
    (XLA's instruction names are unique within a module)."""
    types = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])", hlo, re.M))
    return [(types[a], types[b]) for a, b in re.findall(r"= \w+\[[\d,]*\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\)", hlo)]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bfloat16_step_runs_every_block_product_in_bfloat16(mode):
    """After XLA's own passes, which turn a bfloat16 product they cannot run in YNNPACK back into float32
    work: every product with a block matrix, forward and backward, has bfloat16 operands, and so has
    every product of attention (4-D: batch and heads). The float32 products left are the tied
    unembedding's (the embedding stays float32; V = 13 is in its shapes) and LoRA's thin adapter
    products (rank 3 is in theirs). XLA may merge products that share an operand, so the test reads
    shapes, not counts."""
    cfg = ModelConfig(vocab_size=13, context=16, width=32, layers=2, heads=2)
    tcfg = TrainConfig(batch_size=4, dtype="bfloat16")
    if mode == "full":
        case = bench.train_step_case(cfg, tcfg)
    else:
        case = lora.train_step_case(cfg, tcfg, lora.LoraConfig(rank=3, targets=("all-linear",)))
    found = dots(case.step.lower(*case.state).compile().as_text())
    low = [d for d in found if d[0].startswith("bf16[") and d[1].startswith("bf16[")]
    high = [d for d in found if d not in low]
    assert all(d[0].startswith("f32[") and d[1].startswith("f32[") for d in high), high  # never mixed
    assert all(re.search(r"[\[,](13|3)[\],]", d[0] + d[1]) for d in high), high
    assert len([d for d in low if d[0].count(",") == 3]) >= 6, low  # attention: 2 kinds forward, 4 backward
    # forward x W, dx = dy Wᵀ and (full) dW = xᵀ dy of the (B·T = 64, 32) x (32, 32) products, in bfloat16
    want = {("bf16[64,32]", "bf16[32,32]")} | ({("bf16[32,64]", "bf16[64,32]")} if mode == "full" else set())
    assert want <= set(low), low
    if mode == "lora":
        return
    # float32: no bfloat16 product at all
    case32 = bench.train_step_case(cfg, dataclasses.replace(tcfg, dtype="float32"))
    assert not [d for d in dots(case32.step.lower(*case32.state).compile().as_text()) if "bf16" in d[0] + d[1]]


# ---------------------------------------------------------------- training numerics


def noisy_bigram_windows(vocab: int, shape: tuple[int, int, int], seed: int = 0) -> jnp.ndarray:
    """(A, B, T + 1) tokens: each next token is perm[token] half the time, else uniform: learnable, yet
    the loss stays O(1) nats over a short run (2.8 -> 1.5 in the test below), so a relative bound on
    it means something."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(vocab)
    out = np.empty(shape, np.int32)
    out[..., 0] = rng.integers(0, vocab, shape[:-1])
    for t in range(1, shape[-1]):
        follow = rng.random(shape[:-1]) < 0.5
        out[..., t] = np.where(follow, perm[out[..., t - 1]], rng.integers(0, vocab, shape[:-1]))
    return jnp.asarray(out)


def test_bfloat16_training_tracks_float32_within_four_units_of_bfloat16_rounding():
    """The `tiny` preset's model and batch, 40 steps from the same start on the same data, float32 and
    mixed precision. Tolerance, fixed from bfloat16's precision before running: each product rounds
    both operands to relative U = 2^-8, so at equal weights the logits, and a loss of O(1) nats, move by
    about 2U (one U per rounded operand); the weights themselves then drift apart through rounded
    gradients, by at most about as much again over a short run. So every step's loss must agree to 4U
    relative (1.6%). A control shows the products really were bfloat16: the losses differ by far more
    than float32 rounding."""
    model_cfg, base = preset("tiny")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=16)
    windows = noisy_bigram_windows(16, (1, base.batch_size, model_cfg.context + 1))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        tcfg = dataclasses.replace(base, steps=40, warmup=0.0, dtype=dtype)
        trainable, frozen = partition(init(model_cfg, key=jax.random.key(0)), lambda name: True)
        opt_state = train.optimizer(tcfg).init(trainable)
        step = train.make_step(model_cfg, tcfg)
        losses[dtype] = []
        for _ in range(tcfg.steps):
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, windows, jax.random.key(1))
            losses[dtype].append(float(metrics["loss"]))
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((trainable, opt_state))
                   if jnp.issubdtype(leaf.dtype, jnp.floating))  # master weights and Adam's moments
    f32, low = np.array(losses["float32"]), np.array(losses["bfloat16"])
    assert f32[-1] < f32[0] - 0.3  # it learned: the comparison is over a real trajectory, not a flat line
    np.testing.assert_allclose(low, f32, rtol=4 * U)
    assert np.max(np.abs(low - f32)) > 1e-4
