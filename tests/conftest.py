"""Shared fixtures: run the CLI in-process, register test plugins by fixture."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("COLUMNS", "200")  # keep Rich tables and help text on one line for assertions

# the session fixtures over a tiny trace store and adapter runs (tiny, traces_dir, adapters_dir, lora_dir)
pytest_plugins = ["test_eval_fixtures"]


@dataclass
class CliResult:
    exit_code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(capsys):
    """Run ``sdrt ARGS`` in-process through the real entry point; returns exit code and output."""
    from sdrt_cli.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def plugin():
    """Register a plugin object (module or class with hookimpls) for one test."""
    from sdrt_cli.plugins import register_plugin, unregister_plugin

    names: list[str] = []

    def add(obj, name: str):
        register_plugin(obj, name)
        names.append(name)
        return obj

    yield add
    for name in names:
        unregister_plugin(name)


@pytest.fixture(scope="session")
def tiny_trace_store(tmp_path_factory):
    """A 4-example, 2-prompt trace store of the tiny backbone, made by `sdrt traces` in a subprocess."""
    from fault_helpers import TRACE_ARGS, run

    out = tmp_path_factory.mktemp("tiny-trace-store") / "store"
    run(*TRACE_ARGS, "--limit", "4", "--out", out)
    return out
