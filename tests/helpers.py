"""Test helpers shared by several test files."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minilm.tree import path_name


def scrambled(params, seed: int, embed_std: float = 0.7):
    """Same tree, every leaf replaced by a random value of order one (float32).

    At GPT-2's 0.02 initialisation every block is nearly the identity and attention nearly uniform, so a
    comparison against a reference would be weak; these values exercise every term.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path_name(path)
        if name.endswith(".w"):
            value = rng.normal(0.0, 1.0 / math.sqrt(x.shape[0]), x.shape)  # keeps activations O(1)
        elif name.endswith(".scale"):
            value = 1.0 + 0.3 * rng.normal(size=x.shape)
        elif name.startswith("embed."):
            value = embed_std * rng.normal(size=x.shape)
        else:  # biases and LayerNorm shifts
            value = 0.2 * rng.normal(size=x.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, params)


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load_experiment(name: str):
    """An experiment script as a module (their names start with a digit, so `import` cannot)."""
    sys.path.insert(0, str(EXPERIMENTS))  # for their `import common`
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(module, out: Path) -> dict:
    """Run an experiment's main() in --quick mode into `out`; its metrics.json."""
    assert module.main(["--quick", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())

