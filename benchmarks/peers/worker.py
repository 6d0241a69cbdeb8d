"""One side of the peer benchmark in a process of its own: builds one train step, warms it, then times
steps on request. run.py starts it and talks to it; you do not normally run it by hand.

    worker.py --side jax|torch --preset small --mode full|lora [--rank 8 --targets all-linear]
              [--dtype float32|bfloat16] [--compile eager|compiled] [--warmup 2] [--threads N] [--seed 0]

Protocol: one JSON object per line. The worker writes {"ready": true, ...facts...} once it has built
and warmed its step (or {"error": "..."} and exits 1), then reads commands from stdin:

    {"cmd": "run", "steps": 3, "untimed": 1}  ->  {"times": [s, s, s], "other_cpu_fraction": f, "loss": x}
    {"cmd": "quit"}             ->  exits 0 (so does end of input)

The protocol has this process's real stdout to itself: the worker points file descriptor 1 at stderr,
so whatever a library prints goes there and cannot garble a reply.

Why a process per side: PyTorch's OpenMP threads and XLA's thread pool each spin for a while after
their work ends. In one process, whichever framework ran last would take CPU from the one being timed.
Each side also imports only its own framework: this file imports neither JAX nor torch at the top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings

from minilm.contention import cpu_times, other_cpu_fraction


def lora_targets(name: str) -> tuple[str, ...]:
    """run.py's --targets -> minilm LoraConfig targets."""
    return {"all-linear": ("all-linear",), "attn.*": ("attn.*",), "attn.q,attn.v": ("attn.q", "attn.v")}[name]


def vocab(args) -> int:
    """--vocab, else the preset's own (gpt2: 50257), else shakespeare-char's 65."""
    import minilm.config

    return args.vocab or minilm.config.preset(args.preset)[0].vocab_size or 65


class JaxSide:
    """minilm's own step (minilm.bench.train_step_case, or lora.train_step_case): compiled, then one warm step."""

    def __init__(self, args):
        import jax

        import lora
        import minilm.bench
        import minilm.config
        from minilm import allocator

        if allocator.tuned():  # run.py gave us glibc's tunables: keep memory
            allocator.run_inline()

        model_cfg, train_cfg = minilm.config.preset(args.preset)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab(args))
        lora_cfg = None
        if args.mode == "lora":
            lora_cfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=lora_targets(args.targets),
                                       fuse_qkv=args.fuse_qkv)
        train_cfg = dataclasses.replace(train_cfg, dtype=args.dtype)  # bfloat16: mixed precision (train.py)
        self.facts = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                      "tokens_per_step": train_cfg.grad_accum * train_cfg.batch_size * model_cfg.context,
                      "batch": train_cfg.grad_accum * train_cfg.batch_size, "context": model_cfg.context}
        self.case = (minilm.bench.train_step_case(model_cfg, train_cfg, seed=args.seed) if lora_cfg is None
                     else lora.train_step_case(model_cfg, train_cfg, lora_cfg, seed=args.seed))
        if args.warmup:
            self.case.run(args.warmup)
        counts = self.case.counts()
        base = counts["total_params"] - (counts["trainable_params"] if lora_cfg is not None else 0)
        memory = self.case.memory()
        self.facts.update(compile_seconds=self.case.compile_seconds, base_params=base, **counts,
                          xla_flops=self.case.xla.get("flops"), xla_temp_bytes=self.case.xla.get("temp_bytes"),
                          optimizer_state_bytes=memory["optimizer_state_bytes"])

    def run(self, steps: int) -> dict:
        return {"times": self.case.run(steps)}

    def final(self) -> dict:
        return {"peak_rss_bytes": self.case.memory()["peak_rss_bytes"]}


class TorchSide:
    """The same step in PyTorch + transformers GPT2LMHeadModel (+ PEFT LoRA), eager or under torch.compile:
    torch_gpt2.py. Compiled, the first step compiles (and runs once): its time less a warm step's is the
    compile time, reported apart, as ours is."""

    def __init__(self, args):
        if args.compile == "compiled":  # a cold compile, as a user's first run (and as ours: JAX's persistent
            os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # cache is off by default), not a cached one
        import torch_gpt2

        import minilm.config

        model_cfg, train_cfg = minilm.config.preset(args.preset)
        self.step = torch_gpt2.build(
            vocab=vocab(args), context=model_cfg.context, width=model_cfg.width, layers=model_cfg.layers,
            heads=model_cfg.heads, batch=train_cfg.grad_accum * train_cfg.batch_size, mode=args.mode,
            rank=args.rank, targets=args.targets, dtype=args.dtype, seed=args.seed, threads=args.threads,
            compile=args.compile)
        start = time.perf_counter()
        first = self.step.run(1)[0]  # also allocates AdamW's state; compiled: compiles forward and backward
        warm = self.step.run(max(1, args.warmup - 1))
        self.facts = {"warmup_seconds": time.perf_counter() - start,
                      "compile_seconds": first - min(warm) if args.compile == "compiled" else None,
                      "tokens_per_step": self.step.tokens_per_step, "batch": self.step.inputs.shape[0],
                      "context": self.step.inputs.shape[1], **self.step.counts(), **self.step.info,
                      "optimizer_state_bytes": self.step.memory()["optimizer_state_bytes"]}

    def run(self, steps: int) -> dict:
        times = self.step.run(steps)
        return {"times": times, "loss": self.step.last_loss}

    def final(self) -> dict:
        return {"peak_rss_bytes": self.step.memory()["peak_rss_bytes"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="One side of benchmarks/peers/run.py (started by it).")
    parser.add_argument("--side", choices=("jax", "torch"), required=True)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=None, help="default: the preset's (gpt2: 50257), else 65")
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="all-linear", choices=("all-linear", "attn.*", "attn.q,attn.v"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compile", choices=("eager", "compiled"), default="eager",
                        help="torch side: eager, or the model under torch.compile (torch_gpt2.COMPILE_MODE)")
    parser.add_argument("--fuse-qkv", action="store_true", help="ours: one A shared by q, k, v (LoraConfig.fuse_qkv)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the replies' own channel
    os.dup2(2, 1)                                   # anything else printed to stdout goes to stderr
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        side = (JaxSide if args.side == "jax" else TorchSide)(args)
    except Exception as e:  # noqa: BLE001 - the parent shows it and stops
        traceback.print_exc()
        reply({"error": f"{args.side} {args.mode}: {type(e).__name__}: {e}"})
        return 1
    reply({"ready": True, "side": args.side, "mode": args.mode, "pid": os.getpid(), **side.facts})

    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("cmd") == "quit":
            break
        if command.get("cmd") == "run":
            if command.get("untimed"):  # back in steady state after waiting for the other workers
                side.run(int(command["untimed"]))
            before = cpu_times()
            result = side.run(int(command.get("steps", 1)))
            result["other_cpu_fraction"] = other_cpu_fraction(before, cpu_times())
            reply(result)
        elif command.get("cmd") == "final":
            reply(side.final())
        else:
            reply({"error": f"unknown command {command!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
