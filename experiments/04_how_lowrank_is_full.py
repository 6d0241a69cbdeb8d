"""04 — How low-rank is full fine-tuning?

Pretrain a tiny GPT on `associations`, fine-tune it fully on `bindings`, and ask how much of what full
fine-tuning achieved survives when every block matrix's change ΔW = W − W0 is cut to its best rank k
(W0 + [ΔW]_k, with [ΔW]_k the top k singular triplets of ΔW: Eckart & Young 1936). Beside each k, LoRA
on every block matrix at rank k (Hu et al. 2021, arXiv 2106.09685), trained for the same number of
steps: the best rank-k approximation of the change full fine-tuning found, against the rank-k change
that training finds by itself.

Over seeds (minilm/analysis/seeds.py): the whole pipeline (corpus, base, fine-tunes, batches) runs once per
seed, all in one process; each claim is "true" or "false" only when the Student-t test over seeds,
Holm-corrected over all the report's findings, decides it against the threshold in its text, otherwise
"not settled by N seeds". The figures and tables show the first seed.

    python experiments/04_how_lowrank_is_full.py                # 3 seeds
    python experiments/04_how_lowrank_is_full.py --seeds 3,7,11 # those seeds
    python experiments/04_how_lowrank_is_full.py --quick        # seconds: the pipeline end to end, 2 seeds
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`, next to this file

import common  # noqa: E402

import lora  # noqa: E402
from minilm import report  # noqa: E402
from minilm.analysis import seeds, weights  # noqa: E402
from minilm.config import LORA_LR  # noqa: E402
from minilm.tree import fill, named_leaves  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 32, 64)   # capped at the full rank of the block matrices (the width D)
QUICK_LORA_RANKS = (1, 8)          # --quick trains LoRA at two ranks only: each rank is a new compilation
RECOVERY = 0.9                     # "recovers" = at least this share of full fine-tuning's loss improvement
LOW_RANK = 0.25                    # a median rank share below this is "low-rank" (as in experiment 01)
SHRINKS = -0.1                     # a median cos(ΔW, W0) below this "points back along W0"
MATRIX_TYPES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj")


# ---------------------------------------------------------------- the truncated models


def block_matrices(params) -> dict[str, np.ndarray]:
    """{'blocks.0.attn.q.w': (d_in, d_out) float64, ...}: the 2-D leaves of the transformer blocks."""
    return {n: np.asarray(x, np.float64) for n, x in named_leaves(params).items()
            if n.startswith("blocks.") and x.ndim == 2}


def truncated(base, tuned, svds: dict, k: int, rest: str):
    """Every block matrix W0 + [ΔW]_k; every other leaf from `tuned` (rest="tuned") or `base` (rest="base").

    svds: {name: (u (d_in, N), s (N,), vt (N, d_out))} of each ΔW, computed once for all k.
    """
    named = dict(named_leaves(tuned if rest == "tuned" else base))
    w0 = named_leaves(base)
    for name, (u, s, vt) in svds.items():
        delta_k = (u[:, :k] * s[:k]) @ vt[:k]                                  # (d_in, k)(k, d_out)
        named[name] = np.asarray(np.asarray(w0[name], np.float64) + delta_k, np.float32)
    return fill(base, named, "truncated model")


def recovery(loss: float, base_loss: float, full_loss: float) -> float:
    """Share of full fine-tuning's improvement (base_loss − full_loss) that a model with `loss` achieves."""
    return (base_loss - loss) / (base_loss - full_loss)


def first_recovering(ranks, losses, base_loss, full_loss):
    """The smallest k from which on (every larger k too) the model recovers at least RECOVERY, or None."""
    found = None
    for k, loss in zip(reversed(ranks), reversed(losses)):
        if recovery(loss, base_loss, full_loss) < RECOVERY:
            break
        found = k
    return found


def matrix_stats(w0: np.ndarray, w: np.ndarray) -> dict:
    delta = w - w0
    s = weights.singular_values(delta)
    return {"shape": list(w0.shape), "relative": weights.change_stats(w0, w)["relative"],
            "energy_rank_90": weights.energy_rank(s), "effective_rank": weights.effective_rank(s),
            "cos_with_w0": float(np.sum(delta * w0) / max(np.linalg.norm(delta) * np.linalg.norm(w0), 1e-300)),
            "capture": weights.lowrank_capture(delta).tolist()}


# ---------------------------------------------------------------- one seed's numbers, and the claims


def measure(m: dict) -> dict[str, dict[str, float]]:
    """One seed's numbers that the claims read, {measurement: {label: value}}; nothing else is kept."""
    L, ranks, lora_ranks, full_rank = m["losses"], m["ranks"], m["lora_ranks"], m["full_rank"]
    quarter, last = full_rank // 4, lora_ranks[-1]

    def rec(kind, k):
        return recovery(L[kind][(lora_ranks if kind == "lora" else ranks).index(k)], L["base"], L["full"])

    matrices = m["matrices"].values()
    return {"rank_share": {"90%-energy rank": float(np.median([r["energy_rank_90"] for r in matrices])) / full_rank,
                           "effective rank": float(np.median([r["effective_rank"] for r in matrices])) / full_rank},
            "recovery": {"rest fine-tuned, k = D/4": rec("rest_tuned", quarter),
                         "rest as base, k = D/4": rec("rest_base", quarter), "LoRA, largest k": rec("lora", last)},
            "lora_minus_truncated": {"largest k": rec("lora", last) - rec("rest_base", last)},
            "cos_with_w0": {"median": float(np.median([r["cos_with_w0"] for r in matrices]))},
            "improvement": {"full": L["base"] - L["full"]}}


# Each claim reads {measurement: {label: [one value per seed]}} and names the findings it rests on, each against
# a threshold fixed in its text; `judge` settles all findings of the report together (Holm).


def claim_low_rank(m):
    return {"claim": f"Full fine-tuning's change is low-rank: the median over block matrices of ΔW's rank, as a share "
                     f"of full rank D, is below {LOW_RANK:.0%}, by 90% energy and by effective rank (Roy & Vetterli).",
            "findings": [seeds.finding(label, m["rank_share"][label], LOW_RANK, above=False)
                         for label in ("90%-energy rank", "effective rank")],
            "note": "The two measures can disagree: energy rank counts the directions that hold 90% of ||ΔW||², "
                    "effective rank the entropy of the whole spectrum, tail included."}


def claim_truncation(m):
    return {"claim": f"Cutting every block matrix's change to its best rank k = D/4 recovers at least {RECOVERY:.0%} "
                     "of full fine-tuning's loss improvement, with the other parameters as fine-tuned and as in the "
                     "base.",
            "findings": [seeds.finding(label, m["recovery"][label], RECOVERY)
                         for label in ("rest fine-tuned, k = D/4", "rest as base, k = D/4")],
            "note": "Full fine-tuning lowered the bindings loss by "
                    f"{np.mean(m['improvement']['full']):.3f} nats (mean over seeds): the recovered share divides "
                    "by it."}


def claim_lora(m):
    return {"claim": f"LoRA at the largest rank k tested, trained for the same steps, recovers at least {RECOVERY:.0%} "
                     "of the improvement, and more than the truncation to rank k that changes the same matrices "
                     "(rest as base): recovered share, LoRA minus truncation > 0.",
            "findings": [seeds.finding("LoRA, largest k", m["recovery"]["LoRA, largest k"], RECOVERY),
                         seeds.finding("LoRA minus truncation, largest k", m["lora_minus_truncated"]["largest k"],
                                       0.0)],
            "note": f"LoRA trains at lr {LORA_LR:g}, full fine-tuning at its own; neither was tuned here."}


def claim_weight_decay(m):
    return {"claim": f"Part of each change points back along W0 (AdamW's weight decay shrinks every matrix): median "
                     f"cos(ΔW, W0) over the block matrices < {SHRINKS}.",
            "findings": [seeds.finding("median", m["cos_with_w0"]["median"], SHRINKS, above=False)], "note": ""}


CLAIMS = (claim_low_rank, claim_truncation, claim_lora, claim_weight_decay)


def judge(per_seed: dict) -> list[dict]:
    """Every claim's verdict from per-seed numbers, Holm-corrected over all of the report's findings."""
    return seeds.judge([c(per_seed) for c in CLAIMS])


# ---------------------------------------------------------------- figures


def fig_capture(m: dict) -> Figure:
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    styles = ("-", "--", ":", "-.")
    for name, r in m["matrices"].items():
        layer, kind = int(name.split(".")[1]), ".".join(name.split(".")[2:4])
        capture = r["capture"]
        ax.plot(np.arange(1, len(capture) + 1), capture, styles[layer % len(styles)],
                color=report.PALETTE[MATRIX_TYPES.index(kind)], lw=1.2,
                label=kind if layer == 0 else None)
    for name, r in m["embeddings"].items():
        ax.plot(np.arange(1, len(r["capture"]) + 1), r["capture"], color="grey", lw=0.8, alpha=0.7,
                ls=(0, (1, 1)) if name.endswith("pos") else "-", label=f"{name} (not truncated)")
    ax.axhline(RECOVERY, color="black", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("share of ||ΔW||² in the best rank-k part")
    ax.set_ylim(0, 1.02)
    ax.set_title("full fine-tuning: how much of each ΔW a rank-k matrix holds (line style = layer)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def fig_loss(m: dict) -> Figure:
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    L = m["losses"]
    ax.plot(m["ranks"], L["rest_tuned"], "o-", color=report.PALETTE[0],
            label="full, ΔW truncated to rank k (rest fine-tuned)")
    ax.plot(m["ranks"], L["rest_base"], "o--", color=report.PALETTE[0], alpha=0.6,
            label="full, ΔW truncated to rank k (rest as base)")
    ax.plot(m["lora_ranks"], L["lora"], "s-", color=report.PALETTE[1], label="LoRA all-linear, rank k")
    ax.axhline(L["full"], color="black", lw=1, label=f"full fine-tuning ({L['full']:.3f})")
    ax.axhline(L["base"], color="grey", lw=1, ls=":", label=f"base ({L['base']:.3f})")
    ax.axhline(L["base"] - RECOVERY * (L["base"] - L["full"]), color="black", lw=0.5, ls="--",
               label=f"{100 * RECOVERY:.0f}% of the improvement")
    ax.set_xscale("log", base=2)
    ax.set_xticks(m["ranks"], [str(k) for k in m["ranks"]])
    ax.set_xlabel("rank k")
    ax.set_ylabel("held-out loss on bindings (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the experiment


def run_seed(seed: int, quick: bool) -> dict:
    """One seed's pipeline: its base, full fine-tuning, the truncated models and LoRA at each rank."""
    s = common.setup(quick, seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    full = common.finetune("full", base, ft_data, model_cfg, s.finetune)

    w0s, ws = block_matrices(base), block_matrices(full.params)
    full_rank = min(min(w.shape) for w in w0s.values())
    ranks = [k for k in RANKS if k <= full_rank]
    svds = {n: np.linalg.svd(ws[n] - w0s[n], full_matrices=False) for n in w0s}  # once for every k

    def loss(params):
        return common.eval_loss(params, ft_data, model_cfg)

    losses = {"base": loss(base), "full": loss(full.params), "rest_tuned": [], "rest_base": [], "lora": []}
    for k in tqdm(ranks, desc="truncated models", leave=False):
        for rest in ("tuned", "base"):
            losses[f"rest_{rest}"].append(loss(truncated(base, full.params, svds, k, rest)))
    lora_ranks = [k for k in (QUICK_LORA_RANKS if quick else ranks) if k <= full_rank]
    trainable = []
    for k in lora_ranks:
        cfg = lora.LoraConfig(rank=k, alpha=2 * k, targets=("all-linear",))  # scale alpha / R = 2 at every rank
        tuned = common.finetune(f"lora-r{k}", base, ft_data, model_cfg,
                                dataclasses.replace(s.finetune, lr=LORA_LR), cfg)
        losses["lora"].append(loss(tuned.params))
        trainable.append(tuned.trainable)

    embeddings = {n: {"shape": list(np.shape(x)),
                      "capture": weights.lowrank_capture(np.asarray(named_leaves(full.params)[n], np.float64)
                                                         - np.asarray(x, np.float64)).tolist()}
                  for n, x in named_leaves(base).items() if n.startswith("embed.")}
    return {"seed": seed, "ranks": ranks, "lora_ranks": lora_ranks, "full_rank": full_rank,
            "steps": s.finetune.steps, "pretrain_steps": s.pretrain.steps,
            "lr": {"full": s.finetune.lr, "lora": LORA_LR},
            "losses": losses, "trainable": {"full": full.trainable, "lora": trainable},
            "matrices": {n: matrix_stats(w0s[n], ws[n]) for n in w0s}, "embeddings": embeddings}


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/04_how_lowrank_is_full", seeds=3).parse_args(argv)
    started = time.perf_counter()
    seed_list = common.seed_list(args)
    per_seed_metrics = common.over_seeds(run_seed, seed_list, args.quick, workers=args.workers)
    shown = per_seed_metrics[0]  # the figures and tables show the first seed in detail
    per_seed = common.stack([measure(one) for one in per_seed_metrics])
    claims = judge(per_seed)
    metrics = {**shown, "seeds": seed_list, "shown_seed": seed_list[0], "per_seed": per_seed, "claims": claims,
               "verdicts": common.verdicts_record(claims), "summary": common.verdict_lines(claims, seed_list)}
    metrics["seconds"] = time.perf_counter() - started
    ranks, lora_ranks, losses = shown["ranks"], shown["lora_ranks"], shown["losses"]
    trainable = shown["trainable"]["lora"]

    base_loss, full_loss = losses["base"], losses["full"]
    pct = lambda x: f"{100 * recovery(x, base_loss, full_loss):.0f}%"  # noqa: E731
    rows = [(k, common.fmt(losses["rest_tuned"][i], 4), pct(losses["rest_tuned"][i]),
             common.fmt(losses["rest_base"][i], 4), pct(losses["rest_base"][i]),
             *((common.fmt(losses["lora"][lora_ranks.index(k)], 4), pct(losses["lora"][lora_ranks.index(k)]),
                trainable[lora_ranks.index(k)]) if k in lora_ranks else ("—", "—", "—")))
            for i, k in enumerate(ranks)]
    matrix_rows = [(n, "x".join(map(str, r["shape"])), common.fmt(r["relative"]), r["energy_rank_90"],
                    common.fmt(r["effective_rank"]), f"{r['cos_with_w0']:+.3f}")
                   for n, r in metrics["matrices"].items()]
    first = f" (seed {seed_list[0]})"
    method = (f"<p>Base: {shown['pretrain_steps']} steps on <code>associations</code>. Full fine-tuning: "
              f"{shown['steps']} steps on <code>bindings</code> at lr {shown['lr']['full']:g} "
              f"({shown['trainable']['full']} parameters). LoRA: every block matrix (all-linear), alpha = 2k, the "
              f"same steps at lr {LORA_LR:g}. Losses: the mean over the same 16 held-out batches of bindings for every "
              "model. D, the full rank of the block matrices, is the width "
              f"({shown['full_rank']}).</p>"
              "<p>Two truncated models per k. <b>Rest fine-tuned</b> (the answer to the question): every block "
              "matrix is W0 + [ΔW]_k and every other parameter (embeddings, biases, LayerNorms) is as full "
              "fine-tuning left it, so all it drops is the part of each block matrix's change beyond rank k; "
              f"at k = {shown['full_rank']} it is the fully fine-tuned model itself. <b>Rest as base</b> (the "
              "comparison with LoRA): the same matrices, everything else as in the base. LoRA on all-linear changes "
              "exactly these matrices and nothing else, so this pair compares two rank-k changes of the same "
              "matrices: the best approximation (in Frobenius norm) of what full fine-tuning found, and what a "
              "rank-k adapter finds when it is trained for the loss itself.</p>")
    blocks = [*common.claims_blocks(claims, seed_list),
              ("How it was measured", method),
              ("How much of each change a rank-k matrix holds" + first, ("capture", fig_capture(metrics))),
              ("Fine-tuning loss against rank" + first, ("loss_vs_rank", fig_loss(metrics))),
              ("Losses and recovered share of the improvement" + first,
               common.table(["k", "truncated (rest fine-tuned)", "recovered", "truncated (rest as base)", "recovered",
                             "LoRA rank k", "recovered", "LoRA trainable"], rows)),
              ("Each block matrix's change (full fine-tuning)" + first,
               common.table(["matrix", "shape", "||ΔW|| / ||W0||", "90%-energy rank", "effective rank",
                             "cos(ΔW, W0)"], matrix_rows))]
    common.publish(args.out, "04 — How low-rank is full fine-tuning?", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
