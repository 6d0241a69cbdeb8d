"""The logit lens: read every layer's residual stream as if it were the last.

    logits_l = LN_f(x_l) @ tokᵀ,   x_0 = embeddings, x_l = output of block l (l = 1..L)

The residual stream is a sum that each block adds to, and the model reads its prediction off the final
one through LN_f and the tied unembedding. Applying that same read-out to the intermediate sums shows
when the prediction forms (nostalgebraist 2020, "interpreting GPT: the logit lens", LessWrong). It is
a lens, not the model: early layers were never trained to be read this way, so their top tokens are a
hint, and exact only at the last layer, where the lens is the model's own output.

Shapes use the axis letters of minilm/__init__.py: L layers, B batch, T positions, D width,
V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import layer_norm
from minilm.tokenizer import Tokenizer


def logit_lens(params: dict, trace: dict, cfg: ModelConfig) -> jax.Array:
    """Unembed every layer's residual stream: LN_f(x_l) @ tokᵀ for l = 0..L.

    Args: params, the model's; trace, from `forward(..., trace=True)`: x_0 is trace["resid_pre"][0]
    (token + position embeddings), x_l is trace["resid_post"][l-1]. Returns: logits (L+1, B, T, V);
    entry L equals forward's logits.
    """
    pre, post = trace["resid_pre"], trace["resid_post"]  # (L, B, T, D) each
    if post.shape[0] != cfg.layers or post.shape[-1] != cfg.width:
        raise MinilmError(f"trace has residual streams of shape {post.shape}; a model with layers={cfg.layers} and "
                          f"width={cfg.width} needs (L, B, T, D) = ({cfg.layers}, B, T, {cfg.width})")
    streams = jnp.concatenate([pre[:1], post])  # (L+1, B, T, D)
    return layer_norm(streams, params["ln_f"], cfg.ln_eps) @ params["embed"]["tok"].T  # (L+1, B, T, D) @ (D, V)


def top_predictions(lens_logits, tokenizer: Tokenizer, position: int, k: int = 3, batch_index: int = 0
                    ) -> list[list[tuple[str, float]]]:
    """Per layer, the k most likely next tokens at one position: [[(token, probability), ...], ...].

    Probabilities are softmax(logits_l) over the whole vocabulary, so each layer's k values sum to at
    most 1. Args: lens_logits (L+1, B, T, V) from `logit_lens`; position in [-T, T). Returns: L+1 lists,
    each sorted from most to least likely.
    """
    logits = np.asarray(lens_logits, dtype=np.float64)
    if logits.ndim != 4 or logits.shape[-1] != tokenizer.size:
        raise MinilmError(f"lens logits have shape {logits.shape}; expected (L+1, B, T, V) with V = {tokenizer.size}, "
                          f"the tokenizer's vocabulary size")
    _, batch, positions, _ = logits.shape
    if not -positions <= position < positions:
        raise MinilmError(f"position {position} is outside the {positions} positions; use 0..{positions - 1}")
    if not -batch <= batch_index < batch:
        raise MinilmError(f"batch_index {batch_index} is outside the batch of {batch}; use 0..{batch - 1}")
    if k < 1:
        raise MinilmError(f"k = {k}; ask for at least one prediction per layer")
    z = logits[:, batch_index, position]  # (L+1, V)
    z = z - z.max(axis=-1, keepdims=True)  # softmax without overflow
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # (L+1, k), most likely first
    return [[(tokenizer.vocab[i], float(p[i])) for i in row] for p, row in zip(probs, top)]
