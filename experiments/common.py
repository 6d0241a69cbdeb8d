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


def parser(description: str, default_out: str, *, seeds: bool = False) -> argparse.ArgumentParser:
    """The flags every experiment takes; with `seeds`, also --seeds (read it with `seed_list`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds: tiny sizes, few steps (for CI)")
    p.add_argument("--seed", type=int, default=0, help="seed for corpora, initialisation and batches"
                   + (" (the first of --seeds)" if seeds else ""))
    if seeds:
        p.add_argument("--seeds", type=_seeds_flag, default=None,
                       help="how many seeds (N: --seed, --seed+1, ...) or which (a comma list: 3,7,11); "
                            "each is the whole pipeline: its own base, fine-tunes and data. Default 5, "
                            "2 with --quick")
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


def seed_list(args) -> list[int]:
    """The seeds an experiment runs: --seeds as a list, or that many from --seed on."""
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
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
        loss=train.loss_fn, stop_below: float | None = None):
    """Train with a progress bar; returns (trainable, [metrics per step]). With `stop_below`, stop at the
    first evaluation whose held-out loss is at or below it (to compare models at equal loss)."""
    state = train.start(trainable, frozen, train_cfg, key=jax.random.key(train_cfg.seed + 1))
    log = []
    with tqdm(total=train_cfg.steps, desc=label, unit="step", leave=False) as bar:
        for state, metrics in train.run(state, dataset, model_cfg, train_cfg, loss):
            log.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            bar.update(1)
            if stop_below is not None and metrics.get("eval_loss", float("inf")) <= stop_below:
                break
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
    params: dict            # plain arrays (LoRA merged)
    adapted: dict | None    # params with LoraWeight leaves (LoRA only)
    log: list               # per-step metrics
    trainable: int          # trainable parameter count
    lr: float               # peak learning rate


def finetune(name: str, base: dict, dataset: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig,
             lora_cfg: lora.LoraConfig | None = None, stop_below: float | None = None) -> Tuned:
    """Full fine-tuning (lora_cfg None) or LoRA; the base is never modified."""
    if lora_cfg is None:
        trainable, frozen = partition(base, lambda n: True)
        trainable, log = fit(trainable, frozen, dataset, model_cfg, train_cfg, f"fine-tune {name}",
                             stop_below=stop_below)
        return Tuned(name, combine(trainable, frozen), None, log, size(trainable), train_cfg.lr)
    adapted = lora.attach(base, lora_cfg, key=jax.random.key(train_cfg.seed + 2))
    trainable, frozen = lora.split(adapted, lora_cfg)
    n = size(trainable)
    trainable, log = fit(trainable, frozen, dataset, model_cfg, train_cfg, f"fine-tune {name}", lora.loss_fn,
                         stop_below)
    adapted = lora.fill_shared_a(combine(trainable, frozen))  # a shared A (fuse_qkv) back in every matrix
    return Tuned(name, lora.merge(adapted), adapted, log, n, train_cfg.lr)


def eval_loss(params, dataset: Dataset, model_cfg: ModelConfig, batches: int = 16, seed: int = 123) -> float:
    """Mean held-out loss on fixed windows of `dataset` (the same windows for every model)."""
    from minilm.data import batches as windows_of
    windows = windows_of(jax.numpy.asarray(dataset.val), jax.random.key(seed), 0, count=batches,
                         batch_size=16, context=model_cfg.context)
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


# ---------------------------------------------------------------- experiments 02-05 over seeds (issue 16)


def seeds_or(args, default: int) -> list[int]:
    """`seed_list`, with `default` seeds (not 5) when --seeds is not given and the run is not --quick:
    experiments 02-05 train many more models per seed than the demo, so 3 is their default."""
    if args.seeds is None and not args.quick:
        args = argparse.Namespace(**{**vars(args), "seeds": default})
    return seed_list(args)


def over_seeds(seeds: list[int], run_one) -> list:
    """`run_one(seed)` for every seed, in this process (so each program compiles once) -> results in seed order."""
    results = []
    for i, seed in enumerate(seeds):
        print(f"seed {seed} ({i + 1} of {len(seeds)})", flush=True)
        results.append(run_one(seed))
    return results


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
