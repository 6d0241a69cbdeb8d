"""Training: the loss, one jit-compiled optimizer step, evaluation, and the loop.

The step takes the parameters in two halves, `(trainable, frozen)` (see tree.py), and differentiates
the loss with respect to `trainable` only. Full training: everything trainable, `frozen` empty.
Fine-tuning a subset (LoRA: only the adapters): the rest frozen. Two things follow, and both matter:

* gradients and optimizer state exist only for trainable leaves: nothing to store for the rest;
* XLA never computes dL/dW for a frozen W: the gradient is not asked for, so its matmul is not in
  the compiled program. (Freezing with `optax.masked` instead would still compute every gradient.)

Optimizer: AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only (not on biases or
LayerNorm parameters, as in GPT-2 / nanoGPT), a linear warmup then cosine decay of the learning rate,
clipping of the global gradient norm, and accumulation of several micro-batches into one step.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from typing import Iterator

import jax
import jax.numpy as jnp
import optax

from minilm import data as data_lib
from minilm.config import ModelConfig, TrainConfig
from minilm.errors import MinilmError
from minilm.model import forward
from minilm.tree import combine, path_name


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of `targets` (B, T) under `logits` (B, T, V), in nats per token."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def loss_fn(trainable, frozen, windows: jax.Array, cfg: ModelConfig, key=None) -> jax.Array:
    """windows (B, T + 1): read tokens 0..T-1, predict tokens 1..T. (The model itself uses no `key`;
    a loss that adds noise, such as LoRA's dropout, takes one per micro-batch.)"""
    logits = forward(combine(trainable, frozen), windows[:, :-1], cfg)
    return cross_entropy(logits, windows[:, 1:])


def mixed_precision(loss, dtype: str):
    """`loss` with the block matrices cast to `dtype` for its products: mixed precision.

    The cast happens inside the differentiated function, so gradients come back through it in float32
    and the optimizer keeps float32 weights and state (Micikevicius et al. 2018, "Mixed Precision
    Training"; bfloat16 has float32's range, so no loss scaling is needed). Embeddings, biases and
    LayerNorms stay float32, and so do the residual stream, the softmax and the loss; attention's
    products follow the weights' format (model.attention_layer). This is the one place weights are cast, once per step; the products that then take bfloat16
    operands, forward and backward, are minilm/precision.py's.
    """
    if dtype == "float32":
        return loss

    def cast(tree):
        def leaf(path, x):
            matrix = x.ndim == 2 and not path_name(path).startswith("embed")
            return x.astype(dtype) if matrix else x
        return jax.tree_util.tree_map_with_path(leaf, tree)

    def mixed(trainable, frozen, windows, cfg, key=None):
        return loss(cast(trainable), cast(frozen), windows, cfg, key)

    return mixed


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine down to min_lr at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # matrices only
    adamw = optax.adamw(schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


# What a step does not read: runs that differ only in these (another seed, say) share one compiled step.
NOT_IN_THE_STEP = {"seed": 0, "eval_every": 1, "eval_batches": 1, "checkpoint_every": 1}


def make_step(model_cfg: ModelConfig, train_cfg: TrainConfig, loss=loss_fn, *, donate: bool = False, layout=None):
    """The jit-compiled step for this model and training (see `_make_step`), one per process for all
    the runs that share what the step reads: seeds and evaluation settings do not count."""
    return _make_step(model_cfg, replace(train_cfg, **NOT_IN_THE_STEP), loss, donate=donate, layout=layout)


@functools.cache  # one compiled step per (model, training, loss, donate, layout): runs in one process share it
def _make_step(model_cfg: ModelConfig, train_cfg: TrainConfig, loss=loss_fn, *, donate: bool = False, layout=None):
    """The jit-compiled step: (trainable, frozen, opt_state, windows (A, B, T + 1), key) ->
    (trainable, opt_state, metrics). The A micro-batches' gradients are averaged, then one update.

    `loss(trainable, frozen, windows, cfg, key)` can be replaced, e.g. to add LoRA dropout; the default
    is the language-model loss.

    Speed trick, `donate=True`: the step updates `trainable` and `opt_state` in place. XLA writes the new
    values into the old ones' buffers (JAX's buffer donation), and the arrays passed in are deleted, so
    the caller must not use them again. Without it every step allocates fresh memory for the new
    parameters and both Adam moments (3 x 43 MB for `small`), and Linux zeroes that memory page by page
    on first touch. Measured on 2 CPU cores, `small` full step: ~10,800 -> ~550 page faults per step and
    ~3.5% less time (8 alternated process pairs). Same numbers either way. `run` donates; the default
    does not, so a step called by hand leaves its arguments alone.

    On a device mesh (`layout`, a minilm.mesh.Layout; None: one device) the batch is split over every
    device; the weights are gathered whole for the forward and backward passes (an all-gather of what is
    split over `fsdp`), and the gradients, new parameters and optimizer state are pinned to the layout's
    shardings, so the gradient's sum over devices becomes a reduce-scatter where the state is split (ZeRO-3).
    """
    opt = optimizer(train_cfg)
    pin = layout.constrain if layout is not None else (lambda tree: tree)
    grad_fn = jax.value_and_grad(mixed_precision(loss, train_cfg.dtype))  # d/d(trainable) only: argument 0

    def step(trainable, frozen, opt_state, windows, key):
        weights, frozen_weights = trainable, frozen
        if layout is not None:  # ZeRO-3: gather the weights, compute data-parallel, scatter the gradients
            windows = layout.constrain_batch(windows)
            weights, frozen_weights = layout.gathered(trainable), layout.gathered(frozen)
        keys = jax.random.split(key, windows.shape[0])
        if windows.shape[0] == 1:
            loss_value, grads = grad_fn(weights, frozen_weights, windows[0], model_cfg, keys[0])
        else:
            def accumulate(total, micro_batch):
                micro_windows, micro_key = micro_batch
                value, g = grad_fn(weights, frozen_weights, micro_windows, model_cfg, micro_key)
                return jax.tree.map(jnp.add, total, g), value

            zeros = jax.tree.map(jnp.zeros_like, weights)
            grads, losses = jax.lax.scan(accumulate, zeros, (windows, keys))
            grads = jax.tree.map(lambda g: g / windows.shape[0], grads)
            loss_value = losses.mean()
        grads = pin(grads)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        trainable, opt_state = pin(trainable), pin(opt_state)
        return trainable, opt_state, {"loss": loss_value, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 2) if donate else ())


@functools.cache
def make_eval(model_cfg: ModelConfig, loss=loss_fn, layout=None):
    """jit-compiled mean `loss` of (trainable, frozen) over windows (A, B, T + 1), without noise (key None).

    A here is the number of evaluation batches (`eval_batches`), stacked like a step's micro-batches;
    on a mesh (`layout`) each batch is split over the devices as a step's is."""
    def evaluate(trainable, frozen, windows):
        if layout is not None:
            windows = layout.constrain_batch(windows)
        return jax.lax.map(lambda w: loss(trainable, frozen, w, model_cfg), windows).mean()

    return jax.jit(evaluate)


@dataclass(frozen=True)
class TrainState:
    """Everything that changes during training; with the configs, everything a resume needs."""

    trainable: dict
    frozen: dict
    opt_state: optax.OptState
    step: int          # optimizer steps taken
    data_cursor: int   # micro-batches drawn so far (see data.py)
    key: jax.Array     # the run's key: batches, evaluation batches and noise each fold in their own number

    @property
    def data_key(self):
        return jax.random.fold_in(self.key, 0)

    @property
    def eval_key(self):
        return jax.random.fold_in(self.key, 1)

    @property
    def step_key(self):  # noise for this step (e.g. dropout), a function of the step alone
        return jax.random.fold_in(jax.random.fold_in(self.key, 2), self.step)


def start(trainable, frozen, train_cfg: TrainConfig, *, key: jax.Array) -> TrainState:
    """Step 0: fresh optimizer state for `trainable`; batches and noise drawn from `key`."""
    return TrainState(trainable, frozen, optimizer(train_cfg).init(trainable), 0, 0, key)


class Diverged(MinilmError):
    """Training produced a non-finite loss or gradient norm: the step, the values, the likely cause."""

    def __init__(self, step: int, loss: float, grad_norm: float, train_cfg: TrainConfig):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"training diverged at step {step}: the loss is {loss:.4g} and the gradient norm "
                         f"{grad_norm:.4g}; the learning rate (lr = {train_cfg.lr:g}) is likely too high for "
                         f"this model and data: lower it (or check the other settings)")


def run(state: TrainState, data: data_lib.Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig,
        loss=loss_fn, layout=None) -> Iterator[tuple[TrainState, dict]]:
    """Train from `state` to `train_cfg.steps`, yielding (state, metrics) after every step.

    Metrics: step, loss (this step's training loss), lr, step_seconds (the step alone: no batching or
    evaluation; the first includes compilation), and eval_loss on the held-out text every
    `eval_every` steps and at the last step. The caller decides what to print and when to save;
    stopping the iteration early and resuming from the yielded state continues bit-identically.

    The first non-finite loss or gradient norm raises `Diverged` instead of yielding its state, so a
    diverged state never reaches the caller (nor its checkpoint).

    The steps update the parameters in place (make_step's `donate`), so a yielded state's trainable
    parameters and optimizer state are valid until the loop continues: save or copy what you keep
    (`jax.tree.map(jnp.copy, state.trainable)`). The state passed in is copied first and stays valid.

    On a device mesh (`layout`, minilm/mesh.py) the state is first placed on it, sharded by the layout's
    rule, and every batch is split over the devices; each process builds its own devices' part of each
    batch. The data stream is the same as on one device, so the losses agree to float32 rounding.
    """
    step_fn = make_step(model_cfg, train_cfg, loss, donate=True, layout=layout)
    if layout is None:  # the caller's arrays are often a base model it compares with the tuned one: keep them
        state = replace(state, trainable=jax.tree.map(jnp.copy, state.trainable),
                        opt_state=jax.tree.map(jnp.copy, state.opt_state))
    else:  # placing makes new arrays, sharded over the mesh
        state = replace(state, trainable=layout.place(state.trainable), frozen=layout.place(state.frozen),
                        opt_state=layout.place(state.opt_state))
    place = layout.place_batch if layout is not None else (lambda windows: windows)
    step_key = (lambda s: layout.place(s.step_key)) if layout is not None else (lambda s: s.step_key)
    eval_fn = make_eval(model_cfg, loss, layout)
    lr = schedule(train_cfg)
    train_ids, val_ids = jnp.asarray(data.train), jnp.asarray(data.val)
    A, B, T = train_cfg.grad_accum, train_cfg.batch_size, model_cfg.context
    eval_windows = place(data_lib.batches(val_ids, state.eval_key, 0, count=train_cfg.eval_batches, batch_size=B,
                                          context=T))
    while state.step < train_cfg.steps:
        windows = place(data_lib.batches(train_ids, state.data_key, state.data_cursor, count=A, batch_size=B,
                                         context=T))
        started = time.perf_counter()
        trainable, opt_state, out = step_fn(state.trainable, state.frozen, state.opt_state, windows, step_key(state))
        metrics = {"step": state.step + 1, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
                   "lr": float(lr(state.step)), "step_seconds": time.perf_counter() - started}
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            raise Diverged(metrics["step"], metrics["loss"], metrics["grad_norm"], train_cfg)
        state = replace(state, trainable=trainable, opt_state=opt_state, step=state.step + 1,
                        data_cursor=state.data_cursor + A)
        if state.step % train_cfg.eval_every == 0 or state.step == train_cfg.steps:
            metrics["eval_loss"] = float(eval_fn(state.trainable, state.frozen, eval_windows))
        yield state, metrics
