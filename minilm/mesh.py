"""Training on a device mesh: data parallelism and fully sharded (ZeRO-3) state, with JAX's own machinery.

    --mesh data=4,fsdp=2     8 devices as a 4 x 2 grid with named axes

A mesh names the axes of a grid of devices (jax.make_mesh). Two axes, both data parallel:

* `data`: each row of devices reads its own part of the batch and holds whole copies of the state;
  the gradients are summed over it (an all-reduce).
* `fsdp`: the devices of a row read their own parts of the batch too, but split the parameters, the
  gradients and the optimizer state between them (ZeRO-3, Rajbhandari et al. 2020; PyTorch's FSDP): a
  layer's weight is gathered when it is used (an all-gather) and each device keeps only its slice of
  the gradient (a reduce-scatter), and updates only that slice of the weight and its Adam moments.

So the batch is split over data x fsdp, all of the devices. Where each array lives is a NamedSharding
(mesh + PartitionSpec) per leaf, chosen here by `param_spec` from the leaf's name and shape; the step
(minilm.train.make_step) pins its batch, gradients, parameters and optimizer state to these shardings
with `jax.lax.with_sharding_constraint`, and XLA's SPMD partitioner (GSPMD, Xu et al. 2021) writes
every collective. Nothing here moves bytes by hand.

The axes are Auto (`jax.sharding.AxisType.Auto`), not Explicit (jax.make_mesh's default): under Auto
axes the model's code runs unchanged and the partitioner propagates shardings through it; under
Explicit axes every operation must say how its output is sharded, and the embedding gather
`tok[tokens]` fails for lack of one. The maths is the same either way; only the order of float32 sums
differs from one device (the gradient sum over devices), so losses agree to rounding, not bit for bit.

Parameter rules live here; a LoRA adapter's rule (lora/mesh.py) wraps `param_spec`. The many-process
start (`jax.distributed`) is `start_processes`; with it each process holds the devices of its own
machine, feeds them its own part of each batch (`place_batch`) and gathers sharded arrays (`gather`)
before process 0 writes them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from minilm.errors import MinilmError
from minilm.tree import path_name

AXES = ("data", "fsdp")  # the mesh's axis names, in order: rows of replicas, devices that split the state
BATCH = AXES             # the batch axis is split over both: every device reads its own windows
EXAMPLE = "data=4,fsdp=2"


# ---------------------------------------------------------------- the mesh


def parse_mesh(text: str) -> dict[str, int]:
    """'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2}; an axis left out has size 1."""
    sizes = {axis: 1 for axis in AXES}
    seen = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not match:
            raise MinilmError(f"--mesh {text!r}: expected AXIS=SIZE pairs separated by commas, e.g. {EXAMPLE}")
        axis, value = match.group(1), int(match.group(2))
        if axis not in AXES:
            raise MinilmError(f"--mesh {text!r}: unknown axis {axis!r}; the axes are {' and '.join(AXES)}, "
                              f"e.g. {EXAMPLE}")
        if axis in seen:
            raise MinilmError(f"--mesh {text!r}: axis {axis!r} is given twice; give each axis once, e.g. {EXAMPLE}")
        if value < 1:
            raise MinilmError(f"--mesh {text!r}: axis {axis!r} has size {value}; sizes are whole numbers >= 1")
        seen.add(axis)
        sizes[axis] = value
    return sizes


def make_mesh(sizes: dict[str, int], batch_size: int) -> jax.sharding.Mesh:
    """The (data, fsdp) mesh over all devices of all processes; checks the device count and the batch."""
    wanted = sizes["data"] * sizes["fsdp"]
    spec = ",".join(f"{a}={sizes[a]}" for a in AXES)
    if batch_size % wanted:
        raise MinilmError(f"--batch-size {batch_size} is not divisible by the {wanted} devices of --mesh {spec}: "
                          f"the batch is split over data x fsdp; choose a batch size that is a multiple of {wanted}")
    if wanted != jax.device_count():
        more = "more devices than exist" if wanted > jax.device_count() else "fewer devices than exist"
        raise MinilmError(f"--mesh {spec} needs {wanted} devices ({more}): JAX sees {jax.device_count()} "
                          f"{jax.default_backend()} device(s) in {jax.process_count()} process(es); give axes whose "
                          f"sizes multiply to {jax.device_count()} (on CPU, XLA_FLAGS="
                          f"--xla_force_host_platform_device_count=N emulates N devices)")
    return jax.make_mesh((sizes["data"], sizes["fsdp"]), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


# ---------------------------------------------------------------- where each array lives


def param_spec(name: str, shape: tuple[int, ...], fsdp: int) -> P:
    """ZeRO-3: split a parameter (and so its gradient and Adam moments, which share its shape) over `fsdp`
    along its longest axis that divides evenly (the first such, on a tie); keep it whole when none does
    (scalars, LayerNorm vectors of odd width). Each device then holds ~1/fsdp of the model's state."""
    candidates = [i for i, n in enumerate(shape) if fsdp > 1 and n % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    return P(*(("fsdp" if i == axis else None) for i in range(len(shape))))


@dataclass(frozen=True)
class Layout:
    """A mesh and the rule that says where each parameter-shaped leaf lives on it.

    rule(name, shape, fsdp) -> PartitionSpec, `name` a dotted leaf name. The optimizer state's leaves are
    named after the parameters they belong to (`1.0.mu.blocks.0.attn.q.w`), so one rule serves both."""

    mesh: jax.sharding.Mesh
    rule: Callable[[str, tuple, int], P] = param_spec

    @property
    def devices(self) -> int:
        return self.mesh.size

    def sharding(self, name: str, shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.rule(name, tuple(shape), self.mesh.shape["fsdp"]))

    def shardings(self, tree):
        """A NamedSharding per array leaf of `tree` (arrays, tracers or ShapeDtypeStructs)."""
        return jax.tree_util.tree_map_with_path(lambda p, x: self.sharding(path_name(p), x.shape), tree)

    def constrain(self, tree):
        """Inside a jit'ed function: pin every leaf of `tree` to its sharding (XLA adds the collectives)."""
        return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

    def gathered(self, tree):
        """Inside a jit'ed function: `tree` whole on every device (an all-gather of what is split).

        The step computes on gathered weights. Left to itself the partitioner may instead split the
        activations along the weights' split axis (tensor parallelism) and move activations to and fro;
        measured on `tiny` at data=4,fsdp=2: ~17x the bytes of gathering the weights once. The price: the
        whole model is gathered for the step (its persistent state stays split), where PyTorch's FSDP
        gathers one layer at a time."""
        return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: NamedSharding(self.mesh, P()), tree))

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Micro-batches (A, B, T + 1): B split over every device, A and T whole."""
        return NamedSharding(self.mesh, P(None, BATCH, *([None] * (ndim - 2))))

    def constrain_batch(self, windows):
        return jax.lax.with_sharding_constraint(windows, self.batch_sharding(windows.ndim))

    def place(self, tree):
        """Host or single-device arrays (the same on every process) -> global arrays sharded by the rule.
        Each process builds only the slices its own devices hold."""
        def one(path, x):
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                # a PRNG key, replicated: placed as its raw uint32 words (device_put cannot reach other
                # processes' devices), then typed as a key again
                words = np.asarray(jax.random.key_data(x))
                placed = jax.make_array_from_callback(words.shape, NamedSharding(self.mesh, P()), lambda i: words[i])
                return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x))
            host = np.asarray(x)
            sharding = self.sharding(path_name(path), host.shape)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.tree_util.tree_map_with_path(one, tree)

    def place_batch(self, windows) -> jax.Array:
        """The whole batch, computed alike on every process (data.batches: a function of the seed and the
        cursor, so a resumed run reads the same windows) -> a global array of which each process builds
        only its own devices' rows: its own part of the batch."""
        host = np.asarray(windows)
        return jax.make_array_from_callback(host.shape, self.batch_sharding(host.ndim), lambda index: host[index])

    def gather(self, tree):
        """Sharded global arrays -> whole NumPy arrays on every process (a collective: every process calls it)."""
        if jax.process_count() == 1:
            return jax.tree.map(np.asarray, tree)
        from jax.experimental import multihost_utils
        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)

    def bytes_per_device(self, tree) -> int:
        """Bytes of `tree` that one device holds under this layout: exact, from the shardings' shard shapes."""
        total = 0
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shard = self.sharding(path_name(path), x.shape).shard_shape(tuple(x.shape))
            total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        return total


# ---------------------------------------------------------------- many processes


DISTRIBUTED_ENV = {"coordinator": "MINILM_COORDINATOR", "num_processes": "MINILM_NUM_PROCESSES",
                   "process_id": "MINILM_PROCESS_ID"}


def start_processes(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """jax.distributed.initialize from flags, or else the MINILM_COORDINATOR, MINILM_NUM_PROCESSES and
    MINILM_PROCESS_ID environment variables. Nothing given: one process, nothing to do (False).

    Each process then sees every process's devices (jax.devices()) and drives its own (jax.local_devices());
    on CPU their collectives go over TCP (gloo, JAX's default CPU collectives)."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, env in DISTRIBUTED_ENV.items():
        if given[key] is None and os.environ.get(env):
            given[key] = os.environ[env]
    if all(v is None for v in given.values()):
        return False
    missing = [f"--{k.replace('_', '-')} (or {DISTRIBUTED_ENV[k]})" for k, v in given.items() if v is None]
    if missing:
        raise MinilmError(f"a run over several processes needs all of --coordinator, --num-processes and "
                          f"--process-id; missing {', '.join(missing)}")
    try:
        count, index = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise MinilmError(f"--num-processes {given['num_processes']!r} and --process-id {given['process_id']!r} "
                          f"must be whole numbers") from None
    if count < 1 or not 0 <= index < count:
        raise MinilmError(f"--process-id {index} with --num-processes {count}: the id must be in 0..{count - 1}")
    if not re.fullmatch(r"[^:\s]+:\d+", str(given["coordinator"])):
        raise MinilmError(f"--coordinator {given['coordinator']!r}: expected HOST:PORT of process 0, "
                          f"e.g. 10.0.0.1:1234")
    jax.distributed.initialize(given["coordinator"], num_processes=count, process_id=index)
    return True


def is_writer() -> bool:
    """Process 0 holds the folder lock and writes checkpoints and metrics; the others write nothing."""
    return jax.process_index() == 0
