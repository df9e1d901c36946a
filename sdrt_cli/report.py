"""``sdrt report``: one self-contained HTML page per run directory (eval, trace store, ablate / demo).

The page needs no network: CSS and JS are inline, images are embedded as downscaled JPEG
thumbnails (longest side ``thumb_px``, at most ``MAX_IMAGES_PER_EXAMPLE`` per example, and no more
than ``image_budget_bytes`` of thumbnails in all; past the budget, cards show no image).  The
examples travel as one JSON blob inside the page and the cards are rendered by JS a page at a time,
so a 5,000-example eval opens in seconds.

Everything that came from a model or a dataset is untrusted text: the Python side escapes it with
``html.escape`` and the JS side only ever assigns it through ``textContent``; the JSON blob escapes
``<``, ``>``, ``&`` and the JS line separators, so neither ``</script>`` nor ``<!--`` can end it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sdrt_cli.errors import SdrtError
from sdrt_cli.io import atomic_write_text

REPORT = "report.html"
THUMB_PX = 384
THUMB_QUALITY = 70
MAX_IMAGES_PER_EXAMPLE = 4
IMAGE_BUDGET_BYTES = 64 << 20
PAGE_SIZE = 40
RIGHT_AT = 0.5  # a score at or above this counts as right (ANLS/relaxed accuracy: 0..1)


@dataclass
class ReportSettings:
    thumb_px: int = THUMB_PX
    image_budget_bytes: int = IMAGE_BUDGET_BYTES


# ---------------------------------------------------------------------------------------------
# Escaping
# ---------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """Text for HTML element content or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def script_json(value: Any) -> str:
    """JSON safe to place inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` only
    occur inside JSON strings, where their ``\\u`` escapes mean the same characters."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


class Thumbnails:
    """Downscaled JPEG data URLs under a total byte budget."""

    def __init__(self, settings: ReportSettings):
        self.settings = settings
        self.bytes = 0
        self.dropped = 0

    def encode(self, images: Iterable[Any]) -> list[str]:
        urls = []
        if self.settings.thumb_px <= 0:
            return urls
        for image in list(images)[:MAX_IMAGES_PER_EXAMPLE]:
            thumb = image.convert("RGB")
            thumb.thumbnail((self.settings.thumb_px, self.settings.thumb_px))
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=THUMB_QUALITY, optimize=True)
            data = buffer.getvalue()
            if self.bytes + len(data) > self.settings.image_budget_bytes:
                self.dropped += 1
                continue
            self.bytes += len(data)
            urls.append("data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"))
        return urls


def dataset_images(spec: dict[str, Any] | None, indices: Iterable[int], thumbs: Thumbnails, progress: Callable[[int], None] | None = None) -> tuple[dict[int, list[str]], dict[int, str], str | None]:
    """Thumbnails and question texts of the examples at ``indices`` of the dataset a run used
    (``spec``: name, data_dir, split, seed, limit, options); (images, questions, why-not)."""
    from sdrt_cli.data import open_dataset

    wanted = set(indices)
    if not spec or not spec.get("name") or not wanted:
        return {}, {}, "the run does not record its dataset"
    try:
        data = open_dataset(spec["name"], data_dir=spec.get("data_dir"), split=spec.get("split"), limit=spec.get("limit"), seed=spec.get("seed", 0), **(spec.get("options") or {}))
        images: dict[int, list[str]] = {}
        questions: dict[int, str] = {}
        last = max(wanted)
        for index, example in enumerate(data):
            if index > last:
                break
            if index in wanted:
                images[index] = thumbs.encode(example.images)
                questions[index] = data.question_text(example)
                if progress:
                    progress(1)
        return images, questions, None
    except (SdrtError, OSError, TypeError, ValueError, KeyError) as exc:
        return {}, {}, f"images unavailable: dataset {spec.get('name')!r} could not be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


# ---------------------------------------------------------------------------------------------
# Page assembly
# ---------------------------------------------------------------------------------------------


def table_html(columns: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (cells built here from escaped parts)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell if raw else esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, summary_html: str, data: dict[str, Any] | None) -> str:
    blob = f'<script type="application/json" id="sdrt-data">{script_json(data)}</script>' if data is not None else ""
    script = f"<script>{CARDS_JS}</script>" if data is not None else ""
    cards = CARDS_HTML if data is not None else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>{esc(title)}</h1></header><main>{summary_html}{cards}</main>{blob}{script}</body></html>\n"
    )


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}"


# ---------------------------------------------------------------------------------------------
# Eval runs
# ---------------------------------------------------------------------------------------------


def read_eval(run_dir: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """``results.json`` and each method's ``predictions/METHOD.jsonl`` of a `sdrt eval` output."""
    from sdrt_cli.formats import EvalResults

    results = EvalResults.load(run_dir).to_json()
    predictions = {}
    for method in results.get("methods", {}):
        pred_path = run_dir / "predictions" / f"{method}.jsonl"
        try:
            predictions[method] = [json.loads(line) for line in pred_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as exc:
            raise SdrtError(f"{pred_path} is not readable eval predictions: {exc}") from None
    return results, predictions


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("config", {})
    except (OSError, json.JSONDecodeError):
        return {}


def eval_dataset_spec(run_dir: Path) -> dict[str, Any] | None:
    from sdrt_cli.options import parse_key_values

    config = run_config(run_dir)
    if not config.get("dataset"):
        return None
    try:
        options = parse_key_values(config.get("dataset_option"))
    except SdrtError:
        options = {}
    return {"name": config["dataset"], "data_dir": config.get("data_dir"), "split": config.get("split"), "limit": config.get("limit"), "seed": config.get("seed", 0), "options": options}


def eval_summary_html(results: dict[str, Any]) -> str:
    """The comparison table, overall and per category, each cell a link to its examples."""
    methods = results.get("methods", {})
    intro = f"<p>{esc(results.get('examples'))} examples of {esc(results.get('dataset'))} ({esc(results.get('split'))}); metric {esc(results.get('metric'))}, scores ×100. A score ≥ {RIGHT_AT} counts as right.</p>"
    warnings = "".join(f'<p class="warn">{esc(w)}</p>' for w in results.get("warnings", []) if isinstance(w, str))

    def link(method: str, cat: str | None, text: str) -> str:
        target = f"#m={method}" + (f"&cat={cat}" if cat else "")
        return f'<a href="{esc(target)}" data-link="1">{esc(text)}</a>'

    rows = []
    for name, m in methods.items():
        timing = m.get("timing") or {}
        per = timing.get("seconds", 0.0) / timing["examples"] if timing.get("examples") else 0.0
        rows.append([esc(m.get("label", name)), link(name, None, _pct(m.get("overall"))), esc(m.get("count")), f"{per:.3f}"])
    parts = [intro, warnings, "<h2>Comparison</h2>", table_html(["Method", str(results.get("dataset")), "n", "s/example"], rows, raw=True)]
    keys = sorted({k for m in methods.values() for k in m.get("categories", {})})
    for key in keys:
        values = sorted({v for m in methods.values() for v in m.get("categories", {}).get(key, {})})
        counts = {v: next(m["categories"][key][v]["count"] for m in methods.values() if v in m.get("categories", {}).get(key, {})) for v in values}
        cat_rows = [
            [esc(m.get("label", name))] + [link(name, f"{key}={v}", _pct(m.get("categories", {}).get(key, {}).get(v, {}).get("score"))) for v in values]
            for name, m in methods.items()
        ]
        parts += [f"<h3>By {esc(key)}</h3>", table_html(["Method"] + [f"{v} (n={counts[v]})" for v in values], cat_rows, raw=True)]
    sdrt = methods.get("sdrt", {}).get("weights")
    if sdrt:
        mean = ", ".join(f"{esc(k)} {float(v):.3f}" for k, v in sdrt.get("mean", {}).items())
        parts.append(f"<p>SDRT ensemble: mean weights {mean}; normalised entropy {float(sdrt.get('normalised_entropy', 0)):.3f}.</p>")
    return "".join(parts)


def eval_report(run_dir: Path, settings: ReportSettings, progress_factory=None) -> str:
    results, predictions = read_eval(run_dir)
    by_index: dict[int, dict[str, Any]] = {}
    for method, records in predictions.items():
        for r in records:
            entry = by_index.setdefault(int(r["index"]), {"i": int(r["index"]), "id": r.get("id"), "answers": r.get("answers", []), "cats": r.get("categories", {}), "m": {}})
            result = {"out": r.get("output", ""), "parsed": r.get("parsed"), "score": r.get("score")}
            if "y1" in r:
                result.update(step1=r.get("step1_prompt", ""), y1=r["y1"], prompt_id=r.get("prompt_id"))
            if "weights" in r:
                result["weights"] = r["weights"]
            entry["m"][method] = result
            entry.setdefault("q", None)
            if entry["q"] is None and method != "cot":
                entry["q"] = r.get("prompt")
            if entry["q"] is None and method == "cot":
                entry["q"] = r.get("step1_prompt")
    thumbs = Thumbnails(settings)
    indices = sorted(by_index)
    note = None
    if settings.thumb_px > 0:
        context = progress_factory("report images", len(indices)) if progress_factory else _null_progress()
        with context as bar:
            images, questions, note = dataset_images(eval_dataset_spec(run_dir), indices, thumbs, bar.advance)
        for index, entry in by_index.items():
            entry["imgs"] = images.get(index, [])
            if index in questions:
                entry["q"] = questions[index]
    data = {
        "kind": "eval",
        "methods": [{"name": name, "label": m.get("label", name)} for name, m in results.get("methods", {}).items()],
        "right_at": RIGHT_AT,
        "examples": [by_index[i] for i in indices],
    }
    notes = [n for n in (note, f"{thumbs.dropped} images left out: thumbnail budget of {settings.image_budget_bytes >> 20} MiB reached" if thumbs.dropped else None) if n]
    summary = eval_summary_html(results) + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return page(f"sdrt eval: {results.get('dataset')} {results.get('split')}", summary, data)


class _null_progress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int = 1) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Trace stores
# ---------------------------------------------------------------------------------------------


def trace_report(run_dir: Path, settings: ReportSettings, progress_factory=None) -> str:
    from sdrt_cli.ensemble import confidence_labels
    from sdrt_cli.trace_store import TraceStore

    store = TraceStore(run_dir, verify=False)  # the texts live in the jsonl; checksums are `sdrt show`'s job
    prompts = store.prompt_ids
    indices = store.example_indices
    labels, _ = confidence_labels(store, indices, prompts) if indices else ([], None)
    examples = []
    for row, index in enumerate(indices):
        traces = []
        for pid in prompts:
            meta = store.meta(index, pid)
            traces.append({"p": pid, "s1": meta["step1_text"], "y1": meta["y1"], "s2": meta["step2_text"], "y2": meta["y2"], "conf": meta["confidence"]})
        examples.append({"i": index, "id": store.meta(index, prompts[0])["example_id"], "traces": traces, "best": prompts[int(labels[row])], "cats": {}})
    thumbs = Thumbnails(settings)
    note = None
    if settings.thumb_px > 0:
        dataset = dict(store.fingerprint.get("dataset", {}))
        spec = {"name": dataset.get("name"), "data_dir": dataset.get("data_dir"), "split": dataset.get("split"), "seed": dataset.get("seed", 0), "options": dataset.get("options") or {}}
        context = progress_factory("report images", len(indices)) if progress_factory else _null_progress()
        with context as bar:
            images, questions, note = dataset_images(spec, indices, thumbs, bar.advance)
        for entry in examples:
            entry["imgs"] = images.get(entry["i"], [])
            entry["q"] = questions.get(entry["i"])
    fp = store.fingerprint
    s = fp.get("settings", {})
    best_counts = {pid: sum(1 for e in examples if e["best"] == pid) for pid in prompts}
    mean_conf = {pid: sum(e["traces"][n]["conf"] for e in examples) / max(1, len(examples)) for n, pid in enumerate(prompts)}
    rows = [[pid, f"{mean_conf[pid]:.4f}", str(best_counts[pid])] for pid in prompts]
    summary = (
        f"<p>{len(store)} records for {len(indices)} examples × {len(prompts)} prompts of pack {esc(fp.get('pack', {}).get('name'))}; "
        f"backbone {esc(fp.get('backbone', {}).get('backbone'))}; dataset {esc(fp.get('dataset', {}).get('name'))} ({esc(fp.get('dataset', {}).get('split'))}); "
        f"pos {esc(s.get('pos'))}, layers {esc(s.get('layers'))}, top-k {esc(s.get('top_k'))}, {esc(s.get('dtype'))}.</p>"
        "<h2>Prompts</h2>" + table_html(["Prompt", "mean confidence", "most confident on (ensemble label)"], rows)
        + (f'<p class="note">{esc(note)}</p>' if note else "")
    )
    data = {"kind": "traces", "prompts": prompts, "examples": examples}
    return page(f"sdrt traces: {fp.get('dataset', {}).get('name')} × {fp.get('pack', {}).get('name')}", summary, data)


# ---------------------------------------------------------------------------------------------
# Ablate / demo runs
# ---------------------------------------------------------------------------------------------


def ablate_report(run_dir: Path, settings: ReportSettings, progress_factory=None) -> str:
    """The ablation tables and plots, the demo's comparison, and links to every stage's report
    (the reports of finished trace-store and eval stages that lack one are written first)."""
    from sdrt_cli.show import detect_kind

    command = (json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("command") if (run_dir / "run.json").exists() else None) or "ablate"
    parts = []
    compare = run_dir / "compare"
    if (compare / "results.json").exists():
        if not (compare / REPORT).exists():
            write_report(compare, settings=settings, progress_factory=progress_factory)
        results, _ = read_eval(compare)
        link = f'<p><a href="compare/{REPORT}">Every example of the comparison →</a></p>' if (compare / REPORT).exists() else ""
        parts += [eval_summary_html(results).replace('href="#', f'href="compare/{REPORT}#'), link]
    for table_path in sorted((run_dir / "tables").glob("*.json")):
        try:
            table = json.loads(table_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SdrtError(f"{table_path} is not a readable ablation table: {exc}") from None
        rows = table.get("rows", [])
        columns = list(rows[0]) if rows else []
        parts += [f"<h2>{esc(table.get('title'))}</h2>", table_html(columns, [["–" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows])]
        if table.get("note"):
            parts.append(f"<p>{esc(table['note'])}</p>")
        plot = run_dir / "plots" / f"{table_path.stem}.png"
        if plot.exists():
            parts.append(f'<img class="plot" alt="{esc(table.get("title"))}" src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode("ascii")}">')
    stage_rows = []
    stages = run_dir / "stages"
    for directory in sorted(p for p in stages.iterdir() if p.is_dir()) if stages.is_dir() else []:
        done = directory / ".done"
        try:
            options = json.loads(done.read_text(encoding="utf-8")).get("options", {}) if done.exists() else None
        except (OSError, json.JSONDecodeError, AttributeError):
            options = None  # a damaged marker: the stage counts as unfinished, as `sdrt ablate` would rerun it
        kind = detect_kind(directory)
        report = directory / REPORT
        if done.exists() and kind is not None and kind.name in ("trace store", "eval") and not report.exists():
            write_report(directory, settings=settings, progress_factory=progress_factory)
        name = f"stages/{directory.name}"
        target = f'<a href="{esc(name)}/{REPORT}">{esc(directory.name)}</a>' if report.exists() else esc(directory.name)
        shown = ", ".join(f"{k}={v}" for k, v in (options or {}).items() if k not in ("out", "traces", "adapters"))
        stage_rows.append([target, esc(kind.name if kind else "?"), "finished" if options is not None else "unfinished", esc(shown)])
    if stage_rows:
        parts += ["<h2>Stages</h2>", table_html(["Stage", "kind", "status", "options"], stage_rows, raw=True)]
    return page(f"sdrt {command}: {run_dir.name}", "".join(parts) or "<p>No tables yet.</p>", None)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

BUILDERS = {"eval": eval_report, "trace store": trace_report, "ablate": ablate_report, "demo": ablate_report}


def write_report(run_dir: Path | str, out: Path | str | None = None, settings: ReportSettings | None = None, progress_factory=None) -> Path:
    """Build the page for the run in ``run_dir`` (its kind is detected) and write it atomically."""
    from sdrt_cli.show import detect_kind

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SdrtError(f"{run_dir} is not a directory")
    kind = detect_kind(run_dir)
    if kind is None or kind.name not in BUILDERS:
        what = "not an sdrt run directory" if kind is None else f"a {kind.name}, which has no report"
        raise SdrtError(f"{run_dir} is {what}; `sdrt report` takes an eval output, a trace store, or an ablate/demo run")
    text = BUILDERS[kind.name](run_dir, settings or ReportSettings(), progress_factory)
    target = Path(out) if out is not None else run_dir / REPORT
    atomic_write_text(target, text)
    os.chmod(target, 0o644)
    return target


# ---------------------------------------------------------------------------------------------
# The page's CSS and JS (no external resources)
# ---------------------------------------------------------------------------------------------

CSS = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;--ok:#17803d;--bad:#c0392b;--accent:#2454c5}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#1d2330;color:#fff;padding:12px 24px}header h1{margin:0;font-size:18px;font-weight:600}
main{max-width:1200px;margin:0 auto;padding:16px 24px}h2{font-size:16px;margin:24px 0 8px}h3{font-size:14px;margin:16px 0 6px}
table{border-collapse:collapse;background:var(--card);margin:4px 0 8px}th,td{border:1px solid var(--line);padding:4px 10px;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}th{background:#eef1f6;font-weight:600}a{color:var(--accent)}
.note{color:var(--muted)}.warn{color:var(--bad);font-weight:600}.plot{max-width:520px;display:block;margin:8px 0;border:1px solid var(--line)}
#controls{position:sticky;top:0;background:var(--bg);padding:10px 0;border-bottom:1px solid var(--line);display:flex;flex-wrap:wrap;gap:8px;align-items:center;z-index:2}
#controls select,#controls input{font:inherit;padding:3px 6px}#controls input[type=search]{min-width:240px}#count{color:var(--muted);margin-left:auto}
.card{background:var(--card);border:1px solid var(--line);border-radius:6px;margin:12px 0;padding:12px;display:grid;grid-template-columns:200px 1fr;gap:14px}
.card .imgs img{max-width:200px;max-height:200px;display:block;margin-bottom:6px;cursor:zoom-in;border:1px solid var(--line)}
.card .head{color:var(--muted);font-size:12px}.card .q{font-weight:600;margin:4px 0;white-space:pre-wrap}.gold{margin:2px 0 8px}
.chip{display:inline-block;background:#eef1f6;border-radius:10px;padding:0 8px;margin:0 4px 2px 0;font-size:12px}
.res td,.res th{text-align:left;font-size:13px}.res{width:100%;table-layout:fixed}.card>div{min-width:0}
.out{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,Menlo,monospace;font-size:12px}
.ok{color:var(--ok);font-weight:600}.bad{color:var(--bad);font-weight:600}.focus{background:#fff8dc}
details{margin-top:4px}summary{cursor:pointer;color:var(--muted)}.wbar{display:inline-block;height:8px;background:var(--accent);vertical-align:middle;margin-right:4px}
.best{background:#eaf6ee}#more{margin:12px 0;font:inherit;padding:6px 14px}
#overlay{position:fixed;inset:0;background:rgba(0,0,0,.8);display:none;align-items:center;justify-content:center;z-index:5;cursor:zoom-out}#overlay img{max-width:95vw;max-height:95vh;image-rendering:auto;background:#fff}
"""

CARDS_HTML = """
<h2>Examples</h2>
<div id="controls">
  <input type="search" id="search" placeholder="Search questions, answers, outputs, ids">
  <span id="method-filters"></span>
  <select id="preset"></select>
  <select id="category"><option value="">every category</option></select>
  <span id="count"></span>
</div>
<div id="cards"></div>
<button id="more" type="button">Show more</button>
<div id="overlay"><img alt="enlarged image"></div>
"""

# Untrusted strings reach the DOM only through textContent / attribute setters (never innerHTML).
CARDS_JS = r"""
(function(){
"use strict";
const DATA = JSON.parse(document.getElementById("sdrt-data").textContent);
const PAGE = %PAGE%;
const $ = (id) => document.getElementById(id);
function el(tag, cls, text){const e=document.createElement(tag); if(cls) e.className=cls; if(text!==undefined&&text!==null) e.textContent=String(text); return e;}
const isEval = DATA.kind === "eval";
const methods = isEval ? DATA.methods.map(m => m.name) : [];
const right = (r) => r && r.score !== null && r.score !== undefined && r.score >= DATA.right_at;
const wrong = (r) => r && r.score !== null && r.score !== undefined && r.score < DATA.right_at;
const examples = DATA.examples;
for (const ex of examples) {
  const parts = [ex.id, ex.q || "", (ex.answers || []).join(" ")];
  if (isEval) for (const m of methods) { const r = ex.m[m]; if (r) parts.push(r.out, r.parsed, r.y1 || ""); }
  else for (const t of ex.traces) parts.push(t.p, t.y1, t.y2, t.s1, t.s2);
  ex._text = parts.join("\n").toLowerCase();
}
// ---- controls
const state = {search: "", methods: {}, preset: "", cat: "", focus: ""};
const methodBox = $("method-filters");
for (const m of methods) {
  const s = el("select"); s.id = "f-" + m; s.dataset.method = m;
  for (const [v, t] of [["", m + ": any"], ["right", m + ": right"], ["wrong", m + ": wrong"]]) { const o = el("option", null, t); o.value = v; s.appendChild(o); }
  s.addEventListener("change", () => { state.methods[m] = s.value; refresh(); });
  methodBox.appendChild(s);
}
const preset = $("preset");
const presets = [["", "no comparison filter"]];
if (methods.includes("sdrt")) for (const other of methods.filter(m => m !== "sdrt")) {
  presets.push(["sdrt>" + other, "sdrt right, " + other + " wrong"]); presets.push([other + ">sdrt", other + " right, sdrt wrong"]);
}
if (!isEval) presets.push(["disagree", "prompts disagree on the answer"]);
for (const [v, t] of presets) { const o = el("option", null, t); o.value = v; preset.appendChild(o); }
if (presets.length === 1) preset.style.display = "none";
preset.addEventListener("change", () => { state.preset = preset.value; refresh(); });
const catSel = $("category");
const cats = new Set();
for (const ex of examples) for (const [k, v] of Object.entries(ex.cats || {})) cats.add(k + "=" + v);
for (const c of Array.from(cats).sort()) { const o = el("option", null, c); o.value = c; catSel.appendChild(o); }
if (!cats.size) catSel.style.display = "none";
catSel.addEventListener("change", () => { state.cat = catSel.value; refresh(); });
$("search").addEventListener("input", (e) => { state.search = e.target.value.toLowerCase(); refresh(); });
function matches(ex) {
  if (state.search && !ex._text.includes(state.search)) return false;
  if (state.cat) { const i = state.cat.indexOf("="); if ((ex.cats || {})[state.cat.slice(0, i)] !== state.cat.slice(i + 1)) return false; }
  for (const [m, want] of Object.entries(state.methods)) {
    if (want === "right" && !right(ex.m[m])) return false;
    if (want === "wrong" && !wrong(ex.m[m])) return false;
  }
  if (state.preset === "disagree") return new Set(ex.traces.map(t => t.y2.trim())).size > 1;
  if (state.preset) { const [a, b] = state.preset.split(">"); if (!(right(ex.m[a]) && wrong(ex.m[b]))) return false; }
  return true;
}
// ---- cards
function scoreCell(r) {
  if (!r || r.score === null || r.score === undefined) return el("td", null, "—");
  return el("td", r.score >= DATA.right_at ? "ok" : "bad", (Math.round(r.score * 1000) / 1000).toString());
}
function weights(w) {
  const box = el("div");
  for (const [k, v] of Object.entries(w)) { const row = el("div"); const bar = el("span", "wbar"); bar.style.width = Math.round(80 * v) + "px"; row.appendChild(bar); row.appendChild(el("span", null, k + " " + v.toFixed(3))); box.appendChild(row); }
  return box;
}
function details(label, text) { const d = el("details"); d.appendChild(el("summary", null, label)); d.appendChild(el("div", "out", text)); return d; }
function card(ex) {
  const c = el("div", "card"); c.dataset.index = ex.i;
  const imgs = el("div", "imgs");
  for (const src of ex.imgs || []) { const im = el("img"); im.src = src; im.alt = "image of example " + ex.id; im.loading = "lazy"; im.addEventListener("click", () => enlarge(src)); imgs.appendChild(im); }
  c.appendChild(imgs);
  const body = el("div");
  const head = el("div", "head", "#" + ex.i + " · " + ex.id + " ");
  for (const [k, v] of Object.entries(ex.cats || {})) head.appendChild(el("span", "chip", k + ": " + v));
  body.appendChild(head);
  body.appendChild(el("div", "q", ex.q || ""));
  if (isEval) {
    const gold = el("div", "gold"); gold.appendChild(el("b", null, "Gold: ")); gold.appendChild(el("span", null, (ex.answers || []).join(" | ") || "(hidden)")); body.appendChild(gold);
    const t = el("table", "res"); const hr = el("tr");
    for (const [h, w] of [["method", "70px"], ["raw output", ""], ["parsed", "22%"], ["score", "60px"]]) { const th = el("th", null, h); th.style.width = w; hr.appendChild(th); }
    t.appendChild(hr);
    for (const m of methods) {
      const r = ex.m[m]; if (!r) continue;
      const tr = el("tr", state.focus === m ? "focus" : null);
      tr.appendChild(el("td", null, m));
      const outCell = el("td"); outCell.appendChild(el("div", "out", r.out));
      if (r.y1 !== undefined) { outCell.appendChild(details("step 1 (" + (r.prompt_id || "") + "): analysis", r.y1)); outCell.appendChild(details("step-1 prompt", r.step1 || "")); }
      if (r.weights) { const d = el("details"); d.appendChild(el("summary", null, "ensemble weights")); d.appendChild(weights(r.weights)); outCell.appendChild(d); }
      tr.appendChild(outCell); tr.appendChild(el("td", "out", r.parsed)); tr.appendChild(scoreCell(r));
      t.appendChild(tr);
    }
    body.appendChild(t);
  } else {
    const t = el("table", "res"); const hr = el("tr");
    for (const [h, w] of [["prompt", "130px"], ["step 1: prompt → answer", ""], ["step 2: prompt → answer", "32%"], ["confidence", "90px"]]) { const th = el("th", null, h); th.style.width = w; hr.appendChild(th); }
    t.appendChild(hr);
    for (const tr_ of ex.traces) {
      const tr = el("tr", tr_.p === ex.best ? "best" : null);
      const name = el("td", null, tr_.p + (tr_.p === ex.best ? " ★ most confident" : ""));
      tr.appendChild(name);
      for (const [p, y] of [[tr_.s1, tr_.y1], [tr_.s2, tr_.y2]]) { const td = el("td"); td.appendChild(el("div", "out", y)); td.appendChild(details("prompt", p)); tr.appendChild(td); }
      tr.appendChild(el("td", null, tr_.conf.toFixed(4)));
      t.appendChild(tr);
    }
    body.appendChild(t);
  }
  c.appendChild(body);
  return c;
}
const overlay = $("overlay");
function enlarge(src) { overlay.querySelector("img").src = src; overlay.style.display = "flex"; }
overlay.addEventListener("click", () => { overlay.style.display = "none"; });
let visible = [], shown = 0;
const box = $("cards"), more = $("more");
function renderMore() {
  const frag = document.createDocumentFragment();
  const end = Math.min(visible.length, shown + PAGE);
  for (; shown < end; shown++) frag.appendChild(card(visible[shown]));
  box.appendChild(frag);
  more.style.display = shown < visible.length ? "" : "none";
  $("count").textContent = visible.length + " of " + examples.length + " examples (showing " + shown + ")";
}
function refresh() { visible = examples.filter(matches); shown = 0; box.textContent = ""; renderMore(); }
more.addEventListener("click", renderMore);
if ("IntersectionObserver" in window) new IntersectionObserver((es) => { if (es.some(e => e.isIntersecting) && shown < visible.length) renderMore(); }).observe(more);
// ---- links from the tables: #m=METHOD&cat=KEY=VALUE
function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  state.focus = params.get("m") || "";
  state.cat = params.get("cat") || "";
  catSel.value = state.cat;
  refresh();
  if (location.hash) $("controls").scrollIntoView();
}
window.addEventListener("hashchange", fromHash);
fromHash();
})();
""".replace("%PAGE%", str(PAGE_SIZE))
