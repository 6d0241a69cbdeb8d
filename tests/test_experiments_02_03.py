"""Experiments 02 and 03 run end to end in --quick mode, write their reports, and compute every summary
sentence from their metrics. (Same seed, same numbers is checked where it is made, in test_train.py.)"""

import copy
from pathlib import Path

import numpy as np
import pytest
from helpers import load_experiment, run_quick


def run(module, out: Path) -> dict:
    metrics = run_quick(module, out)
    assert (out / "report.html").is_file() and list((out / "figures").glob("*.png"))
    return metrics


# ---------------------------------------------------------------- 02 rank and alpha


@pytest.fixture(scope="module")
def exp02(tmp_path_factory):
    out = tmp_path_factory.mktemp("e02") / "report"
    module = load_experiment("02_rank_and_alpha")
    return module, out, run(module, out)


def test_02_report_has_every_run(exp02):
    module, out, metrics = exp02
    ranks, rules = metrics["setup"]["ranks"], metrics["setup"]["rules"]
    assert {(r["rule"], r["rank"]) for r in metrics["runs"]} == {(u, r) for u in rules for r in ranks}
    page = (out / "report.html").read_text()
    assert "What it shows" in page and page.count("<img") == 2
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


def test_02_summary_is_computed_from_the_metrics(exp02):
    module, out, metrics = exp02
    assert module.summarize(metrics) == metrics["summary"]
    page = (out / "report.html").read_text()
    assert metrics["summary"][0].split(":")[0] in page
    ranks, (fixed, _, rs) = metrics["setup"]["ranks"], metrics["setup"]["rules"]

    def with_losses(fixed_losses, rs_losses):
        m = copy.deepcopy(metrics)
        for r in m["runs"]:
            if r["rule"] in (fixed, rs):
                r["finetune_loss"] = (fixed_losses if r["rule"] == fixed else rs_losses)[ranks.index(r["rank"])]
        return module.summarize(m)[1]

    flat, falling = [2.0] * len(ranks), list(np.linspace(2.0, 1.0, len(ranks)))
    assert "as rsLoRA predicts" in with_losses(flat, falling)
    assert "against rsLoRA's prediction" in with_losses(falling, flat)
    assert "cannot test" in with_losses(flat, flat)


# ---------------------------------------------------------------- 03 adapter subspaces


@pytest.fixture(scope="module")
def exp03(tmp_path_factory):
    out = tmp_path_factory.mktemp("e03") / "report"
    module = load_experiment("03_adapter_subspaces")
    return module, out, run(module, out)


def test_03_grids_and_baseline(exp03):
    _, out, metrics = exp03
    assert len(metrics["pairs"]) == 2 and len(list((out / "figures").glob("*.png"))) == 2
    ranks = {n: r["rank"] for n, r in metrics["runs"].items()}
    for pair, result in metrics["pairs"].items():
        first, second = pair.split(" vs ")
        assert len(result["matrices"]) == 2 * 2  # attn.q and attn.v in both blocks of the quick model
        for grids in result["matrices"].values():
            for lens in ("A", "delta", "init", "baseline"):
                grid = np.asarray(grids[lens])
                assert grid.shape == (ranks[first], ranks[second])
                assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-9)
            base = np.asarray(grids["baseline"])
            assert base[0, 0] == 1 / metrics["setup"]["width"]


def test_03_summary_is_computed_from_the_metrics(exp03):
    module, out, metrics = exp03
    assert module.summarize(metrics) == metrics["summary"]
    page = (out / "report.html").read_text()
    assert all(s.split(" (")[0] in page for s in metrics["summary"])
    # Make every top direction coincide exactly: the comparison with Hu et al. must then say "yes".
    same = copy.deepcopy(metrics)
    for result in same["pairs"].values():
        for grids in result["matrices"].values():
            for lens in ("A", "delta"):
                grids[lens] = np.ones_like(np.asarray(grids[lens])).tolist()
    verdict = next(s for s in module.summarize(same) if s.startswith("Hu et al."))
    assert verdict.endswith("Ours, in their lens (A): yes, for both pairs; in the ΔW lens: yes, for both pairs.")
    # ... and at the random baseline it must say "no" and "at chance".
    chance = copy.deepcopy(metrics)
    for result in chance["pairs"].values():
        for grids in result["matrices"].values():
            grids["A"] = grids["delta"] = grids["baseline"]
    lines = module.summarize(chance)
    assert "at chance" in lines[0] and "(1.0× random" in lines[0]
    assert next(s for s in lines if s.startswith("Hu et al.")).endswith("(A): no; in the ΔW lens: no.")
