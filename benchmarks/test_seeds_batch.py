"""Seeds as a batch axis: seconds per seed of one training step, S seeds one after another vs vmapped.

The demo's model (preset "tiny": context 64, width 64, 2 layers, 4 heads, batch 32, vocabulary 65),
full training, S = 1, 2, 5 seeds, each with its own parameters, AdamW state, key and random windows.

  sequential  train.make_step's compiled step called S times, once per seed (as S train.run loops do)
  batched     minilm.seeds_batch.make_step: the same step under jax.vmap, all S seeds in one call

Both donate their buffers (as the training loops do) and feed each step's output into the next. Compiling
and two warm-up calls happen before the timed rounds; every timed call ends in jax.block_until_ready.
Figures in benchmark.extra_info: s_per_seed (median round / S), other_cpu_fraction (see
test_train_step.py: well above 0, the times are inflated). The cases alternate sequential and batched
at each S so that drift in the machine's load hits both; run the file several times and compare within
a run (benchmarks/README.md, "Seeds as a batch axis").
"""

from __future__ import annotations

import dataclasses

import jax
import pytest

import minilm.config
from minilm import seeds_batch, train
from minilm.contention import cpu_times, other_cpu_fraction
from minilm.model import init
from minilm.tree import partition

VOCAB_SIZE = 65  # as test_train_step.py: shakespeare-char's vocabulary
ROUNDS = 20      # a round is one step of every seed: ~20 ms per tiny step, so 0.4-2 s per case
SUMMARY: list[tuple[int, str, float, float | None]] = []  # (S, mode, s_per_seed, other_cpu) for the table


def _seeds(seeds: int):
    """S tiny models' (trainable, frozen, opt_state, windows, step key), one per seed."""
    model_cfg, train_cfg = minilm.config.preset("tiny")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=VOCAB_SIZE)
    out = []
    for seed in range(seeds):
        key = jax.random.key(seed)
        trainable, frozen = partition(init(model_cfg, key=key), lambda name: True)
        windows = jax.random.randint(jax.random.fold_in(key, 1), (train_cfg.grad_accum, train_cfg.batch_size,
                                                                  model_cfg.context + 1), 0, VOCAB_SIZE)
        out.append((trainable, frozen, train.optimizer(train_cfg).init(trainable), windows, jax.random.fold_in(key, 2)))
    return model_cfg, train_cfg, out


def _sequential(model_cfg, train_cfg, seeds):
    step = train.make_step(model_cfg, train_cfg, donate=True)
    states = [list(s) for s in seeds]

    def one_round():
        for s in states:
            s[0], s[2], out = step(*s)
        jax.block_until_ready([s[0] for s in states])
    return one_round


def _batched(model_cfg, train_cfg, seeds):
    step = seeds_batch.make_step(model_cfg, train_cfg, donate=True)
    stacked = list(jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[tuple(s) for s in seeds]))

    def one_round():
        stacked[0], stacked[2], out = step(*stacked)
        jax.block_until_ready(stacked[0])
    return one_round


@pytest.mark.parametrize("seeds, mode", [(s, m) for s in (1, 2, 5) for m in ("sequential", "batched")],
                         ids=lambda v: str(v))
def test_seeds_batch(benchmark, seeds, mode):
    model_cfg, train_cfg, state = _seeds(seeds)
    one_round = (_sequential if mode == "sequential" else _batched)(model_cfg, train_cfg, state)
    one_round(), one_round()  # compile and warm up, outside the timed rounds
    before = cpu_times()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    other = other_cpu_fraction(before, cpu_times())
    per_seed = benchmark.stats.stats.median / seeds
    benchmark.extra_info.update(seeds=seeds, mode=mode, s_per_seed=per_seed, other_cpu_fraction=other)
    SUMMARY.append((seeds, mode, per_seed, other))
    if len(SUMMARY) % 2 == 0:  # print the pair just measured: sequential and batched at this S
        (_, _, sequential, _), (_, _, batched, _) = SUMMARY[-2:]
        print(f"\nS={seeds}: {sequential * 1e3:.1f} ms per seed sequential, {batched * 1e3:.1f} batched "
              f"(batched/sequential {batched / sequential:.2f}, others {other if other is None else f'{other:.0%}'})")
