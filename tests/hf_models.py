"""Tiny random GPT-2s built with transformers itself, saved as Hugging Face folders: the fixtures of the
interop tests (tests/test_hf.py, and the PEFT tests beside it). Plain functions, importable from any test
file; nothing here touches the network.

Sizes are small and pairwise distinct, so a swapped axis cannot go unnoticed:
    V 101 (a byte-level BPE trained here on SAMPLE_TEXT)   T 13   D 12   L 2   H 3 (K 4)   F 20 (not 4 D)
Weights are redrawn at order one (GPT-2's 0.02 initialisation leaves every block near the identity and
attention near uniform, which would make a parity test weak).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

V, T, D, L, H, F = 101, 13, 12, 2, 3, 20
END_OF_TEXT = "<|endoftext|>"

SAMPLE_TEXT = """The court heard the case of the stolen painting on a grey Monday morning.
Justice, said the judge, is not a feeling but a practice: it is done, or it is not.
Lawyers argued; the jury listened; the painter's daughter wept quietly in the third row.
Numbers too: 12 witnesses, 3 experts and 1 painting worth £40,000 — or so the insurers said.
Ünïcödé and emoji 🙂 must survive the byte-level round trip, as must tabs\tand  double  spaces.
"""


def train_bpe(vocab_size: int = V, text: str = SAMPLE_TEXT):
    """A GPT-2 style byte-level BPE (tokenizers library) trained on `text`, with <|endoftext|> as its last id.

    Only the bytes `text` uses form the base alphabet (not all 256), so the vocabulary stays tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=[], show_progress=False)
    tokenizer.train_from_iterator([text], trainer)  # one text: its newlines are in the alphabet too
    tokenizer.add_special_tokens([END_OF_TEXT])
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    return tokenizer


def fast_tokenizer(bpe):
    """transformers' GPT2TokenizerFast around a tokenizers-library tokenizer."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                             unk_token=END_OF_TEXT)


def tiny_gpt2(*, seed: int = 0, activation: str = "gelu_new", eps: float = 1e-5, n_inner: int | None = F,
              vocab_size: int = V, **config):
    """A random GPT2LMHeadModel (eval mode, float32) of the module's sizes, weights of order one."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=T, n_embd=D, n_layer=L, n_head=H, n_inner=n_inner,
                     activation_function=activation, layer_norm_epsilon=eps, bos_token_id=vocab_size - 1,
                     eos_token_id=vocab_size - 1, **config)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.7 * noise)
            elif p.ndim == 2:
                p.copy_(noise / math.sqrt(p.shape[0]))  # Conv1D weights are (d_in, d_out)
            else:
                p.copy_(0.2 * noise)
    return model


def save_folder(model, folder: Path, *, bpe=None, max_shard_size=None, strip_prefix: bool = False,
                tokenizer_files: str = "json") -> Path:
    """save_pretrained `model` (and the tokenizer) into `folder`, as a user's folder would look.

    max_shard_size: e.g. "4KB" for several model-0000i-of-0000n.safetensors and an index.
    strip_prefix: save the bare GPT2Model (names without `transformer.`, architectures ["GPT2Model"]).
    tokenizer_files: "json" (tokenizer.json and the rest, as GPT2TokenizerFast saves), "vocab" (only
    vocab.json + merges.txt, as the slow GPT2Tokenizer and old folders have), or "none".
    """
    folder = Path(folder)
    target = model.transformer if strip_prefix else model
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    target.save_pretrained(folder, **kwargs)
    if tokenizer_files != "none":
        bpe = bpe or train_bpe(model.config.vocab_size)
        if tokenizer_files == "json":
            fast_tokenizer(bpe).save_pretrained(folder)
        else:  # as GPT-2's own: vocab.json lists every token, <|endoftext|> included
            bpe.model.save(str(folder))
            (folder / "vocab.json").write_text(json.dumps(bpe.get_vocab(with_added_tokens=True)), encoding="utf-8")
    return folder


def logits(model, ids) -> np.ndarray:
    """transformers' float32 logits (B, T, V) for token ids (B, T)."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def token_batch(seed: int = 0, batch: int = 2, length: int = T, vocab_size: int = V) -> np.ndarray:
    """Random token ids (B, T) covering the whole context."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int32)


def edit_config(folder: Path, **changes) -> None:
    """Change keys of a saved config.json (a value None deletes the key): how refusal tests make bad folders."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
