"""Compare a base model with its tuned versions: every number the report shows, in one JSON-ready dict.

    weights    per matrix: how far it moved, its spectra, how low-rank the change is, intruder
               dimensions, amplification, DoRA's magnitude/direction split (weights.py)
    vectors    static token embeddings and per-layer contextual vectors of the probe words: cosines,
               distances, neighbours; bound pairs vs controls; cluster scores per layer (geometry.py)
    layers     base-vs-tuned similarity of hidden states, layer by layer: linear and debiased CKA
    attention  per layer and head: Jensen–Shannon divergence of attention rows, entropy change
    lens       the logit lens on a probe sentence: top predictions at every layer, before and after

Tuned models arrive as plain parameter trees (a LoRA model merged first, so "what changed" is
W' - W0 whichever way it was trained); adapters' A matrices may come along for the subspace
similarity of Hu et al. §7.2. This module reads checkpoints' arrays only: it never imports `lora`.

Shapes use the axis letters of minilm/__init__.py; the probe's context windows are the batch B, and
M counts the probe words whose vectors are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minilm.analysis import attention as attention_lib
from minilm.analysis import geometry, lens, seeds, weights
from minilm.config import ModelConfig
from minilm.corpora import Corpus
from minilm.errors import MinilmError
from minilm.model import forward
from minilm.tokenizer import Tokenizer
from minilm.tree import named_leaves


MAX_CKA_ROWS = 1024


@dataclass(frozen=True)
class Model:
    name: str                 # shown in the report: "base", "full", "lora-r8", ...
    params: dict              # plain arrays (a LoRA model merged)
    adapters: dict = field(default_factory=dict)  # {matrix name: A (d_in, R)} for LoRA models


@dataclass(frozen=True)
class Probe:
    words: tuple[str, ...]                      # tokens to follow, all in the vocabulary
    missing: tuple[str, ...]                    # asked for but not in the vocabulary (reported, skipped)
    groups: dict[str, tuple[str, ...]]          # labelled word groups (for cluster scores)
    pairs: tuple[tuple[str, str], ...]          # pairs a fine-tuning corpus binds
    controls: tuple[tuple[str, str], ...]       # pairs it never binds
    sentences: tuple[str, ...]                  # for attention maps and the logit lens
    windows: np.ndarray                         # (B, T) token ids: the contexts vectors are read in


def make_probe(tokenizer: Tokenizer, cfg: ModelConfig, *, corpus: Corpus | None = None, words=(),
               sentences=(), max_tokens: int = 2048) -> Probe:
    """The probe set: the corpus's ground truth (groups, pairs, probe sentences) plus what is asked for.

    Contexts are windows cut from the corpus text (or, without a corpus, from the sentences), at most
    `max_tokens` tokens in all: traces hold (L, B, H, T, T) attention, which grows fast with T.
    """
    groups = {k: tuple(v) for k, v in (corpus.groups.items() if corpus else ())}
    asked = list(dict.fromkeys([*words, *(w for g in groups.values() for w in g),
                                *(w for p in (corpus.pairs + corpus.controls if corpus else ()) for w in p)]))
    known = [w for w in asked if tokenizer.word_ids(w) is not None]  # a BPE spells every word, in sub-tokens
    all_sentences = [*sentences, *(corpus.probes if corpus else ())]
    oov = [t for s in all_sentences for t in tokenizer.tokens(s) if t not in tokenizer.index]
    missing = tuple(dict.fromkeys([*(w for w in asked if w not in known), *oov]))
    # a sentence with a token the model does not know cannot be run; its unknown tokens are in `missing`
    sentences = tuple(s for s in all_sentences if all(t in tokenizer.index for t in tokenizer.tokens(s)))
    if not known and not sentences:
        raise MinilmError("the probe set is empty: none of the words or sentences is in the vocabulary; "
                          "pass --words or --probe text made of the model's tokens")
    if len(known) < 2:  # distances, neighbours and the map are between word vectors
        raise MinilmError(f"the probe set has {len(known)} word(s) the model can spell ({', '.join(known) or 'none'}); "
                          f"the comparison follows at least 2: pass --words W1,W2,... (a model without a built-in "
                          f"corpus, e.g. one from import-hf, has no words of its own)")
    text = corpus.text if corpus else "\n".join(sentences)
    # words alone (no corpus, no sentence) are read in a context made of the words themselves
    ids = tokenizer.encode(text) if text else np.asarray([i for w in known for i in tokenizer.word_ids(w)])
    T = cfg.context
    if len(ids) < T:
        ids = np.resize(ids, T)  # a short probe text repeats to fill one window
    B = max(1, min(max_tokens // T, len(ids) // T))
    windows = ids[: B * T].reshape(B, T)  # (B·T,) -> (B, T)
    keep = lambda g: tuple(w for w in g if w in known)  # noqa: E731
    return Probe(tuple(known), missing, {k: keep(v) for k, v in groups.items() if len(keep(v)) >= 2},
                 tuple(p for p in (corpus.pairs if corpus else ()) if all(w in known for w in p)),
                 tuple(p for p in (corpus.controls if corpus else ()) if all(w in known for w in p)),
                 sentences, windows)


def check_comparable(base_cfg: ModelConfig, base_tok: Tokenizer, cfg: ModelConfig, tok: Tokenizer, name: str):
    if cfg != base_cfg:
        diff = ", ".join(f"{k}: {getattr(base_cfg, k)} vs {getattr(cfg, k)}" for k in base_cfg.__dataclass_fields__
                         if getattr(base_cfg, k) != getattr(cfg, k))
        raise MinilmError(f"cannot compare {name} with the base: the models differ in shape ({diff})")
    if tok != base_tok:
        raise MinilmError(f"cannot compare {name} with the base: their vocabularies differ")


# ---------------------------------------------------------------- weights


def compare_weights(base: dict, tuned: dict, *, k: int = 10, epsilon: float = 0.5) -> dict:
    """{matrix name: weights.weight_report} plus change stats for every vector (biases, LayerNorms)."""
    out = {}
    tuned_leaves = named_leaves(tuned)
    for name, w0 in named_leaves(base).items():
        w = tuned_leaves[name]
        out[name] = (weights.weight_report(w0, w, k=k, epsilon=epsilon) if np.ndim(w0) == 2
                     else weights.change_stats(w0, w))
    return out


def adapter_similarity(a1: dict, a2: dict) -> dict:
    """φ(i, j) grids (Hu et al. §7.2) for every matrix both adapters adapt, with the random baseline."""
    out = {}
    for name in sorted(set(a1) & set(a2)):
        u1, u2 = weights.adapter_directions(a1[name]), weights.adapter_directions(a2[name])
        grid = weights.subspace_similarity(u1, u2)
        d = u1.shape[0]
        baseline = [[weights.random_subspace_baseline(i + 1, j + 1, d) for j in range(grid.shape[1])]
                    for i in range(grid.shape[0])]
        out[name] = {"phi": grid.tolist(), "random_baseline": baseline}
    return out


# ---------------------------------------------------------------- vectors


def _hidden_states(params, windows, cfg):
    """Hidden states at every layer boundary (L+1, B, T, D) and attention probabilities (L, B, H, T, T)."""
    _, trace = forward(params, windows, cfg, trace=True)
    states = np.concatenate([np.asarray(trace["resid_pre"][:1]), np.asarray(trace["resid_post"])])
    return states, np.asarray(trace["attn_probs"])


def occurrences(windows: np.ndarray, span) -> np.ndarray:
    """Where a word's sub-token ids `span` (one id, or a tuple) end in the windows: a (B, T) mask that is true
    at the last sub-token of each whole occurrence (minilm/tokenizer.py says why the last one)."""
    span = (span,) if np.ndim(span) == 0 else tuple(span)
    n, T = len(span), windows.shape[1]
    where = np.zeros(windows.shape, bool)
    if n <= T:  # the sub-token k places before the end must be span[-1 - k], for every k
        where[:, n - 1:] = np.all([windows[:, n - 1 - k: T - k] == span[-1 - k] for k in range(n)], axis=0)
    return where


def word_vectors(states: np.ndarray, windows: np.ndarray, ids: list) -> np.ndarray:
    """Per layer, each word's hidden state averaged over all its occurrences: (L+1, M, D); NaN if absent.

    ids: per word, its token id, or its sub-token ids (a tuple): then the state at its last sub-token."""
    out = np.full((states.shape[0], len(ids), states.shape[-1]), np.nan)
    for j, i in enumerate(ids):
        where = occurrences(windows, i)  # (B, T)
        if where.any():
            out[:, j] = states[:, where].mean(axis=1)
    return out


def _word_geometry(x: np.ndarray, probe: Probe, words: list[str]) -> dict:
    """Pairs, controls and cluster scores of one set of word vectors x (M, D)."""
    present = [w for w, row in zip(words, x) if not np.isnan(row).any()]
    rows = np.array([x[words.index(w)] for w in present])
    out = {"pairs": geometry.pair_report(rows, present, probe.pairs),
           "controls": geometry.pair_report(rows, present, probe.controls)}
    labelled = [(w, g) for g, members in probe.groups.items() for w in members if w in present]
    sizes = [sum(1 for _, g in labelled if g == group) for group in probe.groups]
    if sum(1 for n in sizes if n) >= 2 and max(sizes) >= 2:  # two groups present, one with a pair at least
        xs = np.array([rows[present.index(w)] for w, _ in labelled])
        labels = [g for _, g in labelled]
        out["silhouette"] = geometry.silhouette(xs, labels)
        out["within_between"] = geometry.within_between_ratio(xs, labels)
    return out


def static_vectors(table, ids: list) -> np.ndarray:
    """Each word's static vector (M, D): its token's row of the embedding table (V, D), or the mean of its
    sub-tokens' rows (minilm/tokenizer.py says why)."""
    table = np.asarray(table)
    return np.array([table[span[0]] if len(span) == 1 else table[list(span)].mean(axis=0) for span in ids]
                    ).reshape(len(ids), table.shape[1])


def vectors_at_levels(params, probe: Probe, tokenizer: Tokenizer, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{"static": (M, D), "layer 0": (M, D), ...}: the probe words' static vectors and their contextual vectors
    (averaged over occurrences in the probe's windows; NaN where a word does not occur) at every layer
    boundary: the levels the vector map (analysis/vector_map.py) draws."""
    ids = [tokenizer.word_ids(w) for w in probe.words]
    states, _ = _hidden_states(params, probe.windows, cfg)  # (L + 1, B, T, D)
    layers = word_vectors(states, probe.windows, ids)  # (L + 1, M, D)
    return {"static": static_vectors(params["embed"]["tok"], ids), **{f"layer {i}": x for i, x in enumerate(layers)}}


MAX_NEIGHBOUR_VOCAB = 4096  # beyond this, a (V, V) cosine matrix is too big (GPT-2's: 50257², 20 GB)


def _neighbours(table, tokenizer: Tokenizer, words: list[str], static: np.ndarray, k: int = 5) -> dict:
    """Nearest tokens by cosine: every token's among all (a small vocabulary), else each probe word's (M, D)
    among the whole table, its own sub-tokens left out."""
    table = np.asarray(table)
    if len(tokenizer.vocab) <= MAX_NEIGHBOUR_VOCAB:
        return geometry.nearest_neighbours(table, tokenizer.vocab, k=k)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)  # (V, D)
    out = {}
    for word, x in zip(words, static):
        cosine = unit @ (x / max(np.linalg.norm(x), 1e-12))  # (V,)
        own = set(tokenizer.word_ids(word))
        ranked = [j for j in np.argsort(-cosine, kind="stable")[: k + len(own)] if j not in own][:k]
        out[word] = [(tokenizer.vocab[j], float(cosine[j])) for j in ranked]
    return out


def compare_vectors(base: Model, tuned: Model, probe: Probe, tokenizer: Tokenizer, cfg: ModelConfig,
                    base_states=None) -> dict:
    """Static embeddings, contextual vectors per layer, CKA, attention and logit lens, base vs tuned.

    `base_states`: the base model's `_hidden_states` on the probe, if already computed (compare reuses them)."""
    words = list(probe.words)
    ids = [tokenizer.word_ids(w) for w in words]  # per word, its sub-token ids: one, or several for a BPE
    b_states, b_attn = base_states or _hidden_states(base.params, probe.windows, cfg)
    t_states, t_attn = _hidden_states(tuned.params, probe.windows, cfg)
    static_b = static_vectors(base.params["embed"]["tok"], ids)
    static_t = static_vectors(tuned.params["embed"]["tok"], ids)
    out = {"static": {
        "cosine_base": geometry.cosine_matrix(static_b).tolist(),
        "cosine_tuned": geometry.cosine_matrix(static_t).tolist(),
        "max_abs_change": float(np.max(np.abs(static_t - static_b))) if ids else 0.0,
        "neighbours_base": _neighbours(base.params["embed"]["tok"], tokenizer, words, static_b),
        "neighbours_tuned": _neighbours(tuned.params["embed"]["tok"], tokenizer, words, static_t),
        "base": _word_geometry(static_b, probe, words), "tuned": _word_geometry(static_t, probe, words)}}
    ctx_b, ctx_t = word_vectors(b_states, probe.windows, ids), word_vectors(t_states, probe.windows, ids)
    out["contextual"] = [{"layer": layer, "base": _word_geometry(ctx_b[layer], probe, words),
                          "tuned": _word_geometry(ctx_t[layer], probe, words),
                          "mean_shift": float(np.nanmean(np.linalg.norm(ctx_t[layer] - ctx_b[layer], axis=-1)))}
                         for layer in range(ctx_b.shape[0])]
    # CKA compares the same token positions in both models. Debiased CKA builds (rows, rows) Gram
    # matrices, so at most MAX_CKA_ROWS evenly spaced positions of the N = B·T take part.
    N = b_states.shape[1] * b_states.shape[2]
    rows = np.linspace(0, N - 1, min(N, MAX_CKA_ROWS)).astype(int)
    flat_b = [s.reshape(N, -1)[rows] for s in b_states]  # per layer (B, T, D) -> (N, D) -> (rows, D)
    flat_t = [s.reshape(N, -1)[rows] for s in t_states]
    out["cka"] = {"linear": geometry.cka_matrix(flat_b, flat_t).tolist(),
                  "debiased": geometry.cka_matrix(flat_b, flat_t, debiased=True).tolist()}
    change = attention_lib.attention_change(b_attn, t_attn)
    out["attention"] = {k: np.asarray(v).tolist() for k, v in change.items()}
    if probe.sentences:
        sentence = np.asarray(tokenizer.encode(probe.sentences[0]))[None, : cfg.context]
        out["lens"] = {"sentence": probe.sentences[0], "base": _lens_report(base.params, sentence, tokenizer, cfg),
                       "tuned": _lens_report(tuned.params, sentence, tokenizer, cfg)}
    return out


def _lens_report(params, tokens, tokenizer, cfg):
    _, trace = forward(params, tokens, cfg, trace=True)
    logits = lens.logit_lens(params, trace, cfg)
    return {"top": lens.top_predictions(logits, tokenizer, position=tokens.shape[1] - 1, k=3),
            "attention": np.asarray(trace["attn_probs"][:, 0]).tolist()}  # (L, H, T, T)


def compare(base: Model, tuned: list[Model], probe: Probe, tokenizer: Tokenizer, cfg: ModelConfig, *,
            k: int = 10, epsilon: float = 0.5, progress=lambda what: None) -> dict:
    """Everything, for every tuned model against the base. `progress(what)` is called before each part."""
    names = [m.name for m in tuned]
    if len(set(names)) != len(names) or "base" in names:
        raise MinilmError(f"tuned models need distinct names other than 'base'; got {names}")
    result = {"models": names, "probe": {"words": list(probe.words), "missing": list(probe.missing),
                                         "groups": {g: list(v) for g, v in probe.groups.items()},
                                         "pairs": [list(p) for p in probe.pairs],
                                         "controls": [list(p) for p in probe.controls],
                                         "sentences": list(probe.sentences), "windows": list(probe.windows.shape)},
              "weights": {}, "vectors": {}, "adapters": {}}
    base_states = _hidden_states(base.params, probe.windows, cfg)
    for model in tuned:
        progress(f"weights of {model.name}")
        result["weights"][model.name] = compare_weights(base.params, model.params, k=k, epsilon=epsilon)
        progress(f"vectors of {model.name}")
        result["vectors"][model.name] = compare_vectors(base, model, probe, tokenizer, cfg, base_states)
    with_adapters = [m for m in tuned if m.adapters]
    for i, m1 in enumerate(with_adapters):
        for m2 in with_adapters[i + 1:]:
            progress(f"subspaces of {m1.name} and {m2.name}")
            result["adapters"][f"{m1.name} vs {m2.name}"] = adapter_similarity(m1.adapters, m2.adapters)
    result["summary"] = summarise(result)
    return result


# ---------------------------------------------------------------- the plain-language summary, over seeds

# The two sentences that are verdicts, each a claim with a threshold fixed here, before any run:
# (key, claim text, threshold, the claim holds when the mean is above it)
LOW_RANK = ("rank_fraction", "the change is low-rank: the median changed matrix needs under 25% of its full rank "
            "for 90% of ||ΔW||²", 0.25, False)
CLOSER = ("pairs_minus_controls", "bound pairs move closer than control pairs at the last layer: their mean cosine "
          "change minus the controls' is above 0", 0.0, True)


def _mean_cos(rows) -> float:
    return float(np.mean([r["cosine"] for r in rows])) if rows else float("nan")


def verdict_numbers(result: dict, model: str) -> dict[str, float]:
    """The numbers one run gives the verdict sentences for `model`: the median changed matrix's 90%-energy
    rank as a fraction of its full rank, and (bound pairs' − controls' mean cosine change) at the last
    layer; a key is missing when the run has no such number (no matrix changed, no bound pairs)."""
    out = {}
    changed = [r for r in result["weights"][model].values() if "energy_rank_delta" in r and r["fro"] > 0]
    if changed:
        out["rank_fraction"] = float(np.median([r["energy_rank_delta"] / min(r["shape"]) for r in changed]))
    last = result["vectors"][model]["contextual"][-1]
    if last["base"]["pairs"] and last["base"]["controls"]:
        d_pairs = _mean_cos(last["tuned"]["pairs"]) - _mean_cos(last["base"]["pairs"])
        d_ctrl = _mean_cos(last["tuned"]["controls"]) - _mean_cos(last["base"]["controls"])
        out["pairs_minus_controls"] = d_pairs - d_ctrl
    return out


def over_seeds(runs: list[dict]) -> dict:
    """The verdict sentences' numbers per seed and their verdicts (minilm.analysis.seeds: mean, 95% t
    interval, t-test against the claim's threshold, Holm over every finding of this comparison).

    runs: one `compare` result per seed, the same tuned models in the same order; names are the first
    run's. Returns {"values": {model: {key: [per seed]}}, "claims": seeds.judge's output}."""
    names = runs[0]["models"]
    values = {}
    for i, model in enumerate(names):
        per_run = [verdict_numbers(r, r["models"][i]) for r in runs]
        values[model] = {key: [n[key] for n in per_run] for key in per_run[0] if all(key in n for n in per_run)}
    claims = [{"claim": text, "findings": [seeds.finding(model, values[model][key], threshold, above=above)
                                           for model in names if key in values[model]]}
              for key, text, threshold, above in (LOW_RANK, CLOSER)]
    claims = [c for c in claims if c["findings"]]
    return {"values": values, "claims": seeds.judge(claims) if len(runs) > 1 else []}


def _verdict_sentences(runs: list[dict], model: str, seeds_result: dict) -> list[str]:
    """The low-rank and closer-than sentences: with one seed the numbers and that one seed settles nothing;
    with several the mean, its interval and the verdict, or "not settled by N seeds"."""
    n, values, lines = len(runs), seeds_result["values"][model], []
    rows = {c["claim"]: next((r for r in c["findings"] if r["label"] == model), None) for c in seeds_result["claims"]}
    words = {"rank_fraction": ("the change is low-rank", "the change is spread over many directions",
                               "whether the change is low-rank (median matrix under 25% of its full rank)"),
             "pairs_minus_controls": ("bound pairs moved closer than the controls",
                                      "bound pairs moved less close than the controls",
                                      "whether bound pairs move closer than the controls")}
    what = {"rank_fraction": "the median changed matrix's 90%-energy rank, as a share of its full rank",
            "pairs_minus_controls": "bound pairs' mean cosine change minus the controls' at the last layer"}
    for key, text, threshold, _ in (LOW_RANK, CLOSER):
        if key not in values:
            continue
        if n == 1:
            lines.append(f"{what[key][0].upper() + what[key][1:]}: {values[key][0]:+.3f} (threshold {threshold:g}); "
                         "one seed settles nothing: a verdict needs several seeds.")
            continue
        row = rows[text]
        yes, no, unsure = words[key]
        said = {"true": yes, "false": no}.get(row["verdict"], f"{unsure} is {row['verdict']}")
        lines.append(f"Over {n} seeds, {what[key]}: {row['mean']:+.3g} [{row['low']:+.3g}, {row['high']:+.3g}] "
                     f"(mean, 95% t interval; threshold "
                     f"{threshold:g}, Holm p {row['p_holm']:.2g}): {said}.")
    return lines


def summarise(result: dict, runs: list[dict] | None = None) -> dict[str, list[str]]:
    """Per tuned model, a few sentences computed from the numbers (nothing here is hard-coded).

    Descriptions (what moved most, intruders, embeddings, silhouette, attention) are `result`'s, one run.
    The two verdicts (low-rank; bound pairs closer than controls) are judged over `runs`, one `compare`
    result per seed with `result` first (GUIDE.md §6): with one run they print only the numbers."""
    runs = runs or [result]
    seeds_result = over_seeds(runs)
    out = {}
    for model in result["models"]:
        lines = []
        w = result["weights"][model]
        matrices = {n: r for n, r in w.items() if "energy_rank_delta" in r}
        changed = {n: r for n, r in matrices.items() if r["fro"] > 0}
        still = sum(1 for r in w.values() if r["fro"] == 0)
        if not changed:
            lines.append("No weight matrix changed.")
        else:
            top = sorted(changed, key=lambda n: -changed[n]["relative"])[:3]
            lines.append("Moved most (relative change ||ΔW||/||W0||): " + ", ".join(
                f"{n} ({100 * changed[n]['relative']:.1f}%)" for n in top)
                + f". {still} of {len(w)} tensors are exactly unchanged.")
            median_rank = float(np.median([r["energy_rank_delta"] for r in changed.values()]))
            lines.append(f"The median changed matrix needs {median_rank:g} directions for 90% of ||ΔW||².")
            intruders = {n: r["intruder_count"] for n, r in changed.items() if r["intruder_count"]}
            lines.append(f"{sum(intruders.values())} intruder dimension(s) appeared"
                         + (f", in {', '.join(sorted(intruders))}." if intruders else "."))
        v = result["vectors"][model]
        static = v["static"]
        lines.append("Static token embeddings are bit-identical to the base." if static["max_abs_change"] == 0
                     else f"Static token embeddings changed (largest |Δ| {static['max_abs_change']:.3g}).")
        last = v["contextual"][-1]
        if last["base"]["pairs"]:
            d_pairs = _mean_cos(last["tuned"]["pairs"]) - _mean_cos(last["base"]["pairs"])
            d_ctrl = _mean_cos(last["tuned"]["controls"]) - _mean_cos(last["base"]["controls"])
            lines.append(f"At the last layer, bound pairs' cosine changed by {d_pairs:+.3f} on average, "
                         f"control pairs' by {d_ctrl:+.3f}.")
        if "silhouette" in last["base"]:
            lines.append(f"Word-group silhouette at the last layer: {last['base']['silhouette']:.3f} -> "
                         f"{last['tuned']['silhouette']:.3f}.")
        js = np.asarray(v["attention"]["js"])  # (L, H)
        layer, head = np.unravel_index(np.argmax(js), js.shape)
        lines.append(f"Attention changed most in layer {layer} head {head} (Jensen-Shannon {js.max():.3f} nats; "
                     f"mean over heads {js.mean():.3f}).")
        out[model] = lines + _verdict_sentences(runs, model, seeds_result)
    return out
