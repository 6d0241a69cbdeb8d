"""Divergence stops training: the first non-finite loss or gradient norm raises, before its state is
yielded, so no caller ever holds (or saves) the diverged weights."""

from __future__ import annotations

import dataclasses
import math

import jax
import pytest

from minilm import train
from minilm.model import init
from minilm.tree import partition


def test_a_learning_rate_far_too_high_stops_at_the_first_non_finite_step(small_cfgs, arithmetic_data):
    model_cfg, train_cfg = small_cfgs
    train_cfg = dataclasses.replace(train_cfg, lr=1e30, min_lr=0.0, warmup=0.0, grad_clip=0.0)
    trainable, frozen = partition(init(model_cfg, key=jax.random.key(0)), lambda name: True)
    state = train.start(trainable, frozen, train_cfg, key=jax.random.key(1))
    seen = []
    with pytest.raises(train.Diverged, match=r"training diverged at step (\d+).*lr = 1e\+30") as caught:
        for state, metrics in train.run(state, arithmetic_data, model_cfg, train_cfg):
            seen.append(metrics)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in seen)
    assert caught.value.step == len(seen) + 1 < train_cfg.steps  # stopped at once, not at the end
    assert not (math.isfinite(caught.value.loss) and math.isfinite(caught.value.grad_norm))


def test_a_sane_learning_rate_is_not_stopped(small_cfgs, arithmetic_data):
    model_cfg, train_cfg = small_cfgs  # control: the same run at the tests' usual learning rate
    trainable, frozen = partition(init(model_cfg, key=jax.random.key(0)), lambda name: True)
    state = train.start(trainable, frozen, train_cfg, key=jax.random.key(1))
    steps = [metrics["step"] for _, metrics in train.run(state, arithmetic_data, model_cfg, train_cfg)]
    assert steps == list(range(1, train_cfg.steps + 1))
