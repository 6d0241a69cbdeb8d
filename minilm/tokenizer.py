"""Tokenizers: text <-> integer ids, at the level of characters or of whitespace-separated words.

A tokenizer is nothing but an ordered vocabulary: token i is `vocab[i]`. Character level suits free
text (any character seen in training is a token); word level suits the built-in corpora, whose
vocabularies are small and known, so each concept word ("justice", "court") is exactly one token
with one embedding vector — which is what lets the analysis ask how *that word's* vector moved.

Word level splits on spaces and keeps the newline as a token of its own, so documents keep their
boundaries. Saved as JSON beside each checkpoint: `{"kind": "word", "vocab": [...]}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minilm.errors import MinilmError

KINDS = ("char", "word")
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
        if not isinstance(data, dict) or not isinstance(data.get("vocab"), list):
            raise MinilmError('a tokenizer file must hold {"kind": "char"|"word", "vocab": [...]}')
        return cls(data.get("kind"), tuple(data["vocab"]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
