"""Training: it learns, it is deterministic, it resumes exactly, and frozen means frozen."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minilm import checkpoint, train
from minilm.config import DataConfig, ModelConfig, TrainConfig
from minilm.data import batches, check_fits
from minilm.errors import MinilmError
from minilm.model import init
from minilm.tree import named_leaves, partition


def fresh_state(model_cfg, train_cfg, is_trainable=lambda name: True, seed=None):
    init_key, train_key = jax.random.split(jax.random.key(train_cfg.seed if seed is None else seed))
    trainable, frozen = partition(init(model_cfg, key=init_key), is_trainable)
    return train.start(trainable, frozen, train_cfg, key=train_key)


def losses(run):
    return [(m["step"], m["loss"], m.get("eval_loss")) for _, m in run]


def test_overfits_a_fixed_batch():
    cfg = ModelConfig(vocab_size=13, context=9, width=15, layers=2, heads=3)  # B 6, T 9, H 3, K 5, L 2
    tcfg = TrainConfig(steps=300, lr=1e-2, min_lr=1e-2, warmup=0.0, weight_decay=0.0)
    windows = jax.random.randint(jax.random.key(1), (1, 6, 10), 0, 13)  # (A, B, T + 1) random tokens
    windows = windows.at[0, :, 0].set(jnp.arange(6))  # distinct first tokens: every next token is determined
    params = init(cfg, key=jax.random.key(0))
    trainable, frozen = partition(params, lambda name: True)
    opt = train.optimizer(tcfg)
    step, opt_state = train.make_step(cfg, tcfg), opt.init(trainable)
    first = None
    for _ in range(tcfg.steps):
        trainable, opt_state, out = step(trainable, frozen, opt_state, windows, jax.random.key(0))
        first = first if first is not None else float(out["loss"])
    assert first > 2.0  # ~ln(13) at init
    assert float(jax.jit(train.loss_fn, static_argnums=3)(trainable, frozen, windows[0], cfg)) < 0.05


def test_same_seed_gives_bit_identical_losses_and_parameters(arithmetic_data, small_cfgs):
    """The determinism every experiment relies on (they are not rerun to check it): same seed and config,
    the same losses and the same trained parameters, bit for bit; another seed, other losses."""
    model_cfg, train_cfg = small_cfgs

    def trained(seed=None):
        steps = list(train.run(fresh_state(model_cfg, train_cfg, seed=seed), arithmetic_data, model_cfg, train_cfg))
        return losses(steps), named_leaves(steps[-1][0].trainable)  # the last state's arrays stay valid

    (a, params_a), (b, params_b) = trained(), trained()
    assert a == b
    for name, leaf in params_a.items():
        np.testing.assert_array_equal(leaf, params_b[name], err_msg=name)
    assert len(a) == train_cfg.steps and a[-1][2] is not None  # eval at the last step
    c, _ = trained(seed=8)
    assert c != a


def test_resume_from_checkpoint_is_bit_identical(arithmetic_data, small_cfgs, tmp_path):
    model_cfg, train_cfg = small_cfgs
    uninterrupted = list(train.run(fresh_state(model_cfg, train_cfg), arithmetic_data, model_cfg, train_cfg))

    first_half = []
    for state, metrics in train.run(fresh_state(model_cfg, train_cfg), arithmetic_data, model_cfg, train_cfg):
        first_half.append((state, metrics))
        if state.step == 5:
            break
    checkpoint.save_training(tmp_path / "ckpt", state, model_cfg=model_cfg, train_cfg=train_cfg,
                             data_cfg=DataConfig(corpus="arithmetic"), tokenizer=arithmetic_data.tokenizer)
    resumed_state = checkpoint.restore_training(checkpoint.load(tmp_path / "ckpt"), train_cfg)
    assert resumed_state.step == 5 and resumed_state.data_cursor == 5
    second_half = list(train.run(resumed_state, arithmetic_data, model_cfg, train_cfg))

    assert losses(first_half + second_half) == losses(uninterrupted)
    for name, leaf in named_leaves(uninterrupted[-1][0].trainable).items():
        np.testing.assert_array_equal(leaf, named_leaves(second_half[-1][0].trainable)[name], err_msg=name)


def test_in_place_steps_compute_the_same_and_leave_the_callers_state_alone(arithmetic_data, small_cfgs):
    """make_step(donate=True) reuses the buffers of trainable and opt_state: the same numbers as the plain
    step, the donated arguments deleted; train.run, which donates, leaves the state it was given usable."""
    model_cfg, train_cfg = small_cfgs
    state = fresh_state(model_cfg, train_cfg)
    windows = batches(jnp.asarray(arithmetic_data.train), state.data_key, 0, count=train_cfg.grad_accum,
                      batch_size=train_cfg.batch_size, context=model_cfg.context)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    plain = train.make_step(model_cfg, train_cfg)(state.trainable, state.frozen, state.opt_state, windows,
                                                   state.step_key)
    trainable, opt_state = copy(state.trainable), copy(state.opt_state)
    donated = train.make_step(model_cfg, train_cfg, donate=True)(trainable, state.frozen, opt_state, windows,
                                                                 state.step_key)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(donated)):
        np.testing.assert_array_equal(a, b)
    assert all(x.is_deleted() for x in jax.tree.leaves((trainable, opt_state)))
    assert not any(x.is_deleted() for x in jax.tree.leaves((state.trainable, state.frozen, state.opt_state)))

    before = {n: np.asarray(x) for n, x in named_leaves(state.trainable).items()}
    for _ in train.run(state, arithmetic_data, model_cfg, train_cfg):
        pass
    for name, leaf in named_leaves(state.trainable).items():  # still there, and unchanged
        np.testing.assert_array_equal(leaf, before[name], err_msg=name)
    assert int(state.opt_state[1][0].count) == 0  # AdamW's step count in the state given: still 0


def test_frozen_subset_stays_bit_identical(arithmetic_data, small_cfgs):
    model_cfg, train_cfg = small_cfgs
    is_trainable = lambda name: name.startswith("blocks.1.")  # noqa: E731
    state = fresh_state(model_cfg, train_cfg, is_trainable)
    before = {n: np.asarray(x) for n, x in named_leaves(train.combine(state.trainable, state.frozen)).items()}
    for state, _ in train.run(state, arithmetic_data, model_cfg, train_cfg):
        pass
    after = named_leaves(train.combine(state.trainable, state.frozen))
    assert after.keys() == before.keys()
    for name in before:
        if is_trainable(name):
            if name.endswith(".w"):
                assert not np.array_equal(after[name], before[name]), name
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # Optimizer state exists for trainable leaves only: Adam keeps mu and nu per trainable leaf, + counts.
    n_trainable = len(named_leaves(state.trainable))
    arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(arrays) == 2 * n_trainable
    assert sum(x.size for x in arrays) == 2 * sum(x.size for x in jax.tree.leaves(state.trainable))


def test_gradient_accumulation_equals_one_big_batch(small_cfgs):
    model_cfg, train_cfg = small_cfgs
    params = init(model_cfg, key=jax.random.key(2))
    trainable, frozen = partition(params, lambda name: True)
    windows = jax.random.randint(jax.random.key(3), (15, model_cfg.context + 1), 0, model_cfg.vocab_size)
    opt = train.optimizer(train_cfg)
    step = train.make_step(model_cfg, train_cfg)
    big = step(trainable, frozen, opt.init(trainable), windows[None], jax.random.key(0))  # (1, 15, T + 1)
    micro_batches = windows.reshape(3, 5, -1)  # (A 3, B 5, T + 1)
    accumulated = step(trainable, frozen, opt.init(trainable), micro_batches, jax.random.key(0))
    np.testing.assert_allclose(big[2]["loss"], accumulated[2]["loss"], rtol=1e-6)
    for name, leaf in named_leaves(big[0]).items():
        np.testing.assert_allclose(leaf, named_leaves(accumulated[0])[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_weight_decay_touches_matrices_only(small_cfgs):
    model_cfg, _ = small_cfgs
    tcfg = TrainConfig(steps=10, lr=0.1, min_lr=0.1, warmup=0.0, weight_decay=0.5, grad_clip=0.0)
    params = jax.tree.map(lambda x: x + 1.0, init(model_cfg, key=jax.random.key(0)))  # no zero leaves
    opt = train.optimizer(tcfg)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zero_grads, opt.init(params), params)
    for name, update in named_leaves(updates).items():
        leaf = named_leaves(params)[name]
        expected = -0.1 * 0.5 * leaf if leaf.ndim >= 2 else np.zeros_like(leaf)  # decoupled decay: -lr·wd·w
        np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, lr=2e-3, min_lr=2e-4, warmup=0.2)
    lr = train.schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)  # halfway through the linear warmup
    np.testing.assert_allclose(float(lr(20)), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 2e-4 + (2e-3 - 2e-4) * 0.5, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(float(lr(100)), 2e-4, rtol=1e-6)


def test_batches_are_windows_of_the_text():
    ids = jnp.arange(50, dtype=jnp.int32) * 3
    out = np.asarray(batches(ids, jax.random.key(0), 4, count=2, batch_size=7, context=5))
    assert out.shape == (2, 7, 6)
    starts = out[..., 0] // 3
    np.testing.assert_array_equal(out, 3 * (starts[..., None] + np.arange(6)))  # consecutive tokens
    assert starts.min() >= 0 and starts.max() <= 50 - 6
    again = np.asarray(batches(ids, jax.random.key(0), 5, count=1, batch_size=7, context=5))
    np.testing.assert_array_equal(again[0], out[1])  # micro-batch m depends only on the cursor m


def test_text_shorter_than_a_context_window_is_refused(arithmetic_data):
    with pytest.raises(MinilmError, match=r"shorter than one context window \(4096 \+ 1\)"):
        check_fits(arithmetic_data, 4096, "corpus 'arithmetic'", 0.1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), "steps = 0"), (dict(lr=-1.0), "lr = -1.0"), (dict(warmup=1.0), "warmup = 1.0"),
    (dict(min_lr=1.0, lr=0.1), "min_lr = 1.0"), (dict(beta2=1.0), "beta2 = 1.0"),
    (dict(batch_size=-3), "batch_size = -3"), (dict(grad_accum=0), "grad_accum = 0"),
])
def test_bad_train_config(kwargs, words):
    with pytest.raises(MinilmError, match=words.replace("(", r"\(").replace("+", r"\+")):
        TrainConfig(**kwargs)


def test_optax_masked_is_not_how_we_freeze():
    """Why `partition` exists: optax.masked passes the masked (frozen) gradients through unchanged."""
    params = {"frozen": jnp.ones(3), "trainable": jnp.ones(3)}
    opt = optax.masked(optax.sgd(1.0), {"frozen": False, "trainable": True})
    grads = {"frozen": jnp.full(3, 5.0), "trainable": jnp.full(3, 5.0)}
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_array_equal(updates["frozen"], grads["frozen"])  # not zero: it would still move


def test_runs_that_differ_only_in_what_the_step_does_not_read_share_one_compiled_step(small_cfgs):
    model_cfg, train_cfg = small_cfgs
    step = train.make_step(model_cfg, train_cfg)
    for other in (dict(seed=11), dict(eval_every=3, eval_batches=5), dict(checkpoint_every=2)):
        assert train.make_step(model_cfg, dataclasses.replace(train_cfg, **other)) is step, other
    for other in (dict(lr=train_cfg.lr / 2), dict(steps=train_cfg.steps + 1), dict(grad_clip=0.0)):
        assert train.make_step(model_cfg, dataclasses.replace(train_cfg, **other)) is not step, other
