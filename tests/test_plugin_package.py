"""A real third-party plugin package, pip-installed into its own directory, used from the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent / "example_plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
        check=True,
        capture_output=True,
    )
    return target


def sdrt(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sdrt_cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_installed_plugin_is_listed_with_its_version_and_names(site):
    result = sdrt(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    mine = plugins["sdrt-example-plugin.example"]
    assert mine["version"] == "0.3.1"
    assert mine["registered"] == {"backbone": ["example-tiny"], "dataset": ["example-shapes"]}


def test_plugin_dataset_and_backbone_run_through_traces(site, tmp_path):
    shown = sdrt(site, "datasets", "show", "example-shapes", "--limit", "2")
    assert shown.returncode == 0, shown.stderr
    assert "How many squares" in shown.stdout
    out = tmp_path / "traces"
    result = sdrt(
        site, "traces", "--backbone", "example-tiny", "--dataset", "example-shapes", "--limit", "2", "--prompts", "1",
        "--max-new-tokens-step1", "3", "--max-new-tokens-step2", "3", "--out", out,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"]["backbone"]["backbone"] == "example-tiny"
    assert manifest["fingerprint"]["dataset"]["name"] == "example-shapes"
    assert manifest["num_records"] == 2


def test_unknown_backbone_suggests_the_plugin_one(site, tmp_path):
    result = sdrt(site, "traces", "--backbone", "example-tinny", "--dataset", "example-shapes", "--out", tmp_path / "x")
    assert result.returncode == 1
    assert "Did you mean 'example-tiny'?" in result.stderr
