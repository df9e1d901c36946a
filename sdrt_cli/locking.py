"""One writer per run directory: an exclusive lock held for a command's lifetime.

Every command that writes a run directory (traces, distill, ensemble, eval, ablate, demo) holds
``DIR/.sdrt.lock`` while it runs.  The lock is a ``fcntl.flock`` on that file, so the kernel drops
it the moment the holder dies (SIGKILL, OOM, node reboot); the file itself keeps the holder's pid,
host, start time and command, which is what a refused second writer is told.  A lock file found
with holder details but no lock on it was left by a process that died: the new command takes it
over and says so.  A clean exit removes the file (and the directory, if the lock created it and
nothing else was written), so an output directory never keeps a stray lock.

Under torchrun rank 0 takes the lock and every rank learns the verdict, as for other refusals.
A process may take the same directory again (re-entrant); nested directories (ablate's stage
directories under its --out) are separate locks, so they never wait on each other.

Shared filesystems: on Linux, ``flock`` over NFS is carried out as an NFS byte-range lock (NLM for
NFSv3, in-protocol for NFSv4), so it excludes writers on other nodes too, and the server drops the
lock of a crashed client when its lease expires (NFSv4, ~90 s by default).  An NFS mount with
``nolock`` or ``local_lock=flock|all``, and some FUSE/object-store filesystems, keep locks local
to one node: there two nodes can both "hold" the lock.  See docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from sdrt_cli import distributed
from sdrt_cli.errors import SdrtError
from sdrt_cli.io import os_error, remove_temporaries

LOCK_FILE = ".sdrt.lock"

# directories this process holds: resolved path -> (open lock file, nesting depth, created directory)
_held: dict[Path, list[Any]] = {}


class RunDirectoryBusy(SdrtError):
    """Another live process writes this run directory."""


def _holder_text(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    command = f", running `sdrt {info['command']}`" if info.get("command") else ""
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}{command}"


def _read_holder(fh) -> dict[str, Any] | None:
    fh.seek(0)
    text = fh.read()
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _open_locked(lock_path: Path) -> tuple[Any, dict[str, Any] | None]:
    """Open and flock ``lock_path``; returns the file and what a dead previous holder left in it."""
    while True:
        fh = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fh.close()
                raise
            holder = _read_holder(fh)
            fh.close()
            raise RunDirectoryBusy(
                f"{lock_path.parent} is being written by {_holder_text(holder)}; wait for it to finish or choose another output directory"
            ) from None
        # the previous holder may have removed the file between our open and our flock: then we
        # hold a lock on a deleted file, so start again on the file that is there now
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            return fh, _read_holder(fh)
        fh.close()


def _acquire(directory: Path, command: str) -> None:
    key = directory.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    if directory.exists() and not directory.is_dir():
        raise SdrtError(f"output directory {directory} is an existing file; choose a directory path")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fh, stale = _open_locked(directory / LOCK_FILE)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    if stale:
        print(
            f"Taking over the lock of {directory}: its holder ({_holder_text(stale)}) is gone without releasing it.",
            file=sys.stderr,
        )
        remove_temporaries(directory, LOCK_FILE)  # half-written files of the dead holder
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(holder) + "\n")
        fh.flush()
    except OSError:
        fh.close()  # a full disk: give the lock back rather than hold it anonymously
        raise
    _held[key] = [fh, 1, created]


def _release(directory: Path) -> None:
    key = directory.resolve()
    entry = _held[key]
    entry[1] -= 1
    if entry[1]:
        return
    del _held[key]
    fh, _, created = entry
    # remove the file while still holding the lock; a waiter that opened it re-checks the path
    with contextlib.suppress(OSError):
        os.unlink(directory / LOCK_FILE)
    fh.close()
    if created:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when the command wrote nothing there


@contextlib.contextmanager
def run_lock(directory: Path | str | None, command: str) -> Iterator[None]:
    """Hold ``directory``'s writer lock for the ``with`` block (a no-op for ``None``).

    Collective under torchrun: rank 0 locks, every rank raises the same refusal if it fails.
    """
    if directory is None:
        yield
        return
    directory = Path(directory)
    distributed.init()
    verdict = None  # (refusal class name, sentence)
    if distributed.is_main():
        try:
            _acquire(directory, command)
        except SdrtError as exc:
            verdict = (type(exc).__name__, str(exc))
        except OSError as exc:
            verdict = ("SdrtError", str(os_error(exc, directory)))
    verdict = distributed.broadcast_object(verdict)
    if verdict:
        kind, sentence = verdict
        raise (RunDirectoryBusy if kind == RunDirectoryBusy.__name__ else SdrtError)(sentence)
    try:
        yield
    finally:
        if distributed.is_main():
            _release(directory)
