"""Write a benchmark's section into bench/RESULTS.md (between markers) and its raw JSON beside it."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the script it names, on the machine it names; ratios compare against the naive way measured in the same run.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
        cpu = model or cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, python {platform.python_version()}"


def write_section(name: str, markdown: str, raw: dict) -> None:
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    (BENCH_DIR / "results" / f"{name}.json").write_text(json.dumps(raw, indent=2) + "\n")
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
