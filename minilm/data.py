"""From text to batches: tokenize a corpus, hold out its tail for evaluation, cut random windows.

A batch is a set of windows of T + 1 consecutive tokens; the model reads the first T and is scored on
predicting the last T (each position predicts the next token). Window offsets are drawn from
`fold_in(data_key, m)` for the m-th micro-batch, so the data stream is a pure function of the seed
and a counter: that counter (the "data cursor") is all a checkpoint needs to resume it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from minilm.config import DataConfig
from minilm.corpora import Corpus, load_corpus, read_text
from minilm.errors import MinilmError
from minilm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Dataset:
    train: np.ndarray  # (training tokens,) int32 token ids
    val: np.ndarray    # (held-out tokens,) int32
    tokenizer: Tokenizer
    corpus: Corpus | None  # the built-in corpus with its ground truth, or None for a text file


def load_dataset(cfg: DataConfig, *, seed: int, tokenizer: Tokenizer | None = None) -> Dataset:
    """Read or generate the text, tokenize it (with `tokenizer`, e.g. a base model's, if given) and split.

    The held-out part is the last `val_fraction` of the text, so no window straddles both parts.
    """
    if (cfg.corpus is None) == (cfg.text is None):
        raise MinilmError("give exactly one source of text: --corpus NAME (built-in) or --text PATH")
    corpus = None
    if cfg.corpus is not None:
        corpus = load_corpus(cfg.corpus, seed=seed, size=cfg.corpus_size)
        text = corpus.text
        kind = corpus.tokenizer if cfg.tokenizer == "auto" else cfg.tokenizer
        built = corpus.make_tokenizer() if kind == corpus.tokenizer else Tokenizer.build(kind, text)
    else:
        text = read_text(cfg.text)
        built = Tokenizer.build("char" if cfg.tokenizer == "auto" else cfg.tokenizer, text)
    tokenizer = tokenizer or built
    ids = tokenizer.encode(text)
    n_val = int(len(ids) * cfg.val_fraction)
    return Dataset(ids[: len(ids) - n_val], ids[len(ids) - n_val:], tokenizer, corpus)


def check_fits(data: Dataset, context: int, source: str, val_fraction: float) -> None:
    """Both parts must hold at least one window of context + 1 tokens (val_fraction: the split's, to name)."""
    for part, ids in (("training", data.train), ("held-out", data.val)):
        if len(ids) < context + 1:
            longer = "a larger --corpus-size" if data.corpus is not None else "a longer text"
            fraction = f"a {'larger' if part == 'held-out' else 'smaller'} --val-fraction than {val_fraction}"
            raise MinilmError(
                f"{source}: its {part} part has {len(ids)} tokens, shorter than one context window "
                f"({context} + 1); use {longer}, {fraction} or a smaller --context"
            )


@partial(jax.jit, static_argnames=("count", "batch_size", "context"))
def batches(ids: jax.Array, key: jax.Array, cursor, *, count: int, batch_size: int, context: int):
    """Micro-batches cursor..cursor+count-1 of windows: (A, B, T + 1) int32, A = count."""
    def one(m):
        offsets = jax.random.randint(jax.random.fold_in(key, m), (batch_size,), 0, ids.shape[0] - context)
        return ids[offsets[:, None] + jnp.arange(context + 1)]  # (B, T + 1)

    return jax.vmap(one)(cursor + jnp.arange(count))
