"""File writes that survive kills and full disks: atomic replacement, torn-tail-safe JSONL appends,
and one translation of the operating system's write errors into a one-sentence :class:`SdrtError`."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sdrt_cli.errors import SdrtError

_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full (no space left on device); files already written are intact, so free space and re-run the same command to continue",
    errno.EDQUOT: "the disk quota is exceeded; files already written are intact, so free space and re-run the same command to continue",
    errno.EROFS: "the file system is read-only; choose a writable output directory",
    errno.EACCES: "permission denied; choose an output directory you can write to",
    errno.EPERM: "the operation is not permitted; choose an output directory you can write to",
    errno.ENOTDIR: "a file is in the way where a directory is needed; choose another output directory",
    errno.EEXIST: "a file is in the way where a directory is needed; choose another output directory",
    errno.EISDIR: "a directory is in the way where a file is needed; choose another output path",
}


def os_error(exc: OSError, path: Path | str | None = None) -> SdrtError:
    """The one-sentence refusal for ``exc`` (raised while writing ``path``, or its own filename)."""
    where = exc.filename if exc.filename is not None else path
    reason = _WRITE_ERRORS.get(exc.errno or -1, exc.strerror or str(exc))
    return SdrtError(f"cannot write {where}: {reason}")


def is_write_error(exc: OSError) -> bool:
    """True for errors that only a write raises (a full disk, a read-only file system)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


TEMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            _write(fh, data, path)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise os_error(exc, path) from None
        raise


def _write(fh, data: bytes, path: Path) -> None:
    """The single place bytes reach an output file, ``path`` (tests inject disk faults here)."""
    fh.write(data)


def remove_temporaries(directory: Path, other_run_marker: str) -> int:
    """Delete the temporary files of atomic writes that a killed process left under ``directory``
    (its sole writer calls this), except in subdirectories holding ``other_run_marker`` (another
    run directory, which sweeps itself); returns how many were removed."""
    removed = 0
    for root, dirs, files in os.walk(directory):
        if root != str(directory) and other_run_marker in files:
            dirs[:] = []
            continue
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    removed += 1
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_jsonl(path: Path, *records: dict[str, Any], sync: bool = True) -> None:
    """Append one JSON line per record in one write, first cutting a torn last line (a kill
    mid-append) back to the last newline so no new line glues onto it; ``sync`` makes the lines
    durable before returning."""
    path = Path(path)
    line = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end:
                keep = _complete_length(fh, end)
                if keep != end:
                    fh.truncate(keep)
            _write(fh, line, path)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
    except OSError as exc:
        raise os_error(exc, path) from None


def _complete_length(fh, end: int) -> int:
    """Bytes up to and including the last newline of an open file of size ``end``."""
    position = end
    while position > 0:
        start = max(0, position - 65536)
        fh.seek(start)
        block = fh.read(position - start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        position = start
    return 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file this project appends to (none when the file is missing); a torn last
    line (a kill mid-append, without its newline) is skipped, a bad line anywhere else is refused
    naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    *lines, _torn = data.split(b"\n")  # after the last newline: empty, or a line cut short
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except ValueError:
            raise SdrtError(f"{path} is corrupt at line {number}; run with --overwrite to start again") from None
    return records


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
