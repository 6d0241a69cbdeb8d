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
(Roy & Vetterli 2007) and its size ||ΔW||_F. The closing paragraph is computed from these numbers.

    python experiments/02_rank_and_alpha.py            # ~3 minutes on 2 CPU cores
    python experiments/02_rank_and_alpha.py --quick    # seconds: the pipeline end to end
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
from minilm.analysis import weights
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


# ---------------------------------------------------------------- what it shows


def _at(runs, rule, rank, key):
    return next(r[key] for r in runs if r["rule"] == rule and r["rank"] == rank)


def _trend(runs, rule, key, ranks):
    return [_at(runs, rule, r, key) for r in ranks]


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 and np.std(rx) > 0 and np.std(ry) > 0 else float("nan")


def summarize(metrics: dict) -> list[str]:
    """The 'what it shows' sentences, computed from metrics["runs"] and nothing else."""
    runs, ranks, rules = metrics["runs"], metrics["setup"]["ranks"], metrics["setup"]["rules"]
    lo, mid, hi = ranks[0], ranks[(len(ranks) - 1) // 2], ranks[-1]
    out = []

    # 1. loss against rank, per rule, and the rsLoRA claim
    gain = {rule: _at(runs, rule, mid, "finetune_loss") - _at(runs, rule, hi, "finetune_loss") for rule in rules}
    best = {rule: min(ranks, key=lambda r: _at(runs, rule, r, "finetune_loss")) for rule in rules}
    out.append(f"Fine-tuning loss on bindings from R = {lo} to R = {hi}: " + "; ".join(
        f"{rule}: {_at(runs, rule, lo, 'finetune_loss'):.3f} → {_at(runs, rule, hi, 'finetune_loss'):.3f} "
        f"(best at R = {best[rule]})" for rule in rules) + ".")
    better = [rule for rule in rules if gain[rule] > IMPROVES]
    fixed, rs = rules[0], rules[2]
    if gain[rs] > IMPROVES and gain[fixed] <= IMPROVES:
        verdict = "as rsLoRA predicts: the higher ranks pay off only when the scale is alpha/sqrt(R)"
    elif gain[rs] > IMPROVES and gain[fixed] > IMPROVES:
        verdict = ("only in part as rsLoRA predicts: both rules still improve, rsLoRA by "
                   + ("more" if gain[rs] > gain[fixed] else "less"))
    elif gain[rs] <= IMPROVES and gain[fixed] > IMPROVES:
        verdict = "against rsLoRA's prediction: the fixed-alpha rule gains from the higher ranks and rsLoRA does not"
    else:
        verdict = "neither rule gains from the higher ranks here, so this run cannot test rsLoRA's claim"
    out.append(f"Going from R = {mid} to R = {hi} lowers the loss by "
               + ", ".join(f"{gain[rule]:+.3f} ({rule})" for rule in rules)
               + f"; more than {IMPROVES} nats counts as learning better, which holds for "
               + (", ".join(better) if better else "no rule") + f" — {verdict}.")

    # 2. the mechanism: the size of the update
    size = {rule: _trend(runs, rule, "update_norm", ranks) for rule in rules}
    out.append(f"The update's size, mean ||ΔW||_F, from R = {lo} to R = {hi}: "
               + "; ".join(f"{size[rule][0]:.3g} → {size[rule][-1]:.3g} (×{size[rule][-1] / size[rule][0]:.2g}) "
                           f"under {rule}" for rule in rules) + ".")

    # 3. forgetting
    forget = {(r["rule"], r["rank"]): r["forgetting"] for r in runs}
    most, least = max(forget, key=forget.get), min(forget, key=forget.get)
    distinct = [r for r in runs if not r["same_as"]]  # a run listed under two rules counts once
    rho = _spearman([r["update_norm"] for r in distinct], [r["forgetting"] for r in distinct])
    out.append(f"Forgetting (rise of the associations loss over the base's {metrics['base']['base_loss']:.3f}) "
               f"ranges from {forget[least]:+.3f} ({least[0]}, R = {least[1]}) to {forget[most]:+.3f} "
               f"({most[0]}, R = {most[1]}); across all runs its rank correlation with ||ΔW||_F is "
               f"{rho:+.2f} ({len(distinct)} distinct runs)" + (" — bigger updates forget more." if rho > 0.5 else
                                " — bigger updates forget less." if rho < -0.5 else
                                " — the update's size does not explain it well."))

    # 4. intruders
    total = metrics["setup"]["intruder_max"]
    rho = _spearman([r["update_norm"] for r in distinct], [r["intruders"] for r in distinct])
    out.append(f"Intruder dimensions (of at most {total}) from R = {lo} to R = {hi}: "
               + "; ".join(f"{rule}: " + ", ".join(str(n) for n in _trend(runs, rule, "intruders", ranks))
                           for rule in rules) + f"; their rank correlation with ||ΔW||_F is {rho:+.2f}.")

    # 5. amplification and effective rank
    amp = {rule: _trend(runs, rule, "amplification", ranks) for rule in rules}
    falls = [rule for rule in rules if amp[rule][-1] < amp[rule][0]]
    out.append("The amplification factor (Hu et al. §7.3; they found it far larger at R = 4 than at R = 64) goes "
               + "; ".join(f"{amp[rule][0]:.3g} → {amp[rule][-1]:.3g} under {rule}" for rule in rules)
               + f": it falls with rank under {', '.join(falls) if falls else 'no rule'}"
               + (f" (at R = {hi} = the width the top-R directions fill a whole side of each matrix, so there the "
                  "factor only compares sizes)." if hi == metrics["setup"]["width"] else "."))
    eff = {rule: _trend(runs, rule, "effective_rank", ranks) for rule in rules}
    out.append(f"ΔW uses only part of its rank: at R = {hi} its effective rank is "
               + ", ".join(f"{eff[rule][-1]:.1f} ({rule})" for rule in rules)
               + f"; at R = {mid}, " + ", ".join(f"{eff[rule][ranks.index(mid)]:.1f}" for rule in rules) + ".")
    return out


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


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/02_rank_and_alpha").parse_args(argv)
    started = time.perf_counter()
    s = common.setup(args.quick, args.seed)
    ranks = QUICK_RANKS if args.quick else RANKS
    ft_cfg = s.finetune if args.quick else dataclasses.replace(s.finetune, steps=STEPS, batch_size=BATCH)
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
    metrics = {"setup": {"ranks": list(ranks), "rules": list(RULES), "alpha": ALPHA, "targets": list(TARGETS),
                         "width": model_cfg.width, "steps": ft_cfg.steps, "lr": ft_cfg.lr, "min_lr": ft_cfg.min_lr,
                         "batch_size": ft_cfg.batch_size, "adapted_matrices": n_matrices,
                         "intruder_k": INTRUDER_K, "intruder_epsilon": INTRUDER_EPS,
                         "intruder_max": INTRUDER_K * n_matrices},
               "base": base_losses, "runs": runs}
    metrics["summary"] = summarize(metrics)
    metrics["seconds"] = time.perf_counter() - started

    width = model_cfg.width
    setup_note = (
        f"<p>Base: pretrained on <code>associations</code> ({s.pretrain.steps} steps, width {width}); bindings loss "
        f"{base_losses['finetune_loss']:.3f}, associations loss {base_losses['base_loss']:.3f}. Every run: LoRA on "
        f"<code>all-linear</code> ({n_matrices} matrices, each with min(d_in, d_out) = {width}, so R = {ranks[-1]} "
        f"{'is full rank' if ranks[-1] == width else 'is below full rank'}), {ft_cfg.steps} steps of batch "
        f"{ft_cfg.batch_size}, peak learning rate {ft_cfg.lr:g} with warmup and a cosine decay to {ft_cfg.min_lr:g}, "
        f"seed {args.seed}.</p>")
    twins = [f"{r['rule']} at R = {r['rank']} is {r['same_as']}" for r in runs if r["same_as"]]
    if twins:
        setup_note += (f"<p>The rules coincide where their scales agree ({html.escape('; '.join(twins))}): such "
                       "a run is trained once and listed under both rules.</p>")
    paragraph = "<p>" + " ".join(html.escape(sentence) for sentence in metrics["summary"]) + "</p>"
    loss_title = f"bindings loss (base: {base_losses['finetune_loss']:.2f})"
    intruder_title = f"intruder dimensions (k={INTRUDER_K}, ε={INTRUDER_EPS}, all {n_matrices} matrices)"
    blocks = [("What it shows", paragraph + setup_note),
              ("What it learned and forgot, and how big the update is",
               ("learning", fig_metrics(metrics, [("scale", "scale s of A B", True),
                                                  ("finetune_loss", loss_title, False),
                                                  ("forgetting", "forgetting: rise of associations loss", False),
                                                  ("update_norm", "mean ||ΔW||_F", False)]))),
              ("What the change looks like",
               ("shape", fig_metrics(metrics, [("intruders", intruder_title, False),
                                               ("amplification", "mean amplification factor (top-R of ΔW)", True),
                                               ("effective_rank", "mean effective rank of ΔW", True)]))),
              ("Every run", run_table(metrics))]
    common.publish(args.out, "02 — Rank and alpha: how big an adapter, and how loud?", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
