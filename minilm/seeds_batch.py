"""Seeds as a batch axis: S independent training runs as one compiled program (`jax.vmap`).

A finding is measured over several seeds (GUIDE.md §6), and the natural JAX way to train S small models
is to stack them: every array of S `TrainState`s (trainable and frozen parameters, AdamW's moments, the
run's key) gets a leading seed axis S, and `jax.vmap` of train.py's own step trains all of them in one
call. The single-model code is wrapped, not rewritten: the step is `train.make_step`'s, the windows are
drawn by `data.batches` from each seed's own key and cursor, so seed s sees exactly the data order that
`train.run` would give it alone, and gets the same losses (tests/test_seeds_batch.py says how exactly).

Measured (benchmarks/README.md, "Seeds as a batch axis"): on the 2-core CPU the tiny preset gains
nothing from it: at S = 2 and 5 a batched step costs what S single steps cost (0.99-1.05x per seed), and
at S = 1 it is ~1.2x slower. So the experiments train seeds one after another (DECISIONS.md); this module
is the design, its exactness test and that measured answer. Batched seeds are not bit-identical to solo
runs, only equal to float32 rounding (tests/test_seeds_batch.py): the products sum in another order.

Axis vocabulary: S seeds, A micro-batches, B batch, T positions.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import replace
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

from minilm import data as data_lib
from minilm import train
from minilm.config import ModelConfig, TrainConfig
from minilm.errors import MinilmError


def stack(states: Sequence[train.TrainState]) -> train.TrainState:
    """One TrainState whose array leaves have a leading seed axis S; `step` and `data_cursor` are shared,
    so the states must stand at the same point of training (as S fresh `train.start`s do)."""
    if len({(s.step, s.data_cursor) for s in states}) != 1:
        raise MinilmError("seeds batched together must be at the same step and data cursor; got "
                          + ", ".join(f"step {s.step} cursor {s.data_cursor}" for s in states))
    stacked = lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # (S, ...) per leaf
    return train.TrainState(stacked(*[s.trainable for s in states]), stacked(*[s.frozen for s in states]),
                            stacked(*[s.opt_state for s in states]), states[0].step, states[0].data_cursor,
                            jnp.stack([s.key for s in states]))


def unstack(state: train.TrainState) -> list[train.TrainState]:
    """The S single-seed states of a stacked one (copies: they stay valid while the batched run goes on)."""
    seeds = state.key.shape[0]
    pick = lambda tree, s: jax.tree.map(lambda x: jnp.copy(x[s]), tree)
    return [train.TrainState(pick(state.trainable, s), pick(state.frozen, s), pick(state.opt_state, s),
                             state.step, state.data_cursor, state.key[s]) for s in range(seeds)]


@functools.cache  # one compiled batched step per (model, training, loss, donate), as train.make_step
def make_step(model_cfg: ModelConfig, train_cfg: TrainConfig, loss=train.loss_fn, *, donate: bool = False):
    """train.make_step's step mapped over a leading seed axis of every argument:
    (trainable, frozen, opt_state, windows (S, A, B, T + 1), keys (S,)) -> (trainable, opt_state, metrics),
    metrics' loss and grad_norm of shape (S,)."""
    single = train.make_step(model_cfg, train_cfg, loss)  # not donating: the batched program owns the buffers
    return jax.jit(jax.vmap(single), donate_argnums=(0, 2) if donate else ())


@functools.cache
def make_eval(model_cfg: ModelConfig, loss=train.loss_fn):
    """train.make_eval's evaluation mapped over the seed axis: (S,) mean held-out losses."""
    return jax.jit(jax.vmap(train.make_eval(model_cfg, loss)))


# fold_in(key, n) for each seed's key (S,) and one n: TrainState's key derivations, per seed. Compiled once
# rather than re-traced at every step.
_fold_in = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


def run(state: train.TrainState, datasets: Sequence[data_lib.Dataset], model_cfg: ModelConfig,
        train_cfg: TrainConfig, loss=train.loss_fn) -> Iterator[tuple[train.TrainState, dict]]:
    """train.run for a stacked `state` (see `stack`): seed s trains on `datasets[s]` (its own text, or the
    same Dataset repeated) and yields what train.run yields, with per-seed lists.

    Metrics: step, lr, step_seconds (the whole batch's step), and lists of S values for loss, grad_norm
    and, every `eval_every` steps and at the last, eval_loss. A non-finite loss raises train.Diverged for
    the first seed that diverged (its index in the exception's `seed`), as train.run would for it alone.
    Yielded states are valid until the loop continues (donated buffers, as in train.run).
    """
    seeds = state.key.shape[0]
    if len(datasets) != seeds:
        raise MinilmError(f"{seeds} seeds but {len(datasets)} datasets: give one per seed (repeat one to share it)")
    step_fn = make_step(model_cfg, train_cfg, loss, donate=True)
    state = replace(state, trainable=jax.tree.map(jnp.copy, state.trainable),
                    opt_state=jax.tree.map(jnp.copy, state.opt_state))
    eval_fn = make_eval(model_cfg, loss)
    lr = train.schedule(train_cfg)
    A, B, T = train_cfg.grad_accum, train_cfg.batch_size, model_cfg.context
    train_ids = [jnp.asarray(d.train) for d in datasets]
    # The same keys TrainState derives for one seed (fold_in 0: batches, 1: evaluation, 2: noise).
    data_keys, eval_keys, noise_keys = (_fold_in(state.key, n) for n in range(3))
    eval_windows = jnp.stack([data_lib.batches(jnp.asarray(d.val), eval_keys[s], 0, count=train_cfg.eval_batches,
                                               batch_size=B, context=T) for s, d in enumerate(datasets)])
    while state.step < train_cfg.steps:
        # Each seed's windows exactly as train.run draws them: (S, A, B, T + 1).
        windows = jnp.stack([data_lib.batches(ids, data_keys[s], state.data_cursor, count=A, batch_size=B,
                                              context=T) for s, ids in enumerate(train_ids)])
        step_keys = _fold_in(noise_keys, state.step)  # TrainState.step_key, per seed
        started = time.perf_counter()
        trainable, opt_state, out = step_fn(state.trainable, state.frozen, state.opt_state, windows, step_keys)
        metrics = {"step": state.step + 1, "loss": [float(x) for x in out["loss"]],
                   "grad_norm": [float(x) for x in out["grad_norm"]], "lr": float(lr(state.step)),
                   "step_seconds": time.perf_counter() - started}
        for s, (value, norm) in enumerate(zip(metrics["loss"], metrics["grad_norm"])):
            if not (math.isfinite(value) and math.isfinite(norm)):
                error = train.Diverged(metrics["step"], value, norm, train_cfg)
                error.seed = s
                raise error
        state = replace(state, trainable=trainable, opt_state=opt_state, step=state.step + 1,
                        data_cursor=state.data_cursor + A)
        if state.step % train_cfg.eval_every == 0 or state.step == train_cfg.steps:
            metrics["eval_loss"] = [float(x) for x in eval_fn(state.trainable, state.frozen, eval_windows)]
        yield state, metrics
