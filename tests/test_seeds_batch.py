"""Seeds as a batch axis (minilm/seeds_batch.py): seed s of a vmapped run is the same run as seed s alone.

Oracle: `train.run` on each seed by itself, same configs, keys and data. The batched step is
`jax.vmap` of the very same step function, so the only thing that may differ is how XLA lowers the
batched products (a (S, N, D) x (S, D, E) batched GEMM instead of S plain GEMMs) and reductions, i.e.
the order of float32 additions.

Measured (jax 0.10.2, 2-core Zen 4): **not bit-identical, equal to float32 rounding.** The first steps
agree bit for bit; then a seed's training loss differs from its solo run by at most 0.77 eps relative
(one last bit) on some steps, and after 12 AdamW steps the parameters differ by at most 29 eps (full) and
1.6 eps (LoRA) times the model's largest parameter. The batched GEMMs sum in another order, and Adam,
which divides each gradient by its own running scale, turns a last-bit difference in a tiny gradient
into a step-sized one. Tolerance: 64 eps (float32 eps = 2^-23), about twice the largest seen.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from minilm import seeds_batch, train
from minilm.config import DataConfig
from minilm.data import load_dataset
from minilm.errors import MinilmError
from minilm.model import init
from minilm.tree import named_leaves, partition

EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
# Twice the largest difference measured (module docstring); another seed differs by ~1e-1, ~10^6 eps.
RTOL = 64 * EPS
SEEDS = (7, 3, 11)  # pairwise distinct, and not in increasing order: a mixed-up seed axis fails


def _start(model_cfg, train_cfg, seed, adapter=None):
    init_key, train_key = jax.random.split(jax.random.key(seed))
    params = init(model_cfg, key=init_key)
    if adapter is None:
        trainable, frozen = partition(params, lambda name: True)
    else:
        trainable, frozen = lora.split(lora.attach(params, adapter, key=jax.random.fold_in(init_key, 1)), adapter)
    return train.start(trainable, frozen, train_cfg, key=train_key)


def _compare(model_cfg, train_cfg, datasets, adapter=None, loss=train.loss_fn):
    states = [_start(model_cfg, train_cfg, seed, adapter) for seed in SEEDS]
    alone = []
    for state, data in zip(states, datasets):
        steps = list(train.run(state, data, model_cfg, train_cfg, loss))
        alone.append(([m["loss"] for _, m in steps], [m.get("eval_loss") for _, m in steps],
                      named_leaves(steps[-1][0].trainable)))
    batched = list(seeds_batch.run(seeds_batch.stack(states), datasets, model_cfg, train_cfg, loss))
    final = seeds_batch.unstack(batched[-1][0])
    for s, (losses, evals, params) in enumerate(alone):
        got = [m["loss"][s] for _, m in batched]
        np.testing.assert_allclose(got, losses, rtol=RTOL, err_msg=f"seed {SEEDS[s]} training losses")
        got_evals = [m["eval_loss"][s] if "eval_loss" in m else None for _, m in batched]
        assert [e is None for e in got_evals] == [e is None for e in evals]
        np.testing.assert_allclose([e for e in got_evals if e is not None], [e for e in evals if e is not None],
                                   rtol=RTOL, err_msg=f"seed {SEEDS[s]} held-out losses")
        # In units of the model's largest parameter: a leaf whose gradient is zero in exact arithmetic
        # (attention's key bias: softmax ignores a shift shared by all keys) holds only rounding noise.
        scale = max(float(jnp.abs(leaf).max()) for leaf in params.values())
        for name, leaf in named_leaves(final[s].trainable).items():
            np.testing.assert_allclose(leaf, params[name], rtol=0, atol=RTOL * scale, err_msg=f"{SEEDS[s]} {name}")
    # Seeds really differ, so agreeing with the right one is a real test.
    assert alone[0][0][-1] != alone[1][0][-1]


def _datasets(arithmetic_data):
    # seed 11 trains on its own text (another corpus draw, another length): per-seed data is allowed
    return [arithmetic_data, arithmetic_data, load_dataset(DataConfig(corpus="arithmetic", corpus_size=500), seed=4)]


def test_batched_full_training_matches_each_seed_alone(arithmetic_data, small_cfgs):
    model_cfg, train_cfg = small_cfgs
    train_cfg = dataclasses.replace(train_cfg, grad_accum=2)  # the step's micro-batch scan under vmap too
    _compare(model_cfg, train_cfg, _datasets(arithmetic_data))


def test_batched_lora_with_dropout_matches_each_seed_alone(arithmetic_data, small_cfgs):
    """LoRA: each seed its own base (frozen, stacked too) and adapters; dropout draws from each seed's key."""
    model_cfg, train_cfg = small_cfgs
    adapter = lora.LoraConfig(rank=2, alpha=4, dropout=0.1, targets=("attn.q", "attn.v"))
    _compare(model_cfg, dataclasses.replace(train_cfg, lr=3e-2), _datasets(arithmetic_data), adapter, lora.loss_fn)


def test_states_at_different_steps_are_refused(arithmetic_data, small_cfgs):
    model_cfg, train_cfg = small_cfgs
    a, b = (_start(model_cfg, train_cfg, seed) for seed in SEEDS[:2])
    with pytest.raises(MinilmError, match="same step"):
        seeds_batch.stack([a, dataclasses.replace(b, step=1)])
    with pytest.raises(MinilmError, match="2 seeds but 1 datasets"):
        next(seeds_batch.run(seeds_batch.stack([a, b]), [arithmetic_data], model_cfg, train_cfg))
