"""One optimizer step, full fine-tuning vs LoRA, on the tiny and small presets.

Each case builds the model of a preset (vocabulary 65, shakespeare-char's size), splits its parameters
into (trainable, frozen) -- everything trainable for full fine-tuning, only the adapters for LoRA --
and times `minilm.train.make_step`'s compiled step on one batch of random tokens of the preset's shape
(grad_accum x batch_size x (context + 1)). Compilation and a warm-up call happen before the timed
rounds; every timed call ends in `jax.block_until_ready`.

Figures in `benchmark.extra_info` (and in the summary table at the end of the run):

  ms_per_step            median wall time of one step (ms_per_step_min: the fastest round)
  tokens_per_s           predicted tokens per step (grad_accum * batch_size * context) / median time
  trainable_params       scalars that get a gradient and optimizer state
  total_params           all scalars the step reads (base model + adapters)
  optimizer_state_bytes  bytes of AdamW's state (two moments per trainable scalar + step counters)
  xla_flops              FLOPs of the compiled step, from XLA's cost analysis
  xla_bytes_accessed     bytes the compiled step reads and writes, from the same analysis
  xla_temp_bytes         XLA's scratch buffers for the step (activations kept for the backward pass...)
  mfu                    xla_flops / median time / a measured 1024^3 float32 matmul's FLOP/s
  lora_full_time_ratio   this step's median / the full step's median on the same preset
  lora_full_flops_ratio  this step's xla_flops / the full step's
  other_cpu_fraction     share of the machine's CPU time used by *other* processes during the timed
                         rounds (Linux only): well above 0, something competed and the times are inflated

The ratios need the full case of the same preset to have run first in the same session (cases run in
the order listed below, full first); selecting a LoRA case alone with -k leaves them out.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time

import jax
import pytest

import lora
import minilm.config
import minilm.model
import minilm.train
import minilm.tree

VOCAB_SIZE = 65  # shakespeare-char's vocabulary (the associations corpus would be 122)
ROUNDS = {"tiny": 50, "small": 5}  # a small step takes ~1-2 s on 2 CPU cores, a tiny one ~10-50 ms
RANKS = (1, 8, 64)  # rank 64 on tiny (width 64) is full rank for the attention matrices: allowed
TARGETS = {"attn-qv": ("attn.q", "attn.v"), "attn-all": ("attn.*",), "all-linear": ("all-linear",)}


def _case_id(preset, rank, targets) -> str:
    if rank is None:
        return f"{preset}-full"
    name = next(k for k, v in TARGETS.items() if v == targets)
    return f"{preset}-lora-r{rank}-{name}"


CASES = [pytest.param(preset, rank, targets, id=_case_id(preset, rank, targets))
         for preset in ("tiny", "small")
         for rank, targets in [(None, None)] + [(r, t) for r in RANKS for t in TARGETS.values()]]

FULL = {}  # preset -> {"ms": median ms of the full step, "flops": its XLA FLOPs}, filled by the full cases


def _setup(preset: str, rank: int | None, targets: tuple[str, ...] | None):
    model_cfg, train_cfg = minilm.config.preset(preset)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=VOCAB_SIZE)
    params = minilm.model.init(model_cfg, key=jax.random.key(0))
    if rank is None:
        trainable, frozen = minilm.tree.partition(params, lambda name: True)
        loss = minilm.train.loss_fn
    else:
        cfg = lora.LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
        adapted = lora.attach(params, cfg, key=jax.random.key(1))
        trainable, frozen = lora.split(adapted, cfg)
        loss = lora.loss_fn
    step = minilm.train.make_step(model_cfg, train_cfg, loss)
    opt_state = minilm.train.optimizer(train_cfg).init(trainable)
    shape = (train_cfg.grad_accum, train_cfg.batch_size, model_cfg.context + 1)
    windows = jax.random.randint(jax.random.key(3), shape, 0, VOCAB_SIZE)
    tokens_per_step = train_cfg.grad_accum * train_cfg.batch_size * model_cfg.context
    return step, (trainable, frozen, opt_state, windows, jax.random.key(2)), tokens_per_step


def _cost(compiled) -> dict:
    """XLA's cost analysis as one dict (older JAX returns a list with one dict per device)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _cpu_times():
    """(wall s, CPU s busy on the whole machine, CPU s used by this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system [idle iowait] irq softirq steal
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def _other_cpu_fraction(before, after) -> float | None:
    if before is None or after is None:
        return None
    wall = after[0] - before[0]
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (wall * os.cpu_count()))


def _nbytes(tree) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset, rank, targets", CASES)
def test_train_step(benchmark, results, matmul_peak, preset, rank, targets):
    step, args, tokens_per_step = _setup(preset, rank, targets)
    trainable, frozen, opt_state = args[:3]

    start = time.perf_counter()
    compiled = step.lower(*args).compile()  # for the cost figures; jit's cache shares it
    compile_s = time.perf_counter() - start
    cost = _cost(compiled)
    memory = compiled.memory_analysis()
    jax.block_until_ready(step(*args))  # compiled (cache hit) and warm before any timing
    jax.block_until_ready(step(*args))

    def one_step():
        return jax.block_until_ready(step(*args))

    before = _cpu_times()
    benchmark.pedantic(one_step, rounds=ROUNDS[preset], iterations=1, warmup_rounds=1)
    other_cpu = _other_cpu_fraction(before, _cpu_times())

    flops = cost.get("flops")
    info = {
        "preset": preset,
        "method": "full" if rank is None else "lora",
        "rank": rank,
        "targets": None if targets is None else ",".join(targets),
        "vocab_size": VOCAB_SIZE,
        "tokens_per_step": tokens_per_step,
        "trainable_params": minilm.tree.size(trainable),
        "total_params": minilm.tree.size(trainable) + minilm.tree.size(frozen),
        "optimizer_state_bytes": _nbytes(opt_state),
        "xla_flops": flops,
        "xla_bytes_accessed": cost.get("bytes accessed"),
        "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "compile_s": compile_s,
        "matmul_peak_gflops": matmul_peak / 1e9,
        "other_cpu_fraction": other_cpu,
    }
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable: no timings to derive from
    if stats is not None:
        median = stats.stats.median
        info["ms_per_step"] = median * 1e3
        info["ms_per_step_min"] = stats.stats.min * 1e3  # less sensitive to other processes on the CPUs
        info["tokens_per_s"] = tokens_per_step / median
        if flops:
            info["mfu"] = flops / median / matmul_peak
    if rank is None:
        FULL[preset] = {"ms": info.get("ms_per_step"), "flops": flops}
    elif preset in FULL:
        full = FULL[preset]
        if full["ms"] and "ms_per_step" in info:
            info["lora_full_time_ratio"] = info["ms_per_step"] / full["ms"]
        if full["flops"] and flops:
            info["lora_full_flops_ratio"] = flops / full["flops"]
    benchmark.extra_info.update(info)
    results.append({"case": _case_id(preset, rank, targets), **info})
