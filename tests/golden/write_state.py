"""Writes tests/golden/state.safetensors, the golden state tests/test_golden.py compares against.

In the spirit of llm.c's `write_state` (Karpathy, train_gpt2.py, which saves the logits, loss and
gradients of a fixed model and batch for the C code to match): for one fixed tiny model and one fixed
batch, the file holds, for full training ("full") and for two LoRA configurations ("fused", "separate"),

    <case>.logits        (B, T, V)   the model's output
    <case>.loss          ()          the training loss (minilm.train.loss_fn, lora.loss_fn)
    <case>.grad.<name>               every gradient of the trainable parameters
    <case>.after.<name>              the trainable parameters after two AdamW steps of
                                     minilm.train.make_step(donate=True), the in-place step training uses

so that every speed trick on the way is pinned: activations flattened to (B·T, D), attention in query
blocks (T = 66 > QUERY_BLOCK = 64, so two blocks), the GELU recomputed in the backward pass, LoRA's
hand-written backward with its transposed thin factor, a shared A (fuse_qkv), the adapted tied
embedding, gradient clipping and the donated step. A later change that alters the maths fails loudly.
Full training trains every parameter but the key biases (see `inputs`). About 90 KiB: 20,000 float32
numbers, most of them logits (T = 66 for the two query blocks) and the full model's gradients and
stepped parameters.

The values are computed by the same code run in float64 (JAX's x64 mode) and stored rounded to
float32: the reference is then the exact answer to float32 rounding, not the accident of one CPU's
kernel choices, and the test, run in float32 anywhere, is within float32 rounding of it.

The inputs are not stored: `inputs()` rebuilds them from NumPy's legacy RandomState, whose stream
NumPy keeps fixed across versions, using only its uniform draws (exact arithmetic: no libm function).

When regenerating is legitimate: only when the maths of the model, of training or of LoRA changes on
purpose (a new term, another initialisation of what is stored here, another optimizer), or when the
inputs below are changed on purpose. Never to make a failing test pass: a failure means the numbers
changed, which is what this test exists to catch; find out why first. The commit that regenerates the
file must say why the numbers changed.

    .venv/bin/python tests/golden/write_state.py
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

import lora
from lora import LoraConfig, LoraWeight
from minilm import train
from minilm.config import ModelConfig, TrainConfig
from minilm.model import forward, param_shapes
from minilm.tree import combine, named_leaves, partition

PATH = Path(__file__).resolve().parent / "state.safetensors"

# Pairwise distinct, so a swapped axis cannot pass: L 2, H 3, K 4, B 5, R 6, V 7, D 12, F 24, T 66, context 69.
B, T, H, K, V, L, R, CONTEXT = 5, 66, 3, 4, 7, 2, 6, 69
D = H * K  # 12
CFG = ModelConfig(vocab_size=V, context=CONTEXT, width=D, heads=H, layers=L, mlp_ratio=2)  # F = 24
TCFG = TrainConfig(steps=2, batch_size=B, lr=1e-2, min_lr=1e-3, warmup=0.0, weight_decay=0.1, grad_clip=1.0)
LORA = {
    # every block matrix; q, k and v share one A (LoRA on the stacked [W_q W_k W_v])
    "fused": LoraConfig(rank=R, alpha=4.0, targets=("all-linear",), fuse_qkv=True),
    # separate adapters, among them the tied embedding (rows looked up, and the output projection)
    "separate": LoraConfig(rank=R, alpha=9.0, targets=("embed", "attn.q", "attn.v", "mlp.proj")),
}


def _uniform(rng: np.random.RandomState, shape, std: float) -> np.ndarray:
    """Uniform values with mean 0 and standard deviation `std`, as float32."""
    return (std * np.sqrt(3.0) * rng.uniform(-1.0, 1.0, shape)).astype(np.float32)


def _order_one(params, rng):
    """Every leaf of the tree a random value of order one (as tests/helpers.scrambled): at init's 0.02
    scale every block is nearly the identity, and the golden numbers would barely depend on them."""
    def leaf(name, x):
        if name.endswith(".w"):
            return _uniform(rng, x.shape, 1 / np.sqrt(x.shape[0]))  # keeps activations O(1)
        if name.endswith(".scale"):
            return 1.0 + _uniform(rng, x.shape, 0.3)
        if name.startswith("embed."):
            return _uniform(rng, x.shape, 0.7)
        return _uniform(rng, x.shape, 0.2)  # biases and LayerNorm shifts

    leaves = named_leaves(params)
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf(n, x)) for n, x in leaves.items()])


def inputs():
    """{case: (trainable, frozen, loss)} and the batch windows (B, T + 1), all float32 / int32."""
    rng = np.random.RandomState(14)
    base = _order_one(param_shapes(CFG), rng)
    windows = jnp.asarray(rng.randint(0, V, (B, T + 1)), jnp.int32)
    # Full training trains everything but the key biases: their gradient is exactly 0 (each adds q·b to a
    # whole row of scores, which softmax ignores), so in float32 it is rounding noise, which Adam's step
    # (g / (|g| + eps)) would turn into a machine-dependent move of size lr.
    cases = {"full": (*partition(base, lambda name: not name.endswith("attn.k.b")), train.loss_fn)}
    for case, cfg in LORA.items():
        attached = lora.attach(base, cfg, key=jax.random.key(0))

        def random_adapter(w):  # A and B random (B starts at 0 in attach): gradients reach everything
            if not isinstance(w, LoraWeight):
                return w
            a = None if w.a_from else jnp.asarray(_uniform(rng, w.lora_a.shape, 1 / np.sqrt(w.shape[0])))
            return replace(w, lora_a=a, lora_b=jnp.asarray(_uniform(rng, w.lora_b.shape, 1 / np.sqrt(R))))

        adapted = jax.tree.map(random_adapter, attached, is_leaf=lambda x: isinstance(x, LoraWeight))
        cases[case] = (*lora.split(lora.fill_shared_a(adapted), cfg), lora.loss_fn)
    return cases, windows


def compute(dtype=jnp.float32) -> dict[str, np.ndarray]:
    """The golden state's tensors, computed in `dtype` (float64 needs JAX's x64 mode)."""
    cases, windows = inputs()
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731
    out = {}
    for case, (trainable, frozen, loss) in cases.items():
        trainable, frozen = cast(trainable), cast(frozen)

        @jax.jit
        def evaluate(trainable, frozen, windows):
            params = lora.fill_shared_a(combine(trainable, frozen))  # a no-op without adapters
            return forward(params, windows[:, :-1], CFG), jax.value_and_grad(loss)(trainable, frozen, windows, CFG)

        logits, (loss_value, grads) = evaluate(trainable, frozen, windows)
        out[f"{case}.logits"], out[f"{case}.loss"] = logits, loss_value
        out |= {f"{case}.grad.{n}": g for n, g in named_leaves(grads).items()}

        step = train.make_step(CFG, TCFG, loss, donate=True)
        trainable = jax.tree.map(jnp.copy, trainable)  # donated below: the step writes into these buffers
        opt_state = train.optimizer(TCFG).init(trainable)
        for i in range(TCFG.steps):  # the same batch twice
            trainable, opt_state, _ = step(trainable, frozen, opt_state, windows[None], jax.random.key(i))
        out |= {f"{case}.after.{n}": x for n, x in named_leaves(trainable).items()}
    return {name: np.asarray(x) for name, x in out.items()}


def main() -> None:
    with jax.enable_x64(True):
        state = compute(jnp.float64)
    tmp = PATH.with_suffix(".tmp")
    save_file({name: x.astype(np.float32) for name, x in state.items()}, str(tmp),
              metadata={"written_by": "tests/golden/write_state.py", "computed_in": "float64"})
    tmp.chmod(0o644)
    os.replace(tmp, PATH)  # atomic: a reader sees the old file or the new one, never half of one
    print(f"wrote {PATH} ({PATH.stat().st_size / 1024:.1f} KiB, {len(state)} tensors)")


if __name__ == "__main__":
    main()
