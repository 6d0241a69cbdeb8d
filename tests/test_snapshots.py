"""Snapshots along fine-tuning (issue 17): what the map needs, kept every K steps, equal to the run's own state.

`minilm finetune --snapshot-every K` writes OUT/snapshots/step-NNNNNN/ (LoRA: an adapter folder; full: the weights
without optimizer state); experiments/common.finetune keeps them in memory. Oracles: the last snapshot is the run's
saved result, bit for bit; an earlier one is a copy (the steps update their arrays in place) that differs from it.
"""

import sys

import jax
import numpy as np
from helpers import EXPERIMENTS

import lora
from minilm import checkpoint
from minilm.cli import main
from minilm.tree import named_leaves

SMALL = ["--corpus", "arithmetic", "--corpus-size", "300", "--context", "16", "--width", "16", "--layers", "1",
         "--heads", "2", "--batch-size", "4", "--eval-batches", "2"]
FT = ["--corpus", "arithmetic", "--corpus-size", "300", "--batch-size", "4", "--eval-batches", "2", "--steps", "5"]


def same(a, b) -> bool:
    a, b = named_leaves(a), named_leaves(b)
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_finetune_keeps_snapshots_every_k_steps_and_the_last_is_the_result(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", *SMALL, "--steps", "3", "--out", str(base)]) == 0
    ckpt = checkpoint.load(base)
    for mode in (["--lora", "rank=2,alpha=4"], ["--full"]):
        out = tmp_path / mode[0].strip("-")
        assert main(["finetune", str(base), *FT, *mode, "--snapshot-every", "2", "--out", str(out)]) == 0
        kept = sorted(p.name for p in (out / "snapshots").glob("step-*"))
        assert kept == ["step-000002", "step-000004", "step-000005"]  # every 2 steps and the last
        if mode[0] == "--lora":
            def load(path):
                return lora.load_adapter(path, ckpt.params, ckpt.model_cfg, tokenizer=ckpt.tokenizer)[0]
            final, early = load(out / "adapter"), load(out / "snapshots" / kept[0])
            names = lambda folder: sorted(f.name for f in folder.iterdir())  # noqa: E731
            assert names(out / "snapshots" / kept[0]) == names(out / "adapter")  # the adapters alone
        else:
            def load(path):
                return checkpoint.load(path).params
            final, early = load(out / "checkpoint"), load(out / "snapshots" / kept[0])
            assert (out / "snapshots" / kept[0] / "optimizer.safetensors").stat().st_size < 100  # no moments
        assert same(load(out / "snapshots" / kept[-1]), final) and not same(early, final)
    again = ["finetune", str(base), *FT, "--full", "--snapshot-every", "3", "--out", str(tmp_path / "full")]
    assert main(again) == 2 and "already exists" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0  # the old run's snapshots go with it
    assert sorted(p.name for p in (tmp_path / "full" / "snapshots").glob("step-*")) == ["step-000003", "step-000005"]
    # a snapshots folder minilm did not write is never deleted, --overwrite or not
    (tmp_path / "full" / "snapshots" / ".minilm.json").unlink()
    (tmp_path / "full" / "snapshots" / "mine.txt").write_text("keep me")
    assert main([*again, "--overwrite"]) == 2 and "not written by minilm" in capsys.readouterr().err
    assert (tmp_path / "full" / "snapshots" / "mine.txt").read_text() == "keep me"


def test_common_finetune_keeps_copies_from_step_0(small_cfgs, arithmetic_data):
    sys.path.insert(0, str(EXPERIMENTS))
    import common
    model_cfg, train_cfg = small_cfgs
    from minilm.model import init
    base = init(model_cfg, key=jax.random.key(0))
    cfg = lora.LoraConfig(rank=2, alpha=4, targets=("attn.q", "attn.v"))
    for lora_cfg in (None, cfg):
        t = common.finetune("x", base, arithmetic_data, model_cfg, train_cfg, lora_cfg, snapshot_every=5)
        assert sorted(t.snapshots) == [0, 5, 10, 12]
        params = common.snapshot_params(t, lora_cfg)
        assert same(params[0], base) if lora_cfg is None else np.allclose(
            *(np.asarray(x["blocks"][0]["attn"]["q"]["w"]) for x in (params[0], base)))  # B = 0: LoRA starts at W0
        assert same(params[12], t.params) and not same(params[5], t.params)
