"""The project's own wheel: every subpackage and data file reaches site-packages under its import name."""

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the import name it installs as (pyproject's package-dir)
INSTALLED_AS = {"sdrt_cli": "sdrt_cli", "plugins": "sdrt_plugins", "prompt_packs": "sdrt_prompt_packs"}


def build_isolation() -> list[str]:
    """The environment's own setuptools when it can build this pyproject (CI installs one), else the
    one the build-system table asks for, which pip fetches."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 77 else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # build from a copy: an in-tree build would leave build/ and egg-info behind in the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ["pyproject.toml", "README.md", *INSTALLED_AS]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *build_isolation(), "--wheel-dir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (built,) = out.glob("sdrt-*.whl")
    return zipfile.ZipFile(built)


def source_files(pattern: str) -> set[str]:
    found = set()
    for folder, installed in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob(pattern):
            if "__pycache__" not in path.parts:
                found.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


def test_wheel_holds_every_module_under_its_import_name(wheel):
    names = set(wheel.namelist())
    modules = source_files("*.py")
    assert {"sdrt_cli/distill/trainer.py", "sdrt_cli/ensemble/runtime.py", "sdrt_plugins/adapters/lora.py"} <= modules
    assert sorted(modules - names) == []
    assert not [n for n in names if n.startswith(("plugins/", "prompt_packs/"))]


def test_wheel_holds_the_packs_and_grids_as_shipped(wheel):
    assert sorted(source_files("*.toml") - set(wheel.namelist())) == []
    assert "sdrt_cli/grids/paper.toml" in wheel.namelist()
    packs = sorted((ROOT / "prompt_packs").glob("*.toml"))
    assert packs, "the repository ships at least one pack"
    for pack in packs:
        assert wheel.read(f"sdrt_prompt_packs/{pack.name}") == pack.read_bytes()


def test_wheel_registers_the_built_in_plugins(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(entry_points).decode()
    for group in ("backbones", "datasets", "packs", "adapters", "losses", "metrics"):
        assert f"{group} = sdrt_plugins.{group}" in text
