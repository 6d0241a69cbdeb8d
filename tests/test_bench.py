"""`minilm bench` and mixed precision, as a user meets them. No timing is asserted (speed lives in
benchmarks/ and in the closing notes); what is checked is what must hold whatever the machine:
identities between the reported figures, counts against the pytrees and the cost model, files written,
clear errors. Plus bfloat16 training numerics."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from lora import cost as lora_cost
from minilm import bench, cost, train
from minilm.cli import main
from minilm.config import ModelConfig, TrainConfig
from minilm.errors import MinilmError
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
    adapters = lora_cost.adapter_ranks(model_cfg, lora.LoraConfig(rank=2, targets=("attn.q", "attn.v")))
    predicted = lora_cost.adapters_step_cost(model_cfg, 4, adapters)
    assert low["trainable_params"] == predicted.trainable_params == 2 * 2 * (32 + 32)
    assert low["model_flops"] == predicted.flops
    assert result["lora_over_full"]["time"] == pytest.approx(low["ms_per_step"] / full["ms_per_step"])
    speed = result["sampling"]
    assert speed["new_tokens"] == 15
    assert speed["speedup"] == pytest.approx(speed["cached_tokens_per_s"] / speed["uncached_tokens_per_s"])
    assert "LoRA/full" in out and "KV cache" in out
    for case in (full, low):  # the step's parts, timed apart: the differences add up to the parts' times
        ph = case["phases"]
        assert ph["forward_ms"] > 0
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


@pytest.mark.parametrize("lora_cfg, dtype", [
    (None, "float32"), (None, "bfloat16"),
    (lora.LoraConfig(rank=2, targets=("all-linear",), fuse_qkv=True, dropout=0.3), "float32")])
def test_phases_time_the_same_loss_the_step_computes(lora_cfg, dtype):
    """The forward `phases` times is the step's own loss: its first micro-batch, with the step's first
    micro-batch key (adapter dropout) and number format."""
    model_cfg = ModelConfig(vocab_size=65, context=16, width=32, layers=1, heads=2)
    train_cfg = TrainConfig(batch_size=4, grad_accum=2, warmup=0.0, dtype=dtype)
    case = (bench.train_step_case(model_cfg, train_cfg) if lora_cfg is None else
            lora.train_step_case(model_cfg, train_cfg, lora_cfg))
    trainable, frozen, _, windows, key = case.state
    if lora_cfg is not None:  # adapters that change the output, so that dropout's mask matters
        trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape), trainable)
        case.state[0] = trainable
    loss = train.mixed_precision(train.loss_fn if lora_cfg is None else lora.loss_fn, dtype)
    want = float(loss(trainable, frozen, windows[0], model_cfg, jax.random.split(key, 2)[0]))
    other = float(loss(trainable, frozen, windows[0], model_cfg, jax.random.split(key, 2)[1]))
    # (computed first: phases takes real steps, which update `trainable` in place)
    assert case.phases(rounds=1)["first_micro_batch_loss"] == pytest.approx(want, rel=1e-6)
    if lora_cfg is not None:  # control: another key drops other inputs
        assert abs(other - want) > 1e-4


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
        cfg = ModelConfig(vocab_size=65, context=16, width=r["width"], layers=1, heads=max(1, r["width"] // 64))
        adapter = lora.LoraConfig(rank=r["rank"], alpha=2.0 * r["rank"], targets=("all-linear",), fuse_qkv=True)
        flops = lora_cost.lora_step_cost(cfg, 4, adapter).flops / cost.step_cost(cfg, 4).flops
        assert r["flop_ratio"] == pytest.approx(flops)
        assert 0 < r["flop_ratio"] < 1  # LoRA skips every weight gradient, adds less than it skips


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps 0"),
    (["--lora", "rank=0"], "rank 0"),
    (["--lora", "rank=2,targets=attn.nothing"], "matches no matrix"),
    (["--sweep", "--sweep-widths", "64,x"], "--sweep-widths"),
    (["--width", "33"], "not divisible"),
    (["--sweep", "--sweep-widths", "129", "--sweep-ranks", "1"], "--sweep-widths: width = 129 is not divisible"),
    (["--sweep", "--sweep-widths", "32", "--sweep-ranks", "64"], "--sweep-ranks 64 at width 32"),
    (["--mode", "full", "--sweep", "--lora", "rank=2,targets=attn.x"], "matches no matrix"),
    (["--sweep", "--plot", "ratio.pngz"], "--plot ratio.pngz: name the file with one of the suffixes"),
    (["--json", "no_such_folder/b.json"], "the folder no_such_folder does not exist"),
    (["--lora", "rank=2,fuse_qkv=maybe"], "fuse_qkv='maybe'"),
    (["--lora", "rank=2,targets=attn.*,fuse_qkv=true,rank_pattern=attn.v:3"], "fuse_qkv: blocks.0.attn.v has rank 3"),
    (["--lora", "rank=2,targets=attn.q,mlp.fc,fuse_qkv=true"], "adapt fewer than two of them"),
])
def test_bench_bad_input_is_one_clear_line(capsys, argv, needle):
    code, out, err = run(capsys, "bench", *TINY, "--no-sample", *argv)
    assert code == 2 and needle in err and "Traceback" not in err
    assert "compiling" not in out  # refused before any timing


def test_bench_refuses_a_folder_as_json(tmp_path, capsys):
    code, _, err = run(capsys, "bench", *TINY, "--json", str(tmp_path))
    assert code == 2 and f"--json {tmp_path} is a folder" in err and "Traceback" not in err


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
        floats = [leaf for leaf in jax.tree.leaves((trainable, opt_state)) if jnp.issubdtype(leaf.dtype, jnp.floating)]
        assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)  # master weights, Adam's moments
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)  # bfloat16 keeps ~3 digits
    # and the products really ran in bfloat16: the losses differ by far more than float32 rounding
    assert np.max(np.abs(np.subtract(losses["bfloat16"], losses["float32"]))) > 1e-4


def test_mixed_precision_casts_block_matrices_only():
    seen = {}

    def spy(trainable, frozen, windows, cfg, key=None):
        for half in (trainable, frozen):  # a leaf is in one half, None in the other
            seen.update({jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(half)})
        return 0.0

    params = init(ModelConfig(vocab_size=5, context=4, width=8, layers=1, heads=2), key=jax.random.key(0))
    trainable, frozen = partition(params, lambda name: "attn" in name)  # q in one half, mlp.proj in the other
    train.mixed_precision(spy, "bfloat16")(trainable, frozen, None, None)
    assert seen["['blocks'][0]['attn']['q']['w']"] == jnp.bfloat16
    assert seen["['blocks'][0]['mlp']['proj']['w']"] == jnp.bfloat16
    assert seen["['embed']['tok']"] == jnp.float32 and seen["['blocks'][0]['attn']['q']['b']"] == jnp.float32
    assert seen["['blocks'][0]['ln1']['scale']"] == jnp.float32
    assert train.mixed_precision(spy, "float32") is spy


def test_bad_dtype_is_refused():
    with pytest.raises(MinilmError, match="dtype = 'float16'"):
        TrainConfig(dtype="float16")


def test_the_rest_of_a_step_below_zero_is_shown_as_noise():
    # forward and backward are timed apart from the step, so step - (forward + backward) is a difference
    # of medians that noise can push below zero; the table must not print a negative time
    assert bench._rest(-3.24) == "~0"
    assert bench._rest(0.0) == "0.0" and bench._rest(1234.56) == "1,234.6" and bench._rest(7.6, ",.0f") == "8"
    row = bench._row("  ms the rest", [bench._rest(-1.0), bench._rest(12.34)], "")
    assert row.split()[-2:] == ["~0", "12.3"]
