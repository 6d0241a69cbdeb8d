"""Experiment 07 end to end in --quick mode (two seeds), its verdicts recomputed from metrics.json and from
constructed numbers, and common.finetune marking a run that really diverges (no mocks)."""

import copy
import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from helpers import load_experiment

from minilm.analysis import tradeoff
from minilm.model import init

DIVERGING = 1e30  # a learning rate no run survives: Adam's step is ~lr, so the weights leave float32's range


@pytest.fixture(scope="module")
def exp07(tmp_path_factory):
    out = tmp_path_factory.mktemp("e07") / "report"
    module = load_experiment("07_learning_vs_forgetting")
    # the fixed grid plus one learning rate that diverges, to see the sweep go on and the report show it
    assert module.main(["--quick", "--out", str(out)], extra_lrs={"full": (DIVERGING,)}) == 0
    return module, out, json.loads((out / "metrics.json").read_text())


def test_07_writes_report_and_metrics(exp07):
    module, out, metrics = exp07
    page = (out / "report.html").read_text()
    assert (out / "figures" / "tradeoff.png").is_file() and (out / "figures" / "claims.png").is_file()
    assert metrics["seeds"] == [0, 1] and metrics["methods"] == ["full", "lora-r2", "lora-r4"]
    assert [len(c["findings"]) for c in metrics["claims"]] == [2, 2]
    assert metrics["verdicts"]["count"] == 4 and "makes 4 verdicts" in page and "Holm" in page
    assert metrics["runs_per_seed"] == 10  # 3 methods × 3 learning rates + the diverging one
    for n in metrics["methods"]:
        assert len(metrics["lrs"][n]) == 3 + (n == "full")


def test_07_diverged_runs_are_shown_and_left_out_of_the_curves(exp07):
    module, out, metrics = exp07
    assert [(d["seed"], d["method"], d["lr"]) for d in metrics["diverged"]] == [(0, "full", DIVERGING),
                                                                               (1, "full", DIVERGING)]
    assert all(1 <= d["step"] < metrics["budget"] for d in metrics["diverged"])
    page = (out / "report.html").read_text()
    assert "Diverged runs" in page and "1e+30" in page and "2 of 20 runs diverged" in page
    for d in metrics["matched"]:
        assert DIVERGING not in d["lowest_loss_lr"].values() and DIVERGING not in d["best_forgetting_lr"].values()
        assert not any("1e+30" in r for r in d["not_reaching"])


def test_07_per_seed_numbers_are_recomputed_from_the_curves(exp07):
    module, _, metrics = exp07
    names = metrics["methods"]
    numbers, details = module.measure({"runs": metrics["shown_runs"]}, names)
    for k, by_method in numbers.items():
        for n, value in by_method.items():
            assert metrics["per_seed"][k][n][0] == pytest.approx(value, abs=1e-12)
    target = numbers["matched_loss"]["all"]
    assert target == max(numbers["lowest_loss"].values())
    for n in names:  # each method's best run reaches the matched loss between the two evaluations shown
        (s0, above), *rest = details["bracket"][n]
        below = rest[0][1] if rest else above
        assert below <= target and (not rest or above > target)
        curve = {r["lr"]: list(zip(r["finetune_loss"], r["forgetting"])) for r in metrics["shown_runs"]
                 if r["method"] == n and r["diverged"] is None}
        assert tradeoff.best_at(curve, target)[0] == pytest.approx(numbers["best_forgetting"][n], abs=1e-12)


def test_07_verdicts_are_recomputed_from_the_per_seed_numbers(exp07):
    module, _, metrics = exp07
    assert module.judge(metrics["per_seed"], metrics["methods"]) == metrics["claims"]


def verdicts(module, metrics, per_seed, claim):
    return {f["label"]: f["verdict"] for f in module.judge(per_seed, metrics["methods"])[claim]["findings"]}


def test_07_constructed_numbers_flip_the_verdicts(exp07):
    module, _, metrics = exp07
    per_seed = copy.deepcopy(metrics["per_seed"])
    lora = [n for n in metrics["methods"] if n != "full"]
    full_loss, full_forgetting = per_seed["lowest_loss"]["full"], per_seed["best_forgetting"]["full"]
    for n in lora:  # LoRA's lowest loss clearly above full's on both seeds: learns less, true
        per_seed["lowest_loss"][n] = list(np.add(full_loss, [0.3, 0.3000001]))
    assert set(verdicts(module, metrics, per_seed, 0).values()) == {"true"}
    for n in lora:  # clearly below: false
        per_seed["lowest_loss"][n] = list(np.subtract(full_loss, [0.3, 0.3000001]))
    assert set(verdicts(module, metrics, per_seed, 0).values()) == {"false"}
    for n in lora:  # one seed each way: the interval straddles 0, not settled
        per_seed["lowest_loss"][n] = list(np.add(full_loss, [-0.3, 0.3000001]))
    assert set(verdicts(module, metrics, per_seed, 0).values()) == {"not settled by 2 seeds"}
    for n in lora:  # LoRA forgets clearly less than full at the matched loss: true; clearly more: false
        per_seed["best_forgetting"][n] = list(np.subtract(full_forgetting, [0.2, 0.2000001]))
    assert set(verdicts(module, metrics, per_seed, 1).values()) == {"true"}
    per_seed["best_forgetting"][lora[0]] = list(np.add(full_forgetting, [0.2, 0.2000001]))
    assert verdicts(module, metrics, per_seed, 1) == {f"{lora[0]} forgets less than full": "false",
                                                      f"{lora[1]} forgets less than full": "true"}


# ---------------------------------------------------------------- common.finetune and a real divergence


@pytest.fixture(scope="module")
def common_module():
    load_experiment("07_learning_vs_forgetting")  # puts experiments/ on the path
    import common
    return common


@pytest.mark.parametrize("rank", [None, 3])
def test_a_diverging_fine_tune_comes_back_marked_and_a_sane_one_does_not(common_module, small_cfgs, arithmetic_data,
                                                                         rank):
    import lora
    model_cfg, train_cfg = small_cfgs
    base = init(model_cfg, key=jax.random.key(0))
    cfg = None if rank is None else lora.LoraConfig(rank=rank, alpha=2 * rank, targets=("all-linear",))
    watch = {"val": common_module.fixed_windows(arithmetic_data, model_cfg, batches=2)}
    bad = common_module.finetune("bad", base, arithmetic_data, model_cfg,
                                 dataclasses.replace(train_cfg, lr=DIVERGING, min_lr=0.0), cfg, watch=watch,
                                 watch_every=1)
    assert bad.params is None and bad.adapted is None and bad.lr == DIVERGING
    assert bad.diverged["step"] == len(bad.log) + 1 < train_cfg.steps  # the log holds the steps before it
    assert not (math.isfinite(bad.diverged["loss"]) and math.isfinite(bad.diverged["grad_norm"]))
    assert all("val_loss" in m and math.isfinite(m["loss"]) for m in bad.log)
    good = common_module.finetune("good", base, arithmetic_data, model_cfg, train_cfg, cfg, watch=watch,
                                  watch_every=4)
    assert good.diverged is None and good.params is not None
    assert [m["step"] for m in good.log if "val_loss" in m] == [4, 8, 12]
    # the watched loss is the same number eval_loss gives on the same windows
    assert good.log[-1]["val_loss"] == pytest.approx(
        common_module.eval_loss(good.params, arithmetic_data, model_cfg, batches=2), rel=1e-5)
