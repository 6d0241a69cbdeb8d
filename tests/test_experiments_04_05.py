"""Experiments 04 (how low-rank is full fine-tuning) and 05 (magnitude and direction) run end to end in
--quick mode, write their reports, and compute their summaries from their metrics. (Same seed, same numbers
is checked where it is made, in test_train.py.)"""

import copy

import numpy as np
import pytest
from helpers import load_experiment, run_quick

# ---------------------------------------------------------------- 04


@pytest.fixture(scope="module")
def exp04(tmp_path_factory):
    out = tmp_path_factory.mktemp("e04") / "report"
    module = load_experiment("04_how_lowrank_is_full")
    return module, out, run_quick(module, out)


def test_04_writes_report_and_metrics(exp04):
    _, out, metrics = exp04
    page = (out / "report.html").read_text()
    assert "Summary" in page and page.count("<img") == 2
    assert (out / "figures" / "capture.png").stat().st_size > 0
    assert (out / "figures" / "loss_vs_rank.png").stat().st_size > 0
    ranks = metrics["ranks"]
    assert ranks[-1] == metrics["full_rank"] and all(k <= metrics["full_rank"] for k in ranks)
    assert len(metrics["losses"]["rest_tuned"]) == len(metrics["losses"]["rest_base"]) == len(ranks)
    assert len(metrics["losses"]["lora"]) == len(metrics["lora_ranks"]) == len(metrics["trainable"]["lora"])
    for r in metrics["matrices"].values():
        assert r["capture"][-1] == pytest.approx(1.0) and np.all(np.diff(r["capture"]) >= -1e-12)


def test_04_full_rank_truncation_is_the_fully_fine_tuned_model(exp04):
    _, _, metrics = exp04
    # At k = full rank, W0 + [ΔW]_k = W: "rest fine-tuned" is full fine-tuning itself.
    assert metrics["losses"]["rest_tuned"][-1] == pytest.approx(metrics["losses"]["full"], abs=1e-4)


def test_04_truncated_keeps_the_best_rank_k_change():
    module = load_experiment("04_how_lowrank_is_full")
    rng = np.random.default_rng(0)

    def params(scale):
        return {"blocks": [{"attn": {"q": {"w": scale * rng.standard_normal((5, 7)).astype(np.float32),
                                           "b": scale * rng.standard_normal(7).astype(np.float32)}}}],
                "embed": {"tok": scale * rng.standard_normal((11, 5)).astype(np.float32)}}

    base, delta = params(1.0), params(0.1)
    tuned = {"blocks": [{"attn": {"q": {k: base["blocks"][0]["attn"]["q"][k] + delta["blocks"][0]["attn"]["q"][k]
                                        for k in ("w", "b")}}}],
             "embed": {"tok": base["embed"]["tok"] + delta["embed"]["tok"]}}
    w0, w = base["blocks"][0]["attn"]["q"]["w"], tuned["blocks"][0]["attn"]["q"]["w"]
    svds = {"blocks.0.attn.q.w": np.linalg.svd(np.float64(w) - np.float64(w0), full_matrices=False)}
    for k in (1, 2, 5):
        for rest, other in (("tuned", tuned), ("base", base)):
            cut = module.truncated(base, tuned, svds, k, rest)
            change = np.float64(cut["blocks"][0]["attn"]["q"]["w"]) - np.float64(w0)
            s = np.linalg.svd(change, compute_uv=False)
            assert np.all(s[k:] < 1e-5)                                  # rank <= k
            s_delta = np.linalg.svd(np.float64(w) - np.float64(w0), compute_uv=False)
            np.testing.assert_allclose(s[:k], s_delta[:k], rtol=1e-5)    # the top k of ΔW, Eckart–Young
            np.testing.assert_array_equal(cut["blocks"][0]["attn"]["q"]["b"], other["blocks"][0]["attn"]["q"]["b"])
            np.testing.assert_array_equal(cut["embed"]["tok"], other["embed"]["tok"])
    np.testing.assert_allclose(module.truncated(base, tuned, svds, 5, "tuned")["blocks"][0]["attn"]["q"]["w"], w,
                               atol=1e-6)


def test_04_summary_is_computed_from_the_metrics(exp04):
    module, _, metrics = exp04
    assert module.summary(metrics) == metrics["summary"]
    assert len(metrics["summary"]) >= 5 and all(metrics["summary"])
    L = metrics["losses"]
    # Truncation that loses nothing recovers everything from the smallest k on ...
    perfect = copy.deepcopy(metrics)
    perfect["losses"]["rest_tuned"] = [L["full"]] * len(metrics["ranks"])
    assert f"from k = {metrics['ranks'][0]} (of {metrics['full_rank']}) on, at 100%" in module.summary(perfect)[2]
    # ... a LoRA that learns nothing recovers it at no k and is worse than truncation everywhere ...
    idle = copy.deepcopy(metrics)
    idle["losses"]["lora"] = [L["base"]] * len(metrics["lora_ranks"])
    idle["losses"]["rest_base"] = [L["full"]] * len(metrics["ranks"])
    lora_sentence = module.summary(idle)[4]
    assert "recovers it at no k tested" in lora_sentence and "worse at every k" in lora_sentence
    # ... and one that matches full fine-tuning is better than a truncation that learns nothing.
    ideal = copy.deepcopy(metrics)
    ideal["losses"]["lora"] = [L["full"]] * len(metrics["lora_ranks"])
    ideal["losses"]["rest_base"] = [L["base"]] * len(metrics["ranks"])
    assert "better at every k" in module.summary(ideal)[4]
    # The energy rank verdict follows the numbers.
    spread = copy.deepcopy(metrics)
    for r in spread["matrices"].values():
        r["energy_rank_90"] = metrics["full_rank"]
    assert "not low-rank" in module.summary(spread)[1]


# ---------------------------------------------------------------- 05


@pytest.fixture(scope="module")
def exp05(tmp_path_factory):
    out = tmp_path_factory.mktemp("e05") / "report"
    module = load_experiment("05_magnitude_and_direction")
    return module, out, run_quick(module, out)


def test_05_writes_report_and_metrics(exp05):
    module, out, metrics = exp05
    page = (out / "report.html").read_text()
    assert "Summary" in page and page.count("<img") == 1
    assert (out / "figures" / "magnitude_direction.png").stat().st_size > 0
    assert set(metrics["methods"]) == {"full", "LoRA", "DoRA"}
    for r in metrics["methods"].values():
        assert len(r["points"]) == metrics["checkpoints"] * metrics["layers"]
        assert {p["step"] for p in r["points"]} >= {metrics["steps"]}
        assert all(p["dM"] >= 0 and p["dD"] >= 0 for p in r["points"])
        assert r["pearson"] == pytest.approx(module.pearson([p["dD"] for p in r["points"]],
                                                            [p["dM"] for p in r["points"]]))
    assert metrics["methods"]["DoRA"]["lora"]["use_dora"] and not metrics["methods"]["LoRA"]["lora"]["use_dora"]


def test_05_pearson_matches_numpy_and_handles_constants():
    module = load_experiment("05_magnitude_and_direction")
    x, y = [0.1, 0.4, 0.2, 0.9], [3.0, 1.0, 2.5, 0.5]
    assert module.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert np.isnan(module.pearson([1, 1, 1], [1, 2, 3])) and np.isnan(module.pearson([1, 2], [2, 1]))


def test_05_summary_is_computed_from_the_metrics(exp05):
    module, _, metrics = exp05
    assert module.summary(metrics) == metrics["summary"]
    like_paper = copy.deepcopy(metrics)
    for name, r in (("full", -0.6), ("LoRA", 0.7), ("DoRA", -0.5)):
        like_paper["methods"][name]["pearson"] = r
    text = " ".join(module.summary(like_paper))
    assert "matches the paper's finding" in text and "nearer to full fine-tuning's" in text
    opposite = copy.deepcopy(metrics)
    for name, r in (("full", 0.6), ("LoRA", -0.7), ("DoRA", 0.5)):
        opposite["methods"][name]["pearson"] = r
    assert "does not match the paper's finding on any" in " ".join(module.summary(opposite))
    undefined = copy.deepcopy(metrics)
    undefined["methods"]["full"]["pearson"] = None
    assert "undefined" in module.summary(undefined)[0]
