"""Sampling text from the model, one token at a time, with a key/value cache.

Each new token needs the keys and values of every earlier position. Recomputing them means running
the whole sequence again for every token (O(T²) work for T tokens); the cache keeps them from the
steps before, so each step runs the model on one token (O(T)). `generate_uncached` does the
recomputation on purpose: it is the reference the cache is tested against, and the baseline of the
speed benchmark.

How the next token is picked (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
for top-p):
    temperature 0  -> argmax (greedy)
    otherwise      -> sample softmax(logits / temperature), restricted to the top_k most likely
                      tokens (0: no limit) and to the smallest set whose probability reaches top_p.

The loop over new tokens is a `lax.scan` inside one jit-compiled function: no Python per token.

Shapes use the axis letters of minilm/__init__.py: B batch, V vocabulary, P prompt tokens, G generated
tokens (G = max_new_tokens).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import empty_cache, forward, forward_cached


def pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep token i while the mass strictly before it is below top_p: the most likely always stays.
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # (B, 1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise MinilmError(f"max_new_tokens = {max_new_tokens}; ask for at least 1 new token")
    if prompt_len < 1:
        raise MinilmError("the prompt is empty; give at least one token to start from")
    if prompt_len >= cfg.context:
        raise MinilmError(f"the prompt has {prompt_len} tokens but the model sees at most {cfg.context}, and each "
                          f"new token needs a place too; shorten the prompt to fewer than {cfg.context} tokens")
    if prompt_len + max_new_tokens > cfg.context:
        raise MinilmError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds the model's context of {cfg.context} tokens; "
            f"shorten the prompt or lower --max-new-tokens to at most {cfg.context - prompt_len}"
        )


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_cached(params, prompt, key, *, cfg, max_new_tokens, temperature, top_k, top_p):
    B, P = prompt.shape
    keys = jax.random.split(key, max_new_tokens)
    logits, cache = forward_cached(params, prompt, cfg, empty_cache(cfg, B), 0)  # prefill: (B, P, V)
    first = pick(logits[:, -1], keys[0], temperature, top_k, top_p)  # (B,)

    def step(carry, key_t):
        token, cache, position = carry
        logits, cache = forward_cached(params, token[:, None], cfg, cache, position)  # (B, 1, V)
        next_token = pick(logits[:, 0], key_t, temperature, top_k, top_p)
        return (next_token, cache, position + 1), next_token

    _, rest = jax.lax.scan(step, (first, cache, P), keys[1:])  # rest: (G - 1, B)
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)  # (B, P + G)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_uncached(params, prompt, key, *, cfg, max_new_tokens, temperature, top_k, top_p):
    B, P = prompt.shape
    keys = jax.random.split(key, max_new_tokens)
    tokens = jnp.concatenate([prompt, jnp.zeros((B, max_new_tokens), prompt.dtype)], axis=1)  # (B, P + G)

    def step(tokens, i):
        # The whole buffer goes through the model each time; causality makes the unwritten tail harmless.
        logits = forward(params, tokens, cfg)[:, P + i - 1]  # (B, V)
        next_token = pick(logits, keys[i], temperature, top_k, top_p)
        return tokens.at[:, P + i].set(next_token.astype(tokens.dtype)), None

    tokens, _ = jax.lax.scan(step, tokens, jnp.arange(max_new_tokens))
    return tokens


def generate(params, prompt, cfg: ModelConfig, *, key, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, use_cache: bool = True) -> jax.Array:
    """prompt (B, P) int -> (B, P + G), G = max_new_tokens: the prompt followed by sampled tokens.

    With the same key, the cached and uncached paths make the same choices from the same logits.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise MinilmError(f"prompt has shape {prompt.shape}; expected (batch, length) token ids, e.g. ids[None]")
    check_length(cfg, prompt.shape[1], max_new_tokens)
    run = _generate_cached if use_cache else _generate_uncached
    return run(params, prompt, key, cfg=cfg, max_new_tokens=max_new_tokens, temperature=float(temperature),
               top_k=int(top_k), top_p=float(top_p))
