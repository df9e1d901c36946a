"""``docvqa`` and ``infographicvqa``: the RRC document VQA benchmarks, scored with ANLS.

Two layouts are read, for either benchmark:

* lmms-lab's parquet (the Hub repo ``lmms-lab/DocVQA``, configs ``DocVQA`` and
  ``InfographicVQA``): ``{config}/{split}-*.parquet`` with questionId, question, image,
  answers, and question_types (DocVQA) or answer_type (InfographicVQA).  ``--data-dir`` may be
  the repo root, the config folder, or one parquet file.
* the official RRC JSON (``{"dataset_name", "dataset_split", "data": [...]}``, e.g.
  ``val_v1.0.json``) with its images beside it (``documents/...`` for DocVQA,
  ``infographicsvqa_images/...`` for InfographicVQA, or the ``image_dir`` option).
  ``--data-dir`` may be the JSON file or its folder.

Splits: validation (default) and test.  Test answers are hidden in both layouts (null in the
parquet, absent in the JSON): such a split has ``has_answers == False``, scoring it is refused,
and ``sdrt_cli.metrics.write_submission`` writes the ``[{"questionId", "answer"}]`` file to upload.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Iterator

from sdrt_cli.data import Example
from sdrt_cli.errors import SdrtError
from sdrt_plugins.datasets.local import (
    ImageRef,
    LocalDataset,
    ParquetTable,
    Record,
    json_field,
    load_json,
    parquet_image,
    split_parquets,
)

# what RRC file names and "dataset_split" values call each split
_RRC_SPLITS = {"val": "validation", "validation": "validation", "test": "test", "train": "train"}
_SPLIT_TOKEN = re.compile(r"(?:^|[_\-.])(train|val|validation|test)(?=[_\-.]|$)")


def _as_answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(a) for a in value if a is not None]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


class _DocumentVQA(LocalDataset):
    metric = "anls"
    instruction = "Answer the question using a single word or phrase."
    default_split = "validation"
    hub_ids = ("lmms-lab/DocVQA",)
    split_aliases = {"val": "validation"}
    extra_options = ("image_dir",)

    hub_config: ClassVar[str] = ""  # folder of the lmms-lab repo
    type_field: ClassVar[str] = ""  # question_types / answer_type
    category_key: ClassVar[str] = ""
    json_image_fields: ClassVar[tuple[str, ...]] = ("image",)
    image_folders: ClassVar[tuple[str, ...]] = ()  # where RRC releases keep the images

    _PARQUET_COLUMNS = ("questionId", "question", "image", "answers")

    def _prepare(self) -> None:
        option_dir = self.options.get("image_dir")
        self.image_dir = Path(option_dir) if option_dir else None
        if self.image_dir is not None and not self.image_dir.is_dir():
            raise SdrtError(f"{self.name} image_dir {self.image_dir} is not a directory")
        root = self.root
        if root.is_file():
            if root.suffix == ".parquet":
                self._use_parquet([root])
            elif root.suffix == ".json":
                self._use_json(root)
            else:
                raise SdrtError(f"{root} is neither a parquet nor an RRC JSON file of {self.name}")
            return
        config_dir = root / self.hub_config if (root / self.hub_config).is_dir() else root
        by_split = split_parquets(config_dir)
        if by_split:
            if self.split not in by_split:
                raise self._unknown_split(config_dir, by_split)
            self._use_parquet(by_split[self.split])
            return
        by_split_json = self._rrc_json_files(root)
        if by_split_json:
            if self.split not in by_split_json:
                raise self._unknown_split(root, by_split_json)
            self._use_json(by_split_json[self.split])
            return
        raise SdrtError(f"{root} holds no {self.name} data: expected {self.layouts}")

    # -- lmms-lab parquet

    def _use_parquet(self, paths: list[Path]) -> None:
        self.layout = "parquet"
        self.tables = [ParquetTable(path) for path in paths]
        for table in self.tables:
            table.require(self._PARQUET_COLUMNS, f"the {self.name} parquet layout")

    def _parquet_records(self, with_images: bool) -> Iterator[Record]:
        columns = ["questionId", "question", "answers", self.type_field, "docId", "image_url", "ucsf_document_id"]
        if with_images:
            columns.append("image")
        for table in self.tables:
            for row, values in table.rows(columns):
                yield self._record(
                    question_id=values["questionId"],
                    question=values["question"],
                    answers=values["answers"],
                    types=values.get(self.type_field),
                    extra={k: values[k] for k in ("docId", "image_url", "ucsf_document_id") if values.get(k) is not None},
                    images=[parquet_image(values["image"], table.path, row)] if with_images else [],
                    where=f"row {row} of {table.path}",
                )

    # -- RRC JSON

    def _rrc_json_files(self, root: Path) -> dict[str, Path]:
        """RRC annotation files under ``root`` (or one folder down) by split, named like val_v1.0.json."""
        found: dict[str, list[Path]] = {}
        for path in sorted(root.glob("*.json")) + sorted(root.glob("*/*.json")):
            match = _SPLIT_TOKEN.search(path.name.lower())
            if match:
                found.setdefault(_RRC_SPLITS[match.group(1)], []).append(path)
        # a release may ship both qa.json and qa_withQT.json; the latter adds question types
        return {split: sorted(paths, key=lambda p: ("withqt" not in p.name.lower(), str(p)))[0] for split, paths in found.items()}

    def _use_json(self, path: Path) -> None:
        self.layout = "rrc-json"
        content = load_json(path)
        if not isinstance(content, dict) or not isinstance(content.get("data"), list):
            raise SdrtError(f"{path} is not an RRC {self.name} file: it has no 'data' list of questions")
        file_split = _RRC_SPLITS.get(str(content.get("dataset_split", "")).lower())
        if file_split is not None and file_split != self.split:
            if self.requested_split is not None:
                raise SdrtError(f"{path} holds the {file_split!r} split, not {self.split!r}")
            self.split = file_split  # a file given without --split: it says which split it is
        self.json_path = path
        self.json_records = content["data"]
        for index, record in enumerate(self.json_records):
            json_field(record, "questionId", path, index)
            json_field(record, "question", path, index)
            self._json_image_name(record, index)

    def _json_image_name(self, record: dict, index: int) -> str:
        for key in self.json_image_fields:
            if isinstance(record, dict) and record.get(key):
                return str(record[key])
        raise SdrtError(f"record {index} of {self.json_path} has no {' or '.join(map(repr, self.json_image_fields))} field")

    def _json_image_path(self, name: str) -> Path:
        relative = Path(name)
        bases = [self.image_dir] if self.image_dir else [self.json_path.parent, self.json_path.parent.parent]
        for base in bases:
            candidates = [base / relative, base / relative.name] + [base / folder / relative.name for folder in self.image_folders]
            for candidate in candidates:
                if candidate.is_file():
                    return candidate
        return bases[0] / relative  # does not exist: opening it names the file

    def _json_records(self, with_images: bool) -> Iterator[Record]:
        for index, record in enumerate(self.json_records):
            where = f"record {index} of {self.json_path}"
            images = []
            if with_images:
                name = self._json_image_name(record, index)
                images = [ImageRef(self._json_image_path(name), f"image {name!r} of record {index} in {self.json_path}")]
            yield self._record(
                question_id=record["questionId"],
                question=record["question"],
                answers=record.get("answers"),
                types=record.get(self.type_field),
                extra={k: record[k] for k in ("docId", "image_url", "ucsf_document_id") if record.get(k) is not None},
                images=images,
                where=where,
            )

    # -- shared

    def _record(self, question_id, question, answers, types, extra, images, where) -> Record:
        if question_id is None or question is None:
            raise SdrtError(f"{where} has an empty questionId or question")
        metadata: dict[str, Any] = {self.type_field: _as_list(types)}
        metadata.update(extra)
        return Record(id=str(question_id), question=str(question), answers=_as_answers(answers), metadata=metadata, images=images)

    def _records(self, with_images: bool) -> Iterator[Record]:
        if self.layout == "parquet":
            return self._parquet_records(with_images)
        return self._json_records(with_images)

    def _count(self) -> int:
        if self.layout == "parquet":
            return sum(table.num_rows for table in self.tables)
        return len(self.json_records)

    def categories(self, example: Example) -> dict[str, Any]:
        types = example.metadata.get(self.type_field) or []
        return {self.category_key: list(types)} if types else {}

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info["layout"] = self.layout
        info["files"] = [str(t.path) for t in self.tables] if self.layout == "parquet" else [str(self.json_path)]
        return info


class DocVQA(_DocumentVQA):
    """DocVQA (single-page document VQA, RRC task 1), ANLS; lmms-lab parquet or RRC JSON."""

    name = "docvqa"
    hub_config = "DocVQA"
    type_field = "question_types"
    category_key = "question_type"
    json_image_fields = ("image",)
    image_folders = ("documents", "images", "spdocvqa_images")
    layouts = "lmms-lab parquet (DocVQA/{split}-*.parquet) or the RRC JSON (e.g. val_v1.0.json with documents/*.png)"


class InfographicVQA(_DocumentVQA):
    """InfographicVQA (RRC), ANLS; lmms-lab parquet or RRC JSON."""

    name = "infographicvqa"
    hub_config = "InfographicVQA"
    type_field = "answer_type"
    category_key = "answer_type"
    json_image_fields = ("image_local_name", "image")
    image_folders = ("infographicsvqa_images", "infographicVQA_images", "images")
    layouts = (
        "lmms-lab parquet (InfographicVQA/{split}-*.parquet) or the RRC JSON "
        "(e.g. infographicsVQA_val_v1.0_withQT.json with infographicsvqa_images/)"
    )
