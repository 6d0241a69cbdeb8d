"""Shared pieces of the benchmarks: a measured matmul peak (for MFU) and a summary table at the end.

Benchmarks are not part of `pytest -q` (pyproject.toml's testpaths is `tests`); run them with
`.venv/bin/python -m pytest benchmarks` (see benchmarks/README.md).
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import pytest

RESULTS: list[dict] = []  # one row per benchmarked case, in run order; printed by pytest_terminal_summary


@pytest.fixture(scope="session")
def results() -> list[dict]:
    return RESULTS


@pytest.fixture(scope="session")
def matmul_peak() -> float:
    """FLOP/s of a 1024x1024 float32 matmul on this machine (best of 10): the denominator of MFU.

    Measured rather than taken from a data sheet: what XLA's CPU GEMM reaches here is the ceiling a
    train step can hope for.
    """
    n = 1024
    a = jax.random.normal(jax.random.key(0), (n, n))
    b = jax.random.normal(jax.random.key(1), (n, n))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))  # compile
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _fmt(value, spec: str) -> str:
    """format(value, spec), or a dash as wide as the spec's width when there is no value."""
    return format(value, spec) if value is not None else "-".rjust(int(re.match(r"\d*", spec).group() or 0))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("train step: derived figures")
    head = (f"{'case':<28} {'ms/step':>9} {'tokens/s':>9} {'trainable':>11} {'opt bytes':>12} "
            f"{'GFLOP':>7} {'MFU':>5} {'t ratio':>7} {'F ratio':>7} {'others':>6}")
    tr.write_line(head)
    for r in RESULTS:
        tr.write_line(
            f"{r['case']:<28} {_fmt(r.get('ms_per_step'), '9.1f')} {_fmt(r.get('tokens_per_s'), '9,.0f')} "
            f"{r['trainable_params']:>11,} {r['optimizer_state_bytes']:>12,} "
            f"{_fmt(r.get('xla_flops') and r['xla_flops'] / 1e9, '7.2f')} {_fmt(r.get('mfu'), '5.2f')} "
            f"{_fmt(r.get('lora_full_time_ratio'), '7.2f')} {_fmt(r.get('lora_full_flops_ratio'), '7.2f')} "
            f"{_fmt(r.get('other_cpu_fraction'), '6.0%')}")
    tr.write_line("t ratio: this step's median time / the full step's on the same preset; "
                  "F ratio: the same for XLA's FLOP count;")
    tr.write_line("others: share of all CPUs used by other processes while this case was timed "
                  "(well above 0%: contended, times inflated)")
