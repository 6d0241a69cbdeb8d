"""A speed trick for XLA on Linux CPUs: where a step's working memory comes from. Numerics are untouched.

XLA's CPU runtime allocates a step's temporaries afresh on every call, as one block (528 MiB for a
`small` train step: activations kept for the backward pass, gradients, scratch) that it frees when the
step ends. glibc serves a block that big with mmap and hands it back with munmap, so every step Linux
maps fresh memory and zeroes it on first touch. Three settings fix that, measured on 2 cores:

1. `glibc.malloc.hugetlb=1`: malloc asks for 2 MiB transparent huge pages, so the fresh memory arrives
   in 512x fewer page faults: ~150,000 -> ~300 faults per step, and the `small` full step went from
   ~1,030 to ~880 ms. The kernel still zeroes all 528 MiB every step: ~5-10% of the CPU time.
2. `glibc.malloc.mmap_max=0` and a trim threshold of 64 GiB: glibc takes big blocks from its heap and
   keeps them there once freed, so the next step gets the same memory back, already mapped: ~0 faults,
   no zeroing. The price: the process keeps its peak memory until it exits.
3. JAX runs CPU computations on the calling thread (`jax_cpu_enable_async_dispatch=False`, `run_inline`).
   With asynchronous dispatch a worker thread allocates the block, from glibc's arena for that thread;
   such an arena cannot hold a block that big, and glibc falls back to mmap whatever 2. says.

2 and 3 together: the `small` full step 0.93-0.97x the time of 1 alone (5 alternated process pairs),
with ~0 instead of ~500 page faults and ~5 instead of 50-180 ms of kernel time per step. PyTorch's CPU
allocator is malloc too, so benchmarks/peers/ gives both sides the same tunables (PyTorch gains as much).

glibc reads tunables only when a process starts, so the CLI restarts itself once with them set
(`minilm ...` and the experiment scripts; the Makefile exports them for everything it runs).
MINILM_MALLOC_TUNING=0 turns this off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = {"glibc.malloc.hugetlb": "1",                       # 1. huge pages
            "glibc.malloc.mmap_max": "0",                      # 2. big blocks from the heap ...
            "glibc.malloc.trim_threshold": str(64 << 30)}      # ... kept there when freed


def _given(env) -> list[str]:
    return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def _names(tunables: list[str]) -> set[str]:
    return {t.partition("=")[0] for t in tunables}


def environment(env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) with each of TUNABLES added to GLIBC_TUNABLES, unless set already."""
    env = dict(os.environ if env is None else env)
    given = _given(env)
    env["GLIBC_TUNABLES"] = ":".join(given + [f"{k}={v}" for k, v in TUNABLES.items() if k not in _names(given)])
    return env


def useful() -> bool:
    """Would the tunables do anything here: Linux with glibc, not opted out?"""
    return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
            and os.environ.get("MINILM_MALLOC_TUNING", "1") != "0")


def missing() -> bool:
    """Would the tunables help here, and is this process running without one of them?"""
    return useful() and not TUNABLES.keys() <= _names(_given(os.environ))


def tuned() -> bool:
    """Is this process running with the tunables, where they help? (Then it should also `run_inline`.)"""
    return useful() and not missing()


def restart_with_tunables() -> None:
    """Replace this process by the same command with the tunables set, and run JAX inline (`run_inline`);
    return at once if they are set already or would not help. Call it first thing in a program's entry
    point, before any work."""
    if missing():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())
    if tuned():
        run_inline()


def run_inline() -> None:
    """Run JAX's CPU computations on the calling thread, so the step's memory comes from the heap glibc
    keeps (3. above). Must come before the first computation: JAX reads it when it creates its CPU client."""
    import jax
    from jax._src import xla_bridge  # JAX has no public "has a backend been created?"

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("run_inline() must be called before JAX's first computation")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
