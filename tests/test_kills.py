"""kill -9 of real `minilm train` processes: nothing saved is lost, --resume continues bit for bit.

Each test starts a real process, kills it with SIGKILL at a chosen moment (after a checkpoint exists,
during the very first save, between the two renames of a checkpoint swap), and then checks what is left:
a checkpoint that loads (or a --resume that says none was completed), a resumed run whose weights and
optimizer state equal an uninterrupted run's bit for bit, and no checkpoint.tmp / checkpoint.old once the
next save is done. Saves happen at every step (--checkpoint-every 1) so a kill lands near one.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from minilm import checkpoint, folders
from minilm.cli import main

SMALL = ["--corpus", "arithmetic", "--corpus-size", "300", "--context", "16", "--width", "16", "--layers", "1",
         "--heads", "2", "--batch-size", "4", "--eval-batches", "2", "--eval-every", "3", "--checkpoint-every", "1"]
STEPS = "6"
# A real train run that stops (and waits to be killed) at the n-th rename of `source` (checkpoint: the
# first rename of a swap, to checkpoint.old; checkpoint.tmp: the rename that puts a save in place).
STOP_AT_RENAME = """
import pathlib, sys, time
from minilm.cli import main
n, flag, source, seen, rename = int(sys.argv[1]), sys.argv[2], sys.argv[3], [0], pathlib.Path.rename
def stop_at(self, target):
    if self.name == source:
        seen[0] += 1
        if seen[0] == n and source == "checkpoint.tmp":
            open(flag, "w").close()
            time.sleep(120)
    result = rename(self, target)
    if self.name == source and seen[0] == n and source == "checkpoint":
        open(flag, "w").close()
        time.sleep(120)
    return result
pathlib.Path.rename = stop_at
sys.exit(main(sys.argv[4:]))
"""


def start(argv, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", STOP_AT_RENAME, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)


def kill_when(process, ready, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


def resume(out: Path) -> int:
    code = main(["train", "--out", str(out), "--resume", "--steps", STEPS])
    folders.release(out)  # this test process resumes several runs: let go of each
    return code


def arrays(out: Path) -> dict:
    return {f"{name}/{k}": v for name in checkpoint.ARRAY_FILES
            for k, v in load_file(out / "checkpoint" / name).items()}


def junk(out: Path) -> list:
    return sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *SMALL, "--steps", STEPS, "--out", str(out)]) == 0
    folders.release(out)
    return arrays(out)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_kill_after_a_save_resumes_bit_for_bit(tmp_path, uninterrupted):
    out = tmp_path / "run"
    p = start(["0", str(tmp_path / "never"), "-", "train", *SMALL, "--steps", STEPS, "--out", str(out)], tmp_path)
    kill_when(p, lambda: (out / "checkpoint" / "state.json").is_file())
    assert checkpoint.load(out).state["step"] >= 1
    assert resume(out) == 0
    assert same(arrays(out), uninterrupted) and junk(out) == []


def test_a_kill_during_the_first_save_says_none_was_completed(tmp_path, capsys, uninterrupted):
    out, flag = tmp_path / "run", tmp_path / "flag"
    p = start(["1", str(flag), "checkpoint.tmp", "train", *SMALL, "--steps", STEPS, "--out", str(out)], tmp_path)
    kill_when(p, flag.exists)  # the first save is written, not yet renamed into place
    assert flag.exists() and not checkpoint.is_complete(out) and (out / "checkpoint.tmp").is_dir()
    capsys.readouterr()
    assert resume(out) == 2
    assert "no checkpoint was completed yet" in capsys.readouterr().err
    assert main(["train", *SMALL, "--steps", STEPS, "--out", str(out)]) == 0  # a plain run may start over
    folders.release(out)
    assert same(arrays(out), uninterrupted) and junk(out) == []


def killed_between_renames(tmp_path, n: int) -> Path:
    out, flag = tmp_path / "run", tmp_path / "flag"
    p = start([str(n), str(flag), "checkpoint", "train", *SMALL, "--steps", STEPS, "--out", str(out)], tmp_path)
    kill_when(p, flag.exists)
    assert flag.exists(), "the run never reached its swap"
    assert not (out / "checkpoint").exists() and (out / "checkpoint.old").is_dir()
    return out


def test_a_kill_between_the_renames_keeps_the_previous_checkpoint(tmp_path):
    out = killed_between_renames(tmp_path, 3)  # the first save has nothing to rename: this is the save of step 4
    assert checkpoint.load(out).state["step"] == 3  # read from checkpoint.old: the save of step 4 never landed


def test_a_kill_between_the_renames_then_resume_is_bit_for_bit(tmp_path, uninterrupted):
    out = killed_between_renames(tmp_path, 4)
    assert resume(out) == 0
    assert same(arrays(out), uninterrupted) and junk(out) == []
