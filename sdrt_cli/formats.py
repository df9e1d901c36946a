"""What sdrt records on disk, and the one check of a record against what is in use.

A stage refuses to mix outputs that do not belong together: adapters trained on one backbone applied
to another, a trace store read with another tokenizer, a dataset whose example ``i`` is not the one
traced.  Each check has one home:

* a recorded backbone against the one in use: :meth:`sdrt_cli.backbone.BackboneRecord.check_matches`
  (the backbone's own record type, so it stays beside the identity it compares);
* :func:`check_example_id`: a record's example id against the dataset's example at the same index.

Each on-disk record is a typed object with load / validate / save that writes the same JSON as
before it existed, key for key and in the same order, and refuses a bad field in one sentence naming
the file and the field:

* :class:`TraceManifest`: a trace store's ``manifest.json`` (written by ``sdrt traces``, read through
  :class:`sdrt_cli.trace_store.TraceStore`);
* :class:`AdaptersManifest`: the adapters directory's ``manifest.json`` (written by ``sdrt distill``,
  read by ensemble and eval);
* :class:`EnsembleManifest`: an ensemble's ``adapter.json`` (written by ``sdrt ensemble``, read by eval);
* :class:`EvalResults`: an eval run's ``results.json`` (written by ``sdrt eval``, read by report,
  show and ablate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt_cli.errors import SdrtError
from sdrt_cli.io import atomic_write_text


def read_json_file(path: Path, missing: str, unreadable: str) -> Any:
    """The parsed JSON at ``path``; ``missing`` is the sentence when there is no such file,
    ``unreadable`` starts the one for a file that is not JSON (the parser's reason follows)."""
    if not path.is_file():
        raise SdrtError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SdrtError(f"{unreadable}: {exc}") from None


def check_example_id(index: int, dataset_name: str, dataset_id: str, recorded_id: str, record: str, fix: str) -> None:
    """Refuse in one sentence when ``record`` (e.g. "trace store DIR") holds another example at
    ``index`` than the dataset does; ``fix`` says what to do instead."""
    if recorded_id != dataset_id:
        raise SdrtError(f"dataset {dataset_name!r} example {index} is {dataset_id!r} but {record} has {recorded_id!r} there; {fix}")


# ---------------------------------------------------------------------------------------------
# The adapters directory's manifest.json
# ---------------------------------------------------------------------------------------------

ADAPTERS_MANIFEST = "manifest.json"
ADAPTERS_KIND = "adapters"
ADAPTERS_FORMAT_VERSION = 1
# the order `sdrt distill` has always written the fields in (a manifest is saved in this order)
ADAPTERS_FIELDS = (
    "kind", "format_version", "status", "mode", "adapter", "loss", "layers", "compare_layers", "pos", "rank", "skip", "lora",
    "prompts", "adapters", "backbone", "traces", "dataset", "trained_on", "training", "metrics", "selection", "fingerprint",
)


@dataclass
class AdaptersManifest:
    """``ADAPTERS/manifest.json``: what a distill run trained, on what, and where each adapter is.

    The fields every reader relies on are typed attributes; the others (loss, settings, metrics, the
    run's fingerprint...) stay in ``details`` as recorded, so a manifest loads and saves unchanged.
    """

    status: str
    adapter: str  # the registered adapter kind (reft, loreft, a plugin's kind, or lora)
    prompts: list[str]  # the units in training order: prompt ids, or ["gold"]
    adapters: dict[str, str]  # unit -> its adapter's directory, relative to the manifest
    backbone: dict[str, Any]  # the backbone identity the adapters were trained on
    mode: str = "traces"  # "traces" or "gold"
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, document: Any, path: Path | str) -> AdaptersManifest:
        """Validate a parsed manifest; ``path`` names the file in the one-sentence refusals."""
        if not isinstance(document, dict) or document.get("kind") != ADAPTERS_KIND:
            found = document.get("kind") if isinstance(document, dict) else None
            raise SdrtError(f"{path} is not an adapters manifest (field 'kind' is {found!r})")
        if document.get("format_version") != ADAPTERS_FORMAT_VERSION:
            raise SdrtError(f"{path}: field 'format_version' is {document.get('format_version')!r}, this sdrt reads {ADAPTERS_FORMAT_VERSION}")
        checks = [
            ("status", isinstance(document.get("status"), str), "a string"),
            ("adapter", isinstance(document.get("adapter"), str) and bool(document.get("adapter")), "an adapter name"),
            ("prompts", isinstance(document.get("prompts"), list) and all(isinstance(p, str) for p in document["prompts"]), "a list of prompt ids"),
            ("adapters", isinstance(document.get("adapters"), dict), "an object mapping prompt ids to directories"),
            ("backbone", isinstance(document.get("backbone", {}), dict), "a backbone identity object"),
            ("mode", isinstance(document.get("mode", "traces"), str), "a string"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise SdrtError(f"{path}: field {name!r} must be {need}, got {document.get(name)!r}")
        missing = [p for p in document["prompts"] if p not in document["adapters"]]
        if missing:
            raise SdrtError(f"{path}: field 'adapters' has no directory for prompt {missing[0]!r}")
        typed = {"kind", "format_version", "status", "adapter", "prompts", "adapters", "backbone", "mode"}
        return cls(
            status=document["status"],
            adapter=document["adapter"],
            prompts=list(document["prompts"]),
            adapters=dict(document["adapters"]),
            backbone=dict(document.get("backbone") or {}),
            mode=document.get("mode", "traces"),
            details={k: v for k, v in document.items() if k not in typed},
        )

    @classmethod
    def load(cls, out_dir: Path | str) -> AdaptersManifest:
        path = Path(out_dir) / ADAPTERS_MANIFEST
        missing = f"{out_dir} holds no distilled adapters (no {ADAPTERS_MANIFEST}); create them with `sdrt distill`"
        return cls.from_json(read_json_file(path, missing, f"{path} is not readable JSON"), path)

    def to_json(self) -> dict[str, Any]:
        """The JSON object, fields in :data:`ADAPTERS_FIELDS` order (then any this sdrt does not know)."""
        values = {
            "kind": ADAPTERS_KIND,
            "format_version": ADAPTERS_FORMAT_VERSION,
            "status": self.status,
            "mode": self.mode,
            "adapter": self.adapter,
            "prompts": self.prompts,
            "adapters": self.adapters,
            "backbone": self.backbone,
            **self.details,
        }
        ordered = {k: values[k] for k in ADAPTERS_FIELDS if k in values}
        return {**ordered, **{k: v for k, v in values.items() if k not in ordered}}

    def save(self, out_dir: Path | str) -> None:
        atomic_write_text(Path(out_dir) / ADAPTERS_MANIFEST, json.dumps(self.to_json(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# An ensemble's adapter.json
# ---------------------------------------------------------------------------------------------

ENSEMBLE_FORMAT = "sdrt-ensemble"
ENSEMBLE_FORMAT_VERSION = 1
ENSEMBLE_KINDS = ("predictor", "uniform")
ENSEMBLE_FEATURE_READS = "input of decoder layer `layer` at the last prompt token"


@dataclass
class EnsembleManifest:
    """``ADAPTERS/ensembles/NAME/adapter.json`` (written by ``sdrt ensemble``, read by eval): the
    members, the layer the predictor reads and the predictor's shape; its weights are the
    ``adapter.safetensors`` beside it, checked against the recorded ``tensors_sha256``.

    The backbone identity is typed; what ensemble recorded about its inputs and training (adapters,
    traces, training, trained_on, tensors_sha256...) stays in ``details`` as written.
    """

    name: str
    kind: str  # "predictor" or "uniform"
    members: list[str]  # prompt ids, in the predictor's output order
    feature_layer: int  # the decoder layer whose input (at the last prompt token) the predictor reads
    predictor: dict[str, int] | None = None  # {input_size, hidden_size, members}; None when uniform
    backbone: dict[str, Any] | None = None  # the identity of the backbone the ensemble was built on
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, document: Any, path: Path | str) -> EnsembleManifest:
        """Validate a parsed ``adapter.json``; ``path`` names the file in the one-sentence refusals."""
        if not isinstance(document, dict) or document.get("format") != ENSEMBLE_FORMAT:
            found = document.get("format") if isinstance(document, dict) else None
            raise SdrtError(f"{path}: field 'format' is {found!r}, expected {ENSEMBLE_FORMAT!r}")
        if document.get("format_version") != ENSEMBLE_FORMAT_VERSION:
            raise SdrtError(f"{path}: field 'format_version' is {document.get('format_version')!r}, this sdrt reads {ENSEMBLE_FORMAT_VERSION}")
        members = document.get("members")
        feature = document.get("feature")
        layer = feature.get("layer") if isinstance(feature, dict) else None
        kind = document.get("kind")
        predictor = document.get("predictor")
        checks = [
            ("name", isinstance(document.get("name"), str) and bool(document.get("name")), "a directory name", document.get("name")),
            ("kind", kind in ENSEMBLE_KINDS, "'predictor' or 'uniform'", kind),
            ("members", isinstance(members, list) and bool(members) and all(isinstance(m, str) for m in members), "a non-empty list of prompt ids", members),
            ("feature.layer", isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0, "a decoder layer index", layer),
            ("predictor", kind != "predictor" or (isinstance(predictor, dict) and all(isinstance(predictor.get(k), int) for k in ("input_size", "hidden_size"))),
             "an object with integer input_size and hidden_size", predictor),
            ("backbone", document.get("backbone") is None or isinstance(document.get("backbone"), dict), "a backbone identity object", document.get("backbone")),
        ]
        for name, ok, need, value in checks:
            if not ok:
                raise SdrtError(f"{path}: field {name!r} must be {need}, got {value!r}")
        typed = {"format", "format_version", "name", "kind", "members", "feature", "predictor", "backbone"}
        return cls(
            name=document["name"],
            kind=kind,
            members=list(members),
            feature_layer=layer,
            predictor=dict(predictor) if kind == "predictor" else None,
            backbone=document.get("backbone"),
            details={k: v for k, v in document.items() if k not in typed},
        )

    @classmethod
    def load(cls, directory: Path | str, device: Any = "cpu") -> tuple[EnsembleManifest, dict[str, Any]]:
        """The validated ``adapter.json`` of ``directory`` and its tensors (checksum verified)."""
        from sdrt_cli.adapters import ADAPTER_JSON, read_checkpoint

        tensors, document = read_checkpoint(Path(directory), ENSEMBLE_FORMAT, device)
        return cls.from_json(document, Path(directory) / ADAPTER_JSON), tensors

    def to_json(self) -> dict[str, Any]:
        document = {
            "format": ENSEMBLE_FORMAT,
            "format_version": ENSEMBLE_FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "members": self.members,
            "feature": {"layer": self.feature_layer, "reads": ENSEMBLE_FEATURE_READS},
            "predictor": self.predictor,
            **self.details,
        }
        if self.backbone is not None:
            document["backbone"] = self.backbone
        return document

    def save(self, directory: Path | str, tensors: Any) -> None:
        """Write ``tensors`` and this ``adapter.json`` (keys sorted, as every adapter checkpoint;
        ``tensors_sha256`` is recomputed from the tensors written)."""
        from sdrt_cli.adapters import write_checkpoint

        write_checkpoint(Path(directory), tensors, self.to_json())


# ---------------------------------------------------------------------------------------------
# An eval run's results.json
# ---------------------------------------------------------------------------------------------

RESULTS_JSON = "results.json"
# the order `sdrt eval` writes the fields in (a warning only when trained-on examples were scored)
RESULTS_FIELDS = ("dataset", "split", "metric", "scored", "examples", "generation", "methods", "warning")


def _is_score(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


@dataclass
class EvalResults:
    """``OUT/results.json`` of ``sdrt eval`` (written last: its presence marks a finished eval; read by
    report, show and ablate).  Per method: ``label``, ``overall`` (None when the split is not
    scored), ``count``, ``categories`` {key: {value: {score, count}}}, ``timing`` and what the method
    describes of itself (pack, prompt id, adapters, weights...), kept as written."""

    dataset: str
    split: str
    metric: str
    scored: bool
    examples: int
    generation: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    warning: str | None = None  # set when examples a method was trained on were scored anyway
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, document: Any, path: Path | str) -> EvalResults:
        """Validate a parsed ``results.json``; ``path`` names the file in the one-sentence refusals."""
        if not isinstance(document, dict):
            raise SdrtError(f"{path} is not an eval result (a JSON object), got {type(document).__name__}")
        checks = [
            ("dataset", isinstance(document.get("dataset"), str), "a dataset name"),
            ("split", isinstance(document.get("split"), str), "a split name"),
            ("metric", isinstance(document.get("metric"), str), "a metric name"),
            ("scored", isinstance(document.get("scored"), bool), "true or false"),
            ("examples", isinstance(document.get("examples"), int) and not isinstance(document.get("examples"), bool) and document["examples"] >= 0, "a count"),
            ("generation", isinstance(document.get("generation"), dict), "an object of generation settings"),
            ("methods", isinstance(document.get("methods"), dict) and all(isinstance(m, dict) for m in document["methods"].values()), "an object of per-method results"),
            ("warning", document.get("warning") is None or isinstance(document.get("warning"), str), "a string"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise SdrtError(f"{path}: field {name!r} must be {need}, got {document.get(name)!r}")
        for method, entry in document["methods"].items():
            for name, ok, need in [
                ("label", isinstance(entry.get("label"), str), "a string"),
                ("overall", _is_score(entry.get("overall")), "a score or null"),
                ("categories", isinstance(entry.get("categories", {}), dict), "an object of per-category scores"),
                ("timing", isinstance(entry.get("timing", {}), dict), "an object"),
            ]:
                if not ok:
                    raise SdrtError(f"{path}: field 'methods.{method}.{name}' must be {need}, got {entry.get(name)!r}")
        return cls(
            dataset=document["dataset"],
            split=document["split"],
            metric=document["metric"],
            scored=document["scored"],
            examples=document["examples"],
            generation=dict(document["generation"]),
            methods={name: dict(entry) for name, entry in document["methods"].items()},
            warning=document.get("warning"),
            details={k: v for k, v in document.items() if k not in RESULTS_FIELDS},
        )

    @classmethod
    def load(cls, run_dir: Path | str) -> EvalResults:
        path = Path(run_dir) / RESULTS_JSON
        missing = f"{run_dir} holds no finished eval (no {RESULTS_JSON}); run or finish it with `sdrt eval`"
        return cls.from_json(read_json_file(path, missing, f"{path} is not a readable eval result"), path)

    def score(self, method: str) -> float | None:
        """``method``'s overall score (None when it was not run or the split is not scored)."""
        return self.methods.get(method, {}).get("overall")

    def to_json(self) -> dict[str, Any]:
        document = {
            "dataset": self.dataset,
            "split": self.split,
            "metric": self.metric,
            "scored": self.scored,
            "examples": self.examples,
            "generation": self.generation,
            "methods": self.methods,
        }
        if self.warning is not None:
            document["warning"] = self.warning
        return {**document, **self.details}

    def save(self, out_dir: Path | str) -> None:
        atomic_write_text(Path(out_dir) / RESULTS_JSON, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# A trace store's manifest.json
# ---------------------------------------------------------------------------------------------

TRACE_MANIFEST = "manifest.json"
TRACE_FORMAT_VERSION = 1
TRACE_STATUSES = ("running", "complete")
SHARD_FIELDS = {"name": str, "sha256": dict, "examples": list, "records": int, "bytes": int}


@dataclass
class TraceManifest:
    """``STORE/manifest.json`` of ``sdrt traces``: the fingerprint (what the traces were made with)
    and the status; once complete, every shard with its checksums and the counts.

    ``shards`` and the counts are None while a first run is in progress (a store being extended keeps
    them from its last completion); what a run adds when it completes (e.g. the tokens it fed) stays
    in ``details``.
    """

    status: str  # "running" or "complete"
    fingerprint: dict[str, Any]  # backbone identity, pack, dataset, settings: a store's compatibility key
    shards: list[dict[str, Any]] | None = None  # {name, sha256, examples, records, bytes} per shard
    num_examples: int | None = None
    num_records: int | None = None
    bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, document: Any, path: Path | str) -> TraceManifest:
        """Validate a parsed manifest; ``path`` names the file in the one-sentence refusals."""
        if not isinstance(document, dict):
            raise SdrtError(f"{path} is not a trace manifest (a JSON object), got {type(document).__name__}")
        if document.get("format_version") != TRACE_FORMAT_VERSION:
            raise SdrtError(f"{path} has trace format version {document.get('format_version')!r}; this sdrt reads version {TRACE_FORMAT_VERSION}")
        fingerprint = document.get("fingerprint")
        prompts = ((fingerprint or {}).get("pack") or {}).get("prompts") if isinstance(fingerprint, dict) else None
        shards = document.get("shards")
        complete = document.get("status") == "complete"

        def count(name: str) -> bool:
            value = document.get(name)
            return (value is None and not complete) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)

        checks = [
            ("status", document.get("status") in TRACE_STATUSES, "'running' or 'complete'"),
            ("fingerprint", isinstance(fingerprint, dict), "an object"),
            ("fingerprint.pack.prompts", isinstance(prompts, list) and all(isinstance(p, str) for p in prompts), "a list of prompt ids"),
            ("shards", (shards is None and not complete) or (isinstance(shards, list) and all(
                isinstance(s, dict) and set(s) == set(SHARD_FIELDS) and all(isinstance(s[k], t) for k, t in SHARD_FIELDS.items()) for s in shards
            )), "a list of {name, sha256, examples, records, bytes} shard entries"),
            ("num_examples", count("num_examples"), "a count"),
            ("num_records", count("num_records"), "a count"),
            ("bytes", count("bytes"), "a count"),
        ]
        for name, ok, need in checks:
            if not ok:
                value = prompts if name == "fingerprint.pack.prompts" else document.get(name)
                raise SdrtError(f"{path}: field {name!r} must be {need}, got {value!r}")
        typed = {"format_version", "status", "fingerprint", "shards", "num_examples", "num_records", "bytes"}
        return cls(
            status=document["status"],
            fingerprint=fingerprint,
            shards=None if shards is None else [dict(s) for s in shards],
            num_examples=document.get("num_examples"),
            num_records=document.get("num_records"),
            bytes=document.get("bytes"),
            details={k: v for k, v in document.items() if k not in typed},
        )

    @classmethod
    def load(cls, root: Path | str) -> TraceManifest:
        path = Path(root) / TRACE_MANIFEST
        missing = f"{root} is not a trace store (no {TRACE_MANIFEST}); create one with `sdrt traces`"
        return cls.from_json(read_json_file(path, missing, f"{path} is not a readable trace manifest"), path)

    def to_json(self) -> dict[str, Any]:
        """The JSON object in the order ``sdrt traces`` has always written it."""
        document: dict[str, Any] = {"format_version": TRACE_FORMAT_VERSION, "status": self.status, "fingerprint": self.fingerprint}
        for name in ("shards", "num_examples", "num_records", "bytes"):
            if getattr(self, name) is not None:
                document[name] = getattr(self, name)
        return {**document, **self.details}

    def save(self, root: Path | str) -> None:
        atomic_write_text(Path(root) / TRACE_MANIFEST, json.dumps(self.to_json(), indent=2) + "\n")
