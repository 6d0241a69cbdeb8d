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
block. The summary's sentences are computed from metrics.json; no setting was tuned to agree.

    python experiments/05_magnitude_and_direction.py            # ~1–2 minutes on 2 CPU cores
    python experiments/05_magnitude_and_direction.py --quick    # seconds: the pipeline end to end
"""

from __future__ import annotations

import dataclasses
import html
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
from minilm.analysis.weights import magnitude_direction  # noqa: E402
from minilm.config import LORA_LR  # noqa: E402
from minilm.tree import combine, partition, size  # noqa: E402

CHECKPOINTS = 10     # weights kept at this many evenly spaced steps (the paper plots four per layer)
MATRIX = "attn.q"    # the paper analyses the query matrices of every layer
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


# ---------------------------------------------------------------- the summary, from metrics alone


def summary(m: dict) -> list[str]:
    """The report's paragraph as sentences, computed from metrics.json and nothing else."""
    meth = m["methods"]
    r = {name: meth[name]["pearson"] for name in meth}

    def show(x):
        return "undefined" if x is None else f"{x:+.2f}"

    def sign(x):
        return "undefined" if x is None else "negative" if x < 0 else "positive" if x > 0 else "zero"

    n_points = len(meth["full"]["points"])
    out = [(f"Pearson correlation between ΔM and ΔD over the {n_points} points of each method "
            f"({m['checkpoints']} checkpoints × {m['layers']} layers, {MATRIX}): full fine-tuning {show(r['full'])}, "
            f"LoRA {show(r['LoRA'])}, DoRA {show(r['DoRA'])}."),
           ("Liu et al. (2024, §4.1) report a negative correlation for full fine-tuning, a positive one for LoRA, "
            "and a negative one for DoRA, like full fine-tuning's.")]
    checks = {"full": r["full"] is not None and r["full"] < 0,
              "LoRA": r["LoRA"] is not None and r["LoRA"] > 0,
              "DoRA": r["DoRA"] is not None and r["DoRA"] < 0}
    nearer = None
    if None not in (r["full"], r["LoRA"], r["DoRA"]):
        nearer = "full fine-tuning's" if abs(r["DoRA"] - r["full"]) < abs(r["DoRA"] - r["LoRA"]) else "LoRA's"
    out.append(f"Ours: full fine-tuning's is {sign(r['full'])} ({'as' if checks['full'] else 'unlike'} the paper), "
               f"LoRA's is {sign(r['LoRA'])} ({'as' if checks['LoRA'] else 'unlike'} the paper), DoRA's is "
               f"{sign(r['DoRA'])} ({'as' if checks['DoRA'] else 'unlike'} the paper)"
               + (f" and nearer to {nearer}." if nearer else "."))
    agree = sum(checks.values())
    out.append("So the measurement matches the paper's finding." if agree == 3 else
               "So the measurement does not match the paper's finding on any of the three." if agree == 0 else
               f"So the measurement matches the paper on {agree} of the three "
               f"({', '.join(k for k, v in checks.items() if v)}) and not on "
               f"{', '.join(k for k, v in checks.items() if not v)}.")
    trend = {name: (pearson([p["step"] for p in meth[name]["points"]], [p["dD"] for p in meth[name]["points"]]),
                    pearson([p["step"] for p in meth[name]["points"]], [p["dM"] for p in meth[name]["points"]]))
             for name in meth}
    grow = all(x is not None and x > 0.5 for pair in trend.values() for x in map(finite_or_none, pair))
    out.append("Correlation of the training step with ΔD and with ΔM: "
               + "; ".join(f"{name} {show(finite_or_none(d))}, {show(finite_or_none(mm))}"
                           for name, (d, mm) in trend.items())
               + (": in every method both grow as training goes on, so a scatter over checkpoints mixes that "
                  "shared growth with any trade-off between them." if grow else "."))
    last = {name: [p for p in meth[name]["points"] if p["step"] == m["steps"]] for name in meth}
    out.append("At the last step (mean over layers): " + "; ".join(
        f"{name} ΔD {np.mean([p['dD'] for p in pts]):.2g}, ΔM {np.mean([p['dM'] for p in pts]):.2g}"
        for name, pts in last.items())
        + f". Bindings loss: base {m['base_loss']:.3f}, "
        + ", ".join(f"{name} {meth[name]['loss']:.3f}" for name in meth) + ".")
    return out


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


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/05_magnitude_and_direction").parse_args(argv)
    started = time.perf_counter()
    s = common.setup(args.quick, args.seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    checkpoints = min(CHECKPOINTS if not args.quick else 5, s.finetune.steps)
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
    metrics = report.finite({"steps": s.finetune.steps, "every": every, "checkpoints": len(kept),
                             "layers": model_cfg.layers, "matrix": MATRIX,
                             "base_loss": common.eval_loss(base, ft_data, model_cfg), "methods": results})
    metrics["summary"] = summary(metrics)
    metrics["seconds"] = time.perf_counter() - started

    rows = [(name, r["trainable"], r["lr"], common.fmt(r["loss"], 4), common.fmt(r["pearson"], 3),
             ", ".join(common.fmt(x, 3) for x in r["pearson_per_layer"]))
            for name, r in metrics["methods"].items()]
    point_rows = [(name, p["step"], p["layer"], f"{p['dD']:.3g}", f"{p['dM']:.3g}")
                  for name, r in metrics["methods"].items() for p in r["points"]]
    lora_cfg = methods()[1][1]
    method = (f"<p>Base: {s.pretrain.steps} steps on <code>associations</code>. Each method: {s.finetune.steps} "
              f"steps on <code>bindings</code>, weights kept every {every} steps. Full fine-tuning at lr "
              f"{s.finetune.lr:g}; LoRA rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g} on "
              f"{', '.join(lora_cfg.targets)} at lr {LORA_LR:g}; DoRA the same plus a trained magnitude per "
              f"output unit. LoRA and DoRA are merged into plain matrices before measuring. Every point is one "
              f"{MATRIX} matrix (one per layer) at one kept step, compared with the base's; ΔM and ΔD are "
              f"computed per output unit (a column of W in x @ W) as in the paper's eq. 6–7. The correlation of a "
              f"method is Pearson's r over all its points.</p>")
    blocks = [("Summary", "<p>" + " ".join(html.escape(x) for x in metrics["summary"]) + "</p>"),
              ("How it was measured", method),
              ("Magnitude change against direction change", ("magnitude_direction", fig_scatter(metrics))),
              ("Correlations and losses", common.table(["method", "trainable", "lr", "bindings loss",
                                                         "Pearson r (all points)", "r per layer"], rows)),
              ("Every point", "<details><summary>step, layer, ΔD, ΔM</summary>"
                              + common.table(["method", "step", "layer", "ΔD", "ΔM"], point_rows) + "</details>")]
    common.publish(args.out, "05 — Magnitude and direction (DoRA §4.1)", blocks, metrics)
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
