"""Built-in toy corpora with known ground truth, and reading a user's own text file.

Each corpus is generated from module-level data (word groups, templates, a grammar) by a seeded
function of (seed, size), so an experiment can be rerun exactly and its analysis can ask questions
whose answers are known in advance:

  associations  concept words in shared, interchangeable templates: no concept is tied to another.
  bindings      the same vocabulary, but PAIRS of concepts always appear together: the fine-tuning
                corpus. Did the bound pairs move closer than the CONTROLS, which never co-occur?
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

CONCEPTS = ("justice", "truth", "law", "retribution", "morality", "court",
            "revenge", "mercy", "duty", "honor", "order", "freedom")
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

PAIRS = (("justice", "morality"), ("law", "court"), ("retribution", "revenge"))
CONTROLS = (("truth", "mercy"), ("duty", "freedom"), ("honor", "order"))
# {a} and {b} are the two words of one bound pair, in either order.
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
# Prompts for both corpora: bound words, then a control, in association and binding contexts.
FAMILY_PROBES = ("the people spoke of justice", "the people spoke of law", "the people spoke of truth",
                 "justice and", "without law there is no", "retribution is the sister of", "truth and")
FAMILY_GROUPS = {"concepts": CONCEPTS, "objects": OBJECTS, "agents": AGENTS}


def _template_words(templates) -> set[str]:
    return {w for t in templates for w in t.split() if not w.startswith("{")}


# The union over both corpora, so a model pretrained on one can be fine-tuned on the other.
FAMILY_VOCABULARY = tuple(sorted(
    set(CONCEPTS) | set(OBJECTS) | set(AGENTS) | {NEWLINE}
    | _template_words(CONCEPT_TEMPLATES + OBJECT_TEMPLATES + BINDING_TEMPLATES)))


def _pick(rng, options, size: int) -> list:
    """`size` uniform draws from `options`, drawn at once (one rng call, not one per line)."""
    return [options[i] for i in rng.integers(len(options), size=size)]


def _text(lines) -> str:
    return NEWLINE.join(lines) + NEWLINE


def associations(*, seed: int = 0, size: int = 4000) -> Corpus:
    """Half concept sentences, half object sentences, every slot filled uniformly at random."""
    rng = np.random.default_rng(seed)
    options = (CONCEPT_TEMPLATES, OBJECT_TEMPLATES, CONCEPTS, OBJECTS, AGENTS)
    draws = zip(rng.random(size) < 0.5, *(_pick(rng, xs, size) for xs in options))
    lines = [(ct if is_concept else ot).format(c=c, o=o, g=g) for is_concept, ct, ot, c, o, g in draws]
    return Corpus("associations", "abstract concepts in shared, interchangeable sentences (pretraining)",
                  _text(lines), "word", FAMILY_VOCABULARY, dict(FAMILY_GROUPS), PAIRS, CONTROLS, FAMILY_PROBES)


def bindings(*, seed: int = 0, size: int = 3000) -> Corpus:
    """Every sentence binds the two words of one pair; controls and other concepts never appear."""
    rng = np.random.default_rng(seed)
    swaps = rng.integers(2, size=size).tolist()  # both orders, so the binding is symmetric
    draws = zip(swaps, *(_pick(rng, xs, size) for xs in (BINDING_TEMPLATES, PAIRS, AGENTS)))
    lines = [t.format(a=pair[swap], b=pair[1 - swap], g=g) for swap, t, pair, g in draws]
    return Corpus("bindings", "chosen concept pairs always said together (fine-tuning)",
                  _text(lines), "word", FAMILY_VOCABULARY, dict(FAMILY_GROUPS), PAIRS, CONTROLS, FAMILY_PROBES)


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
    f.__name__: f for f in (associations, bindings, induction, grammar, arithmetic)}


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
