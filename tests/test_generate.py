"""Oracle tests for minilm.generate.

Generation with the key/value cache must choose exactly what recomputation chooses, and greedy
generation must equal a plain Python loop over `forward` that takes the argmax. `pick` is checked
against sets and distributions computed in NumPy: top-k against argsort, top-p against the smallest
set reaching p, and the sampled frequencies against softmax(logits / temperature), over many keys.

Sizes are small and pairwise distinct: B 5, P 6, H 3, K 4, D 12, V 11, L 2, context 13, 7 new tokens. The parameters
are random values of order one rather than init's (which predict a nearly uniform next token), so the
greedy choices have clear margins and cannot flip on a rounding difference; the loop oracle asserts so.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import scrambled

from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.generate import generate, pick
from minilm.model import forward, init

B, P, H, K, V, L, CONTEXT = 5, 6, 3, 4, 11, 2, 13
CFG = ModelConfig(vocab_size=V, context=CONTEXT, width=H * K, heads=H, layers=L)
FILL = CONTEXT - P  # 7: max_new_tokens that fills the context exactly

FORWARD = jax.jit(forward, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def params():
    return scrambled(init(CFG, key=jax.random.key(0)), seed=1, embed_std=1.0)


@pytest.fixture(scope="module")
def prompt():
    return jnp.asarray(np.random.default_rng(2).integers(0, V, (B, P)), jnp.int32)


# ---------------------------------------------------------------- generate


SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_k_top_p": dict(temperature=1.3, top_k=5, top_p=0.8),
}


@pytest.mark.parametrize("setting,max_new_tokens", [
    ("greedy", FILL), ("greedy", 1), ("temperature", FILL), ("temperature", 1), ("top_k_top_p", FILL)])
def test_cached_equals_uncached(params, prompt, setting, max_new_tokens):
    kwargs = dict(key=jax.random.key(3), max_new_tokens=max_new_tokens, **SETTINGS[setting])
    cached = generate(params, prompt, CFG, use_cache=True, **kwargs)
    uncached = generate(params, prompt, CFG, use_cache=False, **kwargs)
    assert cached.shape == (B, P + max_new_tokens) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached[:, :P], prompt)
    assert np.all((np.asarray(cached) >= 0) & (np.asarray(cached) < V))
    np.testing.assert_array_equal(cached, uncached)


def naive_greedy(params, prompt, max_new_tokens):
    """The oracle: run `forward` on the whole growing sequence, append the argmax of the last position."""
    tokens = np.asarray(prompt)
    for _ in range(max_new_tokens):
        last = np.asarray(FORWARD(params, jnp.asarray(tokens), cfg=CFG))[:, -1]  # (B, V)
        top2 = np.sort(last, axis=-1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-3), "near-tie: the test would hinge on rounding"
        tokens = np.concatenate([tokens, last.argmax(-1)[:, None]], axis=1)
    return tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_naive_loop(params, prompt, use_cache):
    want = naive_greedy(params, prompt, FILL)
    got = generate(params, prompt, CFG, key=jax.random.key(4), max_new_tokens=FILL, temperature=0.0,
                   use_cache=use_cache)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want[:, P:])) > 1  # not a degenerate model that repeats one token


def test_greedy_ignores_key(params, prompt):
    run = lambda seed: generate(params, prompt, CFG, key=jax.random.key(seed), max_new_tokens=FILL,
                                temperature=0.0)
    np.testing.assert_array_equal(run(5), run(6))


def test_sampling_depends_on_key(params, prompt):
    run = lambda seed: generate(params, prompt, CFG, key=jax.random.key(seed), max_new_tokens=FILL,
                                temperature=0.8)
    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


# ---------------------------------------------------------------- pick


@pytest.fixture(scope="module")
def logits():
    """Five rows with different orderings, so a threshold computed for the wrong row shows."""
    # Spread 1.2, not more: at 1.5 two of the five rows have a token of probability 0.8, whose nucleus at
    # p = 0.7 would be that token alone, and top-p would be tested on nothing.
    return jnp.asarray(np.random.default_rng(9).normal(0.0, 1.2, (B, V)), jnp.float32)


def sample_many(logits, count, temperature, top_k=0, top_p=1.0, seed=10):
    """pick over `count` keys -> (count, B) token ids."""
    keys = jax.random.split(jax.random.key(seed), count)
    run = jax.jit(jax.vmap(lambda k: pick(logits, k, temperature, top_k, top_p)))
    return np.asarray(run(keys))


def np_probs(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def total_variation(samples, probs):
    freq = np.bincount(samples, minlength=probs.shape[-1]) / len(samples)
    return 0.5 * np.abs(freq - probs).sum()


def restricted(probs, allowed):
    p = np.where(allowed, probs, 0.0)
    return p / p.sum()


def test_top_k_1_is_argmax(logits):
    samples = sample_many(logits, 500, temperature=1.7, top_k=1)
    np.testing.assert_array_equal(samples, np.broadcast_to(np.argmax(logits, -1), samples.shape))


def test_temperature_zero_is_argmax(logits):
    for seed in range(3):
        np.testing.assert_array_equal(pick(logits, jax.random.key(seed), 0.0, 0, 1.0), np.argmax(logits, -1))


def test_top_k_samples_stay_in_top_k(logits):
    k, temperature = 4, 1.2
    samples = sample_many(logits, 2000, temperature, top_k=k)
    probs = np_probs(logits, temperature)
    for b in range(B):
        top = np.argsort(-np.asarray(logits[b]))[:k]
        assert set(samples[:, b]) <= set(top.tolist())
        assert total_variation(samples[:, b], restricted(probs[b], np.isin(np.arange(V), top))) < 0.06


def smallest_set_reaching(probs, p):
    """Indices of the most likely tokens, fewest first, whose total probability reaches p."""
    order = np.argsort(-probs)
    count = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # first prefix with cumsum >= p
    return order[:count]


def test_top_p_samples_stay_in_nucleus(logits):
    top_p, temperature = 0.7, 0.9
    samples = sample_many(logits, 2000, temperature, top_p=top_p)
    probs = np_probs(logits, temperature)
    for b in range(B):
        nucleus = smallest_set_reaching(probs[b], top_p)
        cumsum = np.cumsum(np.sort(probs[b])[::-1])
        assert np.all(np.abs(cumsum - top_p) > 1e-3)  # p is not on a boundary: the set is unambiguous
        assert 1 < len(nucleus) < V
        assert set(samples[:, b]) <= set(nucleus.tolist())
        assert total_variation(samples[:, b], restricted(probs[b], np.isin(np.arange(V), nucleus))) < 0.06


def test_top_k_then_top_p(logits):
    # top_p applies to the distribution renormalised over the top k.
    k, top_p, temperature = 6, 0.75, 1.1
    samples = sample_many(logits, 2000, temperature, top_k=k, top_p=top_p)
    probs = np_probs(logits, temperature)
    for b in range(B):
        in_top_k = np.isin(np.arange(V), np.argsort(-np.asarray(logits[b]))[:k])
        nucleus = smallest_set_reaching(restricted(probs[b], in_top_k), top_p)
        assert set(samples[:, b]) <= set(nucleus.tolist())


def test_temperature_sampling_frequencies():
    row = np.array([1.0, -0.5, 0.3, 2.0, -1.2])
    for temperature in (0.7, 1.5):
        logits = jnp.asarray(np.stack([row, row[::-1]]), jnp.float32)  # (2, 5)
        samples = sample_many(logits, 20000, temperature, seed=11)
        probs = np_probs(logits, temperature)
        for b in range(2):
            assert total_variation(samples[:, b], probs[b]) < 0.03, (temperature, b)


# ---------------------------------------------------------------- bad input


def test_too_long_raises(params, prompt):
    with pytest.raises(MinilmError) as err:
        generate(params, prompt, CFG, key=jax.random.key(0), max_new_tokens=FILL + 1)
    message = str(err.value)
    for number in (P, FILL + 1, CONTEXT):
        assert re.search(rf"\b{number}\b", message), (number, message)


def test_empty_prompt_raises(params):
    with pytest.raises(MinilmError, match="empty"):
        generate(params, jnp.zeros((B, 0), jnp.int32), CFG, key=jax.random.key(0), max_new_tokens=2)


def test_bad_lengths_and_shapes_are_named():
    cfg = ModelConfig(vocab_size=11, context=13, width=12, layers=1, heads=3)
    params = init(cfg, key=jax.random.key(0))
    with pytest.raises(MinilmError, match="max_new_tokens = 0"):
        generate(params, jnp.zeros((2, 5), jnp.int32), cfg, key=jax.random.key(1), max_new_tokens=0)
    with pytest.raises(MinilmError, match=r"shape \(3,\)"):
        generate(params, jnp.zeros((3,), jnp.int32), cfg, key=jax.random.key(1), max_new_tokens=2)
    with pytest.raises(MinilmError, match="vocab_size = 0"):
        init(ModelConfig(), key=jax.random.key(0))
