"""Tests for minilm.corpora: determinism, vocabularies, and each corpus's ground truth checked
independently of its generator (a grammar recognizer, integer arithmetic, a hand-built attention
pattern), plus the errors people get for bad names, sizes and files."""

import re

import numpy as np
import pytest

from minilm import corpora
from minilm.corpora import CORPORA, induction_attention, load_corpus, read_text
from minilm.errors import MinilmError
from minilm.tokenizer import NEWLINE, split_words

NAMES = sorted(CORPORA)
SIZE = 301  # small and odd, so "number of lines == size" cannot pass by a round default


def lines(corpus):
    return corpus.text.split(NEWLINE)[:-1]  # every text ends with a newline


@pytest.fixture(scope="module", params=NAMES)
def corpus(request):
    return load_corpus(request.param, seed=3, size=SIZE)


# --- every corpus ------------------------------------------------------------------------------------

def test_deterministic_per_seed(corpus):
    assert load_corpus(corpus.name, seed=3, size=SIZE).text == corpus.text
    assert load_corpus(corpus.name, seed=4, size=SIZE).text != corpus.text


def test_size_counts_lines(corpus):
    assert corpus.text.endswith(NEWLINE)
    assert len(lines(corpus)) == SIZE
    assert all(line.strip() for line in lines(corpus))


def test_every_token_in_sorted_vocabulary(corpus):
    tokenizer = corpus.make_tokenizer()
    assert list(corpus.vocabulary) == sorted(set(corpus.vocabulary))
    assert set(tokenizer.tokens(corpus.text)) <= set(corpus.vocabulary)
    for words in corpus.groups.values():
        assert set(words) <= set(corpus.vocabulary)
    for probe in corpus.probes:
        tokenizer.encode(probe)  # raises if a probe uses a word the model never saw


def test_round_trip(corpus):
    tokenizer = corpus.make_tokenizer()
    ids = tokenizer.encode(corpus.text)
    assert ids.shape == (len(tokenizer.tokens(corpus.text)),)
    assert tokenizer.decode(ids) == corpus.text  # exact: single spaces, one sentence per line


def test_default_sizes_give_a_useful_corpus():
    for name in NAMES:
        c = load_corpus(name)
        assert 20_000 <= len(c.make_tokenizer().tokens(c.text)) <= 60_000, name


# --- associations and bindings ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def family():
    return (load_corpus("associations", seed=1, size=2000), load_corpus("bindings", seed=1, size=2000),
            load_corpus("unbound", seed=1, size=2000))


def concepts_in(line):
    return [w for w in line.split() if w in corpora.CONCEPTS]


def test_family_shares_vocabulary_and_ground_truth(family):
    assoc, bind, unbound = family
    assert assoc.vocabulary == bind.vocabulary == unbound.vocabulary
    assert assoc.groups == bind.groups == unbound.groups
    assert assoc.pairs == bind.pairs == unbound.pairs and assoc.controls == bind.controls == unbound.controls
    assert set(assoc.groups) == {"concepts", "objects", "agents"}
    # The groups are disjoint and no template word belongs to one, so a group is exactly its label.
    grouped = [w for g in assoc.groups.values() for w in g]
    assert len(grouped) == len(set(grouped))
    templates = (corpora.CONCEPT_TEMPLATES + corpora.OBJECT_TEMPLATES + corpora.BINDING_TEMPLATES
                 + PRIVATE_TEMPLATES)
    assert not corpora._template_words(templates) & set(grouped)
    # Pairs and controls are distinct concepts, none shared between them.
    paired = [w for p in assoc.pairs + assoc.controls for w in p]
    assert len(paired) == len(set(paired)) and set(paired) <= set(corpora.CONCEPTS)
    # Two kinds, each with as many bound pairs as controls; every pair and control has exactly one kind.
    assert set(corpora.BOUND) == set(corpora.CONTROL) == {"co-occur", "substitute"}
    assert sorted(assoc.pairs) == sorted(p for k in corpora.BOUND.values() for p in k)
    assert sorted(assoc.controls) == sorted(p for k in corpora.CONTROL.values() for p in k)
    assert all(len(corpora.BOUND[k]) == len(corpora.CONTROL[k]) for k in corpora.BOUND)


def parse(line, templates, slots):
    """(template, {slot: word}) for the one template that produced `line`, each slot from its group."""
    found = []
    for t in templates:
        words, pattern = line.split(), t.split()
        if len(words) == len(pattern):
            filled = {p[1]: w for p, w in zip(pattern, words) if p.startswith("{")}
            if all(p == w or (p.startswith("{") and w in slots[p[1]]) for p, w in zip(pattern, words)):
                found.append((t, filled))
    assert len(found) == 1, (line, found)
    return found[0]


SLOTS = {"c": corpora.CONCEPTS, "o": corpora.OBJECTS, "g": corpora.AGENTS,
         "a": corpora.CONCEPTS, "b": corpora.CONCEPTS + corpora.OBJECTS}
PRIVATE_TEMPLATES = tuple(t for block in corpora.PRIVATE_TEMPLATES for t in block)


def test_associations_keep_concepts_apart(family):
    assoc = family[0]
    words = set(split_words(assoc.text))
    assert set(corpora.CONCEPTS + corpora.OBJECTS + corpora.AGENTS) <= words
    assert all(len(concepts_in(line)) <= 1 for line in lines(assoc))
    # Every line comes from one template; at the default size every concept has been seen in every
    # concept template, so no concept's contexts differ from another's.
    templates = corpora.CONCEPT_TEMPLATES + corpora.OBJECT_TEMPLATES
    for line in lines(assoc):
        parse(line, templates, SLOTS)
    seen = {}
    for line in lines(load_corpus("associations")):
        t, filled = parse(line, templates, SLOTS)
        if "c" in filled:
            seen.setdefault(filled["c"], set()).add(t)
    assert seen == {c: set(corpora.CONCEPT_TEMPLATES) for c in corpora.CONCEPTS}


def read_bindings(corpus):
    """{word: set of sentences it filled}, the set of co-occurring concept pairs, and concept counts."""
    contexts, together, counts = {}, set(), {}
    for line in lines(corpus):
        t, filled = parse(line, corpora.BINDING_TEMPLATES + PRIVATE_TEMPLATES, SLOTS)
        found = concepts_in(line)
        for w in found:
            contexts.setdefault(w, set()).add(t)
            counts[w] = counts.get(w, 0) + 1
        if len(found) == 2:
            together.add(frozenset(found))
    return contexts, together, counts


def block_of(word, seed=1):  # the family fixture's seed
    return set(corpora.private_blocks(np.random.default_rng(seed))[word])


def test_bindings_bind_each_pair_its_own_way(family):
    _, bind, _ = family
    contexts, together, counts = read_bindings(bind)
    co, sub = corpora.BOUND["co-occur"], corpora.BOUND["substitute"]
    # co-occur pairs, and nothing else, are said together; substitute pairs never
    assert together == {frozenset(p) for p in co}
    # a substitute pair shares exactly its two blocks, which no other word enters
    for a, b in sub:
        assert contexts[a] == contexts[b] == block_of(a) | block_of(b)
    for a, b in corpora.CONTROL["substitute"]:
        assert contexts[a] == block_of(a) and contexts[b] == block_of(b) and not block_of(a) & block_of(b)
    # co-occur controls are said with objects only, in the same sentences as the pairs
    for w in (w for p in corpora.CONTROL["co-occur"] for w in p):
        assert contexts[w] <= set(corpora.BINDING_TEMPLATES)
    # within a kind, bound words and controls are equally frequent: counts within 4 binomial sd of the kind's mean
    for kind in corpora.BOUND:
        words = [w for p in corpora.BOUND[kind] + corpora.CONTROL[kind] for w in p]
        mean = np.mean([counts[w] for w in words])
        assert all(abs(counts[w] - mean) < 4 * np.sqrt(mean) for w in words), {w: counts[w] for w in words}


def test_unbound_binds_nothing_with_the_same_words_and_sentences(family):
    _, bind, unbound = family
    contexts, together, counts = read_bindings(unbound)
    assert together == set()  # no two concepts in one sentence
    for w in corpora.SUBSTITUTE_WORDS:
        assert contexts[w] == block_of(w)  # every substitute-kind word keeps its own block
    assert set(counts) == set(read_bindings(bind)[2]) == {w for p in bind.pairs + bind.controls for w in p}
    for kind in corpora.BOUND:  # frequencies equal within a kind, bound or not
        kind_words = [w for p in corpora.BOUND[kind] + corpora.CONTROL[kind] for w in p]
        mean = np.mean([counts[w] for w in kind_words])
        assert all(abs(counts[w] - mean) < 4 * np.sqrt(mean) for w in kind_words)
    assert len(counts) == len(corpora.CONCEPTS)


def test_private_blocks_are_drawn_per_seed_and_shaped_alike():
    draws = [corpora.private_blocks(np.random.default_rng(seed)) for seed in range(6)]
    assert all(sorted(d.values()) == sorted(corpora.PRIVATE_TEMPLATES) for d in draws)  # a permutation each time
    assert len({tuple(d.values()) for d in draws}) > 1
    for block in corpora.PRIVATE_TEMPLATES:  # "the NOUN of {c}" in both sentences, one noun per block
        nouns = {re.search(r"the (\w+) of \{c\}", t).group(1) for t in block}
        assert len(nouns) == 1
    nouns = [re.search(r"the (\w+) of \{c\}", block[0]).group(1) for block in corpora.PRIVATE_TEMPLATES]
    assert len(set(nouns)) == len(nouns)


# --- induction -------------------------------------------------------------------------------------

def test_induction_lines_repeat_their_first_half():
    c = load_corpus("induction", seed=2, size=500)
    low, high = corpora.SPAN_LENGTHS
    for line in lines(c):
        words = line.split()
        n = len(words) // 2
        assert len(words) == 2 * n and low <= n <= high
        assert words[:n] == words[n:] and len(set(words[:n])) == n


def test_induction_attention_by_hand():
    expected = np.zeros((6, 6), np.float32)
    expected[3, 1] = expected[4, 2] = expected[5, 3] = 1.0  # "5 7 9 | 5 7 9": look at what came next
    got = induction_attention(np.array([5, 7, 9, 5, 7, 9]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # "4 4 4 6 4": an immediate repeat attends to itself (j + 1 == i), a token seen twice attends
    # after its most recent occurrence, and the new token 6 attends nowhere.
    expected = np.zeros((5, 5), np.float32)
    expected[1, 1] = expected[2, 2] = expected[4, 3] = 1.0
    np.testing.assert_array_equal(induction_attention(np.array([4, 4, 4, 6, 4])), expected)


def test_induction_attention_rows_on_corpus():
    c = load_corpus("induction", seed=0, size=5)
    ids = c.make_tokenizer().encode(lines(c)[0])
    attention = induction_attention(ids)
    assert set(attention.sum(axis=1).tolist()) <= {0.0, 1.0}
    assert np.all(np.triu(attention, k=1) == 0)  # causal
    n = len(ids) // 2
    # The second half attends exactly one step past the matching first-half position.
    np.testing.assert_array_equal(attention[n:], np.eye(len(ids), k=1 - n, dtype=np.float32)[n:])
    assert np.all(attention[:n] == 0)


def test_induction_attention_rejects_2d():
    with pytest.raises(MinilmError, match=r"\(2, 3\)"):
        induction_attention(np.zeros((2, 3), int))


# --- grammar -------------------------------------------------------------------------------------

def ends(symbol, words, i):
    """Every j such that `symbol` derives words[i:j]: a tiny top-down recognizer."""
    if symbol in corpora.WORD_CLASSES:
        return {i + 1} if i < len(words) and words[i] in corpora.WORD_CLASSES[symbol] else set()
    result = set()
    for _, rhs in corpora.RULES[symbol]:
        positions = {i}
        for s in rhs:
            positions = {j for p in positions for j in ends(s, words, p)}
        result |= positions
    return result


def test_grammar_probabilities_sum_to_one():
    for symbol, rules in corpora.RULES.items():
        assert sum(p for p, _ in rules) == pytest.approx(1.0), symbol


def test_grammar_sentences_are_derivable():
    c = load_corpus("grammar", seed=5, size=500)
    assert c.groups == corpora.WORD_CLASSES
    number = {w: cls[-2:] for cls, ws in corpora.WORD_CLASSES.items() for w in ws}  # "sg" or "pl"
    verbs = {w for cls, ws in corpora.WORD_CLASSES.items() if cls.startswith("V") for w in ws}
    for line in lines(c):
        words = line.split()
        assert words[-1] == "."
        assert len(words) - 1 in ends("S", words[:-1], 0), line
        # Agreement, checked directly: the subject's determiner and the main (first) verb share a number.
        verb = next(w for w in words if w in verbs)
        assert number[words[0]] == number[verb], line
    assert set(split_words(c.text)) == set(c.vocabulary)  # every word of every class is used


def test_grammar_recognizer_rejects_disagreement():
    assert 3 in ends("S", "a dog sleeps".split(), 0)
    assert 3 not in ends("S", "a dog sleep".split(), 0)
    assert 3 not in ends("S", "some dogs sleeps".split(), 0)


# --- arithmetic ----------------------------------------------------------------------------------

def test_arithmetic_is_correct():
    c = load_corpus("arithmetic", seed=7, size=1000)
    low, high = corpora.OPERANDS
    seen = set()
    for line in lines(c):
        question, answer = line.split("=")
        op = "+" if "+" in question else "-"
        a, b = (int(x) for x in question.split(op))
        assert low <= a <= high and low <= b <= high
        assert int(answer) == (a + b if op == "+" else a - b) >= 0, line
        assert str(int(answer)) == answer  # no leading zeros or signs
        seen.add(op)
    assert seen == set(corpora.OPERATORS)


# --- bad input -----------------------------------------------------------------------------------

def test_unknown_corpus_lists_names():
    with pytest.raises(MinilmError) as e:
        load_corpus("shakespeare")
    assert "shakespeare" in str(e.value) and all(n in str(e.value) for n in NAMES)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "10"])
def test_bad_size(size):
    with pytest.raises(MinilmError, match=re.escape(repr(size))):
        load_corpus("grammar", size=size)


def test_bad_seed():
    with pytest.raises(MinilmError, match="-1"):
        load_corpus("grammar", seed=-1)


def test_read_text(tmp_path):
    path = tmp_path / "story.txt"
    path.write_bytes("once upon a time\r\nthe end — fin\n".encode())
    assert read_text(path) == "once upon a time\nthe end — fin\n"


@pytest.mark.parametrize("problem, content, says", [
    ("missing", None, "does not exist"), ("directory", None, "directory"), ("empty", b"", "empty"),
    ("blank", b" \n\t\n", "empty"), ("latin-1", "café".encode("latin-1"), "not UTF-8"),
])
def test_read_text_bad_files(tmp_path, problem, content, says):
    path = tmp_path / f"{problem}.txt"
    if problem == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(MinilmError) as e:
        read_text(path)
    assert str(path) in str(e.value) and says in str(e.value)
