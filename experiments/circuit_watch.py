"""Watching circuits form (experiment 06): fixed held-out windows, the scores of minilm/analysis/circuits.py
measured on them every few steps of training, and what is read off those curves afterwards.

A measurement is a dict: step, train_loss (mean since the last one), loss (the probe's), icl (the
in-context score), previous and induction ((L, H) lists, every head's score) and, while training,
probs (L, H, T, T) of the first window, for the attention maps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from minilm import corpora, train
from minilm.analysis import circuits
from minilm.config import ModelConfig
from minilm.data import Dataset, batches
from minilm.model import forward
from minilm.tree import combine


@dataclass(frozen=True)
class Probe:
    """Fixed held-out windows and what the scores compare them with."""

    tokens: np.ndarray          # (B, T) inputs
    targets: np.ndarray         # (B, T) the next tokens
    ideal: np.ndarray           # (B, T, T) ideal induction pattern on the repeated tokens' rows
    target_halves: np.ndarray   # (B, T) 1 first half, 2 repeat, 0 neither (of each target)


def make_probe(dataset: Dataset, context: int, count: int) -> Probe:
    newline = int(dataset.tokenizer.encode(corpora.NEWLINE)[0])
    windows = np.asarray(batches(jnp.asarray(dataset.val), jax.random.key(123), 0, count=1, batch_size=count,
                                 context=context)[0])  # (B, T + 1)
    halves = np.stack([corpora.induction_halves(w, newline) for w in windows])  # (B, T + 1)
    ideal = np.stack([corpora.induction_attention(w[:-1]) for w in windows])  # (B, T, T)
    return Probe(windows[:, :-1], windows[:, 1:], circuits.induction_ideal(ideal, halves[:, :-1]), halves[:, 1:])


@functools.cache
def _traced(cfg: ModelConfig):
    def run(params, tokens, targets):
        logits, trace = forward(params, tokens, cfg, trace=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets), trace["attn_probs"]
    return jax.jit(run)


def measure(params, cfg: ModelConfig, probe: Probe, keep_probs: bool = False) -> dict:
    """Per head (L, H): previous-token and induction scores; the in-context score and the probe's loss."""
    losses, probs = _traced(cfg)(params, probe.tokens, probe.targets)  # (B, T), (L, B, H, T, T)
    losses, probs = np.asarray(losses), np.asarray(probs)
    out = {"previous": circuits.previous_token_score(probs).tolist(),
           "induction": circuits.pattern_score(probs, probe.ideal).tolist(),
           "icl": circuits.in_context_score(losses, probe.target_halves), "loss": float(losses.mean())}
    if keep_probs:
        out["probs"] = probs[:, 0]  # (L, H, T, T): the first window, for the attention maps
    return out


def best_induction(m: dict) -> float:
    return float(np.max(m["induction"][-1]))  # the last layer: an induction head needs a layer before it


def watched(name: str, trainable, frozen, dataset, cfg, train_cfg, loss, probe, every, plain=lambda p: p):
    """Train, measuring every `every` steps (and at step 0) -> (params, [measurement with step and the
    mean training loss since the last one])."""
    state = train.start(trainable, frozen, train_cfg, key=jax.random.key(train_cfg.seed + 1))
    curve = [{"step": 0, "train_loss": None, **measure(plain(combine(trainable, frozen)), cfg, probe, True)}]
    since = []
    with tqdm(total=train_cfg.steps, desc=name, unit="step", leave=False) as bar:
        for state, metrics in train.run(state, dataset, cfg, train_cfg, loss):
            since.append(metrics["loss"])
            if metrics["step"] % every == 0 or metrics["step"] == train_cfg.steps:
                # measured now: the next step updates state.trainable in place (train.run)
                m = measure(plain(combine(state.trainable, state.frozen)), cfg, probe, True)
                curve.append({"step": metrics["step"], "train_loss": float(np.mean(since)), **m})
                since = []
            bar.update(1)
        params = jax.tree.map(jnp.copy, plain(combine(state.trainable, state.frozen)))
    return params, curve


def transition(curve: list[dict], steps: int) -> dict:
    """When and how fast the best last-layer induction score rose, and when the in-context score fell.

    rise = final - initial score; t10, t50, t90 the first measured steps at 10%, 50%, 90% of it; width =
    (t90 - t10) / steps, 1 when the score never rose by 0.1 (no transition to time). The in-context score's
    t50 likewise, halfway down its fall."""
    s = np.array([best_induction(m) for m in curve])
    icl = np.array([m["icl"] for m in curve])
    t = np.array([m["step"] for m in curve])

    def first(mask):
        return int(t[np.argmax(mask)]) if mask.any() else None

    rise, fall = s[-1] - s[0], icl[0] - icl[-1]
    out = {"rise": float(rise), "fall": float(fall)}
    if rise < 0.1:
        return {**out, "t10": None, "t50": None, "t90": None, "width": 1.0, "icl_t50": None, "apart": 1.0}
    t10, t50, t90 = (first(s >= s[0] + q * rise) for q in (0.1, 0.5, 0.9))
    icl_t50 = first(icl <= icl[0] - 0.5 * fall) if fall > 0 else None
    apart = 1.0 if icl_t50 is None else abs(icl_t50 - t50) / steps
    return {**out, "t10": t10, "t50": t50, "t90": t90, "width": (t90 - t10) / steps, "icl_t50": icl_t50,
            "apart": apart}


def composition(params, cfg, probe, final: dict) -> dict:
    """Remove each layer-0 head in turn and measure the best last-layer induction score and the in-context
    score again; the claim reads the head with the highest previous-token score and, as a control, the lowest."""
    prev = np.asarray(final["previous"][0])
    removed = [measure(circuits.without_head(params, 0, h, cfg.head_size), cfg, probe) for h in range(cfg.heads)]
    out = {"before": best_induction(final), "icl_before": final["icl"],
           "drops": [best_induction(final) - best_induction(m) for m in removed]}  # every layer-0 head, for the table
    for role, head in (("previous", int(prev.argmax())), ("control", int(prev.argmin()))):
        out[role] = {"head": head, "induction": best_induction(removed[head]), "icl": removed[head]["icl"],
                     "drop": out["drops"][head]}
    return out


def relative_change(base, tuned) -> dict[str, float]:
    """||W - W0||_F / ||W0||_F of every attention matrix and the embeddings."""
    out = {f"embed.{k}": float(jnp.linalg.norm(tuned["embed"][k] - base["embed"][k]) / jnp.linalg.norm(base["embed"][k]))
           for k in ("tok", "pos")}
    for i, (b, t) in enumerate(zip(base["blocks"], tuned["blocks"])):
        for k in ("q", "k", "v", "o"):
            w0, w = b["attn"][k]["w"], t["attn"][k]["w"]
            out[f"blocks.{i}.attn.{k}"] = float(jnp.linalg.norm(w - w0) / jnp.linalg.norm(w0))
    return out


def without_probs(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "probs"}


def maps_at(curve, tr) -> dict:
    """Attention maps (L, H, T, T) of the first probe window before, during and after the transition
    (at t10 minus one measurement, t50, the end; without a transition: the start, the middle, the end)."""
    steps = [m["step"] for m in curve]
    if tr["t50"] is None:
        chosen = {"before": steps[0], "during": steps[len(steps) // 2], "after": steps[-1]}
    else:
        chosen = {"before": steps[max(0, steps.index(tr["t10"]) - 1)], "during": tr["t50"], "after": steps[-1]}
    return {k: {"step": s, "probs": curve[steps.index(s)]["probs"]} for k, s in chosen.items()}
