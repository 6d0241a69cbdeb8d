"""Time minilm's JAX train step beside the same step in PyTorch + transformers GPT-2 + PEFT LoRA.

    .venv/bin/python benchmarks/peers/run.py --preset small --mode both --rank 8 --targets all-linear \
        --rounds 5 --steps 3 --dtype float32 --json peers.json

Each (framework, mode) pair gets a long-lived worker process (worker.py). Workers are started one at a
time, and each builds and warms its step (JAX: compile + warm steps; torch: warm steps). Then the
workers take turns, one at a time: in each round every worker times `--steps` steps while the others
wait on a pipe. Rounds alternate the order (A B C D, then D C B A) so slow drift of the machine falls
on both sides alike. See README.md beside this file.

Needs the optional `peers` extra: pip install -e '.[peers]'.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from minilm import allocator

HERE = Path(__file__).resolve().parent
TARGET_CHOICES = ("all-linear", "attn.*", "attn.q,attn.v")
ALIASES = {"attn-all": "attn.*", "attn-qv": "attn.q,attn.v"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Time minilm's JAX train step and the same GPT-2 step in PyTorch eager + transformers "
                    "(+ PEFT LoRA), alternately, each framework in its own process; print ms/step, tokens/s, "
                    "parameter counts and the ratios. Needs: pip install -e '.[peers]'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", help="minilm preset (tiny, small or gpt2); vocabulary 65, gpt2's 50257")
    parser.add_argument("--mode", choices=("full", "lora", "both"), default="both",
                        help="full fine-tuning, LoRA, or both (then 4 workers: LoRA/full of one framework is "
                             "measured in the same run)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank R; alpha is 2R on both sides")
    parser.add_argument("--targets", default="all-linear", choices=TARGET_CHOICES + tuple(ALIASES),
                        help="LoRA targets, minilm's names (torch side mapped onto GPT-2's c_attn/c_proj/c_fc; "
                             "see README.md)")
    parser.add_argument("--separate-qkv", action="store_true",
                        help="give our q, k, v separate adapters (the LoRA paper's layout, 6RD per block) instead "
                             "of one shared A (LoraConfig fuse_qkv: PEFT's adapter on GPT-2's fused c_attn, 4RD), "
                             "so the two sides no longer train the same number of parameters")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of alternation")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per worker per round")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: torch autocast around forward + loss; ours: mixed precision "
                             "(train.mixed_precision); float32 master weights and optimizer state on both sides")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per worker after building")
    parser.add_argument("--turn-warmup", type=int, default=1,
                        help="untimed steps at the start of each turn: the first step after a worker has waited "
                             "for the others is slower (on this VM ~+600 ms for ours, less for torch), which "
                             "continuous training never sees")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; unset: os.cpu_count(), torch's own default")
    parser.add_argument("--settle", type=float, default=0.2,
                        help="seconds to wait before each worker's turn, so the previous worker's spinning "
                             "threads have gone to sleep")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="do not give both workers glibc's tunables (huge pages, memory kept between steps: "
                             "minilm/allocator.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write every figure and raw time here")
    args = parser.parse_args(argv)
    args.targets = ALIASES.get(args.targets, args.targets)
    # Ours trains PEFT's adapter wherever PEFT's adapts all of q, k, v (GPT-2's fused c_attn): one shared A.
    args.fuse_qkv = args.targets in ("all-linear", "attn.*") and not args.separate_qkv
    if args.rounds < 1 or args.steps < 1 or args.rank < 1 or args.warmup < 0:
        parser.error("--rounds, --steps and --rank must be >= 1, --warmup >= 0")
    return args


def check_installed() -> dict:
    """Versions of torch, transformers, peft, without importing them here; exit 2 if one is missing."""
    missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"run.py: {', '.join(missing)} not installed; install the optional extra: "
              f"pip install -e '.[peers]'", file=sys.stderr)
        sys.exit(2)
    return {name: importlib.metadata.version(name) for name in ("jax", "torch", "transformers", "peft")}


class Worker:
    def __init__(self, side: str, mode: str, args):
        self.side, self.mode = side, mode
        command = [sys.executable, str(HERE / "worker.py"), "--side", side, "--mode", mode, "--preset", args.preset,
                   "--rank", str(args.rank), "--targets", args.targets, "--dtype", args.dtype,
                   "--warmup", str(args.warmup), "--seed", str(args.seed)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.fuse_qkv:
            command += ["--fuse-qkv"]
        start = time.perf_counter()
        # Both sides get the same allocator settings (minilm/allocator.py) unless turned off.
        env = dict(os.environ) if args.no_malloc_tuning else allocator.environment()
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=env)
        self.facts = self.receive()
        self.facts["startup_seconds"] = time.perf_counter() - start
        self.times: list[float] = []
        self.other_cpu: list[float] = []
        self.last_loss: float | None = None

    @property
    def name(self) -> str:
        return f"{'ours' if self.side == 'jax' else 'torch'} {self.mode}"

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"{self.side} {self.mode} worker exited (code {code}) without replying; "
                               f"its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def send(self, obj) -> dict:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def run(self, steps: int, untimed: int = 0) -> None:
        reply = self.send({"cmd": "run", "steps": steps, "untimed": untimed})
        self.times += reply["times"]
        if reply.get("other_cpu_fraction") is not None:
            self.other_cpu.append(reply["other_cpu_fraction"])
        if reply.get("loss") is not None:
            self.last_loss = reply["loss"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.facts.update(self.send({"cmd": "final"}))
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def summary(self) -> dict:
        out = {"side": self.side, "mode": self.mode}
        if self.times:
            median = statistics.median(self.times)
            out.update(ms_per_step=1e3 * median, ms_per_step_min=1e3 * min(self.times),
                       tokens_per_s=self.facts["tokens_per_step"] / median, steps_timed=len(self.times),
                       other_cpu_fraction=statistics.mean(self.other_cpu) if self.other_cpu else None,
                       times_s=self.times)
        keys = ("trainable_params", "total_params", "base_params", "tokens_per_step", "compile_seconds",
                "warmup_seconds", "startup_seconds", "optimizer_state_bytes", "peak_rss_bytes", "xla_flops",
                "xla_temp_bytes", "attn_implementation", "torch_threads", "torch_interop_threads", "cpu_capability",
                "targets", "peft_target_modules", "adapted_kinds", "adapted_modules", "backend")
        out.update({k: self.facts[k] for k in keys if k in self.facts})
        if self.last_loss is not None:
            out["last_loss"] = self.last_loss
        return out


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    return []


def main(argv=None) -> int:
    args = parse_args(argv)
    versions = check_installed()
    modes = ("full", "lora") if args.mode == "both" else (args.mode,)
    order = [(side, mode) for mode in modes for side in ("jax", "torch")]

    workers: list[Worker] = []
    try:
        for side, mode in order:  # one at a time: no two builds or compiles compete for the CPUs
            print(f"starting {side} {mode} ...", file=sys.stderr, flush=True)
            workers.append(Worker(side, mode, args))

        by = {(w.side, w.mode): w for w in workers}
        for mode in modes:  # the architectures must match: same base parameter count
            ours, theirs = by[("jax", mode)].facts["base_params"], by[("torch", mode)].facts["base_params"]
            if ours != theirs:
                print(f"run.py: parameter check failed ({mode}): minilm's base model has {ours:,} parameters, "
                      f"the transformers GPT-2 {theirs:,}; the two are not the same model", file=sys.stderr)
                return 1
        if "lora" in modes and args.fuse_qkv:
            ours, theirs = (by[(side, "lora")].facts["trainable_params"] for side in ("jax", "torch"))
            if ours != theirs:
                print(f"run.py: adapter check failed: minilm trains {ours:,} LoRA parameters, PEFT {theirs:,}",
                      file=sys.stderr)
                return 1

        for r in range(args.rounds):
            for w in (workers if r % 2 == 0 else workers[::-1]):
                time.sleep(args.settle)
                w.run(args.steps, args.turn_warmup)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    except RuntimeError as e:  # a worker failed: its traceback is above, on stderr
        print(f"run.py: {e}", file=sys.stderr)
        return 1
    finally:
        for w in workers:
            w.close()

    rows = {(w.side, w.mode): w.summary() for w in workers}

    def ms(side, mode):
        return rows.get((side, mode), {}).get("ms_per_step")

    ratios = {}
    for mode in modes:
        ratios[f"ours_over_torch_{mode}"] = ratio(ms("jax", mode), ms("torch", mode))
    if args.mode == "both":
        ratios["ours_lora_over_full"] = ratio(ms("jax", "lora"), ms("jax", "full"))
        ratios["torch_lora_over_full"] = ratio(ms("torch", "lora"), ms("torch", "full"))

    torch_facts = next(w.facts for w in workers if w.side == "torch")
    environment = {**versions, "python": platform.python_version(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                   "cpu_flags": cpu_flags(), "torch_threads": torch_facts.get("torch_threads"),
                   "torch_interop_threads": torch_facts.get("torch_interop_threads"),
                   "torch_cpu_capability": torch_facts.get("cpu_capability"),
                   "attn_implementation": torch_facts.get("attn_implementation")}
    settings = {k: getattr(args, k) for k in ("preset", "mode", "rank", "targets", "fuse_qkv", "rounds", "steps",
                                             "turn_warmup", "dtype", "warmup", "settle", "seed", "threads")}

    print()
    tokens = next(iter(rows.values())).get("tokens_per_step")
    qkv = "one A for q, k, v as PEFT's c_attn" if args.fuse_qkv else "separate adapters on our side"
    lora_text = (f", LoRA rank {args.rank} alpha {2 * args.rank} targets {args.targets} ({qkv})"
                 if "lora" in modes else "")
    print(f"preset {args.preset}, {args.dtype}{lora_text}; {args.rounds} rounds x {args.steps} steps per worker, "
          f"{tokens:,} tokens/step")
    print(f"{environment['cpu']}, {environment['cpus']} CPUs; jax {versions['jax']}, torch {versions['torch']} "
          f"({environment['torch_threads']} threads, {environment['torch_cpu_capability']}), transformers "
          f"{versions['transformers']} (attention: {environment['attn_implementation']}), peft {versions['peft']}")
    header = (f"{'':12} {'ms/step':>9} {'min ms':>9} {'tokens/s':>9} {'trainable':>11} {'total':>11} "
              f"{'compile s':>9} {'others':>7}")
    print(header)
    print("-" * len(header))
    for w in workers:
        row = rows[(w.side, w.mode)]
        print(f"{w.name:12} {fmt(row.get('ms_per_step'), '9.1f'):>9} {fmt(row.get('ms_per_step_min'), '9.1f'):>9} "
              f"{fmt(row.get('tokens_per_s'), '9,.0f'):>9} {fmt(row.get('trainable_params'), '11,d'):>11} "
              f"{fmt(row.get('total_params'), '11,d'):>11} {fmt(row.get('compile_seconds'), '9.1f', '-'):>9} "
              f"{fmt(row.get('other_cpu_fraction'), '7.0%', '-'):>7}")
    print()
    for mode in modes:
        print(f"ours/torch time, {mode:4}: {fmt(ratios[f'ours_over_torch_{mode}'], '.2f')}   (< 1: ours is faster)")
    if args.mode == "both":
        print(f"LoRA/full time, ours: {fmt(ratios['ours_lora_over_full'], '.2f')}   "
              f"torch: {fmt(ratios['torch_lora_over_full'], '.2f')}")
    if "lora" in modes:
        kinds = rows[("torch", "lora")].get("adapted_kinds")
        print(f"torch LoRA adapts {kinds} (PEFT target_modules "
              f"{rows[('torch', 'lora')].get('peft_target_modules')}); GPT-2's q,k,v are one fused c_attn matrix")
    others = [row.get("other_cpu_fraction") for row in rows.values() if row.get("other_cpu_fraction") is not None]
    if others and max(others) > 0.05:
        print(f"warning: other processes used up to {max(others):.0%} of the CPUs while steps were timed; "
              f"the times are inflated and the ratios less certain")

    if args.json:
        from minilm.checkpoint import write_text_atomic  # imports JAX: only now, with the workers closed

        result = {"settings": settings, "environment": environment, "results": list(rows.values()), "ratios": ratios}
        write_text_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
