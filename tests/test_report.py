"""`sdrt report`: the HTML page of an eval run and a trace store, escaping of untrusted text, and the
page as a person sees it in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from test_eval_fixtures import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = "</script><script>window.__pwned = 1</script><!-- \"quoted\" & 'single' <b>bold</b>"


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, adapters_dir):  # noqa: F811
    """A real eval of prompt, cot and sdrt on the tiny backbone; then one prediction per method is
    replaced by a known answer (a right one for sdrt on example 0, the hostile text on example 1),
    as a model could have written them."""
    out = tmp_path_factory.mktemp("eval") / "run"
    run_cli(
        "eval", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "4", "--batch-size", "4",
        "--max-new-tokens", "2", "--max-new-tokens-step1", "2", "--method", "prompt,cot,sdrt",
        "--adapters", adapters_dir, "--ensemble", "uniform-k2", "--out", out,
    )
    assert (out / "report.html").stat().st_size > 0  # eval writes its report by default
    for method in ("prompt", "cot", "sdrt"):
        path = out / "predictions" / f"{method}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        records[1]["output"] = records[1]["parsed"] = EVIL
        if method == "sdrt":
            records[0]["output"] = records[0]["parsed"] = records[0]["answers"][0]
            records[0]["score"] = 1.0
        if method == "cot":
            records[2]["y1"] = EVIL
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def blob(page: str):
    match = re.search(r'<script type="application/json" id="sdrt-data">(.*?)</script>', page, re.S)
    assert match, "the page carries its data blob"
    return json.loads(match.group(1))


@pytest.mark.slow  # the eval fixture generates with three methods
def test_report_escapes_untrusted_text_everywhere(cli, eval_run, tmp_path):
    target = tmp_path / "page.html"
    result = cli("report", eval_run, "--out", target)
    assert result.exit_code == 0, result.output
    page = target.read_text()
    assert "window.__pwned" in page  # the text is there, as data ...
    assert "<script>window.__pwned" not in page and "<!-- " not in page and "<b>bold" not in page  # ... never as markup
    assert page.count("</script>") == page.count("<script")  # the blob did not end early
    data = blob(page)
    assert data["examples"][1]["m"]["prompt"]["out"] == EVIL  # round-trips exactly
    assert data["examples"][2]["m"]["cot"]["y1"] == EVIL
    assert data["examples"][0]["imgs"][0].startswith("data:image/jpeg;base64,")  # thumbnails embedded
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing to fetch
    weights = data["examples"][0]["m"]["sdrt"]["weights"]
    assert sorted(weights) == sorted(json.loads((eval_run / "results.json").read_text())["methods"]["sdrt"]["members"])


@pytest.mark.slow
def test_report_thumbnails_are_bounded_or_left_out(cli, eval_run, tmp_path):
    small = tmp_path / "small.html"
    assert cli("report", eval_run, "--out", small, "--thumb-px", "64").exit_code == 0
    none = tmp_path / "none.html"
    assert cli("report", eval_run, "--out", none, "--thumb-px", "0").exit_code == 0
    default = eval_run / "report.html"
    assert none.stat().st_size < small.stat().st_size < default.stat().st_size
    assert all(not e.get("imgs") for e in blob(none.read_text())["examples"])
    budget = tmp_path / "budget.html"
    assert cli("report", eval_run, "--out", budget, "--image-budget-mb", "0").exit_code == 0
    assert "images left out: thumbnail budget" in budget.read_text()


def test_report_of_a_trace_store_marks_the_most_confident_trace(cli, traces_dir, tmp_path):  # noqa: F811
    from sdrt_cli.ensemble import confidence_labels
    from sdrt_cli.trace_store import TraceStore

    target = tmp_path / "traces.html"
    result = cli("report", traces_dir, "--out", target)
    assert result.exit_code == 0, result.output
    data = blob(target.read_text())
    store = TraceStore(traces_dir)
    labels, _ = confidence_labels(store, store.example_indices, store.prompt_ids)
    assert [e["best"] for e in data["examples"]] == [store.prompt_ids[int(label)] for label in labels]
    first = data["examples"][0]["traces"][0]
    meta = store.meta(store.example_indices[0], store.prompt_ids[0])
    assert (first["s1"], first["y1"], first["s2"], first["y2"], first["conf"]) == (meta["step1_text"], meta["y1"], meta["step2_text"], meta["y2"], meta["confidence"])


def test_report_refuses_an_unfinished_trace_store(cli, traces_dir, tmp_path):  # noqa: F811
    copy = tmp_path / "store"
    shutil.copytree(traces_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    result = cli("report", copy)
    assert result.exit_code == 1 and "is unfinished" in result.err and not (copy / "report.html").exists()


def test_report_refuses_a_directory_that_is_no_run(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = cli("report", tmp_path)
    assert result.exit_code == 1
    assert "is not an sdrt run directory" in result.err and len(result.err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_in_headless_chromium_filters_and_searches_cards(eval_run, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package drives the system Chromium")
    page_path = eval_run / "report.html"
    run_cli("report", eval_run)
    data = blob(page_path.read_text())
    examples = data["examples"]

    def right(e, m):
        return e["m"][m]["score"] >= data["right_at"]

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
            viewport={"width": 1280, "height": 900},
        )
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on("request", lambda req: problems.append(f"request {req.url}") if not req.url.startswith(("file:", "data:")) else None)
        page.goto(page_path.as_uri())
        page.wait_for_selector(".card")

        def cards() -> list[int]:
            return [int(i) for i in page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.index)")]

        assert cards() == [e["i"] for e in examples]
        assert page.evaluate("window.__pwned") is None
        assert EVIL in page.inner_text(f'.card[data-index="{examples[1]["i"]}"]')  # shown as text
        page.screenshot(path=str(tmp_path / "report.png"), full_page=False)

        page.select_option("#f-sdrt", "right")
        assert cards() == [e["i"] for e in examples if right(e, "sdrt")] and cards()
        page.select_option("#f-sdrt", "")
        page.select_option("#preset", "sdrt>prompt")
        assert cards() == [e["i"] for e in examples if right(e, "sdrt") and not right(e, "prompt")]
        page.select_option("#preset", "prompt>sdrt")
        assert cards() == [e["i"] for e in examples if right(e, "prompt") and not right(e, "sdrt")]
        page.select_option("#preset", "")

        key, value = next(iter(examples[0]["cats"].items()))
        page.select_option("#category", f"{key}={value}")
        assert cards() == [e["i"] for e in examples if e["cats"].get(key) == value]
        page.select_option("#category", "")

        page.fill("#search", "window.__pwned")
        assert cards() == [e["i"] for e in examples if "window.__pwned" in json.dumps(e)] == [1, 2]
        page.fill("#search", "")

        # a cell of the category table links to its examples
        page.click(f'a[href="#m=sdrt&cat={key}={value}"]')
        page.wait_for_function("document.querySelectorAll('.card').length > 0")
        assert cards() == [e["i"] for e in examples if e["cats"].get(key) == value]

        page.click(f'.card[data-index="{examples[0]["i"]}"] .imgs img')
        assert page.is_visible("#overlay img")
        page.screenshot(path=str(tmp_path / "enlarged.png"))

        browser.close()
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
