"""`minilm bench`: time real train steps, full fine-tuning and LoRA side by side, against predictions.

The cases are minilm.bench's (full fine-tuning) and lora's (`lora.train_step_case`); the predicted
FLOPs, bytes and time are minilm/cost.py's and lora/cost.py's. This module checks every input before
the first timing (a bad adapter, sweep size or file name fails in a second, not after minutes), then
prints the table, the LoRA/full ratios, sampling speed and an optional sweep over widths and ranks.
The size flags are ModelConfig's and TrainConfig's fields (flags.py), defaulting to the preset's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from minilm.cli.flags import add_config_flags, given, preset_note
from minilm.cli.mesh_flags import add_mesh_flags
from minilm.config import PRESETS, ModelConfig, TrainConfig, preset
from minilm.errors import MinilmError

# The config fields bench exposes: the sizes that set a step's cost, and the number format.
MODEL_SIZES = ("vocab_size", "context", "width", "layers", "heads")
TRAIN_SIZES = ("batch_size", "grad_accum", "dtype")
VOCAB_SIZE = 65  # shakespeare-char's: bench has no tokenizer, and times random tokens
LORA_SPEC = "rank=8,alpha=16,targets=all-linear,fuse_qkv=true"


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="time a train step, full vs LoRA; FLOPs, memory, sampling speed",
                            description="Time real train steps of a preset's model (random tokens), full fine-tuning "
                                        "and/or LoRA, and print measured next to predicted: FLOPs per token split "
                                        "into forward, input gradients, weight gradients and LoRA's extra work "
                                        "(minilm/cost.py), MFU against a matmul peak measured here, memory by kind, "
                                        "compile time, and sampling speed with and without the KV cache.")
    p.add_argument("--preset", choices=list(PRESETS), default="small", help="model and batch sizes (default: small)")
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both", help="what to time (default: both)")
    p.add_argument("--lora", metavar="SPEC", default=LORA_SPEC,
                   help=f"the adapter for --mode lora/both, as for finetune (default: {LORA_SPEC}: every block "
                        "matrix, with one A shared by q, k and v, the adapter PEFT builds on GPT-2's fused c_attn; "
                        "fuse_qkv=false gives each its own A)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case, after a warm-up step (default: 5)")
    p.add_argument("--no-sample", dest="sample", action="store_false", help="skip the sampling-speed measurement")
    p.add_argument("--no-phases", dest="phases", action="store_false",
                   help="skip timing the step's parts (the loss alone, + gradients, + optimizer update), which "
                        "compiles each part separately")
    p.add_argument("--sweep", action="store_true", help="also time LoRA/full across --sweep-widths and --sweep-ranks")
    p.add_argument("--sweep-widths", default="128,256,384", metavar="W1,W2",
                   help="widths for --sweep (default: 128,256,384)")
    p.add_argument("--sweep-ranks", default="1,8,64", metavar="R1,R2", help="ranks for --sweep (default: 1,8,64)")
    p.add_argument("--plot", default="bench_ratio.png", metavar="PATH",
                   help="where --sweep draws LoRA/full time against rank and width (default: bench_ratio.png)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    models = preset_note(0)
    add_config_flags(p, ModelConfig, "model (defaults from --preset)", names=MODEL_SIZES,
                     default_note=lambda f: (f"bench has no tokenizer; default: the preset's (gpt2: 50257), else "
                                             f"{VOCAB_SIZE}, shakespeare-char's"
                                             if f.name == "vocab_size" else models(f)))
    add_config_flags(p, TrainConfig, "training (defaults from --preset)", preset_note(1), names=TRAIN_SIZES)
    add_mesh_flags(p, processes=False)
    p.set_defaults(run=run)


def int_list(text: str, flag: str) -> list[int]:
    """'128,256' -> [128, 256]: positive integers, or an error that shows the flag's syntax."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise MinilmError(f"{flag} {text!r}: expected positive integers separated by commas, e.g. 128,256")
    return values


def sweep_model(model_cfg: ModelConfig, width: int) -> ModelConfig:
    return dataclasses.replace(model_cfg, width=width, heads=max(1, width // 64))  # heads of size 64


def sweep_adapter(lora_cfg, rank: int):
    return dataclasses.replace(lora_cfg, rank=rank, alpha=2.0 * rank)


def figure_formats() -> set[str]:
    """The file suffixes matplotlib can save a figure as (png, pdf, svg, ...)."""
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def check_inputs(args, model_cfg: ModelConfig, train_cfg: TrainConfig, lora_cfg, modes: list[str]) -> None:
    """Fail before any timing on an adapter that does not fit, a bad sweep size or an unwritable file name;
    replaces args.sweep_widths and args.sweep_ranks by their lists of integers."""
    import lora

    from minilm.cli.fit import check_size

    if args.steps <= 0:
        raise MinilmError(f"--steps {args.steps}: must be positive")
    check_size(model_cfg, train_cfg.batch_size, "this bench's model")
    if "lora" in modes:
        lora.adapter_ranks(model_cfg, lora_cfg)
    # read even without --sweep, so that a bad value is never silently ignored
    args.sweep_widths = int_list(args.sweep_widths, "--sweep-widths")
    args.sweep_ranks = int_list(args.sweep_ranks, "--sweep-ranks")
    if args.sweep:
        for width in args.sweep_widths:
            try:
                cfg = sweep_model(model_cfg, width)
            except MinilmError as e:
                raise MinilmError(f"--sweep-widths: {e}") from None
            for rank in args.sweep_ranks:
                try:
                    lora.adapter_ranks(cfg, sweep_adapter(lora_cfg, rank))
                except MinilmError as e:
                    raise MinilmError(f"--sweep-ranks {rank} at width {width}: {e}") from None
        formats = figure_formats()
        if Path(args.plot).suffix.lstrip(".").lower() not in formats:
            raise MinilmError(f"--plot {args.plot}: name the file with one of the suffixes "
                              f"{', '.join('.' + f for f in sorted(formats))}, e.g. bench_ratio.png")
    for flag, path in (("--json", args.json), ("--plot", args.plot if args.sweep else None)):
        if path and Path(path).is_dir():
            raise MinilmError(f"{flag} {path} is a folder; give a file name such as bench.json")
        if path and not Path(path).parent.is_dir():
            raise MinilmError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it first")


def configs(args) -> tuple[ModelConfig, TrainConfig]:
    """The preset's model and training configs with the size flags given on the command line."""
    base_model, base_train = preset(args.preset)
    if args.vocab_size is None:  # a preset with its own vocabulary (gpt2) keeps it
        args.vocab_size = base_model.vocab_size or VOCAB_SIZE
    if args.vocab_size < 1:  # bench has no tokenizer to set it from: the flag is the vocabulary
        raise MinilmError(f"--vocab-size {args.vocab_size}: expected a vocabulary of at least 1 token, "
                          f"e.g. --vocab-size {VOCAB_SIZE}")
    return (dataclasses.replace(base_model, **given(args, ModelConfig, MODEL_SIZES)),
            dataclasses.replace(base_train, **given(args, TrainConfig, TRAIN_SIZES)))


def run(args) -> int:
    import jax

    import lora
    from minilm import bench, checkpoint, machine

    model_cfg, train_cfg = configs(args)
    lora_cfg = lora.parse_spec(args.lora)
    modes = ["full", "lora"] if args.mode == "both" else [args.mode]
    check_inputs(args, model_cfg, train_cfg, lora_cfg, modes)
    mesh = mesh_of(args, train_cfg)  # a bad --mesh fails here, before any timing

    print(f"minilm bench: width {model_cfg.width}, {model_cfg.layers} layers, {model_cfg.heads} heads, context "
          f"{model_cfg.context}, vocabulary {model_cfg.vocab_size}; batch {train_cfg.batch_size} x "
          f"{train_cfg.grad_accum} = {train_cfg.batch_size * train_cfg.grad_accum * model_cfg.context:,} tokens per "
          f"step; {train_cfg.dtype}; {jax.device_count()} {jax.default_backend()} device(s), "
          f"{os.cpu_count()} CPU cores")
    cpu = machine.cpu_features()  # the ratios depend on it (bfloat16 needs avx512_bf16 or AMX): said, and kept
    print(machine.describe(cpu))
    peak, bandwidth = bench.matmul_peak(), bench.memory_bandwidth()
    print(f"measured here: matmul peak {peak / 1e9:,.0f} GFLOP/s (1024^3 float32), memory {bandwidth / 1e9:,.1f} GB/s")
    result = {"machine": {"cpu_count": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
                          "matmul_peak_flops": peak, "memory_bytes_per_s": bandwidth,
                          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "cpu": cpu},
              "cases": []}
    for mode in modes:
        print(f"{mode}: compiling and timing {args.steps} steps ...", flush=True)
        case = (lora.train_step_case(model_cfg, train_cfg, lora_cfg) if mode == "lora"
                else bench.train_step_case(model_cfg, train_cfg))
        result["cases"].append(bench.describe(case, case.run(args.steps), peak, bandwidth))
        if args.phases:
            result["cases"][-1]["phases"] = case.phases()
        result[mode] = result["cases"][-1]
    print(bench.format_cases(result["cases"]))
    if len(modes) == 1:
        result["ms_per_step"], result["tokens_per_s"] = result[mode]["ms_per_step"], result[mode]["tokens_per_s"]
    else:
        result["lora_over_full"] = bench.ratios(result["full"], result["lora"])
        print(bench.explain(result["lora_over_full"]))
    if args.sample:
        print("sampling: compiling and timing, with and without the KV cache ...", flush=True)
        speed = result["sampling"] = bench.sampling_speed(model_cfg)
        print(f"sampling {speed['new_tokens']} tokens: {speed['cached_tokens_per_s']:,.0f} tokens/s with the KV cache, "
              f"{speed['uncached_tokens_per_s']:,.0f} without ({speed['speedup']:.1f}x)")
    if args.sweep:
        result["sweep"] = sweep(args, model_cfg, train_cfg, lora_cfg, peak, bandwidth)
    if mesh is not None:
        result["mesh"] = on_mesh(args, mesh, model_cfg, train_cfg, lora_cfg, modes)
    if args.json:
        checkpoint.write_text_atomic(Path(args.json), json.dumps(result, indent=1))
        print(f"json: {args.json}")
    return 0


def sweep(args, model_cfg, train_cfg, lora_cfg, peak, bandwidth) -> list[dict]:
    """LoRA/full step time across widths and ranks (heads of size 64; LoRA with --lora's targets)."""
    from tqdm import tqdm

    import lora
    from minilm import bench

    widths, ranks = args.sweep_widths, args.sweep_ranks
    rows = []
    with tqdm(total=len(widths) * (1 + len(ranks)), desc="sweep", unit="case") as bar:
        for width in widths:
            cfg = sweep_model(model_cfg, width)
            full_case = bench.train_step_case(cfg, train_cfg)
            full = bench.describe(full_case, full_case.run(args.steps), peak, bandwidth)
            bar.update(1)
            for rank in ranks:
                bar.set_postfix_str(f"width {width} rank {rank}")
                case = lora.train_step_case(cfg, train_cfg, sweep_adapter(lora_cfg, rank))
                low = bench.describe(case, case.run(args.steps), peak, bandwidth)
                r = bench.ratios(full, low)
                rows.append({"width": width, "rank": rank, "full_ms": full["ms_per_step"],
                             "lora_ms": low["ms_per_step"], "time_ratio": r["time"], "flop_ratio": r["model_flops"],
                             "predicted_ratio": r["predicted_time"]})
                bar.update(1)
    print(f"{'width':>6} {'rank':>5} {'full ms':>9} {'LoRA ms':>9} {'time ratio':>11} {'FLOP ratio':>11} "
          f"{'roofline':>9}")
    for r in rows:
        print(f"{r['width']:>6} {r['rank']:>5} {r['full_ms']:>9.1f} {r['lora_ms']:>9.1f} {r['time_ratio']:>11.2f} "
              f"{r['flop_ratio']:>11.2f} {r['predicted_ratio']:>9.2f}")
    plot = Path(args.plot)
    bench.ratio_plot(rows, plot)
    print(f"plot: {plot}")
    return rows


def mesh_of(args, train_cfg):
    """The device mesh --mesh asks for (None without it); checked against the devices and the batch."""
    from minilm import mesh

    return None if args.mesh is None else mesh.make_mesh(mesh.parse_mesh(args.mesh), train_cfg.batch_size)


def on_mesh(args, mesh, model_cfg, train_cfg, lora_cfg, modes) -> list[dict]:
    """--mesh: each mode's step compiled for the mesh: bytes per device, collectives measured and predicted."""
    import lora
    from lora.mesh import adapter_spec
    from minilm import bench
    from minilm.mesh import Layout, param_spec

    cases = []
    for mode in modes:
        print(f"{mode} on the mesh {dict(mesh.shape)}: compiling and timing {args.steps} steps ...", flush=True)
        case = (lora.train_step_case(model_cfg, train_cfg, lora_cfg) if mode == "lora"
                else bench.train_step_case(model_cfg, train_cfg))
        # LoRA: the frozen base split like a full model's weights, the adapters whole (lora/mesh.py)
        cases.append(bench.mesh_case(case, Layout(mesh, adapter_spec if mode == "lora" else param_spec), args.steps))
    print(bench.format_mesh_cases(cases))
    return cases

