"""Shared pieces of the benchmarks: a measured matmul peak (for MFU) and a summary table at the end.

Benchmarks are not part of `pytest -q` (pyproject.toml's testpaths is `tests`); run them with
`.venv/bin/python -m pytest benchmarks` (see benchmarks/README.md).
"""

from __future__ import annotations

import re
import warnings

import pytest

import minilm.bench
from minilm import allocator

if allocator.missing():
    warnings.warn("GLIBC_TUNABLES lacks minilm/allocator.py's tunables: steps will be ~20% slower than "
                  "`make bench`", stacklevel=1)
elif allocator.tuned():
    allocator.run_inline()  # the step's memory comes from the heap glibc keeps

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
    return minilm.bench.matmul_peak()


@pytest.fixture(scope="session")
def bandwidth() -> float:
    """Bytes/s of a streaming elementwise op: the cost model's slope for non-matrix work."""
    return minilm.bench.memory_bandwidth()


def _fmt(value, spec: str) -> str:
    """format(value, spec), or a dash as wide as the spec's width when there is no value."""
    return format(value, spec) if value is not None else "-".rjust(int(re.match(r"\d*", spec).group() or 0))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("train step: derived figures")
    head = (f"{'case':<32} {'ms/step':>9} {'predicted':>9} {'tokens/s':>9} {'trainable':>11} {'opt bytes':>12} "
            f"{'GFLOP':>7} {'MFU':>5} {'t ratio':>7} {'F ratio':>7} {'others':>6}")
    tr.write_line(head)
    for r in RESULTS:
        tr.write_line(
            f"{r['case']:<32} {_fmt(r.get('ms_per_step'), '9.1f')} {_fmt(r['predicted']['ms_per_step'], '9.1f')} "
            f"{_fmt(r.get('tokens_per_s'), '9,.0f')} {r['trainable_params']:>11,} {r['optimizer_state_bytes']:>12,} "
            f"{r['model_flops'] / 1e9:7.2f} {_fmt(r.get('mfu'), '5.2f')} "
            f"{_fmt(r.get('lora_full_time_ratio'), '7.2f')} {_fmt(r.get('lora_full_flops_ratio'), '7.2f')} "
            f"{_fmt(r.get('other_cpu_fraction'), '6.0%')}")
    tr.write_line("predicted: minilm/cost.py's roofline (matrix FLOPs at the matmul peak + other work at memory "
                  "speed); GFLOP: the step's matrix-product FLOPs (cost.py, exact); MFU: those / time / peak;")
    tr.write_line("t ratio: this step's median time / the full step's on the same preset and dtype; "
                  "F ratio: the same for the FLOPs;")
    tr.write_line("others: share of all CPUs used by other processes while this case was timed "
                  "(well above 0%: contended, times inflated)")
