"""What minilm writes, and the rules that keep it from losing or deleting anything.

Every folder minilm writes (a run, a checkpoint, an adapter, a report) holds a mark, `.minilm.json`,
saying which kind it is. The rules built on it:

    replace only what is ours   --overwrite replaces a folder only if it carries minilm's mark of the
                                same kind, and never one that is an input of the same command
    one writer per folder       a folder being written is locked with an OS file lock (fcntl.flock on
                                `.minilm.lock` inside it), which dies with its process: no stale locks;
                                a second writer is refused with the first one's process id
    whole or not at all         a folder is built beside its final place (`NAME.tmp`) and renamed in
                                (checkpoint.swap_in); text files are written to a temporary name and
                                renamed; a failed write (disk full, no permission) removes only its own
                                temporary files and says that what was saved before is intact

Folders written before marks existed are still read; they are never replaced by --overwrite.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from minilm.errors import MinilmError

MARK = ".minilm.json"
LOCK = ".minilm.lock"
KINDS = ("run", "checkpoint", "adapter", "report", "snapshots", "hf", "peft")  # hf: a Hugging Face folder (export-hf); peft: a PEFT adapter folder (export-peft)

_held: dict[str, int] = {}  # lock file -> its open descriptor, held until this process ends or releases


def mark(folder: Path, kind: str) -> None:
    """Sign `folder` as minilm's, of this kind."""
    assert kind in KINDS, kind
    write_text_atomic(Path(folder) / MARK, json.dumps({"written_by": "minilm", "kind": kind}))


def kind_of(folder: Path) -> str | None:
    """The kind minilm marked `folder` with, or None if it carries no mark of ours."""
    try:
        data = json.loads((Path(folder) / MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("written_by") == "minilm" and data.get("kind") in KINDS
    return data["kind"] if ok else None


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_path(out: Path, flag: str = "--out") -> Path:
    """`out` can be a folder: it is not a file and does not lie under one."""
    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies under {parent}, which is a file"
            raise MinilmError(f"{flag} {out} {where}; give a folder path")
    return out


def check_output(out: Path, kind: str, *, overwrite: bool, inputs=(), flag: str = "--out") -> Path:
    """May this command write a folder of `kind` at `out`? Raises a MinilmError saying why not:
    `out` is a file or lies under one, is (or holds, or lies inside) one of the command's `inputs`,
    exists without --overwrite, or with --overwrite is not a minilm folder of the same kind."""
    out = check_path(out, flag)
    for given in inputs:
        if _same_or_inside(out, Path(given)):
            raise MinilmError(f"{flag} {out} is, holds or lies inside this command's input {given}; writing "
                              f"there would destroy it; choose another {flag}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MinilmError(f"{out} already exists; pass --overwrite to replace it or choose another {flag}")
        found = kind_of(out)
        if found is None:
            raise MinilmError(f"--overwrite: {out} was not written by minilm (it has no {MARK}), and minilm "
                              f"never deletes what it did not write; remove it yourself or choose another {flag}")
        if found != kind:
            raise MinilmError(f"--overwrite: {out} holds a minilm {found}, not a {kind}; this command replaces "
                              f"only a {kind}; choose another {flag}")
    return out


def lock(folder: Path) -> None:
    """Hold `folder`'s lock for the rest of this process (or until `release`); refuse if another process
    holds it. The lock is the kernel's (flock), so it ends when the process does, however it ends."""
    folder = Path(folder)
    path = os.path.abspath(folder / LOCK)
    if path in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise MinilmError(f"{folder} is being written by another minilm process ({holder}); wait for it "
                              f"to finish or choose another folder") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    _held[path] = fd


def release(folder: Path) -> None:
    """Give up `folder`'s lock before the process ends (a no-op if it is not held here)."""
    fd = _held.pop(os.path.abspath(Path(folder) / LOCK), None)
    if fd is not None:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MinilmError(f"could not write {path} ({e.strerror or e}); the file as it was before is intact") from None
