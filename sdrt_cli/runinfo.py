"""What every output directory records about how it was made."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from sdrt_cli.io import atomic_write_text

TRACKED_PACKAGES = ("sdrt", "torch", "transformers", "peft", "datasets", "safetensors", "pluggy", "typer", "pillow", "mistral-common", "numpy")
RUN_INFO = "run.json"


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(path: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout containing ``path``, or None outside one."""
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


def run_info(command: str, config: dict[str, Any], seed: int | None) -> dict[str, Any]:
    import sdrt_cli

    return {
        "command": command,
        "argv": sys.argv,
        "config": jsonable({k: v for k, v in config.items()}),
        "seed": seed,
        "versions": package_versions(),
        "git": {
            "sdrt": git_revision(Path(sdrt_cli.__file__).resolve().parent),
            "cwd": git_revision(Path.cwd()),
        },
        "host": platform.node(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_run_info(out_dir: Path, command: str, config: dict[str, Any], seed: int | None, name: str = RUN_INFO) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    atomic_write_text(path, json.dumps(run_info(command, config, seed), indent=2) + "\n")
    return path
