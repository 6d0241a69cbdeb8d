"""Oracle tests for minilm.analysis.geometry, .attention and .lens.

Each measure is checked against an independent plain-NumPy reference written here another way (loops
over pairs, the Gram-matrix form of CKA with an explicit centring matrix, Kornblith's U-centring for
the unbiased HSIC, the entropy form of Jensen–Shannon) and against properties that must hold exactly
(CKA(X, X) = 1, invariance to rotation and scaling, JS of equal rows = 0, JS of disjoint rows = ln 2,
the logit lens's last layer = the model's logits).

Sizes are small and pairwise distinct so that a swapped axis cannot pass (letters as declared in
minilm/__init__.py): M 9 points, D 5 / 7 for geometry; L 2, B 3, H 5, T 7 for attention; B 2, H 3, K 4,
L 5, T 7, V 11, D 12 for the model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm.analysis import attention, geometry, lens
from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import forward, init, layer_norm
from minilm.tokenizer import Tokenizer

M, D1, D2 = 9, 5, 7
LN2 = math.log(2.0)


def random_rows(seed: int, n: int = M, d: int = D1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


# ---------------------------------------------------------------- references, written independently


def ref_cosine(u, v) -> float:
    nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(b * b for b in v))
    return 0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv)


def ref_distance(u, v) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))


def ref_linear_cka(x, y) -> float:
    """Gram form: HSIC(K, L) ∝ tr(K H L H), H = I - 11ᵀ/n (Gretton et al. 2005)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def ref_debiased_cka(x, y) -> float:
    """Kornblith's reference code: U-centre each Gram matrix (Székely & Rizzo 2014), then cosine of the two."""

    def u_centre(g):
        n = g.shape[0]
        g = g.copy()
        np.fill_diagonal(g, 0.0)
        means = g.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None]
        g -= means[None, :]
        np.fill_diagonal(g, 0.0)
        return g

    k, l = u_centre(x @ x.T), u_centre(y @ y.T)
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def ref_silhouette(x, labels) -> float:
    n = len(labels)
    total = 0.0
    for i in range(n):
        own = [ref_distance(x[i], x[j]) for j in range(n) if j != i and labels[j] == labels[i]]
        if not own:
            continue  # a singleton scores 0
        a = sum(own) / len(own)
        b = min(
            np.mean([ref_distance(x[i], x[j]) for j in range(n) if labels[j] == other])
            for other in set(labels) if other != labels[i]
        )
        total += (b - a) / max(a, b)
    return total / n


def ref_within_between(x, labels) -> float:
    within, between = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            (within if labels[i] == labels[j] else between).append(ref_distance(x[i], x[j]))
    return float(np.mean(within) / np.mean(between))


def ref_entropy(row) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


def ref_js(p, q) -> float:
    """The entropy form: JS = H((p + q)/2) - (H(p) + H(q))/2."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return ref_entropy(m) - (ref_entropy(p) + ref_entropy(q)) / 2


def causal_probs(seed: int, shape=(2, 3, 5, 7, 7)) -> np.ndarray:
    """Random (L, B, H, T, S) attention rows with the causal mask's zeros."""
    scores = 2.0 * np.random.default_rng(seed).normal(size=shape)
    t = shape[-1]
    scores = np.where(np.tril(np.ones((t, t), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- pairwise


def test_cosine_matrix_matches_loop_and_zero_rows_give_zero():
    x = random_rows(0)
    x[3] = 0.0
    c = geometry.cosine_matrix(jnp.asarray(x, jnp.float32))  # jax input, float32
    assert c.dtype == np.float64 and c.shape == (M, M) and not np.isnan(c).any()
    x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    want = np.array([[ref_cosine(u, v) for v in x32] for u in x32])
    np.testing.assert_allclose(c, want, atol=1e-12)
    assert (c[3] == 0).all() and (c[:, 3] == 0).all()


def test_distance_matrix_matches_loop():
    x = random_rows(1, d=D2)
    d = geometry.distance_matrix(x)
    want = np.array([[ref_distance(u, v) for v in x] for u in x])
    np.testing.assert_allclose(d, want, rtol=1e-12, atol=1e-12)
    assert (np.diag(d) == 0).all() and (d == d.T).all()


def test_distance_matrix_keeps_precision_for_a_tight_cluster_far_from_the_origin():
    """Points 1e-4 apart around a centre 1e4 away: |a|² + |b|² - 2a·b subtracts numbers near 1e8 to get
    ones near 1e-8, so float64 keeps no digit of them; differences (the reference) and centring do."""
    x = 1e4 + 1e-4 * random_rows(3, d=D2)  # (M, D2)
    want = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)  # (M, M) from explicit differences
    np.testing.assert_allclose(geometry.distance_matrix(x), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_neighbours_matches_sorting(metric):
    x = random_rows(2)
    labels = [f"w{i}" for i in range(M)]
    got = geometry.nearest_neighbours(x, labels, k=4, metric=metric)
    for i, label in enumerate(labels):
        if metric == "cosine":
            scored = sorted(((-ref_cosine(x[i], x[j]), j) for j in range(M) if j != i))
            want = [(labels[j], -s) for s, j in scored[:4]]
        else:
            scored = sorted(((ref_distance(x[i], x[j]), j) for j in range(M) if j != i))
            want = [(labels[j], s) for s, j in scored[:4]]
        assert [w for w, _ in got[label]] == [w for w, _ in want]
        np.testing.assert_allclose([s for _, s in got[label]], [s for _, s in want], atol=1e-12)


def test_nearest_neighbours_rejects_bad_input():
    x = random_rows(3)
    with pytest.raises(MinilmError, match="distinct labels"):
        geometry.nearest_neighbours(x, ["a"] * M)
    with pytest.raises(MinilmError, match="labels for"):
        geometry.nearest_neighbours(x, ["a", "b"])
    with pytest.raises(MinilmError, match="metric"):
        geometry.nearest_neighbours(x, [str(i) for i in range(M)], metric="manhattan")


def test_pair_report_matches_loop_and_skips_missing_words():
    x = random_rows(4)
    labels = [f"w{i}" for i in range(M)]
    report = geometry.pair_report(x, labels, [("w0", "w5"), ("w1", "absent"), ("w8", "w2")])
    assert [(r["a"], r["b"]) for r in report] == [("w0", "w5"), ("w8", "w2")]
    for r in report:
        u, v = x[labels.index(r["a"])], x[labels.index(r["b"])]
        assert r["cosine"] == pytest.approx(ref_cosine(u, v), abs=1e-12)
        assert r["distance"] == pytest.approx(ref_distance(u, v), abs=1e-12)


# ---------------------------------------------------------------- CKA


def test_linear_cka_matches_gram_form():
    x, y = random_rows(5, d=D1), random_rows(6, d=D2) + 3.0  # different widths, an offset to centre away
    assert geometry.linear_cka(x, y) == pytest.approx(ref_linear_cka(x, y), rel=1e-10)


def test_debiased_cka_matches_u_centring():
    x, y = random_rows(7, d=D1), random_rows(8, d=D2)
    y[:, :D1] += 0.8 * x  # related, so the value is not just noise around 0
    assert geometry.debiased_cka(x, y) == pytest.approx(ref_debiased_cka(x, y), rel=1e-10)


@pytest.mark.parametrize("cka", [geometry.linear_cka, geometry.debiased_cka])
def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scaling(cka):
    x, y = random_rows(9, d=D2), random_rows(10, d=D1)
    q, _ = np.linalg.qr(np.random.default_rng(11).normal(size=(D2, D2)))  # a random orthogonal matrix
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x @ q, x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x @ q, y) == pytest.approx(cka(x, y), abs=1e-12)
    assert cka(3.0 * x, y) == pytest.approx(cka(x, y), abs=1e-12)


def test_linear_cka_of_unrelated_small_samples_is_below_one_and_debiased_is_lower():
    x, y = random_rows(12, d=D1), random_rows(13, d=D2)
    linear = geometry.linear_cka(x, y)
    assert 0.0 < linear < 1.0
    assert geometry.debiased_cka(x, y) < linear  # the bias of the plain estimator at small M


def test_cka_rejects_bad_input():
    with pytest.raises(MinilmError, match="at least 4"):
        geometry.debiased_cka(random_rows(14, n=3), random_rows(15, n=3))
    with pytest.raises(MinilmError, match="same inputs"):
        geometry.linear_cka(random_rows(16, n=M), random_rows(17, n=M - 1))
    with pytest.raises(MinilmError, match="constant"):
        geometry.linear_cka(np.ones((M, D1)), random_rows(18))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_shape_entries_and_symmetry(debiased):
    xs = [random_rows(20 + i, d=d) for i, d in enumerate((D1, D2, 3))]
    cka = geometry.debiased_cka if debiased else geometry.linear_cka
    m = geometry.cka_matrix(xs, xs[:2], debiased=debiased)
    assert m.shape == (3, 2)
    np.testing.assert_allclose(m, [[cka(x, y) for y in xs[:2]] for x in xs], atol=1e-14)
    square = geometry.cka_matrix(xs, xs, debiased=debiased)
    np.testing.assert_allclose(square, square.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(square), 1.0, atol=1e-12)


# ---------------------------------------------------------------- clusters


def test_silhouette_and_ratio_match_loops_with_a_singleton_cluster():
    x = random_rows(30, n=11, d=D2)
    labels = ["a", "b", "a", "c", "b", "a", "b", "b", "a", "a", "b"]  # "c" is a singleton
    assert geometry.silhouette(x, labels) == pytest.approx(ref_silhouette(x, labels), abs=1e-12)
    assert geometry.within_between_ratio(x, labels) == pytest.approx(ref_within_between(x, labels), abs=1e-12)


def test_well_separated_clusters_score_near_perfect():
    rng = np.random.default_rng(31)
    centres = np.array([[0.0] * D1, [100.0] + [0.0] * (D1 - 1)])
    ids = np.array([0] * 5 + [1] * 7)
    x = centres[ids] + rng.normal(size=(12, D1))  # spread 1, centres 100 apart
    labels = [("left", "right")[i] for i in ids]
    assert geometry.silhouette(x, labels) > 0.95
    assert geometry.within_between_ratio(x, labels) < 0.05


def test_cluster_scores_need_two_clusters():
    with pytest.raises(MinilmError, match="2 distinct labels"):
        geometry.silhouette(random_rows(32), ["a"] * M)
    with pytest.raises(MinilmError, match="at least 2 points"):
        geometry.within_between_ratio(random_rows(33, n=3), ["a", "b", "c"])


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_entropy_of_uniform_is_log_n(n):
    assert attention.entropy(np.full(n, 1.0 / n)) == pytest.approx(math.log(n), abs=1e-14)


def test_entropy_matches_loop_and_handles_zeros():
    p = causal_probs(40)
    with np.errstate(all="raise"):  # 0·log 0 must not even warn
        h = attention.entropy(p)
    assert h.shape == p.shape[:-1]
    want = np.array([ref_entropy(row) for row in p.reshape(-1, p.shape[-1])]).reshape(h.shape)
    np.testing.assert_allclose(h, want, atol=1e-12)
    assert attention.entropy(np.array([0.0, 1.0, 0.0])) == 0.0


def test_js_divergence_matches_entropy_form_and_is_symmetric():
    p, q = causal_probs(41), causal_probs(42)
    js = attention.js_divergence(p, q)
    rows = zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]))
    np.testing.assert_allclose(js.reshape(-1), [ref_js(a, b) for a, b in rows], atol=1e-12)
    assert (js == attention.js_divergence(q, p)).all()
    assert (js >= 0).all() and (js <= LN2).all()


def test_js_divergence_of_equal_rows_is_zero_and_of_disjoint_rows_is_ln2():
    p = causal_probs(43)
    assert (attention.js_divergence(p, p) == 0).all()
    a, b = np.array([0.2, 0.8, 0.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.5, 0.25, 0.25])
    assert attention.js_divergence(a, b) == pytest.approx(LN2, abs=1e-15)


def test_attention_change_matches_loop():
    base, tuned = causal_probs(44), causal_probs(45)
    change = attention.attention_change(base, tuned)
    L, B, H, T, _ = base.shape
    for key in ("js", "entropy_base", "entropy_tuned", "entropy_change"):
        assert np.shape(change[key]) == (L, H)
    for layer in range(L):
        for head in range(H):
            pairs = [(base[layer, b, head, t], tuned[layer, b, head, t]) for b in range(B) for t in range(T)]
            assert change["js"][layer][head] == pytest.approx(np.mean([ref_js(p, q) for p, q in pairs]), abs=1e-12)
            e_base = np.mean([ref_entropy(p) for p, _ in pairs])
            e_tuned = np.mean([ref_entropy(q) for _, q in pairs])
            assert change["entropy_base"][layer][head] == pytest.approx(e_base, abs=1e-12)
            assert change["entropy_change"][layer][head] == pytest.approx(e_tuned - e_base, abs=1e-12)


def test_attention_change_of_identical_probs_is_zero():
    p = causal_probs(46)
    change = attention.attention_change(p, p.copy())
    assert (np.asarray(change["js"]) == 0).all() and (np.asarray(change["entropy_change"]) == 0).all()
    with pytest.raises(MinilmError, match="one shape"):
        attention.attention_change(p, p[:, :, :, :-1, :-1])


# ---------------------------------------------------------------- logit lens

V, CONTEXT, WIDTH, LAYERS, HEADS = 11, 13, 12, 5, 3  # head size K = 4
CFG = ModelConfig(vocab_size=V, context=CONTEXT, width=WIDTH, layers=LAYERS, heads=HEADS)
TOKENIZER = Tokenizer("char", tuple("abcdefghijk"))


@pytest.fixture(scope="module")
def lens_run():
    """A tiny model with order-one random weights (init's 0.02 scale makes every lens layer near-uniform)."""
    params = init(CFG, key=jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(50)
    params = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(x + 0.5 * rng.normal(size=x.shape), jnp.float32) for x in leaves])
    tokens = jnp.asarray(np.random.default_rng(51).integers(0, V, size=(2, 7)), jnp.int32)  # (B, T)
    logits, trace = forward(params, tokens, CFG, trace=True)
    return params, tokens, logits, trace, lens.logit_lens(params, trace, CFG)


def test_logit_lens_last_layer_is_the_models_logits(lens_run):
    _, _, logits, _, lens_logits = lens_run
    assert lens_logits.shape == (LAYERS + 1, 2, 7, V)
    np.testing.assert_allclose(lens_logits[-1], logits, rtol=1e-5, atol=1e-5)


def test_logit_lens_first_layer_unembeds_the_embeddings(lens_run):
    params, tokens, _, _, lens_logits = lens_run
    p = {name: np.asarray(leaf, np.float64) for name, leaf in params["embed"].items()}
    x = p["tok"][np.asarray(tokens)] + p["pos"][: tokens.shape[1]]  # (B, T, D)
    ln = {k: np.asarray(v, np.float64) for k, v in params["ln_f"].items()}
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * ln["scale"] + ln["bias"]
    np.testing.assert_allclose(lens_logits[0], normed @ p["tok"].T, rtol=1e-4, atol=1e-4)
    # entry 1 is block 0's output, read the same way
    np.testing.assert_allclose(lens_logits[1], layer_norm(lens_run[3]["resid_post"][0], params["ln_f"])
                               @ params["embed"]["tok"].T, rtol=1e-6, atol=1e-6)


def test_top_predictions_match_softmax_and_are_sorted(lens_run):
    lens_logits = lens_run[4]
    top = lens.top_predictions(lens_logits, TOKENIZER, position=4, k=3, batch_index=1)
    assert len(top) == LAYERS + 1
    for layer, row in enumerate(top):
        z = np.asarray(lens_logits[layer, 1, 4], np.float64)
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        order = np.argsort(-probs)[:3]
        assert [t for t, _ in row] == [TOKENIZER.vocab[i] for i in order]
        got = [p for _, p in row]
        np.testing.assert_allclose(got, probs[order], rtol=1e-12)
        assert got == sorted(got, reverse=True) and sum(got) <= 1.0
    assert top == lens.top_predictions(lens_logits, TOKENIZER, position=-3, k=3, batch_index=1)  # 4 == 7 - 3


def test_top_predictions_reject_bad_positions(lens_run):
    with pytest.raises(MinilmError, match="position 7"):
        lens.top_predictions(lens_run[4], TOKENIZER, position=7)
    with pytest.raises(MinilmError, match="batch_index 2"):
        lens.top_predictions(lens_run[4], TOKENIZER, position=0, batch_index=2)
