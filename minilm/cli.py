"""The `minilm` command: the one place that wires config, data, model, training and files together.

Flags are generated from the config dataclasses (config.py): each field is one flag, its help the
field's `help`, so there is a single list of options. A flag left out keeps the preset's value (or,
on --resume, the checkpoint's). Bad input ends in one line on stderr and exit status 2, never a
traceback; an interrupted training run saves its checkpoint first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import typing
from pathlib import Path

from minilm import allocator
from minilm.config import FINETUNE, LORA_LR, PRESETS, DataConfig, ModelConfig, SampleConfig, TrainConfig, preset
from minilm.errors import MinilmError

# ---------------------------------------------------------------- flags from dataclasses


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str, default_note=None) -> None:
    """One flag per field of `cls`, defaulting to None (= not given), so given flags can be told apart."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in _cli_fields(cls):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        note = default_note(f) if default_note else f"default: {f.default}"
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                               help=f"{f.metadata['help']} ({note})")
        else:
            group.add_argument(_flag(f.name), type=kind, default=None, metavar=f.metadata.get("metavar", kind.__name__.upper()),
                               help=f"{f.metadata['help']} ({note})")


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` whose flags were given on the command line."""
    return {f.name: getattr(args, f.name) for f in _cli_fields(cls) if getattr(args, f.name) is not None}


def _preset_note(index: int):
    def note(f):
        return ", ".join(f"{name}: {getattr(cfgs[index], f.name)}" for name, cfgs in PRESETS.items())
    return note


def _check_unchanged(saved, requested: dict, what: str) -> None:
    changed = {k: (getattr(saved, k), v) for k, v in requested.items() if getattr(saved, k) != v}
    if changed:
        listing = "; ".join(f"{_flag(k)} {new} (checkpoint: {old})" for k, (old, new) in changed.items())
        raise MinilmError(f"cannot --resume with a changed {what}: {listing}. Drop these flags to resume "
                          f"as saved, or start a new run in another --out folder")


# ---------------------------------------------------------------- train


def cmd_train(args) -> int:
    import jax

    from minilm import checkpoint, train
    from minilm.data import check_fits, load_dataset
    from minilm.model import init
    from minilm.tree import partition

    model_over, train_over, data_over = given(args, ModelConfig), given(args, TrainConfig), given(args, DataConfig)
    if args.resume and args.overwrite:
        raise MinilmError("--resume and --overwrite contradict each other; pass one of them")
    default_name = data_over.get("corpus") or Path(data_over.get("text") or "text").stem
    out = Path(args.out or f"runs/{args.preset}-{default_name}")
    if args.resume:
        ckpt = checkpoint.load(out)
        _check_unchanged(ckpt.model_cfg, model_over, "model config")
        _check_unchanged(ckpt.data_cfg, data_over, "data config")
        _check_unchanged(ckpt.train_cfg, {k: v for k, v in train_over.items() if k == "seed"}, "seed")
        model_cfg, data_cfg = ckpt.model_cfg, ckpt.data_cfg
        train_cfg = dataclasses.replace(ckpt.train_cfg, **train_over)
        data = load_dataset(data_cfg, seed=train_cfg.seed, tokenizer=ckpt.tokenizer)
        state = checkpoint.restore_training(ckpt, train_cfg)
    else:
        if (out / "checkpoint").exists() and not args.overwrite:
            raise MinilmError(f"{out} already holds a training run; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        base_model, base_train = preset(args.preset)
        model_cfg = dataclasses.replace(base_model, **model_over)  # check every config before reading data
        train_cfg = dataclasses.replace(base_train, **train_over)
        data_cfg = DataConfig(**data_over)
        data = load_dataset(data_cfg, seed=train_cfg.seed)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.size)
        init_key, train_key = jax.random.split(jax.random.key(train_cfg.seed))
        trainable, frozen = partition(init(model_cfg, key=init_key), lambda name: True)
        state = train.start(trainable, frozen, train_cfg, key=train_key)
    check_fits(data, model_cfg.context, data_cfg.text or f"corpus {data_cfg.corpus!r}")

    def save(state):
        checkpoint.save_training(out / "checkpoint", state, model_cfg=model_cfg, train_cfg=train_cfg,
                                 data_cfg=data_cfg, tokenizer=data.tokenizer)

    return fit(state, data, model_cfg, train_cfg, out, save, resume=args.resume, saved=out / "checkpoint",
               resume_hint=f"minilm train --out {out} --resume", sample_hint=f"minilm sample {out} --prompt '...'")


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def fit(state, data, model_cfg, train_cfg, out: Path, save, *, resume: bool, saved: Path, resume_hint: str | None,
        sample_hint: str, loss=None) -> int:
    """Run training with a progress bar, log metrics.jsonl, save every checkpoint_every steps and on Ctrl-C."""
    from tqdm import tqdm

    from minilm import checkpoint, train
    from minilm.tree import size

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    kept = []
    if resume and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
        kept = [line for line in metrics_path.read_text().splitlines() if _logged_step(line) <= state.step]
    checkpoint.write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))

    tokens_per_step = train_cfg.grad_accum * train_cfg.batch_size * model_cfg.context
    print(f"training {size(state.trainable):,} parameters on {len(data.train):,} tokens "
          f"(vocabulary {data.tokenizer.size}) -> {out}", file=sys.stderr)
    bar = tqdm(total=train_cfg.steps, initial=state.step, unit="step", desc="train", dynamic_ncols=True)
    first_step, step_seconds, eval_loss = state.step, 0.0, float("nan")
    stop = []

    def request_stop(*_):  # Ctrl-C: finish this step, save, exit. A second Ctrl-C interrupts at once.
        stop.append(True)
        signal.signal(signal.SIGINT, previous_handler)

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    try:
        with metrics_path.open("a") as log:
            for state, metrics in train.run(state, data, model_cfg, train_cfg, loss or train.loss_fn):
                if state.step > first_step + 1:  # the first step of a process includes compilation
                    step_seconds += metrics["step_seconds"]
                    metrics["tokens_per_s"] = tokens_per_step * (state.step - first_step - 1) / step_seconds
                eval_loss = metrics.get("eval_loss", eval_loss)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", eval=f"{eval_loss:.3f}",
                                tok_s=f"{metrics.get('tokens_per_s', 0):,.0f}")
                bar.update(1)
                if stop or state.step % train_cfg.checkpoint_every == 0 or state.step == train_cfg.steps:
                    save(state)
                if stop:
                    bar.close()
                    hint = f"; continue with `{resume_hint}`" if resume_hint else ""
                    print(f"\ninterrupted: saved step {state.step} to {saved}{hint}", file=sys.stderr)
                    return 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    bar.close()
    print(f"done: step {state.step}, eval loss {eval_loss:.4f}\n"
          f"  saved       {saved}\n  metrics     {metrics_path}\n"
          f"  sample with {sample_hint}")
    return 0


# ---------------------------------------------------------------- finetune and merge


def cmd_finetune(args) -> int:
    import jax

    import lora
    from minilm import checkpoint, train
    from minilm.data import check_fits, load_dataset
    from minilm.tree import combine, partition, size

    if args.full == (args.lora is not None):
        raise MinilmError("--full and --lora together" if args.full else
                          "choose how to fine-tune: --full, or --lora SPEC (e.g. --lora rank=8,alpha=16)")
    lora_cfg = lora.parse_spec(args.lora) if args.lora is not None else None
    train_over, data_over = given(args, TrainConfig), given(args, DataConfig)
    if "tokenizer" in data_over:
        raise MinilmError("--tokenizer: fine-tuning reads text with the base model's own tokenizer; drop the flag")
    train_cfg = dataclasses.replace(FINETUNE, **({"lr": LORA_LR} if lora_cfg else {}), **train_over)
    data_cfg = DataConfig(**data_over)
    base = checkpoint.load(args.base)
    out = Path(args.out or f"runs/{base.path.parent.name}-{'lora' if lora_cfg else 'full'}-"
                           f"{data_cfg.corpus or Path(data_cfg.text or 'text').stem}")
    saved = out / ("adapter" if lora_cfg else "checkpoint")
    if saved.exists() and not args.overwrite:
        raise MinilmError(f"{saved} already exists; pass --overwrite to replace it or choose another --out")
    data = load_dataset(data_cfg, seed=train_cfg.seed, tokenizer=base.tokenizer)
    check_fits(data, base.model_cfg.context, data_cfg.text or f"corpus {data_cfg.corpus!r}")
    model_cfg = base.model_cfg
    adapter_key, run_key = jax.random.split(jax.random.key(train_cfg.seed))
    if lora_cfg:
        params = lora.attach(base.params, lora_cfg, key=adapter_key)
        trainable, frozen = lora.split(params, lora_cfg)
    else:
        trainable, frozen = partition(base.params, lambda name: True)
    state = train.start(trainable, frozen, train_cfg, key=run_key)
    if lora_cfg:
        optimizer_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
        print(lora.format_summary(lora.summary(params, trainable), size(base.params), optimizer_bytes))

    def save(state):
        if lora_cfg:
            lora.save_adapter(saved, combine(state.trainable, state.frozen), lora_cfg, model_cfg, base.tokenizer)
        else:
            checkpoint.save_training(saved, state, model_cfg=model_cfg, train_cfg=train_cfg, data_cfg=data_cfg,
                                     tokenizer=base.tokenizer)

    return fit(state, data, model_cfg, train_cfg, out, save, resume=False, saved=saved,
               resume_hint=None if lora_cfg else f"minilm train --out {out} --resume",
               sample_hint=f"minilm sample {base.path} --adapter {saved} --prompt '...'" if lora_cfg
               else f"minilm sample {out} --prompt '...'",
               loss=lora.loss_fn if lora_cfg else None)


def cmd_merge(args) -> int:
    import lora
    from minilm import checkpoint

    base = checkpoint.load(args.base)
    weights = [1.0] * len(args.adapters) if args.weights is None else _floats(args.weights, "--weights")
    if len(weights) != len(args.adapters):
        raise MinilmError(f"--weights has {len(weights)} values for {len(args.adapters)} adapters; give one each")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MinilmError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    params, names = base.params, {}
    for i, path in enumerate(args.adapters):
        params, cfg = lora.load_adapter(path, params, base.model_cfg, name=f"adapter{i}", tokenizer=base.tokenizer)
        names[cfg.name] = weights[i]
    merged = lora.merge(params, names)
    checkpoint.save(out, params=merged, opt_state={}, model_cfg=base.model_cfg, train_cfg=base.train_cfg,
                    data_cfg=base.data_cfg, tokenizer=base.tokenizer,
                    state={"merged_from": str(base.path), "adapters": list(map(str, args.adapters)),
                           "weights": weights})
    print(f"merged {len(args.adapters)} adapter(s) into {args.base} -> {out}\n"
          f"  sample with minilm sample {out} --prompt '...'")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MinilmError(f"{flag} {text!r}: expected comma-separated numbers, e.g. {flag} 0.5,0.5") from None


# ---------------------------------------------------------------- compare


def _load_tuned(path: Path, base, used: set):
    """A tuned model for `compare`: a checkpoint, or an adapter folder (merged onto the base)."""
    import lora
    from minilm import checkpoint
    from minilm.analysis.compare import Model, check_comparable

    path = Path(path)
    adapter_dir = next((p for p in (path, path / "adapter") if (p / "adapter_config.json").is_file()), None)
    name = path.name if path.name not in ("checkpoint", "adapter") else path.parent.name
    while name in used or name == "base":
        name += "'"
    used.add(name)
    if adapter_dir is None:
        ckpt = checkpoint.load(path)
        check_comparable(base.model_cfg, base.tokenizer, ckpt.model_cfg, ckpt.tokenizer, str(path))
        return Model(name, ckpt.params)
    params, _ = lora.load_adapter(adapter_dir, base.params, base.model_cfg, tokenizer=base.tokenizer)
    adapters = {name: w.lora_a for name, w in lora.lora_weights(params).items()}
    return Model(name, lora.merge(params), adapters)


def cmd_compare(args) -> int:
    from tqdm import tqdm

    from minilm import checkpoint, report
    from minilm.analysis.compare import Model, compare, make_probe
    from minilm.corpora import load_corpus

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MinilmError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    base = checkpoint.load(args.base)
    used: set = set()
    tuned = [_load_tuned(p, base, used) for p in args.tuned]
    corpus = None
    if base.data_cfg.corpus is not None and not args.no_corpus_probe:
        corpus = load_corpus(base.data_cfg.corpus, seed=base.train_cfg.seed, size=base.data_cfg.corpus_size)
    words = [w for w in (args.words or "").split(",") if w]
    probe = make_probe(base.tokenizer, base.model_cfg, corpus=corpus, words=words, sentences=args.probe or ())
    if probe.missing:
        print(f"not in the vocabulary, skipped: {', '.join(probe.missing)}", file=sys.stderr)
    steps = 2 * len(tuned) + len([m for m in tuned if m.adapters]) ** 2 + 1
    with tqdm(total=steps, desc="compare", unit="part") as bar:
        def progress(what):
            bar.set_postfix_str(what)
            bar.update(1)

        result = compare(Model("base", base.params), tuned, probe, base.tokenizer, base.model_cfg,
                         k=args.top_k, epsilon=args.epsilon, progress=progress)
        bar.set_postfix_str("report")
        page = report.write(out, result, title=f"What changed: {base.path.parent.name} -> "
                                                f"{', '.join(m.name for m in tuned)}")
        bar.update(bar.total - bar.n)
    print(f"report: {page}\nmetrics: {out / 'metrics.json'}")
    return 0


# ---------------------------------------------------------------- bench


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise MinilmError(f"{flag} {text!r}: expected positive integers separated by commas, e.g. 128,256")
    return values


def cmd_bench(args) -> int:
    import jax

    import lora
    from minilm import bench, checkpoint

    model_cfg, train_cfg = preset(args.preset)
    model_over = {k: getattr(args, k) for k in ("vocab_size", "context", "width", "layers", "heads")
                  if getattr(args, k) is not None}
    model_cfg = dataclasses.replace(model_cfg, **model_over)
    train_over = {k: getattr(args, k) for k in ("batch_size", "grad_accum", "dtype") if getattr(args, k) is not None}
    train_cfg = dataclasses.replace(train_cfg, **train_over)
    lora_cfg = lora.parse_spec(args.lora)
    if args.steps <= 0:
        raise MinilmError(f"--steps {args.steps}: must be positive")
    modes = ["full", "lora"] if args.mode == "both" else [args.mode]
    from minilm.cost import adapter_ranks

    if "lora" in modes:  # fail early on an adapter that does not fit the model
        adapter_ranks(model_cfg, lora_cfg)
    if args.sweep:  # check the lists, the sizes, the adapters and the plot's format before any timing
        args.sweep_widths = _int_list(args.sweep_widths, "--sweep-widths")
        args.sweep_ranks = _int_list(args.sweep_ranks, "--sweep-ranks")
        for width in args.sweep_widths:
            try:
                cfg = _sweep_model(model_cfg, width)
            except MinilmError as e:
                raise MinilmError(f"--sweep-widths: {e}") from None
            for rank in args.sweep_ranks:
                try:
                    adapter_ranks(cfg, _sweep_adapter(lora_cfg, rank))
                except MinilmError as e:
                    raise MinilmError(f"--sweep-ranks {rank} at width {width}: {e}") from None
        formats = _figure_formats()
        if Path(args.plot).suffix.lstrip(".").lower() not in formats:
            raise MinilmError(f"--plot {args.plot}: name the file with one of the suffixes "
                              f"{', '.join('.' + f for f in sorted(formats))}, e.g. bench_ratio.png")
    for flag, path in (("--json", args.json), ("--plot", args.plot if args.sweep else None)):
        if path and Path(path).is_dir():
            raise MinilmError(f"{flag} {path} is a folder; give a file name such as bench.json")
        if path and not Path(path).parent.is_dir():
            raise MinilmError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it first")

    print(f"minilm bench: width {model_cfg.width}, {model_cfg.layers} layers, {model_cfg.heads} heads, context "
          f"{model_cfg.context}, vocabulary {model_cfg.vocab_size}; batch {train_cfg.batch_size} x "
          f"{train_cfg.grad_accum} = {train_cfg.batch_size * train_cfg.grad_accum * model_cfg.context:,} tokens per "
          f"step; {train_cfg.dtype}; {jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPU cores")
    peak, bandwidth = bench.matmul_peak(), bench.memory_bandwidth()
    print(f"measured here: matmul peak {peak / 1e9:,.0f} GFLOP/s (1024^3 float32), memory {bandwidth / 1e9:,.1f} GB/s")
    result = {"machine": {"cpu_count": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
                          "matmul_peak_flops": peak, "memory_bytes_per_s": bandwidth,
                          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
              "cases": []}
    for mode in modes:
        print(f"{mode}: compiling and timing {args.steps} steps ...", flush=True)
        case = bench.train_step_case(model_cfg, train_cfg, lora_cfg if mode == "lora" else None)
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
        result["sweep"] = _sweep(args, model_cfg, train_cfg, lora_cfg, peak, bandwidth)
    if args.json:
        checkpoint.write_text_atomic(Path(args.json), json.dumps(result, indent=1))
        print(f"json: {args.json}")
    return 0


def _sweep_model(model_cfg, width: int):
    return dataclasses.replace(model_cfg, width=width, heads=max(1, width // 64))  # heads of size 64


def _sweep_adapter(lora_cfg, rank: int):
    return dataclasses.replace(lora_cfg, rank=rank, alpha=2.0 * rank)


def _figure_formats() -> set[str]:
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def _sweep(args, model_cfg, train_cfg, lora_cfg, peak, bandwidth) -> list[dict]:
    """LoRA/full step time across widths and ranks (heads of size 64; LoRA with --lora's targets)."""
    from tqdm import tqdm

    from minilm import bench

    widths, ranks = args.sweep_widths, args.sweep_ranks
    rows = []
    with tqdm(total=len(widths) * (1 + len(ranks)), desc="sweep", unit="case") as bar:
        for width in widths:
            cfg = _sweep_model(model_cfg, width)
            full_case = bench.train_step_case(cfg, train_cfg)
            full = bench.describe(full_case, full_case.run(args.steps), peak, bandwidth)
            bar.update(1)
            for rank in ranks:
                bar.set_postfix_str(f"width {width} rank {rank}")
                adapter = _sweep_adapter(lora_cfg, rank)
                case = bench.train_step_case(cfg, train_cfg, adapter)
                low = bench.describe(case, case.run(args.steps), peak, bandwidth)
                r = bench.ratios(full, low)
                rows.append({"width": width, "rank": rank, "full_ms": full["ms_per_step"], "lora_ms": low["ms_per_step"],
                             "time_ratio": r["time"], "flop_ratio": r["model_flops"],
                             "predicted_ratio": r["predicted_time"]})
                bar.update(1)
    print(f"{'width':>6} {'rank':>5} {'full ms':>9} {'LoRA ms':>9} {'time ratio':>11} {'FLOP ratio':>11} {'roofline':>9}")
    for r in rows:
        print(f"{r['width']:>6} {r['rank']:>5} {r['full_ms']:>9.1f} {r['lora_ms']:>9.1f} {r['time_ratio']:>11.2f} "
              f"{r['flop_ratio']:>11.2f} {r['predicted_ratio']:>9.2f}")
    plot = Path(args.plot)
    bench.ratio_plot(rows, plot)
    print(f"plot: {plot}")
    return rows


# ---------------------------------------------------------------- sample


def cmd_sample(args) -> int:
    import jax
    import numpy as np

    from minilm import checkpoint
    from minilm.generate import generate

    ckpt = checkpoint.load(args.checkpoint)
    cfg = SampleConfig(**given(args, SampleConfig))
    params = ckpt.params
    if args.adapter is not None:
        import lora
        params, _ = lora.load_adapter(args.adapter, params, ckpt.model_cfg, tokenizer=ckpt.tokenizer)
    prompt = args.prompt if args.prompt is not None else "\n"
    ids = ckpt.tokenizer.encode(prompt)
    batch = np.tile(ids, (cfg.num_samples, 1))  # (num_samples, P)
    started = time.perf_counter()
    tokens = generate(params, batch, ckpt.model_cfg, key=jax.random.key(cfg.seed),
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, use_cache=cfg.kv_cache)
    tokens = np.asarray(tokens)
    elapsed = time.perf_counter() - started
    for i, row in enumerate(tokens):
        if i:
            print("-" * 40)
        print(ckpt.tokenizer.decode(row))
    print(f"[{cfg.num_samples} x {cfg.max_new_tokens} tokens in {elapsed:.2f} s, compile included; "
          f"kv cache {'on' if cfg.kv_cache else 'off'}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilm",
        description="A textbook GPT in JAX: train it on toy corpora, sample from it, and see what "
                    "fine-tuning changes.")
    commands = parser.add_subparsers(title="commands", dest="command", required=True)

    p = commands.add_parser("train", help="train a model from scratch (or --resume one)",
                            description="Train a GPT on a built-in corpus (--corpus) or a text file (--text). "
                                        "Writes OUT/checkpoint/ and OUT/metrics.jsonl.")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="model and training sizes to start from; other flags override them (default: tiny)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/PRESET-CORPUS)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out, bit-identically; --steps may extend it")
    p.add_argument("--overwrite", action="store_true", help="replace a run already saved in --out")
    add_config_flags(p, ModelConfig, "model (defaults from --preset)", _preset_note(0))
    add_config_flags(p, TrainConfig, "training (defaults from --preset)", _preset_note(1))
    add_config_flags(p, DataConfig, "data")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("sample", help="generate text from a checkpoint",
                            description="Continue a prompt with a trained model, using a key/value cache.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder (from train --out) or its checkpoint/")
    p.add_argument("--prompt", help="text to continue, in the model's vocabulary (default: a newline)")
    p.add_argument("--adapter", metavar="DIR", help="apply a LoRA adapter (from finetune --lora) to the model")
    add_config_flags(p, SampleConfig, "sampling")
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("finetune", help="fine-tune a trained model, fully or with LoRA",
                            description="Fine-tune BASE on a corpus or text file. --full trains every weight and "
                                        "writes OUT/checkpoint/; --lora trains low-rank adapters only and writes "
                                        "OUT/adapter/ (adapter_config.json + adapter_model.safetensors).")
    p.add_argument("base", metavar="BASE", help="the trained model: a run folder or its checkpoint/")
    p.add_argument("--full", action="store_true", help="train every parameter")
    p.add_argument("--lora", metavar="SPEC",
                   help="train LoRA adapters: comma-separated key=value, e.g. rank=8,alpha=16,targets=attn.q,attn.v. "
                        "Keys: rank, alpha, use_rslora, dropout, targets (attn.q|k|v|o, mlp.fc|proj, attn.*, mlp.*, "
                        "all-linear, embed, blocks.N.*), rank_pattern / alpha_pattern (pattern:value), layers, "
                        "init (standard|gaussian|pissa), use_dora, fuse_qkv (one A shared by q, k, v), "
                        "bias (none|all|lora_only), modules_to_save, name")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/BASE-MODE-CORPUS)")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier run saved in --out")
    add_config_flags(p, TrainConfig, f"training (lr defaults to {FINETUNE.lr:g} for --full, {LORA_LR:g} for --lora)",
                     lambda f: f"default: {getattr(FINETUNE, f.name)}")
    add_config_flags(p, DataConfig, "data (tokenized with the base model's vocabulary)")
    p.set_defaults(func=cmd_finetune)

    p = commands.add_parser("merge", help="merge LoRA adapters into a full checkpoint",
                            description="Fold one or more adapters into BASE's weights (W + sum of weight * s*A*B) "
                                        "and save a plain checkpoint that `minilm sample` reads.")
    p.add_argument("base", metavar="BASE", help="the base model the adapters were trained on")
    p.add_argument("adapters", metavar="ADAPTER", nargs="+", help="adapter folders (OUT/adapter from finetune)")
    p.add_argument("--weights", metavar="W1,W2,...", help="one factor per adapter for a linear combination (default 1)")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write the merged checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_merge)

    p = commands.add_parser("compare", help="what changed: compare a base model with its tuned versions",
                            description="Compare BASE with one or more TUNED models (checkpoints, or LoRA adapter "
                                        "folders, merged onto BASE): which weights moved and how, how token and "
                                        "hidden vectors rearranged, where attention now looks. Writes "
                                        "OUT/report.html, OUT/metrics.json and OUT/figures/.")
    p.add_argument("base", metavar="BASE", help="the model before fine-tuning")
    p.add_argument("tuned", metavar="TUNED", nargs="+", help="fine-tuned checkpoints or adapter folders")
    p.add_argument("--out", metavar="DIR", required=True, help="report folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--probe", metavar="TEXT", action="append",
                   help="a probe sentence (repeatable); the base corpus's own probes are added")
    p.add_argument("--words", metavar="W1,W2", help="extra tokens whose vectors to follow")
    p.add_argument("--no-corpus-probe", action="store_true",
                   help="do not add the base corpus's words, groups, pairs and text to the probe set")
    p.add_argument("--top-k", type=int, default=10, help="singular vectors checked for intruders (default: 10)")
    p.add_argument("--epsilon", type=float, default=0.5,
                   help="intruder threshold on the best |cosine| with the base's singular vectors (default: 0.5)")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("bench", help="time a train step, full vs LoRA; FLOPs, memory, sampling speed",
                            description="Time real train steps of a preset's model (random tokens), full fine-tuning "
                                        "and/or LoRA, and print measured next to predicted: FLOPs per token split "
                                        "into forward, input gradients, weight gradients and LoRA's extra work "
                                        "(minilm/cost.py), MFU against a matmul peak measured here, memory by kind, "
                                        "compile time, and sampling speed with and without the KV cache.")
    p.add_argument("--preset", choices=list(PRESETS), default="small", help="model and batch sizes (default: small)")
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both", help="what to time (default: both)")
    p.add_argument("--lora", metavar="SPEC", default="rank=8,alpha=16,targets=all-linear,fuse_qkv=true",
                   help="the adapter for --mode lora/both, as for finetune (default: rank=8,alpha=16,"
                        "targets=all-linear,fuse_qkv=true: every block matrix, with one A shared by q, k and v, the "
                        "adapter PEFT builds on GPT-2's fused c_attn; fuse_qkv=false gives each its own A)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case, after a warm-up step (default: 5)")
    for name, what in (("vocab-size", "vocabulary size (default: 65, shakespeare-char's)"),
                       ("context", "context length"), ("width", "model width"), ("layers", "blocks"),
                       ("heads", "attention heads"), ("batch-size", "sequences per micro-batch"),
                       ("grad-accum", "micro-batches per step")):
        p.add_argument(f"--{name}", type=int, help=f"{what} (default: the preset's)" if "default" not in what else what)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="number format of the matrix products "
                   "(default: float32; weights and optimizer state stay float32)")
    p.add_argument("--no-sample", dest="sample", action="store_false", help="skip the sampling-speed measurement")
    p.add_argument("--no-phases", dest="phases", action="store_false",
                   help="skip timing the step's parts (the loss alone, + gradients, + optimizer update), which "
                        "compiles each part separately")
    p.add_argument("--sweep", action="store_true", help="also time LoRA/full across --sweep-widths and --sweep-ranks")
    p.add_argument("--sweep-widths", default="128,256,384", metavar="W1,W2", help="widths for --sweep (default: 128,256,384)")
    p.add_argument("--sweep-ranks", default="1,8,64", metavar="R1,R2", help="ranks for --sweep (default: 1,8,64)")
    p.add_argument("--plot", default="bench_ratio.png", metavar="PATH",
                   help="where --sweep draws LoRA/full time against rank and width (default: bench_ratio.png)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.set_defaults(func=cmd_bench, vocab_size=65)
    return parser


def main(argv=None) -> int:
    if argv is None:  # a real command line (not a call from Python): restart once with glibc's tunables
        allocator.restart_with_tunables()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MinilmError as e:
        print(f"minilm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
