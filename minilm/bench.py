"""Measuring what a train step costs: time, FLOPs, memory; full fine-tuning vs LoRA side by side.

    case = train_step_case(model_cfg, train_cfg)   # full fine-tuning; lora.train_step_case for LoRA
    case.run(steps)                                # that many real optimizer steps, timed

A case owns real parameters and optimizer state and feeds each step's output into the next, as
training does, on one fixed batch of random tokens (what a step costs does not depend on which tokens).
`compile_case` builds a case from any (trainable, frozen, loss), so this file needs no LoRA:
lora/cost.py builds the LoRA case on it. `minilm bench` (minilm/cli/bench.py) and the pytest-benchmark
suites in benchmarks/ are built on it; the analytic model in cost.py predicts the same figures from
the shapes alone.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from minilm.cost import StepCost, step_cost
from minilm.config import ModelConfig, TrainConfig
from minilm.contention import peak_rss_bytes
from minilm.model import init
from minilm.train import loss_fn, make_step, mixed_precision, optimizer
from minilm.tree import named_leaves, partition, size


def nbytes(tree) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))


def wait_until_ready(tree):
    return jax.block_until_ready(tree)


@dataclass
class TrainStepCase:
    """One compiled train step with its state; `run` times real steps."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    step: object             # the jitted step (minilm.train.make_step)
    state: list              # [trainable, frozen, opt_state, windows, key]
    compile_seconds: float
    predicted: StepCost      # what the step must cost (cost.py)
    adapter: dict | None = None                 # how the adapter describes itself (None: full fine-tuning)
    xla: dict = field(default_factory=dict)     # XLA's cost and memory analysis of the compiled step
    loss: object = loss_fn                      # the step's loss(trainable, frozen, windows, cfg, key)

    @property
    def mode(self) -> str:
        return "full" if self.adapter is None else "lora"

    @property
    def tokens_per_step(self) -> int:
        return self.train_cfg.grad_accum * self.train_cfg.batch_size * self.model_cfg.context

    def run(self, steps: int = 1) -> list[float]:
        """Take `steps` optimizer steps; the wall time of each, in seconds (each ends when its result is ready)."""
        times = []
        trainable, frozen, opt_state, windows, key = self.state
        for _ in range(steps):
            start = time.perf_counter()
            trainable, opt_state, metrics = self.step(trainable, frozen, opt_state, windows, key)
            wait_until_ready((trainable, opt_state, metrics))
            times.append(time.perf_counter() - start)
        self.state = [trainable, frozen, opt_state, windows, key]
        return times

    def phases(self, rounds: int = 3) -> dict:
        """Where a step's time goes: the loss alone (forward), the loss with its gradients (forward +
        backward) and the whole step, each compiled separately and timed on the same state; ms, medians
        of `rounds` calls after one untimed call. Each part runs its calls back to back: alternating
        three programs would make every call pay for the others' freed and re-faulted memory. For the
        same reason the gradients are written into the previous call's gradient buffers (donated), as the
        step writes its update in place. Backward and the optimizer update are the differences, so noise
        can make them slightly off when small."""
        cfg, loss = self.model_cfg, mixed_precision(self.loss, self.train_cfg.dtype)
        forward = jax.jit(lambda tr, fr, w, k: loss(tr, fr, w, cfg, k))
        gradients = jax.jit(lambda tr, fr, w, k, spent: jax.value_and_grad(loss)(tr, fr, w, cfg, k),
                            donate_argnums=4)

        trainable, frozen, _, windows, key = self.state
        micro_batches = list(zip(windows, jax.random.split(key, windows.shape[0])))  # as train.make_step splits
        grads = [jax.tree.map(jnp.zeros_like, trainable) for _ in micro_batches]

        def forward_pass():
            start = time.perf_counter()
            losses = wait_until_ready([forward(trainable, frozen, w, k) for w, k in micro_batches])
            return time.perf_counter() - start, losses[0]

        def backward_pass():
            nonlocal grads
            start = time.perf_counter()
            out = wait_until_ready([gradients(trainable, frozen, w, k, g) for (w, k), g in zip(micro_batches, grads)])
            grads = [g for _, g in out]
            return time.perf_counter() - start

        first_loss = float(forward_pass()[1])  # compiles; the loss of the current state
        times = {"forward": [forward_pass()[0] for _ in range(rounds)]}
        backward_pass()
        times["forward_backward"] = [backward_pass() for _ in range(rounds)]
        self.run(1)
        times["step"] = self.run(rounds)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        return {"forward_ms": ms["forward"], "backward_ms": ms["forward_backward"] - ms["forward"],
                "optimizer_ms": ms["step"] - ms["forward_backward"], "forward_backward_ms": ms["forward_backward"],
                "step_ms": ms["step"], "first_micro_batch_loss": first_loss}

    def memory(self) -> dict:
        """Bytes of each kind of state: exact from the pytrees, activations and temporaries from XLA."""
        trainable, frozen, opt_state = self.state[:3]
        trainable_bytes = nbytes(trainable)
        return {
            "params_bytes": trainable_bytes + nbytes(frozen),
            "trainable_bytes": trainable_bytes,
            "gradient_bytes": trainable_bytes,  # one gradient per trainable scalar, same dtype
            "optimizer_state_bytes": nbytes(opt_state),
            "xla_temp_bytes": self.xla.get("temp_bytes"),
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def counts(self) -> dict:
        trainable, frozen = self.state[:2]
        return {"trainable_params": size(trainable), "total_params": size(trainable) + size(frozen)}


def _xla_analysis(compiled) -> dict:
    out = {}
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    if "flops" in cost:
        out["flops"] = float(cost["flops"])
    if "bytes accessed" in cost:
        out["bytes_accessed"] = float(cost["bytes accessed"])
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["argument_bytes"] = int(mem.argument_size_in_bytes)
        out["output_bytes"] = int(mem.output_size_in_bytes)
    return out


def compile_case(model_cfg: ModelConfig, train_cfg: TrainConfig, trainable, frozen, loss, predicted: StepCost, *,
                 adapter: dict | None = None, seed: int = 0) -> TrainStepCase:
    """Compile (timed) and warm one train step of `loss` over (trainable, frozen), on random tokens."""
    step = make_step(model_cfg, train_cfg, loss, donate=True)  # in place, as train.run steps
    opt_state = optimizer(train_cfg).init(trainable)
    shape = (train_cfg.grad_accum, train_cfg.batch_size, model_cfg.context + 1)
    windows = jax.random.randint(jax.random.key(seed + 2), shape, 0, model_cfg.vocab_size)
    state = [trainable, frozen, opt_state, windows, jax.random.key(seed + 3)]
    start = time.perf_counter()
    compiled = step.lower(*state).compile()
    compile_seconds = time.perf_counter() - start
    case = TrainStepCase(model_cfg, train_cfg, step, state, compile_seconds, predicted, adapter,
                         _xla_analysis(compiled), loss)
    case.run(1)  # jit's own cache now holds the compiled step: the first timed step is a warm one
    return case


def train_step_case(model_cfg: ModelConfig, train_cfg: TrainConfig, *, seed: int = 0) -> TrainStepCase:
    """Build, compile (timed) and warm one train step of full fine-tuning (lora.train_step_case: LoRA's)."""
    trainable, frozen = partition(init(model_cfg, key=jax.random.key(seed)), lambda name: True)
    predicted = step_cost(model_cfg, train_cfg.batch_size, None, train_cfg.grad_accum)
    return compile_case(model_cfg, train_cfg, trainable, frozen, loss_fn, predicted, seed=seed)


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n float32 matmul here (best of `repeats`): the denominator of MFU."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    b = jax.random.normal(jax.random.key(1), (n, n))
    matmul = jax.jit(jnp.matmul)
    wait_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        wait_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def memory_bandwidth(megabytes: int = 64, repeats: int = 10) -> float:
    """Bytes/s of a streaming elementwise op here (read + write, best of `repeats`): the roofline's
    second slope, for the work that is not a matrix product."""
    x = jnp.ones(megabytes * 2**20 // 4)
    op = jax.jit(lambda x: x * 1.5 + 1.0)
    wait_until_ready(op(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        wait_until_ready(op(x))
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best


def describe(case: TrainStepCase, times: list[float], peak: float, bandwidth: float) -> dict:
    """Every figure of one timed case, measured next to predicted (cost.py), as plain JSON values."""
    predicted = case.predicted
    median = statistics.median(times)
    flops = case.xla.get("flops")
    return {
        "mode": case.mode,
        "lora": case.adapter,
        "dtype": case.train_cfg.dtype,
        "model": {k: getattr(case.model_cfg, k) for k in ("vocab_size", "context", "width", "layers", "heads")},
        "batch_size": case.train_cfg.batch_size, "grad_accum": case.train_cfg.grad_accum,
        "tokens_per_step": case.tokens_per_step,
        "steps_timed": len(times),
        "ms_per_step": 1e3 * median, "ms_per_step_min": 1e3 * min(times),
        "tokens_per_s": case.tokens_per_step / median,
        "compile_s": case.compile_seconds,
        **case.counts(),
        "xla_flops": flops, "xla_bytes_accessed": case.xla.get("bytes_accessed"),
        "model_flops": predicted.flops,
        # MFU: the model's own matrix-product FLOPs (cost.py, exact) per second, over the measured peak
        "mfu": predicted.flops / median / peak,
        "predicted": {
            "flops_per_token": predicted.per_token(),
            "matmul_ms": 1e3 * predicted.flops / peak,
            "elementwise_ms": 1e3 * predicted.elementwise_bytes / bandwidth,
            "ms_per_step": 1e3 * predicted.seconds(peak, bandwidth),
            "activation_bytes": predicted.activation_bytes,
        },
        "memory": case.memory(),
    }


def sampling_speed(model_cfg: ModelConfig, new_tokens: int | None = None, seed: int = 0) -> dict:
    """Tokens/s of generation from a one-token prompt, with and without the KV cache (after compiling)."""
    from minilm.generate import generate

    new_tokens = new_tokens or model_cfg.context - 1
    params = init(model_cfg, key=jax.random.key(seed))
    prompt = jnp.zeros((1, 1), jnp.int32)
    out = {"new_tokens": new_tokens}
    for name, cached in (("cached", True), ("uncached", False)):
        def run(cached=cached):
            return wait_until_ready(generate(params, prompt, model_cfg, key=jax.random.key(seed),
                                             max_new_tokens=new_tokens, temperature=1.0, use_cache=cached))
        start = time.perf_counter()
        run()  # compiles
        out[f"{name}_compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        run()
        out[f"{name}_tokens_per_s"] = new_tokens / (time.perf_counter() - start)
    out["speedup"] = out["cached_tokens_per_s"] / out["uncached_tokens_per_s"]
    return out


def ratio_plot(sweep: list[dict], path) -> None:
    """LoRA/full step time against rank, one line per width, with the FLOP model's ratio dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    widths = sorted({row["width"] for row in sweep})
    for i, width in enumerate(widths):
        rows = sorted((r for r in sweep if r["width"] == width), key=lambda r: r["rank"])
        ranks = [r["rank"] for r in rows]
        color = f"C{i}"
        ax.plot(ranks, [r["time_ratio"] for r in rows], "o-", color=color, label=f"width {width}: measured")
        ax.plot(ranks, [r["predicted_ratio"] for r in rows], "--", color=color, alpha=0.6,
                label=f"width {width}: roofline model")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xscale("log", base=2)
    ranks = sorted({row["rank"] for row in sweep})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank (all linear layers)")
    ax.set_ylabel("LoRA step time / full step time")
    ax.set_title("Is LoRA faster per step? (below 1: yes)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- the report `minilm bench` prints


def _row(label: str, values, spec: str) -> str:
    cells = [("-" if v is None else v if isinstance(v, str) else format(v, spec)).rjust(16) for v in values]
    return f"{label:<34}" + "".join(cells)


def _rest(ms: float, spec: str = ",.1f") -> str:
    """The step minus its forward and backward, each timed apart: a difference of medians, so it comes out
    below zero when the optimizer's few ms are smaller than the run's noise. Shown as ~0 then."""
    return format(ms, spec) if ms >= 0 else "~0"


def format_cases(cases: list[dict]) -> str:
    """One column per case: measured, predicted (cost.py), memory."""
    head = "".join((c["mode"] if c["lora"] is None else f"lora r{c['lora']['rank']}").rjust(16) for c in cases)
    per_token = lambda key: [c["predicted"]["flops_per_token"][key] / 1e6 for c in cases]
    mb = lambda key: [None if c["memory"][key] is None else c["memory"][key] / 2**20 for c in cases]
    lines = [
        f"{'':<34}{head}",
        _row("ms per step (median)", [c["ms_per_step"] for c in cases], ",.1f"),
        _row("tokens per s", [c["tokens_per_s"] for c in cases], ",.0f"),
        _row("first-step compile, s", [c["compile_s"] for c in cases], ".1f"),
        _row("MFU (model FLOPs / matmul peak)", [c["mfu"] for c in cases], ".0%"),
        *([] if not all("phases" in c for c in cases) else [
            "measured by parts (each compiled alone):",
            _row("  ms forward (the loss)", [c["phases"]["forward_ms"] for c in cases], ",.1f"),
            _row("  ms backward (+ the gradients)", [c["phases"]["backward_ms"] for c in cases], ",.1f"),
            _row("  ms the rest (optimizer update, ...)", [_rest(c["phases"]["optimizer_ms"]) for c in cases], "")]),
        "predicted (minilm/cost.py):",
        _row("  MFLOP/token forward", per_token("forward"), ",.1f"),
        _row("  MFLOP/token input gradients", per_token("input_grad"), ",.1f"),
        _row("  MFLOP/token weight gradients", per_token("weight_grad"), ",.1f"),
        _row("  MFLOP/token LoRA extra", per_token("lora_extra"), ",.1f"),
        _row("  ms matrix products at peak", [c["predicted"]["matmul_ms"] for c in cases], ",.1f"),
        _row("  ms other work at memory speed", [c["predicted"]["elementwise_ms"] for c in cases], ",.1f"),
        _row("  ms per step (roofline)", [c["predicted"]["ms_per_step"] for c in cases], ",.1f"),
        "memory:",
        _row("  trainable parameters", [c["trainable_params"] for c in cases], ","),
        _row("  parameters, MiB", mb("params_bytes"), ",.1f"),
        _row("  gradients, MiB", mb("gradient_bytes"), ",.2f"),
        _row("  optimizer state, MiB", mb("optimizer_state_bytes"), ",.2f"),
        _row("  XLA temporaries (activations), MiB", mb("xla_temp_bytes"), ",.0f"),
        _row("  peak RSS so far, MiB", mb("peak_rss_bytes"), ",.0f"),
    ]
    return "\n".join(lines)


def ratios(full: dict, lora: dict) -> dict:
    out = {
        "time": lora["ms_per_step"] / full["ms_per_step"],
        "model_flops": lora["model_flops"] / full["model_flops"],
        "predicted_time": lora["predicted"]["ms_per_step"] / full["predicted"]["ms_per_step"],
        "optimizer_state": lora["memory"]["optimizer_state_bytes"] / full["memory"]["optimizer_state_bytes"],
    }
    if "phases" in full and "phases" in lora:  # ms of each part, full and LoRA
        out["phases_ms"] = {part: [full["phases"][f"{part}_ms"], lora["phases"][f"{part}_ms"]]
                            for part in ("forward", "backward", "optimizer")}
    return out


def explain(r: dict) -> str:
    """Why LoRA is, or is not, faster per step here, in words computed from the numbers."""
    verdict = ("faster" if r["time"] < 0.95 else "not faster") + " per step"
    gap = r["time"] - r["predicted_time"]
    if gap > 0.05:
        why = (f"its time ratio above the roofline's {r['predicted_time']:.2f}: the adapters' thin products and "
               f"extra passes run far below the matmul peak")
    elif gap < -0.05:
        why = (f"its time ratio below the roofline's {r['predicted_time']:.2f}: the full step runs further below "
               f"the peak")
    else:
        why = f"as the roofline predicts ({r['predicted_time']:.2f})"
    text = (f"LoRA/full: step time {r['time']:.2f} (measured), matrix FLOPs {r['model_flops']:.2f}, roofline "
            f"{r['predicted_time']:.2f}; optimizer state {r['optimizer_state']:.1%} of full's.\n"
            f"LoRA is {verdict}, {why}. It skips only the weight gradients, a third of a frozen layer's "
            f"matrix FLOPs: frozen layers still run forward and pass gradients down, attention, norms and "
            f"activations cost the same, so the FLOP ratio stays near 2/3 at best.")
    if "phases_ms" in r:
        (f_full, f_lora), (b_full, b_lora), (o_full, o_lora) = (r["phases_ms"][k] for k in
                                                                ("forward", "backward", "optimizer"))
        text += (f"\nBy parts, full vs LoRA: forward {f_full:,.0f} vs {f_lora:,.0f} ms (the same products, plus "
                 f"merging the adapters), backward {b_full:,.0f} vs {b_lora:,.0f} ms (no weight gradients), the "
                 f"rest {_rest(o_full, ',.0f')} vs {_rest(o_lora, ',.0f')} ms (the optimizer update, and what "
                 f"compiling the parts apart changes).")
    return text


# ---------------------------------------------------------------- on a device mesh: memory and traffic per device

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4, "s16": 2, "u16": 2,
                "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVE_LINE = re.compile(r"=\s*(?P<result>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\((?P<args>.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _array_bytes(text: str) -> int:
    """Bytes of every array type in `text` ('(f32[64,8]{1,0}, f32[8]{0})' -> 4 * (512 + 8))."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(text))


def _group_size(line: str) -> int:
    """How many devices one collective spans, from its replica_groups ({{0,1},{2,3}} or iota [4,2]<=[8])."""
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=", line):
        return int(m.group(1).split(",")[-1])
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line):  # mesh['a'=4,'b'=2] ... {'b'}
        sizes = {name: int(n) for name, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", m.group(2)))
    if m := re.search(r"source_target_pairs=\{", line):
        return 2
    return 1


def collective_bytes(hlo: str) -> dict[str, dict]:
    """What one device's share of a compiled SPMD program moves, per kind of collective, from its HLO text.

    Per kind: `count`; `buffer_bytes`, the whole buffer each handles (all-gather: what it gathers into;
    reduce-scatter: what it reduces; all-reduce: what it sums); and `wire_bytes`, what each device sends
    with the ring algorithms over n devices: (n-1)/n of the buffer for a gather or scatter, twice that for
    an all-reduce (a reduce-scatter then an all-gather). XLA's own collective combiner may merge several
    into one: counts are XLA's, bytes are the same either way."""
    out = {kind: {"count": 0, "buffer_bytes": 0, "wire_bytes": 0} for kind in COLLECTIVES}
    for line in hlo.splitlines():
        m = _COLLECTIVE_LINE.search(line)
        if not m or "-done" in line.split("=")[0]:
            continue
        kind = m.group("op")
        operand = m.group("args").split(")")[0]
        buffer = _array_bytes(operand if kind == "reduce-scatter" else m.group("result"))
        n = _group_size(line)
        share = (n - 1) / n if n > 1 else 0.0
        out[kind]["count"] += 1
        out[kind]["buffer_bytes"] += buffer
        out[kind]["wire_bytes"] += round(buffer * share * (2 if kind == "all-reduce" else 1))
    return out


def mesh_case(case: TrainStepCase, layout, steps: int) -> dict:
    """`case`'s train step compiled for a device mesh (layout: minilm.mesh.Layout), its state placed there.

    Per device, exact from the shardings: bytes of parameters, gradients (shaped and sharded like the
    trainable parameters) and optimizer state. Per step, from the compiled program: what its collectives
    move (collective_bytes), beside the cost model's prediction (minilm.cost.traffic). And the time of
    `steps` steps: on emulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count) every
    "device" shares the same cores, so it measures the partitioned program's overhead, not a speed-up."""
    from minilm.cost import traffic

    trainable, frozen, opt_state, windows, key = case.state
    step = make_step(case.model_cfg, case.train_cfg, case.loss, donate=True, layout=layout)
    placed = [layout.place(trainable), layout.place(frozen), layout.place(opt_state), layout.place_batch(windows),
              layout.place(key)]
    started = time.perf_counter()
    compiled = step.lower(*placed).compile()
    compile_seconds = time.perf_counter() - started
    measured = collective_bytes(compiled.as_text())

    def full_bytes(tree, sharded: bool) -> int:  # bytes of the leaves the layout splits (or keeps whole)
        return sum(leaf.nbytes for name, leaf in named_leaves(tree).items()
                   if any(layout.sharding(name, leaf.shape).spec) == sharded)

    fsdp = layout.mesh.shape["fsdp"]
    predicted = traffic(data=layout.mesh.shape["data"], fsdp=fsdp,
                        gathered_bytes=full_bytes(trainable, True) + full_bytes(frozen, True),
                        scattered_grad_bytes=full_bytes(trainable, True), replicated_grad_bytes=full_bytes(trainable, False))
    times = []
    trainable, frozen, opt_state, windows, key = placed
    for _ in range(steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, windows, key)
        wait_until_ready((trainable, opt_state, metrics))
        times.append(time.perf_counter() - started)
    return {"mode": case.mode, "mesh": dict(layout.mesh.shape), "devices": layout.devices,
            "per_device": {"params_bytes": layout.bytes_per_device(trainable) + layout.bytes_per_device(frozen),
                           "gradient_bytes": layout.bytes_per_device(trainable),
                           "optimizer_state_bytes": layout.bytes_per_device(opt_state)},
            "whole": {"params_bytes": nbytes(trainable) + nbytes(frozen), "gradient_bytes": nbytes(trainable),
                      "optimizer_state_bytes": nbytes(opt_state)},
            "collectives": measured, "predicted": predicted, "compile_seconds": compile_seconds,
            "ms_per_step_emulated": 1e3 * statistics.median(times[1:])}


def format_mesh_cases(cases: list[dict]) -> str:
    """The per-device memory and per-step traffic table, full vs LoRA, measured beside predicted."""
    mib = lambda b: f"{b / 2**20:,.3f}"
    lines = [f"on a mesh {cases[0]['mesh']} ({cases[0]['devices']} devices), MiB per device:",
             f"{'':<32}" + "".join(f"{c['mode']:>24}" for c in cases)]
    for key, label in (("params_bytes", "parameters"), ("gradient_bytes", "gradients"),
                       ("optimizer_state_bytes", "optimizer state")):
        lines.append(f"{label:<32}" + "".join(f"{mib(c['per_device'][key]):>24}" for c in cases))
    lines.append(f"{'each step, measured / predicted':<32}" + "".join(f"{'(count)':>24}" for c in cases))
    for kind in COLLECTIVES:
        if any(c["collectives"][kind]["count"] or c["predicted"].get(kind) for c in cases):
            lines.append(f"  {kind:<30}" + "".join(
                f"{mib(c['collectives'][kind]['buffer_bytes']) + ' / ' + mib(c['predicted'].get(kind, 0)):>16}"
                f"{'(' + str(c['collectives'][kind]['count']) + ')':>8}" for c in cases))
    lines.append(f"{'  sent per device (ring)':<32}" + "".join(
        f"{mib(sum(v['wire_bytes'] for v in c['collectives'].values())):>24}" for c in cases))
    lines.append(f"{'ms per step, emulated':<32}" + "".join(f"{c['ms_per_step_emulated']:>24.1f}" for c in cases))
    lines.append("Bytes: the whole buffers the collectives handle, from the compiled program's HLO; XLA's CPU backend sums "
                 "a split gradient with an all-reduce and keeps a slice, where the prediction says reduce-scatter. "
                 "Emulated CPU devices share this machine's cores: their timings are not a speed-up.")
    return "\n".join(lines)
