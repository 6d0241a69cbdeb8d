"""Built-in toy corpora with known ground truth, and reading a user's own text file.

Each corpus is generated from module-level data (word groups, templates, a grammar) by a seeded
function of (seed, size), so an experiment can be rerun exactly and its analysis can ask questions
whose answers are known in advance:

  associations  concept words in shared, interchangeable templates: no concept is tied to another.
  bindings      the same vocabulary, the fine-tuning corpus, binding PAIRS of concepts in the two ways
                the distributional literature tells apart (Schütze & Pedersen 1993; Sahlgren 2006, "The
                Word-Space Model"): "co-occur" pairs are said together in one sentence (syntagmatic),
                "substitute" pairs never meet but share sentences no other word appears in
                (paradigmatic). Every pair has CONTROLS of its kind: words just as frequent, in sentences
                of the same shapes, bound to nothing. Did the bound pairs move closer than the controls?
  unbound       the negative control: bindings' words, frequencies and sentence shapes, binding nothing
                (every pair word treated as a control), so pairs must not move more than controls.
  induction     a random span repeated once; the ideal attention is `induction_attention`
                (the induction head of Olsson et al. 2022, "In-context learning and induction heads").
  grammar       sentences from a small probabilistic context-free grammar with number agreement.
  arithmetic    "37+45=82", character level; the ground truth is the answer itself.

`size` counts lines (one sentence, span pair or problem each); every text ends with a newline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from minilm.errors import MinilmError
from minilm.tokenizer import NEWLINE, Tokenizer


@dataclass(frozen=True)
class Corpus:
    """A training text, the vocabulary to tokenize it with, and the ground truth for analysis."""

    name: str
    description: str
    text: str
    tokenizer: str  # "word" or "char"
    vocabulary: tuple[str, ...]  # sorted; shared by corpora of one family
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # labelled word groups
    pairs: tuple[tuple[str, str], ...] = ()  # concept pairs bound by the corpus
    controls: tuple[tuple[str, str], ...] = ()  # pairs of the same kind that are never bound
    probes: tuple[str, ...] = ()  # prompts for analysis and sampling

    def make_tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer, self.vocabulary)


# --- associations and bindings: one family, one vocabulary -----------------------------------------

CONCEPTS = ("justice", "truth", "law", "retribution", "morality", "court", "revenge", "mercy",
            "duty", "honor", "order", "freedom", "faith", "peace", "wisdom", "glory")
OBJECTS = ("bread", "river", "stone", "lamp", "garden", "window",
           "cup", "door", "road", "candle", "basket", "blanket")
AGENTS = ("judge", "king", "farmer", "child", "soldier", "teacher", "merchant", "priest", "widow", "sailor")

# Every concept fills the same slot {c} of the same templates, so in `associations` no concept is
# closer to another than to the rest; {g} is an agent. Template words never belong to a group.
CONCEPT_TEMPLATES = (
    "the {g} spoke of {c} .",
    "the {g} argued about {c} all night .",
    "{c} was on every mind .",
    "the people spoke of {c} .",
    "nobody in the town could forget {c} .",
    "the {g} wrote a long letter about {c} .",
    "in those days {c} mattered more than anything .",
    "the {g} asked what {c} really means .",
    "old songs were sung about {c} .",
    "the {g} prayed for {c} .",
    "{c} is hard to find .",
    "every {g} hoped for {c} .",
)
OBJECT_TEMPLATES = (
    "the {g} put the {o} on the table .",
    "she carried the {o} home .",
    "the {g} found a {o} near the house .",
    "the {o} was old and heavy .",
    "he looked at the {o} for a while .",
    "the {g} sold the {o} at the market .",
    "there was a {o} by the wall .",
    "the {g} cleaned the {o} before dinner .",
    "the {o} stood in the morning light .",
    "the {g} gave the {o} to a friend .",
)

# The ground truth of `bindings`: which pairs are bound, how, and the controls of each kind. Which words
# play which part is arbitrary: in `associations` all sixteen concepts are interchangeable.
BOUND = {"co-occur": (("justice", "morality"), ("law", "court")),
         "substitute": (("retribution", "revenge"), ("faith", "peace"))}
CONTROL = {"co-occur": (("truth", "mercy"), ("duty", "freedom")),
           "substitute": (("honor", "order"), ("wisdom", "glory"))}
PAIRS = tuple(p for kind in BOUND.values() for p in kind)
CONTROLS = tuple(p for kind in CONTROL.values() for p in kind)

# Co-occurrence: {a} and {b} are the two words of one bound pair, in either order; a control word fills
# {a} with a different object as {b} each time, so it is said with something, but never the same thing.
BINDING_TEMPLATES = (
    "{a} and {b} go together .",
    "without {a} there is no {b} .",
    "{a} is the sister of {b} .",
    "where there is {a} there is {b} .",
    "the {g} spoke of {a} and {b} .",
    "the {g} knew that {a} needs {b} .",
    "{a} always walks with {b} .",
    "nobody speaks of {a} without {b} .",
    "the people saw {a} and {b} as one .",
    "in those days {a} led to {b} .",
)
# Substitution: each substitute-kind word owns one block of sentences no other word appears in; a bound
# pair shares its two blocks (either word in any of the four sentences, never both in one), a control
# keeps its own. Every block has one shape, "the NOUN of {c}", so that blocks differ only in their noun and
# what follows; which word owns which block is drawn per seed (`private_blocks`), so that no pair or
# control is favoured by its blocks' words over the seeds.
PRIVATE_TEMPLATES = (
    ("the {g} swore by the oath of {c} .", "the oath of {c} was kept ."),
    ("the {g} rang the bell of {c} .", "the bell of {c} rang twice ."),
    ("the {g} sang the hymn of {c} .", "the hymn of {c} filled the hall ."),
    ("the {g} opened the gate of {c} .", "the gate of {c} stood open ."),
    ("the {g} raised the banner of {c} .", "the banner of {c} flew high ."),
    ("the {g} read the book of {c} .", "the book of {c} lay open ."),
    ("the {g} built the shrine of {c} .", "the shrine of {c} stood by the path ."),
    ("the {g} held the feast of {c} .", "the feast of {c} was a joy ."),
)
SUBSTITUTE_WORDS = tuple(w for p in BOUND["substitute"] + CONTROL["substitute"] for w in p)


def private_blocks(rng) -> dict[str, tuple[str, str]]:
    """Each substitute-kind word's own block of sentences, drawn from `rng` (the corpus's first draw)."""
    return dict(zip(SUBSTITUTE_WORDS, (PRIVATE_TEMPLATES[i] for i in rng.permutation(len(PRIVATE_TEMPLATES)))))


# Prompts for both corpora: bound words, then a control, in association and binding contexts.
FAMILY_PROBES = ("the people spoke of justice", "the people spoke of law", "the people spoke of truth",
                 "justice and", "without law there is no", "the bell of", "truth and")
FAMILY_GROUPS = {"concepts": CONCEPTS, "objects": OBJECTS, "agents": AGENTS}


def _template_words(templates) -> set[str]:
    return {w for t in templates for w in t.split() if not w.startswith("{")}


# The union over the three corpora, so a model pretrained on one can be fine-tuned on another.
FAMILY_VOCABULARY = tuple(sorted(
    set(CONCEPTS) | set(OBJECTS) | set(AGENTS) | {NEWLINE}
    | _template_words(CONCEPT_TEMPLATES + OBJECT_TEMPLATES + BINDING_TEMPLATES + sum(PRIVATE_TEMPLATES, ()))))


def _pick(rng, options, size: int) -> list:
    """`size` uniform draws from `options`, drawn at once (one rng call, not one per line)."""
    return [options[i] for i in rng.integers(len(options), size=size)]


def _text(lines) -> str:
    return NEWLINE.join(lines) + NEWLINE


def _family(name: str, description: str, lines) -> Corpus:
    return Corpus(name, description, _text(lines), "word", FAMILY_VOCABULARY, dict(FAMILY_GROUPS), PAIRS, CONTROLS,
                  FAMILY_PROBES)


def associations(*, seed: int = 0, size: int = 4000) -> Corpus:
    """Half concept sentences, half object sentences, every slot filled uniformly at random."""
    rng = np.random.default_rng(seed)
    options = (CONCEPT_TEMPLATES, OBJECT_TEMPLATES, CONCEPTS, OBJECTS, AGENTS)
    draws = zip(rng.random(size) < 0.5, *(_pick(rng, xs, size) for xs in options))
    lines = [(ct if is_concept else ot).format(c=c, o=o, g=g) for is_concept, ct, ot, c, o, g in draws]
    return _family("associations", "abstract concepts in shared, interchangeable sentences (pretraining)", lines)


def _binding_lines(rng, size: int, bound: dict) -> list[str]:
    """Half co-occurrence sentences, half private-context sentences, with `bound` ({kind: pairs}) bound.

    A co-occurrence sentence draws one unit uniformly: a bound pair (both words said) or an unbound word
    (said with a random object). A private-context sentence draws one word uniformly and fills it into a
    sentence of its blocks: its pair's four if bound, else its own two. Either way every word of a kind is
    equally frequent, bound or not, so a control differs from a pair word only in being bound to nothing.
    """
    private = private_blocks(rng)
    paired = {w: p for pairs in bound.values() for p in pairs for w in p}
    co_units = [*bound.get("co-occur", ()),
                *((w,) for p in BOUND["co-occur"] + CONTROL["co-occur"] for w in p if w not in paired)]
    blocks = {w: private[paired[w][0]] + private[paired[w][1]] if w in paired else private[w]
              for w in SUBSTITUTE_WORDS}
    is_co, order = rng.random(size) < 0.5, rng.integers(2, size=size)
    unit, word, co_t, private_t, obj, agent = (rng.integers(n, size=size) for n in (
        len(co_units), len(SUBSTITUTE_WORDS), len(BINDING_TEMPLATES), 4, len(OBJECTS), len(AGENTS)))
    lines = []
    for i in range(size):
        g = AGENTS[agent[i]]
        if is_co[i]:
            u = co_units[unit[i]]
            a, b = (u[order[i]], u[1 - order[i]]) if len(u) == 2 else (u[0], OBJECTS[obj[i]])
            lines.append(BINDING_TEMPLATES[co_t[i]].format(a=a, b=b, g=g))
        else:
            w = SUBSTITUTE_WORDS[word[i]]
            lines.append(blocks[w][private_t[i] % len(blocks[w])].format(c=w, g=g))
    return lines


def bindings(*, seed: int = 0, size: int = 3000) -> Corpus:
    """Co-occur pairs said together, substitute pairs sharing private sentences, controls bound to nothing."""
    lines = _binding_lines(np.random.default_rng(seed), size, BOUND)
    return _family("bindings", "concept pairs bound by co-occurrence or by shared contexts (fine-tuning)", lines)


def unbound(*, seed: int = 0, size: int = 3000) -> Corpus:
    """bindings' words, frequencies and sentence shapes with every pair word treated as a control."""
    lines = _binding_lines(np.random.default_rng(seed), size, {})
    return _family("unbound", "bindings' sentences binding nothing (the negative control)", lines)


# --- induction: [span] [span] ----------------------------------------------------------------------

SYMBOLS = tuple(c + v for c in "bdfgklmn" for v in "aeiou")  # 40 readable syllables: ba, be, ... nu
SPAN_LENGTHS = (4, 12)  # inclusive range of the span length n; a line has 2n symbols


def induction(*, seed: int = 0, size: int = 2000) -> Corpus:
    """A span of distinct symbols then the same span: the second half is predictable only by copying."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SPAN_LENGTHS[0], SPAN_LENGTHS[1] + 1, size=size)
    # Distinct symbols within a span make the copy target unambiguous at every position.
    spans = [" ".join(SYMBOLS[j] for j in rng.permutation(len(SYMBOLS))[:n]) for n in lengths]
    return Corpus("induction", "a random span of symbols repeated once (induction heads)",
                  _text(f"{s} {s}" for s in spans), "word", tuple(sorted(SYMBOLS + (NEWLINE,))),
                  {"symbols": SYMBOLS}, probes=("ba ke mi no ba ke", "lu fa go di me lu fa go"))


def induction_attention(tokens: np.ndarray) -> np.ndarray:
    """The ideal induction-head attention pattern of a token sequence.

    Args: tokens (T,) ids.
    Returns: (T, T) float32; row i is one-hot at column j + 1, where j < i is the most recent earlier
    position with tokens[j] == tokens[i] (the token that followed last time predicts the next one);
    rows of tokens not seen before are all zero.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise MinilmError(f"induction_attention needs a 1-D sequence of token ids, got shape {tokens.shape}")
    attention = np.zeros((len(tokens), len(tokens)), np.float32)  # (T, S)
    last_seen = {}
    for i, token in enumerate(tokens.tolist()):
        if token in last_seen:
            attention[i, last_seen[token] + 1] = 1.0
        last_seen[token] = i
    return attention


def induction_halves(tokens: np.ndarray, newline: int) -> np.ndarray:
    """Which half of an `induction` line each token is in, read from the tokens alone.

    Args: tokens (T,) ids, e.g. a training window that starts and ends anywhere in a line; newline, the
    id of the line separator.
    Returns: (T,) int8: 1 in a line's first span, 2 in its repeat (a token already seen in the same line:
    spans hold distinct symbols, so only the repeat has one), 0 for separators and for the line the
    window cuts at its start (its first span may lie before the window, so its halves are unknown).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise MinilmError(f"induction_halves needs a 1-D sequence of token ids, got shape {tokens.shape}")
    halves = np.zeros(len(tokens), np.int8)
    seen = None  # the tokens of the current whole line; None until the first separator
    for i, token in enumerate(tokens.tolist()):
        if token == newline:
            seen = set()
        elif seen is not None:
            halves[i] = 2 if token in seen else 1
            seen.add(token)
    return halves


def induction_in(vocabulary: tuple[str, ...], *, seed: int = 0, size: int = 2000,
                 words: tuple[str, ...] | None = None) -> Corpus:
    """`induction`'s lines (a span of distinct words, then the same span) over another corpus's words.

    A model pretrained on that corpus reads these lines with its own tokenizer: a fine-tuning corpus
    that asks for copying and nothing new. The spans are drawn from `words` (default: every word of
    `vocabulary` but the separator).
    """
    words = tuple(w for w in (words or vocabulary) if w != NEWLINE)
    if not set(words) <= set(vocabulary):
        raise MinilmError(f"induction_in: words {sorted(set(words) - set(vocabulary))[:5]} are not in the vocabulary")
    if len(words) < SPAN_LENGTHS[1]:
        raise MinilmError(f"induction_in needs at least {SPAN_LENGTHS[1]} words besides the separator for spans "
                          f"of distinct words; got {len(words)}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SPAN_LENGTHS[0], SPAN_LENGTHS[1] + 1, size=size)
    spans = [" ".join(words[j] for j in rng.permutation(len(words))[:n]) for n in lengths]
    return Corpus("induction", "a random span of words repeated once (induction heads)",
                  _text(f"{s} {s}" for s in spans), "word", tuple(sorted(set(vocabulary) | {NEWLINE})),
                  {"symbols": words})


# --- grammar: a probabilistic context-free grammar -------------------------------------------------

# Phrase rules: symbol -> ((probability, right-hand side), ...). Subject and verb agree in number.
RULES = {
    "S": ((0.5, ("NP_sg", "VP_sg")), (0.5, ("NP_pl", "VP_pl"))),
    "NP": ((0.5, ("NP_sg",)), (0.5, ("NP_pl",))),
    "NP_sg": ((0.6, ("Det_sg", "N_sg")), (0.3, ("Det_sg", "Adj", "N_sg")), (0.1, ("Det_sg", "N_sg", "PP"))),
    "NP_pl": ((0.6, ("Det_pl", "N_pl")), (0.3, ("Det_pl", "Adj", "N_pl")), (0.1, ("Det_pl", "N_pl", "PP"))),
    "VP_sg": ((0.6, ("Vt_sg", "NP")), (0.3, ("Vi_sg",)), (0.1, ("Vi_sg", "PP"))),
    "VP_pl": ((0.6, ("Vt_pl", "NP")), (0.3, ("Vi_pl",)), (0.1, ("Vi_pl", "PP"))),
    "PP": ((1.0, ("P", "NP")),),
}
# Word classes (the groups for cluster analysis): each word of a class is equally likely.
WORD_CLASSES = {
    "Det_sg": ("a", "this", "every"),
    "Det_pl": ("some", "these", "many"),
    "Adj": ("small", "big", "quick", "lazy", "brown", "grey"),
    "N_sg": ("dog", "cat", "bird", "fox", "horse", "mouse"),
    "N_pl": ("dogs", "cats", "birds", "foxes", "horses", "mice"),
    "Vt_sg": ("sees", "chases", "likes", "follows"),
    "Vt_pl": ("see", "chase", "like", "follow"),
    "Vi_sg": ("sleeps", "runs", "sings"),
    "Vi_pl": ("sleep", "run", "sing"),
    "P": ("near", "behind", "with"),
}


def _expand(symbol: str, rng, out: list[str]) -> None:
    if symbol in WORD_CLASSES:
        words = WORD_CLASSES[symbol]
        out.append(words[int(rng.random() * len(words))])
        return
    r = rng.random()
    for p, rhs in RULES[symbol]:
        r -= p
        if r < 0:
            break  # if round-off leaves r >= 0 after the last rule, the last rule is taken
    for s in rhs:
        _expand(s, rng, out)


def grammar(*, seed: int = 0, size: int = 4000) -> Corpus:
    """Sentences sampled top-down from RULES, each ending with " ."."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(size):
        words = []
        _expand("S", rng, words)
        lines.append(" ".join(words) + " .")
    vocabulary = tuple(sorted({w for ws in WORD_CLASSES.values() for w in ws} | {".", NEWLINE}))
    return Corpus("grammar", "sentences from a small probabilistic grammar with number agreement",
                  _text(lines), "word", vocabulary, dict(WORD_CLASSES),
                  probes=("a dog", "some cats", "every quick fox near these"))


# --- arithmetic: character level -------------------------------------------------------------------

OPERANDS = (0, 99)  # inclusive range of both operands
OPERATORS = ("+", "-")  # "-" puts the larger operand first, so every answer is a natural number


def arithmetic(*, seed: int = 0, size: int = 4000) -> Corpus:
    """Lines "a+b=c" and "a-b=c"; the model must compute c one character at a time."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(OPERANDS[0], OPERANDS[1] + 1, size=(2, size)).tolist()
    ops = _pick(rng, OPERATORS, size)
    lines = []
    for x, y, op in zip(a, b, ops):
        if op == "-":
            x, y = max(x, y), min(x, y)
        lines.append(f"{x}{op}{y}={x + y if op == '+' else x - y}")
    digits = tuple("0123456789")
    return Corpus("arithmetic", "two-digit addition and subtraction, one character per token",
                  _text(lines), "char", tuple(sorted(digits + OPERATORS + ("=", NEWLINE))),
                  {"digits": digits, "operators": OPERATORS}, probes=("12+34=", "58-23=", "99+99="))


# --- lookup and user text --------------------------------------------------------------------------

# name -> generator(*, seed, size) -> Corpus; load_corpus is the checked way in.
CORPORA: dict[str, Callable[..., Corpus]] = {
    f.__name__: f for f in (associations, bindings, unbound, induction, grammar, arithmetic)}


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def load_corpus(name: str, *, seed: int = 0, size: int | None = None) -> Corpus:
    """The built-in corpus `name`, checked; `size` None means the generator's default."""
    if name not in CORPORA:
        raise MinilmError(f"unknown corpus {name!r}; the built-in corpora are {', '.join(CORPORA)} "
                          f"(or pass a text file of your own)")
    if not _is_count(seed, 0):
        raise MinilmError(f"corpus seed {seed!r} must be a non-negative integer, e.g. 0")
    if size is not None and not _is_count(size, 1):
        raise MinilmError(f"corpus size {size!r} must be a positive integer: the number of lines to "
                          f"generate, e.g. 1000")
    return CORPORA[name](seed=int(seed)) if size is None else CORPORA[name](seed=int(seed), size=int(size))


def read_text(path) -> str:
    """A user's UTF-8 text file, with Windows line endings made "\\n" so they are not tokens."""
    path = Path(path)
    if not path.exists():
        raise MinilmError(f"text file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise MinilmError(f"{str(path)!r} is a directory; pass a text file instead")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinilmError(f"text file {str(path)!r} is not UTF-8 (bad byte at offset {e.start}); "
                          f"save it as UTF-8") from None
    except OSError as e:
        raise MinilmError(f"cannot read text file {str(path)!r}: {e.strerror}") from None
    if not text.strip():
        raise MinilmError(f"text file {str(path)!r} is empty; it needs some text to train on")
    return text.replace("\r\n", "\n")
