"""The numbers of the map of word vectors moving (minilm/report_map.py draws them): JSON-ready, for metrics.json.

For the probe words, at every level (the static embedding, then every layer boundary), the base and each
tuned variant at every kept training step:

    xy           places on the map, one projection per level fitted on all those states (projection.py)
    partner_cos  each word's true (D-dimensional) cosine to its partner: the other word of its bound pair
                 or control pair (None for a word in neither)
    self_cos     each word's cosine to its own base vector at that level: how far it really turned
    neighbours   each word's nearest probe words by cosine (NEIGHBOURS of them)

Step 0 of every variant is the base. A variant's states are read from its snapshots (experiments/common.py
keeps them every K steps); nothing here knows how a state was trained. Pure NumPy.

Shapes: M probe words, D width; `states[variant][step][level]` is (M, D).
"""

from __future__ import annotations

import numpy as np

from minilm.analysis import projection

NEIGHBOURS = 3
DIGITS = 4  # places and cosines are rounded to 4 decimals: ample for a picture, and metrics.json stays small


def _cosines(x: np.ndarray) -> np.ndarray:
    """(M, D) -> (M, M) cosine similarities; a zero or NaN row gives NaN."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = x / norm
    return unit @ unit.T  # (M, D) @ (D, M) -> (M, M)


def _round(a) -> list:
    """Rounded, with NaN as None (JSON has no NaN)."""
    a = np.round(np.asarray(a, dtype=np.float64), DIGITS)
    return np.where(np.isnan(a), None, a).tolist()


def partners(words: list[str], pairs, controls) -> tuple[list[int], list[str]]:
    """Each word's partner (its index, -1 if none) and role ("bound", "control" or "")."""
    index = {w: i for i, w in enumerate(words)}
    partner, role = [-1] * len(words), [""] * len(words)
    for kind, rows in (("bound", pairs), ("control", controls)):
        for a, b in rows:
            if a in index and b in index:
                partner[index[a]], partner[index[b]] = index[b], index[a]
                role[index[a]] = role[index[b]] = kind
    return partner, role


def build(words: list[str], groups: dict[str, list[str]], pairs, controls, base: dict[str, np.ndarray],
          states: dict[str, dict[int, dict[str, np.ndarray]]]) -> dict:
    """The map's data.

    Args:
        words: the probe words (M).
        groups: {group name: its words}; a word in no group is drawn grey.
        pairs, controls: (a, b) word pairs the fine-tuning corpus binds, and their controls.
        base: {level: (M, D)} the base model's vectors; levels in drawing order ("static", "layer 0", ...).
        states: {variant: {step: {level: (M, D)}}}, the same steps for every variant (step 0 may be left out:
            it is the base).
    Returns:
        {"words", "group", "groups", "partner", "role", "dimensions" (D), "levels", "variants", "steps",
         "variance_share", "bounds" (the map's x and y limits per level, over every state), "xy", "partner_cos",
         "self_cos", "neighbours"}; the last four per level and variant, a list over steps of one entry per word.
    """
    variants = list(states)
    steps = sorted({0, *next(iter(states.values()))})
    for v in variants:
        if sorted({0, *states[v]}) != steps:
            raise ValueError(f"variant {v} kept steps {sorted(states[v])}, the others {steps}: keep the same steps")
    levels = list(base)
    group_of = {w: g for g, members in groups.items() for w in members}
    partner, role = partners(words, pairs, controls)
    out = {"words": list(words), "group": [group_of.get(w, "") for w in words], "groups": list(groups),
           "partner": partner, "role": role, "dimensions": int(np.shape(base[levels[0]])[1]),
           "levels": levels, "variants": variants, "steps": steps,
           "variance_share": {}, "bounds": {}, "xy": {}, "partner_cos": {}, "self_cos": {}, "neighbours": {}}
    has_partner = np.asarray(partner) >= 0
    rows = np.arange(len(words))
    for level in levels:
        at = {v: [np.asarray(base[level] if s == 0 else states[v][s][level], dtype=np.float64) for s in steps]
              for v in variants}  # {variant: [(M, D) per step]}
        proj = projection.fit([at[v][i] for v in variants for i in range(len(steps))])
        out["variance_share"][level] = round(proj.variance_share, DIGITS)
        xy = {v: [projection.project(proj, x) for x in at[v]] for v in variants}  # (M, 2) per step
        every = np.concatenate([p for v in variants for p in xy[v]])
        low, high = np.nanmin(every, axis=0), np.nanmax(every, axis=0)
        pad = 0.08 * np.maximum(high - low, 1e-9)
        out["bounds"][level] = _round([low[0] - pad[0], high[0] + pad[0], low[1] - pad[1], high[1] + pad[1]])
        out["xy"][level] = {v: [_round(p) for p in xy[v]] for v in variants}
        out["partner_cos"][level], out["self_cos"][level], out["neighbours"][level] = {}, {}, {}
        b = at[variants[0]][0]  # the base at this level (M, D)
        for v in variants:
            pc, sc, nb = [], [], []
            for x in at[v]:
                cos = _cosines(x)  # (M, M)
                pc.append(_round(np.where(has_partner, cos[rows, np.maximum(partner, 0)], np.nan)))
                sc.append(_round(np.sum(b * x, axis=1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(x, axis=1))))
                ranked = np.argsort(-np.where(np.eye(len(words), dtype=bool), -np.inf, np.nan_to_num(cos, nan=-2)),
                                    axis=1, kind="stable")
                nb.append(ranked[:, :NEIGHBOURS].tolist())
            out["partner_cos"][level][v], out["self_cos"][level][v], out["neighbours"][level][v] = pc, sc, nb
    return out
