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
`checkpoint.old`, which `load` falls back to and `recover` renames back) or the new one. The digests
in state.json catch a file that was truncated or altered after the save. A save refuses weights that
are not finite, and a load refuses to hand them out: a diverged run never replaces a good checkpoint.
The folder rules (marks, locks, what --overwrite may replace) are minilm/folders.py's.
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
from minilm.folders import LOCK, kind_of, lock, mark, release, write_text_atomic  # noqa: F401 (write_text_atomic: re-exported)
from minilm.model import param_shapes
from minilm.tokenizer import Tokenizer
from minilm.train import TrainState, optimizer
from minilm.tree import combine, fill, named_leaves, partition

ARRAY_FILES = ("model.safetensors", "optimizer.safetensors")
DIGESTED = (*ARRAY_FILES, "config.json", "tokenizer.json")  # state.json records the SHA-256 of each


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


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def staging_dir(path: Path) -> Path:
    """An empty folder beside `path` to build its next version in, locked by this process (folders.lock).

    A `NAME.tmp` left by a killed write is cleared first; one that another process is writing is refused,
    and so is one minilm did not make (neither empty nor holding minilm's lock file or mark)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        raise MinilmError(f"{tmp} is in the way: minilm builds {path.name} there; move it away")
    if tmp.is_dir():
        contents = {f.name for f in tmp.iterdir()}
        if contents and LOCK not in contents and kind_of(tmp) is None:
            raise MinilmError(f"{tmp} exists and was not made by minilm; minilm builds {path.name} there and "
                              f"never deletes what it did not write: move it away")
        if contents:
            lock(tmp)  # refuses if another process is writing it; otherwise a killed write's leftovers
        shutil.rmtree(tmp)
        release(tmp)
    tmp.mkdir(parents=True)
    lock(tmp)
    return tmp


def swap_in(tmp: Path, path: Path) -> None:
    """Replace folder `path` by the complete folder `tmp` with two renames; a kill in between leaves
    the old version whole as `path.old`, which `resolve` falls back to. A symlinked `path` is followed:
    the folder it points to is replaced, and the link stays. The lock staging_dir took is given up
    once the new version is in place (a kill before that leaves `tmp` marked: the next save clears it)."""
    path, staged = Path(path), tmp
    if path.is_symlink():
        path = Path(os.path.realpath(path))
        tmp = tmp.rename(path.with_name(tmp.name))  # beside the real folder, so the renames stay on one disk
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)  # from here until the next rename, `old` is the whole previous version
    tmp.rename(path)
    (path / LOCK).unlink(missing_ok=True)
    release(staged)
    shutil.rmtree(old, ignore_errors=True)


def recover(path: Path) -> bool:
    """A checkpoint folder whose save was killed between its two renames (only `NAME.old` is left) is
    renamed back into place. True if it was."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and not path.is_symlink() and old.is_dir():
        old.rename(path)
        return True
    return False


def fingerprint(params) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes: which model this is, exactly."""
    digest = hashlib.sha256()
    for name, x in sorted(named_leaves(params).items()):
        x = np.ascontiguousarray(np.asarray(x))
        digest.update(f"{name}:{x.dtype}:{x.shape};".encode())
        digest.update(x.tobytes())
    return digest.hexdigest()


def check_finite(arrays: dict[str, np.ndarray], what: str) -> None:
    """Raise a MinilmError naming the first tensor that holds nan or inf."""
    for name, x in arrays.items():
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = "nan" if np.isnan(x).any() else "inf"
            raise MinilmError(f"{what}: tensor {name} holds non-finite values ({bad}): training diverged "
                              f"(learning rate too high, or a non-finite setting); use an earlier checkpoint")


def key_to_json(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


def key_from_json(data) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, dtype=np.uint32))


def save(path: Path, *, params, opt_state, model_cfg: ModelConfig, train_cfg: TrainConfig,
         data_cfg: DataConfig, tokenizer: Tokenizer, state: dict) -> None:
    """Write the checkpoint folder `path` atomically (see the module docstring); refuse non-finite weights.
    If the write fails (disk full, no permission), only its own temporary folder is removed."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in named_leaves(params).items()}  # safetensors writes a strided view wrongly
    moments = {k: np.asarray(v) for k, v in named_leaves(opt_state).items()}
    check_finite(arrays, f"not saving {path}")
    check_finite(moments, f"not saving {path} (optimizer state)")
    tmp = staging_dir(path)
    try:
        save_file(arrays, tmp / "model.safetensors")
        save_file(moments, tmp / "optimizer.safetensors")
        _write_json(tmp / "config.json", {"model": to_dict(model_cfg), "train": to_dict(train_cfg),
                                          "data": to_dict(data_cfg)})
        tokenizer.save(tmp / "tokenizer.json")
        _write_json(tmp / "state.json", {**state, "sha256": {f: file_sha256(tmp / f) for f in DIGESTED}})
        mark(tmp, "checkpoint")
        _fsync_tree(tmp)
    except (OSError, SafetensorError, MinilmError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e)
        before = "the previous checkpoint there is intact" if is_complete(path) else "nothing was saved"
        raise MinilmError(f"could not save {path} ({reason}); {before}") from None
    swap_in(tmp, path)


def is_complete(path: Path) -> bool:
    """Does `path` (a run or checkpoint folder) hold a whole checkpoint, possibly still as NAME.old?"""
    try:
        return (resolve(path) / "state.json").is_file()
    except MinilmError:
        return False


def resolve(path: Path) -> Path:
    """A run folder (holding checkpoint/) or a checkpoint folder -> the checkpoint folder to read."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MinilmError(f"{path} is a file, not a checkpoint folder; give a folder written by "
                          f"`minilm train --out DIR` (DIR or DIR/checkpoint)")
    if any((path / name).is_dir() for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp")):
        path = path / "checkpoint"
    if path.is_dir() and not any((path / f).exists() for f in (*DIGESTED, "state.json")):
        raise MinilmError(f"{path} holds no checkpoint; give a folder written by `minilm train --out DIR` "
                          f"(DIR or DIR/checkpoint)")
    if not path.is_dir():
        old = path.with_name(path.name + ".old")
        if old.is_dir():
            return old  # a save was killed between its two renames
        if path.with_name(path.name + ".tmp").is_dir():
            raise MinilmError(f"no checkpoint was completed yet in {path.parent}: the first save was interrupted "
                              f"(only the partial {path.name}.tmp is there); start the run again without --resume")
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
    if digest is not None and file_sha256(path) != digest:
        raise MinilmError(f"{path} does not match the SHA-256 recorded in state.json: the file was "
                          f"truncated or altered after it was saved; use another checkpoint")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise MinilmError(f"{path} is not a readable safetensors file ({e})") from None


def load(path: Path) -> Checkpoint:
    """Read and check a checkpoint: digests, configs, and every tensor's name and shape."""
    path = resolve(path)
    state = _read_json(path / "state.json", "training state")
    digests = state.pop("sha256", {}) if isinstance(state, dict) else None
    if not isinstance(digests, dict):
        raise MinilmError(f"{path}/state.json is damaged: it must hold a JSON object whose sha256 maps file names "
                          f"to digests")
    for name in ("config.json", "tokenizer.json"):  # recorded since this round; older checkpoints lack them
        if name in digests and (path / name).is_file() and file_sha256(path / name) != digests[name]:
            raise MinilmError(f"{path / name} does not match the SHA-256 recorded in state.json: the file was "
                              f"altered after it was saved; use another checkpoint")
    config = _read_json(path / "config.json", "configs")
    if not isinstance(config, dict):
        raise MinilmError(f"{path}: config.json must hold a JSON object")
    model_cfg = from_dict(ModelConfig, config.get("model"), f"{path}/config.json [model]")
    train_cfg = from_dict(TrainConfig, config.get("train"), f"{path}/config.json [train]")
    data_cfg = from_dict(DataConfig, config.get("data"), f"{path}/config.json [data]")
    data = _read_json(path / "tokenizer.json", "vocabulary")  # its own errors name the file
    try:
        tokenizer = Tokenizer.from_json(data)
    except MinilmError as e:
        raise MinilmError(f"{path / 'tokenizer.json'}: {e}") from None
    if tokenizer.size != model_cfg.vocab_size:
        raise MinilmError(f"{path}: tokenizer.json has {tokenizer.size} tokens but the model config says "
                          f"vocab_size = {model_cfg.vocab_size}")
    arrays = _read_arrays(path / "model.safetensors", digests.get("model.safetensors"))
    check_finite(arrays, f"{path}/model.safetensors")
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
        step, cursor = s["step"], s["data_cursor"]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (step, cursor)):
            raise ValueError(f"step {step!r} and data_cursor {cursor!r} must be whole numbers >= 0")
        return TrainState(trainable, frozen, opt_state, step, cursor, key_from_json(s["key"]))
    except (KeyError, TypeError, ValueError) as e:
        raise MinilmError(f"{ckpt.path}/state.json is incomplete or damaged ({e!r}); it needs step, "
                          f"data_cursor and key") from None
