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
Over seeds (minilm/analysis/seeds.py): the whole pipeline (corpus, base, adapters, batches) runs once per
seed, all in one process; each claim is "true" or "false" only when the Student-t test over seeds,
Holm-corrected over all the report's findings, decides it against the threshold in its text, otherwise
"not settled by N seeds". The figures and tables show the first seed.

    python experiments/03_adapter_subspaces.py                # 3 seeds
    python experiments/03_adapter_subspaces.py --seeds 3,7,11 # those seeds
    python experiments/03_adapter_subspaces.py --quick        # seconds: the pipeline end to end, 2 seeds
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`, next to this file

import common

import lora
from minilm.analysis import seeds, weights
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


# ---------------------------------------------------------------- one seed's numbers, and the claims

KINDS = {"same seed, different rank": "ranks", "same rank, different seed": "seeds"}  # short labels


def measure(metrics: dict) -> dict[str, dict[str, float]]:
    """One seed's numbers that the claims read, {measurement: {label: value}}; nothing else is kept."""
    moved = float(np.mean([r["a_moved"] for r in metrics["runs"].values()]))
    out = {"top1": {}, "top1_over_random": {}, "a_moved": {"mean over adapters": moved}}
    for result in metrics["pairs"].values():
        s, kind = pair_summary(result["matrices"]), KINDS[result["kind"]]
        for lens in LENSES:
            out["top1"][f"{kind}, {lens}"] = s[lens]["top1"]
            out["top1_over_random"][f"{kind}, {lens}"] = s[lens]["top1"] / s["baseline"]["top1"]
        if kind == "seeds":  # Hu et al. compared Wq and Wv across seeds
            by_kind = {}
            for name, m in result["matrices"].items():
                k = s["A"]["k"]
                by_kind.setdefault(name.split(".")[-2], []).append(float(np.asarray(m["A"])[:k, :k].mean()))
            out["wq_minus_wv"] = {"seeds, A": float(np.mean(by_kind["q"]) - np.mean(by_kind["v"]))}
    return out


# Each claim reads {measurement: {label: [one value per seed]}} and names the findings it rests on, each against
# a threshold fixed in its text; `judge` settles all findings of the report together (Holm).


def claim_strong(m):
    return {"claim": f"The top direction is shared strongly (Hu et al. 2021 §7.2): φ(1,1) > {STRONG}, mean over the "
                     "adapted matrices, across ranks (same seed) and across seeds (same rank), in Hu et al.'s lens (A) "
                     "and in the ΔW lens.",
            "findings": [seeds.finding(f"{kind}, {lens}", m["top1"][f"{kind}, {lens}"], STRONG)
                         for kind in KINDS.values() for lens in ("A", "delta")],
            "note": "Training moved each A by " + f"{100 * np.mean(m['a_moved']['mean over adapters']):.0f}% of its "
                    "initial norm (mean over adapters and seeds): the A lens partly still shows random starts; the ΔW "
                    "lens weighs A's directions by B. Hu et al.'s matrices are 12,288 wide, ours 64."}


def claim_above_chance(m):
    return {"claim": "The top direction is shared above chance: φ(1,1) over the random baseline's > "
                     f"{ABOVE_CHANCE:g}.",
            "findings": [seeds.finding(f"{kind}, {lens}", m["top1_over_random"][f"{kind}, {lens}"], ABOVE_CHANCE)
                         for kind in KINDS.values() for lens in ("A", "delta")], "note": ""}


def claim_control(m):
    return {"claim": f"Negative control: the two A's at initialisation share no more than chance (φ(1,1) over the "
                     f"random baseline's < {ABOVE_CHANCE:g}).",
            "findings": [seeds.finding(f"{kind}, init", m["top1_over_random"][f"{kind}, init"], ABOVE_CHANCE,
                                       above=False) for kind in KINDS.values()], "note": ""}


def claim_wq_wv(m):
    return {"claim": "Across seeds, Wq's adapters share more directions than Wv's (Hu et al. §7.2): mean "
                     f"φ(i,j≤{TOP}) of A, Wq minus Wv > 0.",
            "findings": [seeds.finding("seeds, A", m["wq_minus_wv"]["seeds, A"], 0.0)], "note": ""}


CLAIMS = (claim_strong, claim_above_chance, claim_control, claim_wq_wv)


def judge(per_seed: dict) -> list[dict]:
    """Every claim's verdict from per-seed numbers, Holm-corrected over all of the report's findings."""
    return seeds.judge([c(per_seed) for c in CLAIMS])


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


def run_seed(seed: int, quick: bool) -> dict:
    """One seed's pipeline: its base and three adapters, compared in pairs -> the metrics of that seed."""
    s = common.setup(quick, seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    found, run_metrics = {}, {}
    for name, rank, ft_seed in runs(quick, seed):
        cfg, train_cfg = lora_config(rank), dataclasses.replace(s.finetune, lr=LORA_LR, seed=ft_seed)
        tuned = common.finetune(name, base, ft_data, model_cfg, train_cfg, cfg)
        initial = initial_adapters(base, cfg, train_cfg)
        found[name] = directions(tuned, initial)
        moved = [np.linalg.norm(np.asarray(w.lora_a) - initial[n]) / np.linalg.norm(initial[n])
                 for n, w in lora.lora_weights(tuned.adapted).items()]
        run_metrics[name] = {"rank": rank, "seed": ft_seed, "alpha": cfg.alpha, "trainable": tuned.trainable,
                             "finetune_loss": common.eval_loss(tuned.params, ft_data, model_cfg),
                             "a_moved": float(np.mean(moved))}
    results = {}
    for pair, kind in pairs(list(found)).items():
        first, second = pair.split(" vs ")
        matrices = compare_pair(found[first], found[second])
        results[pair] = {"kind": kind, "matrices": matrices, "summary": pair_summary(matrices)}
    return {"setup": {"targets": list(TARGETS), "width": model_cfg.width, "steps": s.finetune.steps,
                      "batch_size": s.finetune.batch_size, "pretrain_steps": s.pretrain.steps, "lr": LORA_LR,
                      "top": TOP, "strong": STRONG, "above_chance": ABOVE_CHANCE, "seed": seed},
            "base_finetune_loss": common.eval_loss(base, ft_data, model_cfg), "runs": run_metrics, "pairs": results}


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/03_adapter_subspaces", seeds=3).parse_args(argv)
    started = time.perf_counter()
    seed_list = common.seed_list(args)
    per_seed_metrics = common.over_seeds(run_seed, seed_list, args.quick, workers=args.workers)
    shown = per_seed_metrics[0]  # the figures and tables show the first seed in detail
    per_seed = common.stack([measure(one) for one in per_seed_metrics])
    claims = judge(per_seed)
    metrics = {**shown, "seeds": seed_list, "shown_seed": seed_list[0], "per_seed": per_seed, "claims": claims,
               "verdicts": common.verdicts_record(claims), "summary": common.verdict_lines(claims, seed_list)}
    metrics["seconds"] = time.perf_counter() - started

    st, run_metrics = shown["setup"], shown["runs"]
    note = (f"<p>LoRA on <code>attn.q</code> and <code>attn.v</code> of both blocks, alpha = 2R (scale 2 at every "
            f"rank), {st['steps']} steps of batch {st['batch_size']} at learning rate {LORA_LR:g}, on a base "
            f"pretrained for {st['pretrain_steps']} steps (width d = {st['width']}). The pair 'across seeds' "
            "fine-tunes the same base with the next seed (A's start and the batch order change).</p>")
    runs_table = common.table(["adapter", "rank", "seed", "trainable", "bindings loss",
                               "A moved (‖A−A0‖/‖A0‖)"],
                              [(n, r["rank"], r["seed"], r["trainable"], common.fmt(r["finetune_loss"]),
                                common.fmt(r["a_moved"])) for n, r in run_metrics.items()])
    blocks = [*common.claims_blocks(claims, seed_list), (f"How it was run (seed {seed_list[0]})", note + runs_table)]
    for i, (pair, result) in enumerate(shown["pairs"].items()):
        blocks.append((f"{pair} ({result['kind']})", (f"pair{i + 1}", fig_pair(pair, result))))
        blocks.append((None, pair_table(result)))
    common.publish(args.out, "03 — Do two adapters learn the same directions?", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
