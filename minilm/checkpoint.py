"""Checkpoints: one folder, safe to kill at any moment, exact to resume.

    checkpoint/
      model.safetensors      parameters, named by their tree paths (blocks.0.attn.q.w)
      optimizer.safetensors  optimizer state (moments, step count), likewise named
      config.json            model, training and data configs
      tokenizer.json         the vocabulary
      state.json             step, data cursor, PRNG keys, and the SHA-256 of both array files

Arrays go in safetensors (a header plus raw bytes: no code runs on load, unlike pickle), everything
else in JSON. A save writes a complete new folder beside the old one and then swaps the two with
renames, so a kill at any moment leaves a whole checkpoint behind: the old one (possibly still named
`checkpoint.old`, which `load` falls back to) or the new one. The digests in state.json catch a file
that was truncated or altered after the save.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from minilm.config import DataConfig, ModelConfig, TrainConfig, from_dict, to_dict
from minilm.errors import MinilmError
from minilm.model import param_shapes
from minilm.tokenizer import Tokenizer
from minilm.train import TrainState, optimizer
from minilm.tree import combine, fill, named_leaves, partition

ARRAY_FILES = ("model.safetensors", "optimizer.safetensors")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data_cfg: DataConfig
    tokenizer: Tokenizer
    params: dict             # the full parameter tree, as jax arrays
    optimizer: dict          # {name: array} as saved; `restore_optimizer` shapes it into a state
    state: dict              # step, data_cursor, key (as a list of uint32)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def staging_dir(path: Path) -> Path:
    """An empty folder beside `path` to build its next version in (clearing one a killed write left)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, path: Path) -> None:
    """Replace folder `path` by the complete folder `tmp` with two renames; a kill in between leaves
    the old version whole as `path.old`, which `resolve` falls back to."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)  # from here until the next rename, `old` is the whole previous version
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old file or the new, never half."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def key_to_json(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


def key_from_json(data) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, dtype=np.uint32))


def save(path: Path, *, params, opt_state, model_cfg: ModelConfig, train_cfg: TrainConfig,
         data_cfg: DataConfig, tokenizer: Tokenizer, state: dict) -> None:
    """Write the checkpoint folder `path` atomically (see the module docstring)."""
    path = Path(path)
    tmp = staging_dir(path)
    save_file({k: np.asarray(v) for k, v in named_leaves(params).items()}, tmp / "model.safetensors")
    save_file({k: np.asarray(v) for k, v in named_leaves(opt_state).items()}, tmp / "optimizer.safetensors")
    _write_json(tmp / "config.json", {"model": to_dict(model_cfg), "train": to_dict(train_cfg),
                                      "data": to_dict(data_cfg)})
    tokenizer.save(tmp / "tokenizer.json")
    _write_json(tmp / "state.json", {**state, "sha256": {f: _sha256(tmp / f) for f in ARRAY_FILES}})
    _fsync_tree(tmp)
    swap_in(tmp, path)


def resolve(path: Path) -> Path:
    """A run folder (holding checkpoint/) or a checkpoint folder -> the checkpoint folder to read."""
    path = Path(path)
    if (path / "checkpoint").is_dir() or (path / "checkpoint.old").is_dir():
        path = path / "checkpoint"
    if not path.is_dir():
        old = path.with_name(path.name + ".old")
        if old.is_dir():
            return old  # a save was killed between its two renames
        raise MinilmError(f"checkpoint folder {str(path)!r} does not exist; give a folder written by "
                          f"`minilm train --out DIR` (DIR or DIR/checkpoint)")
    return path


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise MinilmError(f"{path} is missing: the checkpoint is incomplete ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinilmError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None


def _read_arrays(path: Path, digest: str | None) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MinilmError(f"{path} is missing: the checkpoint is incomplete")
    if digest is not None and _sha256(path) != digest:
        raise MinilmError(f"{path} does not match the SHA-256 recorded in state.json: the file was "
                          f"truncated or altered after it was saved; use another checkpoint")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise MinilmError(f"{path} is not a readable safetensors file ({e})") from None


def load(path: Path) -> Checkpoint:
    """Read and check a checkpoint: digests, configs, and every tensor's name and shape."""
    path = resolve(path)
    config = _read_json(path / "config.json", "configs")
    state = _read_json(path / "state.json", "training state")
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise MinilmError(f"{path}: config.json and state.json must each hold a JSON object")
    model_cfg = from_dict(ModelConfig, config.get("model"), f"{path}/config.json [model]")
    train_cfg = from_dict(TrainConfig, config.get("train"), f"{path}/config.json [train]")
    data_cfg = from_dict(DataConfig, config.get("data"), f"{path}/config.json [data]")
    tokenizer = Tokenizer.from_json(_read_json(path / "tokenizer.json", "vocabulary"))
    if tokenizer.size != model_cfg.vocab_size:
        raise MinilmError(f"{path}: tokenizer.json has {tokenizer.size} tokens but the model config says "
                          f"vocab_size = {model_cfg.vocab_size}")
    digests = state.pop("sha256", {})
    arrays = _read_arrays(path / "model.safetensors", digests.get("model.safetensors"))
    params = fill(param_shapes(model_cfg), arrays, f"{path}/model.safetensors")
    params = jax.tree.map(jax.numpy.asarray, params)
    optimizer = _read_arrays(path / "optimizer.safetensors", digests.get("optimizer.safetensors"))
    return Checkpoint(path, model_cfg, train_cfg, data_cfg, tokenizer, params, optimizer, state)


def restore_optimizer(ckpt: Checkpoint, template):
    """Shape the saved optimizer arrays like `template` (the optimizer's init on the trainable params)."""
    state = fill(template, ckpt.optimizer, f"{ckpt.path}/optimizer.safetensors")
    return jax.tree.map(lambda t, x: jax.numpy.asarray(x, dtype=t.dtype), template, state)


def save_training(path: Path, state: TrainState, *, model_cfg: ModelConfig, train_cfg: TrainConfig,
                  data_cfg: DataConfig, tokenizer: Tokenizer) -> None:
    """Save a training run's state: the params (both halves, as one tree) and everything else it needs."""
    save(path, params=combine(state.trainable, state.frozen), opt_state=state.opt_state, model_cfg=model_cfg,
         train_cfg=train_cfg, data_cfg=data_cfg, tokenizer=tokenizer,
         state={"step": state.step, "data_cursor": state.data_cursor,
                "key": key_to_json(state.key)})


def restore_training(ckpt: Checkpoint, train_cfg: TrainConfig, is_trainable=lambda name: True) -> TrainState:
    """The TrainState saved in `ckpt`, ready to continue with `train.run` exactly where it stopped."""
    trainable, frozen = partition(ckpt.params, is_trainable)
    opt_state = restore_optimizer(ckpt, optimizer(train_cfg).init(trainable))
    s = ckpt.state
    try:
        return TrainState(trainable, frozen, opt_state, int(s["step"]), int(s["data_cursor"]),
                          key_from_json(s["key"]))
    except (KeyError, TypeError, ValueError) as e:
        raise MinilmError(f"{ckpt.path}/state.json is incomplete or damaged ({e!r}); it needs step, "
                          f"data_cursor and key") from None
