"""``sdrt show``: what an sdrt directory is, whether it is finished, how it was made, and how it did.

Each kind of directory is one :class:`Kind` in ``KINDS``: a ``detect`` test on the directory's own
files and an ``inspect`` that returns a :class:`Summary`.  Adding a kind (a future `sdrt calibrate`
output, say) is one more entry.  Files a kind does not know (a lock file, a report) are ignored.

Status is one of ``complete``, ``resumable`` (re-running the same command continues it) or
``corrupt`` (the detail names the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import ENSEMBLE_FORMAT, EnsembleManifest, EvalResults, TraceManifest

COMPLETE, RESUMABLE, CORRUPT = "complete", "resumable", "corrupt"


@dataclass
class Summary:
    kind: str
    path: str
    status: str
    detail: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Kind:
    name: str
    detect: Callable[[Path], bool]
    inspect: Callable[[Path], Summary]


def _read_json(path: Path) -> Any:
    """Parsed JSON, or a CORRUPT marker string naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _Corrupt(f"{path} cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


@dataclass
class _Corrupt:
    detail: str


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _manifest_kind(path: Path) -> Any:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    document = _read_json(manifest)
    return document.get("kind", "traces" if "fingerprint" in document else None) if isinstance(document, dict) else "corrupt"


# ---------------------------------------------------------------------------------------------
# Trace stores
# ---------------------------------------------------------------------------------------------


def is_trace_store(path: Path) -> bool:
    kind = _manifest_kind(path)
    if kind in ("traces",):
        return True
    return kind in (None, "corrupt") and (path / "shards").is_dir() and (path / "progress").is_dir()


def inspect_trace_store(path: Path) -> Summary:
    from sdrt_cli.trace_store import TraceStore, all_progress, verify_shard

    summary = Summary("trace store", str(path), COMPLETE, sizes={"bytes": dir_bytes(path)})
    try:
        manifest = TraceManifest.load(path)
    except SdrtError as refusal:
        summary.status, summary.detail = CORRUPT, str(refusal)
        return summary
    fp = manifest.fingerprint
    s = fp.get("settings", {})
    summary.settings = {
        "backbone": fp.get("backbone", {}).get("backbone"),
        "hidden_size": fp.get("backbone", {}).get("hidden_size"),
        "pack": fp.get("pack", {}).get("name"),
        "prompts": fp.get("pack", {}).get("prompts"),
        "dataset": fp.get("dataset", {}).get("name"),
        "split": fp.get("dataset", {}).get("split"),
        **{k: s.get(k) for k in ("pos", "layers", "top_k", "dtype", "max_new_tokens_step1", "max_new_tokens_step2")},
    }
    try:
        entries = all_progress(path)
        for entry in entries:
            verify_shard(path, entry)
    except SdrtError as exc:
        summary.status, summary.detail = CORRUPT, str(exc)
        return summary
    examples = {i for e in entries for i in e.examples}
    summary.sizes.update(examples=len(examples), records=sum(e.records for e in entries), shards=len(entries))
    if manifest.status != "complete":
        summary.status, summary.detail = RESUMABLE, f"{len(examples)} examples committed; re-run the same `sdrt traces` command to continue"
        return summary
    store = TraceStore(path, verify=False)
    confidences: dict[str, list[float]] = {pid: [] for pid in store.prompt_ids}
    for index in store.example_indices:
        for pid in store.prompt_ids:
            confidences[pid].append(float(store.meta(index, pid)["confidence"]))
    summary.metrics = {"mean_confidence": {pid: sum(v) / len(v) for pid, v in confidences.items() if v}}
    # what `sdrt distill --select` decides by, where the store recorded it (a split with gold answers)
    scores = {pid: [store.meta(i, pid).get("teacher_score") for i in store.example_indices] for pid in store.prompt_ids}
    if all(v is not None for values in scores.values() for v in values) and store.example_indices:
        summary.metrics["teacher_mean_score"] = {pid: sum(v) / len(v) for pid, v in scores.items()}
    students = [store.student(i) for i in store.example_indices]
    if students and all(s is not None and s.score is not None for s in students):
        summary.metrics["plain_student_mean_score"] = sum(s.score for s in students) / len(students)
    return summary


def print_example(path: Path, example: str, console) -> dict[str, Any]:
    """``sdrt show STORE --example ID``: every prompt's traces of one example (by id or index)."""
    from rich.panel import Panel
    from rich.text import Text

    from sdrt_cli.trace_store import TraceStore

    store = TraceStore(path, verify=False)
    index = None
    for i in store.example_indices:
        if store.meta(i, store.prompt_ids[0])["example_id"] == example or str(i) == example:
            index = i
            break
    if index is None:
        raise SdrtError(f"trace store {path} has no example {example!r} (give an example id or index, e.g. {store.meta(store.example_indices[0], store.prompt_ids[0])['example_id']!r})" if len(store) else f"trace store {path} is empty")
    traces = [store.meta(index, pid) for pid in store.prompt_ids]
    best = max(range(len(traces)), key=lambda n: (traces[n]["confidence"], -n))
    document = {"example_index": index, "example_id": traces[0]["example_id"], "most_confident": traces[best]["prompt_id"], "traces": []}
    for n, meta in enumerate(traces):
        fields = {k: meta[k] for k in ("prompt_id", "step1_text", "y1", "step2_text", "y2", "confidence")}
        document["traces"].append(fields)
        if console is not None:
            body = Text()
            for label, key in (("step-1 prompt", "step1_text"), ("step-1 answer", "y1"), ("step-2 prompt", "step2_text"), ("step-2 answer", "y2")):
                body.append(f"{label}: ", style="bold")
                body.append(f"{meta[key]}\n")
            body.append("confidence: ", style="bold")
            body.append(f"{meta['confidence']:.4f}")
            title = f"{meta['prompt_id']}" + (" ★ most confident (the ensemble label)" if n == best else "")
            console.print(Panel(body, title=title, title_align="left", border_style="green" if n == best else "dim"))
    return document


# ---------------------------------------------------------------------------------------------
# Adapter runs and ensembles
# ---------------------------------------------------------------------------------------------


def is_adapter_run(path: Path) -> bool:
    return _manifest_kind(path) == "adapters" or (path / "checkpoints" / "latest.json").is_file()


def inspect_adapter_run(path: Path) -> Summary:
    summary = Summary("adapter run", str(path), COMPLETE, sizes={"bytes": dir_bytes(path)})
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        summary.status, summary.detail = RESUMABLE, "training was interrupted after a checkpoint; re-run `sdrt distill` with --resume"
        return summary
    manifest = _read_json(manifest_path)
    if isinstance(manifest, _Corrupt):
        summary.status, summary.detail = CORRUPT, manifest.detail
        return summary
    training = manifest.get("training") or {}
    summary.settings = {
        "adapter": manifest.get("adapter"),
        "mode": manifest.get("mode"),
        "loss": (manifest.get("loss") or {}).get("spec"),
        "layers": manifest.get("layers"),
        "pos": manifest.get("pos"),
        "rank": manifest.get("rank"),
        "skip": (manifest.get("skip") or {}).get("enabled"),
        "backbone": (manifest.get("backbone") or {}).get("backbone"),
        "epochs": training.get("epochs"),
        "steps": training.get("steps"),
    }
    for prompt_id in manifest.get("prompts", []):
        directory = path / (manifest.get("adapters") or {}).get(prompt_id, f"adapters/{prompt_id}")
        if not directory.is_dir() or not any(directory.iterdir()):
            summary.status, summary.detail = CORRUPT, f"adapter {prompt_id!r} is missing: {directory}"
            return summary
    from sdrt_cli.ensemble import saved_ensembles

    summary.sizes.update(adapters=len(manifest.get("prompts", [])), ensembles=saved_ensembles(path))
    summary.metrics = manifest.get("metrics") or {}
    return summary


def is_ensemble(path: Path) -> bool:
    meta = _read_json(path / "adapter.json") if (path / "adapter.json").is_file() else None
    return isinstance(meta, dict) and meta.get("format") == ENSEMBLE_FORMAT


def inspect_ensemble(path: Path) -> Summary:
    meta = _read_json(path / "adapter.json")
    summary = Summary("ensemble", str(path), COMPLETE, sizes={"bytes": dir_bytes(path)})
    try:
        EnsembleManifest.from_json(meta, path / "adapter.json")
    except SdrtError as refusal:
        summary.status, summary.detail = CORRUPT, str(refusal)
        return summary
    summary.settings = {"name": meta.get("name"), "kind": meta.get("kind"), "members": meta.get("members"), "feature_layer": (meta.get("feature") or {}).get("layer")}
    if meta.get("kind") == "predictor" and not (path / "adapter.safetensors").is_file():
        summary.status, summary.detail = CORRUPT, f"{path / 'adapter.safetensors'} is missing"
    training = meta.get("training") or meta.get("report") or {}
    if isinstance(training, dict):
        summary.metrics = {k: v for k, v in training.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return summary


# ---------------------------------------------------------------------------------------------
# Eval outputs
# ---------------------------------------------------------------------------------------------


def is_eval(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / "predictions").is_dir()


def inspect_eval(path: Path) -> Summary:
    summary = Summary("eval", str(path), COMPLETE, sizes={"bytes": dir_bytes(path)})
    results_path = path / "results.json"
    if not results_path.exists():
        summary.status, summary.detail = RESUMABLE, f"{results_path} is not written yet; re-run the same `sdrt eval` command (with --overwrite) to finish it"
        return summary
    try:
        results = EvalResults.load(path).to_json()
    except SdrtError as refusal:
        summary.status, summary.detail = CORRUPT, str(refusal)
        return summary
    methods = results["methods"]
    summary.settings = {"dataset": results.get("dataset"), "split": results.get("split"), "metric": results.get("metric"), "methods": list(methods), "generation": results.get("generation")}
    summary.sizes["examples"] = results.get("examples")
    for name in methods:
        pred = path / "predictions" / f"{name}.jsonl"
        if not pred.is_file():
            summary.status, summary.detail = CORRUPT, f"{pred} is missing"
            return summary
        lines = [line for line in pred.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != results.get("examples"):
            summary.status, summary.detail = CORRUPT, f"{pred} has {len(lines)} predictions, results.json counts {results.get('examples')}"
            return summary
    summary.metrics = {name: m.get("overall") for name, m in methods.items()}
    return summary


# ---------------------------------------------------------------------------------------------
# Ablate / demo runs
# ---------------------------------------------------------------------------------------------


def _run_command(path: Path) -> str | None:
    info = _read_json(path / "run.json") if (path / "run.json").is_file() else None
    return info.get("command") if isinstance(info, dict) else None


def is_ablate(path: Path) -> bool:
    return _run_command(path) == "ablate" or ((path / "stages").is_dir() and _run_command(path) != "demo")


def is_demo(path: Path) -> bool:
    return _run_command(path) == "demo"


def inspect_ablate(path: Path) -> Summary:
    summary = Summary(_run_command(path) or "ablate", str(path), COMPLETE, sizes={"bytes": dir_bytes(path)})
    stages = [p for p in (path / "stages").iterdir() if p.is_dir()] if (path / "stages").is_dir() else []
    done = [p for p in stages if (p / ".done").is_file()]
    summary.sizes.update(stages=len(stages), stages_done=len(done))
    info = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
    if isinstance(info, dict):
        config = info.get("config") or {}
        summary.settings = {k: config.get(k) for k in ("grid", "datasets", "set_", "train_examples", "eval_examples", "epochs", "backbone") if config.get(k) not in (None, [], "")}
    tables = {}
    for table_path in sorted((path / "tables").glob("*.json")):
        table = _read_json(table_path)
        if isinstance(table, _Corrupt):
            summary.status, summary.detail = CORRUPT, table.detail
            return summary
        tables[table_path.stem] = table.get("rows", [])
    summary.metrics = tables
    if (path / "compare" / "results.json").is_file():
        compare = _read_json(path / "compare" / "results.json")
        if isinstance(compare, dict):
            summary.metrics["compare"] = {n: m.get("overall") for n, m in compare.get("methods", {}).items()}
    unfinished = len(stages) - len(done)
    if unfinished or not tables:
        summary.status = RESUMABLE
        summary.detail = f"{len(done)} of {len(stages)} stages finished" + ("" if tables else ", no tables yet") + "; re-run the same command to continue"
    return summary


# The order matters only where a directory could match several: the most specific test first.
KINDS: list[Kind] = [
    Kind("ensemble", is_ensemble, inspect_ensemble),
    Kind("demo", is_demo, inspect_ablate),
    Kind("ablate", is_ablate, inspect_ablate),
    Kind("trace store", is_trace_store, inspect_trace_store),
    Kind("adapter run", is_adapter_run, inspect_adapter_run),
    Kind("eval", is_eval, inspect_eval),
]


def detect_kind(path: Path | str) -> Kind | None:
    path = Path(path)
    if not path.is_dir():
        return None
    return next((kind for kind in KINDS if kind.detect(path)), None)


def inspect(path: Path | str) -> Summary:
    path = Path(path)
    if not path.exists():
        raise SdrtError(f"{path} does not exist")
    kind = detect_kind(path)
    if kind is None:
        known = ", ".join(k.name for k in KINDS)
        raise SdrtError(f"{path} is not an sdrt directory (none of: {known})")
    return kind.inspect(path)


def render(summary: Summary):
    """The summary as Rich renderables for the terminal."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    colour = {COMPLETE: "green", RESUMABLE: "yellow", CORRUPT: "red"}[summary.status]
    head = Text()
    head.append(f"{summary.path}", style="bold")
    head.append(f"  {summary.kind}  ")
    head.append(summary.status, style=f"bold {colour}")
    parts: list[Any] = [head]
    if summary.detail:
        parts.append(Text(summary.detail, style=colour))
    for title, values in (("settings", summary.settings), ("sizes", summary.sizes)):
        if values:
            table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
            for key, value in values.items():
                shown = human_bytes(value) if key == "bytes" else (json.dumps(value) if isinstance(value, (dict, list)) else str(value))
                table.add_row(key, shown)
            parts.append(table)
    if summary.metrics:
        table = Table(title="metrics", title_justify="left", show_header=False, box=None, padding=(0, 2))
        for key, value in summary.metrics.items():
            if isinstance(value, float):
                shown = f"{value:.4f}"
            elif isinstance(value, list):
                shown = "; ".join(", ".join(f"{k}={v}" for k, v in row.items()) for row in value if isinstance(row, dict))
            else:
                shown = json.dumps(value) if isinstance(value, dict) else str(value)
            table.add_row(key, shown)
        parts.append(table)
    return Group(*parts)
