"""What LoRA saves: XLA never computes dL/dW for a frozen W.

The LoRA train step differentiates the loss with respect to the adapters only (train.make_step over
`(trainable, frozen)`), so the weight-gradient matmul of a frozen matrix, x_inᵀ @ dY (d_in, d_out), is
never asked for. Checked three ways, each with the full fine-tuning step as the positive control:

    the jaxpr of the step (walked into every sub-jaxpr) has no dot_general that sums over the N tokens
    into a frozen matrix's shape (a weight gradient xᵀ dY); the compiled HLO has no such dot; and XLA's
    own FLOP count drops by at least the hand-counted weight-gradient FLOPs, 2 · N · d_in · d_out per
    frozen matrix. (The merged weight W + s·A B of lora.weight.adapted_matmul is a (d_in, d_out)
    product too, but it sums over the rank R, not over tokens.)

Sizes are pairwise distinct, so a frozen matrix's shape cannot be mistaken for an activation's:
    B 6, T 29 (tokens N = 174), H 4, K 10, D 40, F 160, V 13, L 2, R 1.
The steps are only traced and compiled, never run, so the width costs nothing; it is wide enough that
the rank-1 adapters' own work stays small beside the frozen weight gradients (ratio (6R + 4) / D).
Targets attn.* (q, k, v, o): every base matrix is frozen, the four attention ones (D, D) under an
adapter, the MLP's (D, F), (F, D) and the tied embedding (V, D) untouched. DoRA is left out on purpose:
its column norms need W + s·A B itself, a legitimate (d_in, d_out) matmul in the forward pass.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from minilm import train
from minilm.config import ModelConfig, TrainConfig
from minilm.model import param_shapes
from minilm.tree import partition, size

B, T, H, K, V, L, R = 6, 29, 4, 10, 13, 2, 1
D, F, N = H * K, 4 * H * K, B * T  # 40, 160, 174
CFG = ModelConfig(vocab_size=V, context=T + 2, width=D, heads=H, layers=L, mlp_ratio=4)
TCFG = TrainConfig(steps=10, batch_size=B, lr=1e-2, min_lr=1e-3, warmup=0.0)
LORA = lora.LoraConfig(rank=R, targets=("attn.*",))

ADAPTED = [(D, D)] * 4 * L                     # q, k, v, o in every block: frozen bases under adapters
UNTOUCHED = [(D, F), (F, D)] * L + [(V, D)]    # mlp.fc, mlp.proj, the tied embedding (its output use)
FROZEN_SHAPES = {(D, D), (D, F), (F, D), (V, D)}


def either_way(shapes) -> set[tuple[int, ...]]:
    """A weight gradient may be computed as dL/dW or as its transpose: match both orientations."""
    return {s for s in shapes if len(s) == 2} | {s[::-1] for s in shapes if len(s) == 2}


def flops_by_hand(shapes) -> int:
    """dL/dW = x_inᵀ @ dY: (d_in, N) @ (N, d_out), N · d_in · d_out multiply-adds, 2 · N · d_in · d_out FLOPs."""
    return sum(2 * N * d_in * d_out for d_in, d_out in shapes)


@pytest.fixture(scope="module")
def steps():
    """{'lora': (jitted step, args), 'full': (...)} for the same model, batch and optimizer."""
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), param_shapes(CFG))
    windows = jnp.asarray(rng.integers(0, V, (1, B, T + 1)), jnp.int32)  # (A, B, T + 1), one micro-batch
    opt = train.optimizer(TCFG)
    lora_trainable, lora_frozen = lora.split(lora.attach(base, LORA, key=jax.random.key(1)), LORA)
    full_trainable, full_frozen = partition(base, lambda name: True)
    return {
        "lora": (train.make_step(CFG, TCFG, lora.loss_fn),
                 (lora_trainable, lora_frozen, opt.init(lora_trainable), windows, jax.random.key(2))),
        "full": (train.make_step(CFG, TCFG),
                 (full_trainable, full_frozen, opt.init(full_trainable), windows, jax.random.key(2))),
    }


@pytest.fixture(scope="module")
def compiled(steps):
    return {kind: step.lower(*args).compile() for kind, (step, args) in steps.items()}


def dot_output_shapes(jaxpr, contracting: int | None = None) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr and, recursively, in every jaxpr inside it
    (jit/pjit, scan, cond branches, custom_jvp/custom_vjp, remat ...); with `contracting`, only the
    dots that sum over that many elements."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            summed = int(np.prod([eqn.invars[0].aval.shape[d] for d in lhs_contract]))
            if contracting is None or summed == contracting:
                shapes.extend(tuple(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    shapes.extend(dot_output_shapes(inner, contracting))
    return shapes


def test_the_walker_finds_dots_inside_scan_and_jit():
    def f(w, xs):
        return jax.lax.scan(lambda c, x: (c + jax.jit(jnp.dot)(x, w).sum(), None), 0.0, xs)[0]

    jaxpr = jax.make_jaxpr(jax.grad(f))(jnp.ones((3, 5)), jnp.ones((7, 2, 3)))
    assert not [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]  # all nested
    assert (3, 5) in either_way(dot_output_shapes(jaxpr.jaxpr))  # dL/dw, computed inside the scan


@pytest.mark.parametrize("micro_batches", [1, 2])  # 2: the gradients are taken inside a lax.scan
def test_lora_step_jaxpr_has_no_frozen_weight_gradient(steps, micro_batches):
    shapes = {}
    for kind, (step, (trainable, frozen, opt_state, windows, key)) in steps.items():
        windows = jnp.tile(windows, (micro_batches, 1, 1))  # (A, B, T + 1)
        jaxpr = jax.make_jaxpr(step)(trainable, frozen, opt_state, windows, key).jaxpr
        shapes[kind] = dot_output_shapes(jaxpr, contracting=N)  # sums over the tokens
    assert FROZEN_SHAPES <= either_way(shapes["full"])  # positive control: full FT computes every dL/dW
    assert not FROZEN_SHAPES & either_way(shapes["lora"]), sorted(set(shapes["lora"]))
    # what it does compute: per adapter dL/dB (R, D), and dL/dA (D, R) computed as its transpose
    # (lora.weight._transposed), so two (R, D) products summing over the tokens for each adapter
    assert sorted(shapes["lora"]) == [(R, D)] * 2 * len(ADAPTED), sorted(shapes["lora"])


def hlo_dot_shapes(hlo_text: str, contracting: int) -> set[tuple[int, ...]]:
    """Output shapes of the `dot` instructions in XLA's optimised HLO text that sum over `contracting`
    elements, e.g. `%dot.3 = f32[20,80]{1,0} dot(%a, %b), lhs_contracting_dims={0}, ...`. Operand
    shapes come from their own definitions (`%a = f32[174,20]{1,0} ...`) anywhere in the module."""
    dims = lambda text: tuple(int(d) for d in text.split(",") if d)
    shapes = {name: dims(d) for name, d in re.findall(r"%([\w.\-]+) = f32\[([\d,]*)\]", hlo_text)}
    found = set()
    for out, lhs, contract in re.findall(
            r"= f32\[([\d,]*)\](?:\{[^}]*\})? dot\(%([\w.\-]+), %[\w.\-]+\), lhs_contracting_dims=\{([\d,]*)\}",
            hlo_text):
        if int(np.prod([shapes[lhs][d] for d in dims(contract)])) == contracting:
            found.add(dims(out))
    return found


def test_lora_step_compiled_hlo_has_no_frozen_weight_gradient(compiled):
    shapes = {kind: hlo_dot_shapes(c.as_text(), contracting=N) for kind, c in compiled.items()}
    assert shapes["lora"], "no dot found: the HLO text format changed, fix hlo_dot_shapes"
    assert FROZEN_SHAPES <= either_way(shapes["full"])  # positive control
    assert not FROZEN_SHAPES & either_way(shapes["lora"]), sorted(shapes["lora"])


def xla_flops(compiled_step) -> float:
    cost = compiled_step.cost_analysis()
    if isinstance(cost, (list, tuple)):  # a list of one dict per computation in some JAX versions
        cost = cost[0]
    return float(cost["flops"])


def test_lora_step_saves_at_least_the_frozen_weight_gradient_flops(steps, compiled):
    """full − lora  >=  frozen dL/dW FLOPs − what the adapters add, all counted by hand.

    The bound is one-sided and needs no tolerance: every other difference between the two steps (Adam,
    the norm and clipping over the frozen parameters; the frozen biases' and LayerNorms' gradient
    reductions; the embedding's scatter-add) is work only the full step does, so it can only widen the
    gap. What LoRA adds is counted generously: per adapted (d_in, d_out) matrix, six rank-R matmuls
    (x A, (x A) B forward; dL/dB, dL/d(x A), dL/dA, dL/dx backward: 6 · N · R · (d_in + d_out) FLOPs),
    4 · N · (d_in + d_out) for scaling and adding, and 30 per adapter parameter for its Adam update.
    """
    full, low = xla_flops(compiled["full"]), xla_flops(compiled["lora"])
    frozen_weight_grads = flops_by_hand(ADAPTED + UNTOUCHED)
    adapter_params = sum(R * (d_in + d_out) for d_in, d_out in ADAPTED)
    adapter_cost = sum(6 * N * R * (d_in + d_out) + 4 * N * (d_in + d_out) for d_in, d_out in ADAPTED) \
        + 30 * adapter_params
    assert size(steps["lora"][1][0]) == adapter_params  # the hand count of what trains is right
    saved = full - low
    assert saved >= frozen_weight_grads - adapter_cost, (full, low, frozen_weight_grads, adapter_cost)
    # and the weight gradients are most of the saving, not a rounding error beside something else
    assert saved <= 1.5 * frozen_weight_grads, (saved, frozen_weight_grads)
    assert frozen_weight_grads > 0.2 * full  # at these sizes the frozen dL/dW are a real part of the step
