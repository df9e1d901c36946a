"""``pool``: an instruction pool of `sdrt calibrate` read as a dataset, so traces, distill, ensemble
and eval run on it unchanged.

A pool is a JSONL file, one instruction per line::

    {"id": "chart-3~a1", "parent_id": "chart-3", "image": {"index": 3, "id": "chart-3"},
     "question": "...", "origin": "augmented", "iteration": 1, "status": "accepted", ...}

``image`` refers to an example of the SOURCE dataset (its position in the source split and its id,
checked on reading): images are never copied.  Options::

    --dataset pool --dataset-option pool=RUN/pools/tuning.jsonl --dataset-option source=synthetic-charts
        [--dataset-option source_split=train] [--data-dir SOURCE_DIR] [any other option of the source]

Rows whose ``status`` is ``rejected`` are skipped.  The question is phrased, answered and scored as
the source dataset does (its instruction and metric), but a pool never has answers to score against
(``has_answers`` is False): instructions an augmentor wrote have no gold answer, so a pool is for
training and assessment only, never for evaluation.  Rows taken from the source keep the source's
gold answers on the example (``--assessor metric`` compares with them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdrt_cli.calibration import read_pool
from sdrt_cli.data import Dataset, Example, examples_by_index
from sdrt_cli.errors import SdrtError


class PoolDataset(Dataset):
    """An instruction pool of `sdrt calibrate` (options pool=FILE, source=NAME[, source_split=SPLIT]) over the source's images, phrased and scored as the source; never has gold answers to score."""

    name = "pool"
    default_split = "pool"

    def __init__(self, data_dir=None, split=None, limit=None, seed=0, pool: str | None = None, source: str | None = None, source_split: str | None = None, **source_options: Any):
        super().__init__(data_dir=None, split=split, limit=limit, seed=seed)
        if not pool:
            raise SdrtError("dataset 'pool' needs --dataset-option pool=FILE (a pool JSONL written by `sdrt calibrate`)")
        if not source:
            raise SdrtError("dataset 'pool' needs --dataset-option source=NAME (the dataset its image references point into)")
        from sdrt_cli.data import open_dataset

        self.pool_path = Path(pool)
        self.options = {"pool": str(pool), "source": source, "source_split": source_split, **source_options}
        self.source = open_dataset(source, data_dir=data_dir, split=source_split, seed=seed, **source_options)
        self.source_dir = data_dir
        self.metric = self.source.metric
        self.instruction = self.source.instruction
        self.rows = read_pool(self.pool_path)[: limit if limit is not None else None]
        self._source_examples = None

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "data_dir": str(self.source_dir) if self.source_dir else None}

    @property
    def has_answers(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> Iterator[str]:
        for row in self.rows:
            yield row["id"]

    def _source(self):
        if self._source_examples is None:
            self._source_examples = examples_by_index(self.source, {row["image"]["index"] for row in self.rows})
        return self._source_examples

    def __iter__(self) -> Iterator[Example]:
        for row in self.rows:
            yield self.example(row)

    def example(self, row: dict[str, Any]) -> Example:
        index, expected = row["image"]["index"], row["image"].get("id")
        source = self._source()
        if index not in source:
            raise SdrtError(f"pool {self.pool_path}: row {row['id']!r} refers to example {index} of {self.source.name!r} split {self.source.split!r}, which has fewer examples")
        if expected is not None and source.id_of(index) != expected:
            raise SdrtError(
                f"pool {self.pool_path}: row {row['id']!r} refers to example {expected!r} at index {index} of {self.source.name!r}, "
                f"but that index holds {source.id_of(index)!r}; use the source dataset and options the pool was made from"
            )
        original = source[index]
        answers = list(original.answers) if row.get("origin", "dataset") == "dataset" else []
        metadata = {**original.metadata, "pool_origin": row.get("origin", "dataset"), "source_id": original.id}
        return Example(id=row["id"], images=original.images, question=row["question"], answers=answers, metadata=metadata)

    def question_text(self, example: Example) -> str:
        return self.source.question_text(example)

    def instruction_for(self, example: Example) -> str:
        return self.source.instruction_for(example)

    def categories(self, example: Example) -> dict[str, str]:
        return {"origin": example.metadata.get("pool_origin", "dataset")}
