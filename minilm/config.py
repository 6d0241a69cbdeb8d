"""Configuration: what the model is (ModelConfig), how it trains (TrainConfig), on what (DataConfig),
and how it samples (SampleConfig).

Each is a frozen, keyword-only dataclass, validated when it is created, so a bad value fails at once
with a message that says how to fix it, not deep inside JAX. Changes go through
`dataclasses.replace`. Each field's `help` is the single source of the CLI's flags and help text
(minilm/cli/flags.py): a new field is a new flag; a field whose values form a fixed set names them
in its `choices`.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields

from minilm.errors import MinilmError

LARGEST_INT = 2**31 - 1  # steps, sizes and seeds live in int32 arrays (positions, counters, PRNG seeds)
MAX_CORPUS_SIZE = 1_000_000  # lines of a built-in corpus, generated in memory


def option(default, help: str, **metadata):
    """A dataclass field with the help text the CLI shows for its flag."""
    return field(default=default, metadata={"help": help, **metadata})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_types(cfg, how=None) -> None:
    """Every field holds a value of its declared type: an int is not a bool or 64.0, a float is a finite
    number (nan and inf are refused everywhere), a str is a str. The first field that does not, raises.

    how(field) -> how to pass a better value, appended to the message (default: the field's flag)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            kinds = typing.get_args(hint)  # X | None
        elif typing.get_origin(hint) is None:
            kinds = (hint,)
        else:
            continue  # a tuple or mapping: its config checks the items
        if value is None and type(None) in kinds:
            continue
        where = f"{f.name} = {value!r}"
        example = "" if f.default is None else f", e.g. {f.default!r}"
        if how is not None:
            how_text = how(f.name)
        else:
            how_text = f"; pass it with {_flag(f.name)}" if f.metadata.get("cli", True) else ""
        if bool in kinds:
            if not isinstance(value, bool):
                raise MinilmError(f"{where} must be true or false{how_text}")
        elif int in kinds:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MinilmError(f"{where} must be a whole number{example}{how_text}")
            if abs(value) > LARGEST_INT:
                raise MinilmError(f"{where} is too large: expected at most {LARGEST_INT:,}{how_text}")
        elif float in kinds:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MinilmError(f"{where} must be a number{example}{how_text}")
            if not math.isfinite(value):
                raise MinilmError(f"{where} must be a finite number{example}{how_text}")
        elif str in kinds and not isinstance(value, str):
            raise MinilmError(f"{where} must be a string{example}{how_text}")


def _check_at_least_zero(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if value < 0:
            raise MinilmError(f"{name} = {value} must be >= 0; pass a value >= 0 with {_flag(name)}")


def _check_positive(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise MinilmError(f"{name} = {value} must be positive; pass a value > 0 with {_flag(name)}")


GELUS = ("tanh", "erf")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A GPT-2 style decoder: sizes only. The vocabulary size comes from the tokenizer."""

    vocab_size: int = option(0, "number of tokens; set from the tokenizer", cli=False)
    context: int = option(64, "context length T: the most tokens the model sees at once")
    width: int = option(64, "model width D: the size of every token vector in the residual stream")
    layers: int = option(2, "number of transformer blocks L")
    heads: int = option(4, "attention heads H per block; width must be divisible by heads")
    mlp_ratio: int = option(4, "MLP hidden width F as a multiple of the model width")
    mlp_units: int | None = option(None, "MLP hidden width F in units, overriding --mlp-ratio (imported GPT-2s "
                                         "may have any F)")
    mlp: bool = option(True, "give every block an MLP; without, the model is attention-only (Elhage et al. 2021)")
    gelu: str = option("tanh", "the MLP's GELU: tanh (GPT-2's approximation, transformers' gelu_new) or erf "
                               "(the exact form, transformers' gelu)", metavar="FORM", choices=GELUS)
    ln_eps: float = option(1e-5, "epsilon added to the variance in every LayerNorm (GPT-2: 1e-5)")

    def __post_init__(self):
        check_types(self)
        _check_positive(self, "context", "width", "layers", "heads", "mlp_ratio", "ln_eps")
        if self.mlp_units is not None:
            _check_positive(self, "mlp_units")
        if self.gelu not in GELUS:
            raise MinilmError(f"gelu = {self.gelu!r}; expected one of {', '.join(GELUS)}")
        if self.vocab_size < 0:
            raise MinilmError(f"vocab_size = {self.vocab_size} must be positive")
        if self.width % self.heads:
            raise MinilmError(
                f"width = {self.width} is not divisible by heads = {self.heads}; choose a width that is "
                f"a multiple of the head count, e.g. --width {self.heads * max(1, round(self.width / self.heads))}"
            )

    @property
    def head_size(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_ratio * self.width if self.mlp_units is None else self.mlp_units


DTYPES = ("float32", "bfloat16")
TOKENIZERS = ("auto", "char", "word")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """AdamW with warmup + cosine decay, gradient clipping and accumulation."""

    steps: int = option(600, "optimizer steps to train for (in total, counting resumed ones)")
    batch_size: int = option(32, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches accumulated into one optimizer step")
    lr: float = option(3e-3, "peak learning rate, reached after warmup")
    min_lr: float = option(3e-4, "learning rate at the end of the cosine decay")
    warmup: float = option(0.1, "fraction of the steps spent warming the learning rate up from 0 to lr")
    weight_decay: float = option(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = option(0.9, "AdamW first-moment decay")
    beta2: float = option(0.99, "AdamW second-moment decay")
    grad_clip: float = option(1.0, "clip gradients to this global norm (0 disables)")
    eval_every: int = option(100, "evaluate on held-out text every this many steps")
    eval_batches: int = option(8, "batches in each evaluation")
    checkpoint_every: int = option(200, "save a checkpoint every this many steps (and at the end)")
    seed: int = option(0, "seed for initialisation, batches and the generated corpus")
    dtype: str = option("float32", "number format of the matrix products: float32, or bfloat16 (weights, "
                        "gradients and optimizer state stay float32)", metavar="DTYPE", choices=DTYPES)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps)

    def __post_init__(self):
        check_types(self)
        _check_positive(self, "steps", "batch_size", "grad_accum", "lr", "eval_every", "eval_batches",
                        "checkpoint_every")
        if not 0 <= self.min_lr <= self.lr:
            raise MinilmError(f"min_lr = {self.min_lr} must lie in [0, lr = {self.lr}]")
        if not 0 <= self.warmup < 1:
            raise MinilmError(f"warmup = {self.warmup} must lie in [0, 1): it is a fraction of the steps")
        _check_at_least_zero(self, "weight_decay", "grad_clip", "seed")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise MinilmError(f"beta1 = {self.beta1} and beta2 = {self.beta2} must lie in [0, 1)")
        if self.dtype not in DTYPES:
            raise MinilmError(f"dtype = {self.dtype!r}; expected one of {', '.join(DTYPES)}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training text comes from: a built-in corpus or a text file of your own."""

    corpus: str | None = option(None, "built-in corpus: associations, bindings, unbound, induction, grammar, "
                                      "arithmetic", metavar="NAME")
    text: str | None = option(None, "train on this UTF-8 text file instead of a built-in corpus", metavar="PATH")
    tokenizer: str = option("auto", "char | word | auto (the corpus's own; char for --text)", metavar="KIND",
                            choices=TOKENIZERS)
    corpus_size: int | None = option(None, "sentences/lines to generate for a built-in corpus (default: its own)")
    val_fraction: float = option(0.1, "fraction of the text held out for evaluation")

    def __post_init__(self):
        check_types(self)
        for name in ("corpus", "text"):
            if getattr(self, name) == "":
                raise MinilmError(f"{name} = '' is empty; pass a {'corpus name' if name == 'corpus' else 'file path'} "
                                  f"with {_flag(name)}, or leave the flag out")
        if self.tokenizer not in TOKENIZERS:
            raise MinilmError(f"tokenizer = {self.tokenizer!r}; expected auto, char or word")
        if not 0 < self.val_fraction < 0.5:
            raise MinilmError(f"val_fraction = {self.val_fraction} must lie in (0, 0.5)")
        if self.corpus_size is not None and not 0 < self.corpus_size <= MAX_CORPUS_SIZE:
            raise MinilmError(f"corpus_size = {self.corpus_size} must lie in 1..{MAX_CORPUS_SIZE:,} (the built-in "
                              f"corpora are generated in memory); pass a smaller --corpus-size")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How to pick each next token. temperature 0 is greedy (argmax)."""

    max_new_tokens: int = option(60, "tokens to generate after the prompt")
    temperature: float = option(0.8, "divide logits by this before sampling; 0 means greedy")
    top_k: int = option(0, "sample only among the k most likely tokens (0: all)")
    top_p: float = option(1.0, "sample only among the smallest set of tokens whose probability reaches p")
    num_samples: int = option(1, "independent samples to draw for the prompt")
    seed: int = option(0, "seed for sampling")
    kv_cache: bool = option(True, "reuse earlier positions' keys and values instead of recomputing them")

    def __post_init__(self):
        check_types(self)
        _check_positive(self, "max_new_tokens", "num_samples")
        _check_at_least_zero(self, "temperature", "top_k", "seed")
        if not 0 < self.top_p <= 1:
            raise MinilmError(f"top_p = {self.top_p} must lie in (0, 1]")


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # Learns the built-in corpora in well under a minute on two CPU cores.
    "tiny": (ModelConfig(context=64, width=64, layers=2, heads=4),
             TrainConfig(steps=600, batch_size=32, lr=3e-3, min_lr=3e-4)),
    # About nanoGPT's shakespeare-char "baby GPT": 6 layers, 6 heads, width 384, context 256.
    "small": (ModelConfig(context=256, width=384, layers=6, heads=6),
              TrainConfig(steps=2000, batch_size=8, grad_accum=1, lr=1e-3, min_lr=1e-4,
                          warmup=0.05, eval_every=250, checkpoint_every=500)),
    # GPT-2 small, 124M parameters (Radford et al. 2019): what `minilm import-hf` brings in from the `gpt2`
    # folder; random weights otherwise (`minilm bench --preset gpt2`). One 1024-token sequence per step: on
    # 2 CPU cores a full step is ~0.8 TFLOP (several seconds); its memory, a few GiB, fits a 24 GiB laptop.
    "gpt2": (ModelConfig(vocab_size=50257, context=1024, width=768, layers=12, heads=12),
             TrainConfig(steps=300, batch_size=1, grad_accum=1, lr=1e-4, min_lr=1e-5, warmup=0.1,
                         eval_every=50, eval_batches=4, checkpoint_every=100)),
}


# Fine-tuning starts from a trained model: fewer steps, a gentler learning rate. LoRA's adapters start
# at zero and are few, so they take a larger one: 10x full fine-tuning's, the rate every experiment was
# written with (LoRA's best rates lie well above full fine-tuning's in the sweeps of Biderman et al. 2024,
# "LoRA Learns Less and Forgets Less"). Defined once: the CLI uses it unless --lr is given, and the
# experiments import it.
FINETUNE = TrainConfig(steps=300, lr=1e-3, min_lr=1e-4, warmup=0.1, eval_every=50, checkpoint_every=100)
LORA_LR = 1e-2


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise MinilmError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def to_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def from_dict(cls, data: dict, what: str):
    """Rebuild a config from JSON, with a clear error for unknown or missing keys."""
    if not isinstance(data, dict):
        raise MinilmError(f"{what}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MinilmError(f"{what}: unknown field(s) {unknown}; expected only {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, MinilmError) as e:  # the message names the field and the value; this names the file
        raise MinilmError(f"{what}: {e}") from None
