"""Each experiment runs end to end in --quick mode, writes its report, and computes its verdicts from its numbers."""

import copy
import json

import numpy as np
import pytest
from helpers import load_experiment


@pytest.fixture(scope="module")
def exp01(tmp_path_factory):
    out = tmp_path_factory.mktemp("e01") / "report"
    module = load_experiment("01_what_changes")
    assert module.main(["--quick", "--out", str(out)]) == 0  # two seeds
    return module, out, json.loads((out / "metrics.json").read_text())


def judge(module, metrics, per_seed=None):
    names = metrics["models"]
    return module.judge(per_seed or metrics["per_seed"], names, [n for n in names if metrics["adapters_of"][n]])


def test_01_writes_report_and_metrics(exp01):
    _, out, metrics = exp01
    page = (out / "report.html").read_text()
    assert "Claims" in page and page.count("<tr><td>") >= 9 and (out / "figures" / "claims.png").is_file()
    assert (out / "figures" / "binding.png").is_file() and "Bound pairs minus controls, per layer" in page
    assert len(metrics["claims"]) == 9
    assert all(c["verdict"] and c["evidence"] and c["findings"] for c in metrics["claims"])
    assert set(metrics["losses"]) == {"base", *metrics["models"]}
    assert metrics["seeds"] == [0, 1] and metrics["shown_seed"] == 0
    count = sum(len(c["findings"]) for c in metrics["claims"])
    assert metrics["verdicts"]["count"] == count and f"makes {count} verdicts" in page and "Holm" in page


def test_01_keeps_every_number_per_seed_with_its_mean_and_interval(exp01):
    _, _, metrics = exp01
    for measurement in metrics["per_seed"].values():
        assert all(len(values) == 2 and all(np.isfinite(values)) for values in measurement.values())
    for c in metrics["claims"]:
        for f in c["findings"]:
            assert len(f["values"]) == 2 and f["mean"] == pytest.approx(np.mean(f["values"]))
            assert f["low"] <= f["mean"] <= f["high"] and f["p"] <= f["p_holm"] <= 1


def test_01_verdicts_are_recomputed_from_the_per_seed_numbers(exp01):
    module, _, metrics = exp01
    assert judge(module, metrics) == metrics["claims"]


def findings_of(claims, number):
    return {f["label"]: f["verdict"] for f in claims[number - 1]["findings"]}


def test_01_constructed_numbers_decide_what_they_should(exp01):
    module, _, metrics = exp01
    names = metrics["models"]
    per_seed = copy.deepcopy(metrics["per_seed"])
    # bound pairs clearly closer on both seeds, for both kinds, static and contextual: claim 3 true ...
    closer = [k for k in per_seed if k.startswith("bindings ") and k.endswith((" static", " contextual"))]
    assert len(closer) == 4  # two kinds × (static, contextual)
    for k in closer:
        per_seed[k] = {n: [0.3, 0.3000001] for n in names}
    assert judge(module, metrics, per_seed)[2]["verdict"] == "true"
    # ... one seed flipped for one kind: that kind is not settled, the other still true
    kind = closer[0].split(" ")[1]
    for k in (k for k in closer if k.split(" ")[1] == kind):
        per_seed[k] = {n: [-0.3, 0.3000001] for n in names}
    findings = findings_of(judge(module, metrics, per_seed), 3)
    assert {v for label, v in findings.items() if label.startswith(kind)} == {"not settled by 2 seeds"}
    assert any(v == "true" for label, v in findings.items() if not label.startswith(kind))
    # the negative control reads only unbound's numbers: a planted effect there is "true" (a biased design)
    for k in (k for k in per_seed if k.startswith("unbound ") and k.endswith(" contextual")):
        per_seed[k] = {n: [0.2, 0.2000001] for n in names}
    assert set(findings_of(judge(module, metrics, per_seed), 4).values()) >= {"true"}
    # attention untouched: claim 5 false
    per_seed["max_js"] = {n: [1e-3, 1.0000001e-3] for n in names}
    assert judge(module, metrics, per_seed)[4]["verdict"] == "false"
    # LoRA with a far lower fine-tuning loss than full fine-tuning: "learns less" false for every adapter
    for n in names:
        if metrics["adapters_of"][n]:
            per_seed["lowest_loss"][n] = list(np.subtract(per_seed["lowest_loss"]["full"], [0.5, 0.5000001]))
    learns = {k: v for k, v in findings_of(judge(module, metrics, per_seed), 9).items() if "learns less" in k}
    assert learns and set(learns.values()) == {"false"}


def test_01_a_straddling_interval_is_not_settled(exp01):
    module, _, metrics = exp01
    per_seed = copy.deepcopy(metrics["per_seed"])
    per_seed["silhouette_change"] = {n: [-0.02, 0.03] for n in metrics["models"]}
    claim = judge(module, metrics, per_seed)[5]
    assert claim["verdict"] == "not settled by 2 seeds"
    assert all(f["low"] < 0 < f["high"] for f in claim["findings"])


def test_01_binding_effect_is_pairs_minus_controls_of_one_kind(exp01):
    from minilm import corpora
    module = exp01[0]
    rows = lambda pairs, cos: [{"a": a, "b": b, "cosine": c} for (a, b), c in zip(pairs, cos)]  # noqa: E731
    pairs, controls = corpora.PAIRS, corpora.CONTROLS  # co-occur pairs first, then substitute
    part = {"base": {"pairs": rows(pairs, [0.1, 0.2, 0.3, 0.4]), "controls": rows(controls, [0.5, 0.5, 0.5, 0.5])},
            "tuned": {"pairs": rows(pairs, [0.4, 0.4, 0.3, 0.3]), "controls": rows(controls, [0.6, 0.4, 0.5, 0.7])}}
    # co-occur: pairs +0.3, +0.2 (mean 0.25), controls +0.1, -0.1 (mean 0); substitute: pairs 0, -0.1, controls 0, +0.2
    assert [corpora.PAIRS[:2], corpora.PAIRS[2:]] == [corpora.BOUND["co-occur"], corpora.BOUND["substitute"]]
    assert module.binding_effect(part, "co-occur") == pytest.approx(0.25)
    assert module.binding_effect(part, "substitute") == pytest.approx(-0.05 - 0.1)


def test_01_learning_and_forgetting_follow_from_the_curves(exp01):
    from minilm.analysis import tradeoff
    _, _, metrics = exp01
    names, per_seed = metrics["models"], metrics["per_seed"]
    assert len(metrics["curves"]) == 2
    for i, curves in enumerate(metrics["curves"]):
        assert set(curves) == set(names)
        lowest = {n: min(loss for loss, _ in curves[n]) for n in names}  # the lowest point of each curve
        assert {n: per_seed["lowest_loss"][n][i] for n in names} == pytest.approx(lowest)
        matched = max(lowest.values())
        assert per_seed["matched_loss"]["base"][i] == pytest.approx(matched)
        for n in names:
            points = curves[n]
            j = next(j for j, (loss, _) in enumerate(points) if loss <= matched)  # first reached
            (l0, f0), (l1, f1) = points[max(j - 1, 0)], points[j]
            want = f1 if j == 0 or l0 == l1 else f0 + (f1 - f0) * (l0 - matched) / (l0 - l1)
            assert per_seed["matched_forgetting"][n][i] == pytest.approx(want)
            assert tradeoff.forgetting_at(points, matched) == pytest.approx(want)


def test_01_leads_with_the_map_of_the_shown_seed_and_its_last_step_is_the_tuned_model(exp01):
    from minilm import report_map
    _, out, metrics = exp01
    page = (out / "report.html").read_text()
    data = metrics["map"]
    assert report_map.read_data(page) == data and (out / "figures" / "map.png").is_file()
    assert page.index("<h2>Summary</h2>") < page.index("The word vectors moving") < page.index("<h2>Which matrices")
    assert data["seed"] == metrics["shown_seed"] and data["variants"] == metrics["models"]
    assert data["steps"] == list(range(11)) and data["levels"][0] == "static"  # --quick: 10 steps, K = 1
    # the snapshots' vectors are the models' own: the last step's pair cosines are compare's for the tuned
    # model (LoRA merged from its adapters at that step), step 0's the base's
    words, layer = data["words"], len(data["levels"]) - 2
    for v in data["variants"]:
        part = metrics["vectors"][v]["contextual"][layer]
        for when, which in ((-1, "tuned"), (0, "base")):
            for row in part[which]["pairs"]:
                cos = data["partner_cos"][f"layer {layer}"][v][when][words.index(row["a"])]
                assert cos == pytest.approx(row["cosine"], abs=2e-4), (v, which, row)
