"""`minilm compare`: identical models show no change at all; real fine-tunes show exactly where they changed."""

import json

import jax
import numpy as np
import pytest

from minilm import checkpoint, report
from minilm.analysis.compare import Model, compare, make_probe
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
