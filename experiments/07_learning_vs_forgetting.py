"""07 — Learning vs forgetting: does LoRA learn less and forget less than full fine-tuning, compared fairly?

Biderman et al. 2024, "LoRA Learns Less and Forgets Less" (arXiv 2405.09673), found that LoRA reaches
a worse fine-tuning loss than full fine-tuning, and at an equal fine-tuning loss forgets less of the
pretraining task. They compared methods across learning rates, on curves of forgetting against
learning, not at one hand-picked learning rate each. Here the same at toy scale: per seed, a base
pretrained on `associations`, fine-tuned on `bindings` fully and with LoRA on all linear layers at two
ranks (alpha = 2·rank, as in experiment 01), every run with the same step budget, and along training
every WATCH_EVERY steps the held-out loss on `bindings` (learning) and the rise of the held-out loss on
`associations` over the base's (forgetting), both on fixed windows (common.fixed_windows).

Learning rates, fixed before any run: factors of ~3 around each method's default (full fine-tuning
1e-3, LoRA minilm.config.LORA_LR = 1e-2), three each: full 3e-4, 1e-3, 3e-3; LoRA 3e-3, 1e-2, 3e-2.
A grid centred on each method's own default because LoRA's good rates lie about 10× above full
fine-tuning's (Biderman et al.'s sweeps; our defaults) — one common grid would compare a good rate of
one method with a poor one of the other. The minimum of the cosine schedule is lr / 10 for every run.

The verdicts come from the curves (minilm/analysis/tradeoff.py), by rules fixed here:
* learns less    a method's lowest held-out fine-tuning loss over its learning rates and evaluations;
                 the finding is LoRA's minus full's, claimed > 0.
* forgets less   the matched loss is the highest of the three methods' lowest losses (so every method
                 reaches it); each run's forgetting there is interpolated at its first crossing, a
                 method's is its best (lowest) over learning rates; the finding is full's minus
                 LoRA's, claimed > 0. Runs that never reach the matched loss are not counted (listed).
Not judged: the same comparison LOOSER nats above the matched loss, where no method is at the end of
its budget (the matched loss is, by its rule, the lowest loss the weakest method reaches).
A diverged run (train.Diverged) is marked, shown in the report and left out of the curves.
Per-seed values, means, 95% t intervals and Holm's correction over the report: minilm/analysis/seeds.py.

    python experiments/07_learning_vs_forgetting.py             # 3 seeds, ~5 minutes on 2 CPU cores (290 s measured)
    python experiments/07_learning_vs_forgetting.py --seeds 5   # more seeds: more power
    python experiments/07_learning_vs_forgetting.py --quick     # seconds: the pipeline end to end, 2 seeds
"""

from __future__ import annotations

import dataclasses
import html
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`, next to this file

import common  # noqa: E402

import lora  # noqa: E402
from minilm import report, train  # noqa: E402
from minilm.analysis import seeds, tradeoff  # noqa: E402
from minilm.config import LORA_LR  # noqa: E402
from minilm.errors import MinilmError  # noqa: E402
from minilm.tree import partition  # noqa: E402

SEEDS = 3                                               # default seed count (2 with --quick)
FULL_LR = 1e-3                                          # common.setup's fine-tuning rate
LRS = {"full": (0.3 * FULL_LR, FULL_LR, 3 * FULL_LR), "lora": (0.3 * LORA_LR, LORA_LR, 3 * LORA_LR)}  # ~×3 apart
WATCH_EVERY = 10                                        # steps between evaluations along training
LOOSER = 0.5                                            # nats above the matched loss: a second, unjudged match
WATCH_BATCHES = 8                                       # fixed held-out windows per corpus: 8 × 16


def methods(quick: bool) -> list[tuple[str, lora.LoraConfig | None]]:
    """(name, LoraConfig or None for full). Ranks well below the width (64; 32 with --quick)."""
    ranks = (2, 4) if quick else (4, 16)
    return [("full", None)] + [(f"lora-r{r}", lora.LoraConfig(rank=r, alpha=2 * r, targets=("all-linear",)))
                               for r in ranks]


# ---------------------------------------------------------------- one seed: the sweep and its curves


def run_seed(seed: int, quick: bool, extra_lrs: dict | None = None) -> dict:
    """Base, every (method, lr) fine-tune, and their curves -> {"runs": [...], "base": {...}}."""
    s = common.setup(quick, seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    count = 2 if quick else WATCH_BATCHES
    watch = {"finetune": common.fixed_windows(ft_data, model_cfg, count),
             "pretrain": common.fixed_windows(base_data, model_cfg, count)}
    evaluate = train.make_eval(model_cfg)
    at_start = {k: float(evaluate(*partition(base, lambda n: True), w)) for k, w in watch.items()}
    every = 2 if quick else WATCH_EVERY
    runs = []
    for name, cfg in methods(quick):
        kind = "full" if cfg is None else "lora"
        for lr in (*LRS[kind], *(extra_lrs or {}).get(kind, ())):
            # the built-in evaluation only at the end: the curves read `watch`
            train_cfg = dataclasses.replace(s.finetune, lr=lr, min_lr=lr / 10, eval_every=s.finetune.steps)
            t = common.finetune(f"{name} lr {lr:g}", base, ft_data, model_cfg, train_cfg, cfg, watch=watch,
                                watch_every=every)
            points = [(0, at_start["finetune"], 0.0)] + [
                (m["step"], m["finetune_loss"], m["pretrain_loss"] - at_start["pretrain"])
                for m in t.log if "finetune_loss" in m]
            runs.append({"method": name, "lr": lr, "steps": [p[0] for p in points],
                         "finetune_loss": [p[1] for p in points], "forgetting": [p[2] for p in points],
                         "diverged": t.diverged})
    return {"runs": runs, "base": {"finetune_loss": at_start["finetune"], "pretrain_loss": at_start["pretrain"]},
            "budget": s.finetune.steps, "every": every}


def curves_of(runs: list[dict], method: str, column: str = "forgetting") -> dict:
    """{lr: [(fine-tuning loss, column)]} of one method's runs that did not diverge."""
    return {r["lr"]: list(zip(r["finetune_loss"], r[column])) for r in runs
            if r["method"] == method and r["diverged"] is None}


def bracket(run: dict, target: float) -> list[tuple[int, float]]:
    """The evaluations (step, fine-tuning loss) between which `run` first reaches `target`: the last one
    above it and the first at or below it (one point if it starts there)."""
    j = next(i for i, loss in enumerate(run["finetune_loss"]) if loss <= target)
    return [(run["steps"][i], run["finetune_loss"][i]) for i in range(max(0, j - 1), j + 1)]


def measure(swept: dict, names: list[str]) -> tuple[dict, dict]:
    """One seed -> (numbers the claims read: {measurement: {method: value}}, how the match was made)."""
    runs = swept["runs"]
    for n in names:
        if not curves_of(runs, n):
            raise MinilmError(f"every run of {n} diverged on this seed: nothing to compare; lower its learning rates")
    lowest = {n: tradeoff.lowest_loss(curves_of(runs, n)) for n in names}
    target = tradeoff.matched_loss({n: loss for n, (loss, _) in lowest.items()})
    best = {n: tradeoff.best_at(curves_of(runs, n), target) for n in names}  # never None: every method reaches it
    chosen = {n: next(r for r in runs if r["method"] == n and r["lr"] == best[n][1] and r["diverged"] is None)
              for n in names}
    numbers = {"lowest_loss": {n: lowest[n][0] for n in names}, "best_forgetting": {n: best[n][0] for n in names},
               "matched_loss": {"all": target}, "lowest_loss_lr": {n: lowest[n][1] for n in names},
               "best_forgetting_lr": {n: best[n][1] for n in names},
               "best_forgetting_step": {n: tradeoff.forgetting_at(curves_of(runs, n, "steps")[best[n][1]], target)
                                        for n in names}}
    details = {"matched_loss": target, **{k: numbers[k] for k in ("lowest_loss_lr", "best_forgetting_lr",
                                                                    "best_forgetting_step")},
               "bracket": {n: bracket(chosen[n], target) for n in names},
               # not judged, a check of the rule: the matched loss is where the weakest method ends its budget
               "looser_loss": target + LOOSER, "best_at_looser": {n: tradeoff.best_at(curves_of(runs, n),
                                                                                      target + LOOSER)[0]
                                                                  for n in names},
               "not_reaching": [f"{r['method']} lr {r['lr']:g}" for r in runs if r["diverged"] is None and
                                tradeoff.forgetting_at(list(zip(r["finetune_loss"], r["forgetting"])), target) is None]}
    return numbers, details


# ---------------------------------------------------------------- the claims: per-seed numbers in, findings out


def _rates(m: dict, key: str, names: list[str]) -> str:
    return "; ".join(f"{n} " + ", ".join(f"{x:g}" for x in m[key][n]) for n in names)


def claim_learns_less(m: dict, names: list[str]) -> dict:
    return {"claim": "LoRA learns less (Biderman et al. 2024): its lowest held-out fine-tuning loss over its learning "
                     "rates, in the same step budget, minus full fine-tuning's > 0 nats.",
            "findings": [seeds.finding(f"{n} learns less than full",
                                       np.subtract(m["lowest_loss"][n], m["lowest_loss"]["full"]), 0.0)
                         for n in names if n != "full"],
            "note": "A tiny model on a small corpus: LoRA on every linear layer at rank 4 or 16 of width 64 may "
                    "have capacity enough for what full fine-tuning learns within the budget. The learning rates "
                    "that gave each method's lowest loss: " + _rates(m, "lowest_loss_lr", names) + "."}


def claim_forgets_less(m: dict, names: list[str]) -> dict:
    return {"claim": "LoRA forgets less (Biderman et al. 2024): at the matched fine-tuning loss (the highest of the "
                     "methods' lowest losses, reached by all), full fine-tuning's lowest forgetting over its "
                     "learning rates minus LoRA's > 0 nats.",
            "findings": [seeds.finding(f"{n} forgets less than full",
                                       np.subtract(m["best_forgetting"]["full"], m["best_forgetting"][n]), 0.0)
                         for n in names if n != "full"],
            "note": "Where each method's best forgetting at the matched loss came from (learning rate, and the "
                    "interpolated step of the budget at which that run reached the loss; per seed): "
                    + _rates(m, "best_forgetting_lr", names) + "; steps "
                    + "; ".join(f"{n} " + ", ".join(f"{x:.0f}" for x in m["best_forgetting_step"][n]) for n in names)
                    + ". Biderman et al. fine-tuned billion-parameter models for thousands of steps, where a "
                    "low rank restricts the update far more than rank 4 or 16 of a width-64 model does."}


CLAIMS = (claim_learns_less, claim_forgets_less)


def judge(per_seed: dict, names: list[str]) -> list[dict]:
    """Both claims' verdicts from per-seed numbers, Holm-corrected over all the report's findings."""
    return seeds.judge([c(per_seed, names) for c in CLAIMS])


# ---------------------------------------------------------------- figures and sentences, from metrics alone


def fig_tradeoff(shown: dict, details: dict, names: list[str]) -> Figure:
    """Left: forgetting against fine-tuning loss (more learning to the right), one line per method × lr, the
    matched loss dotted and each method's best point there ringed. Right: fine-tuning loss along training."""
    fig = Figure(figsize=(12, 4.6))
    ax, ax2 = fig.subplots(1, 2)
    drawn = [r for r in shown["runs"] if r["diverged"] is None]  # a diverged run's last losses would set the axes
    for r in drawn:
        c = report.PALETTE[names.index(r["method"]) % len(report.PALETTE)]
        lrs = sorted({x["lr"] for x in drawn if x["method"] == r["method"]})
        shade = 0.35 + 0.65 * lrs.index(r["lr"]) / max(1, len(lrs) - 1)  # darker: higher learning rate
        style = dict(color=c, alpha=shade, lw=1.4, ms=3, label=f"{r['method']} lr {r['lr']:g}")
        ax.plot(r["finetune_loss"], r["forgetting"], "o-", **style)
        ax2.plot(r["steps"], r["finetune_loss"], "o-", **style)
    failed = len(shown["runs"]) - len(drawn)
    target = details["matched_loss"]
    ax.axvline(target, ls=":", color="black", lw=1)
    for i, n in enumerate(names):
        ax.plot([target], [details["best"][n]], "o", ms=11, mfc="none", mew=1.5,
                color=report.PALETTE[i % len(report.PALETTE)])
    ax.invert_xaxis()
    ax.set_xlabel("held-out fine-tuning loss on bindings (nats; more learning →)")
    ax.set_ylabel("forgetting: rise of held-out associations loss (nats)")
    ax.set_title(f"trade-off curves; dotted: matched loss {target:.4f}; rings: each method's best there", fontsize=9)
    ax.legend(fontsize=6)
    ax2.axhline(target, ls=":", color="black", lw=1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out fine-tuning loss on bindings (nats)")
    ax2.set_title("fine-tuning loss along training (same budget for every run)"
                  + (f"; {failed} diverged run{'s' if failed > 1 else ''} not drawn (see the table)" if failed else ""),
                  fontsize=9)
    fig.tight_layout()
    return fig


def summary(metrics: dict) -> list[str]:
    """The report's sentences, computed from metrics.json alone."""
    out = []
    for c in metrics["claims"]:
        out.append(f"{c['claim']} -> {c['verdict']} ({c['evidence']}).")
    matched = ", ".join(f"seed {s}: {d['matched_loss']:.4f}" for s, d in zip(metrics["seeds"], metrics["matched"]))
    out.append(f"Matched fine-tuning losses (exact, by interpolation): {matched}.")
    looser = {n: np.mean([d["best_at_looser"][n] for d in metrics["matched"]]) for n in metrics["methods"]}
    out.append(f"Not judged, a check of the matching rule: {LOOSER:g} nats above the matched loss, the best forgetting "
               "(mean over seeds) is " + ", ".join(f"{n} {v:+.3f}" for n, v in looser.items()) + ".")
    failed = metrics["diverged"]
    out.append(f"{len(failed)} of {metrics['runs_per_seed'] * len(metrics['seeds'])} runs diverged"
               + (": " + "; ".join(f"seed {d['seed']} {d['method']} lr {d['lr']:g} at step {d['step']}"
                                   for d in failed) + " (left out of the curves)." if failed else "."))
    return out


# ---------------------------------------------------------------- the experiment


def main(argv=None, *, extra_lrs: dict | None = None) -> int:
    """`extra_lrs` {"full" or "lora": (lr, ...)} adds learning rates to the grid (the tests add one that
    diverges, to see how the report shows it); the command line always runs the grid above."""
    args = common.parser(__doc__.splitlines()[0], "runs/07_learning_vs_forgetting", seeds=SEEDS).parse_args(argv)
    started = time.perf_counter()
    seed_list = common.seed_list(args)
    names = [n for n, _ in methods(args.quick)]
    measured, matched, diverged, shown = [], [], [], None
    for seed, swept in zip(seed_list, common.over_seeds(run_seed, seed_list, args.quick, extra_lrs,
                                                        workers=args.workers)):
        numbers, details = measure(swept, names)
        measured.append(numbers)
        matched.append(details)
        diverged += [{"seed": seed, "method": r["method"], "lr": r["lr"], **r["diverged"]}
                     for r in swept["runs"] if r["diverged"] is not None]
        shown = shown or swept  # the first seed's curves are drawn
    per_seed = common.stack(measured)
    claims = judge(per_seed, names)
    n_verdicts = sum(len(c["findings"]) for c in claims)
    metrics = {"seeds": seed_list, "shown_seed": seed_list[0], "methods": names,
               "lrs": {n: sorted({r["lr"] for r in shown["runs"] if r["method"] == n}) for n in names},
               "budget": shown["budget"], "watch_every": shown["every"], "runs_per_seed": len(shown["runs"]),
               "per_seed": per_seed, "matched": matched, "claims": claims, "diverged": diverged,
               "verdicts": common.verdicts_record(claims),
               "shown_runs": shown["runs"], "shown_base": shown["base"]}
    metrics["summary"] = summary(metrics)
    metrics["seconds"] = time.perf_counter() - started

    first = dict(matched[0], best={n: per_seed["best_forgetting"][n][0] for n in names})
    match_rows = [(s, f"{d['matched_loss']:.4f}", n, f"{per_seed['lowest_loss'][n][k]:.4f} (lr {d['lowest_loss_lr'][n]:g})",
                   f"{per_seed['best_forgetting'][n][k]:+.4f} (lr {d['best_forgetting_lr'][n]:g})",
                   f"{d['best_forgetting_step'][n]:.1f}", " → ".join(f"step {st}: {lo:.4f}" for st, lo in d["bracket"][n]),
                   ", ".join(d["not_reaching"]) or "none", f"{d['best_at_looser'][n]:+.4f}")
                  for k, (s, d) in enumerate(zip(seed_list, matched)) for n in names]
    div_rows = [(d["seed"], d["method"], f"{d['lr']:g}", d["step"], common.fmt(d["loss"]), common.fmt(d["grad_norm"]))
                for d in diverged]
    method = (f"<p>Per seed: a base pretrained on <code>associations</code>, then every method at every learning rate "
              f"for {metrics['budget']} steps on <code>bindings</code> (cosine schedule down to lr/10). Every "
              f"{metrics['watch_every']} steps (and at step 0, the base) both held-out losses on fixed windows "
              f"({2 if args.quick else WATCH_BATCHES} × 16 of each corpus, the same for every run). Learning rates: "
              + "; ".join(f"{n} {', '.join(f'{lr:g}' for lr in metrics['lrs'][n])}" for n in names)
              + ". LoRA on all linear layers, alpha = 2·rank. Rules, fixed before the run, are in the script's "
              "docstring and minilm/analysis/tradeoff.py: a method's lowest loss over its learning rates and "
              "evaluations; the matched loss is the highest of these; forgetting there is interpolated at each run's "
              "first crossing, and a method's is its lowest over learning rates.</p>")
    blocks = [("Summary", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in metrics["summary"]) + "</ul>"),
              ("How it was measured", method),
              (f"Trade-off curves, seed {seed_list[0]}", ("tradeoff", fig_tradeoff(shown, first, names))),
              ("Claims, over seeds", report.claims_html(claims, seed_list)),
              ("Every seed's value and the interval, per claim", ("claims", report.fig_findings(claims))),
              ("The matched losses, seed by seed (matched exactly: interpolated between the two evaluations shown)",
               common.table(["seed", "matched loss", "method", "lowest loss (its lr)", "best forgetting at the "
                             "matched loss (its lr)", "step reached (interpolated)", "evaluations around it",
                             "runs that never reach it (not counted)",
                             f"not judged: best forgetting at the matched loss + {LOOSER:g}"], match_rows)),
              ("Diverged runs (left out of the curves)",
               common.table(["seed", "method", "lr", "step", "loss", "gradient norm"], div_rows) if div_rows
               else "<p>None: every run stayed finite.</p>")]
    common.publish(args.out, "07 — Learning vs forgetting, compared fairly", blocks, metrics)
    print(f"{n_verdicts} verdicts, Holm-corrected (family-wise α {seeds.ALPHA:g}), over {len(seed_list)} seeds")
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
