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
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Mapping

from minilm.errors import MinilmError

INITS = ("standard", "gaussian", "pissa")
BIAS = ("none", "all", "lora_only")
BLOCK_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj")
ALL_LINEAR = "all-linear"


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 8                              # R
    alpha: float = 16.0                        # scale s = alpha / R
    use_rslora: bool = False                   # scale s = alpha / sqrt(R) instead (Kalajdzievski 2023)
    dropout: float = 0.0                       # dropout on the adapter's input, during training only
    targets: tuple[str, ...] = ("attn.q", "attn.v")   # the LoRA paper adapts Wq and Wv (Hu et al. §7.1)
    rank_pattern: Mapping[str, int] = field(default_factory=dict)     # target pattern -> its own rank
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)  # target pattern -> its own alpha
    layers: tuple[int, ...] | None = None      # adapt only these blocks (None: all)
    init: str = "standard"                     # standard | gaussian | pissa
    use_dora: bool = False                     # DoRA: a trainable magnitude per output unit
    fuse_qkv: bool = False                     # q, k, v of a block share one A (LoRA on GPT-2's fused c_attn)
    bias: str = "none"                         # none | all | lora_only: which biases also train
    modules_to_save: tuple[str, ...] = ()      # other parameters trained in full, e.g. ln_f, blocks.*.ln1
    name: str = "default"                      # the adapter's name, when several share a base

    def __post_init__(self):
        def fail(message):
            raise MinilmError(f"LoRA config: {message}")

        for key in ("use_rslora", "use_dora", "fuse_qkv"):
            if not isinstance(getattr(self, key), bool):
                fail(f"{key} = {getattr(self, key)!r} must be true or false")
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
        if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
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
    """'rank=8,alpha=16,targets=attn.q,attn.v' -> LoraConfig. A bare item continues the previous list."""
    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    lists = {"targets", "modules_to_save", "layers"}
    values: dict = {}
    key = None
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in fields:
                raise MinilmError(f"--lora: unknown option {key!r}; expected some of {', '.join(fields)}")
            if key in lists:
                values[key] = [value] if value else []
            elif key in ("rank_pattern", "alpha_pattern"):
                values[key] = {}
                _add_pattern(values[key], value, key)
            else:
                values[key] = value
        elif key in lists:
            values[key].append(item)
        elif key in ("rank_pattern", "alpha_pattern"):
            _add_pattern(values[key], item, key)
        else:
            raise MinilmError(f"--lora: {item!r} is not key=value; e.g. --lora rank=8,alpha=16,targets=attn.q,attn.v")
    try:
        converted = {k: _convert(k, v) for k, v in values.items()}
    except ValueError as e:
        raise MinilmError(f"--lora: {e}") from None
    return LoraConfig(**converted)


def _add_pattern(table: dict, item: str, key: str) -> None:
    if ":" not in item:
        raise MinilmError(f"--lora: {key} entries are pattern:value, e.g. {key}=mlp.*:4; got {item!r}")
    pattern, value = item.rsplit(":", 1)
    table[pattern] = value


def _convert(key: str, value):
    if key in ("rank",):
        return int(value)
    if key in ("alpha", "dropout"):
        return float(value)
    if key in ("use_rslora", "use_dora", "fuse_qkv"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}={value!r}; expected true or false")
        return value.lower() in ("true", "1", "yes")
    if key == "layers":
        return tuple(int(v) for v in value)
    if key in ("targets", "modules_to_save"):
        return tuple(value)
    if key == "rank_pattern":
        return {k: int(v) for k, v in value.items()}
    if key == "alpha_pattern":
        return {k: float(v) for k, v in value.items()}
    return value
