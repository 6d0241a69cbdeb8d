"""A speed trick for XLA on Linux CPUs: back big allocations with 2 MiB pages. Numerics are untouched.

XLA's CPU runtime allocates a step's temporaries afresh on every call (about 0.7 GB for a `small`
train step: activations kept for the backward pass, gradients, scratch), and Linux maps fresh memory
on first touch, one 4 KiB page at a time. Measured on 2 cores: ~150,000 page faults and ~0.3 s of
kernel time per ~1 s step. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent
huge pages (2 MiB, where /sys/kernel/mm/transparent_hugepage/enabled allows `madvise`): 512x fewer
faults, and the `small` full step went from ~1,030 to ~880 ms. PyTorch's CPU allocator is malloc too,
so benchmarks/peers/ gives both sides the same setting.

glibc reads tunables only when a process starts, so the CLI restarts itself once with the tunable
set (`minilm ...` and the experiment scripts; the Makefile exports it for everything it runs).
MINILM_HUGE_PAGES=0 turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def environment(env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) with the huge-page tunable added to GLIBC_TUNABLES."""
    env = dict(os.environ if env is None else env)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def useful() -> bool:
    """Would the tunable do anything here: Linux, glibc, transparent huge pages not disabled, not opted out?"""
    if sys.platform != "linux" or os.environ.get("MINILM_HUGE_PAGES", "1") == "0":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def missing() -> bool:
    """Would the tunable help here, and is this process running without it?"""
    return useful() and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")


def restart_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set; return at once if it is set
    already or would not help. Call it first thing in a program's entry point, before any work."""
    if not missing():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())
