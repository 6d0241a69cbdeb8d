"""Experiments 04 (how low-rank is full fine-tuning) and 05 (magnitude and direction) run end to end in
--quick mode (two seeds), keep every number a verdict reads per seed, and judge their claims from those
numbers alone: constructed per-seed numbers decide what they should. (Same seed, same numbers is checked
where it is made, in test_train.py.)"""

import copy

import numpy as np
import pytest
from helpers import load_experiment
from test_experiments_02_03 import NOT_SETTLED, check_per_seed, run, verdicts

# ---------------------------------------------------------------- 04


@pytest.fixture(scope="module")
def exp04(tmp_path_factory):
    out = tmp_path_factory.mktemp("e04") / "report"
    module = load_experiment("04_how_lowrank_is_full")
    return module, out, run(module, out)


def test_04_writes_report_and_metrics(exp04):
    _, out, metrics = exp04
    page = (out / "report.html").read_text()
    assert page.count("<img") == 3 and metrics["seed"] == 0
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


def test_04_keeps_every_verdict_number_per_seed(exp04):
    _, _, metrics = exp04
    check_per_seed(metrics)
    # the first seed's numbers, recomputed here from its losses and matrices
    L, D, ps = metrics["losses"], metrics["full_rank"], metrics["per_seed"]
    gain = L["base"] - L["full"]
    quarter = metrics["ranks"].index(D // 4)
    assert ps["recovery"]["rest fine-tuned, k = D/4"][0] == pytest.approx((L["base"] - L["rest_tuned"][quarter]) / gain)
    assert ps["recovery"]["rest as base, k = D/4"][0] == pytest.approx((L["base"] - L["rest_base"][quarter]) / gain)
    last = metrics["ranks"].index(metrics["lora_ranks"][-1])
    assert ps["lora_minus_truncated"]["largest k"][0] == pytest.approx((L["rest_base"][last] - L["lora"][-1]) / gain)
    ranks_90 = [r["energy_rank_90"] for r in metrics["matrices"].values()]
    assert ps["rank_share"]["90%-energy rank"][0] == pytest.approx(np.median(ranks_90) / D)
    assert ps["cos_with_w0"]["median"][0] == pytest.approx(np.median([r["cos_with_w0"]
                                                                      for r in metrics["matrices"].values()]))


def test_04_verdicts_are_recomputed_from_the_per_seed_numbers(exp04):
    module, _, metrics = exp04
    assert module.judge(metrics["per_seed"]) == metrics["claims"]


def test_04_constructed_numbers_decide_what_they_should(exp04):
    module, _, metrics = exp04
    per_seed = copy.deepcopy(metrics["per_seed"])
    # 10% of full rank by both measures on both seeds: low-rank (below 25%) true; 60%: false; one of each: not settled
    for share, expected in (([0.1, 0.1000001], "true"), ([0.6, 0.6000001], "false"), ([0.1, 0.6], NOT_SETTLED)):
        per_seed["rank_share"] = {label: share for label in per_seed["rank_share"]}
        assert module.judge(per_seed)[0]["verdict"] == expected
    # truncation keeps everything (recovery 1) with the rest fine-tuned, and half with the rest as base
    per_seed["recovery"]["rest fine-tuned, k = D/4"] = [1.0, 0.9999999]
    per_seed["recovery"]["rest as base, k = D/4"] = [0.5, 0.5000001]
    assert verdicts(module.judge(per_seed), 2) == {"rest fine-tuned, k = D/4": "true", "rest as base, k = D/4": "false"}
    # LoRA better than the truncation on one seed and worse on the other: not settled; worse on both: false
    per_seed["lora_minus_truncated"]["largest k"] = [0.2, -0.2]
    assert verdicts(module.judge(per_seed), 3)["LoRA minus truncation, largest k"] == NOT_SETTLED
    per_seed["lora_minus_truncated"]["largest k"] = [-0.2, -0.2000001]
    assert verdicts(module.judge(per_seed), 3)["LoRA minus truncation, largest k"] == "false"
    # ΔW points back along W0 on both seeds: true; along W0 on both: false
    per_seed["cos_with_w0"]["median"] = [-0.5, -0.5000001]
    assert module.judge(per_seed)[3]["verdict"] == "true"
    per_seed["cos_with_w0"]["median"] = [0.5, 0.5000001]
    assert module.judge(per_seed)[3]["verdict"] == "false"


# ---------------------------------------------------------------- 05


@pytest.fixture(scope="module")
def exp05(tmp_path_factory):
    out = tmp_path_factory.mktemp("e05") / "report"
    module = load_experiment("05_magnitude_and_direction")
    return module, out, run(module, out)


def test_05_writes_report_and_metrics(exp05):
    module, out, metrics = exp05
    page = (out / "report.html").read_text()
    assert page.count("<img") == 2 and metrics["seed"] == 0
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


def test_05_keeps_every_verdict_number_per_seed(exp05):
    _, _, metrics = exp05
    check_per_seed(metrics)
    # the first seed's correlations, recomputed here with NumPy from its points
    for name, r in metrics["methods"].items():
        steps, dD, dM = (np.array([p[k] for p in r["points"]]) for k in ("step", "dD", "dM"))
        assert metrics["per_seed"]["pearson"][name][0] == pytest.approx(np.corrcoef(dD, dM)[0, 1])
        assert metrics["per_seed"]["step_vs_dD"][name][0] == pytest.approx(np.corrcoef(steps, dD)[0, 1])
        assert metrics["per_seed"]["step_vs_dM"][name][0] == pytest.approx(np.corrcoef(steps, dM)[0, 1])
    r = {name: v[0] for name, v in metrics["per_seed"]["pearson"].items()}
    assert metrics["per_seed"]["dora_nearer_full"]["DoRA"][0] == pytest.approx(
        abs(r["DoRA"] - r["LoRA"]) - abs(r["DoRA"] - r["full"]))


def test_05_verdicts_are_recomputed_from_the_per_seed_numbers(exp05):
    module, _, metrics = exp05
    assert module.judge(metrics["per_seed"]) == metrics["claims"]


def test_05_constructed_numbers_decide_what_they_should(exp05):
    module, _, metrics = exp05
    per_seed = copy.deepcopy(metrics["per_seed"])

    def paper(full, lora, dora):
        per_seed["pearson"] = {"full": full, "LoRA": lora, "DoRA": dora}
        return module.judge(per_seed)[0]

    like_paper = paper([-0.6, -0.6000001], [0.7, 0.7000001], [-0.5, -0.5000001])
    assert like_paper["verdict"] == "true"
    assert paper([0.6, 0.6000001], [-0.7, -0.7000001], [0.5, 0.5000001])["verdict"] == "false"
    # one seed of LoRA flipped: its interval straddles 0, the others still decide
    flipped = {f["label"]: f["verdict"] for f in paper([-0.6, -0.6000001], [-0.7, 0.7000001],
                                                       [-0.5, -0.5000001])["findings"]}
    assert flipped == {"full": "true", "LoRA": NOT_SETTLED, "DoRA": "true"}
    # ΔD and ΔM perfectly in step with training for every method: growth true
    for what in ("step_vs_dD", "step_vs_dM"):
        per_seed[what] = {name: [0.99, 0.9900001] for name in per_seed[what]}
    assert module.judge(per_seed)[2]["verdict"] == "true"
