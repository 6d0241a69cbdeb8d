"""Measuring what a train step costs: time, FLOPs, memory; full fine-tuning vs LoRA side by side.

    case = train_step_case(model_cfg, train_cfg, lora_cfg)   # lora_cfg None: full fine-tuning
    case.run(steps)                                        # that many real optimizer steps, timed

A case owns real parameters and optimizer state and feeds each step's output into the next, as
training does, on one fixed batch of random tokens (what a step costs does not depend on which tokens).
`minilm bench` (cli.py) and the pytest-benchmark suites in benchmarks/ are built on it; the analytic
model in cost.py predicts the same figures from the shapes alone.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from minilm.config import ModelConfig, TrainConfig
from minilm.model import init
from minilm.train import loss_fn, make_step, optimizer
from minilm.tree import partition, size


def nbytes(tree) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))


def block(tree):
    return jax.block_until_ready(tree)


@dataclass
class TrainStepCase:
    """One compiled train step with its state; `run` times real steps."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    lora_cfg: object | None  # lora.LoraConfig, or None for full fine-tuning
    step: object             # the jitted step (minilm.train.make_step)
    state: list              # [trainable, frozen, opt_state, windows, key]
    compile_seconds: float
    xla: dict = field(default_factory=dict)     # XLA's cost and memory analysis of the compiled step

    @property
    def mode(self) -> str:
        return "full" if self.lora_cfg is None else "lora"

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
            block((trainable, opt_state, metrics))
            times.append(time.perf_counter() - start)
        self.state = [trainable, frozen, opt_state, windows, key]
        return times

    def memory(self) -> dict:
        """Bytes of each kind of state: exact from the pytrees, activations and temporaries from XLA."""
        trainable, frozen, opt_state = self.state[:3]
        return {
            "params_bytes": nbytes(trainable) + nbytes(frozen),
            "trainable_bytes": nbytes(trainable),
            "gradient_bytes": nbytes(trainable),  # one gradient per trainable scalar, same dtype
            "optimizer_state_bytes": nbytes(opt_state),
            "xla_temp_bytes": self.xla.get("temp_bytes"),
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def counts(self) -> dict:
        trainable, frozen = self.state[:2]
        return {"trainable_params": size(trainable), "total_params": size(trainable) + size(frozen)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


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


def train_step_case(model_cfg: ModelConfig, train_cfg: TrainConfig, lora_cfg=None, *, seed: int = 0) -> TrainStepCase:
    """Build, compile (timed) and warm one train step: full fine-tuning, or LoRA with `lora_cfg`."""
    import lora  # lora builds on minilm; imported here so minilm alone never needs it

    params = init(model_cfg, key=jax.random.key(seed))
    if lora_cfg is None:
        trainable, frozen = partition(params, lambda name: True)
        loss = loss_fn
    else:
        adapted = lora.attach(params, lora_cfg, key=jax.random.key(seed + 1))
        trainable, frozen = lora.split(adapted, lora_cfg)
        loss = lora.loss_fn
    step = make_step(model_cfg, train_cfg, loss)
    opt_state = optimizer(train_cfg).init(trainable)
    shape = (train_cfg.grad_accum, train_cfg.batch_size, model_cfg.context + 1)
    windows = jax.random.randint(jax.random.key(seed + 2), shape, 0, model_cfg.vocab_size)
    state = [trainable, frozen, opt_state, windows, jax.random.key(seed + 3)]
    start = time.perf_counter()
    compiled = step.lower(*state).compile()
    compile_seconds = time.perf_counter() - start
    case = TrainStepCase(model_cfg, train_cfg, lora_cfg, step, state, compile_seconds, _xla_analysis(compiled))
    case.run(1)  # jit's own cache now holds the compiled step: the first timed step is a warm one
    return case


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n float32 matmul here (best of `repeats`): the denominator of MFU."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    b = jax.random.normal(jax.random.key(1), (n, n))
    matmul = jax.jit(jnp.matmul)
    block(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        block(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
