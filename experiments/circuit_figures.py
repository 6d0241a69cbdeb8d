"""The figures of experiment 06 (how a pattern forms): scores over training, attention maps, fine-tuning.

Each function reads the per-seed results of 06_how_a_pattern_forms.run_seed (curves of measurements:
step, train_loss, loss, icl, previous (L, H), induction (L, H)) and returns a matplotlib Figure.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from minilm.report import PALETTE


def _best(m, kind, layer):
    return float(np.max(m[kind][layer]))


def formation(runs: list[dict], seed_list, head: float) -> Figure:
    """Four panels over training steps, one line per seed (two layers solid, one layer dashed): training
    loss, best last-layer induction score, best layer-0 previous-token score, in-context score. The
    shaded band is each two-layer seed's 10%–90% rise of the induction score."""
    fig = Figure(figsize=(12, 6.4))
    axes = fig.subplots(2, 2).ravel()
    panels = [("train_loss", "training loss (nats, mean since the last measurement)"),
              ("induction", "best last-layer induction score"),
              ("previous", "best layer-0 previous-token score"),
              ("icl", "in-context score: loss(repeat) - loss(first half)")]
    for i, (run, seed) in enumerate(zip(runs, seed_list)):
        colour = PALETTE[i % len(PALETTE)]
        for depth, style in (("2-layer", "-"), ("1-layer", "--")):
            curve = run[depth]["curve"]
            steps = [m["step"] for m in curve]
            values = {"train_loss": [m["train_loss"] if m["train_loss"] is not None else np.nan for m in curve],
                      "induction": [_best(m, "induction", -1) for m in curve],
                      "previous": [_best(m, "previous", 0) for m in curve],
                      "icl": [m["icl"] for m in curve]}
            for ax, (key, _) in zip(axes, panels):
                ax.plot(steps, values[key], style, color=colour, lw=1.2 if depth == "2-layer" else 0.9,
                        label=f"seed {seed}, {depth}")
        tr = run["2-layer"]["transition"]
        if tr["t10"] is not None:
            for ax in axes:
                ax.axvspan(tr["t10"], tr["t90"], color=colour, alpha=0.12, lw=0)
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("induction", "previous"):
            ax.axhline(head, color="black", lw=0.8, ls=":")
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Formation on `induction`: two layers (solid) and one (dashed); shaded: the induction score's "
                 "10%–90% rise; dotted: the threshold of a head", fontsize=9)
    fig.tight_layout()
    return fig


def heads_over_steps(run: dict, seed: int) -> Figure:
    """Every head's previous-token and induction score over training (two-layer model, one seed)."""
    curve = run["2-layer"]["curve"]
    steps = [m["step"] for m in curve]
    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("previous", "induction")):
        grid = np.array([np.ravel(m[kind]) for m in curve]).T  # (L·H, measurements)
        L, H = np.shape(curve[0][kind])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          extent=(steps[0], steps[-1], L * H - 0.5, -0.5))
        ax.set_yticks(range(L * H), [f"L{i // H} H{i % H}" for i in range(L * H)], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(f"{kind} score per head (seed {seed})", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def attention_maps(run: dict, seed: int, words: list[str]) -> Figure:
    """The previous-token head (layer 0) and the induction head (last layer) on one held-out window,
    before, during and after the transition. Rows are queries, columns keys."""
    final = run["2-layer"]["curve"][-1]
    prev_head, ind_head = int(np.argmax(final["previous"][0])), int(np.argmax(final["induction"][-1]))
    maps = run["2-layer"]["maps"]
    fig = Figure(figsize=(11, 7.2))
    axes = fig.subplots(2, 3)
    n = min(40, len(words))  # the first 40 positions: a few whole lines, readable
    for col, moment in enumerate(("before", "during", "after")):
        probs = np.asarray(maps[moment]["probs"])  # (L, H, T, T)
        for row, (layer, h, name) in enumerate(((0, prev_head, "previous-token"), (-1, ind_head, "induction"))):
            ax = axes[row, col]
            ax.imshow(probs[layer, h, :n, :n], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"{moment} (step {maps[moment]['step']}): {name} head L{layer % len(probs)} H{h}", fontsize=8)
            ax.set_xticks(range(n), words[:n], rotation=90, fontsize=4)
            ax.set_yticks(range(n), words[:n], fontsize=4)
    fig.suptitle(f"Seed {seed}: attention on a held-out window (rows: queries, columns: keys; '\\n' ends a line)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def finetuning(runs: list[dict], seed_list, names: list[str], head: float) -> Figure:
    """Best last-layer induction score over fine-tuning steps, per variant; one line per seed."""
    fig = Figure(figsize=(3.2 * len(names), 3.0))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for i, (run, seed) in enumerate(zip(runs, seed_list)):
            curve = run["finetune"][name]["curve"]
            ax.plot([m["step"] for m in curve], [_best(m, "induction", -1) for m in curve],
                    color=PALETTE[i % len(PALETTE)], lw=1, label=f"seed {seed}")
        ax.axhline(head, color="black", lw=0.8, ls=":")
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("fine-tuning step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("best last-layer induction score", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
