"""Tokenizers: text <-> integer ids, at the level of characters, of whitespace-separated words, or of
GPT-2's byte-level BPE sub-words.

A tokenizer is nothing but an ordered vocabulary: token i is `vocab[i]`. Character level suits free
text (any character seen in training is a token); word level suits the built-in corpora, whose
vocabularies are small and known, so each concept word ("justice", "court") is exactly one token
with one embedding vector — which is what lets the analysis ask how *that word's* vector moved.

Word level splits on spaces and keeps the newline as a token of its own, so documents keep their
boundaries. Saved as JSON beside each checkpoint: `{"kind": "word", "vocab": [...]}`.

BPE (`BpeTokenizer`) is what an imported GPT-2 brings along: byte-level byte-pair encoding (Sennrich et
al. 2016; Radford et al. 2019 §2.2), run by Hugging Face's `tokenizers` library, not by hand: the
merges are data, and matching GPT-2's ids exactly is the point. Saved as `{"kind": "bpe", "vocab":
[...], "tokenizers": {the library's own tokenizer.json}}`.

A word of the analyses (`minilm compare --words justice`) may span several BPE sub-tokens. It is looked
up as it appears inside running text, with GPT-2's leading space (" justice" -> "Ġjustice", or
"Ġjust" + "ice"), and `word_ids` gives its sub-token ids. Its one vector is:
  * in context (hidden states at every layer): the LAST sub-token's vector, at each place the whole
    sub-token sequence occurs. Attention is causal, so the last sub-token is the first position that
    has seen the whole word; earlier positions have not yet read its ending (the rule of Meng et al.
    2022, ROME, who read a subject at its last token).
  * in the static embedding table: the MEAN of its sub-tokens' rows. No row has seen the whole word
    there, so none stands for it; the mean weighs each piece alike.
For char and word tokenizers every word is one token and both rules give that token's vector.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minilm.errors import MinilmError

KINDS = ("char", "word")  # the plain vocabularies; "bpe" is BpeTokenizer's
NEWLINE = "\n"


def split_words(text: str) -> list[str]:
    """Split on spaces and tabs; every newline becomes a token of its own."""
    words = []
    for i, line in enumerate(text.split(NEWLINE)):
        if i:
            words.append(NEWLINE)
        words.extend(line.split())
    return words


@dataclass(frozen=True)
class Tokenizer:
    """An ordered vocabulary of characters or words; `encode` and `decode` are inverses on it."""

    kind: str
    vocab: tuple[str, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MinilmError(f"tokenizer kind {self.kind!r} is unknown; expected one of {KINDS}")
        if not self.vocab:
            raise MinilmError("the tokenizer vocabulary is empty; it needs at least one token")
        if not all(isinstance(t, str) and t for t in self.vocab):
            raise MinilmError("the tokenizer vocabulary must be a list of non-empty strings")
        if len(set(self.vocab)) != len(self.vocab):
            raise MinilmError("the tokenizer vocabulary lists a token twice; each token must be unique")
        if self.kind == "char" and any(len(t) != 1 for t in self.vocab):
            raise MinilmError("a char tokenizer's vocabulary must be single characters")
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.vocab)})

    @classmethod
    def build(cls, kind: str, text: str) -> Tokenizer:
        """The tokenizer whose vocabulary is every distinct token of `text`, sorted."""
        tokens = set(text) if kind == "char" else set(split_words(text))
        return cls(kind, tuple(sorted(tokens)))

    @property
    def size(self) -> int:
        return len(self.vocab)

    def tokens(self, text: str) -> list[str]:
        return list(text) if self.kind == "char" else split_words(text)

    def word_ids(self, word: str) -> tuple[int, ...] | None:
        """The token ids of one word as it appears in running text, or None if it is not in the vocabulary.
        One id here; several for a BpeTokenizer (the module docstring says how the analyses read those)."""
        return (self.index[word],) if word in self.index else None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as int32, shape (T,). Unknown tokens raise a MinilmError naming them."""
        tokens = self.tokens(text)
        unknown = sorted({t for t in tokens if t not in self.index})
        if unknown:
            shown = ", ".join(repr(t) for t in unknown[:20]) + (" …" if len(unknown) > 20 else "")
            raise MinilmError(
                f"{len(unknown)} {self.kind}(s) not in the {self.size}-token vocabulary: {shown}; "
                f"use only tokens the model was trained on"
            )
        return np.array([self.index[t] for t in tokens], dtype=np.int32)

    def decode(self, ids) -> str:
        tokens = [self.vocab[int(i)] for i in np.asarray(ids).reshape(-1)]
        if self.kind == "char":
            return "".join(tokens)
        return " ".join(tokens).replace(" \n ", "\n").replace(" \n", "\n").replace("\n ", "\n")

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab": list(self.vocab)}

    @classmethod
    def from_json(cls, data) -> Tokenizer:
        if isinstance(data, dict) and data.get("kind") == "bpe":
            return BpeTokenizer.from_json(data)
        if not isinstance(data, dict) or not isinstance(data.get("vocab"), list):
            raise MinilmError('a tokenizer file must hold {"kind": "char"|"word"|"bpe", "vocab": [...]}')
        return cls(data.get("kind"), tuple(data["vocab"]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass(frozen=True)
class BpeTokenizer(Tokenizer):
    """GPT-2's byte-level BPE, run by the `tokenizers` library. `vocab[i]` is token i's byte-level spelling
    ("Ġthe" for " the"); `spec` is the library's tokenizer.json, which holds the merges and the rules.

    Build one with `from_spec(json_text)` (a tokenizer.json) or `from_files(vocab.json, merges.txt)`."""

    spec: str = ""

    def __post_init__(self):
        if self.kind != "bpe":
            raise MinilmError(f"a BpeTokenizer's kind is 'bpe', not {self.kind!r}")
        if not self.vocab or len(set(self.vocab)) != len(self.vocab):
            raise MinilmError("the BPE vocabulary is empty or lists a token twice")
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.vocab)})
        object.__setattr__(self, "_backend", _backend(self.spec))

    @classmethod
    def from_spec(cls, spec: str) -> BpeTokenizer:
        """From the text of a tokenizers-library tokenizer.json (what transformers writes beside a model)."""
        backend = _backend(spec)
        vocab = backend.get_vocab(with_added_tokens=True)  # {token: id}
        by_id = sorted(vocab.items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise MinilmError(f"the BPE vocabulary's ids are not 0..{len(by_id) - 1} without gaps; minilm needs "
                              f"one embedding row per id")
        return cls("bpe", tuple(t for t, _ in by_id), backend.to_str())

    @classmethod
    def from_files(cls, vocab_path: Path, merges_path: Path, add_prefix_space: bool = False) -> BpeTokenizer:
        """From GPT-2's vocab.json and merges.txt, set up as transformers' GPT-2 tokenizer is: byte-level
        pre-tokenizer (GPT-2's regex) and decoder, and <|endoftext|> as a special token when present."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend(models.BPE.from_file(str(vocab_path), str(merges_path)))
        except Exception as e:  # the library's own error type says little; name the files
            raise MinilmError(f"{vocab_path} and {merges_path} are not a BPE vocabulary and merges list ({e})") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        if backend.token_to_id(END_OF_TEXT) is not None:
            backend.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
        return cls.from_spec(backend.to_str())

    def tokens(self, text: str) -> list[str]:
        return self._backend.encode(text, add_special_tokens=False).tokens

    def word_ids(self, word: str) -> tuple[int, ...] | None:
        """The sub-token ids of `word` as it appears inside running text: after a space (GPT-2's "Ġ")."""
        ids = tuple(self._backend.encode(" " + word.strip(), add_special_tokens=False).ids)
        return ids or None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as int32, shape (T,). Byte-level BPE spells every text: nothing is unknown."""
        return np.array(self._backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def to_json(self) -> dict:
        return {"kind": "bpe", "vocab": list(self.vocab), "tokenizers": json.loads(self.spec)}

    @classmethod
    def from_json(cls, data) -> BpeTokenizer:
        if not isinstance(data.get("tokenizers"), dict):
            raise MinilmError('a BPE tokenizer file must hold {"kind": "bpe", "tokenizers": {...}}')
        made = cls.from_spec(json.dumps(data["tokenizers"]))
        if "vocab" in data and list(made.vocab) != data["vocab"]:
            raise MinilmError("the BPE tokenizer file's vocab list does not match its tokenizers model")
        return made


END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token: between documents, and to start sampling


def _backend(spec: str):
    """A `tokenizers.Tokenizer` from its JSON text, or a MinilmError saying the text is not one."""
    from tokenizers import Tokenizer as Backend

    try:
        return Backend.from_str(spec)
    except Exception as e:  # the library raises a bare Exception with serde's message
        raise MinilmError(f"not a tokenizers-library tokenizer.json ({str(e)[:200]})") from None
