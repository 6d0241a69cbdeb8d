"""`minilm bench` and mixed precision, as a user meets them. No timing is asserted (speed lives in
benchmarks/ and in the closing notes); what is checked is what must hold whatever the machine:
identities between the reported figures, counts against the pytrees and the cost model, files written,
clear errors. Plus the huge-page restart's environment handling, and bfloat16 training numerics."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from minilm import cost, hugepages, train
from minilm.cli import main
from minilm.config import ModelConfig, TrainConfig
from minilm.model import init
from minilm.tree import partition, size

TINY = ["--preset", "tiny", "--steps", "2", "--width", "32", "--layers", "1", "--heads", "2", "--context", "16",
        "--batch-size", "4"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_json_figures_agree_with_each_other_and_the_cost_model(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", *TINY, "--lora", "rank=2,targets=attn.q,attn.v", "--json", str(path))
    assert code == 0, err
    result = json.loads(path.read_text())
    model_cfg = ModelConfig(vocab_size=65, context=16, width=32, layers=1, heads=2)
    full, low = result["full"], result["lora"]
    for case in (full, low):
        assert case["tokens_per_step"] == 4 * 16
        assert case["tokens_per_s"] * case["ms_per_step"] / 1e3 == pytest.approx(case["tokens_per_step"], rel=1e-9)
        assert case["ms_per_step_min"] <= case["ms_per_step"] and case["steps_timed"] == 2
        assert sum(case["predicted"]["flops_per_token"].values()) * case["tokens_per_step"] == case["model_flops"]
        assert case["compile_s"] > 0 and case["xla_flops"] > 0 and case["memory"]["xla_temp_bytes"] > 0
    params = init(model_cfg, key=jax.random.key(0))
    assert full["trainable_params"] == full["total_params"] == size(params)
    assert full["memory"]["optimizer_state_bytes"] >= 2 * 4 * size(params)  # two moments per scalar (+ counters)
    adapters = cost.adapter_ranks(model_cfg, lora.LoraConfig(rank=2, targets=("attn.q", "attn.v")))
    assert low["trainable_params"] == cost.step_cost(model_cfg, 4, adapters).trainable_params == 2 * 2 * (32 + 32)
    assert low["model_flops"] == cost.step_cost(model_cfg, 4, adapters).flops
    assert result["lora_over_full"]["time"] == pytest.approx(low["ms_per_step"] / full["ms_per_step"])
    assert result["sampling"]["new_tokens"] == 15 and result["sampling"]["speedup"] > 0
    assert "LoRA/full" in out and "KV cache" in out
    for case in (full, low):  # the step's parts, timed apart: the differences add up to the parts' times
        ph = case["phases"]
        assert ph["forward_ms"] > 0 and ph["forward_backward_ms"] > ph["forward_ms"]
        assert ph["forward_ms"] + ph["backward_ms"] == pytest.approx(ph["forward_backward_ms"])
        assert ph["forward_backward_ms"] + ph["optimizer_ms"] == pytest.approx(ph["step_ms"])
    assert "By parts, full vs LoRA" in out and "ms backward (+ the gradients)" in out


def test_bench_one_mode_puts_its_speed_at_the_top_of_the_json(tmp_path, capsys):
    path = tmp_path / "full.json"
    code, _, err = run(capsys, "bench", *TINY, "--mode", "full", "--no-sample", "--no-phases", "--json", str(path))
    assert code == 0, err
    result = json.loads(path.read_text())
    assert result["ms_per_step"] == result["full"]["ms_per_step"] and "lora" not in result
    assert "phases" not in result["full"]
    assert result["tokens_per_s"] == result["full"]["tokens_per_s"] and "sampling" not in result


@pytest.mark.parametrize("lora_cfg", [None, lora.LoraConfig(rank=2, targets=("all-linear",), fuse_qkv=True,
                                                            dropout=0.1)])
def test_phases_time_the_same_loss_the_step_reports(lora_cfg):
    """The parts `phases` times compute what the step computes: its forward gives the step's loss."""
    from minilm import bench

    model_cfg = ModelConfig(vocab_size=65, context=16, width=32, layers=1, heads=2)
    case = bench.train_step_case(model_cfg, TrainConfig(batch_size=4), lora_cfg)
    _, _, metrics = case.step(*case.state)  # the loss of the current state (case.state is not advanced)
    phases = case.phases(rounds=1)
    assert phases["first_micro_batch_loss"] == pytest.approx(float(metrics["loss"]), rel=1e-6)


def test_bench_sweep_writes_a_plot_and_one_row_per_width_and_rank(tmp_path, capsys):
    plot, path = tmp_path / "ratio.png", tmp_path / "sweep.json"
    code, out, err = run(capsys, "bench", *TINY, "--mode", "full", "--no-sample", "--no-phases", "--sweep",
                         "--sweep-widths", "64,32", "--sweep-ranks", "1,2", "--plot", str(plot), "--json", str(path))
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(path.read_text())["sweep"]
    assert [(r["width"], r["rank"]) for r in rows] == [(64, 1), (64, 2), (32, 1), (32, 2)]
    for r in rows:
        assert r["time_ratio"] == pytest.approx(r["lora_ms"] / r["full_ms"])
        assert 0 < r["flop_ratio"] < 1  # LoRA skips every weight gradient, adds less than it skips


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps 0"),
    (["--lora", "rank=0"], "rank 0"),
    (["--lora", "rank=2,targets=attn.nothing"], "matches no matrix"),
    (["--sweep", "--sweep-widths", "64,x"], "--sweep-widths"),
    (["--width", "33"], "not divisible"),
])
def test_bench_bad_input_is_one_clear_line(capsys, argv, needle):
    code, out, err = run(capsys, "bench", *TINY, "--no-sample", *argv)
    assert code == 2 and needle in err and "Traceback" not in err


def test_bench_refuses_a_folder_as_json(tmp_path, capsys):
    code, _, err = run(capsys, "bench", *TINY, "--json", str(tmp_path))
    assert code == 2 and "is a folder" in err


# ---------------------------------------------------------------- mixed precision


def test_bfloat16_step_keeps_float32_state_and_follows_the_float32_loss():
    cfg = ModelConfig(vocab_size=13, context=16, width=32, layers=2, heads=2)
    rng = np.random.default_rng(0)
    windows = jnp.asarray(rng.integers(0, 13, (1, 4, 17)), jnp.int32)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        tcfg = TrainConfig(steps=5, batch_size=4, lr=1e-2, min_lr=1e-3, warmup=0.0, dtype=dtype)
        trainable, frozen = partition(init(cfg, key=jax.random.key(0)), lambda name: True)
        opt_state = train.optimizer(tcfg).init(trainable)
        step = train.make_step(cfg, tcfg)
        losses[dtype] = []
        for _ in range(5):
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, windows, jax.random.key(1))
            losses[dtype].append(float(metrics["loss"]))
        dtypes = {leaf.dtype for leaf in jax.tree.leaves((trainable, opt_state)) if hasattr(leaf, "dtype")}
        assert jnp.bfloat16 not in dtypes  # master weights and Adam's moments stay float32
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)  # bfloat16 keeps ~3 digits
    assert losses["bfloat16"] != losses["float32"]  # and the products really ran in bfloat16


def test_mixed_precision_casts_block_matrices_only():
    seen = {}

    def spy(trainable, frozen, windows, cfg, key=None):
        seen.update({k: v.dtype for k, v in jax.tree_util.tree_leaves_with_path(trainable)
                     for k in [jax.tree_util.keystr(k)]})
        return 0.0

    params = init(ModelConfig(vocab_size=5, context=4, width=8, layers=1, heads=2), key=jax.random.key(0))
    train.mixed_precision(spy, "bfloat16")(params, {}, None, None)
    assert seen["['blocks'][0]['attn']['q']['w']"] == jnp.bfloat16
    assert seen["['blocks'][0]['mlp']['proj']['w']"] == jnp.bfloat16
    assert seen["['embed']['tok']"] == jnp.float32 and seen["['blocks'][0]['attn']['q']['b']"] == jnp.float32
    assert seen["['blocks'][0]['ln1']['scale']"] == jnp.float32
    assert train.mixed_precision(spy, "float32") is spy


def test_bad_dtype_is_refused():
    with pytest.raises(Exception, match="dtype = 'float16'"):
        TrainConfig(dtype="float16")


# ---------------------------------------------------------------- huge pages


def test_huge_page_environment_keeps_other_tunables_and_is_idempotent():
    env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and env["HOME"] == "/x"
    assert hugepages.environment(env) == env
    assert hugepages.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MINILM_HUGE_PAGES", "0")
    assert not hugepages.useful()
    hugepages.restart_with_huge_pages()  # returns instead of replacing the test process
