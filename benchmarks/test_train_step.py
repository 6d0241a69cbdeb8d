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

import pytest

import lora
import minilm.bench
import minilm.config
from minilm.contention import cpu_times, other_cpu_fraction

VOCAB_SIZE = 65  # shakespeare-char's vocabulary (the associations corpus would be 122)
ROUNDS = {"tiny": 50, "small": 5}  # a small step takes ~1-2 s on 2 CPU cores, a tiny one ~10-50 ms
RANKS = (1, 8, 64)  # rank 64 on tiny (width 64) is full rank for the attention matrices: allowed
# where the adapters go (LoraConfig fields); all-linear-fused is PEFT's layout on GPT-2 (one A for q, k, v)
TARGETS = {"attn-qv": {"targets": ("attn.q", "attn.v")}, "attn-all": {"targets": ("attn.*",)},
           "all-linear": {"targets": ("all-linear",)},
           "all-linear-fused": {"targets": ("all-linear",), "fuse_qkv": True}}


def _case_id(preset, rank, targets) -> str:
    return f"{preset}-full" if rank is None else f"{preset}-lora-r{rank}-{targets}"


CASES = [pytest.param(preset, rank, targets, id=_case_id(preset, rank, targets))
         for preset in ("tiny", "small")
         for rank, targets in [(None, None)] + [(r, t) for r in RANKS for t in TARGETS
                                                if r == 8 or t != "all-linear-fused"]]

FULL = {}  # (preset, dtype) -> {"ms": median ms of the full step, "flops": its model FLOPs}


def _case(preset: str, rank: int | None, targets: str | None, dtype: str = "float32"):
    """minilm.bench's step for this case (lora.train_step_case's for LoRA): compiled (timed), warm, with its
    real parameters and state."""
    model_cfg, train_cfg = minilm.config.preset(preset)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=VOCAB_SIZE)
    train_cfg = dataclasses.replace(train_cfg, dtype=dtype)
    if rank is None:
        return minilm.bench.train_step_case(model_cfg, train_cfg)
    return lora.train_step_case(model_cfg, train_cfg, lora.LoraConfig(rank=rank, alpha=2 * rank, **TARGETS[targets]))


@pytest.mark.parametrize("preset, rank, targets", CASES)
def test_train_step(benchmark, results, matmul_peak, bandwidth, preset, rank, targets):
    _bench(benchmark, results, matmul_peak, bandwidth, preset, rank, targets, "float32")


BF16_CASES = [pytest.param(rank, targets, id=_case_id("small", rank, targets) + "-bf16")
              for rank, targets in [(None, None), (8, "all-linear")]]


@pytest.mark.parametrize("rank, targets", BF16_CASES)
def test_train_step_bfloat16(benchmark, results, matmul_peak, bandwidth, rank, targets):
    """Mixed precision (TrainConfig.dtype = bfloat16): the matrix products in bfloat16, the rest float32."""
    _bench(benchmark, results, matmul_peak, bandwidth, "small", rank, targets, "bfloat16")


def _bench(benchmark, results, matmul_peak, bandwidth, preset, rank, targets, dtype):
    case = _case(preset, rank, targets, dtype)  # compiled and warmed by one step
    before = cpu_times()
    benchmark.pedantic(lambda: case.run(1), rounds=ROUNDS[preset], iterations=1, warmup_rounds=1)
    other_cpu = other_cpu_fraction(before, cpu_times())
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable: no timings to derive from
    times = list(stats.stats.data) if stats is not None else case.run(1)  # every timed round
    info = minilm.bench.describe(case, times, matmul_peak, bandwidth)
    info.update(preset=preset, other_cpu_fraction=other_cpu, matmul_peak_gflops=matmul_peak / 1e9,
                optimizer_state_bytes=info["memory"]["optimizer_state_bytes"],
                xla_temp_bytes=info["memory"]["xla_temp_bytes"])
    if stats is None:  # no timings: keep the counts, drop the single untimed-by-benchmark step's figures
        for key in ("ms_per_step", "ms_per_step_min", "tokens_per_s", "mfu"):
            info.pop(key, None)
    key = (preset, dtype)
    if rank is None:
        FULL[key] = {"ms": info.get("ms_per_step"), "flops": info["model_flops"]}
    elif key in FULL:
        full = FULL[key]
        if full["ms"] and "ms_per_step" in info:
            info["lora_full_time_ratio"] = info["ms_per_step"] / full["ms"]
        info["lora_full_flops_ratio"] = info["model_flops"] / full["flops"]
    benchmark.extra_info.update(info)
    results.append({"case": _case_id(preset, rank, targets) + ("" if dtype == "float32" else "-bf16"), **info})
