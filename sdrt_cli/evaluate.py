"""``sdrt eval``: score methods side by side with each benchmark's official metric.

Methods (the rows of the paper's Table 1):

* ``prompt`` -- the plain model on the single-step prompt ``[images, question + instruction]``;
* ``cot``    -- two-step (visual CoT) prompting with one prompt of a pack; y2 is the answer
  (the trace engine's two-step run: step 1 analyses, step 2 answers in the same conversation);
* ``lora``   -- the single-step prompt on the model with a LoRA adapter (the gold-answer baseline
  written by ``sdrt distill --adapter lora --loss ce``); the model is restored afterwards;
* ``sdrt``   -- the single-step prompt with the weighted adapter ensemble (``sdrt_cli.ensemble``):
  one prompt forward in which a pre-hook computes per-example weights and the adapters edit the
  first/last ``pos`` prompt positions; decode steps see the edit through the KV cache only.

All generation is batched on a shared KV cache (``sdrt_cli.generation``); rows of a batch are
examples.  Greedy by default; with ``temperature > 0`` each example draws from its own generator
keyed by (seed, example id, method), so results do not depend on batching or on the number of
processes (token-for-token on CPU in fp32; on GPUs in bf16 a near-tie can flip, see docs/gpu.md).  Under torchrun every rank generates its share of the examples and rank 0 gathers,
scores in dataset order and writes:

    OUT/run.json                   resolved options, versions, git revision
    OUT/partial/METHOD/rNNN.jsonl  each rank's records, appended batch by batch as they are made; a
                                   rerun with the same settings skips the examples found there
    OUT/predictions/METHOD.jsonl   one line per example: prompt, raw output, parsed answer, score
    OUT/results.json               per method: overall + per-category scores, timing, settings
    OUT/results.md                 the comparison table (Table 1 layout) and category breakdowns
    OUT/submission/METHOD.json     only for splits whose answers are hidden (scoring is refused)
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from sdrt_cli import defaults
from sdrt_cli.adapters import LORA
from sdrt_cli.backbone import Backbone
from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError
from sdrt_cli.generation import Sampling, decode, row_generator
from sdrt_cli.prompting import prefill_single_step
from sdrt_cli.traces import strip_eos

METHOD_LABELS = {
    "prompt": "Prompting",
    "cot": "Visual CoT prompting",
    "lora": "Fine-tuning (LoRA, gold answers)",
    "sdrt": "SDRT (weighted adapter ensemble)",
}
METHOD_NAMES = tuple(METHOD_LABELS)


@dataclass
class GenerationSettings:
    """Recorded in run.json and results.json."""

    max_new_tokens: int = 32  # the answer (cot: step 2)
    max_new_tokens_step1: int = defaults.MAX_NEW_TOKENS_STEP1  # cot's analysis step
    batch_size: int = 4
    sampling: Sampling = field(default_factory=Sampling)

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_new_tokens_step1": self.max_new_tokens_step1,
            "batch_size": self.batch_size,
            "sampling": self.sampling.as_dict(),
            "kv_cache": True,
        }


@dataclass
class Generated:
    """One example's generation: what the model was shown, what it said, and method details."""

    prompt: str
    output: str
    output_ids: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


def _generators(settings: GenerationSettings, examples: Sequence[Example], *key: object) -> list[torch.Generator | None]:
    if settings.sampling.temperature <= 0:
        return [None] * len(examples)
    return [row_generator(settings.sampling.seed, ex.id, *key) for ex in examples]


@torch.no_grad()
def generate_single_step(
    backbone: Backbone,
    dataset: Dataset,
    examples: Sequence[Example],
    settings: GenerationSettings,
    key: str,
    steer=None,
    vision=None,
) -> list[Generated]:
    """Greedy/sampled answers to the single-step prompt for a batch of examples (see
    :func:`prefill_single_step` for ``steer`` and ``vision``)."""
    texts, batch, out = prefill_single_step(backbone, dataset, examples, steer, vision)
    rows = list(range(len(examples)))
    generated = decode(
        batch, backbone.lm_logits(out.last_hidden[:, -1]), rows, settings.max_new_tokens, settings.sampling,
        _generators(settings, examples, key),
    )
    weights = steer.last_weights if steer is not None else None
    results = []
    for row in rows:
        extra: dict[str, Any] = {}
        if weights is not None:
            extra["weights"] = {m: round(float(w), 6) for m, w in zip(steer.ensemble.members, weights[row])}
        text = backbone.decode(strip_eos(generated[row], backbone.eos_token_ids))
        results.append(Generated(prompt=texts[row], output=text, output_ids=generated[row], extra=extra))
    return results


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


class Method(abc.ABC):
    """One row of the comparison: prepares the model (``active``) and generates for batches."""

    name: str = ""

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.name, self.name)

    @contextlib.contextmanager
    def active(self, backbone: Backbone) -> Iterator[None]:
        yield

    @abc.abstractmethod
    def generate(self, backbone: Backbone, dataset: Dataset, examples: Sequence[Example], settings: GenerationSettings) -> list[Generated]:
        ...

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}


class PromptMethod(Method):
    name = "prompt"

    def generate(self, backbone, dataset, examples, settings):
        return generate_single_step(backbone, dataset, examples, settings, self.name)


class CotMethod(Method):
    """Two-step prompting with one pack prompt, run by the trace engine; y2 is the answer."""

    name = "cot"

    def __init__(self, pack, prompt):
        self.pack = pack
        self.prompt = prompt

    def generate(self, backbone, dataset, examples, settings):
        from sdrt_cli.traces import TraceEngine, TraceSettings

        # the engine also summarises states for the trace store; keep that to one layer, one row
        trace_settings = TraceSettings(
            pos=1, layers=(-1,), top_k=1, dtype="fp32",
            max_new_tokens_step1=settings.max_new_tokens_step1, max_new_tokens_step2=settings.max_new_tokens,
            sampling=settings.sampling,
        )
        engine = TraceEngine(backbone, dataset, [self.prompt], trace_settings)
        records = engine.run(list(enumerate(examples)))
        return [
            Generated(
                prompt=r.step2_text,
                output=r.y2,
                output_ids=r.y2_ids,
                extra={"prompt_id": r.prompt_id, "step1_prompt": r.step1_text, "y1": r.y1, "y1_ids": r.y1_ids},
            )
            for r in records
        ]

    def describe(self):
        return {"method": self.name, "pack": self.pack.name, "pack_content_hash": self.pack.content_hash, "prompt_id": self.prompt.id}


class LoraMethod(Method):
    """The single-step prompt on the backbone with a saved LoRA applied (and removed afterwards)."""

    name = "lora"

    def __init__(self, run_dir: Path, checkpoint):
        self.run_dir = Path(run_dir)
        self.checkpoint = checkpoint  # sdrt_cli.distill.WeightsCheckpoint

    def active(self, backbone):
        return self.checkpoint.applied(backbone)  # later methods see the plain model again

    def generate(self, backbone, dataset, examples, settings):
        return generate_single_step(backbone, dataset, examples, settings, self.name)

    def describe(self):
        return {"method": self.name, "adapters": str(self.run_dir), "adapter": self.checkpoint.prompt_id}


class SdrtMethod(Method):
    """Single step with the weighted adapter ensemble, all in the prompt forward."""

    name = "sdrt"

    def __init__(self, adapters_dir: Path, ensemble):
        self.adapters_dir = Path(adapters_dir)
        self.ensemble = ensemble
        self._handle = None

    @contextlib.contextmanager
    def active(self, backbone):
        with self.ensemble.attach(backbone) as handle:
            self._handle = handle
            try:
                yield
            finally:
                self._handle = None

    def generate(self, backbone, dataset, examples, settings):
        if self._handle is None:
            raise SdrtError("SdrtMethod.generate runs inside `with method.active(backbone):`")
        return generate_single_step(backbone, dataset, examples, settings, self.name, steer=self._handle, vision=self.ensemble.vision)

    def describe(self):
        e = self.ensemble
        return {"method": self.name, "adapters": str(self.adapters_dir), "ensemble": e.name, "kind": e.kind, "members": e.members, "feature_layer": e.feature_layer}


def lora_checkpoint(run_dir: Path | str, backbone: Backbone, name: str | None):
    """The LoRA checkpoint of a `sdrt distill --adapter lora` run (``gold`` unless named)."""
    from sdrt_cli.distill import load_adapters, read_manifest
    from sdrt_cli.ensemble import check_run_backbone

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    check_run_backbone(run_dir, manifest, backbone)
    if manifest.get("adapter") != LORA:
        raise SdrtError(f"--lora {run_dir} holds {manifest.get('adapter')!r} adapters, not LoRA; pass a `sdrt distill --adapter lora` output")
    _, pairs = load_adapters(run_dir, backbone)
    present = dict(pairs)
    if name is None:
        if "gold" in present:
            name = "gold"
        elif len(present) == 1:
            name = next(iter(present))
        else:
            raise SdrtError(f"{run_dir} holds {len(present)} LoRA adapters and none named 'gold'; choose one with --lora-adapter ({', '.join(present)})")
    if name not in present:
        raise SdrtError(f"{run_dir} has no LoRA adapter {name!r} (it has: {', '.join(present) or 'none'})")
    return present[name]


# ---------------------------------------------------------------------------------------------
# Running and scoring
# ---------------------------------------------------------------------------------------------


def evaluate_method(
    method: Method,
    backbone: Backbone,
    dataset: Dataset,
    items: Iterable[tuple[int, Example]],
    settings: GenerationSettings,
    scorable: bool,
    on_batch=None,
    on_records=None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate, parse and score ``items`` (this process's share, streamed so images are decoded
    one batch at a time); returns prediction records and timing.  ``on_records(records)`` receives
    each batch's records as soon as they exist (eval appends them to disk)."""
    from sdrt_cli.metrics import get_metric

    metric = get_metric(dataset.metric)
    records: list[dict[str, Any]] = []
    seconds, new_tokens, count = 0.0, 0, 0
    stream = iter(items)
    with method.active(backbone):
        while True:
            chunk = list(itertools.islice(stream, settings.batch_size))
            if not chunk:
                break
            examples = [ex for _, ex in chunk]
            began = time.perf_counter()
            outputs = method.generate(backbone, dataset, examples, settings)
            seconds += time.perf_counter() - began
            count += len(chunk)
            fresh: list[dict[str, Any]] = []
            for (index, ex), out in zip(chunk, outputs):
                new_tokens += len(out.output_ids) + len(out.extra.get("y1_ids", []))
                fresh.append(
                    {
                        "index": index,
                        "id": ex.id,
                        "method": method.name,
                        "prompt": out.prompt,
                        "output": out.output,
                        "parsed": metric.parse(out.output, ex),
                        "score": metric.score(out.output, ex) if scorable else None,
                        "answers": list(ex.answers),
                        "categories": dataset.categories(ex),
                        "generated_tokens": len(out.output_ids),
                        **out.extra,
                    }
                )
            records.extend(fresh)
            if on_records is not None:
                on_records(fresh)
            if on_batch is not None:
                on_batch(len(chunk))
    return records, {"seconds": seconds, "examples": count, "new_tokens": new_tokens}


def summarise(records: Sequence[dict[str, Any]], scorable: bool) -> dict[str, Any]:
    from sdrt_cli.metrics import aggregate

    if not scorable:
        return {"overall": None, "count": len(records), "categories": {}}
    return aggregate([r["score"] for r in records], [r["categories"] for r in records])


def weight_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """For sdrt: the mean weight of each member and the mean normalised entropy of the weights
    (1 = uniform, 0 = one member per example), over the examples."""
    from sdrt_cli.ensemble import predictor_entropy

    rows = [r["weights"] for r in records if r.get("weights")]
    if not rows:
        return None
    members = list(rows[0])
    weights = torch.tensor([[row[m] for m in members] for row in rows], dtype=torch.float64)
    return {"mean": dict(zip(members, weights.mean(0).tolist())), "normalised_entropy": predictor_entropy(weights)}


def build_results(dataset: Dataset, methods: Sequence[Method], gathered: dict[str, list[dict]], timing: dict[str, dict], settings: GenerationSettings, scorable: bool) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "metric": dataset.metric,
        "scored": scorable,
        "examples": len(next(iter(gathered.values()))) if gathered else 0,
        "generation": settings.as_dict(),
        "methods": {
            m.name: {
                "label": m.label,
                **m.describe(),
                **summarise(gathered[m.name], scorable),
                "timing": timing[m.name],
                **({"weights": w} if (w := weight_summary(gathered[m.name])) else {}),
            }
            for m in methods
        },
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def results_markdown(results: dict[str, Any]) -> str:
    """Table 1 layout: one row per method, the dataset's score (x100) as the column; then one
    table per breakdown key (MMMU domains, ChartQA subsets, DocVQA question types, ...)."""
    title = f"{results['dataset']} ({results['split']}, {results['metric']})"
    lines = [f"# sdrt eval: {title}", ""]
    if results.get("warning"):
        lines += [f"**{results['warning']}**", ""]
    lines += [f"{results['examples']} examples; scores ×100.", ""]
    lines += ["| Method | " + results["dataset"] + " | n | s/example |", "|---|---|---|---|"]
    for m in results["methods"].values():
        timing = m["timing"]
        per = timing["seconds"] / timing["examples"] if timing["examples"] else 0.0
        lines.append(f"| {m['label']} | {_pct(m['overall'])} | {m['count']} | {per:.3f} |")
    keys = sorted({k for m in results["methods"].values() for k in m["categories"]})
    for key in keys:
        values = sorted({v for m in results["methods"].values() for v in m["categories"].get(key, {})})
        counts = {v: next(m["categories"][key][v]["count"] for m in results["methods"].values() if v in m["categories"].get(key, {})) for v in values}
        lines += ["", f"## By {key}", "", "| Method | " + " | ".join(f"{v} (n={counts[v]})" for v in values) + " |", "|---|" + "---|" * len(values)]
        for m in results["methods"].values():
            cells = [_pct(m["categories"].get(key, {}).get(v, {}).get("score")) for v in values]
            lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    if not results["scored"]:
        lines += ["", "Scores are not computed: this split's answers are hidden; see submission/."]
    return "\n".join(lines) + "\n"


def results_table(results: dict[str, Any]):
    """The comparison for the terminal: the overall table, then one table per breakdown key."""
    from rich.console import Group
    from rich.table import Table

    main = Table(title=f"{results['dataset']} {results['split']}: {results['metric']} ×100, {results['examples']} examples")
    for column in ("Method", results["dataset"], "n", "s/example"):
        main.add_column(column, justify="left" if column == "Method" else "right")
    for m in results["methods"].values():
        timing = m["timing"]
        per = timing["seconds"] / timing["examples"] if timing["examples"] else 0.0
        main.add_row(m["label"], _pct(m["overall"]), str(m["count"]), f"{per:.3f}")
    tables = [main]
    keys = sorted({k for m in results["methods"].values() for k in m["categories"]})
    for key in keys:
        values = sorted({v for m in results["methods"].values() for v in m["categories"].get(key, {})})
        table = Table(title=f"by {key}")
        table.add_column("Method")
        for value in values:
            table.add_column(value, justify="right")
        for m in results["methods"].values():
            table.add_row(m["method"], *[_pct(m["categories"].get(key, {}).get(v, {}).get("score")) for v in values])
        tables.append(table)
    return Group(*tables)


def write_outputs(out: Path, dataset: Dataset, results: dict[str, Any], gathered: dict[str, list[dict]]) -> None:
    from sdrt_cli.formats import RESULTS_JSON, EvalResults
    from sdrt_cli.io import atomic_write_text
    from sdrt_cli.metrics import write_submission

    for name, records in gathered.items():
        atomic_write_text(out / "predictions" / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        if not results["scored"]:
            write_submission(out / "submission" / f"{name}.json", dataset, {r["id"]: r["parsed"] for r in records})
    atomic_write_text(out / "results.md", results_markdown(results))
    # last: results.json marks a finished eval
    EvalResults.from_json(results, out / RESULTS_JSON).save(out)
