"""02 — How do LoRA's rank and alpha change what it learns, what it forgets, and what the change looks like?

Pretrain a tiny GPT on `associations`, then fine-tune LoRA adapters on `bindings` at ranks 1 … 64 under
three rules for the scale s that multiplies the adapter's product A B:

    alpha = 16       s = 16 / R          the LoRA paper's rule with alpha held fixed (Hu et al. 2021, §4.1)
    alpha = 2R       s = 2               alpha grows with the rank, a common recipe: the scale never changes
    rsLoRA           s = 16 / sqrt(R)    rank-stabilised LoRA (Kalajdzievski 2023, arXiv 2312.03732)

Why the rule matters (Kalajdzievski 2023): under s = alpha / R the adapter's learning slows down as R
grows ("gradient collapse"), so a big adapter trains much like a small one and extra rank buys little;
s = alpha / sqrt(R) is the scale at which learning stays stable for every R, so extra rank can pay off.
We measure both the loss and the size of the update ||ΔW||_F = ||s·A B||_F to see whether that happens.

Adapters sit on every linear layer of the blocks (`all-linear`: attn.q/k/v/o, mlp.fc, mlp.proj): the
binding corpus teaches new word–word facts, which also live in the MLPs, and adapting every linear layer
is what lets LoRA match full fine-tuning (Dettmers et al. 2023, QLoRA §4). Every one of these matrices has
min(d_in, d_out) = 64 = the model width, so R = 64 is *full rank*: the adapter can express any change
of the matrix, and what still differs from full fine-tuning is only the A B parametrisation and s.

Per run: fine-tuning loss (bindings), forgetting (rise of the associations loss over the base), intruder
dimensions of the merged matrices (Shuttleworth et al. 2024; k = 10, ε = 0.5, summed over matrices),
the amplification factor (Hu et al. §7.3, top-R directions of ΔW), the effective rank of ΔW
(Roy & Vetterli 2007) and its size ||ΔW||_F. Every verdict is computed from these numbers.

Over seeds (minilm/analysis/seeds.py): the whole pipeline (corpus, base, adapters, batches) runs once per
seed, all in one process; each claim below is "true" or "false" only when the Student-t test over seeds,
Holm-corrected over all the report's findings, decides it against the threshold in its text, otherwise
"not settled by N seeds". The figures and the table show the first seed.

    python experiments/02_rank_and_alpha.py                # 3 seeds
    python experiments/02_rank_and_alpha.py --seeds 3,7,11 # those seeds
    python experiments/02_rank_and_alpha.py --quick        # seconds: the pipeline end to end, 2 seeds
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

import common

import lora
from minilm import report
from minilm.analysis import seeds, weights
from minilm.config import LORA_LR
from minilm.tree import named_leaves

RANKS = (1, 2, 4, 8, 16, 32, 64)
QUICK_RANKS = (1, 8)        # the quick model is 32 wide
ALPHA = 16.0                # the fixed alpha of the first and third rules
RULES = ("alpha=16", "alpha=2R", "rsLoRA alpha=16")
TARGETS = ("all-linear",)
STEPS, BATCH = 150, 16      # the same for every run (cosine schedule, 10% warmup, down to 1e-4); ~7 s a run
INTRUDER_K, INTRUDER_EPS = 10, 0.5
IMPROVES = 0.02             # nats: a loss drop larger than this counts as "learns better"
RHO = 0.5                   # a rank correlation above this is "tracks" (was the sentence's word "more")
HALF = 0.5                  # effective rank under this share of R is "uses under half of its rank"


def lora_config(rule: str, rank: int) -> lora.LoraConfig:
    alpha = 2.0 * rank if rule == "alpha=2R" else ALPHA
    return lora.LoraConfig(rank=rank, alpha=alpha, use_rslora=rule.startswith("rsLoRA"), targets=TARGETS)


def measure_change(base: dict, tuned: common.Tuned, rank: int) -> dict:
    """Per adapted matrix: intruders (merged W vs W0), amplification, effective rank and size of ΔW."""
    w0s, ws = named_leaves(base), named_leaves(tuned.params)
    out = {}
    for name, adapter in lora.lora_weights(tuned.adapted).items():
        w0 = np.asarray(w0s[name], np.float64)
        # ΔW from the factors in float64: exactly rank R, free of W0 + ΔW − W0 rounding in float32.
        delta = adapter.scale * (np.asarray(adapter.lora_a, np.float64) @ np.asarray(adapter.lora_b, np.float64))
        out[name] = {
            "intruders": weights.intruder_dimensions(w0, ws[name], k=INTRUDER_K, epsilon=INTRUDER_EPS)["count"],
            "amplification": weights.amplification(w0, delta, rank)["factor"],
            "effective_rank": weights.effective_rank(weights.singular_values(delta)),
            "update_norm": float(np.linalg.norm(delta)),
        }
    return out


# ---------------------------------------------------------------- one seed's numbers, and the claims


def _at(runs, rule, rank, key):
    return next(r[key] for r in runs if r["rule"] == rule and r["rank"] == rank)


def _trend(runs, rule, key, ranks):
    return [_at(runs, rule, r, key) for r in ranks]


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 and np.std(rx) > 0 and np.std(ry) > 0 else float("nan")


def measure(metrics: dict) -> dict[str, dict[str, float]]:
    """One seed's numbers that the claims read, {measurement: {rule or "all runs": value}}; nothing else."""
    runs, ranks, rules = metrics["runs"], metrics["setup"]["ranks"], metrics["setup"]["rules"]
    lo, mid, hi = ranks[0], ranks[(len(ranks) - 1) // 2], ranks[-1]
    distinct = [r for r in runs if not r["same_as"]]  # a run listed under two rules counts once
    out = {k: {} for k in ("loss_gain", "update_growth", "intruder_change", "amplification_drop",
                           "effective_rank_share")}
    for rule in rules:
        out["loss_gain"][rule] = _at(runs, rule, mid, "finetune_loss") - _at(runs, rule, hi, "finetune_loss")
        growth = _at(runs, rule, hi, "update_norm") / _at(runs, rule, lo, "update_norm")
        out["update_growth"][rule] = float(np.log(growth))
        out["intruder_change"][rule] = float(_at(runs, rule, hi, "intruders") - _at(runs, rule, lo, "intruders"))
        out["amplification_drop"][rule] = _at(runs, rule, lo, "amplification") - _at(runs, rule, hi, "amplification")
        out["effective_rank_share"][rule] = _at(runs, rule, hi, "effective_rank") / hi
    size = [r["update_norm"] for r in distinct]
    out["forgetting_rho"] = {"all runs": _spearman(size, [r["forgetting"] for r in distinct])}
    out["intruders_rho"] = {"all runs": _spearman(size, [r["intruders"] for r in distinct])}
    return out


# Each claim reads {measurement: {label: [one value per seed]}} and the ranks, and names the findings it rests
# on, each against a threshold fixed in its text; `judge` settles all findings of the report together (Holm).


def claim_rslora(m, ranks):
    mid, hi = ranks[(len(ranks) - 1) // 2], ranks[-1]
    return {"claim": f"rsLoRA's prediction (Kalajdzievski 2023): going from R = {mid} to R = {hi} lowers the bindings "
                     f"loss by more than {IMPROVES} nats under s = 16/sqrt(R), and by no more than {IMPROVES} under "
                     "s = 16/R.",
            "findings": [seeds.finding(f"{RULES[2]} gains", m["loss_gain"][RULES[2]], IMPROVES),
                         seeds.finding(f"{RULES[0]} gains", m["loss_gain"][RULES[0]], IMPROVES, above=False)],
            "note": f"Every run has the same {STEPS} steps; the gradient-collapse argument is about training "
                    "dynamics at large width, and here every matrix is only 64 wide."}


def claim_update_grows(m, ranks):
    return {"claim": f"The update grows with rank: log(||ΔW||_F at R = {ranks[-1]} / at R = {ranks[0]}) > 0, "
                     "under every rule.",
            "findings": [seeds.finding(rule, m["update_growth"][rule], 0.0) for rule in RULES],
            "note": "Under s = 16/R the scale falls 1/R as the rank grows; what A B gains must outrun it."}


def claim_forgetting(m, ranks):
    return {"claim": f"Bigger updates forget more: the rank correlation (Spearman, over the distinct runs of a seed) "
                     f"of ||ΔW||_F with forgetting > {RHO}.",
            "findings": [seeds.finding("all runs", m["forgetting_rho"]["all runs"], RHO)], "note": ""}


def claim_intruders(m, ranks):
    return {"claim": f"Higher rank, fewer intruder dimensions (Shuttleworth et al. 2024): the count at R = {ranks[-1]} "
                     f"minus the count at R = {ranks[0]} < 0, under every rule.",
            "findings": [seeds.finding(rule, m["intruder_change"][rule], 0.0, above=False) for rule in RULES],
            "note": "Shuttleworth et al.'s intruders come from a pretrained matrix with a few dominant directions; "
                    "a tiny base's spectrum is nearly flat (experiment 01 reports its spectral gaps), so a large "
                    "update can rotate its top directions."}


def claim_intruders_track(m, ranks):
    return {"claim": f"The intruder count tracks the update's size: its rank correlation (Spearman, over the distinct "
                     f"runs of a seed) with ||ΔW||_F > {RHO}.",
            "findings": [seeds.finding("all runs", m["intruders_rho"]["all runs"], RHO)], "note": ""}


def claim_amplification(m, ranks):
    return {"claim": f"The amplification factor (Hu et al. §7.3) is larger at low rank: its value at R = {ranks[0]} "
                     f"minus at R = {ranks[-1]} > 0, under every rule.",
            "findings": [seeds.finding(rule, m["amplification_drop"][rule], 0.0) for rule in RULES],
            "note": f"At R = {ranks[-1]} the top-R directions fill a whole side of a matrix when R is the width, so "
                    "there the factor only compares sizes."}


def claim_effective_rank(m, ranks):
    return {"claim": f"ΔW uses under half of its rank: effective rank (Roy & Vetterli 2007) at R = {ranks[-1]} over "
                     f"{ranks[-1]} < {HALF}, under every rule.",
            "findings": [seeds.finding(rule, m["effective_rank_share"][rule], HALF, above=False) for rule in RULES],
            "note": ""}


CLAIMS = (claim_rslora, claim_update_grows, claim_forgetting, claim_intruders, claim_intruders_track,
          claim_amplification, claim_effective_rank)


def judge(per_seed: dict, ranks) -> list[dict]:
    """Every claim's verdict from per-seed numbers, Holm-corrected over all of the report's findings."""
    return seeds.judge([c(per_seed, list(ranks)) for c in CLAIMS])


# ---------------------------------------------------------------- figures


def fig_metrics(metrics: dict, panels) -> Figure:
    runs, ranks, rules = metrics["runs"], metrics["setup"]["ranks"], metrics["setup"]["rules"]
    cols = 2 if len(panels) == 4 else len(panels)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, label, log_y) in zip(axes, panels):
        for i, rule in enumerate(rules):
            ax.plot(ranks, _trend(runs, rule, key, ranks), "o-", label=rule, color=report.PALETTE[i],
                    alpha=0.85, lw=1.5, ms=4)
        if key == "effective_rank":
            ax.plot(ranks, ranks, ":", color="grey", label="R (the most it can be)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("rank R")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_table(metrics: dict) -> str:
    numbers = ("finetune_loss", "forgetting", "intruders", "amplification", "amplification_median",
               "effective_rank", "update_norm")
    rows = [(r["rule"], r["rank"], common.fmt(r["alpha"]), common.fmt(r["scale"]), r["trainable"],
             *(common.fmt(float(r[key])) for key in numbers), r["same_as"] or "") for r in metrics["runs"]]
    return common.table(["rule", "R", "alpha", "scale s", "trainable", "bindings loss", "forgetting", "intruders",
                         "amplification (mean)", "amplification (median)", "effective rank ΔW", "||ΔW||_F",
                         "identical to"], rows)


# ---------------------------------------------------------------- the experiment


def run_seed(seed: int, quick: bool) -> dict:
    """One seed's pipeline: its base, then every (rule, rank) adapter -> the metrics of that seed."""
    s = common.setup(quick, seed)
    ranks = QUICK_RANKS if quick else RANKS
    ft_cfg = s.finetune if quick else dataclasses.replace(s.finetune, steps=STEPS, batch_size=BATCH)
    # One evaluation at the end: the losses that count come from common.eval_loss, on the same windows for all.
    ft_cfg = dataclasses.replace(ft_cfg, lr=LORA_LR, eval_every=ft_cfg.steps)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    base_losses = {"finetune_loss": common.eval_loss(base, ft_data, model_cfg),
                   "base_loss": common.eval_loss(base, base_data, model_cfg)}

    runs, trained = [], {}  # trained: (rank, scale) -> (label, row); the rules meet where their scales agree
    for rank in ranks:
        for rule in RULES:
            cfg = lora_config(rule, rank)
            scale = cfg.scale_for(rank, cfg.alpha)
            label = f"{rule}, R={rank}"
            if (rank, scale) in trained:  # same rank, same scale, same seed: the same training, bit for bit
                first, row = trained[(rank, scale)]
                runs.append({**row, "rule": rule, "alpha": cfg.alpha, "same_as": first})
                continue
            tuned = common.finetune(label, base, ft_data, model_cfg, ft_cfg, cfg)
            per_matrix = measure_change(base, tuned, rank)
            base_loss = common.eval_loss(tuned.params, base_data, model_cfg)
            row = {"rule": rule, "rank": rank, "alpha": cfg.alpha, "scale": scale, "trainable": tuned.trainable,
                   "finetune_loss": common.eval_loss(tuned.params, ft_data, model_cfg), "base_loss": base_loss,
                   "forgetting": base_loss - base_losses["base_loss"],
                   "intruders": int(sum(m["intruders"] for m in per_matrix.values())),
                   **{key: float(np.mean([m[key] for m in per_matrix.values()]))
                      for key in ("amplification", "effective_rank", "update_norm")},
                   "amplification_median": float(np.median([m["amplification"] for m in per_matrix.values()])),
                   "same_as": None, "per_matrix": per_matrix}
            trained[(rank, scale)] = (label, row)
            runs.append(row)

    n_matrices = len(runs[0]["per_matrix"])
    return {"setup": {"ranks": list(ranks), "rules": list(RULES), "alpha": ALPHA, "targets": list(TARGETS),
                      "width": model_cfg.width, "pretrain_steps": s.pretrain.steps, "steps": ft_cfg.steps,
                      "lr": ft_cfg.lr, "min_lr": ft_cfg.min_lr, "batch_size": ft_cfg.batch_size,
                      "adapted_matrices": n_matrices, "intruder_k": INTRUDER_K, "intruder_epsilon": INTRUDER_EPS,
                      "intruder_max": INTRUDER_K * n_matrices, "seed": seed},
            "base": base_losses, "runs": runs}


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/02_rank_and_alpha", seeds=3).parse_args(argv)
    started = time.perf_counter()
    seed_list = common.seed_list(args)
    shown = None  # the first seed's runs: the figures and the table show them in detail
    measured = []
    for one in common.over_seeds(run_seed, seed_list, args.quick, workers=args.workers):
        measured.append(measure(one))
        shown = shown or one
    per_seed = common.stack(measured)
    claims = judge(per_seed, shown["setup"]["ranks"])
    metrics = {**shown, "seeds": seed_list, "shown_seed": seed_list[0], "per_seed": per_seed, "claims": claims,
               "verdicts": common.verdicts_record(claims), "summary": common.verdict_lines(claims, seed_list)}
    metrics["seconds"] = time.perf_counter() - started

    st, base_losses, runs = shown["setup"], shown["base"], shown["runs"]
    width, ranks, n_matrices = st["width"], st["ranks"], st["adapted_matrices"]
    setup_note = (
        f"<p>Seed {seed_list[0]}. Base: pretrained on <code>associations</code> ({st['pretrain_steps']} steps, width "
        f"{width}); bindings loss {base_losses['finetune_loss']:.3f}, associations loss "
        f"{base_losses['base_loss']:.3f}. Every run: LoRA on <code>all-linear</code> ({n_matrices} matrices, each "
        f"with min(d_in, d_out) = {width}, so R = {ranks[-1]} "
        f"{'is full rank' if ranks[-1] == width else 'is below full rank'}), {st['steps']} steps of batch "
        f"{st['batch_size']}, peak learning rate {st['lr']:g} with warmup and a cosine decay to {st['min_lr']:g}.</p>")
    twins = [f"{r['rule']} at R = {r['rank']} is {r['same_as']}" for r in runs if r["same_as"]]
    if twins:
        setup_note += (f"<p>The rules coincide where their scales agree ({html.escape('; '.join(twins))}): such "
                       "a run is trained once and listed under both rules.</p>")
    loss_title = f"bindings loss (base: {base_losses['finetune_loss']:.2f})"
    intruder_title = f"intruder dimensions (k={INTRUDER_K}, ε={INTRUDER_EPS}, all {n_matrices} matrices)"
    blocks = [*common.claims_blocks(claims, seed_list),
              ("How it was run", setup_note),
              (f"What it learned and forgot, and how big the update is (seed {seed_list[0]})",
               ("learning", fig_metrics(metrics, [("scale", "scale s of A B", True),
                                                  ("finetune_loss", loss_title, False),
                                                  ("forgetting", "forgetting: rise of associations loss", False),
                                                  ("update_norm", "mean ||ΔW||_F", False)]))),
              (f"What the change looks like (seed {seed_list[0]})",
               ("shape", fig_metrics(metrics, [("intruders", intruder_title, False),
                                               ("amplification", "mean amplification factor (top-R of ΔW)", True),
                                               ("effective_rank", "mean effective rank of ΔW", True)]))),
              (f"Every run (seed {seed_list[0]})", run_table(metrics))]
    common.publish(args.out, "02 — Rank and alpha: how big an adapter, and how loud?", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
