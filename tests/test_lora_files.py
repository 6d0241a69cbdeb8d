"""Adapter files are as safe as checkpoints: the arrays' SHA-256 and the base's fingerprint are checked
on load, non-finite arrays are never written or read, and a save is whole or not at all."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from helpers import scrambled
from safetensors.numpy import load_file, save_file

import lora
from minilm import checkpoint, folders
from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import init
from minilm.tree import combine

CFG = ModelConfig(vocab_size=13, context=7, width=10, layers=2, heads=2, mlp_ratio=3)
ADAPTER = lora.LoraConfig(rank=3, targets=("attn.q", "mlp.fc"), bias="lora_only")


@pytest.fixture
def base():
    return scrambled(init(CFG, key=jax.random.key(0)), seed=1)


@pytest.fixture
def saved(tmp_path, base):
    params = lora.attach(base, ADAPTER, key=jax.random.key(2))
    trainable, frozen = lora.split(params, ADAPTER)  # trained: B and the adapted biases move away from init
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    lora.save_adapter(tmp_path / "adapter", lora.fill_shared_a(combine(trainable, frozen)), ADAPTER, CFG)
    return tmp_path / "adapter"


def test_the_saved_folder_is_marked_and_loads_onto_its_own_base(saved, base):
    assert folders.kind_of(saved) == "adapter"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["sha256"]["adapter_model.safetensors"] == checkpoint.file_sha256(saved / "adapter_model.safetensors")
    params, cfg = lora.load_adapter(saved, base, CFG)  # the trained biases differ from the base's: still its base
    assert cfg == ADAPTER and lora.adapter_names(params) == ["default"]


def test_flipped_bytes_are_caught(saved, base):
    arrays_path = saved / "adapter_model.safetensors"
    data = bytearray(arrays_path.read_bytes())
    data[-4:] = b"\x00\x00\x8fB"  # the last float32 becomes 71.5
    arrays_path.write_bytes(bytes(data))
    assert any(np.any(v == 71.5) for v in load_file(arrays_path).values())  # still a readable file
    with pytest.raises(MinilmError, match="does not match the SHA-256"):
        lora.load_adapter(saved, base, CFG)


def test_another_base_of_the_same_shape_is_refused_unless_asked(saved, base):
    other = jax.tree.map(lambda x: x * 1.001, base)
    with pytest.raises(MinilmError, match="trained on another base model of the same shape.*--allow-other-base"):
        lora.load_adapter(saved, other, CFG)
    params, _ = lora.load_adapter(saved, other, CFG, allow_other_base=True)
    k_of = lambda tree: tree["blocks"][0]["attn"]["k"]["w"]  # noqa: E731
    np.testing.assert_array_equal(k_of(lora.disable(params)), k_of(other))


def test_an_adapter_from_before_digests_loads_with_a_warning(saved, base):
    config_path = saved / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["sha256"], config["base_fingerprint"]
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="cannot be checked"):
        lora.load_adapter(saved, jax.tree.map(lambda x: x * 1.001, base), CFG)


def test_non_finite_adapters_are_never_written_nor_read(tmp_path, saved, base):
    params = lora.attach(base, ADAPTER, key=jax.random.key(2))
    fc = params["blocks"][1]["mlp"]["fc"]
    fc["w"] = dataclasses.replace(fc["w"], lora_b=fc["w"].lora_b.at[0, 0].set(np.nan))
    with pytest.raises(MinilmError, match=r"blocks\.1\.mlp\.fc\.w\.lora_b holds non-finite values \(nan\)"):
        lora.save_adapter(saved, params, ADAPTER, CFG)
    lora.load_adapter(saved, base, CFG)  # the adapter saved before is untouched
    arrays_path = saved / "adapter_model.safetensors"
    arrays = load_file(arrays_path)
    arrays["blocks.0.attn.q.w.lora_a"][1, 2] = np.inf
    save_file(arrays, arrays_path)
    config_path = saved / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["sha256"]["adapter_model.safetensors"] = checkpoint.file_sha256(arrays_path)  # a consistent, bad file
    config_path.write_text(json.dumps(config))
    with pytest.raises(MinilmError, match=r"blocks\.0\.attn\.q\.w\.lora_a holds non-finite values \(inf\)"):
        lora.load_adapter(saved, base, CFG)
