"""Adapter files: a trained adapter saved beside, never inside, its base model.

    adapter_config.json        {"lora": the LoraConfig, "base_model": the ModelConfig it was trained on,
                                "base_vocabulary": the base's tokenizer}
    adapter_model.safetensors  what trains, by tree name (blocks.0.attn.q.w.lora_a, ...)

The file names are PEFT's; the contents are minilm's own. Loading checks that the base has the shape
and vocabulary the adapter was trained with, then attaches an adapter and fills in the saved arrays.
Both files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lora.attach import attach
from lora.config import LoraConfig
from lora.stack import fill_shared_a
from lora.train import split
from minilm.checkpoint import write_text_atomic
from minilm.config import ModelConfig, from_dict, to_dict
from minilm.errors import MinilmError
from minilm.tokenizer import Tokenizer
from minilm.tree import combine, fill, named_leaves


def save_adapter(path: Path, params, cfg: LoraConfig, model_cfg: ModelConfig,
                 tokenizer: Tokenizer | None = None) -> None:
    """adapter_config.json (the LoRA config, the base's shape and vocabulary) + adapter_model.safetensors
    (what trains)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    trainable, _ = split(params, cfg)
    tmp = path / "adapter_model.safetensors.tmp"
    save_file({n: np.asarray(x) for n, x in named_leaves(trainable).items()}, tmp)
    tmp.replace(path / "adapter_model.safetensors")
    write_text_atomic(path / "adapter_config.json",
                      json.dumps({"lora": cfg.to_json(), "base_model": to_dict(model_cfg),
                                  "base_vocabulary": None if tokenizer is None else tokenizer.to_json()},
                                 indent=1, ensure_ascii=False))


def load_adapter(path: Path, base_params, base_cfg: ModelConfig, name: str | None = None,
                 tokenizer: Tokenizer | None = None):
    """Attach the adapter saved in `path` to `base_params` -> (params, LoraConfig). `name` renames it,
    so that several adapters can be stacked on one base. With `tokenizer`, the base's vocabulary must be
    the one the adapter was trained with."""
    path = Path(path)
    config_path, arrays_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config_path, arrays_path):
        if not f.is_file():
            raise MinilmError(f"{f} is missing; give a folder written by `minilm finetune --lora`")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinilmError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "lora" not in data or "base_model" not in data:
        raise MinilmError(f"{config_path} must hold {{'lora': {{...}}, 'base_model': {{...}}}}")
    cfg = LoraConfig.from_json(data["lora"], str(config_path))
    if name is not None:
        cfg = replace(cfg, name=name)
    trained_on = from_dict(ModelConfig, data["base_model"], f"{config_path} [base_model]")
    if trained_on != base_cfg:
        diff = "; ".join(f"{k}: adapter {v} vs base {getattr(base_cfg, k)}"
                         for k, v in to_dict(trained_on).items() if getattr(base_cfg, k) != v)
        raise MinilmError(f"the adapter in {path} was trained on a different base model ({diff})")
    saved_vocab = data.get("base_vocabulary")
    if tokenizer is not None and saved_vocab is not None and Tokenizer.from_json(saved_vocab) != tokenizer:
        theirs = Tokenizer.from_json(saved_vocab).vocab
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(theirs, tokenizer.vocab)) if a != b][:3]
        raise MinilmError(f"the adapter in {path} was trained with another vocabulary of the same size "
                          f"(token id adapter vs base: {', '.join(diff)}); use the base it was trained on")
    try:
        arrays = load_file(arrays_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise MinilmError(f"{arrays_path} is not a readable safetensors file ({e})") from None
    params = attach(base_params, cfg, key=jax.random.key(0))
    trainable, frozen = split(params, cfg)
    trainable = fill(trainable, arrays, str(arrays_path))
    return fill_shared_a(combine(jax.tree.map(jnp.asarray, trainable), frozen)), cfg
