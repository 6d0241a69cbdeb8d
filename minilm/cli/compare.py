"""`minilm compare`: what fine-tuning changed, as a report comparing a base model with tuned versions.

A tuned model is a checkpoint (full fine-tuning, or a merge) or a LoRA adapter folder, merged onto the
base for the comparison. The analyses are minilm.analysis's; this module loads the models, builds the
probe (the base corpus's words, groups, pairs and text, plus --probe and --words) and writes
OUT/report.html, OUT/metrics.json and OUT/figures/ (minilm/report.py).

Several seeds: each `--seed-run BASE TUNED...` is one more seed's base and tuned models, matched by
position with the first group (BASE TUNED...). Every seed is compared on its own; the sentences that are
verdicts (the change is low-rank; bound pairs moved closer than the controls) are then judged over the
seeds (minilm.analysis.seeds: mean, 95% t interval, Holm), and metrics.json keeps their per-seed values
under "seeds". The rest of the report shows the first seed.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from minilm.errors import MinilmError


def add_parser(commands) -> None:
    p = commands.add_parser("compare", help="what changed: compare a base model with its tuned versions",
                            description="Compare BASE with one or more TUNED models (checkpoints, Hugging Face GPT-2 "
                                        "folders, or LoRA adapter folders, minilm's or PEFT's, merged onto BASE; "
                                        "Hugging Face and PEFT folders are converted on the fly): which weights moved and how, how token and "
                                        "hidden vectors rearranged, where attention now looks. Writes "
                                        "OUT/report.html, OUT/metrics.json and OUT/figures/. One seed settles "
                                        "nothing: to judge the report's verdicts (low-rank change; bound pairs "
                                        "closer than controls) over seeds, add each further seed's base and "
                                        "tuned models as a --seed-run group.",
                            epilog="example, three seeds of a full and a LoRA fine-tune: minilm compare "
                                   "s1/base s1/full s1/lora --seed-run s2/base s2/full s2/lora "
                                   "--seed-run s3/base s3/full s3/lora --out report")
    p.add_argument("base", metavar="BASE", help="the model before fine-tuning: a minilm run or a Hugging Face GPT-2 folder")
    p.add_argument("tuned", metavar="TUNED", nargs="+", help="fine-tuned checkpoints, Hugging Face folders, or adapter folders (minilm's or PEFT's)")
    p.add_argument("--seed-run", metavar=("BASE", "TUNED"), nargs="+", action="append", default=[],
                   help="another seed's base and tuned models, in the same order as the first group (repeatable); "
                        "the low-rank and closer-than verdicts are then judged over all seeds with a 95%% "
                        "interval, or said to be not settled")
    p.add_argument("--out", metavar="DIR", required=True, help="report folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out report an earlier compare wrote")
    p.add_argument("--allow-other-base", action="store_true",
                   help="compare adapters trained on another base of the same shape (their fingerprint differs)")
    p.add_argument("--probe", metavar="TEXT", action="append",
                   help="a probe sentence (repeatable); the base corpus's own probes are added")
    p.add_argument("--words", metavar="W1,W2", help="extra tokens whose vectors to follow")
    p.add_argument("--no-corpus-probe", action="store_true",
                   help="do not add the base corpus's words, groups, pairs and text to the probe set")
    p.add_argument("--top-k", type=int, default=10, help="singular vectors checked for intruders (default: 10)")
    p.add_argument("--epsilon", type=float, default=0.5,
                   help="intruder threshold on the best |cosine| with the base's singular vectors (default: 0.5)")
    p.set_defaults(run=run)


def load_model(path):
    """A model argument: a minilm checkpoint (or run folder), or a Hugging Face GPT-2 folder, converted on the
    fly (minilm/hf.py) into a Checkpoint with default training settings and no corpus."""
    import jax
    import jax.numpy as jnp

    from minilm import checkpoint, hf
    from minilm.config import DataConfig, TrainConfig

    path = Path(path)
    if not hf.is_folder(path):
        return checkpoint.load(path)
    cfg, params, tokenizer = hf.load(path)
    # path: the folder's config.json, so that path.parent names the model as it names a run for checkpoint/
    return checkpoint.Checkpoint(path / "config.json", cfg, TrainConfig(), DataConfig(), tokenizer,
                                 jax.tree.map(jnp.asarray, params), {}, {})


def load_tuned(path: Path, base, used: set, allow_other_base: bool = False):
    """A tuned model for `compare`: a checkpoint or Hugging Face folder, or an adapter folder, minilm's or
    PEFT's (lora/peft.py), merged onto the base.

    Its name is its folder's (the run's, for OUT/checkpoint or OUT/adapter), primed until it differs
    from `base` and from every name in `used`, to which it is added."""
    import lora
    from lora import peft
    from minilm.analysis.compare import Model, check_comparable

    path = Path(path)
    adapter_dir = _adapter_dir(path)
    name = path.name if path.name not in ("checkpoint", "adapter") else path.parent.name
    while name in used or name == "base":
        name += "'"
    used.add(name)
    if adapter_dir is None:
        ckpt = load_model(path)
        check_comparable(base.model_cfg, base.tokenizer, ckpt.model_cfg, ckpt.tokenizer, str(path))
        return Model(name, ckpt.params)
    if peft.is_peft_folder(adapter_dir):  # checked by structure: a PEFT folder has no fingerprint of its base
        params, _ = peft.to_minilm(peft.read_peft(adapter_dir), base.params)
        warnings.warn(peft.not_fingerprinted(adapter_dir, "the base"))
    else:
        params, _ = lora.load_adapter(adapter_dir, base.params, base.model_cfg, tokenizer=base.tokenizer,
                                      allow_other_base=allow_other_base)
    adapters = {site: w.lora_a for site, w in lora.lora_weights(params).items()}
    return Model(name, lora.merge(params), adapters)


def _groups(args) -> list[list[str]]:
    """[BASE, TUNED...] per seed, the positional one first; every group as long as the first."""
    groups = [[args.base, *args.tuned], *args.seed_run]
    for group in groups[1:]:
        if len(group) != len(groups[0]):
            raise MinilmError(f"--seed-run {' '.join(group)}: {len(group) - 1} tuned model(s), but BASE is followed "
                              f"by {len(args.tuned)}; give every seed's tuned models, in the same order")
    return groups


def _adapter_dir(path: Path) -> Path | None:
    """The adapter folder of a TUNED argument (the folder itself or its adapter/), or None: a checkpoint."""
    return next((p for p in (path, path / "adapter") if (p / "adapter_config.json").is_file()), None)


def _load_bases(groups: list[list[str]]) -> list:
    """Every seed's base checkpoint, checked before any work: same shape and vocabulary as the first, and a
    LoRA adapter at the same positions as the first group (tuned models match by position)."""
    from minilm.analysis.compare import check_comparable
    from minilm.cli.flags import refuse_adapter

    bases, first_kinds = [], None
    for group in groups:
        flag = "BASE" if not bases else f"--seed-run base {group[0]}"
        refuse_adapter(group[0], flag, "give the model before fine-tuning first, then the adapter as a TUNED model")
        base = load_model(group[0])
        if bases:
            check_comparable(bases[0].model_cfg, bases[0].tokenizer, base.model_cfg, base.tokenizer, flag)
        kinds = [_adapter_dir(Path(p)) is not None for p in group[1:]]
        first_kinds = first_kinds or kinds
        for path, kind, first_kind in zip(group[1:], kinds, first_kinds):
            if kind != first_kind:
                what = {True: "a LoRA adapter", False: "a checkpoint"}
                raise MinilmError(f"--seed-run {path}: {what[kind]}, but the first group has {what[first_kind]} "
                                  "in its place; tuned models match by position: give them in the same order in "
                                  "every group")
        bases.append(base)
    return bases


def _probe(base, args, first: bool):
    """One seed's probe set: its base corpus's words, groups, pairs and text, plus --probe and --words."""
    from minilm.analysis.compare import make_probe
    from minilm.corpora import load_corpus

    corpus = None
    if base.data_cfg.corpus is not None and not args.no_corpus_probe:
        corpus = load_corpus(base.data_cfg.corpus, seed=base.train_cfg.seed, size=base.data_cfg.corpus_size)
    words = [w for w in (args.words or "").split(",") if w]
    probe = make_probe(base.tokenizer, base.model_cfg, corpus=corpus, words=words, sentences=args.probe or ())
    if probe.missing and first:
        print(f"not in the vocabulary, skipped: {', '.join(probe.missing)}", file=sys.stderr)
    return probe


def vector_map(base, models, probe):
    """The map of the words moving (minilm/report_map.py), for the first seed: base -> each tuned model in one
    step (step 0 is the base, step 1 the tuned model), with the words that occur in the probe's text (a word
    without a contextual vector cannot be placed); None if fewer than 2 do."""
    import numpy as np

    from minilm.analysis import vector_map as vmap
    from minilm.analysis.compare import vectors_at_levels

    states = {name: vectors_at_levels(params, probe, base.tokenizer, base.model_cfg)
              for name, params in [("base", base.params), *((m.name, m.params) for m in models)]}
    keep = [j for j in range(len(probe.words))
            if all(np.isfinite(x[j]).all() for levels in states.values() for x in levels.values())]
    if len(keep) < 2:
        return None
    words = [probe.words[j] for j in keep]
    pick = {name: {level: x[keep] for level, x in levels.items()} for name, levels in states.items()}
    groups = {g: [w for w in members if w in words] for g, members in probe.groups.items()}
    within = lambda pairs: tuple(p for p in pairs if all(w in words for w in p))  # noqa: E731
    return vmap.build(words, {g: m for g, m in groups.items() if m}, within(probe.pairs), within(probe.controls),
                      pick.pop("base"), {name: {1: levels} for name, levels in pick.items()})


def run(args) -> int:
    from tqdm import tqdm

    from minilm import folders, report, report_map
    from minilm.analysis.compare import Model, compare, over_seeds, summarise

    if args.top_k < 1:
        raise MinilmError(f"--top-k {args.top_k}: expected a whole number >= 1, e.g. --top-k 10")
    if not 0 < args.epsilon <= 1:  # also refuses nan
        raise MinilmError(f"--epsilon {args.epsilon}: expected a |cosine| threshold in (0, 1], e.g. --epsilon 0.5")
    groups = _groups(args)
    bases = _load_bases(groups)
    out = folders.check_output(args.out, "report", overwrite=args.overwrite,
                               inputs=[p for group in groups for p in group])
    # Every model is loaded and checked before any work, so a bad one is one line and costs nothing.
    tuned = [[load_tuned(p, base, used, args.allow_other_base) for used in [set()] for p in group[1:]]
             for group, base in zip(groups, bases)]
    probes = [_probe(base, args, i == 0) for i, base in enumerate(bases)]  # each seed's own corpus
    steps = len(groups) * (2 * len(args.tuned) + len(args.tuned) ** 2) + 1  # adapter pairs at most
    results = []
    with tqdm(total=steps, desc="compare", unit="part") as bar:
        def progress(what):
            bar.set_postfix_str(what)
            bar.update(1)

        for base, models, probe in zip(bases, tuned, probes):
            results.append(compare(Model("base", base.params), models, probe, base.tokenizer, base.model_cfg,
                                   k=args.top_k, epsilon=args.epsilon, progress=progress))
        result = results[0]
        # The verdicts over every seed; names are the first group's (tuned models match by position).
        result["summary"] = summarise(result, results)
        result["seeds"] = {"runs": [{"base": str(g[0]), "tuned": [str(p) for p in g[1:]],
                                     "base_seed": base.train_cfg.seed} for g, base in zip(groups, bases)],
                           **over_seeds(results)}
        bar.set_postfix_str("map")
        result["map"] = vector_map(bases[0], tuned[0], probes[0])
        lead = [] if result["map"] is None else [
            (f"The word vectors moving{' (the first seed)' if len(groups) > 1 else ''}: step 0 is the base, step 1 "
             f"the tuned model, level by level", report_map.map_block(result["map"])),
            (None, ("map", report_map.fig_map(result["map"])))]
        bar.set_postfix_str("report")
        page = report.write(out, result, lead=lead, title=f"What changed: {bases[0].path.parent.name} -> "
                                                f"{', '.join(result['models'])}"
                                                + (f", {len(groups)} seeds" if len(groups) > 1 else ""))
        bar.update(bar.total - bar.n)
    print(f"report: {page}\nmetrics: {out / 'metrics.json'}")
    if len(groups) == 1:
        print("one seed: the report gives numbers, no verdicts; add each further seed as --seed-run BASE TUNED...")
    return 0
