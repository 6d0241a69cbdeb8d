"""Training on a device mesh (minilm/mesh.py, lora/mesh.py): the same numbers as one device.

8 emulated CPU devices need XLA_FLAGS before JAX starts, so the runs happen in one subprocess
(tests/mesh_runs.py) that does every comparison; two processes joined by jax.distributed over localhost
train through the command line. A heavy tier (`mesh`): about a minute and a half of the suite.

Tolerance of the loss comparisons: 1e-5, absolute, on losses near 2.6. A mesh changes only the order of
float32 sums (each device sums its rows, then the devices' sums are added; the gradient likewise), which
perturbs a loss by a few units of float32 rounding (eps = 1.2e-7, so ~2.4e-7 per unit at 2.6); 20 Adam
steps carry those into the weights. Measured: at most 1.4e-6 (6 units). 1e-5 leaves ~7x room, while a real
mistake (a shard read twice, a gradient not summed over devices, a wrong learning rate) moves a loss by
1e-3 or more within a step or two.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minilm.cli import main

TOLERANCE = 1e-5
ROOT = Path(__file__).resolve().parent.parent


def environment(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_runs.py"), str(tmp / "runs.json"), str(tmp)],
                          env=environment(8), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "runs.json").read_text())


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("mesh", ["8x1", "4x2", "1x8"])
def test_mesh_gives_the_losses_of_one_device(runs, mode, mesh):
    one, many = np.array(runs["losses"][mode]["1"]), np.array(runs["losses"][mode][mesh])
    assert len(one) == len(many) == 20
    assert one[-1] < one[0] - 0.05  # it learns (by 5,000x the tolerance): the runs compared do something
    np.testing.assert_allclose(many, one, rtol=0, atol=TOLERANCE)


def test_sharded_checkpoint_loads_exactly_and_resumes_anywhere(runs):
    full = runs["losses"]["full"]
    assert runs["sharded_checkpoint_exact"]  # gathered from 8 devices, saved, loaded: the same bits
    # resumed on the same mesh: the same arithmetic, so bit-identical to the uninterrupted run
    assert runs["sharded_resumed_on_mesh"] == full["4x2"][10:]
    # resumed on one device: the same to float32 reduction order
    np.testing.assert_allclose(runs["sharded_resumed_on_one"], full["4x2"][10:], rtol=0, atol=TOLERANCE)


def test_single_device_checkpoint_is_placed_exactly_and_resumes_on_a_mesh(runs):
    assert runs["placed_exact"] and runs["placed_split"]  # split over fsdp = 2, every value kept
    np.testing.assert_allclose(runs["single_resumed_on_mesh"], runs["losses"]["full"]["1"][10:], rtol=0,
                               atol=TOLERANCE)


@pytest.mark.parametrize("spec, message", [
    ("data=3", "--batch-size 32 is not divisible by the 3 devices of --mesh data=3,fsdp=1"),
    ("data=2,fsdp=2", "--mesh data=2,fsdp=2 needs 4 devices (more devices than exist): JAX sees 1"),
    ("model=2", "--mesh 'model=2': unknown axis 'model'; the axes are data and fsdp"),
    ("data", "--mesh 'data': expected AXIS=SIZE pairs separated by commas, e.g. data=4,fsdp=2"),
    ("data=0", "axis 'data' has size 0; sizes are whole numbers >= 1"),
])
def test_bad_meshes_are_one_line_errors(tmp_path, capsys, spec, message):
    code = main(["train", "--corpus", "arithmetic", "--corpus-size", "600", "--dry-run", "--mesh", spec,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("minilm train: error: ")
    assert message in err
    assert not (tmp_path / "run").exists()


def test_incomplete_process_flags_are_refused(tmp_path, capsys):
    assert main(["train", "--corpus", "arithmetic", "--num-processes", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs all of --coordinator, --num-processes and --process-id; missing --coordinator" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(tmp_path):
    """Two processes of 2 CPU devices each, joined over localhost (jax.distributed, gloo): a 2 x 2 mesh.
    Each builds its own half of every batch; process 0 alone writes; the losses are one device's."""
    args = ["train", "--corpus", "arithmetic", "--corpus-size", "600", "--context", "16", "--width", "32",
            "--layers", "2", "--heads", "4", "--steps", "6", "--batch-size", "8", "--eval-every", "3",
            "--checkpoint-every", "3"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "minilm.cli", *args, "--out", str(tmp_path / "two"),
                               "--mesh", "data=2,fsdp=2", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env=environment(2), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    # process 1 prints none of what process 0 prints (gloo's C++ layer logs its connections to stdout itself, its
    # threads' lines interleaved, so those are not matched line by line) ...
    assert "done: step 6" in outputs[0][0]
    own = [line.strip() for line in outputs[0][0].splitlines() if line.strip() and "connected" not in line]
    assert own and not any(line in outputs[1][0] for line in own)
    assert "train:" not in outputs[1][1]                            # ... not even a progress bar
    assert main([*args, "--out", str(tmp_path / "one")]) == 0       # the same run on this process's one device
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == list(range(1, 7))  # one writer: each step logged once
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=0, atol=TOLERANCE)
    # the checkpoint process 0 gathered and wrote resumes on one device
    assert main(["train", "--out", str(tmp_path / "two"), "--resume", "--steps", "7"]) == 0
