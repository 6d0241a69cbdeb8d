"""01 — What changes when I fine-tune, fully or with LoRA?

Pretrain a tiny GPT on `associations` (concept words in shared, interchangeable contexts), fine-tune
copies on `bindings` (which binds justice–morality, law–court, retribution–revenge) four ways — full,
LoRA on attention q and v, LoRA on all linear layers at two ranks — then compare each with the base
and test eight claims people often make about fine-tuning. Every verdict is computed from the
measurements beside it; the thresholds are stated in the claim.

    python experiments/01_what_changes.py            # ~1 minute on 2 CPU cores
    python experiments/01_what_changes.py --quick    # seconds: the pipeline end to end
"""

from __future__ import annotations

import dataclasses
import html
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`, next to this file

import common  # noqa: E402

import lora  # noqa: E402
from minilm import report  # noqa: E402
from minilm.analysis.compare import Model, compare, make_probe  # noqa: E402

LORA_LR = 1e-2          # adapters start at zero and are few: they take a larger step than full fine-tuning
JS_CHANGED = 0.05       # nats: a head whose mean Jensen–Shannon divergence exceeds this "looks elsewhere"
COS_CHANGED = 0.01      # a mean |Δ cosine| above this counts as "distances changed"


def variants(quick: bool):
    """(name, LoraConfig or None). Ranks stay well below the width (64) so low rank means something."""
    r_small, r_large = (2, 4) if quick else (4, 16)
    return [("full", None),
            ("lora-qv-r8", lora.LoraConfig(rank=8 if not quick else 2, alpha=16, targets=("attn.q", "attn.v"))),
            (f"lora-all-r{r_small}", lora.LoraConfig(rank=r_small, alpha=2 * r_small, targets=("all-linear",))),
            (f"lora-all-r{r_large}", lora.LoraConfig(rank=r_large, alpha=2 * r_large, targets=("all-linear",)))]


def mean_abs_cos_change(before, after) -> float:
    b, a = np.asarray(before, float), np.asarray(after, float)
    off = ~np.eye(len(b), dtype=bool)
    return float(np.mean(np.abs(a - b)[off])) if len(b) > 1 else 0.0


def pair_shift(part, kind) -> float:
    """Mean change of cosine over the bound pairs (kind='pairs') or the controls."""
    before, after = part["base"][kind], part["tuned"][kind]
    return float(np.mean([a["cosine"] - b["cosine"] for b, a in zip(before, after)])) if before else float("nan")


def claims(result: dict, losses: dict) -> list[dict]:
    """The eight claims, each with its measurement and a verdict computed from it (and nothing else)."""
    names = result["models"]
    is_lora = {m: bool(result["adapters_of"].get(m)) for m in names}
    out = []

    def claim(text, evidence, verdict, note=""):
        """`note`: why a verdict differs from what the literature reports, from this run's numbers."""
        out.append({"claim": text, "evidence": evidence, "verdict": verdict, "note": "" if verdict == "true" else note})

    def held_by(holds: list, among: list) -> str:
        """true when the claim holds for every model in `among`, else for which ones it does."""
        if len(holds) == len(among):
            return "true"
        return f"true only for {', '.join(holds)}" if holds else "false"

    def median_relative(m):
        return float(np.median([r["relative"] for r in result["weights"][m].values()
                                if "energy_rank_delta" in r and r["fro"] > 0]))

    # 1. distances between token vectors
    static = {m: mean_abs_cos_change(result["vectors"][m]["static"]["cosine_base"],
                                     result["vectors"][m]["static"]["cosine_tuned"]) for m in names}
    ctx = {m: float(np.mean([abs(pair_shift(c, "pairs")) + abs(pair_shift(c, "controls"))
                             for c in result["vectors"][m]["contextual"][1:]]) / 2) for m in names}
    static_moved = [m for m in names if static[m] > COS_CHANGED]
    ctx_moved = [m for m in names if ctx[m] > COS_CHANGED]
    identical = [m for m in names if result["vectors"][m]["static"]["max_abs_change"] == 0]
    verdict = ("true" if len(static_moved) == len(names) and len(ctx_moved) == len(names) else
               f"true for contextual vectors ({', '.join(ctx_moved) or 'none'}); static embeddings moved only for "
               f"{', '.join(static_moved) or 'none'}" if ctx_moved else "false")
    claim(f"Fine-tuning changes the distances between token vectors (mean |Δcos| > {COS_CHANGED}).",
          "; ".join(f"{m}: static {static[m]:.3g}, contextual {ctx[m]:.3g}" for m in names)
          + f". Static embeddings bit-identical: {', '.join(identical) or 'none'}.", verdict)

    # 2. no new vectors; new paths
    shapes = {m: result["weights"][m]["embed.tok"]["shape"] for m in names}
    shifts = {m: [c["mean_shift"] for c in result["vectors"][m]["contextual"]] for m in names}
    same_vocab = len({tuple(s) for s in shapes.values()}) == 1
    paths = all(max(v[1:]) > 0 for v in shifts.values())
    claim("No new vectors appear; existing tokens travel new paths through the layers.",
          f"embedding matrix {shapes[names[0]]} in every model; mean shift of a word's hidden state per layer: "
          + "; ".join(f"{m}: " + ", ".join(f"{x:.2g}" for x in v) for m, v in shifts.items()),
          "true" if same_vocab and paths else "false")

    # 3. bound pairs move closer
    last = {m: result["vectors"][m]["contextual"][-1] for m in names}
    closer = {m: pair_shift(last[m], "pairs") - pair_shift(last[m], "controls") for m in names}
    yes = [m for m in names if closer[m] > 0]
    claim("Concepts trained together move closer (last layer: Δcos of bound pairs minus Δcos of controls > 0).",
          "; ".join(f"{m}: pairs {pair_shift(last[m], 'pairs'):+.3f}, controls "
                    f"{pair_shift(last[m], 'controls'):+.3f}" for m in names),
          held_by(yes, names),
          "The cosines are of hidden states read in the pretraining corpus's contexts. bindings teaches which word "
          "comes next ('justice and' -> 'morality'), which the attention and MLP read-out can learn without pulling "
          f"the two words' own states together: pairs-minus-controls ranges from {min(closer.values()):+.3f} to "
          f"{max(closer.values()):+.3f}, small next to the mean shift of a hidden state at the last layer "
          f"({np.mean([result['vectors'][m]['contextual'][-1]['mean_shift'] for m in names]):.2f}).")

    # 4. attention looks elsewhere
    js = {m: np.asarray(result["vectors"][m]["attention"]["js"]) for m in names}
    top = {m: np.unravel_index(np.argmax(js[m]), js[m].shape) for m in names}
    changed = [m for m in names if js[m].max() > JS_CHANGED]
    claim(f"Attention now looks elsewhere (some head's mean Jensen–Shannon divergence > {JS_CHANGED} nats).",
          "; ".join(f"{m}: max {js[m].max():.3f} (layer {top[m][0]} head {top[m][1]}), mean {js[m].mean():.3f}"
                    for m in names),
          held_by(changed, names))

    # 5. clusters denser
    def silhouettes(m, who):
        return [c[who].get("silhouette", float("nan")) for c in result["vectors"][m]["contextual"]]
    denser = {m: int(np.sum(np.asarray(silhouettes(m, "tuned")) > np.asarray(silhouettes(m, "base"))))
              for m in names}
    n_layers = len(result["vectors"][names[0]]["contextual"])
    yes = [m for m in names if denser[m] > n_layers / 2]
    claim("Semantic clusters become denser (silhouette of concepts/objects/agents higher at most layers).",
          "; ".join(f"{m}: higher at {denser[m]} of {n_layers} layers (last: "
                    f"{silhouettes(m, 'base')[-1]:.3f} -> {silhouettes(m, 'tuned')[-1]:.3f})" for m in names),
          held_by(yes, names),
          "The groups scored (concepts, objects, agents) come from the pretraining corpus; bindings uses concept "
          "words only, in new sentences, so nothing in it separates the three groups further. The last-layer "
          "silhouette changed by "
          f"{np.mean([silhouettes(m, 'tuned')[-1] - silhouettes(m, 'base')[-1] for m in names]):+.3f} on average.")

    # 6. low rank
    def rank_fraction(m):
        w = result["weights"][m]
        moved = [r for r in w.values() if "energy_rank_delta" in r and r["fro"] > 0]
        return float(np.median([r["energy_rank_delta"] / min(r["shape"]) for r in moved])), \
            float(np.median([r["effective_rank_delta"] for r in moved]))
    ranks = {m: rank_fraction(m) for m in names}
    lora_names, full_names = [m for m in names if is_lora[m]], [m for m in names if not is_lora[m]]
    lora_low = all(ranks[m][0] < min(ranks[f][0] for f in full_names) for m in lora_names)
    full_high = all(ranks[f][0] >= 0.25 for f in full_names)
    claim("LoRA's change is low-rank; full fine-tuning's is not (median 90%-energy rank of ΔW as a share of "
          "full rank; 'not low-rank' means ≥ 25%).",
          "; ".join(f"{m}: {100 * ranks[m][0]:.0f}% (effective rank {ranks[m][1]:.1f})" for m in names),
          "true" if lora_low and full_high else ("true only in part: LoRA's change is lower-rank than full's, but "
                                                 "full fine-tuning's change is low-rank too" if lora_low else "false"),
          f"Full fine-tuning took {losses[full_names[0]].get('steps', '?')} small steps (learning rate "
          f"{losses[full_names[0]].get('lr', float('nan')):g}) to reach the matched loss: a few dozen gradients span "
          "few directions, so even an unconstrained update is low-rank at this scale.")

    # 7. intruders
    def intruders(m):
        return sum(r["intruder_count"] for r in result["weights"][m].values() if "intruder_count" in r)
    gaps = [g for r in result["weights"][names[0]].values() if "spectral_gaps_w0" in r for g in r["spectral_gaps_w0"]]
    counts = {m: intruders(m) for m in names}
    more = all(counts[m] > max(counts[f] for f in full_names) for m in lora_names)
    claim("LoRA introduces new high-ranking directions (intruder dimensions, k=10, ε=0.5); full fine-tuning "
          "does not (Shuttleworth et al. 2024).",
          "; ".join(f"{m}: {counts[m]}" for m in names)
          + f". Base spectra: median gap σi/σi+1 among the top 10 = {np.median(gaps):.3f} (near 1 means singular "
            f"vectors are unstable and intruder counts noisy).",
          "true" if more and all(counts[f] == 0 for f in full_names) else
          ("true only in part: LoRA has more intruders than full fine-tuning, which has some too" if more
           else "false"),
          f"The base's top singular values are close together (median gap {np.median(gaps):.3f}): a small update "
          "rotates singular vectors inside such near-degenerate subspaces, and the intruder test cannot tell that "
          f"from a new direction; full fine-tuning's {sum(counts[f] for f in full_names)} intruders are of that kind.")

    # 8. learns less, forgets less
    learn = {m: losses[m]["finetune_loss"] for m in names}
    forget = {m: losses[m]["base_loss"] - losses["base"]["base_loss"] for m in names}
    less = [m for m in lora_names if all(learn[m] >= learn[f] and forget[m] <= forget[f] for f in full_names)]
    claim("LoRA learns less and forgets less (Biderman et al. 2024): higher fine-tuning loss and smaller rise in "
          "base-corpus loss than full fine-tuning.",
          "; ".join(f"{m}: bindings loss {learn[m]:.3f}, associations loss rise {forget[m]:+.3f}" for m in names)
          + f" (base: bindings {losses['base']['finetune_loss']:.3f}, associations {losses['base']['base_loss']:.3f}).",
          held_by(less, lora_names),
          "All variants were stopped at about the same fine-tuning loss, so 'learns less' cannot show here. To get "
          f"there LoRA used a {losses[lora_names[0]].get('lr', float('nan')) / losses[full_names[0]].get('lr', 1):g}x "
          "larger learning rate and moved its matrices further (median relative change "
          + ", ".join(f"{m} {median_relative(m):.2f}" for m in names)
          + "): forgetting follows how far the weights moved more than how many of them could.")
    return out


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], "runs/01_what_changes").parse_args(argv)
    started = time.perf_counter()
    s = common.setup(args.quick, args.seed)
    base, model_cfg, base_data, ft_data = common.base_and_bindings(s)
    # Compare at equal fine-tuning loss: LoRA on q and v (the fewest parameters) trains its full budget;
    # every other variant stops at the first evaluation that reaches the loss it got to.
    tuned, target = [], None
    for name, cfg in sorted(variants(args.quick), key=lambda v: v[0] != "lora-qv-r8"):
        train_cfg = s.finetune if cfg is None else dataclasses.replace(s.finetune, lr=LORA_LR)
        tuned.append(common.finetune(name, base, ft_data, model_cfg, train_cfg, cfg, stop_below=target))
        target = target if target is not None else tuned[-1].log[-1]["eval_loss"]
    tuned.sort(key=lambda t: [v[0] for v in variants(args.quick)].index(t.name))
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
    result["claims"] = claims(result, losses)
    result["losses"] = losses
    result["seconds"] = time.perf_counter() - started
    loss_rows = [(m, v.get("trainable", "—"), v.get("steps", "—"), common.fmt(v["finetune_loss"]),
                  common.fmt(v["base_loss"])) for m, v in losses.items()]
    claim_rows = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(c['claim'])}</td><td><b>{html.escape(c['verdict'])}"
                         f"</b></td><td>{html.escape(c['evidence'])}</td><td>{html.escape(c['note'])}</td></tr>"
                         for i, c in enumerate(result["claims"]))
    page = report.write(Path(args.out), result, title="01 — What changes when I fine-tune, fully or with LoRA?",
                        extra=[("Losses: what each variant learned and forgot",
                                common.table(["model", "trainable parameters", "steps", "bindings loss (fine-tuning)",
                                              "associations loss (pretraining)"], loss_rows)),
                               ("Claims", "<table><tr><th>#</th><th>claim</th><th>verdict</th><th>evidence</th>"
                                          "<th>why it differs from the literature</th></tr>"
                                          f"{claim_rows}</table>")])
    for i, c in enumerate(result["claims"]):
        print(f"{i + 1}. {c['claim']}\n   -> {c['verdict']}")
    print(f"report: {page}  ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    common.restart_with_tunables()  # a speed trick, see minilm/allocator.py
    sys.exit(main())
