"""01 — What changes when I fine-tune, fully or with LoRA?

Pretrain a tiny GPT on `associations` (concept words in shared, interchangeable contexts), fine-tune
copies on `bindings` (which binds justice–morality, law–court, retribution–revenge) four ways — full,
LoRA on attention q and v, LoRA on all linear layers at two ranks — then compare each with the base
and test eight claims people often make about fine-tuning.

An answer is a distribution over seeds (minilm/analysis/seeds.py): the whole pipeline — corpus, base,
fine-tunes, batches — runs once per seed, every number a verdict reads is kept per seed, and a claim
is "true" or "false" only when the Student-t test over seeds, Holm-corrected over all the verdicts of
the report, decides it against the threshold written in the claim; otherwise it is "not settled by N
seeds". All seeds run in one process, so each program compiles once.

    python experiments/01_what_changes.py                # 5 seeds, ~3 minutes on 2 CPU cores
    python experiments/01_what_changes.py --seeds 3,7,11 # those seeds
    python experiments/01_what_changes.py --quick        # seconds: the pipeline end to end, 2 seeds
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`, next to this file

import common  # noqa: E402

import lora  # noqa: E402
from minilm import report  # noqa: E402
from minilm.analysis import seeds  # noqa: E402
from minilm.analysis.compare import Model, compare, make_probe  # noqa: E402
from minilm.config import LORA_LR  # noqa: E402

JS_CHANGED = 0.05       # nats: a head whose mean Jensen–Shannon divergence exceeds this "looks elsewhere"
COS_CHANGED = 0.01      # a mean |Δ cosine| above this counts as "distances changed"
LOW_RANK = 0.25         # a ΔW whose 90%-energy rank is below this share of full rank is "low-rank"
QV = "lora-qv-r8"       # trains its whole budget; the others stop at the loss it reached


def variants(quick: bool):
    """(name, LoraConfig or None). Ranks stay well below the width (64) so low rank means something."""
    r_small, r_large = (2, 4) if quick else (4, 16)
    return [("full", None),
            (QV, lora.LoraConfig(rank=8 if not quick else 2, alpha=16, targets=("attn.q", "attn.v"))),
            (f"lora-all-r{r_small}", lora.LoraConfig(rank=r_small, alpha=2 * r_small, targets=("all-linear",))),
            (f"lora-all-r{r_large}", lora.LoraConfig(rank=r_large, alpha=2 * r_large, targets=("all-linear",)))]


# ---------------------------------------------------------------- one seed: the pipeline


def run_seed(seed: int, quick: bool):
    """Base, four fine-tunes and their comparison for one seed -> (compare's result, losses)."""
    s = common.setup(quick, seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    # Compare at equal fine-tuning loss: LoRA on q and v (the fewest parameters) trains its full budget and
    # is evaluated once, at its end; every other variant stops at the first evaluation (every eval_every
    # steps) that reaches the loss it got to.
    tuned, target = [], None
    for name, cfg in sorted(variants(quick), key=lambda v: v[0] != QV):
        train_cfg = s.finetune if cfg is None else dataclasses.replace(s.finetune, lr=LORA_LR)
        if name == QV:
            train_cfg = dataclasses.replace(train_cfg, eval_every=train_cfg.steps)
        tuned.append(common.finetune(name, base, ft_data, model_cfg, train_cfg, cfg, stop_below=target))
        target = target if target is not None else tuned[-1].log[-1]["eval_loss"]
    tuned.sort(key=lambda t: [v[0] for v in variants(quick)].index(t.name))
    losses = {"base": {"finetune_loss": common.eval_loss(base, ft_data, model_cfg),
                       "base_loss": common.eval_loss(base, base_data, model_cfg)}}
    for t in tuned:
        losses[t.name] = {"finetune_loss": common.eval_loss(t.params, ft_data, model_cfg),
                          "base_loss": common.eval_loss(t.params, base_data, model_cfg),
                          "trainable": t.trainable, "steps": t.log[-1]["step"], "lr": t.lr}
    probe = make_probe(base_data.tokenizer, model_cfg, corpus=base_data.corpus)
    result = compare(Model("base", base), [Model(t.name, t.params, common.adapters_of(t)) for t in tuned], probe,
                     base_data.tokenizer, model_cfg)
    result["adapters_of"] = {t.name: sorted(common.adapters_of(t)) for t in tuned}
    return result, losses


def mean_abs_cos_change(before, after) -> float:
    b, a = np.asarray(before, float), np.asarray(after, float)
    off = ~np.eye(len(b), dtype=bool)
    return float(np.mean(np.abs(a - b)[off])) if len(b) > 1 else 0.0


def pair_shift(part, kind) -> float:
    """Mean change of cosine over the bound pairs (kind='pairs') or the controls."""
    before, after = part["base"][kind], part["tuned"][kind]
    return float(np.mean([a["cosine"] - b["cosine"] for b, a in zip(before, after)])) if before else float("nan")


def measure(result: dict, losses: dict) -> dict[str, dict[str, float]]:
    """One seed's numbers that the claims read: {measurement: {model: value}}; nothing else is kept."""
    names = result["models"]
    out = {k: {} for k in ("static_change", "static_max_abs_change", "contextual_change", "smallest_layer_shift", "embedding_rows",
                           "pairs_shift", "controls_shift", "pairs_minus_controls", "last_layer_shift", "max_js",
                           "silhouette_change", "energy_rank_share", "effective_rank", "intruders",
                           "relative_change", "finetune_loss", "base_loss", "forgetting", "steps", "lr")}
    for m in names:
        v, w = result["vectors"][m], result["weights"][m]
        blocks = v["contextual"][1:]  # layer boundaries 1..L: block outputs, which every variant can change
        out["static_change"][m] = mean_abs_cos_change(v["static"]["cosine_base"], v["static"]["cosine_tuned"])
        out["static_max_abs_change"][m] = v["static"]["max_abs_change"]
        out["contextual_change"][m] = float(np.mean([abs(pair_shift(c, "pairs")) + abs(pair_shift(c, "controls"))
                                                     for c in blocks]) / 2)
        out["smallest_layer_shift"][m] = min(c["mean_shift"] for c in blocks)
        out["embedding_rows"][m] = float(w["embed.tok"]["shape"][0])
        last = v["contextual"][-1]
        out["pairs_shift"][m], out["controls_shift"][m] = pair_shift(last, "pairs"), pair_shift(last, "controls")
        out["pairs_minus_controls"][m] = out["pairs_shift"][m] - out["controls_shift"][m]
        out["last_layer_shift"][m] = last["mean_shift"]
        out["max_js"][m] = float(np.max(v["attention"]["js"]))
        out["silhouette_change"][m] = float(np.mean([c["tuned"]["silhouette"] - c["base"]["silhouette"]
                                                     for c in blocks]))
        moved = [r for r in w.values() if "energy_rank_delta" in r and r["fro"] > 0]
        out["energy_rank_share"][m] = float(np.median([r["energy_rank_delta"] / min(r["shape"]) for r in moved]))
        out["effective_rank"][m] = float(np.median([r["effective_rank_delta"] for r in moved]))
        out["intruders"][m] = float(sum(r["intruder_count"] for r in w.values() if "intruder_count" in r))
        out["relative_change"][m] = float(np.median([r["relative"] for r in moved]))
        out["steps"][m], out["lr"][m] = float(losses[m]["steps"]), float(losses[m]["lr"])
    for m in ["base", *names]:
        out["finetune_loss"][m], out["base_loss"][m] = losses[m]["finetune_loss"], losses[m]["base_loss"]
        out["forgetting"][m] = losses[m]["base_loss"] - losses["base"]["base_loss"]
    gaps = [g for r in result["weights"][names[0]].values() if "spectral_gaps_w0" in r for g in r["spectral_gaps_w0"]]
    out["base_spectral_gap"] = {"base": float(np.median(gaps))}
    return out


# ---------------------------------------------------------------- the claims: per-seed numbers in, findings out
# Each claim reads {measurement: {model: [one value per seed]}} and says which findings it rests on, each
# against a threshold fixed in its text. `judge` settles all findings of the report together (Holm).


def claim_distances(m, names, lora_names):
    return {"claim": f"Fine-tuning changes the distances between token vectors (mean |Δcos| > {COS_CHANGED}, "
                     "static embeddings and contextual vectors after each block).",
            "findings": [seeds.finding(f"{n} {kind}", m[f"{kind}_change"][n], COS_CHANGED)
                         for n in names for kind in ("static", "contextual")],
            "note": "A LoRA that does not adapt the embedding leaves it bit-identical, so its static distances cannot "
                    "move; equal values on every seed settle nothing below six seeds (seeds.py's sign test).",
            "evidence": "Static embeddings bit-identical to the base on every seed: "
                        + (", ".join(n for n in names if not any(m["static_max_abs_change"][n])) or "none") + "."}


def claim_paths(m, names, lora_names):
    rows = {int(v) for n in names for v in m["embedding_rows"][n]}
    return {"claim": "No new vectors appear; existing tokens travel new paths through the layers (every block's "
                     "output moves: smallest mean shift of a word's hidden state over layers 1..L > 0).",
            "findings": [seeds.finding(n, m["smallest_layer_shift"][n], 0.0) for n in names],
            "note": "", "evidence": f"Embedding rows: {', '.join(map(str, sorted(rows)))} in every model and seed "
                                    "(a model of another shape could not be compared with its base)."}


def claim_closer(m, names, lora_names):
    return {"claim": "Concepts trained together move closer (last layer: Δcos of bound pairs minus Δcos of "
                     "controls > 0).",
            "findings": [seeds.finding(n, m["pairs_minus_controls"][n], 0.0) for n in names],
            "note": "The cosines are of hidden states read in the pretraining corpus's contexts. bindings teaches which "
                    "word comes next ('justice and' -> 'morality'), which the attention and MLP read-out can learn "
                    "without pulling the two words' own states together; the mean shift of a hidden state at the last "
                    f"layer is {np.mean([np.mean(m['last_layer_shift'][n]) for n in names]):.2f}, large next to "
                    "pairs-minus-controls."}


def claim_attention(m, names, lora_names):
    return {"claim": f"Attention now looks elsewhere (some head's mean Jensen–Shannon divergence > {JS_CHANGED} "
                     "nats).",
            "findings": [seeds.finding(n, m["max_js"][n], JS_CHANGED) for n in names], "note": ""}


def claim_clusters(m, names, lora_names):
    return {"claim": "Semantic clusters become denser (silhouette of concepts/objects/agents: mean change over "
                     "layers 1..L, the block outputs every variant can change, > 0).",
            "findings": [seeds.finding(n, m["silhouette_change"][n], 0.0) for n in names],
            "note": "The groups scored (concepts, objects, agents) come from the pretraining corpus; bindings uses "
                    "concept words only, in new sentences, so nothing in it separates the three groups further."}


def claim_low_rank(m, names, lora_names):
    full_names = [n for n in names if n not in lora_names]
    lower = [seeds.finding(f"{n} lower than {f}", np.subtract(m["energy_rank_share"][f], m["energy_rank_share"][n]),
                           0.0) for n in lora_names for f in full_names]
    return {"claim": "LoRA's change is low-rank; full fine-tuning's is not (median 90%-energy rank of ΔW as a share "
                     f"of full rank: LoRA's below full's, full's ≥ {LOW_RANK:.0%}).",
            "findings": [*lower, *(seeds.finding(f"{f} ≥ {LOW_RANK:.0%}", m["energy_rank_share"][f], LOW_RANK)
                                   for f in full_names)],
            "note": "A few hundred small steps span few directions, so even an unconstrained update can be "
                    "low-rank at this scale; median effective rank of ΔW (Roy & Vetterli): "
                    + ", ".join(f"{n} {np.mean(m['effective_rank'][n]):.1f}" for n in names) + "."}


def claim_intruders(m, names, lora_names):
    full_names = [n for n in names if n not in lora_names]
    more = [seeds.finding(f"{n} more than {f}", np.subtract(m["intruders"][n], m["intruders"][f]), 0.0)
            for n in lora_names for f in full_names]
    return {"claim": "LoRA introduces new high-ranking directions (intruder dimensions, k=10, ε=0.5: LoRA's count "
                     "minus full's > 0); full fine-tuning does not (its count < 0.5) (Shuttleworth et al. 2024).",
            "findings": [*more, *(seeds.finding(f"{f} has none", m["intruders"][f], 0.5, above=False)
                                  for f in full_names)],
            "note": "The base's top singular values are close together (median gap σi/σi+1 among the top 10: "
                    f"{np.mean(m['base_spectral_gap']['base']):.3f}): a small update rotates singular vectors inside "
                    "such near-degenerate subspaces, and the intruder test cannot tell that from a new direction."}


def claim_learn_forget(m, names, lora_names):
    full_names = [n for n in names if n not in lora_names]
    findings = []
    for n in lora_names:
        for f in full_names:
            findings.append(seeds.finding(f"{n} learns less than {f}",
                                          np.subtract(m["finetune_loss"][n], m["finetune_loss"][f]), 0.0))
            findings.append(seeds.finding(f"{n} forgets less than {f}",
                                          np.subtract(m["forgetting"][f], m["forgetting"][n]), 0.0))
    return {"claim": "LoRA learns less and forgets less (Biderman et al. 2024): higher fine-tuning loss and smaller "
                     "rise in base-corpus loss than full fine-tuning (differences > 0).",
            "findings": findings,
            "note": "All variants were stopped at about the same fine-tuning loss, so 'learns less' cannot show here; "
                    "learning rates " + ", ".join(f"{n} {m['lr'][n][0]:g}" for n in names)
                    + "; median relative change ||ΔW||/||W0|| "
                    + ", ".join(f"{n} {np.mean(m['relative_change'][n]):.2f}" for n in names) + "."}


CLAIMS = (claim_distances, claim_paths, claim_closer, claim_attention, claim_clusters, claim_low_rank,
          claim_intruders, claim_learn_forget)


def judge(per_seed: dict, names: list[str], lora_names: list[str]) -> list[dict]:
    """Every claim's verdict and evidence from per-seed numbers, Holm-corrected over all of the report's findings."""
    return seeds.judge([c(per_seed, names, lora_names) for c in CLAIMS])


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/01_what_changes", seeds=True).parse_args(argv)
    started = time.perf_counter()
    seed_list = common.seed_list(args)
    measured, shown = [], None
    for i, seed in enumerate(seed_list):
        print(f"seed {seed} ({i + 1} of {len(seed_list)})", flush=True)
        result, losses = run_seed(seed, args.quick)
        measured.append(measure(result, losses))
        shown = shown or (result, losses)  # the first seed's comparison is the one the figures show in detail
    result, losses = shown
    names = result["models"]
    lora_names = [n for n in names if result["adapters_of"][n]]
    per_seed = common.stack(measured)
    result.update(seeds=seed_list, shown_seed=seed_list[0], per_seed=per_seed,
                  claims=judge(per_seed, names, lora_names), losses=losses)
    n_verdicts = sum(len(c["findings"]) for c in result["claims"])
    result["verdicts"] = {"count": n_verdicts, "alpha": seeds.ALPHA, "correction": "Holm step-down",
                          "interval": "95% Student t over seeds"}
    result["seconds"] = time.perf_counter() - started
    n = len(seed_list)
    loss_rows = [(m, losses[m].get("trainable", "—"),
                  seeds.interval_text(seeds.finding(m, per_seed["steps"][m], 0.0)) if m != "base" else "—",
                  seeds.interval_text(seeds.finding(m, per_seed["finetune_loss"][m], 0.0)),
                  seeds.interval_text(seeds.finding(m, per_seed["base_loss"][m], 0.0))) for m in ["base", *names]]
    page = report.write(Path(args.out), result, title="01 — What changes when I fine-tune, fully or with LoRA?",
                        extra=[("Losses: what each variant learned and forgot (mean [95% interval] over seeds)",
                                common.table(["model", "trainable parameters", "steps", "bindings loss (fine-tuning)",
                                              "associations loss (pretraining)"], loss_rows)),
                               ("Claims, over seeds", report.claims_html(result["claims"], seed_list) + (
                                   f"<p>The figures above show seed {seed_list[0]} alone; per-seed values are in "
                                   "metrics.json (per_seed, claims[].findings).</p>")),
                               ("Every seed's value and the interval, per claim", ("claims", report.fig_findings(
                                   result["claims"])))])
    for i, c in enumerate(result["claims"]):
        print(f"{i + 1}. {c['claim']}\n   -> {c['verdict']}")
    print(f"{n_verdicts} verdicts, Holm-corrected (family-wise α {seeds.ALPHA:g}), over {n} seed{'s' if n != 1 else ''}")
    print(f"report: {page}  ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
