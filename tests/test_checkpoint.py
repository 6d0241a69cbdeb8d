"""Checkpoints round-trip exactly, survive a kill mid-save, and refuse damaged or mismatched files."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from minilm import checkpoint, train
from minilm.config import DataConfig, to_dict
from minilm.errors import MinilmError
from minilm.model import init
from minilm.tree import named_leaves, partition


@pytest.fixture
def saved(tmp_path, arithmetic_data, small_cfgs):
    """A checkpoint after 3 real training steps (so the optimizer state is not all zeros)."""
    model_cfg, train_cfg = small_cfgs
    trainable, frozen = partition(init(model_cfg, key=jax.random.key(0)), lambda name: True)
    state = train.start(trainable, frozen, train_cfg, key=jax.random.key(1))
    for state, _ in train.run(state, arithmetic_data, model_cfg, train_cfg):
        if state.step == 3:
            break
    path = tmp_path / "run" / "checkpoint"
    checkpoint.save_training(path, state, model_cfg=model_cfg, train_cfg=train_cfg,
                             data_cfg=DataConfig(corpus="arithmetic", corpus_size=600),
                             tokenizer=arithmetic_data.tokenizer)
    return path, state


def test_round_trip_is_exact(saved, small_cfgs, arithmetic_data):
    path, state = saved
    ckpt = checkpoint.load(path)
    assert (ckpt.model_cfg, ckpt.train_cfg) == small_cfgs
    assert ckpt.data_cfg == DataConfig(corpus="arithmetic", corpus_size=600)
    assert ckpt.tokenizer == arithmetic_data.tokenizer
    for name, leaf in named_leaves(state.trainable).items():
        np.testing.assert_array_equal(named_leaves(ckpt.params)[name], leaf, err_msg=name)
        assert named_leaves(ckpt.params)[name].dtype == leaf.dtype
    restored = checkpoint.restore_training(ckpt, ckpt.train_cfg)
    for (name, a), b in zip(named_leaves(state.opt_state).items(), jax.tree.leaves(restored.opt_state)):
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert a.dtype == b.dtype, name
    assert (restored.step, restored.data_cursor) == (3, 3)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))
    assert checkpoint.load(path.parent).path == path  # a run folder resolves to its checkpoint


def test_saving_again_replaces_and_leaves_no_debris(saved, small_cfgs, arithmetic_data):
    path, state = saved
    later = dataclasses.replace(state, step=4)
    checkpoint.save_training(path, later, model_cfg=small_cfgs[0], train_cfg=small_cfgs[1],
                             data_cfg=DataConfig(corpus="arithmetic"), tokenizer=arithmetic_data.tokenizer)
    assert checkpoint.load(path).state["step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint"]


def test_a_kill_between_the_two_renames_leaves_the_old_checkpoint(saved):
    path, state = saved
    path.rename(path.with_name("checkpoint.old"))  # what a kill right after the first rename leaves
    (path.parent / "checkpoint.tmp").mkdir()        # and a half-written new one
    ckpt = checkpoint.load(path.parent)
    assert ckpt.state["step"] == 3
    np.testing.assert_array_equal(ckpt.params["embed"]["tok"], state.trainable["embed"]["tok"])


def test_missing_folder(tmp_path):
    with pytest.raises(MinilmError, match="does not exist"):
        checkpoint.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "state.json"])
def test_missing_file(saved, name):
    path, _ = saved
    (path / name).unlink()
    with pytest.raises(MinilmError, match=f"{name} is missing"):
        checkpoint.load(path)


def test_truncated_array_file(saved):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MinilmError, match="model.safetensors does not match the SHA-256"):
        checkpoint.load(path)


def test_tampered_array_file(saved):
    path, _ = saved
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside the last tensor: a valid file with a wrong value
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(MinilmError, match="optimizer.safetensors does not match the SHA-256"):
        checkpoint.load(path)


def test_corrupt_array_file_without_digest(saved):
    path, _ = saved
    state = json.loads((path / "state.json").read_text())
    del state["sha256"]
    (path / "state.json").write_text(json.dumps(state))
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MinilmError, match="model.safetensors is not a readable safetensors file"):
        checkpoint.load(path)


def as_if_saved_before_digests(path, name):
    """Drop the digest state.json keeps of `name` (checkpoints of earlier rounds had none): the checks
    behind it are reached."""
    state = json.loads((path / "state.json").read_text())
    del state["sha256"][name]
    (path / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_an_edited_config_or_vocabulary_is_caught_by_its_digest(saved, name):
    path, _ = saved
    data = json.loads((path / name).read_text())
    if name == "tokenizer.json":
        data["vocab"] = data["vocab"][::-1]  # the same size, another order: decoding would be wrong
    else:
        data["train"]["lr"] /= 2
    (path / name).write_text(json.dumps(data))
    with pytest.raises(MinilmError, match=f"{name} does not match the SHA-256 recorded in state.json"):
        checkpoint.load(path)


def test_arrays_that_do_not_match_the_config(saved):
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    config["model"]["width"] = 15  # 5 heads of 3 instead of 3 heads of 4: a valid config, other shapes
    config["model"]["heads"] = 5
    (path / "config.json").write_text(json.dumps(config))
    as_if_saved_before_digests(path, "config.json")
    with pytest.raises(MinilmError, match=r"tensor 'blocks.0.attn.k.b' has shape \(12,\) but the config "
                                          r"expects \(15,\)"):
        checkpoint.load(path)


def test_config_with_unknown_field_or_bad_json(saved):
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    config["model"]["depth"] = 3
    (path / "config.json").write_text(json.dumps(config))
    as_if_saved_before_digests(path, "config.json")
    with pytest.raises(MinilmError, match=r"unknown field\(s\) \['depth'\]"):
        checkpoint.load(path)
    (path / "config.json").write_text("{")
    with pytest.raises(MinilmError, match="config.json is not valid JSON"):
        checkpoint.load(path)


def test_tokenizer_that_does_not_match_the_vocab_size(saved):
    path, _ = saved
    (path / "tokenizer.json").write_text(json.dumps({"kind": "char", "vocab": list("abc")}))
    as_if_saved_before_digests(path, "tokenizer.json")
    with pytest.raises(MinilmError, match="tokenizer.json has 3 tokens but the model config says vocab_size = 14"):
        checkpoint.load(path)


def test_configs_survive_json(small_cfgs):
    for cfg in small_cfgs:
        assert type(cfg)(**json.loads(json.dumps(to_dict(cfg)))) == cfg
