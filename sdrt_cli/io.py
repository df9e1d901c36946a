"""Atomic file writes: a reader never sees a half-written file, a crash never corrupts a finished one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def append_jsonl(path: Path, obj: Any) -> None:
    """Append ``obj`` as one JSON line, flushed to disk.  A torn last line (a process killed
    mid-append) is cut off first, so the new line never fuses with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:  # back to just after the last newline
            start = max(0, keep - (1 << 16))
            fh.seek(start)
            block = fh.read(keep - start)
            if keep == end and block.endswith(b"\n"):
                break
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep < end:
            fh.truncate(keep)
        fh.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[Any]:
    """Every complete line of a JSON-lines file (none if the file is missing); a torn last line,
    without its newline, is skipped.  A damaged complete line is refused naming file and line."""
    from sdrt_cli.errors import SdrtError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or torn
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise SdrtError(f"{path} line {number} is not valid JSON; delete that line or the file to continue") from None
    return out
