"""05 — Magnitude and direction: does LoRA move weights like full fine-tuning does? (DoRA §4.1)

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv 2402.09353), §4.1, split each
output unit (a column of W) into a magnitude ||W[:, j]|| and a direction W[:, j] / ||W[:, j]||, and
followed both through fine-tuning of the query matrices, checkpoint by checkpoint:

    ΔM = mean_j | ||W_t[:, j]|| − ||W0[:, j]|| |,      ΔD = mean_j (1 − cos(W_t[:, j], W0[:, j]))

They report a negative correlation between ΔM and ΔD for full fine-tuning (large direction changes
come with small magnitude changes, or the other way round), a positive one for LoRA (both move
together), and a negative one, like full fine-tuning's, for DoRA. Here: pretrain a tiny GPT on
`associations`, fine-tune it on `bindings` fully, with LoRA and with DoRA (the same LoRA config plus
a trained magnitude), keep the weights every few steps, and measure the same thing on attn.q of every
block. No setting was tuned to agree.

Over seeds (minilm/analysis/seeds.py): the whole pipeline (corpus, base, fine-tunes, batches) runs once per
seed, all in one process; each claim is "true" or "false" only when the Student-t test over seeds,
Holm-corrected over all the report's findings, decides it against the threshold in its text, otherwise
"not settled by N seeds". The figure and tables show the first seed.

    python experiments/05_magnitude_and_direction.py                # 3 seeds
    python experiments/05_magnitude_and_direction.py --seeds 3,7,11 # those seeds
    python experiments/05_magnitude_and_direction.py --quick        # seconds: the pipeline end to end, 2 seeds
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`, next to this file

import common  # noqa: E402

import lora  # noqa: E402
from minilm import report, train  # noqa: E402
from minilm.analysis import seeds  # noqa: E402
from minilm.analysis.weights import magnitude_direction  # noqa: E402
from minilm.config import LORA_LR  # noqa: E402
from minilm.tree import combine, partition, size  # noqa: E402

CHECKPOINTS = 10     # weights kept at this many evenly spaced steps (the paper plots four per layer)
MATRIX = "attn.q"    # the paper analyses the query matrices of every layer
GROWS = 0.5          # a step–ΔD (or ΔM) correlation above this is "grows as training goes on"
MARKERS = ("o", "s", "^", "D", "v", "P")


def methods() -> list[tuple[str, lora.LoraConfig | None]]:
    """(name, LoraConfig or None for full fine-tuning). DoRA is LoRA's config plus a trained magnitude."""
    lora_cfg = lora.LoraConfig(rank=8, alpha=16, targets=("attn.q", "attn.v"))  # the LoRA paper's choice (§7.1)
    return [("full", None), ("LoRA", lora_cfg), ("DoRA", dataclasses.replace(lora_cfg, use_dora=True))]


def finetune_with_checkpoints(name, base, dataset, model_cfg, train_cfg, lora_cfg, every: int):
    """Like common.finetune (same keys, same loss), but keeps the plain weights every `every` steps.

    Returns ([(step, params)], final params): params are plain matrices, LoRA/DoRA merged into W.
    """
    if lora_cfg is None:
        trainable, frozen = partition(base, lambda n: True)
        loss, plain = train.loss_fn, lambda params: params
    else:
        adapted = lora.attach(base, lora_cfg, key=jax.random.key(train_cfg.seed + 2))
        trainable, frozen = lora.split(adapted, lora_cfg)
        loss, plain = lora.loss_fn, lora.merge
    start = train.start(trainable, frozen, train_cfg, key=jax.random.key(train_cfg.seed + 1))
    kept = []
    with tqdm(total=train_cfg.steps, desc=f"fine-tune {name}", unit="step", leave=False) as bar:
        for state, metrics in train.run(start, dataset, model_cfg, train_cfg, loss):
            if metrics["step"] % every == 0 or metrics["step"] == train_cfg.steps:
                # a copy: the next step updates state.trainable in place (train.run)
                kept.append((metrics["step"], jax.tree.map(jnp.copy, plain(combine(state.trainable, state.frozen)))))
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            bar.update(1)
    return kept, kept[-1][1], size(trainable)


def pearson(x, y) -> float:
    """Pearson's r of two equally long sequences; NaN when either is constant or has fewer than 3 values."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def finite_or_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else x


def points_of(base, kept) -> list[dict]:
    """(ΔM, ΔD) of attn.q in every block at every kept step."""
    group, name = MATRIX.split(".")
    return [{"step": step, "layer": i,
             **dict(zip(("dM", "dD"), magnitude_direction(base["blocks"][i][group][name]["w"],
                                                          params["blocks"][i][group][name]["w"])))}
            for step, params in kept for i in range(len(base["blocks"]))]


# ---------------------------------------------------------------- one seed's numbers, and the claims


def measure(m: dict) -> dict[str, dict[str, float]]:
    """One seed's numbers that the claims read, {measurement: {method: value}}; nothing else is kept.

    A correlation that is undefined (a constant ΔM or ΔD) is NaN here, and seeds.finding refuses it by name."""
    meth = m["methods"]
    r = {name: float("nan") if meth[name]["pearson"] is None else meth[name]["pearson"] for name in meth}
    out = {"pearson": r, "dora_nearer_full": {"DoRA": abs(r["DoRA"] - r["LoRA"]) - abs(r["DoRA"] - r["full"])},
           "step_vs_dD": {}, "step_vs_dM": {}}
    for name, x in meth.items():
        steps = [p["step"] for p in x["points"]]
        out["step_vs_dD"][name] = pearson(steps, [p["dD"] for p in x["points"]])
        out["step_vs_dM"][name] = pearson(steps, [p["dM"] for p in x["points"]])
    return out


# Each claim reads {measurement: {method: [one value per seed]}} and names the findings it rests on, each against
# a threshold fixed in its text; `judge` settles all findings of the report together (Holm).


def claim_paper(m):
    return {"claim": f"Liu et al. 2024 (DoRA §4.1): Pearson's r between ΔM and ΔD over checkpoints and layers of "
                     f"{MATRIX} is negative for full fine-tuning (< 0), positive for LoRA (> 0), negative for DoRA "
                     "(< 0).",
            "findings": [seeds.finding("full", m["pearson"]["full"], 0.0, above=False),
                         seeds.finding("LoRA", m["pearson"]["LoRA"], 0.0),
                         seeds.finding("DoRA", m["pearson"]["DoRA"], 0.0, above=False)],
            "note": "The paper fine-tuned billion-parameter models for thousands of steps; here a 64-wide attn.q for a "
                    "few hundred, where both ΔM and ΔD mostly grow with the step (claim 3)."}


def claim_dora_nearer(m):
    return {"claim": "DoRA's correlation is nearer full fine-tuning's than LoRA's: |r_DoRA − r_LoRA| − "
                     "|r_DoRA − r_full| > 0.",
            "findings": [seeds.finding("DoRA", m["dora_nearer_full"]["DoRA"], 0.0)], "note": ""}


def claim_growth(m):
    return {"claim": "Both ΔD and ΔM grow as training goes on: Pearson's r of the training step with ΔD and with "
                     f"ΔM > {GROWS}, for every method (a scatter over checkpoints then mixes that shared growth "
                     "with any trade-off between them).",
            "findings": [seeds.finding(f"{name} {what}", m[f"step_vs_{what}"][name], GROWS)
                         for name in m["pearson"] for what in ("dD", "dM")], "note": ""}


CLAIMS = (claim_paper, claim_dora_nearer, claim_growth)


def judge(per_seed: dict) -> list[dict]:
    """Every claim's verdict from per-seed numbers, Holm-corrected over all of the report's findings."""
    return seeds.judge([c(per_seed) for c in CLAIMS])


# ---------------------------------------------------------------- figures


def fig_scatter(m: dict) -> Figure:
    """ΔD (x) against ΔM (y): all methods together, then each on its own axes with a least-squares line."""
    names = list(m["methods"])
    fig = Figure(figsize=(10, 8))
    axes = fig.subplots(2, 2).ravel()
    for ax, only in zip(axes, [None, *names]):
        for c, name in enumerate(names):
            if only is not None and name != only:
                continue
            pts = m["methods"][name]["points"]
            color = report.PALETTE[c]
            for layer in range(m["layers"]):
                mine = [p for p in pts if p["layer"] == layer]
                ax.scatter([p["dD"] for p in mine], [p["dM"] for p in mine], s=22, color=color,
                           marker=MARKERS[layer % len(MARKERS)], alpha=0.8,
                           label=f"{name} layer {layer}" if only is not None else name if layer == 0 else None)
                if only is not None:
                    for p in mine:
                        ax.annotate(str(p["step"]), (p["dD"], p["dM"]), fontsize=5, xytext=(2, 2),
                                    textcoords="offset points")
            if only is not None and len(pts) >= 2 and np.std([p["dD"] for p in pts]) > 0:
                x = np.array([p["dD"] for p in pts])
                slope, intercept = np.polyfit(x, [p["dM"] for p in pts], 1)
                grid = np.linspace(x.min(), x.max(), 2)
                ax.plot(grid, slope * grid + intercept, color=color, lw=0.8)
        r = m["methods"][only]["pearson"] if only else None
        ax.set_title("all methods (colour: method; marker: layer)" if only is None else
                     f"{only}: r = {'—' if r is None else f'{r:+.2f}'} (numbers: step; marker: layer)", fontsize=9)
        ax.set_xlabel("ΔD: mean (1 − cos) of columns")
        ax.set_ylabel("ΔM: mean |Δ column norm|")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the experiment


def run_seed(seed: int, quick: bool) -> dict:
    """One seed's pipeline: its base, then full, LoRA and DoRA fine-tuning with the weights kept along the way."""
    s = common.setup(quick, seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    checkpoints = min(CHECKPOINTS if not quick else 5, s.finetune.steps)
    every = s.finetune.steps // checkpoints
    results = {}
    for name, cfg in methods():
        train_cfg = s.finetune if cfg is None else dataclasses.replace(s.finetune, lr=LORA_LR)
        kept, final, trainable = finetune_with_checkpoints(name, base, ft_data, model_cfg, train_cfg, cfg, every)
        points = points_of(base, kept)
        results[name] = {"lora": None if cfg is None else cfg.to_json(), "lr": train_cfg.lr, "trainable": trainable,
                         "loss": common.eval_loss(final, ft_data, model_cfg), "points": points,
                         "pearson": pearson([p["dD"] for p in points], [p["dM"] for p in points]),
                         "pearson_per_layer": [pearson([p["dD"] for p in points if p["layer"] == i],
                                                       [p["dM"] for p in points if p["layer"] == i])
                                               for i in range(model_cfg.layers)]}
    return report.finite({"seed": seed, "steps": s.finetune.steps, "pretrain_steps": s.pretrain.steps,
                          "lr": s.finetune.lr, "every": every, "checkpoints": len(kept), "layers": model_cfg.layers,
                          "matrix": MATRIX, "base_loss": common.eval_loss(base, ft_data, model_cfg),
                          "methods": results})


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/05_magnitude_and_direction", seeds=3).parse_args(argv)
    started = time.perf_counter()
    seed_list = common.seed_list(args)
    per_seed_metrics = common.over_seeds(run_seed, seed_list, args.quick, workers=args.workers)
    shown = per_seed_metrics[0]  # the figure and tables show the first seed in detail
    per_seed = common.stack([measure(one) for one in per_seed_metrics])
    claims = judge(per_seed)
    metrics = {**shown, "seeds": seed_list, "shown_seed": seed_list[0], "per_seed": per_seed, "claims": claims,
               "verdicts": common.verdicts_record(claims), "summary": common.verdict_lines(claims, seed_list)}
    metrics["seconds"] = time.perf_counter() - started

    rows = [(name, r["trainable"], r["lr"], common.fmt(r["loss"], 4), common.fmt(r["pearson"], 3),
             ", ".join(common.fmt(x, 3) for x in r["pearson_per_layer"]))
            for name, r in metrics["methods"].items()]
    point_rows = [(name, p["step"], p["layer"], f"{p['dD']:.3g}", f"{p['dM']:.3g}")
                  for name, r in metrics["methods"].items() for p in r["points"]]
    lora_cfg = methods()[1][1]
    method = (f"<p>Base: {shown['pretrain_steps']} steps on <code>associations</code>. Each method: "
              f"{shown['steps']} steps on <code>bindings</code>, weights kept every {shown['every']} steps. Full "
              f"fine-tuning at lr {shown['lr']:g}; LoRA rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g} on "
              f"{', '.join(lora_cfg.targets)} at lr {LORA_LR:g}; DoRA the same plus a trained magnitude per "
              f"output unit. LoRA and DoRA are merged into plain matrices before measuring. Every point is one "
              f"{MATRIX} matrix (one per layer) at one kept step, compared with the base's; ΔM and ΔD are "
              f"computed per output unit (a column of W in x @ W) as in the paper's eq. 6–7. The correlation of a "
              f"method is Pearson's r over all its points.</p>")
    first = f" (seed {seed_list[0]})"
    blocks = [*common.claims_blocks(claims, seed_list),
              ("How it was measured", method),
              ("Magnitude change against direction change" + first, ("magnitude_direction", fig_scatter(metrics))),
              ("Correlations and losses" + first, common.table(["method", "trainable", "lr", "bindings loss",
                                                         "Pearson r (all points)", "r per layer"], rows)),
              ("Every point" + first, "<details><summary>step, layer, ΔD, ΔM</summary>"
                              + common.table(["method", "step", "layer", "ΔD", "ΔM"], point_rows) + "</details>")]
    common.publish(args.out, "05 — Magnitude and direction (DoRA §4.1)", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
