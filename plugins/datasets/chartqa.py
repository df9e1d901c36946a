"""``chartqa``: ChartQA (Masry et al. 2022), scored with relaxed accuracy, reported for the human
and augmented subsets and overall.

Layouts:

* the official release: ``{split}/{split}_human.json`` and ``{split}/{split}_augmented.json``
  (records ``{"imgname", "query", "label"}``) with the charts in ``{split}/png/``;
  ``--data-dir`` is the folder holding the split folders (or its ``ChartQA Dataset`` parent).
* ``HuggingFaceM4/ChartQA`` parquet: ``data/{split}-*.parquet`` with image, query, label (a
  list) and human_or_machine (0 human, 1 machine-generated, i.e. augmented).
* ``lmms-lab/ChartQA`` parquet: ``data/test-*.parquet`` with type (human_test /
  augmented_test), question, answer and image.

Splits: train, val (``validation`` is accepted), test (default: the split papers report).
Records come human subset first, then augmented, each in file order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

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

SUBSETS = ("human", "augmented")
_M4_COLUMNS = ("image", "query", "label", "human_or_machine")
_LMMS_COLUMNS = ("image", "question", "answer", "type")


def _subset_of_m4(value: Any, where: str) -> str:
    if value in (0, "0", "human"):
        return "human"
    if value in (1, "1", "machine", "augmented"):
        return "augmented"
    raise SdrtError(f"{where} has human_or_machine {value!r}; expected 0 (human) or 1 (machine)")


def _subset_of_lmms(value: Any, where: str) -> str:
    text = str(value)
    for subset in SUBSETS:
        if text.startswith(subset):
            return subset
    raise SdrtError(f"{where} has type {value!r}; expected human_test or augmented_test")


def _labels(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


class ChartQA(LocalDataset):
    """ChartQA, relaxed accuracy (human / augmented / overall); official JSON or HF parquet."""

    name = "chartqa"
    metric = "relaxed_accuracy"
    # lmms-eval's default ChartQA prompt, the one LLaVA-1.6 numbers are reported with
    instruction = "Answer the question with a single word."
    default_split = "test"
    hub_ids = ("HuggingFaceM4/ChartQA", "lmms-lab/ChartQA")
    split_aliases = {"validation": "val"}
    layouts = (
        "the official folders ({split}/{split}_human.json, {split}_augmented.json, png/) or "
        "parquet from HuggingFaceM4/ChartQA or lmms-lab/ChartQA (data/{split}-*.parquet)"
    )

    def _prepare(self) -> None:
        root = self.root
        if root.is_file():
            if root.suffix != ".parquet":
                raise SdrtError(f"{root} is not a ChartQA parquet file; point --data-dir at {self.layouts}")
            self._use_parquet([root])
            return
        if (root / f"{root.name}_human.json").is_file():  # one split's folder given directly
            if self.requested_split is not None and self.split != root.name:
                raise SdrtError(f"{root} holds the ChartQA split {root.name!r}, not {self.split!r}")
            self.split = root.name
            self._use_official(root)
            return
        for base in (root, root / "ChartQA Dataset"):
            official = {d.name for d in base.iterdir() if d.is_dir() and (d / f"{d.name}_human.json").is_file()} if base.is_dir() else set()
            if official:
                if self.split not in official:
                    raise self._unknown_split(base, official)
                self._use_official(base / self.split)
                return
        for base in (root / "data", root):
            by_split = split_parquets(base) if base.is_dir() else {}
            by_split = {split: paths for split, paths in by_split.items() if split != "data"}
            if by_split:
                if self.split not in by_split:
                    raise self._unknown_split(base, by_split)
                self._use_parquet(by_split[self.split])
                return
        raise SdrtError(f"{root} holds no ChartQA data: expected {self.layouts}")

    # -- official JSON folders

    def _use_official(self, split_dir: Path) -> None:
        self.layout = "official"
        self.split_dir = split_dir
        self.subset_records: dict[str, list[dict]] = {}
        for subset in SUBSETS:
            path = split_dir / f"{self.split}_{subset}.json"
            if not path.is_file():
                raise SdrtError(f"{path} is missing: the official ChartQA layout has {self.split}_human.json and {self.split}_augmented.json")
            records = load_json(path)
            if not isinstance(records, list):
                raise SdrtError(f"{path} is not a list of ChartQA questions")
            for index, record in enumerate(records):
                for key in ("imgname", "query", "label"):
                    json_field(record, key, path, index)
            self.subset_records[subset] = records

    def _official_records(self, with_images: bool) -> Iterator[Record]:
        for subset in SUBSETS:
            path = self.split_dir / f"{self.split}_{subset}.json"
            for index, record in enumerate(self.subset_records[subset]):
                images = []
                if with_images:
                    image_path = self.split_dir / "png" / str(record["imgname"])
                    images = [ImageRef(image_path, f"chart {record['imgname']!r} of record {index} in {path}")]
                yield Record(
                    id=f"{self.split}_{subset}_{index}",
                    question=str(record["query"]),
                    answers=_labels(record["label"]),
                    metadata={"subset": subset, "imgname": str(record["imgname"])},
                    images=images,
                )

    # -- Hub parquet (two schemas)

    def _use_parquet(self, paths: list[Path]) -> None:
        self.tables = [ParquetTable(path) for path in paths]
        first = self.tables[0]
        if "query" in first.columns:
            self.layout, required = "parquet-m4", _M4_COLUMNS
        elif "question" in first.columns:
            self.layout, required = "parquet-lmms", _LMMS_COLUMNS
        else:
            raise SdrtError(
                f"{first.path} has neither a 'query' column (HuggingFaceM4/ChartQA) nor a 'question' column "
                f"(lmms-lab/ChartQA); its columns: {', '.join(first.columns)}"
            )
        for table in self.tables:
            table.require(required, f"the {self.layout} ChartQA layout")

    def _parquet_records(self, with_images: bool) -> Iterator[Record]:
        m4 = self.layout == "parquet-m4"
        columns = list(_M4_COLUMNS if m4 else _LMMS_COLUMNS)
        if not with_images:
            columns.remove("image")
        position = 0
        for table in self.tables:
            for row, values in table.rows(columns):
                where = f"row {row} of {table.path}"
                if m4:
                    subset = _subset_of_m4(values["human_or_machine"], where)
                    question, answers = values["query"], _labels(values["label"])
                else:
                    subset = _subset_of_lmms(values["type"], where)
                    question, answers = values["question"], _labels(values["answer"])
                yield Record(
                    id=f"{self.split}_{position}",
                    question=str(question),
                    answers=answers,
                    metadata={"subset": subset},
                    images=[parquet_image(values["image"], table.path, row)] if with_images else [],
                )
                position += 1

    # -- Dataset interface

    def _records(self, with_images: bool) -> Iterator[Record]:
        if self.layout == "official":
            return self._official_records(with_images)
        return self._parquet_records(with_images)

    def _count(self) -> int:
        if self.layout == "official":
            return sum(len(records) for records in self.subset_records.values())
        return sum(table.num_rows for table in self.tables)

    def categories(self, example: Example) -> dict[str, str]:
        return {"subset": example.metadata["subset"]}

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info["layout"] = self.layout
        return info
