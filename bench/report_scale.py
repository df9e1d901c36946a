"""How `sdrt report` scales: a 5,000-example eval page, its size, and how fast it opens in Chromium.

A real eval of 5,000 examples does not fit a CPU benchmark, so the page is built from a real small
`sdrt eval` run (tiny backbone, prompt + cot on synthetic-charts) whose prediction lines are repeated
for N examples of synthetic-charts (dataset option ``size=N``, so every example has its own real
chart image); the predictions keep their real format and lengths.  The report is built by
`sdrt report` itself.  In headless Chromium we time, from navigation start, the first card on
screen and a filter change, against the naive page that renders every card at load (the same page
with the page size set to N) in the same run.

    python bench/report_scale.py [--examples 5000] [--thumb-px 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def sdrt(*args) -> None:
    from sdrt_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"sdrt {' '.join(map(str, args))} exited with {exc.code}") from None


def scale_run(small: Path, big: Path, n: int) -> None:
    """``big``: the predictions of ``small`` repeated for n examples of a size-n synthetic-charts."""
    big.mkdir(parents=True)
    (big / "predictions").mkdir()
    results = json.loads((small / "results.json").read_text())
    results["examples"] = n
    for method in results["methods"]:
        results["methods"][method]["count"] = n
        lines = [json.loads(line) for line in (small / "predictions" / f"{method}.jsonl").read_text().splitlines()]
        with open(big / "predictions" / f"{method}.jsonl", "w") as fh:
            for i in range(n):
                record = dict(lines[i % len(lines)], index=i, id=f"synthetic-charts/validation/{i}")
                fh.write(json.dumps(record) + "\n")
    (big / "results.json").write_text(json.dumps(results))
    info = json.loads((small / "run.json").read_text())
    info["config"].update(limit=n, dataset_option=[f"size={n}"])
    (big / "run.json").write_text(json.dumps(info))


def open_times(page_path: Path, profile: Path) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(profile), executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(page_path.as_uri())
        page.wait_for_selector(".card")
        first = page.evaluate("performance.now()")
        began = time.perf_counter()
        page.select_option("#f-prompt", "wrong")
        page.wait_for_selector(".card")
        page.evaluate("new Promise(r => requestAnimationFrame(() => r()))")
        filtered = time.perf_counter() - began
        browser.close()
    return {"first_card_s": first / 1000, "filter_s": filtered}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--thumb-px", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdrt("eval", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "4", "--method", "prompt,cot",
             "--max-new-tokens", "8", "--max-new-tokens-step1", "32", "--no-report", "--out", tmp / "small")
        scale_run(tmp / "small", tmp / "big", args.examples)
        began = time.perf_counter()
        sdrt("report", tmp / "big", "--thumb-px", args.thumb_px)
        build = time.perf_counter() - began
        paged = tmp / "big" / "report.html"
        from sdrt_cli import report

        naive = tmp / "naive.html"
        naive.write_text(paged.read_text().replace(f"const PAGE = {report.PAGE_SIZE};", f"const PAGE = {args.examples};"))
        paged_times = open_times(paged, tmp / "p1")
        naive_times = open_times(naive, tmp / "p2")
        size = paged.stat().st_size
        print(f"{args.examples} examples, 2 methods, thumbnails {args.thumb_px} px: report.html {size / 1e6:.1f} MB "
              f"({size / args.examples / 1e3:.1f} KB per example), built in {build:.1f} s")
        print("| page | first card (s from navigation) | filter change (s) |\n|---|---|---|")
        print(f"| paged ({report.PAGE_SIZE} cards at a time) | {paged_times['first_card_s']:.2f} | {paged_times['filter_s']:.2f} |")
        print(f"| naive (every card at load) | {naive_times['first_card_s']:.2f} | {naive_times['filter_s']:.2f} |")
        print(f"ratio naive / paged: first card {naive_times['first_card_s'] / paged_times['first_card_s']:.1f}×, filter {naive_times['filter_s'] / paged_times['filter_s']:.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
