"""Time minilm's JAX train step beside the same step in PyTorch + transformers GPT-2 + PEFT LoRA.

    .venv/bin/python benchmarks/peers/run.py --preset small --mode both --rank 8 --targets all-linear \
        --rounds 5 --steps 3 --dtype float32 --json peers.json
    # ours, PyTorch eager and torch.compile, each in float32 and bfloat16: 6 workers (--mode both: 12,
    # ~20 GB of memory; so one mode per run, README.md)
    .venv/bin/python benchmarks/peers/run.py --preset small --mode full --dtype both --compile both \
        --rounds 4 --steps 2 --json peers_full.json

Each (framework, mode, number format; for torch also eager or compiled) gets a long-lived worker
process (worker.py). Workers are started one at a time, and each builds and warms its step (JAX:
compile + warm steps; torch: warm steps, the first of which compiles under --compile). Then the
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
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from minilm import allocator, machine

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
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="float32",
                        help="bfloat16: torch autocast around forward + loss; ours: mixed precision "
                             "(train.mixed_precision); float32 master weights and optimizer state on both sides. "
                             "both: a worker for each, so bfloat16/float32 is measured in the same run")
    parser.add_argument("--compile", choices=("eager", "compiled", "both"), default="eager",
                        help="the torch side: eager, torch.compile (default mode, inductor; its compile time is "
                             "reported apart and not timed), or both as two workers")
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
    args.dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    args.compiles = ("eager", "compiled") if args.compile == "both" else (args.compile,)
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


def check_compiler(args) -> None:
    """torch.compile's CPU backend (inductor) writes C++ and builds it with the system's compiler: without
    one, say how to install it, rather than fail in a worker minutes later; exit 2."""
    if "compiled" in args.compiles and not (shutil.which("g++") or shutil.which("c++")):
        print("run.py: --compile compiled needs a C++ compiler for torch.compile's CPU backend (inductor), and "
              "none is on PATH; install one (Debian/Ubuntu, as root: apt-get install g++) or use --compile eager",
              file=sys.stderr)
        sys.exit(2)


class Worker:
    def __init__(self, side: str, mode: str, args, dtype: str | None = None, compile: str = "eager"):
        self.side, self.mode = side, mode
        self.dtype = dtype or args.dtypes[0]
        self.compile = compile if side == "torch" else None  # ours is always one compiled XLA program
        command = [sys.executable, str(HERE / "worker.py"), "--side", side, "--mode", mode, "--preset", args.preset,
                   "--rank", str(args.rank), "--targets", args.targets, "--dtype", self.dtype,
                   "--warmup", str(args.warmup), "--seed", str(args.seed)]
        if self.compile == "compiled":
            command += ["--compile", "compiled"]
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
    def key(self) -> tuple:
        return (self.side, self.mode, self.dtype, self.compile)

    @property
    def name(self) -> str:
        side = "ours" if self.side == "jax" else "torch" if self.compile == "eager" else "torch.compile"
        return f"{side} {self.mode} {SHORT[self.dtype]}"

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
        out = {"side": self.side, "mode": self.mode, "dtype": self.dtype, "compile": self.compile}
        if self.times:
            median = statistics.median(self.times)
            out.update(ms_per_step=1e3 * median, ms_per_step_min=1e3 * min(self.times),
                       tokens_per_s=self.facts["tokens_per_step"] / median, steps_timed=len(self.times),
                       other_cpu_fraction=statistics.mean(self.other_cpu) if self.other_cpu else None,
                       times_s=self.times)
        keys = ("trainable_params", "total_params", "base_params", "tokens_per_step", "compile_seconds",
                "compile_mode", "warmup_seconds", "startup_seconds", "optimizer_state_bytes", "peak_rss_bytes", "xla_flops",
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


SHORT = {"float32": "f32", "bfloat16": "bf16"}


def ratios_of(rows: dict, modes, args) -> dict:
    """Every ratio of step times the run measured, keyed by name. Per mode and number format: ours over
    each torch variant and over the best of them (`ours_over_torch_best_*`); LoRA/full per side; and per
    side bfloat16/float32. With one torch variant and one format the first keys are the old
    `ours_over_torch_{mode}`, `ours_lora_over_full` and `torch_lora_over_full`."""
    def ms(side, mode, dtype, compile=None):
        return rows.get((side, mode, dtype, compile), {}).get("ms_per_step")

    single = len(args.dtypes) == 1 and len(args.compiles) == 1
    out = {}
    for dtype in args.dtypes:
        for mode in modes:
            ours = ms("jax", mode, dtype)
            torch = {compile: ms("torch", mode, dtype, compile) for compile in args.compiles}
            for compile, theirs in torch.items():
                out["ours_over_torch_" + (mode if single else f"{compile}_{mode}_{dtype}")] = ratio(ours, theirs)
            best = min((t for t in torch.values() if t), default=None)
            if not single:
                out[f"ours_over_torch_best_{mode}_{dtype}"] = ratio(ours, best)
        if len(modes) == 2:
            for side, compile in [("jax", None)] + [("torch", c) for c in args.compiles]:
                name = "ours" if side == "jax" else "torch" if single else f"torch_{compile}"
                key = f"{name}_lora_over_full" + ("" if single else f"_{dtype}")
                out[key] = ratio(ms(side, "lora", dtype, compile), ms(side, "full", dtype, compile))
    if len(args.dtypes) == 2:
        for mode in modes:
            for side, compile in [("jax", None)] + [("torch", c) for c in args.compiles]:
                name = "ours" if side == "jax" else f"torch_{compile}"
                out[f"{name}_bf16_over_f32_{mode}"] = ratio(ms(side, mode, "bfloat16", compile),
                                                            ms(side, mode, "float32", compile))
    return out


def ratio_lines(ratios: dict, modes, args) -> list[str]:
    """The ratios as the run prints them (< 1 means the first named is faster)."""
    if len(args.dtypes) == 1 and len(args.compiles) == 1:
        torch = "torch" if args.compiles == ("eager",) else "torch.compile"
        lines = [f"ours/{torch} time, {mode:4}: {fmt(ratios[f'ours_over_torch_{mode}'], '.2f')}   (< 1: ours is "
                 f"faster)" for mode in modes]
        if len(modes) == 2:
            lines.append(f"LoRA/full time, ours: {fmt(ratios['ours_lora_over_full'], '.2f')}   "
                         f"torch: {fmt(ratios['torch_lora_over_full'], '.2f')}")
        return lines
    lines = ["ours/torch time (< 1: ours is faster; best: the faster torch variant):"]
    for dtype in args.dtypes:
        for mode in modes:
            cells = [f"{c} {fmt(ratios[f'ours_over_torch_{c}_{mode}_{dtype}'], '.2f')}" for c in args.compiles]
            if len(args.compiles) > 1:
                cells.append(f"best {fmt(ratios[f'ours_over_torch_best_{mode}_{dtype}'], '.2f')}")
            lines.append(f"  {mode:4} {SHORT[dtype]:4}: " + ", ".join(cells))
        if len(modes) == 2:
            cells = [f"ours {fmt(ratios[f'ours_lora_over_full_{dtype}'], '.2f')}"]
            cells += [f"torch {c} {fmt(ratios[f'torch_{c}_lora_over_full_{dtype}'], '.2f')}" for c in args.compiles]
            lines.append(f"LoRA/full time, {SHORT[dtype]}: " + ", ".join(cells))
    if len(args.dtypes) == 2:
        for mode in modes:
            cells = [f"ours {fmt(ratios[f'ours_bf16_over_f32_{mode}'], '.2f')}"]
            cells += [f"torch {c} {fmt(ratios[f'torch_{c}_bf16_over_f32_{mode}'], '.2f')}" for c in args.compiles]
            lines.append(f"bf16/f32 time, {mode:4}: " + ", ".join(cells))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    versions = check_installed()
    check_compiler(args)
    modes = ("full", "lora") if args.mode == "both" else (args.mode,)
    sides = [("jax", None)] + [("torch", compile) for compile in args.compiles]
    order = [(side, mode, dtype, compile) for mode in modes for dtype in args.dtypes for side, compile in sides]

    workers: list[Worker] = []
    try:
        for side, mode, dtype, compile in order:  # one at a time: no two builds or compiles compete for the CPUs
            print(f"starting {side} {mode} {dtype}{'' if compile is None else ' ' + compile} ...", file=sys.stderr,
                  flush=True)
            workers.append(Worker(side, mode, args, dtype, compile or "eager"))

        for mode in modes:  # the architectures must match: same base parameter count
            ours = next(w for w in workers if w.side == "jax" and w.mode == mode)
            for theirs in (w for w in workers if w.side == "torch" and w.mode == mode):
                if ours.facts["base_params"] != theirs.facts["base_params"]:
                    print(f"run.py: parameter check failed ({mode}): minilm's base model has "
                          f"{ours.facts['base_params']:,} parameters, the transformers GPT-2 "
                          f"{theirs.facts['base_params']:,}; the two are not the same model", file=sys.stderr)
                    return 1
                if mode == "lora" and args.fuse_qkv and \
                        ours.facts["trainable_params"] != theirs.facts["trainable_params"]:
                    print(f"run.py: adapter check failed: minilm trains {ours.facts['trainable_params']:,} LoRA "
                          f"parameters, PEFT {theirs.facts['trainable_params']:,}", file=sys.stderr)
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

    rows = {w.key: w.summary() for w in workers}
    ratios = ratios_of(rows, modes, args)

    torch_facts = next(w.facts for w in workers if w.side == "torch")
    cpu = machine.cpu_features()
    environment = {**versions, "python": platform.python_version(), "cpu": cpu["model"], "cpus": cpu["cpus"],
                   "cpu_flags": cpu["flags"], "cpu_all_flags": cpu["all_flags"],
                   "torch_threads": torch_facts.get("torch_threads"),
                   "torch_interop_threads": torch_facts.get("torch_interop_threads"),
                   "torch_cpu_capability": torch_facts.get("cpu_capability"),
                   "attn_implementation": torch_facts.get("attn_implementation")}
    settings = {k: getattr(args, k) for k in ("preset", "mode", "rank", "targets", "fuse_qkv", "rounds", "steps",
                                             "turn_warmup", "dtype", "compile", "warmup", "settle", "seed",
                                             "threads")}

    print()
    tokens = next(iter(rows.values())).get("tokens_per_step")
    qkv = "one A for q, k, v as PEFT's c_attn" if args.fuse_qkv else "separate adapters on our side"
    lora_text = (f", LoRA rank {args.rank} alpha {2 * args.rank} targets {args.targets} ({qkv})"
                 if "lora" in modes else "")
    print(f"preset {args.preset}, {' and '.join(args.dtypes)}{lora_text}; {args.rounds} rounds x {args.steps} steps "
          f"per worker, {tokens:,} tokens/step")
    print(machine.describe(cpu))
    print(f"{environment['cpu']}, {environment['cpus']} CPUs; jax {versions['jax']}, torch {versions['torch']} "
          f"({environment['torch_threads']} threads, {environment['torch_cpu_capability']}), transformers "
          f"{versions['transformers']} (attention: {environment['attn_implementation']}), peft {versions['peft']}")
    header = (f"{'':23} {'ms/step':>9} {'min ms':>9} {'tokens/s':>9} {'trainable':>11} {'total':>11} "
              f"{'compile s':>9} {'others':>7}")
    print(header)
    print("-" * len(header))
    for w in workers:
        row = rows[w.key]
        print(f"{w.name:23} {fmt(row.get('ms_per_step'), '9.1f'):>9} {fmt(row.get('ms_per_step_min'), '9.1f'):>9} "
              f"{fmt(row.get('tokens_per_s'), '9,.0f'):>9} {fmt(row.get('trainable_params'), '11,d'):>11} "
              f"{fmt(row.get('total_params'), '11,d'):>11} {fmt(row.get('compile_seconds'), '9.1f', '-'):>9} "
              f"{fmt(row.get('other_cpu_fraction'), '7.0%', '-'):>7}")
    print()
    print("\n".join(ratio_lines(ratios, modes, args)))
    if "lora" in modes:
        torch_lora = next(rows[w.key] for w in workers if w.side == "torch" and w.mode == "lora")
        print(f"torch LoRA adapts {torch_lora.get('adapted_kinds')} (PEFT target_modules "
              f"{torch_lora.get('peft_target_modules')}); GPT-2's q,k,v are one fused c_attn matrix")
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
