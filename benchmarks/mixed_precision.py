"""Where a mixed-precision (bfloat16) train step's time goes, against float32's: benchmarks/README.md.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/mixed_precision.py --preset small --mode full,lora --rounds 4

For each mode (full fine-tuning; LoRA r8 all-linear with one A for q, k, v) and number format:

1. the compiled step's matrix products, read from XLA's optimized HLO (what runs, after XLA's passes
   that turn a bfloat16 product they cannot give to YNNPACK back into float32 work): how many, and
   how many GFLOP, with bfloat16 and with float32 operands; and the conversions between the two;
2. the products' time at the rates a lone product of the step's main shape reaches here (measured at
   the start: float32, and bfloat16 operands with float32 accumulation), and the rest of the step;
3. the step's measured time: the cases take turns in one process, one warm step then `--steps` timed
   ones per turn, the order reversed every other round, so that the machine's drift and other load fall
   on all alike. Medians; the ratios mean more than the absolute times when the machine is shared.

A third case per mode, "bfloat16 autodiff", is the ablation of precision.py's speed trick: the products'
gradients as JAX's autodiff gives them (dx = dy wᵀ, dw = xᵀ dy with float32 dy and transposed operands,
which XLA runs as float32 work), as minilm computed them before; it is built by swapping
`precision._low_precision_matmul` and `_low_precision_linear` (and LoRA's row-major Wᵀ) for the plain product
while the step is traced.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import time

import jax
import jax.numpy as jnp

import lora
import lora.weight
from lora import cost as lora_cost
from minilm import allocator, bench, machine, precision
from minilm.config import preset
from minilm.cost import step_cost
from minilm.model import init
from minilm.train import loss_fn
from minilm.tree import partition

DOT = re.compile(r"= (\w+)\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\), lhs_batch_dims=\{[\d,]*\}, "
                 r"lhs_contracting_dims=\{([\d,]*)\}|= (\w+)\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\), "
                 r"lhs_contracting_dims=\{([\d,]*)\}")
DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]", re.M)
CONVERT = re.compile(r"= (\w+)\[([\d,]*)\]\S* convert\(%?([\w.\-]+)\)")
BYTES = {"f32": 4, "bf16": 2}


def shape(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def hlo_products(hlo: str) -> dict:
    """{"bf16": (count, GFLOP), "f32": (count, GFLOP), "converts": count, "convert_MB": MB} of an HLO text."""
    defs = {name: (dtype, shape(dims)) for name, dtype, dims in DEF.findall(hlo)}
    out = {"bf16": [0, 0.0], "f32": [0, 0.0], "converts": 0, "convert_MB": 0.0}
    for match in DOT.finditer(hlo):
        g = match.groups()
        out_dims, lhs, contracting = (g[1], g[2], g[4]) if g[0] else (g[6], g[7], g[9])
        lhs_type, lhs_shape = defs[lhs]
        k = 1
        for axis in shape(contracting):
            k *= lhs_shape[axis]
        n = 1
        for d in shape(out_dims):
            n *= d
        kind = "bf16" if lhs_type == "bf16" else "f32"
        out[kind][0] += 1
        out[kind][1] += 2 * n * k / 1e9
    for dtype, dims, source in CONVERT.findall(hlo):
        if source in defs and {dtype, defs[source][0]} == {"f32", "bf16"}:
            n = 1
            for d in shape(dims):
                n *= d
            out["converts"] += 1
            out["convert_MB"] += n * (BYTES[dtype] + BYTES[defs[source][0]]) / 1e6
    return out


def product_rates(rounds: int = 10) -> dict:
    """GFLOP/s of one (2048 x 384) @ (384 x 1536) product here: float32, and bfloat16 -> float32."""
    x, w = jax.random.normal(jax.random.key(0), (2048, 384)), jax.random.normal(jax.random.key(1), (384, 1536))
    rates = {}
    for name, a, b in (("f32", x, w), ("bf16", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))):
        f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        jax.block_until_ready(f(a, b))
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            jax.block_until_ready(f(a, b))
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * 2048 * 384 * 1536 / best / 1e9
    return rates


def autodiff_product(x, w, x_dtype):
    """precision._low_precision_matmul's forward alone: JAX differentiates it (the ablation)."""
    return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.promote_types(x_dtype, jnp.float32))


def build(model_cfg, train_cfg, mode: str, dtype: str, adapter) -> bench.TrainStepCase:
    """One compiled, warmed case; dtype "bfloat16 autodiff": the ablation (module docstring)."""
    ablate = dtype.endswith("autodiff")
    tcfg = dataclasses.replace(train_cfg, dtype=dtype.split()[0])
    saved = precision._low_precision_matmul, precision._low_precision_linear, lora.weight.row_major_transposed
    if ablate:
        precision._low_precision_matmul, lora.weight.row_major_transposed = autodiff_product, lambda y: y.T
        precision._low_precision_linear = lambda x, w, b, x_dtype: autodiff_product(x, w, x_dtype) + b
    try:
        if mode == "full":  # a loss of its own, so that the ablated step is compiled apart from the real one
            trainable, frozen = partition(init(model_cfg, key=jax.random.key(0)), lambda name: True)
            return bench.compile_case(model_cfg, tcfg, trainable, frozen, _fresh(loss_fn, ablate),
                                      step_cost(model_cfg, tcfg.batch_size, None, tcfg.grad_accum))
        trainable, frozen = lora.split(lora.attach(init(model_cfg, key=jax.random.key(0)), adapter,
                                                   key=jax.random.key(1)), adapter)
        return bench.compile_case(model_cfg, tcfg, trainable, frozen, _fresh(lora.loss_fn, ablate),
                                  lora_cost.lora_step_cost(model_cfg, tcfg.batch_size, adapter, tcfg.grad_accum),
                                  adapter=lora_cost.describe(adapter))
    finally:
        precision._low_precision_matmul, precision._low_precision_linear, lora.weight.row_major_transposed = saved


def _fresh(loss, ablate: bool):
    """`loss` itself, or (ablation) a new function calling it: train.make_step caches one compiled step per
    loss, and the ablated step must not be the real one."""
    return (lambda *a: loss(*a)) if ablate else loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mode", default="full,lora", help="full, lora or full,lora")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case per round")
    parser.add_argument("--rates", metavar="F32,BF16", help="the two product rates in GFLOP/s instead of measuring "
                        "them (on a busy machine: rates measured when it was quiet); with --rounds 0 the script "
                        "reads the HLO only and times nothing")
    args = parser.parse_args(argv)
    if allocator.tuned():
        allocator.run_inline()

    print(machine.describe(machine.cpu_features()))
    rates = (dict(zip(("f32", "bf16"), map(float, args.rates.split(",")))) if args.rates else product_rates())
    print(f"one (2048 x 384) @ (384 x 1536) product: float32 {rates['f32']:.0f} GFLOP/s, "
          f"bfloat16 -> float32 {rates['bf16']:.0f} GFLOP/s{' (given)' if args.rates else ''}")
    model_cfg, train_cfg = preset(args.preset)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=65)
    adapter = lora.LoraConfig(rank=8, alpha=16.0, targets=("all-linear",), fuse_qkv=True)
    cases, products = {}, {}
    for mode in args.mode.split(","):
        for dtype in ("float32", "bfloat16 autodiff", "bfloat16"):
            case = cases[mode, dtype] = build(model_cfg, train_cfg, mode, dtype, adapter)
            products[mode, dtype] = hlo_products(case.step.lower(*case.state).compile().as_text())
    times = {key: [] for key in cases}
    keys = list(cases)
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            cases[key].run(1)
            times[key] += cases[key].run(args.steps)

    print(f"\n{'':24} {'ms/step':>8} {'bf16 dots':>10} {'GFLOP':>6} {'f32 dots':>9} {'GFLOP':>6} {'converts':>9} "
          f"{'MB':>6} {'products ms':>12} {'rest ms':>8}")
    for (mode, dtype), p in products.items():
        ms = 1e3 * statistics.median(times[mode, dtype]) if args.rounds else float("nan")
        at_rate = 1e3 * (p["bf16"][1] / rates["bf16"] + p["f32"][1] / rates["f32"])
        print(f"{mode + ' ' + dtype:24} {ms:8.1f} {p['bf16'][0]:>10} {p['bf16'][1]:6.1f} {p['f32'][0]:>9} "
              f"{p['f32'][1]:6.1f} {p['converts']:>9} {p['convert_MB']:6.0f} {at_rate:12.1f} {ms - at_rate:8.1f}")
    for mode in args.mode.split(",") if args.rounds else ():
        f32 = statistics.median(times[mode, "float32"])
        print(f"{mode}: bfloat16 / float32 step time {statistics.median(times[mode, 'bfloat16']) / f32:.3f} "
              f"(with autodiff's gradients {statistics.median(times[mode, 'bfloat16 autodiff']) / f32:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
