"""Where a compiled train step's time goes, by kind of work, as XLA's own profiler records it.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_profile.py --preset small --mode full --dtype bfloat16

Each operation the CPU runtime executes (a matrix product handed to YNNPACK, a fused elementwise loop,
a copy) is one event in the profile (`jax.profiler`, read back with `jax.profiler.ProfileData`). The
runtime runs independent operations side by side on the machine's threads, so each instant of the
step is shared equally among the operations running then; the shares add up to the step's busy time.
Each operation is put in a kind by reading what it is in the compiled step's HLO text:

    products, block matrices     dots of 2-D operands (x @ W, its two gradients; the unembedding)
    products, attention          dots of 4-D operands (batch, heads): scores and weighted values
    elementwise, reductions      fused loops that compute (LayerNorm, softmax, GELU, Adam, sums)
    conversions, copies          fused loops that only move or convert numbers (casts, transposes,
                                 pads, slices, concatenations)

and each product's operand format (bf16 or f32) is kept in its kind's name. Not every operation leaves
an event: a product XLA gives to Eigen rather than YNNPACK (one with a transposed operand, such as
float32's xᵀ dy) may not, so the step's wall time less the busy time is printed too, as "no event".
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import re
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # mixed_precision.py, beside this file

import mixed_precision

import lora
from minilm import allocator, machine
from minilm.config import preset

MOVING = {"parameter", "convert", "copy", "transpose", "bitcast", "reshape", "pad", "slice", "concatenate",
          "broadcast", "constant", "dynamic-slice", "dynamic-update-slice", "tuple", "get-tuple-element"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\((.*)$", re.MULTILINE)
COMPUTATION = re.compile(r"^%?([\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", re.MULTILINE | re.DOTALL)


def kinds_of_operations(hlo: str) -> dict[str, str]:
    """{operation name: kind} for every instruction of an optimized HLO text (module docstring)."""
    shapes = {name: (dtype, dims) for name, dtype, dims, _, _ in INSTRUCTION.findall(hlo)}
    bodies = dict(COMPUTATION.findall(hlo))
    kinds = {}
    for name, _, _, opcode, rest in INSTRUCTION.findall(hlo):
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        dot = (re.search(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", body) if body else
               re.match(r"%?([\w.\-]+), %?([\w.\-]+)\)", rest) if opcode == "dot" else None)
        if dot:
            lhs_type, lhs_dims = shapes.get(dot.group(1), ("?", ""))
            where = "attention" if lhs_dims.count(",") == 3 else "block matrices"
            kinds[name] = f"products, {where} ({lhs_type})"
        elif opcode in ("fusion", "copy", "transpose", "pad", "concatenate", "convert", "slice"):
            ops = set(re.findall(r"= \S+ ([\w\-]+)\(", body)) or {opcode}
            kinds[name] = "conversions, copies" if ops <= MOVING else "elementwise, reductions"
        else:
            kinds[name] = "other"
    return kinds


def shares(events: dict[str, list[tuple[int, int]]]) -> collections.Counter:
    """{name: ns}: each instant's wall time split equally among the operations running then."""
    edges = sorted((t, +1 if i == 0 else -1, name) for name, spans in events.items()
                   for span in spans for i, t in enumerate(span))
    running, out, last = collections.Counter(), collections.Counter(), None
    for t, change, name in edges:
        if last is not None and running:
            for active in running:
                out[active] += (t - last) / len(running)
        last = t
        running[name] += change
        if running[name] == 0:
            del running[name]
    return out


def profile(case, steps: int) -> tuple[collections.Counter, float]:
    """({kind: ms per step}, ms per step measured around the profiled steps) of a warm case."""
    kinds = kinds_of_operations(case.step.lower(*case.state).compile().as_text())
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            times = case.run(steps)
        data = jax.profiler.ProfileData.from_file(str(next(pathlib.Path(folder).rglob("*.xplane.pb"))))
    events = collections.defaultdict(list)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in kinds:  # an operation of the step (not the runtime's own bookkeeping)
                    events[event.name].append((event.start_ns, event.start_ns + event.duration_ns))
    by_kind = collections.Counter()
    for name, ns in shares(events).items():
        by_kind[kinds[name]] += ns / steps / 1e6
    return by_kind, 1e3 * sum(times) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mode", default="full", choices=["full", "lora"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=4, help="profiled steps, after 3 warm ones")
    args = parser.parse_args(argv)
    if allocator.tuned():
        allocator.run_inline()
    print(machine.describe(machine.cpu_features()))
    model_cfg, train_cfg = preset(args.preset)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=65)
    adapter = lora.LoraConfig(rank=8, alpha=16.0, targets=("all-linear",), fuse_qkv=True)
    case = mixed_precision.build(model_cfg, train_cfg, args.mode, args.dtype, adapter)
    case.run(3)
    by_kind, step_ms = profile(case, args.steps)
    print(f"\n{args.preset} {args.mode} {args.dtype}: {step_ms:.1f} ms per step while profiled "
          f"({args.steps} steps); busy time by kind of work:")
    for kind, ms in by_kind.most_common():
        print(f"  {kind:40} {ms:7.1f} ms  {100 * ms / step_ms:5.1f}%")
    busy = sum(by_kind.values())
    print(f"  {'no event (e.g. Eigen products), idle':40} {step_ms - busy:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
