"""Oracle tests for lora/: the LoRA maths against NumPy, and the invariants that must hold exactly.

    at init the adapted model *is* the base model (bit for bit; PiSSA to float32 rounding)
    training moves the adapters and nothing else (frozen leaves bit-identical)
    merged == unmerged; unmerge(merge(p)) == base; save -> load == bit-identical outputs
    x @ W' == x @ W + s·(x A) B with s = alpha / R or alpha / sqrt(R); DoRA's column rescaling
    two named adapters add up; weighted merges; disabling one or all
    bad configs and adapter files fail with one clear MinilmError naming the value

Sizes are small and pairwise distinct, so a swapped axis cannot pass:
    B 5, T 7, H 3, K 4, D 12, F 48, V 11, L 2, context 13, N = B·T 35; LoRA ranks 6, 8, 9, 10.
The base parameters are random values of order one (not init's 0.02-scale weights, under which every
layer is nearly the identity), so every adapted term visibly moves the output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import scrambled

import lora
from lora import LoraConfig, LoraWeight
from lora.weight import adapted_matmul
from minilm import train
from minilm.config import ModelConfig, TrainConfig
from minilm.errors import MinilmError
from minilm.model import forward, param_shapes
from minilm.tree import named_leaves, partition, path_name, size

B, T, H, K, V, L, CONTEXT = 5, 7, 3, 4, 11, 2, 13
D = H * K  # 12
F = 4 * D  # 48
N = B * T  # 35 rows of activations
CFG = ModelConfig(vocab_size=V, context=CONTEXT, width=D, heads=H, layers=L, mlp_ratio=4)
TCFG = TrainConfig(steps=5, batch_size=B, lr=1e-2, min_lr=1e-3, warmup=0.0, weight_decay=0.1)
STEPS = 5

FORWARD = jax.jit(forward, static_argnames=("cfg",))
MATRICES = {"attn.q": (D, D), "attn.k": (D, D), "attn.v": (D, D), "attn.o": (D, D),
            "mlp.fc": (D, F), "mlp.proj": (F, D)}


def is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def lora_sites(params) -> dict[str, LoraWeight]:
    """{'blocks.0.attn.q.w': outermost LoraWeight, ...} for every adapted matrix."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
    return {path_name(p): w for p, w in flat if is_lora(w)}


def randomize_adapters(params, seed: int):
    """Every adapter's A, B (and m) replaced by random nonzero values, as if trained."""
    rng = np.random.default_rng(seed)
    f32 = lambda shape, s=1.0: jnp.asarray(s * rng.normal(size=shape), jnp.float32)  # noqa: E731

    def redo(w):
        if not is_lora(w):
            return w
        m = None if w.magnitude is None else jnp.asarray(rng.uniform(0.5, 2.0, w.magnitude.shape), jnp.float32)
        return dataclasses.replace(w, base=redo(w.base), lora_a=f32(w.lora_a.shape, 0.5),
                                   lora_b=f32(w.lora_b.shape, 0.5), magnitude=m)

    return jax.tree.map(redo, params, is_leaf=is_lora)


def f64(x):
    return np.asarray(x, np.float64)


def rel_err(got, want) -> float:
    got, want = f64(got), f64(want)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def np_delta(w: LoraWeight, scale: float):
    """s · A B in float64, with the scale given by hand (not read from the leaf)."""
    return scale * f64(w.lora_a) @ f64(w.lora_b)


@pytest.fixture(scope="module")
def base():
    return scrambled(param_shapes(CFG), seed=1)  # init's tree, filled with O(1) values (no init compiles)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(2).integers(0, V, (B, T)), jnp.int32)


@pytest.fixture(scope="module")
def base_logits(base, tokens):
    return np.asarray(FORWARD(base, tokens, cfg=CFG))


# ---------------------------------------------------------------- 1. at init the adapted model is the base


INIT_CASES = {
    "embed-all-linear-standard": LoraConfig(rank=9, targets=("embed", "all-linear"), use_rslora=True),
    "embed-qv-gaussian-one-layer": LoraConfig(rank=10, alpha=7.0, targets=("embed", "attn.q", "attn.v"),
                                              init="gaussian", layers=(1,), dropout=0.2),
    "dora-all-linear": LoraConfig(rank=8, targets=("all-linear",), use_dora=True),
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_at_init_outputs_equal_the_base_exactly(case, base, tokens, base_logits):
    cfg = INIT_CASES[case]
    params = lora.attach(base, cfg, key=jax.random.key(3))
    sites = lora_sites(params)
    assert sites, case
    for name, w in sites.items():
        np.testing.assert_array_equal(w.base, named_leaves(base)[name])  # the base itself, untouched
        np.testing.assert_array_equal(w.lora_b, 0.0)  # B = 0: the adapter starts as no change
        assert np.any(np.asarray(w.lora_a) != 0)
        if cfg.init == "standard":  # PEFT's Kaiming-uniform default: |A| <= 1/sqrt(d_in)
            assert np.max(np.abs(w.lora_a)) <= 1 / math.sqrt(w.shape[0])
    if not cfg.use_dora:
        np.testing.assert_array_equal(FORWARD(params, tokens, cfg=CFG), base_logits)
        return
    # DoRA: m / ||W + s·A·0||_c is exactly 1 when m and the norm are computed by the same program, as
    # op by op (eager), where every adapted layer then equals its base bit for bit. Under jit XLA fuses
    # w*w into the column-sum and sums in another order than the eager init did, so the factor is
    # 1 ± 1 ulp and the model's logits agree to float32 rounding only.
    x = jnp.asarray(np.random.default_rng(3).normal(size=(N, F)), jnp.float32)
    for name in ("blocks.0.attn.q.w", "blocks.1.mlp.fc.w", "blocks.0.mlp.proj.w"):  # (D, D), (D, F), (F, D)
        w = sites[name]
        np.testing.assert_array_equal(x[:, :w.shape[0]] @ w, x[:, :w.shape[0]] @ w.base, err_msg=name)
    jitted = FORWARD(params, tokens, cfg=CFG)
    assert rel_err(jitted, base_logits) <= 1e-6
    np.testing.assert_allclose(jitted, base_logits, rtol=1e-5, atol=1e-5)


def test_pissa_at_init_is_the_base_split_into_residual_and_top_r_part(base, tokens, base_logits):
    R = 8
    cfg = LoraConfig(rank=R, alpha=6.0, targets=("embed", "attn.k", "mlp.fc", "mlp.proj"), init="pissa")
    params = lora.attach(base, cfg, key=jax.random.key(4))
    np.testing.assert_allclose(FORWARD(params, tokens, cfg=CFG), base_logits, rtol=1e-5, atol=1e-5)
    sites = lora_sites(params)
    assert len(sites) == 1 + 3 * L
    for name, w in sites.items():
        W = f64(named_leaves(base)[name])
        top = np_delta(w, 6.0 / R)  # s·A B, s by hand
        np.testing.assert_allclose(f64(w.base) + top, W, rtol=1e-5, atol=1e-5, err_msg=name)
        # Eckart-Young: the best rank-R approximation of W is its truncated SVD, computed here in float64.
        u, s, vt = np.linalg.svd(W, full_matrices=False)
        best = (u[:, :R] * s[:R]) @ vt[:R]
        np.testing.assert_allclose(top, best, rtol=1e-4, atol=2e-5, err_msg=name)
        # and the residual holds the rest of the spectrum
        np.testing.assert_allclose(np.linalg.svd(f64(w.base), compute_uv=False)[:len(s) - R], s[R:],
                                   rtol=1e-4, atol=2e-5, err_msg=name)


# ---------------------------------------------------------------- 2, 3, 6, 7: a few steps of training


TRAIN_CASES = {
    # the LoRA paper's choice, with adapter dropout on
    "qv-dropout": LoraConfig(rank=6, alpha=5.0, targets=("attn.q", "attn.v"), dropout=0.25),
    # DoRA everywhere in the blocks, plus the adapted matrices' biases and the final LayerNorm
    "dora-all-linear": LoraConfig(rank=8, targets=("all-linear",), use_dora=True, bias="lora_only",
                                  modules_to_save=("ln_f",)),
    # PiSSA on the tied embedding (rows and output projection) and two block matrices, rsLoRA scaling
    "pissa-embed-rslora": LoraConfig(rank=9, targets=("embed", "attn.k", "mlp.proj"), init="pissa",
                                     use_rslora=True, layers=(1,)),
    # PEFT's layout on GPT-2's fused c_attn: q, k, v share one A
    "fused-qkv": LoraConfig(rank=8, alpha=4.0, targets=("all-linear",), fuse_qkv=True),
}


def expected_trainable(case: str) -> dict[str, tuple[int, ...]]:
    """The trainable leaves each case must have, with their shapes, written out by hand."""
    out = {}
    if case == "qv-dropout":
        for i in range(L):
            for m in ("q", "v"):
                out |= {f"blocks.{i}.attn.{m}.w.lora_a": (D, 6), f"blocks.{i}.attn.{m}.w.lora_b": (6, D)}
    elif case == "dora-all-linear":
        for i in range(L):
            for short, (d_in, d_out) in MATRICES.items():
                out |= {f"blocks.{i}.{short}.w.lora_a": (d_in, 8), f"blocks.{i}.{short}.w.lora_b": (8, d_out),
                        f"blocks.{i}.{short}.w.magnitude": (d_out,), f"blocks.{i}.{short}.b": (d_out,)}
        out |= {"ln_f.scale": (D,), "ln_f.bias": (D,)}
    elif case == "fused-qkv":
        for i in range(L):
            out[f"blocks.{i}.attn.q.w.lora_a"] = (D, 8)  # the one A of q, k and v
            out |= {f"blocks.{i}.{short}.w.lora_b": (8, d_out) for short, (_, d_out) in MATRICES.items()}
            out |= {f"blocks.{i}.{short}.w.lora_a": (d_in, 8) for short, (d_in, _) in MATRICES.items()
                    if short not in ("attn.q", "attn.k", "attn.v")}
    elif case == "pissa-embed-rslora":
        out |= {"embed.tok.lora_a": (V, 9), "embed.tok.lora_b": (9, D),
                "blocks.1.attn.k.w.lora_a": (D, 9), "blocks.1.attn.k.w.lora_b": (9, D),
                "blocks.1.mlp.proj.w.lora_a": (F, 9), "blocks.1.mlp.proj.w.lora_b": (9, D)}
    return out


def trainable_count(case: str) -> int:
    """The same counts as formulas: r·(d_in + d_out) per matrix, + d_out for DoRA's m and for a bias."""
    if case == "qv-dropout":
        return 6 * L * 2 * (D + D)
    if case == "dora-all-linear":
        per_block = sum(8 * (d_in + d_out) + d_out + d_out for d_in, d_out in MATRICES.values())
        return L * per_block + 2 * D
    if case == "pissa-embed-rslora":
        return 9 * (V + D) + 9 * (D + D) + 9 * (F + D)
    if case == "fused-qkv":  # q, k, v: one A (D, R) and three B (R, D), i.e. LoRA on the (D, 3D) stack
        return L * (8 * (D + 3 * D) + 8 * (D + D) + 8 * (D + F) + 8 * (F + D))
    raise AssertionError(case)


_trained: dict = {}


def trained(case: str, base, noise: int = 100):
    """(params before training, params after STEPS steps, trainable, frozen, opt_state), once per case.

    `noise` seeds the step keys (adapter dropout); the batches are the same whatever it is."""
    if (case, noise) not in _trained:
        cfg = TRAIN_CASES[case]
        params = lora.attach(base, cfg, key=jax.random.key(5))
        trainable, frozen = lora.split(params, cfg)
        opt_state = train.optimizer(TCFG).init(trainable)
        step = train.make_step(CFG, TCFG, lora.loss_fn)
        rng = np.random.default_rng(6)
        for i in range(STEPS):
            windows = jnp.asarray(rng.integers(0, V, (1, B, T + 1)), jnp.int32)  # (A, B, T + 1)
            trainable, opt_state, _ = step(trainable, frozen, opt_state, windows, jax.random.key(noise + i))
        adapted = lora.fill_shared_a(train.combine(trainable, frozen))
        _trained[case, noise] = (params, adapted, trainable, frozen, opt_state)
    return _trained[case, noise]


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_moves_the_adapters_and_nothing_else(case, base):
    before, after, trainable, frozen, opt_state = trained(case, base)
    want = expected_trainable(case)
    got = {n: tuple(x.shape) for n, x in named_leaves(trainable).items()}
    assert got == want
    assert size(trainable) == trainable_count(case)
    # Adam's two moments exist for the trainable leaves only
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trainable_count(case)

    original = named_leaves(base)
    before_leaves, after_leaves = named_leaves(before), named_leaves(after)
    assert before_leaves.keys() == after_leaves.keys()
    for name, leaf in named_leaves(frozen).items():  # frozen: bit-identical to what went in
        np.testing.assert_array_equal(leaf, before_leaves[name], err_msg=name)
        np.testing.assert_array_equal(after_leaves[name], before_leaves[name], err_msg=name)
    for name, w in lora_sites(after).items():  # every .base: the original weight (PiSSA: its residual)
        assert not is_lora(w.base)
        if TRAIN_CASES[case].init != "pissa":
            np.testing.assert_array_equal(w.base, original[name], err_msg=name)
        else:
            np.testing.assert_array_equal(w.base, lora_sites(before)[name].base, err_msg=name)
        assert np.max(np.abs(w.lora_b - lora_sites(before)[name].lora_b)) > 1e-4, name  # B has moved
    for name in original:  # every unadapted leaf that does not train is the original array
        if name in after_leaves and name not in want:
            np.testing.assert_array_equal(after_leaves[name], original[name], err_msg=name)
    for name in want:  # and everything that trains has moved
        assert not np.array_equal(after_leaves[name], before_leaves[name]), name


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_merged_equals_unmerged_after_training(case, base, tokens):
    _, after, _, _, _ = trained(case, base)
    unmerged = FORWARD(after, tokens, cfg=CFG)
    merged_params = lora.merge(after)
    assert not any(is_lora(x) for x in jax.tree.leaves(merged_params, is_leaf=is_lora))
    merged = FORWARD(merged_params, tokens, cfg=CFG)
    assert rel_err(merged, unmerged) <= 1e-5
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    if TRAIN_CASES[case].use_dora:
        with pytest.raises(MinilmError, match="DoRA merge cannot be undone"):
            lora.unmerge(merged_params, after)
        return
    recovered = named_leaves(lora.unmerge(merged_params, after))
    for name, w in lora_sites(after).items():  # W' - s·A B gives back the (frozen) base
        np.testing.assert_allclose(recovered[name], w.base, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", ["qv-dropout", "pissa-embed-rslora"])
def test_adapter_dropout_makes_training_depend_on_the_step_key(case, base):
    """Same batches, other step keys: with dropout the adapters end elsewhere; without, bit-identical."""
    one, other = trained(case, base)[2], trained(case, base, noise=200)[2]
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(other)))
    assert same == (TRAIN_CASES[case].dropout == 0)


def test_lora_on_q_and_v_leaves_every_token_and_position_vector_unchanged(base):
    _, after, _, _, _ = trained("qv-dropout", base)
    np.testing.assert_array_equal(after["embed"]["tok"], base["embed"]["tok"])  # (V, D) every token vector
    np.testing.assert_array_equal(after["embed"]["pos"], base["embed"]["pos"])  # (context, D)
    # positive control: one step of full fine-tuning on the same data does move them
    trainable, frozen = partition(base, lambda name: True)
    windows = jnp.asarray(np.random.default_rng(6).integers(0, V, (1, B, T + 1)), jnp.int32)
    full_step = train.make_step(CFG, TCFG)
    moved, _, _ = full_step(trainable, frozen, train.optimizer(TCFG).init(trainable), windows, jax.random.key(0))
    assert not np.array_equal(moved["embed"]["tok"], base["embed"]["tok"])
    assert not np.array_equal(moved["embed"]["pos"], base["embed"]["pos"])


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_saved_adapter_loads_to_bit_identical_outputs(case, base, tokens, tmp_path):
    cfg = TRAIN_CASES[case]
    _, after, trainable, _, _ = trained(case, base)
    lora.save_adapter(tmp_path / "adapter", after, cfg, CFG)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [".minilm.json", "adapter_config.json",
                                                                       "adapter_model.safetensors"]
    loaded, loaded_cfg = lora.load_adapter(tmp_path / "adapter", base, CFG)
    assert loaded_cfg == cfg
    for name, leaf in named_leaves(after).items():
        np.testing.assert_array_equal(named_leaves(loaded)[name], leaf, err_msg=name)
    np.testing.assert_array_equal(FORWARD(loaded, tokens, cfg=CFG), FORWARD(after, tokens, cfg=CFG))
    rows = lora.summary(after, trainable)
    assert sum(r["trainable"] for r in rows) == trainable_count(case)


@pytest.mark.parametrize("wrt", [(0, 2, 3), (2, 3), (0, 1, 2, 3)])  # LoRA below trains / nothing below / W too
def test_adapted_matmul_gradients_against_the_plain_formula_and_finite_differences(wrt):
    """The hand-written backward of adapted_matmul (dx, dA, dB, and dW when W trains) equals autodiff of
    x @ W + s (x @ A) @ B, in float64; and both agree with central finite differences."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        x, w, a, b = (jnp.asarray(rng.normal(size=s)) for s in ((N, D), (D, F), (D, 8), (8, F)))
        cot = jnp.asarray(rng.normal(size=(N, F)))  # a random output gradient: every entry matters
        scale = 1.7

        def filled(args):  # x, w, a, b with the differentiated ones replaced by `args`
            full = [x, w, a, b]
            for i, arg in zip(wrt, args):
                full[i] = arg
            return full

        def ours(*args):
            return jnp.sum(adapted_matmul(*filled(args), scale) * cot)

        def plain(*args):
            x_, w_, a_, b_ = filled(args)
            return jnp.sum((x_ @ w_ + scale * (x_ @ a_) @ b_) * cot)

        args = tuple([x, w, a, b][i] for i in wrt)
        got = jax.grad(ours, argnums=tuple(range(len(wrt))))(*args)
        want = jax.grad(plain, argnums=tuple(range(len(wrt))))(*args)
        for g, h in zip(got, want):
            np.testing.assert_allclose(g, h, rtol=1e-12, atol=1e-10)
        check_grads(ours, args, order=1, modes=("rev",))


def test_fused_qkv_is_one_adapter_on_the_stacked_qkv_matrix(base, tokens):
    """fuse_qkv = LoRA on [W_q W_k W_v] (D, 3D) with B = [B_q B_k B_v]: checked against NumPy, and its
    A's gradient against the sum of three separate adapters' gradients taken at the same values."""
    fused_cfg = LoraConfig(rank=8, alpha=4.0, targets=("all-linear",), fuse_qkv=True)
    attached = lora.attach(base, fused_cfg, key=jax.random.key(7))
    sites = lora_sites(attached)
    for i in range(L):  # at attach: q's A is k's and v's
        a = sites[f"blocks.{i}.attn.q.w"].lora_a
        for m in ("k", "v"):
            np.testing.assert_array_equal(sites[f"blocks.{i}.attn.{m}.w"].lora_a, a)
        assert not np.array_equal(sites[f"blocks.{i}.attn.o.w"].lora_a, a)  # o reads another input
    fused = lora.fill_shared_a(randomize_adapters(attached, seed=8))  # random B's, and one random A per block
    trainable, frozen = lora.split(fused, fused_cfg)
    assert "blocks.0.attn.k.w.lora_a" not in named_leaves(trainable) | named_leaves(frozen)

    merged = named_leaves(lora.merge(lora.fill_shared_a(train.combine(trainable, frozen))))
    for i in range(L):
        w = {m: sites[f"blocks.{i}.attn.{m}.w"] for m in ("q", "k", "v")}
        stack = np.concatenate([f64(w[m].base) for m in "qkv"], axis=1)  # (D, 3D)
        a = f64(named_leaves(fused)[f"blocks.{i}.attn.q.w.lora_a"])
        b = np.concatenate([f64(named_leaves(fused)[f"blocks.{i}.attn.{m}.w.lora_b"]) for m in "qkv"], axis=1)
        want = stack + (4.0 / 8) * a @ b  # (D, 3D)
        got = np.concatenate([merged[f"blocks.{i}.attn.{m}.w"] for m in "qkv"], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # the same values as three separate adapters: the loss is the same, and the shared A's gradient is
    # the sum of the three separate A's gradients (the chain rule through one shared input)
    separate_cfg = dataclasses.replace(fused_cfg, fuse_qkv=False)
    separate = jax.tree.map(lambda w: dataclasses.replace(w, a_from=None) if is_lora(w) else w, fused, is_leaf=is_lora)
    sep_trainable, sep_frozen = lora.split(separate, separate_cfg)
    windows = jnp.asarray(np.random.default_rng(9).integers(0, V, (B, T + 1)), jnp.int32)
    loss_and_grad = jax.jit(jax.value_and_grad(lora.loss_fn), static_argnums=3)
    loss_f, grad_f = loss_and_grad(trainable, frozen, windows, CFG)
    loss_s, grad_s = loss_and_grad(sep_trainable, sep_frozen, windows, CFG)
    assert abs(float(loss_f) - float(loss_s)) <= 1e-6 * abs(float(loss_s))
    g_f, g_s = named_leaves(grad_f), named_leaves(grad_s)
    for name, g in g_f.items():
        if ".attn.q.w.lora_a" in name:
            want = sum(f64(g_s[name.replace(".q.", f".{m}.")]) for m in "qkv")
            assert rel_err(g, want) <= 1e-5, name
        else:
            assert rel_err(g, g_s[name]) <= 1e-5, name
    assert set(g_s) - set(g_f) == {f"blocks.{i}.attn.{m}.w.lora_a" for i in range(L) for m in "kv"}


def test_fused_qkv_owner_dropout_and_other_targets(base):
    """The first adapted of q, k, v owns the A; sharers also share its dropout key (one mask on their
    common input); embed and the other matrices keep their own."""
    cfg = LoraConfig(rank=2, targets=("embed", "attn.k", "attn.v", "attn.o"), fuse_qkv=True, dropout=0.3)
    params = lora.attach(base, cfg, key=jax.random.key(4))
    sites = lora_sites(params)
    assert [sites[f"blocks.0.attn.{m}.w"].a_from for m in ("k", "v", "o")] == [None, "k", None]
    assert sites["embed.tok"].a_from is None
    trainable, frozen = lora.split(params, cfg)
    armed = lora_sites(lora.with_dropout(lora.fill_shared_a(train.combine(trainable, frozen)), jax.random.key(5)))
    for i in range(L):
        k, v, o = (armed[f"blocks.{i}.attn.{m}.w"] for m in ("k", "v", "o"))
        np.testing.assert_array_equal(v.lora_a, k.lora_a)
        assert jnp.array_equal(jax.random.key_data(v.dropout_key), jax.random.key_data(k.dropout_key))
        assert not jnp.array_equal(jax.random.key_data(o.dropout_key), jax.random.key_data(k.dropout_key))
    # attaching a second adapter to a tree with holes works (attach ties first)
    stacked = lora.attach(train.combine(trainable, frozen), LoraConfig(rank=2, targets=("attn.q",), name="second"),
                          key=jax.random.key(6))
    assert lora.adapter_names(stacked) == ["default", "second"]
    inner = lora_sites(stacked)
    np.testing.assert_array_equal(inner["blocks.0.attn.v.w"].lora_a, inner["blocks.0.attn.k.w"].lora_a)
    assert inner["blocks.0.attn.q.w"].name == "second"


def test_fused_qkv_adapter_file_holds_each_shared_a_once(base, tmp_path):
    from safetensors.numpy import load_file

    cfg = TRAIN_CASES["fused-qkv"]
    _, after, _, _, _ = trained("fused-qkv", base)
    lora.save_adapter(tmp_path / "adapter", after, cfg, CFG)
    names = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {n for n in names if ".attn." in n and n.endswith("lora_a")} == \
        {f"blocks.{i}.attn.{m}.w.lora_a" for i in range(L) for m in ("q", "o")}
    loaded, _ = lora.load_adapter(tmp_path / "adapter", base, CFG)
    sites = lora_sites(loaded)
    for i in range(L):
        for m in ("k", "v"):
            np.testing.assert_array_equal(sites[f"blocks.{i}.attn.{m}.w"].lora_a, sites[f"blocks.{i}.attn.q.w"].lora_a)


# ---------------------------------------------------------------- 4. scaling, against a hand computation


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scale_is_alpha_over_r_or_over_sqrt_r(use_rslora, base):
    R, alpha = 9, 6.0
    cfg = LoraConfig(rank=R, alpha=alpha, targets=("attn.v", "mlp.proj"), use_rslora=use_rslora)
    params = randomize_adapters(lora.attach(base, cfg, key=jax.random.key(8)), seed=9)
    s = alpha / math.sqrt(R) if use_rslora else alpha / R  # 2.0 or 0.667
    x_rng = np.random.default_rng(10)
    for name, w in lora_sites(params).items():
        assert w.scale == s, name
        x = x_rng.normal(size=(N, w.shape[0]))  # (N, d_in)
        want = x @ f64(w.base) + s * (x @ f64(w.lora_a)) @ f64(w.lora_b)
        got = jnp.asarray(x, jnp.float32) @ w  # LoraWeight.__rmatmul__
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(w.merged(), f64(w.base) + np_delta(w, s), rtol=1e-5, atol=1e-6, err_msg=name)


def test_rank_and_alpha_patterns_give_per_target_ranks_and_scales(base):
    # Where several patterns match a matrix, the first one listed wins.
    cfg = LoraConfig(rank=6, alpha=6.0, targets=("attn.q", "attn.v", "attn.o", "mlp.*"),
                     rank_pattern={"blocks.1.attn.q": 10, "attn.[qv]": 9, "mlp.*": 8},
                     alpha_pattern={"blocks.0.mlp.fc": 9.0, "mlp.*": 8.0, "attn.v": 10.0})
    params = lora.attach(base, cfg, key=jax.random.key(11))
    want = {}  # name -> (rank, scale), by hand
    for i in range(L):
        want[f"blocks.{i}.attn.q.w"] = (10, 6.0 / 10) if i == 1 else (9, 6.0 / 9)
        want[f"blocks.{i}.attn.v.w"] = (9, 10.0 / 9)
        want[f"blocks.{i}.attn.o.w"] = (6, 6.0 / 6)
        want[f"blocks.{i}.mlp.fc.w"] = (8, (9.0 if i == 0 else 8.0) / 8)
        want[f"blocks.{i}.mlp.proj.w"] = (8, 8.0 / 8)
    sites = lora_sites(params)
    assert sites.keys() == want.keys()
    for name, (rank, scale) in want.items():
        w = sites[name]
        d_in, d_out = named_leaves(base)[name].shape
        assert w.lora_a.shape == (d_in, rank) and w.lora_b.shape == (rank, d_out), name
        assert w.rank == rank and w.shape == (d_in, d_out), name
        assert w.scale == pytest.approx(scale, rel=1e-12), name


def test_layers_selects_blocks_and_embed_is_unaffected_by_it(base):
    params = lora.attach(base, LoraConfig(rank=6, targets=("embed", "attn.q"), layers=(1,)), key=jax.random.key(0))
    assert sorted(lora_sites(params)) == ["blocks.1.attn.q.w", "embed.tok"]


# ---------------------------------------------------------------- 5. DoRA, rows, transpose: NumPy references


def random_lora_weight(seed, d_in, d_out, rank, scale, dora=False) -> LoraWeight:
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    m = jnp.asarray(rng.uniform(0.5, 2.0, d_out), jnp.float32) if dora else None
    return LoraWeight(f32(d_in, d_out) / math.sqrt(d_in), 0.5 * f32(d_in, rank), 0.5 * f32(rank, d_out), m,
                      scale=scale)


def test_dora_against_numpy():
    w = random_lora_weight(12, F, D, 8, 0.7, dora=True)  # (48, 12), R 8
    W, A, Bm, m = (f64(a) for a in (w.base, w.lora_a, w.lora_b, w.magnitude))
    adapted = W + 0.7 * A @ Bm
    want = m * adapted / np.sqrt((adapted ** 2).sum(axis=0))  # column j = output unit j, over d_in
    np.testing.assert_allclose(w.merged(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(f64(w.merged()), axis=0), m, rtol=1e-5)  # |column j| = m_j
    x = np.random.default_rng(13).normal(size=(N, F))
    np.testing.assert_allclose(jnp.asarray(x, jnp.float32) @ w, x @ want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        w.T  # noqa: B018 - no transpose view of a DoRA weight


def test_rows_and_transpose_of_a_lora_weight_against_numpy():
    w = random_lora_weight(14, V, D, 9, 1.3)  # the tied embedding's shape (V, D)
    want = f64(w.base) + 1.3 * f64(w.lora_a) @ f64(w.lora_b)
    ids = np.array([3, 0, 10, 3, 7])
    np.testing.assert_allclose(w[jnp.asarray(ids)], want[ids], rtol=1e-5, atol=1e-6)  # embedding lookup
    x = np.random.default_rng(15).normal(size=(N, D))
    np.testing.assert_allclose(jnp.asarray(x, jnp.float32) @ w.T, x @ want.T, rtol=1e-5, atol=1e-5)  # (N, V)
    assert w.T.shape == (D, V)


def test_adapter_dropout_zeroes_the_adapter_input_only():
    w = dataclasses.replace(random_lora_weight(16, D, F, 6, 0.9), dropout=0.4, dropout_key=jax.random.key(17))
    x = np.random.default_rng(18).normal(size=(N, D))
    keep = f64(jax.random.bernoulli(w.dropout_key, 0.6, (N, D)))
    assert 0 < keep.mean() < 1
    want = x @ f64(w.base) + 0.9 * ((x * keep / 0.6) @ f64(w.lora_a)) @ f64(w.lora_b)  # inverted dropout
    np.testing.assert_allclose(jnp.asarray(x, jnp.float32) @ w, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 10. two named adapters on one base


CFG_A = LoraConfig(rank=6, alpha=3.0, targets=("attn.q", "attn.v"), name="a")
CFG_B = LoraConfig(rank=8, alpha=12.0, targets=("attn.v", "mlp.fc"), name="b", use_rslora=True)
S_A, S_B = 3.0 / 6, 12.0 / math.sqrt(8)


@pytest.fixture(scope="module")
def stacked(base):
    params = lora.attach(base, CFG_A, key=jax.random.key(20))
    return randomize_adapters(lora.attach(params, CFG_B, key=jax.random.key(21)), seed=22)


def adapter_deltas(params):
    """{matrix name: {adapter name: s·A B in NumPy}} with the scales by hand."""
    out = {}
    for name, w in lora_sites(params).items():
        out[name] = {}
        while is_lora(w):
            out[name][w.name] = np_delta(w, {"a": S_A, "b": S_B}[w.name])
            w = w.base
    return out


def test_two_adapters_add_up(stacked, base, tokens):
    assert lora.adapter_names(stacked) == ["a", "b"]
    deltas = adapter_deltas(stacked)
    assert {n: sorted(d) for n, d in deltas.items()} == {
        **{f"blocks.{i}.attn.q.w": ["a"] for i in range(L)}, **{f"blocks.{i}.attn.v.w": ["a", "b"] for i in range(L)},
        **{f"blocks.{i}.mlp.fc.w": ["b"] for i in range(L)}}
    original = named_leaves(base)
    for weights in (None, {"a": 0.5, "b": 2.0}):
        merged = named_leaves(lora.merge(stacked, weights=weights))
        for name, per_adapter in deltas.items():
            want = f64(original[name]) + sum((weights or {}).get(a, 1.0) * d for a, d in per_adapter.items())
            np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-5, err_msg=f"{name} {weights}")
    # x @ W + s_a x A_a B_a + s_b x A_b B_b, through the model: unmerged == merged
    np.testing.assert_allclose(FORWARD(stacked, tokens, cfg=CFG), FORWARD(lora.merge(stacked), tokens, cfg=CFG),
                               rtol=1e-5, atol=1e-5)
    x = np.random.default_rng(23).normal(size=(N, D))
    v = stacked["blocks"][1]["attn"]["v"]["w"]
    d = deltas["blocks.1.attn.v.w"]
    want = x @ f64(original["blocks.1.attn.v.w"]) + x @ d["a"] + x @ d["b"]
    np.testing.assert_allclose(jnp.asarray(x, jnp.float32) @ v, want, rtol=1e-5, atol=1e-5)
    recovered = named_leaves(lora.unmerge(lora.merge(stacked), stacked))
    for name in deltas:
        np.testing.assert_allclose(recovered[name], original[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_split_by_adapter_name_trains_only_that_adapter(stacked):
    trainable, frozen = lora.split(stacked, CFG_A)
    names = set(named_leaves(trainable))
    want = set()
    for i in range(L):
        want |= {f"blocks.{i}.attn.q.w.lora_a", f"blocks.{i}.attn.q.w.lora_b",
                 f"blocks.{i}.attn.v.w.base.lora_a", f"blocks.{i}.attn.v.w.base.lora_b"}  # a lies under b on v
    assert names == want
    # one real step: a's B moves, b's leaves and the base do not
    opt_state = train.optimizer(TCFG).init(trainable)
    windows = jnp.asarray(np.random.default_rng(24).integers(0, V, (1, B, T + 1)), jnp.int32)
    new, _, _ = train.make_step(CFG, TCFG, lora.loss_fn)(trainable, frozen, opt_state, windows, jax.random.key(0))
    after = named_leaves(train.combine(new, frozen))
    for name, leaf in named_leaves(stacked).items():
        if name in want:
            assert not np.array_equal(after[name], leaf), name
        else:
            np.testing.assert_array_equal(after[name], leaf, err_msg=name)


def test_disable_one_adapter_or_all(stacked, base):
    only_b = lora.disable(stacked, "a")
    assert lora.adapter_names(only_b) == ["b"]
    original = named_leaves(base)
    deltas = adapter_deltas(stacked)
    merged = named_leaves(lora.merge(only_b))
    for name, per_adapter in deltas.items():
        want = f64(original[name]) + per_adapter.get("b", 0.0)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
    plain = lora.disable(stacked)
    assert jax.tree.structure(plain) == jax.tree.structure(base)
    for name, leaf in named_leaves(plain).items():
        np.testing.assert_array_equal(leaf, original[name], err_msg=name)


# ---------------------------------------------------------------- 9. bad input: one clear MinilmError each


@pytest.mark.parametrize("kwargs, words", [
    (dict(rank=0), "rank 0"),
    (dict(rank=-3), "rank -3"),
    (dict(rank_pattern={"mlp.*": 0}), r"rank 0 \(for mlp\.\*\)"),
    (dict(dropout=1.0), "dropout = 1.0"),
    (dict(init="xavier"), "init = 'xavier'"),
    (dict(bias="some"), "bias = 'some'"),
    (dict(targets=()), "targets is empty"),
    (dict(use_dora=True, init="pissa"), "use_dora with init=pissa"),
    (dict(fuse_qkv=True, init="pissa"), "fuse_qkv with init=pissa"),
    (dict(fuse_qkv="no"), "fuse_qkv = 'no' must be true or false"),
    (dict(use_dora=1), "use_dora = 1 must be true or false"),
    (dict(name="my adapter"), "name = 'my adapter'"),
])
def test_bad_lora_config(kwargs, words):
    with pytest.raises(MinilmError, match=words):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(rank=13, targets=("attn.q",)), r"rank 13 for blocks\.0\.attn\.q .*min\(d_in, d_out\) = 12"),
    (dict(rank=12, targets=("embed",)), r"rank 12 for embed .*= 11"),  # (V, D) = (11, 12)
    (dict(rank=2, targets=("mlp.fc",), rank_pattern={"mlp.fc": 49}), "rank 49"),
    (dict(targets=("attn.x",)), r"'attn\.x' matches no matrix; valid targets: all-linear, embed, attn\.q, attn\.k"),
    (dict(targets=("attn.q",), rank_pattern={"mlp.*": 2}), r"pattern 'mlp\.\*' matches none of the targets"),
    (dict(targets=("attn.q",), layers=(5,)), r"layers \[5\] do not exist.*blocks 0\.\.1"),
    (dict(targets=("embed",), use_dora=True), "DoRA is undefined on the tied embedding"),
    (dict(rank=2, targets=("attn.*",), rank_pattern={"attn.v": 3}, fuse_qkv=True),
     r"fuse_qkv: blocks\.0\.attn\.v has rank 3 but blocks\.0\.attn\.q has 2"),
    (dict(rank=2, targets=("embed", "attn.q", "mlp.*"), fuse_qkv=True), "adapt fewer than two of them"),
])
def test_bad_attach(kwargs, words, base):
    with pytest.raises(MinilmError, match=words):
        lora.attach(base, LoraConfig(**kwargs), key=jax.random.key(0))


@pytest.mark.parametrize("targets, modules, words", [
    # training a matrix in full *and* through an adapter on it: refused, however the matrix is named
    (("attn.q",), ("attn.q",), r"modules_to_save names blocks\.0\.attn\.q\.w, which has an adapter"),
    (("attn.q",), ("blocks.1.attn.q",), r"modules_to_save names blocks\.1\.attn\.q\.w, which has an adapter"),
    (("embed",), ("embed.tok",), r"modules_to_save names embed\.tok, which has an adapter"),
    (("embed",), ("embed",), r"modules_to_save names embed\.tok, which has an adapter"),
    (("attn.q",), ("ln_F",), r"modules_to_save \['ln_F'\] match no parameter"),
])
def test_bad_modules_to_save(targets, modules, words, base):
    cfg = LoraConfig(rank=2, targets=targets, modules_to_save=modules)
    with pytest.raises(MinilmError, match=words):
        lora.split(lora.attach(base, cfg, key=jax.random.key(0)), cfg)


def test_modules_to_save_and_bias_pick_exactly_the_named_tensors(base):
    cfg = LoraConfig(rank=2, targets=("attn.q",), modules_to_save=("blocks.*.ln1", "mlp.fc", "embed.pos"), bias="all")
    trainable, _ = lora.split(lora.attach(base, cfg, key=jax.random.key(0)), cfg)
    want = {"embed.pos"}
    for i in range(L):
        want |= {f"blocks.{i}.attn.q.w.lora_a", f"blocks.{i}.attn.q.w.lora_b", f"blocks.{i}.ln1.scale",
                 f"blocks.{i}.ln1.bias", f"blocks.{i}.mlp.fc.w"}
        want |= {f"blocks.{i}.{m}.b" for m in MATRICES}  # bias=all: every linear layer's bias
    assert set(named_leaves(trainable)) == want


def test_bad_attach_same_name_twice_and_weighted_dora_merge(base):
    params = lora.attach(base, LoraConfig(rank=2), key=jax.random.key(0))
    with pytest.raises(MinilmError, match="adapter named 'default' is already attached"):
        lora.attach(params, LoraConfig(rank=2), key=jax.random.key(1))
    dora = lora.attach(base, LoraConfig(rank=2, use_dora=True), key=jax.random.key(0))
    with pytest.raises(MinilmError, match=r"'default' is DoRA: it cannot be weighted \(0\.5\)"):
        lora.merge(dora, weights={"default": 0.5})


@pytest.mark.parametrize("spec, words", [
    ("rank=8,foo=1", "unknown option 'foo'"),
    ("rank=abc", "abc"),
    ("alpha=x1", "x1"),
    ("use_dora=maybe", "use_dora='maybe'"),
    ("rank_pattern=mlp.fc", "pattern:value.*'mlp.fc'"),
    ("rank=4,8", "'8' is not key=value"),
    ("rank=0", "rank 0"),
])
def test_bad_spec(spec, words):
    with pytest.raises(MinilmError, match=words):
        lora.parse_spec(spec)


def test_parse_spec_and_json_round_trip():
    cfg = lora.parse_spec("rank=4,alpha=8,targets=attn.q,attn.v,mlp.*,rank_pattern=mlp.*:3,attn.q:2,"
                          "alpha_pattern=attn.v:5,layers=0,1,use_rslora=true,dropout=0.1,init=gaussian,name=style,"
                          "fuse_qkv=yes")
    assert cfg == LoraConfig(rank=4, alpha=8.0, targets=("attn.q", "attn.v", "mlp.*"),
                             rank_pattern={"mlp.*": 3, "attn.q": 2}, alpha_pattern={"attn.v": 5.0},
                             layers=(0, 1), use_rslora=True, dropout=0.1, init="gaussian", name="style",
                             fuse_qkv=True)
    assert LoraConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


@pytest.fixture
def saved_adapter(base, tmp_path):
    cfg = LoraConfig(rank=6, targets=("attn.q", "attn.v"))
    lora.save_adapter(tmp_path / "ad", lora.attach(base, cfg, key=jax.random.key(0)), cfg, CFG)
    return tmp_path / "ad"


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_bad_adapter_files(saved_adapter, base):
    config = saved_adapter / "adapter_config.json"
    good = config.read_text()

    def refused(words):
        with pytest.raises(MinilmError, match=words):
            lora.load_adapter(saved_adapter, base, CFG)

    config.write_text("{not json")
    refused("adapter_config.json is not valid JSON")
    config.write_text(good)
    _edit_json(config, lambda d: d["lora"].update(foo=1))
    refused(r"unknown LoRA option\(s\) \['foo'\]")
    config.write_text(good)
    _edit_json(config, lambda d: d["lora"].update(rank=8))  # the arrays no longer fit the config
    refused(r"tensor 'blocks\.0\.attn\.q\.w\.lora_a' has shape \(12, 6\) but the config expects \(12, 8\)")
    config.write_text(good)
    _edit_json(config, lambda d: d.pop("base_model"))
    refused(r"must hold \{'lora'")
    config.write_text(good)
    (saved_adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    refused("adapter_model.safetensors does not match the SHA-256 recorded")
    _edit_json(config, lambda d: d.pop("sha256"))  # as an adapter saved before digests were recorded
    with pytest.warns(UserWarning, match="integrity and its base cannot be checked"):
        refused("adapter_model.safetensors is not a readable safetensors file")
    config.unlink()
    refused("adapter_config.json is missing")


@pytest.mark.parametrize("other, words", [
    (dict(vocab_size=13), "vocab_size: adapter 11 vs base 13"),
    (dict(width=16, heads=4), "width: adapter 12 vs base 16; heads: adapter 3 vs base 4"),
    (dict(layers=3), "layers: adapter 2 vs base 3"),
])
def test_adapter_on_a_different_base_is_refused(other, words, saved_adapter):
    other_cfg = dataclasses.replace(CFG, **other)
    other_base = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(other_cfg))
    with pytest.raises(MinilmError, match=re.escape(words)):
        lora.load_adapter(saved_adapter, other_base, other_cfg)
