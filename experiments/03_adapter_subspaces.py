"""03 — Do two LoRA adapters learn the same directions?

Hu et al. 2021 (LoRA, §7.2, Figs. 3–4) trained adapters of rank 8 and 64 on Wq and Wv of GPT-3 and
compared the subspaces their A matrices span. With U_i the top-i left singular vectors of one adapter's A
(d_in, R) and U_j the top-j of another's,

    φ(i, j) = ||U_iᵀ U_j||_F² / min(i, j)   in [0, 1]: 1 when the smaller subspace lies inside the larger.

They found that the *top* direction is shared strongly (φ(1, 1) > 0.5) across ranks and across random
seeds, while the rest is mostly noise: the update's important part is low-rank and found every time.
Two independent random subspaces give E φ(i, j) = max(i, j) / d, so only φ well above that means anything.

Here: pretrain a tiny GPT on `associations`, fine-tune LoRA on attn.q and attn.v (as Hu et al. did) on
`bindings` at rank 4 and 16 (both well below the width, 64) with one seed, and at rank 16 with a second
seed (which changes A's random start and the order of the batches, not the base). Compare

    rank 4 vs rank 16, same seed      does a bigger adapter find the small one's directions?
    rank 16, seed 0 vs seed 1         does the same adapter find the same directions twice?

in three lenses: the trained A (Hu et al.'s), the top-R input directions of ΔW = s·A B (what the
adapter actually uses: B weighs A's directions), and, as a control, the two A's at initialisation.
Every summary sentence is computed from the numbers in metrics.json.

    python experiments/03_adapter_subspaces.py            # ~1–2 minutes on 2 CPU cores
    python experiments/03_adapter_subspaces.py --quick    # seconds: the pipeline end to end
"""

from __future__ import annotations

import dataclasses
import html
import sys
import time
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`, next to this file

import common

import lora
from minilm.analysis import weights
from minilm.config import LORA_LR

TARGETS = ("attn.q", "attn.v")
TOP = 4                  # the summary's "top directions": φ(i, j) for i, j <= 4
STRONG = 0.5             # φ at or above this is a strong overlap (Hu et al.'s top direction: > 0.5)
ABOVE_CHANCE = 3.0       # ... at or above this many times the random baseline is "above chance"
LENSES = {"A": "trained A", "delta": "top-R input directions of ΔW", "init": "A at initialisation (control)"}


def runs(quick: bool, seed: int) -> list[tuple[str, int, int]]:
    """(name, rank, fine-tuning seed). alpha = 2R below, so both ranks train at the same scale s = 2."""
    small, large = (2, 8) if quick else (4, 16)
    return [(f"r{small}-seed{seed}", small, seed), (f"r{large}-seed{seed}", large, seed),
            (f"r{large}-seed{seed + 1}", large, seed + 1)]


def pairs(names: list[str]) -> dict[str, str]:
    """{pair: what it tests}, pairs named 'first vs second'."""
    return {f"{names[0]} vs {names[1]}": "same seed, different rank",
            f"{names[1]} vs {names[2]}": "same rank, different seed"}


def lora_config(rank: int) -> lora.LoraConfig:
    return lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)


def initial_adapters(base: dict, cfg: lora.LoraConfig, train_cfg) -> dict:
    """{matrix: A at step 0}: the attach common.finetune does, with the key it uses (seed + 2)."""
    adapted = lora.attach(base, cfg, key=jax.random.key(train_cfg.seed + 2))
    return {n: np.asarray(w.lora_a) for n, w in lora.lora_weights(adapted).items()}


def directions(tuned: common.Tuned, initial: dict) -> dict:
    """{lens: {matrix: orthonormal (d_in, R) basis, strongest first}} for one adapter."""
    out = {"A": {}, "delta": {}, "init": {}}
    for name, w in lora.lora_weights(tuned.adapted).items():
        a, b = np.asarray(w.lora_a, np.float64), np.asarray(w.lora_b, np.float64)
        out["A"][name] = weights.adapter_directions(a)
        out["delta"][name] = np.linalg.svd(w.scale * a @ b, full_matrices=False)[0][:, :w.rank]  # (d_in, R)
        out["init"][name] = weights.adapter_directions(initial[name])
    return out


def compare_pair(d1: dict, d2: dict) -> dict:
    """{matrix: {lens: φ grid (n1, n2), "baseline": the random baseline grid}} for two adapters."""
    out = {}
    for name in d1["A"]:
        d, n1, n2 = d1["A"][name].shape[0], d1["A"][name].shape[1], d2["A"][name].shape[1]
        out[name] = {lens: weights.subspace_similarity(d1[lens][name], d2[lens][name]).tolist() for lens in LENSES}
        out[name]["baseline"] = [[weights.random_subspace_baseline(i, j, d) for j in range(1, n2 + 1)]
                                 for i in range(1, n1 + 1)]
    return out


def pair_summary(matrices: dict) -> dict:
    """Per lens (and the baseline), means over matrices of φ(1, 1) and of φ(i, j) over i, j <= k = min(TOP, R)."""
    out = {}
    for lens in [*LENSES, "baseline"]:
        grids = [np.asarray(m[lens]) for m in matrices.values()]
        k = min(TOP, *(g.shape[0] for g in grids), *(g.shape[1] for g in grids))
        out[lens] = {"top1": float(np.mean([g[0, 0] for g in grids])),
                     "top_k": float(np.mean([g[:k, :k].mean() for g in grids])), "k": k}
    return out


# ---------------------------------------------------------------- what it shows


def _level(phi: float, baseline: float) -> str:
    if phi >= STRONG:
        return "strong"
    return "above chance" if phi >= ABOVE_CHANCE * baseline else "at chance"


def summarize(metrics: dict) -> list[str]:
    """The summary sentences, computed from metrics["pairs"] and metrics["runs"] and nothing else."""
    out = []
    levels = {}
    for pair, result in metrics["pairs"].items():
        s = pair_summary(result["matrices"])
        base = s["baseline"]
        k = base["k"]
        parts = []
        for lens in ("A", "delta"):
            levels[(pair, lens)] = _level(s[lens]["top1"], base["top1"])
            parts.append(f"{LENSES[lens]}: φ(1,1) = {s[lens]['top1']:.3f} ({s[lens]['top1'] / base['top1']:.1f}× "
                         f"random, {levels[(pair, lens)]}), mean φ(i,j≤{k}) = {s[lens]['top_k']:.3f} "
                         f"({s[lens]['top_k'] / base['top_k']:.1f}× random)")
        out.append(f"{pair} ({result['kind']}), mean over the {len(result['matrices'])} adapted matrices — "
                   + "; ".join(parts) + f". Random subspaces: φ(1,1) = {base['top1']:.3f}, mean φ(i,j≤{k}) = "
                   f"{base['top_k']:.3f}; the two A's at initialisation: φ(1,1) = {s['init']['top1']:.3f}, "
                   f"mean φ(i,j≤{k}) = {s['init']['top_k']:.3f}.")
    moved = {name: r["a_moved"] for name, r in metrics["runs"].items()}
    out.append("Training moved each A by " + ", ".join(f"{100 * v:.0f}% ({n})" for n, v in moved.items())
               + " of its initial norm (mean over matrices), so what the trained A's share is "
               + ("mostly learned, not inherited from their random starts." if min(moved.values()) >= 0.5 else
                  "partly still their random starts: the ΔW lens, which weighs A's directions by B, is the "
                  "cleaner measure of what was learned."))
    strong = [p for p in metrics["pairs"] if levels[(p, "A")] == "strong"]
    strong_delta = [p for p in metrics["pairs"] if levels[(p, "delta")] == "strong"]
    everywhere = len(strong) == len(metrics["pairs"])
    out.append(f"Hu et al. found the top direction shared strongly (φ(1,1) > {STRONG}) across ranks and across "
               "seeds. Ours, in their lens (A): " + ("yes, for both pairs" if everywhere else
                                                      f"only for {', '.join(strong)}" if strong else "no")
               + "; in the ΔW lens: " + ("yes, for both pairs" if len(strong_delta) == len(metrics["pairs"]) else
                                         f"only for {', '.join(strong_delta)}" if strong_delta else "no") + ".")
    seeds = next((p for p, r in metrics["pairs"].items() if r["kind"] == "same rank, different seed"), None)
    if seeds is not None:
        by_kind = {}
        for name, m in metrics["pairs"][seeds]["matrices"].items():
            grid = np.asarray(m["A"])
            k = pair_summary(metrics["pairs"][seeds]["matrices"])["A"]["k"]
            by_kind.setdefault(name.split(".")[-2], []).append(float(grid[:k, :k].mean()))
        out.append(f"Across seeds, per kind of matrix (mean φ(i,j≤{k}) of A): " + ", ".join(
            f"W{kind}: {np.mean(v):.3f}" for kind, v in sorted(by_kind.items()))
            + " (Hu et al. found more shared directions for Wq than for Wv).")
    return out


# ---------------------------------------------------------------- figures


def fig_pair(pair: str, result: dict) -> Figure:
    """Rows: the trained A's and ΔW's directions; columns: each matrix, then the random baseline."""
    names = list(result["matrices"])
    first, second = pair.split(" vs ")
    fig = Figure(figsize=(2.8 * (len(names) + 1) + 1, 5.6), layout="constrained")
    axes = fig.subplots(2, len(names) + 1, squeeze=False)
    for row, lens in enumerate(("A", "delta")):
        for col, name in enumerate([*names, None]):
            grid = np.asarray(result["matrices"][names[0]]["baseline"] if name is None
                              else result["matrices"][name][lens])
            n1, n2 = grid.shape
            ax = axes[row, col]
            image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="upper",
                              extent=(0.5, n2 + 0.5, n1 + 0.5, 0.5))  # cell (i, j) centred on integers
            ax.set_xticks(range(1, n2 + 1, max(1, n2 // 4)))
            ax.set_yticks(range(1, n1 + 1, max(1, n1 // 4)))
            ax.tick_params(labelsize=7)
            ax.set_title("random: max(i, j) / d" if name is None else
                         f"{name.removesuffix('.w')}: {'A' if lens == 'A' else 'ΔW'}", fontsize=8)
            if row == 1:
                ax.set_xlabel(f"j ({second})", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{LENSES[lens]}\ni ({first})", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="φ(i, j)")
    fig.suptitle(f"{pair}: φ(i, j) = ||U_iᵀ U_j||² / min(i, j); top row: trained A, bottom row: ΔW", fontsize=9)
    return fig


def pair_table(result: dict) -> str:
    rows, k = [], result["summary"]["A"]["k"]
    for name, m in result["matrices"].items():
        cells = [f"{np.asarray(m[lens])[0, 0]:.3f} / {np.asarray(m[lens])[:k, :k].mean():.3f}"
                 for lens in [*LENSES, "baseline"]]
        rows.append((name, *cells))
    return common.table(["matrix", *(f"{label}: φ(1,1) / mean φ(i,j≤{k})" for label in LENSES.values()),
                         "random"], rows)


# ---------------------------------------------------------------- the experiment


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/03_adapter_subspaces").parse_args(argv)
    started = time.perf_counter()
    s = common.setup(args.quick, args.seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)

    found, run_metrics = {}, {}
    for name, rank, seed in runs(args.quick, args.seed):
        cfg, train_cfg = lora_config(rank), dataclasses.replace(s.finetune, lr=LORA_LR, seed=seed)
        tuned = common.finetune(name, base, ft_data, model_cfg, train_cfg, cfg)
        initial = initial_adapters(base, cfg, train_cfg)
        found[name] = directions(tuned, initial)
        moved = [np.linalg.norm(np.asarray(w.lora_a) - initial[n]) / np.linalg.norm(initial[n])
                 for n, w in lora.lora_weights(tuned.adapted).items()]
        run_metrics[name] = {"rank": rank, "seed": seed, "alpha": cfg.alpha, "trainable": tuned.trainable,
                             "finetune_loss": common.eval_loss(tuned.params, ft_data, model_cfg),
                             "a_moved": float(np.mean(moved))}
    results = {}
    for pair, kind in pairs(list(found)).items():
        first, second = pair.split(" vs ")
        matrices = compare_pair(found[first], found[second])
        results[pair] = {"kind": kind, "matrices": matrices, "summary": pair_summary(matrices)}

    metrics = {"setup": {"targets": list(TARGETS), "width": model_cfg.width, "steps": s.finetune.steps,
                         "lr": LORA_LR, "top": TOP, "strong": STRONG, "above_chance": ABOVE_CHANCE},
               "base_finetune_loss": common.eval_loss(base, ft_data, model_cfg),
               "runs": run_metrics, "pairs": results}
    metrics["summary"] = summarize(metrics)
    metrics["seconds"] = time.perf_counter() - started

    note = (f"<p>LoRA on <code>attn.q</code> and <code>attn.v</code> of both blocks, alpha = 2R (scale 2 at every "
            f"rank), {s.finetune.steps} steps of batch {s.finetune.batch_size} at learning rate {LORA_LR:g}, on a base "
            f"pretrained for {s.pretrain.steps} steps (width d = {model_cfg.width}). A verdict is 'strong' at "
            f"φ ≥ {STRONG} and 'above chance' at ≥ {ABOVE_CHANCE:g}× the random baseline.</p>")
    runs_table = common.table(["adapter", "rank", "seed", "trainable", "bindings loss",
                               "A moved (‖A−A0‖/‖A0‖)"],
                              [(n, r["rank"], r["seed"], r["trainable"], common.fmt(r["finetune_loss"]),
                                common.fmt(r["a_moved"])) for n, r in run_metrics.items()])
    blocks = [("What it shows", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in metrics["summary"])
               + "</ul>" + note + runs_table)]
    for i, (pair, result) in enumerate(results.items()):
        blocks.append((f"{pair} ({result['kind']})", (f"pair{i + 1}", fig_pair(pair, result))))
        blocks.append((None, pair_table(result)))
    common.publish(args.out, "03 — Do two adapters learn the same directions?", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
