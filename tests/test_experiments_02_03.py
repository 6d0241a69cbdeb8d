"""Experiments 02 and 03 run end to end in --quick mode (two seeds), keep every number a verdict reads per
seed, and judge their claims from those numbers alone: constructed per-seed numbers decide what they should.
(Same seed, same numbers is checked where it is made, in test_train.py.)"""

import copy
from pathlib import Path

import numpy as np
import pytest
from helpers import load_experiment, run_quick

NOT_SETTLED = "not settled by 2 seeds"


def run(module, out: Path) -> dict:
    metrics = run_quick(module, out)  # --quick: seeds 0 and 1
    page = (out / "report.html").read_text()
    assert (out / "figures" / "claims.png").is_file() and "Claims, over seeds" in page
    count = sum(len(c["findings"]) for c in metrics["claims"])
    assert metrics["verdicts"]["count"] == count and f"makes {count} verdicts" in page and "Holm" in page
    assert metrics["seeds"] == [0, 1] and metrics["shown_seed"] == 0 and "seed 0 alone" in page
    return metrics


def check_per_seed(metrics):
    """Every measurement has one finite value per seed, and every finding's values are one of them."""
    kept = [tuple(v) for m in metrics["per_seed"].values() for v in m.values()]
    assert kept and all(len(v) == 2 and np.all(np.isfinite(v)) for v in kept)
    for c in metrics["claims"]:
        for f in c["findings"]:
            assert tuple(f["values"]) in kept and f["mean"] == pytest.approx(np.mean(f["values"]))
            assert f["low"] <= f["mean"] <= f["high"] and f["p"] <= f["p_holm"] <= 1


def verdicts(claims, number):
    return {f["label"]: f["verdict"] for f in claims[number - 1]["findings"]}


# ---------------------------------------------------------------- 02 rank and alpha


@pytest.fixture(scope="module")
def exp02(tmp_path_factory):
    out = tmp_path_factory.mktemp("e02") / "report"
    module = load_experiment("02_rank_and_alpha")
    return module, out, run(module, out)


def test_02_report_has_every_run_of_the_first_seed(exp02):
    module, out, metrics = exp02
    ranks, rules = metrics["setup"]["ranks"], metrics["setup"]["rules"]
    assert {(r["rule"], r["rank"]) for r in metrics["runs"]} == {(u, r) for u in rules for r in ranks}
    assert metrics["setup"]["seed"] == 0 and (out / "report.html").read_text().count("<img") == 3
    for r in metrics["runs"]:
        assert r["scale"] == module.lora_config(r["rule"], r["rank"]).scale_for(r["rank"], r["alpha"])
        assert 0 <= r["intruders"] <= metrics["setup"]["intruder_max"]
        assert 0 < r["effective_rank"] <= r["rank"] + 1e-9  # ΔW = s·A B has rank at most R
        assert np.isclose(r["forgetting"], r["base_loss"] - metrics["base"]["base_loss"])


def test_02_twin_runs_are_the_same_training(exp02):
    """Rules that give the same scale at a rank train the same adapter: one run, listed under both."""
    _, _, metrics = exp02
    by_key = {(r["rule"], r["rank"]): r for r in metrics["runs"]}
    twins = [r for r in metrics["runs"] if r["same_as"]]
    assert twins  # alpha=16 and rsLoRA agree at R = 1
    for r in twins:
        first = next(x for x in metrics["runs"] if x["rank"] == r["rank"] and not x["same_as"]
                     and x["scale"] == r["scale"])
        assert r["finetune_loss"] == first["finetune_loss"] and r["intruders"] == first["intruders"]
    assert by_key[("alpha=16", 1)]["same_as"] is None and by_key[("rsLoRA alpha=16", 1)]["same_as"]


def test_02_keeps_every_verdict_number_per_seed(exp02):
    _, _, metrics = exp02
    check_per_seed(metrics)
    # the first seed's numbers, recomputed here from its runs (lowest, middle and highest rank)
    runs, ranks = metrics["runs"], metrics["setup"]["ranks"]
    at = {(r["rule"], r["rank"]): r for r in runs}
    lo, hi = ranks[0], ranks[-1]
    for rule in metrics["setup"]["rules"]:
        ps = {k: v[rule][0] for k, v in metrics["per_seed"].items() if rule in v}
        assert ps["loss_gain"] == pytest.approx(at[(rule, ranks[(len(ranks) - 1) // 2])]["finetune_loss"]
                                                - at[(rule, hi)]["finetune_loss"])
        growth = at[(rule, hi)]["update_norm"] / at[(rule, lo)]["update_norm"]
        assert ps["update_growth"] == pytest.approx(np.log(growth))
        assert ps["intruder_change"] == at[(rule, hi)]["intruders"] - at[(rule, lo)]["intruders"]
        assert ps["effective_rank_share"] == pytest.approx(at[(rule, hi)]["effective_rank"] / hi)


def test_02_verdicts_are_recomputed_from_the_per_seed_numbers(exp02):
    module, _, metrics = exp02
    assert module.judge(metrics["per_seed"], metrics["setup"]["ranks"]) == metrics["claims"]
    assert metrics["summary"][0].endswith("-> " + metrics["claims"][0]["verdict"])


def test_02_constructed_numbers_decide_what_they_should(exp02):
    module, _, metrics = exp02
    ranks, (fixed, _, rs) = metrics["setup"]["ranks"], metrics["setup"]["rules"]
    per_seed = copy.deepcopy(metrics["per_seed"])

    def rslora(fixed_gain, rs_gain):
        per_seed["loss_gain"][fixed], per_seed["loss_gain"][rs] = fixed_gain, rs_gain
        return verdicts(module.judge(per_seed, ranks), 1)

    # rsLoRA's prediction: a clear gain under rsLoRA and none under alpha/R -> both findings true
    assert set(rslora([0.0, 1e-7], [0.5, 0.5000001]).values()) == {"true"}
    # the opposite numbers -> both false
    assert set(rslora([0.5, 0.5000001], [0.0, 1e-7]).values()) == {"false"}
    # one seed's rsLoRA gain flipped: its interval straddles the threshold -> not settled
    assert rslora([0.0, 1e-7], [-0.5, 0.5000001])[f"{rs} gains"] == NOT_SETTLED
    # bigger updates forget more (Spearman > 0.5) ... then one seed the other way
    per_seed["forgetting_rho"]["all runs"] = [0.9, 0.9000001]
    assert module.judge(per_seed, ranks)[2]["verdict"] == "true"
    per_seed["forgetting_rho"]["all runs"] = [-0.9, 0.9000001]
    assert module.judge(per_seed, ranks)[2]["verdict"] == NOT_SETTLED
    # more intruders at higher rank, on both seeds: "fewer at higher rank" is false for that rule
    per_seed["intruder_change"][fixed] = [3.0, 3.0000001]
    assert verdicts(module.judge(per_seed, ranks), 4)[fixed] == "false"


# ---------------------------------------------------------------- 03 adapter subspaces


@pytest.fixture(scope="module")
def exp03(tmp_path_factory):
    out = tmp_path_factory.mktemp("e03") / "report"
    module = load_experiment("03_adapter_subspaces")
    return module, out, run(module, out)


def test_03_grids_and_baseline(exp03):
    _, out, metrics = exp03
    assert len(metrics["pairs"]) == 2 and len(list((out / "figures").glob("pair*.png"))) == 2
    ranks = {n: r["rank"] for n, r in metrics["runs"].items()}
    for pair, result in metrics["pairs"].items():
        first, second = pair.split(" vs ")
        assert len(result["matrices"]) == 2 * 2  # attn.q and attn.v in both blocks of the quick model
        for grids in result["matrices"].values():
            for lens in ("A", "delta", "init", "baseline"):
                grid = np.asarray(grids[lens])
                assert grid.shape == (ranks[first], ranks[second])
                assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-9)
            assert np.asarray(grids["baseline"])[0, 0] == 1 / metrics["setup"]["width"]


def test_03_keeps_every_verdict_number_per_seed(exp03):
    _, _, metrics = exp03
    check_per_seed(metrics)
    # the first seed's φ(1,1), recomputed here from its grids: the mean over matrices of each grid's corner
    for result in metrics["pairs"].values():
        kind = "ranks" if "rank" in result["kind"].split(",")[1] else "seeds"
        for lens in ("A", "delta", "init"):
            corners = [np.asarray(m[lens])[0, 0] for m in result["matrices"].values()]
            random = [np.asarray(m["baseline"])[0, 0] for m in result["matrices"].values()]
            assert metrics["per_seed"]["top1"][f"{kind}, {lens}"][0] == pytest.approx(np.mean(corners))
            assert metrics["per_seed"]["top1_over_random"][f"{kind}, {lens}"][0] == pytest.approx(
                np.mean(corners) / np.mean(random))


def test_03_verdicts_are_recomputed_from_the_per_seed_numbers(exp03):
    module, _, metrics = exp03
    assert module.judge(metrics["per_seed"]) == metrics["claims"]


def test_03_constructed_numbers_decide_what_they_should(exp03):
    module, _, metrics = exp03
    per_seed = copy.deepcopy(metrics["per_seed"])
    labels = list(per_seed["top1"])
    # every top direction the same on both seeds (φ = 1): "shared strongly" true everywhere
    for label in labels:
        per_seed["top1"][label] = [1.0, 0.9999999]
    assert module.judge(per_seed)[0]["verdict"] == "true"
    # at chance (φ = 1/d, well below 0.5): false
    for label in labels:
        per_seed["top1"][label] = [1 / 64, 1 / 64 + 1e-7]
    assert module.judge(per_seed)[0]["verdict"] == "false"
    # the initialisation control at 20× chance on both seeds fails (false); one seed back at chance: not settled
    per_seed["top1_over_random"]["ranks, init"] = [20.0, 20.000001]
    assert verdicts(module.judge(per_seed), 3)["ranks, init"] == "false"
    per_seed["top1_over_random"]["ranks, init"] = [1.0, 20.0]
    assert verdicts(module.judge(per_seed), 3)["ranks, init"] == NOT_SETTLED
    # Wq shares more than Wv on both seeds, then less on both
    per_seed["wq_minus_wv"]["seeds, A"] = [0.2, 0.2000001]
    assert module.judge(per_seed)[3]["verdict"] == "true"
    per_seed["wq_minus_wv"]["seeds, A"] = [-0.2, -0.2000001]
    assert module.judge(per_seed)[3]["verdict"] == "false"
