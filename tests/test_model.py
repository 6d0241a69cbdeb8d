"""Oracle tests for minilm.attention and minilm.model.

The model is checked against a GPT-2 decoder written here from scratch in NumPy float64 (loops over
batch and head for the attention, so no einsum string is shared with the library), against
`jax.nn.dot_product_attention`, against finite differences, and against invariants that must hold
exactly (causality, cached == uncached, unwritten cache slots are invisible).

Sizes are small and pairwise distinct, so a swapped axis cannot pass:
    B 3, T 7, H 4, K 5, D 20, F 80, V 11, L 2, context 13; elsewhere T 6 against S 9 keys, a prefill of
    P 6, cached chunks of 2 and 5, and query blocks of T 1, 13, 16, 20.
The parameters are not init's (whose 0.02-scale weights make every layer nearly the identity and every
attention row nearly uniform) but random values of order one, with non-zero biases and LayerNorm
shifts, so every term of the forward pass visibly moves the output.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import scrambled
from jax.test_util import check_grads

from minilm.attention import attend, attention_probs, causal_mask, causal_self_attention
from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import empty_cache, forward, forward_cached, init, param_shapes
from minilm.train import cross_entropy, loss_fn
from minilm.tree import named_leaves, partition

B, T, H, K, V, L, CONTEXT = 3, 7, 4, 5, 11, 2, 13
D = H * K  # 20
F = 4 * D  # 80
CFG = ModelConfig(vocab_size=V, context=CONTEXT, width=D, heads=H, layers=L, mlp_ratio=4)

FORWARD = jax.jit(forward, static_argnames=("cfg", "trace"))
FORWARD_CACHED = jax.jit(forward_cached, static_argnames=("cfg",))  # `start` stays traced, as in generate


@pytest.fixture(scope="module")
def params():
    return scrambled(init(CFG, key=jax.random.key(0)), seed=1)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(2).integers(0, V, (B, T)), jnp.int32)


# ---------------------------------------------------------------- the NumPy reference (float64)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))  # exp(-inf) = 0: masked entries vanish
    return e / e.sum(axis=axis, keepdims=True)


def np_causal_attention(q, k, v, query_positions=None, key_positions=None):
    """q (B, T, H, K), k and v (B, S, H, K) -> out (B, T, H, K), probs (B, H, T, S); loops, no einsum."""
    nb, nt, nh, nk = q.shape
    ns = k.shape[1]
    tq = np.arange(nt) if query_positions is None else np.asarray(query_positions)
    sk = np.arange(ns) if key_positions is None else np.asarray(key_positions)
    allowed = sk[None, :] <= tq[:, None]  # (T, S)
    probs = np.zeros((nb, nh, nt, ns))
    out = np.zeros((nb, nt, nh, nk))
    for b in range(nb):
        for h in range(nh):
            scores = q[b, :, h, :] @ k[b, :, h, :].T / math.sqrt(nk)  # (T, S)
            scores = np.where(allowed, scores, -np.inf)
            probs[b, h] = np_softmax(scores)
            out[b, :, h, :] = probs[b, h] @ v[b, :, h, :]
    return out, probs


def np_layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):  # GPT-2's tanh approximation (Hendrycks & Gimpel 2016)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_gpt2(params, tokens):
    """GPT-2 decoder in float64: logits (B, T, V) and the intermediates, from the params dict alone."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    nb, nt = tokens.shape
    tok, pos = p["embed"]["tok"], p["embed"]["pos"]
    x = tok[tokens] + pos[:nt][None]  # (B, T, D)
    ref = {"resid_pre": [], "resid_mid": [], "resid_post": [], "attn_probs": [], "mlp_hidden": []}
    for blk in p["blocks"]:
        ref["resid_pre"].append(x)
        h = np_layer_norm(x, blk["ln1"])
        a = blk["attn"]
        q, k, v = (h @ a[n]["w"] + a[n]["b"] for n in ("q", "k", "v"))  # (B, T, D) each
        split = lambda y: y.reshape(nb, nt, H, K)  # head j owns columns j*K:(j+1)*K
        out, probs = np_causal_attention(split(q), split(k), split(v))
        x = x + out.reshape(nb, nt, D) @ a["o"]["w"] + a["o"]["b"]
        ref["resid_mid"].append(x)
        ref["attn_probs"].append(probs)
        m = blk["mlp"]
        hidden = np_gelu(np_layer_norm(x, blk["ln2"]) @ m["fc"]["w"] + m["fc"]["b"])
        x = x + hidden @ m["proj"]["w"] + m["proj"]["b"]
        ref["resid_post"].append(x)
        ref["mlp_hidden"].append(hidden)
    ref = {name: np.stack(values) for name, values in ref.items()}
    ref["final"] = np_layer_norm(x, p["ln_f"])
    return ref["final"] @ tok.T, ref


@pytest.fixture(scope="module")
def reference(params, tokens):
    return np_gpt2(params, tokens)


@pytest.fixture(scope="module")
def traced(params, tokens):
    return FORWARD(params, tokens, cfg=CFG, trace=True)


# ---------------------------------------------------------------- attention


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(3)
    return tuple(jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(3))


def test_attention_equals_numpy_reference(qkv):
    q, k, v = qkv
    positions = jnp.arange(T)
    probs = attention_probs(q, k, causal_mask(positions, positions))
    out = attend(probs, v)
    assert probs.shape == (B, H, T, T) and out.shape == (B, T, H, K)
    want_out, want_probs = np_causal_attention(*(np.asarray(x, np.float64) for x in qkv))
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)


def test_attention_equals_jax_dot_product_attention(qkv):
    q, k, v = qkv
    positions = jnp.arange(T)
    out = attend(attention_probs(q, k, causal_mask(positions, positions)), v)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, H, K)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_attention_probs_rows_sum_to_one_and_masked_are_exactly_zero(qkv):
    q, k, _ = qkv
    positions = jnp.arange(T)
    probs = np.asarray(attention_probs(q, k, causal_mask(positions, positions)))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    future = np.triu(np.ones((T, T), bool), k=1)  # s > t
    assert np.all(probs[..., future] == 0.0)
    assert np.all(probs[..., ~future] > 0.0)


@functools.partial(jax.jit, static_argnames="block")
def blocked_with_vjp(q, k, v, cotangent, block):
    """causal_self_attention's out, probs and the vjp of out, compiled once per (T, block): run op by op,
    a 20-block attention dispatches (and compiles) hundreds of small operations."""
    (out, probs), vjp = jax.vjp(lambda *a: causal_self_attention(*a, block), q, k, v)
    return out, probs, vjp((cotangent, jnp.zeros_like(probs)))  # the gradient of <out, cotangent> alone


@jax.jit
def plain_vjp(q, k, v, cotangent):
    positions = jnp.arange(q.shape[1])
    plain = lambda q, k, v: attend(attention_probs(q, k, causal_mask(positions, positions)), v)  # noqa: E731
    return jax.vjp(plain, q, k, v)[1](cotangent)


@pytest.mark.parametrize("T_, block", [(1, 64), (7, 64), (13, 4), (13, 5), (16, 4), (20, 1)])
def test_blocked_causal_attention_equals_the_plain_one_and_numpy(T_, block):
    # causal_self_attention skips the masked half in query blocks; it must be the same attention:
    # outputs and probabilities as NumPy's (float64), masked weights exactly 0, and the same gradients
    # as the plain path. Block sizes that divide T, that do not, of 1, and larger than T.
    rng = np.random.default_rng(T_ * 100 + block)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T_, H, K)), jnp.float32) for _ in range(3))
    cotangent = jnp.asarray(rng.normal(size=(B, T_, H, K)), jnp.float32)
    out, probs, grads = blocked_with_vjp(q, k, v, cotangent, block)
    want_out, want_probs = np_causal_attention(*(np.asarray(x, np.float64) for x in (q, k, v)))
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(probs)[..., np.triu(np.ones((T_, T_), bool), k=1)] == 0.0)
    for got, want in zip(grads, plain_vjp(q, k, v, cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_causal_mask_with_offset_queries_and_more_keys():
    # Cached generation: 3 queries at absolute positions 4, 5, 6 against 9 key slots.
    mask = np.asarray(causal_mask(jnp.arange(4, 7), jnp.arange(9)))
    want = np.array([[s <= t for s in range(9)] for t in range(4, 7)])
    np.testing.assert_array_equal(mask, want)


def test_attention_with_fewer_queries_than_keys():
    # T = 6 queries at positions 3..8 against S = 9 keys: a swapped T/S axis cannot pass.
    rng = np.random.default_rng(4)
    q = rng.normal(size=(B, 6, H, K))
    k, v = rng.normal(size=(B, 9, H, K)), rng.normal(size=(B, 9, H, K))
    qp, kp = np.arange(3, 9), np.arange(9)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    probs = attention_probs(f32(q), f32(k), causal_mask(jnp.asarray(qp), jnp.asarray(kp)))
    out = attend(probs, f32(v))
    want_out, want_probs = np_causal_attention(q, k, v, qp, kp)
    assert probs.shape == (B, H, 6, 9)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the whole model


def test_forward_equals_numpy_gpt2(params, tokens, reference):
    logits = FORWARD(params, tokens, cfg=CFG)
    want, _ = reference
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    assert np.std(want) > 0.5  # the oracle is not trivially small
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_trace_shapes(traced):
    _, trace = traced
    assert {name: tuple(x.shape) for name, x in trace.items()} == {
        "resid_pre": (L, B, T, D), "resid_mid": (L, B, T, D), "resid_post": (L, B, T, D),
        "attn_probs": (L, B, H, T, T), "mlp_hidden": (L, B, T, F), "final": (B, T, D),
    }


def test_trace_matches_numpy_intermediates(traced, reference):
    logits, trace = traced
    want_logits, want = reference
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
    for name in ("resid_pre", "resid_mid", "resid_post", "attn_probs", "mlp_hidden", "final"):
        np.testing.assert_allclose(trace[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_trace_is_consistent(params, traced):
    logits, trace = traced
    # The final LayerNorm of the last block's output is trace["final"], and it unembeds to the logits.
    ln_f = jax.tree.map(lambda a: np.asarray(a, np.float64), params["ln_f"])
    final = np_layer_norm(np.asarray(trace["resid_post"][-1], np.float64), ln_f)
    np.testing.assert_allclose(trace["final"], final, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, np.asarray(trace["final"]) @ np.asarray(params["embed"]["tok"]).T,
                               rtol=1e-4, atol=1e-5)
    # Each block reads exactly what the one before it wrote.
    np.testing.assert_array_equal(trace["resid_pre"][1:], trace["resid_post"][:-1])


def test_causality(params, tokens):
    base = np.asarray(FORWARD(params, tokens, cfg=CFG))
    for t in range(T):
        changed = tokens.at[:, t].set((tokens[:, t] + 1 + t) % V)
        logits = np.asarray(FORWARD(params, changed, cfg=CFG))
        # Exactly equal: masked attention weights are exactly 0, so nothing from t reaches s < t.
        np.testing.assert_array_equal(logits[:, :t], base[:, :t], err_msg=f"position {t} leaked backwards")
        assert np.all(np.abs(logits[:, t] - base[:, t]).max(-1) > 1e-3), f"position {t} ignored its token"


def test_gradients_match_finite_differences(params):
    windows = jnp.asarray(np.random.default_rng(5).integers(0, V, (B, 7)), jnp.int32)  # T = 6
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        trainable, frozen = partition(p64, lambda name: True)  # everything trainable, frozen all None
        loss = jax.jit(lambda tr: loss_fn(tr, frozen, windows, CFG))
        assert loss(trainable).dtype == jnp.float64
        check_grads(loss, (trainable,), order=1, modes=("rev",))

        # check_grads probes one random direction through all parameters at once, where a small leaf
        # (a LayerNorm bias) barely counts; so also probe each leaf on its own, against a central
        # difference.
        eps = 1e-5

        @jax.jit
        def slopes(tr, direction):  # (analytic, numeric) derivative of the loss along `direction`
            analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(jax.grad(loss)(tr)),
                                                          jax.tree.leaves(direction)))
            step = lambda s: jax.tree.map(lambda x, d: x + s * d, tr, direction)
            return analytic, (loss(step(eps)) - loss(step(-eps))) / (2 * eps)

        rng = np.random.default_rng(6)
        leaves = named_leaves(trainable)
        for name in leaves:
            direction = {n: np.zeros(x.shape) for n, x in leaves.items()}
            direction[name] = rng.normal(size=leaves[name].shape)
            analytic, numeric = slopes(trainable, _like(trainable, direction))
            # Every leaf matters to the loss, except the key bias: it adds q·b to a whole row of scores,
            # which softmax ignores, so its gradient is 0 in exact arithmetic.
            if not name.endswith("attn.k.b"):
                assert abs(analytic) > 1e-6, name
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9, err_msg=name)


def _like(tree, named):
    """`named` ({dotted name: array}) arranged as `tree`."""
    treedef = jax.tree_util.tree_structure(tree)
    return jax.tree_util.tree_unflatten(treedef, [named[n] for n in named_leaves(tree)])


def test_loss_fn_is_cross_entropy_of_forward(params):
    windows = jnp.asarray(np.random.default_rng(7).integers(0, V, (B, T + 1)), jnp.int32)
    trainable, frozen = partition(params, lambda name: ".attn." in name)
    got = jax.jit(loss_fn, static_argnames=("cfg",))(trainable, frozen, windows, cfg=CFG)
    logits, _ = np_gpt2(params, windows[:, :-1])
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, np.asarray(windows[:, 1:])[..., None], -1).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(cross_entropy(FORWARD(params, windows[:, :-1], cfg=CFG), windows[:, 1:]), want,
                               rtol=1e-5)


# ---------------------------------------------------------------- initialisation


def test_init_shapes():
    params = init(CFG, key=jax.random.key(0))
    want = {"embed.tok": (V, D), "embed.pos": (CONTEXT, D), "ln_f.scale": (D,), "ln_f.bias": (D,)}
    for i in range(L):
        for n in ("q", "k", "v", "o"):
            want[f"blocks.{i}.attn.{n}.w"] = (D, D)
            want[f"blocks.{i}.attn.{n}.b"] = (D,)
        for ln in ("ln1", "ln2"):
            want[f"blocks.{i}.{ln}.scale"] = (D,)
            want[f"blocks.{i}.{ln}.bias"] = (D,)
        want[f"blocks.{i}.mlp.fc.w"] = (D, F)
        want[f"blocks.{i}.mlp.fc.b"] = (F,)
        want[f"blocks.{i}.mlp.proj.w"] = (F, D)
        want[f"blocks.{i}.mlp.proj.b"] = (D,)
    got = named_leaves(params)
    assert {n: tuple(x.shape) for n, x in got.items()} == want
    assert all(x.dtype == jnp.float32 for x in got.values())
    assert {n: tuple(x.shape) for n, x in named_leaves(param_shapes(CFG)).items()} == want


def test_init_values_follow_gpt2():
    # Width 96 and 3 layers: enough samples per matrix that +-15% on a std is many standard errors.
    cfg = ModelConfig(vocab_size=101, context=67, width=96, heads=4, layers=3)
    leaves = {n: np.asarray(x) for n, x in named_leaves(init(cfg, key=jax.random.key(8))).items()}
    resid_std = 0.02 / math.sqrt(2 * cfg.layers)
    for name, x in leaves.items():
        if name.endswith((".b", ".bias")):
            assert np.all(x == 0.0), name
        elif name.endswith(".scale"):
            assert np.all(x == 1.0), name
        else:
            want = resid_std if name.endswith(("attn.o.w", "mlp.proj.w")) else 0.02
            assert abs(x.std() / want - 1) < 0.15, (name, x.std(), want)
            assert abs(x.mean()) < 0.15 * want, name


def test_init_is_deterministic_per_key():
    a = named_leaves(init(CFG, key=jax.random.key(9)))
    b = named_leaves(init(CFG, key=jax.random.key(9)))
    c = named_leaves(init(CFG, key=jax.random.key(10)))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in a:
        if not name.endswith((".b", ".bias", ".scale")):
            assert not np.array_equal(a[name], c[name]), name
    # Every matrix draws from its own key: no two weights are the same numbers.
    weights = [np.asarray(x).ravel()[:8] for n, x in a.items() if n.endswith(".w") or n.startswith("embed")]
    assert len({w.tobytes() for w in weights}) == len(weights)


# ---------------------------------------------------------------- the key/value cache


@pytest.mark.parametrize("chunks", [(2, 5), (1, 1, 1, 1, 1, 1, 1)])
def test_forward_cached_in_chunks_equals_forward(params, tokens, chunks):
    full = FORWARD(params, tokens, cfg=CFG)
    cache, start, pieces = empty_cache(CFG, B), 0, []
    for size in chunks:
        logits, cache = FORWARD_CACHED(params, tokens[:, start:start + size], CFG, cache, start)
        assert logits.shape == (B, size, V)
        assert [tuple(c["k"].shape) for c in cache] == [(B, CONTEXT, H, K)] * L
        pieces.append(logits)
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_unwritten_cache_slots_are_invisible(params, tokens):
    # Garbage in the slots not yet written must not change anything: the mask hides them exactly.
    rng = np.random.default_rng(11)
    garbage = [{n: jnp.asarray(rng.normal(size=c[n].shape), jnp.float32) for n in c} for c in empty_cache(CFG, B)]
    P = 6
    logits_zero, _ = FORWARD_CACHED(params, tokens[:, :P], CFG, empty_cache(CFG, B), 0)
    logits_garbage, cache = FORWARD_CACHED(params, tokens[:, :P], CFG, garbage, 0)
    np.testing.assert_array_equal(logits_garbage, logits_zero)
    # The prefill wrote exactly slots 0..P-1 and left the rest as they were.
    for before, after in zip(garbage, cache):
        np.testing.assert_array_equal(after["k"][:, P:], before["k"][:, P:])
        assert not np.array_equal(after["k"][:, :P], before["k"][:, :P])


# ---------------------------------------------------------------- bad configs


def test_width_not_divisible_by_heads():
    with pytest.raises(MinilmError) as err:
        ModelConfig(width=10, heads=3)
    message = str(err.value)
    assert re.search(r"\b10\b", message) and re.search(r"\b3\b", message), message


@pytest.mark.parametrize("field", ["context", "width", "layers", "heads", "mlp_ratio"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes(field, value):
    with pytest.raises(MinilmError, match=rf"{field}.*{value}"):
        ModelConfig(**{field: value})


def test_negative_vocab_size():
    with pytest.raises(MinilmError, match="-2"):
        ModelConfig(vocab_size=-2)
