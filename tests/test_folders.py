"""Nothing lost, nothing deleted that minilm did not write: marks, locks, atomic saves, recovery.

Real folders, real files, real processes: a second writer is a second Python process, a kill is
SIGKILL, a failed write is the kernel refusing to let the file grow (RLIMIT_FSIZE: EFBIG, the same
OSError path as a full disk).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minilm import checkpoint, folders, train
from minilm.config import DataConfig, ModelConfig, TrainConfig
from minilm.errors import MinilmError
from minilm.model import init
from minilm.tokenizer import Tokenizer
from minilm.tree import named_leaves

MODEL = ModelConfig(vocab_size=7, context=5, width=6, layers=1, heads=2, mlp_ratio=3)
TRAIN = TrainConfig(steps=3, batch_size=2)
TOKENIZER = Tokenizer(kind="char", vocab=tuple("abcdefg"))


def save(path, params=None, step=1):
    params = init(MODEL, key=jax.random.key(0)) if params is None else params
    checkpoint.save(path, params=params, opt_state=train.optimizer(TRAIN).init(params), model_cfg=MODEL,
                    train_cfg=TRAIN, data_cfg=DataConfig(corpus="arithmetic"), tokenizer=TOKENIZER,
                    state={"step": step, "data_cursor": 0, "key": checkpoint.key_to_json(jax.random.key(1))})


# ---------------------------------------------------------------- what --overwrite may replace


def test_output_checks_refuse_what_is_not_ours_and_the_commands_inputs(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(MinilmError, match="already exists; pass --overwrite"):
        folders.check_output(precious, "report", overwrite=False)
    with pytest.raises(MinilmError, match="not written by minilm"):
        folders.check_output(precious, "report", overwrite=True)
    assert (precious / "thesis.txt").read_text() == "years of work"
    with pytest.raises(MinilmError, match="is a file"):
        folders.check_output(precious / "thesis.txt", "report", overwrite=True)
    with pytest.raises(MinilmError, match="lies under .*thesis.txt, which is a file"):
        folders.check_output(precious / "thesis.txt" / "out", "report", overwrite=True)
    run = tmp_path / "run"
    folders.mark(run.mkdir() or run, "run")
    with pytest.raises(MinilmError, match="holds a minilm run, not a report"):
        folders.check_output(run, "report", overwrite=True)
    assert folders.check_output(run, "run", overwrite=True) == run
    for out, given in ((run, run), (run, run / "checkpoint"), (run / "report", run)):
        with pytest.raises(MinilmError, match="input"):
            folders.check_output(out, "run", overwrite=True, inputs=[given])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert folders.check_output(empty, "report", overwrite=False) == empty  # nothing there to lose


def test_a_saved_checkpoint_carries_minilms_mark(tmp_path):
    save(tmp_path / "checkpoint")
    assert folders.kind_of(tmp_path / "checkpoint") == "checkpoint"
    assert folders.kind_of(tmp_path) is None
    (tmp_path / folders.MARK).write_text('{"written_by": "someone else", "kind": "run"}')
    assert folders.kind_of(tmp_path) is None


# ---------------------------------------------------------------- one writer per folder

HOLDER = textwrap.dedent("""
    import sys, time
    from minilm import folders
    folders.lock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_writer_is_refused_with_the_first_ones_pid_and_the_lock_dies_with_it(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(MinilmError, match=f"another minilm process \\(pid {child.pid}\\)"):
            folders.lock(run)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    folders.lock(run)  # the kernel dropped the dead process's lock: no stale lock file to clean up
    folders.release(run)


# ---------------------------------------------------------------- atomic saves, recovery, failures


def test_a_killed_saves_leftovers_are_cleared_but_foreign_files_are_not(tmp_path):
    path = tmp_path / "checkpoint"
    save(path)
    leftover = tmp_path / "checkpoint.tmp"
    leftover.mkdir()
    (leftover / folders.LOCK).write_text("pid 1")  # what a save killed mid-way leaves
    (leftover / "model.safetensors").write_bytes(b"half")
    save(path, step=2)
    assert not leftover.exists() and checkpoint.load(path).state["step"] == 2
    leftover.mkdir()
    (leftover / "notes.txt").write_text("mine")
    with pytest.raises(MinilmError, match="not made by minilm"):
        save(path, step=3)
    assert (leftover / "notes.txt").read_text() == "mine" and checkpoint.load(path).state["step"] == 2


def test_a_kill_between_the_renames_is_recovered_and_a_first_save_killed_says_so(tmp_path):
    path = tmp_path / "checkpoint"
    save(path, step=1)
    path.rename(tmp_path / "checkpoint.old")  # the swap's first rename happened, the second did not
    assert checkpoint.load(tmp_path).state["step"] == 1  # read from checkpoint.old
    assert checkpoint.recover(path) and checkpoint.load(tmp_path).state["step"] == 1
    assert not (tmp_path / "checkpoint.old").exists() and not checkpoint.recover(path)
    fresh = tmp_path / "fresh"
    (fresh / "checkpoint.tmp").mkdir(parents=True)
    with pytest.raises(MinilmError, match="no checkpoint was completed yet"):
        checkpoint.load(fresh)


def test_a_symlinked_checkpoint_is_followed_save_after_save(tmp_path):
    real = tmp_path / "disk" / "ckpt"
    real.parent.mkdir()
    save(real, step=1)
    link = tmp_path / "run" / "checkpoint"
    link.parent.mkdir()
    link.symlink_to(real)
    save(link, step=2)
    save(link, step=3)
    assert link.is_symlink() and checkpoint.load(link).state["step"] == 3
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["ckpt"]  # no .tmp or .old left beside it


def test_non_finite_weights_are_never_saved_nor_handed_out(tmp_path):
    path = tmp_path / "checkpoint"
    save(path, step=1)
    params = init(MODEL, key=jax.random.key(0))
    params["blocks"][0]["attn"]["q"]["w"] = params["blocks"][0]["attn"]["q"]["w"].at[0, 0].set(np.nan)
    with pytest.raises(MinilmError, match="blocks.0.attn.q.w holds non-finite values \\(nan\\)"):
        save(path, params=params, step=2)
    assert checkpoint.load(path).state["step"] == 1  # the good one is untouched
    # a file altered on disk (digest updated to match) is still refused, naming the tensor
    arrays = load_file(path / "model.safetensors")
    arrays["ln_f.scale"] = np.full_like(arrays["ln_f.scale"], np.inf)
    save_file(arrays, path / "model.safetensors")
    state = json.loads((path / "state.json").read_text())
    state["sha256"]["model.safetensors"] = checkpoint.file_sha256(path / "model.safetensors")
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(MinilmError, match="ln_f.scale holds non-finite values \\(inf\\)"):
        checkpoint.load(path)


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_folders import save
    from minilm.errors import MinilmError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    try:
        save(sys.argv[1], step=2)
    except MinilmError as e:
        print(e)
""")


def test_a_failed_write_is_one_line_and_leaves_the_previous_checkpoint_and_no_junk(tmp_path):
    path = tmp_path / "checkpoint"
    save(path, step=1)
    before = {p: p.read_bytes() for p in path.iterdir()}
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(path), os.path.dirname(__file__)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.count("\n") == 1 and "could not save" in out.stdout, out
    assert "File too large" in out.stdout and "the previous checkpoint there is intact" in out.stdout
    assert {p: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert named_leaves(checkpoint.load(path).params)
