"""The flags of a run on a device mesh and over several processes, shared by train, finetune and bench.

    --mesh data=4,fsdp=2                                  the devices as a named grid (minilm/mesh.py)
    --coordinator HOST:PORT --num-processes N --process-id I   one process per machine (jax.distributed)

The three process flags may come from the environment instead (MINILM_COORDINATOR, MINILM_NUM_PROCESSES,
MINILM_PROCESS_ID), so one command line serves every process of a job. They must be read before JAX
touches a device: `start` is the first thing a command's `run` does.
"""

from __future__ import annotations


def add_mesh_flags(parser, *, processes: bool = True) -> None:
    group = parser.add_argument_group("devices")
    group.add_argument("--mesh", metavar="SPEC",
                       help="train on a mesh of devices, e.g. data=4,fsdp=2: the batch split over all of them, the "
                            "parameters, gradients and optimizer state split over fsdp (ZeRO-3); the sizes multiply "
                            "to the number of devices (default: one device)")
    if processes:
        group.add_argument("--coordinator", metavar="HOST:PORT",
                           help="with several processes (one per machine): process 0's address (or MINILM_COORDINATOR)")
        group.add_argument("--num-processes", type=int, metavar="N",
                           help="with several processes: how many (or MINILM_NUM_PROCESSES)")
        group.add_argument("--process-id", type=int, metavar="I",
                           help="with several processes: this one's number, 0..N-1; 0 writes every file "
                                "(or MINILM_PROCESS_ID)")


def start(args) -> bool:
    """Join the other processes, if the flags or environment name them; True if this is one of several."""
    from minilm.mesh import start_processes

    return start_processes(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                           getattr(args, "process_id", None))


def layout(args, batch_size: int, rule=None):
    """The minilm.mesh.Layout that --mesh asks for (with `rule`, e.g. LoRA's), or None for one device.
    Several processes without --mesh: all their devices as one data-parallel axis."""
    import jax

    from minilm import mesh

    if args.mesh is None and jax.process_count() == 1:
        return None
    sizes = mesh.parse_mesh(args.mesh) if args.mesh is not None else {"data": jax.device_count(), "fsdp": 1}
    return mesh.Layout(mesh.make_mesh(sizes, batch_size), rule or mesh.param_spec)

