"""Adapter files: a trained adapter saved beside, never inside, its base model.

    adapter_config.json        {"lora": the LoraConfig, "base_model": the ModelConfig it was trained on,
                                "base_vocabulary": the base's tokenizer}
    adapter_model.safetensors  what trains, by tree name (blocks.0.attn.q.w.lora_a, ...)

The file names are PEFT's; the contents are minilm's own. adapter_config.json also records the SHA-256
of the arrays and a fingerprint of the base (minilm.checkpoint.fingerprint: a hash of its arrays), so
loading can check that the file is the one saved and the base the one trained on, as well as its
shape and vocabulary; then it attaches an adapter and fills in the saved arrays. The folder is built
beside its place and swapped in whole, as a checkpoint is; non-finite arrays are never written or read.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lora.attach import attach
from lora.config import LoraConfig
from lora.merge import disable
from lora.stack import fill_shared_a
from lora.train import split
from minilm.checkpoint import check_finite, file_sha256, fingerprint, staging_dir, swap_in
from minilm.folders import mark, write_text_atomic
from minilm.config import ModelConfig, from_dict, to_dict
from minilm.errors import MinilmError
from minilm.tokenizer import Tokenizer
from minilm.tree import combine, fill, named_leaves


def base_fingerprint(params, cfg: LoraConfig) -> str:
    """checkpoint.fingerprint of what the adapter leaves frozen, adapters removed: the base weights it
    was trained on (for PiSSA, the residual its initialisation computes from them), less the biases
    and modules it trains itself."""
    _, frozen = split(params, cfg)
    return fingerprint(disable(frozen))


def save_adapter(path: Path, params, cfg: LoraConfig, model_cfg: ModelConfig,
                 tokenizer: Tokenizer | None = None) -> None:
    """adapter_config.json (the LoRA config, the base's shape, vocabulary and fingerprint, the SHA-256 of
    the arrays) + adapter_model.safetensors (what trains), as one folder swapped into place whole."""
    path = Path(path)
    trainable, _ = split(params, cfg)
    arrays = {n: np.asarray(x) for n, x in named_leaves(trainable).items()}
    check_finite(arrays, f"not saving the adapter {path}")
    trained_on = base_fingerprint(params, cfg)
    tmp = staging_dir(path)
    try:
        save_file(arrays, tmp / "adapter_model.safetensors")
        write_text_atomic(tmp / "adapter_config.json", json.dumps(
            {"lora": cfg.to_json(), "base_model": to_dict(model_cfg),
             "base_vocabulary": None if tokenizer is None else tokenizer.to_json(),
             "base_fingerprint": trained_on,
             "sha256": {"adapter_model.safetensors": file_sha256(tmp / "adapter_model.safetensors")}},
            indent=1, ensure_ascii=False))
        mark(tmp, "adapter")
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MinilmError(f"could not save the adapter {path} ({getattr(e, 'strerror', None) or e}); "
                          f"what was saved there before is intact") from None
    swap_in(tmp, path)


def load_adapter(path: Path, base_params, base_cfg: ModelConfig, name: str | None = None,
                 tokenizer: Tokenizer | None = None, *, allow_other_base: bool = False):
    """Attach the adapter saved in `path` to `base_params` -> (params, LoraConfig). `name` renames it,
    so that several adapters can be stacked on one base. With `tokenizer`, the base's vocabulary must be
    the one the adapter was trained with. The arrays must match their SHA-256, and the base its
    fingerprint, unless `allow_other_base`. An adapter saved before these were recorded loads with a
    warning (warnings.warn) that it could not be checked."""
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
    try:
        trained_vocab = None if saved_vocab is None else Tokenizer.from_json(saved_vocab)
    except MinilmError as e:
        raise MinilmError(f"{config_path} [base_vocabulary]: {e}") from None
    if tokenizer is not None and trained_vocab is not None and trained_vocab != tokenizer:
        theirs = trained_vocab.vocab
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(theirs, tokenizer.vocab)) if a != b][:3]
        raise MinilmError(f"the adapter in {path} was trained with another vocabulary of the same size "
                          f"(token id adapter vs base: {', '.join(diff)}); use the base it was trained on")
    digests, trained_base = data.get("sha256", {}), data.get("base_fingerprint")
    if not isinstance(digests, dict) or not isinstance(trained_base, (str, type(None))):
        raise MinilmError(f"{config_path} is damaged: sha256 must map file names to digests and base_fingerprint "
                          f"be a digest")
    digest = digests.get("adapter_model.safetensors")
    if digest is None or trained_base is None:
        warnings.warn(f"the adapter in {path} was saved without a digest or base fingerprint (an older minilm): "
                      f"its integrity and its base cannot be checked", stacklevel=2)
    if digest is not None and file_sha256(arrays_path) != digest:
        raise MinilmError(f"{arrays_path} does not match the SHA-256 recorded in adapter_config.json: the file "
                          f"was truncated or altered after it was saved")
    params = attach(base_params, cfg, key=jax.random.key(0))
    if trained_base is not None and not allow_other_base and base_fingerprint(params, cfg) != trained_base:
        raise MinilmError(f"the adapter in {path} was trained on another base model of the same shape and "
                          f"vocabulary (its fingerprint differs); load it onto the base it was trained on, or "
                          f"pass --allow-other-base to apply it anyway")
    try:
        arrays = load_file(arrays_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise MinilmError(f"{arrays_path} is not a readable safetensors file ({e})") from None
    check_finite(arrays, str(arrays_path))
    trainable, frozen = split(params, cfg)
    trainable = fill(trainable, arrays, str(arrays_path))
    return fill_shared_a(combine(jax.tree.map(jnp.asarray, trainable), frozen)), cfg
