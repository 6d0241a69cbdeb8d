"""A GPT-2 style decoder, as pure functions over a plain tree of arrays.

    tokens -> token + position embeddings -> L x [x += attn(LN(x)); x += mlp(LN(x))] -> LN -> x @ tokᵀ

(With `ModelConfig.mlp` false the blocks are attention-only, the models of Elhage et al. 2021.)

(Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; pre-LayerNorm blocks,
learned positions, GELU MLP, output projection tied to the token embedding.)

Two conventions carry the rest of the project:

* Every linear layer is `x @ p["w"] + p["b"]` with `w` of shape (d_in, d_out). LoRA (lora/) replaces a
  `w` with an object that knows how to be right-multiplied, so this file never mentions LoRA.
* Activations flow between blocks as (B·T, D), not (B, T, D). Measured on a 2-core CPU: with 3-D
  activations XLA lowers the weight gradient of `x @ W` (a contraction over both B and T) through
  transposing copies, and the backward pass cost 5.7x the forward; flattened, every linear is a plain
  GEMM and a train step is ~1.7x faster with a bit-identical loss. Attention alone reshapes to
  (B, T, H, K) inside and flattens on the way out.

Shapes use the axis letters declared in minilm/__init__.py (B, T, S, D, H, K, F, V, L; N = B·T).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from minilm.attention import attend, attention_probs, causal_mask
from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.precision import mixed_precision_attention, mixed_precision_matmul

INIT_STD = 0.02  # GPT-2's initialisation scale for every weight matrix


# ---------------------------------------------------------------- parameters


def init(cfg: ModelConfig, *, key: jax.Array) -> dict:
    """Fresh parameters: N(0, 0.02²) weights, zero biases, unit LayerNorm scales.

    The two projections that write into the residual stream (attn.o, mlp.proj) are scaled down by
    1/sqrt(2L), as in GPT-2 §2.3, so the stream's variance does not grow with depth: 2L of them add up.
    """
    if cfg.vocab_size <= 0:
        raise MinilmError(f"vocab_size = {cfg.vocab_size}: set it from the tokenizer before init, e.g. "
                          f"dataclasses.replace(cfg, vocab_size=tokenizer.size)")
    D, F, L = cfg.width, cfg.mlp_width, cfg.layers
    resid_std = INIT_STD / math.sqrt(2 * L)
    key_tok, key_pos, *block_keys = jax.random.split(key, 2 + L)

    def linear_params(k, d_in, d_out, std=INIT_STD):
        return {"w": std * jax.random.normal(k, (d_in, d_out)), "b": jnp.zeros(d_out)}

    def layer_norm_params():
        return {"scale": jnp.ones(D), "bias": jnp.zeros(D)}

    def block_params(k):
        kq, kk, kv, ko, kfc, kproj = jax.random.split(k, 6)
        attn = {"ln1": layer_norm_params(),
                "attn": {"q": linear_params(kq, D, D), "k": linear_params(kk, D, D), "v": linear_params(kv, D, D),
                         "o": linear_params(ko, D, D, resid_std)}}
        if not cfg.mlp:  # attention-only (Elhage et al. 2021): the block ends after attention
            return attn
        return {**attn, "ln2": layer_norm_params(),
                "mlp": {"fc": linear_params(kfc, D, F), "proj": linear_params(kproj, F, D, resid_std)}}

    return {
        "embed": {"tok": INIT_STD * jax.random.normal(key_tok, (cfg.vocab_size, D)),   # (V, D)
                  "pos": INIT_STD * jax.random.normal(key_pos, (cfg.context, D))},     # (T, D)
        "blocks": [block_params(k) for k in block_keys],
        "ln_f": layer_norm_params(),
    }


def param_shapes(cfg: ModelConfig) -> dict:
    """The parameter tree's shapes and dtypes (jax.ShapeDtypeStruct leaves), without computing anything."""
    return jax.eval_shape(lambda k: init(cfg, key=k), jax.random.key(0))


# ---------------------------------------------------------------- layers


def linear(x: jax.Array, p: dict) -> jax.Array:
    """(N, d_in) -> (N, d_out). The one spelling of a linear layer in the model: x @ W + b.

    A weight that is not an array (a LoRA weight, lora/weight.py) computes its own `x @ W`."""
    w = p["w"]
    return mixed_precision_matmul(x, w, p["b"]) if isinstance(w, jax.Array) else x @ w + p["b"]


def layer_norm(x: jax.Array, p: dict, eps: float = 1e-5) -> jax.Array:
    """Normalise each row to zero mean and unit variance, then scale and shift (Ba et al. 2016)."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention_layer(x, p, cfg: ModelConfig, batch: int, positions, cache=None):
    """Causal self-attention. x (B·T, D), positions (T,) absolute -> (B·T, D), probs (B, H, T, S), cache.

    Without a cache the keys are this sequence's own (S = T). With one, the new keys and values are
    written into the cache's slots `positions` and the queries attend over all S = context slots;
    the causal mask hides the slots not yet written.
    """
    T = positions.shape[0]

    def heads(y):
        return y.reshape(batch, T, cfg.heads, cfg.head_size)  # (B·T, D) -> (B, T, H, K)

    q, k, v = heads(linear(x, p["q"])), heads(linear(x, p["k"])), heads(linear(x, p["v"]))
    if cache is None:  # a whole sequence from position 0: the same maths as below, skipping the masked half
        # attention.causal_self_attention; under mixed precision (bfloat16 weights) its products in bfloat16
        out, probs = mixed_precision_attention(q, k, v, p["q"]["w"].dtype)
    else:
        start = (0, positions[0], 0, 0)
        cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k, start),  # (B, S, H, K)
                 "v": jax.lax.dynamic_update_slice(cache["v"], v, start)}
        k, v = cache["k"], cache["v"]
        probs = attention_probs(q, k, causal_mask(positions, jnp.arange(k.shape[1])))  # (B, H, T, S)
        out = attend(probs, v)
    out = out.reshape(batch * T, cfg.width)  # (B, T, H, K) -> (B·T, D)
    return linear(out, p["o"]), probs, cache


def gelu(x: jax.Array) -> jax.Array:
    """GPT-2's tanh form of GELU (Hendrycks & Gimpel 2016): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))."""
    return jax.nn.gelu(x, approximate=True)


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU, x Φ(x) = 0.5 x (1 + erf(x / sqrt 2)): what Hugging Face configs call "gelu"."""
    return jax.nn.gelu(x, approximate=False)


# Speed trick: the backward pass recomputes GELU's tanh from its input instead of keeping it from the
# forward pass: one (B·T, F) array per layer less to write out and read back, for a few cheap
# elementwise operations. Same numbers. Measured on 2 CPU cores: the `small` step ~3-5% faster.
_gelu_recomputed = {"tanh": jax.checkpoint(gelu), "erf": jax.checkpoint(gelu_erf)}  # by ModelConfig.gelu


def mlp(x: jax.Array, p: dict, form: str = "tanh"):
    """(B·T, D) -> (B·T, D) through F hidden units; also returns the hidden activations (B·T, F).

    form: which GELU, "tanh" or "erf" (ModelConfig.gelu)."""
    hidden = _gelu_recomputed[form](linear(x, p["fc"]))
    return linear(hidden, p["proj"]), hidden


# Speed trick: the residual stream's gradient is written out once per block. In the backward pass it is
# a chain of elementwise sums through all L blocks (each adds its LayerNorms' gradients), and each link
# has two readers, the next link and the products below it. XLA's CPU backend fuses cheap elementwise
# producers into every reader, so each block's fusion recomputed the whole chain above it: L² work, 2L
# fusions of up to 104 multiplies on `small`. An optimization barrier does not stop that (the CPU
# compiler turns barriers into ordering constraints before fusing); a scatter does, as XLA never fuses
# one into its readers. So the backward pass scatters the gradient's column 0 onto itself: the same
# numbers, one copy. (Column 0 of all rows, not one element: on a mesh, where the rows are split over
# devices, each device then scatters its own rows and no collective is added.) Measured on 2 cores,
# alternated in one process: the `small` step 6% faster in bfloat16, 2% in float32.
@jax.custom_vjp
def _stream_gradient_kept(x: jax.Array) -> jax.Array:
    return x


_stream_gradient_kept.defvjp(lambda x: (x, None), lambda _, g: (g.at[:, 0].set(g[:, 0]),))


# ---------------------------------------------------------------- the model


def _decoder(params, tokens, cfg: ModelConfig, start=0, cache=None):
    """Shared body of `forward` and `forward_cached`: logits (B, T, V), trace, updated cache."""
    B, T = tokens.shape
    positions = start + jnp.arange(T)
    x = params["embed"]["tok"][tokens.reshape(-1)]  # (B·T, D)
    x = x + jnp.tile(jax.lax.dynamic_slice_in_dim(params["embed"]["pos"], start, T), (B, 1))  # + (T, D) per row
    layers = []  # per layer, what the trace keeps
    new_cache = []
    for i, p in enumerate(params["blocks"]):  # unrolled at trace time: L is small and static
        x = resid_pre = _stream_gradient_kept(x)
        attn_out, probs, layer_cache = attention_layer(
            layer_norm(x, p["ln1"], cfg.ln_eps), p["attn"], cfg, B, positions, None if cache is None else cache[i])
        x = x + attn_out
        resid_mid = x
        if cfg.mlp:  # else attention-only: the stream goes on to the next block as it is
            mlp_out, hidden = mlp(layer_norm(x, p["ln2"], cfg.ln_eps), p["mlp"], cfg.gelu)
            x = x + mlp_out
        else:
            hidden = jnp.zeros((x.shape[0], 0), x.dtype)  # (B·T, 0): no hidden units
        layers.append({"resid_pre": resid_pre, "resid_mid": resid_mid, "resid_post": x, "attn_probs": probs,
                       "mlp_hidden": hidden})
        new_cache.append(layer_cache)
    final = layer_norm(x, params["ln_f"], cfg.ln_eps)
    logits = final @ params["embed"]["tok"].T  # tied unembedding: (B·T, D) @ (D, V)

    def over_layers(name, width):  # one kind of trace, stacked over layers: (B·T, width) each -> (L, B, T, width)
        return jnp.stack([layer[name].reshape(B, T, width) for layer in layers])

    trace = {
        "resid_pre": over_layers("resid_pre", cfg.width),    # (L, B, T, D) each block's input
        "resid_mid": over_layers("resid_mid", cfg.width),    # (L, B, T, D) after attention
        "resid_post": over_layers("resid_post", cfg.width),  # (L, B, T, D) after the MLP
        "attn_probs": jnp.stack([layer["attn_probs"] for layer in layers]),  # (L, B, H, T, S)
        "mlp_hidden": over_layers("mlp_hidden", cfg.mlp_width if cfg.mlp else 0),  # (L, B, T, F), F = 0 without MLP
        "final": final.reshape(B, T, cfg.width),    # (B, T, D) final LayerNorm output
    }
    return logits.reshape(B, T, -1), trace, (None if cache is None else new_cache)


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, *, trace: bool = False):
    """tokens (B, T) int -> logits (B, T, V); with trace=True, (logits, trace).

    The trace holds, per layer, the residual stream before the block, after attention and after the
    MLP (each (L, B, T, D)), the attention probabilities (L, B, H, T, T), the MLP's hidden activations
    (L, B, T, F; F = 0 for an attention-only model), and the final LayerNorm output (B, T, D). Under
    jit, an unused trace costs nothing: XLA removes what no output needs.
    """
    logits, layer_trace, _ = _decoder(params, tokens, cfg)
    return (logits, layer_trace) if trace else logits


def empty_cache(cfg: ModelConfig, batch: int) -> list[dict]:
    """Per layer, zeroed key and value slots for a whole context: {"k", "v"} each (B, S, H, K)."""
    shape = (batch, cfg.context, cfg.heads, cfg.head_size)
    return [{"k": jnp.zeros(shape), "v": jnp.zeros(shape)} for _ in range(cfg.layers)]


def forward_cached(params: dict, tokens: jax.Array, cfg: ModelConfig, cache: list[dict], start):
    """tokens (B, T) at positions start..start+T-1, attending also to the cache -> (logits, cache).

    Writes this chunk's keys and values into the cache, so the next call only needs the new tokens.
    """
    logits, _, cache = _decoder(params, tokens, cfg, start, cache)
    return logits, cache
