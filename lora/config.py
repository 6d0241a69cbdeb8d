"""LoraConfig: which matrices get an adapter, of what rank and scale, initialised how.

The options are those PEFT's `LoraConfig` made familiar (r, lora_alpha, use_rslora, lora_dropout,
target_modules, rank_pattern, alpha_pattern, layers_to_transform, init_lora_weights, use_dora, bias,
modules_to_save), spelled for this project.

Targets name matrices by their place in a block, `attn.q`, `attn.k`, `attn.v`, `attn.o`, `mlp.fc`,
`mlp.proj`, or `embed` (the tied token embedding), or by their full name (`blocks.1.attn.q`); glob
patterns work (`attn.*`), and `all-linear` means every block matrix. From the command line a config
is one string: `rank=8,alpha=16,targets=attn.q,attn.v,init=pissa`.

`fuse_qkv` gives the adapted ones of a block's q, k and v one shared A (they need one rank). With all
three adapted this is the adapter LoRA puts on GPT-2's single (D, 3D) `c_attn` matrix, which is what
PEFT builds for GPT-2 (and what the peer benchmark runs): LoRA on the stacked [W_q W_k W_v] with
B = [B_q B_k B_v], one input subspace (and one dropout mask) for all three, 4RD parameters where
separate adapters have 6RD.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections import abc
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Mapping

from minilm.config import check_types, option
from minilm.errors import MinilmError

INITS = ("standard", "gaussian", "pissa")
BIAS = ("none", "all", "lora_only")
BLOCK_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj")
ALL_LINEAR = "all-linear"


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """One adapter's options. Each field's `help` is also the `--lora` key's help (minilm/cli/finetune.py)."""

    rank: int = option(8, "the adapters' rank R: A is (d_in, R), B is (R, d_out)")
    alpha: float = option(16.0, "scale s = alpha / R")
    use_rslora: bool = option(False, "scale s = alpha / sqrt(R) instead (Kalajdzievski 2023)")
    dropout: float = option(0.0, "dropout on the adapter's input, during training only")
    targets: tuple[str, ...] = option(
        ("attn.q", "attn.v"), "the matrices to adapt: attn.q|k|v|o, mlp.fc|proj, attn.*, mlp.*, all-linear, embed, "
        "blocks.N.*, by default Wq and Wv as in the LoRA paper (Hu et al. §7.1)")
    rank_pattern: Mapping[str, int] = field(
        default_factory=dict, metadata={"help": "pattern:rank entries, a target pattern's own rank, e.g. mlp.*:4"})
    alpha_pattern: Mapping[str, float] = field(
        default_factory=dict, metadata={"help": "pattern:alpha entries, a target pattern's own alpha"})
    layers: tuple[int, ...] | None = option(None, "adapt only these blocks, e.g. layers=0,1 (default: all)")
    init: str = option("standard", f"how A and B start: {' | '.join(INITS)}")
    use_dora: bool = option(False, "DoRA: a trainable magnitude per output unit (Liu et al. 2024)")
    fuse_qkv: bool = option(False, "q, k, v of a block share one A (LoRA on GPT-2's fused c_attn)")
    bias: str = option("none", f"which biases also train: {' | '.join(BIAS)}")
    modules_to_save: tuple[str, ...] = option((), "other parameters trained in full, e.g. ln_f, blocks.*.ln1")
    name: str = option("default", "the adapter's name, when several share a base")

    def __post_init__(self):
        def fail(message):
            raise MinilmError(f"LoRA config: {message}")

        try:
            check_types(self, how=lambda key: f" (--lora {key}=...)")
        except MinilmError as e:
            fail(str(e))
        for key in ("rank_pattern", "alpha_pattern"):
            table = getattr(self, key)
            if not isinstance(table, abc.Mapping) or not all(isinstance(k, str) and k for k in table):
                fail(f"{key} = {table!r} must map target patterns to values, e.g. {key}=mlp.*:4")
        for key in ("targets", "modules_to_save"):
            if not isinstance(getattr(self, key), tuple):
                fail(f"{key} = {getattr(self, key)!r} must be a tuple of names or patterns, e.g. ('attn.q',)")
        if self.layers is not None and not isinstance(self.layers, tuple):
            fail(f"layers = {self.layers!r} must be a tuple of block indices, e.g. (0, 1), or None for all")
        for pattern, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                fail(f"alpha {alpha!r} (for {pattern}) must be a finite number, e.g. alpha_pattern={pattern}:16")
        for key in ("targets", "modules_to_save"):
            if not all(isinstance(t, str) and t for t in getattr(self, key)):
                fail(f"{key} = {getattr(self, key)!r} must be names or patterns, e.g. attn.q")
        for key, rank in {"rank": self.rank, **self.rank_pattern}.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                fail(f"rank {rank!r} (for {key}) must be a positive integer, e.g. rank=8")
        if not self.targets:
            fail("targets is empty; name at least one matrix, e.g. targets=attn.q,attn.v")
        if not 0 <= self.dropout < 1:
            fail(f"dropout = {self.dropout} must lie in [0, 1)")
        if self.init not in INITS:
            fail(f"init = {self.init!r}; expected one of {', '.join(INITS)}")
        if self.bias not in BIAS:
            fail(f"bias = {self.bias!r}; expected one of {', '.join(BIAS)}")
        if self.use_dora and self.init == "pissa":
            fail("use_dora with init=pissa is undefined here: DoRA's magnitude is measured on W, PiSSA "
                 "replaces W by a residual; choose one")
        if self.fuse_qkv and self.init == "pissa":
            fail("fuse_qkv with init=pissa is undefined here: PiSSA takes each matrix's own singular vectors "
                 "as its A, so q, k and v cannot share one; choose one")
        if self.layers is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                           for i in self.layers):
            fail(f"layers = {self.layers} must be block indices >= 0")
        if not self.name.isidentifier():
            fail(f"name = {self.name!r} must be a simple identifier, e.g. name=style")

    def scale_for(self, rank: int, alpha: float) -> float:
        return alpha / rank ** 0.5 if self.use_rslora else alpha / rank

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["rank_pattern"], data["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return data

    @classmethod
    def from_json(cls, data, source: str = "adapter_config.json") -> LoraConfig:
        if not isinstance(data, dict):
            raise MinilmError(f"{source}: expected a JSON object with the LoRA config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MinilmError(f"{source}: unknown LoRA option(s) {unknown}; expected only {sorted(known)}")
        data = dict(data)
        for key in ("targets", "modules_to_save", "layers"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except TypeError as e:
            raise MinilmError(f"{source}: {e}") from None


def matches(pattern: str, full_name: str) -> bool:
    """Does a target pattern name this matrix? `blocks.3.attn.q` answers to attn.q, attn.*, blocks.3.* ..."""
    short = full_name.split(".", 2)[2] if full_name.startswith("blocks.") else full_name
    if pattern == ALL_LINEAR:
        return short in BLOCK_MATRICES
    return fnmatchcase(full_name, pattern) or fnmatchcase(short, pattern)


def parse_spec(spec: str) -> LoraConfig:
    """'rank=8,alpha=16,targets=attn.q,attn.v' -> LoraConfig, each value read as its field's type says.

    A bare item continues the previous tuple (`targets=attn.q,attn.v`) or mapping of pattern:value
    entries (`rank_pattern=attn.q:4,mlp.*:2`)."""
    hints = typing.get_type_hints(LoraConfig)
    kinds = {f.name: _without_none(hints[f.name]) for f in dataclasses.fields(LoraConfig)}
    texts: dict = {}  # key -> its text: a str, a list of str (a tuple) or {pattern: str} (a mapping)
    key = None
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if "=" in item:
            key, text = (s.strip() for s in item.split("=", 1))
            if key not in kinds:
                raise MinilmError(f"--lora: unknown option {key!r}; expected some of {', '.join(kinds)}")
            container = typing.get_origin(kinds[key])
            if container is tuple:
                texts[key] = [text] if text else []
            elif container is abc.Mapping:
                texts[key] = {}
                _add_pattern(texts[key], text, key)
            else:
                texts[key] = text
        elif key is not None and typing.get_origin(kinds[key]) is tuple:
            texts[key].append(item)
        elif key is not None and typing.get_origin(kinds[key]) is abc.Mapping:
            _add_pattern(texts[key], item, key)
        else:
            raise MinilmError(f"--lora: {item!r} is not key=value; e.g. --lora rank=8,alpha=16,targets=attn.q,attn.v")
    return LoraConfig(**{key: _convert(kinds[key], text, key) for key, text in texts.items()})


def _without_none(hint):
    """`X | None` -> X: the type a value given on the command line must have."""
    if isinstance(hint, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def _add_pattern(table: dict, item: str, key: str) -> None:
    if ":" not in item:
        raise MinilmError(f"--lora: {key} entries are pattern:value, e.g. {key}=mlp.*:4; got {item!r}")
    pattern, value = item.rsplit(":", 1)
    table[pattern] = value


BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
EXPECTED = {bool: "true or false", int: "an integer", float: "a number"}


def _convert(kind, text, where: str):
    """Text from a spec as a value of `kind`: bool, int, float or str, a tuple[X, ...] or a Mapping[str, X]."""
    if typing.get_origin(kind) is tuple:
        return tuple(_convert(typing.get_args(kind)[0], item, where) for item in text)
    if typing.get_origin(kind) is abc.Mapping:
        return {pattern: _convert(typing.get_args(kind)[1], value, f"{where}[{pattern}]")
                for pattern, value in text.items()}
    try:
        if kind is bool:
            return BOOLEANS[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        raise MinilmError(f"--lora: {where}={text!r}; expected {EXPECTED[kind]}") from None
