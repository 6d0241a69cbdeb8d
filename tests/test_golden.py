"""The golden state: this code, in float32, reproduces tests/golden/state.safetensors to float32 rounding.

The file (written by tests/golden/write_state.py, which says what it holds and when regenerating it is
legitimate) pins the logits, the loss, every gradient and the parameters after two in-place AdamW steps
of a fixed tiny model and batch, for full training and for LoRA. A speed-up that reorders sums passes;
one that changes the maths (a dropped term, a wrong transpose, a recompute that is not the same
function) fails, naming the tensor.

Tolerance, per tensor: |got - want| <= C · eps32 · max|want|, eps32 = 2^-23 ≈ 1.2e-7. The reference is
the float64 answer, so the difference is float32's own rounding error on whatever kernels this CPU
runs. Each output is a chain of about 20 rounded steps deep (forward through two blocks: LayerNorm,
products of length 12-66, softmax, GELU; the backward pass through them again; clipping and Adam),
each step's error growing with the square root of its sum's length; measured on the project's CPU,
the worst tensor is off by 6.5 eps32 · max|want|. C = 64 leaves ten times that for other CPUs'
summation orders, and is still tight enough that nudging one weight by 1e-4 fails 67 of the 142
tensors (tried, and not kept). Adam's step is the one place where rounding can be amplified: see
`_checked`.
"""

from __future__ import annotations

import numpy as np
import pytest
from golden.write_state import PATH, TCFG, compute
from safetensors.numpy import load_file

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
C = 64
AFTER_BOUND = 2 * TCFG.steps * TCFG.lr  # Adam moves an entry about lr per step, at most


@pytest.fixture(scope="module")
def golden():
    return load_file(str(PATH))


@pytest.fixture(scope="module")
def state():
    return compute()


def test_the_same_tensors(golden, state):
    assert sorted(state) == sorted(golden)
    for case in ("full", "fused", "separate"):  # each: its logits, loss, gradients and stepped parameters
        kinds = {name.split(".")[1] for name in golden if name.startswith(case + ".")}
        assert kinds == {"logits", "loss", "grad", "after"}, case


def _checked(name: str, golden) -> np.ndarray:
    """Which entries of `name` must match to float32 rounding: all, except, after the Adam steps, those
    whose first gradient is nearly 0. Adam moves an entry by lr · g / (|g| + 1e-8) (its first step), so for
    |g| near 1e-8 the move is decided by g's rounding error: a true 1e-9 with an error of 1e-9 moves
    anywhere between 0 and lr. Entries whose gradient is within 1e-3 of the tensor's largest are far
    from that (their error is about 1e-7 of the largest); the few that are not are only checked to have
    moved no further than Adam can (AFTER_BOUND)."""
    case, kind, *tensor = name.split(".", 2)
    if kind != "after":
        return np.ones(golden[name].shape, bool)
    grad = np.abs(golden[f"{case}.grad.{tensor[0]}"])
    return (grad == 0) | (grad >= 1e-3 * grad.max())  # 0 exactly: a position past T, never read


def test_every_tensor_matches_to_float32_rounding(golden, state):
    failures = []
    for name, want in golden.items():
        got = state[name]
        assert got.shape == want.shape and got.dtype == np.float32, name
        error = np.abs(got.astype(np.float64) - want)
        checked = _checked(name, golden)
        assert checked.mean() >= 0.95, name  # all but a few entries are held to rounding
        bound = C * EPS32 * float(np.max(np.abs(want)))
        worst = float(np.max(error[checked]))
        if not worst <= bound:
            failures.append(f"{name}: off by {worst:.3g} > {bound:.3g} ({worst / (EPS32 * np.max(np.abs(want))):.0f} "
                            f"eps32 · max|want|)")
        if np.any(error[~checked] > AFTER_BOUND):
            failures.append(f"{name}: an entry moved {np.max(error[~checked]):.3g} from its golden value")
    assert not failures, "\n".join(failures)
