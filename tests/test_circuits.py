"""The circuit scores (minilm/analysis/circuits.py) on constructed attention patterns whose answers are known:
the ideal pattern scores 1, uniform causal attention its known value, a previous-token head scores as one
and not as an induction head; the in-context score and head removal on hand-made inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm import corpora
from minilm.analysis import circuits
from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import forward, init

NL = 0  # the separator's id in these hand-made sequences


def lines(*spans):
    """Token ids of `induction`-style lines: each span then its repeat, each line after a separator."""
    out = [NL]
    for span in spans:
        out += [*span, *span, NL]
    return np.array(out)


TOKENS = lines([3, 5, 7, 2, 11], [4, 9, 6])  # T = 1 + 11 + 7 = 19, two whole lines
T = len(TOKENS)


def causal_uniform(T):
    return np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]  # row t: 1 / (t + 1) on keys 0..t


def as_probs(*patterns):
    """Patterns (T, S) -> (L = 1, B = 1, H = len(patterns), T, S), rows made to sum to 1 where empty
    (a real head must look somewhere: rows with no target look at key 0)."""
    out = []
    for p in patterns:
        p = np.array(p, dtype=np.float64)
        p[p.sum(-1) == 0, 0] = 1.0
        out.append(p)
    return np.stack(out)[None, None]


def test_halves_of_induction_lines():
    halves = corpora.induction_halves(TOKENS, NL)
    np.testing.assert_array_equal(halves, [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 1, 1, 1, 2, 2, 2, 0])
    # A window that starts inside a line: that line's halves are unknown (0) up to the first separator.
    np.testing.assert_array_equal(corpora.induction_halves(TOKENS[3:], NL)[:9], [0] * 8 + [0])


def test_induction_in_reads_with_the_base_tokenizer():
    base = corpora.associations(seed=0, size=50)
    tuned = corpora.induction_in(base.vocabulary, seed=1, size=40)
    newline = int(base.make_tokenizer().encode(corpora.NEWLINE)[0])
    ids = np.concatenate([[newline], base.make_tokenizer().encode(tuned.text)])  # 40 lines, each whole
    halves = corpora.induction_halves(ids, newline)
    assert (halves == 1).sum() == (halves == 2).sum() == (len(ids) - 41) // 2  # every word is in one half


def ideal_induction():
    ideal = circuits.induction_ideal(corpora.induction_attention(TOKENS)[None], corpora.induction_halves(TOKENS, NL)[None])
    return ideal  # (1, T, T)


def test_ideal_induction_pattern_scores_one_and_previous_token_pattern_zero():
    ideal = ideal_induction()
    prev = circuits.previous_token_pattern(T)
    scores = circuits.pattern_score(as_probs(ideal[0], prev), ideal)  # (1, 2)
    np.testing.assert_allclose(scores, [[1.0, 0.0]])
    # ... and as previous-token heads: the previous-token pattern scores 1, the induction pattern does not.
    prev_scores = circuits.previous_token_score(as_probs(ideal[0], prev))
    assert prev_scores[0, 1] == pytest.approx(1.0)
    assert prev_scores[0, 0] < 0.2


def test_uniform_attention_scores_its_known_value():
    ideal = ideal_induction()
    rows = np.nonzero(ideal[0].sum(-1))[0]
    expected = np.mean(1.0 / (rows + 1))  # row t spreads 1 / (t + 1) over keys 0..t, one of them the target
    np.testing.assert_allclose(circuits.pattern_score(as_probs(causal_uniform(T)), ideal), [[expected]])
    expected_prev = np.mean(1.0 / (np.arange(1, T) + 1))
    np.testing.assert_allclose(circuits.previous_token_score(as_probs(causal_uniform(T))), [[expected_prev]])


def test_a_mixture_scores_its_share():
    ideal = ideal_induction()
    prev = circuits.previous_token_pattern(T)
    mix = as_probs(0.3 * ideal[0] + 0.7 * prev)  # rows without an ideal target get 0.7 prev and then key 0
    assert circuits.pattern_score(mix, ideal)[0, 0] == pytest.approx(0.3)


def test_scores_keep_layers_and_heads_apart():
    ideal = ideal_induction()
    uniform = causal_uniform(T)
    probs = np.stack([as_probs(uniform, ideal[0], uniform)[0], as_probs(uniform, uniform, ideal[0])[0]])
    scores = circuits.pattern_score(probs, ideal)  # (L 2, H 3)
    assert scores.shape == (2, 3) and scores[0, 1] == scores[1, 2] == pytest.approx(1.0)
    assert np.all(np.delete(scores.ravel(), [1, 5]) < 0.5)


def test_in_context_score():
    halves = np.array([[0, 1, 1, 2, 2], [1, 2, 0, 1, 2]])
    losses = np.array([[9.0, 3.0, 2.0, 0.5, 0.0], [4.0, 1.0, 7.0, 3.0, 0.5]])
    assert circuits.in_context_score(losses, halves) == pytest.approx(np.mean([0.5, 0.0, 1.0, 0.5]) - 3.0)
    with pytest.raises(MinilmError, match="both halves"):
        circuits.in_context_score(losses, np.ones_like(halves))


def test_bad_shapes_are_refused():
    with pytest.raises(MinilmError, match="L, B, H, T, S"):
        circuits.pattern_score(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(MinilmError, match="expected"):
        circuits.pattern_score(np.zeros((1, 2, 1, 5, 5)), np.zeros((3, 5, 5)))
    with pytest.raises(MinilmError, match="no row"):
        circuits.pattern_score(np.zeros((1, 1, 1, 5, 5)), np.zeros((5, 5)))


def test_without_head_removes_exactly_that_heads_output():
    cfg = ModelConfig(vocab_size=13, context=7, width=12, layers=2, heads=3, mlp=False)
    params = init(cfg, key=jax.random.key(3))
    params["blocks"][0]["attn"]["o"]["w"] = jax.random.normal(jax.random.key(4), (12, 12))  # not ~0 at init
    tokens = jnp.array([[1, 4, 2, 9, 4, 2, 7]])
    _, trace = forward(params, tokens, cfg, trace=True)
    cut = circuits.without_head(params, 0, 1, cfg.head_size)
    _, cut_trace = forward(cut, tokens, cfg, trace=True)
    # Block 0's attention output without head 1 is the full output minus head 1's z · W_O rows (K = 4).
    q = trace["resid_pre"][0]  # unchanged input
    np.testing.assert_array_equal(cut_trace["resid_pre"][0], q)
    assert not np.allclose(cut_trace["resid_mid"][0], trace["resid_mid"][0])
    np.testing.assert_array_equal(cut["blocks"][0]["attn"]["o"]["w"][4:8], 0.0)
    np.testing.assert_array_equal(cut["blocks"][0]["attn"]["o"]["w"][:4], params["blocks"][0]["attn"]["o"]["w"][:4])
    assert cut["blocks"][1] is params["blocks"][1]
    np.testing.assert_array_equal(cut_trace["attn_probs"][0], trace["attn_probs"][0])  # layer 0 looks the same
    with pytest.raises(MinilmError, match="head 3"):
        circuits.without_head(params, 0, 3, cfg.head_size)


def test_attention_only_model_has_no_mlp():
    cfg = ModelConfig(vocab_size=13, context=7, width=12, layers=2, heads=3, mlp=False)
    params = init(cfg, key=jax.random.key(0))
    assert set(params["blocks"][0]) == {"ln1", "attn"}
    _, trace = forward(params, jnp.zeros((2, 5), jnp.int32), cfg, trace=True)
    np.testing.assert_array_equal(trace["resid_post"], trace["resid_mid"])  # nothing after attention
    assert trace["mlp_hidden"].shape == (2, 2, 5, 0)
