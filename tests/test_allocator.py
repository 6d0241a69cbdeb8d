"""minilm/allocator.py: glibc's tunables are added without disturbing others, and with them (plus JAX
running inline) a train step reuses its working memory: page faults per step, counted by the kernel,
fall from one per fresh page to almost none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from minilm import allocator

ALL = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def test_environment_adds_each_missing_tunable_keeps_the_rest_and_is_idempotent():
    env = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + ALL, "HOME": "/x"}
    assert allocator.environment(env) == env
    assert allocator.environment({})["GLIBC_TUNABLES"] == ALL
    # a tunable the user set keeps the user's value
    mine = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=4"})["GLIBC_TUNABLES"]
    assert mine == "glibc.malloc.mmap_max=4:glibc.malloc.hugetlb=1:glibc.malloc.trim_threshold=68719476736"


def test_tuning_can_be_turned_off_and_running_inline_must_come_first(monkeypatch):
    monkeypatch.setenv("MINILM_MALLOC_TUNING", "0")
    assert not allocator.useful() and not allocator.missing()
    allocator.restart_with_tunables()  # returns instead of replacing the test process
    jax.numpy.zeros(1).block_until_ready()  # JAX has computed in this process: too late to change dispatch
    with pytest.raises(RuntimeError, match="before JAX's first computation"):
        allocator.run_inline()


CHILD = """
import dataclasses, json, resource, sys
from minilm import allocator
if sys.argv[1] == "inline":
    allocator.run_inline()
from minilm.bench import train_step_case
from minilm.config import preset
model_cfg, train_cfg = preset("tiny")
case = train_step_case(dataclasses.replace(model_cfg, vocab_size=65), dataclasses.replace(train_cfg, batch_size=64))
case.run(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
case.run(4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults_per_step": (after - before) / 4, "temp_bytes": case.xla["temp_bytes"]}))
"""


def faults_per_step(tunables: str | None, dispatch: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", CHILD, dispatch], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not allocator.useful(), reason="glibc's tunables exist on Linux with glibc only")
def test_with_the_tunables_and_inline_dispatch_a_step_reuses_its_memory():
    plain = faults_per_step(None, "async")
    tuned = faults_per_step(ALL, "inline")
    # The step's temporaries are one block above glibc's largest mmap threshold (32 MiB): without the
    # tunables it is mapped afresh every step, a fault per 4 KiB page it touches.
    assert plain["temp_bytes"] > 32 << 20
    assert plain["faults_per_step"] > plain["temp_bytes"] / 4096 / 4
    # With them the same block comes back from glibc's heap, already mapped.
    assert tuned["faults_per_step"] < 100 and tuned["faults_per_step"] < plain["faults_per_step"] / 50
