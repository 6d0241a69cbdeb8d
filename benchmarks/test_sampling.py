"""Sampling speed with and without the KV cache (minilm.generate), on both presets.

Each case generates context - 1 new tokens from a one-token prompt, so the uncached path recomputes
prefixes of every length up to the whole context. Figures in `benchmark.extra_info`: tokens_per_s,
and for the cached case speedup_over_uncached (needs the uncached case of the same preset first).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import minilm.config
from minilm.generate import generate
from minilm.model import init

ROUNDS = {"tiny": 10, "small": 2}  # uncached small: ~10 s a round
UNCACHED = {}


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "kv-cache"])
def test_sampling(benchmark, preset, cached):
    model_cfg = dataclasses.replace(minilm.config.preset(preset)[0], vocab_size=65)
    params = init(model_cfg, key=jax.random.key(0))
    prompt = jnp.zeros((1, 1), jnp.int32)
    new = model_cfg.context - 1

    def sample():
        return jax.block_until_ready(generate(params, prompt, model_cfg, key=jax.random.key(1), max_new_tokens=new,
                                              temperature=1.0, use_cache=cached))

    sample()  # compile
    benchmark.pedantic(sample, rounds=ROUNDS[preset], iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    tokens_per_s = new / stats.stats.median
    benchmark.extra_info.update(preset=preset, cached=cached, new_tokens=new, tokens_per_s=tokens_per_s)
    if not cached:
        UNCACHED[preset] = tokens_per_s
    elif preset in UNCACHED:
        benchmark.extra_info["speedup_over_uncached"] = tokens_per_s / UNCACHED[preset]
