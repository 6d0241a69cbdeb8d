"""`minilm compare`: identical models show no change at all; real fine-tunes show exactly where they changed."""

import json

import jax
import numpy as np
import pytest

from minilm import checkpoint, report
from minilm.analysis import seeds
from minilm.analysis.compare import Model, compare, make_probe, verdict_numbers
from minilm.cli import main
from minilm.corpora import load_corpus

WORDS = ["--corpus-size", "300", "--context", "16", "--width", "16", "--layers", "2", "--heads", "2",
         "--batch-size", "4", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A word-level base on associations, a full fine-tune and two LoRA fine-tunes on bindings."""
    root = tmp_path_factory.mktemp("compare")
    assert main(["train", "--corpus", "associations", *WORDS, "--steps", "20", "--out", str(root / "base")]) == 0
    ft = ["--corpus", "bindings", "--corpus-size", "200", "--batch-size", "4", "--eval-batches", "2", "--steps", "5"]
    assert main(["finetune", str(root / "base"), *ft, "--full", "--out", str(root / "full")]) == 0
    assert main(["finetune", str(root / "base"), *ft, "--lora", "rank=2,targets=attn.q,attn.v",
                 "--out", str(root / "lora_a")]) == 0
    assert main(["finetune", str(root / "base"), *ft, "--lora", "rank=3,targets=attn.q,attn.v", "--seed", "5",
                 "--out", str(root / "lora_b")]) == 0
    return root


def _leaves(x):
    return jax.tree.leaves(x)


def test_identical_models_show_no_change(runs, tmp_path):
    base = checkpoint.load(runs / "base")
    corpus = load_corpus("associations", seed=base.train_cfg.seed, size=base.data_cfg.corpus_size)
    probe = make_probe(base.tokenizer, base.model_cfg, corpus=corpus)
    copy = jax.tree.map(lambda x: x.copy(), base.params)
    result = compare(Model("base", base.params), [Model("same", copy)], probe, base.tokenizer, base.model_cfg)
    for name, r in result["weights"]["same"].items():
        assert r["fro"] == 0 and r["max_abs"] == 0 and r["relative"] == 0, name
        if "intruder_count" in r:
            assert r["intruder_count"] == 0 and r["delta_magnitude"] == 0 and r["delta_direction"] == 0, name
            assert r["energy_rank_delta"] == 0, name
    v = result["vectors"]["same"]
    assert v["static"]["max_abs_change"] == 0
    assert v["static"]["cosine_base"] == v["static"]["cosine_tuned"]
    assert all(c["mean_shift"] == 0 and c["base"] == c["tuned"] for c in v["contextual"])
    assert np.all(np.asarray(v["attention"]["js"]) == 0)
    assert np.all(np.asarray(v["attention"]["entropy_change"]) == 0)
    np.testing.assert_allclose(np.diag(v["cka"]["linear"]), 1.0, rtol=1e-9)
    assert v["lens"]["base"] == v["lens"]["tuned"]
    assert "No weight matrix changed." in result["summary"]["same"]
    assert "Static token embeddings are bit-identical to the base." in result["summary"]["same"]

    page = report.write(tmp_path / "report", result, title="identical")
    assert page.read_text().startswith("<!doctype html>")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())  # strict JSON: no NaN/Infinity
    assert metrics["models"] == ["same"]
    assert sorted(p.name for p in (tmp_path / "report" / "figures").iterdir()) == sorted(
        ["relative_change.png", "spectra.png", "intruders.png", "pairs_clusters.png", "cka.png",
         "attention_js.png", "attention_maps.png"])


def test_compare_cli_full_and_lora(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs / "base"), str(runs / "full"), str(runs / "lora_a"), str(runs / "lora_b"),
                 "--out", str(out), "--words", "justice,zebra", "--probe", "the people spoke of okapis"]) == 0
    _, err = capsys.readouterr()
    assert "not in the vocabulary, skipped: zebra, okapis" in err
    page = (out / "report.html").read_text()
    assert "zebra" in page and "data:image/png;base64," in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"] == ["full", "lora_a", "lora_b"]
    full, lora_a = metrics["weights"]["full"], metrics["weights"]["lora_a"]
    # Full fine-tuning moves every matrix; LoRA on q and v moves exactly those, by a rank <= its own.
    assert all(r["fro"] > 0 for r in full.values())
    moved = {n for n, r in lora_a.items() if r["fro"] > 0}
    assert moved == {f"blocks.{i}.attn.{m}.w" for i in range(2) for m in "qv"}
    assert all(lora_a[n]["energy_rank_delta"] <= 2 for n in moved)
    assert metrics["vectors"]["lora_a"]["static"]["max_abs_change"] == 0
    assert metrics["vectors"]["full"]["static"]["max_abs_change"] > 0
    phi = metrics["adapters"]["lora_a vs lora_b"]["blocks.0.attn.q.w"]["phi"]
    assert np.asarray(phi).shape == (2, 3) and all(0 <= x <= 1 + 1e-9 for row in phi for x in row)
    assert "adapter_subspaces.png" in {p.name for p in (out / "figures").iterdir()}

    code = main(["compare", str(runs / "base"), str(runs / "full"), "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_compare_refuses_other_shapes_and_empty_probes(runs, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--corpus", "associations", *WORDS[:-8], "--width", "24", "--layers", "2", "--heads", "2",
                 "--steps", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    code = main(["compare", str(runs / "base"), str(other), "--out", str(tmp_path / "x")])
    assert code == 2 and "differ in shape (width: 16 vs 24)" in capsys.readouterr().err
    code = main(["compare", str(runs / "base"), str(runs / "full"), "--no-corpus-probe", "--words", "zebra,gnu",
                 "--out", str(tmp_path / "y")])
    assert code == 2 and "the probe set is empty" in capsys.readouterr().err


# ---------------------------------------------------------------- several seeds: --seed-run


@pytest.fixture(scope="module")
def seed_runs(runs):
    """Two more seeds of the same pipeline as `runs` (base, full, lora_a): each its own base and fine-tunes."""
    ft = ["--corpus", "bindings", "--corpus-size", "200", "--batch-size", "4", "--eval-batches", "2", "--steps", "5"]
    groups = [[runs / "base", runs / "full", runs / "lora_a"]]
    for seed in (11, 4):
        root = runs / f"seed{seed}"
        assert main(["train", "--corpus", "associations", *WORDS, "--steps", "20", "--seed", str(seed),
                     "--out", str(root / "base")]) == 0
        assert main(["finetune", str(root / "base"), *ft, "--full", "--seed", str(seed), "--out", str(root / "full")]) == 0
        assert main(["finetune", str(root / "base"), *ft, "--lora", "rank=2,targets=attn.q,attn.v", "--seed", str(seed),
                     "--out", str(root / "lora")]) == 0
        groups.append([root / "base", root / "full", root / "lora"])
    return [[str(p) for p in g] for g in groups]


def test_one_seed_prints_numbers_and_no_verdict(runs, tmp_path):
    out = tmp_path / "one"
    assert main(["compare", str(runs / "base"), str(runs / "full"), str(runs / "lora_a"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for model in ("full", "lora_a"):
        text = " ".join(metrics["summary"][model])
        assert "one seed settles nothing" in text
        assert "closer than" not in text and "low-rank" not in text and "spread over" not in text
    assert metrics["seeds"]["claims"] == []  # nothing judged
    numbers = verdict_numbers(metrics, "full")
    assert metrics["seeds"]["values"]["full"] == {k: [v] for k, v in numbers.items()}


def test_seeds_are_judged_together(seed_runs, tmp_path, capsys):
    """Each seed's numbers are the ones a one-seed compare of it gives; the verdicts are seeds.judge's over
    them, and every verdict-like sentence carries the interval or says "not settled by 3 seeds"."""
    first, *others = seed_runs
    out = tmp_path / "three"
    argv = ["compare", *first, "--out", str(out)]
    for group in others:
        argv += ["--seed-run", *group]
    assert main(argv) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"] == ["full", "lora_a"]  # names from the first group
    assert [r["tuned"] for r in metrics["seeds"]["runs"]] == [g[1:] for g in seed_runs]
    assert [r["base_seed"] for r in metrics["seeds"]["runs"]][1:] == [11, 4]
    # Oracle per seed: that seed compared alone.
    for s, group in enumerate(seed_runs):
        alone = tmp_path / f"alone{s}"
        assert main(["compare", *group, "--out", str(alone)]) == 0
        single = json.loads((alone / "metrics.json").read_text())
        for i, model in enumerate(metrics["models"]):
            for key, value in verdict_numbers(single, single["models"][i]).items():
                assert metrics["seeds"]["values"][model][key][s] == pytest.approx(value, rel=1e-12), (s, model, key)
    # The verdicts: seeds.judge over the same findings (Holm over all four).
    claims = metrics["seeds"]["claims"]
    assert sum(len(c["findings"]) for c in claims) == 4
    expected = seeds.judge([{"claim": c["claim"], "findings": [
        seeds.finding(r["label"], r["values"], r["threshold"], above=r["above"]) for r in c["findings"]]}
        for c in claims])
    assert [r["verdict"] for c in expected for r in c["findings"]] == [r["verdict"] for c in claims for r in c["findings"]]
    for c in claims:
        for row in c["findings"]:
            line = next(s for s in metrics["summary"][row["label"]] if s.startswith("Over 3 seeds") and
                        (("rank" in s) == ("low-rank" in c["claim"])))
            assert f"{row['mean']:+.3g} [{row['low']:+.3g}, {row['high']:+.3g}]" in line
            assert (row["verdict"] in line) if row["verdict"].startswith("not settled") else "not settled" not in line


def test_seed_runs_must_match_the_first_group(seed_runs, runs, tmp_path, capsys):
    first, second, _ = seed_runs
    code = main(["compare", *first, "--seed-run", *second[:2], "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "1 tuned model(s), but BASE is followed by 2" in err and "Traceback" not in err
    code = main(["compare", *first, "--seed-run", second[0], second[2], second[1], "--out", str(tmp_path / "z")])
    err = capsys.readouterr().err
    assert code == 2 and f"--seed-run {second[2]}: a LoRA adapter, but the first group has a checkpoint" in err
    other = tmp_path / "other"
    assert main(["train", "--corpus", "associations", *WORDS[:-8], "--width", "24", "--layers", "2", "--heads", "2",
                 "--steps", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    code = main(["compare", *first, "--seed-run", str(other), *second[1:], "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot compare --seed-run base {other}" in err and "width: 16 vs 24" in err
