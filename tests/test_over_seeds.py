"""experiments/common.over_seeds: seeds in several processes give the numbers of one process, bit for bit."""

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import common  # noqa: E402

SCRIPT = textwrap.dedent('''
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def step(w, x):  # a few gradient steps of a least-squares fit: real compiled work with reductions
        return w - 0.1 * jax.grad(lambda w: jnp.mean((x @ w - 1.0) ** 2))(w)

    def numbers(seed, scale):
        keys = jax.random.split(jax.random.key(seed))
        w, x = jax.random.normal(keys[0], (37, 5)), jax.random.normal(keys[1], (211, 37))
        for _ in range(20):
            w = step(w, x)
        return seed, np.asarray(w) * scale
''')


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("seeds") / "numbered_script.py"
    path.write_text(SCRIPT)
    import importlib.util
    spec = importlib.util.spec_from_file_location("numbered_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["numbered_script"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["numbered_script"]


def test_two_processes_give_the_numbers_of_one_in_seed_order(script):
    seeds = [5, 2, 9]
    alone = common.over_seeds(script.numbers, seeds, 3.0)
    parallel = common.over_seeds(script.numbers, seeds, 3.0, workers=2)
    assert [s for s, _ in parallel] == seeds
    for (_, a), (_, b) in zip(alone, parallel):
        np.testing.assert_array_equal(a, b)  # the same compiled program on the same numbers: bit for bit
    assert not np.array_equal(alone[0][1], alone[1][1])  # and the seeds differ


def test_workers_flag_names_the_range():
    p = common.parser("x", "runs/x", seeds=3)
    assert p.parse_args(["--workers", "1"]).workers == 1
    with pytest.raises(SystemExit):
        p.parse_args(["--workers", "0"])
    args = p.parse_args([])
    assert common.seed_list(args) == [0, 1, 2]  # the experiment's own default count
    assert common.seed_list(p.parse_args(["--quick"])) == [0, 1]
    assert common.seed_list(p.parse_args(["--seeds", "4,1"])) == [4, 1]
    assert "Default 3" in p.format_help()
