"""04 — How low-rank is full fine-tuning?

Pretrain a tiny GPT on `associations`, fine-tune it fully on `bindings`, and ask how much of what full
fine-tuning achieved survives when every block matrix's change ΔW = W − W0 is cut to its best rank k
(W0 + [ΔW]_k, with [ΔW]_k the top k singular triplets of ΔW: Eckart & Young 1936). Beside each k, LoRA
on every block matrix at rank k (Hu et al. 2021, arXiv 2106.09685), trained for the same number of
steps: the best rank-k approximation of the change full fine-tuning found, against the rank-k change
that training finds by itself. Every sentence of the summary is computed from metrics.json.

    python experiments/04_how_lowrank_is_full.py            # ~2–3 minutes on 2 CPU cores
    python experiments/04_how_lowrank_is_full.py --quick    # seconds: the pipeline end to end
"""

from __future__ import annotations

import dataclasses
import html
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
from minilm.analysis import weights  # noqa: E402
from minilm.config import LORA_LR  # noqa: E402
from minilm.tree import fill, named_leaves  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 32, 64)   # capped at the full rank of the block matrices (the width D)
QUICK_LORA_RANKS = (1, 8)          # --quick trains LoRA at two ranks only: each rank is a new compilation
RECOVERY = 0.9                     # "recovers" = at least this share of full fine-tuning's loss improvement
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


# ---------------------------------------------------------------- the summary, from metrics alone


def summary(m: dict) -> list[str]:
    """The report's paragraph as sentences, computed from metrics.json and nothing else."""
    ranks, lora_ranks, L = m["ranks"], m["lora_ranks"], m["losses"]
    base, full = L["base"], L["full"]
    full_rank = m["full_rank"]
    rec = {kind: [recovery(x, base, full) for x in L[kind]] for kind in ("rest_tuned", "rest_base", "lora")}

    def at(kind, k):
        return rec[kind][(lora_ranks if kind == "lora" else ranks).index(k)]

    def reach(kind):
        k = first_recovering(lora_ranks if kind == "lora" else ranks, L[kind], base, full)
        if k is not None:
            return f"from k = {k} (of {full_rank}) on, at {100 * at(kind, k):.0f}%"
        best = int(np.argmax(rec[kind]))
        best_k = (lora_ranks if kind == "lora" else ranks)[best]
        return f"at no k tested (at best {100 * rec[kind][best]:.1f}%, at k = {best_k})"

    out = [(f"Full fine-tuning lowered the bindings loss from {base:.3f} (base) to {full:.3f}; "
            f"'recovering' means reaching at least {100 * RECOVERY:.0f}% of that improvement.")]
    ranks_90 = [r["energy_rank_90"] for r in m["matrices"].values()]
    share = float(np.median(ranks_90)) / full_rank
    out.append(f"By energy its changes to the {len(ranks_90)} block matrices are "
               f"{'low-rank' if share < 0.25 else 'not low-rank'}: 90% of ||ΔW||² needs a median rank of "
               f"{np.median(ranks_90):g} of {full_rank} ({100 * share:.0f}%; range {min(ranks_90)}–{max(ranks_90)}; "
               f"'low-rank' means under 25%).")
    out.append(f"Cutting every block-matrix change to its best rank k while keeping every other parameter as "
               f"fully fine-tuned recovers the improvement {reach('rest_tuned')}; at k = {ranks[0]} it recovers "
               f"{100 * at('rest_tuned', ranks[0]):.0f}%.")
    out.append(f"With the other parameters (embeddings, biases, LayerNorms) left at their base values, the same "
               f"truncation recovers it {reach('rest_base')}; the block-matrix changes alone, at full rank "
               f"k = {ranks[-1]}, reach {100 * at('rest_base', ranks[-1]):.0f}%.")
    shared = [k for k in lora_ranks if k in ranks]
    better = [k for k in shared if L["lora"][lora_ranks.index(k)] < L["rest_base"][ranks.index(k)]]
    worse = [k for k in shared if k not in better]
    listed = lambda ks: ", ".join(map(str, ks))  # noqa: E731
    verdict = (f"better at every k ({listed(better)})" if not worse else
               f"worse at every k ({listed(worse)})" if not better else
               f"better at k = {listed(better)} and worse at k = {listed(worse)}")
    last = lora_ranks[-1]
    out.append(f"LoRA on all linear layers, trained for the same {m['steps']} steps, recovers it {reach('lora')}. "
               f"Against the truncation that changes exactly the same matrices (rest as base) it does {verdict}; "
               f"at k = {last}: LoRA {100 * at('lora', last):.1f}%, truncated {100 * at('rest_base', last):.1f}% "
               f"(rest fine-tuned: {100 * at('rest_tuned', last):.1f}%).")
    cos = float(np.median([r["cos_with_w0"] for r in m["matrices"].values()]))
    out.append(f"Median cos(ΔW, W0) over the block matrices is {cos:+.2f}"
               + (": part of each change points back along W0 (AdamW's weight decay shrinks every matrix), and that "
                  "part has W0's own, high-rank spectrum." if cos < -0.1 else
                  ": the changes are not dominated by a shrinking of W0 (weight decay)."))
    return out


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


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/04_how_lowrank_is_full").parse_args(argv)
    started = time.perf_counter()
    s = common.setup(args.quick, args.seed)
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
    lora_ranks = [k for k in (QUICK_LORA_RANKS if args.quick else ranks) if k <= full_rank]
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
    metrics = {"ranks": ranks, "lora_ranks": lora_ranks, "full_rank": full_rank, "steps": s.finetune.steps,
               "lr": {"full": s.finetune.lr, "lora": LORA_LR}, "losses": losses,
               "trainable": {"full": full.trainable, "lora": trainable},
               "matrices": {n: matrix_stats(w0s[n], ws[n]) for n in w0s}, "embeddings": embeddings}
    metrics["summary"] = summary(metrics)
    metrics["seconds"] = time.perf_counter() - started

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
    method = (f"<p>Base: {s.pretrain.steps} steps on <code>associations</code>. Full fine-tuning: "
              f"{s.finetune.steps} steps on <code>bindings</code> at lr {s.finetune.lr:g} ({full.trainable} "
              f"parameters). LoRA: every block matrix (all-linear), alpha = 2k, the same steps at lr {LORA_LR:g}. "
              f"Losses: the mean over the same 16 held-out batches of bindings for every model.</p>"
              "<p>Two truncated models per k. <b>Rest fine-tuned</b> (the answer to the question): every block "
              "matrix is W0 + [ΔW]_k and every other parameter (embeddings, biases, LayerNorms) is as full "
              "fine-tuning left it, so all it drops is the part of each block matrix's change beyond rank k; "
              f"at k = {full_rank} it is the fully fine-tuned model itself. <b>Rest as base</b> (the comparison "
              "with LoRA): the same matrices, everything else as in the base. LoRA on all-linear changes exactly "
              "these matrices and nothing else, so this pair compares two rank-k changes of the same matrices: "
              "the best approximation (in Frobenius norm) of what full fine-tuning found, and what a rank-k "
              "adapter finds when it is trained for the loss itself.</p>")
    blocks = [("Summary", "<p>" + " ".join(html.escape(x) for x in metrics["summary"]) + "</p>"),
              ("How it was measured", method),
              ("How much of each change a rank-k matrix holds", ("capture", fig_capture(metrics))),
              ("Fine-tuning loss against rank", ("loss_vs_rank", fig_loss(metrics))),
              ("Losses and recovered share of the improvement",
               common.table(["k", "truncated (rest fine-tuned)", "recovered", "truncated (rest as base)", "recovered",
                             "LoRA rank k", "recovered", "LoRA trainable"], rows)),
              ("Each block matrix's change (full fine-tuning)",
               common.table(["matrix", "shape", "||ΔW|| / ||W0||", "90%-energy rank", "effective rank",
                             "cos(ΔW, W0)"], matrix_rows))]
    common.publish(args.out, "04 — How low-rank is full fine-tuning?", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
