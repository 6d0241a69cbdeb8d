"""Tokenizers: encode and decode are inverses, vocabularies survive JSON, unknown tokens are named."""

import numpy as np
import pytest

from minilm.errors import MinilmError
from minilm.tokenizer import Tokenizer, split_words


def test_char_round_trip_and_ids():
    tok = Tokenizer.build("char", "hello, world\n")
    assert tok.vocab == tuple(sorted(set("hello, world\n")))
    ids = tok.encode("world\nhello")
    assert ids.dtype == np.int32
    assert [tok.vocab[i] for i in ids] == list("world\nhello")
    assert tok.decode(ids) == "world\nhello"


def test_word_level_keeps_newlines_as_tokens():
    assert split_words("a b\nc  d\n") == ["a", "b", "\n", "c", "d", "\n"]
    tok = Tokenizer.build("word", "the cat sat .\nthe dog ran .\n")
    assert tok.vocab == ("\n", ".", "cat", "dog", "ran", "sat", "the")
    text = "the dog sat .\nthe cat ran .\n"
    assert tok.decode(tok.encode(text)) == text


def test_json_round_trip(tmp_path):
    tok = Tokenizer.build("word", "justice and law \n café")
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json") == tok


def test_unknown_tokens_are_named():
    tok = Tokenizer.build("word", "the cat sat")
    with pytest.raises(MinilmError, match=r"2 word\(s\) not in the 3-token vocabulary: 'dog', 'ran'"):
        tok.encode("the dog ran")
    with pytest.raises(MinilmError, match=r"'z'"):
        Tokenizer.build("char", "abc").encode("abz")


@pytest.mark.parametrize("kind, vocab, message", [
    ("bpe", ("a",), "kind 'bpe' is unknown"), ("char", (), "empty"), ("char", ("a", "a"), "twice"),
    ("char", ("ab",), "single characters"),
])
def test_bad_vocabularies(kind, vocab, message):
    with pytest.raises(MinilmError, match=message):
        Tokenizer(kind, vocab)


def test_malformed_json():
    with pytest.raises(MinilmError, match="must hold"):
        Tokenizer.from_json(["a", "b"])
