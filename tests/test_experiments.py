"""Each experiment runs end to end in --quick mode, writes its report, and computes its verdicts from its numbers."""

import copy
import json

import pytest
from helpers import load_experiment

@pytest.fixture(scope="module")
def exp01(tmp_path_factory):
    out = tmp_path_factory.mktemp("e01") / "report"
    module = load_experiment("01_what_changes")
    assert module.main(["--quick", "--out", str(out)]) == 0
    return module, out


def test_01_writes_report_and_metrics(exp01):
    _, out = exp01
    page = (out / "report.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "Claims" in page and page.count("<tr><td>") >= 8
    assert len(metrics["claims"]) == 8
    assert all(c["verdict"] and c["evidence"] for c in metrics["claims"])
    assert set(metrics["losses"]) == {"base", *metrics["models"]}


def test_01_verdicts_are_computed_from_the_metrics(exp01):
    module, out = exp01
    metrics = json.loads((out / "metrics.json").read_text())
    assert module.claims(metrics, metrics["losses"]) == metrics["claims"]
    # The same numbers with attention untouched must flip claim 4 ...
    still = copy.deepcopy(metrics)
    for m in still["models"]:
        still["vectors"][m]["attention"]["js"] = [[0.0] * len(row) for row in still["vectors"][m]["attention"]["js"]]
    assert module.claims(still, still["losses"])[3]["verdict"] == "false"
    # ... and LoRA with a far lower loss and no forgetting must make claim 8 come out "false" for learning less.
    better = copy.deepcopy(metrics)
    for m in better["models"]:
        if better["adapters_of"][m]:
            better["losses"][m]["finetune_loss"] = 0.0
    assert module.claims(better, better["losses"])[7]["verdict"] == "false"
