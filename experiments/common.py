"""What every experiment does: pretrain a base, fine-tune copies of it, measure losses, write a report.

The experiments call the library directly (no subprocesses), show one progress bar per training run,
and keep everything in memory; each writes its own folder with report.html and metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import lora
from minilm import train
from minilm.allocator import restart_with_tunables  # noqa: F401 (the scripts call it first)
from minilm.config import DataConfig, ModelConfig, TrainConfig, preset
from minilm.data import Dataset, load_dataset
from minilm.model import init
from minilm.tree import combine, partition, size


def parser(description: str, default_out: str, *, seeds: int = 0) -> argparse.ArgumentParser:
    """The flags every experiment takes; with `seeds` (its default count), also --seeds and --workers (read
    them with `seed_list` and `over_seeds`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds: tiny sizes, few steps (for CI)")
    p.add_argument("--seed", type=int, default=0, help="seed for corpora, initialisation and batches"
                   + (" (the first of --seeds)" if seeds else ""))
    if seeds:
        p.add_argument("--seeds", type=_seeds_flag, default=None,
                       help="how many seeds (N: --seed, --seed+1, ...) or which (a comma list: 3,7,11); "
                            f"each is the whole pipeline: its own base, fine-tunes and data. Default {seeds}, "
                            "2 with --quick")
        p.add_argument("--workers", type=_workers_flag, default=WORKERS,
                       help=f"run the seeds in this many processes (default {WORKERS}); each compiles its programs "
                            "once, and a seed's numbers do not depend on which process runs it")
        p.set_defaults(default_seeds=seeds)
    p.add_argument("--out", default=default_out, help=f"report folder (default: {default_out})")
    return p


def _seeds_flag(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a comma list of seeds") from None
    if "," not in text and values[0] < 1 or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 1 or distinct seeds >= 0 (e.g. 3,7,11)")
    return values if "," in text else values[0]


WORKERS = 1  # the default of --workers


def _workers_flag(text: str) -> int:
    import os
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= (os.cpu_count() or 1):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of processes from 1 to this machine's "
                                         f"{os.cpu_count()} cores")
    return value


def seed_list(args) -> list[int]:
    """The seeds an experiment runs: --seeds as a list, or that many from --seed on."""
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else args.default_seeds)
    return list(seeds) if isinstance(seeds, list) else list(range(args.seed, args.seed + seeds))


@dataclass(frozen=True)
class Setup:
    """Sizes for a full run and for --quick."""

    model: ModelConfig
    pretrain: TrainConfig
    finetune: TrainConfig
    corpus_size: int | None


def setup(quick: bool, seed: int, *, pretrain_steps: int = 600, finetune_steps: int = 200) -> Setup:
    model, train_cfg = preset("tiny")
    if quick:
        model = dataclasses.replace(model, context=16, width=32, layers=2, heads=2)
        return Setup(model, dataclasses.replace(train_cfg, steps=30, batch_size=8, eval_every=30, eval_batches=2,
                                                seed=seed),
                     TrainConfig(steps=10, batch_size=8, lr=1e-3, eval_every=5, eval_batches=2, seed=seed), 400)
    # The base's held-out loss is read by no experiment: evaluate only at the last step.
    return Setup(model, dataclasses.replace(train_cfg, steps=pretrain_steps, eval_every=pretrain_steps, seed=seed),
                 TrainConfig(steps=finetune_steps, batch_size=32, lr=1e-3, min_lr=1e-4, eval_every=10,
                             eval_batches=8, seed=seed), None)


def data(corpus: str, s: Setup, tokenizer=None) -> Dataset:
    return load_dataset(DataConfig(corpus=corpus, corpus_size=s.corpus_size), seed=s.pretrain.seed,
                        tokenizer=tokenizer)


def fit(trainable, frozen, dataset: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, label: str,
        loss=train.loss_fn, stop_below: float | None = None, watch: dict | None = None, watch_every: int = 0,
        snapshot_every: int = 0, snapshots: dict | None = None):
    """Train with a progress bar; returns (trainable, [metrics per step]). With `stop_below`, stop at the
    first evaluation whose held-out loss is at or below it (to compare models at equal loss).

    `watch` {name: windows (A, B, T + 1)} adds `<name>_loss`, the mean loss on those fixed windows, to the
    metrics every `watch_every` steps and at the last step: losses along training, comparable across runs.

    `snapshots`, a dict, is filled with {step: a copy of `trainable`} at step 0, every `snapshot_every` steps
    and at the last step: the path the map (issue 17) draws (`keep_snapshot` says what a copy costs).

    A run that diverges raises train.Diverged with the metrics so far as its `log` (`finetune` marks the
    run instead, so that a sweep goes on; a base that diverges stops the experiment).
    """
    state = train.start(trainable, frozen, train_cfg, key=jax.random.key(train_cfg.seed + 1))
    watched = {name: (train.make_eval(model_cfg, loss), w) for name, w in (watch or {}).items()}
    log = []
    if snapshots is not None and snapshot_every:
        keep_snapshot(snapshots, 0, state.trainable)
    with tqdm(total=train_cfg.steps, desc=label, unit="step", leave=False) as bar:
        try:
            for state, metrics in train.run(state, dataset, model_cfg, train_cfg, loss):
                if snapshots is not None and snapshot_every and (metrics["step"] % snapshot_every == 0
                                                                 or metrics["step"] == train_cfg.steps):
                    keep_snapshot(snapshots, metrics["step"], state.trainable)
                if watched and (metrics["step"] % watch_every == 0 or metrics["step"] == train_cfg.steps):
                    for name, (evaluate, windows) in watched.items():
                        metrics[f"{name}_loss"] = float(evaluate(state.trainable, state.frozen, windows))
                log.append(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                bar.update(1)
                if stop_below is not None and metrics.get("eval_loss", float("inf")) <= stop_below:
                    break
        except train.Diverged as e:
            e.log = log  # what the report shows of a diverged run: its losses up to the failure
            raise
    return state.trainable, log


def pretrain(corpus: str, s: Setup):
    """A base model on `corpus` -> (params, model_cfg, dataset)."""
    dataset = data(corpus, s)
    model_cfg = dataclasses.replace(s.model, vocab_size=dataset.tokenizer.size)
    params = init(model_cfg, key=jax.random.key(s.pretrain.seed))
    trainable, frozen = partition(params, lambda name: True)
    trainable, _ = fit(trainable, frozen, dataset, model_cfg, s.pretrain, f"pretrain on {corpus}")
    return combine(trainable, frozen), model_cfg, dataset


def base_and_bindings(s: Setup):
    """The setting every experiment shares: a base pretrained on `associations`, and `bindings` read with
    its vocabulary -> (base params, model_cfg, associations data, bindings data)."""
    base, model_cfg, base_data = pretrain("associations", s)
    return base, model_cfg, base_data, data("bindings", s, tokenizer=base_data.tokenizer)


def publish(out: str, title: str, blocks, metrics: dict) -> Path:
    """Write the report folder, print the summary sentences and where the page is."""
    from minilm.report import write_page
    page = write_page(Path(out), title, blocks, metrics)
    for sentence in metrics["summary"]:
        print(sentence)
    print(f"report: {page}  ({metrics['seconds']:.0f} s)")
    return page


@dataclass(frozen=True)
class Tuned:
    name: str
    params: dict | None     # plain arrays (LoRA merged); None if the run diverged
    adapted: dict | None    # params with LoraWeight leaves (LoRA only)
    log: list               # per-step metrics
    trainable: int          # trainable parameter count
    lr: float               # peak learning rate
    diverged: dict | None = None  # {"step", "loss", "grad_norm"} of the first non-finite step, if any
    snapshots: dict | None = None  # {step: what trains at that step} (LoRA: the adapters alone); see `fit`


def finetune(name: str, base: dict, dataset: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig,
             lora_cfg: lora.LoraConfig | None = None, stop_below: float | None = None, watch: dict | None = None,
             watch_every: int = 0, snapshot_every: int = 0) -> Tuned:
    """Full fine-tuning (lora_cfg None) or LoRA; the base is never modified. `watch`, `snapshot_every`: see
    `fit`; `vector_map` turns the snapshots into the numbers the map draws.

    A diverged run comes back marked (`diverged` set, params and adapted None, its log up to the failure)
    instead of raising, so that a sweep over learning rates goes on."""
    if lora_cfg is None:
        trainable, frozen = partition(base, lambda n: True)
        n, loss = size(trainable), train.loss_fn
    else:
        adapted = lora.attach(base, lora_cfg, key=jax.random.key(train_cfg.seed + 2))
        trainable, frozen = lora.split(adapted, lora_cfg)
        n, loss = size(trainable), lora.loss_fn
    snapshots = {} if snapshot_every else None
    try:
        trainable, log = fit(trainable, frozen, dataset, model_cfg, train_cfg, f"fine-tune {name}", loss,
                             stop_below, watch, watch_every, snapshot_every, snapshots)
    except train.Diverged as e:  # its last weights were overwritten in place by the failed step: none to keep
        return Tuned(name, None, None, e.log, n, train_cfg.lr, {"step": e.step, "loss": e.loss,
                                                                 "grad_norm": e.grad_norm})
    if lora_cfg is None:
        return Tuned(name, combine(trainable, frozen), None, log, n, train_cfg.lr, snapshots=snapshots)
    adapted = lora.fill_shared_a(combine(trainable, frozen))  # a shared A (fuse_qkv) back in every matrix
    return Tuned(name, lora.merge(adapted), adapted, log, n, train_cfg.lr, snapshots=snapshots)


def eval_loss(params, dataset: Dataset, model_cfg: ModelConfig, batches: int = 16, seed: int = 123) -> float:
    """Mean held-out loss on fixed windows of `dataset` (the same windows for every model)."""
    windows = fixed_windows(dataset, model_cfg, batches, seed)
    return float(train.make_eval(model_cfg)(*partition(params, lambda n: True), windows))


def adapters_of(tuned: Tuned) -> dict:
    """{matrix name: A} of a LoRA model, for subspace similarity."""
    return {} if tuned.adapted is None else {n: w.lora_a for n, w in lora.lora_weights(tuned.adapted).items()}


def write_json(path: Path, data) -> None:
    from minilm.checkpoint import write_text_atomic
    from minilm.report import finite
    write_text_atomic(path, json.dumps(finite(data), indent=1, allow_nan=False))


def table(header, rows) -> str:
    from minilm.report import html_table
    return html_table(header, rows)


def fmt(x, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}g}"


def stack(measured: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per-seed {measurement: {model: value}} -> {measurement: {model: [value per seed]}}."""
    return {k: {n: [one[k][n] for one in measured] for n in measured[0][k]} for k in measured[0]}


def fixed_windows(dataset: Dataset, model_cfg: ModelConfig, batches: int = 16, seed: int = 123):
    """The held-out windows `eval_loss` reads, (A, B, T + 1), for `fit`'s `watch`: the same for every run."""
    from minilm.data import batches as windows_of
    return windows_of(jax.numpy.asarray(dataset.val), jax.random.key(seed), 0, count=batches, batch_size=16,
                      context=model_cfg.context)


def over_seeds(fn, seeds: list[int], *args, workers: int = 1, label: str = "seeds") -> list:
    """[fn(seed, *args) for seed in seeds], in seed order; with `workers` > 1, in that many processes.

    A seed is a whole pipeline, independent of every other, so on a machine with more cores than XLA keeps
    busy for the tiny model (about 1.5), seeds in several processes finish sooner. On 2 cores they do not:
    experiment 01 with 2 seeds took 131 s in two processes and 129 s in one. Each process compiles its
    programs once and runs its seeds in turn; a seed's numbers are the same bit for bit whichever process
    runs it (tests/test_over_seeds.py). `fn` is found in the child by its file and name, so an experiment
    loaded from a path works too.
    """
    if workers <= 1 or len(seeds) <= 1:
        out = []
        for i, seed in enumerate(seeds):
            print(f"seed {seed} ({i + 1} of {len(seeds)})", flush=True)
            out.append(fn(seed, *args))
        return out
    import concurrent.futures
    import multiprocessing
    import os
    import sys
    script = sys.modules[fn.__module__].__file__
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the children's per-step bars would overwrite each other; this one counts seeds
    try:
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(seeds)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_call, script, fn.__name__, seed, args): i for i, seed in enumerate(seeds)}
            out = [None] * len(seeds)
            with tqdm(total=len(seeds), desc=label, unit="seed") as bar:
                for done in concurrent.futures.as_completed(futures):
                    out[futures[done]] = done.result()
                    bar.update(1)
            return out
    finally:
        if saved is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = saved


_LOADED: dict = {}


def _call(script: str, name: str, seed: int, args: tuple):
    """In a child process: load `script` (once) and call its function `name`."""
    import importlib.util
    if script not in _LOADED:
        spec = importlib.util.spec_from_file_location(f"_seeds_{len(_LOADED)}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _LOADED[script] = module
    return getattr(_LOADED[script], name)(seed, *args)


# ---------------------------------------------------------------- snapshots along fine-tuning, for the map (issue 17)


def keep_snapshot(snapshots: dict, step: int, trainable) -> None:
    """snapshots[step] = a copy of `trainable`. The steps update their arrays in place (train.run donates
    them), so a reference would be overwritten; what is copied is only what trains: for LoRA, the adapters."""
    snapshots[step] = jax.tree.map(jax.numpy.copy, trainable)


def snapshot_params(tuned: Tuned, lora_cfg: lora.LoraConfig | None = None) -> dict:
    """{step: plain parameters at that step} of a fine-tune kept with `snapshot_every` (LoRA merged)."""
    if lora_cfg is None:
        return dict(tuned.snapshots)
    _, frozen = lora.split(tuned.adapted, lora_cfg)
    return {step: lora.merge(lora.fill_shared_a(combine(adapters, frozen)))
            for step, adapters in tuned.snapshots.items()}


def vector_map(base: dict, tuned: dict[str, tuple[Tuned, lora.LoraConfig | None]], probe, tokenizer,
               model_cfg: ModelConfig) -> dict:
    """The map's numbers (minilm.analysis.vector_map.build) for the fine-tunes in `tuned` {name: (run, its
    LoraConfig or None)}, each kept with `snapshot_every`: base and every kept step, every level."""
    from minilm.analysis import vector_map as vmap
    from minilm.analysis.compare import vectors_at_levels
    states = {name: {step: vectors_at_levels(p, probe, tokenizer, model_cfg)
                     for step, p in snapshot_params(t, cfg).items() if step > 0}
              for name, (t, cfg) in tuned.items()}
    return vmap.build(list(probe.words), {g: list(w) for g, w in probe.groups.items()}, probe.pairs,
                      probe.controls, vectors_at_levels(base, probe, tokenizer, model_cfg), states)
# ---------------------------------------------------------------- experiments 02-05 over seeds (issue 16)


def verdicts_record(claims: list[dict]) -> dict:
    """What metrics.json says about the verdicts: how many, at which family-wise α, corrected how."""
    from minilm.analysis.seeds import ALPHA
    return {"count": sum(len(c["findings"]) for c in claims), "alpha": ALPHA, "correction": "Holm step-down",
            "interval": "95% Student t over seeds"}


def claims_blocks(claims: list[dict], seeds: list[int]) -> list:
    """The page's claims table (with how the verdicts were reached) and every seed's value per claim."""
    from minilm import report
    return [("Claims, over seeds", report.claims_html(claims, seeds)
             + f"<p>Every figure and table below shows seed {seeds[0]} alone; every seed's numbers are in "
               "metrics.json (per_seed, claims[].findings).</p>"),
            ("Every seed's value and the interval, per claim", ("claims", report.fig_findings(claims)))]


def verdict_lines(claims: list[dict], seeds: list[int]) -> list[str]:
    """One line per claim (its verdict), then how many verdicts, for the terminal and metrics["summary"]."""
    from minilm.analysis.seeds import ALPHA
    n = verdicts_record(claims)["count"]
    return ([f"{i + 1}. {c['claim']} -> {c['verdict']}" for i, c in enumerate(claims)]
            + [f"{n} verdicts, Holm-corrected (family-wise α {ALPHA:g}), over {len(seeds)} seeds"])
