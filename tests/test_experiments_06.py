"""Experiment 06 (how a pattern forms) runs end to end in --quick mode, writes its report, and derives its
numbers, verdicts and summary from what metrics.json keeps."""

import copy

import numpy as np
import pytest
from helpers import load_experiment, run_quick


@pytest.fixture(scope="module")
def exp06(tmp_path_factory):
    out = tmp_path_factory.mktemp("e06") / "report"
    module = load_experiment("06_how_a_pattern_forms")
    return module, out, run_quick(module, out)


def test_06_writes_report_and_metrics(exp06):
    _, out, metrics = exp06
    page = (out / "report.html").read_text()
    assert "Claims" in page and page.count("<img") == 5
    for name in ("formation", "heads", "maps", "finetune", "claims"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    assert metrics["seeds"] == [0, 1] and len(metrics["claims"]) == 6
    count = sum(len(c["findings"]) for c in metrics["claims"])
    assert metrics["verdicts"]["count"] == count and f"makes {count} verdicts" in page
    for run in metrics["runs"]:
        curve = run["2-layer"]["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == metrics["steps"]
        assert np.shape(curve[-1]["induction"]) == (2, 2) and np.shape(run["1-layer"]["curve"][-1]["induction"]) == (1, 2)
        for name in metrics["variants"]:
            assert run["finetune"][name]["curve"][-1]["step"] == metrics["finetune_steps"]


def test_06_numbers_verdicts_and_summary_come_from_the_metrics(exp06):
    module, _, metrics = exp06
    names = metrics["variants"]
    recomputed = [module.numbers(run, names) for run in metrics["runs"]]
    assert {k: [r[k] for r in recomputed] for k in recomputed[0]} == metrics["numbers"]
    assert module.judge(metrics["numbers"], names, metrics["finetune_steps"]) == metrics["claims"]
    assert module.summary(metrics) == metrics["summary"]


def test_06_constructed_numbers_decide_what_they_should(exp06):
    module, _, metrics = exp06
    names = metrics["variants"]
    numbers = copy.deepcopy(metrics["numbers"])
    numbers["induction_2"], numbers["previous_2"] = [0.9, 0.9000001], [0.8, 0.8000001]
    assert module.judge(numbers, names, metrics["finetune_steps"])[0]["verdict"] == "true"
    numbers["induction_2"] = [0.2, 0.9]  # the seeds disagree: the interval straddles the threshold
    assert module.judge(numbers, names, metrics["finetune_steps"])[0]["verdict"].startswith("not settled by 2 seeds")
    numbers["induction_1"], numbers["icl_gap"] = [0.05, 0.0500001], [-1.0, -1.0000001]
    assert module.judge(numbers, names, metrics["finetune_steps"])[3]["verdict"] == "true for one layer: induction score; false for ICL(1 layer) - ICL(2 layers)"


def test_06_transition_times_a_step_and_a_ramp():
    module = load_experiment("06_how_a_pattern_forms")

    def curve(scores):
        return [{"step": 100 * i, "induction": [[0.0], [s]], "icl": -s} for i, s in enumerate(scores)]

    step = module.transition(curve([0.05] * 10 + [0.9] * 11), 2000)
    assert (step["t10"], step["t50"], step["t90"], step["width"]) == (1000, 1000, 1000, 0.0)
    assert step["icl_t50"] == 1000 and step["apart"] == 0.0
    ramp = module.transition(curve(np.linspace(0.0, 1.0, 21)), 2000)
    assert ramp["width"] == pytest.approx(0.8) and ramp["t50"] == 1000
    flat = module.transition(curve([0.05] * 21), 2000)
    assert flat["width"] == 1.0 and flat["t50"] is None and flat["apart"] == 1.0
