"""Which CPU a measurement ran on, as the machine itself reports it (Linux's /proc/cpuinfo).

Speed ratios move between machines with and without the vector units a number format needs: bfloat16
products run at twice float32's rate on a CPU with `avx512_bf16` (AMD Zen 4, Intel Cooper Lake and
later) or AMX (`amx_bf16`, Intel Sapphire Rapids and later), and are converted back to float32 work
on one without. So every timing minilm reports (`minilm bench`, benchmarks/peers/run.py) names the CPU
model and these flags. Pure standard library: `minilm bench` must never import torch, and the peers
harness imports this without JAX.
"""

from __future__ import annotations

import os
import platform

# The /proc/cpuinfo flags that decide matrix-product speed here, in the order they are usually read.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16",
               "amx_int8", "amx_fp16")


def cpu_features(path: str = "/proc/cpuinfo") -> dict:
    """{"model": "AMD EPYC ...", "cpus": 2, "flags": [...], "all_flags": [...]} of the first processor in `path`.

    `flags` are the SPEED_FLAGS present, in that order, and every other avx512* and amx* flag after
    them; `all_flags` the whole list. Where `path` cannot be read (not Linux), model comes from
    `platform.processor()` and the flag lists are empty.
    """
    model, flags = "", []
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
                if model and flags:
                    break
    except OSError:
        pass
    speed = [flag for flag in SPEED_FLAGS if flag in flags]
    speed += sorted(flag for flag in flags if flag.startswith(("avx512", "amx")) and flag not in speed)
    return {"model": model or platform.processor() or "unknown", "cpus": os.cpu_count(), "flags": speed,
            "all_flags": flags}


def describe(features: dict) -> str:
    """One line for a report: model, CPU count, the speed flags and what they mean for bfloat16."""
    flags = set(features["flags"])
    if "amx_bf16" in flags:
        bf16 = "bfloat16 products in AMX"
    elif "avx512_bf16" in flags:
        bf16 = "bfloat16 products in AVX-512 (avx512_bf16), no AMX"
    else:
        bf16 = "no bfloat16 product instructions: bfloat16 is converted to float32 work"
    shown = " ".join(f for f in features["flags"] if f in SPEED_FLAGS) or "none of " + ", ".join(SPEED_FLAGS[:4])
    return f"CPU: {features['model']}, {features['cpus']} CPUs; flags {shown}; {bf16}"
